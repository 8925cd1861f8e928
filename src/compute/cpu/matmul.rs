//! `out = x · wᵀ`: a Linear layer without bias (`torch.nn.functional.linear`, weight stored
//! `[out_features, in_features]`). Calibration and evaluation spend nearly all their time here.
//!
//! The structure is GotoBLAS/BLIS's, minus the packing of x:
//! - the output is cut into tiles of `mc` rows × `nc` columns; threads take tiles from a
//!   shared counter;
//! - within a tile, k is walked in blocks of `KC`. The block's slice of w is packed into
//!   panels of `NR` rows laid out k-major, so that the micro-kernel reads `NR` consecutive
//!   values per k step; one panel (`NR × KC` f32 = 16 KiB) stays in L1 while the tile's rows
//!   of x stream past it. x is read in place, `MR` rows at a time: its rows are already
//!   contiguous along k, and packing it would cost as much as packing w again for every tile;
//! - the micro-kernel holds an `MR × NR` block of out in registers (6 × 16 f32 = 12 AVX2
//!   registers) and, per k step, does 96 multiply-adds from two vector loads of w and six
//!   broadcasts of x.
//!
//! Determinism: each output element is one chain of multiply-adds over p = 0, 1, …, k-1 in
//! order (the partial sum goes back to memory between k blocks, exactly). The result
//! therefore does not depend on the tile sizes, the thread count or where the element sits:
//! only on whether the CPU has FMA (`ops::simd`).

use super::simd::{self, MulAdd, Portable};
use super::threads::{num_threads, run_workers};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Rows of x per micro-kernel call.
const MR: usize = 6;
/// Rows of w (= columns of out) per micro-kernel call: two 8-wide vectors.
const NR: usize = 16;
/// Length of the k blocks.
const KC: usize = 256;
/// Largest output tile, in rows and columns; narrower when that leaves threads idle. A tile
/// packs its `NC × KC` slices of w once for all its rows, so tall tiles amortize the packing.
const MC_MAX: usize = 64 * MR;
const NC_MAX: usize = 16 * NR;
/// Below this many multiply-adds, spawning threads costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`, all row-major. Fast path: register-tiled, multi-threaded
/// (`RQ_THREADS`); bitwise independent of the thread count.
///
/// Panics if a slice length does not match its shape (a caller bug, not bad input).
pub fn matmul_bt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    check_shapes(x, w, m, k, n, out);
    if m == 0 || n == 0 {
        return;
    }
    let threads = if m * n * k < PARALLEL_MIN_MACS { 1 } else { num_threads() };
    let (mc, nc) = tile_shape(m, n, threads);
    let job = Job { x, ldx: k, w, ldw: k, m, k, n, out: OutPtr(out.as_mut_ptr()), ldo: n, mc, nc };
    let next = AtomicUsize::new(0);
    run_workers(threads.min(job.tiles()), || job.run(&next, &mut Vec::new()));
}

/// The same product on strided operands, on the calling thread, for kernels that parallelize
/// at a coarser level (attention): `out[i·ldo + j] = Σ_p x[i·ldx + p] · w[j·ldw + p]`.
/// `pack` is scratch space, kept by the caller between calls.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bt_strided(
    (x, ldx): (&[f32], usize),
    (w, ldw): (&[f32], usize),
    m: usize,
    k: usize,
    n: usize,
    (out, ldo): (&mut [f32], usize),
    pack: &mut Vec<f32>,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every row must lie inside its slice: the last one starts at (rows - 1) · ld.
    assert!(ldx >= k && x.len() >= (m - 1) * ldx + k, "matmul: x too short for [{m}, {k}] with stride {ldx}");
    assert!(ldw >= k && w.len() >= (n - 1) * ldw + k, "matmul: w too short for [{n}, {k}] with stride {ldw}");
    assert!(ldo >= n && out.len() >= (m - 1) * ldo + n, "matmul: out too short for [{m}, {n}] with stride {ldo}");
    let job = Job { x, ldx, w, ldw, m, k, n, out: OutPtr(out.as_mut_ptr()), ldo, mc: MC_MAX, nc: NC_MAX };
    job.run(&AtomicUsize::new(0), pack);
}

/// The reference: a plain triple loop, one running f32 sum per element. Slow; for tests.
pub fn matmul_bt_naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    check_shapes(x, w, m, k, n, out);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for p in 0..k {
                s += x[i * k + p] * w[j * k + p];
            }
            out[i * n + j] = s;
        }
    }
}

fn check_shapes(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &[f32]) {
    assert_eq!(x.len(), m * k, "matmul: x has {} values, not m×k = {m}×{k}", x.len());
    assert_eq!(w.len(), n * k, "matmul: w has {} values, not n×k = {n}×{k}", w.len());
    assert_eq!(out.len(), m * n, "matmul: out has {} values, not m×n = {m}×{n}", out.len());
}

/// Output tile size: as large as allowed, then narrowed (columns first: that costs nothing,
/// while fewer rows means packing w more often) until every thread has about four tiles to
/// take, so that a late thread does not hold up the call.
fn tile_shape(m: usize, n: usize, threads: usize) -> (usize, usize) {
    let (mut mc, mut nc) = (MC_MAX, NC_MAX);
    while m.div_ceil(mc) * n.div_ceil(nc) < 4 * threads {
        if nc > NR && n > nc / 2 {
            nc /= 2;
        } else if mc > MR && m > mc / 2 {
            mc = (mc / 2).div_ceil(MR) * MR;
        } else {
            break;
        }
    }
    (mc, nc)
}

/// Raw pointer to `out`, shared by the workers.
struct OutPtr(*mut f32);
// SAFETY: workers write through it only to their own tiles, which are disjoint (see `Job::tile`).
unsafe impl Sync for OutPtr {}

/// One product: `out[i·ldo + j] = Σ_p x[i·ldx + p] · w[j·ldw + p]`, cut into `mc × nc` tiles.
struct Job<'a> {
    x: &'a [f32], // [m, k], row stride ldx
    ldx: usize,
    w: &'a [f32], // [n, k], row stride ldw
    ldw: usize,
    m: usize,
    k: usize,
    n: usize,
    out: OutPtr, // [m, n], row stride ldo
    ldo: usize,
    mc: usize,
    nc: usize,
}

impl Job<'_> {
    fn tiles(&self) -> usize {
        self.m.div_ceil(self.mc) * self.n.div_ceil(self.nc)
    }

    /// Rows `i0..i0+rows` × columns `j0..j0+cols` of tile `t` (row-major tile order).
    fn tile(&self, t: usize) -> Option<(usize, usize, usize, usize)> {
        let tiles_n = self.n.div_ceil(self.nc);
        let (ti, tj) = (t / tiles_n, t % tiles_n);
        let (i0, j0) = (ti * self.mc, tj * self.nc);
        (i0 < self.m).then(|| (i0, self.mc.min(self.m - i0), j0, self.nc.min(self.n - j0)))
    }

    /// Row `i`, columns `j0..j0+cols` of out.
    ///
    /// SAFETY: the caller must be the one worker that owns this part of out (it lies in the
    /// tile that worker took from the counter), and `i < m`, `j0 + cols <= n`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn out_row(&self, i: usize, j0: usize, cols: usize) -> &mut [f32] {
        debug_assert!(i < self.m && j0 + cols <= self.n);
        // SAFETY: in bounds per the contract above (the constructors check the extent of out);
        // no other live reference overlaps it.
        unsafe { std::slice::from_raw_parts_mut(self.out.0.add(i * self.ldo + j0), cols) }
    }

    /// Takes tiles from `next` until none is left and computes them; `pack` is scratch space.
    fn run(&self, next: &AtomicUsize, pack: &mut Vec<f32>) {
        if self.k == 0 {
            while let Some((i0, rows, j0, cols)) = self.tile(next.fetch_add(1, Ordering::Relaxed)) {
                for i in i0..i0 + rows {
                    // SAFETY: row and columns lie in the tile just taken.
                    unsafe { self.out_row(i, j0, cols) }.fill(0.0);
                }
            }
            return;
        }
        pack.resize(self.nc.min(self.n).div_ceil(NR) * NR * KC.min(self.k), 0.0);
        if simd::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                worker_avx2(self, next, pack)
            }
        } else {
            worker::<Portable>(self, next, pack)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn worker_avx2(job: &Job, next: &AtomicUsize, b_pack: &mut [f32]) {
    worker::<simd::Fused>(job, next, b_pack)
}

/// The loops over tiles, k blocks, w panels and x panels around the micro-kernel.
#[inline(always)]
fn worker<M: MulAdd>(job: &Job, next: &AtomicUsize, b_pack: &mut [f32]) {
    while let Some((i0, rows, j0, cols)) = job.tile(next.fetch_add(1, Ordering::Relaxed)) {
        for p0 in (0..job.k).step_by(KC) {
            let kc = KC.min(job.k - p0);
            pack_b(job.w, job.ldw, j0, cols, p0, kc, b_pack);
            for jr in (0..cols).step_by(NR) {
                let b = &b_pack[jr * kc..][..NR * kc];
                let nr = NR.min(cols - jr);
                for ir in (0..rows).step_by(MR) {
                    let mr = MR.min(rows - ir);
                    // x is read in place, MR rows at a time. A short last panel repeats its
                    // final row; the extra results are not stored.
                    let a: [&[f32]; MR] = std::array::from_fn(|r| {
                        let row = i0 + ir + r.min(mr - 1);
                        &job.x[row * job.ldx + p0..][..kc]
                    });
                    let mut acc = [[0f32; NR]; MR];
                    if p0 > 0 {
                        for (r, acc_row) in acc.iter_mut().enumerate().take(mr) {
                            // SAFETY: row and columns lie in this worker's tile.
                            let src = unsafe { job.out_row(i0 + ir + r, j0 + jr, nr) };
                            copy_row(src, acc_row);
                        }
                    }
                    micro_kernel::<M>(a, b, &mut acc);
                    for (r, acc_row) in acc.iter().enumerate().take(mr) {
                        // SAFETY: as above.
                        let dst = unsafe { job.out_row(i0 + ir + r, j0 + jr, nr) };
                        copy_row(acc_row, dst);
                    }
                }
            }
        }
    }
}

/// Copies the first `min(src.len(), dst.len())` values (a tile row is `NR` wide or, at the
/// right edge, less). The full-width case gets a fixed-size copy (two vector moves) instead
/// of a `memcpy` call.
#[inline(always)]
fn copy_row(src: &[f32], dst: &mut [f32]) {
    match (<&[f32; NR]>::try_from(src), <&mut [f32; NR]>::try_from(&mut dst[..])) {
        (Ok(s), Ok(d)) => *d = *s,
        _ => {
            let len = src.len().min(dst.len());
            dst[..len].copy_from_slice(&src[..len]);
        }
    }
}

/// Packs rows `j0..j0+cols`, columns `p0..p0+kc` of w (row stride `ldw`) into panels of `NR`
/// rows laid out k-major, `dst[panel][p][c]`, zero-padded up to a whole panel.
#[inline(always)]
fn pack_b(w: &[f32], ldw: usize, j0: usize, cols: usize, p0: usize, kc: usize, dst: &mut [f32]) {
    for panel in 0..cols.div_ceil(NR) {
        let dst = &mut dst[panel * NR * kc..][..NR * kc];
        for c in 0..NR {
            let col = panel * NR + c;
            if col < cols {
                let src = &w[(j0 + col) * ldw + p0..][..kc];
                for (p, v) in src.iter().enumerate() {
                    dst[p * NR + c] = *v;
                }
            } else {
                for p in 0..kc {
                    dst[p * NR + c] = 0.0;
                }
            }
        }
    }
}

/// `acc[i][j] += Σ_p a[i][p] · b[p][j]` over `MR` rows of x and one packed panel of w.
#[inline(always)]
fn micro_kernel<M: MulAdd>(a: [&[f32]; MR], b: &[f32], acc: &mut [[f32; NR]; MR]) {
    let (b, _) = b.as_chunks::<NR>();
    let kc = b.len();
    // Lets the compiler drop the bounds checks of `a[i][p]` below.
    assert!(a.iter().all(|row| row.len() == kc));
    let mut c = *acc;
    for (p, bp) in b.iter().enumerate() {
        for i in 0..MR {
            let ai = a[i][p];
            for j in 0..NR {
                c[i][j] = M::mul_add(ai, bp[j], c[i][j]);
            }
        }
    }
    *acc = c;
}

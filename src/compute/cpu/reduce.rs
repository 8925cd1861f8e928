//! Reductions of AWQ's search (spec/algorithms.md §6.1) and of auto-quantize's score (§9.3),
//! in the order the device kernels (cuda/awq.cu, cuda/backward.cu) repeat, so both give the
//! same bits.

/// The mean |x| of every column of `x` (`[rows, cols]`) into `out` (`cols` values): per column
/// a sequential f64 sum over the rows, divided by the row count, then cast to f32.
///
/// Panics if `x` is not whole rows of `cols` or `out.len() != cols` (a caller bug).
pub fn col_abs_mean(x: &[f32], cols: usize, out: &mut [f32]) {
    assert!(cols > 0 && x.len().is_multiple_of(cols) && out.len() == cols, "col_abs_mean: {} values, {cols} columns", x.len());
    let rows = x.len() / cols;
    let mut acc = vec![0f64; cols];
    for row in x.chunks_exact(cols) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += f64::from(v.abs());
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / rows as f64) as f32;
    }
}

/// `Σ_c (round(y[c] − reference[c]) · weight[c])²` in f64 (no weight: 1), in the order of
/// one warp of the device kernel ([`warp_sum`]).
///
/// Panics if the lengths differ (a caller bug).
pub fn sq_err_row(y: &[f32], reference: &[f32], weight: Option<&[f32]>, round: impl Fn(f32) -> f32) -> f64 {
    assert_eq!(y.len(), reference.len(), "sq_err_row: {} outputs, {} reference values", y.len(), reference.len());
    let diff = |c: usize| round(y[c] - reference[c]);
    match weight {
        None => warp_sum(y.len(), |c| f64::from(diff(c)) * f64::from(diff(c))),
        Some(w) => {
            assert_eq!(w.len(), y.len(), "sq_err_row: weights are not one per output");
            warp_sum(y.len(), |c| {
                let d = f64::from(diff(c) * w[c]);
                d * d
            })
        }
    }
}

/// `Σ_{i<n} term(i)` in f64 in the order of one warp of a device kernel: lane `j` sums the
/// terms `j, j + 32, …` in order, then the 32 partial sums are combined by a xor butterfly
/// (each step adds the partial `off` lanes away, for off = 16, 8, 4, 2, 1). The lanes are
/// filled 32 terms at a time, so the loop vectorizes.
#[inline]
pub fn warp_sum(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut p = [0f64; 32];
    let full = n / 32 * 32;
    for c0 in (0..full).step_by(32) {
        for (j, lane) in p.iter_mut().enumerate() {
            *lane += term(c0 + j);
        }
    }
    for (j, lane) in p.iter_mut().take(n - full).enumerate() {
        *lane += term(full + j);
    }
    for off in [16, 8, 4, 2, 1] {
        let q = p;
        for (j, v) in p.iter_mut().enumerate() {
            *v = q[j] + q[j ^ off];
        }
    }
    p[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sq_err_row_is_the_sum_of_squares() {
        let y: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let r: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = y.iter().zip(&r).map(|(&a, &b)| f64::from(a - b).powi(2)).sum();
        let got = sq_err_row(&y, &r, None, |d| d);
        assert!((got - exact).abs() <= 1e-12 * exact, "{got} vs {exact}");
        assert_eq!(sq_err_row(&[], &[], None, |d| d), 0.0);
        assert!(sq_err_row(&[f32::NAN], &[0.0], None, |d| d).is_nan());
        let w: Vec<f32> = (0..77).map(|i| i as f32 * 0.01).collect();
        let exact: f64 = y.iter().zip(&r).zip(&w).map(|((&a, &b), &w)| f64::from((a - b) * w).powi(2)).sum();
        let got = sq_err_row(&y, &r, Some(&w), |d| d);
        assert!((got - exact).abs() <= 1e-12 * exact, "{got} vs {exact}");
    }

    #[test]
    fn col_abs_mean_is_the_mean_of_magnitudes() {
        let x = [1.0, -2.0, -3.0, 4.0, 0.5, f32::NAN];
        let mut out = [0f32; 2];
        col_abs_mean(&x, 2, &mut out);
        assert_eq!(out[0], 1.5);
        assert!(out[1].is_nan());
    }
}

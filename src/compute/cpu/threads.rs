//! Worker threads: `std::thread::scope`, no pool. A kernel call spawns its workers, they pull
//! task numbers from a shared counter (so a core busy with something else simply takes fewer
//! tasks) and are joined before the call returns.

use std::sync::OnceLock;

/// Threads a kernel may use: env `RQ_THREADS` when it is a positive integer, otherwise
/// `std::thread::available_parallelism()`. Read once per process.
pub fn num_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let from_env = std::env::var("RQ_THREADS").ok().and_then(|s| s.trim().parse::<usize>().ok());
        match from_env {
            Some(n) if n > 0 => n,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    })
}

/// Runs `work` on `n` threads (the caller's plus `n - 1` scoped ones) and waits for all.
pub(crate) fn run_workers(n: usize, work: impl Fn() + Sync) {
    std::thread::scope(|s| {
        for _ in 1..n {
            s.spawn(&work);
        }
        work();
    });
}

/// `f` of every piece, the pieces on threads of their own (the caller's takes the first), the
/// results concatenated in the pieces' order. For row-wise work split with [`rows_per_piece`].
pub(crate) fn map_pieces<P: Send, T: Send>(pieces: impl IntoIterator<Item = P>, f: impl Fn(P) -> Vec<T> + Sync) -> Vec<T> {
    let mut pieces = pieces.into_iter();
    let first = pieces.next();
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = pieces.map(|p| s.spawn(move || f(p))).collect();
        let mut out = first.map(f).unwrap_or_default();
        handles.into_iter().for_each(|h| out.extend(h.join().expect("worker thread")));
        out
    })
}

/// Rows per piece when `rows` rows are split over the kernel threads (at least 1).
pub(crate) fn rows_per_piece(rows: usize) -> usize {
    rows.div_ceil(num_threads()).max(1)
}

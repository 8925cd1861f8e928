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

//! Progress lines on stderr for long work: "<task> layer i/N  elapsed  eta".

use std::time::Instant;

pub struct Progress {
    task: String,
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(task: &str, quiet: bool) -> Progress {
        Progress { task: task.to_string(), start: Instant::now(), quiet }
    }
    /// Reports that `done` of `total` steps are finished.
    pub fn step(&self, what: &str, done: usize, total: usize) {
        if self.quiet {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done == 0 { 0.0 } else { elapsed / done as f64 * (total - done) as f64 };
        crate::err!("{}: {what} {done}/{total}  elapsed {elapsed:.1}s  eta {eta:.1}s", self.task);
    }
    pub fn note(&self, msg: &str) {
        if !self.quiet {
            crate::err!("{}: {msg}", self.task);
        }
    }
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

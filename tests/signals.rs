//! Hardening item 13: SIGINT / SIGTERM stop a quantize run with no temporary folder left and
//! nothing published, exit 128 + signal; a later run removes what killed runs left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rq-min");

/// Entries beside `out` named like rq-min's temporaries.
fn temporaries(out: &Path) -> Vec<PathBuf> {
    let prefix = format!(".{}.rq-min-", out.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A pid no process has.
fn dead_pid() -> i32 {
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    (1..1000).map(|k| 4_194_304 - k).find(|&p| unsafe { libc::kill(p, 0) } != 0).unwrap()
}

#[test]
fn a_signal_stops_the_run_cleanly() {
    let Some(shared) = common::shared_dir() else { return };
    let model = shared.join("models/rq-tiny");
    for (sig, name) in [(libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        let dir = std::env::temp_dir().join(format!("rq-min-signal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        // What a run killed with SIGKILL leaves: removed, and said, by the next run.
        let stale = dir.join(format!(".out.rq-min-tmp-{}-0123456789abcdef", dead_pid()));
        std::fs::create_dir_all(stale.join("x")).unwrap();

        let args = ["quantize", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let more = ["--qformat", "int4_awq", "--calib-size", "32", "--calib-seq", "256", "--no-eval"];
        let mut child = Command::new(BIN).args(args).args(more).stderr(Stdio::piped()).spawn().unwrap();
        // Signal once the run has its staging folder (AWQ on rq-tiny then takes seconds).
        let started = Instant::now();
        let mine = format!("-{}-", child.id());
        while !temporaries(&out).iter().any(|p| p.to_string_lossy().contains(&mine)) {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it was signalled");
            assert!(started.elapsed() < Duration::from_secs(120), "no staging folder appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(128 + sig), "{stderr}");
        assert!(stderr.contains(&format!("interrupted by signal {sig}")), "{stderr}");
        assert!(stderr.contains("left by a run that is gone") && stderr.contains(&stale.display().to_string()), "{stderr}");
        assert!(!out.exists(), "the output was published");
        assert_eq!(temporaries(&out), Vec::<PathBuf>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

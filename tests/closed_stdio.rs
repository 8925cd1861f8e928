//! Issue 12 item 12: a closed or broken stdout / stderr (`rq-min inspect M | head -1`,
//! `2>&-`) never makes rq-min panic (exit 101); it exits with the command's own status.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_rq-min");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families-llama");

/// The write end of a pipe whose read end is already closed: every write gets EPIPE.
fn broken_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fresh descriptors, each owned exactly once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[0]));
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

/// Exit code of `rq-min args` with stdout a broken pipe and stderr captured; asserts that it
/// did not panic.
fn run_stdout_broken(args: &[&str]) -> i32 {
    let out = Command::new(BIN).args(args).stdout(broken_pipe()).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "rq-min {args:?}: {stderr}");
    let code = out.status.code().unwrap_or_else(|| panic!("rq-min {args:?} killed by {:?}", out.status.signal()));
    assert_ne!(code, 101, "rq-min {args:?}: {stderr}");
    code
}

#[test]
fn broken_stdout_exits_quietly() {
    assert_eq!(run_stdout_broken(&["inspect", FIXTURE]), 0);
    assert_eq!(run_stdout_broken(&["inspect", &format!("{FIXTURE}/model.safetensors")]), 0);
    assert_eq!(run_stdout_broken(&["--help"]), 0);
    assert_eq!(run_stdout_broken(&["inspect", "/nonexistent-rq-min"]), 1);
}

#[test]
fn broken_stderr_keeps_the_exit_status() {
    for (args, code) in [(vec!["inspect", "/nonexistent-rq-min"], 1), (vec!["bogus"], 1), (vec!["inspect", FIXTURE], 0)] {
        let status = Command::new(BIN).args(&args).stdout(broken_pipe()).stderr(broken_pipe()).status().unwrap();
        assert_eq!(status.code(), Some(code), "rq-min {args:?}: {status:?}");
    }
}

#[test]
fn closed_stdout_and_stderr_keep_the_exit_status() {
    for (args, code) in [(vec!["inspect", FIXTURE], 0), (vec!["inspect", "/nonexistent-rq-min"], 1)] {
        let mut cmd = Command::new(BIN);
        cmd.args(&args).stdin(Stdio::null());
        // SAFETY: close is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::close(1);
                libc::close(2);
                Ok(())
            });
        }
        let status = cmd.status().unwrap();
        assert_eq!(status.code(), Some(code), "rq-min {args:?} with 1 and 2 closed: {status:?}");
    }
}

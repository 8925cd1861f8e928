//! SIGINT / SIGTERM / SIGHUP end a run cleanly: the handler only records the signal (an atomic
//! store, async-signal-safe) and puts the default action back, so a second Ctrl-C stops the
//! process at once. Long loops call [`check`] once per step (a decoder layer, a tensor); it
//! returns `Error::Interrupted`, which unwinds like any error: staging folders and temporary
//! files are removed by their owners on the way out, nothing is published, and the binary exits
//! with 128 + the signal number, as a shell reports a process killed by it.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicI32, Ordering};

/// The signal received, 0 while none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn record(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe; SIG_DFL makes the next one of the same kind fatal.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (the binary calls it once at start).
pub fn install() {
    for sig in SIGNALS {
        // SAFETY: `record` only touches an atomic and re-installs the default action.
        unsafe {
            libc::signal(sig, record as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

/// `Err(Error::Interrupted)` once a signal has arrived.
pub fn check() -> Result<()> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => Err(Error::Interrupted(sig)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_turns_into_an_error_once_received() {
        assert!(check().is_ok());
        install();
        // SAFETY: raising a signal whose handler was just installed.
        unsafe {
            libc::raise(libc::SIGHUP);
        }
        assert!(matches!(check(), Err(Error::Interrupted(s)) if s == libc::SIGHUP));
    }
}

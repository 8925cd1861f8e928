//! Writing to stdout / stderr without ever panicking. `println!` panics when the write fails
//! (stdout a closed pipe: `rq-min inspect M | head -1`), which ends the process with exit code
//! 101 and a panic message. The `out!` / `err!` macros write a line and ignore a failed write,
//! as a Unix filter does when its reader goes away; the exit status stays the command's own.

use std::fmt;
use std::io::Write;

/// `println!` that ignores write errors (EPIPE, a closed stdout).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::io::say::line(&mut ::std::io::stdout().lock(), format_args!($($arg)*)) };
}

/// `eprintln!` that ignores write errors (EPIPE, a closed stderr).
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::io::say::line(&mut ::std::io::stderr().lock(), format_args!($($arg)*)) };
}

/// Writes `args` and a newline to `w`, flushed; a failure is dropped (see the module doc).
pub fn line(w: &mut impl Write, args: fmt::Arguments) {
    let _ = w.write_fmt(format_args!("{args}\n")).and_then(|()| w.flush());
}

/// Opens /dev/null on any of file descriptors 0, 1, 2 that is closed (`rq-min ... >&-`), so the
/// first file the run opens does not become "stdout" and receive its messages.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) only queries; open returns the lowest free descriptor, which
        // is `fd` itself since every lower one is open.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF) {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            }
        }
    }
}

//! Temporary files and folders another local user cannot redirect: names carry a random
//! suffix, every file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (a planted file or
//! symlink makes the call fail instead of being followed or overwritten), and `verify`'s
//! extraction folder comes from `mkdtemp` (mode 0700) with files opened relative to it.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// 64 random bits as 16 hex digits: from /dev/urandom, or (if it cannot be read) the time, the
/// pid and a counter mixed by a SplitMix64 step.
pub fn random_suffix() -> String {
    let mut b = [0u8; 8];
    let v = match File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            splitmix64(t ^ (std::process::id() as u64) << 32 ^ n)
        }
    };
    format!("{v:016x}")
}

/// One SplitMix64 output for `x` (a bijective 64-bit mix).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The folder `out` lives in (`.` for a bare name).
pub fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates a new file at `path` (mode 0600): fails if anything, a symlink included, is there.
pub fn create_new_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Tries `make` on `.{name of out}.rq-min-{what}-{random}` beside `out` until one attempt does
/// not fail with "already exists" (a few attempts: a collision of random names means someone
/// is guessing them).
fn beside<T>(out: &Path, what: &str, make: impl Fn(&Path) -> std::io::Result<T>) -> std::io::Result<(PathBuf, T)> {
    let name = out.file_name().unwrap_or(OsStr::new("out")).to_string_lossy();
    let parent = parent_of(out);
    let mut last = None;
    for _ in 0..8 {
        let path = parent.join(format!(".{name}.rq-min-{what}-{}", random_suffix()));
        match make(&path) {
            Ok(t) => return Ok((path, t)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// A new temporary file beside `out` (same file system, so renaming it onto `out` is atomic).
pub fn temp_file_beside(out: &Path, what: &str) -> std::io::Result<(PathBuf, File)> {
    beside(out, what, create_new_file)
}

/// A new, empty temporary folder beside `out`, created by `mkdir` (which never follows a
/// symlink and fails when the name is taken).
pub fn temp_dir_beside(out: &Path, what: &str) -> std::io::Result<PathBuf> {
    beside(out, what, |p| std::fs::create_dir(p)).map(|(p, ())| p)
}

/// A private folder in the system temp dir (`mkdtemp`: random name, mode 0700), removed with
/// its content on drop. Files go in through `write`, relative to the folder's descriptor.
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PrivateDir {
    /// Creates `$TMPDIR/{prefix}XXXXXX`.
    pub fn new(prefix: &str) -> std::io::Result<PrivateDir> {
        let template = std::env::temp_dir().join(format!("{prefix}XXXXXX"));
        let mut buf = CString::new(template.as_os_str().as_bytes()).map_err(std::io::Error::other)?.into_bytes_with_nul();
        // SAFETY: buf is a writable NUL-terminated template that mkdtemp fills in place.
        if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        buf.pop();
        let path = PathBuf::from(OsStr::from_bytes(&buf));
        let cpath = CString::new(buf).map_err(std::io::Error::other)?;
        // SAFETY: cpath is a valid C string; the returned descriptor is owned below.
        let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        Ok(PrivateDir { path, fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new file `name` (one path component, mode 0600) in the folder:
    /// `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` on the folder's descriptor.
    pub fn write(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad file name {name:?}")));
        }
        let cname = CString::new(name).map_err(std::io::Error::other)?;
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC;
        // SAFETY: the directory descriptor is open for self's lifetime; cname is a C string.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), cname.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(data)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

//! Temporary files and folders another local user cannot redirect: names carry a random
//! suffix, every file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (a planted file or
//! symlink makes the call fail instead of being followed or overwritten), and `verify`'s
//! extraction folder comes from `mkdtemp` (mode 0700) with files opened relative to it.
//!
//! A finished output is published onto `--out` by one rename ([`Target::publish`]) that never
//! replaces what appeared there while the run was working: `renameat2(RENAME_NOREPLACE)` for a
//! new output, `RENAME_EXCHANGE` (after checking the device and inode) for what `--force`
//! replaces. Temporary names carry the pid, so a later run removes those of runs that are gone.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
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

/// Tries `make` on `.{name of out}.rq-min-{what}-{pid}-{random}` beside `out` until one attempt does
/// not fail with "already exists" (a few attempts: a collision of random names means someone
/// is guessing them).
fn beside<T>(out: &Path, what: &str, make: impl Fn(&Path) -> std::io::Result<T>) -> std::io::Result<(PathBuf, T)> {
    let name = out.file_name().unwrap_or(OsStr::new("out")).to_string_lossy();
    let parent = parent_of(out);
    let mut last = None;
    for _ in 0..8 {
        let path = parent.join(format!(".{name}.rq-min-{what}-{}-{}", std::process::id(), random_suffix()));
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

/// The identity of a file system entry (device, inode, and its creation time, or its change
/// time where the file system keeps no creation time, since a freed inode number is soon handed
/// out again), to tell whether `--out` is still the entry that was there when the run started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    born: (i64, i64),
}

/// The identity of the entry at `p` itself (a symlink is not followed), if there is one.
pub fn file_id(p: &Path) -> Option<FileId> {
    let m = std::fs::symlink_metadata(p).ok()?;
    let born = match m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        Some(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
        None => (m.ctime(), m.ctime_nsec()),
    };
    Some(FileId { dev: m.dev(), ino: m.ino(), born })
}

/// Where a run publishes its output, and what was there when it started: `--force` replaces
/// exactly that entry; anything that appears later is never replaced.
#[derive(Clone, Debug)]
pub struct Target {
    path: PathBuf,
    replaces: Option<FileId>,
}

impl Target {
    /// Refuses an existing `out` unless `force`.
    pub fn new(out: &Path, force: bool) -> Result<Target> {
        if out.file_name().is_none() {
            return Err(Error::Usage(format!("--out {} has no file or folder name", out.display())));
        }
        let replaces = file_id(out);
        if replaces.is_some() && !force {
            return Err(Error::Usage(format!("output {} already exists; pass --force to replace it", out.display())));
        }
        Ok(Target { path: out.to_path_buf(), replaces })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the finished `tmp` (a file or folder beside the target) onto the target in one
    /// rename. A new output never replaces an entry that appeared meanwhile; a `--force` run
    /// swaps with the entry it found at start (same device and inode) and then removes it.
    /// On failure `tmp` is left for its owner to remove.
    pub fn publish(&self, tmp: &Path) -> Result<()> {
        let out = &self.path;
        let appeared = || {
            Error::Usage(format!(
                "{} appeared while this run was writing (another run on the same --out?); it was left as it is",
                out.display()
            ))
        };
        match self.replaces {
            None => match rename2(tmp, out, libc::RENAME_NOREPLACE) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(appeared()),
                Err(e) if unsupported(&e) => rename_noreplace_fallback(tmp, out).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => appeared(),
                    _ => Error::io(out, e),
                }),
                Err(e) => Err(Error::io(out, e)),
            },
            Some(id) => {
                if file_id(out) != Some(id) {
                    return Err(Error::Usage(format!(
                        "{} was replaced or removed while this run was writing (another run?); not touching it",
                        out.display()
                    )));
                }
                match rename2(tmp, out, libc::RENAME_EXCHANGE) {
                    Ok(()) => remove_entry(tmp).map_err(|e| Error::io(tmp, e)),
                    Err(e) if unsupported(&e) => {
                        let (aside, ()) = beside(out, "old", |p| std::fs::rename(out, p)).map_err(|e| Error::io(out, e))?;
                        std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))?;
                        remove_entry(&aside).map_err(|e| Error::io(&aside, e))
                    }
                    Err(e) => Err(Error::io(out, e)),
                }
            }
        }
    }
}

/// `renameat2(from, to, flags)` (Linux 3.15+; not every file system takes the flags).
fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; the syscall only reads them.
    let r = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kernel or the file system does not know the renameat2 flag.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// RENAME_NOREPLACE without renameat2: a file is linked (which fails on an existing name) and
/// its temporary name unlinked; a folder is renamed, which fails onto anything but an empty
/// folder, and that case is refused by checking first.
fn rename_noreplace_fallback(tmp: &Path, out: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(tmp)?.is_dir() {
        if std::fs::symlink_metadata(out).is_ok() {
            return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
        }
        std::fs::rename(tmp, out)
    } else {
        std::fs::hard_link(tmp, out)?;
        std::fs::remove_file(tmp)
    }
}

/// Removes a file or a folder with its content.
fn remove_entry(p: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(p)?.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Removes the temporary files and folders beside `out` that runs which are gone left behind
/// (killed before they could clean up): `.{name}.rq-min-{what}-{pid}-{random}` whose pid no
/// longer runs and which belong to this user. Returns what was removed.
pub fn remove_stale_beside(out: &Path) -> Vec<PathBuf> {
    let Some(name) = out.file_name() else { return vec![] };
    let prefix = format!(".{}.rq-min-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent_of(out)) else { return vec![] };
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let mut parts = rest.rsplitn(3, '-');
        let (Some(random), Some(pid), Some(_what)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse::<libc::pid_t>() else { continue };
        let ours = e.path().symlink_metadata().is_ok_and(|m| m.uid() == uid);
        if random.len() != 16 || pid <= 0 || pid as u32 == std::process::id() || !ours || alive(pid) {
            continue;
        }
        if remove_entry(&e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Whether process `pid` exists (`kill(pid, 0)`: EPERM means it exists but is another user's).
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Refuses an `out` that is the input folder, lies inside it or holds it (compared as
/// canonical paths, and by device and inode when both exist), so neither the export nor a
/// `--force` can overwrite or delete the model it reads.
pub fn check_out_vs_input(input: &Path, out: &Path) -> Result<()> {
    let input_c = std::fs::canonicalize(input).map_err(|e| Error::io(input, e))?;
    let out_c = canonical_beyond(out);
    let same = file_id(out).is_some() && std::fs::metadata(out).ok().map(|m| (m.dev(), m.ino()))
        == std::fs::metadata(input).ok().map(|m| (m.dev(), m.ino()));
    let relation = if same || out_c == input_c {
        "is the input model folder"
    } else if out_c.starts_with(&input_c) {
        "is inside the input model folder"
    } else if input_c.starts_with(&out_c) {
        "holds the input model folder"
    } else {
        return Ok(());
    };
    Err(Error::Usage(format!("--out {} {relation} ({}); refusing to write there", out.display(), input.display())))
}

/// `p` made absolute with its existing ancestors resolved (it need not exist yet).
fn canonical_beyond(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(c, |acc: PathBuf, part| acc.join(part));
        }
        match (cur.file_name(), cur.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rq-min-tmp-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn staged(out: &Path, content: &str) -> PathBuf {
        let tmp = temp_dir_beside(out, "tmp").unwrap();
        std::fs::write(tmp.join("f"), content).unwrap();
        tmp
    }

    /// A folder that appears at `--out` while the run works is never replaced, with or without
    /// `--force`; `--force` replaces exactly what was there at start (hardening item 3).
    #[test]
    fn publish_never_replaces_what_appeared_meanwhile() {
        let dir = scratch("publish");
        let out = dir.join("out");
        // New output, and something appears before the end: refused, left alone.
        let target = Target::new(&out, true).unwrap();
        let tmp = staged(&out, "new");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("theirs"), "x").unwrap();
        let err = target.publish(&tmp).unwrap_err().to_string();
        assert!(err.contains("appeared while this run was writing"), "{err}");
        assert!(out.join("theirs").exists() && tmp.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
        // --force replaces what was there at start, in one swap, and removes it.
        let target = Target::new(&out, true).unwrap();
        let tmp = staged(&out, "new");
        target.publish(&tmp).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "new");
        assert!(!out.join("theirs").exists() && !tmp.exists());
        // ... but not an entry that replaced it meanwhile.
        let target = Target::new(&out, true).unwrap();
        let tmp = staged(&out, "newer");
        std::fs::remove_dir_all(&out).unwrap();
        // File system timestamps are coarse (a clock tick); another run takes far longer.
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::create_dir(&out).unwrap();
        let err = target.publish(&tmp).unwrap_err().to_string();
        assert!(err.contains("replaced or removed"), "{err}");
        assert!(!out.join("f").exists());
        // Without --force an existing output is refused up front.
        assert!(Target::new(&out, false).unwrap_err().to_string().contains("--force"));
        // Files (.qnemo) follow the same rules.
        let file = dir.join("m.qnemo");
        let target = Target::new(&file, false).unwrap();
        let (t, _) = temp_file_beside(&file, "tmp").unwrap();
        std::fs::write(&file, "theirs").unwrap();
        assert!(target.publish(&t).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "theirs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--out` equal to, inside or holding the input is refused, also through a symlink and
    /// when `--out` does not exist yet (hardening item 4).
    #[test]
    fn out_must_not_touch_the_input() {
        let dir = scratch("out-vs-input");
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        for (out, what) in [
            (model.clone(), "is the input model folder"),
            (link.clone(), "is the input model folder"),
            (model.join("sub/deeper"), "is inside the input model folder"),
            (link.join("q"), "is inside the input model folder"),
            (dir.clone(), "holds the input model folder"),
            (model.join("../model/./x"), "is inside the input model folder"),
        ] {
            let err = check_out_vs_input(&model, &out).unwrap_err().to_string();
            assert!(err.contains(what), "{}: {err}", out.display());
        }
        check_out_vs_input(&model, &dir.join("out")).unwrap();
        check_out_vs_input(&model, &dir.join("model-fp8")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Temporary entries of runs that are gone are removed; those of live runs (this one) and
    /// other names are kept (hardening item 13).
    #[test]
    fn stale_temporaries_of_dead_runs_are_removed() {
        let dir = scratch("stale");
        let out = dir.join("out");
        // A pid that is not running: the highest one the kernel can hand out, if free.
        let dead = (1..64).map(|k| 4_194_304 - k).find(|&p| !alive(p)).unwrap();
        let stale = dir.join(format!(".out.rq-min-tmp-{dead}-0123456789abcdef"));
        std::fs::create_dir_all(stale.join("inner")).unwrap();
        let live = temp_dir_beside(&out, "tmp").unwrap();
        let other = dir.join(".out.rq-min-notes");
        std::fs::write(&other, "x").unwrap();
        assert_eq!(remove_stale_beside(&out), vec![stale.clone()]);
        assert!(!stale.exists() && live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

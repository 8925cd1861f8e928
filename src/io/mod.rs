//! File formats, read and written here with no dependency: JSON, safetensors (single files,
//! sharded checkpoints, the shard writer) and the tar + gzip of `.qnemo` archives; temporary
//! files another user cannot redirect (`tmp`) and console output that never panics (`say`).

pub mod json;
pub mod safetensors;
pub mod say;
pub mod signal;
pub mod tar_gz;
pub mod tmp;

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Copies file `src` to a new file `dst`. An error names the side it happened on: a full disk
/// is reported on `dst`, not on the input (`std::fs::copy` cannot tell them apart).
pub fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let mut from = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    let mut to = std::fs::File::create(dst).map_err(|e| Error::io(dst, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).map_err(|e| Error::io(src, e))?;
        if n == 0 {
            return to.flush().map_err(|e| Error::io(dst, e));
        }
        to.write_all(&buf[..n]).map_err(|e| Error::io(dst, e))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk (here /dev/full, which answers every write with ENOSPC) is blamed on the
    /// output, never on the input (hardening item 14).
    #[test]
    fn copy_errors_name_the_side_that_failed() {
        let src = std::env::temp_dir().join(format!("rq-min-copy-{}", std::process::id()));
        std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        let err = copy_file(&src, Path::new("/dev/full")).unwrap_err().to_string();
        assert!(err.starts_with("/dev/full:") && err.contains("No space"), "{err}");
        let missing = Path::new("/nonexistent-rq-min/x");
        let err = copy_file(missing, &src.with_extension("out")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent-rq-min/x:"), "{err}");
        let dst = src.with_extension("copy");
        copy_file(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        let _ = (std::fs::remove_file(&src), std::fs::remove_file(&dst));
    }
}

//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The shared data folder (`../shared` next to the crate): models and reference outputs.
/// None, after printing why, when it is absent, so a test using it skips; under `CI=true`
/// its absence is a failure instead.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the shared data folder {} is missing", dir.display());
    }
    eprintln!("skipping: shared data folder {} not found", dir.display());
    None
}

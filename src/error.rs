//! The one error type of rq-min. Every variant names what it is about (file, tensor, shape)
//! so the message printed by the binary is enough to find the problem.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// An OS-level failure reading or writing `path`.
    Io { path: PathBuf, source: std::io::Error },
    /// Malformed JSON: `what` is the file (or "<input>"), `offset` the byte where parsing stopped.
    Json { what: String, offset: usize, msg: String },
    /// A safetensors file that is malformed or inconsistent.
    Safetensors { file: PathBuf, msg: String },
    /// A config.json / tokenizer_config.json / index that is readable JSON but wrong.
    Config { file: PathBuf, msg: String },
    /// A tensor that is missing, of the wrong dtype or shape, or holds NaN/Inf.
    Tensor { name: String, msg: String },
    /// A tokenizer.json that cannot be used.
    Tokenizer { file: PathBuf, msg: String },
    /// Something rq-min does not support (architecture, dtype, format).
    Unsupported(String),
    /// Bad command-line usage or an argument that does not make sense.
    Usage(String),
    /// The run was stopped by this signal (SIGINT, SIGTERM, SIGHUP): nothing was published.
    Interrupted(i32),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn safetensors(file: impl AsRef<Path>, msg: impl Into<String>) -> Error {
        Error::Safetensors { file: file.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn config(file: impl AsRef<Path>, msg: impl Into<String>) -> Error {
        Error::Config { file: file.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }
    pub fn tokenizer(file: impl AsRef<Path>, msg: impl Into<String>) -> Error {
        Error::Tokenizer { file: file.as_ref().to_path_buf(), msg: msg.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {}", path.display(), source),
            Error::Json { what, offset, msg } => {
                write!(f, "{what}: invalid JSON at byte {offset}: {msg}")
            }
            Error::Safetensors { file, msg } => {
                write!(f, "{}: invalid safetensors: {msg}", file.display())
            }
            Error::Config { file, msg } => write!(f, "{}: {msg}", file.display()),
            Error::Tensor { name, msg } => write!(f, "tensor {name}: {msg}"),
            Error::Tokenizer { file, msg } => write!(f, "{}: tokenizer: {msg}", file.display()),
            Error::Unsupported(msg) => write!(f, "unsupported: {msg}"),
            Error::Usage(msg) => write!(f, "{msg}"),
            Error::Interrupted(sig) => {
                write!(f, "interrupted by signal {sig}; temporary files removed, nothing written to the output")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

//! Errors of model loading and running. Each names what was wrong: the file, and the tensor or field.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file that is not what it claims (bad magic, truncated header, corrupt table).
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    /// A tensor that is missing, or has the wrong shape or dtype.
    #[error("{path}: tensor {tensor}: {detail}")]
    Tensor { path: PathBuf, tensor: String, detail: String },
    /// A config field that is missing, malformed or disagrees with the weights.
    #[error("{path}: {field}: {detail}")]
    Config { path: PathBuf, field: String, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Input that does not fit the model (a prompt longer than the context, say).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Backend(#[from] highrise_core::Error),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub fn config(path: &Path, field: &str, detail: impl std::fmt::Display) -> Error {
        Error::Config { path: path.to_path_buf(), field: field.to_string(), detail: detail.to_string() }
    }

    pub fn tensor(path: &Path, tensor: &str, detail: impl std::fmt::Display) -> Error {
        Error::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), detail: detail.to_string() }
    }
}

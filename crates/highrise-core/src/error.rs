//! The one error type of the backend layer. Its first five kinds cross the plugin ABI as a code and a
//! message, so an error raised inside a plugin reaches the host unchanged.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes, dtypes or arguments that do not fit the op; the message names the op and the shapes.
    #[error("{0}")]
    Invalid(String),
    /// The backend declines this op or dtype (see `Backend::supports`).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    OutOfMemory(String),
    /// A panic inside a backend, caught before it could cross the plugin boundary.
    #[error("{0}")]
    Panic(String),
    /// Any other failure inside a backend (a driver error, say).
    #[error("{0}")]
    Backend(String),
    /// A plugin library that could not be found or used.
    #[error("backend plugin {path}: {detail}")]
    Plugin { path: PathBuf, detail: String },
    #[error(
        "backend plugin {path}: plugin ABI version {found}, but this build of highrise speaks version \
         {expected}; rebuild the plugin with the same highrise version"
    )]
    AbiMismatch { path: PathBuf, expected: u32, found: u32 },
    #[error("no backend named {name:?}: {detail}")]
    NotFound { name: String, detail: String },
}

/// Error kinds as they cross the plugin ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Ok = 0,
    Invalid = 1,
    Unsupported = 2,
    OutOfMemory = 3,
    Panic = 4,
    Backend = 5,
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::Invalid,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::OutOfMemory(_) => ErrorCode::OutOfMemory,
            Error::Panic(_) => ErrorCode::Panic,
            _ => ErrorCode::Backend,
        }
    }

    pub(crate) fn from_code(code: u32, message: String) -> Error {
        match code {
            1 => Error::Invalid(message),
            2 => Error::Unsupported(message),
            3 => Error::OutOfMemory(message),
            4 => Error::Panic(message),
            _ => Error::Backend(message),
        }
    }
}

//! highrise-core: what every highrise backend implements and every layer above builds on.
//!
//! - [`DType`], [`Tensor`] / [`TensorRef`]: element types and tensors in a backend's memory.
//! - [`ops`]: the ops, one family per file, named after the transformer's two highways (the residual
//!   stream and the key/value stream).
//! - [`Backend`]: the object-safe trait a backend implements.
//! - [`plugin`]: the C ABI that lets a backend live in a shared library loaded at run time, and the
//!   loader that finds it.

pub mod backend;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod plugin;
pub mod profile;
pub mod quant;
pub mod rand;
pub mod tensor;

pub use backend::{Backend, BackendInfo, GraphStats};
pub use dtype::DType;
pub use error::{Error, ErrorCode, Result};
pub use ops::{Op, OpKind};
pub use plugin::load_backend;
pub use tensor::{Element, Handle, HostSlice, Shape, Tensor, TensorRef, MAX_DIMS};

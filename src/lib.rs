//! highrise: a transformer inference engine that runs Llama-family models and makes both highways
//! visible, the residual stream and the key/value stream.
//!
//! This facade re-exports the layers: [`core`] (backend trait, tensors, ops, plugin loader).

pub use highrise_core as core;
pub use highrise_core::{load_backend, Backend, DType, Error, Result, Tensor};
pub use highrise_model as model;
pub use highrise_engine as engine;
pub mod server;

//! highrise: a transformer inference engine that runs Llama-family models and makes both highways
//! visible, the residual stream and the key/value stream.
//!
//! This facade re-exports the layers, in the order data flows up: [`core`] (backend trait, tensors,
//! ops, plugin loader), [`model`] (formats, tokenizer, the forward pass, introspection), [`engine`]
//! (batching, sampling, the async service), and holds the OpenAI-compatible [`server`].

pub use highrise_core as core;
pub use highrise_core::{load_backend, Backend, DType, Error, Result, Tensor};
pub use highrise_model as model;
pub use highrise_engine as engine;
pub mod load;
pub mod server;

pub use load::ModelSpec;

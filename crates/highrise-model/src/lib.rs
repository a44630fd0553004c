//! highrise-model: everything about a model that is not the engine's business. Formats (GGUF,
//! HF safetensors directories), the config, the tokenizer and chat template, the weights on a backend,
//! and the forward pass.

pub mod config;
pub mod convert;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod introspect;
pub mod llama;
pub mod npy;
pub mod source;
pub mod tokenizer;

pub use config::ModelConfig;
pub use introspect::{Hooks, Patch, Site, Steer};
pub use llama::{Batch, Experts, Ffn, KvCache, Layer, Llama, LoadOptions, Logits, Mlp, Moe, WeightFormat};
pub use source::Source;
pub use error::{Error, Result};
pub use tokenizer::{Message, Tokenizer};

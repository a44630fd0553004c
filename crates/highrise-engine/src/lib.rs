//! highrise-engine: turns a model's forward pass into generation. Sampling (per-request, seeded),
//! generation with streaming and stop conditions, and the KV-cache blocks of each sequence.

pub mod bench;
pub mod generate;
pub mod sampling;

pub use generate::{eos_ids, generate, FinishReason, GenerateParams, Generation, TextStream};
pub use sampling::{Sampled, Sampler, SamplingParams};

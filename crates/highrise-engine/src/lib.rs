//! highrise-engine: turns a model's forward pass into serving. The KV-cache blocks of each sequence
//! (`blocks`), continuous batching with preemption and prefix sharing (`engine`), per-request seeded
//! sampling (`sampling`), single-sequence generation with streaming and stop strings (`generate`),
//! and the measurements behind `highrise bench` (`bench`).

pub mod bench;
pub mod blocks;
pub mod engine;
pub mod generate;
pub mod sampling;
pub mod service;

pub use engine::{Engine, EngineConfig, Event, Request, RequestId};
pub use generate::{eos_ids, generate, FinishReason, GenerateParams, Generation, TextStream};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use service::{EngineService, Fault, RequestStream, ServiceError, Stats};

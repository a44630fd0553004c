//! highrise-engine: turns a model's forward pass into serving. The KV-cache blocks of each sequence
//! (`blocks`), continuous batching with preemption and prefix sharing (`engine`), what a request asks
//! and gets (`request`), text streamed with stop strings (`text`), per-request seeded sampling
//! (`sampling`), the engine on a thread of its own (`service`), single-sequence generation as a
//! client of the engine (`generate`), and the measurements behind `highrise bench` (`bench`).

pub mod bench;
pub mod blocks;
pub mod engine;
pub mod generate;
pub mod request;
pub mod sampling;
pub mod service;
pub mod text;

pub use engine::{Engine, EngineConfig, Event, Request, RequestId, WarmUp};
pub use generate::generate;
pub use request::{eos_ids, FinishReason, GenerateParams, Generation};
pub use text::TextStream;
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use service::{EngineService, Fault, RequestStream, ServiceError, Stats};

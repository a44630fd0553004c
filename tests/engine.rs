//! Continuous batching on the default model (CPU): many requests at once give each the tokens it gets
//! alone, also when the cache is so small that sequences are preempted and recomputed; shared prompt
//! prefixes take fewer blocks; seeded sampling does not depend on the batch; cancelling frees blocks.

mod common;

use std::sync::OnceLock;

use common::*;
use highrise::engine::{generate, Engine, EngineConfig, GenerateParams, Request, SamplingParams};
use highrise::model::{Llama, LoadOptions, Source, Steer, Tokenizer};

struct Loaded {
    model: Llama,
    tokenizer: Tokenizer,
}

fn loaded(test: &str) -> Option<&'static Loaded> {
    static L: OnceLock<Option<Loaded>> = OnceLock::new();
    let l = L.get_or_init(|| {
        let path = default_model()?;
        let source = Source::open(&path).unwrap();
        let tokenizer = source.tokenizer().unwrap();
        let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
        Some(Loaded { model, tokenizer })
    });
    if l.is_none() {
        println!("skipped: {test}: the default model could not be fetched");
    }
    l.as_ref()
}

const TEXTS: [&str; 8] = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, astronauts",
    "My favourite recipe for pancakes starts with",
    "The three laws of robotics are",
    "Water boils at",
    "A haiku about autumn:",
];

/// 16 requests of different prompt lengths and token limits.
fn requests(l: &Loaded) -> Vec<Request> {
    (0..16)
        .map(|i| {
            let mut prompt = l.tokenizer.encode(TEXTS[i % 8], false).unwrap();
            if i >= 8 {
                // The second eight repeat their prompt, making them longer.
                prompt = prompt.repeat(2 + i % 3);
            }
            let params = GenerateParams { max_tokens: 6 + 3 * (i % 5), ..Default::default() };
            Request { prompt, params, logprobs: false, top_logprobs: 0 }
        })
        .collect()
}

fn alone(l: &Loaded, r: &Request) -> Vec<u32> {
    generate(&l.model, &l.tokenizer, &r.prompt, &r.params, &mut |_| {}).unwrap().ids
}

fn batched(l: &Loaded, reqs: &[Request], config: EngineConfig) -> (Vec<Vec<u32>>, u64, usize) {
    let mut e = Engine::new(&l.model, &l.tokenizer, config).unwrap();
    let ids: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut done = e.run_to_completion().unwrap();
    assert_eq!(e.free_blocks(), e.num_blocks(), "every block is back once all requests finished");
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), ids);
    (done.into_iter().map(|(_, g)| g.ids).collect(), e.preemptions, e.num_blocks())
}

#[test]
fn sixteen_concurrent_requests_match_each_alone() {
    let Some(l) = loaded("concurrent") else { return };
    let reqs = requests(l);
    let config = EngineConfig { num_blocks: 256, block_size: 16, max_batch_tokens: 64, max_running: 16 };
    let (got, preemptions, _) = batched(l, &reqs, config);
    assert_eq!(preemptions, 0, "a roomy cache preempts nothing");
    for (i, (g, r)) in got.iter().zip(&reqs).enumerate() {
        assert_eq!(g, &alone(l, r), "request {i} batched vs alone");
    }
}

#[test]
fn a_small_cache_preempts_and_still_matches() {
    let Some(l) = loaded("preemption") else { return };
    let reqs = requests(l);
    // 12 blocks of 16 tokens: a few sequences at a time, so the rest are preempted and recomputed.
    let config = EngineConfig { num_blocks: 12, block_size: 16, max_batch_tokens: 48, max_running: 16 };
    let (got, preemptions, _) = batched(l, &reqs, config);
    println!("preemptions: {preemptions}");
    assert!(preemptions > 0, "the small cache should have forced preemption");
    // A preempted sequence waits for room before it runs again: before that it was re-admitted at
    // once and preempted at the next step, over and over (72 here).
    assert!(preemptions <= reqs.len() as u64, "{preemptions} preemptions for {} requests", reqs.len());
    for (i, (g, r)) in got.iter().zip(&reqs).enumerate() {
        assert_eq!(g, &alone(l, r), "request {i} under preemption vs alone");
    }
}

/// A steered request's keys and values are its own: a greedy request with the same prompt, arriving
/// once the steered one's prompt blocks are in the cache, gets the tokens it gets alone (the audit
/// saw it reuse the steered K/V and answer ' - - - - -'), and takes blocks of its own for them.
#[test]
fn steering_never_leaks_through_shared_prefix_blocks() {
    let Some(l) = loaded("steering isolation") else { return };
    let prompt = l.tokenizer.encode(&TEXTS[0].repeat(6), false).unwrap();
    assert!(prompt.len() > 48, "several full blocks");
    let plain = Request { prompt, params: GenerateParams { max_tokens: 8, ..Default::default() }, logprobs: false, top_logprobs: 0 };
    let hidden = l.model.config.hidden_size;
    let vector: Vec<f32> = (0..hidden).map(|i| if i % 3 == 0 { 1.0 } else { -0.5 }).collect();
    let mut steered = plain.clone();
    steered.params.steer = vec![Steer { layer: 4, vector, scale: 12.0, positions: None }];
    let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 512, max_running: 4 };
    let mut e = Engine::new(&l.model, &l.tokenizer, config).unwrap();
    let s = e.submit(steered).unwrap();
    e.step().unwrap();
    let used_by_steered = e.num_blocks() - e.free_blocks();
    let g = e.submit(plain.clone()).unwrap();
    e.step().unwrap();
    let used_by_both = e.num_blocks() - e.free_blocks();
    let done = e.run_to_completion().unwrap();
    let out = |id| done.iter().find(|(i, _)| *i == id).unwrap().1.ids.clone();
    let want = alone(l, &plain);
    assert_ne!(out(s), want, "the steering changes the steered request's tokens");
    assert_eq!(out(g), want, "the greedy request's tokens are its own");
    assert!(used_by_both >= 2 * used_by_steered, "no block shared across steering ({used_by_steered} then {used_by_both})");
}

#[test]
fn shared_prefixes_take_fewer_blocks() {
    let Some(l) = loaded("prefix sharing") else { return };
    let system = "You are a helpful assistant. Answer briefly and precisely, and never make things up. ".repeat(3);
    let prompt = |q: &str| l.tokenizer.encode(&format!("{system}{q}"), false).unwrap();
    let (a, b) = (prompt("What is the capital of France?"), prompt("Name a primary colour."));
    assert!(a.len() > 48 && a[..48] == b[..48], "a long common prefix");
    let params = GenerateParams { max_tokens: 4, ..Default::default() };
    let used_after_first_step = |x: &[u32], y: &[u32]| {
        let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 512, max_running: 4 };
        let mut e = Engine::new(&l.model, &l.tokenizer, config).unwrap();
        // The first request's prompt is in the cache before the second arrives.
        e.submit(Request { prompt: x.to_vec(), params: params.clone(), logprobs: false, top_logprobs: 0 }).unwrap();
        e.step().unwrap();
        e.submit(Request { prompt: y.to_vec(), params: params.clone(), logprobs: false, top_logprobs: 0 }).unwrap();
        e.step().unwrap();
        let used = e.num_blocks() - e.free_blocks();
        let out = e.run_to_completion().unwrap();
        assert_eq!(e.free_blocks(), e.num_blocks());
        (used, out)
    };
    let other = l.tokenizer.encode(&"Tell me a story about dragons and knights. ".repeat(5), false).unwrap();
    let (shared, out) = used_after_first_step(&a, &b);
    let (unshared, _) = used_after_first_step(&a, &other[..b.len().min(other.len())]);
    println!("blocks in use: {shared} with a shared prefix, {unshared} without");
    assert!(shared < unshared, "sharing the prefix should take fewer blocks ({shared} vs {unshared})");
    let mut out = out;
    out.sort_by_key(|o| o.0);
    assert_eq!(out[0].1.ids, generate(&l.model, &l.tokenizer, &a, &params, &mut |_| {}).unwrap().ids);
    assert_eq!(out[1].1.ids, generate(&l.model, &l.tokenizer, &b, &params, &mut |_| {}).unwrap().ids);
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let Some(l) = loaded("seeded batch") else { return };
    let sampling = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 1234, ..Default::default() };
    let target = Request {
        prompt: l.tokenizer.encode(TEXTS[0], false).unwrap(),
        params: GenerateParams { max_tokens: 16, sampling, ..Default::default() },
        logprobs: false, top_logprobs: 0,
    };
    let config = EngineConfig { num_blocks: 128, block_size: 16, max_batch_tokens: 64, max_running: 8 };
    let (solo, _, _) = batched(l, std::slice::from_ref(&target), config);
    let mut crowd = requests(l)[..7].to_vec();
    crowd.insert(3, target.clone());
    let (together, _, _) = batched(l, &crowd, config);
    assert_eq!(together[3], solo[0], "the same seed gives the same tokens in a batch of 8");
}

#[test]
fn cancelling_frees_blocks_at_once() {
    let Some(l) = loaded("cancel") else { return };
    let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 64, max_running: 8 };
    let mut e = Engine::new(&l.model, &l.tokenizer, config).unwrap();
    let start = e.free_blocks();
    let ids: Vec<_> = requests(l)[..4].iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    e.step().unwrap();
    e.step().unwrap();
    assert!(e.free_blocks() < start);
    for id in ids {
        assert!(e.cancel(id));
    }
    assert_eq!(e.free_blocks(), start, "cancelling returned every block");
    assert!(e.is_idle());
}

/// A request's activation patches apply in whichever step computes their positions, a prompt's
/// (here in its second chunk of 16) and a completion's alike: its greedy tokens are those of a full
/// recompute with the same patches at every step. Its K/V are its own: a plain request with the same
/// prompt, arriving once the patched one's blocks are cached, gets its tokens alone. Patches that
/// could never apply are refused at submission, naming them.
#[test]
fn patches_apply_at_their_positions_and_never_leak() {
    use highrise::model::{Hooks, Logits, Patch, Site};
    let Some(l) = loaded("patching") else { return };
    let m = &l.model;
    let prompt = l.tokenizer.encode(&TEXTS[2].repeat(10), false).unwrap();
    assert!(prompt.len() > 48, "several full blocks");
    let (h, z, n) = (m.config.hidden_size, Site::Z.width(&m.config, 3), prompt.len());
    let row: Vec<f32> = (0..h).map(|i| if i % 5 == 0 { 8.0 } else { -1.0 }).collect();
    let patch = vec![
        // The prompt's last position: in its last chunk of 16, not at the chunk's first row.
        Patch { layer: 10, position: n - 1, values: row.clone(), site: Site::ResidPre },
        // The third generated token's position: the stream, and every head of layer 3 ablated.
        Patch { layer: 6, position: n + 2, values: row.iter().map(|v| -v).collect(), site: Site::ResidPre },
        Patch { layer: 3, position: n + 2, values: vec![0.0; z], site: Site::Z },
    ];
    assert_ne!((n - 1) % 16, 0);
    let max_tokens = 8;
    // The reference: a whole pass over the sequence so far for each token, the patches whose
    // positions it holds applied.
    let greedy = |patch: &[Patch]| -> Vec<u32> {
        let mut ids = prompt.clone();
        for _ in 0..max_tokens {
            let mut hooks = Hooks { patch: patch.iter().filter(|p| p.position < ids.len()).cloned().collect(), ..Default::default() };
            let logits = m.prefill_hooked(&ids, Logits::Last, Some(&mut hooks)).unwrap().to_f32().unwrap();
            ids.push(highrise::engine::sampling::argmax(&logits));
        }
        ids[n..].to_vec()
    };
    let want = greedy(&patch);
    assert_ne!(want, greedy(&patch[..1]), "the completion's patches change the tokens after them");
    assert_eq!(want[..3], greedy(&patch[..1])[..3], "and none before");
    let plain = Request { prompt, params: GenerateParams { max_tokens, ..Default::default() }, logprobs: false, top_logprobs: 0 };
    let mut patched = plain.clone();
    patched.params.patch = patch.clone();
    let alone_plain = alone(l, &plain);
    assert_ne!(want, alone_plain, "the patches change the tokens");
    // Chunked, behind a plain request (so the patched rows are not the batch's first).
    let chunked = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 16, max_running: 4 };
    let (got, _, _) = batched(l, &[plain.clone(), patched.clone()], chunked);
    assert_eq!((&got[0], &got[1]), (&alone_plain, &want), "through the engine, chunk by chunk, beside a plain request");
    // Beside a plain request with the same prompt, after the patched one's blocks are cached.
    let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 512, max_running: 4 };
    let mut e = Engine::new(m, &l.tokenizer, config).unwrap();
    let p = e.submit(patched.clone()).unwrap();
    e.step().unwrap();
    let used_by_patched = e.num_blocks() - e.free_blocks();
    let g = e.submit(plain.clone()).unwrap();
    e.step().unwrap();
    let used_by_both = e.num_blocks() - e.free_blocks();
    let done = e.run_to_completion().unwrap();
    let out = |id| done.iter().find(|(i, _)| *i == id).unwrap().1.ids.clone();
    assert_eq!(out(p), want, "the patched request");
    assert_eq!(out(g), alone_plain, "the plain request's tokens are its own");
    assert!(used_by_both >= 2 * used_by_patched, "no block shared across patching ({used_by_patched} then {used_by_both})");
    // Refused at submission: past the prompt and completion, the wrong width, a site no patch may
    // replace; the engine carries on.
    for (bad, says) in [
        (Patch { position: plain.prompt.len() + max_tokens, ..patch[1].clone() }, "at position"),
        (Patch { values: vec![0.0; 3], ..patch[0].clone() }, "3 values"),
        (Patch { site: Site::Q, ..patch[1].clone() }, "patching q is not supported"),
    ] {
        let mut r = plain.clone();
        r.params.patch = vec![bad];
        let err = e.submit(r).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    assert!(e.is_idle());
}

#[test]
fn requests_that_can_never_fit_are_refused_at_submission() {
    let Some(l) = loaded("refusal") else { return };
    let config = EngineConfig { num_blocks: 4, block_size: 16, max_batch_tokens: 64, max_running: 8 };
    let mut e = Engine::new(&l.model, &l.tokenizer, config).unwrap();
    let prompt = l.tokenizer.encode(TEXTS[0], false).unwrap();
    let too_long = Request { prompt: prompt.clone(), params: GenerateParams { max_tokens: 100, ..Default::default() }, logprobs: false, top_logprobs: 0 };
    let err = e.submit(too_long).unwrap_err().to_string();
    assert!(err.contains("whole cache holds 64"), "{err}");
    let beyond_context = Request { prompt: prompt.clone(), params: GenerateParams { max_tokens: 1 << 20, ..Default::default() }, logprobs: false, top_logprobs: 0 };
    let err = e.submit(beyond_context).unwrap_err().to_string();
    assert!(err.contains("beyond the model's context"), "{err}");
    // No tokens asked: refused, where the first token (from the prompt's pass) came regardless.
    let none = Request { prompt, params: GenerateParams { max_tokens: 0, ..Default::default() }, logprobs: false, top_logprobs: 0 };
    let err = e.submit(none).unwrap_err().to_string();
    assert!(err.contains("max_tokens is 0"), "{err}");
    assert!(e.is_idle());
}

/// Loads the default model once more, owned, for the service (which needs `Arc`s).
fn shared(test: &str) -> Option<(std::sync::Arc<Llama>, std::sync::Arc<Tokenizer>)> {
    let Some(path) = default_model() else {
        println!("skipped: {test}: the default model could not be fetched");
        return None;
    };
    let source = Source::open(&path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let model = Llama::load(&source, cpu(), LoadOptions::default()).unwrap();
    Some((std::sync::Arc::new(model), std::sync::Arc::new(tokenizer)))
}

#[tokio::test]
async fn async_service_streams_each_request_and_frees_dropped_ones() {
    use highrise::engine::EngineService;
    let Some(l) = loaded("async service") else { return };
    let Some((model, tokenizer)) = shared("async service") else { return };
    let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 64, max_running: 8 };
    let service = EngineService::start(model, tokenizer, config).unwrap();
    let reqs = requests(l)[..4].to_vec();
    let mut streams = Vec::new();
    for r in &reqs {
        streams.push(service.submit(r.clone()).await.unwrap());
    }
    // A fifth request whose client goes away after its first token.
    let long = Request { params: GenerateParams { max_tokens: 40, ..Default::default() }, ..reqs[0].clone() };
    let mut dropped = service.submit(long).await.unwrap();
    assert!(dropped.next().await.unwrap().token.is_some());
    drop(dropped);
    for (s, r) in streams.iter_mut().zip(&reqs) {
        let (mut ids, mut text) = (Vec::new(), String::new());
        while let Some(e) = s.next().await {
            ids.extend(e.token);
            text.push_str(&e.text);
            if e.finish.is_some() {
                break;
            }
        }
        let want = generate(&l.model, &l.tokenizer, &r.prompt, &r.params, &mut |_| {}).unwrap();
        assert_eq!(ids, want.ids, "streamed ids equal the request run alone");
        assert_eq!(text, want.text);
    }
    // Once the engine has caught up, every block is free again, the dropped request's included.
    for _ in 0..200 {
        let st = service.stats();
        if st.running == 0 && st.waiting == 0 && st.blocks_free == st.blocks_total {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let st = service.stats();
    assert_eq!((st.running, st.waiting, st.blocks_free), (0, 0, st.blocks_total), "{st:?}");
    // A request that can never fit is refused at submission, and the service carries on.
    let huge = Request { params: GenerateParams { max_tokens: 100_000, ..Default::default() }, ..reqs[0].clone() };
    assert!(service.submit(huge).await.is_err());
    let mut again = service.submit(reqs[1].clone()).await.unwrap();
    assert!(again.next().await.unwrap().token.is_some());
}

#[test]
fn device_copy_bandwidth_times_a_backend_copy() {
    let bw = highrise::engine::bench::device_copy_bandwidth(&cpu(), 4 << 20, 3).unwrap();
    assert!(bw.is_finite() && bw > 1e8, "{bw}");
}

/// Greedy requests are chosen by the backend (`Backend::argmax`), and so are draws by temperature,
/// top-k, top-p and min-p (`Backend::sample`) where no request of the step has penalties; the
/// tokens and log-probabilities are those of sampling on the host from the downloaded logits.
#[test]
fn choosing_on_the_backend_matches_the_host() {
    let Some(l) = loaded("backend sampling") else { return };
    let greedy = requests(l);
    let mut sampled = greedy.clone();
    for (i, r) in sampled.iter_mut().enumerate() {
        let s = &mut r.params.sampling;
        (s.temperature, s.seed) = (0.6 + 0.1 * (i % 5) as f32, i as u64);
        (s.top_k, s.top_p, s.min_p) = [(0, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (20, 0.8, 0.02)][i % 5];
    }
    let mut penalized = sampled.clone();
    penalized[3].params.sampling.repetition_penalty = 1.3;
    for reqs in [greedy, sampled, penalized] {
        compare_backend_and_host(l, &reqs);
    }
}

fn compare_backend_and_host(l: &Loaded, reqs: &[Request]) {
    let run = |host: bool| {
        let mut e = Engine::new(&l.model, &l.tokenizer, EngineConfig::with_kv_memory(&l.model, 64 << 20)).unwrap();
        e.set_host_sampling(host);
        for r in reqs {
            e.submit(r.clone()).unwrap();
        }
        let mut done = e.run_to_completion().unwrap();
        done.sort_by_key(|(id, _)| *id);
        done.into_iter().map(|(_, g)| (g.ids, g.logprobs)).collect::<Vec<_>>()
    };
    let (device, host) = (run(false), run(true));
    for (i, ((di, dl), (hi, hl))) in device.iter().zip(&host).enumerate() {
        assert_eq!(di, hi, "request {i}: tokens");
        for (d, h) in dl.iter().zip(hl) {
            assert!((d - h).abs() <= 1e-4 * (1.0 + h.abs()), "request {i}: logprob {d} vs {h}");
        }
    }
}

/// The engine survives its own faults: a step that panics ends the requests it was running with an
/// error naming the panic, and the requests after it get their own tokens; a job that panics fails
/// alone. A thread that dies all the same is reported (`is_running`), and every call then says
/// the engine has stopped.
#[tokio::test]
async fn a_panic_in_the_engine_fails_its_requests_and_the_engine_serves_on() {
    use highrise::engine::{EngineService, Fault, ServiceError};
    let Some(l) = loaded("engine faults") else { return };
    let Some((model, tokenizer)) = shared("engine faults") else { return };
    let config = EngineConfig { num_blocks: 64, block_size: 16, max_batch_tokens: 64, max_running: 8 };
    let service = EngineService::start(model, tokenizer, config).unwrap();
    let r = requests(l)[1].clone();
    let long = Request { params: GenerateParams { max_tokens: 200, ignore_eos: true, ..Default::default() }, ..r.clone() };
    let mut victim = service.submit(long).await.unwrap();
    assert!(victim.next().await.unwrap().token.is_some());
    service.inject_fault(Fault::PanicInStep);
    let mut last = None;
    while let Some(e) = victim.next().await {
        last = Some(e);
    }
    let err = last.and_then(|e| e.error).expect("the running request ends with an error");
    assert!(err.contains("panicked") && err.contains("fault injected"), "{err}");

    let job = service.run(|_| -> u32 { panic!("a capture pass that panics") }).await;
    assert!(matches!(&job, Err(ServiceError::Failed(m)) if m.contains("a capture pass that panics")), "{job:?}");

    let mut after = service.submit(r.clone()).await.unwrap();
    let mut ids = Vec::new();
    while let Some(e) = after.next().await {
        assert!(e.error.is_none(), "{:?}", e.error);
        ids.extend(e.token);
    }
    assert_eq!(ids, alone(l, &r), "a request after the fault gets its own tokens");
    assert!(service.is_running());

    service.inject_fault(Fault::KillThread);
    for _ in 0..100 {
        if !service.is_running() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!service.is_running(), "a dead engine thread is reported");
    assert!(matches!(service.submit(r).await, Err(ServiceError::Stopped)));
}

/// The CPU backend, saying that its graph steps run at batch sizes of multiples of four
/// (`Backend::graph_batch`, as CUDA's buckets do), and noting each graph step's key: the engine
/// pads its decode steps with rows it drops.
struct Padding {
    inner: std::sync::Arc<dyn highrise::Backend>,
    keys: std::sync::Mutex<Vec<u64>>,
}

impl highrise::Backend for Padding {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn info(&self) -> highrise::core::BackendInfo {
        self.inner.info()
    }
    fn supports(&self, op: highrise::core::ops::OpKind, dtype: highrise::DType) -> bool {
        self.inner.supports(op, dtype)
    }
    fn alloc(&self, bytes: usize) -> highrise::Result<highrise::core::Handle> {
        self.inner.alloc(bytes)
    }
    unsafe fn free(&self, handle: highrise::core::Handle) {
        self.inner.free(handle)
    }
    fn write(&self, handle: highrise::core::Handle, offset: usize, bytes: &[u8]) -> highrise::Result<()> {
        self.inner.write(handle, offset, bytes)
    }
    fn read(&self, handle: highrise::core::Handle, offset: usize, out: &mut [u8]) -> highrise::Result<()> {
        self.inner.read(handle, offset, out)
    }
    fn run(&self, op: &highrise::core::ops::Op<'_>) -> highrise::Result<()> {
        self.inner.run(op)
    }
    fn graph_begin(&self, key: u64) -> highrise::Result<()> {
        self.keys.lock().unwrap().push(key);
        self.inner.graph_begin(key)
    }
    fn graph_end(&self) -> highrise::Result<()> {
        self.inner.graph_end()
    }
    fn graph_batch(&self, sequences: usize) -> usize {
        sequences.div_ceil(4) * 4
    }
}

/// Graph steps padded to the backend's batch size for them (`Backend::graph_batch`: one CUDA
/// graph serves a range of batch sizes where it would be captured anew at each): seven requests
/// that finish one step apart, greedy and seeded-sampled, get from a padding backend the tokens
/// they get from the same backend unpadded, step after step as the batch shrinks from 7 to 1; every
/// graph step ran at a multiple of four rows; the pad block is not the requests' to use. The same
/// again after `Engine::warm_up`, which runs padding-only steps at each batch size first (the
/// largest sampled one twice): the requests' tokens do not change.
#[test]
fn graph_steps_padded_to_the_backends_batch_give_the_same_tokens() {
    use highrise::model::ModelConfig;
    let plain = cpu();
    let padding = std::sync::Arc::new(Padding { inner: plain.clone(), keys: Default::default() });
    let config = ModelConfig::shape("tiny").unwrap();
    let tok = Tokenizer::numbered(config.vocab_size).unwrap();
    let run = |backend: std::sync::Arc<dyn highrise::Backend>, temperature: f32, warm: bool| {
        let model = Llama::random(config.clone(), backend, highrise::DType::F32, 11).unwrap();
        let engine_config = EngineConfig { num_blocks: 24, block_size: 8, max_batch_tokens: 128, max_running: 8 };
        let mut e = Engine::new(&model, &tok, engine_config).unwrap();
        e.set_graphs(true);
        if warm {
            let mut seen = vec![];
            let warm_up = e.warm_up(|done, total| seen.push((done, total))).unwrap();
            assert_eq!((warm_up.steps, warm_up.max_batch), (5, 8));
            assert_eq!(seen, [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]);
        }
        let blocks = e.num_blocks();
        for i in 0..7u32 {
            let sampling = SamplingParams { temperature, top_p: 0.9, seed: 5 + i as u64, ..Default::default() };
            let params = GenerateParams { max_tokens: 3 + i as usize, ignore_eos: true, sampling, ..Default::default() };
            e.submit(Request { prompt: (i..9 + 2 * i).collect(), params, logprobs: false, top_logprobs: 0 }).unwrap();
        }
        let mut done = e.run_to_completion().unwrap();
        assert_eq!(e.free_blocks(), e.num_blocks(), "every block is back once all requests finished");
        done.sort_by_key(|(id, _)| *id);
        (done.into_iter().map(|(_, g)| g.ids).collect::<Vec<_>>(), blocks)
    };
    for temperature in [0.0, 0.8] {
        let (want, all) = run(plain.clone(), temperature, false);
        let plain_model = Llama::random(config.clone(), plain.clone(), highrise::DType::F32, 11).unwrap();
        let mut plain_engine = Engine::new(&plain_model, &tok, EngineConfig { num_blocks: 24, block_size: 8, max_batch_tokens: 128, max_running: 8 }).unwrap();
        plain_engine.set_graphs(true);
        assert_eq!(plain_engine.warm_up(|_, _| ()).unwrap().steps, 0, "a backend that pads nothing keeps no graph per batch size");
        padding.keys.lock().unwrap().clear();
        let (got, _) = run(padding.clone(), temperature, true);
        assert_eq!(got, want, "temperature {temperature}: a warm-up's steps changed the requests' tokens");
        let warm: Vec<u64> = padding.keys.lock().unwrap().drain(..5).collect();
        assert_eq!(warm, [(8 << 1) | 1, (8 << 1) | 1, 8 << 1, (4 << 1) | 1, 4 << 1], "the warm-up's graph keys: 8 rows then 4, sampled and greedy");
        padding.keys.lock().unwrap().clear();
        let (got, usable) = run(padding.clone(), temperature, false);
        assert_eq!(got, want, "temperature {temperature}: padded graph steps changed the tokens");
        assert_eq!(usable, all - 1, "one block kept for the padding");
        let sizes: Vec<u64> = padding.keys.lock().unwrap().iter().map(|k| k >> 1).collect();
        // Decode steps at 7 down to 1 sequences (the first token of each comes from its prefill).
        println!("temperature {temperature}: graph steps at {sizes:?} rows");
        assert!(sizes.len() >= 6 && sizes.iter().all(|n| n % 4 == 0), "graph steps at {sizes:?} rows");
    }
}

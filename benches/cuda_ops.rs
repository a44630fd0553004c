//! Criterion benchmarks of the CUDA backend, with the ceilings they are judged against measured in
//! the same run: device-to-device copy bandwidth (bytes read + written) and the cuBLAS bf16 GEMM rate
//! (8192^3). Then:
//! - attention prefill (causal) TFLOP/s at head dims 64 and 128, sequences of 512 to 16k tokens,
//!   32 query / 8 KV heads: the tensor-core kernel, and the split kernel up to 2k tokens;
//! - decode attention over the paged cache, achieved bandwidth (K and V bytes read), batch 1 to 256,
//!   context 1k to 32k;
//! - choosing tokens from Llama-3's logits (128256 wide) at 1 and 64 rows: argmax and a sampled
//!   draw (temperature, top-p), GB/s of the logits read once;
//! - one Llama-3-8B layer's projections at decode, 1, 2 and 8 rows (our GEMV kernel, cuBLAS and
//!   tuned cuBLASLt, read bandwidth), batched decode at 64 rows (cuBLAS and cuBLASLt, read
//!   bandwidth) and 256 (TFLOP/s), and at prefill (the same two, TFLOP/s).
//!
//! Without a CUDA device it prints `skipped: no CUDA device` and exits. Run with
//! `cargo bench --bench cuda_ops`; `HIGHRISE_BENCH_QUICK=1` takes fewer samples.

mod common;
use common::random;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use highrise::core::ops::{PagedSeq, SampleParams, Scores};
use highrise::core::{Backend, DType, Tensor};
use highrise_cuda::CudaBackend;


/// Mean seconds per call of `f` over `iters` calls, after one warm-up, the device synchronized.
fn time(b: &Arc<dyn Backend>, iters: u64, mut f: impl FnMut()) -> Duration {
    f();
    b.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    b.synchronize().unwrap();
    start.elapsed()
}

struct Row {
    test: String,
    figure: f64,
    unit: &'static str,
    ceiling: f64,
}

/// One prefill attention problem of the bench's shape (32 query heads over 8 KV heads, bf16, one
/// sequence): its FLOP count and a closure that runs it once.
fn prefill_problem(b: &Arc<dyn Backend>, d: usize, t: usize, causal: bool) -> (f64, impl FnMut() + '_) {
    let (hq, hkv) = (32usize, 8usize);
    let (q, k, v) = (
        random(b, DType::BF16, &[t, hq, d], 1.0),
        random(b, DType::BF16, &[t, hkv, d], 1.0),
        random(b, DType::BF16, &[t, hkv, d], 1.0),
    );
    let mut out = Tensor::empty(b, DType::BF16, &[t, hq, d]).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    // Two GEMM-like products (QK^T and PV) of 2 flops per score; causal: half the T x T.
    let flops = 2.0 * 2.0 * (t * t) as f64 * (hq * d) as f64 / if causal { 2.0 } else { 1.0 };
    (flops, move || b.attention_with(&mut out, &q, &k, &v, &[t as u32], Scores::scaled(scale), causal).unwrap())
}

/// One decode attention step of the bench's shape (32 query heads over 8 KV heads, d128, bf16):
/// `batch` sequences of `ctx` tokens each through a paged cache of 16-token blocks; the K and V
/// bytes it reads and a closure that runs it once.
fn decode_problem(b: &Arc<dyn Backend>, batch: usize, ctx: usize) -> (u64, impl FnMut() + '_) {
    let (hq, hkv, d, bs) = (32usize, 8usize, 128usize, 16usize);
    let blocks_per_seq = ctx / bs;
    let blocks = batch * blocks_per_seq;
    let kc = random(b, DType::BF16, &[blocks, hkv, bs, d], 1.0);
    let vc = random(b, DType::BF16, &[blocks, hkv, bs, d], 1.0);
    let q = random(b, DType::BF16, &[batch, hq, d], 1.0);
    let mut out = Tensor::empty(b, DType::BF16, &[batch, hq, d]).unwrap();
    let seqs: Vec<PagedSeq> =
        (0..batch).map(|s| PagedSeq { q_len: 1, context_len: ctx as u32, blocks_start: (s * blocks_per_seq) as u32 }).collect();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let bytes = (2 * batch * ctx * hkv * d * 2) as u64;
    let scale = 1.0 / (d as f32).sqrt();
    (bytes, move || b.paged_attention(&mut out, &q, &kc, &vc, &seqs, &table, scale).unwrap())
}

/// `HIGHRISE_BENCH_SWEEP=decode`: scripts/gpu-sweep.sh's timing of the decode kernel in the shape
/// it was compiled with (HIGHRISE_DECODE_SHAPE), rows "| decode WARPSxSTAGES | batch B ctx C | GB/s |";
/// `HIGHRISE_BENCH_ITERS` runs of each after one untimed (20; fewer under Nsight Compute, which
/// scripts/gpu-check.sh runs over it to see each launch's device time and DRAM bytes).
fn sweep_decode(b: &Arc<dyn Backend>, arch: &str) {
    let shape = highrise_cuda::flash::decode_shape(arch).unwrap();
    let iters = bench_iters(20);
    for (batch, ctx) in [(1usize, 1024usize), (1, 8192), (1, 32768), (8, 8192), (64, 8192)] {
        let (bytes, mut run) = decode_problem(b, batch, ctx);
        let secs = time(b, iters as u64, &mut run).as_secs_f64() / iters as f64;
        println!("| decode {shape} | batch {batch} ctx {ctx} | {:.1} |", bytes as f64 / secs / 1e9);
    }
}

/// `HIGHRISE_BENCH_SWEEP=gemv`: scripts/gpu-sweep.sh's timing of the matrix-vector kernels in the
/// shape they were compiled with (HIGHRISE_GEMV_SHAPE) on Llama-3-8B's decode projections at one
/// row, through the ops decoding uses (q/k/v fused, the gate and up projections with SwiGLU fused)
/// and on our kernel even where cuBLAS would run (the down projection's rows of 14336), rows
/// "| gemv SHAPE | 8B NAME T=1 | GB/s |" of weights read; each first checked against cuBLAS.
fn sweep_gemv(b: &Arc<dyn Backend>, arch: &str) {
    let shape = highrise_cuda::gemv::gemv_shape(arch).unwrap();
    std::env::set_var("HIGHRISE_CUDA_GEMV", "own");
    let (h, inter, kv) = (4096usize, 14336usize, 1024usize);
    let x = random(b, DType::BF16, &[1, h], 1.0);
    let x_inter = random(b, DType::BF16, &[1, inter], 1.0);
    let [wq, wk, wv] = [h, kv, kv].map(|n| random(b, DType::BF16, &[n, h], 0.01));
    let [mut q, mut k, mut v] = [h, kv, kv].map(|n| Tensor::empty(b, DType::BF16, &[1, n]).unwrap());
    let (w_gate, w_up) = (random(b, DType::BF16, &[inter, h], 0.01), random(b, DType::BF16, &[inter, h], 0.01));
    let mut act = Tensor::empty(b, DType::BF16, &[1, inter]).unwrap();
    let (wo, w_down) = (random(b, DType::BF16, &[h, h], 0.01), random(b, DType::BF16, &[h, inter], 0.01));
    let mut out = Tensor::empty(b, DType::BF16, &[1, h]).unwrap();
    // First each projection on the GEMV and again on cuBLAS: the two agree to within a rounding of
    // bf16 (their sums differ in order only), or the shape is wrong on this GPU and prints no row.
    let agree = |name: &str, run: &mut dyn FnMut() -> Vec<f32>| {
        let own = run();
        std::env::set_var("HIGHRISE_CUDA_GEMV", "cublas");
        let theirs = run();
        std::env::set_var("HIGHRISE_CUDA_GEMV", "own");
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = own.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= scale / 64.0 && own.len() == theirs.len(), "gemv {shape}: 8B {name} differs from cuBLAS by {worst} (largest value {scale})");
    };
    agree("qkv", &mut || {
        b.qkv_linear([&mut q, &mut k, &mut v], &x, [&wq, &wk, &wv], [None; 3]).unwrap();
        [&q, &k, &v].iter().flat_map(|t| t.to_f32().unwrap()).collect()
    });
    agree("o", &mut || {
        b.linear(&mut out, &x, &wo, None).unwrap();
        out.to_f32().unwrap()
    });
    agree("gate+up", &mut || {
        b.swiglu_linear(&mut act, &x, &w_gate, &w_up).unwrap();
        act.to_f32().unwrap()
    });
    agree("down", &mut || {
        b.linear(&mut out, &x_inter, &w_down, None).unwrap();
        out.to_f32().unwrap()
    });
    let report = |name: &str, weights: usize, run: &mut dyn FnMut()| {
        let secs = time(b, 50, run).as_secs_f64() / 50.0;
        println!("| gemv {shape} | 8B {name} T=1 | {:.1} |", (weights * 2) as f64 / secs / 1e9);
    };
    report("qkv", (h + 2 * kv) * h, &mut || b.qkv_linear([&mut q, &mut k, &mut v], &x, [&wq, &wk, &wv], [None; 3]).unwrap());
    report("o", h * h, &mut || b.linear(&mut out, &x, &wo, None).unwrap());
    report("gate+up", 2 * inter * h, &mut || b.swiglu_linear(&mut act, &x, &w_gate, &w_up).unwrap());
    report("down", h * inter, &mut || b.linear(&mut out, &x_inter, &w_down, None).unwrap());
    std::env::remove_var("HIGHRISE_CUDA_GEMV");
}

/// `HIGHRISE_BENCH_ITERS` if set (fewer runs where a profiler watches, more where timing noise
/// needs them), else `default`.
fn bench_iters(default: usize) -> usize {
    std::env::var("HIGHRISE_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A random-weight Llama-3-8B-shaped model cut to `layers` layers (each layer's kernels and bytes
/// are the full model's), bf16 on `b`.
fn llama_8b(b: &Arc<dyn Backend>, layers: usize) -> highrise::model::Llama {
    let mut config = highrise::model::ModelConfig::shape("llama-3-8b").unwrap();
    config.num_hidden_layers = layers;
    highrise::model::Llama::random(config, b.clone(), DType::BF16, 3).unwrap()
}

/// `batch` sequences decoding together through a paged cache of 16-token blocks (each its own run
/// of blocks, room for `positions` tokens), a token each per step.
struct DecodeSteps {
    batch: usize,
    per_seq: usize,
    table: Vec<u32>,
    cache: highrise::model::KvCache,
}

impl DecodeSteps {
    const BLOCK: usize = 16;

    fn new(model: &highrise::model::Llama, batch: usize, positions: usize) -> DecodeSteps {
        let per_seq = positions.div_ceil(Self::BLOCK);
        let cache = model.new_kv_cache(batch * per_seq, Self::BLOCK).unwrap();
        DecodeSteps { batch, per_seq, table: (0..(batch * per_seq) as u32).collect(), cache }
    }

    /// One step at position `pos` (every sequence `pos` tokens in), its tokens chosen on the backend,
    /// as a graph step under `graph` (the engine's way) or op by op. The cache's K/V are whatever
    /// the allocation held: no step's time depends on them.
    fn step(&mut self, model: &highrise::model::Llama, pos: usize, graph: Option<u64>) {
        use highrise::model::{Batch, Logits};
        let (n, bs, per_seq) = (self.batch, Self::BLOCK, self.per_seq);
        let seqs: Vec<PagedSeq> = (0..n).map(|i| PagedSeq { q_len: 1, context_len: pos as u32 + 1, blocks_start: (i * per_seq) as u32 }).collect();
        let slots: Vec<u32> = (0..n).map(|i| self.table[i * per_seq + pos / bs] * bs as u32 + (pos % bs) as u32).collect();
        let (tokens, positions) = (vec![7u32; n], vec![pos as u32; n]);
        let batch = Batch { tokens: &tokens, positions: &positions, slots: &slots, seqs: &seqs, block_table: &self.table };
        let cache = &mut self.cache;
        let forward = || model.forward(&batch, cache, Logits::Last);
        highrise::engine::sampling::forward_and_choose(&*model.backend, graph, None, forward).unwrap();
    }
}

/// `HIGHRISE_BENCH_SWEEP=steps`: decode steps of a Llama-3-8B-shaped model cut to `STEP_LAYERS`
/// layers (each layer's kernels are the full model's; every weight is read from memory either way),
/// op by op, at batch 1, 64 and 256 with 512 tokens of context, for Nsight Compute to time each kernel
/// on the device (scripts/gpu-check.sh runs it under `ncu --profile-from-start off`): the range it
/// collects holds `STEP_REPS` steps of each batch, after two steps untimed (kernels compiled, GEMM
/// algorithms timed). What a token's time is made of on the device, with no host gaps in it.
fn sweep_steps(b: &Arc<dyn Backend>) {
    const STEP_LAYERS: usize = 4;
    const STEP_REPS: usize = 3;
    let model = llama_8b(b, STEP_LAYERS);
    let ctx = 512usize;
    for batch in [1usize, 64, 256] {
        let mut steps = DecodeSteps::new(&model, batch, ctx + 8);
        steps.step(&model, ctx - 2, None);
        steps.step(&model, ctx - 1, None);
        b.synchronize().unwrap();
        highrise_cuda::driver::profiler(true).unwrap();
        for i in 0..STEP_REPS {
            steps.step(&model, ctx + i, None);
        }
        b.synchronize().unwrap();
        highrise_cuda::driver::profiler(false).unwrap();
        println!("steps: batch {batch}, {STEP_REPS} decode steps of {STEP_LAYERS} layers at context {ctx} in the profiled range");
    }
}

/// `HIGHRISE_BENCH_SWEEP`: scripts/gpu-sweep.sh's timing of the tensor-core prefill kernel at the
/// tile shape it was compiled with, rows "| shape | test | TFLOP/s |"; "ncu": one run of d128 causal
/// 8k only, for Nsight Compute to profile.
fn sweep(b: &Arc<dyn Backend>, arch: &str, mode: &str) {
    if mode == "decode" {
        return sweep_decode(b, arch);
    }
    if mode == "gemv" {
        return sweep_gemv(b, arch);
    }
    if mode == "steps" {
        return sweep_steps(b);
    }
    if mode == "ncu" {
        let (_, mut run) = prefill_problem(b, 128, 8192, true);
        run();
        b.synchronize().unwrap();
        return;
    }
    for d in highrise_cuda::flash::HEAD_DIMS {
        // HIGHRISE_FLASH_KERNEL=wgmma or wgmma-pipe: a Hopper kernel, in the geometry it was compiled
        // with (HIGHRISE_FLASH_WG_SHAPE, as "warpgroups x keys"); ws: the warp-specialized one
        // (HIGHRISE_FLASH_WS_SHAPE, "keys x stages").
        use highrise_cuda::flash::{shape_of, wg_label, ws_shapes, Family, Wg};
        let shape = if let Some(wg) = highrise_cuda::flash::wgmma(arch) {
            let geometry = match wg {
                Wg::Spec => ws_shapes().unwrap().into_iter().find(|(dd, _)| *dd == d).unwrap().1.to_string(),
                _ => wg_label(shape_of(Family::Wgmma, arch, d).unwrap()),
            };
            format!("{} {geometry}", wg.kernel())
        } else {
            highrise_cuda::flash::shape(arch, d).unwrap().to_string()
        };
        for (t, causal) in [(2048, true), (8192, true), (16384, true), (8192, false)] {
            let (flops, mut run) = prefill_problem(b, d, t, causal);
            let secs = time(b, 10, &mut run).as_secs_f64() / 10.0;
            let mask = if causal { "causal" } else { "full" };
            println!("| {shape} | d{d} {mask} T={t} | {:.1} |", flops / secs / 1e12);
        }
    }
}

/// `HIGHRISE_BENCH_SWEEP=host` (no GPU needed): the CUDA backend's host side alone, over a driver
/// that queues nothing (`NullDriver`): a decode step of a Llama-3-8B-shaped model at batch 1, 64
/// and 256 (512 tokens of context), recorded as a graph step and replayed (as the engine runs it) and op by op, at 2 and 4
/// layers, so a layer's host time and the rest's are told apart and scaled to the full 32 layers.
/// On a GPU a graph step's recording happens while the device waits (the step before was read to
/// choose this one's tokens), so it adds to the time of every token. Then the engine's whole step
/// (`highrise bench -c`'s run: scheduling, block tables, reading the tokens back, the backend) at
/// batch 1, 64 and 256.
fn sweep_host() {
    let reps = bench_iters(200);
    let ctx = 512usize;
    println!("| batch | path | layers | host us per step |");
    println!("| ---: | --- | ---: | ---: |");
    let mut per_step = std::collections::BTreeMap::new();
    let (tok, mut engine) = (highrise::model::Tokenizer::numbered(128256).unwrap(), Vec::new());
    for layers in [2usize, 4] {
        let b: Arc<dyn Backend> = Arc::new(CudaBackend::with_driver(Arc::new(highrise_cuda::driver::NullDriver::default())));
        let model = llama_8b(&b, layers);
        for batch in [1usize, 64, 256] {
            let mut steps = DecodeSteps::new(&model, batch, ctx + 32);
            for graphs in [true, false] {
                let key = graphs.then(|| highrise::engine::sampling::graph_key(batch, false));
                steps.step(&model, ctx, key);
                steps.step(&model, ctx + 1, key);
                // The best of five runs of `reps` steps: a VM's runs vary by tens of percent, and
                // the layer's share is a difference of two of them.
                let before = b.graph_stats();
                let mut us = f64::MAX;
                for run in 0..5 {
                    let start = Instant::now();
                    for i in 0..reps {
                        steps.step(&model, ctx + 2 + (run * reps + i) % 16, key);
                    }
                    us = us.min(start.elapsed().as_secs_f64() * 1e6 / reps as f64);
                }
                let captured = b.graph_stats().captured - before.captured;
                let path = if graphs { format!("graph step (recorded, compared, replayed; {captured} captured)") } else { "op by op".into() };
                println!("| {batch} | {path} | {layers} | {us:.0} |");
                per_step.insert((batch, graphs, layers), us);
            }
        }
        // The engine's whole step on the same model, as `highrise bench -c` runs it, 8 and 72
        // tokens a sequence: the difference is 64 decode steps (the prefill and warm-up cancel).
        for batch in [1usize, 64, 256] {
            // The best of three runs of n tokens a sequence (a 2-vCPU VM's runs vary).
            let run = |n| {
                let once = || {
                    let t = Instant::now();
                    highrise::engine::bench::concurrent(&model, &tok, batch, n, 8 << 30, &Default::default()).unwrap();
                    t.elapsed().as_secs_f64()
                };
                (0..3).map(|_| once()).fold(f64::MAX, f64::min)
            };
            let (short, long) = (run(8), run(72));
            engine.push(format!("| {batch} | {layers} | {:.0} |", (long - short) / 64.0 * 1e6));
        }
    }
    for (batch, graphs) in [1usize, 64, 256].into_iter().flat_map(|b| [(b, true), (b, false)]) {
        let (two, four) = (per_step[&(batch, graphs, 2)], per_step[&(batch, graphs, 4)]);
        let layer = (four - two) / 2.0;
        let path = if graphs { "as graphs" } else { "op by op" };
        println!("batch {batch} {path}: {layer:.1} us a layer, {:.0} us the rest: {:.2} ms a step of 32 layers on the host", two - 2.0 * layer, (two - 2.0 * layer + 32.0 * layer) / 1e3);
    }
    println!("| batch | layers | engine's host us per decode step |");
    println!("| ---: | ---: | ---: |");
    for row in engine {
        println!("{row}");
    }
}

fn main() {
    if std::env::var("HIGHRISE_BENCH_SWEEP").is_ok_and(|m| m == "host") {
        return sweep_host();
    }
    let mut cuda = match CudaBackend::new(0) {
        Ok(c) => c,
        Err(e) => return println!("skipped: no CUDA device ({e})"),
    };
    let arch = cuda.arch().to_string();
    if let Ok(mode) = std::env::var("HIGHRISE_BENCH_SWEEP") {
        // The kernel HIGHRISE_FLASH_KERNEL chose (on Hopper wgmma's unless it says mma).
        return sweep(&(Arc::new(cuda) as Arc<dyn Backend>), &arch, &mode);
    }
    // The rows named "flash" are mma.sync's kernel, on Hopper too, where the engine's default is
    // the pipelined wgmma kernel: that one, and the plain one, have rows of their own below.
    cuda.set_flash_wgmma(None).unwrap();
    let b: Arc<dyn Backend> = Arc::new(cuda);
    let copy_bw = highrise::engine::bench::device_copy_bandwidth(&b, 1 << 30, 10).unwrap();
    let quick = std::env::var_os("HIGHRISE_BENCH_QUICK").is_some();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }))
        .measurement_time(Duration::from_millis(if quick { 500 } else { 3000 }))
        .sample_size(10)
        .configure_from_args();
    let mut rows = Vec::new();

    // The GEMM ceiling: bf16 8192^3 through the Linear op (cuBLAS).
    let n = 8192;
    let (x, w) = (random(&b, DType::BF16, &[n, n], 1.0), random(&b, DType::BF16, &[n, n], 0.01));
    let mut out = Tensor::empty(&b, DType::BF16, &[n, n]).unwrap();
    let secs = time(&b, 20, || b.linear(&mut out, &x, &w, None).unwrap()).as_secs_f64() / 20.0;
    let gemm_rate = 2.0 * (n as f64).powi(3) / secs;
    drop((x, w, out));
    println!(
        "ceilings on {}: copy {:.0} GB/s (read + write), cuBLAS bf16 GEMM 8192^3 {:.0} TFLOP/s",
        b.info().device,
        copy_bw / 1e9,
        gemm_rate / 1e12
    );

    // On Hopper, the wgmma prefill kernels too (wgmma-pipe the engine's default there; wgmma-ws the
    // warp-specialized one): a backend of its own for each.
    let hopper: Vec<(&str, Arc<dyn Backend>)> = if arch == "sm_90a" {
        use highrise_cuda::flash::Wg;
        // HIGHRISE_BENCH_SKIP_WS: gpu-check.sh's word that flash_attn_ws failed its cross-check (a
        // kernel that traps poisons the process's context, and every row after it).
        let skip_ws = std::env::var_os("HIGHRISE_BENCH_SKIP_WS").is_some();
        [("wgmma", Wg::Plain), ("wgmma-pipe", Wg::Pipe), ("wgmma-ws", Wg::Spec)]
            .into_iter()
            .filter(|(_, wg)| !(skip_ws && *wg == Wg::Spec))
            .map(|(name, wg)| {
                let mut on = CudaBackend::new(0).unwrap();
                on.set_flash_wgmma(Some(wg)).unwrap();
                (name, Arc::new(on) as Arc<dyn Backend>)
            })
            .collect()
    } else {
        Vec::new()
    };
    let (hq, hkv) = (32usize, 8usize);
    let mut g = c.benchmark_group("attention_prefill");
    for d in [64usize, 128] {
        for t in [512usize, 2048, 8192, 16384] {
            // The tensor-core kernel, causal and not, and (causal, at the shorter lengths) the split
            // kernel it replaced.
            let mut kernels = vec![("flash", "auto", true), ("flash", "auto", false)];
            for (name, _) in &hopper {
                kernels.extend([(*name, "auto", true), (*name, "auto", false)]);
            }
            if t <= 2048 {
                kernels.push(("split", "split", true));
            }
            for (kernel, choice, causal) in kernels {
                let mask = if causal { "causal" } else { "full" };
                std::env::set_var("HIGHRISE_CUDA_ATTENTION", choice);
                let on = hopper.iter().find(|(name, _)| *name == kernel).map_or(&b, |(_, on)| on);
                let (flops, mut run) = prefill_problem(on, d, t, causal);
                g.throughput(Throughput::Elements(flops as u64));
                g.bench_function(BenchmarkId::new(format!("{kernel}_bf16_d{d}_{mask}"), t), |bn| {
                    bn.iter_custom(|iters| time(on, iters, &mut run))
                });
                let secs = time(on, 5, &mut run).as_secs_f64() / 5.0;
                rows.push(Row {
                    test: format!("attention prefill ({kernel}) d{d} {mask} T={t}"),
                    figure: flops / secs / 1e12,
                    unit: "TFLOP/s",
                    ceiling: gemm_rate / 1e12,
                });
            }
            std::env::remove_var("HIGHRISE_CUDA_ATTENTION");
        }
    }
    g.finish();

    let mut g = c.benchmark_group("attention_decode");
    let d = 128usize;
    for batch in [1usize, 8, 64, 256] {
        for ctx in [1024usize, 8192, 32768] {
            if batch * ctx * hkv * d * 2 * 2 > 4 << 30 {
                continue; // K and V within 4 GiB: their random values are made on the host
            }
            let (bytes, mut run) = decode_problem(&b, batch, ctx);
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(BenchmarkId::new(format!("bf16_d{d}_batch{batch}"), ctx), |bn| {
                bn.iter_custom(|iters| time(&b, iters, &mut run))
            });
            let secs = time(&b, 5, &mut run).as_secs_f64() / 5.0;
            // The copy ceiling counts read + write; attention only reads.
            rows.push(Row { test: format!("decode attention batch {batch} ctx {ctx}"), figure: bytes as f64 / secs / 1e9, unit: "GB/s read", ceiling: copy_bw / 1e9 });
        }
    }
    g.finish();

    // Choosing tokens from Llama-3's 128256-wide logits at 1 and 64 rows: greedy (argmax) and a
    // draw as a chat request asks (temperature 0.8, top-p 0.95: radix passes over the row). GB/s of
    // the logits read once, so the ceiling is one pass at the copy bandwidth.
    let mut g = c.benchmark_group("sampling");
    let vocab = 128_256usize;
    for rows_n in [1usize, 64] {
        let x = random(&b, DType::BF16, &[rows_n, vocab], 4.0);
        let (mut index, mut logprob) = (Tensor::empty(&b, DType::U32, &[rows_n]).unwrap(), Tensor::empty(&b, DType::F32, &[rows_n]).unwrap());
        let params: Vec<SampleParams> =
            (0..rows_n).map(|r| SampleParams { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, uniform: (r as f64 + 0.5) / rows_n as f64 }).collect();
        let bytes = (rows_n * vocab * 2) as u64;
        for kernel in ["argmax", "sample"] {
            let mut run = || {
                if kernel == "argmax" {
                    b.argmax(&mut index, &mut logprob, &x).unwrap()
                } else {
                    b.sample(&mut index, &mut logprob, &x, &params).unwrap()
                }
            };
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(BenchmarkId::new(kernel, rows_n), |bn| bn.iter_custom(|iters| time(&b, iters, &mut run)));
            let secs = time(&b, 10, &mut run).as_secs_f64() / 10.0;
            let what = if kernel == "argmax" { "argmax" } else { "sample (T 0.8, top-p 0.95)" };
            rows.push(Row { test: format!("{what} {rows_n} x {vocab} ({:.0} us)", secs * 1e6), figure: bytes as f64 / secs / 1e9, unit: "GB/s read", ceiling: copy_bw / 1e9 });
        }
    }
    g.finish();

    // Decode (1, 2 and 8 rows: our GEMV kernel wherever it fits, and cuBLAS beside it; the engine
    // picks by ops::gemv_pays), batched decode (64 and 256 rows, cuBLAS: the H200's batch-64 decode
    // ran at 45% of its roofline, batch 256 at 27%, and nothing timed their projections alone) and
    // prefill (cuBLAS). Up to 64 rows they are bound by the weights' bytes (GB/s read), above by
    // the flops (TFLOP/s).
    let mut g = c.benchmark_group("llama3_8b_projections");
    let (h, inter) = (4096usize, 14336usize);
    for t in [1usize, 2, 8, 64, 256, 512] {
        for (name, rows_out, cols) in [("qkv", (hq + 2 * hkv) * d, h), ("o", h, h), ("gate", inter, h), ("down", h, inter)] {
            let w = random(&b, DType::BF16, &[rows_out, cols], 0.01);
            let x = random(&b, DType::BF16, &[t, cols], 1.0);
            let mut out = Tensor::empty(&b, DType::BF16, &[t, rows_out]).unwrap();
            let (wbytes, flops) = ((rows_out * cols * 2) as u64, 2.0 * (t * rows_out * cols) as f64);
            // (row label, HIGHRISE_CUDA_GEMV, HIGHRISE_GEMM): cuBLAS is cublasGemmEx's own choice,
            // cuBLASLt the algorithm timed fastest for the shape (the engine's default, lt.rs).
            let cublas: &[(&str, &str, &str)] = &[("cuBLAS", "cublas", "gemmex"), ("cuBLASLt", "cublas", "tuned")];
            let kernels: Vec<(&str, &str, &str)> = if t <= 8 { [("gemv", "own", "tuned")].iter().chain(cublas).copied().collect() } else { cublas.to_vec() };
            for (kernel, gemv, gemm) in kernels {
                std::env::set_var("HIGHRISE_CUDA_GEMV", gemv);
                std::env::set_var("HIGHRISE_GEMM", gemm);
                let mut run = || b.linear(&mut out, &x, &w, None).unwrap();
                g.throughput(if t <= 64 { Throughput::Bytes(wbytes) } else { Throughput::Elements(flops as u64) });
                g.bench_function(BenchmarkId::new(format!("{name}_{kernel}"), t), |bn| bn.iter_custom(|iters| time(&b, iters, &mut run)));
                let secs = time(&b, 10, &mut run).as_secs_f64() / 10.0;
                let stage = match t {
                    1..=8 => "decode",
                    64 | 256 => "batched decode",
                    _ => "prefill",
                };
                rows.push(if t <= 64 {
                    let test = format!("8B {name} {stage} T={t} ({kernel})");
                    Row { test, figure: wbytes as f64 / secs / 1e9, unit: "GB/s read", ceiling: copy_bw / 1e9 }
                } else {
                    Row { test: format!("8B {name} {stage} T={t} ({kernel})"), figure: flops / secs / 1e12, unit: "TFLOP/s", ceiling: gemm_rate / 1e12 }
                });
            }
            std::env::remove_var("HIGHRISE_CUDA_GEMV");
            std::env::remove_var("HIGHRISE_GEMM");
        }
    }
    g.finish();

    println!("\n| test | figure | unit | ceiling | of ceiling |");
    println!("| --- | ---: | --- | ---: | ---: |");
    for r in &rows {
        println!("| {} | {:.1} | {} | {:.0} | {:.0}% |", r.test, r.figure, r.unit, r.ceiling, 100.0 * r.figure / r.ceiling);
    }
}

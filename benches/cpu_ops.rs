//! Criterion benchmarks of every CPU-backend op at the default model's shapes (SmolLM2-135M: hidden
//! 576, 9 query / 3 KV heads of 64, intermediate 1536) and at one Llama-3-8B layer's (hidden 4096,
//! 32 / 8 heads of 128, intermediate 14336), for decode (1 token) and prefill (512 tokens).
//!
//! Before the benchmarks it measures and prints the ceilings they are judged against: host memory
//! bandwidth (a large copy, bytes read + written), the SIMD GEMM rate (f32 512x4096x4096), and one
//! thread's instruction peaks (int8 `vpdpbusd` and f32 FMA, where AVX-512 VNNI is present). Run with
//! `cargo bench --bench cpu_ops`; `HIGHRISE_THREADS` sets the thread count.

mod common;
use common::random;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use highrise::core::ops::{PagedSeq, RopeConfig};
use highrise::core::{Backend, DType, Tensor};

struct Shape {
    name: &'static str,
    hidden: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    /// Weights are stored in this dtype (the 8B layer in bf16, as its checkpoints are).
    weight_dtype: DType,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "smollm2-135m",
        hidden: 576,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
        intermediate: 1536,
        weight_dtype: DType::F32,
    },
    Shape {
        name: "llama3-8b",
        hidden: 4096,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        intermediate: 14336,
        weight_dtype: DType::BF16,
    },
];

const TOKENS: [usize; 2] = [1, 512];

fn backend() -> Arc<dyn Backend> {
    highrise::load_backend("cpu").expect("load the cpu plugin")
}


fn ops(c: &mut Criterion) {
    let b = backend();
    let act = DType::F32;
    for s in &SHAPES {
        let (h, i, d) = (s.hidden, s.intermediate, s.head_dim);
        let mut g = c.benchmark_group(s.name);
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        let norm_w = random(&b, act, &[h], 1.0);
        let wq = random(&b, s.weight_dtype, &[s.q_heads * d, h], 0.05);
        let w_gate = random(&b, s.weight_dtype, &[i, h], 0.05);
        let w_down = random(&b, s.weight_dtype, &[h, i], 0.05);
        let wsize = s.weight_dtype.storage_bytes(1).unwrap() as u64;
        for t in TOKENS {
            let x = random(&b, act, &[t, h], 1.0);
            let mut out = random(&b, act, &[t, h], 1.0);
            g.throughput(Throughput::Bytes((3 * t * h * 4) as u64));
            g.bench_function(BenchmarkId::new("add_rms_norm", t), |bench| {
                let mut res = random(&b, act, &[t, h], 1.0);
                bench.iter(|| b.add_rms_norm(&mut out, &mut res, &x, &norm_w, 1e-5).unwrap())
            });
            for (name, w, k, n) in [("linear_q", &wq, h, s.q_heads * d), ("linear_gate", &w_gate, h, i), ("linear_down", &w_down, i, h)] {
                let x = random(&b, act, &[t, k], 1.0);
                let mut y = random(&b, act, &[t, n], 1.0);
                // Decode is bound by reading the weights, prefill by arithmetic.
                g.throughput(if t == 1 { Throughput::Bytes(n as u64 * k as u64 * wsize) } else { Throughput::Elements((2 * t * n * k) as u64) });
                g.bench_function(BenchmarkId::new(name, t), |bench| bench.iter(|| b.linear(&mut y, &x, w, None).unwrap()));
            }
            let gate = random(&b, act, &[t, i], 2.0);
            let up = random(&b, act, &[t, i], 1.0);
            let mut act_out = random(&b, act, &[t, i], 1.0);
            g.throughput(Throughput::Bytes((3 * t * i * 4) as u64));
            g.bench_function(BenchmarkId::new("swiglu", t), |bench| bench.iter(|| b.swiglu(&mut act_out, &gate, &up).unwrap()));
            let mut q = random(&b, act, &[t, s.q_heads, d], 1.0);
            let positions: Vec<u32> = (0..t as u32).map(|p| p + 100).collect();
            g.throughput(Throughput::Elements(t as u64));
            g.bench_function(BenchmarkId::new("rope_q", t), |bench| bench.iter(|| b.rope(&mut q, &positions, RopeConfig::new(500_000.0)).unwrap()));
        }
        // Prefill attention over one 512-token prompt: 2 * 2 * T^2/2 * D flops per query head.
        let t = 512;
        let q = random(&b, act, &[t, s.q_heads, d], 1.0);
        let k = random(&b, act, &[t, s.kv_heads, d], 1.0);
        let v = random(&b, act, &[t, s.kv_heads, d], 1.0);
        let mut o = random(&b, act, &[t, s.q_heads, d], 1.0);
        g.throughput(Throughput::Elements((2 * t * t * d * s.q_heads) as u64));
        g.bench_function(BenchmarkId::new("attention_prefill", t), |bench| {
            bench.iter(|| b.attention(&mut o, &q, &k, &v, &[t as u32], 0.125).unwrap())
        });
        // Decode attention: one query token per sequence over a paged context, short (a chat turn)
        // and long.
        let bs = 16usize;
        for (ctx, batch) in [(128usize, 1usize), (4096, 1), (4096, 8)] {
            let blocks = batch * ctx / bs;
            let kc = random(&b, act, &[blocks, s.kv_heads, bs, d], 1.0);
            let vc = random(&b, act, &[blocks, s.kv_heads, bs, d], 1.0);
            let q = random(&b, act, &[batch, s.q_heads, d], 1.0);
            let mut o = random(&b, act, &[batch, s.q_heads, d], 1.0);
            let table: Vec<u32> = (0..blocks as u32).collect();
            let seqs: Vec<PagedSeq> = (0..batch)
                .map(|i| PagedSeq { q_len: 1, context_len: ctx as u32, blocks_start: (i * ctx / bs) as u32 })
                .collect();
            g.throughput(Throughput::Bytes((2 * batch * ctx * s.kv_heads * d * 4) as u64));
            g.bench_function(BenchmarkId::new(format!("paged_decode_ctx{ctx}_batch"), batch), |bench| {
                bench.iter(|| b.paged_attention(&mut o, &q, &kc, &vc, &seqs, &table, 0.125).unwrap())
            });
        }
        g.finish();
    }
}

/// A quantized weight [rows, cols] of random blocks with small, finite scales (the 8-row
/// interleaved layouts made from their plain format, as the model loader makes them).
fn random_quant(b: &Arc<dyn Backend>, dtype: DType, rows: usize, cols: usize) -> Tensor {
    let plain = random_quant_bytes(dtype.plain(), rows, cols);
    let data = match dtype.interleaved_rows() {
        1 => plain,
        _ => highrise::core::quant::repack_r8(dtype.plain(), &plain, rows, cols).unwrap(),
    };
    Tensor::from_bytes(b, dtype, &[rows, cols], &data).unwrap()
}

/// A quantized weight [n, k] (`random_quant`) and f32 activations x [tokens, k] and y [tokens, n]
/// for `linear_with(y, x, w)`.
fn quant_linear(b: &Arc<dyn Backend>, dtype: DType, n: usize, k: usize, tokens: usize) -> (Tensor, Tensor, Tensor) {
    (random_quant(b, dtype, n, k), random(b, DType::F32, &[tokens, k], 1.0), random(b, DType::F32, &[tokens, n], 1.0))
}

fn random_quant_bytes(dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = dtype.storage_bytes(rows * cols).unwrap();
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut data: Vec<u8> = (0..bytes)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8
        })
        .collect();
    // The f16 scale fields: at the start of each block (Q4_0/1, Q8_0, Q4_K), at its end (Q6_K);
    // 0.01 is 0x211F.
    for blk in data.chunks_mut(dtype.block_bytes()) {
        match dtype {
            DType::Q4_1 | DType::Q4K => blk[..4].copy_from_slice(&[0x1F, 0x21, 0x1F, 0xA1]),
            DType::Q6K => blk[208..210].copy_from_slice(&[0x1F, 0x21]),
            _ => blk[..2].copy_from_slice(&[0x1F, 0x21]),
        }
    }
    data
}

/// Quantized projections at decode (one token): bytes of weights read per second, with f32 and with
/// 8-bit activations. The default model's layers are Q4_1 (kept as Q4_1R8: 8 rows interleaved, the
/// layout the CPU backend decodes), its (tied) unembedding Q8_0.
fn quantized(c: &mut Criterion) {
    let b = backend();
    let mut g = c.benchmark_group("smollm2-135m-quantized");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (name, dtype, n, k) in [
        ("q4_1_k", DType::Q4_1, 192, 576),
        ("q4_1_q", DType::Q4_1, 576, 576),
        ("q4_1_gate", DType::Q4_1, 1536, 576),
        ("q4_1_down", DType::Q4_1, 576, 1536),
        ("q4_1_r8_k", DType::Q4_1R8, 192, 576),
        ("q4_1_r8_q", DType::Q4_1R8, 576, 576),
        ("q4_1_r8_gate", DType::Q4_1R8, 1536, 576),
        ("q4_1_r8_down", DType::Q4_1R8, 576, 1536),
        ("q4_0_gate", DType::Q4_0, 1536, 576),
        ("q8_0_unembed", DType::Q8_0, 49152, 576),
        // The K-quants of common GGUF files (Q4_K_M), at a Llama-3-8B projection's width.
        ("q4_k_4096", DType::Q4K, 4096, 4096),
        ("q6_k_4096", DType::Q6K, 4096, 4096),
    ] {
        let (w, x, mut y) = quant_linear(&b, dtype, n, k, 1);
        g.throughput(Throughput::Bytes(dtype.storage_bytes(n * k).unwrap() as u64));
        for q8 in [false, true] {
            let id = BenchmarkId::new(name, if q8 { "q8_act" } else { "f32_act" });
            g.bench_function(id, |bench| bench.iter(|| b.linear_with(&mut y, &x, &w, None, q8).unwrap()));
        }
    }
    // A matrix far larger than the caches, as decoding streams the whole model from memory: on one
    // thread and on all, to tell a kernel bound by its instructions from one bound by memory (compare
    // with the one-thread and all-thread read ceilings printed first).
    let one: Arc<dyn Backend> = Arc::new(highrise_cpu::CpuBackend::new(Some(1)).unwrap());
    let (n, k) = (16384, 4096);
    let bytes = DType::Q4_1.storage_bytes(n * k).unwrap() as u64;
    let all: usize = b.info().device.split(' ').next().unwrap_or("all").parse().unwrap_or(0);
    // With HIGHRISE_THREADS=1 both are one thread: measured once (criterion refuses a repeated id).
    let teams = if all == 1 { vec![(1, &one)] } else { vec![(1, &one), (all, &b)] };
    for (threads, be) in teams {
        for dtype in [DType::Q4_1, DType::Q4_1R8] {
            let (w, x, mut y) = quant_linear(be, dtype, n, k, 1);
            g.throughput(Throughput::Bytes(bytes));
            for q8 in [false, true] {
                let id = BenchmarkId::new(format!("{dtype}_stream_{}mb_{threads}t", bytes >> 20), if q8 { "q8_act" } else { "f32_act" });
                g.bench_function(id, |bench| bench.iter(|| be.linear_with(&mut y, &x, &w, None, q8).unwrap()));
            }
        }
    }
    g.finish();
    // A prompt's projections (512 tokens) with 8-bit activations: multiply-adds per second (x2 as
    // flops), the integer GEMM where the CPU has AVX-512 VNNI, the row kernels (or, for Q4_K, the
    // f32 GEMM over dequantized rows) elsewhere.
    let mut g = c.benchmark_group("smollm2-135m-quantized-prefill");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let t = 512;
    for (name, dtype, n, k) in [
        ("q4_1_r8_gate", DType::Q4_1R8, 1536, 576),
        ("q4_1_r8_down", DType::Q4_1R8, 576, 1536),
        ("q4_1_gate", DType::Q4_1, 1536, 576),
        ("q8_0_unembed", DType::Q8_0, 49152, 576),
        // A quarter of a Llama-3-8B projection in Q4_K (the bulk of Q4_K_M files).
        ("q4_k_1024x4096", DType::Q4K, 1024, 4096),
    ] {
        let (w, x, mut y) = quant_linear(&b, dtype, n, k, t);
        g.throughput(Throughput::Elements(2 * (t * n * k) as u64));
        g.bench_function(BenchmarkId::new(name, "q8_act_512"), |bench| bench.iter(|| b.linear_with(&mut y, &x, &w, None, true).unwrap()));
        if dtype == DType::Q4K {
            // Against f32 activations: the weights dequantized chunk by chunk for an f32 GEMM.
            g.bench_function(BenchmarkId::new(name, "f32_act_512"), |bench| bench.iter(|| b.linear_with(&mut y, &x, &w, None, false).unwrap()));
        }
    }
    g.finish();
}

/// Bytes per second one thread reads (summing a 256 MiB buffer, best of 3).
fn one_thread_read_bandwidth() -> f64 {
    let data = vec![1u64; (256 << 20) / 8];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let s = Instant::now();
        let mut acc = [0u64; 4];
        for q in data.chunks_exact(4) {
            for i in 0..4 {
                acc[i] = acc[i].wrapping_add(q[i]);
            }
        }
        std::hint::black_box(acc);
        best = best.min(s.elapsed().as_secs_f64());
    }
    (data.len() * 8) as f64 / best
}

/// The CPU backend's own f32 GEMM rate (512 tokens x 4096 -> 4096): the ceiling for prefill linears.
fn gemm_rate(b: &Arc<dyn Backend>) -> f64 {
    let (t, k, n) = (512, 4096, 4096);
    let x = random(b, DType::F32, &[t, k], 1.0);
    let w = random(b, DType::F32, &[n, k], 0.05);
    let mut y = random(b, DType::F32, &[t, n], 1.0);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let s = Instant::now();
        b.linear(&mut y, &x, &w, None).unwrap();
        best = best.min(s.elapsed().as_secs_f64());
    }
    2.0 * (t * k * n) as f64 / best
}

/// One thread's instruction peaks: (int8 multiply-adds as ops/s on AVX-512 VNNI `vpdpbusd`, f32
/// flops/s on AVX-512 FMA), each from 12 independent accumulator chains (best of 3); None where the
/// CPU lacks them. What no kernel of either kind can pass: the quantized prefill rows above are
/// judged against the first, the f32 GEMM against the second.
#[cfg(target_arch = "x86_64")]
fn instruction_peaks() -> Option<(f64, f64)> {
    use std::arch::x86_64::*;
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
        return None;
    }
    const ITERS: u64 = 4_000_000;
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn int8() -> i32 {
        let (a, b) = (_mm512_set1_epi8(1), _mm512_set1_epi8(std::hint::black_box(2)));
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..ITERS {
            for s in acc.iter_mut() {
                *s = _mm512_dpbusd_epi32(*s, a, b);
            }
        }
        _mm512_reduce_add_epi32(acc.iter().fold(_mm512_setzero_si512(), |x, &y| _mm512_add_epi32(x, y)))
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn f32s() -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(std::hint::black_box(1e-3)));
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..ITERS {
            for s in acc.iter_mut() {
                *s = _mm512_fmadd_ps(*s, a, b);
            }
        }
        _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |x, &y| _mm512_add_ps(x, y)))
    }
    let best = |f: &dyn Fn()| (0..3).map(|_| {
        let s = Instant::now();
        f();
        s.elapsed().as_secs_f64()
    }).fold(f64::MAX, f64::min);
    let instructions = (ITERS * 12) as f64;
    // SAFETY: the features each needs were detected above.
    let i = best(&|| {
        std::hint::black_box(unsafe { int8() });
    });
    let f = best(&|| {
        std::hint::black_box(unsafe { f32s() });
    });
    Some((instructions * 64.0 * 2.0 / i, instructions * 16.0 * 2.0 / f))
}

#[cfg(not(target_arch = "x86_64"))]
fn instruction_peaks() -> Option<(f64, f64)> {
    None
}

criterion_group!(benches, ops, quantized);

fn main() {
    let b = backend();
    println!("backend: cpu ({})", b.info().device);
    println!("ceiling: memory copy {:.1} GB/s (read + write)", highrise::engine::bench::copy_bandwidth() / 1e9);
    println!(
        "ceiling: memory read {:.1} GB/s on all threads, {:.1} GB/s on one",
        highrise::engine::bench::read_bandwidth() / 1e9,
        one_thread_read_bandwidth() / 1e9
    );
    println!("ceiling: f32 GEMM 512x4096x4096 {:.1} GFLOP/s", gemm_rate(&b) / 1e9);
    match instruction_peaks() {
        Some((int8, f32)) => println!(
            "ceiling: one thread's instruction peaks: int8 multiply-adds (vpdpbusd) {:.0} GOPS, f32 FMA {:.0} GFLOP/s",
            int8 / 1e9,
            f32 / 1e9
        ),
        None => println!("ceiling: instruction peaks not measured (no AVX-512 VNNI)"),
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

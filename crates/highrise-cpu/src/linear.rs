//! `out = x @ weight^T + bias`, the projection every block is made of.
//!
//! The weight's output rows are split into chunks that threads take in turn; a chunk of an f16/bf16
//! weight is widened to f32 in a per-thread buffer just before use, so no f32 copy of the weights ever
//! exists. Few tokens (decode) take a dot-product path that streams the weights once; many tokens
//! (prefill) take a packed SIMD GEMM (`matrixmultiply`) per chunk. Quantized weights stay in their
//! blocks: decode, batches and prompts with 8-bit activations run the block kernels of `quant` over
//! each chunk of rows; many tokens with f32 activations dequantize one chunk of rows at a time into
//! the per-thread buffer for the GEMM. Chunks are whole multiples of 16 rows (32 for quantized rows,
//! the 8-bit GEMM's tiles), so rows interleaved by 8 (`Q4_0R8`, `Q4_1R8`) never straddle two.

use std::borrow::Cow;

use half::{bf16, f16};
use highrise_core::ops::Linear;
use highrise_core::quant::dequantize_rows;
use highrise_core::{DType, Element, Error, Result, TensorRef};

use crate::float::{with_float, Float};
use crate::simd::dot;
use crate::quant;
use crate::residual::to_f32_vec;
use crate::storage::Tensors;
use crate::team::Team;

/// Up to this many tokens, f32/f16/bf16 weights take the dot-product path (it beats packing the
/// weights for a GEMM).
const GEMV_MAX_TOKENS: usize = 4;
/// Up to this many tokens with f32 activations, quantized weights take their block kernels, reading
/// each tile of rows once for all tokens (a batch of decoding sequences, a short prompt); beyond,
/// dequantizing chunks for the GEMM pays off (measured on 2 cores: block kernels 1.4x ahead at 48
/// tokens, 1.2x at 32, even at 64; the GEMM 1.2x ahead at 512).
const QUANT_GEMV_MAX_TOKENS: usize = 64;

/// A weight matrix [N, K] in its stored dtype.
enum Weight<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Block-quantized rows, each `row_bytes` long.
    Quant { dtype: DType, bytes: &'a [u8], row_bytes: usize },
}

impl<'a> Weight<'a> {
    fn new(ts: &Tensors, t: &TensorRef) -> Result<Weight<'a>> {
        Ok(match t.dtype {
            DType::F32 => Weight::F32(ts.slice("weight", t)?),
            DType::F16 => Weight::F16(ts.slice("weight", t)?),
            DType::BF16 => Weight::BF16(ts.slice("weight", t)?),
            dtype => {
                let k = t.dims()[1];
                let row_bytes = dtype.storage_bytes(k).ok_or_else(|| {
                    Error::Invalid(format!("linear: {k} columns are not whole {dtype} blocks"))
                })?;
                Weight::Quant { dtype, bytes: ts.slice("weight", t)?, row_bytes }
            }
        })
    }

    /// Rows `r0..r1` (each `k` long) as f32: borrowed for f32 weights, widened into `buf` otherwise.
    fn rows<'b>(&'b self, r0: usize, r1: usize, k: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let range = r0 * k..r1 * k;
        buf.resize(if matches!(self, Weight::F32(_)) { 0 } else { range.len() }, 0.0);
        match self {
            Weight::F32(w) => &w[range],
            Weight::F16(w) => {
                f16::load(&w[range], buf);
                buf
            }
            Weight::BF16(w) => {
                bf16::load(&w[range], buf);
                buf
            }
            Weight::Quant { dtype, bytes, row_bytes } => {
                dequantize_rows(*dtype, &bytes[r0 * row_bytes..r1 * row_bytes], k, buf).expect("whole blocks");
                buf
            }
        }
    }
}

/// A pointer threads write through at disjoint places.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each team thread writes a disjoint range of rows through the pointer, and the caller waits
// for all of them before the output is read or freed.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub fn linear(ts: &Tensors, op: &Linear) -> Result<()> {
    let (t, k) = (op.x.dims()[0], op.x.dims()[1]);
    let n = op.weight.dims()[0];
    let weight = Weight::new(ts, &op.weight)?;
    let bias = op.bias.opt().map(|b| to_f32_vec(ts, "bias", &b)).transpose()?;
    with_float!(op.out.dtype, "linear", E => {
        let x = ts.slice::<E>("x", &op.x)?;
        // SAFETY: out is the only output and aliases no input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        let x32: Cow<[f32]> = match bytemuck::try_cast_slice::<E, f32>(x) {
            Ok(x) if E::DTYPE == DType::F32 => Cow::Borrowed(x),
            _ => {
                let mut v = vec![0f32; x.len()];
                E::load(x, &mut v);
                Cow::Owned(v)
            }
        };
        let mut owned_out = Vec::new();
        let out32: &mut [f32] = match bytemuck::try_cast_slice_mut::<E, f32>(out) {
            Ok(o) if E::DTYPE == DType::F32 && !op.accumulate => o,
            _ => {
                owned_out.resize(t * n, 0.0);
                &mut owned_out
            }
        };
        matmul_t(ts.team, out32, &x32, &weight, t, k, n, op.q8_activations);
        if let Some(b) = &bias {
            out32.chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        if op.accumulate {
            // The product as a `Linear` into a buffer stores it, then the stream's add: both
            // rounded to out's dtype, as `AddRmsNorm` adds a stored delta.
            let mut rounded = vec![<E as bytemuck::Zeroable>::zeroed(); t * n];
            E::store(&owned_out, &mut rounded);
            let mut old = vec![0f32; t * n];
            E::load(&rounded, &mut owned_out);
            E::load(out, &mut old);
            old.iter_mut().zip(&owned_out).for_each(|(o, d)| *o += d);
            E::store(&old, out);
        } else if E::DTYPE != DType::F32 {
            E::store(&owned_out, out);
        }
        Ok(())
    })
}

/// `out[T, N] = x[T, K] @ w[N, K]^T`, parallel over chunks of N. `q8` lets quantized weights meet
/// 8-bit activations on the matrix-vector path.
#[allow(clippy::too_many_arguments)]
fn matmul_t(team: &Team, out: &mut [f32], x: &[f32], w: &Weight, t: usize, k: usize, n: usize, q8: bool) {
    let threads = team.threads();
    // 8-bit activations always meet quantized weights in their blocks where a kernel takes several
    // tokens per pass: integer dot products beat widening the weights to f32 for a GEMM at every size
    // measured (pp128 about 1.6x, pp512 1.1x). Formats read token by token take the GEMM as floats do.
    let gemv = match w {
        Weight::Quant { dtype, .. } if quant::takes_tokens_together(*dtype, q8) => q8 || t <= QUANT_GEMV_MAX_TOKENS,
        Weight::Quant { .. } => t <= GEMV_MAX_TOKENS,
        _ => t <= GEMV_MAX_TOKENS,
    };
    // A few chunks per thread: enough to balance, few enough that task overhead stays small next
    // to a decode step's tiny matrices. Quantized rows go in whole tiles of 32 (the 8-bit GEMM's;
    // the row kernels need 16).
    let chunk = if gemv {
        (n / (threads * 4)).max(16).next_multiple_of(if matches!(w, Weight::Quant { .. }) { 32 } else { 16 })
    } else {
        (n / (threads * 4)).clamp(16, 256).next_multiple_of(16)
    };
    let out_ptr = SendPtr(out.as_mut_ptr());
    // What a quantized row meets, prepared once per token: block sums of x, or x in 8 bits (on
    // every thread: a prompt's 512 tokens take as long to quantize as a small projection).
    let act = |xt: &[f32]| if q8 { Act::Q8(quant::Q8Act::new(xt)) } else { Act::F32(quant::block_sums(xt)) };
    let acts: Vec<Act> = match w {
        Weight::Quant { .. } if gemv && t >= 16 => team.map(t, |i| act(&x[i * k..(i + 1) * k])),
        Weight::Quant { .. } if gemv => x.chunks_exact(k).map(act).collect(),
        _ => Vec::new(),
    };
    let q8s: Vec<&quant::Q8Act> = acts.iter().filter_map(|a| if let Act::Q8(q) = a { Some(q) } else { None }).collect();
    let f32s: Vec<quant::F32Act> = x
        .chunks_exact(k)
        .zip(&acts)
        .filter_map(|(x, a)| if let Act::F32(sums) = a { Some(quant::F32Act { x, sums }) } else { None })
        .collect();
    let f32s: Vec<&quant::F32Act> = f32s.iter().collect();
    team.for_each(n.div_ceil(chunk), |c| {
        // The whole SendPtr, not its raw-pointer field (what the closure would capture otherwise).
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let (n0, n1) = (c * chunk, ((c + 1) * chunk).min(n));
        // SAFETY (all writes below): row i, columns n0..n1 of out belong to this chunk alone.
        let put = |i: usize, j: usize, v: f32| unsafe { *out_ptr.0.add(i * n + j) = v };
        if let (true, Weight::Quant { dtype, bytes, row_bytes }) = (gemv, w) {
            if let [act] = &acts[..] {
                // One token: the row-range kernels, written straight into out.
                // SAFETY: columns n0..n1 of out's only row belong to this chunk alone.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(n0), n1 - n0) };
                let rows = &bytes[n0 * row_bytes..n1 * row_bytes];
                match act {
                    Act::Q8(xq) => quant::dot_rows(*dtype, rows, *row_bytes, xq, o),
                    Act::F32(sums) => quant::dot_rows(*dtype, rows, *row_bytes, &quant::F32Act { x, sums }, o),
                }
                return;
            }
            // Several tokens (a batch of decoding sequences, or a prompt with 8-bit activations):
            // this chunk's rows read from memory once, in tiles that stay in L1 for all tokens.
            let w = &bytes[n0 * row_bytes..n1 * row_bytes];
            let sink = |i: usize, r0: usize, v: &[f32]| {
                // SAFETY: row i, columns n0 + r0.. (inside n0..n1) of out belong to this chunk alone.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out_ptr.0.add(i * n + n0 + r0), v.len()) }
            };
            if q8s.len() == acts.len() {
                quant::dot_rows_many(*dtype, w, *row_bytes, &q8s, sink);
            } else {
                quant::dot_rows_many(*dtype, w, *row_bytes, &f32s, sink);
            }
            return;
        }
        // 16-bit float weights at decode: widened as they are read, no buffer.
        match (gemv, w) {
            (true, Weight::F16(wf)) => return gemv_rows(wf, x, k, t, n0..n1, put),
            (true, Weight::BF16(wb)) => return gemv_rows(wb, x, k, t, n0..n1, put),
            _ => {}
        }
        // The widened rows go to a buffer kept by the thread, reused from op to op.
        SCRATCH.with_borrow_mut(|buf| {
            let wc = w.rows(n0, n1, k, buf);
            if gemv {
                for (j, wrow) in wc.chunks_exact(k).enumerate() {
                    for i in 0..t {
                        put(i, n0 + j, dot(&x[i * k..(i + 1) * k], wrow));
                    }
                }
            } else {
                // SAFETY: the GEMM writes rows 0..t, columns n0..n1 of out: this chunk's alone.
                unsafe {
                    matrixmultiply::sgemm(
                        t,
                        k,
                        n1 - n0,
                        1.0,
                        x.as_ptr(),
                        k as isize,
                        1,
                        wc.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        out_ptr.0.add(n0),
                        n as isize,
                        1,
                    );
                }
            }
        })
    });
}

thread_local! {
    /// Each thread's buffer for weight rows widened to f32.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `put(i, j, x_i · w_j)` for rows `rows` of a float weight [N, k] and the t tokens of x.
fn gemv_rows<W: Float>(w: &[W], x: &[f32], k: usize, t: usize, rows: std::ops::Range<usize>, put: impl Fn(usize, usize, f32)) {
    for j in rows {
        let wj = &w[j * k..(j + 1) * k];
        for i in 0..t {
            put(i, j, W::dot_with(&x[i * k..(i + 1) * k], wj));
        }
    }
}

/// One token's activation as a quantized weight row meets it.
enum Act {
    F32(Vec<f32>),
    Q8(quant::Q8Act),
}

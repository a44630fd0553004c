//! `out = x @ weight^T + bias`, the projection every block is made of.
//!
//! The weight's output rows are split into chunks that threads take in turn; a chunk of an f16/bf16
//! weight is widened to f32 in a per-thread buffer just before use, so no f32 copy of the weights ever
//! exists. Few tokens (decode) take a dot-product path that streams the weights once; many tokens
//! (prefill) take a packed SIMD GEMM (`matrixmultiply`) per chunk.

use std::borrow::Cow;

use half::{bf16, f16};
use highrise_core::ops::Linear;
use highrise_core::{DType, Element, Error, Result, TensorRef};
use rayon::prelude::*;

use crate::float::{dot, with_float, Float};
use crate::residual::to_f32_vec;
use crate::storage::Tensors;

/// Below this many tokens the dot-product path beats packing the weights for a GEMM.
const GEMV_MAX_TOKENS: usize = 4;

/// A weight matrix [N, K] in its stored dtype.
enum Weight<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Weight<'a> {
    fn new(ts: &Tensors, t: &TensorRef) -> Result<Weight<'a>> {
        Ok(match t.dtype {
            DType::F32 => Weight::F32(ts.slice("weight", t)?),
            DType::F16 => Weight::F16(ts.slice("weight", t)?),
            DType::BF16 => Weight::BF16(ts.slice("weight", t)?),
            d => {
                return Err(Error::Unsupported(format!(
                    "linear: the cpu backend does not support {d} weights yet"
                )))
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
        }
    }
}

/// A pointer threads write through at disjoint places.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
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
            Ok(o) if E::DTYPE == DType::F32 => o,
            _ => {
                owned_out.resize(t * n, 0.0);
                &mut owned_out
            }
        };
        matmul_t(out32, &x32, &weight, t, k, n);
        if let Some(b) = &bias {
            out32.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        if E::DTYPE != DType::F32 {
            E::store(&owned_out, out);
        }
        Ok(())
    })
}

/// `out[T, N] = x[T, K] @ w[N, K]^T`, parallel over chunks of N.
fn matmul_t(out: &mut [f32], x: &[f32], w: &Weight, t: usize, k: usize, n: usize) {
    let threads = rayon::current_num_threads().max(1);
    let gemv = t <= GEMV_MAX_TOKENS;
    let chunk = if gemv { 16 } else { (n / (threads * 4)).clamp(16, 256).next_multiple_of(16) };
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each_init(Vec::new, |buf, c| {
        let out_ptr = out_ptr;
        let (n0, n1) = (c * chunk, ((c + 1) * chunk).min(n));
        let wc = w.rows(n0, n1, k, buf);
        if gemv {
            for (j, wrow) in wc.chunks_exact(k).enumerate() {
                for i in 0..t {
                    // SAFETY: column n0 + j of row i belongs to this chunk alone.
                    unsafe { *out_ptr.0.add(i * n + n0 + j) = dot(&x[i * k..(i + 1) * k], wrow) };
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
    });
}

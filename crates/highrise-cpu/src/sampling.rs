//! The logits on the backend: their soft-cap (Gemma 2), and choosing tokens: greedy argmax, and
//! draws by temperature / top-k / top-p / min-p, each with the chosen token's log-probability.

use highrise_core::ops::sampling::sample_row;
use highrise_core::ops::{Argmax, Sample, Softcap};
use highrise_core::{Result, TensorRef};

use crate::float::{with_float, Float};
use crate::storage::Tensors;
use crate::team::min_items;

/// `choose(b, row)` for every row b of x [B, V] (widened to f32), rows spread over the team,
/// writing index[b] and logprob[b].
fn per_row(
    ts: &Tensors,
    op: &str,
    (index, logprob, x): (&TensorRef, &TensorRef, &TensorRef),
    choose: impl Fn(usize, &[f32]) -> (u32, f32) + Sync,
) -> Result<()> {
    let v = x.dims()[1];
    with_float!(x.dtype, op, E => {
        let x = ts.slice::<E>("x", x)?;
        // SAFETY: index and logprob are the op's two outputs, apart from each other and from x
        // (validated).
        let index = unsafe { ts.slice_mut::<u32>("index", index)? };
        let logprob = unsafe { ts.slice_mut::<f32>("logprob", logprob)? };
        let rows = index.len().min(logprob.len());
        ts.team.rows2(&mut index[..rows], 1, &mut logprob[..rows], 1, 1, |r0, index, logprob| {
            let mut widened = Vec::new();
            for (b, (i, lp)) in index.iter_mut().zip(logprob.iter_mut()).enumerate() {
                let xr = &x[(r0 + b) * v..(r0 + b + 1) * v];
                let row = E::as_f32(xr).unwrap_or_else(|| {
                    widened.resize(v, 0.0);
                    E::load(xr, &mut widened);
                    &widened
                });
                (*i, *lp) = choose(r0 + b, row);
            }
        });
        Ok(())
    })
}

pub fn argmax(ts: &Tensors, op: &Argmax) -> Result<()> {
    per_row(ts, "argmax", (&op.index, &op.logprob, &op.x), |_, row| {
        // The maximum over eight lanes (so it vectorizes; NaN is never the maximum), then its first
        // column, as a host argmax picks.
        let mut lanes = [f32::NEG_INFINITY; 8];
        for c in row.chunks(8) {
            lanes.iter_mut().zip(c).for_each(|(l, &val)| *l = l.max(val));
        }
        let best = lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let at = row.iter().position(|&val| val == best).unwrap_or(0);
        // x[at] - logsumexp(x) = -ln(sum exp(x - max)).
        (at as u32, -(crate::simd::sum_exp(row, best).ln()) as f32)
    })
}

/// The definition itself (`sample_row`, which keeps its buffer per thread), row by row.
pub fn sample(ts: &Tensors, op: &Sample) -> Result<()> {
    let params = op.params.as_slice();
    per_row(ts, "sample", (&op.index, &op.logprob, &op.x), |b, row| sample_row(row, &params[b]))
}

/// `x = cap * tanh(x / cap)` in place: the logits' soft-cap.
pub fn softcap(ts: &Tensors, op: &Softcap) -> Result<()> {
    with_float!(op.x.dtype, "softcap", E => {
        // SAFETY: x is the op's only tensor.
        let x = unsafe { ts.slice_mut::<E>("x", &op.x)? };
        const CHUNK: usize = 4096;
        ts.team.rows(x, CHUNK, min_items(CHUNK), |_, x| {
            let mut v = vec![0f32; CHUNK];
            for x in x.chunks_mut(CHUNK) {
                let v = &mut v[..x.len()];
                E::load(x, v);
                v.iter_mut().for_each(|v| *v = op.cap * (*v / op.cap).tanh());
                E::store(v, x);
            }
        });
        Ok(())
    })
}

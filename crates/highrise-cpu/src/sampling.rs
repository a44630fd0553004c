//! Choosing tokens on the backend: greedy argmax with the chosen token's log-probability.

use highrise_core::ops::Argmax;
use highrise_core::Result;

use crate::float::{with_float, Float};
use crate::storage::Tensors;

pub fn argmax(ts: &Tensors, op: &Argmax) -> Result<()> {
    let v = op.x.dims()[1];
    with_float!(op.x.dtype, "argmax", E => {
        let x = ts.slice::<E>("x", &op.x)?;
        // SAFETY: index and logprob are the op's two outputs, apart from each other and from x
        // (validated).
        let index = unsafe { ts.slice_mut::<u32>("index", &op.index)? };
        let logprob = unsafe { ts.slice_mut::<f32>("logprob", &op.logprob)? };
        let rows = index.len().min(logprob.len());
        ts.team.rows2(&mut index[..rows], 1, &mut logprob[..rows], 1, 1, |r0, index, logprob| {
            let mut row = vec![0f32; v];
            for (b, (i, lp)) in index.iter_mut().zip(logprob.iter_mut()).enumerate() {
                E::load(&x[(r0 + b) * v..(r0 + b + 1) * v], &mut row);
                // The first of equal maxima, as a host argmax picks; NaN is never the maximum.
                let (mut best, mut at) = (f32::NEG_INFINITY, 0);
                for (j, &val) in row.iter().enumerate() {
                    if val > best {
                        (best, at) = (val, j);
                    }
                }
                // x[at] - logsumexp(x) = -ln(sum exp(x - max)), summed in f64.
                let sum: f64 = row.iter().map(|&val| ((val - best) as f64).exp()).sum();
                (*i, *lp) = (at as u32, -(sum.ln()) as f32);
            }
        });
        Ok(())
    })
}

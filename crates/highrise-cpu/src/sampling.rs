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
            let mut widened = Vec::new();
            for (b, (i, lp)) in index.iter_mut().zip(logprob.iter_mut()).enumerate() {
                let xr = &x[(r0 + b) * v..(r0 + b + 1) * v];
                let row = E::as_f32(xr).unwrap_or_else(|| {
                    widened.resize(v, 0.0);
                    E::load(xr, &mut widened);
                    &widened
                });
                // The maximum over eight lanes (so it vectorizes; NaN is never the maximum), then
                // its first column, as a host argmax picks.
                let mut lanes = [f32::NEG_INFINITY; 8];
                for c in row.chunks(8) {
                    lanes.iter_mut().zip(c).for_each(|(l, &val)| *l = l.max(val));
                }
                let best = lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
                let at = row.iter().position(|&val| val == best).unwrap_or(0);
                // x[at] - logsumexp(x) = -ln(sum exp(x - max)).
                (*i, *lp) = (at as u32, -(crate::float::sum_exp(row, best).ln()) as f32);
            }
        });
        Ok(())
    })
}

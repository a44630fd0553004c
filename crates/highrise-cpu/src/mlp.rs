//! The MLP's gate: SwiGLU.

use highrise_core::ops::SwiGlu;
use highrise_core::Result;

use crate::float::{with_float, Float};
use crate::team::min_items;
use crate::storage::Tensors;

pub fn swiglu(ts: &Tensors, op: &SwiGlu) -> Result<()> {
    with_float!(op.out.dtype, "swiglu", E => {
        let gate = ts.slice::<E>("gate", &op.gate)?;
        let up = ts.slice::<E>("up", &op.up)?;
        // SAFETY: out is the only output and aliases neither input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        const CHUNK: usize = 4096;
        ts.team.rows(out, CHUNK, min_items(CHUNK), |c, out| {
            let (mut g, mut u) = (vec![0f32; CHUNK], vec![0f32; CHUNK]);
            for (i, out) in out.chunks_mut(CHUNK).enumerate() {
                let at = (c + i) * CHUNK..(c + i) * CHUNK + out.len();
                let (g, u) = (&mut g[..out.len()], &mut u[..out.len()]);
                E::load(&gate[at.clone()], g);
                E::load(&up[at], u);
                crate::simd::silu_mul(g, u);
                E::store(g, out);
            }
        });
        Ok(())
    })
}

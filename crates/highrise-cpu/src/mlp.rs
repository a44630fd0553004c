//! The MLP's gate: SwiGLU.

use highrise_core::ops::SwiGlu;
use highrise_core::Result;
use rayon::prelude::*;

use crate::float::{min_items, with_float, Float};
use crate::storage::Tensors;

pub fn swiglu(ts: &Tensors, op: &SwiGlu) -> Result<()> {
    with_float!(op.out.dtype, "swiglu", E => {
        let gate = ts.slice::<E>("gate", &op.gate)?;
        let up = ts.slice::<E>("up", &op.up)?;
        // SAFETY: out is the only output and aliases neither input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        const CHUNK: usize = 4096;
        let chunks = out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK));
        chunks.with_min_len(min_items(CHUNK)).for_each_init(
            || (vec![0f32; CHUNK], vec![0f32; CHUNK]),
            |(g, u), ((out, gate), up)| {
                let (g, u) = (&mut g[..out.len()], &mut u[..out.len()]);
                E::load(gate, g);
                E::load(up, u);
                g.iter_mut().zip(u.iter()).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
                E::store(g, out);
            },
        );
        Ok(())
    })
}

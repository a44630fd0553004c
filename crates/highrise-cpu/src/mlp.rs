//! The MLP's gate: SwiGLU or GeGLU, alone or (SwiGLU) after its two projections (`SwiGluLinear`).

use highrise_core::ops::{GluAct, Linear, RmsNorm, SwiGlu, SwiGluLinear};
use highrise_core::{Result, Shape, TensorRef};

use crate::float::{with_float, Float};
use crate::team::min_items;
use crate::storage::{Storage, Tensors};

pub fn swiglu(ts: &Tensors, op: &SwiGlu) -> Result<()> {
    with_float!(op.out.dtype, "swiglu", E => {
        let gate = ts.slice::<E>("gate", &op.gate)?;
        // An MLP without a gate: act(x) alone.
        let up = match op.up.opt() {
            Some(up) => Some(ts.slice::<E>("up", &up)?),
            None => None,
        };
        // SAFETY: out is the only output and aliases neither input (validated).
        let out = unsafe { ts.slice_mut::<E>("out", &op.out)? };
        const CHUNK: usize = 4096;
        ts.team.rows(out, CHUNK, min_items(CHUNK), |c, out| {
            let (mut g, mut u) = (vec![0f32; CHUNK], vec![0f32; CHUNK]);
            for (i, out) in out.chunks_mut(CHUNK).enumerate() {
                let at = (c + i) * CHUNK..(c + i) * CHUNK + out.len();
                let (g, u) = (&mut g[..out.len()], &mut u[..out.len()]);
                E::load(&gate[at.clone()], g);
                match (up, op.act) {
                    (None, act) => g.iter_mut().for_each(|g| *g = act.apply(*g)),
                    (Some(up), act) => {
                        E::load(&up[at], u);
                        match act {
                            GluAct::Silu => crate::simd::silu_mul(g, u),
                            act => g.iter_mut().zip(&*u).for_each(|(g, u)| *g = act.apply(*g) * u),
                        }
                    }
                }
                E::store(g, out);
            }
        });
        Ok(())
    })
}

/// `SwiGluLinear` as the three ops it fuses: gate and up projections into buffers of the
/// activations' dtype (rounded as `Linear` rounds), then the gate: the model's unfused numbers, in
/// one op, for comparing a backend that fuses them against this one.
pub fn swiglu_linear(ts: &Tensors, op: &SwiGluLinear) -> Result<()> {
    let (dtype, shape) = (op.out.dtype, Shape::new(op.out.dims())?);
    let bytes = dtype.storage_bytes(op.out.numel()).unwrap_or(0);
    let (gate, up) = (Scratch::new(ts, bytes)?, Scratch::new(ts, bytes)?);
    let (g, u) = (TensorRef::from_raw(gate.1, dtype, shape), TensorRef::from_raw(up.1, dtype, shape));
    normed(ts, op.x, op.norm, op.eps, |x| {
        for (out, weight) in [(g, op.w_gate), (u, op.w_up)] {
            let plain = Linear { out, x, weight, bias: TensorRef::none(), q8_activations: false, accumulate: false };
            crate::linear::linear(ts, &plain)?;
        }
        Ok(())
    })?;
    swiglu(ts, &SwiGlu { out: op.out, gate: g, up: u, act: GluAct::Silu })
}

/// `run` on x, or, where a fused projection has a `norm` weight, on x's RMSNorm in a buffer of x's
/// dtype (`RmsNorm`'s numbers): what `QkvLinear` and `SwiGluLinear` project.
pub fn normed(ts: &Tensors, x: TensorRef, norm: TensorRef, eps: f32, run: impl FnOnce(TensorRef) -> Result<()>) -> Result<()> {
    let Some(weight) = norm.opt() else { return run(x) };
    let bytes = x.dtype.storage_bytes(x.numel()).unwrap_or(0);
    let buf = Scratch::new(ts, bytes)?;
    let xn = TensorRef::from_raw(buf.1, x.dtype, Shape::new(x.dims())?);
    crate::residual::rms_norm(ts, &RmsNorm { out: xn, x, weight, eps })?;
    run(xn)
}

/// A buffer of this backend's for the length of an op.
struct Scratch<'a>(&'a Tensors<'a>, highrise_core::Handle);

impl<'a> Scratch<'a> {
    fn new(ts: &'a Tensors<'a>, bytes: usize) -> Result<Scratch<'a>> {
        Ok(Scratch(ts, Storage::alloc(ts.owner, bytes)?))
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by `new`, for this op alone; the op is over.
        unsafe { Storage::free(self.0.owner, self.1) }
    }
}

//! MLP ops. The projections are `Linear`; what is particular to the MLP is the gate, alone
//! (`SwiGlu`: SwiGLU, or GeGLU for Gemma) or with the two projections that feed it (`SwiGluLinear`,
//! SwiGLU only, one pass over x for a backend that fuses them); and a mixture of experts' routed
//! MLPs, the router's choice included (`Moe`, for a backend that keeps the choice on the device).

use super::{Check, CheckResult};
use crate::TensorRef;

/// The activation a gated MLP applies to its gate.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluAct {
    /// `silu(x) = x / (1 + e^-x)`: SwiGLU (Llama, Mistral, Qwen, Phi).
    Silu = 0,
    /// `gelu(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, the tanh approximation
    /// (PyTorch's `gelu(approximate="tanh")`): GeGLU (Gemma).
    GeluTanh = 1,
    /// `gelu(x) = x/2 (1 + erf(x / sqrt(2)))`, exact (PyTorch's `gelu`, HF's `"gelu"` outside Gemma):
    /// GPT-NeoX (Pythia).
    GeluErf = 2,
    /// `relu(x) = max(x, 0)` (NaN stays NaN, as PyTorch's): OPT.
    Relu = 3,
    /// `relu(x)^2`, the squared ReLU: Nemotron.
    Relu2 = 4,
}

impl GluAct {
    /// The activation of one value, in f32 (the backends' formula).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            GluAct::Silu => x / (1.0 + (-x).exp()),
            GluAct::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
            }
            GluAct::GeluErf => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            GluAct::Relu => if x < 0.0 { 0.0 } else { x },
            GluAct::Relu2 => if x < 0.0 { 0.0 } else { x * x },
        }
    }
}

/// `out = act(gate) * up`, elementwise (`act` silu: SwiGLU; tanh-GELU: GeGLU); `out = act(gate)`
/// where `up` is none (an MLP without a gate: GPT-2, GPT-NeoX). out, gate, up [T, I].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SwiGlu<'a> {
    pub out: TensorRef<'a>,
    pub gate: TensorRef<'a>,
    pub up: TensorRef<'a>,
    pub act: GluAct,
}

impl SwiGlu<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("gate", &self.gate)])?;
        c.rank("gate", &self.gate, 2)?;
        if let Some(up) = self.up.opt() {
            c.activations(&[("gate", &self.gate), ("up", &up)])?;
            c.dims("up", &up, self.gate.dims())?;
        }
        c.dims("out", &self.out, self.gate.dims())
    }
}

/// `out = silu(x @ w_gate^T) * (x @ w_up^T)`: the gate and up projections and the gate in one op,
/// each projection rounded to the activations' dtype before the gate (what `Linear` twice and then
/// `SwiGlu` compute). x [T, H] and out [T, I] activations; w_gate, w_up [I, H] in x's dtype.
/// Backends that do not fuse it decline it (`Backend::supports`); the model then runs the three ops.
/// With a `norm` weight [H], the projections read `rms_norm(x) * norm`, as `QkvLinear`'s do.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SwiGluLinear<'a> {
    pub out: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub w_gate: TensorRef<'a>,
    pub w_up: TensorRef<'a>,
    /// The RMSNorm weight [H] applied to x first, or `TensorRef::none()`.
    pub norm: TensorRef<'a>,
    pub eps: f32,
}

impl SwiGluLinear<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("x", &self.x), ("w_gate", &self.w_gate), ("w_up", &self.w_up)])?;
        c.rank("x", &self.x, 2)?;
        c.rank("w_gate", &self.w_gate, 2)?;
        let (t, h, i) = (self.x.dims()[0], self.x.dims()[1], self.w_gate.dims()[0]);
        if self.w_gate.dims()[1] != h {
            return Err(format!("x has {h} features but w_gate {} expects {}", self.w_gate.shape, self.w_gate.dims()[1]));
        }
        c.dims("w_up", &self.w_up, self.w_gate.dims())?;
        c.dims("out", &self.out, &[t, i])?;
        c.norm_weight(&self.norm, &self.x)
    }
}

/// The most experts a mixture may have, and the most each token may take, in a `Moe` op.
pub const MOE_MAX_EXPERTS: usize = 512;
pub const MOE_MAX_TOP_K: usize = 16;

/// Each expert's tokens (rows of the batch, ascending) and their router weights: each token's
/// `top_k` experts of highest probability (softmax of its row of `logits`, [T, E], in f32 as HF
/// computes it; ties to the lower expert), their weights renormalized to sum to 1 where asked.
pub fn route(logits: &[f32], experts: usize, top_k: usize, renormalize: bool) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut routes = vec![(Vec::new(), Vec::new()); experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (t, row) in logits.chunks_exact(experts.max(1)).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let chosen = &order[..top_k.min(experts)];
        let total: f32 = chosen.iter().map(|&e| exp[e] / sum).sum();
        for &e in chosen {
            let p = exp[e] / sum;
            routes[e].0.push(t as u32);
            routes[e].1.push(if renormalize { p / total } else { p });
        }
    }
    routes
}

/// A mixture of experts' routed MLPs in one op, the router's choice included, so that a backend
/// can run it without reading the router's scores to the host (a CUDA decode step then stays one
/// graph). Each token takes its `top_k` experts by [`route`]'s rule (the softmax of its row of
/// `logits` in f32, ties to the lower expert, renormalized where `renormalize` is 1), each weight
/// rounded to x's dtype (as HF casts them); each chosen expert's gated MLP
/// `y = down_e(act(x gate_e^T) * (x up_e^T))` (each product rounded to the dtype, as `Linear`,
/// `SwiGlu` and `Linear` round them); and `out[t]` the sum of `w * y` over its experts in ascending
/// order, each add rounded to the dtype, from zero (`IndexAdd` one expert after the other, as HF
/// sums them); then, where given, a shared expert's output (Qwen 1.5 and 2 MoE: every token's,
/// computed by the caller) weighted by the sigmoid of its gate's score, rounded to the dtype, and
/// added the same way. x, out, shared [T, H]; logits [T, E]; shared_gate [T, 1]; gate, up
/// [E, I, H]; down [E, H, I]; one float dtype. Backends that do not run it decline it
/// (`Backend::supports`); the model then routes on the host.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Moe<'a> {
    pub out: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub logits: TensorRef<'a>,
    pub gate: TensorRef<'a>,
    pub up: TensorRef<'a>,
    pub down: TensorRef<'a>,
    /// Optional (`TensorRef::none()`), both or neither.
    pub shared: TensorRef<'a>,
    pub shared_gate: TensorRef<'a>,
    pub top_k: u32,
    /// 1 to renormalize the chosen experts' weights to sum to 1, 0 not to.
    pub renormalize: u32,
    pub act: GluAct,
}

impl Moe<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        let all = [("out", &self.out), ("x", &self.x), ("logits", &self.logits), ("gate", &self.gate), ("up", &self.up), ("down", &self.down)];
        c.activations(&all)?;
        c.rank("x", &self.x, 2)?;
        c.rank("gate", &self.gate, 3)?;
        let (t, h) = (self.x.dims()[0], self.x.dims()[1]);
        let (e, i) = (self.gate.dims()[0], self.gate.dims()[1]);
        if self.gate.dims()[2] != h {
            return Err(format!("x has {h} features but gate {} expects {}", self.gate.shape, self.gate.dims()[2]));
        }
        c.dims("up", &self.up, self.gate.dims())?;
        c.dims("down", &self.down, &[e, h, i])?;
        c.dims("logits", &self.logits, &[t, e])?;
        c.dims("out", &self.out, &[t, h])?;
        match (self.shared.opt(), self.shared_gate.opt()) {
            (None, None) => {}
            (Some(s), Some(g)) => {
                c.activations(&[("x", &self.x), ("shared", &s), ("shared_gate", &g)])?;
                c.dims("shared", &s, &[t, h])?;
                c.dims("shared_gate", &g, &[t, 1])?;
            }
            _ => return Err("a shared expert's output and its gate's scores go together".into()),
        }
        if e > MOE_MAX_EXPERTS {
            return Err(format!("{e} experts (at most {MOE_MAX_EXPERTS})"));
        }
        let k = self.top_k as usize;
        if k == 0 || k > e.min(MOE_MAX_TOP_K) {
            return Err(format!("top_k {k}: each token takes 1 to {} of the {e} experts", e.min(MOE_MAX_TOP_K)));
        }
        if self.renormalize > 1 {
            return Err(format!("renormalize is {} (0 or 1)", self.renormalize));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token to its `top_k` likeliest experts with its softmax probabilities, renormalized over
    /// them or not; ties to the lower expert; an expert no token chose has no rows.
    #[test]
    fn tokens_go_to_their_likeliest_experts() {
        let ln = |p: &[f32]| p.iter().map(|p| p.ln()).collect::<Vec<f32>>();
        // Token 0: probabilities .5 .3 .2 0 -> experts 0 and 1; token 1: .1 .1 .4 .4 -> 2 and 3.
        let logits = [ln(&[0.5, 0.3, 0.2, 1e-9]), ln(&[0.1, 0.1, 0.4, 0.4])].concat();
        let r = route(&logits, 4, 2, false);
        let rows: Vec<Vec<u32>> = r.iter().map(|e| e.0.clone()).collect();
        assert_eq!(rows, [vec![0], vec![0], vec![1], vec![1]]);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(r[0].1[0], 0.5) && close(r[1].1[0], 0.3) && close(r[2].1[0], 0.4), "{r:?}");
        let r = route(&logits, 4, 2, true);
        assert!(close(r[0].1[0], 0.625) && close(r[1].1[0], 0.375) && close(r[3].1[0], 0.5), "{r:?}");
        // A tie for the second place: the lower expert (1, not 2).
        let r = route(&ln(&[0.4, 0.3, 0.3, 1e-9]), 4, 2, false);
        assert_eq!((r[1].0.len(), r[2].0.len()), (1, 0));
        // Every expert: the weights are the whole softmax.
        let r = route(&logits, 4, 4, false);
        let total: f32 = r.iter().map(|e| e.1[0]).sum();
        assert!(close(total, 1.0));
    }
}

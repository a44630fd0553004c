//! MLP ops. The projections are `Linear`; what is particular to the MLP is the gate, alone
//! (`SwiGlu`: SwiGLU, or GeGLU for Gemma) or with the two projections that feed it (`SwiGluLinear`,
//! SwiGLU only, one pass over x for a backend that fuses them).

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

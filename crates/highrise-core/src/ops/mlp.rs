//! MLP ops. The projections are `Linear`; what is particular to the MLP is the gate.

use super::{Check, CheckResult};
use crate::TensorRef;

/// `out = silu(gate) * up`, elementwise, with `silu(x) = x / (1 + e^-x)`. out, gate, up [T, I].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SwiGlu<'a> {
    pub out: TensorRef<'a>,
    pub gate: TensorRef<'a>,
    pub up: TensorRef<'a>,
}

impl SwiGlu<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("gate", &self.gate), ("up", &self.up)])?;
        c.rank("gate", &self.gate, 2)?;
        c.dims("up", &self.up, self.gate.dims())?;
        c.dims("out", &self.out, self.gate.dims())
    }
}

//! Residual-stream ops: where a token's vector enters the stream, and the norms that read it.

use super::{Check, CheckResult};
use crate::{HostSlice, TensorRef};

/// `out[t] = table[ids[t]] * scale`: the residual stream's entrance (Gemma scales its embeddings by
/// sqrt(hidden); everyone else by 1, and a scale of 1 is an exact gather of rows).
/// out [T, H] (float); table [V, H] (float or quantized); ids [T], each < V.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Embedding<'a> {
    pub out: TensorRef<'a>,
    pub table: TensorRef<'a>,
    pub ids: HostSlice<'a, u32>,
    pub scale: f32,
}

impl Embedding<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out)])?;
        c.present("table", &self.table)?;
        c.rank("table", &self.table, 2)?;
        if self.table.dtype.interleaved_rows() > 1 {
            return Err(format!("table in {} has no contiguous rows to gather; use {}", self.table.dtype, self.table.dtype.plain()));
        }
        let (vocab, hidden) = (self.table.dims()[0], self.table.dims()[1]);
        c.dims("out", &self.out, &[self.ids.len(), hidden])?;
        if let Some((t, &id)) = self.ids.as_slice().iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(format!("token id {id} at position {t} is outside the vocabulary of {vocab}"));
        }
        if !self.scale.is_finite() {
            return Err(format!("scale must be finite, is {}", self.scale));
        }
        Ok(())
    }
}

/// `out = x / rms(x) * weight`, row by row, with `rms(x) = sqrt(mean(x^2) + eps)`.
/// out, x [T, H]; weight [H] (any float dtype).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RmsNorm<'a> {
    pub out: TensorRef<'a>,
    pub x: TensorRef<'a>,
    pub weight: TensorRef<'a>,
    pub eps: f32,
}

impl RmsNorm<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("x", &self.x)])?;
        c.rank("x", &self.x, 2)?;
        c.dims("out", &self.out, self.x.dims())?;
        norm_weight(c, &self.weight, self.x.dims()[1], self.eps)
    }
}

/// The fused step between blocks: `residual += delta`, then `out = rms_norm(residual) * weight`.
/// One pass over the stream instead of two. residual, delta, out [T, H]; weight [H].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AddRmsNorm<'a> {
    pub out: TensorRef<'a>,
    /// Read and written.
    pub residual: TensorRef<'a>,
    pub delta: TensorRef<'a>,
    pub weight: TensorRef<'a>,
    pub eps: f32,
}

impl AddRmsNorm<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("residual", &self.residual), ("delta", &self.delta)])?;
        c.rank("residual", &self.residual, 2)?;
        c.dims("delta", &self.delta, self.residual.dims())?;
        c.dims("out", &self.out, self.residual.dims())?;
        norm_weight(c, &self.weight, self.residual.dims()[1], self.eps)
    }
}

/// `out[index[j]] += weight[j] * src[j]` for each row j of src: PyTorch's `index_add_` with a weight
/// per row, a mixture of experts' combine (each expert's outputs, weighted by the router, added to
/// the rows of the tokens routed to it). Each product in f32, added to the row as out's dtype holds
/// it, rounded once. out [T, H], src [N, H], same float dtype; index, weight [N]; the indices lie
/// below T and are distinct (no row is added to twice in one op, so backends may add rows at once).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IndexAdd<'a> {
    /// Read and written.
    pub out: TensorRef<'a>,
    pub src: TensorRef<'a>,
    pub index: HostSlice<'a, u32>,
    pub weight: HostSlice<'a, f32>,
}

impl IndexAdd<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("src", &self.src)])?;
        c.rank("out", &self.out, 2)?;
        let (t, h, n) = (self.out.dims()[0], self.out.dims()[1], self.index.len());
        c.dims("src", &self.src, &[n, h])?;
        if self.weight.len() != n {
            return Err(format!("{} weights for {n} indices", self.weight.len()));
        }
        let mut seen = vec![false; t];
        for (j, &i) in self.index.as_slice().iter().enumerate() {
            match seen.get_mut(i as usize) {
                None => return Err(format!("index {i} (row {j} of src) is outside out's {t} rows")),
                Some(true) => return Err(format!("index {i} appears twice (again at row {j} of src)")),
                Some(s) => *s = true,
            }
        }
        if let Some((j, w)) = self.weight.as_slice().iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(format!("weight {w} (row {j} of src) is not finite"));
        }
        Ok(())
    }
}

/// PyTorch's LayerNorm, row by row: `out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias` (the
/// biased variance, mean((x - mean)^2), in f32), after `x += delta` where a delta is given (x is
/// then read and written, the sum rounded to its dtype and normed as stored: the stream's add and the
/// next norm in one pass, as `AddRmsNorm`). GPT-2, GPT-NeoX (Pythia), StarCoder 2, Phi-2.
/// out, x, delta [T, H]; weight, bias [H] (float, one dtype).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LayerNorm<'a> {
    pub out: TensorRef<'a>,
    /// Written too where `delta` is given.
    pub x: TensorRef<'a>,
    /// Optional (`TensorRef::none()`).
    pub delta: TensorRef<'a>,
    pub weight: TensorRef<'a>,
    pub bias: TensorRef<'a>,
    pub eps: f32,
}

impl LayerNorm<'_> {
    pub(crate) fn validate(&self, c: &Check) -> CheckResult {
        c.activations(&[("out", &self.out), ("x", &self.x)])?;
        c.rank("x", &self.x, 2)?;
        c.dims("out", &self.out, self.x.dims())?;
        if let Some(d) = self.delta.opt() {
            c.activations(&[("x", &self.x), ("delta", &d)])?;
            c.dims("delta", &d, self.x.dims())?;
        }
        let h = self.x.dims()[1];
        norm_weight(c, &self.weight, h, self.eps)?;
        c.present("bias", &self.bias)?;
        c.dims("bias", &self.bias, &[h])?;
        c.same_dtype("bias", &self.bias, "weight", &self.weight)
    }
}

fn norm_weight(c: &Check, weight: &TensorRef, hidden: usize, eps: f32) -> CheckResult {
    c.present("weight", weight)?;
    c.float("weight", weight)?;
    c.dims("weight", weight, &[hidden])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(format!("eps must be finite and non-negative, is {eps}"));
    }
    Ok(())
}

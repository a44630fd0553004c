//! The ops a backend runs, one file per family, named after the transformer's two highways:
//! - [`residual`]: the residual stream (embedding gather, RMSNorm, fused residual-add + RMSNorm,
//!   LayerNorm with or without the add, and a mixture of experts' weighted combine, `IndexAdd`);
//! - [`attention`]: projections, RoPE, writing and reading the key/value stream (prefill and paged);
//! - [`mlp`]: the SwiGLU gate, alone or fused with the projections feeding it, and a mixture of
//!   experts' routed MLPs with the router's choice (`Moe`);
//! - [`sampling`]: the logits' soft-cap (`Softcap`) and choosing tokens from them on the backend
//!   (greedy `Argmax`, `Sample`).
//!
//! (The logits are a [`Linear`] against the unembedding, which is the embedding table itself when a
//! model ties them.)
//!
//! Every op is one `#[repr(C)]` struct of tensor references and host slices. [`Op`] gathers them in a
//! `#[repr(C, u32)]` enum, which is exactly what crosses the plugin ABI, so an op is defined once for the
//! host, the trait and the plugins. `Op::validate` checks shapes and dtypes; every backend calls it before
//! touching memory, so the error always names the op and the shapes, whichever backend runs.

pub mod attention;
pub mod mlp;
pub mod residual;
pub mod sampling;

pub use attention::{
    cache_dims, Attention, KvWrite, Linear, PagedAttention, PagedSeq, QkvLinear, Rope, RopeConfig, RopeKvWrite,
    RopeScaling, Scores, MAX_ROPE_PAIRS,
};
pub use mlp::{route, GluAct, Moe, SwiGlu, SwiGluLinear, MOE_MAX_EXPERTS, MOE_MAX_TOP_K};
pub use residual::{AddRmsNorm, Embedding, IndexAdd, LayerNorm, RmsNorm};
pub use sampling::{Argmax, FieldError, Sample, SampleParams, Softcap};

use crate::{DType, Error, Result, TensorRef};

/// Which op, without its arguments: what `Backend::supports` is asked about.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Embedding = 0,
    RmsNorm = 1,
    AddRmsNorm = 2,
    Linear = 3,
    Rope = 4,
    Attention = 5,
    KvWrite = 6,
    PagedAttention = 7,
    SwiGlu = 8,
    Argmax = 9,
    Sample = 10,
    SwiGluLinear = 11,
    RopeKvWrite = 12,
    QkvLinear = 13,
    Softcap = 14,
    IndexAdd = 15,
    LayerNorm = 16,
    Moe = 17,
}

impl OpKind {
    pub const ALL: [OpKind; 18] = [
        OpKind::Embedding,
        OpKind::RmsNorm,
        OpKind::AddRmsNorm,
        OpKind::Linear,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::KvWrite,
        OpKind::PagedAttention,
        OpKind::SwiGlu,
        OpKind::Argmax,
        OpKind::Sample,
        OpKind::SwiGluLinear,
        OpKind::RopeKvWrite,
        OpKind::QkvLinear,
        OpKind::Softcap,
        OpKind::IndexAdd,
        OpKind::LayerNorm,
        OpKind::Moe,
    ];

    pub fn from_u32(v: u32) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| *k as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::RmsNorm => "rms_norm",
            OpKind::AddRmsNorm => "add_rms_norm",
            OpKind::Linear => "linear",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::KvWrite => "kv_write",
            OpKind::PagedAttention => "paged_attention",
            OpKind::SwiGlu => "swiglu",
            OpKind::Argmax => "argmax",
            OpKind::Sample => "sample",
            OpKind::SwiGluLinear => "swiglu_linear",
            OpKind::RopeKvWrite => "rope_kv_write",
            OpKind::QkvLinear => "qkv_linear",
            OpKind::Softcap => "softcap",
            OpKind::IndexAdd => "index_add",
            OpKind::LayerNorm => "layer_norm",
            OpKind::Moe => "moe",
        }
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One op call with its arguments. Part of the plugin ABI: changing it means bumping `ABI_VERSION`.
/// (Passed by reference, a few hundred bytes on the caller's stack: its variants stay inline, as
/// the ABI lays them out.)
#[allow(clippy::large_enum_variant)]
#[repr(C, u32)]
#[derive(Clone, Copy)]
pub enum Op<'a> {
    Embedding(Embedding<'a>),
    RmsNorm(RmsNorm<'a>),
    AddRmsNorm(AddRmsNorm<'a>),
    Linear(Linear<'a>),
    Rope(Rope<'a>),
    Attention(Attention<'a>),
    KvWrite(KvWrite<'a>),
    PagedAttention(PagedAttention<'a>),
    SwiGlu(SwiGlu<'a>),
    Argmax(Argmax<'a>),
    Sample(Sample<'a>),
    SwiGluLinear(SwiGluLinear<'a>),
    RopeKvWrite(RopeKvWrite<'a>),
    QkvLinear(QkvLinear<'a>),
    Softcap(Softcap<'a>),
    IndexAdd(IndexAdd<'a>),
    LayerNorm(LayerNorm<'a>),
    Moe(Moe<'a>),
}

impl Op<'_> {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Embedding(_) => OpKind::Embedding,
            Op::RmsNorm(_) => OpKind::RmsNorm,
            Op::AddRmsNorm(_) => OpKind::AddRmsNorm,
            Op::Linear(_) => OpKind::Linear,
            Op::Rope(_) => OpKind::Rope,
            Op::Attention(_) => OpKind::Attention,
            Op::KvWrite(_) => OpKind::KvWrite,
            Op::PagedAttention(_) => OpKind::PagedAttention,
            Op::SwiGlu(_) => OpKind::SwiGlu,
            Op::Argmax(_) => OpKind::Argmax,
            Op::Sample(_) => OpKind::Sample,
            Op::SwiGluLinear(_) => OpKind::SwiGluLinear,
            Op::RopeKvWrite(_) => OpKind::RopeKvWrite,
            Op::QkvLinear(_) => OpKind::QkvLinear,
            Op::Softcap(_) => OpKind::Softcap,
            Op::IndexAdd(_) => OpKind::IndexAdd,
            Op::LayerNorm(_) => OpKind::LayerNorm,
            Op::Moe(_) => OpKind::Moe,
        }
    }

    /// The dtype `supports` is asked about: the weight's for ops that read a weight table (embedding,
    /// linear), which may be quantized; the activations' otherwise.
    pub fn dtype(&self) -> DType {
        match self {
            Op::Embedding(o) => o.table.dtype,
            Op::RmsNorm(o) => o.out.dtype,
            Op::AddRmsNorm(o) => o.out.dtype,
            Op::Linear(o) => o.weight.dtype,
            Op::Rope(o) => o.x.dtype,
            Op::Attention(o) => o.out.dtype,
            Op::KvWrite(o) => o.k_cache.dtype,
            Op::PagedAttention(o) => o.out.dtype,
            Op::SwiGlu(o) => o.out.dtype,
            Op::Argmax(o) => o.x.dtype,
            Op::Sample(o) => o.x.dtype,
            Op::SwiGluLinear(o) => o.w_gate.dtype,
            Op::RopeKvWrite(o) => o.k_cache.dtype,
            Op::QkvLinear(o) => o.wq.dtype,
            Op::Softcap(o) => o.x.dtype,
            Op::IndexAdd(o) => o.out.dtype,
            Op::LayerNorm(o) => o.out.dtype,
            Op::Moe(o) => o.out.dtype,
        }
    }

    /// Every tensor the op touches, named, outputs first.
    pub fn tensors(&self) -> Vec<(&'static str, TensorRef<'_>)> {
        let mut v = match self {
            Op::Embedding(o) => vec![("out", o.out), ("table", o.table)],
            Op::RmsNorm(o) => vec![("out", o.out), ("x", o.x), ("weight", o.weight)],
            Op::AddRmsNorm(o) => vec![
                ("out", o.out),
                ("residual", o.residual),
                ("delta", o.delta),
                ("weight", o.weight),
            ],
            Op::Linear(o) => vec![("out", o.out), ("x", o.x), ("weight", o.weight), ("bias", o.bias)],
            Op::Rope(o) => vec![("x", o.x)],
            Op::Attention(o) => vec![("out", o.out), ("q", o.q), ("k", o.k), ("v", o.v)],
            Op::KvWrite(o) => {
                vec![("k_cache", o.k_cache), ("v_cache", o.v_cache), ("k", o.k), ("v", o.v)]
            }
            Op::PagedAttention(o) => {
                vec![("out", o.out), ("q", o.q), ("k_cache", o.k_cache), ("v_cache", o.v_cache)]
            }
            Op::SwiGlu(o) => vec![("out", o.out), ("gate", o.gate), ("up", o.up)],
            Op::Argmax(o) => vec![("index", o.index), ("logprob", o.logprob), ("x", o.x)],
            Op::Sample(o) => vec![("index", o.index), ("logprob", o.logprob), ("x", o.x)],
            Op::SwiGluLinear(o) => vec![("out", o.out), ("x", o.x), ("w_gate", o.w_gate), ("w_up", o.w_up), ("norm", o.norm)],
            Op::RopeKvWrite(o) => {
                vec![("q", o.q), ("k", o.k), ("k_cache", o.k_cache), ("v_cache", o.v_cache), ("v", o.v)]
            }
            Op::QkvLinear(o) => vec![
                ("q", o.q),
                ("k", o.k),
                ("v", o.v),
                ("x", o.x),
                ("wq", o.wq),
                ("wk", o.wk),
                ("wv", o.wv),
                ("bq", o.bq),
                ("bk", o.bk),
                ("bv", o.bv),
                ("norm", o.norm),
            ],
            Op::Softcap(o) => vec![("x", o.x)],
            Op::IndexAdd(o) => vec![("out", o.out), ("src", o.src)],
            Op::LayerNorm(o) => vec![("out", o.out), ("x", o.x), ("delta", o.delta), ("weight", o.weight), ("bias", o.bias)],
            Op::Moe(o) => vec![
                ("out", o.out),
                ("x", o.x),
                ("logits", o.logits),
                ("gate", o.gate),
                ("up", o.up),
                ("down", o.down),
                ("shared", o.shared),
                ("shared_gate", o.shared_gate),
            ],
        };
        v.retain(|(_, t)| !t.is_none());
        v
    }

    /// The tensors the op writes. A backend refuses a call where one of them is also read as input.
    pub fn outputs(&self) -> usize {
        match self {
            Op::AddRmsNorm(_) | Op::LayerNorm(_) | Op::KvWrite(_) | Op::Argmax(_) | Op::Sample(_) => 2,
            Op::RopeKvWrite(_) => 4,
            Op::QkvLinear(_) => 3,
            _ => 1,
        }
    }

    /// Checks shapes and dtypes; on failure the error names the op and lists every tensor's shape.
    pub fn validate(&self) -> Result<()> {
        let check = Check;
        let r = match self {
            Op::Embedding(o) => o.validate(&check),
            Op::RmsNorm(o) => o.validate(&check),
            Op::AddRmsNorm(o) => o.validate(&check),
            Op::Linear(o) => o.validate(&check),
            Op::Rope(o) => o.validate(&check),
            Op::Attention(o) => o.validate(&check),
            Op::KvWrite(o) => o.validate(&check),
            Op::PagedAttention(o) => o.validate(&check),
            Op::SwiGlu(o) => o.validate(&check),
            Op::Argmax(o) => o.validate(&check),
            Op::Sample(o) => o.validate(&check),
            Op::SwiGluLinear(o) => o.validate(&check),
            Op::RopeKvWrite(o) => o.validate(&check),
            Op::QkvLinear(o) => o.validate(&check),
            Op::Softcap(o) => o.validate(&check),
            Op::IndexAdd(o) => o.validate(&check),
            Op::LayerNorm(o) => o.validate(&check),
            Op::Moe(o) => o.validate(&check),
        };
        let r = r.and_then(|()| self.check_aliasing());
        r.map_err(|detail| {
            let shapes: Vec<String> =
                self.tensors().iter().map(|(n, t)| format!("{n} {}{}", t.dtype, t.shape)).collect();
            Error::Invalid(format!("{}: {detail} ({})", self.kind(), shapes.join(", ")))
        })
    }
}

impl Op<'_> {
    /// An output must not share memory with any other tensor of the call: kernels read inputs while
    /// they write outputs. (Read-and-written tensors such as `AddRmsNorm::residual` are one tensor.)
    fn check_aliasing(&self) -> CheckResult {
        let ts = self.tensors();
        for (i, (name, t)) in ts.iter().enumerate().take(self.outputs()) {
            if let Some((other, _)) = ts.iter().enumerate().find(|&(j, o)| j != i && o.1.handle == t.handle) {
                return Err(format!("output {name} is the same memory as {}", ts[other].0));
            }
        }
        Ok(())
    }
}

/// Shape and dtype checks shared by the ops. They return the detail; `Op::validate` adds the op name
/// and the shapes of every tensor.
pub(crate) struct Check;

pub(crate) type CheckResult = std::result::Result<(), String>;

impl Check {
    pub fn rank(&self, name: &str, t: &TensorRef, rank: usize) -> CheckResult {
        if t.shape.rank() != rank {
            return Err(format!("{name} must have {rank} dimensions, has shape {}", t.shape));
        }
        Ok(())
    }

    pub fn dims(&self, name: &str, t: &TensorRef, want: &[usize]) -> CheckResult {
        if t.dims() != want {
            return Err(format!("{name} has shape {}, expected {want:?}", t.shape));
        }
        Ok(())
    }

    pub fn float(&self, name: &str, t: &TensorRef) -> CheckResult {
        if !t.dtype.is_float() {
            return Err(format!("{name} must be f32, f16 or bf16, is {}", t.dtype));
        }
        Ok(())
    }

    pub fn same_dtype(&self, name: &str, t: &TensorRef, other: &str, o: &TensorRef) -> CheckResult {
        if t.dtype != o.dtype {
            return Err(format!("{name} is {} but {other} is {}", t.dtype, o.dtype));
        }
        Ok(())
    }

    pub fn present(&self, name: &str, t: &TensorRef) -> CheckResult {
        if t.is_none() {
            return Err(format!("{name} is missing"));
        }
        Ok(())
    }

    /// A fused projection's optional RMSNorm weight: absent, or a float vector of x's width.
    pub fn norm_weight(&self, norm: &TensorRef, x: &TensorRef) -> CheckResult {
        let Some(n) = norm.opt() else { return Ok(()) };
        self.float("norm", &n)?;
        self.dims("norm", &n, &[x.dims()[1]])
    }

    /// All named tensors present, floats, and of one dtype.
    pub fn activations(&self, ts: &[(&str, &TensorRef)]) -> CheckResult {
        for (n, t) in ts {
            self.present(n, t)?;
            self.float(n, t)?;
        }
        for w in ts.windows(2) {
            self.same_dtype(w[1].0, w[1].1, w[0].0, w[0].1)?;
        }
        Ok(())
    }
}

//! The backend trait: memory, a capability query, and `run` for every op. Object-safe, so the engine
//! holds an `Arc<dyn Backend>` chosen at run time; a plugin loaded from a shared library is one too.

use crate::ops::*;
use crate::{DType, Error, Handle, HostSlice, Result, Tensor, TensorRef};

/// Information about a backend, for `highrise backends` and for benchmark reports.
#[derive(Clone, Debug, Default)]
pub struct BackendInfo {
    /// Short name: "cpu", "cuda".
    pub name: String,
    /// The hardware it runs on, in words ("2 threads, AVX2+FMA", "NVIDIA H200").
    pub device: String,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &str;

    fn info(&self) -> BackendInfo;

    /// Whether this backend runs `op` with `dtype` (see `Op::dtype` for which dtype that is). `run` on
    /// an op it declines returns `Error::Unsupported`.
    fn supports(&self, op: OpKind, dtype: DType) -> bool;

    /// Allocates `bytes` of backend memory, contents undefined.
    fn alloc(&self, bytes: usize) -> Result<Handle>;

    /// Frees memory from `alloc`.
    ///
    /// # Safety
    /// `handle` came from this backend's `alloc` and is not used again.
    unsafe fn free(&self, handle: Handle);

    /// Copies `bytes` from the host into the allocation, starting `offset` bytes in.
    fn write(&self, handle: Handle, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Copies from the allocation, starting `offset` bytes in, to the host.
    fn read(&self, handle: Handle, offset: usize, out: &mut [u8]) -> Result<()>;

    /// Runs one op. The backend validates it (`Op::validate`) and checks that every handle is its own
    /// and large enough before it touches memory.
    fn run(&self, op: &Op<'_>) -> Result<()>;

    /// Wraps `bytes` of host memory (e.g. a memory-mapped weight file) as a read-only tensor without
    /// copying, if this backend can compute on host memory in place. `Ok(None)` means it cannot and
    /// the caller should `alloc` and `write` instead.
    ///
    /// # Safety
    /// The memory stays valid and unchanged until the handle is freed.
    unsafe fn import(&self, ptr: *const u8, bytes: usize) -> Result<Option<Handle>> {
        let _ = (ptr, bytes);
        Ok(None)
    }

    /// Copies `bytes` from one allocation to another (or within one, the ranges apart), in the
    /// backend's memory, queued after the ops before it. The default goes through the host.
    fn copy(&self, dst: Handle, dst_offset: usize, src: Handle, src_offset: usize, bytes: usize) -> Result<()> {
        let mut tmp = vec![0u8; bytes];
        self.read(src, src_offset, &mut tmp)?;
        self.write(dst, dst_offset, &tmp)
    }

    /// Waits until all queued work is done (a no-op where ops run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Marks the start of a step (a decode step, say) whose ops the backend may record and run as
    /// one unit at `graph_end`, replaying what it recorded for an earlier step under the same `key`
    /// when this step's work is the same (a CUDA graph). `key` names the step's shape for the
    /// caller (batch size, sampling mode); the backend decides by comparing the work itself, so a
    /// wrong key costs time, never correctness. Until `graph_end`, outputs may not be computed yet:
    /// a `read`, `write`, `copy` or `synchronize` in between runs what was recorded first. The
    /// default (backends that run each op at once) does nothing.
    fn graph_begin(&self, key: u64) -> Result<()> {
        let _ = key;
        Ok(())
    }

    /// Ends the step begun by `graph_begin`: its work is queued (replayed as a graph where the
    /// backend can), in the order the ops were run.
    fn graph_end(&self) -> Result<()> {
        Ok(())
    }

    /// How the backend ran the steps marked by `graph_begin`, for benchmarks and tests: (graphs
    /// captured, graph replays, steps run op by op).
    fn graph_stats(&self) -> GraphStats {
        GraphStats::default()
    }

    /// How many one-token sequences a graph step of `sequences` of them is best run as: the batch
    /// size of the graph the backend keeps for that many (its bucket, at least `sequences`), the
    /// caller padding the step with rows whose results it drops. A backend that captures a graph
    /// per distinct step (CUDA) then keeps one for a whole range of batch sizes, where a server's
    /// batch, growing and shrinking by a request at a time, would otherwise capture a new one at
    /// nearly every step. The default, for backends that run each op at once: `sequences` (padding
    /// would only add work).
    fn graph_batch(&self, sequences: usize) -> usize {
        sequences
    }

    /// Whether a pass of `rows` tokens of `hidden` features in `dtype` runs faster with each layer's
    /// norms read inside the projections after them (`QkvLinear::norm`, `SwiGluLinear::norm`) and
    /// the projections before them adding into the stream (`Linear::accumulate`) than with
    /// `AddRmsNorm` between them: where the backend's kernels fold those in (CUDA's matrix-vector
    /// kernels, at decode), saving a launch and a pass over the stream each. The same op meanings
    /// either way (the norm's sum of squares in the kernel's order). The default: no.
    fn folds_norms(&self, rows: usize, hidden: usize, dtype: DType) -> bool {
        let _ = (rows, hidden, dtype);
        false
    }
}

/// Counts of how a backend ran the steps marked by `Backend::graph_begin`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs recorded (the first step of a shape, or one whose work differed from the graph kept).
    pub captured: u64,
    /// Steps run by launching a graph (captured ones included).
    pub launched: u64,
    /// Steps run op by op (a read in the middle, no graph support, or a capture that failed).
    pub eager: u64,
}

/// The op calls as the model writes them: owned tensors in, outputs borrowed mutably (so an output can
/// never alias an input of the same call), output first.
impl dyn Backend + '_ {
    /// Runs `op` after asking `supports`, so that a declined op reports the op, dtype and backend.
    pub fn exec(&self, op: Op<'_>) -> Result<()> {
        let (kind, dtype) = (op.kind(), op.dtype());
        if !self.supports(kind, dtype) {
            let declines = [DType::F32, DType::F16, DType::BF16].iter().all(|&d| !self.supports(kind, d));
            return Err(Error::Unsupported(match declines {
                true => format!("{kind}: the {} backend does not run this op", self.name()),
                false => format!("{kind}: the {} backend does not support {dtype}", self.name()),
            }));
        }
        if !crate::profile::enabled() {
            return self.run(&op);
        }
        let start = std::time::Instant::now();
        self.run(&op)?;
        self.synchronize()?;
        crate::profile::record(&op, start.elapsed());
        Ok(())
    }

    /// `out[t] = table[ids[t]]`.
    pub fn embedding(&self, out: &mut Tensor, table: &Tensor, ids: &[u32]) -> Result<()> {
        self.embedding_scaled(out, table, ids, 1.0)
    }

    /// `out[t] = table[ids[t]] * scale`.
    pub fn embedding_scaled(&self, out: &mut Tensor, table: &Tensor, ids: &[u32], scale: f32) -> Result<()> {
        self.exec(Op::Embedding(Embedding {
            out: out.as_mut(),
            table: table.as_ref(),
            ids: HostSlice::new(ids),
            scale,
        }))
    }

    /// `out = rms_norm(x) * weight`.
    pub fn rms_norm(&self, out: &mut Tensor, x: &Tensor, weight: &Tensor, eps: f32) -> Result<()> {
        self.exec(Op::RmsNorm(RmsNorm { out: out.as_mut(), x: x.as_ref(), weight: weight.as_ref(), eps }))
    }

    /// `residual += delta; out = rms_norm(residual) * weight`.
    pub fn add_rms_norm(
        &self,
        out: &mut Tensor,
        residual: &mut Tensor,
        delta: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<()> {
        self.exec(Op::AddRmsNorm(AddRmsNorm {
            out: out.as_mut(),
            residual: residual.as_mut(),
            delta: delta.as_ref(),
            weight: weight.as_ref(),
            eps,
        }))
    }

    /// `out = layer_norm(x) * weight + bias` (PyTorch's LayerNorm; see [`LayerNorm`]).
    pub fn layer_norm(&self, out: &mut Tensor, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<()> {
        self.exec(Op::LayerNorm(LayerNorm { out: out.as_mut(), x: x.as_ref(), delta: TensorRef::none(), weight: weight.as_ref(), bias: bias.as_ref(), eps }))
    }

    /// `x += delta; out = layer_norm(x) * weight + bias`, in one pass.
    pub fn add_layer_norm(&self, out: &mut Tensor, x: &mut Tensor, delta: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<()> {
        self.exec(Op::LayerNorm(LayerNorm { out: out.as_mut(), x: x.as_mut(), delta: delta.as_ref(), weight: weight.as_ref(), bias: bias.as_ref(), eps }))
    }

    /// `out = x @ weight^T (+ bias)`.
    pub fn linear(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<()> {
        self.linear_with(out, x, weight, bias, false)
    }

    /// `linear`, letting the backend quantize x to 8 bits against a quantized weight (see
    /// `Linear::q8_activations`).
    pub fn linear_with(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        q8_activations: bool,
    ) -> Result<()> {
        self.project(out, x, weight, bias, q8_activations, false)
    }

    /// `out += x @ weight^T (+ bias)`, the product rounded before the add (see `Linear::accumulate`):
    /// a projection added straight into the residual stream.
    pub fn linear_add(&self, out: &mut Tensor, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        self.project(out, x, weight, bias, false, true)
    }

    fn project(&self, out: &mut Tensor, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, q8_activations: bool, accumulate: bool) -> Result<()> {
        self.exec(Op::Linear(Linear {
            out: out.as_mut(),
            x: x.as_ref(),
            weight: weight.as_ref(),
            bias: bias.map_or(TensorRef::none(), Tensor::as_ref),
            q8_activations,
            accumulate,
        }))
    }

    /// RoPE in place on x [T, heads, D].
    pub fn rope(&self, x: &mut Tensor, positions: &[u32], config: RopeConfig) -> Result<()> {
        self.exec(Op::Rope(Rope { x: x.as_mut(), positions: HostSlice::new(positions), config }))
    }

    /// Causal grouped-query attention over whole prompts laid end to end.
    pub fn attention(&self, out: &mut Tensor, q: &Tensor, k: &Tensor, v: &Tensor, seq_lens: &[u32], scale: f32) -> Result<()> {
        self.attention_with(out, q, k, v, seq_lens, Scores::scaled(scale), true)
    }

    /// `attention` with scores as `scores` asks (soft-capping, a sliding window), causal or not
    /// (`causal: false`: every query sees its whole prompt).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with(
        &self,
        out: &mut Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seq_lens: &[u32],
        scores: Scores,
        causal: bool,
    ) -> Result<()> {
        self.exec(Op::Attention(Attention {
            out: out.as_mut(),
            q: q.as_ref(),
            k: k.as_ref(),
            v: v.as_ref(),
            seq_lens: HostSlice::new(seq_lens),
            scores,
            causal,
        }))
    }

    /// Writes K and V of new tokens into the paged cache at `slots`.
    pub fn kv_write(
        &self,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()> {
        self.exec(Op::KvWrite(KvWrite {
            k_cache: k_cache.as_mut(),
            v_cache: v_cache.as_mut(),
            k: k.as_ref(),
            v: v.as_ref(),
            slots: HostSlice::new(slots),
        }))
    }

    /// The attention's q, k and v projections of `x` in one op where the backend fuses them (see
    /// [`QkvLinear`]; ask `supports` first). `w` and `b`: the weights and optional biases, q, k, v.
    pub fn qkv_linear(&self, qkv: [&mut Tensor; 3], x: &Tensor, w: [&Tensor; 3], b: [Option<&Tensor>; 3]) -> Result<()> {
        self.qkv_linear_normed(qkv, x, None, w, b)
    }

    /// `qkv_linear` of x's RMSNorm where `norm` gives its weight and eps (see [`QkvLinear`]).
    pub fn qkv_linear_normed(
        &self,
        [q, k, v]: [&mut Tensor; 3],
        x: &Tensor,
        norm: Option<(&Tensor, f32)>,
        w: [&Tensor; 3],
        b: [Option<&Tensor>; 3],
    ) -> Result<()> {
        fn or_none(t: Option<&Tensor>) -> TensorRef<'_> {
            t.map_or(TensorRef::none(), Tensor::as_ref)
        }
        self.exec(Op::QkvLinear(QkvLinear {
            q: q.as_mut(),
            k: k.as_mut(),
            v: v.as_mut(),
            x: x.as_ref(),
            wq: w[0].as_ref(),
            wk: w[1].as_ref(),
            wv: w[2].as_ref(),
            bq: or_none(b[0]),
            bk: or_none(b[1]),
            bv: or_none(b[2]),
            norm: or_none(norm.map(|n| n.0)),
            eps: norm.map_or(0.0, |n| n.1),
        }))
    }

    /// RoPE on q and k, then k and v into the paged cache at `slots`, in one op where the backend
    /// fuses them (see [`RopeKvWrite`]; ask `supports` first).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write(
        &self,
        q: &mut Tensor,
        k: &mut Tensor,
        v: &Tensor,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        positions: &[u32],
        slots: &[u32],
        config: RopeConfig,
    ) -> Result<()> {
        self.exec(Op::RopeKvWrite(RopeKvWrite {
            q: q.as_mut(),
            k: k.as_mut(),
            k_cache: k_cache.as_mut(),
            v_cache: v_cache.as_mut(),
            v: v.as_ref(),
            positions: HostSlice::new(positions),
            slots: HostSlice::new(slots),
            config,
        }))
    }

    /// Attention of each sequence's new queries over its cached context, through its block table.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        out: &mut Tensor,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        seqs: &[PagedSeq],
        block_table: &[u32],
        scale: f32,
    ) -> Result<()> {
        self.paged_attention_with(out, q, k_cache, v_cache, seqs, block_table, Scores::scaled(scale))
    }

    /// `paged_attention` with scores as `scores` asks (soft-capping, a sliding window).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_with(
        &self,
        out: &mut Tensor,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        seqs: &[PagedSeq],
        block_table: &[u32],
        scores: Scores,
    ) -> Result<()> {
        self.exec(Op::PagedAttention(PagedAttention {
            out: out.as_mut(),
            q: q.as_ref(),
            k_cache: k_cache.as_ref(),
            v_cache: v_cache.as_ref(),
            seqs: HostSlice::new(seqs),
            block_table: HostSlice::new(block_table),
            scores,
        }))
    }

    /// `out = silu(gate) * up`.
    pub fn swiglu(&self, out: &mut Tensor, gate: &Tensor, up: &Tensor) -> Result<()> {
        self.glu(out, gate, up, GluAct::Silu)
    }

    /// `out = act(gate) * up` (SwiGLU or GeGLU).
    pub fn glu(&self, out: &mut Tensor, gate: &Tensor, up: &Tensor, act: GluAct) -> Result<()> {
        self.exec(Op::SwiGlu(SwiGlu { out: out.as_mut(), gate: gate.as_ref(), up: up.as_ref(), act }))
    }

    /// `out = act(x)`, elementwise: an MLP without a gate (GPT-2's and GPT-NeoX's GELU).
    pub fn activation(&self, out: &mut Tensor, x: &Tensor, act: GluAct) -> Result<()> {
        self.exec(Op::SwiGlu(SwiGlu { out: out.as_mut(), gate: x.as_ref(), up: TensorRef::none(), act }))
    }

    /// `out[index[j]] += weight[j] * src[j]` for each row j of src (see [`IndexAdd`]).
    pub fn index_add(&self, out: &mut Tensor, src: &Tensor, index: &[u32], weight: &[f32]) -> Result<()> {
        self.exec(Op::IndexAdd(IndexAdd { out: out.as_mut(), src: src.as_ref(), index: HostSlice::new(index), weight: HostSlice::new(weight) }))
    }

    /// A mixture of experts' routed MLPs, the router's choice of each token's `top_k` experts
    /// included: `out` [T, H] from the normed stream `x` [T, H], the router's `logits` [T, E] and the
    /// experts stacked, `[gate, up, down]` ([E, I, H], [E, I, H], [E, H, I]), and a shared
    /// expert's `[output, gate scores]` ([T, H], [T, 1]) where the mixture has one; see [`Moe`].
    /// Ask `supports(OpKind::Moe, ..)` first.
    #[allow(clippy::too_many_arguments)]
    pub fn moe(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        logits: &Tensor,
        experts: [&Tensor; 3],
        shared: Option<[&Tensor; 2]>,
        top_k: usize,
        renormalize: bool,
        act: GluAct,
    ) -> Result<()> {
        let [gate, up, down] = experts.map(Tensor::as_ref);
        let [shared, shared_gate] = shared.map_or([TensorRef::none(); 2], |s| s.map(Tensor::as_ref));
        let top_k = u32::try_from(top_k).map_err(|_| Error::Invalid(format!("moe: top_k {top_k}")))?;
        let renormalize = renormalize as u32;
        self.exec(Op::Moe(Moe { out: out.as_mut(), x: x.as_ref(), logits: logits.as_ref(), gate, up, down, shared, shared_gate, top_k, renormalize, act }))
    }

    /// `x = cap * tanh(x / cap)` in place (see [`Softcap`]).
    pub fn softcap(&self, x: &mut Tensor, cap: f32) -> Result<()> {
        self.exec(Op::Softcap(Softcap { x: x.as_mut(), cap }))
    }

    /// `out = silu(x @ w_gate^T) * (x @ w_up^T)` in one op, where the backend fuses it (see
    /// [`SwiGluLinear`]; ask `supports` first).
    pub fn swiglu_linear(&self, out: &mut Tensor, x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<()> {
        self.swiglu_linear_normed(out, x, None, w_gate, w_up)
    }

    /// `swiglu_linear` of x's RMSNorm where `norm` gives its weight and eps (see [`SwiGluLinear`]).
    pub fn swiglu_linear_normed(&self, out: &mut Tensor, x: &Tensor, norm: Option<(&Tensor, f32)>, w_gate: &Tensor, w_up: &Tensor) -> Result<()> {
        self.exec(Op::SwiGluLinear(SwiGluLinear {
            out: out.as_mut(),
            x: x.as_ref(),
            w_gate: w_gate.as_ref(),
            w_up: w_up.as_ref(),
            norm: norm.map_or(TensorRef::none(), |n| n.0.as_ref()),
            eps: norm.map_or(0.0, |n| n.1),
        }))
    }

    /// Each row's most likely column and its log-probability (see [`Argmax`]).
    pub fn argmax(&self, index: &mut Tensor, logprob: &mut Tensor, x: &Tensor) -> Result<()> {
        self.exec(Op::Argmax(Argmax { index: index.as_mut(), logprob: logprob.as_mut(), x: x.as_ref() }))
    }

    /// A token drawn from each row by its settings, and its log-probability (see [`Sample`]).
    pub fn sample(&self, index: &mut Tensor, logprob: &mut Tensor, x: &Tensor, params: &[SampleParams]) -> Result<()> {
        let params = HostSlice::new(params);
        self.exec(Op::Sample(Sample { index: index.as_mut(), logprob: logprob.as_mut(), x: x.as_ref(), params }))
    }
}

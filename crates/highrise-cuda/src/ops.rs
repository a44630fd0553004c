//! Each op as kernel launches: its metadata uploaded to the scratch buffer, its tensors' device
//! addresses checked, grid and block chosen. Kernel signatures are in `kernels/*.cu`.

use highrise_core::ops::{
    cache_dims, route, AddRmsNorm, Argmax, Attention, Embedding, GluAct, IndexAdd, KvWrite, LayerNorm, Linear, Moe, PagedAttention, PagedSeq,
    QkvLinear, RmsNorm, Rope, RopeKvWrite, Sample, Scores, Softcap, SwiGlu, SwiGluLinear,
};
use highrise_core::{DType, Error, Result, TensorRef};

use crate::driver::Gemm;
use crate::{suffix, CudaBackend, OpState};

/// Threads per block for row-wise kernels (the embedding gather; the norms take NORM_THREADS).
const ROW_THREADS: u32 = 256;
/// The norms' blocks: a row of up to 16 x 512 = 8192 elements stays in registers (NORM_REGS,
/// kernels/residual.cu), 16 a thread, which ptxas keeps without spilling (32 spilled).
const NORM_THREADS: u32 = 512;

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain integers and floats, read as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// `bytes` rounded up to the workspace's 256-byte alignment (each region of it starts aligned).
fn align(bytes: usize) -> usize {
    bytes.div_ceil(256) * 256
}

/// A grid of enough blocks of `threads` to cover `n` elements with a grid-stride loop.
fn cover(n: u64, threads: u32) -> (u32, u32, u32) {
    (n.div_ceil(threads as u64).clamp(1, 65_535) as u32, 1, 1)
}

fn float_code(op: &str, what: &str, d: DType) -> Result<u32> {
    if d.is_float() {
        Ok(d as u32)
    } else {
        Err(Error::Unsupported(format!("{op}: {what} in {d}: the cuda backend reads f32, f16 and bf16 (convert at load)")))
    }
}

pub fn embedding(be: &CudaBackend, st: &mut OpState, op: &Embedding) -> Result<()> {
    let s = suffix("embedding", op.out.dtype)?;
    let table_dt = float_code("embedding", "table", op.table.dtype)?;
    let (t, h) = (op.ids.len() as u32, op.table.dims()[1] as u32);
    let (out, table) = (be.ptr("out", &op.out)?, be.ptr("table", &op.table)?);
    let (_, addr) = be.upload(st, 0, &[bytes_of(op.ids.as_slice())])?;
    let scale = op.scale;
    be.launch(&format!("embedding_{s}"), (t, 1, 1), (ROW_THREADS, 1, 1), &[&out, &table, &table_dt, &addr[0], &h, &scale])
}

/// `out[index[j]] += weight[j] * src[j]` (`index_add_*`, kernels/residual.cu): a block per row of
/// src, the indices and weights uploaded.
pub fn index_add(be: &CudaBackend, st: &mut OpState, op: &IndexAdd) -> Result<()> {
    let s = suffix("index_add", op.out.dtype)?;
    let (n, h) = (op.index.len() as u32, op.out.dims()[1] as u32);
    if n == 0 {
        return Ok(());
    }
    let (out, src) = (be.ptr("out", &op.out)?, be.ptr("src", &op.src)?);
    let (_, addr) = be.upload(st, 0, &[bytes_of(op.index.as_slice()), bytes_of(op.weight.as_slice())])?;
    be.launch(&format!("index_add_{s}"), (n, 1, 1), (ROW_THREADS, 1, 1), &[&out, &src, &addr[0], &addr[1], &h])
}

pub fn rms_norm(be: &CudaBackend, op: &RmsNorm) -> Result<()> {
    let s = suffix("rms_norm", op.out.dtype)?;
    let w_dt = float_code("rms_norm", "weight", op.weight.dtype)?;
    let h = *op.x.dims().last().expect("validated rank") as u32;
    let t = (op.x.numel() / h as usize) as u32;
    let (out, x, w) = (be.ptr("out", &op.out)?, be.ptr("x", &op.x)?, be.ptr("weight", &op.weight)?);
    be.launch(&format!("rms_norm_{s}"), (t, 1, 1), (NORM_THREADS, 1, 1), &[&out, &x, &w, &w_dt, &h, &op.eps])
}

pub fn add_rms_norm(be: &CudaBackend, op: &AddRmsNorm) -> Result<()> {
    let s = suffix("add_rms_norm", op.out.dtype)?;
    let w_dt = float_code("add_rms_norm", "weight", op.weight.dtype)?;
    let h = *op.residual.dims().last().expect("validated rank") as u32;
    let t = (op.residual.numel() / h as usize) as u32;
    let (out, res, delta, w) =
        (be.ptr("out", &op.out)?, be.ptr("residual", &op.residual)?, be.ptr("delta", &op.delta)?, be.ptr("weight", &op.weight)?);
    be.launch(&format!("add_rms_norm_{s}"), (t, 1, 1), (NORM_THREADS, 1, 1), &[&out, &res, &delta, &w, &w_dt, &h, &op.eps])
}

/// LayerNorm, after the stream's add where the op has a delta (`layer_norm_*`, `add_layer_norm_*`,
/// kernels/residual.cu): a block per row.
pub fn layer_norm(be: &CudaBackend, op: &LayerNorm) -> Result<()> {
    let s = suffix("layer_norm", op.out.dtype)?;
    let w_dt = float_code("layer_norm", "weight", op.weight.dtype)?;
    let h = op.x.dims()[1] as u32;
    let t = op.x.dims()[0] as u32;
    let (out, x, w, b) = (be.ptr("out", &op.out)?, be.ptr("x", &op.x)?, be.ptr("weight", &op.weight)?, be.ptr("bias", &op.bias)?);
    match op.delta.opt() {
        None => be.launch(&format!("layer_norm_{s}"), (t, 1, 1), (NORM_THREADS, 1, 1), &[&out, &x, &w, &b, &w_dt, &h, &op.eps]),
        Some(delta) => {
            let delta = be.ptr("delta", &delta)?;
            be.launch(&format!("add_layer_norm_{s}"), (t, 1, 1), (NORM_THREADS, 1, 1), &[&out, &x, &delta, &w, &b, &w_dt, &h, &op.eps])
        }
    }
}

/// One projection's device addresses and sizes, as `project` runs it: `out [t, n] (+)= x [t, k] @
/// w [n, k]^T (+ bias)`.
struct Proj {
    out: u64,
    x: u64,
    w: u64,
    bias: u64,
    act: DType,
    w_dt: DType,
    bias_dt: u32,
    t: usize,
    k: usize,
    n: usize,
    accumulate: bool,
}

impl Proj {
    /// `op`'s projection reading x at `x` (the op's own x, or its norm in the workspace).
    fn of(be: &CudaBackend, op: &Linear, x: u64) -> Result<Proj> {
        let bias = be.opt_ptr("bias", &op.bias)?;
        Ok(Proj {
            out: be.ptr("out", &op.out)?,
            x,
            w: be.ptr("weight", &op.weight)?,
            bias,
            act: op.x.dtype,
            w_dt: op.weight.dtype,
            bias_dt: if bias != 0 { float_code("linear", "bias", op.bias.dtype)? } else { 0 },
            t: op.x.dims()[0],
            k: op.x.dims()[1],
            n: op.weight.dims()[0],
            accumulate: op.accumulate,
        })
    }

    /// Our matrix-vector kernel's rows of x for it, where it runs there.
    fn gemv(&self) -> Option<u32> {
        gemv_rows(self.act, self.w_dt, self.t, self.k, self.x | self.w)
    }

    /// Bytes of workspace `project` takes for it: f32 copies of x and w where their dtypes differ,
    /// the f32 product where a bias is added before the one rounding, and the rounded product where
    /// it is added into out after.
    fn work_bytes(&self) -> usize {
        if self.gemv().is_some() {
            return 0;
        }
        let (t, k, n) = (self.t, self.k, self.n);
        let product = if self.accumulate { align(t * n * self.act.storage_bytes(1).unwrap_or(4)) } else { 0 };
        product
            + match (self.w_dt == self.act, self.bias != 0) {
                (true, false) => 0,
                (true, true) => align(t * n * 4),
                (false, _) => align(t * k * 4) + align(n * k * 4) + align(t * n * 4),
            }
    }
}

/// `out [T, N] = x [T, K] @ weight [N, K]^T (+ bias)` (or `out +=`: `Linear::accumulate`) with our
/// matrix-vector kernel where it runs (`gemv_rows`), else cuBLAS (f32 accumulation; pedantic for
/// f32: no TF32 rounding).
pub fn linear(be: &CudaBackend, st: &mut OpState, op: &Linear) -> Result<()> {
    let p = Proj::of(be, op, be.ptr("x", &op.x)?)?;
    let need = p.work_bytes();
    let work = if need > 0 { be.upload(st, need, &[])?.0 } else { 0 };
    project(be, &p, work)
}

/// Runs `p`, with `p.work_bytes()` of workspace at `work`.
///
/// Weights and activations in the same dtype and no bias: one GEMM, rounded once into `out`. With a
/// bias, the GEMM writes f32 to the workspace and the bias is added there before the one rounding to
/// `out` (adding it to an already rounded product would round twice). Mixed dtypes (which the model
/// loader avoids: it converts weights to the activations' dtype) go through f32 copies in the
/// workspace: exact, but they convert the weight on every call. Accumulating, the product goes to
/// the workspace, rounded, and `add_*` adds it into out (`gemv_add*` does both itself).
fn project(be: &CudaBackend, p: &Proj, work: u64) -> Result<()> {
    let s = suffix("linear", p.act)?;
    let w_dt = float_code("linear", "weight", p.w_dt)?;
    let Proj { t, k, n, x, w, bias, bias_dt, act, .. } = *p;
    let (n32, total) = (n as u32, (t * n) as u64);
    if let Some(tm) = p.gemv() {
        let (t32, k32) = (t as u32, k as u32);
        let (blocks, threads) = (n.div_ceil(be.gemv_shape.rows_per_block()) as u32, be.gemv_shape.threads());
        let name = if p.accumulate { format!("gemv_add{tm}_{s}") } else { format!("gemv{tm}_{s}") };
        return be.launch(&name, (blocks, 1, 1), (threads, 1, 1), &[&p.out, &x, &w, &bias, &bias_dt, &t32, &k32, &n32]);
    }
    // Accumulating: the rounded product at the workspace's start, the rest after it.
    let (out, work) = match p.accumulate {
        true => (work, work + align(t * n * act.storage_bytes(1).unwrap_or(4)) as u64),
        false => (p.out, work),
    };
    let gemm = |input, output, x, w, out| {
        // SAFETY: the three matrices lie inside their allocations (checked by `ptr` against the
        // validated shapes), or inside the workspace sized for them (`work_bytes`).
        unsafe { be.gemm(Gemm { input, output, t, k, n, x, w, out }) }
    };
    if p.w_dt == act && bias == 0 {
        gemm(act, act, x, w, out)?;
    } else {
        let same = p.w_dt == act;
        let (xb, wb) = if same { (0, 0) } else { (align(t * k * 4), align(n * k * 4)) };
        let o32 = work + (xb + wb) as u64;
        if same {
            gemm(act, DType::F32, x, w, o32)?;
        } else {
            let (x32, w32) = (work, work + xb as u64);
            let (x_dt, xn, wn) = (act as u32, (t * k) as u64, (n * k) as u64);
            be.launch("to_f32", cover(xn, 256), (256, 1, 1), &[&x32, &x, &x_dt, &xn])?;
            be.launch("to_f32", cover(wn, 256), (256, 1, 1), &[&w32, &w, &w_dt, &wn])?;
            gemm(DType::F32, DType::F32, x32, w32, o32)?;
        }
        if bias != 0 {
            be.launch("add_bias_f32", cover(total, 256), (256, 1, 1), &[&o32, &bias, &bias_dt, &n32, &total])?;
        }
        be.launch(&format!("from_f32_{s}"), cover(total, 256), (256, 1, 1), &[&out, &o32, &total])?;
    }
    if p.accumulate {
        be.launch(&format!("add_{s}"), cover(total, 256), (256, 1, 1), &[&p.out, &out, &total])?;
    }
    Ok(())
}

/// The most rows of x the matrix-vector kernels read a norm of themselves (`gemv_*_norm1`: decode's
/// one; more rows are normed by `rms_norm_*` first).
const GEMV_NORM_ROWS: u32 = 1;

/// A fused projection (`QkvLinear`, `SwiGluLinear`) on the matrix-vector kernel, where it fits at
/// `tm` rows of x (`gemv_rows`): those rows, and the address of the norm weight the kernel reads
/// itself (`gemv_*_norm*`: at most `GEMV_NORM_ROWS` rows, the weight in x's 16-bit dtype, 16-byte
/// aligned) or None where the op has no norm. None at all where the kernel cannot take the op and
/// its norm: the host norms x apart (`norm_into`) and runs the parts.
fn gemv_normed(be: &CudaBackend, tm: Option<u32>, norm: &TensorRef, act: DType) -> Result<Option<(u32, Option<u64>)>> {
    let Some(tm) = tm else { return Ok(None) };
    if norm.is_none() {
        return Ok(Some((tm, None)));
    }
    let p = be.ptr("norm", norm)?;
    Ok((tm <= GEMV_NORM_ROWS && norm.dtype == act && p % 16 == 0).then_some((tm, Some(p))))
}

/// x's RMSNorm by `norm` into the workspace at `work` (`rms_norm_*`, a row a block), for a fused
/// projection that does not run on the matrix-vector kernel (`norm_bytes` of room there).
fn norm_into(be: &CudaBackend, work: u64, x: &TensorRef, norm: &TensorRef, eps: f32) -> Result<()> {
    let s = suffix("rms_norm", x.dtype)?;
    let w_dt = float_code("rms_norm", "norm", norm.dtype)?;
    let (t, h) = (x.dims()[0] as u32, x.dims()[1] as u32);
    let (xp, w) = (be.ptr("x", x)?, be.ptr("norm", norm)?);
    be.launch(&format!("rms_norm_{s}"), (t, 1, 1), (NORM_THREADS, 1, 1), &[&work, &xp, &w, &w_dt, &h, &eps])
}

/// Bytes of x's dtype a norm of x takes in the workspace (0 without a norm).
fn norm_bytes(x: &TensorRef, norm: &TensorRef) -> usize {
    if norm.is_none() {
        return 0;
    }
    align(x.dtype.storage_bytes(x.numel()).unwrap_or(0))
}

/// q, k and v of one x (or of its norm): one `gemv_qkv*` launch where the matrix-vector kernel
/// takes all three (decoding; q's and k's rows whole blocks of the kernel; the biases present of
/// one dtype; a norm in x's dtype: `gemv_qkv_norm*`), each block as `gemv*` would run it, so the
/// numbers of three `linear`s; else those three (after `rms_norm_*` into the workspace).
pub fn qkv_linear(be: &CudaBackend, st: &mut OpState, op: &QkvLinear) -> Result<()> {
    let act = op.x.dtype;
    let (t, k) = (op.x.dims()[0], op.x.dims()[1]);
    let [nq, nk, nv] = [&op.wq, &op.wk, &op.wv].map(|w| w.dims()[0]);
    let x = be.ptr("x", &op.x)?;
    let [wq, wk, wv] = [("wq", &op.wq), ("wk", &op.wk), ("wv", &op.wv)].map(|(n, w)| be.ptr(n, w));
    let (wq, wk, wv) = (wq?, wk?, wv?);
    let biases = [&op.bq, &op.bk, &op.bv];
    let mut bias_dts = biases.iter().filter(|b| !b.is_none()).map(|b| b.dtype);
    let one_bias_dtype = bias_dts.next().is_none_or(|first| bias_dts.all(|d| d == first));
    let per = be.gemv_shape.rows_per_block();
    let whole_blocks = nq % per == 0 && nk % per == 0;
    let tm = gemv_rows(act, op.wq.dtype, t, k, x | wq | wk | wv).filter(|_| whole_blocks && one_bias_dtype);
    let Some((tm, norm)) = gemv_normed(be, tm, &op.norm, act)? else {
        // The three projections, of x's norm at the workspace's start where there is one (each
        // part's own workspace after it, sized as read from x: x's norm is aligned, so no larger).
        let nb = norm_bytes(&op.x, &op.norm);
        let sizes = op.parts_reading(op.x).iter().map(|part| Ok(Proj::of(be, part, x)?.work_bytes())).collect::<Result<Vec<_>>>()?;
        let need = nb + sizes.into_iter().max().unwrap_or(0);
        let work = if need > 0 { be.upload(st, need, &[])?.0 } else { 0 };
        let xn = if nb > 0 {
            norm_into(be, work, &op.x, &op.norm, op.eps)?;
            work
        } else {
            x
        };
        for part in op.parts_reading(op.x) {
            project(be, &Proj::of(be, &part, xn)?, work + nb as u64)?;
        }
        return Ok(());
    };
    let s = suffix("qkv_linear", act)?;
    let [q, kk, v] = [("q", &op.q), ("k", &op.k), ("v", &op.v)].map(|(n, o)| be.ptr(n, o));
    let (q, kk, v) = (q?, kk?, v?);
    let [bq, bk, bv] = [("bq", &op.bq), ("bk", &op.bk), ("bv", &op.bv)].map(|(n, b)| be.opt_ptr(n, b));
    let (bq, bk, bv) = (bq?, bk?, bv?);
    let bias_dt = match biases.iter().find(|b| !b.is_none()) {
        Some(b) => float_code("qkv_linear", "bias", b.dtype)?,
        None => 0,
    };
    let blocks = (nq + nk + nv).div_ceil(per) as u32;
    let [t32, k32, nq32, nk32, nv32] = [t, k, nq, nk, nv].map(|n| n as u32);
    let (grid, threads) = ((blocks, 1, 1), (be.gemv_shape.threads(), 1, 1));
    match norm {
        None => be.launch(
            &format!("gemv_qkv{tm}_{s}"),
            grid,
            threads,
            &[&q, &kk, &v, &x, &wq, &wk, &wv, &bq, &bk, &bv, &bias_dt, &t32, &k32, &nq32, &nk32, &nv32],
        ),
        Some(nw) => be.launch(
            &format!("gemv_qkv_norm{tm}_{s}"),
            grid,
            threads,
            &[&q, &kk, &v, &x, &wq, &wk, &wv, &bq, &bk, &bv, &bias_dt, &nw, &op.eps, &t32, &k32, &nq32, &nk32, &nv32],
        ),
    }
}

/// `out = silu(x @ w_gate^T) * (x @ w_up^T)` (of x's norm, where the op has one): one `gemv_glu*`
/// (`gemv_glu_norm*`) launch where the matrix-vector kernel takes the shapes (decoding), else the
/// two GEMMs into the workspace (after `rms_norm_*` there) and `swiglu_*`. Either way the numbers
/// of `linear`, `linear`, `swiglu`.
pub fn swiglu_linear(be: &CudaBackend, st: &mut OpState, op: &SwiGluLinear) -> Result<()> {
    let act = op.x.dtype;
    let s = suffix("swiglu_linear", act)?;
    let (t, k, n) = (op.x.dims()[0], op.x.dims()[1], op.w_gate.dims()[0]);
    let (out, x) = (be.ptr("out", &op.out)?, be.ptr("x", &op.x)?);
    let (wg, wu) = (be.ptr("w_gate", &op.w_gate)?, be.ptr("w_up", &op.w_up)?);
    let (t32, k32, n32) = (t as u32, k as u32, n as u32);
    if let Some((tm, norm)) = gemv_normed(be, gemv_rows(act, op.w_gate.dtype, t, k, x | wg | wu), &op.norm, act)? {
        let (blocks, threads) = (n.div_ceil(be.gemv_shape.glu_rows_per_block()) as u32, be.gemv_shape.threads());
        return match norm {
            None => be.launch(&format!("gemv_glu{tm}_{s}"), (blocks, 1, 1), (threads, 1, 1), &[&out, &x, &wg, &wu, &t32, &k32, &n32]),
            Some(nw) => be.launch(
                &format!("gemv_glu_norm{tm}_{s}"),
                (blocks, 1, 1),
                (threads, 1, 1),
                &[&out, &x, &wg, &wu, &nw, &op.eps, &t32, &k32, &n32],
            ),
        };
    }
    let nb = norm_bytes(&op.x, &op.norm);
    let bytes = align(t * n * act.storage_bytes(1).unwrap_or(4));
    let (work, _) = be.upload(st, nb + 2 * bytes, &[])?;
    let x = if nb > 0 {
        norm_into(be, work, &op.x, &op.norm, op.eps)?;
        work
    } else {
        x
    };
    let (gate, up) = (work + nb as u64, work + (nb + bytes) as u64);
    for (w, o) in [(wg, gate), (wu, up)] {
        // SAFETY: x (or its norm in the workspace) and the weight lie inside their allocations
        // (checked by `ptr` against the validated shapes), the output inside the workspace just
        // sized for it.
        unsafe { be.gemm(Gemm { input: act, output: act, t, k, n, x, w, out: o }) }?;
    }
    let total = (t * n) as u64;
    be.launch(&format!("swiglu_{s}"), cover(total, 256), (256, 1, 1), &[&out, &gate, &up, &total])
}

/// Whether a linear op runs on our matrix-vector kernel (kernels/gemv.cu) instead of cuBLAS, and
/// which one (the rows of x it is built for). The kernel takes f16/bf16 x and weights alike, at
/// most 8 rows, k a whole number of 16-byte chunks at 16-byte aligned addresses (`addrs`: x | w);
/// among those it runs where [`gemv_pays`]. `HIGHRISE_CUDA_GEMV=own` takes it wherever it fits,
/// `=cublas` nowhere (benches/cuda_ops.rs times both).
fn gemv_rows(act: DType, weight: DType, t: usize, k: usize, addrs: u64) -> Option<u32> {
    let fits = matches!(act, DType::BF16 | DType::F16) && weight == act && (1..=8).contains(&t) && k % 8 == 0 && addrs % 16 == 0;
    (fits && gemv_runs(t, k)).then(|| t.next_power_of_two() as u32)
}

/// Whether a projection of `t` rows of x, rows of w of `k`, that fits the kernel runs there.
fn gemv_runs(t: usize, k: usize) -> bool {
    match std::env::var("HIGHRISE_CUDA_GEMV").as_deref() {
        Ok("cublas") => false,
        Ok("own") => true,
        _ => gemv_pays(t, k),
    }
}

/// `Backend::folds_norms` for this backend: where the layer's projections of the stream (q/k/v,
/// gate/up: rows of `hidden`) run on the matrix-vector kernel, which then reads the norm itself,
/// and the output projection adds into the stream itself (elsewhere a fused op with a norm runs
/// `rms_norm_*` first, and an accumulating one `add_*` after: one launch more than `add_rms_norm`).
/// At 1 to `GEMV_NORM_ROWS` rows. `HIGHRISE_FOLD_NORMS=0` keeps `add_rms_norm` (=1 folds wherever
/// the ops take it), for timing both (scripts/gpu-sweep.sh).
pub(crate) fn folds_norms(rows: usize, hidden: usize, dtype: DType) -> bool {
    match std::env::var("HIGHRISE_FOLD_NORMS").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => matches!(dtype, DType::BF16 | DType::F16) && (1..=GEMV_NORM_ROWS as usize).contains(&rows) && hidden % 8 == 0 && gemv_runs(rows, hidden),
    }
}

/// Where our matrix-vector kernel beats cuBLAS, as an H200 measured it on Llama-3-8B's bf16 shapes
/// (benches/results/2026-11-30-h200.md; share of the copy bandwidth, gemv against cuBLAS). One row
/// of x and rows of w of 4096: q/k/v 81% against 73%, the unembedding at the copy bandwidth (241.7
/// us for its 1.05 GB); the gate shape alone 76% against 86%, but decode runs gate and up as one
/// `gemv_glu` launch with SwiGLU in it, saving a launch and both projections' round trip. Rows of
/// 14336 (the down projection): 63% against 85%: four thousand rows, each a long serial walk for
/// its warp. Eight rows of x: 14-28% against 82-87%: the kernel converts x again for every two rows
/// of w, at eight rows more arithmetic than the bandwidth leaves time for; two to seven rows were
/// not measured, and go to cuBLAS with eight. So: one row of x, rows of w up to 8192 (between the
/// lengths measured). A choice by t and k alone, which the fused ops' parts share, keeps
/// `qkv_linear` and `swiglu_linear` bit for bit the linears they replace.
fn gemv_pays(t: usize, k: usize) -> bool {
    t == 1 && k <= 8192
}

pub fn rope(be: &CudaBackend, st: &mut OpState, op: &Rope) -> Result<()> {
    let s = suffix("rope", op.x.dtype)?;
    let [t, heads, d] = [op.x.dims()[0] as u32, op.x.dims()[1] as u32, op.x.dims()[2] as u32];
    let threads = rope_threads("rope", d)?;
    let x = be.ptr("x", &op.x)?;
    let inv_freq = op.config.inv_freq(d as usize);
    let rot = op.config.rotary(d as usize) as u32;
    let mscale = op.config.attention_factor();
    let (_, addr) = be.upload(st, 0, &[bytes_of(op.positions.as_slice()), bytes_of(&inv_freq)])?;
    be.launch(&format!("rope_{s}"), (t, heads, 1), (threads, 1, 1), &[&x, &addr[0], &addr[1], &heads, &d, &rot, &mscale])
}

/// The block of the RoPE kernels at head dim `d`: a thread per pair of dims (at least a warp);
/// refused past 1024 pairs.
fn rope_threads(op: &str, d: u32) -> Result<u32> {
    if d / 2 > 1024 {
        return Err(Error::Unsupported(format!("{op}: head dim {d} is above the cuda backend's 2048")));
    }
    Ok((d / 2).max(32))
}

/// `rope` on q and k and `kv_write`, as one `rope_kv_write_*` launch (kernels/attention.cu): block
/// (token, head) over q's heads then k's.
pub fn rope_kv_write(be: &CudaBackend, st: &mut OpState, op: &RopeKvWrite) -> Result<()> {
    same_cache_dtype("rope_kv_write", op.k.dtype, op.k_cache.dtype)?;
    let s = suffix("rope_kv_write", op.q.dtype)?;
    let [t, hq, d] = [op.q.dims()[0] as u32, op.q.dims()[1] as u32, op.q.dims()[2] as u32];
    let threads = rope_threads("rope_kv_write", d)?;
    let [_, block_size, hkv, _] = cache_dims(&op.k_cache).map(|x| x as u32);
    let (kc, vc) = (be.ptr("k_cache", &op.k_cache)?, be.ptr("v_cache", &op.v_cache)?);
    let (q, k, v) = (be.ptr("q", &op.q)?, be.ptr("k", &op.k)?, be.ptr("v", &op.v)?);
    let inv_freq = op.config.inv_freq(d as usize);
    let rot = op.config.rotary(d as usize) as u32;
    let parts = [bytes_of(op.slots.as_slice()), bytes_of(op.positions.as_slice()), bytes_of(&inv_freq)];
    let (_, addr) = be.upload(st, 0, &parts)?;
    let mscale = op.config.attention_factor();
    be.launch(
        &format!("rope_kv_write_{s}"),
        (t, hq + hkv, 1),
        (threads, 1, 1),
        &[&kc, &vc, &k, &v, &addr[0], &hkv, &d, &block_size, &q, &addr[1], &addr[2], &hq, &rot, &mscale],
    )
}

/// The CUDA kernels keep the KV cache in the activations' dtype.
fn same_cache_dtype(op: &str, activations: DType, cache: DType) -> Result<()> {
    match activations == cache {
        true => Ok(()),
        false => Err(Error::Unsupported(format!(
            "cuda {op}: a {cache} KV cache beside {activations} activations (the cache must be {activations} here)"
        ))),
    }
}

pub fn kv_write(be: &CudaBackend, st: &mut OpState, op: &KvWrite) -> Result<()> {
    same_cache_dtype("kv_write", op.k.dtype, op.k_cache.dtype)?;
    let s = suffix("kv_write", op.k.dtype)?;
    let t = op.slots.len() as u32;
    let [_, block_size, hkv, d] = cache_dims(&op.k_cache).map(|x| x as u32);
    let (kc, vc) = (be.ptr("k_cache", &op.k_cache)?, be.ptr("v_cache", &op.v_cache)?);
    let (k, v) = (be.ptr("k", &op.k)?, be.ptr("v", &op.v)?);
    let (_, addr) = be.upload(st, 0, &[bytes_of(op.slots.as_slice())])?;
    be.launch(&format!("kv_write_{s}"), (t, 1, 1), (ROW_THREADS, 1, 1), &[&kc, &vc, &k, &v, &addr[0], &hkv, &d, &block_size])
}

/// The KV heads of attention's keys: axis 1 both of a prompt's K [T, kv_heads, D] and of a paged
/// cache [blocks, kv_heads, block_size, D]. (Taking the second-to-last axis, as the first GPU run
/// found, read the cache's block_size instead.)
fn kv_heads(k: &highrise_core::TensorRef) -> usize {
    k.dims()[1]
}

/// What attention needs per query row: where its keys start (a token row, or an offset into the
/// block table) and how many it sees.
struct QueryRows {
    base: Vec<u32>,
    nkeys: Vec<u32>,
}

/// Prefill: sequences laid end to end; query i of a sequence starting at token `start` sees keys
/// start..=start + i (causal), or all of its sequence's.
fn prefill_rows(seq_lens: &[u32], causal: bool) -> QueryRows {
    let (mut base, mut nkeys) = (Vec::new(), Vec::new());
    let mut start = 0u32;
    for &len in seq_lens {
        for i in 0..len {
            base.push(start);
            nkeys.push(if causal { i + 1 } else { len });
        }
        start += len;
    }
    QueryRows { base, nkeys }
}

/// Paged: query j of a sequence with `q_len` queries in `context_len` tokens sits at position
/// context_len - q_len + j and sees that many keys plus itself, through its blocks.
fn paged_rows(seqs: &[PagedSeq]) -> QueryRows {
    let (mut base, mut nkeys) = (Vec::new(), Vec::new());
    for s in seqs {
        for j in 0..s.q_len {
            base.push(s.blocks_start);
            nkeys.push(s.context_len - s.q_len + j + 1);
        }
    }
    QueryRows { base, nkeys }
}

/// How many slices to cut each query's keys into: enough blocks to fill the GPU twice over; with
/// `max_keys`, no slice shorter than 64 keys. Without (a step through the paged cache: what a CUDA
/// graph replays) at most 64, from the batch's shape alone, so that the launch is the same step
/// after step as the contexts grow (the kernels cut each row's own keys: slices past a short
/// context find none).
fn splits_for(be: &CudaBackend, rows: usize, heads: usize, max_keys: Option<u32>) -> u32 {
    let want = (2 * be.sms as usize).div_ceil((rows * heads).max(1)) as u32;
    match max_keys {
        Some(keys) => want.clamp(1, keys.div_ceil(64).clamp(1, COMBINE_MAX)),
        None => want.clamp(1, 64),
    }
}

/// The most slices `attn_combine_*` merges (kernels/attention.cu's COMBINE_MAX: their maxima and
/// sums held in shared memory).
pub(crate) const COMBINE_MAX: u32 = 512;

#[allow(clippy::too_many_arguments)]
fn attend(
    be: &CudaBackend,
    st: &mut OpState,
    name: &str,
    out: &highrise_core::TensorRef,
    q: &highrise_core::TensorRef,
    k: &highrise_core::TensorRef,
    v: &highrise_core::TensorRef,
    rows: QueryRows,
    table: Option<(&[u32], u32)>,
    scores: Scores,
) -> Result<()> {
    let s = suffix(name, out.dtype)?;
    let [t, hq, d] = [q.dims()[0], q.dims()[1], q.dims()[2]];
    let hkv = kv_heads(k);
    if !crate::kernels::HEAD_DIMS.contains(&d) {
        return Err(Error::Unsupported(format!("{name}: head dim {d} (the cuda kernels take {:?})", crate::kernels::HEAD_DIMS)));
    }
    if t == 0 {
        return Ok(());
    }
    // The most keys a row sees (its last `window` with a sliding window): what a prompt's slices
    // cut; a paged step's slices are the batch's alone.
    let max_keys = rows.nkeys.iter().map(|&n| n - scores.first_key(n.saturating_sub(1) as usize) as u32).max().unwrap_or(1);
    // A block per KV head serving its whole group of query heads reads each K/V row once; the
    // per-query-head kernel covers larger groups and head dim 256.
    let grouped = hq / hkv <= 8 && d <= 128 && attention_choice() != "per-head";
    let splits = splits_for(be, t, if grouped { hkv } else { hq }, table.is_none().then_some(max_keys));
    let partial_bytes = t * hq * splits as usize * (d + 2) * 4;
    let (o, qp, kp, vp) = (be.ptr("out", out)?, be.ptr("q", q)?, be.ptr("k", k)?, be.ptr("v", v)?);
    let (table_bytes, block_size) = match table {
        Some((tab, bs)) => (bytes_of(tab), bs),
        None => (&[][..], 0),
    };
    let (partial, addr) = be.upload_paged(st, partial_bytes, &[bytes_of(&rows.base), bytes_of(&rows.nkeys)], table_bytes)?;
    let table_ptr = if table.is_some() { addr[2] } else { 0u64 };
    let (hq32, hkv32, d32) = (hq as u32, hkv as u32, d as u32);
    let (kernel, heads) = if grouped { ("attn_group", hkv32) } else { ("attn_split", hq32) };
    let (scale, window, softcap, alibi) = (scores.scale, scores.window, scores.softcap, scores.alibi);
    be.launch(
        &format!("{kernel}_d{d}_{s}"),
        (t as u32, heads, splits),
        (128, 1, 1),
        &[&partial, &qp, &kp, &vp, &addr[0], &addr[1], &table_ptr, &block_size, &hq32, &hkv32, &scale, &window, &softcap, &alibi],
    )?;
    be.launch(&format!("attn_combine_{s}"), (t as u32, hq32, 1), (d32, 1, 1), &[&o, &partial, &hq32, &d32, &splits])
}

/// `HIGHRISE_CUDA_ATTENTION`: "auto" (default), "split" (prefill on the split kernels too, not on
/// tensor cores), "per-head" (that, and a block per query head instead of per KV head): for
/// checking each kernel against the others.
fn attention_choice() -> String {
    std::env::var("HIGHRISE_CUDA_ATTENTION").unwrap_or_else(|_| "auto".into())
}

/// Whether attention runs on tensor cores (`flash_attn_*`, `decode_attn_*`, which take every
/// `Scores` modifier as the split kernels do: soft-capping, sliding windows, ALiBi): f16/bf16 at
/// head dims 64 and 128, unless `HIGHRISE_CUDA_ATTENTION` asks for the split kernels.
fn flash_fits(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && crate::flash::HEAD_DIMS.contains(&d) && attention_choice() == "auto"
}

/// Launches `flash_attn_*` over the tiles of `seqs` ((first query row, queries, position of the
/// first query, where its keys start), see `flash::tiles`); `table`: the paged cache's block table and
/// block size.
#[allow(clippy::too_many_arguments)]
fn flash(
    be: &CudaBackend,
    st: &mut OpState,
    name: &str,
    [out, q, k, v]: [&highrise_core::TensorRef; 4],
    seqs: impl Iterator<Item = (u32, u32, u32, u32)>,
    causal: bool,
    table: Option<(&[u32], u32)>,
    scores: Scores,
) -> Result<()> {
    let s = suffix(name, out.dtype)?;
    let [hq, d] = [q.dims()[1], q.dims()[2]];
    // The Hopper kernel where chosen (same arguments and tiles, its own geometry), else mma.sync's.
    let (kernel, shape, threads, shared) = if let Some(wg) = be.flash_wgmma {
        let (shape, threads, shared) = wg.launch(&be.flash_wg_shapes, &be.flash_ws_shapes, d)?;
        (format!("{}_d{d}_{s}", wg.kernel()), shape, threads, shared)
    } else {
        let shape = crate::flash::find(&be.flash_shapes, d)?;
        (format!("flash_attn_d{d}_{s}"), shape, shape.threads(), shape.shared_bytes(d))
    };
    let tiles = crate::flash::tiles(seqs, causal, shape.rows());
    let hkv = kv_heads(k);
    let (o, qp, kp, vp) = (be.ptr("out", out)?, be.ptr("q", q)?, be.ptr("k", k)?, be.ptr("v", v)?);
    let (table_bytes, block_size) = table.map_or((&[][..], 0), |(t, bs)| (bytes_of(t), bs));
    let spec = be.flash_wgmma == Some(crate::flash::Wg::Spec);
    // flash_attn_ws reads contiguous K and V by TMA: tensor maps of both ([rows, kv heads, d],
    // boxes of 64 dims x 1 head x a tile's keys), encoded by the driver, uploaded beside the tiles.
    let maps = if spec && table.is_none() {
        let map = |base: u64| crate::tma::TensorMap {
            base,
            dims: [d as u64, hkv as u64, k.dims()[0] as u64],
            strides: [2 * d as u64, 2 * (d * hkv) as u64],
            boxes: [64, 1, shape.keys],
        };
        Some([be.driver.tensor_map(&map(kp))?, be.driver.tensor_map(&map(vp))?])
    } else {
        None
    };
    let mut parts = vec![bytes_of(&tiles)];
    if let Some([km, vm]) = &maps {
        parts.extend([&km[..], &vm[..]]);
    }
    let (_, addr) = be.upload_paged(st, 0, &parts, table_bytes)?;
    let table_ptr = if table.is_some() { addr[parts.len()] } else { 0u64 };
    let (kmap, vmap) = if maps.is_some() { (addr[1], addr[2]) } else { (0u64, 0u64) };
    let (hq32, hkv32) = (hq as u32, hkv as u32);
    let (scale_log2, window, softcap, alibi) = (scores.scale * std::f32::consts::LOG2_E, scores.window, scores.softcap, scores.alibi);
    let mut args: Vec<&dyn crate::KernelArg> =
        vec![&o, &qp, &kp, &vp, &addr[0], &table_ptr, &block_size, &hq32, &hkv32, &scale_log2, &window, &softcap, &alibi];
    if spec {
        args.extend([&kmap as &dyn crate::KernelArg, &vmap]);
    }
    be.launch_shared(&kernel, ((tiles.len() / 5) as u32, hq32, 1), (threads, 1, 1), shared, &args)
}

/// Prefill attention: on tensor cores where `flash_fits`, else with the split kernel that decoding
/// uses.
pub fn attention(be: &CudaBackend, st: &mut OpState, op: &Attention) -> Result<()> {
    let [t, d] = [op.q.dims()[0], op.q.dims()[2]];
    if flash_fits(op.out.dtype, d) && t > 0 {
        let mut start = 0;
        let seqs = op.seq_lens.as_slice().iter().map(|&len| {
            start += len;
            (start - len, len, 0, start - len)
        });
        return flash(be, st, "attention", [&op.out, &op.q, &op.k, &op.v], seqs, op.causal, None, op.scores);
    }
    let rows = prefill_rows(op.seq_lens.as_slice(), op.causal);
    attend(be, st, "attention", &op.out, &op.q, &op.k, &op.v, rows, None, op.scores)
}

/// Query rows the tensor-core decode kernel puts in one MMA tile: a sequence's new tokens times its
/// KV head's group of query heads.
const DECODE_ROWS: usize = 16;

/// Attention through the paged cache, on tensor cores where `flash_fits` the dtype and head dim:
/// the sequences with at most 16 rows of new tokens x query-head group (decoding, or a few tokens
/// of speculative decoding) on the decode kernel (a block per sequence, KV head and slice of the
/// context), those with longer prompt chunks on the prefill kernel through the block table: one
/// launch each, a step that mixes them (continuous batching: a request's prompt joining the
/// running decodes) two, over disjoint rows. Otherwise (f32, other head dims, a chunk of one token
/// the decode kernel cannot take) the split kernels (flash-decoding), whose blocks each serve one
/// query row: a mixed step once ran its prompt chunks there, at a few TFLOP/s.
pub fn paged_attention(be: &CudaBackend, st: &mut OpState, op: &PagedAttention) -> Result<()> {
    same_cache_dtype("paged_attention", op.out.dtype, op.k_cache.dtype)?;
    let block_size = cache_dims(&op.k_cache)[1] as u32;
    let table = Some((op.block_table.as_slice(), block_size));
    let seqs = op.seqs.as_slice();
    let group = op.q.dims()[1] / kv_heads(&op.k_cache).max(1);
    let decodes = |s: &PagedSeq| s.q_len >= 1 && s.q_len as usize * group <= DECODE_ROWS;
    // Each sequence with its first row of q and out.
    let starts = || {
        seqs.iter().scan(0u32, |start, s| {
            *start += s.q_len;
            Some((*start - s.q_len, s))
        })
    };
    let prompts = || starts().filter(|(_, s)| !decodes(s));
    if flash_fits(op.out.dtype, op.q.dims()[2]) && !seqs.is_empty() && prompts().all(|(_, s)| s.q_len >= 2) {
        if seqs.iter().any(decodes) {
            decode(be, st, op, block_size, starts().filter(|(_, s)| decodes(s)))?;
        }
        if prompts().next().is_some() {
            let chunks = prompts().map(|(start, s)| (start, s.q_len, s.context_len - s.q_len, s.blocks_start));
            flash(be, st, "paged_attention", [&op.out, &op.q, &op.k_cache, &op.v_cache], chunks, true, table, op.scores)?;
        }
        return Ok(());
    }
    let rows = paged_rows(seqs);
    attend(be, st, "paged_attention", &op.out, &op.q, &op.k_cache, &op.v_cache, rows, table, op.scores)
}

/// Slices per sequence for `blocks` (sequence, KV head) pairs on a GPU that holds `slots` blocks at
/// once: the fewest (1 to 64) whose blocks fill at least 95% of their last wave (blocks in a
/// partial last wave leave the rest of the GPU idle while they finish), else the fullest. Batch 1
/// with 8 KV heads on 396 slots (an H200 at 3 blocks an SM): 48 slices, one wave; 64 sequences:
/// 3 (3.9 waves) where 1 would leave 70% of its second wave idle.
fn decode_splits(blocks: usize, slots: usize) -> u32 {
    let fill = |s: usize| {
        let waves = (blocks * s) as f64 / slots.max(1) as f64;
        waves / waves.ceil()
    };
    let most = DECODE_SPLITS_MAX as usize;
    let fullest = || (1..=most).max_by(|&a, &b| fill(a).total_cmp(&fill(b)).then(b.cmp(&a))).unwrap_or(1);
    (1..=most).find(|&s| fill(s) >= 0.95).unwrap_or_else(fullest) as u32
}

/// The most slices `decode_attn_*` merges itself (kernels/attention.cu's DECODE_SPLITS_MAX: their
/// maxima and sums sit in its shared memory).
pub(crate) const DECODE_SPLITS_MAX: u32 = 64;

/// Launches `decode_attn_*` (kernels/attention.cu) for `seqs` of a paged step (each with its first
/// row of q and out), every one fitting one MMA tile (`DECODE_ROWS`): each sequence's context cut
/// into slices (`decode_splits`: whole waves
/// of resident blocks, as many as CUDA says an SM holds: several hide the copies' latency), at
/// most 64, none shorter than a chunk per warp. The count depends on the batch's size alone, never
/// on the contexts, so a captured step can be replayed (slices past a short context find no keys
/// and leave at once). The last block of each (sequence, KV head) to finish merges the slices with
/// keys into the output, counted on the backend's slice counters (a lone one writes it itself):
/// one launch a layer, where a merge of its own (`attn_combine_*`) was a second.
fn decode<'a>(be: &CudaBackend, st: &mut OpState, op: &PagedAttention, block_size: u32, seqs: impl Iterator<Item = (u32, &'a PagedSeq)>) -> Result<()> {
    let s = suffix("paged_attention", op.out.dtype)?;
    let [t, hq, d] = [op.q.dims()[0], op.q.dims()[1], op.q.dims()[2]];
    let hkv = kv_heads(&op.k_cache);
    let mut meta = Vec::with_capacity(4 * op.seqs.as_slice().len());
    for (start, q) in seqs {
        meta.extend([start, q.q_len, q.context_len, q.blocks_start]);
    }
    let n = meta.len() / 4;
    let (kernel, shape) = (format!("decode_attn_d{d}_{s}"), be.decode_shape);
    let per_sm = be.blocks_per_sm(st, &kernel, shape.threads(), shape.shared_bytes(d))?;
    let splits = decode_splits(n * hkv, (be.sms * per_sm) as usize);
    let partial_bytes = t * hq * splits as usize * (d + 2) * 4;
    let (partial, addr) = be.upload_paged(st, partial_bytes, &[bytes_of(&meta)], bytes_of(op.block_table.as_slice()))?;
    let counters = be.slice_counters(st, n * hkv)?;
    let (o, qp) = (be.ptr("out", &op.out)?, be.ptr("q", &op.q)?);
    let (kp, vp) = (be.ptr("k_cache", &op.k_cache)?, be.ptr("v_cache", &op.v_cache)?);
    let (hq32, hkv32) = (hq as u32, hkv as u32);
    let scores = op.scores;
    let (scale_log2, window, softcap, alibi) = (scores.scale * std::f32::consts::LOG2_E, scores.window, scores.softcap, scores.alibi);
    be.launch_shared(
        &kernel,
        (n as u32, hkv32, splits),
        (shape.threads(), 1, 1),
        shape.shared_bytes(d),
        &[&partial, &qp, &kp, &vp, &addr[0], &addr[1], &block_size, &hq32, &hkv32, &scale_log2, &window, &softcap, &alibi, &o, &counters],
    )
}

/// The MLP's gate: `swiglu_*` or `geglu_*` (kernels/mlp.cu) by the op's activation.
pub fn swiglu(be: &CudaBackend, op: &SwiGlu) -> Result<()> {
    let (out, gate) = (be.ptr("out", &op.out)?, be.ptr("gate", &op.gate)?);
    let up = match op.up.opt() {
        Some(up) => be.ptr("up", &up)?,
        None => 0,
    };
    glu(be, op.out.dtype, out, gate, up, op.act, op.out.numel() as u64)
}

/// `out = act(gate) * up` over `n` elements at these addresses (`act(gate)` where up is 0).
fn glu(be: &CudaBackend, dtype: DType, out: u64, gate: u64, up: u64, act: GluAct, n: u64) -> Result<()> {
    let s = suffix("swiglu", dtype)?;
    let kernel = match (act, up == 0) {
        (GluAct::Silu, false) => "swiglu",
        (GluAct::GeluTanh, false) => "geglu",
        // The exact GELU, ReLU, and an MLP without a gate (up null): one kernel for every activation.
        (act, _) => return be.launch(&format!("glu_act_{s}"), cover(n, 256), (256, 1, 1), &[&out, &gate, &up, &(act as u32), &n]),
    };
    be.launch(&format!("{kernel}_{s}"), cover(n, 256), (256, 1, 1), &[&out, &gate, &up, &n])
}

/// Token-expert pairs up to which a mixture runs wholly on the device: the router's choice made
/// there (`moe_route_*`), each pair's expert reading its weights for its one token (`moe_glu_*`,
/// `moe_down_*`), no read to the host, so a decode step stays one graph; also wherever the pairs
/// are no more than the experts. Past it each expert's weights would be read once per pair, so the
/// host routes (a read of the scores, which ends a step recorded as a graph there) and each
/// expert's tokens go through one GEMM together, as the model's own path runs them. (A guess until
/// a GPU times both.)
const MOE_DEVICE_PAIRS: usize = 16;

/// Rows of an expert's weight a block of `moe_glu_*` and `moe_down_*` takes (a warp each).
const MOE_ROWS: usize = 8;

/// A mixture of experts' routed MLPs (see `Moe`), its experts stacked ([E, I, H], [E, I, H], [E,
/// H, I]); both ways end in `moe_combine_*`: each token's weighted sum over its experts in
/// ascending order, each add rounded (`index_add`'s arithmetic, from zero).
pub fn moe(be: &CudaBackend, st: &mut OpState, op: &Moe) -> Result<()> {
    let act = op.x.dtype;
    let s = suffix("moe", act)?;
    let elt = act.storage_bytes(1).unwrap_or(4);
    let ((t, h), (e, i), k) = ((op.x.dims()[0], op.x.dims()[1]), (op.gate.dims()[0], op.gate.dims()[1]), op.top_k as usize);
    let (out, x, logits) = (be.ptr("out", &op.out)?, be.ptr("x", &op.x)?, be.ptr("logits", &op.logits)?);
    let (gate, up, down) = (be.ptr("gate", &op.gate)?, be.ptr("up", &op.up)?, be.ptr("down", &op.down)?);
    let (h32, i32_, e32, k32) = (h as u32, i as u32, e as u32, op.top_k);
    let (shared, shared_gate) = (be.opt_ptr("shared", &op.shared)?, be.opt_ptr("shared_gate", &op.shared_gate)?);
    let pairs = t * k;
    if pairs <= MOE_DEVICE_PAIRS.max(e) {
        let (ids_b, w_b, a_b) = (align(pairs * 4), align(pairs * 4), align(pairs * i * elt));
        let (work, _) = be.upload(st, ids_b + w_b + a_b + align(pairs * h * elt), &[])?;
        let (ids, weights, a, y) = (work, work + ids_b as u64, work + (ids_b + w_b) as u64, work + (ids_b + w_b + a_b) as u64);
        let (pairs32, warps) = (pairs as u32, (MOE_ROWS * 32) as u32);
        be.launch(&format!("moe_route_{s}"), (t as u32, 1, 1), (32, 1, 1), &[&ids, &weights, &logits, &e32, &k32, &op.renormalize])?;
        // SwiGLU's experts of 16-bit weights on the matrix-vector kernel's rows (16-byte loads,
        // several in flight a lane); others a warp a row, an element a lane at a time.
        let aligned = [x, gate, up, down].iter().all(|p| p % 16 == 0) && h % 8 == 0 && i % 8 == 0;
        if matches!(act, DType::BF16 | DType::F16) && op.act == GluAct::Silu && aligned {
            let (g, threads) = (be.gemv_shape, be.gemv_shape.threads());
            let glu_blocks = (i.div_ceil(g.glu_rows_per_block()) as u32, pairs32, 1);
            be.launch(&format!("moe_gemv_glu_{s}"), glu_blocks, (threads, 1, 1), &[&a, &x, &gate, &up, &ids, &k32, &h32, &i32_, &e32])?;
            let down_blocks = (h.div_ceil(g.rows_per_block()) as u32, pairs32, 1);
            be.launch(&format!("moe_gemv_down_{s}"), down_blocks, (threads, 1, 1), &[&y, &a, &down, &ids, &i32_, &h32, &e32])?;
        } else {
            let glu_blocks = (i.div_ceil(MOE_ROWS) as u32, pairs32, 1);
            be.launch(&format!("moe_glu_{s}"), glu_blocks, (warps, 1, 1), &[&a, &x, &gate, &up, &ids, &k32, &h32, &i32_, &e32, &(op.act as u32)])?;
            be.launch(&format!("moe_down_{s}"), (h.div_ceil(MOE_ROWS) as u32, pairs32, 1), (warps, 1, 1), &[&y, &a, &down, &ids, &i32_, &h32, &e32])?;
        }
        let slots = 0u64;
        let combine = [&out as &dyn crate::KernelArg, &y, &slots, &weights, &k32, &h32, &shared, &shared_gate];
        return be.launch(&format!("moe_combine_{s}"), (t as u32, 1, 1), (ROW_THREADS, 1, 1), &combine);
    }
    // The host routes: the scores read (after the ops before, a step recorded so far run).
    be.end_step_in_op(st)?;
    let (mut bytes, mut scores) = (vec![0u8; t * e * elt], vec![0f32; t * e]);
    // SAFETY: the scores' tensor holds t x e elements of its dtype (validated; checked by `ptr`);
    // the copy waits for the work queued before it.
    unsafe { be.driver.dtoh(&mut bytes, logits) }?;
    highrise_core::quant::dequantize(act, &bytes, &mut scores)?;
    // The pairs expert by expert (each expert's tokens together, ascending), and each token's k of
    // them in ascending expert order: slot t k + j holds its j-th pair's place and weight.
    let routes = route(&scores, e, k, op.renormalize == 1);
    let (mut tokens, mut slots, mut weights, mut filled) = (Vec::with_capacity(pairs), vec![0u32; pairs], vec![0f32; pairs], vec![0usize; t]);
    for (rows, ws) in &routes {
        for (&row, &w) in rows.iter().zip(ws) {
            let at = row as usize * k + filled[row as usize];
            (slots[at], weights[at]) = (tokens.len() as u32, act.rounded(w));
            filled[row as usize] += 1;
            tokens.push(row);
        }
    }
    // Workspace: the pairs' rows of x [P, H], gate and up products and activations [P, I] each, and
    // the experts' outputs [P, H].
    let (xh, xi) = (align(pairs * h * elt), align(pairs * i * elt));
    let (work, addr) = be.upload(st, 2 * xh + 3 * xi, &[bytes_of(&tokens), bytes_of(&slots), bytes_of(&weights)])?;
    let (xs, g, u, a, ys) = (work, work + xh as u64, work + (xh + xi) as u64, work + (xh + 2 * xi) as u64, work + (xh + 3 * xi) as u64);
    let (p32, one) = (pairs as u32, 1.0f32);
    be.launch(&format!("embedding_{s}"), (p32, 1, 1), (ROW_THREADS, 1, 1), &[&xs, &x, &(act as u32), &addr[0], &h32, &one])?;
    let mut first = 0usize;
    for (n, (rows, _)) in routes.iter().enumerate().filter(|(_, r)| !r.0.is_empty()) {
        let (rows, at) = (rows.len(), |base: u64, width: usize| base + (first * width * elt) as u64);
        let matrix = |base: u64| base + (n * i * h * elt) as u64;
        let proj = |out, x, w, k, n| Proj { out, x, w, bias: 0, act, w_dt: act, bias_dt: 0, t: rows, k, n, accumulate: false };
        // Same dtypes, no bias, nothing accumulated: no workspace (`Proj::work_bytes`).
        project(be, &proj(at(g, i), at(xs, h), matrix(gate), h, i), 0)?;
        project(be, &proj(at(u, i), at(xs, h), matrix(up), h, i), 0)?;
        glu(be, act, at(a, i), at(g, i), at(u, i), op.act, (rows * i) as u64)?;
        project(be, &proj(at(ys, h), at(a, i), matrix(down), i, h), 0)?;
        first += rows;
    }
    be.launch(&format!("moe_combine_{s}"), (t as u32, 1, 1), (ROW_THREADS, 1, 1), &[&out, &ys, &addr[1], &addr[2], &k32, &h32, &shared, &shared_gate])
}

/// The logits' soft-cap, in place (`softcap_*`, kernels/sampling.cu).
pub fn softcap(be: &CudaBackend, op: &Softcap) -> Result<()> {
    let s = suffix("softcap", op.x.dtype)?;
    let n = op.x.numel() as u64;
    let (x, cap) = (be.ptr("x", &op.x)?, op.cap);
    be.launch(&format!("softcap_{s}"), cover(n, 256), (256, 1, 1), &[&x, &cap, &n])
}

/// Greedy choice per row of logits: a block of 1024 threads per row.
pub fn argmax(be: &CudaBackend, op: &Argmax) -> Result<()> {
    let s = suffix("argmax", op.x.dtype)?;
    let [rows, v] = [op.x.dims()[0], op.x.dims()[1]];
    if rows == 0 {
        return Ok(());
    }
    let (index, logprob, x) = (be.ptr("index", &op.index)?, be.ptr("logprob", &op.logprob)?, be.ptr("x", &op.x)?);
    be.launch(&format!("argmax_{s}"), (rows as u32, 1, 1), (1024, 1, 1), &[&index, &logprob, &x, &(v as u32)])
}

/// A draw per row of logits by its settings (`SampleParams`, 24 bytes each, uploaded): a block of
/// 512 threads per row (1024 would leave too few registers for f64 exp without spilling), which finds the kept run and the drawn token by radix selection instead of
/// sorting the vocabulary.
pub fn sample(be: &CudaBackend, st: &mut OpState, op: &Sample) -> Result<()> {
    let s = suffix("sample", op.x.dtype)?;
    let [rows, v] = [op.x.dims()[0], op.x.dims()[1]];
    if rows == 0 {
        return Ok(());
    }
    let (index, logprob, x) = (be.ptr("index", &op.index)?, be.ptr("logprob", &op.logprob)?, be.ptr("x", &op.x)?);
    let (_, addr) = be.upload(st, 0, &[bytes_of(op.params.as_slice())])?;
    be.launch(&format!("sample_{s}"), (rows as u32, 1, 1), (512, 1, 1), &[&index, &logprob, &x, &addr[0], &(v as u32)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_slices_fill_whole_waves() {
        // An H200 holding 3 blocks an SM: 396 slots.
        assert_eq!(decode_splits(8, 396), 48, "batch 1, 8 KV heads: one wave");
        assert_eq!(decode_splits(64, 396), 6, "batch 8");
        assert_eq!(decode_splits(512, 396), 3, "batch 64: 1536 blocks, 97% of 4 waves");
        assert_eq!(decode_splits(396, 396), 1);
        assert_eq!(decode_splits(1, 1), 1);
        for blocks in 1..600 {
            assert!((1..=DECODE_SPLITS_MAX).contains(&decode_splits(blocks, 396)));
        }
    }

    #[test]
    fn the_merge_limits_are_the_kernels() {
        let src = crate::kernels::FILES.iter().find(|(n, _)| *n == "attention.cu").unwrap().1;
        assert!(src.contains(&format!("#define COMBINE_MAX {COMBINE_MAX}\n")), "attention.cu's COMBINE_MAX is ops::COMBINE_MAX");
        assert!(src.contains(&format!("#define DECODE_SPLITS_MAX {DECODE_SPLITS_MAX}\n")), "attention.cu's DECODE_SPLITS_MAX");
        // decode_attn's merge keeps 16 rows' maxima and sums of every slice in its stages' memory.
        for warps in [2, 4, 8] {
            for stages in 2..=4 {
                let shape = crate::flash::DecodeShape { warps, stages };
                for d in [64, 128] {
                    assert!(shape.shared_bytes(d) as usize >= 2 * 16 * DECODE_SPLITS_MAX as usize * 4, "{shape} d{d}");
                }
            }
        }
    }

    #[test]
    fn query_rows_see_their_own_prefix() {
        let r = prefill_rows(&[2, 3], true);
        assert_eq!(r.base, vec![0, 0, 2, 2, 2]);
        assert_eq!(r.nkeys, vec![1, 2, 1, 2, 3]);
        assert_eq!(prefill_rows(&[2, 3], false).nkeys, vec![2, 2, 3, 3, 3]);
        // A decode step (1 query after 9 cached tokens) and a 2-token chunk after 4.
        let r = paged_rows(&[
            PagedSeq { q_len: 1, context_len: 10, blocks_start: 0 },
            PagedSeq { q_len: 2, context_len: 6, blocks_start: 3 },
        ]);
        assert_eq!(r.base, vec![0, 3, 3]);
        assert_eq!(r.nkeys, vec![10, 5, 6]);
    }
}

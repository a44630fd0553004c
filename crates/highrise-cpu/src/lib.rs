//! highrise-cpu: the CPU reference backend. Correct first (every op is checked against an f64
//! reference), then fast on a few cores: a team of threads across rows, a SIMD GEMM for prefill, AVX2/FMA dot
//! products for decode. Activations are f32, f16 or bf16 in memory and f32 in arithmetic.
//!
//! Built as a `cdylib`, it is the plugin `libhighrise_cpu.so` that the engine loads at run time; built
//! as an `rlib`, [`CpuBackend`] can be used directly.

mod attention;
mod float;
mod linear;
mod mlp;
mod quant;
mod residual;
mod sampling;
mod simd;
mod storage;
mod team;

use std::sync::atomic::{AtomicUsize, Ordering};

use highrise_core::ops::{Op, OpKind};
use highrise_core::plugin::Exportable;
use highrise_core::{Backend, BackendInfo, DType, Error, Handle, Result};

use storage::{Storage, Tensors};

/// The CPU backend: a team of `HIGHRISE_THREADS` threads (default: all cores), the thread that runs
/// an op among them.
pub struct CpuBackend {
    id: usize,
    team: team::Team,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

impl CpuBackend {
    pub fn new(threads: Option<usize>) -> Result<CpuBackend> {
        let threads = threads.unwrap_or_else(|| {
            std::env::var("HIGHRISE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        });
        // The thread that runs an op works on it with the team's helpers, so an op starts at once
        // instead of being handed to another thread and waited for (hundreds of times per token).
        let team = team::Team::new(threads, "highrise-cpu")
            .map_err(|e| Error::Backend(format!("cpu: cannot start {threads} threads: {e}")))?;
        Ok(CpuBackend { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), team })
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    fn tensors(&self) -> Tensors<'_> {
        Tensors { owner: self.id, team: &self.team }
    }
}

fn simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if quant::vnni::available() {
        return "AVX2+FMA, AVX-512 VNNI";
    }
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        return "AVX2+FMA";
    }
    "portable SIMD"
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cpu".into(), device: format!("{} threads, {}", self.threads(), simd()) }
    }

    fn supports(&self, op: OpKind, dtype: DType) -> bool {
        // Weight tables (embedding, linear) may be any dtype, quantized ones included; activations
        // are floats. Rows interleaved by 8 are for the linear op alone (a gather needs whole rows).
        match op {
            OpKind::Linear => true,
            OpKind::Embedding => dtype.interleaved_rows() == 1,
            // The model routes a mixture on the host here (its experts kept apart, quantized or not).
            OpKind::Moe => false,
            _ => dtype.is_float(),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Handle> {
        Storage::alloc(self.id, bytes)
    }

    unsafe fn free(&self, handle: Handle) {
        Storage::free(self.id, handle)
    }

    unsafe fn import(&self, ptr: *const u8, bytes: usize) -> Result<Option<Handle>> {
        Ok(Storage::import(self.id, ptr, bytes))
    }

    fn write(&self, handle: Handle, offset: usize, bytes: &[u8]) -> Result<()> {
        let dst = Storage::get(self.id, handle)?.writable()?.range(offset, bytes.len())?;
        // SAFETY: the range is inside the allocation (checked) and the host holds the tensor.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        Ok(())
    }

    fn read(&self, handle: Handle, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = Storage::get(self.id, handle)?.range(offset, out.len())?;
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn copy(&self, dst: Handle, dst_offset: usize, src: Handle, src_offset: usize, bytes: usize) -> Result<()> {
        let from = Storage::get(self.id, src)?.range(src_offset, bytes)?;
        let to = Storage::get(self.id, dst)?.writable()?.range(dst_offset, bytes)?;
        // SAFETY: both ranges are inside their allocations (checked); `copy` handles overlap, should
        // the caller pass overlapping ranges of one allocation.
        unsafe { std::ptr::copy(from, to, bytes) };
        Ok(())
    }

    fn run(&self, op: &Op<'_>) -> Result<()> {
        op.validate()?;
        if !self.supports(op.kind(), op.dtype()) {
            return Err(Error::Unsupported(format!(
                "{}: the cpu backend does not support {}",
                op.kind(),
                op.dtype()
            )));
        }
        let ts = self.tensors();
        match op {
            Op::Embedding(o) => residual::embedding(&ts, o),
            Op::RmsNorm(o) => residual::rms_norm(&ts, o),
            Op::AddRmsNorm(o) => residual::add_rms_norm(&ts, o),
            Op::Linear(o) => linear::linear(&ts, o),
            Op::Rope(o) => attention::rope(&ts, o),
            Op::Attention(o) => attention::attention(&ts, o),
            Op::KvWrite(o) => attention::kv_write(&ts, o),
            Op::PagedAttention(o) => attention::paged_attention(&ts, o),
            Op::SwiGlu(o) => mlp::swiglu(&ts, o),
            Op::Argmax(o) => sampling::argmax(&ts, o),
            Op::Sample(o) => sampling::sample(&ts, o),
            Op::SwiGluLinear(o) => mlp::swiglu_linear(&ts, o),
            Op::Softcap(o) => sampling::softcap(&ts, o),
            Op::IndexAdd(o) => residual::index_add(&ts, o),
            Op::LayerNorm(o) => residual::layer_norm(&ts, o),
            Op::Moe(_) => Err(Error::Unsupported("moe: the cpu backend routes a mixture on the host (it declines this op)".into())),
            Op::QkvLinear(o) => mlp::normed(&ts, o.x, o.norm, o.eps, |x| {
                o.parts_reading(x).iter().try_for_each(|part| linear::linear(&ts, part))
            }),
            Op::RopeKvWrite(o) => {
                // The three ops it fuses, in order: the same numbers, one call.
                let (q, k, write) = o.parts();
                attention::rope(&ts, &q)?;
                attention::rope(&ts, &k)?;
                attention::kv_write(&ts, &write)
            }
        }
    }
}

impl Exportable for CpuBackend {
    const NAME: &'static str = "cpu";

    fn probe() -> Result<()> {
        Ok(())
    }

    fn create() -> Result<Self> {
        CpuBackend::new(None)
    }
}

highrise_core::export_backend!(CpuBackend);

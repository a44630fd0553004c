//! highrise-cuda: the CUDA backend, over cudarc. Kernels (`kernels/` at the top of the repository)
//! are compiled at run time with NVRTC for the device's own architecture (sm_90a on Hopper) and
//! cached on disk; GEMMs go through cuBLAS (f32 accumulation, bf16/f16 in).
//!
//! It builds with no CUDA installed: libcuda, libnvrtc and libcublas are loaded at run time, and where
//! one is missing, or there is no device, the backend reports itself unusable with the reason (the
//! plugin's `probe`), never panicking. Built as a `cdylib` it is the plugin `libhighrise_cuda.so`.
//!
//! Memory: one device buffer per tensor, from a caching allocator; ops run one at a time, in order,
//! on the context's default stream; per-op metadata (token ids, positions, slots, block tables) is
//! uploaded once per content (see `memory`); attention's partial results and the mixed-dtype GEMM's
//! copies live in one reusable scratch buffer.

pub mod kernels;
pub mod libs;
mod memory;
pub mod nvrtc;
mod ops;

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};
use highrise_core::ops::{Op, OpKind};
use highrise_core::plugin::Exportable;
use highrise_core::{Backend, BackendInfo, DType, Error, Handle, Result, TensorRef};

/// A device allocation, behind a `Handle`.
struct DevBuf {
    magic: u64,
    owner: usize,
    ptr: drv_sys::CUdeviceptr,
    bytes: usize,
    /// The allocator's size class, which the buffer returns to.
    class: usize,
}

const MAGIC: u64 = 0x6375_6461_6275_6631; // "cudabuf1"

/// A kernel entry point. CUfunction handles may be used from any thread of the process.
#[derive(Clone, Copy)]
struct Func(drv_sys::CUfunction);
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

struct Blas(cudarc::cublas::sys::cublasHandle_t);
unsafe impl Send for Blas {}

/// What an op uses besides its tensors, held (locked) for the whole op: one op at a time.
struct OpState {
    /// Workspace reused by every op.
    scratch: drv_sys::CUdeviceptr,
    scratch_bytes: usize,
    uploads: memory::UploadCache,
}

pub struct CudaBackend {
    id: usize,
    ctx: Arc<CudaContext>,
    device: String,
    arch: String,
    sms: u32,
    functions: HashMap<String, Func>,
    blas: Mutex<Blas>,
    state: Mutex<OpState>,
    buffers: Mutex<memory::BufferCache>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn driver_err(what: &str) -> impl Fn(drv::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("cuda: {what}: {e:?}"))
}

/// Checks that the driver library loads and a device exists, without letting cudarc panic.
pub fn probe() -> Result<()> {
    // SAFETY: cudarc's probe only tries to load libcuda by its names.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err(Error::Backend("cuda: no NVIDIA driver (libcuda.so could not be loaded)".into()));
    }
    drv::init().map_err(driver_err("cuInit"))?;
    let n = drv::device::get_count().map_err(driver_err("cuDeviceGetCount"))?;
    if n < 1 {
        return Err(Error::Backend("cuda: the driver is installed but there is no CUDA device".into()));
    }
    nvrtc::ensure_loaded()?;
    libs::preload("cublas", cudarc::cublas::sys::is_culib_present, "cublas")
        .map_err(|e| Error::Backend(format!("cuda: {e}; install one, e.g. `pip install nvidia-cublas==13.0.*`")))?;
    Ok(())
}

/// The NVRTC architecture name for a compute capability: sm_90a on Hopper, so that its own features
/// (wgmma, the tensor memory accelerator) are available; sm_XY elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel for it, and starts
    /// cuBLAS.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating the context"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err("compute capability"))?;
        let arch = arch_for(major, minor);
        let device = ctx.name().map_err(driver_err("device name"))?;
        let sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("multiprocessor count"))? as u32;
        let mut functions = HashMap::new();
        for (name, ptx) in nvrtc::compile_all(&arch)? {
            let image = CString::new(ptx).map_err(|_| Error::Backend(format!("cuda: PTX of {name} has a NUL byte")))?;
            // SAFETY: the context is current (bound by CudaContext::new); image is NUL-terminated PTX.
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(driver_err(&format!("loading the module of {name}")))?;
            for symbol in ptx_entries(image.to_str().unwrap_or_default()) {
                let c = CString::new(symbol.clone()).expect("PTX symbols have no NUL");
                // SAFETY: module is live (never unloaded: kernels live as long as the process).
                let f = unsafe { drv::module::get_function(module, c) }.map_err(driver_err(&format!("kernel {symbol}")))?;
                functions.insert(symbol, Func(f));
            }
        }
        let blas = cudarc::cublas::result::create_handle().map_err(|e| Error::Backend(format!("cuda: cublasCreate: {e:?}")))?;
        Ok(CudaBackend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ctx,
            device: format!("{device} ({arch}, {sms} SMs)"),
            arch,
            sms,
            functions,
            blas: Mutex::new(Blas(blas)),
            state: Mutex::new(OpState { scratch: 0, scratch_bytes: 0, uploads: memory::UploadCache::default() }),
            buffers: Mutex::new(memory::BufferCache::default()),
        })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Device-to-device copy bandwidth, bytes read + written per second (best of `reps` copies of
    /// `bytes`): the ceiling for anything that streams weights or the KV cache.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        self.bind()?;
        // SAFETY: the context is bound; both buffers are freed below.
        let (src, dst) = unsafe {
            (
                drv::malloc_sync(bytes).map_err(driver_err("copy benchmark buffer"))?,
                drv::malloc_sync(bytes).map_err(driver_err("copy benchmark buffer"))?,
            )
        };
        let mut best = f64::INFINITY;
        let mut outcome = Ok(());
        for _ in 0..reps.max(2) {
            let start = std::time::Instant::now();
            // SAFETY: both buffers hold `bytes`.
            outcome = unsafe { drv::memcpy_dtod_sync(dst, src, bytes) }.map_err(driver_err("cuMemcpyDtoD"));
            if outcome.is_err() {
                break;
            }
            self.ctx.synchronize().map_err(driver_err("synchronize"))?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        unsafe {
            let _ = drv::free_sync(src);
            let _ = drv::free_sync(dst);
        }
        outcome.map(|_| 2.0 * bytes as f64 / best)
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))
    }

    fn buf(&self, h: Handle) -> Result<&DevBuf> {
        if h.is_null() {
            return Err(Error::Invalid("cuda: null tensor handle".into()));
        }
        // SAFETY: handles reaching a backend point to a live header of some backend's allocation;
        // the magic and owner say whether it is ours.
        let b = unsafe { &*(h.0 as *const DevBuf) };
        if b.magic != MAGIC || b.owner != self.id {
            return Err(Error::Invalid(
                "cuda: tensor handle does not belong to this cuda backend (freed, or from another backend)".into(),
            ));
        }
        Ok(b)
    }

    /// The device address of an op's tensor, after checking that its allocation holds it.
    fn ptr(&self, name: &str, t: &TensorRef) -> Result<u64> {
        let b = self.buf(t.handle).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        let need = t
            .dtype
            .storage_bytes(t.numel())
            .ok_or_else(|| Error::Invalid(format!("{name}: {}{} is not a whole number of blocks", t.dtype, t.shape)))?;
        if need > b.bytes {
            return Err(Error::Invalid(format!(
                "{name}: {}{} needs {need} bytes but its allocation has {}",
                t.dtype, t.shape, b.bytes
            )));
        }
        Ok(b.ptr)
    }

    /// `ptr`, or 0 for an absent optional tensor.
    fn opt_ptr(&self, name: &str, t: &TensorRef) -> Result<u64> {
        if t.is_none() {
            Ok(0)
        } else {
            self.ptr(name, t)
        }
    }

    /// Launches kernel `name` on the default stream. Each argument is a reference to a value laid
    /// out as the kernel's parameter (device pointers as u64).
    fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[&dyn KernelArg]) -> Result<()> {
        let f = self
            .functions
            .get(name)
            .ok_or_else(|| Error::Unsupported(format!("cuda: no kernel {name} (not compiled for this build)")))?;
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.param()).collect();
        // SAFETY: the argument list matches the kernel's signature (kept together in ops.rs and the
        // .cu files, and checked on a GPU by tests/cuda.rs); every pointer was checked against its
        // allocation's size; the values live until this call returns, which copies them.
        unsafe { drv::launch_kernel(f.0, grid, block, 0, std::ptr::null_mut(), &mut params) }
            .map_err(driver_err(&format!("launching {name}")))
    }

    /// `extra` bytes of workspace (the scratch buffer, grown as needed) and the device address of a
    /// copy of each part (uploaded once per content). Both stay valid while `st` is held.
    fn upload(&self, st: &mut OpState, extra: usize, parts: &[&[u8]]) -> Result<(u64, Vec<u64>)> {
        // SAFETY: the context is bound; the scratch buffer is ours.
        unsafe { memory::grow(&mut st.scratch, &mut st.scratch_bytes, extra, 1 << 20, "scratch") }?;
        // SAFETY: the context is bound; `st` (held by the caller for the whole op) keeps other ops
        // from uploading before this op's kernels are queued.
        let addrs = parts.iter().map(|p| unsafe { st.uploads.get(p) }).collect::<Result<Vec<_>>>()?;
        Ok((st.scratch, addrs))
    }
}

/// A kernel parameter: its address, for cuLaunchKernel.
trait KernelArg {
    fn param(&self) -> *mut c_void;
}

impl<T: Copy> KernelArg for T {
    fn param(&self) -> *mut c_void {
        self as *const T as *mut c_void
    }
}

/// The `.entry` names of a PTX module.
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|rest| rest.split(['(', ' ']).next().unwrap_or_default().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Suffix of a kernel symbol for an activation dtype.
fn suffix(op: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::Unsupported(format!("{op}: the cuda backend does not support {other}"))),
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: "cuda".into(), device: self.device.clone() }
    }

    fn supports(&self, _op: OpKind, dtype: DType) -> bool {
        // Weights and activations in f32, f16 or bf16; quantized weights are converted at load.
        dtype.is_float()
    }

    fn alloc(&self, bytes: usize) -> Result<Handle> {
        self.bind()?;
        let class = memory::size_class(bytes);
        let mut cache = self.buffers.lock().map_err(|_| Error::Backend("cuda: allocator lock poisoned".into()))?;
        // SAFETY: the context is bound.
        let ptr = unsafe { cache.alloc(class) }
            .map_err(|e| Error::OutOfMemory(format!("cuda: cannot allocate {bytes} bytes on {}: {e}", self.device)))?;
        let b = Box::new(DevBuf { magic: MAGIC, owner: self.id, ptr, bytes, class });
        Ok(Handle(Box::into_raw(b) as *mut _))
    }

    unsafe fn free(&self, handle: Handle) {
        if let Ok(b) = self.buf(handle) {
            let b = b as *const DevBuf as *mut DevBuf;
            (*b).magic = 0;
            let b = Box::from_raw(b);
            // Back to the cache: the next op that needs this size takes it (ops run in order on
            // one stream, so whatever still reads it is queued before that op).
            if let Ok(mut cache) = self.buffers.lock() {
                cache.put(b.class, b.ptr);
            }
        }
    }

    fn write(&self, handle: Handle, offset: usize, bytes: &[u8]) -> Result<()> {
        let b = self.buf(handle)?;
        range_check(b, offset, bytes.len())?;
        self.bind()?;
        // SAFETY: the range is inside the allocation (checked).
        unsafe { drv::memcpy_htod_sync(b.ptr + offset as u64, bytes) }.map_err(driver_err("copying to the device"))
    }

    fn read(&self, handle: Handle, offset: usize, out: &mut [u8]) -> Result<()> {
        let b = self.buf(handle)?;
        range_check(b, offset, out.len())?;
        self.bind()?;
        // SAFETY: as in `write`; the copy waits for the kernels queued before it.
        unsafe { drv::memcpy_dtoh_sync(out, b.ptr + offset as u64) }.map_err(driver_err("copying from the device"))
    }

    fn run(&self, op: &Op<'_>) -> Result<()> {
        op.validate()?;
        if !self.supports(op.kind(), op.dtype()) {
            return Err(Error::Unsupported(format!("{}: the cuda backend does not support {}", op.kind(), op.dtype())));
        }
        self.bind()?;
        let mut st = self.state.lock().map_err(|_| Error::Backend("cuda: op state lock poisoned".into()))?;
        let st = &mut *st;
        match op {
            Op::Embedding(o) => ops::embedding(self, st, o),
            Op::RmsNorm(o) => ops::rms_norm(self, o),
            Op::AddRmsNorm(o) => ops::add_rms_norm(self, o),
            Op::Linear(o) => ops::linear(self, st, o),
            Op::Rope(o) => ops::rope(self, st, o),
            Op::Attention(o) => ops::attention(self, st, o),
            Op::KvWrite(o) => ops::kv_write(self, st, o),
            Op::PagedAttention(o) => ops::paged_attention(self, st, o),
            Op::SwiGlu(o) => ops::swiglu(self, o),
            Op::Argmax(o) => ops::argmax(self, o),
            Op::Sample(o) => ops::sample(self, st, o),
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.ctx.synchronize().map_err(driver_err("synchronize"))
    }
}

fn range_check(b: &DevBuf, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= b.bytes => Ok(()),
        _ => Err(Error::Invalid(format!(
            "cuda: bytes {offset}..{} are outside an allocation of {}",
            offset.saturating_add(len),
            b.bytes
        ))),
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        if let Ok(b) = self.blas.get_mut() {
            // SAFETY: the handle is ours and no op runs (we are being dropped).
            unsafe {
                let _ = cudarc::cublas::result::destroy_handle(b.0);
            }
        }
        if let Ok(st) = self.state.get_mut() {
            // SAFETY: the context is bound; nothing runs (we are being dropped).
            unsafe {
                st.uploads.release_all();
                if st.scratch != 0 {
                    let _ = drv::free_sync(st.scratch);
                }
            }
        }
        if let Ok(cache) = self.buffers.get_mut() {
            // SAFETY: as above; tensors still alive hold their own buffers (and this backend).
            unsafe { cache.release_all() };
        }
    }
}

impl Exportable for CudaBackend {
    const NAME: &'static str = "cuda";

    fn probe() -> Result<()> {
        probe()
    }

    fn create() -> Result<Self> {
        let ordinal = std::env::var("HIGHRISE_CUDA_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        CudaBackend::new(ordinal)
    }
}

highrise_core::export_backend!(CudaBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_entry_names_are_read() {
        let ptx = ".version 8.0\n.visible .entry rms_norm_f32(\n\t.param .u64 a\n)\n.visible .entry swiglu_bf16(\n";
        assert_eq!(ptx_entries(ptx), vec!["rms_norm_f32", "swiglu_bf16"]);
    }

    #[test]
    fn hopper_gets_its_arch_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
    }
}

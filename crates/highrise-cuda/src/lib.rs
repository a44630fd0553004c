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
//! copies live in one reusable scratch buffer. Steps marked by `graph_begin`/`graph_end` are
//! recorded and run as CUDA graphs (see `graph`).

pub mod driver;
pub mod emu;
pub mod flash;
pub mod gemv;
mod graph;
pub mod kernels;
pub mod libs;
pub mod lt;
mod memory;
pub mod nvrtc;
mod ops;
pub mod ptx;
pub mod recording;
pub mod tma;
pub mod wgmma_check;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys as drv_sys};
use driver::{Driver, Gemm, Launch, Param, Region};
use highrise_core::ops::{Op, OpKind};
use highrise_core::plugin::Exportable;
use highrise_core::tensor::HandleHeader;
use highrise_core::{Backend, BackendInfo, DType, Error, Handle, Result, TensorRef};

/// A device allocation, behind a `Handle`.
#[repr(C)]
struct DevBuf {
    header: HandleHeader,
    ptr: u64,
    bytes: usize,
    /// The allocator's size class, which the buffer returns to.
    class: usize,
}

const MAGIC: u64 = 0x6375_6461_6275_6631; // "cudabuf1"

/// What an op uses besides its tensors, held (locked) for the whole op: one op at a time.
struct OpState {
    /// Workspace reused by every op.
    scratch: u64,
    scratch_bytes: usize,
    /// The workspace of ops recorded in a graph step, apart from `scratch`: graphs hold its
    /// address, and a prompt's projections (their workspace grows with the prompt's tokens) would
    /// otherwise move it now and then, after which no graph kept matched a step again. It grows
    /// only with the largest decode batch run as a graph.
    graph_scratch: u64,
    graph_scratch_bytes: usize,
    uploads: memory::UploadCache,
    /// The op running (its kind's name), for staging its host arrays in a graph step.
    op: &'static str,
    /// The device copy of a graph step's staged host arrays: address, bytes, and the most a step
    /// has needed (the buffer grows to it at the next `graph_begin`).
    meta: u64,
    meta_bytes: usize,
    meta_need: usize,
    graphs: graph::Graphs,
    /// Blocks an SM holds at once, per kernel asked: (threads, shared bytes, blocks) (`Driver::blocks_per_sm`).
    occupancy: std::collections::HashMap<String, Vec<(u32, u32, u32)>>,
    /// decode_attn's slice counters (u32s, zero between launches: `slice_counters`).
    counters: u64,
    counters_bytes: usize,
}

pub struct CudaBackend {
    id: usize,
    driver: Arc<dyn Driver>,
    device: String,
    arch: String,
    sms: u32,
    /// The prefill kernel's tile shapes, as its kernels were compiled (`flash::shapes`).
    flash_shapes: Vec<(usize, flash::Shape)>,
    /// The Hopper kernels' geometries, likewise (`flash::wg_shapes`).
    flash_wg_shapes: Vec<(usize, flash::Shape)>,
    /// `flash_attn_ws`'s, likewise (`flash::ws_shapes`).
    flash_ws_shapes: Vec<(usize, flash::WsShape)>,
    /// The decode kernel's shape, likewise (`flash::decode_shape`).
    decode_shape: flash::DecodeShape,
    /// The matrix-vector kernels' shape, likewise (`gemv::gemv_shape`).
    gemv_shape: gemv::GemvShape,
    /// Prefill on a Hopper kernel (`flash::wgmma`), decided once with the shapes.
    flash_wgmma: Option<flash::Wg>,
    state: Mutex<OpState>,
    buffers: Mutex<memory::BufferCache>,
    /// The step being recorded between `graph_begin` and `graph_end` (see `graph`).
    recording: Mutex<Option<graph::Step>>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

use driver::driver_err;

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
    // cuBLASLt (the same wheel): without it GEMMs run as cublasGemmEx chooses (lt.rs).
    let _ = libs::preload("cublasLt", cudarc::cublaslt::sys::is_culib_present, "cublas");
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
        Ok(CudaBackend::with_driver(Arc::new(driver::CudaDriver::new(ordinal)?)))
    }

    /// The backend over any driver: the real one, or `recording::RecordingDriver`, which checks
    /// every launch on a machine without a GPU.
    pub fn with_driver(driver: Arc<dyn Driver>) -> CudaBackend {
        let info = driver.device();
        CudaBackend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            device: format!("{} ({}, {} SMs)", info.name, info.arch, info.sms),
            // The driver compiled the kernels with these shapes a moment ago (and refused a bad
            // HIGHRISE_FLASH_SHAPE then); the default is never reached.
            flash_shapes: flash::shapes(&info.arch).unwrap_or_else(|_| flash::HEAD_DIMS.map(|d| (d, flash::DEFAULT)).to_vec()),
            flash_wg_shapes: flash::wg_shapes(&info.arch).unwrap_or_else(|_| flash::HEAD_DIMS.map(|d| (d, flash::WG_DEFAULT)).to_vec()),
            flash_ws_shapes: flash::ws_shapes().unwrap_or_else(|_| flash::WS_DEFAULT.to_vec()),
            decode_shape: flash::decode_shape(&info.arch).unwrap_or(flash::DECODE_DEFAULT),
            gemv_shape: gemv::gemv_shape(&info.arch).unwrap_or(gemv::GEMV_DEFAULT),
            flash_wgmma: flash::wgmma(&info.arch),
            arch: info.arch,
            sms: info.sms,
            driver,
            state: Mutex::new(OpState {
                scratch: 0,
                scratch_bytes: 0,
                graph_scratch: 0,
                graph_scratch_bytes: 0,
                uploads: memory::UploadCache::default(),
                op: "",
                meta: 0,
                meta_bytes: 0,
                meta_need: 64 << 10,
                graphs: graph::Graphs::default(),
                occupancy: Default::default(),
                counters: 0,
                counters_bytes: 0,
            }),
            buffers: Mutex::new(memory::BufferCache::default()),
            recording: Mutex::new(None),
        }
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Prefill on a Hopper kernel (`flash::Wg`: wgmma) or not (None: mma.sync's), whatever
    /// `HIGHRISE_FLASH_KERNEL` said; an error where the device is not Hopper (sm_90a).
    pub fn set_flash_wgmma(&mut self, wg: Option<flash::Wg>) -> Result<()> {
        if let Some(wg) = wg.filter(|_| self.arch != "sm_90a") {
            return Err(Error::Unsupported(format!("{}: wgmma needs Hopper (sm_90a); this device is {}", wg.kernel(), self.arch)));
        }
        self.flash_wgmma = wg;
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        self.driver.bind()
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, OpState>> {
        self.state.lock().map_err(|_| Error::Backend("cuda: op state lock poisoned".into()))
    }

    /// The step being recorded, if any (see `graph`).
    fn recording(&self) -> std::sync::MutexGuard<'_, Option<graph::Step>> {
        self.recording.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a step's recorded work op by op (its staging copy first) and frees what it retired.
    fn queue_step(&self, st: &mut OpState, mut step: graph::Step, as_graph: bool) -> Result<()> {
        let drv = &*self.driver;
        let retired = std::mem::take(&mut step.retired);
        let queued = if step.is_empty() {
            Ok(())
        } else {
            // SAFETY: the context is bound (callers bind); each half of meta holds what was staged
            // in it (checked as each array was staged; the buffer grows only between steps); the
            // recorded addresses are live: the buffers they were taken from are freed only
            // through `retired`, below, or by ops queued after this work.
            unsafe {
                let staged = step.staging_bytes(st.meta_bytes).into_iter().filter(|(_, b)| !b.is_empty());
                staged.map(|(at, b)| drv.htod(st.meta + at as u64, b)).collect::<Result<()>>().and_then(|()| match as_graph {
                    true => st.graphs.run(drv, step),
                    false => {
                        st.graphs.stats.eager += 1;
                        step.queue(drv)
                    }
                })
            }
        };
        for p in retired {
            // SAFETY: retired buffers are ours; freeing waits for the work just queued.
            unsafe { drv.free(p) };
        }
        queued
    }

    /// Runs a step being recorded op by op, so that what follows sees its results (a read, a write,
    /// a copy in the middle of a step); the rest of the step runs op by op.
    fn flush(&self) -> Result<()> {
        let mut st = self.state()?;
        self.flush_locked(&mut st)
    }

    /// `flush`, with the op state held by the caller. Everything that queues device work holds it
    /// (ops, copies, reads, writes, `graph_end`), so no other thread's work lands inside a graph
    /// being captured (`Driver::begin_capture`'s contract).
    fn flush_locked(&self, st: &mut OpState) -> Result<()> {
        let Some(step) = self.recording().take() else { return Ok(()) };
        self.bind()?;
        self.queue_step(st, step, false)
    }

    /// Ends a step being recorded in the middle of an op (the rest of it runs op by op, this op's
    /// launches included), so that the op can stage more than a step holds or read what the ops
    /// before it wrote (`ops::moe`'s router scores).
    fn end_step_in_op(&self, st: &mut OpState) -> Result<()> {
        if let Some(step) = self.recording().take() {
            // This op's tensors, told to a checking driver again: its launches follow.
            let current = step.current_op();
            self.queue_step(st, step, false)?;
            if let Some((name, regions)) = current.filter(|_| self.driver.checks()) {
                self.driver.begin_op(&name, regions);
            }
        }
        Ok(())
    }

    fn buf(&self, h: Handle) -> Result<&DevBuf> {
        // SAFETY: DevBuf is repr(C) and starts with its HandleHeader.
        unsafe { h.owned(MAGIC, self.id, "cuda") }
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

    /// `Driver::blocks_per_sm`, asked once per kernel and launch size.
    fn blocks_per_sm(&self, st: &mut OpState, kernel: &str, threads: u32, shared_bytes: u32) -> Result<u32> {
        // Looked up by the name as given (no key built per launch: decode asks every layer).
        let known = st.occupancy.get(kernel).and_then(|v| v.iter().find(|e| (e.0, e.1) == (threads, shared_bytes)));
        if let Some(&(_, _, n)) = known {
            return Ok(n);
        }
        let n = self.driver.blocks_per_sm(kernel, threads, shared_bytes)?;
        st.occupancy.entry(kernel.to_string()).or_default().push((threads, shared_bytes, n));
        Ok(n)
    }

    /// Launches kernel `name` on the default stream. Each argument is a reference to a value laid
    /// out as the kernel's parameter (device pointers as u64).
    fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[&dyn KernelArg]) -> Result<()> {
        self.launch_shared(name, grid, block, 0, args)
    }

    /// `n` counters (u32) that are zero whenever no kernel runs: decode_attn's counts of the slices
    /// done, each put back to 0 by the block that merges them. One buffer for the backend's life,
    /// replaced by a larger zeroed one when a batch needs more (the old one, which recorded work may
    /// use, retired like the scratch buffer).
    fn slice_counters(&self, st: &mut OpState, n: usize) -> Result<u64> {
        let (drv, bytes) = (&*self.driver, 4 * n.max(1));
        if st.counters_bytes < bytes {
            let mut recording = self.recording();
            let retired = recording.as_mut().map(|step| &mut step.retired);
            // SAFETY: the context is bound; the buffer is ours; the old one is freed once the work
            // that may use it is queued; nothing uses the new one before it is zeroed.
            unsafe {
                memory::grow(drv, &mut st.counters, &mut st.counters_bytes, bytes, 4096, "slice counters", retired)?;
                drv.htod(st.counters, &vec![0u8; st.counters_bytes])?;
            }
        }
        if drv.checks() {
            self.region(Region { name: "slice counters".into(), ptr: st.counters, bytes, tensor: None });
        }
        Ok(st.counters)
    }

    /// `launch` with `shared_bytes` of dynamic shared memory per block.
    fn launch_shared(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        if let Some(step) = self.recording().as_mut() {
            // On the stack: a graph step records every launch of every layer.
            let mut sized = [(0, std::ptr::null_mut()); graph::MAX_ARGS];
            let n = args.len().min(sized.len());
            for (s, a) in sized.iter_mut().zip(args) {
                *s = (a.size(), a.param());
            }
            // More arguments than a recording holds: refused there (`given` is the whole count).
            step.push(graph::Work::launch(name, grid, block, shared_bytes, &sized[..n], args.len())?);
            return Ok(());
        }
        let params = kernel_params(args);
        // SAFETY: the argument list matches the kernel's signature (kept together in ops.rs and the
        // .cu files, and checked against the PTX by the recording driver in tests/cuda_host.rs);
        // every pointer was checked against its allocation's size; the values live until this call
        // returns, which copies them.
        unsafe { self.driver.launch(&Launch { kernel: name, grid, block, shared_bytes, params: &params }) }
    }

    /// Queues a GEMM (recorded in a graph step).
    ///
    /// # Safety
    /// The three matrices lie inside allocations of ours.
    unsafe fn gemm(&self, g: Gemm) -> Result<()> {
        if let Some(step) = self.recording().as_mut() {
            step.push(graph::Work::Gemm(g));
            return Ok(());
        }
        self.driver.gemm(&g)
    }

    /// `extra` bytes of workspace (the scratch buffer, grown as needed) and the device address of a
    /// copy of each part (uploaded once per content). Both stay valid while `st` is held.
    ///
    /// In a graph step the parts are staged (see `graph`) instead; when the step's metadata buffer
    /// is full, the step so far runs op by op and this op uploads as usual.
    fn upload(&self, st: &mut OpState, extra: usize, parts: &[&[u8]]) -> Result<(u64, Vec<u64>)> {
        let placed: Vec<(&[u8], graph::Place)> = parts.iter().map(|&p| (p, graph::Place::Shape)).collect();
        self.upload_placed(st, extra, &placed)
    }

    /// `upload` of `parts` and a paged cache's block `table` (its address last): in a graph step the
    /// table is staged where its growth from step to step moves no other array (`graph::Place`).
    fn upload_paged(&self, st: &mut OpState, extra: usize, parts: &[&[u8]], table: &[u8]) -> Result<(u64, Vec<u64>)> {
        let placed: Vec<(&[u8], graph::Place)> = parts.iter().map(|&p| (p, graph::Place::Shape)).chain([(table, graph::Place::Table)]).collect();
        self.upload_placed(st, extra, &placed)
    }

    fn upload_placed(&self, st: &mut OpState, extra: usize, parts: &[(&[u8], graph::Place)]) -> Result<(u64, Vec<u64>)> {
        let drv = &*self.driver;
        let staged = match self.recording().as_mut() {
            None => None,
            Some(step) => {
                // SAFETY: the context is bound; the workspace is ours; the old one, which
                // recorded work may use, is freed only once that work is queued.
                let (ws, ws_bytes) = (&mut st.graph_scratch, &mut st.graph_scratch_bytes);
                unsafe { memory::grow(drv, ws, ws_bytes, extra, 1 << 20, "graph workspace", Some(&mut step.retired)) }?;
                let addrs: Option<Vec<u64>> = parts.iter().enumerate().map(|(i, &(p, place))| step.stage(st.op, i, p, place, st.meta, st.meta_bytes)).collect();
                // Room to double what a step stages before the buffer must grow again.
                st.meta_need = st.meta_need.max(2 * step.meta_needed(0));
                if addrs.is_none() {
                    st.meta_need = st.meta_need.max(2 * step.meta_needed(parts.iter().map(|p| p.0.len() + 256).sum::<usize>()));
                }
                addrs.map(|a| (st.graph_scratch, a))
            }
        };
        let (work, addrs) = match staged {
            Some(staged) => staged,
            None => {
                self.end_step_in_op(st)?;
                // SAFETY: the context is bound; the scratch buffer is ours.
                unsafe { memory::grow(drv, &mut st.scratch, &mut st.scratch_bytes, extra, 1 << 20, "scratch", None) }?;
                // SAFETY: the context is bound; `st` (held by the caller for the whole op) keeps other ops
                // from uploading before this op's kernels are queued.
                (st.scratch, parts.iter().map(|p| unsafe { st.uploads.get(drv, p.0) }).collect::<Result<Vec<_>>>()?)
            }
        };
        if drv.checks() {
            self.region(Region { name: "workspace".into(), ptr: work, bytes: extra, tensor: None });
            for (i, (&ptr, p)) in addrs.iter().zip(parts).enumerate() {
                self.region(Region { name: format!("metadata #{i}"), ptr, bytes: p.0.len(), tensor: None });
            }
        }
        Ok((work, addrs))
    }

    /// One more region of the current op, for a checking driver (kept with a graph step's op).
    fn region(&self, r: Region) {
        match self.recording().as_mut() {
            Some(step) => step.region(r),
            None => self.driver.region(r),
        }
    }

    /// Tells a checking driver which memory `op` was given: its tensors, by name, dtype and shape.
    fn begin_op(&self, op: &Op<'_>) {
        if !self.driver.checks() {
            return;
        }
        let regions = op
            .tensors()
            .into_iter()
            .filter_map(|(name, t)| {
                let b = self.buf(t.handle).ok()?;
                let bytes = t.dtype.storage_bytes(t.numel())?.min(b.bytes);
                Some(Region { name: name.to_string(), ptr: b.ptr, bytes, tensor: Some((t.dtype, t.dims().to_vec())) })
            })
            .collect();
        match self.recording().as_mut() {
            Some(step) => step.begin_op(op.kind().name(), regions),
            None => self.driver.begin_op(op.kind().name(), regions),
        }
    }
}

/// A kernel parameter: its address, for cuLaunchKernel. Implemented for the plain types kernels
/// take and nothing else: a blanket impl over `Copy` types once covered `&dyn KernelArg` too, so
/// `args.iter().map(|a| a.param())` handed every kernel the host address of each reference instead
/// of its value (the first GPU run found it; `kernel_params`'s test and tests/cuda_host.rs keep it
/// found).
pub(crate) trait KernelArg {
    fn param(&self) -> Param;
    /// The bytes behind `param`.
    fn size(&self) -> usize;
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn param(&self) -> Param {
                self as *const $t as Param
            }
            fn size(&self) -> usize {
                std::mem::size_of::<$t>()
            }
        }
    )*};
}
kernel_arg!(u32, u64, f32);

/// The parameter array cuLaunchKernel takes: the address of each argument's value.
fn kernel_params(args: &[&dyn KernelArg]) -> Vec<Param> {
    args.iter().map(|a: &&dyn KernelArg| (**a).param()).collect()
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
        let recording = self.recording().is_some();
        let mut cache = self.buffers.lock().map_err(|_| Error::Backend("cuda: allocator lock poisoned".into()))?;
        // SAFETY: the context is bound. In a graph step, freeing the cache (on running out) waits
        // until the recorded work, which may use cached buffers, is queued.
        let ptr = match unsafe { cache.alloc(&*self.driver, class, !recording) } {
            Err(_) if recording => {
                drop(cache);
                self.flush()?;
                let mut cache = self.buffers.lock().map_err(|_| Error::Backend("cuda: allocator lock poisoned".into()))?;
                // SAFETY: as above; nothing is recorded now.
                unsafe { cache.alloc(&*self.driver, class, true) }
            }
            other => other,
        }
        .map_err(|e| Error::OutOfMemory(format!("cuda: cannot allocate {bytes} bytes on {}: {e}", self.device)))?;
        let b = Box::new(DevBuf { header: HandleHeader { magic: MAGIC, owner: self.id }, ptr, bytes, class });
        Ok(Handle(Box::into_raw(b) as *mut _))
    }

    unsafe fn free(&self, handle: Handle) {
        if let Ok(b) = self.buf(handle) {
            let b = b as *const DevBuf as *mut DevBuf;
            (*b).header.retire();
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
        let mut st = self.state()?;
        self.flush_locked(&mut st)?;
        self.bind()?;
        // SAFETY: the range is inside the allocation (checked).
        unsafe { self.driver.htod(b.ptr + offset as u64, bytes) }
    }

    fn read(&self, handle: Handle, offset: usize, out: &mut [u8]) -> Result<()> {
        let b = self.buf(handle)?;
        range_check(b, offset, out.len())?;
        let mut st = self.state()?;
        self.flush_locked(&mut st)?;
        self.bind()?;
        // SAFETY: as in `write`; the copy waits for the kernels queued before it.
        unsafe { self.driver.dtoh(out, b.ptr + offset as u64) }
    }

    fn copy(&self, dst: Handle, dst_offset: usize, src: Handle, src_offset: usize, bytes: usize) -> Result<()> {
        let (d, s) = (self.buf(dst)?, self.buf(src)?);
        range_check(d, dst_offset, bytes)?;
        range_check(s, src_offset, bytes)?;
        let (dst, src) = (d.ptr + dst_offset as u64, s.ptr + src_offset as u64);
        let _st = self.state()?;
        // In a graph step the copy is recorded with the step's work (a capture taken on the
        // device, read after the step): it needs no result of the ops before it on the host.
        if let Some(step) = self.recording().as_mut() {
            step.push(graph::Work::Copy { dst, src, bytes });
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are inside their allocations (checked).
        unsafe { self.driver.dtod(dst, src, bytes) }
    }

    fn run(&self, op: &Op<'_>) -> Result<()> {
        op.validate()?;
        if !self.supports(op.kind(), op.dtype()) {
            return Err(Error::Unsupported(format!("{}: the cuda backend does not support {}", op.kind(), op.dtype())));
        }
        self.bind()?;
        let mut st = self.state()?;
        let st = &mut *st;
        st.op = op.kind().name();
        self.begin_op(op);
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
            Op::SwiGluLinear(o) => ops::swiglu_linear(self, st, o),
            Op::Softcap(o) => ops::softcap(self, o),
            Op::IndexAdd(o) => ops::index_add(self, st, o),
            Op::LayerNorm(o) => ops::layer_norm(self, o),
            Op::Moe(o) => ops::moe(self, st, o),
            Op::RopeKvWrite(o) => ops::rope_kv_write(self, st, o),
            Op::QkvLinear(o) => ops::qkv_linear(self, st, o),
        }
    }

    fn synchronize(&self) -> Result<()> {
        let mut st = self.state()?;
        self.flush_locked(&mut st)?;
        self.driver.synchronize()
    }

    fn graph_begin(&self, key: u64) -> Result<()> {
        let mut st = self.state()?;
        let st = &mut *st;
        self.flush_locked(st)?;
        self.bind()?;
        let drv = &*self.driver;
        if st.meta_bytes < st.meta_need {
            // Graphs hold the old buffer's addresses: gone with it.
            // SAFETY: the context is bound; nothing recorded uses the old buffer.
            unsafe {
                st.graphs.clear(drv);
                memory::grow(drv, &mut st.meta, &mut st.meta_bytes, st.meta_need, 64 << 10, "graph metadata", None)?;
            }
        }
        if let Ok(mut cache) = self.buffers.lock() {
            cache.canonical_order();
        }
        *self.recording() = Some(graph::Step::new(key));
        Ok(())
    }

    fn graph_end(&self) -> Result<()> {
        let mut st = self.state()?;
        let Some(step) = self.recording().take() else { return Ok(()) };
        self.bind()?;
        self.queue_step(&mut st, step, true)
    }

    fn graph_stats(&self) -> highrise_core::GraphStats {
        self.state().map(|st| st.graphs.stats).unwrap_or_default()
    }

    fn folds_norms(&self, rows: usize, hidden: usize, dtype: DType) -> bool {
        ops::folds_norms(rows, hidden, dtype)
    }

    fn graph_batch(&self, sequences: usize) -> usize {
        graph::bucket(sequences)
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
        let drv = &*self.driver;
        if let Ok(st) = self.state.get_mut() {
            // SAFETY: the context is bound; nothing runs (we are being dropped).
            unsafe {
                st.graphs.clear(drv);
                st.uploads.release_all(drv);
                for p in [st.scratch, st.graph_scratch, st.meta, st.counters] {
                    if p != 0 {
                        drv.free(p);
                    }
                }
            }
        }
        if let Ok(cache) = self.buffers.get_mut() {
            // SAFETY: as above; tensors still alive hold their own buffers (and this backend).
            unsafe { cache.release_all(drv) };
        }
    }
}

/// `HIGHRISE_CUDA_EMULATE`: run the CUDA backend on a device emulated on the CPU (the kernels built
/// as host code, every launch checked against their PTX; `recording::RecordingDriver::executing`)
/// instead of a GPU: "1" or an architecture ("sm_90a", "sm_80") to check launches against. Slow;
/// for seeing the GPU path work where there is no GPU.
fn emulated_arch() -> Option<String> {
    let v = std::env::var("HIGHRISE_CUDA_EMULATE").ok().filter(|v| !v.is_empty() && v != "0")?;
    Some(if v.starts_with("sm_") { v } else { "sm_90a".into() })
}

impl Exportable for CudaBackend {
    const NAME: &'static str = "cuda";

    fn probe() -> Result<()> {
        if emulated_arch().is_some() {
            nvrtc::ensure_loaded()?;
            return emu::compiler().map(|_| ()).ok_or_else(|| Error::Backend("cuda emulation: no C++ compiler (c++, g++ or clang++)".into()));
        }
        probe()
    }

    fn create() -> Result<Self> {
        if let Some(arch) = emulated_arch() {
            return Ok(CudaBackend::with_driver(Arc::new(recording::RecordingDriver::executing(&arch, 8)?)));
        }
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
        assert_eq!(ptx::entries(ptx), vec!["rms_norm_f32", "swiglu_bf16"]);
    }

    /// `moe_route`'s shared arrays hold as many experts and choices as the `Moe` op lets through
    /// (and the host checker refuses more).
    #[test]
    fn moe_routes_limits_are_the_ops() {
        use highrise_core::ops::{MOE_MAX_EXPERTS, MOE_MAX_TOP_K};
        let mlp = kernels::FILES.iter().find(|(n, _)| *n == "mlp.cu").expect("mlp.cu").1;
        for (name, limit) in [("MOE_MAX_EXPERTS", MOE_MAX_EXPERTS), ("MOE_MAX_TOP_K", MOE_MAX_TOP_K)] {
            assert!(mlp.contains(&format!("#define {name} {limit}\n")), "kernels/mlp.cu's {name} is not the op's {limit}");
        }
    }

    /// The first GPU run's bug: each parameter's address must hold the argument's value, not the
    /// address of the reference to it.
    #[test]
    fn launch_parameters_point_at_the_values() {
        let (ptr, n, eps) = (0x7000_1234_5678_9abcu64, 576u32, 1e-5f32);
        let params = kernel_params(&[&ptr, &n, &eps]);
        // SAFETY: each address points at the local of its type above, alive here.
        unsafe {
            assert_eq!(*(params[0] as *const u64), ptr);
            assert_eq!(*(params[1] as *const u32), n);
            assert_eq!(*(params[2] as *const f32), eps);
        }
        assert_eq!(params[0] as *const u64, &ptr as *const u64);
    }

    #[test]
    fn hopper_gets_its_arch_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
    }
}

//! The seam between the CUDA backend's host code and the device: every allocation, copy, kernel
//! launch and GEMM the backend makes goes through a [`Driver`]. [`CudaDriver`] is the real one
//! (cudarc: the driver API and cuBLAS). [`crate::recording::RecordingDriver`] is one without a GPU:
//! its "device memory" is host memory and its launches are checked against the kernels' own PTX and
//! recorded, not run, so that the host side of every op runs in CI (tests/cuda_host.rs).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};
use highrise_core::{DType, Error, Result};

/// A kernel parameter as cuLaunchKernel takes it: the address of its value.
pub type Param = *mut c_void;

/// One kernel launch: the kernel's symbol, its grid and block, its dynamic shared memory, and the
/// address of each argument's value, in the kernel's parameter order.
pub struct Launch<'a> {
    pub kernel: &'a str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub params: &'a [Param],
}

/// `out [t, n] = x [t, k] @ w [n, k]^T` (row-major), x and w in `input`, out in `output`, f32
/// accumulation: what cuBLAS runs for the linear op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub input: DType,
    pub output: DType,
    pub t: usize,
    pub k: usize,
    pub n: usize,
    pub x: u64,
    pub w: u64,
    pub out: u64,
}

/// A range of device memory an op was given: one of its tensors (with its dtype and shape), an
/// uploaded metadata array, or its workspace. A checking driver holds each launch of the op to the
/// regions it was given.
#[derive(Clone, Debug)]
pub struct Region {
    pub name: String,
    pub ptr: u64,
    pub bytes: usize,
    /// The tensor's dtype and dims; `None` for metadata and workspace.
    pub tensor: Option<(DType, Vec<usize>)>,
}

/// What the backend needs to know of the device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name, e.g. "NVIDIA H200".
    pub name: String,
    /// The NVRTC architecture kernels are compiled for ("sm_90a").
    pub arch: String,
    pub sms: u32,
}

/// The device operations of the CUDA backend.
///
/// # Safety
/// The `unsafe` methods take device addresses: the caller guarantees that they lie inside live
/// allocations of this driver (a checking driver verifies it and refuses otherwise) and, for the
/// real driver, that the context is bound to the calling thread (`bind`).
pub trait Driver: Send + Sync {
    fn device(&self) -> DeviceInfo;

    /// Makes the driver's context current on the calling thread.
    fn bind(&self) -> Result<()>;

    /// # Safety
    /// See the trait.
    unsafe fn malloc(&self, bytes: usize) -> Result<u64>;

    /// # Safety
    /// `ptr` came from `malloc` and is not used again. Waits for the kernels still using it.
    unsafe fn free(&self, ptr: u64);

    /// # Safety
    /// `dst..dst + src.len()` is device memory of ours.
    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;

    /// # Safety
    /// `src..src + dst.len()` is device memory of ours. Waits for the kernels queued before it.
    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;

    /// # Safety
    /// Both ranges of `bytes` are device memory of ours.
    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;

    /// Queues a kernel on the default stream.
    ///
    /// # Safety
    /// `params` match the kernel's signature and every device address among them is ours.
    unsafe fn launch(&self, launch: &Launch<'_>) -> Result<()>;

    /// Queues a GEMM on the default stream.
    ///
    /// # Safety
    /// The three matrices lie inside allocations of ours.
    unsafe fn gemm(&self, gemm: &Gemm) -> Result<()>;

    /// Before a graph step is captured: whatever the driver would do at a GEMM's first run that
    /// cannot happen inside a capture (the real driver times cuBLASLt's algorithms for each new
    /// shape, lt.rs), done now. The GEMMs may be run and their outputs written.
    ///
    /// # Safety
    /// As `gemm`, for each; no capture is in progress.
    unsafe fn prepare(&self, gemms: &[Gemm]) {
        let _ = gemms;
    }

    fn synchronize(&self) -> Result<()>;

    /// A TMA tensor map (128 bytes, for a kernel to read from global memory). This default writes
    /// the emulated device's format (`TensorMap::emu_bytes`); the real driver asks CUDA
    /// (`cuTensorMapEncodeTiled`).
    fn tensor_map(&self, map: &crate::tma::TensorMap) -> Result<[u8; 128]> {
        map.validate()?;
        Ok(map.emu_bytes())
    }

    /// How many blocks of `kernel` with `threads` threads and `shared_bytes` of dynamic shared
    /// memory one SM holds at once (at least 1): what sizes a grid to whole waves. This default
    /// counts threads and shared memory only (228 KiB an SM as on Hopper, 1 KiB reserved a block);
    /// the real driver asks CUDA, which counts registers too.
    fn blocks_per_sm(&self, kernel: &str, threads: u32, shared_bytes: u32) -> Result<u32> {
        let _ = kernel;
        let by_threads = 2048 / threads.max(1);
        let by_shared = (228 << 10) / (shared_bytes + (1 << 10));
        Ok(by_threads.min(by_shared).clamp(1, 32))
    }

    /// Starts capturing: the launches, GEMMs and device-to-device copies queued from now until
    /// `end_capture` become a graph instead of running (host copies are not captured: the backend
    /// makes them before). Err where the
    /// driver cannot capture; the backend then launches one by one.
    ///
    /// # Safety
    /// The context is bound; no other thread queues work on this driver until `end_capture`.
    unsafe fn begin_capture(&self) -> Result<()> {
        Err(Error::Unsupported("this driver has no graphs".into()))
    }

    /// Ends the capture begun by `begin_capture` (also after a failed launch in it) and returns the
    /// graph, instantiated: a handle of this driver's for `launch_graph`.
    ///
    /// # Safety
    /// A capture is in progress.
    unsafe fn end_capture(&self) -> Result<u64> {
        Err(Error::Unsupported("this driver has no graphs".into()))
    }

    /// After a capture the device refused: turns off what this driver adds to captures that the
    /// steps can do without (programmatic dependent launches), and says whether it did, so that the
    /// capture is worth trying once more before graphs are given up.
    fn simplify_captures(&self) -> bool {
        false
    }

    /// Queues a graph from `end_capture`, after the work queued before it: its launches read the
    /// device memory as it is when they run, with the parameter values they were captured with.
    ///
    /// # Safety
    /// `graph` came from `end_capture` and was not destroyed; every address captured in it is still
    /// an allocation of ours.
    unsafe fn launch_graph(&self, graph: u64) -> Result<()> {
        let _ = graph;
        Err(Error::Unsupported("this driver has no graphs".into()))
    }

    /// For a checking driver, before `launch_graph`: the op and regions of each of the graph's
    /// launches and GEMMs in this step (the regions seen at capture described that step's tensors
    /// and metadata: a block table grows, a tensor moves).
    fn graph_regions(&self, graph: u64, nodes: Vec<(String, Vec<Region>)>) {
        let _ = (graph, nodes);
    }

    /// # Safety
    /// `graph` came from `end_capture` and is not used again.
    unsafe fn destroy_graph(&self, graph: u64) {
        let _ = graph;
    }

    /// Whether this driver checks launches against the regions of each op (`begin_op`, `region`);
    /// the backend skips collecting them otherwise.
    fn checks(&self) -> bool {
        false
    }

    /// An op starts: its launches may touch only `regions` (and those added by `region`) from now
    /// until the next `begin_op`.
    fn begin_op(&self, op: &str, regions: Vec<Region>) {
        let _ = (op, regions);
    }

    /// One more region of the current op: an upload or its workspace.
    fn region(&self, region: Region) {
        let _ = region;
    }
}

pub(crate) fn driver_err(what: &str) -> impl Fn(drv::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("cuda: {what}: {e:?}"))
}

/// A driver that queues nothing: allocations are addresses handed out in order, copies, launches,
/// GEMMs and graphs do nothing (reads give zeros). What the CUDA backend's host side costs, alone:
/// the time of an op or a decode step over it is the host's part of that op or step on a GPU
/// (benches/cuda_ops.rs, `HIGHRISE_BENCH_SWEEP=host`, which needs no GPU).
pub struct NullDriver {
    next: std::sync::atomic::AtomicU64,
    graphs: std::sync::atomic::AtomicU64,
}

impl Default for NullDriver {
    fn default() -> NullDriver {
        NullDriver { next: (1u64 << 32).into(), graphs: 1.into() }
    }
}

impl Driver for NullDriver {
    fn device(&self) -> DeviceInfo {
        DeviceInfo { name: "no device (host side only)".into(), arch: "sm_90a".into(), sms: 132 }
    }
    fn bind(&self) -> Result<()> {
        Ok(())
    }
    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        Ok(self.next.fetch_add((bytes as u64).div_ceil(256).max(1) * 256, std::sync::atomic::Ordering::Relaxed))
    }
    unsafe fn free(&self, _: u64) {}
    unsafe fn htod(&self, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
    unsafe fn dtoh(&self, dst: &mut [u8], _: u64) -> Result<()> {
        dst.fill(0);
        Ok(())
    }
    unsafe fn dtod(&self, _: u64, _: u64, _: usize) -> Result<()> {
        Ok(())
    }
    unsafe fn launch(&self, _: &Launch<'_>) -> Result<()> {
        Ok(())
    }
    unsafe fn gemm(&self, _: &Gemm) -> Result<()> {
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    unsafe fn begin_capture(&self) -> Result<()> {
        Ok(())
    }
    unsafe fn end_capture(&self) -> Result<u64> {
        Ok(self.graphs.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
    unsafe fn launch_graph(&self, _: u64) -> Result<()> {
        Ok(())
    }
}

/// Starts (`on`) or stops the range of the process's work a profiler started with
/// `--profile-from-start off` (Nsight Compute) collects: `cuProfilerStart`/`cuProfilerStop` on the
/// context current on this thread (the backend binds its own at each op).
pub fn profiler(on: bool) -> Result<()> {
    // SAFETY: cudarc's probe only tries to load libcuda by its names.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err(Error::Backend("cuda: no NVIDIA driver (libcuda.so could not be loaded)".into()));
    }
    // SAFETY: neither call takes arguments; both act on the current context or fail.
    let r = unsafe { if on { drv_sys::cuProfilerStart() } else { drv_sys::cuProfilerStop() } };
    r.result().map_err(driver_err(if on { "cuProfilerStart" } else { "cuProfilerStop" }))
}

/// Whether the decode path's kernels run as programmatic dependent launches inside graphs (on
/// sm_90+): on unless `HIGHRISE_PDL=0` (scripts/gpu-check.sh times decode both ways).
pub fn pdl_enabled() -> bool {
    !std::env::var("HIGHRISE_PDL").is_ok_and(|v| v == "0")
}

/// A kernel entry point, and the dynamic shared memory it was opted in to (beyond 48 KiB; set once
/// per size instead of at every launch). CUfunction handles may be used from any thread of the
/// process.
struct Func(drv_sys::CUfunction, std::sync::atomic::AtomicU32);
// SAFETY: CUfunction handles are valid in every thread of the process (the CUDA driver API is
// thread-safe); the module they belong to is never unloaded.
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

/// The stream graphs are captured on and launched on. Created blocking (`CU_STREAM_DEFAULT`), so
/// the legacy default stream, where every other op, copy and GEMM goes, is ordered with it both
/// ways: a graph starts after the copies and ops queued before it, and a read after it waits for it.
struct Stream(drv_sys::CUstream);
// SAFETY: a CUstream may be used from any thread of the process (the driver API is thread-safe);
// it is destroyed only on drop.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

struct Blas(cudarc::cublas::sys::cublasHandle_t);
// SAFETY: a cuBLAS handle may be used from any thread as long as one thread uses it at a time: it
// lives behind a Mutex.
unsafe impl Send for Blas {}

/// cuBLAS's workspace, which cuBLASLt shares (their GEMMs are queued in order on the same streams).
const BLAS_WORKSPACE: usize = 32 << 20;

/// The real driver: a CUDA context on one device, every kernel of `kernels/` loaded, and cuBLAS.
pub struct CudaDriver {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    functions: HashMap<String, Func>,
    blas: Mutex<Blas>,
    blas_workspace: u64,
    /// cuBLASLt and each GEMM shape's algorithm (None: every GEMM through `cublasGemmEx`).
    lt: Option<crate::lt::Lt>,
    graph_stream: Stream,
    /// Whether launches and GEMMs go to `graph_stream`'s capture (`begin_capture`).
    capturing: std::sync::atomic::AtomicBool,
    /// Whether captured launches of `kernels::PROGRAMMATIC` are programmatic dependents of the
    /// kernel before them (sm_90+, unless `HIGHRISE_PDL=0`; off for good after a refused capture).
    pdl: std::sync::atomic::AtomicBool,
    /// Whether the last work captured was a launch of ours: a programmatic dependency is made on
    /// a kernel of ours only (not on a copy, nor on cuBLAS's work, nor at a graph's start).
    after_kernel: std::sync::atomic::AtomicBool,
}

impl CudaDriver {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel for it, and starts
    /// cuBLAS. Call `crate::probe` first: cudarc panics where the libraries are missing.
    pub fn new(ordinal: usize) -> Result<CudaDriver> {
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating the context"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err("compute capability"))?;
        let arch = crate::arch_for(major, minor);
        let name = ctx.name().map_err(driver_err("device name"))?;
        let sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("multiprocessor count"))? as u32;
        let mut functions = HashMap::new();
        for (file, ptx) in crate::nvrtc::compile_all(&arch)? {
            let image = CString::new(ptx).map_err(|_| Error::Backend(format!("cuda: PTX of {file} has a NUL byte")))?;
            // SAFETY: the context is current (bound by CudaContext::new); image is NUL-terminated PTX.
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(driver_err(&format!("loading the module of {file}")))?;
            for symbol in crate::ptx::entries(image.to_str().unwrap_or_default()) {
                let c = CString::new(symbol.clone()).expect("PTX symbols have no NUL");
                // SAFETY: module is live (never unloaded: kernels live as long as the process).
                let f = unsafe { drv::module::get_function(module, c) }.map_err(driver_err(&format!("kernel {symbol}")))?;
                functions.insert(symbol, Func(f, std::sync::atomic::AtomicU32::new(48 << 10)));
            }
        }
        let blas = cudarc::cublas::result::create_handle().map_err(|e| Error::Backend(format!("cuda: cublasCreate: {e:?}")))?;
        // cuBLAS's own workspace, set once: a GEMM captured into a graph must not allocate one.
        // SAFETY: the context is current; the buffer is freed after the handle is destroyed (Drop).
        let blas_workspace = unsafe {
            let bytes = BLAS_WORKSPACE;
            let ws = drv::malloc_sync(bytes).map_err(driver_err("the cuBLAS workspace"))?;
            cudarc::cublas::sys::cublasSetWorkspace_v2(blas, ws as *mut c_void, bytes)
                .result()
                .map_err(|e| Error::Backend(format!("cuda: cublasSetWorkspace: {e:?}")))?;
            ws
        };
        let graph_stream = drv::stream::create(drv::stream::StreamKind::Default).map_err(driver_err("creating the graph stream"))?;
        let lt = crate::lt::Lt::new(blas_workspace, BLAS_WORKSPACE);
        Ok(CudaDriver {
            ctx,
            info: DeviceInfo { name, arch, sms },
            functions,
            blas: Mutex::new(Blas(blas)),
            blas_workspace,
            lt,
            graph_stream: Stream(graph_stream),
            capturing: std::sync::atomic::AtomicBool::new(false),
            pdl: std::sync::atomic::AtomicBool::new(major >= 9 && pdl_enabled()),
            after_kernel: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The stream a launch goes to now: the graph stream while capturing, else the legacy default.
    fn stream(&self) -> drv_sys::CUstream {
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            self.graph_stream.0
        } else {
            std::ptr::null_mut()
        }
    }

    /// Kernel `name`, opted in to `shared_bytes` of dynamic shared memory where that is beyond 48
    /// KiB (per function, once per larger size).
    fn function(&self, name: &str, shared_bytes: u32) -> Result<drv_sys::CUfunction> {
        use std::sync::atomic::Ordering::Relaxed;
        let f = self.functions.get(name).ok_or_else(|| Error::Unsupported(format!("cuda: no kernel {name} (not compiled for this build)")))?;
        if shared_bytes > f.1.load(Relaxed) {
            // SAFETY: the function is loaded; setting an attribute races with nothing (a launch
            // with less shared memory is valid either way).
            unsafe {
                drv::function::set_function_attribute(
                    f.0,
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(driver_err(&format!("{name}: {shared_bytes} bytes of dynamic shared memory")))?;
            f.1.fetch_max(shared_bytes, Relaxed);
        }
        Ok(f.0)
    }

    /// Points cuBLAS at `stream` (its default workspace serves both: the two streams never overlap).
    fn blas_stream(&self, stream: drv_sys::CUstream) -> Result<()> {
        let blas = self.blas.lock().map_err(|_| Error::Backend("cuda: cuBLAS lock poisoned".into()))?;
        // SAFETY: the handle and the stream are ours and live.
        unsafe { cudarc::cublas::result::set_stream(blas.0, stream as _) }.map_err(|e| Error::Backend(format!("cuda: cublasSetStream: {e:?}")))
    }
}

impl Driver for CudaDriver {
    fn device(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))
    }

    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        drv::malloc_sync(bytes).map_err(|e| Error::OutOfMemory(format!("cuda: cannot allocate {bytes} bytes: {e:?}")))
    }

    unsafe fn free(&self, ptr: u64) {
        let _ = drv::free_sync(ptr);
    }

    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        drv::memcpy_htod_sync(dst, src).map_err(driver_err("copying to the device"))
    }

    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        drv::memcpy_dtoh_sync(dst, src).map_err(driver_err("copying from the device"))
    }

    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            self.after_kernel.store(false, std::sync::atomic::Ordering::Relaxed);
            return drv::memcpy_dtod_async(dst, src, bytes, self.graph_stream.0).map_err(driver_err("cuMemcpyDtoDAsync (captured)"));
        }
        drv::memcpy_dtod_sync(dst, src, bytes).map_err(driver_err("cuMemcpyDtoD"))
    }

    unsafe fn launch(&self, l: &Launch<'_>) -> Result<()> {
        let f = self.function(l.kernel, l.shared_bytes)?;
        let mut params = l.params.to_vec();
        use std::sync::atomic::Ordering::Relaxed;
        let capturing = self.capturing.load(Relaxed);
        let after_kernel = capturing && self.after_kernel.swap(true, Relaxed);
        if !(self.pdl.load(Relaxed) && after_kernel && crate::kernels::programmatic(l.kernel)) {
            return drv::launch_kernel(f, l.grid, l.block, l.shared_bytes, self.stream(), &mut params)
                .map_err(driver_err(&format!("launching {}", l.kernel)));
        }
        // A programmatic dependent (kernels/common.cuh, PDL_ENTRY): its blocks may start before the
        // kernel before it ends, and wait for it on the device. Only in a graph: the captured edge
        // is what the replays keep; the legacy default stream is left as it is.
        let mut attr: drv_sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = drv_sys::CUlaunchConfig {
            gridDimX: l.grid.0,
            gridDimY: l.grid.1,
            gridDimZ: l.grid.2,
            blockDimX: l.block.0,
            blockDimY: l.block.1,
            blockDimZ: l.block.2,
            sharedMemBytes: l.shared_bytes,
            hStream: self.graph_stream.0,
            attrs: &mut attr,
            numAttrs: 1,
        };
        drv_sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut())
            .result()
            .map_err(driver_err(&format!("launching {} (programmatic dependent)", l.kernel)))
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t as Compute, cublasGemmAlgo_t, cublasOperation_t, cudaDataType as Ty};
        let ty = |d: DType| match d {
            DType::F32 => Ok(Ty::CUDA_R_32F),
            DType::F16 => Ok(Ty::CUDA_R_16F),
            DType::BF16 => Ok(Ty::CUDA_R_16BF),
            other => Err(Error::Unsupported(format!("linear: the cuda backend does not support {other}"))),
        };
        self.after_kernel.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(lt) = &self.lt {
            // Read at each GEMM, as HIGHRISE_CUDA_GEMV is (benches/cuda_ops.rs times both paths).
            let mode = crate::lt::GemmMode::from_env()?;
            if lt.gemm(g, self.stream(), self.capturing.load(std::sync::atomic::Ordering::Relaxed), mode)? {
                return Ok(());
            }
        }
        let (ty_in, ty_out) = (ty(g.input)?, ty(g.output)?);
        // Pedantic f32: no TF32 rounding when everything is f32.
        let compute = if g.input == DType::F32 { Compute::CUBLAS_COMPUTE_32F_PEDANTIC } else { Compute::CUBLAS_COMPUTE_32F };
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::Unsupported(format!("linear: dimension {v} exceeds cuBLAS's int range")));
        // cuBLAS is column-major: there the row-major weight is a K x N matrix and x a K x T one, so
        // out (N x T column-major, i.e. [T, N] row-major) = op_T(weight) * x.
        let (m, nn, kk) = (int(g.n)?, int(g.t)?, int(g.k)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas = self.blas.lock().map_err(|_| Error::Backend("cuda: cuBLAS lock poisoned".into()))?;
        cudarc::cublas::result::gemm_ex(
            blas.0,
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            m,
            nn,
            kk,
            &alpha as *const f32 as *const _,
            g.w as *const _,
            ty_in,
            kk,
            g.x as *const _,
            ty_in,
            kk,
            &beta as *const f32 as *const _,
            g.out as *mut _,
            ty_out,
            m,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| {
            Error::Backend(format!(
                "linear: cublasGemmEx [{}, {}] x [{}, {}]^T in {} to {}: {e:?}",
                g.t, g.k, g.n, g.k, g.input, g.output
            ))
        })
    }

    unsafe fn prepare(&self, gemms: &[Gemm]) {
        if let (Some(lt), Ok(mode)) = (&self.lt, crate::lt::GemmMode::from_env()) {
            lt.prepare(gemms, self.stream(), mode);
        }
    }

    fn tensor_map(&self, map: &crate::tma::TensorMap) -> Result<[u8; 128]> {
        use drv_sys::{CUtensorMapDataType as Ty, CUtensorMapFloatOOBfill as Fill, CUtensorMapInterleave as Il, CUtensorMapL2promotion as L2, CUtensorMapSwizzle as Sw};
        map.validate()?;
        let mut out = std::mem::MaybeUninit::<drv_sys::CUtensorMap>::zeroed();
        let element_strides = [1u32; 3];
        // SAFETY: the arrays hold rank (3) entries each, strides rank - 1; the map is written into
        // `out`, a CUtensorMap (128 bytes, 64-byte aligned).
        unsafe {
            drv_sys::cuTensorMapEncodeTiled(
                out.as_mut_ptr(),
                Ty::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                3,
                map.base as *mut c_void,
                map.dims.as_ptr(),
                map.strides.as_ptr(),
                map.boxes.as_ptr(),
                element_strides.as_ptr(),
                Il::CU_TENSOR_MAP_INTERLEAVE_NONE,
                Sw::CU_TENSOR_MAP_SWIZZLE_128B,
                L2::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                Fill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(driver_err(&format!("cuTensorMapEncodeTiled for {map:?}")))?;
            let raw = out.assume_init();
            Ok(std::mem::transmute::<drv_sys::CUtensorMap, [u8; 128]>(raw))
        }
    }

    fn blocks_per_sm(&self, kernel: &str, threads: u32, shared_bytes: u32) -> Result<u32> {
        let f = self.function(kernel, shared_bytes)?;
        // SAFETY: the function is loaded (never unloaded); the context is bound by the caller.
        let n = unsafe { drv::occupancy::max_active_block_per_multiprocessor(f, threads as i32, shared_bytes as usize) }
            .map_err(driver_err(&format!("{kernel}: occupancy of {threads} threads and {shared_bytes} bytes of shared memory")))?;
        Ok((n as u32).max(1))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.ctx.synchronize().map_err(driver_err("synchronize"))
    }

    unsafe fn begin_capture(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.blas_stream(self.graph_stream.0)?;
        // Thread-local: another thread's unrelated calls do not break this capture.
        if let Err(e) = drv::stream::begin_capture(self.graph_stream.0, drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            let _ = self.blas_stream(std::ptr::null_mut());
            return Err(driver_err("beginning a graph capture")(e));
        }
        self.after_kernel.store(false, Ordering::Relaxed);
        self.capturing.store(true, Ordering::Relaxed);
        Ok(())
    }

    unsafe fn end_capture(&self) -> Result<u64> {
        use std::sync::atomic::Ordering;
        self.capturing.store(false, Ordering::Relaxed);
        let graph = drv::stream::end_capture(self.graph_stream.0);
        self.blas_stream(std::ptr::null_mut())?;
        let graph = graph.map_err(driver_err("ending a graph capture"))?;
        let exec = drv::graph::instantiate(graph, drv_sys::CUgraphInstantiate_flags(0));
        let _ = drv::graph::destroy(graph);
        Ok(exec.map_err(driver_err("instantiating a graph"))? as u64)
    }

    fn simplify_captures(&self) -> bool {
        let was = self.pdl.swap(false, std::sync::atomic::Ordering::Relaxed);
        if was {
            eprintln!("highrise: a graph capture with programmatic dependent launches failed; capturing without them from now on");
        }
        was
    }

    unsafe fn launch_graph(&self, graph: u64) -> Result<()> {
        drv::graph::launch(graph as drv_sys::CUgraphExec, self.graph_stream.0).map_err(driver_err("launching a graph"))
    }

    unsafe fn destroy_graph(&self, graph: u64) {
        let _ = drv::graph::exec_destroy(graph as drv_sys::CUgraphExec);
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: the stream is ours; nothing is queued on it any more (we are being dropped).
        unsafe {
            let _ = drv::stream::destroy(self.graph_stream.0);
        }
        // cuBLASLt's handle before the workspace it shares and the context (a field dropped first).
        drop(self.lt.take());
        if let Ok(b) = self.blas.get_mut() {
            // SAFETY: the handle is ours and nothing uses it any more (we are being dropped).
            unsafe {
                let _ = cudarc::cublas::result::destroy_handle(b.0);
                let _ = drv::free_sync(self.blas_workspace);
            }
        }
    }
}

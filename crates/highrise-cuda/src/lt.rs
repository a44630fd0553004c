//! The linear op's GEMMs through cuBLASLt, each shape's algorithm chosen by timing (#20).
//!
//! `cublasGemmEx` runs the first algorithm of cuBLAS's heuristic, a guess from the shape alone.
//! For the shapes of batched decoding it is a poor one often enough to matter: at 64 or 256 rows
//! the projections' tiles cover a fraction of the GPU (k and v of Llama-3-8B at 64 rows are eight
//! 128x128 tiles on 132 SMs) unless the algorithm splits k, and the H200's first measurements had
//! batched decode at 27-45% of its roofline. So, as TensorRT-LLM's GEMM profiler does: the first
//! time a shape is seen outside a graph capture, up to [`CANDIDATES`] algorithms cuBLASLt's
//! heuristic offers for it are each run and timed on the device (the real operands, the real
//! output: what is written there is overwritten by the GEMM that follows), together with copies of
//! its first two that split k in 2, 4 and 8 (where the algorithm can, reduced in f32 in the
//! workspace where it allows: a skinny GEMM's few output tiles then keep more SMs reading weights,
//! which the heuristic does not always offer itself), and the fastest is kept
//! for the shape ([`pick`]: the heuristic's first unless another beats it by more than 3%). A graph
//! step's GEMMs are tuned before its capture (`Driver::prepare`), so the captured graph holds the
//! chosen ones. Rows above 64 share the choice of their power-of-two bucket (checked for the exact
//! shape with `cublasLtMatmulAlgoCheck`), so prompts of every length do not each cost a tuning.
//!
//! A shape keeps one algorithm for the life of the driver: the same inputs give the same outputs
//! step after step, in graphs or not. Between processes the choice can differ where two algorithms
//! time alike; `HIGHRISE_GEMM=heuristic` takes the heuristic's first every time (reproducible
//! across runs), `=gemmex` the old `cublasGemmEx` path. Any cuBLASLt failure for a shape sends that
//! shape to `cublasGemmEx`, said once.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::sys as lt;
use cudarc::driver::{result as drv, sys as drv_sys};
use highrise_core::{DType, Error, Result};

use crate::driver::Gemm;

/// Algorithms timed per shape: the heuristic's first few.
pub const CANDIDATES: usize = 8;
/// Timed runs of each candidate (after one untimed).
const REPS: usize = 3;
/// The heuristic's first candidates that split-k copies are made of, and the splits tried.
const SPLIT_BASES: usize = 2;
const SPLIT_K: [u32; 3] = [2, 4, 8];

/// The reduction of a split-k algorithm whose capabilities allow `mask` (cuBLASLt's
/// CUBLASLT_REDUCTION_SCHEME_* bits): partial sums in the compute type (f32) in the workspace
/// first, then in the output's type, then in place in the output; None where none is allowed.
pub fn reduction_scheme(mask: u32) -> Option<u32> {
    use lt::cublasLtReductionScheme_t as R;
    [R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, R::CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE, R::CUBLASLT_REDUCTION_SCHEME_INPLACE]
        .map(|r| r as u32)
        .into_iter()
        .find(|&r| mask & r != 0)
}

/// How the linear op's GEMMs are run: `HIGHRISE_GEMM` = `tuned` (the default), `heuristic`, `gemmex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmMode {
    /// cuBLASLt, each shape's algorithm the fastest of the heuristic's first [`CANDIDATES`].
    Tuned,
    /// cuBLASLt, the heuristic's first algorithm.
    Heuristic,
    /// `cublasGemmEx` (cuBLAS's own choice; no cuBLASLt).
    GemmEx,
}

impl GemmMode {
    pub fn parse(v: Option<&str>) -> Result<GemmMode> {
        match v.unwrap_or("") {
            "" | "tuned" => Ok(GemmMode::Tuned),
            "heuristic" => Ok(GemmMode::Heuristic),
            "gemmex" => Ok(GemmMode::GemmEx),
            other => Err(Error::Invalid(format!("HIGHRISE_GEMM={other}: expected tuned, heuristic or gemmex"))),
        }
    }

    pub fn from_env() -> Result<GemmMode> {
        GemmMode::parse(std::env::var("HIGHRISE_GEMM").ok().as_deref())
    }
}

/// What picks a GEMM's algorithm: dtypes, sizes and how the three addresses are aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub input: DType,
    pub output: DType,
    pub t: usize,
    pub k: usize,
    pub n: usize,
    /// Bytes all three base addresses are aligned to (1 to 16).
    pub align: u32,
}

impl Shape {
    pub fn of(g: &Gemm) -> Shape {
        Shape { input: g.input, output: g.output, t: g.t, k: g.k, n: g.n, align: alignment(g.x | g.w | g.out) }
    }

    /// The shape whose tuned algorithm this one may share: rows above 64 rounded up to a power of two.
    pub fn bucket(&self) -> Shape {
        Shape { t: tuned_rows(self.t), ..*self }
    }
}

/// Rows a tuning is kept for: each count up to 64 (decode batches) on its own, above that the
/// power of two at or above (prompt chunks of any length).
pub fn tuned_rows(t: usize) -> usize {
    if t <= 64 {
        t
    } else {
        t.next_power_of_two()
    }
}

/// The largest power of two (at most 16) dividing every address OR-ed into `addrs`.
pub fn alignment(addrs: u64) -> u32 {
    1 << addrs.trailing_zeros().min(4)
}

/// The candidate to keep from each one's time (None: it failed to run): the fastest, unless the
/// heuristic's first (index 0) is within 3% of it (timing noise should not trade cuBLAS's choice
/// for a twin).
pub fn pick(times: &[Option<f32>]) -> Option<usize> {
    let (best, fastest) = times.iter().enumerate().filter_map(|(i, t)| t.map(|t| (i, t))).min_by(|a, b| a.1.total_cmp(&b.1))?;
    match times.first().copied().flatten() {
        Some(first) if first <= fastest * 1.03 => Some(0),
        _ => Some(best),
    }
}

/// Copies of `algo` that split k in each of [`SPLIT_K`], reduced by [`reduction_scheme`]; none
/// where the algorithm cannot split k or already does.
///
/// # Safety
/// `algo` is an algorithm cuBLASLt filled in (a heuristic's result).
unsafe fn split_k(algo: &lt::cublasLtMatmulAlgo_t) -> Vec<lt::cublasLtMatmulAlgo_t> {
    use lt::cublasLtMatmulAlgoCapAttributes_t as Cap;
    use lt::cublasLtMatmulAlgoConfigAttributes_t as Config;
    let mut support = 0i32;
    let mut written = 0usize;
    let s = lt::cublasLtMatmulAlgoCapGetAttribute(algo, Cap::CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &mut support as *mut i32 as *mut c_void, 4, &mut written);
    let mut mask = 0u32;
    let m = lt::cublasLtMatmulAlgoCapGetAttribute(algo, Cap::CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &mut mask as *mut u32 as *mut c_void, 4, &mut written);
    let ok = lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
    let splits_already = config_u32(algo, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM).is_some_and(|k| k > 1);
    let Some(scheme) = reduction_scheme(mask).filter(|_| s == ok && m == ok && support != 0 && !splits_already) else {
        return Vec::new();
    };
    SPLIT_K
        .iter()
        .filter_map(|&k| {
            let mut a = *algo;
            let set = |a: &mut lt::cublasLtMatmulAlgo_t, attr: Config, v: u32| lt::cublasLtMatmulAlgoConfigSetAttribute(a, attr, &v as *const u32 as *const c_void, 4) == ok;
            (set(&mut a, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, k) && set(&mut a, Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, scheme)).then_some(a)
        })
        .collect()
}

/// A 4-byte configuration attribute of `algo`, where cuBLASLt reads it.
///
/// # Safety
/// `algo` is an algorithm cuBLASLt filled in.
unsafe fn config_u32(algo: &lt::cublasLtMatmulAlgo_t, attr: lt::cublasLtMatmulAlgoConfigAttributes_t) -> Option<u32> {
    let (mut v, mut written) = (0u32, 0usize);
    let s = lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &mut v as *mut u32 as *mut c_void, 4, &mut written);
    (s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && written == 4).then_some(v)
}

fn check(s: lt::cublasStatus_t, what: &str) -> Result<()> {
    match s {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(Error::Backend(format!("cuda: cuBLASLt {what}: {other:?}"))),
    }
}

fn lt_type(d: DType) -> Result<lt::cudaDataType> {
    match d {
        DType::F32 => Ok(lt::cudaDataType::CUDA_R_32F),
        DType::F16 => Ok(lt::cudaDataType::CUDA_R_16F),
        DType::BF16 => Ok(lt::cudaDataType::CUDA_R_16BF),
        other => Err(Error::Unsupported(format!("linear: the cuda backend does not support {other}"))),
    }
}

/// One shape's descriptors: the operation (transposed weight) and the three layouts, as
/// `cublasGemmEx` is called in driver.rs (column-major: out^T [n, t] = w [k, n]^T x^T [k, t]).
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
}

impl Plan {
    fn new(s: &Shape) -> Result<Plan> {
        // Pedantic f32: no TF32 rounding when everything is f32 (as the cublasGemmEx path).
        let compute = if s.input == DType::F32 { lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC } else { lt::cublasComputeType_t::CUBLAS_COMPUTE_32F };
        let (tin, tout) = (lt_type(s.input)?, lt_type(s.output)?);
        let mut plan = Plan { desc: std::ptr::null_mut(), a: std::ptr::null_mut(), b: std::ptr::null_mut(), c: std::ptr::null_mut() };
        // SAFETY: each create writes a handle into its out-pointer; `plan` destroys those made
        // (Drop) if a later step fails; the attribute's value is a live cublasOperation_t.
        unsafe {
            check(lt::cublasLtMatmulDescCreate(&mut plan.desc, compute, lt::cudaDataType::CUDA_R_32F), "cublasLtMatmulDescCreate")?;
            let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
            check(
                lt::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &trans as *const _ as *const c_void,
                    std::mem::size_of_val(&trans),
                ),
                "setting TRANSA",
            )?;
            let (t, k, n) = (s.t as u64, s.k as u64, s.n as u64);
            check(lt::cublasLtMatrixLayoutCreate(&mut plan.a, tin, k, n, k as i64), "the weight's layout")?;
            check(lt::cublasLtMatrixLayoutCreate(&mut plan.b, tin, k, t, k as i64), "the input's layout")?;
            check(lt::cublasLtMatrixLayoutCreate(&mut plan.c, tout, n, t, n as i64), "the output's layout")?;
        }
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle is ours (or null, never created) and used by no one after this.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

/// A shape's plan and algorithm; `algo` None: run by `cublasGemmEx` (cuBLASLt failed for it).
struct Entry {
    plan: Option<Plan>,
    algo: Option<lt::cublasLtMatmulAlgo_t>,
}

struct State {
    handle: lt::cublasLtHandle_t,
    exact: HashMap<Shape, Entry>,
    /// Algorithms timed, by bucket (`Shape::bucket`).
    tuned: HashMap<Shape, lt::cublasLtMatmulAlgo_t>,
    /// Whether a failure was said already.
    warned: bool,
}

/// cuBLASLt with a handle, a workspace (cuBLAS's: the two never run at once, both on the same
/// streams) and each shape's choice.
pub struct Lt {
    state: Mutex<State>,
    workspace: u64,
    workspace_bytes: usize,
    log: bool,
}

// SAFETY: the handle and descriptors are used only under the Mutex; cuBLASLt handles may be used
// from any thread, one at a time.
unsafe impl Send for State {}

impl Lt {
    /// None where cuBLASLt cannot start (said).
    pub fn new(workspace: u64, workspace_bytes: usize) -> Option<Lt> {
        // SAFETY: cudarc's probe only tries to load the library (crate::probe preloaded it).
        if !unsafe { lt::is_culib_present() } {
            eprintln!("highrise: cuBLASLt not found; GEMMs run as cublasGemmEx chooses");
            return None;
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: writes a new handle into `handle`.
        if let Err(e) = check(unsafe { lt::cublasLtCreate(&mut handle) }, "cublasLtCreate") {
            eprintln!("highrise: {e}; GEMMs run as cublasGemmEx chooses");
            return None;
        }
        let state = State { handle, exact: HashMap::new(), tuned: HashMap::new(), warned: false };
        Some(Lt { state: Mutex::new(state), workspace, workspace_bytes, log: std::env::var_os("HIGHRISE_GEMM_LOG").is_some_and(|v| v != "0") })
    }

    /// Runs `g` on `stream` with its shape's algorithm (chosen now if it has none: timed in `mode`
    /// `Tuned` unless `capturing`, else the heuristic's first). Ok(false): the shape goes to
    /// `cublasGemmEx`, and nothing was queued.
    ///
    /// # Safety
    /// The context is bound; the three matrices lie inside allocations of ours.
    pub unsafe fn gemm(&self, g: &Gemm, stream: drv_sys::CUstream, capturing: bool, mode: GemmMode) -> Result<bool> {
        if mode == GemmMode::GemmEx {
            return Ok(false);
        }
        let mut st = self.state.lock().map_err(|_| Error::Backend("cuda: cuBLASLt lock poisoned".into()))?;
        let shape = Shape::of(g);
        if !st.exact.contains_key(&shape) {
            let entry = self.choose(&mut st, g, &shape, stream, capturing || mode == GemmMode::Heuristic);
            st.exact.insert(shape, entry);
        }
        let handle = st.handle;
        let ran = match st.exact.get(&shape) {
            Some(Entry { plan: Some(plan), algo: Some(algo) }) => self.matmul(handle, plan, g, algo, stream),
            _ => return Ok(false),
        };
        match ran {
            Ok(()) => Ok(true),
            Err(e) => {
                // Not queued: said, and this shape goes to cublasGemmEx from now on.
                self.warn(&mut st, &shape, &e);
                st.exact.insert(shape, Entry { plan: None, algo: None });
                Ok(false)
            }
        }
    }

    /// Chooses each shape of `gemms` not seen yet (timing them), outside a capture: what a graph
    /// step does before it is captured, so the graph holds the chosen algorithms.
    ///
    /// # Safety
    /// As `gemm`, for each; no capture is in progress.
    pub unsafe fn prepare(&self, gemms: &[Gemm], stream: drv_sys::CUstream, mode: GemmMode) {
        if mode != GemmMode::Tuned {
            return;
        }
        let Ok(mut st) = self.state.lock() else { return };
        for g in gemms {
            let shape = Shape::of(g);
            if !st.exact.contains_key(&shape) {
                let entry = self.choose(&mut st, g, &shape, stream, false);
                st.exact.insert(shape, entry);
            }
        }
    }

    /// `untimed`: the heuristic's first (inside a capture, or as `GemmMode::Heuristic` asks).
    unsafe fn choose(&self, st: &mut State, g: &Gemm, shape: &Shape, stream: drv_sys::CUstream, untimed: bool) -> Entry {
        match self.try_choose(st, g, shape, stream, untimed) {
            Ok(entry) => entry,
            Err(e) => {
                self.warn(st, shape, &e);
                Entry { plan: None, algo: None }
            }
        }
    }

    unsafe fn try_choose(&self, st: &mut State, g: &Gemm, shape: &Shape, stream: drv_sys::CUstream, untimed: bool) -> Result<Entry> {
        let plan = Plan::new(shape)?;
        let handle = st.handle;
        // A bucket's tuned algorithm, where it also holds for this exact shape.
        if let Some(algo) = st.tuned.get(&shape.bucket()) {
            if self.fits(handle, &plan, algo) {
                return Ok(Entry { plan: Some(plan), algo: Some(*algo) });
            }
        }
        let mut candidates = self.candidates(handle, &plan, shape)?;
        if untimed {
            return Ok(Entry { plan: Some(plan), algo: Some(candidates[0]) });
        }
        let splits: Vec<_> = candidates.iter().take(SPLIT_BASES).flat_map(|a| split_k(a)).filter(|a| self.fits(handle, &plan, a)).collect();
        candidates.extend(splits);
        if candidates.len() == 1 {
            return Ok(Entry { plan: Some(plan), algo: Some(candidates[0]) });
        }
        let times: Vec<Option<f32>> = candidates.iter().map(|a| self.time(handle, &plan, g, a, stream).ok()).collect();
        let best = pick(&times).ok_or_else(|| Error::Backend("cuda: cuBLASLt: no candidate algorithm ran".into()))?;
        if self.log {
            let us = |t: Option<f32>| t.map_or("failed".to_string(), |t| format!("{:.1} us", t * 1e3));
            eprintln!(
                "highrise: gemm [{}, {}] x [{}, {}]^T {}: algorithm {} of {}{} ({}; cuBLASLt's first {})",
                shape.t,
                shape.k,
                shape.n,
                shape.k,
                shape.input,
                best + 1,
                candidates.len(),
                match config_u32(&candidates[best], lt::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM) {
                    Some(k) if k > 1 => format!(", k split in {k}"),
                    _ => String::new(),
                },
                us(times[best]),
                us(times[0])
            );
        }
        st.tuned.entry(shape.bucket()).or_insert(candidates[best]);
        Ok(Entry { plan: Some(plan), algo: Some(candidates[best]) })
    }

    fn warn(&self, st: &mut State, shape: &Shape, e: &Error) {
        if !st.warned {
            st.warned = true;
            eprintln!("highrise: {e} (gemm {shape:?}); such GEMMs run as cublasGemmEx chooses");
        }
    }

    /// The heuristic's first algorithms for `plan` that fit the workspace (at least one, or Err).
    unsafe fn candidates(&self, handle: lt::cublasLtHandle_t, plan: &Plan, shape: &Shape) -> Result<Vec<lt::cublasLtMatmulAlgo_t>> {
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let mut pref = std::ptr::null_mut();
        check(lt::cublasLtMatmulPreferenceCreate(&mut pref), "cublasLtMatmulPreferenceCreate")?;
        let ws = self.workspace_bytes as u64;
        let align = shape.align;
        let set = |attr: P, v: *const c_void, bytes: usize| check(lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v, bytes), "a preference");
        let mut result = set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8);
        for attr in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            result = result.and_then(|_| set(attr, &align as *const u32 as *const c_void, 4));
        }
        let mut found: [lt::cublasLtMatmulHeuristicResult_t; CANDIDATES] = std::mem::zeroed();
        let mut count = 0i32;
        if result.is_ok() {
            result = check(
                lt::cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, CANDIDATES as i32, found.as_mut_ptr(), &mut count),
                "cublasLtMatmulAlgoGetHeuristic",
            );
        }
        let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
        result?;
        let ok = lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let algos: Vec<_> = found[..(count.max(0) as usize).min(CANDIDATES)]
            .iter()
            .filter(|r| r.state == ok && r.workspaceSize <= self.workspace_bytes)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(Error::Unsupported("cuda: cuBLASLt's heuristic has no algorithm for this GEMM".into()));
        }
        Ok(algos)
    }

    /// Whether `algo` (tuned for another row count, or a split-k copy) runs this plan's shape within
    /// the workspace.
    unsafe fn fits(&self, handle: lt::cublasLtHandle_t, plan: &Plan, algo: &lt::cublasLtMatmulAlgo_t) -> bool {
        let mut r: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
        let s = lt::cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, algo, &mut r);
        s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= self.workspace_bytes
    }

    unsafe fn matmul(&self, handle: lt::cublasLtHandle_t, plan: &Plan, g: &Gemm, algo: &lt::cublasLtMatmulAlgo_t, stream: drv_sys::CUstream) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        check(
            lt::cublasLtMatmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                g.w as *const c_void,
                plan.a,
                g.x as *const c_void,
                plan.b,
                &beta as *const f32 as *const c_void,
                g.out as *const c_void,
                plan.c,
                g.out as *mut c_void,
                plan.c,
                algo,
                self.workspace as *mut c_void,
                self.workspace_bytes,
                stream as lt::cudaStream_t,
            ),
            "cublasLtMatmul",
        )
    }

    /// Milliseconds one run of `algo` takes on `stream` (the mean of `REPS` after one untimed).
    unsafe fn time(&self, handle: lt::cublasLtHandle_t, plan: &Plan, g: &Gemm, algo: &lt::cublasLtMatmulAlgo_t, stream: drv_sys::CUstream) -> Result<f32> {
        let err = |what: &'static str| move |e: drv::DriverError| Error::Backend(format!("cuda: timing a GEMM: {what}: {e:?}"));
        let start = drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(err("cuEventCreate"))?;
        let end = match drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DEFAULT) {
            Ok(e) => e,
            Err(e) => {
                let _ = drv::event::destroy(start);
                return Err(err("cuEventCreate")(e));
            }
        };
        let run = || -> Result<f32> {
            self.matmul(handle, plan, g, algo, stream)?;
            drv::event::record(start, stream).map_err(err("cuEventRecord"))?;
            for _ in 0..REPS {
                self.matmul(handle, plan, g, algo, stream)?;
            }
            drv::event::record(end, stream).map_err(err("cuEventRecord"))?;
            drv::event::synchronize(end).map_err(err("cuEventSynchronize"))?;
            Ok(drv::event::elapsed(start, end).map_err(err("cuEventElapsedTime"))? / REPS as f32)
        };
        let ms = run();
        let _ = drv::event::destroy(start);
        let _ = drv::event::destroy(end);
        ms
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut() {
            st.exact.clear();
            // SAFETY: the handle is ours; its plans were dropped just above.
            unsafe {
                let _ = lt::cublasLtDestroy(st.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heuristics_first_stays_unless_another_is_clearly_faster() {
        assert_eq!(pick(&[Some(1.0), Some(0.99), Some(1.2)]), Some(0), "within 3%: cuBLAS's own choice");
        assert_eq!(pick(&[Some(1.0), Some(0.8), Some(0.9)]), Some(1));
        assert_eq!(pick(&[None, Some(0.8), Some(0.7)]), Some(2), "the first failed to run");
        assert_eq!(pick(&[None, None]), None);
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn split_k_reduces_in_f32_where_it_may() {
        // CUBLASLT_REDUCTION_SCHEME_*: INPLACE 1, COMPUTE_TYPE 2, OUTPUT_TYPE 4.
        assert_eq!(reduction_scheme(7), Some(2), "f32 partial sums in the workspace first");
        assert_eq!(reduction_scheme(5), Some(4));
        assert_eq!(reduction_scheme(1), Some(1));
        assert_eq!(reduction_scheme(0), None, "no reduction: no split");
    }

    #[test]
    fn rows_above_64_share_a_power_of_two_bucket() {
        assert_eq!((1..=64).map(tuned_rows).collect::<Vec<_>>(), (1..=64).collect::<Vec<_>>(), "decode batches each their own");
        assert_eq!([65, 128, 129, 500, 512, 513].map(tuned_rows), [128, 128, 256, 512, 512, 1024]);
        let g = Gemm { input: DType::BF16, output: DType::BF16, t: 300, k: 4096, n: 1024, x: 0x1000, w: 0x2000, out: 0x3008 };
        let s = Shape::of(&g);
        assert_eq!((s.align, s.bucket().t, s.bucket().n), (8, 512, 1024));
    }

    #[test]
    fn alignment_is_that_of_the_least_aligned_address() {
        assert_eq!(alignment(0x1000 | 0x2000), 16);
        assert_eq!(alignment(0x1000 | 0x2002), 2);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0), 16);
    }

    #[test]
    fn the_mode_comes_from_highrise_gemm() {
        assert_eq!(GemmMode::parse(None).unwrap(), GemmMode::Tuned);
        assert_eq!(GemmMode::parse(Some("heuristic")).unwrap(), GemmMode::Heuristic);
        assert_eq!(GemmMode::parse(Some("gemmex")).unwrap(), GemmMode::GemmEx);
        let e = GemmMode::parse(Some("fast")).unwrap_err().to_string();
        assert!(e.contains("HIGHRISE_GEMM=fast") && e.contains("tuned, heuristic or gemmex"), "{e}");
    }
}

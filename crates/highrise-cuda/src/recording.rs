//! A [`Driver`] without a GPU: the CUDA backend's host code runs against it on any machine. Its
//! "device memory" is host memory at addresses of its own; copies move real bytes; kernel launches
//! and GEMMs are checked and recorded, not run (so outputs keep whatever they held).
//!
//! Every launch is held to the kernel's own PTX (compiled by NVRTC, as the real driver compiles it)
//! and to what its op was given:
//! - the kernel exists; the parameter count and each parameter's byte size are the PTX's, and the
//!   launch's value for each is read from behind its address, as cuLaunchKernel reads it;
//! - every pointer parameter lies inside a live allocation and inside one of the op's regions (its
//!   tensors, uploaded metadata and workspace); only the optional ones (a block table, a bias) may be
//!   null;
//! - the bytes the kernel may touch through each pointer (its index arithmetic, evaluated on the
//!   launch's scalars, grid and the metadata it reads: ids, slots, tiles, block tables) stay inside
//!   that region;
//! - its scalars agree with the shapes of the tensors they describe (a paged cache's kv_heads and
//!   block_size, head dim, rows), and its grid covers every output row;
//! - grid and block within the kernel's `.maxntid` and CUDA's limits, shared memory within the
//!   device's.
//!
//! A launch that fails a check is refused with an error naming the op, the kernel, the parameter and
//! the bytes, so the op fails as it would never fail on a GPU: loudly, before any memory is touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use highrise_core::{DType, Error, Result};

use crate::driver::{DeviceInfo, Driver, Gemm, Launch, Region};
use crate::kernels::split_name;
use crate::ptx::{self, Entry};

/// Where the recording driver's addresses start: far from where this process's heap and stacks
/// live, so a host address passed by mistake is never taken for device memory.
const BASE: u64 = 0x0000_3000_0000_0000;

/// Static shared memory a block may declare (CUDA's fixed 48 KiB).
const STATIC_SHARED: usize = 48 << 10;

/// One launch as recorded: the op it belonged to, the kernel, its grid and block, and each
/// argument's bytes.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub op: String,
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
    pub args: Vec<Vec<u8>>,
}

impl Recorded {
    pub fn u32(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.args[i][..4].try_into().expect("a 4-byte argument"))
    }

    pub fn u64(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.args[i][..8].try_into().expect("an 8-byte argument"))
    }

    pub fn f32(&self, i: usize) -> f32 {
        f32::from_bits(self.u32(i))
    }
}

/// What the recording saw, for a test to report and assert on.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub launches: usize,
    pub gemms: usize,
    /// Byte ranges checked against their regions.
    pub accesses: usize,
    /// Launches per kernel.
    pub kernels: BTreeMap<String, usize>,
    /// Launches and GEMMs per op.
    pub ops: BTreeMap<String, usize>,
    /// Launches refused, and frees of memory that was not allocated.
    pub faults: Vec<String>,
    /// Graphs captured, and graph launches (each of whose launches and GEMMs is checked again, and
    /// run by an executing driver, as it is launched).
    pub graphs_captured: usize,
    pub graph_launches: usize,
}

/// A launch or GEMM captured into a graph, with the op and regions it was checked against.
#[derive(Clone)]
enum Captured {
    Launch { op: String, regions: Vec<Region>, rec: Recorded },
    Gemm { op: String, regions: Vec<Region>, gemm: Gemm },
    Copy { dst: u64, src: u64, bytes: usize },
}

struct State {
    next: u64,
    allocs: BTreeMap<u64, Vec<u8>>,
    op: String,
    regions: Vec<Region>,
    recorded: Vec<Recorded>,
    summary: Summary,
    /// The graph being captured (`begin_capture`) and the thread capturing it, and the graphs
    /// captured, by handle.
    capture: Option<Vec<Captured>>,
    capturer: Option<std::thread::ThreadId>,
    graphs: HashMap<u64, Vec<Captured>>,
    next_graph: u64,
}

impl State {
    /// Work queued by a thread other than the one capturing a graph would land inside that graph
    /// (`Driver::begin_capture`'s contract forbids it): refused, loudly.
    fn other_thread_in_capture(&mut self, what: &str) -> Result<()> {
        match self.capturer {
            Some(t) if t != std::thread::current().id() => {
                let msg = format!("cuda host check: {what} from another thread while a graph is being captured");
                self.summary.faults.push(msg.clone());
                Err(Error::Backend(msg))
            }
            _ => Ok(()),
        }
    }

    /// The live allocation holding address `p`: its start and its bytes.
    fn allocation(&self, p: u64) -> Option<(u64, &[u8])> {
        self.allocs.range(..=p).next_back().filter(|(a, v)| p < **a + v.len().max(1) as u64).map(|(a, v)| (*a, &v[..]))
    }

    /// The region of the current op holding address `p`; any live allocation where the op declared
    /// none. Err: why there is none (no allocation at all, or none of the op's regions).
    fn region_of(&self, p: u64) -> std::result::Result<Region, &'static str> {
        let Some((a, v)) = self.allocation(p) else {
            return Err("which is in no live device allocation (a host address?)");
        };
        if self.regions.is_empty() {
            return Ok(Region { name: format!("allocation {a:#x}"), ptr: a, bytes: v.len(), tensor: None });
        }
        self.regions
            .iter()
            .filter(|r| p >= r.ptr && p < r.ptr + r.bytes.max(1) as u64)
            .max_by_key(|r| r.ptr)
            .cloned()
            .ok_or("inside an allocation but in none of the op's tensors, metadata or workspace")
    }
}

pub struct RecordingDriver {
    info: DeviceInfo,
    /// The kernels built for the CPU (`executing`): launches and GEMMs are run, not only checked.
    exec: Option<crate::emu::Library>,
    /// Shared memory a block may have with opt-in (227 KiB on Hopper, 163 KiB on A100).
    max_shared: usize,
    /// The prefill kernel's tile shapes, as its kernels were compiled.
    flash_shapes: Vec<(usize, crate::flash::Shape)>,
    /// The Hopper kernels' geometries, likewise.
    flash_wg_shapes: Vec<(usize, crate::flash::Shape)>,
    flash_ws_shapes: Vec<(usize, crate::flash::WsShape)>,
    /// The decode kernel's shape, likewise.
    decode_shape: crate::flash::DecodeShape,
    /// The matrix-vector kernels' shape, likewise.
    gemv_shape: crate::gemv::GemvShape,
    kernels: HashMap<String, Entry>,
    state: Mutex<State>,
}

impl RecordingDriver {
    /// Compiles every kernel for `arch` with NVRTC (as the real driver does for its device) and
    /// reads their signatures from the PTX. Needs libnvrtc, no GPU.
    pub fn new(arch: &str, sms: u32) -> Result<RecordingDriver> {
        crate::nvrtc::ensure_loaded()?;
        RecordingDriver::from_ptx(arch, sms, &crate::nvrtc::compile_all(arch)?)
    }

    /// The driver over kernel files already compiled for `arch`: (file name, PTX).
    fn from_ptx(arch: &str, sms: u32, files: &[(&str, String)]) -> Result<RecordingDriver> {
        let mut kernels = HashMap::new();
        for (_, ptx) in files {
            for e in ptx::parse(ptx) {
                kernels.insert(e.name.clone(), e);
            }
        }
        let max_shared = if arch.starts_with("sm_90") { 227 << 10 } else { 163 << 10 };
        Ok(RecordingDriver {
            info: DeviceInfo { name: format!("recording driver (no GPU; kernels compiled for {arch})"), arch: arch.into(), sms },
            exec: None,
            max_shared,
            flash_shapes: crate::flash::shapes(arch)?,
            flash_wg_shapes: crate::flash::wg_shapes(arch)?,
            flash_ws_shapes: crate::flash::ws_shapes()?,
            decode_shape: crate::flash::decode_shape(arch)?,
            gemv_shape: crate::gemv::gemv_shape(arch)?,
            kernels,
            state: Mutex::new(State {
                next: BASE,
                allocs: BTreeMap::new(),
                op: String::new(),
                regions: Vec::new(),
                recorded: Vec::new(),
                summary: Summary::default(),
                capture: None,
                capturer: None,
                graphs: HashMap::new(),
                next_graph: 1,
            }),
        })
    }

    /// `new`, and every launch it accepts is then run on the CPU by the kernels built as host code
    /// (`crate::emu`), every GEMM computed on the CPU: the whole backend works, slowly, without a
    /// GPU. Needs libnvrtc (for the checks) and a C++20 compiler.
    pub fn executing(arch: &str, sms: u32) -> Result<RecordingDriver> {
        crate::nvrtc::ensure_loaded()?;
        let ptx = crate::nvrtc::compile_all(arch)?;
        let mut d = RecordingDriver::from_ptx(arch, sms, &ptx)?;
        // Each file's entries and -D options, for the host build of the same kernels.
        let files = ptx
            .iter()
            .map(|(name, text)| Ok((*name, crate::ptx::entries(text), crate::nvrtc::defines(name, arch)?)))
            .collect::<Result<Vec<_>>>()?;
        d.exec = Some(crate::emu::Library::build(&files)?);
        d.info.name = format!("emulated device (kernels run on the CPU; checked as compiled for {arch})");
        Ok(d)
    }

    /// The kernels' signatures as read from their PTX.
    pub fn kernel(&self, name: &str) -> Option<&Entry> {
        self.kernels.get(name)
    }

    pub fn summary(&self) -> Summary {
        self.lock().summary.clone()
    }

    /// The launches recorded since the last call.
    pub fn take_recorded(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.lock().recorded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a launch as `launch` does, and records it when it passes.
    fn check(&self, st: &mut State, l: &Launch<'_>) -> std::result::Result<Recorded, String> {
        let entry = self.kernels.get(l.kernel).ok_or("no such kernel in the compiled PTX")?;
        if l.params.len() != entry.params.len() {
            return Err(format!("{} arguments, but the PTX declares {} parameters", l.params.len(), entry.params.len()));
        }
        // The values, read from behind each address as cuLaunchKernel reads them.
        let args: Vec<Vec<u8>> = l
            .params
            .iter()
            .zip(&entry.params)
            .map(|(&p, (_, size))| {
                // SAFETY: the caller promises each address points to a value of the parameter's
                // size (Driver::launch's contract); a parameter list with too few bytes is the
                // kind of mistake the size check below names.
                unsafe { std::slice::from_raw_parts(p as *const u8, *size) }.to_vec()
            })
            .collect();
        let contract = contract(l.kernel).ok_or("no contract for this kernel in recording.rs")?;
        if contract.len() != entry.params.len() {
            return Err(format!(
                "the contract lists {} parameters but the PTX declares {}",
                contract.len(),
                entry.params.len()
            ));
        }
        for (i, (kind, (ty, size))) in contract.iter().zip(&entry.params).enumerate() {
            if kind.size() != *size {
                return Err(format!("parameter {i} is {ty} ({size} bytes) in the PTX, but {} ({} bytes) in the contract", kind.name(), kind.size()));
            }
        }
        check_dims(l, entry, self.max_shared)?;
        let a = Args { args: &args, kinds: &contract, st: &*st, grid: l.grid, block: l.block, shared: l.shared_bytes, flash_shapes: &self.flash_shapes, flash_wg_shapes: &self.flash_wg_shapes, flash_ws_shapes: &self.flash_ws_shapes, decode_shape: self.decode_shape, gemv_shape: self.gemv_shape };
        let mut accesses = Vec::new();
        // Pointers: inside live allocations and the op's regions.
        for (i, kind) in contract.iter().enumerate() {
            if let Kind::Ptr { optional } = kind {
                let p = a.u64(i);
                if p == 0 {
                    if *optional {
                        continue;
                    }
                    return Err(format!("parameter {i} (a pointer) is null"));
                }
                a.region(i)?;
            }
            if let Kind::Map { optional } = kind {
                if a.u64(i) == 0 {
                    if *optional {
                        continue;
                    }
                    return Err(format!("parameter {i} (a tensor map) is null"));
                }
                a.tensor_map(i)?;
            }
        }
        footprint(l.kernel, &a, &mut accesses)?;
        for acc in &accesses {
            let r = a.region(acc.param)?;
            let start = a.u64(acc.param) - r.ptr + acc.offset;
            if start.checked_add(acc.bytes).is_none_or(|end| end > r.bytes as u64) {
                return Err(format!(
                    "parameter {} may touch bytes {}..{} of {} ({} bytes): {}",
                    acc.param,
                    start,
                    start.saturating_add(acc.bytes),
                    r.name,
                    r.bytes,
                    acc.what
                ));
            }
        }
        let n = accesses.len();
        st.summary.accesses += n;
        Ok(Recorded { op: st.op.clone(), kernel: l.kernel.to_string(), grid: l.grid, block: l.block, shared_bytes: l.shared_bytes, args })
    }
}

/// Grid, block and shared memory within the kernel's and CUDA's limits.
fn check_dims(l: &Launch<'_>, e: &Entry, max_shared: usize) -> std::result::Result<(), String> {
    let (g, b) = (l.grid, l.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || g.0 > i32::MAX as u32 || g.1 > 65_535 || g.2 > 65_535 {
        return Err(format!("grid {g:?} is outside CUDA's limits (x 1..2^31-1, y and z 1..65535)"));
    }
    let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if threads == 0 || threads > 1024 || b.2 > 64 {
        return Err(format!("block {b:?} is outside CUDA's limits (1..1024 threads, z at most 64)"));
    }
    if let Some(m) = e.max_threads {
        if threads > m.0 as u64 * m.1 as u64 * m.2 as u64 || b.0 > m.0 {
            return Err(format!("block {b:?} exceeds the kernel's .maxntid {m:?} (its __launch_bounds__)"));
        }
    }
    let shared = e.static_shared + l.shared_bytes as usize;
    if e.static_shared > STATIC_SHARED || shared > max_shared {
        return Err(format!(
            "{} bytes of static and {} of dynamic shared memory exceed the device's {} ({} static)",
            e.static_shared, l.shared_bytes, max_shared, STATIC_SHARED
        ));
    }
    Ok(())
}

/// A kernel parameter's kind.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A device address; `optional` ones may be null.
    Ptr { optional: bool },
    /// The device address of a TMA tensor map (128 bytes, `crate::tma::TensorMap`), whose tensor
    /// must lie inside the op's regions too; `optional` ones may be null.
    Map { optional: bool },
    U32,
    U64,
    F32,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Kind::Ptr { .. } | Kind::Map { .. } | Kind::U64 => 8,
            Kind::U32 | Kind::F32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Ptr { .. } => "a pointer",
            Kind::Map { .. } => "a tensor map's address",
            Kind::U32 => "u32",
            Kind::U64 => "u64",
            Kind::F32 => "f32",
        }
    }
}

const P: Kind = Kind::Ptr { optional: false };
const OPT: Kind = Kind::Ptr { optional: true };
const MAP: Kind = Kind::Map { optional: false };
const MAP_OPT: Kind = Kind::Map { optional: true };
const U32: Kind = Kind::U32;
const U64: Kind = Kind::U64;
const F32: Kind = Kind::F32;


/// Each kernel's parameters, as `kernels/*.cu` declares them.
fn contract(kernel: &str) -> Option<Vec<Kind>> {
    let (base, _, _) = split_name(kernel);
    Some(match base {
        "embedding" => vec![P, P, U32, P, U32, F32],
        "rms_norm" => vec![P, P, P, U32, U32, F32],
        "add_rms_norm" => vec![P, P, P, P, U32, U32, F32],
        "add_bias" => vec![P, P, U32, U32, U64],
        "add" => vec![P, P, U64],
        "index_add" => vec![P, P, P, P, U32],
        "layer_norm" => vec![P, P, P, P, U32, U32, F32],
        "add_layer_norm" => vec![P, P, P, P, P, U32, U32, F32],
        "to_f32" => vec![P, P, U32, U64],
        "from_f32" => vec![P, P, U64],
        "rope" => vec![P, P, P, U32, U32, U32, F32],
        "kv_write" => vec![P, P, P, P, P, U32, U32, U32],
        "rope_kv_write" => vec![P, P, P, P, P, U32, U32, U32, P, P, P, U32, U32, F32],
        "attn_combine" => vec![P, P, U32, U32, U32],
        "attn_split" | "attn_group" => vec![P, P, P, P, P, P, OPT, U32, U32, U32, F32, U32, F32, F32],
        "flash_attn_ws" => vec![P, P, P, P, P, OPT, U32, U32, U32, F32, U32, F32, F32, MAP_OPT, MAP_OPT],
        "flash_attn" | "flash_attn_wg" | "flash_attn_wgp" => vec![P, P, P, P, P, OPT, U32, U32, U32, F32, U32, F32, F32],
        "decode_attn" => vec![P, P, P, P, P, P, U32, U32, U32, F32, U32, F32, F32, P, P],
        "gemv1" | "gemv2" | "gemv4" | "gemv8" | "gemv_add1" | "gemv_add2" | "gemv_add4" | "gemv_add8" => {
            vec![P, P, P, OPT, U32, U32, U32, U32]
        }
        "gemv_glu1" | "gemv_glu2" | "gemv_glu4" | "gemv_glu8" => vec![P, P, P, P, U32, U32, U32],
        "gemv_glu_norm1" => vec![P, P, P, P, P, F32, U32, U32, U32],
        "gemv_qkv1" | "gemv_qkv2" | "gemv_qkv4" | "gemv_qkv8" => vec![P, P, P, P, P, P, P, OPT, OPT, OPT, U32, U32, U32, U32, U32, U32],
        "gemv_qkv_norm1" => {
            vec![P, P, P, P, P, P, P, OPT, OPT, OPT, U32, P, F32, U32, U32, U32, U32, U32]
        }
        "swiglu" | "geglu" => vec![P, P, P, U64],
        "glu_act" => vec![P, P, OPT, U32, U64],
        "moe_route" => vec![P, P, P, U32, U32, U32],
        "moe_glu" => vec![P, P, P, P, P, U32, U32, U32, U32, U32],
        "moe_down" => vec![P, P, P, P, U32, U32, U32],
        "moe_gemv_glu" => vec![P, P, P, P, P, U32, U32, U32, U32],
        "moe_gemv_down" => vec![P, P, P, P, U32, U32, U32],
        "moe_combine" => vec![P, P, OPT, P, U32, U32, OPT, OPT],
        "softcap" => vec![P, F32, U64],
        "argmax" => vec![P, P, P, U32],
        "wgmma_probe" => vec![P, P, P, P, P],
        "tma_probe" => vec![P, MAP, U32, U32],
        "sample" => vec![P, P, P, P, U32],
        _ => return None,
    })
}

/// The rows of x a matrix-vector kernel is built for: its name's last digits (gemv_qkv_norm4: 4).
fn rows_built_for(base: &str) -> u64 {
    base.rsplit(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse().ok()).unwrap_or(0)
}

/// A matrix-vector kernel's norm weight (parameter `p`, then eps): k elements of x's 16-bit dtype,
/// read in 16-byte chunks.
fn norm_weight(a: &Args, out: &mut Vec<Access>, p: usize, k: u64) -> std::result::Result<(), String> {
    if a.u64(p) % 16 != 0 {
        return Err(format!("the norm weight at {:#x}: the kernel reads 16-byte chunks", a.u64(p)));
    }
    if !a.f32(p + 1).is_finite() {
        return Err("eps is not finite".into());
    }
    a.agrees(p, 0, k, "the norm weight's length")?;
    push(out, p, 0, k, 2, "norm weight");
    Ok(())
}

/// A range of bytes a kernel may touch through parameter `param`, from the address passed.
struct Access {
    param: usize,
    offset: u64,
    bytes: u64,
    what: String,
}

/// A launch's arguments, with the recording's memory to read metadata from.
struct Args<'a> {
    args: &'a [Vec<u8>],
    kinds: &'a [Kind],
    st: &'a State,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    shared: u32,
    /// The prefill kernel's tile shapes the kernels were compiled with.
    flash_shapes: &'a [(usize, crate::flash::Shape)],
    /// The Hopper kernels' geometries, likewise.
    flash_wg_shapes: &'a [(usize, crate::flash::Shape)],
    flash_ws_shapes: &'a [(usize, crate::flash::WsShape)],
    /// The decode kernel's shape, likewise.
    decode_shape: crate::flash::DecodeShape,
    /// The matrix-vector kernels' shape, likewise.
    gemv_shape: crate::gemv::GemvShape,
}

type Check = std::result::Result<(), String>;

impl Args<'_> {
    fn u32(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.args[i][..4].try_into().expect("size checked"))
    }

    fn u64(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.args[i][..8].try_into().expect("size checked"))
    }

    fn f32(&self, i: usize) -> f32 {
        f32::from_bits(self.u32(i))
    }

    /// The region (of the current op; any live allocation where the op declared none) holding the
    /// address in parameter `i`.
    fn region(&self, i: usize) -> std::result::Result<Region, String> {
        let p = self.u64(i);
        debug_assert!(matches!(self.kinds[i], Kind::Ptr { .. } | Kind::Map { .. }));
        self.st.region_of(p).map_err(|why| format!("parameter {i} is {p:#x}, {why}"))
    }

    /// The dims of the tensor parameter `i` points at, if it points into one of the op's tensors:
    /// the tensor's; but past the start of a 3-D one, at the start of one of its matrices (expert e
    /// of a mixture's stacked weights, [E, I, H]), the matrix's ([I, H]).
    fn dims(&self, i: usize) -> Option<Vec<usize>> {
        let r = self.region(i).ok()?;
        let (dtype, d) = r.tensor?;
        let at = self.u64(i) - r.ptr;
        let matrix = d.get(1..).map_or(0, |m| m.iter().product::<usize>()) as u64 * dtype.storage_bytes(1).unwrap_or(0) as u64;
        match at {
            _ if d.len() == 3 && at > 0 && matrix > 0 && at % matrix == 0 => Some(d[1..].to_vec()),
            _ => Some(d),
        }
    }

    /// The tensor map parameter `i` points at (128 bytes inside a region), read as this driver's
    /// `Driver::tensor_map` wrote it, its tensor inside one of the op's regions.
    fn tensor_map(&self, i: usize) -> std::result::Result<crate::tma::TensorMap, String> {
        let words = self.u32s(i, 32)?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let map = crate::tma::TensorMap::from_emu_bytes(&bytes).ok_or_else(|| format!("parameter {i} does not point at a tensor map"))?;
        map.validate().map_err(|e| format!("parameter {i}: {e}"))?;
        let r = self.st.region_of(map.base).map_err(|why| format!("parameter {i}'s tensor at {:#x}: {why}", map.base))?;
        if map.base - r.ptr + map.span() > r.bytes as u64 {
            return Err(format!("parameter {i}'s tensor spans {} bytes from {:#x}, past the end of {} ({} bytes)", map.span(), map.base, r.name, r.bytes));
        }
        Ok(map)
    }

    /// `n` u32 values of the metadata parameter `i` points at.
    fn u32s(&self, i: usize, n: usize) -> std::result::Result<Vec<u32>, String> {
        let p = self.u64(i);
        let r = self.region(i)?;
        if (p - r.ptr) + 4 * n as u64 > r.bytes as u64 {
            return Err(format!("parameter {i} should hold {n} u32 values, but {} has {} bytes", r.name, r.bytes));
        }
        let (a, v) = self.st.allocation(p).expect("region() found it");
        let at = (p - a) as usize;
        Ok(v[at..at + 4 * n].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }

    /// Scalar `value` (named `what`) must equal dim `axis` of the tensor parameter `i` points at. A
    /// pointer at the start of a stack of matrices ([E, rows, cols]: a mixture's experts) points at
    /// its first matrix as much as at the stack (expert 0's projection run alone, by gemv, as a
    /// stacked kernel reads them all): either reading may agree.
    fn agrees(&self, i: usize, axis: usize, value: u64, what: &str) -> Check {
        let Some(d) = self.dims(i) else { return Ok(()) };
        let first = (d.len() == 3 && self.region(i).is_ok_and(|r| r.ptr == self.u64(i))).then(|| &d[1..]);
        let fits = |d: &[usize]| d.get(axis).map(|&x| x as u64) == Some(value);
        match fits(&d) || first.is_some_and(fits) {
            true => Ok(()),
            false => Err(format!("{what} is {value}, but the tensor of parameter {i} has shape {d:?} (axis {axis})")),
        }
    }

    /// The rows of the tensor parameter `i` points at, as `width`-wide rows.
    fn rows_of(&self, i: usize, width: u64) -> Option<u64> {
        self.dims(i).map(|d| d.iter().product::<usize>() as u64 / width.max(1))
    }
}

fn dtype_size(code: u32, what: &str) -> std::result::Result<u64, String> {
    match code {
        0 => Ok(4),
        1 | 2 => Ok(2),
        c => Err(format!("{what} is dtype code {c}: the kernels read 0 (f32), 1 (f16), 2 (bf16)")),
    }
}

fn push(out: &mut Vec<Access>, param: usize, elem_start: u64, elems: u64, elt: u64, what: impl Into<String>) {
    out.push(Access { param, offset: elem_start * elt, bytes: elems * elt, what: what.into() });
}

/// The grid covers `rows` rows, one block each (kernels that take row `blockIdx.x`).
fn grid_rows(a: &Args<'_>, rows: Option<u64>) -> Check {
    match rows {
        Some(r) if a.grid.0 as u64 != r => Err(format!("grid.x is {} but the output has {r} rows", a.grid.0)),
        _ => Ok(()),
    }
}

/// The bytes each kernel may touch, from its index arithmetic (see `kernels/*.cu`), and the checks
/// of its scalars against its tensors' shapes.
fn footprint(kernel: &str, a: &Args<'_>, out: &mut Vec<Access>) -> Check {
    let (base, elt, d) = split_name(kernel);
    let elt = elt as u64;
    let (gx, gy) = (a.grid.0 as u64, a.grid.1 as u64);
    match base {
        "embedding" => {
            // (out, table, table_dt, ids, h, scale): block t copies row ids[t] of the table, scaled.
            let h = a.u32(4) as u64;
            let table_elt = dtype_size(a.u32(2), "the table")?;
            grid_rows(a, a.rows_of(0, h))?;
            a.agrees(1, 1, h, "h")?;
            let ids = a.u32s(3, gx as usize)?;
            push(out, 3, 0, gx, 4, "ids");
            push(out, 0, 0, gx * h, elt, "out rows");
            for (t, &id) in ids.iter().enumerate() {
                push(out, 1, id as u64 * h, h, table_elt, format!("table row {id} (token {t})"));
            }
        }
        "rms_norm" | "add_rms_norm" => {
            // (out, x, [delta,] w, w_dt, h, eps): block t normalizes row t.
            let off = if base == "add_rms_norm" { 1 } else { 0 };
            let h = a.u32(4 + off) as u64;
            let w_elt = dtype_size(a.u32(3 + off), "the weight")?;
            grid_rows(a, a.rows_of(0, h))?;
            for p in 0..2 + off {
                push(out, p, 0, gx * h, elt, "rows");
            }
            push(out, 2 + off, 0, h, w_elt, "weight");
            if !a.f32(5 + off).is_finite() {
                return Err("eps is not finite".into());
            }
        }
        "layer_norm" | "add_layer_norm" => {
            // (out, x, [delta,] w, b, w_dt, h, eps): block t normalizes row t (after adding delta's
            // row to x's).
            let off = if base == "add_layer_norm" { 1 } else { 0 };
            let h = a.u32(5 + off) as u64;
            let w_elt = dtype_size(a.u32(4 + off), "the weight")?;
            grid_rows(a, a.rows_of(0, h))?;
            a.agrees(1, 1, h, "h")?;
            for p in 0..2 + off {
                push(out, p, 0, gx * h, elt, "rows");
            }
            push(out, 2 + off, 0, h, w_elt, "weight");
            push(out, 3 + off, 0, h, w_elt, "bias");
            if !a.f32(6 + off).is_finite() {
                return Err("eps is not finite".into());
            }
        }
        "add_bias" => {
            // (out, bias, bias_dt, n, total): out[i] += bias[i % n], grid-stride.
            let (n, total) = (a.u32(3) as u64, a.u64(4));
            if n == 0 || total % n != 0 {
                return Err(format!("{total} elements are not whole rows of {n}"));
            }
            a.agrees(1, 0, n, "n")?;
            push(out, 0, 0, total, elt, "out");
            push(out, 1, 0, n, dtype_size(a.u32(2), "the bias")?, "bias");
        }
        "add" => {
            // (out, delta, n): out[i] += delta[i], grid-stride.
            for (p, what) in [(0, "out"), (1, "delta")] {
                push(out, p, 0, a.u64(2), elt, what);
            }
        }
        "index_add" => {
            // (out, src, index, weight, h): block j adds row j of src, times weight[j], to row
            // index[j] of out.
            let h = a.u32(4) as u64;
            grid_rows(a, a.rows_of(1, h))?;
            a.agrees(0, 1, h, "h")?;
            a.agrees(1, 1, h, "h")?;
            let index = a.u32s(2, gx as usize)?;
            push(out, 2, 0, gx, 4, "index");
            push(out, 3, 0, gx, 4, "weight");
            push(out, 1, 0, gx * h, elt, "src rows");
            for (j, &i) in index.iter().enumerate() {
                push(out, 0, i as u64 * h, h, elt, format!("out row {i} (src row {j})"));
            }
        }
        "to_f32" => {
            let n = a.u64(3);
            push(out, 0, 0, n, 4, "out");
            push(out, 1, 0, n, dtype_size(a.u32(2), "x")?, "x");
        }
        "from_f32" => {
            let n = a.u64(2);
            push(out, 0, 0, n, elt, "out");
            push(out, 1, 0, n, 4, "x");
        }
        "swiglu" | "geglu" => {
            let n = a.u64(3);
            for p in 0..3 {
                push(out, p, 0, n, elt, "n elements");
            }
        }
        "glu_act" => {
            // (out, gate, up or null, act, n): grid-stride over n elements.
            let n = a.u64(4);
            if a.u32(3) > 4 {
                return Err(format!("activation {} is none of silu (0), gelu tanh (1), gelu erf (2), relu (3), squared relu (4)", a.u32(3)));
            }
            for p in [0, 1].into_iter().chain((a.u64(2) != 0).then_some(2)) {
                push(out, p, 0, n, elt, "n elements");
            }
        }
        "moe_route" => {
            // (ids, weights, logits, e, k, renormalize): a warp per token (block t), its k ids and
            // weights written.
            // Its shared arrays' sizes (kernels/mlp.cu's MOE_MAX_EXPERTS, MOE_MAX_TOP_K: the op's).
            let (e, k) = (a.u32(3) as u64, a.u32(4) as u64);
            let (most, most_k) = (highrise_core::ops::MOE_MAX_EXPERTS as u64, highrise_core::ops::MOE_MAX_TOP_K as u64);
            if e == 0 || e > most || k == 0 || k > e.min(most_k) || a.u32(5) > 1 {
                return Err(format!("{e} experts, top {k} (renormalize {}): at most {most} experts, 1 to {most_k} of them, renormalize 0 or 1", a.u32(5)));
            }
            if a.block != (32, 1, 1) {
                return Err(format!("block {:?}: a warp per token", a.block));
            }
            grid_rows(a, a.rows_of(2, e))?;
            a.agrees(2, 1, e, "e")?;
            push(out, 0, 0, gx * k, 4, "ids");
            push(out, 1, 0, gx * k, 4, "weights");
            push(out, 2, 0, gx * e, elt, "scores");
        }
        "moe_glu" | "moe_down" | "moe_gemv_glu" | "moe_gemv_down" => {
            // moe_glu (out, x, gate, up, ids, k, h, i, e, act), moe_down (y, a, down, ids, i, h, e):
            // pair blockIdx.y, a warp per row of expert ids[pair] (clamped below e), the rows
            // covered by grid.x. moe_gemv_glu (.., e) and moe_gemv_down: the same pairs, each
            // block gemv_glu1's or gemv1's rows of the compiled shape (16-byte chunks).
            let glu = base.ends_with("glu");
            let (k, h, i, e) = match glu {
                true => (a.u32(5) as u64, a.u32(6) as u64, a.u32(7) as u64, a.u32(8) as u64),
                false => (1, a.u32(5) as u64, a.u32(4) as u64, a.u32(6) as u64),
            };
            let gemv = base.starts_with("moe_gemv");
            let rows = if glu { i } else { h };
            let per = match (gemv, glu) {
                (true, true) => a.gemv_shape.glu_rows_per_block() as u64,
                (true, false) => a.gemv_shape.rows_per_block() as u64,
                (false, _) => a.block.0 as u64 / 32,
            };
            if k == 0 || gy % k != 0 || e == 0 || (glu && !gemv && a.u32(9) > 4) {
                return Err(format!("{gy} pairs of {k} experts a token, {e} experts (activation {})", if glu && !gemv { a.u32(9) } else { 0 }));
            }
            let block_ok = if gemv { a.block == (a.gemv_shape.threads(), 1, 1) } else { a.block.0 % 32 == 0 && a.block.1 == 1 };
            if !block_ok || gx * per < rows || (gx - 1) * per >= rows.max(1) {
                return Err(format!("grid {:?} and block {:?} do not cover {rows} rows, {per} a block", a.grid, a.block));
            }
            if gemv && (h % 8 != 0 || i % 8 != 0 || (0..4).any(|p| a.u64(p) % 16 != 0)) {
                return Err(format!("h {h}, i {i}, pointers {:#x?}: the kernel reads 16-byte chunks", (0..4).map(|p| a.u64(p)).collect::<Vec<_>>()));
            }
            let (weights, ids) = if glu { (vec![2, 3], 4) } else { (vec![2], 3) };
            let (n, kk) = if glu { (i, h) } else { (h, i) };
            for w in weights {
                a.agrees(w, 0, e, "e")?;
                a.agrees(w, 1, n, "the weight's rows")?;
                a.agrees(w, 2, kk, "the weight's columns")?;
                push(out, w, 0, e * n * kk, elt, "every expert's weights");
            }
            push(out, 0, 0, gy * n, elt, "a row per pair");
            push(out, 1, 0, if glu { gy / k * h } else { gy * i }, elt, "a row per token (per pair)");
            push(out, ids, 0, gy, 4, "an expert per pair");
        }
        "moe_combine" => {
            // (out, y, slots or null, weights, k, h, shared or null, shared_gate or null): block t
            // sums y's rows slots[t k + j] (or t k + j), weighted, and shared's row t weighted by
            // its gate's score t, into out's row t.
            let (k, h) = (a.u32(4) as u64, a.u32(5) as u64);
            grid_rows(a, a.rows_of(0, h))?;
            a.agrees(0, 1, h, "h")?;
            push(out, 0, 0, gx * h, elt, "out rows");
            match (a.u64(6) != 0, a.u64(7) != 0) {
                (false, false) => {}
                (true, true) => {
                    a.agrees(6, 1, h, "h")?;
                    push(out, 6, 0, gx * h, elt, "the shared expert's rows");
                    push(out, 7, 0, gx, elt, "its gate's scores");
                }
                _ => return Err("a shared expert's output without its gate's scores, or the other way".into()),
            }
            push(out, 3, 0, gx * k, 4, "weights");
            if a.u64(2) == 0 {
                push(out, 1, 0, gx * k * h, elt, "y rows");
            } else {
                push(out, 2, 0, gx * k, 4, "slots");
                for (j, &s) in a.u32s(2, (gx * k) as usize)?.iter().enumerate() {
                    push(out, 1, s as u64 * h, h, elt, format!("y row {s} (slot {j})"));
                }
            }
        }
        "softcap" => {
            // (x, cap, n): x = cap tanh(x / cap), grid-stride.
            if !(a.f32(1).is_finite() && a.f32(1) > 0.0) {
                return Err(format!("cap {} is not finite and above 0", a.f32(1)));
            }
            push(out, 0, 0, a.u64(2), elt, "n elements");
        }
        "rope" => {
            // (x, positions, inv_freq, heads, d, rot, mscale): block (t, head), rot/2 threads at least.
            let (heads, d) = (a.u32(3) as u64, a.u32(4) as u64);
            let rot = rotary_dims(a, 5, d)?;
            if gy != heads || (a.block.0 as u64) < rot / 2 {
                return Err(format!("grid {:?} and block {:?} do not cover {heads} heads of {} pairs", a.grid, a.block, rot / 2));
            }
            rope_rows(a, out, elt, [0, 1, 2], heads, d, rot)?;
        }
        "kv_write" => {
            // (k_cache, v_cache, k, v, slots, hkv, d, block_size): block t writes token t's rows.
            cache_rows(a, out, elt)?;
        }
        "rope_kv_write" => {
            // kv_write's parameters, then (q, positions, inv_freq, hq, rot, mscale): block (t, head) over hq
            // heads of q then hkv of k, d/2 threads (each a rotating pair or two passing dims, and two of v's).
            let (hkv, d, hq) = (a.u32(5) as u64, a.u32(6) as u64, a.u32(11) as u64);
            let rot = rotary_dims(a, 12, d)?;
            if gy != hq + hkv || (a.block.0 as u64) < d / 2 {
                return Err(format!("grid {:?} and block {:?} do not cover {hq} + {hkv} heads of {} pairs", a.grid, a.block, d / 2));
            }
            cache_rows(a, out, elt)?;
            rope_rows(a, out, elt, [8, 9, 10], hq, d, rot)?;
            rope_rows(a, out, elt, [2, 9, 10], hkv, d, rot)?;
        }
        "attn_combine" => {
            // (out, partial, hq, d, splits): block (t, h), d threads.
            let (hq, d, splits) = (a.u32(2) as u64, a.u32(3) as u64, a.u32(4) as u64);
            if gy != hq || (a.block.0 as u64) < d {
                return Err(format!("grid {:?} and block {:?} do not cover {hq} heads of {d} dims", a.grid, a.block));
            }
            if splits == 0 || splits > crate::ops::COMBINE_MAX as u64 {
                return Err(format!("{splits} slices: the kernel merges 1..={} (its shared memory)", crate::ops::COMBINE_MAX));
            }
            a.agrees(0, 1, hq, "hq")?;
            a.agrees(0, 2, d, "d")?;
            grid_rows(a, a.rows_of(0, hq * d))?;
            push(out, 0, 0, gx * hq * d, elt, "out");
            push(out, 1, 0, gx * hq * splits * (d + 2), 4, "partial states");
        }
        "attn_split" | "attn_group" => attention_split(base, a, elt, d as u64, out)?,
        "flash_attn" => flash_attention(a, elt, d as u64, None, out)?,
        "flash_attn_wg" => flash_attention(a, elt, d as u64, Some(crate::flash::Wg::Plain), out)?,
        "flash_attn_wgp" => flash_attention(a, elt, d as u64, Some(crate::flash::Wg::Pipe), out)?,
        "flash_attn_ws" => flash_attention(a, elt, d as u64, Some(crate::flash::Wg::Spec), out)?,
        "decode_attn" => decode_attention(a, elt, d as u64, out)?,
        "wgmma_probe" => {
            // (s_out, o_out, q, k, v): one warpgroup, Q 64 x d, K and V 128 x d, s 64 x 128 and o 64 x d
            // in f32 (crate::wgmma_check).
            let need = 1024 + (64 + 2 * 128) * d as u64 * elt;
            if a.grid != (1, 1, 1) || a.block != (128, 1, 1) || (a.shared as u64) < need {
                return Err(format!("grid {:?}, block {:?}, {} bytes of shared memory: one warpgroup needs {need}", a.grid, a.block, a.shared));
            }
            push(out, 0, 0, 64 * 128, 4, "s");
            push(out, 1, 0, 64 * d as u64, 4, "o");
            push(out, 2, 0, 64 * d as u64, elt, "q");
            push(out, 3, 0, 128 * d as u64, elt, "k");
            push(out, 4, 0, 128 * d as u64, elt, "v");
        }
        "tma_probe" => {
            // (out, map, row0, head): one block of 128 threads copies a box of 64 rows x d by TMA
            // (crate::tma) and writes it out, 64 x d 16-bit elements.
            if a.grid != (1, 1, 1) || a.block != (128, 1, 1) || a.shared < crate::tma::probe_shared_bytes(d) {
                return Err(format!("grid {:?}, block {:?}, {} bytes of shared memory: the probe is one block of 128 with {}", a.grid, a.block, a.shared, crate::tma::probe_shared_bytes(d)));
            }
            let map = a.tensor_map(1)?;
            if map.boxes != [64, 1, 64] || map.dims[0] != d as u64 {
                return Err(format!("the map's box {:?} over rows of {} elements: the probe copies 64 x 1 x 64 of rows of {d}", map.boxes, map.dims[0]));
            }
            push(out, 0, 0, 64 * d as u64, 2, "out");
            push(out, 1, 0, 128, 1, "tensor map");
        }
        "gemv1" | "gemv2" | "gemv4" | "gemv8" | "gemv_add1" | "gemv_add2" | "gemv_add4" | "gemv_add8" => {
            // (out, x, w, bias, bias_dt, t, k, n): warps of 2 rows of w (the compiled shape's);
            // gemv_add reads out too, the same rows it writes.
            let tm = rows_built_for(base);
            let (t, k, n) = (a.u32(5) as u64, a.u32(6) as u64, a.u32(7) as u64);
            if t == 0 || t > tm {
                return Err(format!("{t} rows of x for a kernel built for 1..{tm}"));
            }
            if k % 8 != 0 || a.u64(1) % 16 != 0 || a.u64(2) % 16 != 0 {
                return Err(format!("k {k}, x at {:#x}, w at {:#x}: the kernel reads 16-byte chunks", a.u64(1), a.u64(2)));
            }
            let per = a.gemv_shape.rows_per_block() as u64;
            if a.block != (a.gemv_shape.threads(), 1, 1) || gx * per < n || (gx - 1) * per >= n.max(1) {
                return Err(format!("grid {:?} and block {:?} do not cover {n} rows in blocks of {per}", a.grid, a.block));
            }
            a.agrees(2, 0, n, "the weight's rows")?;
            a.agrees(2, 1, k, "the weight's columns")?;
            a.agrees(1, 1, k, "x's columns")?;
            a.agrees(0, 1, n, "out's columns")?;
            push(out, 0, 0, t * n, elt, "out");
            push(out, 1, 0, t * k, elt, "x");
            push(out, 2, 0, n * k, elt, "w");
            if a.u64(3) != 0 {
                let bias_elt = if a.u32(4) == 0 { 4 } else { 2 };
                push(out, 3, 0, n, bias_elt, "bias");
            }
        }
        "gemv_qkv1" | "gemv_qkv2" | "gemv_qkv4" | "gemv_qkv8" | "gemv_qkv_norm1" => {
            // (q, k, v, x, wq, wk, wv, bq, bk, bv, bias_dt, [norm, eps,] t, k, nq, nk, nv): gemv's
            // blocks over q's rows, then k's, then v's.
            let tm = rows_built_for(base);
            let at = if base.starts_with("gemv_qkv_norm") { 13 } else { 11 };
            let (t, k) = (a.u32(at) as u64, a.u32(at + 1) as u64);
            let n = [a.u32(at + 2) as u64, a.u32(at + 3) as u64, a.u32(at + 4) as u64];
            if at == 13 {
                norm_weight(a, out, 11, k)?;
            }
            if t == 0 || t > tm {
                return Err(format!("{t} rows of x for a kernel built for 1..{tm}"));
            }
            if k % 8 != 0 || [3, 4, 5, 6].iter().any(|&p| a.u64(p) % 16 != 0) {
                return Err(format!("k {k}, x or a weight not 16-byte aligned: the kernel reads 16-byte chunks"));
            }
            let per = a.gemv_shape.rows_per_block() as u64;
            let total = n.iter().sum::<u64>();
            if n[0] % per != 0 || n[1] % per != 0 {
                return Err(format!("q's {} and k's {} rows are not whole blocks of {per}", n[0], n[1]));
            }
            if a.block != (a.gemv_shape.threads(), 1, 1) || gx * per < total || (gx - 1) * per >= total.max(1) {
                return Err(format!("grid {:?} and block {:?} do not cover {total} rows in blocks of {per}", a.grid, a.block));
            }
            a.agrees(3, 1, k, "x's columns")?;
            push(out, 3, 0, t * k, elt, "x");
            let bias_elt = if a.u32(10) == 0 { 4 } else { 2 };
            for (i, what) in ["q", "k", "v"].iter().enumerate() {
                a.agrees(4 + i, 0, n[i], &format!("w{what}'s rows"))?;
                a.agrees(4 + i, 1, k, &format!("w{what}'s columns"))?;
                a.agrees(i, 1, n[i], &format!("{what}'s columns"))?;
                push(out, i, 0, t * n[i], elt, *what);
                push(out, 4 + i, 0, n[i] * k, elt, format!("w{what}"));
                if a.u64(7 + i) != 0 {
                    push(out, 7 + i, 0, n[i], bias_elt, format!("b{what}"));
                }
            }
        }
        "gemv_glu1" | "gemv_glu2" | "gemv_glu4" | "gemv_glu8" | "gemv_glu_norm1" => {
            // (out, x, w_gate, w_up, [norm, eps,] t, k, n): warps (the compiled shape's) of one row
            // of both weights.
            let tm = rows_built_for(base);
            let at = if base.starts_with("gemv_glu_norm") { 6 } else { 4 };
            let (t, k, n) = (a.u32(at) as u64, a.u32(at + 1) as u64, a.u32(at + 2) as u64);
            if at == 6 {
                norm_weight(a, out, 4, k)?;
            }
            if t == 0 || t > tm {
                return Err(format!("{t} rows of x for a kernel built for 1..{tm}"));
            }
            if k % 8 != 0 || [1, 2, 3].iter().any(|&p| a.u64(p) % 16 != 0) {
                return Err(format!("k {k}, x and weights at {:#x}, {:#x}, {:#x}: the kernel reads 16-byte chunks", a.u64(1), a.u64(2), a.u64(3)));
            }
            let per = a.gemv_shape.glu_rows_per_block() as u64;
            if a.block != (a.gemv_shape.threads(), 1, 1) || gx * per < n || (gx - 1) * per >= n.max(1) {
                return Err(format!("grid {:?} and block {:?} do not cover {n} rows in blocks of {per}", a.grid, a.block));
            }
            for (p, what) in [(2, "w_gate"), (3, "w_up")] {
                a.agrees(p, 0, n, &format!("{what}'s rows"))?;
                a.agrees(p, 1, k, &format!("{what}'s columns"))?;
                push(out, p, 0, n * k, elt, what);
            }
            a.agrees(1, 1, k, "x's columns")?;
            a.agrees(0, 1, n, "out's columns")?;
            push(out, 0, 0, t * n, elt, "out");
            push(out, 1, 0, t * k, elt, "x");
        }
        "argmax" | "sample" => {
            // (index, logprob, x, [params,] v): block r reduces row r.
            let last = if base == "sample" { 4 } else { 3 };
            let v = a.u32(last) as u64;
            a.agrees(2, 1, v, "the vocabulary")?;
            grid_rows(a, a.rows_of(2, v))?;
            push(out, 0, 0, gx, 4, "index");
            push(out, 1, 0, gx, 4, "logprob");
            push(out, 2, 0, gx * v, elt, "logits");
            if base == "sample" {
                push(out, 3, 0, gx, std::mem::size_of::<highrise_core::ops::SampleParams>() as u64, "settings");
            }
        }
        _ => return Err("no footprint for this kernel in recording.rs".into()),
    }
    Ok(())
}

/// Where key `j` of a query row with key base `kbase` lies for KV head `g` (kernels/attention.cu's
/// `KeyAddr::at`), as the element ranges of each run of consecutive keys: contiguous prompts are one
/// run per row; the paged cache one per block (the block table read for each).
#[allow(clippy::too_many_arguments)]
fn key_runs(
    table: Option<&[u32]>,
    bs: u64,
    kbase: u64,
    nkeys: u64,
    g: u64,
    hkv: u64,
    d: u64,
    runs: &mut Vec<(u64, u64, String)>,
) -> Check {
    if nkeys == 0 {
        return Ok(());
    }
    match table {
        None => runs.push(((kbase * hkv + g) * d, ((nkeys - 1) * hkv) * d + d, format!("keys {kbase}..{} of head {g}", kbase + nkeys))),
        Some(t) => {
            for b in 0..nkeys.div_ceil(bs) {
                let idx = (kbase + b) as usize;
                let &blk = t.get(idx).ok_or(format!("the block table has {} entries but key {} needs entry {idx}", t.len(), b * bs))?;
                let slots = (nkeys - b * bs).min(bs);
                runs.push((((blk as u64 * hkv + g) * bs) * d, slots * d, format!("block {blk} (table entry {idx}) head {g}")));
            }
        }
    }
    Ok(())
}

/// The block table a paged launch reads: enough of it for the largest entry the rows may ask for.
fn table_of(a: &Args<'_>, param: usize, need: u64) -> std::result::Result<Option<Vec<u32>>, String> {
    if a.u64(param) == 0 {
        return Ok(None);
    }
    let r = a.region(param)?;
    let have = (r.bytes as u64 - (a.u64(param) - r.ptr)) / 4;
    Ok(Some(a.u32s(param, need.min(have) as usize)?))
}

/// The K/V tensor's shape against the launch's kv_heads, block size and head dim: [T, hkv, D] for
/// contiguous prompts, [blocks, hkv, block_size, D] through a block table.
fn kv_shape(a: &Args<'_>, paged: bool, hkv: u64, bs: u64, d: u64) -> Check {
    for p in [2, 3] {
        match a.dims(p) {
            Some(dims) if paged && dims.len() != 4 => return Err(format!("a block table with K/V of shape {dims:?} (not a paged cache)")),
            Some(dims) if !paged && dims.len() != 3 => return Err(format!("no block table, but K/V has shape {dims:?}")),
            _ => {}
        }
        a.agrees(p, 1, hkv, "kv_heads")?;
        if paged {
            a.agrees(p, 2, bs, "block_size")?;
            a.agrees(p, 3, d, "the head dim")?;
        } else {
            a.agrees(p, 2, d, "the head dim")?;
        }
    }
    Ok(())
}

/// attn_split / attn_group: (partial, q, k, v, base, nkeys, table, block_size, hq, hkv, scale,
/// window, softcap, alibi); grid (rows, heads: hq or hkv, splits). The kernels cut each row's keys (its last
/// `window` with a window) into the grid's slices themselves.
fn attention_split(base: &str, a: &Args<'_>, elt: u64, d: u64, out: &mut Vec<Access>) -> Check {
    let (bs, hq, hkv) = (a.u32(7) as u64, a.u32(8) as u64, a.u32(9) as u64);
    let (rows, splits) = (a.grid.0 as u64, a.grid.2 as u64);
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads cannot share {hkv} kv heads"));
    }
    let heads = if base == "attn_group" { hkv } else { hq };
    if a.grid.1 as u64 != heads {
        return Err(format!("grid.y is {} but the kernel takes one block per {} ({heads})", a.grid.1, if base == "attn_group" { "kv head" } else { "query head" }));
    }
    if base == "attn_group" && (hq / hkv > 8 || d > 128) {
        return Err(format!("attn_group takes groups of up to 8 query heads and head dims up to 128, not {} and {d}", hq / hkv));
    }
    if !a.f32(10).is_finite() {
        return Err("scale is not finite".into());
    }
    score_mods(a, 12)?;
    let paged = a.u64(6) != 0;
    if paged && bs == 0 {
        return Err("block_size is 0".into());
    }
    a.agrees(1, 1, hq, "hq")?;
    a.agrees(1, 2, d, "the head dim")?;
    grid_rows(a, a.rows_of(1, hq * d))?;
    kv_shape(a, paged, hkv, bs, d)?;
    let kbase = a.u32s(4, rows as usize)?;
    let nkeys = a.u32s(5, rows as usize)?;
    push(out, 4, 0, rows, 4, "key bases");
    push(out, 5, 0, rows, 4, "key counts");
    push(out, 1, 0, rows * hq * d, elt, "q");
    push(out, 0, 0, rows * hq * splits * (d + 2), 4, "partial states");
    let need = kbase.iter().zip(&nkeys).map(|(&b, &n)| b as u64 + (n as u64).div_ceil(bs.max(1))).max().unwrap_or(0);
    let table = if paged { table_of(a, 6, need)? } else { None };
    if paged {
        push(out, 6, 0, need, 4, "block table");
    }
    let mut runs = Vec::new();
    for (&kb, &n) in kbase.iter().zip(&nkeys) {
        for g in 0..hkv {
            key_runs(table.as_deref(), bs, kb as u64, n as u64, g, hkv, d, &mut runs)?;
        }
    }
    push_kv_runs(out, runs, elt);
    Ok(())
}

/// The Scores op's soft-cap and ALiBi (parameters `p` and `p + 1` of every attention kernel): each
/// finite and non-negative (0: none).
fn score_mods(a: &Args<'_>, p: usize) -> Check {
    for (i, name) in [(p, "softcap"), (p + 1, "alibi")] {
        let x = a.f32(i);
        if !(x.is_finite() && x >= 0.0) {
            return Err(format!("{name} {x} is not finite and non-negative"));
        }
    }
    Ok(())
}

/// The attention kernels' K and V reads (parameters 2 and 3): the same runs of rows in both.
fn push_kv_runs(out: &mut Vec<Access>, runs: Vec<(u64, u64, String)>, elt: u64) {
    for (start, len, what) in runs {
        push(out, 2, start, len, elt, format!("k: {what}"));
        push(out, 3, start, len, elt, format!("v: {what}"));
    }
}

/// flash_attn_ws's tensor maps of K and V (parameters 13 and 14): both or neither; none with a
/// block table (it reads a paged cache by cp.async); each K's or V's own, as the kernel's boxes read
/// it ([rows, kv heads, d], boxes of 64 dims x 1 head x a tile's keys).
fn tensor_maps(a: &Args<'_>, paged: bool, hkv: u64, d: u64, keys: u32) -> Check {
    let (km, vm) = (a.u64(13), a.u64(14));
    if (km == 0) != (vm == 0) {
        return Err("one tensor map of K and V but not the other".into());
    }
    if km == 0 {
        return Ok(());
    }
    if paged {
        return Err("tensor maps with a block table: the kernel reads a paged cache by cp.async".into());
    }
    for (p, tensor, name) in [(13, 2, "k"), (14, 3, "v")] {
        let map = a.tensor_map(p)?;
        let rows = a.rows_of(tensor, hkv * d).ok_or_else(|| format!("parameter {tensor} ({name}) is not one of the op's tensors"))?;
        let want = crate::tma::TensorMap { base: a.u64(tensor), dims: [d, hkv, rows], strides: [2 * d, 2 * d * hkv], boxes: [64, 1, keys] };
        if map != want {
            return Err(format!("parameter {p}: the tensor map {map:?} is not {name}'s as the kernel reads it ({want:?})"));
        }
    }
    Ok(())
}

/// flash_attn: (out, q, k, v, tiles, table, block_size, hq, hkv, scale_log2, window, softcap, alibi); grid
/// (tiles, hq);
/// tiles[5 i..5 i + 5] = (first row, rows, position of the first row, key base, keys seen).
/// flash_attn_wg, _wgp and _ws (`wg`): the same, in the Hopper kernels' geometries; _ws also takes
/// tensor maps of contiguous K and V (`tensor_maps`).
fn flash_attention(a: &Args<'_>, elt: u64, d: u64, wg: Option<crate::flash::Wg>, out: &mut Vec<Access>) -> Check {
    let (bs, hq, hkv) = (a.u32(6) as u64, a.u32(7) as u64, a.u32(8) as u64);
    let ntiles = a.grid.0 as usize;
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads cannot share {hkv} kv heads"));
    }
    if a.grid.1 as u64 != hq {
        return Err(format!("grid.y is {} but the kernel takes one block per query head ({hq})", a.grid.1));
    }
    // The tile shape the kernel was compiled with (the same table and -D options as the real driver).
    score_mods(a, 11)?;
    let (shape, threads, shared) = if let Some(wg) = wg {
        wg.launch(a.flash_wg_shapes, a.flash_ws_shapes, d as usize).map_err(|e| e.to_string())?
    } else {
        let shape = crate::flash::find(a.flash_shapes, d as usize).map_err(|e| e.to_string())?;
        (shape, shape.threads(), shape.shared_bytes(d as usize))
    };
    if a.block != (threads, 1, 1) {
        return Err(format!("block {:?}: the kernel's tiles ({shape}) take {threads} threads", a.block));
    }
    if a.shared != shared {
        return Err(format!(
            "{} bytes of dynamic shared memory, but a tile of {shape} at head dim {d} stages {shared} (Q, K and V{})",
            a.shared,
            if wg.is_some() { ", and 1024 to align them" } else { "" }
        ));
    }
    if !a.f32(9).is_finite() {
        return Err("scale is not finite".into());
    }
    let paged = a.u64(5) != 0;
    if paged && bs == 0 {
        return Err("block_size is 0".into());
    }
    for p in [0, 1] {
        a.agrees(p, 1, hq, "hq")?;
        a.agrees(p, 2, d, "the head dim")?;
    }
    kv_shape(a, paged, hkv, bs, d)?;
    if wg == Some(crate::flash::Wg::Spec) {
        tensor_maps(a, paged, hkv, d, shape.keys)?;
    }
    let tiles = a.u32s(4, 5 * ntiles)?;
    push(out, 4, 0, 5 * ntiles as u64, 4, "tiles");
    let tiles: Vec<[u64; 5]> = tiles.chunks_exact(5).map(|c| [c[0], c[1], c[2], c[3], c[4]].map(|x| x as u64)).collect();
    // The tiles' rows cover the output's rows exactly once; through the paged cache at most once
    // (a step mixing prompt chunks with decoding leaves the decoding rows to decode_attn), in
    // both cases inside the output.
    let mut spans: Vec<(u64, u64)> = tiles.iter().map(|t| (t[0], t[1])).collect();
    spans.sort_unstable();
    let mut next = 0;
    for (i, &(q0, rows)) in spans.iter().enumerate() {
        if rows == 0 || rows > shape.rows() as u64 || q0 < next || (!paged && q0 != next) {
            let how = if paged { "in order, none over another" } else { "end to end from row 0" };
            return Err(format!("tile {i} covers rows {q0}..{}: tiles must take 1..{} rows each, {how}", q0 + rows, shape.rows()));
        }
        next = q0 + rows;
    }
    if let Some(total) = a.rows_of(0, hq * d) {
        if next > total || (!paged && next != total) {
            return Err(format!("the tiles cover rows up to {next} but the output has {total}"));
        }
    }
    let need = tiles.iter().map(|t| t[3] + t[4].div_ceil(bs.max(1))).max().unwrap_or(0);
    let table = if paged { table_of(a, 5, need)? } else { None };
    if paged {
        push(out, 5, 0, need, 4, "block table");
    }
    let mut runs = Vec::new();
    for (i, t) in tiles.iter().enumerate() {
        let [q0, rows, pos0, kbase, keys] = *t;
        // The kernel's online softmax assumes every row sees key 0.
        if keys == 0 {
            return Err(format!("tile {i} (rows at positions {pos0}..{}) sees no keys", pos0 + rows));
        }
        push(out, 0, q0 * hq * d, rows * hq * d, elt, format!("out rows of tile {i}"));
        push(out, 1, q0 * hq * d, rows * hq * d, elt, format!("q rows of tile {i}"));
        for g in 0..hkv {
            key_runs(table.as_deref(), bs, kbase, keys, g, hkv, d, &mut runs)?;
        }
    }
    push_kv_runs(out, runs, elt);
    Ok(())
}

/// decode_attn: (partial, q, k_cache, v_cache, seqs, table, block_size, hq, hkv, scale_log2, window,
/// softcap, alibi, out, counters); grid (sequences, kv heads, slices: each sequence cuts its own context
/// into that many, at most DECODE_SPLITS_MAX, merged by the last block into out), the compiled
/// shape's warps (`flash::DecodeShape`); a slice counter per (sequence, kv head);
/// seqs[4 i..4 i + 4] = (first query row, new tokens, context length, block-table offset); each
/// sequence's new tokens x group <= 16 rows.
fn decode_attention(a: &Args<'_>, elt: u64, d: u64, out: &mut Vec<Access>) -> Check {
    let (bs, hq, hkv) = (a.u32(6) as u64, a.u32(7) as u64, a.u32(8) as u64);
    let (nseq, splits) = (a.grid.0 as usize, a.grid.2 as u64);
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!("{hq} query heads cannot share {hkv} kv heads"));
    }
    if a.grid.1 as u64 != hkv {
        return Err(format!("grid.y is {} but the kernel takes one block per kv head ({hkv})", a.grid.1));
    }
    score_mods(a, 11)?;
    if splits == 0 || splits > crate::ops::DECODE_SPLITS_MAX as u64 {
        return Err(format!("{splits} slices: the kernel merges 1..={} (its shared memory)", crate::ops::DECODE_SPLITS_MAX));
    }
    let shape = a.decode_shape;
    if a.block != (shape.threads(), 1, 1) {
        return Err(format!("block {:?}: the kernel's {} warps (shape {shape}) take the keys in turn", a.block, shape.warps));
    }
    if a.shared != shape.shared_bytes(d as usize) {
        return Err(format!("{} bytes of dynamic shared memory; the kernel (shape {shape}) stages {}", a.shared, shape.shared_bytes(d as usize)));
    }
    if !a.f32(9).is_finite() {
        return Err("scale is not finite".into());
    }
    if bs == 0 {
        return Err("block_size is 0".into());
    }
    a.agrees(1, 1, hq, "hq")?;
    a.agrees(1, 2, d, "the head dim")?;
    a.agrees(13, 1, hq, "the output's heads")?;
    a.agrees(13, 2, d, "the output's head dim")?;
    kv_shape(a, true, hkv, bs, d)?;
    let group = hq / hkv;
    let seqs = a.u32s(4, 4 * nseq)?;
    push(out, 4, 0, 4 * nseq as u64, 4, "sequences");
    push(out, 14, 0, nseq as u64 * hkv, 4, "slice counters");
    let seqs: Vec<[u64; 4]> = seqs.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]].map(|x| x as u64)).collect();
    let need = seqs.iter().map(|s| s[3] + s[2].div_ceil(bs)).max().unwrap_or(0);
    let table = table_of(a, 5, need)?;
    push(out, 5, 0, need, 4, "block table");
    let q_rows = a.rows_of(1, hq * d);
    let mut runs = Vec::new();
    for (i, &[q0, q_len, ctx, kbase]) in seqs.iter().enumerate() {
        if q_len == 0 || q_len * group > 16 || ctx < q_len {
            return Err(format!("sequence {i}: {q_len} new tokens of {ctx} x {group} heads: the kernel takes 1..16 rows, within the context"));
        }
        if q_rows.is_some_and(|r| q0 + q_len > r) {
            return Err(format!("sequence {i}: rows {q0}..{} past q's {} rows", q0 + q_len, q_rows.unwrap_or(0)));
        }
        push(out, 1, q0 * hq * d, q_len * hq * d, elt, format!("q rows of sequence {i}"));
        push(out, 13, q0 * hq * d, q_len * hq * d, elt, format!("output rows of sequence {i}"));
        push(out, 0, q0 * hq * splits * (d + 2), q_len * hq * splits * (d + 2), 4, format!("partial states of sequence {i}"));
        for g in 0..hkv {
            key_runs(table.as_deref(), bs, kbase, ctx, g, hkv, d, &mut runs)?;
        }
    }
    push_kv_runs(out, runs, elt);
    Ok(())
}

/// The rotating dims of a head of `d` (parameter `param`): even, above 0, at most `d`.
fn rotary_dims(a: &Args<'_>, param: usize, d: u64) -> std::result::Result<u64, String> {
    let rot = a.u32(param) as u64;
    match rot > 0 && rot <= d && rot % 2 == 0 {
        true => Ok(rot),
        false => Err(format!("{rot} rotary dims in a head dim of {d}: an even number from 2 to it")),
    }
}

/// RoPE's rows: x [t, heads, d] (parameter `x`; t = grid.x), the positions, the frequencies (one a
/// rotating pair of the `rot` dims).
#[allow(clippy::too_many_arguments)]
fn rope_rows(a: &Args<'_>, out: &mut Vec<Access>, elt: u64, [x, positions, inv_freq]: [usize; 3], heads: u64, d: u64, rot: u64) -> Check {
    let t = a.grid.0 as u64;
    a.agrees(x, 1, heads, "heads")?;
    a.agrees(x, 2, d, "d")?;
    grid_rows(a, a.rows_of(x, heads * d))?;
    push(out, x, 0, t * heads * d, elt, "x");
    push(out, positions, 0, t, 4, "positions");
    push(out, inv_freq, 0, rot / 2, 8, "inv_freq");
    // The cos/sin factor (1, or LongRoPE's attention factor): both rope kernels' last parameter.
    let mscale = a.f32(a.kinds.len() - 1);
    if !(mscale.is_finite() && mscale > 0.0) {
        return Err(format!("mscale {mscale} is not finite and above 0"));
    }
    Ok(())
}

/// kv_write's rows (parameters k_cache, v_cache, k, v, slots, hkv, d, block_size): token t's rows
/// to the cache at slots[t], t = grid.x.
fn cache_rows(a: &Args<'_>, out: &mut Vec<Access>, elt: u64) -> Check {
    let (hkv, d, bs) = (a.u32(5) as u64, a.u32(6) as u64, a.u32(7) as u64);
    let gx = a.grid.0 as u64;
    if bs == 0 {
        return Err("block_size is 0".into());
    }
    for p in [0, 1] {
        a.agrees(p, 1, hkv, "kv heads")?;
        a.agrees(p, 2, bs, "block_size")?;
        a.agrees(p, 3, d, "d")?;
    }
    a.agrees(2, 1, hkv, "kv heads")?;
    grid_rows(a, a.rows_of(2, hkv * d))?;
    let slots = a.u32s(4, gx as usize)?;
    push(out, 4, 0, gx, 4, "slots");
    for p in [2, 3] {
        push(out, p, 0, gx * hkv * d, elt, "new rows");
    }
    for (t, &slot) in slots.iter().enumerate() {
        let first = ((slot as u64 / bs) * hkv * bs + slot as u64 % bs) * d;
        for p in [0, 1] {
            push(out, p, first, (hkv - 1) * bs * d + d, elt, format!("slot {slot} (token {t})"));
        }
    }
    Ok(())
}

/// The host address behind device address `p` (executing drivers).
fn host_address(st: &mut State, p: u64) -> Option<u64> {
    let (&base, v) = st.allocs.range_mut(..=p).next_back()?;
    (p < base + v.len().max(1) as u64).then(|| v.as_mut_ptr() as u64 + (p - base))
}

/// A GEMM on the CPU: f32 accumulation of the dtype's values, one rounding to the output's.
fn run_gemm(st: &mut State, g: &Gemm) -> Result<()> {
    let read = |st: &mut State, ptr: u64, n: usize, dt: DType| -> Result<Vec<f32>> {
        let bytes = n * dt.storage_bytes(1).unwrap_or(4);
        let at = host_address(st, ptr).ok_or_else(|| Error::Backend(format!("gemm: {ptr:#x}")))?;
        // SAFETY: the GEMM's checks put these bytes inside a live allocation.
        let raw = unsafe { std::slice::from_raw_parts(at as *const u8, bytes) };
        Ok(match dt {
            DType::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
    };
    let x = read(st, g.x, g.t * g.k, g.input)?;
    let w = read(st, g.w, g.n * g.k, g.input)?;
    let mut out = vec![0f32; g.t * g.n];
    std::thread::scope(|s| {
        let per = g.n.div_ceil(std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        for (j, rows) in out.chunks_mut(g.n).enumerate() {
            let x = &x[j * g.k..][..g.k];
            for (c, part) in rows.chunks_mut(per).enumerate() {
                let w = &w;
                s.spawn(move || {
                    for (i, o) in part.iter_mut().enumerate() {
                        let r = c * per + i;
                        *o = x.iter().zip(&w[r * g.k..][..g.k]).map(|(a, b)| a * b).sum();
                    }
                });
            }
        }
    });
    let at = host_address(st, g.out).ok_or_else(|| Error::Backend(format!("gemm: {:#x}", g.out)))?;
    let size = g.output.storage_bytes(1).unwrap_or(4);
    // SAFETY: as above, for the output.
    let raw = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, g.t * g.n * size) };
    for (o, v) in raw.chunks_exact_mut(size).zip(out) {
        match g.output {
            DType::F16 => o.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::BF16 => o.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            _ => o.copy_from_slice(&v.to_le_bytes()),
        }
    }
    Ok(())
}

impl Driver for RecordingDriver {
    fn device(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn bind(&self) -> Result<()> {
        Ok(())
    }

    unsafe fn malloc(&self, bytes: usize) -> Result<u64> {
        let mut st = self.lock();
        let ptr = st.next;
        // 256-byte aligned, as cuMemAlloc's, with a gap so that adjacent allocations never touch.
        st.next += (bytes as u64).div_ceil(256) * 256 + 256;
        // Zeros: kernels never run here, so what an op's outputs read back is zeros (token 0 from
        // argmax, say), the same every run.
        st.allocs.insert(ptr, vec![0; bytes]);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: u64) {
        let mut st = self.lock();
        if st.allocs.remove(&ptr).is_none() {
            st.summary.faults.push(format!("free of {ptr:#x}, which is not a live allocation"));
        }
    }

    unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        let mut st = self.lock();
        st.other_thread_in_capture("a copy to the device")?;
        let (at, buf) = slot(&mut st, dst, src.len(), "copy to the device")?;
        buf[at..at + src.len()].copy_from_slice(src);
        Ok(())
    }

    unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        let mut st = self.lock();
        st.other_thread_in_capture("a copy from the device")?;
        let (at, buf) = slot(&mut st, src, dst.len(), "copy from the device")?;
        dst.copy_from_slice(&buf[at..at + dst.len()]);
        Ok(())
    }

    unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let mut st = self.lock();
        st.other_thread_in_capture("a device-to-device copy")?;
        if st.capture.is_some() {
            // Both ranges must be live now; the bytes move when the graph runs.
            slot(&mut st, src, bytes, "device-to-device copy (source)")?;
            slot(&mut st, dst, bytes, "device-to-device copy (destination)")?;
            st.capture.as_mut().expect("capturing").push(Captured::Copy { dst, src, bytes });
            return Ok(());
        }
        let (at, buf) = slot(&mut st, src, bytes, "device-to-device copy (source)")?;
        let data = buf[at..at + bytes].to_vec();
        let (at, buf) = slot(&mut st, dst, bytes, "device-to-device copy (destination)")?;
        buf[at..at + bytes].copy_from_slice(&data);
        Ok(())
    }

    unsafe fn launch(&self, l: &Launch<'_>) -> Result<()> {
        let mut st = self.lock();
        st.other_thread_in_capture(&format!("a launch of {}", l.kernel))?;
        let checked = self.check(&mut st, l);
        match checked {
            Ok(rec) if st.capture.is_some() => {
                let (op, regions) = (st.op.clone(), st.regions.clone());
                st.capture.as_mut().expect("capturing").push(Captured::Launch { op, regions, rec });
                Ok(())
            }
            Ok(rec) => {
                if let Some(lib) = &self.exec {
                    // Device pointers become the host addresses of the memory behind them.
                    let kinds = contract(l.kernel).unwrap_or_default();
                    let mut values: Vec<Vec<u8>> = rec.args.clone();
                    // Tensor maps as the kernels read them: copies whose tensor's address is the
                    // host's (alive until the launch returns).
                    let mut maps: Vec<Box<[u8; 128]>> = Vec::new();
                    for (v, kind) in values.iter_mut().zip(&kinds) {
                        if !matches!(kind, Kind::Ptr { .. } | Kind::Map { .. }) {
                            continue;
                        }
                        let p = u64::from_le_bytes(v[..8].try_into().expect("a pointer"));
                        if p != 0 {
                            let host = host_address(&mut st, p).ok_or_else(|| Error::Backend(format!("{}: pointer {p:#x}", l.kernel)))?;
                            *v = host.to_le_bytes().to_vec();
                        }
                        if let (Kind::Map { .. }, true) = (kind, p != 0) {
                            let (at, buf) = slot(&mut st, p, 128, "a tensor map")?;
                            let bytes: [u8; 128] = buf[at..at + 128].try_into().expect("128 bytes");
                            let map = crate::tma::TensorMap::from_emu_bytes(&bytes).ok_or_else(|| Error::Backend(format!("{}: not a tensor map", l.kernel)))?;
                            let base = host_address(&mut st, map.base).ok_or_else(|| Error::Backend(format!("{}: tensor at {:#x}", l.kernel, map.base)))?;
                            maps.push(Box::new(crate::tma::TensorMap::rebased(&bytes, base)));
                            *v = (maps.last().expect("pushed").as_ptr() as u64).to_le_bytes().to_vec();
                        }
                    }
                    let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v.as_mut_ptr() as *mut std::ffi::c_void).collect();
                    // SAFETY: the launch passed the checks: its parameters match the PTX, and every
                    // byte its kernel may touch lies inside the op's regions, i.e. inside the host
                    // memory behind these addresses.
                    unsafe { lib.launch(l.kernel, l.grid, l.block, l.shared_bytes, &mut params, crate::kernels::programmatic(l.kernel)) }?;
                } else if rec.kernel.starts_with("argmax_") || rec.kernel.starts_with("sample_") {
                    // The one effect simulated: the chosen tokens and their log-probabilities are
                    // zeros (token 0), so the engine's host code goes on with valid ids.
                    let rows = rec.grid.0 as usize * 4;
                    for i in [0, 1] {
                        let ptr = u64::from_le_bytes(rec.args[i][..8].try_into().expect("a pointer"));
                        if let Ok((at, buf)) = slot(&mut st, ptr, rows, "the chosen tokens") {
                            buf[at..at + rows].fill(0);
                        }
                    }
                }
                st.summary.launches += 1;
                *st.summary.kernels.entry(rec.kernel.clone()).or_default() += 1;
                let op = st.op.clone();
                *st.summary.ops.entry(op).or_default() += 1;
                st.recorded.push(rec);
                Ok(())
            }
            Err(why) => {
                let msg = format!("cuda host check: {}: launch of {} refused: {why}", st.op, l.kernel);
                st.summary.faults.push(msg.clone());
                Err(Error::Backend(msg))
            }
        }
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        let mut st = self.lock();
        st.other_thread_in_capture("a GEMM")?;
        let size = |d: DType| d.storage_bytes(1).unwrap_or(0) as u64;
        let parts = [("x", g.x, g.t * g.k, g.input), ("weight", g.w, g.n * g.k, g.input), ("out", g.out, g.t * g.n, g.output)];
        for (name, ptr, elems, dt) in parts {
            let bytes = elems as u64 * size(dt);
            let inside = st.region_of(ptr).is_ok_and(|r| ptr + bytes <= r.ptr + r.bytes as u64);
            if !inside {
                let msg = format!(
                    "cuda host check: {}: GEMM [{}, {}] x [{}, {}]^T refused: {name} ({bytes} bytes at {ptr:#x}) is not inside one of the op's regions",
                    st.op, g.t, g.k, g.n, g.k
                );
                st.summary.faults.push(msg.clone());
                return Err(Error::Backend(msg));
            }
        }
        if st.capture.is_some() {
            let (op, regions) = (st.op.clone(), st.regions.clone());
            st.capture.as_mut().expect("capturing").push(Captured::Gemm { op, regions, gemm: *g });
            return Ok(());
        }
        if self.exec.is_some() {
            run_gemm(&mut st, g)?;
        }
        st.summary.gemms += 1;
        st.summary.accesses += 3;
        let op = st.op.clone();
        *st.summary.ops.entry(op).or_default() += 1;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    unsafe fn begin_capture(&self) -> Result<()> {
        let mut st = self.lock();
        if st.capture.is_some() {
            return Err(Error::Backend("cuda host check: a graph capture began inside another".into()));
        }
        st.capture = Some(Vec::new());
        st.capturer = Some(std::thread::current().id());
        Ok(())
    }

    unsafe fn end_capture(&self) -> Result<u64> {
        let mut st = self.lock();
        let graph = st.capture.take().ok_or_else(|| Error::Backend("cuda host check: end_capture without begin_capture".into()))?;
        st.capturer = None;
        let id = st.next_graph;
        st.next_graph += 1;
        st.graphs.insert(id, graph);
        st.summary.graphs_captured += 1;
        Ok(id)
    }

    /// Runs the graph's launches and GEMMs in order, each checked again against the memory as it is
    /// now (its metadata is read afresh: what a graph's kernels see when it is replayed).
    unsafe fn launch_graph(&self, graph: u64) -> Result<()> {
        let nodes = {
            let mut st = self.lock();
            st.summary.graph_launches += 1;
            st.graphs.get(&graph).cloned().ok_or_else(|| Error::Backend(format!("cuda host check: no graph {graph}")))?
        };
        for node in nodes {
            match node {
                Captured::Launch { op, regions, mut rec } => {
                    self.begin_op(&op, regions);
                    let params: Vec<*mut std::ffi::c_void> = rec.args.iter_mut().map(|v| v.as_mut_ptr() as *mut std::ffi::c_void).collect();
                    self.launch(&Launch { kernel: &rec.kernel, grid: rec.grid, block: rec.block, shared_bytes: rec.shared_bytes, params: &params })?;
                }
                Captured::Gemm { op, regions, gemm } => {
                    self.begin_op(&op, regions);
                    self.gemm(&gemm)?;
                }
                Captured::Copy { dst, src, bytes } => self.dtod(dst, src, bytes)?,
            }
        }
        Ok(())
    }

    fn graph_regions(&self, graph: u64, nodes: Vec<(String, Vec<Region>)>) {
        let mut st = self.lock();
        let Some(g) = st.graphs.get_mut(&graph) else { return };
        if g.len() != nodes.len() {
            let msg = format!("graph {graph} has {} nodes, but {} were described", g.len(), nodes.len());
            st.summary.faults.push(msg);
            return;
        }
        for (node, (name, now)) in g.iter_mut().zip(nodes) {
            if let Captured::Launch { op, regions, .. } | Captured::Gemm { op, regions, .. } = node {
                (*op, *regions) = (name, now);
            }
        }
    }

    unsafe fn destroy_graph(&self, graph: u64) {
        let mut st = self.lock();
        if st.graphs.remove(&graph).is_none() {
            st.summary.faults.push(format!("destroy_graph of {graph}, which is no graph"));
        }
    }

    fn checks(&self) -> bool {
        true
    }

    fn begin_op(&self, op: &str, regions: Vec<Region>) {
        let mut st = self.lock();
        st.op = op.to_string();
        st.regions = regions;
    }

    fn region(&self, region: Region) {
        self.lock().regions.push(region);
    }
}

/// The allocation holding `ptr..ptr + len` and the offset of `ptr` in it.
fn slot<'a>(st: &'a mut State, ptr: u64, len: usize, what: &str) -> Result<(usize, &'a mut Vec<u8>)> {
    let found = st.allocs.range_mut(..=ptr).next_back().filter(|(a, v)| ptr - **a + len as u64 <= v.len() as u64);
    match found {
        Some((&a, v)) => Ok(((ptr - a) as usize, v)),
        None => {
            let msg = format!("cuda host check: {what} of {len} bytes at {ptr:#x} is outside every live allocation");
            st.summary.faults.push(msg.clone());
            Err(Error::Backend(msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_split_into_family_dtype_and_head_dim() {
        assert_eq!(split_name("attn_group_d128_bf16"), ("attn_group", 2, 128));
        assert_eq!(split_name("flash_attn_d64_f16"), ("flash_attn", 2, 64));
        assert_eq!(split_name("flash_attn_wg_d128_bf16"), ("flash_attn_wg", 2, 128));
        assert_eq!(split_name("flash_attn_wgp_d64_f16"), ("flash_attn_wgp", 2, 64));
        assert_eq!(split_name("rms_norm_f32"), ("rms_norm", 4, 0));
        assert_eq!(split_name("to_f32"), ("to_f32", 4, 0));
        assert_eq!(split_name("from_f32_bf16"), ("from_f32", 2, 0));
        assert_eq!(split_name("add_rms_norm_f16"), ("add_rms_norm", 2, 0));
    }
}

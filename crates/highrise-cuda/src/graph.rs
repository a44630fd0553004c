//! CUDA graphs for steps that repeat (#20): a decode step is 9 launches per layer (15 before the
//! fused ops), each costing the host several microseconds; replayed as one graph they cost one.
//!
//! Between `Backend::graph_begin` and `graph_end` the backend records instead of launching: every
//! kernel launch and GEMM with its parameter values, and every op's small host arrays (token ids,
//! positions, slots, block tables, sampling settings) laid out in one staging buffer whose device
//! copy the recorded launches point into. At `graph_end` the staging buffer goes to the device in
//! one copy, and then:
//! - if the graph kept for the step's key was captured from the same work (every launch's kernel,
//!   grid, block, shared memory and parameter bytes, every GEMM, equal), it is launched: it is then
//!   exactly the launches this step would have made, and what changed between the steps lives in
//!   the memory they read (the staging copy, the KV cache, the tokens), not in their parameters;
//! - otherwise the recorded work is captured into a new graph, kept for the key, and launched.
//!
//! Device-to-device copies (`Backend::copy`: captures of activations into a buffer read after the
//! step) are recorded too; reads, writes and host-side waits are not.
//!
//! So a graph is never replayed for work it was not captured from: a kernel whose grid or scalars
//! depended on context lengths would only cost a capture per step, never a wrong result (none of a
//! decode step's does: the attention kernels cut each row's keys into their grid's slices
//! themselves). Anything that must see results mid-step (a read, a write) first runs the recording
//! op by op ("flush"), and the rest of the step runs op by op. The recording is the backend's, not a
//! thread's: another thread's ops during a step are recorded in order with it (so a buffer one
//! thread frees and another reuses is still used in order), and everything that queues device work
//! holds the op state, so none of it lands inside a graph while one is being captured.

use highrise_core::{Error, GraphStats, Result};

use crate::driver::{Driver, Gemm, Launch, Param, Region};

/// Parameter bytes a launch can hold (the kernels take at most 18 parameters, 128 bytes in all).
const ARG_BYTES: usize = 128;
pub(crate) const MAX_ARGS: usize = 18;

/// One device operation of a step, as the backend would have queued it.
#[derive(Clone, PartialEq)]
pub(crate) enum Work {
    Launch {
        kernel: String,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        nargs: u8,
        /// Each parameter's size, and the values laid end to end.
        sizes: [u8; MAX_ARGS],
        bytes: [u8; ARG_BYTES],
    },
    Gemm(Gemm),
    /// A device-to-device copy (a capture of an activation, taken on the device).
    Copy { dst: u64, src: u64, bytes: usize },
}

impl Work {
    /// A launch of `kernel` with `args`: (size, value bytes) each, of the `given` the kernel was
    /// passed (more than `args` holds: refused).
    pub fn launch(kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, args: &[(usize, Param)], given: usize) -> Result<Work> {
        let (mut sizes, mut bytes, mut at) = ([0u8; MAX_ARGS], [0u8; ARG_BYTES], 0);
        if given != args.len() || args.len() > MAX_ARGS || args.iter().map(|a| a.0).sum::<usize>() > ARG_BYTES {
            return Err(Error::Backend(format!("cuda graphs: {kernel} has more parameters than a recorded launch holds")));
        }
        for (i, &(size, p)) in args.iter().enumerate() {
            // SAFETY: each address points at a value of `size` bytes (KernelArg).
            bytes[at..at + size].copy_from_slice(unsafe { std::slice::from_raw_parts(p as *const u8, size) });
            sizes[i] = size as u8;
            at += size;
        }
        Ok(Work::Launch { kernel: kernel.to_string(), grid, block, shared, nargs: args.len() as u8, sizes, bytes })
    }

    /// Queues it on `drv`.
    ///
    /// # Safety
    /// As `Driver::launch` and `Driver::gemm`: the recorded addresses are live allocations of `drv`.
    unsafe fn queue(&self, drv: &dyn Driver) -> Result<()> {
        match self {
            Work::Gemm(g) => drv.gemm(g),
            Work::Copy { dst, src, bytes } => drv.dtod(*dst, *src, *bytes),
            Work::Launch { kernel, grid, block, shared, nargs, sizes, bytes } => {
                let mut params = [std::ptr::null_mut(); MAX_ARGS];
                let mut at = 0;
                for (i, p) in params.iter_mut().enumerate().take(*nargs as usize) {
                    *p = bytes[at..].as_ptr() as Param;
                    at += sizes[i] as usize;
                }
                drv.launch(&Launch { kernel, grid: *grid, block: *block, shared_bytes: *shared, params: &params[..*nargs as usize] })
            }
        }
    }
}

/// A step being recorded.
pub(crate) struct Step {
    key: u64,
    work: Vec<Work>,
    /// The op each work item belongs to (its name and, for a checking driver, its regions), and
    /// how many of the op's regions were told when the item was recorded: the item is checked
    /// against those alone, as it would have been run at once. (An op whose later launch is given
    /// more workspace at the same address, a mixed step's decode_attn then flash_attn, checked the
    /// first launch against the second's region; such a step is recorded only inside another
    /// thread's graph step, and was refused there, 2026-12-02.)
    op_of: Vec<(usize, usize)>,
    ops: Vec<(String, Vec<Region>)>,
    /// The step's host arrays, each at a 256-byte aligned offset of its half of the device
    /// metadata buffer (`Place`): those of the batch's shape from its start, block tables from its
    /// middle.
    staging: [Vec<u8>; 2],
    /// (op, part, half, offset, length) of each array staged, so that an op passing the same array
    /// as an earlier op of the step (every layer's positions, block table) shares its copy.
    staged: Vec<(&'static str, usize, usize, usize, usize)>,
    /// Device memory given up during the step (a workspace grown): freed once the work is queued.
    pub retired: Vec<u64>,
}

impl Step {
    pub fn new(key: u64) -> Step {
        Step { key, work: Vec::new(), op_of: Vec::new(), ops: Vec::new(), staging: [Vec::new(), Vec::new()], staged: Vec::new(), retired: Vec::new() }
    }

    pub fn begin_op(&mut self, name: &str, regions: Vec<Region>) {
        self.ops.push((name.to_string(), regions));
    }

    /// The op being recorded: its name and regions (a checking driver's).
    pub fn current_op(&self) -> Option<(String, Vec<Region>)> {
        self.ops.last().cloned()
    }

    /// One more region of the current op (a checking driver's).
    pub fn region(&mut self, r: Region) {
        if let Some(op) = self.ops.last_mut() {
            op.1.push(r);
        }
    }

    pub fn push(&mut self, w: Work) {
        let told = self.ops.last().map_or(0, |op| op.1.len());
        self.op_of.push((self.ops.len().saturating_sub(1), told));
        self.work.push(w);
    }

    /// The name of op `op.0` and its first `op.1` regions.
    fn told(&self, (op, told): (usize, usize)) -> (String, Vec<Region>) {
        self.ops.get(op).map(|(name, regions)| (name.clone(), regions[..told.min(regions.len())].to_vec())).unwrap_or_default()
    }

    /// The device address (in `meta`, of `cap` bytes) of a copy of `bytes`, part `part` of op
    /// `op`, in the half of the buffer of its `place`; None when that half is full.
    pub fn stage(&mut self, op: &'static str, part: usize, bytes: &[u8], place: Place, meta: u64, cap: usize) -> Option<u64> {
        let h = place as usize;
        let base = meta + (h * half(cap)) as u64;
        let staging = &self.staging[h];
        let same = |&&(o, p, sh, at, len): &&(&str, usize, usize, usize, usize)| o == op && p == part && sh == h && staging[at..at + len] == *bytes;
        if let Some(&(_, _, _, at, _)) = self.staged.iter().find(same) {
            return Some(base + at as u64);
        }
        let at = staging.len().div_ceil(256) * 256;
        if at + bytes.len() > half(cap) {
            return None;
        }
        let staging = &mut self.staging[h];
        staging.resize(at, 0);
        staging.extend_from_slice(bytes);
        self.staged.push((op, part, h, at, bytes.len()));
        Some(base + at as u64)
    }

    /// The metadata buffer's bytes this step needs with `more` bytes staged in each half besides
    /// what it has.
    pub fn meta_needed(&self, more: usize) -> usize {
        2 * (self.staging[0].len().max(self.staging[1].len()) + more)
    }

    pub fn is_empty(&self) -> bool {
        self.work.is_empty()
    }

    /// The staged arrays of each half, to copy to the metadata buffer (of `cap` bytes) before
    /// the work runs: (offset into the buffer, bytes).
    pub fn staging_bytes(&self, cap: usize) -> [(usize, &[u8]); 2] {
        [(0, &self.staging[0]), (half(cap), &self.staging[1])]
    }

    /// Queues the recorded work on `drv` one item at a time (the device copy of the staging buffer
    /// must be queued first), telling a checking driver each op's regions as it goes.
    ///
    /// # Safety
    /// The context is bound; every recorded address is a live allocation of `drv`.
    pub unsafe fn queue(&self, drv: &dyn Driver) -> Result<()> {
        let mut current = (usize::MAX, 0);
        for (w, &op) in self.work.iter().zip(&self.op_of) {
            if op != current && drv.checks() {
                let (name, regions) = self.told(op);
                drv.begin_op(&name, regions);
                current = op;
            }
            w.queue(drv)?;
        }
        Ok(())
    }
}

/// Where a graph step's host array is staged in the metadata buffer. A block table grows as its
/// sequences cross block boundaries, a 256-byte place every 64 blocks: laid after the arrays of the
/// batch's shape (the sampling settings, staged after the first layer's attention), it moved them,
/// and with them the parameters of the launches reading them, and the step was captured anew (at
/// 256 sequences of 16-token blocks, every fourth step). Tables are staged from the buffer's middle
/// instead, where their growth moves nothing.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Place {
    /// Arrays whose size is the batch's shape (ids, positions, slots, per-sequence metadata, sampling
    /// settings): from the buffer's start.
    Shape = 0,
    /// A block table: from the buffer's middle.
    Table = 1,
}

/// Where the metadata buffer's second half (`Place::Table`) starts, in a buffer of `cap` bytes.
fn half(cap: usize) -> usize {
    cap / 2 / 256 * 256
}

/// A graph captured from a step's work.
struct Graph {
    key: u64,
    handle: u64,
    work: Vec<Work>,
    last_use: u64,
}

/// The batch size of the graph kept for a decode step of `sequences` one-token sequences
/// (`Backend::graph_batch`): 1, 2, 4, then multiples of 8 up to 256, of 32 beyond (vLLM's capture
/// sizes, in steps of 8 to 256). A batch padded up to its bucket reads the same weights (a step
/// below a few hundred rows is bound by them) and writes a few more rows; one graph serves every
/// batch size of its bucket.
pub(crate) fn bucket(sequences: usize) -> usize {
    match sequences {
        0..=4 => sequences.next_power_of_two().max(1),
        5..=256 => sequences.div_ceil(8) * 8,
        _ => sequences.div_ceil(32) * 32,
    }
}

/// Graphs kept: those of the keys seen recently (a batch size, a sampling mode), at most
/// `PER_KEY` works each (a step of one key whose launches alternate, as the first decode step of an
/// empty cache, attending to its prompt alone, and the steps after it, replays both graphs instead
/// of capturing each anew every time). Room for every bucket to 512 (43, vLLM's largest capture
/// size) in both sampling modes, and a few more: a server's batch may wander over all of them, its
/// warm-up (`Engine::warm_up`) captures them all before it serves, and a graph kept is a few
/// hundred nodes.
const KEPT: usize = 96;
const PER_KEY: usize = 4;

/// The graphs kept, and what became of each step.
#[derive(Default)]
pub(crate) struct Graphs {
    graphs: Vec<Graph>,
    clock: u64,
    pub stats: GraphStats,
    /// Why graphs are off for good: a capture or a graph launch the driver refused (every later
    /// step then runs op by op rather than failing or capturing in vain each time).
    pub off: Option<String>,
}

impl Graphs {
    /// Runs a recorded step whose staging buffer is on the device already: a graph kept for its
    /// key if one was captured from the same work, else a new graph captured from it (kept beside
    /// the key's others, up to `PER_KEY`), else, where the driver cannot capture, the work op by op.
    ///
    /// # Safety
    /// The context is bound; every recorded address is a live allocation of `drv`.
    pub unsafe fn run(&mut self, drv: &dyn Driver, step: Step) -> Result<()> {
        self.clock += 1;
        if self.off.is_some() {
            self.stats.eager += 1;
            return step.queue(drv);
        }
        if let Some(g) = self.graphs.iter_mut().find(|g| g.key == step.key && g.work == step.work) {
            g.last_use = self.clock;
            if drv.checks() {
                drv.graph_regions(g.handle, step.op_of.iter().map(|&i| step.told(i)).collect());
            }
            let handle = g.handle;
            return self.launch(drv, handle, &step);
        }
        // What the driver does at a GEMM's first run that a capture cannot hold (timing cuBLASLt's
        // algorithms), done before it.
        let gemms: Vec<Gemm> = step.work.iter().filter_map(|w| if let Work::Gemm(g) = w { Some(*g) } else { None }).collect();
        drv.prepare(&gemms);
        let capture = || -> Result<(Result<()>, Result<u64>)> {
            drv.begin_capture()?;
            let queued = step.queue(drv);
            Ok((queued, drv.end_capture()))
        };
        let mut attempt = capture();
        // A capture the device refused, with something the driver can do without (programmatic
        // dependent launches): once more without it, before graphs are given up.
        if !drv.checks() && !matches!(attempt, Ok((Ok(()), Ok(_)))) && drv.simplify_captures() {
            if let Ok((_, Ok(h))) = attempt {
                drv.destroy_graph(h);
            }
            attempt = capture();
        }
        let (queued, captured) = match attempt {
            Ok(pair) => pair,
            Err(e) => return self.give_up(drv, format!("capture: {e}"), &step),
        };
        let handle = match (queued, captured) {
            (Ok(()), Ok(h)) => h,
            (Err(e), captured) => {
                if let Ok(h) = captured {
                    drv.destroy_graph(h);
                }
                // A checking driver's refusal: the op's error. The device's: the step op by op.
                return if drv.checks() { Err(e) } else { self.give_up(drv, format!("capture: {e}"), &step) };
            }
            (Ok(()), Err(e)) => return self.give_up(drv, format!("capture: {e}"), &step),
        };
        // Room for it: the least recently used graph of its key where the key has its fill, else
        // of all where all have theirs.
        let same_key = self.graphs.iter().filter(|g| g.key == step.key).count();
        let evict = match (same_key >= PER_KEY, self.graphs.len() >= KEPT) {
            (true, _) => (0..self.graphs.len()).filter(|&i| self.graphs[i].key == step.key).min_by_key(|&i| self.graphs[i].last_use),
            (false, true) => (0..self.graphs.len()).min_by_key(|&i| self.graphs[i].last_use),
            (false, false) => None,
        };
        if let Some(i) = evict {
            drv.destroy_graph(self.graphs.swap_remove(i).handle);
        }
        self.stats.captured += 1;
        self.graphs.push(Graph { key: step.key, handle, work: step.work.clone(), last_use: self.clock });
        self.launch(drv, handle, &step)
    }

    /// Launches a graph of `step`'s work; where the driver refuses, the step op by op instead.
    unsafe fn launch(&mut self, drv: &dyn Driver, handle: u64, step: &Step) -> Result<()> {
        match drv.launch_graph(handle) {
            Ok(()) => {
                self.stats.launched += 1;
                Ok(())
            }
            Err(e) => self.give_up(drv, format!("graph launch: {e}"), step),
        }
    }

    /// Turns graphs off for good (`why`) and runs `step` op by op.
    unsafe fn give_up(&mut self, drv: &dyn Driver, why: String, step: &Step) -> Result<()> {
        if drv.checks() {
            // A checking driver's refusal is a fault in our host code, not the device's limit.
            return Err(Error::Backend(format!("cuda graphs: {why}")));
        }
        self.clear(drv);
        // Said once, where a person running a benchmark or a check will see it: the steps still run
        // (op by op), only slower than they could.
        eprintln!("highrise: cuda graphs are off for this backend from now on ({why}); steps run op by op");
        self.off = Some(why);
        self.stats.eager += 1;
        step.queue(drv)
    }

    /// Destroys every graph (their recorded addresses are about to be freed).
    ///
    /// # Safety
    /// The context is bound.
    pub unsafe fn clear(&mut self, drv: &dyn Driver) {
        for g in self.graphs.drain(..) {
            drv.destroy_graph(g.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::DeviceInfo;
    use highrise_core::DType;
    use std::sync::Mutex;

    /// A driver that runs launches (counting them) and captures as told: `capture` false refuses
    /// to begin one, as a device may; `extra` stands for something the driver adds to captures
    /// (programmatic dependent launches) that the device refuses at their end while it is on.
    struct Fake {
        capture: bool,
        extra: std::sync::atomic::AtomicBool,
        log: Mutex<Vec<String>>,
        /// Graphs made so far: the next one's handle is 7 + this.
        made: std::sync::atomic::AtomicU64,
        /// Whether it checks launches (is told each op's regions, logged as "op name: regions").
        checking: bool,
    }

    fn fake(capture: bool, extra: bool) -> Fake {
        Fake { capture, extra: extra.into(), log: Mutex::new(Vec::new()), made: 0.into(), checking: false }
    }

    impl Driver for Fake {
        fn device(&self) -> DeviceInfo {
            DeviceInfo { name: "fake".into(), arch: "sm_90a".into(), sms: 1 }
        }
        fn bind(&self) -> Result<()> {
            Ok(())
        }
        unsafe fn malloc(&self, _: usize) -> Result<u64> {
            unreachable!()
        }
        unsafe fn free(&self, _: u64) {}
        unsafe fn htod(&self, _: u64, _: &[u8]) -> Result<()> {
            Ok(())
        }
        unsafe fn dtoh(&self, _: &mut [u8], _: u64) -> Result<()> {
            unreachable!()
        }
        unsafe fn dtod(&self, _: u64, _: u64, _: usize) -> Result<()> {
            unreachable!()
        }
        unsafe fn launch(&self, l: &Launch<'_>) -> Result<()> {
            let n = *(l.params[0] as *const u32);
            self.log.lock().unwrap().push(format!("{} {n}", l.kernel));
            Ok(())
        }
        unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
            self.log.lock().unwrap().push(format!("gemm {}", g.t));
            Ok(())
        }
        unsafe fn prepare(&self, gemms: &[Gemm]) {
            self.log.lock().unwrap().push(format!("prepare {:?}", gemms.iter().map(|g| g.t).collect::<Vec<_>>()));
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        unsafe fn begin_capture(&self) -> Result<()> {
            self.log.lock().unwrap().push("begin".into());
            match self.capture {
                true => Ok(()),
                false => Err(Error::Backend("not permitted".into())),
            }
        }
        unsafe fn end_capture(&self) -> Result<u64> {
            self.log.lock().unwrap().push("end".into());
            match self.extra.load(std::sync::atomic::Ordering::Relaxed) {
                true => Err(Error::Backend("invalid edge".into())),
                false => Ok(7 + self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            }
        }
        fn simplify_captures(&self) -> bool {
            self.log.lock().unwrap().push("simplify".into());
            self.extra.swap(false, std::sync::atomic::Ordering::Relaxed)
        }
        unsafe fn launch_graph(&self, g: u64) -> Result<()> {
            self.log.lock().unwrap().push(format!("graph {g}"));
            Ok(())
        }
        unsafe fn destroy_graph(&self, g: u64) {
            self.log.lock().unwrap().push(format!("destroy {g}"));
        }
        fn checks(&self) -> bool {
            self.checking
        }
        fn begin_op(&self, op: &str, regions: Vec<Region>) {
            let names: Vec<String> = regions.iter().map(|r| format!("{} {}", r.name, r.bytes)).collect();
            self.log.lock().unwrap().push(format!("op {op}: {}", names.join(", ")));
        }
        fn graph_regions(&self, g: u64, nodes: Vec<(String, Vec<Region>)>) {
            let told: Vec<usize> = nodes.iter().map(|n| n.1.len()).collect();
            self.log.lock().unwrap().push(format!("graph {g} regions {told:?}"));
        }
    }

    fn step(key: u64, n: u32) -> Step {
        let mut s = Step::new(key);
        s.push(Work::launch("k", (1, 1, 1), (32, 1, 1), 0, &[(4, &n as *const u32 as Param)], 1).unwrap());
        s
    }

    fn log(d: &Fake) -> Vec<String> {
        std::mem::take(&mut *d.log.lock().unwrap())
    }

    #[test]
    fn buckets_hold_their_batch_and_grow_in_steps() {
        let pairs: Vec<(usize, usize)> = [1, 2, 3, 4, 5, 8, 9, 63, 64, 65, 255, 256, 257, 300].iter().map(|&n| (n, bucket(n))).collect();
        let want = [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (63, 64), (64, 64), (65, 72), (255, 256), (256, 256), (257, 288), (300, 320)];
        assert_eq!(pairs, want);
        // Every batch size up to 1024 fits its bucket, a bucket is its own, and 35 cover 1 to 256.
        assert!((1..=1024).all(|n| bucket(n) >= n && bucket(bucket(n)) == bucket(n) && bucket(n) - n < 32));
        assert_eq!((1..=256).map(bucket).collect::<std::collections::BTreeSet<_>>().len(), 35);
        // A server running up to 512 sequences keeps the graphs of all its buckets, both modes.
        assert!(2 * (1..=512).map(bucket).collect::<std::collections::BTreeSet<_>>().len() <= KEPT);
    }

    #[test]
    fn the_same_work_replays_and_other_work_is_captured_again() {
        let d = fake(true, false);
        let mut g = Graphs::default();
        // SAFETY: the fake driver touches no memory.
        unsafe {
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["prepare []", "begin", "k 5", "end", "graph 7"]);
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["graph 7"], "the same parameters: the kept graph");
            g.run(&d, step(1, 6)).unwrap();
            assert_eq!(log(&d), ["prepare []", "begin", "k 6", "end", "graph 8"], "a parameter changed: captured again");
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["graph 7"], "the first work's graph is kept beside the second's");
            // A key holds PER_KEY works: a fifth evicts the one used longest ago (6's, graph 8).
            for n in 7..9 {
                g.run(&d, step(1, n)).unwrap();
            }
            g.run(&d, step(1, 5)).unwrap();
            log(&d);
            g.run(&d, step(1, 9)).unwrap();
            assert_eq!(log(&d), ["prepare []", "begin", "k 9", "end", "destroy 8", "graph 11"]);
        }
        assert_eq!((g.stats.captured, g.stats.launched, g.stats.eager), (5, 8, 0));
    }

    #[test]
    fn a_device_that_cannot_capture_runs_steps_op_by_op() {
        let d = fake(false, false);
        let mut g = Graphs::default();
        // SAFETY: the fake driver touches no memory.
        unsafe {
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["prepare []", "begin", "simplify", "k 5"], "nothing the driver could turn off: op by op");
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["k 5"], "graphs stay off: no capture tried again");
        }
        assert!(g.off.as_deref().is_some_and(|w| w.contains("not permitted")), "{:?}", g.off);
        assert_eq!((g.stats.captured, g.stats.launched, g.stats.eager), (0, 0, 2));
    }

    /// A capture refused at its end with programmatic dependent launches in it is captured again
    /// without them, and graphs stay on.
    #[test]
    fn a_capture_refused_with_what_the_driver_adds_is_tried_again_without() {
        let d = fake(true, true);
        let mut g = Graphs::default();
        // SAFETY: the fake driver touches no memory.
        unsafe {
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["prepare []", "begin", "k 5", "end", "simplify", "begin", "k 5", "end", "graph 7"]);
            g.run(&d, step(1, 5)).unwrap();
            assert_eq!(log(&d), ["graph 7"]);
        }
        assert!(g.off.is_none());
        assert_eq!((g.stats.captured, g.stats.launched, g.stats.eager), (1, 2, 0));
    }

    /// A step's GEMMs are shown to the driver before the capture (where the real driver times
    /// cuBLASLt's algorithms for shapes it has not seen: no timing can happen inside a capture),
    /// and not again when the graph is replayed.
    #[test]
    fn a_steps_gemms_are_prepared_before_its_capture() {
        let d = fake(true, false);
        let mut g = Graphs::default();
        let step = || {
            let mut s = step(1, 5);
            for t in [64, 256] {
                s.push(Work::Gemm(Gemm { input: DType::BF16, output: DType::BF16, t, k: 8, n: 8, x: 0, w: 0, out: 0 }));
            }
            s
        };
        // SAFETY: the fake driver touches no memory.
        unsafe {
            g.run(&d, step()).unwrap();
            assert_eq!(log(&d), ["prepare [64, 256]", "begin", "k 5", "gemm 64", "gemm 256", "end", "graph 7"]);
            g.run(&d, step()).unwrap();
            assert_eq!(log(&d), ["graph 7"]);
        }
    }

    /// Each launch of a step is checked against the regions its op had told when it was recorded,
    /// as it would be run at once: an op whose second launch is given more workspace at the same
    /// address (a mixed step's decode_attn, then flash_attn) had its first launch checked against the
    /// second's workspace, run op by op and replayed alike.
    #[test]
    fn a_launch_is_checked_against_the_regions_told_before_it() {
        let d = Fake { checking: true, ..fake(true, false) };
        let region = |name: &str, bytes| Region { name: name.into(), ptr: 0x1000, bytes, tensor: None };
        let step = || {
            let mut s = Step::new(1);
            let n = 5u32;
            let launch = || Work::launch("k", (1, 1, 1), (32, 1, 1), 0, &[(4, &n as *const u32 as Param)], 1).unwrap();
            s.begin_op("paged_attention", vec![region("q", 64)]);
            s.region(region("workspace", 4096));
            s.push(launch());
            s.region(region("workspace", 0));
            s.push(launch());
            s.begin_op("swiglu", vec![region("out", 8)]);
            s.push(launch());
            s
        };
        // SAFETY: the fake driver touches no memory.
        unsafe {
            step().queue(&d).unwrap();
            let ops = ["op paged_attention: q 64, workspace 4096", "k 5", "op paged_attention: q 64, workspace 4096, workspace 0", "k 5", "op swiglu: out 8", "k 5"];
            assert_eq!(log(&d), ops);
            let mut g = Graphs::default();
            g.run(&d, step()).unwrap();
            log(&d);
            g.run(&d, step()).unwrap();
            assert_eq!(log(&d), ["graph 7 regions [2, 3, 1]", "graph 7"], "a replay describes each node likewise");
        }
    }

    #[test]
    fn a_step_shares_one_copy_of_an_array_passed_again() {
        let mut s = Step::new(0);
        let (meta, cap) = (0x1000, 4096);
        let a = s.stage("rope", 0, &[1, 2, 3, 4], Place::Shape, meta, cap).unwrap();
        assert_eq!(s.stage("rope", 0, &[1, 2, 3, 4], Place::Shape, meta, cap), Some(a), "the same op and part: shared");
        let b = s.stage("kv_write", 0, &[1, 2, 3, 4], Place::Shape, meta, cap).unwrap();
        assert_ne!(a, b, "the same bytes for another op's part: a copy of its own");
        assert_eq!(b % 256, 0);
        assert_eq!(s.stage("x", 0, &[0; 3000], Place::Shape, meta, cap), None, "full: each half holds half the buffer");
    }

    #[test]
    fn a_growing_table_moves_no_array_staged_after_it() {
        let (meta, cap) = (0x10000, 8192);
        let layout = |table_len: usize| {
            let mut s = Step::new(0);
            let ids = s.stage("embedding", 0, &[7; 64], Place::Shape, meta, cap).unwrap();
            let table = s.stage("paged_attention", 1, &vec![1; table_len], Place::Table, meta, cap).unwrap();
            let again = s.stage("paged_attention", 1, &vec![1; table_len], Place::Table, meta, cap).unwrap();
            assert_eq!(again, table, "a later layer's table shares the first's copy");
            let draws = s.stage("sample", 0, &[3; 80], Place::Shape, meta, cap).unwrap();
            let [(at0, lead), (at1, tables)] = s.staging_bytes(cap);
            assert_eq!((at0, at1, tables.len()), (0, cap / 2, table_len));
            assert_eq!(&lead[(draws - meta) as usize..], &[3; 80]);
            assert_eq!(s.meta_needed(0), 2 * (256 + 80).max(table_len));
            (ids, table, draws)
        };
        // From a table of 40 bytes to one of 3000 (12 places of 256 bytes): nothing moves.
        assert_eq!(layout(40), layout(3000));
        assert_eq!(layout(40), (meta, meta + cap as u64 / 2, meta + 256));
    }
}

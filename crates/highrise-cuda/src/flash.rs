//! The tile shapes of the tensor-core prefill kernel (`flash_attn_*`, kernels/attention.cu).
//!
//! A tile is `warps` warps of `slices` 16-row slices of queries each, against `keys` keys at a time;
//! these are compile-time constants of the kernel (NVRTC `-DFA<d>_WARPS=..`), one shape per head
//! dim, chosen per architecture: `HIGHRISE_FLASH_SHAPE` first (how scripts/gpu-sweep.sh tries
//! variants), then [`TUNED`] (the sweep's winners, with the day they were measured), then
//! [`DEFAULT`]. f16 and bf16 share a shape: the same instructions at the same rates. The Hopper
//! kernels (`flash_attn_wg_*`, `flash_attn_wgp_*`) take their geometry the same way
//! (`HIGHRISE_FLASH_WG_SHAPE`, [`TUNED_WG`], [`WG_DEFAULT`]; `-DFH<d>_WGS=..`).

use highrise_core::{Error, Result};

/// One tile shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub warps: u32,
    /// 16-row slices of queries per warp.
    pub slices: u32,
    /// Keys (and values) staged per step.
    pub keys: u32,
}

impl Shape {
    /// Query rows per tile.
    pub fn rows(self) -> u32 {
        16 * self.slices * self.warps
    }

    pub fn threads(self) -> u32 {
        32 * self.warps
    }

    /// Dynamic shared memory a block needs at head dim `d`: one Q, one K and one V tile of 16-bit
    /// elements.
    pub fn shared_bytes(self, d: usize) -> u32 {
        (self.rows() + 2 * self.keys) * d as u32 * 2
    }

    /// "4x2x64": warps x slices x keys.
    pub fn parse(s: &str) -> Result<Shape> {
        let bad = || Error::Invalid(format!("flash tile shape {s:?}: expected WARPSxSLICESxKEYS, e.g. 4x2x64"));
        let parts: Vec<u32> = s.split('x').map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
        let [warps, slices, keys] = parts[..] else { return Err(bad()) };
        let shape = Shape { warps, slices, keys };
        if ![1, 2, 4, 8].contains(&warps) || !(1..=4).contains(&slices) || ![16, 32, 64, 128].contains(&keys) {
            return Err(Error::Invalid(format!(
                "flash tile shape {s}: warps must be 1, 2, 4 or 8, slices 1..4, keys 16, 32, 64 or 128"
            )));
        }
        Ok(shape)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.warps, self.slices, self.keys)
    }
}

/// A measured winner: the fastest shape for (architecture, head dim) in a sweep on `measured`.
pub struct Tuned {
    pub arch: &'static str,
    pub d: usize,
    pub shape: Shape,
    pub measured: &'static str,
}

/// Winners of scripts/gpu-sweep.sh by causal 16k (every shape in it is also checked on the CPU by
/// tests/kernel_emu.rs). H200: benches/results/2026-11-30-h200.md (d64 203.8 TFLOP/s against the
/// default's 186.8; d128 228.9 against 225.5). On Hopper prefill runs on the wgmma kernels unless
/// `HIGHRISE_FLASH_KERNEL=mma`; these shapes are for that case. No Ampere sweep yet.
pub const TUNED: &[Tuned] = &[
    Tuned { arch: "sm_90a", d: 64, shape: Shape { warps: 8, slices: 1, keys: 64 }, measured: "2026-11-30" },
    Tuned { arch: "sm_90a", d: 128, shape: Shape { warps: 8, slices: 2, keys: 64 }, measured: "2026-11-30" },
];

/// FlashAttention-2's forward shape on Ampere for both head dims (128 query rows over 4 warps, 64
/// keys a step), until the sweep measures better.
pub const DEFAULT: Shape = Shape { warps: 4, slices: 2, keys: 64 };

/// The head dims the kernel is instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// The Hopper prefill kernels' default geometry (`flash_attn_wg_*`, `flash_attn_wgp_*`: 2 warpgroups
/// of 64 query rows, 128 keys a step; kernels/attention.cu's FH<d>_WGS and FH<d>_KEYS), as a
/// [`Shape`]: 8 warps of one 16-row slice each. Per head dim and architecture as the prefill shape
/// is: `HIGHRISE_FLASH_WG_SHAPE`, then [`TUNED_WG`], then this.
pub const WG_DEFAULT: Shape = Shape { warps: 8, slices: 1, keys: 128 };

/// Winners of scripts/gpu-sweep.sh's Hopper geometries (its `WG_SHAPES`), pipelined kernel, by
/// causal 16k on an H200 (benches/results/2026-11-30-h200.md): d64 3 warpgroups x 128 keys, 283.2
/// TFLOP/s (2x128: 205.8); d128 3 x 64 keys, 334.4 (2x128: 255.4; FlashAttention-2 325.4 and cuDNN
/// 652.9 in the same run).
pub const TUNED_WG: &[Tuned] = &[
    Tuned { arch: "sm_90a", d: 64, shape: Shape { warps: 12, slices: 1, keys: 128 }, measured: "2026-11-30" },
    Tuned { arch: "sm_90a", d: 128, shape: Shape { warps: 12, slices: 1, keys: 64 }, measured: "2026-11-30" },
];

/// A Hopper kernel geometry, "WGSxKEYS" (warpgroups of 64 query rows, keys a step: 1-3 and 64 or
/// 128, what wgmma's N and the register file allow), as a [`Shape`].
pub fn parse_wg(s: &str) -> Result<Shape> {
    let bad = || Error::Invalid(format!("wgmma geometry {s:?}: expected WARPGROUPSxKEYS, warpgroups 1-3 and keys 64 or 128, e.g. 3x128"));
    let (wgs, keys) = s.split_once('x').ok_or_else(bad)?;
    let (wgs, keys): (u32, u32) = (wgs.trim().parse().map_err(|_| bad())?, keys.trim().parse().map_err(|_| bad())?);
    if !(1..=3).contains(&wgs) || ![64, 128].contains(&keys) {
        return Err(bad());
    }
    Ok(Shape { warps: 4 * wgs, slices: 1, keys })
}

/// A Hopper geometry as `parse_wg` reads it: "2x128".
pub fn wg_label(s: Shape) -> String {
    format!("{}x{}", s.warps / 4, s.keys)
}

/// The Hopper prefill kernels (kernels/attention.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wg {
    /// `flash_attn_wg_*`: each product waited for before the next step.
    Plain,
    /// `flash_attn_wgp_*`: two K/V stages, the next tile's S = Q K^T in flight beside this tile's
    /// O += P V (FlashAttention-3's overlap within a warpgroup).
    Pipe,
    /// `flash_attn_ws_*`: warp-specialized (FlashAttention-3's design): a producer warpgroup copies
    /// K and V into a ring of stages handed over by mbarriers, two (or three at d64) consumer
    /// warpgroups of 64 rows take turns on the tensor cores (ping-pong), each with Pipe's overlap;
    /// its own geometry ([`WsShape`]).
    Spec,
}

impl Wg {
    /// The kernels' name, before `_d<head dim>_<dtype>`.
    pub fn kernel(self) -> &'static str {
        match self {
            Wg::Plain => "flash_attn_wg",
            Wg::Pipe => "flash_attn_wgp",
            Wg::Spec => "flash_attn_ws",
        }
    }

    /// Dynamic shared memory of Plain and Pipe at head dim `d` in geometry `shape`: the Q tile, one
    /// or two K and V tiles, and 1024 bytes to start them on the 1024-byte boundary that wgmma's
    /// 128-byte swizzle repeats from (Spec's is its `WsShape`'s: `launch` says either).
    fn shared_bytes(self, shape: Shape, d: usize) -> u32 {
        let stages = if self == Wg::Pipe { 2 } else { 1 };
        (shape.rows() + 2 * stages * shape.keys) * d as u32 * 2 + 1024
    }

    /// How the kernel at head dim `d` is launched, from the geometries it was compiled with: its
    /// tiles' shape (query rows, keys a step), threads a block, dynamic shared memory.
    pub fn launch(self, wg_shapes: &[(usize, Shape)], ws_shapes: &[(usize, WsShape)], d: usize) -> Result<(Shape, u32, u32)> {
        if self == Wg::Spec {
            let ws = ws_shapes
                .iter()
                .find(|(dd, _)| *dd == d)
                .map(|(_, s)| *s)
                .ok_or_else(|| Error::Unsupported(format!("flash_attn_ws: head dim {d} (the kernel takes {HEAD_DIMS:?})")))?;
            return Ok((ws.tile(), ws.threads(), ws.shared_bytes(d)));
        }
        let shape = find(wg_shapes, d)?;
        Ok((shape, shape.threads(), self.shared_bytes(shape, d)))
    }
}

/// `flash_attn_ws`'s geometry at one head dim: consumer warpgroups of 64 query rows (2, or 3 at
/// d64: at d128 three would not keep their accumulators in 160 registers), keys a step and K/V
/// stages in the ring. Compile-time (`-DFS<d>_CONS/_KEYS/_STAGES`): `HIGHRISE_FLASH_WS_SHAPE`
/// ("d128=2x128x2"), then [`WS_DEFAULT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsShape {
    pub consumers: u32,
    pub keys: u32,
    pub stages: u32,
}

impl WsShape {
    /// The tiles it takes, as a [`Shape`]: 4 consumer warps of 16 rows a consumer.
    pub fn tile(self) -> Shape {
        Shape { warps: 4 * self.consumers, slices: 1, keys: self.keys }
    }

    /// The producer warpgroup and the consumers.
    pub fn threads(self) -> u32 {
        128 * (self.consumers + 1)
    }

    /// Q (64 rows a consumer), `stages` K and V tiles, 1024 bytes of alignment.
    pub fn shared_bytes(self, d: usize) -> u32 {
        (64 * self.consumers + 2 * self.stages * self.keys) * d as u32 * 2 + 1024
    }

    /// "2x128x2": consumers (2, or 3 at d64) x keys (64 or 128: the wgmma shapes common.cuh has) x
    /// stages (2-4), within a block's shared memory at head dim `d` (227 KiB on Hopper).
    pub fn parse(s: &str, d: usize) -> Result<WsShape> {
        let bad = || {
            Error::Invalid(format!(
                "flash_attn_ws geometry {s:?}: expected CONSUMERSxKEYSxSTAGES, consumers 2 (or 3 at d64), keys 64 or 128, stages 2-4, e.g. 2x128x2"
            ))
        };
        let parts: Vec<u32> = s.split('x').map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
        let [consumers, keys, stages] = parts[..] else { return Err(bad()) };
        if !(consumers == 2 || (consumers == 3 && d == 64)) || ![64, 128].contains(&keys) || !(2..=4).contains(&stages) {
            return Err(bad());
        }
        let shape = WsShape { consumers, keys, stages };
        if shape.shared_bytes(d) > 227 * 1024 {
            return Err(Error::Invalid(format!("flash_attn_ws geometry {s} at d{d}: {} bytes of shared memory, more than a block gets (227 KiB)", shape.shared_bytes(d))));
        }
        Ok(shape)
    }

    /// The `-D` options compiling it at head dim `d`.
    pub fn defines(self, d: usize) -> [String; 3] {
        [format!("-DFS{d}_CONS={}", self.consumers), format!("-DFS{d}_KEYS={}", self.keys), format!("-DFS{d}_STAGES={}", self.stages)]
    }
}

impl std::fmt::Display for WsShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.consumers, self.keys, self.stages)
    }
}

/// `flash_attn_ws`'s geometry until a sweep measures better (kernels/attention.cu's defaults):
/// two consumers and 128-key tiles at both head dims, FlashAttention-3's; three stages at d64 (113
/// KiB), two at d128 (161 KiB).
pub const WS_DEFAULT: [(usize, WsShape); 2] =
    [(64, WsShape { consumers: 2, keys: 128, stages: 3 }), (128, WsShape { consumers: 2, keys: 128, stages: 2 })];

/// Every head dim's `flash_attn_ws` geometry, as the kernels are compiled with it.
pub fn ws_shapes() -> Result<Vec<(usize, WsShape)>> {
    let mut out = WS_DEFAULT.to_vec();
    let Ok(v) = std::env::var("HIGHRISE_FLASH_WS_SHAPE") else { return Ok(out) };
    for part in v.split(',').filter(|p| !p.trim().is_empty()) {
        let bad = || Error::Invalid(format!("HIGHRISE_FLASH_WS_SHAPE: {part:?} is not d<head dim>=CONSUMERSxKEYSxSTAGES, e.g. d128=2x128x2"));
        let (d, shape) = part.trim().split_once('=').ok_or_else(bad)?;
        let d: usize = d.strip_prefix('d').and_then(|d| d.parse().ok()).ok_or_else(bad)?;
        let slot = out.iter_mut().find(|(dd, _)| *dd == d).ok_or_else(|| Error::Invalid(format!("HIGHRISE_FLASH_WS_SHAPE: head dim {d} (the kernel takes {HEAD_DIMS:?})")))?;
        slot.1 = WsShape::parse(shape, d)?;
    }
    Ok(out)
}

/// Which Hopper kernel prefill runs on, if any, on `arch`: on Hopper (sm_90a) the pipelined one
/// (Pipe) unless `HIGHRISE_FLASH_KERNEL` says `wgmma` (Plain), `ws` (Spec: not timed on a GPU yet,
/// so not the default) or `mma` (None: mma.sync's
/// `flash_attn_*`, as everywhere else, where the wgmma kernels do not exist). Checked on an H200 on
/// 2026-11-30 (every attention cross-check, compute-sanitizer clean) and faster at every length and
/// head dim timed: benches/results/2026-11-30-h200.md.
pub fn wgmma(arch: &str) -> Option<Wg> {
    if arch != "sm_90a" {
        return None;
    }
    match std::env::var("HIGHRISE_FLASH_KERNEL").as_deref() {
        Ok("wgmma") => Some(Wg::Plain),
        Ok("ws") => Some(Wg::Spec),
        Ok("mma") => None,
        _ => Some(Wg::Pipe),
    }
}

/// The kernels whose tile shape is chosen per head dim: mma.sync's `flash_attn_*` and Hopper's
/// `flash_attn_wg_*` / `flash_attn_wgp_*` (one geometry for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Mma,
    Wgmma,
}

impl Family {
    fn var(self) -> &'static str {
        match self {
            Family::Mma => "HIGHRISE_FLASH_SHAPE",
            Family::Wgmma => "HIGHRISE_FLASH_WG_SHAPE",
        }
    }

    fn parse(self, s: &str) -> Result<Shape> {
        match self {
            Family::Mma => Shape::parse(s),
            Family::Wgmma => parse_wg(s),
        }
    }
}

/// `HIGHRISE_FLASH_SHAPE`, e.g. "d128=8x1x64,d64=4x2x64" (or for the Hopper kernels
/// `HIGHRISE_FLASH_WG_SHAPE`, e.g. "d64=3x128"): shapes that override the table.
fn overrides(family: Family) -> Result<Vec<(usize, Shape)>> {
    let var = family.var();
    let Ok(v) = std::env::var(var) else { return Ok(Vec::new()) };
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let bad = || Error::Invalid(format!("{var}: {part:?} is not d<head dim>=<shape>, e.g. d128=4x2x64 (d128=2x128 for wgmma)"));
            let (d, shape) = part.trim().split_once('=').ok_or_else(bad)?;
            let d: usize = d.strip_prefix('d').and_then(|d| d.parse().ok()).ok_or_else(bad)?;
            if !HEAD_DIMS.contains(&d) {
                return Err(Error::Invalid(format!("{var}: head dim {d} (the kernel takes {HEAD_DIMS:?})")));
            }
            Ok((d, family.parse(shape)?))
        })
        .collect()
}

/// The shape the kernel of `family` for head dim `d` is compiled with on `arch`.
pub fn shape_of(family: Family, arch: &str, d: usize) -> Result<Shape> {
    if let Some(&(_, s)) = overrides(family)?.iter().rev().find(|(dd, _)| *dd == d) {
        return Ok(s);
    }
    let (tuned, default) = match family {
        Family::Mma => (TUNED, DEFAULT),
        Family::Wgmma => (TUNED_WG, WG_DEFAULT),
    };
    Ok(tuned.iter().find(|t| t.arch == arch && t.d == d).map_or(default, |t| t.shape))
}

/// The shape mma.sync's kernel for head dim `d` is compiled with on `arch`.
pub fn shape(arch: &str, d: usize) -> Result<Shape> {
    shape_of(Family::Mma, arch, d)
}

/// Every head dim's shape on `arch`, as the kernels are compiled with it: taken once, beside the
/// compilation, so that launches keep matching the compiled kernels whatever the environment says
/// later.
pub fn shapes(arch: &str) -> Result<Vec<(usize, Shape)>> {
    HEAD_DIMS.iter().map(|&d| Ok((d, shape(arch, d)?))).collect()
}

/// `shapes` for the Hopper kernels.
pub fn wg_shapes(arch: &str) -> Result<Vec<(usize, Shape)>> {
    HEAD_DIMS.iter().map(|&d| Ok((d, shape_of(Family::Wgmma, arch, d)?))).collect()
}

/// The shape for head dim `d` among `shapes`.
pub fn find(shapes: &[(usize, Shape)], d: usize) -> Result<Shape> {
    shapes
        .iter()
        .find(|(dd, _)| *dd == d)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Unsupported(format!("flash_attn: head dim {d} (the kernel takes {HEAD_DIMS:?})")))
}

/// The tensor-core decode kernel's shape (`decode_attn_*`, kernels/attention.cu): warps per block,
/// each taking 16-key chunks of its slice of the context in turn, and the stages of each warp's
/// copy pipeline (chunks in flight: stages - 1 while one is used). Compile-time (`-DDA_WARPS`,
/// `-DDA_STAGES`), one for both head dims: `HIGHRISE_DECODE_SHAPE` ("4x3": how gpu-sweep.sh tries
/// variants), then [`TUNED_DECODE`], then [`DECODE_DEFAULT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub warps: u32,
    pub stages: u32,
}

impl DecodeShape {
    pub fn threads(self) -> u32 {
        32 * self.warps
    }

    /// Dynamic shared memory at head dim `d`: the 16 query rows, and per warp `stages` stages of
    /// 16 K and 16 V rows (16-bit elements).
    pub fn shared_bytes(self, d: usize) -> u32 {
        d as u32 * (16 + self.warps * self.stages * 2 * 16) * 2
    }

    /// The fewest keys a slice of the context gets: a chunk per warp.
    pub fn min_slice(self) -> u32 {
        16 * self.warps
    }

    /// "4x2": warps x stages; 2, 4 or 8 warps of 2-4 stages, within a block's shared memory at
    /// head dim 128 on Hopper (227 KiB; an A100 gives 163 KiB, and refuses larger launches).
    pub fn parse(s: &str) -> Result<DecodeShape> {
        let bad = || Error::Invalid(format!("decode shape {s:?}: expected WARPSxSTAGES, warps 2, 4 or 8 and stages 2-4, e.g. 4x3"));
        let (w, st) = s.split_once('x').ok_or_else(bad)?;
        let (warps, stages): (u32, u32) = (w.trim().parse().map_err(|_| bad())?, st.trim().parse().map_err(|_| bad())?);
        let shape = DecodeShape { warps, stages };
        if ![2, 4, 8].contains(&warps) || !(2..=4).contains(&stages) {
            return Err(bad());
        }
        if shape.shared_bytes(128) > 227 * 1024 {
            return Err(Error::Invalid(format!("decode shape {s}: {} bytes of shared memory at d128, more than a block gets (227 KiB)", shape.shared_bytes(128))));
        }
        Ok(shape)
    }

    /// The `-D` options that compile the kernel in this shape.
    pub fn defines(self) -> [String; 2] {
        [format!("-DDA_WARPS={}", self.warps), format!("-DDA_STAGES={}", self.stages)]
    }
}

impl std::fmt::Display for DecodeShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.warps, self.stages)
    }
}

/// The decode kernel's shape until a sweep measures better: 4 warps of two stages (the shape the
/// H200 timed on 2026-11-30: 32-58% of the copy bandwidth).
pub const DECODE_DEFAULT: DecodeShape = DecodeShape { warps: 4, stages: 2 };

/// Winners of scripts/gpu-sweep.sh's decode part per architecture (arch, shape, day measured); none
/// yet.
pub const TUNED_DECODE: &[(&str, DecodeShape, &str)] = &[];

/// The decode kernel's shape on `arch`, as it is compiled.
pub fn decode_shape(arch: &str) -> Result<DecodeShape> {
    compiled_shape("HIGHRISE_DECODE_SHAPE", DecodeShape::parse, TUNED_DECODE, arch, DECODE_DEFAULT)
}

/// A kernel's one compiled shape on `arch`: the environment's `var` where set (how gpu-sweep.sh
/// tries variants), else the sweep's winner on `arch` in `tuned` (arch, shape, day measured),
/// else `default`.
pub(crate) fn compiled_shape<S: Copy>(var: &str, parse: fn(&str) -> Result<S>, tuned: &[(&str, S, &str)], arch: &str, default: S) -> Result<S> {
    if let Ok(v) = std::env::var(var) {
        return parse(&v).map_err(|e| Error::Invalid(format!("{var}: {e}")));
    }
    Ok(tuned.iter().find(|(a, _, _)| *a == arch).map_or(default, |&(_, s, _)| s))
}

/// The decode shapes scripts/gpu-sweep.sh tries (its `DECODE_SHAPES="..."` line).
pub fn decode_sweep_shapes(script: &str) -> Result<Vec<DecodeShape>> {
    sweep_line(script, "DECODE_SHAPES=")?.into_iter().map(DecodeShape::parse).collect()
}

/// The NVRTC options that set every head dim's shapes, for attention.cu on `arch` (the Hopper
/// kernels' too: they are compiled only for sm_90a, the options are harmless elsewhere).
pub fn defines(arch: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in HEAD_DIMS {
        out.extend(defines_for(d, shape(arch, d)?));
        out.extend(wg_defines_for(d, shape_of(Family::Wgmma, arch, d)?));
    }
    for (d, ws) in ws_shapes()? {
        out.extend(ws.defines(d));
    }
    out.extend(decode_shape(arch)?.defines());
    Ok(out)
}

/// The `-D` options giving the Hopper kernels at head dim `d` the geometry `s` (from `parse_wg`).
pub fn wg_defines_for(d: usize, s: Shape) -> [String; 2] {
    [format!("-DFH{d}_WGS={}", s.warps / 4), format!("-DFH{d}_KEYS={}", s.keys)]
}

/// The `-D` options (for NVRTC, or a C++ compiler building kernels/emu) giving head dim `d` `shape`.
pub fn defines_for(d: usize, s: Shape) -> [String; 3] {
    [format!("-DFA{d}_WARPS={}", s.warps), format!("-DFA{d}_MT={}", s.slices), format!("-DFA{d}_KEYS={}", s.keys)]
}

/// The words of gpu-sweep.sh's `KEY="..."` line.
pub(crate) fn sweep_line<'a>(script: &'a str, key: &str) -> Result<Vec<&'a str>> {
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .ok_or_else(|| Error::Invalid(format!("gpu-sweep.sh has no {key}\"...\" line")))?;
    Ok(line.trim_matches('"').split_whitespace().collect())
}

/// The shapes scripts/gpu-sweep.sh tries, from its text (its `SHAPES="..."` line), so that the
/// tests that check them without a GPU check the same list.
pub fn sweep_shapes(script: &str) -> Result<Vec<Shape>> {
    sweep_line(script, "SHAPES=")?.into_iter().map(Shape::parse).collect()
}

/// The Hopper geometries scripts/gpu-sweep.sh tries (its `WG_SHAPES="..."` line), each as [d64's,
/// d128's]: "3x128" for both head dims, or "3x128/2x128" for d64 and d128 apart (three warpgroups
/// fit the register file at d64 only, until producer warps with setmaxnreg free registers).
pub fn wg_sweep_shapes(script: &str) -> Result<Vec<[Shape; 2]>> {
    sweep_line(script, "WG_SHAPES=")?
        .into_iter()
        .map(|word| {
            let (a, b) = word.split_once('/').unwrap_or((word, word));
            Ok([parse_wg(a)?, parse_wg(b)?])
        })
        .collect()
}

/// The `flash_attn_ws` geometries scripts/gpu-sweep.sh tries (its `WS_SHAPES="..."` line), each as
/// [d64's, d128's] ("3x128x3/2x128x2", or one for both).
pub fn ws_sweep_shapes(script: &str) -> Result<Vec<[WsShape; 2]>> {
    sweep_line(script, "WS_SHAPES=")?
        .into_iter()
        .map(|word| {
            let (a, b) = word.split_once('/').unwrap_or((word, word));
            Ok([WsShape::parse(a, 64)?, WsShape::parse(b, 128)?])
        })
        .collect()
}

/// The tiles `flash_attn_*` takes, 5 numbers each (see kernels/attention.cu), `rows` query rows at
/// most per tile: per sequence (its first query row, its queries, the position of the first query,
/// where its keys start). Causal: a tile's rows see keys up to their own positions; otherwise every
/// key of the sequence (its queries are the last of its `pos0 + q_len` tokens), positions set past
/// them all. Ordered by the keys they see, most first (blocks start in that order: the longest
/// causal tiles then run in the first waves, not alone in the last; ties keep their order).
pub fn tiles(seqs: impl Iterator<Item = (u32, u32, u32, u32)>, causal: bool, rows: u32) -> Vec<u32> {
    let mut tiles: Vec<[u32; 5]> = Vec::new();
    for (q_start, q_len, pos0, kbase) in seqs {
        for r0 in (0..q_len).step_by(rows as usize) {
            let n = (q_len - r0).min(rows);
            let (pos, keys) = if causal { (pos0 + r0, pos0 + r0 + n) } else { (pos0 + q_len, pos0 + q_len) };
            tiles.push([q_start + r0, n, pos, kbase, keys]);
        }
    }
    tiles.sort_by_key(|t| std::cmp::Reverse(t[4]));
    tiles.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cut_sequences_into_rows() {
        // Causal: two sequences, the first cut at 64 rows; the tile seeing the most keys first.
        let t = tiles([(0, 100, 0, 0), (100, 3, 0, 100)].into_iter(), true, 64);
        assert_eq!(t, [64, 36, 64, 0, 100, 0, 64, 0, 0, 64, 100, 3, 0, 100, 3]);
        // A chunk after a cached prefix of 30 tokens, keys from block-table offset 5.
        let t = tiles([(0, 70, 30, 5)].into_iter(), true, 64);
        assert_eq!(t, [64, 6, 94, 5, 100, 0, 64, 30, 5, 94]);
        // Not causal: every row sees the whole sequence (equal keys keep their order).
        let t = tiles([(0, 100, 0, 0), (100, 3, 0, 100)].into_iter(), false, 64);
        assert_eq!(t, [0, 64, 100, 0, 100, 64, 36, 100, 0, 100, 100, 3, 3, 100, 3]);
        // 128-row tiles.
        let t = tiles([(0, 200, 0, 0)].into_iter(), true, 128);
        assert_eq!(t, [128, 72, 128, 0, 200, 0, 128, 0, 0, 128]);
    }

    #[test]
    fn shapes_parse_and_size() {
        let s = Shape::parse("4x2x64").unwrap();
        assert_eq!((s.rows(), s.threads(), s.shared_bytes(128)), (128, 128, 65536));
        assert_eq!(s.to_string(), "4x2x64");
        for bad in ["4x2", "3x2x64", "4x0x64", "4x2x48", "axbxc"] {
            assert!(Shape::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(shape("sm_80", 64).unwrap(), DEFAULT);
        assert_eq!(defines("sm_80").unwrap().len(), 18);
        // The Hopper kernel: 128 rows over 256 threads; at d128 its tiles take 96 KiB, plus alignment.
        let wg = WG_DEFAULT;
        assert_eq!((wg.rows(), wg.threads(), Wg::Plain.shared_bytes(wg, 128)), (128, 256, 98304 + 1024));
        // Pipelined: two K and two V tiles, 160 KiB at d128 (under Hopper's 227 KiB a block).
        assert_eq!(Wg::Pipe.shared_bytes(wg, 128), 163840 + 1024);
        assert_eq!(wgmma("sm_80"), None, "only Hopper has wgmma");
        if std::env::var_os("HIGHRISE_FLASH_KERNEL").is_none() {
            assert_eq!(wgmma("sm_90a"), Some(Wg::Pipe), "Hopper prefills on the pipelined wgmma kernel unless told otherwise");
        }
        // The H200 sweep's winners (2026-11-30), where no variable overrides them.
        if std::env::var_os("HIGHRISE_FLASH_WG_SHAPE").is_none() && std::env::var_os("HIGHRISE_FLASH_SHAPE").is_none() {
            let wg = |d| wg_label(shape_of(Family::Wgmma, "sm_90a", d).unwrap());
            assert_eq!((wg(64), wg(128)), ("3x128".to_string(), "3x64".to_string()));
            assert_eq!((shape("sm_90a", 64).unwrap().to_string(), shape("sm_90a", 128).unwrap().to_string()), ("8x1x64".into(), "8x2x64".into()));
            assert_eq!(wg_label(shape_of(Family::Wgmma, "sm_80", 128).unwrap()), "2x128", "no sweep on Ampere: the default");
            // Each fits a block's shared memory (227 KiB on Hopper).
            for d in HEAD_DIMS {
                assert!(Wg::Pipe.shared_bytes(shape_of(Family::Wgmma, "sm_90a", d).unwrap(), d) <= 227 * 1024, "d{d}");
            }
        }
        // Its geometries: warpgroups x keys.
        let three = parse_wg("3x128").unwrap();
        assert_eq!((three.rows(), three.threads(), wg_label(three)), (192, 384, "3x128".to_string()));
        assert_eq!(parse_wg("2x128").unwrap(), WG_DEFAULT);
        for bad in ["4x128", "2x96", "0x64", "2", "8x1x128"] {
            assert!(parse_wg(bad).is_err(), "{bad}");
        }
        assert_eq!(wg_defines_for(64, three), ["-DFH64_WGS=3".to_string(), "-DFH64_KEYS=128".to_string()]);
        assert_eq!(defines("sm_90a").unwrap().len(), 18);
        let pairs = wg_sweep_shapes("SHAPES=\"4x2x64\"\nWG_SHAPES=\"2x128 3x128/2x128\"\n").unwrap();
        assert_eq!(pairs, vec![[WG_DEFAULT; 2], [three, WG_DEFAULT]]);
        assert_eq!(sweep_shapes("SHAPES=\"4x2x64\"\nWG_SHAPES=\"2x128\"\n").unwrap(), vec![DEFAULT]);
    }

    #[test]
    fn ws_shapes_parse_fit_and_are_the_kernels() {
        // The defaults are attention.cu's, so the CPU model (which compiles it without -D) checks them.
        let src = crate::kernels::FILES.iter().find(|(n, _)| *n == "attention.cu").unwrap().1;
        for (d, ws) in WS_DEFAULT {
            assert!(src.contains(&format!("#define FS{d}_CONS {}\n", ws.consumers)), "d{d} consumers");
            assert!(src.contains(&format!("#define FS{d}_KEYS {}\n", ws.keys)), "d{d} keys");
            assert!(src.contains(&format!("#define FS{d}_STAGES {}\n", ws.stages)), "d{d} stages");
        }
        let s = WsShape::parse("2x128x2", 128).unwrap();
        // Q 128 rows + 2 x (K + V) of 128 keys at d128, 1024 to align: 160 KiB + 1 KiB.
        assert_eq!((s.shared_bytes(128), s.tile().rows(), s.tile().keys, s.threads(), s.to_string()), (163840 + 1024, 128, 128, 384, "2x128x2".to_string()));
        assert_eq!(s.defines(128), ["-DFS128_CONS=2".to_string(), "-DFS128_KEYS=128".to_string(), "-DFS128_STAGES=2".to_string()]);
        // Four stages of 128 keys fit at d64 (145 KiB), three at d128 (225 KiB), not four (289 KiB);
        // three consumers (192 rows, 512 threads) at d64 only.
        assert!(WsShape::parse("2x128x4", 64).is_ok() && WsShape::parse("2x128x3", 128).is_ok());
        let three = WsShape::parse("3x128x2", 64).unwrap();
        assert_eq!((three.tile().rows(), three.threads()), (192, 512));
        for bad in ["2x128x4", "2x192x2", "2x96x2", "2x128x1", "2x128x5", "128x2", "3x128x2", "4x64x2"] {
            assert!(WsShape::parse(bad, 128).is_err(), "{bad}");
        }
        let sweep = ws_sweep_shapes("WS_SHAPES=\"2x128x3/2x128x2 2x64x4\"\n").unwrap();
        assert_eq!(sweep, vec![[WS_DEFAULT[0].1, WS_DEFAULT[1].1], [WsShape { consumers: 2, keys: 64, stages: 4 }; 2]]);
        let (tile, threads, shared) = Wg::Spec.launch(&[], &WS_DEFAULT, 128).unwrap();
        assert_eq!((tile.rows(), threads, shared), (128, 384, 163840 + 1024));
        assert!(Wg::Spec.launch(&[], &WS_DEFAULT, 96).is_err());
        let (tile, threads, shared) = Wg::Pipe.launch(&[(128, WG_DEFAULT)], &WS_DEFAULT, 128).unwrap();
        assert_eq!((tile, threads, shared), (WG_DEFAULT, 256, Wg::Pipe.shared_bytes(WG_DEFAULT, 128)));
    }

    #[test]
    fn decode_shapes_parse_and_fit() {
        let s = DecodeShape::parse("4x2").unwrap();
        assert_eq!(s, DECODE_DEFAULT);
        // 16 query rows and 4 warps x 2 stages x (16 K + 16 V rows) at d128: 69,632 bytes.
        assert_eq!((s.threads(), s.shared_bytes(128), s.min_slice(), s.to_string()), (128, 69632, 64, "4x2".to_string()));
        assert_eq!(s.defines(), ["-DDA_WARPS=4".to_string(), "-DDA_STAGES=2".to_string()]);
        assert!(DecodeShape::parse("8x3").is_ok());
        // 8 warps of 4 stages need 260 KiB at d128; 3 warps and 1 or 5 stages are no shape.
        for bad in ["8x4", "3x2", "4x1", "4x5", "4", "ax2"] {
            assert!(DecodeShape::parse(bad).is_err(), "{bad}");
        }
        if std::env::var_os("HIGHRISE_DECODE_SHAPE").is_none() {
            assert_eq!(decode_shape("sm_90a").unwrap(), DECODE_DEFAULT);
        }
        assert_eq!(decode_sweep_shapes("DECODE_SHAPES=\"4x2 8x2\"\n").unwrap(), vec![DECODE_DEFAULT, DecodeShape { warps: 8, stages: 2 }]);
    }
}

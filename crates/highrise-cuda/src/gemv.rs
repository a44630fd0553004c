//! The matrix-vector kernels' shape (`gemv*`, kernels/gemv.cu): warps per block (each taking two
//! rows of w, or a row of each weight for `gemv_glu`), 16-byte chunks of each row in flight per
//! lane, whether a warp issues its next round of loads before it multiplies this one (pipelined),
//! and how many rounds ahead it prefetches into L2. Compile-time (`-DGEMV_WARPS`, `-DGEMV_UNROLL`,
//! `-DGEMV_PIPE`, `-DGEMV_PREFETCH`): `HIGHRISE_GEMV_SHAPE` ("4x8p", "4x4f2": how
//! scripts/gpu-sweep.sh tries variants), then [`TUNED_GEMV`], then [`GEMV_DEFAULT`].
//! Every shape gives the same sums bit for bit (the kernel's comment says why), so the choice is
//! speed alone.

use highrise_core::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    pub warps: u32,
    pub unroll: u32,
    pub pipe: bool,
    /// Rounds of loads ahead that a warp prefetches into L2 (0 to 3).
    pub prefetch: u32,
}

impl GemvShape {
    pub fn threads(self) -> u32 {
        32 * self.warps
    }

    /// Rows of w a block of `gemv*` or `gemv_qkv*` takes (two per warp).
    pub fn rows_per_block(self) -> usize {
        2 * self.warps as usize
    }

    /// Rows of each weight a block of `gemv_glu*` takes (one per warp).
    pub fn glu_rows_per_block(self) -> usize {
        self.warps as usize
    }

    /// "4x4", "4x8p", "4x4f2": warps (2, 4 or 8) x chunks in flight per row and lane (2, 4 or 8),
    /// "p" for pipelined, "fN" for N rounds (1 to 3) prefetched ahead; eight chunks pipelined are
    /// refused (the kernel built for eight rows of x spills).
    pub fn parse(s: &str) -> Result<GemvShape> {
        let bad = || {
            Error::Invalid(format!(
                "gemv shape {s:?}: expected WARPSxUNROLL[p][fN], warps 2, 4 or 8, unroll 2, 4 or 8 (4 at most pipelined), N 1 to 3, e.g. 4x4p or 4x4f2"
            ))
        };
        let (w, rest) = s.trim().split_once('x').ok_or_else(bad)?;
        let (rest, prefetch) = match rest.split_once('f') {
            Some((r, f)) => (r, f.parse::<u32>().ok().filter(|f| (1..=3).contains(f)).ok_or_else(bad)?),
            None => (rest, 0),
        };
        let (u, pipe) = match rest.strip_suffix('p') {
            Some(u) => (u, true),
            None => (rest, false),
        };
        let shape = GemvShape { warps: w.parse().map_err(|_| bad())?, unroll: u.parse().map_err(|_| bad())?, pipe, prefetch };
        if ![2, 4, 8].contains(&shape.warps) || ![2, 4, 8].contains(&shape.unroll) || (pipe && shape.unroll > 4) {
            return Err(bad());
        }
        Ok(shape)
    }

    /// The `-D` options that compile gemv.cu in this shape.
    pub fn defines(self) -> [String; 4] {
        [
            format!("-DGEMV_WARPS={}", self.warps),
            format!("-DGEMV_UNROLL={}", self.unroll),
            format!("-DGEMV_PIPE={}", self.pipe as u32),
            format!("-DGEMV_PREFETCH={}", self.prefetch),
        ]
    }
}

impl std::fmt::Display for GemvShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}{}", self.warps, self.unroll, if self.pipe { "p" } else { "" })?;
        if self.prefetch > 0 {
            write!(f, "f{}", self.prefetch)?;
        }
        Ok(())
    }
}

/// The shape the H200 timed on 2026-11-30 (benches/results/2026-11-30-h200.md: 81% of the copy
/// bandwidth on the 8B q/k/v shape, 76% on the gate's, 63% on the down projection's rows of 14336).
pub const GEMV_DEFAULT: GemvShape = GemvShape { warps: 4, unroll: 4, pipe: false, prefetch: 0 };

/// Winners of scripts/gpu-sweep.sh's gemv part per architecture (arch, shape, day measured); none
/// yet.
pub const TUNED_GEMV: &[(&str, GemvShape, &str)] = &[];

/// The shape gemv.cu is compiled in on `arch`.
pub fn gemv_shape(arch: &str) -> Result<GemvShape> {
    crate::flash::compiled_shape("HIGHRISE_GEMV_SHAPE", GemvShape::parse, TUNED_GEMV, arch, GEMV_DEFAULT)
}

/// The shapes scripts/gpu-sweep.sh tries (its `GEMV_SHAPES="..."` line).
pub fn gemv_sweep_shapes(script: &str) -> Result<Vec<GemvShape>> {
    crate::flash::sweep_line(script, "GEMV_SHAPES=")?.into_iter().map(GemvShape::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_shapes_parse_and_print_back() {
        for s in ["4x4", "4x8", "8x4p", "2x2p", "4x4f2", "8x4pf1"] {
            assert_eq!(GemvShape::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(GemvShape::parse("4x4").unwrap(), GEMV_DEFAULT);
        for bad in ["4x8p", "3x4", "4x16", "4", "ax4", "4x4q", "4x4f", "4x4f4", "4x4f0", "4x4fp", "4xf2"] {
            assert!(GemvShape::parse(bad).is_err(), "{bad}");
        }
        let s = GemvShape::parse("8x2").unwrap();
        assert_eq!((s.threads(), s.rows_per_block(), s.glu_rows_per_block()), (256, 16, 8));
    }

    /// The default shape is gemv.cu's own (what it compiles to without options).
    #[test]
    fn the_default_is_the_kernels_own() {
        let src = crate::kernels::FILES.iter().find(|(n, _)| *n == "gemv.cu").unwrap().1;
        let d = GEMV_DEFAULT;
        for (name, v) in [("GEMV_WARPS", d.warps), ("GEMV_UNROLL", d.unroll), ("GEMV_PIPE", d.pipe as u32), ("GEMV_PREFETCH", d.prefetch)] {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name} {v}");
        }
    }
}

//! The matrix-vector kernels' shape (`gemv*`, kernels/gemv.cu): warps per block (each taking two
//! rows of w, or a row of each weight for `gemv_glu`), 16-byte chunks of each row in flight per
//! lane, whether a warp issues its next round of loads before it multiplies this one (pipelined),
//! how many rounds ahead it prefetches into L2, whether a block's warps share the same rows
//! (split), and how many rounds it prefetches before its programmatic wait (early).
//! Compile-time (`-DGEMV_WARPS`, `-DGEMV_UNROLL`, `-DGEMV_PIPE`, `-DGEMV_PREFETCH`,
//! `-DGEMV_SPLIT`, `-DGEMV_EARLY`): `HIGHRISE_GEMV_SHAPE` ("4x8p", "4x4f2", "4x4s4", "4x4e4": how scripts/gpu-sweep.sh
//! tries variants), then [`TUNED_GEMV`], then [`GEMV_DEFAULT`]. Every unsplit shape gives the same
//! sums bit for bit (the kernel's comment says why); a split one adds the same products in another
//! order, each within the reference's bound.

use highrise_core::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    pub warps: u32,
    pub unroll: u32,
    pub pipe: bool,
    /// Rounds of loads ahead that a warp prefetches into L2 (0 to 3).
    pub prefetch: u32,
    /// Warps that share the same rows, each taking every split-th round: 1 (none share) or all
    /// the block's.
    pub split: u32,
    /// Rounds of each warp's rows prefetched into L2 before the kernel's programmatic wait, while
    /// the kernel before it runs; 0: the kernel's own choice (those its loop's prefetches will not
    /// ask for, at least one).
    pub early: u32,
}

impl GemvShape {
    pub fn threads(self) -> u32 {
        32 * self.warps
    }

    /// Rows of w a block of `gemv*` or `gemv_qkv*` takes (two per group of `split` warps).
    pub fn rows_per_block(self) -> usize {
        2 * (self.warps / self.split) as usize
    }

    /// Rows of each weight a block of `gemv_glu*` takes (one per group of `split` warps).
    pub fn glu_rows_per_block(self) -> usize {
        (self.warps / self.split) as usize
    }

    /// "4x4", "4x8p", "4x4f2", "8x4s2", "4x4e4": warps (2, 4 or 8) x chunks in flight per row and
    /// lane (2, 4 or 8), then any of "p" (pipelined), "sN" (the block's N warps share its rows: N =
    /// the warps), "fN" (N rounds, 1 to 3, prefetched ahead) and "eN" (N rounds, 2 to 8, prefetched
    /// before the programmatic wait: more than the kernel would itself, the prefetched rounds and
    /// one), in that order; eight chunks pipelined are refused (the kernel built for eight rows of x
    /// spills).
    pub fn parse(s: &str) -> Result<GemvShape> {
        let bad = || {
            Error::Invalid(format!(
                "gemv shape {s:?}: expected WARPSxUNROLL[p][sN][fN][eN], warps 2, 4 or 8, unroll 2, 4 or 8 (4 at most pipelined), split the warps, prefetch 1 to 3, early 2 to 8 and above the prefetch (pipelined: plus one), e.g. 4x4p, 4x4s4, 4x4f2 or 4x4e4"
            ))
        };
        let (w, rest) = s.trim().split_once('x').ok_or_else(bad)?;
        // A suffix "<letter>N" off the end of `rest`, if there.
        let take = |rest: &str, letter: char| -> Result<(String, Option<u32>)> {
            match rest.rsplit_once(letter) {
                Some((r, n)) => Ok((r.to_string(), Some(n.parse::<u32>().map_err(|_| bad())?))),
                None => Ok((rest.to_string(), None)),
            }
        };
        let (rest, early) = take(rest, 'e')?;
        let (rest, prefetch) = take(&rest, 'f')?;
        let (rest, split) = take(&rest, 's')?;
        let (u, pipe) = match rest.strip_suffix('p') {
            Some(u) => (u, true),
            None => (rest.as_str(), false),
        };
        let (warps, unroll): (u32, u32) = (w.parse().map_err(|_| bad())?, u.parse().map_err(|_| bad())?);
        let shape = GemvShape { warps, unroll, pipe, prefetch: prefetch.unwrap_or(0), split: split.unwrap_or(1), early: early.unwrap_or(0) };
        let prefetch_ok = prefetch.is_none_or(|f| (1..=3).contains(&f));
        let split_ok = split.is_none_or(|n| n == warps);
        // Early rounds the kernel would not prefetch before its wait anyway (gemv.cu's EARLY).
        let early_ok = early.is_none_or(|e| e <= 8 && e > (shape.prefetch + pipe as u32).max(1));
        if ![2, 4, 8].contains(&warps) || ![2, 4, 8].contains(&unroll) || (pipe && unroll > 4) || !prefetch_ok || !split_ok || !early_ok {
            return Err(bad());
        }
        Ok(shape)
    }

    /// The `-D` options that compile gemv.cu in this shape.
    pub fn defines(self) -> [String; 6] {
        [
            format!("-DGEMV_WARPS={}", self.warps),
            format!("-DGEMV_UNROLL={}", self.unroll),
            format!("-DGEMV_PIPE={}", self.pipe as u32),
            format!("-DGEMV_PREFETCH={}", self.prefetch),
            format!("-DGEMV_SPLIT={}", self.split),
            format!("-DGEMV_EARLY={}", self.early),
        ]
    }
}

impl std::fmt::Display for GemvShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}{}", self.warps, self.unroll, if self.pipe { "p" } else { "" })?;
        if self.split > 1 {
            write!(f, "s{}", self.split)?;
        }
        if self.prefetch > 0 {
            write!(f, "f{}", self.prefetch)?;
        }
        if self.early > 0 {
            write!(f, "e{}", self.early)?;
        }
        Ok(())
    }
}

/// The shape the H200 timed on 2026-11-30 (benches/results/2026-11-30-h200.md: 81% of the copy
/// bandwidth on the 8B q/k/v shape, 76% on the gate's, 63% on the down projection's rows of 14336).
pub const GEMV_DEFAULT: GemvShape = GemvShape { warps: 4, unroll: 4, pipe: false, prefetch: 0, split: 1, early: 0 };

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

/// The decode-step variants scripts/gpu-sweep.sh times (its `STEP_SHAPES="..."` line): a shape,
/// whether every projection runs on the GEMV kernel ("+own": `HIGHRISE_CUDA_GEMV=own`), and whether
/// the norms stay apart from the projections ("+apart", last: `HIGHRISE_FOLD_NORMS=0`).
pub fn step_sweep_shapes(script: &str) -> Result<Vec<(GemvShape, bool, bool)>> {
    let variant = |v: &str| {
        let (v, apart) = v.strip_suffix("+apart").map_or((v, false), |v| (v, true));
        let (v, own) = v.strip_suffix("+own").map_or((v, false), |v| (v, true));
        Ok((GemvShape::parse(v)?, own, apart))
    };
    crate::flash::sweep_line(script, "STEP_SHAPES=")?.into_iter().map(variant).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape the sweep times in whole decode steps is one it also times alone, and so one
    /// that tests/cuda_kernels.rs compiles (no spills) and tests/kernel_emu.rs runs on the CPU model.
    #[test]
    fn step_shapes_are_among_the_swept_ones() {
        let script = include_str!("../../../scripts/gpu-sweep.sh");
        let (alone, steps) = (gemv_sweep_shapes(script).unwrap(), step_sweep_shapes(script).unwrap());
        assert_eq!(steps[0], (GEMV_DEFAULT, false, false), "the default first");
        assert!(steps.iter().any(|s| s.0.early > 0) && steps.iter().any(|s| s.1), "{steps:?}");
        // The folded norms timed against the norms apart, with cuBLAS's down projection and without.
        assert!(steps.contains(&(GEMV_DEFAULT, false, true)) && steps.contains(&(GEMV_DEFAULT, true, true)), "{steps:?}");
        for (shape, ..) in steps {
            assert!(alone.contains(&shape), "{shape}: in STEP_SHAPES, not in GEMV_SHAPES");
        }
        assert!(step_sweep_shapes("STEP_SHAPES=\"4x4+mine\"\n").is_err());
        assert!(step_sweep_shapes("STEP_SHAPES=\"4x4+apart+own\"\n").is_err(), "+apart goes last");
    }

    #[test]
    fn gemv_shapes_parse_and_print_back() {
        for s in ["4x4", "4x8", "8x4p", "2x2p", "4x4f2", "8x4pf1", "4x4s4", "8x4ps8f1", "2x8s2", "4x4e2", "4x4e8", "4x4pf1e3", "4x4ps4f2e4"] {
            assert_eq!(GemvShape::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(GemvShape::parse("4x4").unwrap(), GEMV_DEFAULT);
        for bad in [
            "4x8p", "3x4", "4x16", "4", "ax4", "4x4q", "4x4f", "4x4f4", "4x4f0", "4x4fp", "4xf2", "4x4s", "4x4s3", "4x4s8", "4x4s1", "4x4s2", "8x4s4", "4x4f1s4",
            // Early rounds the kernel takes anyway (one; the prefetched and pipelined ones), past 8, or out of order.
            "4x4e1", "4x4e0", "4x4e9", "4x4f2e2", "4x4pf1e2", "4x4e", "4x4e2f1", "4x4e2p",
        ] {
            assert!(GemvShape::parse(bad).is_err(), "{bad}");
        }
        let s = GemvShape::parse("8x2").unwrap();
        assert_eq!((s.threads(), s.rows_per_block(), s.glu_rows_per_block()), (256, 16, 8));
        let s = GemvShape::parse("8x4s8").unwrap();
        assert_eq!((s.threads(), s.rows_per_block(), s.glu_rows_per_block()), (256, 2, 1));
    }

    /// The default shape is gemv.cu's own (what it compiles to without options).
    #[test]
    fn the_default_is_the_kernels_own() {
        let src = crate::kernels::FILES.iter().find(|(n, _)| *n == "gemv.cu").unwrap().1;
        let d = GEMV_DEFAULT;
        let defaults = [("GEMV_WARPS", d.warps), ("GEMV_UNROLL", d.unroll), ("GEMV_PIPE", d.pipe as u32), ("GEMV_PREFETCH", d.prefetch), ("GEMV_SPLIT", d.split), ("GEMV_EARLY", d.early)];
        for (name, v) in defaults {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name} {v}");
        }
    }
}

//! Tensor maps for Hopper's tensor memory accelerator (TMA), and a probe of our reading of it.
//!
//! A TMA copy (`cp.async.bulk.tensor`, kernels/common.cuh's `tma_load_3d`) moves a box of a tensor
//! from global to shared memory, laid out with the 128-byte swizzle, described by a 128-byte tensor
//! map that the host encodes (`cuTensorMapEncodeTiled` on a GPU: `Driver::tensor_map`) and the
//! kernel reads from global memory. [`TensorMap`] is what we ask for: a 3-dimensional tensor of
//! 16-bit elements, innermost dimension first (a head's `d` elements, the heads, the rows), and
//! the box one copy brings.
//!
//! The emulated device (kernels/emu/simt.hpp) reads maps in a format of its own, [`TensorMap::emu_bytes`],
//! which is what drivers without a GPU encode; the recording driver reads the same format to hold
//! each copy's tensor to an op's regions. `tma_probe_d{64,128}` (kernels/attention.cu) copies one
//! 64-row box of a head's keys by TMA and writes shared memory back as it lies: [`check_tma`] holds
//! it to the layout the wgmma kernels read (`swz_wg`: [d / 64][rows][64], a row's 16-byte chunk c at
//! c ^ (row % 8)), rows past the tensor's end zeros, on the emulated device (our model against our
//! layout) and on a Hopper GPU (the hardware against both). The prefill kernel of FlashAttention-3's
//! design (a producer warp feeding K and V tiles by TMA) waits on it.

use highrise_core::{Error, Result};

use crate::driver::Driver;
use crate::wgmma_check::run_probe;

/// A 3-dimensional tensor of 16-bit elements in global memory and the box a copy brings, with the
/// 128-byte swizzle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap {
    /// Device address of element (0, 0, 0): 16-byte aligned.
    pub base: u64,
    /// Extent of each dimension, innermost first.
    pub dims: [u64; 3],
    /// Bytes from one index of dimensions 1 and 2 to the next (multiples of 16).
    pub strides: [u64; 2],
    /// The box: at most 64 elements (128 bytes) innermost, at most 256 along the others.
    pub boxes: [u32; 3],
}

/// The emulated device's tag for a map in its format (kernels/emu/simt.hpp's `TensorMap`: rank 3).
const EMU_RANK: u32 = 3;

impl TensorMap {
    /// Bytes one copy of the box brings (and counts on its barrier), out-of-bounds elements
    /// included.
    pub fn box_bytes(&self) -> u64 {
        self.boxes.iter().map(|&b| b as u64).product::<u64>() * 2
    }

    /// The bytes from `base` the tensor spans.
    pub fn span(&self) -> u64 {
        let last = |i: usize| self.dims[i].saturating_sub(1);
        last(0) * 2 + last(1) * self.strides[0] + last(2) * self.strides[1] + 2
    }

    /// What `cuTensorMapEncodeTiled` requires of a tiled map with the 128-byte swizzle.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Invalid(format!("tensor map {self:?}: {why}")));
        if self.base % 16 != 0 {
            return bad("the base is not 16-byte aligned".into());
        }
        if self.dims.contains(&0) || self.dims.iter().any(|&d| d > 1 << 32) {
            return bad("every dimension must be 1..2^32".into());
        }
        if self.strides.iter().any(|&s| s % 16 != 0 || s == 0 || s >= 1 << 40) {
            return bad("strides must be non-zero multiples of 16 below 2^40".into());
        }
        if self.boxes[0] == 0 || self.boxes[0] * 2 > 128 || (self.boxes[0] * 2) % 16 != 0 {
            return bad("the 128-byte swizzle takes inner boxes of 8 to 64 elements, a multiple of 8".into());
        }
        if self.boxes[1..].iter().any(|&b| b == 0 || b > 256) {
            return bad("outer box dimensions must be 1..256".into());
        }
        Ok(())
    }

    /// The map in the emulated device's format (little-endian: base, rank, element bytes, dims[5],
    /// strides[5] in bytes with strides[0] the element, box[5], swizzle bytes).
    pub fn emu_bytes(&self) -> [u8; 128] {
        let mut out = Vec::with_capacity(128);
        out.extend(self.base.to_le_bytes());
        out.extend(EMU_RANK.to_le_bytes());
        out.extend(2u32.to_le_bytes());
        for d in [self.dims[0], self.dims[1], self.dims[2], 1, 1] {
            out.extend(d.to_le_bytes());
        }
        for s in [2, self.strides[0], self.strides[1], 0, 0] {
            out.extend(s.to_le_bytes());
        }
        for b in [self.boxes[0], self.boxes[1], self.boxes[2], 1, 1] {
            out.extend(b.to_le_bytes());
        }
        out.extend(128u32.to_le_bytes());
        out.resize(128, 0);
        out.try_into().expect("128 bytes")
    }

    /// A map read back from `emu_bytes`; None for bytes that are not one.
    pub fn from_emu_bytes(b: &[u8]) -> Option<TensorMap> {
        let u64_at = |i: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
        let u32_at = |i: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?)) };
        if u32_at(8)? != EMU_RANK || u32_at(12)? != 2 || u32_at(116)? != 128 {
            return None;
        }
        let dim = |i: usize| u64_at(16 + 8 * i);
        let stride = |i: usize| u64_at(56 + 8 * i);
        Some(TensorMap {
            base: u64_at(0)?,
            dims: [dim(0)?, dim(1)?, dim(2)?],
            strides: [stride(1)?, stride(2)?],
            boxes: [u32_at(96)?, u32_at(100)?, u32_at(104)?],
        })
    }

    /// These bytes with the base replaced (an executing driver's host address for the device's).
    pub fn rebased(bytes: &[u8; 128], base: u64) -> [u8; 128] {
        let mut out = *bytes;
        out[..8].copy_from_slice(&base.to_le_bytes());
        out
    }
}

/// The rows of the probe's box: a key tile of the prefill kernels.
const ROWS: usize = 64;

/// What `tma_probe_d{d}` brought against the layout the wgmma kernels read.
#[derive(Clone, Debug)]
pub struct TmaCheck {
    pub kernel: String,
    pub wrong: usize,
    pub total: usize,
    /// Where the wrong elements are and where their values belong (empty when none is).
    pub detail: String,
}

impl TmaCheck {
    pub fn ok(&self) -> bool {
        self.wrong == 0
    }
}

impl std::fmt::Display for TmaCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.ok() { "ok" } else { "WRONG" };
        writeln!(f, "{}: {verdict}, {} of {} elements wrong{}", self.kernel, self.wrong, self.total, self.detail)
    }
}

/// Element offset of chunk `c` (8 elements) of row `r` in a tile of `rows` rows as wgmma reads it
/// (kernels/attention.cu's `swz_wg`).
fn swz_wg(r: usize, c: usize, rows: usize) -> usize {
    (c >> 3) * rows * 64 + r * 64 + (((c & 7) ^ (r & 7)) << 3)
}

/// Runs `tma_probe_d{d}` on `driver` (a Hopper GPU's, or the emulated device's): the box of rows
/// 64..128 of head 1 of a [100 rows, 3 heads, d] tensor whose every element holds its own index
/// (rows 100.. lie outside: zeros), brought by TMA; each element of shared memory is held to the
/// swizzled layout.
pub fn check_tma(driver: &dyn Driver, d: usize) -> Result<TmaCheck> {
    if d != 64 && d != 128 {
        return Err(Error::Unsupported(format!("tma_probe: head dim {d}: only 64 and 128")));
    }
    let (rows, heads, head, row0) = (100usize, 3usize, 1usize, 64usize);
    let kernel = format!("tma_probe_d{d}");
    let value = |r: usize, h: usize, x: usize| ((r * heads + h) * d + x) as u16;
    let tensor: Vec<u8> = (0..rows * heads * d).flat_map(|i| (i as u16).to_le_bytes()).collect();
    let sizes = [("out", ROWS * d * 2), ("map", 128), ("tensor", tensor.len())];
    let upload = |ptrs: &[u64]| {
        let map = TensorMap {
            base: ptrs[2],
            dims: [d as u64, heads as u64, rows as u64],
            strides: [(d * 2) as u64, (heads * d * 2) as u64],
            boxes: [64, 1, ROWS as u32],
        };
        Ok(vec![(1, driver.tensor_map(&map)?.to_vec()), (2, tensor)])
    };
    // The output (ROWS x d 16-bit elements), the map, and the box's first row and head.
    let args = |ptrs: &[u64]| vec![ptrs[0].to_le_bytes().to_vec(), ptrs[1].to_le_bytes().to_vec(), (row0 as u32).to_le_bytes().to_vec(), (head as u32).to_le_bytes().to_vec()];
    let out = run_probe(driver, &kernel, &sizes, probe_shared_bytes(d), upload, args, &[0])?;
    let got: Vec<u16> = out[0].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let mut want = vec![0u16; ROWS * d];
    for r in 0..ROWS {
        for x in 0..d {
            let v = if row0 + r < rows { value(row0 + r, head, x) } else { 0 };
            want[swz_wg(r, x / 8, ROWS) + x % 8] = v;
        }
    }
    let wrong: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    let mut detail = String::new();
    for &i in wrong.iter().take(6) {
        let at = want.iter().position(|&w| w == got[i] && got[i] != 0).map_or("a value from nowhere".to_string(), |j| format!("belongs at {j}"));
        detail += &format!("\n    shared element {i} holds {} (want {}): {at}", got[i], want[i]);
    }
    Ok(TmaCheck { kernel, wrong: wrong.len(), total: want.len(), detail })
}

/// The probe's dynamic shared memory at head dim `d`: its box, and 1024 bytes to align it for the
/// swizzle.
pub fn probe_shared_bytes(d: usize) -> u32 {
    (ROWS * d * 2 + 1024) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_through_the_emulators_format_and_are_validated() {
        let m = TensorMap { base: 0x3000_0000_0100, dims: [128, 8, 1000], strides: [256, 2048], boxes: [64, 1, 64] };
        m.validate().unwrap();
        assert_eq!(TensorMap::from_emu_bytes(&m.emu_bytes()), Some(m));
        assert_eq!(m.box_bytes(), 64 * 64 * 2);
        // The last element: row 999, head 7, element 127.
        assert_eq!(m.span(), 999 * 2048 + 7 * 256 + 128 * 2);
        let rebased = TensorMap::from_emu_bytes(&TensorMap::rebased(&m.emu_bytes(), 0x10)).unwrap();
        assert_eq!(rebased.base, 0x10);
        assert_eq!(TensorMap::from_emu_bytes(&[0u8; 128]), None);
        for bad in [
            TensorMap { base: 8, ..m },
            TensorMap { boxes: [128, 1, 64], ..m },
            TensorMap { boxes: [64, 1, 512], ..m },
            TensorMap { strides: [250, 2048], ..m },
            TensorMap { dims: [128, 0, 1000], ..m },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_layout_is_the_wgmma_kernels() {
        // Row 1's chunk 0 sits at chunk 1 of its 128-byte row; d128's second half after all 64 rows.
        assert_eq!(swz_wg(1, 0, 64), 64 + 8);
        assert_eq!(swz_wg(0, 8, 64), 64 * 64);
        assert_eq!(probe_shared_bytes(128), 64 * 128 * 2 + 1024);
    }
}

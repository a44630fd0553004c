//! Element types of tensors: the float types activations use and the block-quantized types weights may
//! keep from their file (GGUF). A quantized type packs `block_len` values into `block_bytes` bytes.

use std::fmt;

/// The type of a tensor's elements. The discriminants are part of the plugin ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// Unsigned 32-bit integers: token ids (what `Argmax` writes).
    U32 = 3,
    /// 32 values: an f16 scale and 32 signed bytes.
    Q8_0 = 8,
    /// 32 values: an f16 scale and 32 4-bit values offset by 8.
    Q4_0 = 9,
    /// 32 values: an f16 scale, an f16 minimum and 32 4-bit values.
    Q4_1 = 10,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales and minimums.
    Q4K = 11,
    /// 256 values in 16 sub-blocks of 16 with 8-bit scales, 6-bit values.
    Q6K = 12,
    /// Q4_0 with each group of 8 rows interleaved block by block (`quant::repack_r8`): the same bytes
    /// per row, laid out so that one SIMD load reads a block's nibbles of eight rows. A backend's own
    /// layout for weight matrices (rows a multiple of 8), never a file's.
    Q4_0R8 = 13,
    /// Q4_1 with each group of 8 rows interleaved block by block, as `Q4_0R8`.
    Q4_1R8 = 14,
}

impl DType {
    pub const ALL: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::U32,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4K,
        DType::Q6K,
        DType::Q4_0R8,
        DType::Q4_1R8,
    ];
    /// The dtypes activations (the residual stream, Q/K/V, the KV cache) may have.
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn from_u32(v: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as u32 == v)
    }

    /// Number of values stored together in one block (1 for the float types).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::U32 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_0R8 | DType::Q4_1R8 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
    }

    /// Bytes one block occupies.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 | DType::Q4_0R8 => 18,
            DType::Q4_1 | DType::Q4_1R8 => 20,
            DType::Q4K => 144,
            DType::Q6K => 210,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// How many rows of a matrix are interleaved together (8 for the `R8` layouts, else 1): the row
    /// count must be a multiple of it, and a single row is not contiguous unless it is 1.
    pub fn interleaved_rows(self) -> usize {
        match self {
            DType::Q4_0R8 | DType::Q4_1R8 => 8,
            _ => 1,
        }
    }

    /// The 8-row interleaved layout of this format, where there is one.
    pub fn r8(self) -> Option<DType> {
        match self {
            DType::Q4_0 => Some(DType::Q4_0R8),
            DType::Q4_1 => Some(DType::Q4_1R8),
            _ => None,
        }
    }

    /// `v` rounded to this float dtype, as storing and reading it back gives (itself for f32, or a
    /// dtype that is no float).
    pub fn rounded(self, v: f32) -> f32 {
        match self {
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            DType::F16 => half::f16::from_f32(v).to_f32(),
            _ => v,
        }
    }

    /// The row-by-row format an interleaved layout holds (itself for every other dtype).
    pub fn plain(self) -> DType {
        match self {
            DType::Q4_0R8 => DType::Q4_0,
            DType::Q4_1R8 => DType::Q4_1,
            d => d,
        }
    }

    /// Bytes needed for `numel` values, or `None` when `numel` is not a whole number of blocks.
    pub fn storage_bytes(self, numel: usize) -> Option<usize> {
        if numel % self.block_len() != 0 {
            return None;
        }
        (numel / self.block_len()).checked_mul(self.block_bytes())
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4K => "q4_k",
            DType::Q6K => "q6_k",
            DType::Q4_0R8 => "q4_0_r8",
            DType::Q4_1R8 => "q4_1_r8",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_sizes_follow_blocks() {
        assert_eq!(DType::F32.storage_bytes(10), Some(40));
        assert_eq!(DType::BF16.storage_bytes(3), Some(6));
        assert_eq!(DType::Q4_1.storage_bytes(64), Some(40));
        assert_eq!(DType::Q4_1.storage_bytes(33), None);
        assert_eq!(DType::Q6K.storage_bytes(512), Some(420));
        for d in DType::ALL {
            assert_eq!(DType::from_u32(d as u32), Some(d));
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::from_u32(99), None);
    }
}

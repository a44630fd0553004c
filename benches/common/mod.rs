//! Shared by the criterion benches.

use std::sync::Arc;

use highrise::core::{Backend, DType, Tensor};

/// A tensor of `dims` with values uniform in +-`scale` (xorshift; the same values every run). Large
/// tensors repeat a pool of 2^20 values, so a multi-GiB benchmark input is made quickly.
pub fn random(b: &Arc<dyn Backend>, dtype: DType, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = 0x2545F4914F6CDD1Du64;
    let pool: Vec<f32> = (0..n.min(1 << 20))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    let v: Vec<f32> = (0..n).map(|i| pool[i % pool.len()]).collect();
    Tensor::from_f32(b, dtype, dims, &v).unwrap()
}

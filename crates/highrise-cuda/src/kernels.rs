//! The kernel sources (`kernels/` at the top of the repository), embedded at build time. Each file is
//! compiled as the shared header followed by its body, so NVRTC needs no include paths.

/// The shared header every file starts with.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (file name, body), one per op family.
pub const FILES: &[(&str, &str)] = &[
    ("residual.cu", include_str!("../../../kernels/residual.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("mlp.cu", include_str!("../../../kernels/mlp.cu")),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
];

/// Head dims the attention kernels are instantiated for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The source NVRTC compiles for one file.
pub fn source(body: &str) -> String {
    format!("{COMMON}\n#line 1\n{body}")
}

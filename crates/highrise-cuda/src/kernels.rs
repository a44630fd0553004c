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

/// The kernels that begin with `PDL_ENTRY` (kernels/common.cuh: `griddepcontrol.wait` before any
/// memory access but their weights' prefetch): the decode path's, which a CUDA graph may run as
/// programmatic dependents of the kernel before them. By name without the dtype suffix (and the
/// head dim, and the rows of x of the matrix-vector kernels). A kernel named here that does not
/// wait is a fault on the emulated device (kernels/emu/simt.hpp), which runs every launch of one
/// as a programmatic dependent.
pub const PROGRAMMATIC: &[&str] = &[
    "embedding",
    "rms_norm",
    "add_rms_norm",
    "add",
    "gemv",
    "gemv_add",
    "gemv_glu",
    "gemv_glu_norm",
    "gemv_qkv",
    "gemv_qkv_norm",
    "rope_kv_write",
    "decode_attn",
    "attn_combine",
    "swiglu",
    "geglu",
    "argmax",
    "sample",
    "softcap",
    "moe_route",
    "moe_glu",
    "moe_down",
    "moe_combine",
    "moe_gemv_glu",
    "moe_gemv_down",
];

/// Whether `kernel` (a full name, e.g. "gemv_qkv1_bf16", "decode_attn_d128_f16") is one of
/// [`PROGRAMMATIC`].
pub fn programmatic(kernel: &str) -> bool {
    let (base, _, _) = split_name(kernel);
    let base = if base.starts_with("gemv") { base.trim_end_matches(|c: char| c.is_ascii_digit()) } else { base };
    PROGRAMMATIC.contains(&base)
}

/// A kernel's name without its dtype suffix, the element size of that dtype, and its head dim for
/// the attention kernels ("attn_group_d128_bf16" -> ("attn_group", 2, 128)).
pub(crate) fn split_name(kernel: &str) -> (&str, usize, usize) {
    let (base, elt) = match kernel.rsplit_once('_') {
        Some((b, "f32")) if b != "to" => (b, 4),
        Some((b, "f16" | "bf16")) => (b, 2),
        _ => (kernel, 4),
    };
    match base.rsplit_once("_d") {
        Some((b, d)) if d.chars().all(|c| c.is_ascii_digit()) && !d.is_empty() => (b, elt, d.parse().unwrap_or(0)),
        _ => (base, elt, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_kernels_are_known_by_their_full_names() {
        for k in ["gemv1_bf16", "gemv_glu8_f16", "gemv_qkv2_bf16", "gemv_qkv_norm1_bf16", "gemv_add4_f16", "decode_attn_d128_bf16", "add_rms_norm_f32", "add_bf16", "argmax_bf16", "softcap_f16"] {
            assert!(programmatic(k), "{k}");
        }
        // Kernels without the wait: prefill's, the split decode kernels, the linear fallbacks.
        for k in ["flash_attn_wgp_d128_bf16", "attn_group_d128_bf16", "attn_split_d64_f32", "to_f32", "from_f32_bf16", "add_bias_f16", "rope_bf16", "kv_write_f16"] {
            assert!(!programmatic(k), "{k}");
        }
    }

    /// Each name of the list is a kernel family of the sources, entered through `PDL_ENTRY` (the
    /// emulated device checks each launch; this catches a name that matches nothing).
    #[test]
    fn every_programmatic_kernel_exists_and_waits() {
        let all: String = FILES.iter().map(|(_, body)| *body).collect();
        for k in PROGRAMMATIC {
            let at = all.find(&format!(" {k}_##s(")).or_else(|| all.find(&format!(" {k}##tm##_##s("))).or_else(|| all.find(&format!(" {k}_d##dim##_##s(")));
            let at = at.unwrap_or_else(|| panic!("no kernel {k} in kernels/"));
            // The matrix-vector kernels and the norms wait inside, once their weights are asked for.
            let inside = k.starts_with("gemv") || k.ends_with("rms_norm");
            assert!(all[at..].lines().take(8).any(|l| l.contains("PDL_ENTRY()")) || inside, "{k}: no PDL_ENTRY at its start");
        }
        assert!(all.contains("PDL_ENTRY();\n    if (row0 >= n) return;"), "gemv: the wait before its early return");
        // Each norm's two paths: after its weights (registers), and before its loop (long rows).
        assert_eq!(all.matches("norm_weights(wv, w, w_dt, h);\n        PDL_ENTRY();").count(), 2, "the norms' register paths wait");
        assert_eq!(all.matches("PDL_ENTRY();\n    for (u32 i = threadIdx.x; i < h; i += blockDim.x)").count(), 2, "the norms' loops wait");
    }
}

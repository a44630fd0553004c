//! The tensor-core attention kernels (kernels/attention.cu: `flash_attn_*` for prefill, Hopper's
//! `flash_attn_wg_*` too, `decode_attn_*`, merging its slices itself or through `attn_combine_*`, for decoding through the paged cache) run
//! on the CPU: compiled as host C++ with kernels/emu/simt.hpp, a model of CUDA's execution (a fiber per
//! thread; mma.sync, ldmatrix, cp.async and wgmma with their PTX semantics), and checked against an f64 reference by
//! kernels/emu/check_attention.cpp, for the default prefill tile shape and every shape (and Hopper
//! geometry) scripts/gpu-sweep.sh tries on a GPU. Also asserts that ldmatrix meets no shared-memory bank
//! conflict. Needs a C++20 compiler (g++ or clang++), no GPU and no CUDA.

use std::path::{Path, PathBuf};
use std::process::Command;

use highrise_cuda::emu::compiler;
use highrise_cuda::flash::{self, Shape};
use highrise_cuda::gemv;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The shapes scripts/gpu-sweep.sh tries.
fn sweep_shapes() -> Vec<Shape> {
    flash::sweep_shapes(&std::fs::read_to_string(root().join("scripts/gpu-sweep.sh")).unwrap()).unwrap()
}

/// Compiles `source` (a check of kernels/emu) with `defines` into `exe` and runs it with `args`:
/// whether it passed, and its report.
fn build_and_run(cxx: &str, source: &Path, defines: &[String], exe: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(cxx).args(["-std=c++20", "-O2", "-w", "-pthread", "-o"]).arg(exe).arg(source).args(defines).output().unwrap();
    assert!(out.status.success(), "{cxx} {}:\n{}", source.display(), String::from_utf8_lossy(&out.stderr));
    let run = Command::new(exe).args(args).output().unwrap();
    (run.status.success(), String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr))
}

/// Compiles check_attention.cpp with `shape` at both head dims and runs it (`args`: "prefill" for
/// the prefill cases only); its report.
fn check(cxx: &str, shape: Shape, dir: &Path, args: &[&str]) -> String {
    let defines: Vec<String> = flash::HEAD_DIMS.iter().flat_map(|&d| flash::defines_for(d, shape)).collect();
    let exe = dir.join(format!("check_attention_{shape}"));
    let (ok, report) = build_and_run(cxx, &root().join("kernels/emu/check_attention.cpp"), &defines, &exe, args);
    assert!(ok, "flash_attn with tiles of {shape} on the CPU model:\n{report}");
    report
}

#[test]
fn attention_kernels_match_the_reference_on_the_cpu_model() {
    let Some(cxx) = compiler() else {
        return println!("skipped: no C++ compiler (c++, g++ or clang++) to build kernels/emu/check_attention.cpp");
    };
    let dir = std::env::temp_dir().join(format!("highrise-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut shapes = vec![flash::DEFAULT];
    shapes.extend(sweep_shapes().into_iter().filter(|s| *s != flash::DEFAULT));
    for (i, shape) in shapes.into_iter().enumerate() {
        // The decode kernel's and the wgmma prefill kernels' cases (26, 2 x 21 for flash_attn_wg and
        // _wgp, 2 x 21 for flash_attn_ws: copies landing late and at once) run here with their
        // default shapes; their other shapes below.
        let (args, expect): (&[&str], usize) = if i == 0 { (&[], 128) } else { (&["prefill"], 18) };
        let report = check(&cxx, shape, &dir, args);
        let cases = report.lines().filter(|l| l.starts_with("ok ")).count();
        assert_eq!(cases, expect, "every case ran for {shape}:\n{report}");
        assert!(report.contains(" 0 bank conflicts"), "{shape}:\n{report}");
        let worst = report.lines().find(|l| l.contains("d128 bf16 causal")).unwrap_or_default();
        println!("{shape}: {expect} cases ok, no bank conflicts ({})", worst.split(": ").last().unwrap_or_default());
    }
    // The Hopper kernels in every other geometry the sweep tries: their 2 x 21 cases each.
    let script = std::fs::read_to_string(root().join("scripts/gpu-sweep.sh")).unwrap();
    for pair in flash::wg_sweep_shapes(&script).unwrap().into_iter().filter(|p| *p != [flash::WG_DEFAULT; 2]) {
        let label = format!("d64 {}, d128 {}", flash::wg_label(pair[0]), flash::wg_label(pair[1]));
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| flash::wg_defines_for(d, s)).collect();
        let exe = dir.join(format!("check_attention_wg_{}_{}", flash::wg_label(pair[0]), flash::wg_label(pair[1])));
        let (ok, report) = build_and_run(&cxx, &root().join("kernels/emu/check_attention.cpp"), &defines, &exe, &["wgmma"]);
        assert!(ok, "the wgmma kernels in geometry {label} on the CPU model:\n{report}");
        assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), 42, "every case ran for {label}:\n{report}");
        println!("wgmma {label}: 42 cases ok");
    }
    // The warp-specialized kernel in every other geometry the sweep tries: its 2 x 21 cases each.
    for pair in flash::ws_sweep_shapes(&script).unwrap().into_iter().filter(|p| *p != [flash::WS_DEFAULT[0].1, flash::WS_DEFAULT[1].1]) {
        let label = format!("d64 {}, d128 {}", pair[0], pair[1]);
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| s.defines(d)).collect();
        let exe = dir.join(format!("check_attention_ws_{}_{}", pair[0], pair[1]));
        let (ok, report) = build_and_run(&cxx, &root().join("kernels/emu/check_attention.cpp"), &defines, &exe, &["ws"]);
        assert!(ok, "flash_attn_ws in geometry {label} on the CPU model:\n{report}");
        assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), 42, "every case ran for {label}:\n{report}");
        println!("ws {label}: 42 cases ok");
    }
    // The decode kernel in every other shape the sweep tries (warps x stages): its 26 cases each.
    for shape in flash::decode_sweep_shapes(&script).unwrap().into_iter().filter(|s| *s != flash::DECODE_DEFAULT) {
        let exe = dir.join(format!("check_attention_decode_{shape}"));
        let (ok, report) = build_and_run(&cxx, &root().join("kernels/emu/check_attention.cpp"), &shape.defines(), &exe, &["decode"]);
        assert!(ok, "the decode kernel in shape {shape} on the CPU model:\n{report}");
        assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), 26, "every case ran for {shape}:\n{report}");
        assert!(report.contains(" 0 bank conflicts"), "{shape}:\n{report}");
        println!("decode {shape}: 26 cases ok, no bank conflicts");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The checker itself: a kernel with a fault put back in (V read without transposing; the swizzle
/// taken out; the sliding window ignored; ALiBi's bias left out of a tile, or an odd key's
/// distance taken for an even one's; in the wgmma kernels, V's descriptor strides swapped, a tile
/// unswizzled, the softcap left out, S read before its wgmma was waited for, the pipelined one's V
/// from the wrong stage and O rescaled while P V still writes it; in the warp-specialized one, V
/// read without waiting for its stage, a stage refilled before its consumers freed it, a consumer's
/// turn never given, TMA's boxes of a tile landing on one another; in the decode kernel, a chunk
/// read before its copies land, the next chunk copied over the one in use and the merge waiting for
/// slices that never count) is caught, so a pass above means something.
#[test]
fn the_cpu_model_catches_a_wrong_fragment_and_bank_conflicts() {
    let Some(cxx) = compiler() else {
        return println!("skipped: no C++ compiler (c++, g++ or clang++) to build kernels/emu/check_attention.cpp");
    };
    let dir = std::env::temp_dir().join(format!("highrise-emu-faults-{}", std::process::id()));
    let kernels = dir.join("kernels");
    std::fs::create_dir_all(kernels.join("emu")).unwrap();
    let src = std::fs::read_to_string(root().join("kernels/attention.cu")).unwrap();
    for f in ["common.cuh", "emu/simt.hpp", "emu/check.hpp", "emu/check_attention.cpp"] {
        std::fs::copy(root().join("kernels").join(f), kernels.join(f)).unwrap();
    }
    for (fault, from, to, expect, only) in [
        ("V not transposed", "ldmatrix_x4<true>(vf", "ldmatrix_x4<false>(vf", "FAIL d64 bf16", "prefill"),
        ("no swizzle", "return r * D + ((c ^ (r & 7)) << 3);", "return r * D + (c << 3);", "FAIL shared-memory bank conflicts", "prefill"),
        ("wgmma: V's strides swapped", "wgmma_desc(vaddr + kt * 16 * 128, KEYS * 128, 1024)", "wgmma_desc(vaddr + kt * 16 * 128, 1024, KEYS * 128)", "FAIL d128 bf16", "wgmma"),
        ("wgmma: no swizzle", "(((c & 7) ^ (r & 7)) << 3)", "((c & 7) << 3)", "FAIL d64 bf16", "wgmma"),
        ("wgmma-pipe: V of the wrong stage", "issue_pv(pa, odd ? va : va1);", "issue_pv(pa, odd ? va1 : va);", "FAIL d128 bf16 paged, 300", "wgmma"),
        ("wgmma-pipe: O rescaled under P V", "softmax(s, corr, kb);\n            wgmma_wait<0>();\n            rescale(o, corr);", "softmax(s, corr, kb);\n            rescale(o, corr);\n            wgmma_wait<0>();", "FAIL d128 bf16 paged, 300", "wgmma"),
        ("sliding window ignored", "return window != 0 && n > window ? n - window : 0;", "return 0;", "FAIL d64 bf16 causal, 3 prompts (1, 150, 37 rows), 4 heads over 2, softcap 1.00, window 40", "prefill"),
        ("ALiBi left out", "if (mods.alibi != 0.0f) {\n            const float alibi", "if (false) {\n            const float alibi", "FAIL d64 f16 causal, 3 prompts (1, 150, 37 rows), 6 heads over 2, alibi 8.00", "prefill"),
        ("ALiBi: odd keys as far as even ones", "coef * (d0 + (float)(8 * nt + (e & 1)))", "coef * (d0 + (float)(8 * nt))", "FAIL d64 f16 causal, 3 prompts (1, 150, 37 rows), 6 heads over 2, alibi 8.00: wgmma", "wgmma"),
        ("decode: ALiBi with one slope for the group", "mods.slope(g * group + (r_lo + 8) % group, hq)", "mods.slope(g * group + r_lo % group, hq)", "FAIL decode d64 f16 ALiBi", "decode"),
        ("wgmma: softcap left out", "return mods.softcap > 0.0f ? mods.log2_cap(scale_log2)", "return false ? mods.log2_cap(scale_log2)", "FAIL d128 bf16 full, 2 prompts (70, 129 rows), 2 heads over 1, softcap 0.50: wgmma", "wgmma"),
        ("decode: a chunk used before its copies are waited for", "cp_async_wait<DA_STAGES - 1>();\n        __syncwarp();  // this chunk landed", "cp_async_wait<DA_STAGES>();\n        __syncwarp();  // this chunk landed", "FAIL decode d", "decode"),
        ("decode: the chunk ahead copied into the stage in use", "stage_chunk(ahead, stage == 0 ? DA_STAGES - 1 : stage - 1);", "stage_chunk(ahead, stage);", "FAIL decode d", "decode"),
        ("decode: the merge waiting for the empty slices too", "last = atomicAdd(count, 1u) == active - 1;", "last = atomicAdd(count, 1u) == splits - 1;", "FAIL decode d", "decode"),
        ("ws: V read without waiting for its stage", "        wait_full(v_full, j - 1);\n", "", "FAIL d64 bf16 causal, 3 prompts (1, 150, 37 rows), 4 heads over 2: wgmma warp-specialized", "ws"),
        ("ws: a stage refilled before it is free", "            if (j >= STAGES) mbar_wait(v_free + s, free_parity);  // and its P V\n", "", "FAIL the launch faulted: deadlock", "ws"),
        ("ws: TMA's boxes of a d128 tile over one another", "tma_load_3d(dst + c * KEYS * 64, map", "tma_load_3d(dst, map", "FAIL d128 bf16 full, 2 prompts (70, 129 rows), 2 heads over 1: wgmma warp-specialized (TMA)", "ws"),
        ("ws: the first turn never given", "    if (cw == CONS - 1) named_bar_arrive(1, 256);  // the first turn is consumer 0's\n", "", "deadlock: threads wait at barriers", "ws"),
        ("wgmma: S before its wait", "issue_s(s, ka);\n        wgmma_wait<0>();\n        softmax(s, corr, kb);", "issue_s(s, ka);\n        softmax(s, corr, kb);", "FAIL d64 bf16", "wgmma"),
    ] {
        assert!(src.contains(from), "attention.cu has `{from}`");
        let mut faulty = src.replace(from, to);
        if fault == "wgmma: S before its wait" {
            // Its wait comes after the softmax instead (the group must be waited for before exit).
            faulty = faulty.replace("        cp_async_wait<0>();\n        fence_proxy_async();\n        __syncthreads();  // V of this tile", "        wgmma_wait<0>();\n        cp_async_wait<0>();\n        fence_proxy_async();\n        __syncthreads();  // V of this tile");
        }
        std::fs::write(kernels.join("attention.cu"), faulty).unwrap();
        let (ok, report) = build_and_run(&cxx, &kernels.join("emu/check_attention.cpp"), &[], &dir.join("check"), &[only]);
        assert!(!ok && report.contains(expect), "{fault}: not caught:\n{report}");
        println!("{fault}: caught");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The matrix-vector kernels (kernels/gemv.cu, decode's projections) on the CPU model against an f64
/// reference: 1-8 rows of x, k up to 14336, n not a multiple of a block's rows, biases of two dtypes;
/// every output within one unit in the last place of the exact result rounded once; gemv_qkv and
/// gemv_glu their parts' gemv sums, bit for bit, their _norm kernels the same of x's norm (as a warp
/// sums its squares), gemv_add gemv's sums added into the stream.
#[test]
fn gemv_kernels_match_the_reference_on_the_cpu_model() {
    let Some(cxx) = compiler() else {
        return println!("skipped: no C++ compiler (c++, g++ or clang++) to build kernels/emu/check_gemv.cpp");
    };
    let exe = std::env::temp_dir().join(format!("highrise-check-gemv-{}", std::process::id()));
    let (ok, report) = build_and_run(&cxx, &root().join("kernels/emu/check_gemv.cpp"), &[], &exe, &[]);
    assert!(ok, "gemv on the CPU model:\n{report}");
    let oks = |r: &str| r.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(oks(&report), 16, "{report}");
    println!("{report}");
    // Every unsplit shape scripts/gpu-sweep.sh tries gives the same sums, bit for bit (the same
    // inputs, so the same errors to the last digit): the sweep may pick any of them by speed alone.
    // A split one adds in another order: every case within the reference's bounds, its fused
    // kernels still its gemv's sums.
    let script = std::fs::read_to_string(root().join("scripts/gpu-sweep.sh")).unwrap();
    for shape in gemv::gemv_sweep_shapes(&script).unwrap().into_iter().filter(|s| *s != gemv::GEMV_DEFAULT) {
        let (ok, swept) = build_and_run(&cxx, &root().join("kernels/emu/check_gemv.cpp"), &shape.defines(), &exe, &[]);
        assert!(ok && oks(&swept) == 16, "gemv in shape {shape} on the CPU model:\n{swept}");
        if shape.split == 1 {
            assert_eq!(swept, report, "gemv in shape {shape}: other sums than the default shape's");
            println!("gemv in shape {shape}: the default shape's results, bit for bit");
        } else {
            println!("gemv in shape {shape} (split): every case within the reference's bounds");
        }
    }
    let _ = std::fs::remove_file(&exe);
}

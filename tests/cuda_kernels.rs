//! The CUDA kernels compile with NVRTC for Ampere (sm_80) and Hopper (sm_90a), and ptxas finds no
//! register spills in them. Needs no GPU: NVRTC and ptxas come from NVIDIA's PyPI wheels
//! (`nvidia-cuda-nvrtc`, `nvidia-cuda-nvcc`, 13.0 series, installed by .ci/run).

use std::path::{Path, PathBuf};
use std::process::Command;

use highrise_cuda::{flash, gemv, kernels, libs, nvrtc};

fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HIGHRISE_PTXAS") {
        return Some(p.into());
    }
    let wheel = libs::python_nvidia_dir().map(|d| d.join("cu13/bin/ptxas")).filter(|p| p.is_file());
    wheel.or_else(|| Command::new("ptxas").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "ptxas".into()))
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90a_without_spills() {
    if let Err(e) = nvrtc::ensure_loaded() {
        return println!("skipped: no NVRTC here ({e})");
    }
    let (major, minor) = nvrtc::version().unwrap();
    println!("NVRTC {major}.{minor}");
    let ptxas = ptxas();
    if ptxas.is_none() {
        println!("skipped (spill check only): no ptxas (pip install nvidia-cuda-nvcc==13.0.*)");
    }
    let dir = std::env::temp_dir().join(format!("highrise-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["sm_80", "sm_90a"] {
        let files = nvrtc::compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(files.len(), kernels::FILES.len());
        for (name, ptx) in files {
            let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
            assert!(entries > 0, "{name} for {arch} has no kernels");
            let Some(ptxas) = &ptxas else { continue };
            assert_no_spills(ptxas, &dir, arch, name, &ptx, entries);
            println!("{arch} {name}: {entries} kernels, no spills");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// ptxas -v on `ptx`: every kernel reported on, none spilling. Returns each kernel's registers
/// per thread.
fn assert_no_spills(ptxas: &Path, dir: &Path, arch: &str, name: &str, ptx: &str, entries: usize) -> Vec<(String, u32)> {
    let path = dir.join(format!("{name}.{arch}.ptx"));
    std::fs::write(&path, ptx).unwrap();
    let out = Command::new(ptxas).args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"]).arg(&path).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ptxas {name} for {arch}:\n{log}");
    // ptxas -v prints, per kernel: "Compiling entry function 'NAME' ..." then
    // "N bytes stack frame, S bytes spill stores, L bytes spill loads".
    let mut kernel = String::new();
    let mut checked = 0;
    let mut registers = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernel = rest.split('\'').next().unwrap_or_default().to_string();
            checked += 1;
        }
        // "ptxas info    : Used N registers, ..."
        if let Some(n) = line.split("Used ").nth(1).and_then(|r| r.split(" registers").next()?.parse().ok()) {
            registers.push((kernel.clone(), n));
        }
        if line.contains("spill stores") {
            let spills: Vec<u64> = line
                .split(',')
                .filter(|p| p.contains("spill"))
                .map(|p| p.trim().split(' ').next().unwrap().parse().unwrap())
                .collect();
            // Every function's, the device functions ptxas lists beside the kernels included.
            assert!(spills.iter().all(|&s| s == 0), "{arch} {kernel} spills: {line}");
        }
    }
    assert_eq!(checked, entries, "ptxas reported on every kernel of {name} for {arch}:\n{log}");
    registers
}

/// Every tile shape scripts/gpu-sweep.sh tries on a GPU compiles for both architectures without
/// spills, so that the sweep times only shapes worth keeping.
#[test]
fn every_swept_flash_shape_compiles_without_spills() {
    if let Err(e) = nvrtc::ensure_loaded() {
        return println!("skipped: no NVRTC here ({e})");
    }
    let Some(ptxas) = ptxas() else {
        return println!("skipped: no ptxas (pip install nvidia-cuda-nvcc==13.0.*)");
    };
    let script = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-sweep.sh")).unwrap();
    let shapes = flash::sweep_shapes(&script).unwrap();
    let dir = std::env::temp_dir().join(format!("highrise-sweep-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = kernels::FILES.iter().find(|(n, _)| *n == "attention.cu").unwrap().1;
    for arch in ["sm_80", "sm_90a"] {
        for &shape in &shapes {
            let defines: Vec<String> = flash::HEAD_DIMS.iter().flat_map(|&d| flash::defines_for(d, shape)).collect();
            let ptx = nvrtc::compile("attention.cu", &kernels::source(body), arch, &defines).unwrap();
            let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
            assert_no_spills(&ptxas, &dir, arch, &format!("attention.cu-{shape}"), &ptx, entries);
            println!("{arch} flash tiles {shape}: no spills");
        }
    }
    // The Hopper kernels' geometries (WG_SHAPES), on Hopper: every wgmma kernel without spills.
    for pair in flash::wg_sweep_shapes(&script).unwrap() {
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| flash::wg_defines_for(d, s)).collect();
        let ptx = nvrtc::compile("attention.cu", &kernels::source(body), "sm_90a", &defines).unwrap();
        let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
        let label = format!("d64 {}, d128 {}", flash::wg_label(pair[0]), flash::wg_label(pair[1]));
        assert_no_spills(&ptxas, &dir, "sm_90a", &format!("attention.cu-wg-{label}"), &ptx, entries);
        println!("sm_90a wgmma geometry {label}: no spills");
    }
    // The warp-specialized kernel's geometries (WS_SHAPES): keys x stages.
    for pair in flash::ws_sweep_shapes(&script).unwrap() {
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| s.defines(d)).collect();
        let ptx = nvrtc::compile("attention.cu", &kernels::source(body), "sm_90a", &defines).unwrap();
        let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
        let label = format!("d64 {}, d128 {}", pair[0], pair[1]);
        assert_no_spills(&ptxas, &dir, "sm_90a", &format!("attention.cu-ws-{label}"), &ptx, entries);
        println!("sm_90a warp-specialized geometry {label}: no spills");
    }
    // The decode kernel's shapes (DECODE_SHAPES): warps x pipeline stages.
    // On Hopper its registers never hold an SM to fewer blocks than its shared memory allows, up
    // to 12 warps (left to itself ptxas gave 4x2 at d128 199 registers: 2 blocks an SM where shared
    // memory holds 3, a third fewer copies in flight).
    for arch in ["sm_80", "sm_90a"] {
        for shape in flash::decode_sweep_shapes(&script).unwrap() {
            let ptx = nvrtc::compile("attention.cu", &kernels::source(body), arch, &shape.defines()).unwrap();
            let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
            let registers = assert_no_spills(&ptxas, &dir, arch, &format!("attention.cu-decode-{shape}"), &ptx, entries);
            println!("{arch} decode shape {shape}: no spills");
            if arch != "sm_90a" {
                continue;
            }
            for d in flash::HEAD_DIMS {
                let kernel = format!("decode_attn_d{d}_bf16");
                let regs = registers.iter().find(|(k, _)| *k == kernel).unwrap_or_else(|| panic!("{kernel}: no register count")).1;
                // Registers are given out per warp in units of 256.
                let per_warp = (regs * 32).div_ceil(256) * 256;
                let by_registers = 65536 / (per_warp * shape.warps);
                let by_shared = (228 << 10) / (shape.shared_bytes(d) + (1 << 10));
                let want = by_shared.min(12 / shape.warps).max(1);
                assert!(by_registers >= want, "{kernel} at {shape}: {regs} registers a thread hold an SM to {by_registers} blocks, shared memory allows {by_shared}");
                println!("sm_90a decode shape {shape} d{d}: {regs} registers, {} blocks an SM", by_registers.min(by_shared));
            }
        }
    }
    // The matrix-vector kernels' shapes (GEMV_SHAPES): warps x chunks in flight, pipelined or not.
    let gemv_body = kernels::FILES.iter().find(|(n, _)| *n == "gemv.cu").unwrap().1;
    for arch in ["sm_80", "sm_90a"] {
        for shape in gemv::gemv_sweep_shapes(&script).unwrap() {
            let ptx = nvrtc::compile("gemv.cu", &kernels::source(gemv_body), arch, &shape.defines()).unwrap();
            let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
            assert_no_spills(&ptxas, &dir, arch, &format!("gemv.cu-{shape}"), &ptx, entries);
            println!("{arch} gemv shape {shape}: no spills");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

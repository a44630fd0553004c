//! The CUDA kernels compile with NVRTC for Ampere (sm_80) and Hopper (sm_90a), and ptxas finds no
//! register spills in them. Needs no GPU: NVRTC and ptxas come from NVIDIA's PyPI wheels
//! (`nvidia-cuda-nvrtc`, `nvidia-cuda-nvcc`, 13.0 series, installed by .ci/run).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

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
    let mut checks = ptxas.map(|p| Ptxas::new(p, "highrise-ptx"));
    for arch in ["sm_80", "sm_90a"] {
        let files = nvrtc::compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(files.len(), kernels::FILES.len());
        for (name, ptx) in files {
            let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
            assert!(entries > 0, "{name} for {arch} has no kernels");
            let Some(checks) = &mut checks else { continue };
            let line = format!("{arch} {name}: {entries} kernels, no spills");
            checks.check(arch, name, &ptx, move |_| println!("{line}"));
        }
    }
    if let Some(checks) = checks {
        checks.finish();
    }
}

/// `ptxas -v` over the kernels' PTX, as many runs at once as the machine has cores, while the test's
/// thread compiles the next variant with NVRTC: ptxas takes ~10 s over attention.cu's 4 MB of PTX,
/// most of the sweep's ~60 variants' time on CI's two cores. `finish` waits for the runs still going
/// and checks their reports.
struct Ptxas {
    exe: PathBuf,
    dir: PathBuf,
    running: VecDeque<Run>,
    at_once: usize,
}

/// One `ptxas -v` started: its report goes to `log`, and `then` gets each kernel's registers per
/// thread once the report is checked.
struct Run {
    arch: String,
    name: String,
    entries: usize,
    child: Child,
    log: PathBuf,
    then: Box<dyn FnOnce(&[(String, u32)])>,
}

impl Ptxas {
    fn new(exe: PathBuf, dir: &str) -> Ptxas {
        let dir = std::env::temp_dir().join(format!("{dir}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ptxas { exe, dir, running: VecDeque::new(), at_once }
    }

    /// Starts ptxas on `ptx` (file `name` for `arch`), after the oldest run still going finishes
    /// where `at_once` are.
    fn check(&mut self, arch: &str, name: &str, ptx: &str, then: impl FnOnce(&[(String, u32)]) + 'static) {
        while self.running.len() >= self.at_once {
            self.finish_oldest();
        }
        let entries = ptx.lines().filter(|l| l.contains(".entry ")).count();
        let path = self.dir.join(format!("{name}.{arch}.ptx"));
        let log = self.dir.join(format!("{name}.{arch}.log"));
        std::fs::write(&path, ptx).unwrap();
        let child = Command::new(&self.exe)
            .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
            .arg(&path)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.running.push_back(Run { arch: arch.into(), name: name.into(), entries, child, log, then: Box::new(then) });
    }

    /// Waits for every run and checks its report.
    fn finish(mut self) {
        while !self.running.is_empty() {
            self.finish_oldest();
        }
    }

    fn finish_oldest(&mut self) {
        let Some(mut run) = self.running.pop_front() else { return };
        let status = run.child.wait().unwrap();
        let log = std::fs::read_to_string(&run.log).unwrap();
        assert!(status.success(), "ptxas {} for {}:\n{log}", run.name, run.arch);
        let registers = no_spills(&log, &run.arch, &run.name, run.entries);
        (run.then)(&registers);
    }
}

impl Drop for Ptxas {
    fn drop(&mut self) {
        // Runs left only where a check failed: not waited for.
        for run in &mut self.running {
            let _ = run.child.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// ptxas -v's report on the PTX of `name` for `arch`: every one of its `entries` kernels reported
/// on, none spilling. Returns each kernel's registers per thread.
fn no_spills(log: &str, arch: &str, name: &str, entries: usize) -> Vec<(String, u32)> {
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
    let mut checks = Ptxas::new(ptxas, "highrise-sweep-ptx");
    let body = kernels::FILES.iter().find(|(n, _)| *n == "attention.cu").unwrap().1;
    for arch in ["sm_80", "sm_90a"] {
        for &shape in &shapes {
            let defines: Vec<String> = flash::HEAD_DIMS.iter().flat_map(|&d| flash::defines_for(d, shape)).collect();
            let ptx = nvrtc::compile("attention.cu", &kernels::source(body), arch, &defines).unwrap();
            let line = format!("{arch} flash tiles {shape}: no spills");
            checks.check(arch, &format!("attention.cu-{shape}"), &ptx, move |_| println!("{line}"));
        }
    }
    // The Hopper kernels' geometries (WG_SHAPES), on Hopper: every wgmma kernel without spills.
    for pair in flash::wg_sweep_shapes(&script).unwrap() {
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| flash::wg_defines_for(d, s)).collect();
        let ptx = nvrtc::compile("attention.cu", &kernels::source(body), "sm_90a", &defines).unwrap();
        let label = format!("d64 {}, d128 {}", flash::wg_label(pair[0]), flash::wg_label(pair[1]));
        let line = format!("sm_90a wgmma geometry {label}: no spills");
        checks.check("sm_90a", &format!("attention.cu-wg-{label}"), &ptx, move |_| println!("{line}"));
    }
    // The warp-specialized kernel's geometries (WS_SHAPES): keys x stages.
    for pair in flash::ws_sweep_shapes(&script).unwrap() {
        let defines: Vec<String> = flash::HEAD_DIMS.iter().zip(pair).flat_map(|(&d, s)| s.defines(d)).collect();
        let ptx = nvrtc::compile("attention.cu", &kernels::source(body), "sm_90a", &defines).unwrap();
        let label = format!("d64 {}, d128 {}", pair[0], pair[1]);
        let line = format!("sm_90a warp-specialized geometry {label}: no spills");
        checks.check("sm_90a", &format!("attention.cu-ws-{label}"), &ptx, move |_| println!("{line}"));
    }
    // The decode kernel's shapes (DECODE_SHAPES): warps x pipeline stages.
    // On Hopper its registers never hold an SM to fewer blocks than its shared memory allows, up
    // to 12 warps (left to itself ptxas gave 4x2 at d128 199 registers: 2 blocks an SM where shared
    // memory holds 3, a third fewer copies in flight).
    for arch in ["sm_80", "sm_90a"] {
        for shape in flash::decode_sweep_shapes(&script).unwrap() {
            let ptx = nvrtc::compile("attention.cu", &kernels::source(body), arch, &shape.defines()).unwrap();
            checks.check(arch, &format!("attention.cu-decode-{shape}"), &ptx, move |registers| {
                println!("{arch} decode shape {shape}: no spills");
                if arch == "sm_90a" {
                    decode_registers_fill_the_sm(shape, registers);
                }
            });
        }
    }
    // The matrix-vector kernels' shapes (GEMV_SHAPES): warps x chunks in flight, pipelined or not.
    let gemv_body = kernels::FILES.iter().find(|(n, _)| *n == "gemv.cu").unwrap().1;
    for arch in ["sm_80", "sm_90a"] {
        for shape in gemv::gemv_sweep_shapes(&script).unwrap() {
            let ptx = nvrtc::compile("gemv.cu", &kernels::source(gemv_body), arch, &shape.defines()).unwrap();
            let line = format!("{arch} gemv shape {shape}: no spills");
            checks.check(arch, &format!("gemv.cu-{shape}"), &ptx, move |_| println!("{line}"));
        }
    }
    checks.finish();
}

/// The decode kernel at `shape` on Hopper (`registers`: ptxas's count per kernel): its registers
/// never hold an SM to fewer blocks than its shared memory allows, up to 12 warps.
fn decode_registers_fill_the_sm(shape: flash::DecodeShape, registers: &[(String, u32)]) {
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

//! The kernels of `kernels/` built as host code, so that a machine without a GPU can run them.
//!
//! Each kernel file is compiled by a C++20 compiler with kernels/emu/simt.hpp in front (a model of
//! CUDA's execution: a fiber per thread; mma.sync, ldmatrix, cp.async, shuffles and barriers as the
//! PTX ISA defines them) together with a table of its `extern "C"` entries, into one shared library
//! whose `emu_launch` runs a kernel by name over a grid. [`crate::recording::RecordingDriver`] built
//! with [`crate::recording::RecordingDriver::executing`] hands it every launch it has checked, so the
//! whole CUDA backend (host code and kernels) runs, and is cross-checked against the CPU backend, in
//! CI. The library is cached by the hash of its sources and options.

use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use highrise_core::{Error, Result};
use sha2::{Digest, Sha256};

/// The CUDA model every file is compiled with.
pub const SIMT: &str = include_str!("../../../kernels/emu/simt.hpp");

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, *mut *mut c_void, i32) -> i32;

/// The kernels, built for the CPU and loaded.
pub struct Library {
    _lib: libloading::Library,
    launch: LaunchFn,
    fault: unsafe extern "C" fn() -> *const c_char,
}

/// A C++20 compiler: `$CXX`, else c++, g++ or clang++.
pub fn compiler() -> Option<String> {
    let candidates = std::env::var("CXX").into_iter().chain(["c++".to_string(), "g++".into(), "clang++".into()]);
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

const MAIN: &str = r#"#include "simt.hpp"
extern "C" __attribute__((visibility("default"))) int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                                                                unsigned bx, unsigned by, unsigned bz, unsigned shared,
                                                                void** params, int pdl) {
    auto it = emu::registry().find(name);
    if (it == emu::registry().end()) return 1;
    const emu::Entry entry = it->second;
    return emu::launch({gx, gy, gz}, {bx, by, bz}, shared, [&] { entry(params); }, pdl != 0) ? 0 : 2;
}
extern "C" __attribute__((visibility("default"))) const char* emu_fault() { return emu::fault.c_str(); }
"#;

impl Library {
    /// Builds (or finds in the cache) the library of `files`: (file name, its entries, the `-D`
    /// options it is compiled with), the sources being `crate::kernels`'.
    pub fn build(files: &[(&str, Vec<String>, Vec<String>)]) -> Result<Library> {
        let cxx = compiler().ok_or_else(|| Error::Backend("cuda emulation: no C++ compiler (c++, g++ or clang++; or set CXX)".into()))?;
        let mut units = vec![("main.cpp".to_string(), MAIN.to_string(), Vec::new())];
        for (name, entries, defines) in files {
            let body = crate::kernels::FILES
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Backend(format!("cuda emulation: no kernel file {name}")))?
                .1;
            let table: String = entries.iter().map(|e| format!("    {{\"{e}\", +[](void** p) {{ emu::call(&{e}, p); }}}},\n")).collect();
            let src = format!(
                "#include \"simt.hpp\"\n#include \"common.cuh\"\n#line 1 \"{name}\"\n{body}\nstatic emu::Register registered{{\n{table}}};\n"
            );
            units.push((format!("{}.cpp", name.trim_end_matches(".cu")), src, defines.clone()));
        }
        let mut key = Sha256::new();
        for part in [SIMT, crate::kernels::COMMON, &cxx] {
            key.update(part.as_bytes());
            key.update([0]);
        }
        for (name, src, defines) in &units {
            for part in [name, src, &defines.join(" ")] {
                key.update(part.as_bytes());
                key.update([0]);
            }
        }
        let key: String = key.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let dir = cache_dir().join(format!("emu-{key}"));
        let lib_path = dir.join("libhighrise_emu.so");
        if !lib_path.is_file() {
            compile(&cxx, &dir, &units, &lib_path)?;
        }
        // SAFETY: a library we just built (or built before from the same sources), with no
        // initializers beyond filling its table of kernels.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| Error::Backend(format!("cuda emulation: loading {}: {e}", lib_path.display())))?;
        // SAFETY: emu_launch has this signature (MAIN above).
        let launch = *unsafe { lib.get::<LaunchFn>(b"emu_launch\0") }
            .map_err(|e| Error::Backend(format!("cuda emulation: {}: {e}", lib_path.display())))?;
        // SAFETY: emu_fault has this signature (MAIN above).
        let fault = *unsafe { lib.get::<unsafe extern "C" fn() -> *const c_char>(b"emu_fault\0") }
            .map_err(|e| Error::Backend(format!("cuda emulation: {}: {e}", lib_path.display())))?;
        Ok(Library { _lib: lib, launch, fault })
    }

    /// Runs kernel `name` over `grid` x `block` with `shared` bytes of dynamic shared memory; `params`
    /// as cuLaunchKernel takes them, device pointers already host addresses. `programmatic`: as a
    /// GPU may run it, a programmatic dependent of the launch before (`crate::kernels::programmatic`):
    /// a thread that never executes `griddepcontrol.wait` is a fault.
    ///
    /// # Safety
    /// Each parameter points at a value of the kernel's parameter type; every pointer among the
    /// values is valid host memory for what the kernel touches.
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        params: &mut [*mut c_void],
        programmatic: bool,
    ) -> Result<()> {
        let c = CString::new(name).map_err(|_| Error::Backend(format!("cuda emulation: kernel name {name:?}")))?;
        let rc = (self.launch)(c.as_ptr(), grid.0, grid.1, grid.2, block.0, block.1, block.2, shared, params.as_mut_ptr(), programmatic as i32);
        match rc {
            0 => Ok(()),
            1 => Err(Error::Backend(format!("cuda emulation: no kernel {name} in the library"))),
            // SAFETY: emu_fault returns a NUL-terminated string owned by the library.
            _ => Err(Error::Backend(format!("cuda emulation: {name}: {}", std::ffi::CStr::from_ptr((self.fault)()).to_string_lossy()))),
        }
    }
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("HIGHRISE_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("HOME").map_or_else(std::env::temp_dir, |h| Path::new(&h).join(".cache/highrise/kernels")),
    }
}

/// Compiles every unit (in parallel) and links them into `out`, in a fresh directory renamed into
/// place, so that a concurrent build never sees half a library.
fn compile(cxx: &str, dir: &Path, units: &[(String, String, Vec<String>)], out: &Path) -> Result<()> {
    let err = |what: String| Error::Backend(format!("cuda emulation: {what}"));
    // A directory of this build's own: other processes, and other threads of this one, may be
    // building the same library at once.
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| err(format!("{}: {e}", tmp.display())))?;
    for (name, text) in [("simt.hpp", SIMT), ("common.cuh", crate::kernels::COMMON)] {
        std::fs::write(tmp.join(name), text).map_err(|e| err(format!("{name}: {e}")))?;
    }
    let objects: Vec<PathBuf> = std::thread::scope(|s| {
        let jobs: Vec<_> = units
            .iter()
            .map(|(name, src, defines)| {
                let tmp = &tmp;
                s.spawn(move || -> Result<PathBuf> {
                    let path = tmp.join(name);
                    std::fs::write(&path, src).map_err(|e| err(format!("{name}: {e}")))?;
                    let obj = path.with_extension("o");
                    let o = Command::new(cxx)
                        .args(["-std=c++20", "-O2", "-fPIC", "-w", "-pthread", "-fvisibility=hidden", "-c", "-o"])
                        .arg(&obj)
                        .arg(&path)
                        .args(defines)
                        .output()
                        .map_err(|e| err(format!("{cxx}: {e}")))?;
                    if !o.status.success() {
                        return Err(err(format!("compiling {name}:\n{}", String::from_utf8_lossy(&o.stderr))));
                    }
                    Ok(obj)
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().map_err(|_| err("a compile job panicked".into()))?).collect::<Result<Vec<_>>>()
    })?;
    let o = Command::new(cxx)
        .args(["-shared", "-pthread", "-o"])
        .arg(tmp.join("libhighrise_emu.so"))
        .args(&objects)
        .output()
        .map_err(|e| err(format!("{cxx}: {e}")))?;
    if !o.status.success() {
        return Err(err(format!("linking:\n{}", String::from_utf8_lossy(&o.stderr))));
    }
    // Another build of the same sources finished first: keep its library (a process may be
    // loading it right now), drop ours.
    if out.is_file() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    if std::fs::rename(&tmp, dir).is_err() && !out.is_file() {
        return Err(err(format!("could not move the library into {}", dir.display())));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

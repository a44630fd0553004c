//! Compiling the kernels at run time with NVRTC, for the device's own architecture, cached on disk.
//!
//! libnvrtc is found as `libs` finds every CUDA library.
//!
//! PTX is cached under `$HIGHRISE_KERNEL_CACHE` (default `~/.cache/highrise/kernels`), keyed by the
//! source's hash, the architecture, the options and NVRTC's version.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};
use highrise_core::{Error, Result};
use sha2::{Digest, Sha256};

/// Makes libnvrtc loadable, or says why it is not.
pub fn ensure_loaded() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| crate::libs::preload("nvrtc", sys::is_culib_present, "cuda_nvrtc"))
        .clone()
        .map_err(|e| Error::Backend(format!("cuda: {e}; install one, e.g. `pip install nvidia-cuda-nvrtc==13.0.*`")))
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Backend(format!("cuda: nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The options every kernel is compiled with, for `arch` (e.g. "sm_90a", "sm_80").
pub fn options(arch: &str) -> Vec<String> {
    let compute = arch.replace("sm_", "compute_");
    vec![format!("--gpu-architecture={compute}"), "--std=c++17".into()]
}

/// Compiles `source` (named `name` in messages) to PTX for `arch` with `extra` options (`-D`s),
/// through the disk cache.
pub fn compile(name: &str, source: &str, arch: &str, extra: &[String]) -> Result<String> {
    let (major, minor) = version()?;
    let mut opts = options(arch);
    opts.extend_from_slice(extra);
    let mut key = Sha256::new();
    for part in [source, arch, &opts.join(" "), &format!("nvrtc {major}.{minor}")] {
        key.update(part.as_bytes());
        key.update([0]);
    }
    let key: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let cached = cache_dir().map(|d| d.join(format!("{}-{arch}-{}.ptx", name.trim_end_matches(".cu"), &key[..16])));
    if let Some(ptx) = cached.as_deref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(ptx);
    }
    let ptx = compile_uncached(name, source, &opts)?;
    if let Some(path) = cached {
        // The cache is an optimization: failing to write it is not an error. Write then rename, so
        // a concurrent reader never sees half a file.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("HIGHRISE_KERNEL_CACHE") {
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/highrise/kernels")),
    }
}

fn compile_uncached(name: &str, source: &str, opts: &[String]) -> Result<String> {
    ensure_loaded()?;
    let err = |what: &str, e: result::NvrtcError| Error::Backend(format!("cuda: {what} {name}: {e:?}"));
    let src = CString::new(source).map_err(|_| Error::Backend(format!("cuda: {name} contains a NUL byte")))?;
    let cname = CString::new(name).expect("file names have no NUL");
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| err("nvrtcCreateProgram", e))?;
    // SAFETY: prog is live until destroyed below; src and cname outlive it.
    let outcome = unsafe { result::compile_program(prog, opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        })
        .unwrap_or_default();
    let ptx = match outcome {
        Ok(()) => unsafe { result::get_ptx(prog) }.map_err(|e| err("nvrtcGetPTX", e)),
        Err(e) => Err(Error::Backend(format!("cuda: compiling {name} with {}: {e:?}\n{log}", opts.join(" ")))),
    };
    unsafe {
        let _ = result::destroy_program(prog);
    }
    let bytes: Vec<u8> = ptx?.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
    String::from_utf8(bytes).map_err(|_| Error::Backend(format!("cuda: NVRTC returned PTX for {name} that is not UTF-8")))
}

/// The options besides `options` that file `name` is compiled with on `arch`: the attention
/// kernels' shapes for attention.cu (`crate::flash`), the matrix-vector kernels' for gemv.cu
/// (`crate::gemv`).
pub fn defines(name: &str, arch: &str) -> Result<Vec<String>> {
    match name {
        "attention.cu" => crate::flash::defines(arch),
        "gemv.cu" => Ok(crate::gemv::gemv_shape(arch)?.defines().to_vec()),
        _ => Ok(Vec::new()),
    }
}

/// Compiles every kernel file for `arch`: (file name, PTX).
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, String)>> {
    crate::kernels::FILES
        .iter()
        .map(|(name, body)| Ok((*name, compile(name, &crate::kernels::source(body), arch, &defines(name, arch)?)?)))
        .collect()
}

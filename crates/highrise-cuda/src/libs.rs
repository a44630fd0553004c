//! Finding the CUDA libraries at run time. cudarc looks for each by name (LD_LIBRARY_PATH, the
//! system's library cache); where that fails, highrise looks in `$HIGHRISE_CUDA_LIBS`, `$CUDA_HOME`
//! or `$CUDA_PATH`, `/usr/local/cuda`, and the NVIDIA PyPI wheels of the local `python3` (the 13.x
//! layout `nvidia/cu13/lib`, the 12.x one `nvidia/<component>/lib`), and loads what it finds by path
//! first, so that cudarc's lookup by name then finds it already in the process. Every probe happens
//! before cudarc touches a library, since cudarc panics on one it cannot load.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Makes `lib` (e.g. "nvrtc", "cublas") loadable by cudarc; `present` is cudarc's probe for it and
/// `component` the 12.x wheel's folder (e.g. "cuda_nvrtc"). The error says where it looked.
pub fn preload(lib: &str, present: unsafe fn() -> bool, component: &str) -> Result<(), String> {
    // SAFETY: cudarc's probe only tries to load the library by its names.
    if unsafe { present() } {
        return Ok(());
    }
    let (prefix, companion) = (format!("lib{lib}.so."), format!("lib{lib}-builtins.so."));
    let load = |path: &PathBuf| {
        // SAFETY: loading a CUDA library runs only its initializers; it stays loaded for the life of
        // the process (forgotten), as cudarc expects of the libraries it uses.
        unsafe { libloading::Library::new(path) }.map(std::mem::forget)
    };
    let mut tried = Vec::new();
    for dir in library_dirs(component) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        let named = |start: &str| -> Vec<&PathBuf> {
            files.iter().filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(start))).collect()
        };
        let candidates = named(&prefix);
        if !candidates.is_empty() {
            // libnvrtc opens its builtins library by name at compile time: load it from the same
            // folder first, so that name is found too.
            for c in named(&companion) {
                let _ = load(c);
            }
        }
        for path in candidates {
            match load(path) {
                // SAFETY: as in the first probe.
                Ok(()) if unsafe { present() } => return Ok(()),
                Ok(()) => tried.push(format!("{} (loaded, but its name is not one cudarc looks for)", path.display())),
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
    }
    Err(format!(
        "lib{lib} not found (looked on the library path, in $HIGHRISE_CUDA_LIBS, $CUDA_HOME, /usr/local/cuda and \
         python3's nvidia wheels{})",
        if tried.is_empty() { String::new() } else { format!("; tried {}", tried.join(", ")) }
    ))
}

/// Where NVIDIA's PyPI wheels live for the local python3, if it has any.
pub fn python_nvidia_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import nvidia; print(list(nvidia.__path__)[0])"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        (out.status.success() && dir.is_dir()).then_some(dir)
    })
    .clone()
}

fn library_dirs(component: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["HIGHRISE_CUDA_LIBS", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let p = PathBuf::from(v);
            dirs.extend([p.join("lib64"), p.join("lib"), p]);
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    if let Some(nv) = python_nvidia_dir() {
        dirs.extend([nv.join("cu13/lib"), nv.join(component).join("lib")]);
    }
    dirs
}

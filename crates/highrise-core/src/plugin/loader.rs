//! The host side of the plugin ABI: find a backend library by name, load it, check its ABI version,
//! and wrap it as a `dyn Backend`. The library stays loaded for as long as the backend or any tensor
//! it made is alive (each holds an `Arc` to it).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libloading::Library;

use super::{EntryFn, ErrOut, VTable, ABI_VERSION, ENTRY_SYMBOL};
use crate::ops::{Op, OpKind};
use crate::{Backend, BackendInfo, DType, Error, Handle, Result};

/// The backends highrise knows by name, listed even when their library is absent.
pub const KNOWN_BACKENDS: [&str; 2] = ["cpu", "cuda"];

/// `libhighrise_<name>.so` (or the platform's equivalent).
pub fn backend_file_name(name: &str) -> String {
    format!("{}highrise_{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Where backend libraries are looked for, in order: each directory in `$HIGHRISE_BACKEND_DIR`, then
/// beside the executable, then the cargo target directory (`$CARGO_TARGET_DIR`, this workspace's
/// `target/`; current profile first). In a cargo target directory `deps/` comes before its parent:
/// cargo always writes a fresh plugin there, while the copy beside the binary is refreshed only by
/// some builds.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("HIGHRISE_BACKEND_DIR") {
        dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // Every cargo build writes a plugin to deps/ first and only some builds copy it up beside
        // the binary, so in a cargo target directory deps/ holds the fresh one: look there first.
        let in_deps = exe_dir.file_name().is_some_and(|n| n == "deps" || n == "examples");
        if in_deps {
            dirs.push(exe_dir.clone());
            dirs.extend(exe_dir.parent().map(Path::to_path_buf));
        } else {
            dirs.push(exe_dir.join("deps"));
            dirs.push(exe_dir);
        }
    }
    let profiles: [&str; 2] =
        if cfg!(debug_assertions) { ["debug", "release"] } else { ["release", "debug"] };
    let mut targets = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(PathBuf::from(t));
    }
    targets.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    for t in targets {
        for p in profiles {
            dirs.push(t.join(p).join("deps"));
            dirs.push(t.join(p));
        }
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    dirs
}

/// The path of backend `name`'s library: the first match in [`search_dirs`].
pub fn find_backend(name: &str) -> Result<PathBuf> {
    let file = backend_file_name(name);
    let dirs = search_dirs();
    dirs.iter().map(|d| d.join(&file)).find(|p| p.is_file()).ok_or_else(|| {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        Error::NotFound {
            name: name.to_string(),
            detail: format!(
                "{file} is not in any of: {} (build it with `cargo build --release -p highrise-{name}`, \
                 or set HIGHRISE_BACKEND_DIR)",
                list.join(", ")
            ),
        }
    })
}

/// Every backend name known or found in the search directories, with its library path if found.
pub fn discover() -> Vec<(String, Option<PathBuf>)> {
    let mut names: Vec<String> = KNOWN_BACKENDS.iter().map(|s| s.to_string()).collect();
    let (prefix, suffix) =
        (format!("{}highrise_", std::env::consts::DLL_PREFIX), std::env::consts::DLL_SUFFIX);
    for dir in search_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_prefix(&prefix).and_then(|f| f.strip_suffix(suffix)) {
                // Cargo's hashed copies (libhighrise_cpu-0123abcd.so) are the same backends.
                if !name.contains('-') && !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    names.into_iter().map(|n| (n.clone(), find_backend(&n).ok())).collect()
}

/// Loads a backend by name (`cpu`) or by the path of its library, and creates it.
pub fn load_backend(name_or_path: &str) -> Result<Arc<dyn Backend>> {
    let looks_like_path = name_or_path.contains(std::path::MAIN_SEPARATOR)
        || name_or_path.contains('/')
        || name_or_path.ends_with(std::env::consts::DLL_SUFFIX);
    let path = if looks_like_path { PathBuf::from(name_or_path) } else { find_backend(name_or_path)? };
    Plugin::open(&path)?.create()
}

/// A loaded backend library whose ABI version matched, not yet instantiated.
pub struct Plugin {
    vtable: &'static VTable,
    name: String,
    path: PathBuf,
    // Last, so it is unloaded after everything above that points into it.
    library: Arc<Library>,
}

impl Plugin {
    /// Loads the library at `path` and checks its entry symbol and ABI version.
    pub fn open(path: &Path) -> Result<Plugin> {
        let fail = |detail: String| Error::Plugin { path: path.to_path_buf(), detail };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        // SAFETY: loading runs the library's initializers; highrise plugins have none beyond Rust's own.
        let library = unsafe { Library::new(path) }.map_err(|e| fail(format!("cannot load: {e}")))?;
        // SAFETY: the symbol's type is fixed by the ABI; its version is checked before anything else.
        let entry: EntryFn = unsafe {
            *library.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()).map_err(|e| {
                fail(format!("missing symbol `{ENTRY_SYMBOL}`; not a highrise backend plugin ({e})"))
            })?
        };
        // SAFETY: a highrise plugin's entry returns a pointer to a static vtable.
        let ptr = unsafe { entry() };
        if ptr.is_null() {
            return Err(fail(format!("`{ENTRY_SYMBOL}` returned no vtable")));
        }
        // Only the first field is read until the version is known to match.
        // SAFETY: every version of the ABI starts its vtable with the u32 version.
        let found = unsafe { std::ptr::read(ptr as *const u32) };
        if found != ABI_VERSION {
            return Err(Error::AbiMismatch { path: path.to_path_buf(), expected: ABI_VERSION, found });
        }
        // SAFETY: same ABI version, so the layout is ours; the vtable is static in the library, which
        // `library` keeps loaded for as long as this reference is reachable.
        let vtable: &'static VTable = unsafe { &*ptr };
        let end = vtable.name.iter().position(|&b| b == 0).unwrap_or(vtable.name.len());
        let name = String::from_utf8_lossy(&vtable.name[..end]).into_owned();
        Ok(Plugin { vtable, name, path: path.to_path_buf(), library: Arc::new(library) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the backend can run on this machine; `Err` carries the reason it cannot.
    pub fn probe(&self) -> Result<()> {
        let mut err = ErrOut::new();
        // SAFETY: vtable from a version-checked library; err is valid and exclusive.
        match unsafe { (self.vtable.probe)(&mut *err) } {
            0 => Ok(()),
            _ => Err(err.to_error()),
        }
    }

    /// Instantiates the backend.
    pub fn create(&self) -> Result<Arc<dyn Backend>> {
        let mut err = ErrOut::new();
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: as in `probe`; ctx is written on success.
        if unsafe { (self.vtable.create)(&mut ctx, &mut *err) } != 0 || ctx.is_null() {
            return Err(err.to_error());
        }
        let mut backend = PluginBackend {
            vtable: self.vtable,
            ctx,
            name: self.name.clone(),
            device: String::new(),
            path: self.path.clone(),
            _library: self.library.clone(),
        };
        // SAFETY: ctx was just created by this vtable.
        if unsafe { (self.vtable.info)(ctx, &mut *err) } == 0 {
            backend.device = err.text();
        }
        Ok(Arc::new(backend))
    }
}

/// A backend living in a plugin library, used through its vtable.
pub struct PluginBackend {
    vtable: &'static VTable,
    ctx: *mut c_void,
    name: String,
    device: String,
    path: PathBuf,
    _library: Arc<Library>,
}

// SAFETY: plugins implement `Backend: Send + Sync`; the context is that backend.
unsafe impl Send for PluginBackend {}
unsafe impl Sync for PluginBackend {}

impl PluginBackend {
    /// The library this backend was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call(&self, f: impl FnOnce(*mut ErrOut) -> u32) -> Result<()> {
        let mut err = ErrOut::new();
        match f(&mut *err) {
            0 => Ok(()),
            _ => Err(err.to_error()),
        }
    }
}

impl Drop for PluginBackend {
    fn drop(&mut self) {
        // SAFETY: ctx came from this vtable's create; every tensor holding this backend is gone.
        unsafe { (self.vtable.destroy)(self.ctx) }
    }
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { name: self.name.clone(), device: self.device.clone() }
    }

    fn supports(&self, op: OpKind, dtype: DType) -> bool {
        // SAFETY: valid ctx; plain integers cross.
        unsafe { (self.vtable.supports)(self.ctx, op as u32, dtype as u32) != 0 }
    }

    fn alloc(&self, bytes: usize) -> Result<Handle> {
        let mut h = Handle::NULL;
        // SAFETY: valid ctx, h and err pointers.
        self.call(|err| unsafe { (self.vtable.alloc)(self.ctx, bytes, &mut h, err) })?;
        Ok(h)
    }

    unsafe fn free(&self, handle: Handle) {
        (self.vtable.free)(self.ctx, handle)
    }

    unsafe fn import(&self, ptr: *const u8, bytes: usize) -> Result<Option<Handle>> {
        let mut h = Handle::NULL;
        self.call(|err| (self.vtable.import)(self.ctx, ptr, bytes, &mut h, err))?;
        Ok((!h.is_null()).then_some(h))
    }

    fn write(&self, handle: Handle, offset: usize, bytes: &[u8]) -> Result<()> {
        // SAFETY: the slice is valid for its length during the call.
        self.call(|err| unsafe {
            (self.vtable.write)(self.ctx, handle, offset, bytes.as_ptr(), bytes.len(), err)
        })
    }

    fn read(&self, handle: Handle, offset: usize, out: &mut [u8]) -> Result<()> {
        // SAFETY: the slice is valid and exclusive for its length during the call.
        self.call(|err| unsafe {
            (self.vtable.read)(self.ctx, handle, offset, out.as_mut_ptr(), out.len(), err)
        })
    }

    fn run(&self, op: &Op<'_>) -> Result<()> {
        // SAFETY: the op and everything it borrows outlive the call.
        self.call(|err| unsafe { (self.vtable.run)(self.ctx, op, err) })
    }

    fn copy(&self, dst: Handle, dst_offset: usize, src: Handle, src_offset: usize, bytes: usize) -> Result<()> {
        // SAFETY: valid ctx and err; the handles are checked by the plugin.
        self.call(|err| unsafe { (self.vtable.copy)(self.ctx, dst, dst_offset, src, src_offset, bytes, err) })
    }

    fn synchronize(&self) -> Result<()> {
        // SAFETY: valid ctx and err.
        self.call(|err| unsafe { (self.vtable.synchronize)(self.ctx, err) })
    }

    fn graph_begin(&self, key: u64) -> Result<()> {
        // SAFETY: valid ctx and err; a plain integer crosses.
        self.call(|err| unsafe { (self.vtable.graph_begin)(self.ctx, key, err) })
    }

    fn graph_end(&self) -> Result<()> {
        // SAFETY: valid ctx and err.
        self.call(|err| unsafe { (self.vtable.graph_end)(self.ctx, err) })
    }

    fn folds_norms(&self, rows: usize, hidden: usize, dtype: DType) -> bool {
        // SAFETY: valid ctx; plain integers cross.
        unsafe { (self.vtable.folds_norms)(self.ctx, rows, hidden, dtype as u32) != 0 }
    }

    fn graph_batch(&self, sequences: usize) -> usize {
        // SAFETY: valid ctx; plain integers cross.
        unsafe { (self.vtable.graph_batch)(self.ctx, sequences) }
    }

    fn graph_stats(&self) -> crate::GraphStats {
        let mut stats = crate::GraphStats::default();
        // SAFETY: valid ctx; `stats` is a repr(C) value the plugin writes.
        unsafe { (self.vtable.graph_stats)(self.ctx, &mut stats) };
        stats
    }
}

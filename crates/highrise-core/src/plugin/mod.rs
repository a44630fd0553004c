//! The plugin ABI: how a backend built as a shared library talks to the host.
//!
//! A plugin exports one symbol, [`ENTRY_SYMBOL`], returning a pointer to a static [`VTable`] of
//! `extern "C"` functions whose first field is [`ABI_VERSION`]. The loader reads that field before
//! anything else and refuses a library whose version differs. Arguments cross as `#[repr(C)]` types
//! from this crate (`Op`, `TensorRef`, `Handle`); errors cross as a code and a message written into a
//! host-owned [`ErrOut`]; panics are caught on the plugin side and returned as errors.
//!
//! - [`export`]: the plugin side: builds the vtable for any [`Exportable`] backend.
//! - [`loader`]: the host side: finds and loads a library and wraps it as a `dyn Backend`.

pub mod export;
pub mod loader;

use std::ffi::c_void;

use crate::ops::Op;
use crate::{Error, Handle};

pub use export::Exportable;
pub use loader::{
    backend_file_name, discover, find_backend, load_backend, search_dirs, Plugin, PluginBackend,
};

/// Bumped on any change to the vtable or to a type that crosses it (`Op` and the op structs,
/// `TensorRef`, `DType`, `ErrOut`), or to what an op means (4: the KV cache's layout; 5: `Sample`;
/// 6: `Attention::causal`; 7: `copy`; 8: `graph_begin`, `graph_end`, `graph_stats`, `SwiGluLinear`;
/// 9: `Scores` (soft-capping, sliding window), `Embedding::scale`, `SwiGlu::act`, `Softcap`,
/// `RopeScaling::Factors`; 10: `Linear::accumulate`, the norms of `QkvLinear` and `SwiGluLinear`;
/// 11: `folds_norms`, `graph_batch`; 12: `RopeConfig::rotary_dims`; 13: `IndexAdd`;
/// 14: `LayerNorm`, `GluAct::GeluErf`, `SwiGlu` without `up`; 15: `GluAct::Relu`, `Moe`;
/// 16: `GluAct::Relu2`; 17: `Scores::alibi`).
pub const ABI_VERSION: u32 = 17;

/// The one symbol a plugin exports: `extern "C" fn() -> *const VTable`.
pub const ENTRY_SYMBOL: &str = "highrise_backend_entry";

pub type EntryFn = unsafe extern "C" fn() -> *const VTable;

/// Room for an error message crossing the ABI; longer ones are cut at a character boundary.
pub const ERR_CAPACITY: usize = 2048;

/// An error (or, for `probe` and `info`, a text) written by the plugin into memory the host owns.
#[repr(C)]
pub struct ErrOut {
    pub code: u32,
    pub len: u32,
    pub msg: [u8; ERR_CAPACITY],
}

impl ErrOut {
    pub fn new() -> Box<ErrOut> {
        Box::new(ErrOut { code: 0, len: 0, msg: [0; ERR_CAPACITY] })
    }

    pub fn set(&mut self, code: u32, text: &str) {
        let mut n = text.len().min(ERR_CAPACITY);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.msg[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.len = n as u32;
        self.code = code;
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.msg[..(self.len as usize).min(ERR_CAPACITY)]).into_owned()
    }

    pub fn to_error(&self) -> Error {
        Error::from_code(self.code, self.text())
    }
}

/// Status returned by the fallible vtable functions: 0 is success, anything else an `ErrorCode` whose
/// message is in the `ErrOut`.
pub type Status = u32;

/// The table of functions a plugin exports. `abi_version` must stay the first field.
#[repr(C)]
pub struct VTable {
    pub abi_version: u32,
    /// The backend's short name, NUL-padded.
    pub name: [u8; 32],
    /// Whether the backend can run on this machine, without creating it; on failure the `ErrOut`
    /// holds the reason (e.g. "no CUDA driver found").
    pub probe: unsafe extern "C" fn(err: *mut ErrOut) -> Status,
    pub create: unsafe extern "C" fn(ctx: *mut *mut c_void, err: *mut ErrOut) -> Status,
    pub destroy: unsafe extern "C" fn(ctx: *mut c_void),
    /// Writes the device description into the `ErrOut`'s text.
    pub info: unsafe extern "C" fn(ctx: *mut c_void, out: *mut ErrOut) -> Status,
    pub supports: unsafe extern "C" fn(ctx: *mut c_void, op: u32, dtype: u32) -> u32,
    pub alloc:
        unsafe extern "C" fn(ctx: *mut c_void, bytes: usize, out: *mut Handle, err: *mut ErrOut) -> Status,
    pub free: unsafe extern "C" fn(ctx: *mut c_void, handle: Handle),
    /// Wraps host memory as a read-only tensor; writes a null handle when the backend cannot.
    pub import: unsafe extern "C" fn(
        ctx: *mut c_void,
        ptr: *const u8,
        bytes: usize,
        out: *mut Handle,
        err: *mut ErrOut,
    ) -> Status,
    pub write: unsafe extern "C" fn(
        ctx: *mut c_void,
        handle: Handle,
        offset: usize,
        src: *const u8,
        len: usize,
        err: *mut ErrOut,
    ) -> Status,
    pub read: unsafe extern "C" fn(
        ctx: *mut c_void,
        handle: Handle,
        offset: usize,
        dst: *mut u8,
        len: usize,
        err: *mut ErrOut,
    ) -> Status,
    pub run: unsafe extern "C" fn(ctx: *mut c_void, op: *const Op<'_>, err: *mut ErrOut) -> Status,
    /// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset`, in backend memory.
    pub copy: unsafe extern "C" fn(
        ctx: *mut c_void,
        dst: Handle,
        dst_offset: usize,
        src: Handle,
        src_offset: usize,
        len: usize,
        err: *mut ErrOut,
    ) -> Status,
    pub synchronize: unsafe extern "C" fn(ctx: *mut c_void, err: *mut ErrOut) -> Status,
    pub graph_begin: unsafe extern "C" fn(ctx: *mut c_void, key: u64, err: *mut ErrOut) -> Status,
    pub graph_end: unsafe extern "C" fn(ctx: *mut c_void, err: *mut ErrOut) -> Status,
    pub graph_stats: unsafe extern "C" fn(ctx: *mut c_void, out: *mut crate::GraphStats),
    /// `Backend::folds_norms`: 1 for yes (a dtype code the host does not know: 0).
    pub folds_norms: unsafe extern "C" fn(ctx: *mut c_void, rows: usize, hidden: usize, dtype: u32) -> u32,
    /// `Backend::graph_batch`.
    pub graph_batch: unsafe extern "C" fn(ctx: *mut c_void, sequences: usize) -> usize,
}

/// Exports `$backend` (an [`Exportable`] type) as this library's plugin entry point.
/// Invoke it once, in the crate built as the `cdylib`.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        /// The plugin entry point: returns this library's backend vtable.
        #[no_mangle]
        pub extern "C" fn highrise_backend_entry() -> *const $crate::plugin::VTable {
            $crate::plugin::export::vtable::<$backend>()
        }
    };
}

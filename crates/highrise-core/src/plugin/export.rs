//! The plugin side of the ABI: `vtable::<B>()` builds the function table for a backend type, each
//! function a thin `extern "C"` shim that catches panics and turns `Result`s into status codes.

use std::any::Any;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{ErrOut, Status, VTable, ABI_VERSION};
use crate::error::ErrorCode;
use crate::ops::{Op, OpKind};
use crate::{Backend, DType, Error, Handle, Result};

/// A backend that can be exported as a plugin.
pub trait Exportable: Backend + Sized + 'static {
    /// Short name, at most 31 bytes: "cpu", "cuda".
    const NAME: &'static str;

    /// Whether the backend can run here; `Err` says why not. Must not create anything costly.
    fn probe() -> Result<()>;

    fn create() -> Result<Self>;
}

/// The vtable for `B`, a `'static` constant.
pub fn vtable<B: Exportable>() -> *const VTable {
    &Table::<B>::VTABLE
}

struct Table<B>(PhantomData<B>);

impl<B: Exportable> Table<B> {
    const VTABLE: VTable = VTable {
        abi_version: ABI_VERSION,
        name: name_bytes(B::NAME),
        probe: probe::<B>,
        create: create::<B>,
        destroy: destroy::<B>,
        info: info::<B>,
        supports: supports::<B>,
        alloc: alloc::<B>,
        free: free::<B>,
        import: import::<B>,
        write: write::<B>,
        read: read::<B>,
        run: run::<B>,
        copy: copy::<B>,
        synchronize: synchronize::<B>,
        graph_begin: graph_begin::<B>,
        graph_end: graph_end::<B>,
        graph_stats: graph_stats::<B>,
        folds_norms: folds_norms::<B>,
        graph_batch: graph_batch::<B>,
    };
}

const fn name_bytes(name: &str) -> [u8; 32] {
    let b = name.as_bytes();
    assert!(b.len() < 32, "backend name longer than 31 bytes");
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < b.len() {
        out[i] = b[i];
        i += 1;
    }
    out
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_string()
    }
}

/// Runs `f`, catching any panic; an error or panic is written to `err` and its code returned.
fn guard<B: Exportable>(err: *mut ErrOut, what: &str, f: impl FnOnce() -> Result<()>) -> Status {
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(Error::Panic(format!(
            "the {} backend panicked in {what}: {}",
            B::NAME,
            panic_text(payload.as_ref())
        )))
    });
    match result {
        Ok(()) => ErrorCode::Ok as Status,
        Err(e) => {
            // SAFETY: the host passes a valid, exclusive ErrOut to every fallible call.
            if let Some(out) = unsafe { err.as_mut() } {
                out.set(e.code() as u32, &e.to_string());
            }
            e.code() as Status
        }
    }
}

/// # Safety (for all shims below)
/// `ctx` is a pointer made by `create::<B>` and not yet destroyed; the other pointers are valid for
/// the lengths given, as the host's `PluginBackend` guarantees.
unsafe fn backend<'a, B>(ctx: *mut c_void) -> &'a B {
    &*(ctx as *const B)
}

unsafe extern "C" fn probe<B: Exportable>(err: *mut ErrOut) -> Status {
    guard::<B>(err, "probe", B::probe)
}

unsafe extern "C" fn create<B: Exportable>(ctx: *mut *mut c_void, err: *mut ErrOut) -> Status {
    guard::<B>(err, "create", || {
        let b = Box::new(B::create()?);
        *ctx = Box::into_raw(b) as *mut c_void;
        Ok(())
    })
}

unsafe extern "C" fn destroy<B: Exportable>(ctx: *mut c_void) {
    // A panic in a destructor has nowhere to go; catch it and drop it rather than unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(ctx as *mut B))));
}

unsafe extern "C" fn info<B: Exportable>(ctx: *mut c_void, out: *mut ErrOut) -> Status {
    let mut text = String::new();
    let status = guard::<B>(out, "info", || {
        text = backend::<B>(ctx).info().device;
        Ok(())
    });
    if status == 0 {
        if let Some(o) = out.as_mut() {
            o.set(0, &text);
        }
    }
    status
}

unsafe extern "C" fn supports<B: Exportable>(ctx: *mut c_void, op: u32, dtype: u32) -> u32 {
    let (Some(op), Some(dtype)) = (OpKind::from_u32(op), DType::from_u32(dtype)) else {
        return 0;
    };
    catch_unwind(AssertUnwindSafe(|| backend::<B>(ctx).supports(op, dtype))).unwrap_or(false) as u32
}

unsafe extern "C" fn alloc<B: Exportable>(
    ctx: *mut c_void,
    bytes: usize,
    out: *mut Handle,
    err: *mut ErrOut,
) -> Status {
    guard::<B>(err, "alloc", || {
        *out = backend::<B>(ctx).alloc(bytes)?;
        Ok(())
    })
}

unsafe extern "C" fn free<B: Exportable>(ctx: *mut c_void, handle: Handle) {
    let _ = catch_unwind(AssertUnwindSafe(|| backend::<B>(ctx).free(handle)));
}

unsafe extern "C" fn import<B: Exportable>(
    ctx: *mut c_void,
    ptr: *const u8,
    bytes: usize,
    out: *mut Handle,
    err: *mut ErrOut,
) -> Status {
    guard::<B>(err, "import", || {
        *out = backend::<B>(ctx).import(ptr, bytes)?.unwrap_or(Handle::NULL);
        Ok(())
    })
}

unsafe extern "C" fn write<B: Exportable>(
    ctx: *mut c_void,
    handle: Handle,
    offset: usize,
    src: *const u8,
    len: usize,
    err: *mut ErrOut,
) -> Status {
    guard::<B>(err, "write", || {
        let bytes = if len == 0 { &[][..] } else { std::slice::from_raw_parts(src, len) };
        backend::<B>(ctx).write(handle, offset, bytes)
    })
}

unsafe extern "C" fn read<B: Exportable>(
    ctx: *mut c_void,
    handle: Handle,
    offset: usize,
    dst: *mut u8,
    len: usize,
    err: *mut ErrOut,
) -> Status {
    guard::<B>(err, "read", || {
        let out = if len == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(dst, len) };
        backend::<B>(ctx).read(handle, offset, out)
    })
}

unsafe extern "C" fn run<B: Exportable>(ctx: *mut c_void, op: *const Op<'_>, err: *mut ErrOut) -> Status {
    let op = &*op;
    guard::<B>(err, op.kind().name(), || backend::<B>(ctx).run(op))
}

unsafe extern "C" fn copy<B: Exportable>(
    ctx: *mut c_void,
    dst: Handle,
    dst_offset: usize,
    src: Handle,
    src_offset: usize,
    len: usize,
    err: *mut ErrOut,
) -> Status {
    guard::<B>(err, "copy", || backend::<B>(ctx).copy(dst, dst_offset, src, src_offset, len))
}

unsafe extern "C" fn synchronize<B: Exportable>(ctx: *mut c_void, err: *mut ErrOut) -> Status {
    guard::<B>(err, "synchronize", || backend::<B>(ctx).synchronize())
}

unsafe extern "C" fn graph_begin<B: Exportable>(ctx: *mut c_void, key: u64, err: *mut ErrOut) -> Status {
    guard::<B>(err, "graph_begin", || backend::<B>(ctx).graph_begin(key))
}

unsafe extern "C" fn graph_end<B: Exportable>(ctx: *mut c_void, err: *mut ErrOut) -> Status {
    guard::<B>(err, "graph_end", || backend::<B>(ctx).graph_end())
}

unsafe extern "C" fn folds_norms<B: Exportable>(ctx: *mut c_void, rows: usize, hidden: usize, dtype: u32) -> u32 {
    let Some(dtype) = DType::from_u32(dtype) else { return 0 };
    // A panic says no: the unfolded layer is the same op meanings.
    catch_unwind(AssertUnwindSafe(|| backend::<B>(ctx).folds_norms(rows, hidden, dtype))).unwrap_or(false) as u32
}

unsafe extern "C" fn graph_batch<B: Exportable>(ctx: *mut c_void, sequences: usize) -> usize {
    // A panic, or an answer below `sequences`, pads nothing.
    catch_unwind(AssertUnwindSafe(|| backend::<B>(ctx).graph_batch(sequences))).map_or(sequences, |n| n.max(sequences))
}

unsafe extern "C" fn graph_stats<B: Exportable>(ctx: *mut c_void, out: *mut crate::GraphStats) {
    // A panic here leaves the zeros written first: stats are never worth aborting over.
    out.write(crate::GraphStats::default());
    if let Ok(stats) = catch_unwind(AssertUnwindSafe(|| backend::<B>(ctx).graph_stats())) {
        out.write(stats);
    }
}

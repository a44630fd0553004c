//! The CPU backend's memory: 64-byte-aligned host allocations behind opaque handles. A handle points
//! to a `Storage` header that records its owner, so a handle from another backend, or a tensor too
//! large for its allocation, is an error and never an out-of-bounds access.

use std::alloc::{alloc, dealloc, Layout};

use highrise_core::tensor::HandleHeader;
use highrise_core::{Error, Handle, Result, TensorRef};

const MAGIC: u64 = 0x6869_6768_7269_7365; // "highrise"
const ALIGN: usize = 64;

#[repr(C)]
pub struct Storage {
    header: HandleHeader,
    ptr: *mut u8,
    bytes: usize,
    /// Host memory wrapped by `import` (a mapped file): read-only, and not ours to free.
    imported: bool,
}

impl Storage {
    pub fn alloc(owner: usize, bytes: usize) -> Result<Handle> {
        let layout = Layout::from_size_align(bytes.max(ALIGN), ALIGN)
            .map_err(|_| Error::OutOfMemory(format!("cpu: cannot allocate {bytes} bytes")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory(format!("cpu: allocation of {bytes} bytes failed")));
        }
        let s = Box::new(Storage { header: HandleHeader { magic: MAGIC, owner }, ptr, bytes, imported: false });
        Ok(Handle(Box::into_raw(s) as *mut _))
    }

    /// Wraps host memory without copying. Only memory aligned for every float type is taken.
    pub fn import(owner: usize, ptr: *const u8, bytes: usize) -> Option<Handle> {
        if ptr.is_null() || ptr as usize % 4 != 0 {
            return None;
        }
        let s = Box::new(Storage { header: HandleHeader { magic: MAGIC, owner }, ptr: ptr as *mut u8, bytes, imported: true });
        Some(Handle(Box::into_raw(s) as *mut _))
    }

    /// # Safety
    /// `h` came from `alloc` by the same owner and is not used afterwards.
    pub unsafe fn free(owner: usize, h: Handle) {
        if let Ok(s) = Storage::get(owner, h) {
            let s = s as *const Storage as *mut Storage;
            (*s).header.retire();
            let b = Box::from_raw(s);
            if !b.imported {
                dealloc(b.ptr, Layout::from_size_align_unchecked(b.bytes.max(ALIGN), ALIGN));
            }
        }
    }

    /// The storage behind a handle, if it is a live one of this owner's.
    pub fn get<'a>(owner: usize, h: Handle) -> Result<&'a Storage> {
        // SAFETY: Storage is repr(C) and starts with its HandleHeader.
        unsafe { h.owned(MAGIC, owner, "cpu") }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Refuses writes into imported (read-only) host memory.
    pub fn writable(&self) -> Result<&Self> {
        if self.imported {
            return Err(Error::Invalid("cpu: the tensor wraps read-only host memory (a mapped file)".into()));
        }
        Ok(self)
    }

    /// The byte range `[offset, offset + len)`, checked.
    pub fn range(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(unsafe { self.ptr.add(offset) }),
            _ => Err(Error::Invalid(format!(
                "cpu: bytes {offset}..{} are outside an allocation of {}",
                offset.saturating_add(len),
                self.bytes
            ))),
        }
    }
}

/// Typed access to the tensors of one op call, after checking each handle and size.
pub struct Tensors<'a> {
    pub owner: usize,
    /// The threads an op may spread over.
    pub team: &'a crate::team::Team,
}

impl Tensors<'_> {
    fn checked(&self, name: &str, t: &TensorRef, write: bool) -> Result<(*mut u8, usize)> {
        let s = Storage::get(self.owner, t.handle)
            .and_then(|s| if write { s.writable() } else { Ok(s) })
            .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        let bytes = t.dtype.storage_bytes(t.numel()).ok_or_else(|| {
            Error::Invalid(format!("{name}: {}{} is not a whole number of blocks", t.dtype, t.shape))
        })?;
        if bytes > s.bytes() {
            return Err(Error::Invalid(format!(
                "{name}: {}{} needs {bytes} bytes but its allocation has {}",
                t.dtype,
                t.shape,
                s.bytes()
            )));
        }
        Ok((s.ptr, bytes))
    }

    /// The elements of `t` as `&[E]`; the caller has matched `E` to `t.dtype`.
    pub fn slice<'a, E: bytemuck::Pod>(&self, name: &str, t: &TensorRef) -> Result<&'a [E]> {
        let (ptr, bytes) = self.checked(name, t, false)?;
        // SAFETY: in bounds (checked); aligned (allocations to 64 bytes, imports to 4, and E is at
        // most 4-byte aligned); E is plain-old-data.
        Ok(unsafe { std::slice::from_raw_parts(ptr as *const E, bytes / std::mem::size_of::<E>()) })
    }

    /// The elements of `t` for writing.
    ///
    /// # Safety
    /// No other live slice of the call covers `t`'s memory; `Op::validate` refuses outputs that alias
    /// inputs, and the host holds the output tensors mutably.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a, E: bytemuck::Pod>(&self, name: &str, t: &TensorRef) -> Result<&'a mut [E]> {
        let (ptr, bytes) = self.checked(name, t, true)?;
        Ok(std::slice::from_raw_parts_mut(ptr as *mut E, bytes / std::mem::size_of::<E>()))
    }
}

//! Tensors as the host sees them. A backend owns the memory; the host holds an opaque [`Handle`] to it.
//! [`Tensor`] owns one (freed on drop, keeping its backend, and so its plugin library, alive);
//! [`TensorRef`] is the borrowed, `#[repr(C)]` form that ops take and that crosses the plugin ABI.

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use half::{bf16, f16};

use crate::{Backend, DType, Error, Result};

/// Most dimensions a tensor may have (the paged KV cache needs four: blocks, block slots, heads, dims).
pub const MAX_DIMS: usize = 4;

/// A contiguous row-major shape of up to [`MAX_DIMS`] dimensions.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    ndim: u32,
    dims: [usize; MAX_DIMS],
}

impl Shape {
    pub fn new(dims: &[usize]) -> Result<Shape> {
        if dims.len() > MAX_DIMS {
            return Err(Error::Invalid(format!(
                "shape {dims:?} has {} dimensions; at most {MAX_DIMS} are supported",
                dims.len()
            )));
        }
        let mut d = [0; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Ok(Shape { ndim: dims.len() as u32, dims: d })
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims[..(self.ndim as usize).min(MAX_DIMS)]
    }

    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    /// Number of elements; `None` on overflow.
    pub fn numel(&self) -> Option<usize> {
        self.dims().iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// The last dimension (the length of one row), 1 for a scalar.
    pub fn row_len(&self) -> usize {
        self.dims().last().copied().unwrap_or(1)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

/// An opaque pointer to memory a backend owns. Only the backend that made it may look inside.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle(pub *mut c_void);

// SAFETY: a handle is an identifier, never dereferenced by its holder; the backend behind it is
// Send + Sync and guards its own memory.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    pub const NULL: Handle = Handle(std::ptr::null_mut());

    pub fn is_null(self) -> bool {
        self.0.is_null()
    }

    /// The `T` behind this handle, if it is a live one made by backend instance `owner` of the kind
    /// whose allocations carry `magic`; `backend` names the kind in the error. Every backend checks
    /// handles this way before it reads anything else behind them.
    ///
    /// # Safety
    /// `T` is `#[repr(C)]` and starts with a [`HandleHeader`], as every backend's allocation does, so
    /// any handle that reached a backend points to at least a header's worth of live memory.
    pub unsafe fn owned<'a, T>(self, magic: u64, owner: usize, backend: &str) -> crate::Result<&'a T> {
        if self.is_null() {
            return Err(crate::Error::Invalid(format!("{backend}: null tensor handle")));
        }
        let header = &*(self.0 as *const HandleHeader);
        if header.magic != magic || header.owner != owner {
            return Err(crate::Error::Invalid(format!(
                "{backend}: tensor handle does not belong to this {backend} backend (freed, or from another backend)"
            )));
        }
        Ok(&*(self.0 as *const T))
    }
}

/// What every backend's allocation behind a [`Handle`] starts with: its kind's magic (zeroed when
/// freed) and the backend instance that made it.
#[repr(C)]
#[derive(Debug)]
pub struct HandleHeader {
    pub magic: u64,
    pub owner: usize,
}

impl HandleHeader {
    /// Marks the allocation freed: its handle is refused from now on.
    pub fn retire(&mut self) {
        self.magic = 0;
    }
}

/// A borrowed tensor: handle, dtype, shape. Ops take these; they cross the plugin ABI as they are.
/// A null handle stands for an absent optional input (e.g. a linear layer without bias).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub handle: Handle,
    pub dtype: DType,
    pub shape: Shape,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> TensorRef<'a> {
    /// A reference to a tensor that lives in a backend's memory. The backend checks that the handle is
    /// its own and that the shape fits the allocation before it reads or writes.
    pub fn from_raw(handle: Handle, dtype: DType, shape: Shape) -> TensorRef<'a> {
        TensorRef { handle, dtype, shape, _borrow: PhantomData }
    }

    /// The absent optional tensor.
    pub fn none() -> TensorRef<'a> {
        TensorRef::from_raw(Handle::NULL, DType::F32, Shape { ndim: 0, dims: [0; MAX_DIMS] })
    }

    pub fn is_none(&self) -> bool {
        self.handle.is_null()
    }

    pub fn opt(self) -> Option<TensorRef<'a>> {
        (!self.is_none()).then_some(self)
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel().unwrap_or(usize::MAX)
    }
}

impl fmt::Debug for TensorRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// A slice of host values passed to an op (token ids, positions, block tables); `#[repr(C)]` so it
/// crosses the plugin ABI.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HostSlice<'a, T> {
    ptr: *const T,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

// SAFETY: a HostSlice is a `&'a [T]` in C layout, and shares its thread-safety.
unsafe impl<T: Sync> Send for HostSlice<'_, T> {}
unsafe impl<T: Sync> Sync for HostSlice<'_, T> {}

impl<'a, T> HostSlice<'a, T> {
    pub fn new(s: &'a [T]) -> Self {
        HostSlice { ptr: s.as_ptr(), len: s.len(), _borrow: PhantomData }
    }

    pub fn as_slice(&self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: built from a `&'a [T]` in `new`, so pointer and length are valid for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, T> From<&'a [T]> for HostSlice<'a, T> {
    fn from(s: &'a [T]) -> Self {
        HostSlice::new(s)
    }
}

/// A host scalar type that tensors can be filled from and read back into.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// An owned tensor in a backend's memory. Dropping it frees the memory; it holds its backend alive.
pub struct Tensor {
    handle: Handle,
    dtype: DType,
    shape: Shape,
    backend: Arc<dyn Backend>,
    /// For a tensor imported from host memory: whatever keeps that memory alive (a file mapping).
    _host: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Tensor {
    /// Allocates an uninitialized tensor.
    pub fn empty(backend: &Arc<dyn Backend>, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims)?;
        let bytes = storage_bytes(dtype, &shape)?;
        let handle = backend.alloc(bytes)?;
        Ok(Tensor { handle, dtype, shape, backend: backend.clone(), _host: None })
    }

    /// A tensor holding `bytes` exactly as the backend stores `dtype` (little-endian, GGUF block layout).
    pub fn from_bytes(
        backend: &Arc<dyn Backend>,
        dtype: DType,
        dims: &[usize],
        bytes: &[u8],
    ) -> Result<Tensor> {
        let t = Tensor::empty(backend, dtype, dims)?;
        if bytes.len() != t.size_bytes() {
            return Err(Error::Invalid(format!(
                "tensor {dtype}{dims:?} needs {} bytes, got {}",
                t.size_bytes(),
                bytes.len()
            )));
        }
        backend.write(t.handle, 0, bytes)?;
        Ok(t)
    }

    /// A read-only tensor over host memory that `owner` keeps alive (a memory-mapped file), without a
    /// copy where the backend can read host memory in place, else copied into the backend.
    pub fn from_host(
        backend: &Arc<dyn Backend>,
        dtype: DType,
        dims: &[usize],
        bytes: &[u8],
        owner: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Tensor> {
        let shape = Shape::new(dims)?;
        let need = storage_bytes(dtype, &shape)?;
        if bytes.len() != need {
            return Err(Error::Invalid(format!("tensor {dtype}{dims:?} needs {need} bytes, got {}", bytes.len())));
        }
        // SAFETY: `owner` keeps `bytes` alive and unchanged for as long as the tensor (which holds it).
        match unsafe { backend.import(bytes.as_ptr(), bytes.len()) }? {
            Some(handle) => Ok(Tensor { handle, dtype, shape, backend: backend.clone(), _host: Some(owner) }),
            None => Tensor::from_bytes(backend, dtype, dims, bytes),
        }
    }

    /// A float tensor of `dtype` holding `values` (converted from f32).
    pub fn from_f32(
        backend: &Arc<dyn Backend>,
        dtype: DType,
        dims: &[usize],
        values: &[f32],
    ) -> Result<Tensor> {
        let bytes = encode(dtype, values, "Tensor::from_f32")?;
        Tensor::from_bytes(backend, dtype, dims, &bytes)
    }

    /// A tensor with every element set to `value`.
    pub fn full(backend: &Arc<dyn Backend>, dtype: DType, dims: &[usize], value: f32) -> Result<Tensor> {
        let n = Shape::new(dims)?.numel().unwrap_or(0);
        Tensor::from_f32(backend, dtype, dims, &vec![value; n])
    }

    /// The raw bytes of the tensor.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.size_bytes()];
        self.backend.read(self.handle, 0, &mut out)?;
        Ok(out)
    }

    /// The values of a float tensor, converted to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F32 {
            // Read straight into the result: one copy, not two (captures and logits are large).
            let mut out = vec![0f32; self.numel()];
            // SAFETY: the byte view covers exactly `out`'s initialized memory, and every bit pattern
            // the backend writes is a valid f32.
            let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4) };
            self.backend.read(self.handle, 0, bytes)?;
            return Ok(out);
        }
        let bytes = self.to_bytes()?;
        Ok(match self.dtype {
            DType::F32 => from_bytes::<f32>(&bytes),
            DType::F16 => from_bytes::<f16>(&bytes),
            DType::BF16 => from_bytes::<bf16>(&bytes),
            DType::U32 => bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect(),
            q => {
                return Err(Error::Invalid(format!(
                    "Tensor::to_f32: {q} is quantized; read its blocks with Tensor::to_bytes"
                )))
            }
        })
    }

    /// Elements `start..start + len` of a float tensor (in row-major order), converted to f32.
    pub fn to_f32_range(&self, start: usize, len: usize) -> Result<Vec<f32>> {
        let size = match self.dtype {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            q => return Err(Error::Invalid(format!("Tensor::to_f32_range: {q} is quantized"))),
        };
        if start.checked_add(len).is_none_or(|end| end > self.numel()) {
            return Err(Error::Invalid(format!(
                "Tensor::to_f32_range: elements {start}..{} of {}{}",
                start.saturating_add(len),
                self.dtype,
                self.shape
            )));
        }
        let mut bytes = vec![0u8; len * size];
        self.backend.read(self.handle, start * size, &mut bytes)?;
        Ok(match self.dtype {
            DType::F32 => from_bytes::<f32>(&bytes),
            DType::F16 => from_bytes::<f16>(&bytes),
            _ => from_bytes::<bf16>(&bytes),
        })
    }

    /// Overwrites a float tensor with `values` (converted from f32).
    pub fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::Invalid(format!(
                "Tensor::write_f32: {} values for {}{}",
                values.len(),
                self.dtype,
                self.shape
            )));
        }
        let bytes = encode(self.dtype, values, "Tensor::write_f32")?;
        self.backend.write(self.handle, 0, &bytes)
    }

    /// Copies `src`'s bytes over this tensor's, in the backend's memory (`Backend::copy`): both on
    /// one backend, of one size in bytes.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        self.copy_from_at(0, src)
    }

    /// Copies all of `src` over this tensor's elements from `at` on, in the backend's memory: both
    /// on one backend, in one unquantized dtype (`at` 0 and equal sizes: any dtype).
    pub fn copy_from_at(&mut self, at: usize, src: &Tensor) -> Result<()> {
        if !Arc::ptr_eq(&self.backend, &src.backend) {
            return Err(Error::Invalid("Tensor::copy_from: the tensors live on different backends".into()));
        }
        if at > 0 || src.numel() != self.numel() {
            if self.dtype.block_len() != 1 {
                return Err(Error::Invalid(format!("Tensor::copy_from_at: {} is quantized", self.dtype)));
            }
            let size = self.dtype.block_bytes();
            if src.dtype != self.dtype || at.checked_add(src.numel()).is_none_or(|end| end > self.numel()) {
                return Err(Error::Invalid(format!(
                    "Tensor::copy_from_at: {}{} into elements {at}.. of {}{}",
                    src.dtype, src.shape, self.dtype, self.shape
                )));
            }
            return self.backend.copy(self.handle, at * size, src.handle, 0, src.numel() * size);
        }
        if self.size_bytes() != src.size_bytes() {
            return Err(Error::Invalid(format!(
                "Tensor::copy_from: {}{} ({} bytes) from {}{} ({} bytes)",
                self.dtype,
                self.shape,
                self.size_bytes(),
                src.dtype,
                src.shape,
                src.size_bytes()
            )));
        }
        self.backend.copy(self.handle, 0, src.handle, 0, self.size_bytes())
    }

    /// Overwrites the whole tensor with `value` (tests use NaN to poison outputs before an op), a
    /// chunk of at most 1 MiB at a time, so filling a large KV cache takes no large host buffer.
    pub fn fill(&mut self, value: f32) -> Result<()> {
        let n = self.numel();
        let per_chunk = (1 << 20) / self.dtype.block_bytes().max(1);
        let chunk = encode(self.dtype, &vec![value; per_chunk.min(n)], "Tensor::fill")?;
        let size = self.dtype.block_bytes();
        let mut at = 0;
        while at < n {
            let count = per_chunk.min(n - at);
            self.backend.write(self.handle, at * size, &chunk[..count * size])?;
            at += count;
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel().unwrap_or(0)
    }

    pub fn size_bytes(&self) -> usize {
        self.dtype.storage_bytes(self.numel()).unwrap_or(0)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The same memory seen with another shape of equal element count.
    pub fn reshape(mut self, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims)?;
        if shape.numel() != self.shape.numel() {
            return Err(Error::Invalid(format!(
                "reshape: cannot view {}{} as {dims:?}",
                self.dtype, self.shape
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef::from_raw(self.handle, self.dtype, self.shape)
    }

    /// A reference for an op to write through. Taking `&mut self` lets the borrow checker keep an
    /// output from aliasing the inputs of the same call.
    pub fn as_mut(&mut self) -> TensorRef<'_> {
        TensorRef::from_raw(self.handle, self.dtype, self.shape)
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: the handle came from this backend's `alloc` and is freed exactly once, here.
        unsafe { self.backend.free(self.handle) }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}{} on {})", self.dtype, self.shape, self.backend.name())
    }
}

fn storage_bytes(dtype: DType, shape: &Shape) -> Result<usize> {
    let numel = shape.numel().ok_or_else(|| Error::Invalid(format!("shape {shape} overflows")))?;
    if dtype.is_quantized() && shape.row_len() % dtype.block_len() != 0 {
        return Err(Error::Invalid(format!(
            "a {dtype} tensor's rows must be whole blocks of {} values; shape {shape}",
            dtype.block_len()
        )));
    }
    dtype
        .storage_bytes(numel)
        .ok_or_else(|| Error::Invalid(format!("{dtype}{shape} is not a whole number of blocks")))
}

/// `values` as the bytes of a float tensor of `dtype`.
fn encode(dtype: DType, values: &[f32], what: &str) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => to_bytes::<f32>(values),
        DType::F16 => to_bytes::<f16>(values),
        DType::BF16 => to_bytes::<bf16>(values),
        // Token ids: whole numbers in f32 (exact below 2^24).
        DType::U32 => values.iter().flat_map(|&v| (v as u32).to_le_bytes()).collect(),
        q => {
            return Err(Error::Invalid(format!(
                "{what}: {q} is quantized; pass its blocks with Tensor::from_bytes"
            )))
        }
    })
}

fn to_bytes<E: Element>(values: &[f32]) -> Vec<u8> {
    let size = std::mem::size_of::<E>();
    let mut out = vec![0u8; values.len() * size];
    // Converted in place, element by element (no growth checks: an 8B model's weights pass here).
    for (dst, &v) in out.chunks_exact_mut(size).zip(values) {
        let e = E::from_f32(v);
        // SAFETY: E is one of f32/f16/bf16, plain-old-data of `size` bytes.
        dst.copy_from_slice(unsafe { std::slice::from_raw_parts(&e as *const E as *const u8, size) });
    }
    out
}

fn from_bytes<E: Element>(bytes: &[u8]) -> Vec<f32> {
    let size = std::mem::size_of::<E>();
    bytes
        .chunks_exact(size)
        // SAFETY: each chunk is exactly `size` bytes, read unaligned as plain-old-data.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const E) }.to_f32())
        .collect()
}

//! Keeping the driver out of the decode loop. A decoded token allocates a dozen intermediate
//! tensors per layer and passes each op a few small host arrays (token ids, positions, slots, block
//! tables); done naively that is hundreds of cuMemAlloc/cuMemFree calls per token (cuMemFree waits
//! for the device) and as many synchronous uploads. So:
//! - freed buffers are kept by size class and handed out again (PyTorch's caching allocator, in
//!   small): every op runs in order on one stream, so a buffer freed by the host may be reused by
//!   the next op at once; when the device runs out, the cache is released and the allocation retried;
//! - small host arrays are uploaded once per content: every layer of a forward pass passes the same
//!   ones, so all but the first layer find them on the device already.

use std::collections::BTreeMap;

use highrise_core::Result;

use crate::driver::Driver;

/// The size class of an allocation: 512-byte steps below 1 MiB, 2 MiB steps above.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes < 1 << 20 {
        bytes.div_ceil(512) * 512
    } else {
        bytes.div_ceil(2 << 20) * (2 << 20)
    }
}

/// A device buffer that is replaced by a larger one when it is too small for `need` bytes: the
/// next power of two, at least `min`. `what` names it in errors.
///
/// The old buffer is freed, or, where `retire` is given (work that uses it is recorded but not yet
/// queued: a graph step), put there to be freed later.
///
/// # Safety
/// The context is bound to the calling thread; `*ptr` (0 for none) is a buffer of `drv`'s. Freeing
/// it waits for the kernels still using it.
pub unsafe fn grow(
    drv: &dyn Driver,
    ptr: &mut u64,
    cap: &mut usize,
    need: usize,
    min: usize,
    what: &str,
    retire: Option<&mut Vec<u64>>,
) -> Result<()> {
    if *cap >= need.max(1) {
        return Ok(());
    }
    if *ptr != 0 {
        match retire {
            Some(list) => list.push(*ptr),
            None => drv.free(*ptr),
        }
        *ptr = 0;
        *cap = 0;
    }
    let bytes = need.next_power_of_two().max(min);
    *ptr = drv.malloc(bytes).map_err(|e| highrise_core::Error::OutOfMemory(format!("cuda: {what} of {bytes} bytes: {e}")))?;
    *cap = bytes;
    Ok(())
}

/// Freed device buffers by size class.
#[derive(Default)]
pub struct BufferCache {
    free: BTreeMap<usize, Vec<u64>>,
    /// Bytes held in the cache (not in use).
    pub cached: usize,
}

impl BufferCache {
    /// A buffer of `class` bytes (a size class): a cached one, or a new one from the driver.
    ///
    /// # Safety
    /// The context is bound to the calling thread.
    /// With `release` false (work that may use the cached buffers is recorded but not yet queued),
    /// running out of device memory is an error instead of a reason to free the cache.
    pub unsafe fn alloc(&mut self, drv: &dyn Driver, class: usize, release: bool) -> Result<u64> {
        if let Some(p) = self.free.get_mut(&class).and_then(Vec::pop) {
            self.cached -= class;
            return Ok(p);
        }
        match drv.malloc(class) {
            Ok(p) => Ok(p),
            Err(e) if !release => Err(e),
            Err(_) => {
                // Out of memory, perhaps only because of what the cache holds: give it back, retry.
                self.release_all(drv);
                drv.malloc(class)
            }
        }
    }

    /// Puts each size class's free buffers in address order, lowest handed out first: a step that
    /// allocates the same sizes in the same order from the same buffers then gets the same
    /// addresses each time (what lets a graph captured from one step serve the next).
    pub fn canonical_order(&mut self) {
        for ptrs in self.free.values_mut() {
            ptrs.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    pub fn put(&mut self, class: usize, ptr: u64) {
        self.free.entry(class).or_default().push(ptr);
        self.cached += class;
    }

    /// Frees every cached buffer.
    ///
    /// # Safety
    /// The context is bound to the calling thread.
    pub unsafe fn release_all(&mut self, drv: &dyn Driver) {
        for (_, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                drv.free(p);
            }
        }
        self.cached = 0;
    }
}

struct Uploaded {
    content: Vec<u8>,
    ptr: u64,
    cap: usize,
    last_use: u64,
}

/// Small host arrays already on the device, by content.
#[derive(Default)]
pub struct UploadCache {
    entries: Vec<Uploaded>,
    clock: u64,
}

/// Entries kept: enough for every distinct array of one forward pass.
const UPLOAD_ENTRIES: usize = 16;

impl UploadCache {
    /// The device address of a copy of `bytes`: an earlier upload of the same content, or a new one
    /// (into the least recently used entry, whose earlier readers the copy waits for: it is ordered
    /// after them on the same stream).
    ///
    /// # Safety
    /// The context is bound to the calling thread, and no other thread uploads until the kernels
    /// that read the returned address are queued (the backend runs one op at a time).
    pub unsafe fn get(&mut self, drv: &dyn Driver, bytes: &[u8]) -> Result<u64> {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.content == bytes) {
            e.last_use = self.clock;
            return Ok(e.ptr);
        }
        let i = if self.entries.len() < UPLOAD_ENTRIES {
            self.entries.push(Uploaded { content: Vec::new(), ptr: 0, cap: 0, last_use: 0 });
            self.entries.len() - 1
        } else {
            (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_use).expect("entries")
        };
        let e = &mut self.entries[i];
        grow(drv, &mut e.ptr, &mut e.cap, bytes.len(), 4096, "op metadata", None)?;
        e.content.clear();
        e.content.extend_from_slice(bytes);
        if !bytes.is_empty() {
            drv.htod(e.ptr, bytes)?;
        }
        e.last_use = self.clock;
        Ok(e.ptr)
    }

    /// # Safety
    /// The context is bound to the calling thread.
    pub unsafe fn release_all(&mut self, drv: &dyn Driver) {
        for e in self.entries.drain(..) {
            if e.ptr != 0 {
                drv.free(e.ptr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{DeviceInfo, Gemm, Launch};

    /// A driver that must not be called: the cache serves everything itself.
    struct NoDriver;

    impl Driver for NoDriver {
        fn device(&self) -> DeviceInfo {
            unreachable!()
        }
        fn bind(&self) -> Result<()> {
            unreachable!()
        }
        unsafe fn malloc(&self, _: usize) -> Result<u64> {
            unreachable!()
        }
        unsafe fn free(&self, _: u64) {
            unreachable!()
        }
        unsafe fn htod(&self, _: u64, _: &[u8]) -> Result<()> {
            unreachable!()
        }
        unsafe fn dtoh(&self, _: &mut [u8], _: u64) -> Result<()> {
            unreachable!()
        }
        unsafe fn dtod(&self, _: u64, _: u64, _: usize) -> Result<()> {
            unreachable!()
        }
        unsafe fn launch(&self, _: &Launch<'_>) -> Result<()> {
            unreachable!()
        }
        unsafe fn gemm(&self, _: &Gemm) -> Result<()> {
            unreachable!()
        }
        fn synchronize(&self) -> Result<()> {
            unreachable!()
        }
    }

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class((1 << 20) - 1), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }

    #[test]
    fn freed_buffers_come_back_by_class() {
        let mut c = BufferCache::default();
        c.put(1024, 7);
        c.put(1024, 9);
        assert_eq!(c.cached, 2048);
        let drv = NoDriver;
        // SAFETY: both requests are served from the cache; the driver is never called.
        assert_eq!(unsafe { c.alloc(&drv, 1024, true) }.unwrap(), 9);
        assert_eq!(unsafe { c.alloc(&drv, 1024, true) }.unwrap(), 7);
        assert_eq!(c.cached, 0);
        // In canonical order the lowest address comes first, whatever the order of the frees.
        c.put(1024, 9);
        c.put(1024, 7);
        c.put(1024, 8);
        c.canonical_order();
        let got: Vec<u64> = (0..3).map(|_| unsafe { c.alloc(&drv, 1024, true) }.unwrap()).collect();
        assert_eq!(got, vec![7, 8, 9]);
        assert_eq!(c.cached, 0);
    }
}

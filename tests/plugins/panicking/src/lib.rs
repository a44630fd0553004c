//! Test fixture: a backend that panics inside every op. Loaded as a plugin, each panic must come back
//! to the host as an error instead of unwinding across the C ABI (which would abort).

use highrise_core::ops::{Op, OpKind};
use highrise_core::{Backend, BackendInfo, DType, Error, Handle, Result};

/// Holds no memory (tensors get dangling handles it never dereferences); `run` always panics.
#[derive(Default)]
pub struct Panicking;

impl Backend for Panicking {
    fn name(&self) -> &str {
        "panicking"
    }
    fn info(&self) -> BackendInfo {
        BackendInfo { name: "panicking".into(), device: "a test fixture that panics".into() }
    }
    fn supports(&self, _op: OpKind, _dtype: DType) -> bool {
        true
    }
    fn alloc(&self, _bytes: usize) -> Result<Handle> {
        Ok(Handle(std::ptr::NonNull::<u8>::dangling().as_ptr() as *mut _))
    }
    unsafe fn free(&self, _handle: Handle) {}
    fn write(&self, _h: Handle, _offset: usize, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
    fn read(&self, _h: Handle, _offset: usize, _out: &mut [u8]) -> Result<()> {
        Err(Error::Backend("the panicking fixture keeps no data".into()))
    }
    fn run(&self, op: &Op<'_>) -> Result<()> {
        panic!("deliberate panic in {}", op.kind())
    }
}

impl highrise_core::plugin::Exportable for Panicking {
    const NAME: &'static str = "panicking";
    fn probe() -> Result<()> {
        Ok(())
    }
    fn create() -> Result<Self> {
        // This library's own copy of std reports panics through its own hook: keep the deliberate
        // ones out of the test output (the host still receives each as an error).
        std::panic::set_hook(Box::new(|_| {}));
        Ok(Panicking::default())
    }
}

highrise_core::export_backend!(Panicking);

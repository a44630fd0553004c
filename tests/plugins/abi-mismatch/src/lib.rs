//! Test fixture: a library exporting the highrise entry symbol with a vtable from a different ABI
//! version. The loader must refuse it, naming the file and both versions, without calling into it.

use highrise_core::plugin::{VTable, ABI_VERSION};

/// The version this fake plugin claims.
pub const CLAIMED_VERSION: u32 = ABI_VERSION + 1000;

/// Only the leading version field is meaningful; the loader must not read further.
#[repr(C)]
pub struct FutureVTable {
    abi_version: u32,
    _rest: [u8; 64],
}

static TABLE: FutureVTable = FutureVTable { abi_version: CLAIMED_VERSION, _rest: [0; 64] };

#[no_mangle]
pub extern "C" fn highrise_backend_entry() -> *const VTable {
    &TABLE as *const FutureVTable as *const VTable
}

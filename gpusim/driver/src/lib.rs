//! `libcuda.so.1` and `libnvidia-ml.so.1` stand-ins. One library exports both APIs;
//! `vigil-gpusim install-libs DIR` links it under both names, and programs find it
//! through `LD_LIBRARY_PATH` exactly as they find the real driver.
//!
//! Every export catches panics and returns an error code instead: nothing may unwind
//! into C. Pointer handling is confined to `ffi`, whose helpers are `unsafe fn`s; every
//! export that dereferences a caller pointer is an `unsafe extern "C" fn` whose
//! `# Safety` section states what the caller (the CUDA or NVML contract) guarantees.

/// An export that is another's twin (a `_v2` or per-thread-default-stream variant the
/// simulator treats alike): the same call with the same arguments.
macro_rules! twin {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $same:ident) => {
        $(#[$doc])*
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: the pointers passed on are under this function's `# Safety` contract.
            unsafe { $same($($arg),*) }
        }
    };
}

mod client;
mod cuda;
mod ffi;
mod nvml;
mod procaddress;

pub use cuda::*;
pub use nvml::*;

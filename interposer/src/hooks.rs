//! The exported entry points. Each runs the real function and does Vigil's work
//! inside `guard`, which turns any internal panic into a log line: a hook degrades to
//! pass-through, it never takes the workload down.
//!
//! Workloads reach the driver three ways, and all three land here: linking against
//! `libcuda.so.1` (these exports win under LD_PRELOAD), `cuGetProcAddress(_v2)` (we
//! swap in our hooks for the entry points we intercept), and `dlsym` on a dlopened
//! driver (our `dlsym` does the same swap).

use crate::log::{vlog, DEBUG, ERROR};
use crate::real;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

const CUDA_ERROR_NO_DEVICE: u32 = 100;

fn guard(what: &str, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        crate::testpoint::panic_point("hook.panic");
        f()
    }));
    if r.is_err() {
        vlog!(
            ERROR,
            "{what}: internal error (panic caught); passing through to the driver"
        );
    }
}

#[no_mangle]
pub extern "C" fn cuInit(flags: u32) -> u32 {
    let Some(real_init) = real::cu_init() else {
        vlog!(ERROR, "cuInit: the real libcuda.so.1 could not be loaded");
        return CUDA_ERROR_NO_DEVICE;
    };
    // SAFETY: the real cuInit, with the caller's argument.
    let r = unsafe { real_init(flags) };
    if r == 0 {
        guard("cuInit", crate::init::ensure);
    }
    r
}

#[no_mangle]
pub extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> u32 {
    let Some(real_alloc) = real::cu_mem_alloc() else {
        return CUDA_ERROR_NO_DEVICE;
    };
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { real_alloc(dptr, bytes) };
    guard("cuMemAlloc_v2", || {
        vlog!(DEBUG, "cuMemAlloc_v2({bytes} bytes) = {r}");
    });
    r
}

/// A function we intercept: its exported name, the base name `cuGetProcAddress` is
/// asked for, the real function (cached), and our hook.
struct Hooked {
    exported: &'static [u8],
    base: &'static [u8],
    real: fn() -> Option<usize>,
    hook: usize,
}

fn hooked() -> [Hooked; 4] {
    fn addr<T: Copy>(f: Option<T>) -> Option<usize> {
        // SAFETY: T is a function-pointer type; reading it as its address.
        f.map(|f| unsafe { std::mem::transmute_copy::<T, usize>(&f) })
    }
    [
        Hooked {
            exported: b"cuInit",
            base: b"cuInit",
            real: || addr(real::cu_init()),
            hook: cuInit as *const () as usize,
        },
        Hooked {
            exported: b"cuMemAlloc_v2",
            base: b"cuMemAlloc",
            real: || addr(real::cu_mem_alloc()),
            hook: cuMemAlloc_v2 as *const () as usize,
        },
        Hooked {
            exported: b"cuGetProcAddress",
            base: b"cuGetProcAddress",
            real: || addr(real::cu_get_proc_address()),
            hook: cuGetProcAddress as *const () as usize,
        },
        Hooked {
            exported: b"cuGetProcAddress_v2",
            base: b"cuGetProcAddress",
            real: || addr(real::cu_get_proc_address_v2()),
            hook: cuGetProcAddress_v2 as *const () as usize,
        },
    ]
}

/// If `got` is the real function a caller asked for by `name` (exported name for
/// dlsym, base name for cuGetProcAddress), our hook for it.
fn replacement(name: &[u8], got: usize, by_base: bool) -> Option<usize> {
    hooked()
        .into_iter()
        .find(|h| (if by_base { h.base } else { h.exported }) == name && (h.real)() == Some(got))
        .map(|h| h.hook)
}

/// After the real cuGetProcAddress answered `symbol` with `*pfn`: if that is the real
/// variant of a function we hook, hand out our hook instead.
fn swap_resolved(symbol: *const c_char, pfn: *mut *mut c_void) {
    if symbol.is_null() || pfn.is_null() {
        return;
    }
    // SAFETY: non-null; the caller passed a NUL-terminated name and an out-pointer
    // that the real call just wrote.
    let (name, got) = unsafe { (CStr::from_ptr(symbol).to_bytes(), *pfn) };
    if got.is_null() {
        return;
    }
    if let Some(h) = replacement(name, got as usize, true) {
        // SAFETY: pfn is the caller's valid out-pointer.
        unsafe { *pfn = h as *mut c_void };
        vlog!(
            DEBUG,
            "cuGetProcAddress({}) -> Vigil's hook",
            String::from_utf8_lossy(name)
        );
    }
}

#[no_mangle]
pub extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: i32,
    flags: u64,
) -> u32 {
    let Some(real_gpa) = real::cu_get_proc_address() else {
        return CUDA_ERROR_NO_DEVICE;
    };
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { real_gpa(symbol, pfn, version, flags) };
    if r == 0 {
        guard("cuGetProcAddress", || swap_resolved(symbol, pfn));
    }
    r
}

#[no_mangle]
pub extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: i32,
    flags: u64,
    status: *mut i32,
) -> u32 {
    let Some(real_gpa) = real::cu_get_proc_address_v2() else {
        return CUDA_ERROR_NO_DEVICE;
    };
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { real_gpa(symbol, pfn, version, flags, status) };
    if r == 0 {
        guard("cuGetProcAddress_v2", || swap_resolved(symbol, pfn));
    }
    r
}

/// `dlsym` on a dlopened `libcuda.so.1` would bypass our exports; hand out our hooks
/// for the functions we intercept. Everything else is the real dlsym's answer.
///
/// # Safety
/// Same contract as libc's `dlsym`.
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let Some(real_dlsym) = real::dlsym_fn() else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments to the real dlsym.
    let p = unsafe { real_dlsym(handle, name) };
    if p.is_null() || name.is_null() {
        return p;
    }
    // SAFETY: non-null, NUL-terminated per dlsym's contract.
    let n = unsafe { CStr::from_ptr(name) }.to_bytes();
    // Cheap filter first: this runs for every dlsym in the process.
    if !n.starts_with(b"cu") {
        return p;
    }
    match replacement(n, p as usize, false) {
        Some(h) => h as *mut c_void,
        None => p,
    }
}

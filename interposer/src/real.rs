//! The real driver: handles from our own `dlopen` of the real libraries, and the real
//! `dlsym`, `dlopen` and `dlmopen` (ours are hooks) from `dlvsym(RTLD_NEXT)`. Nothing
//! here ever resolves a symbol through Vigil's own exports, so a hook can never recurse
//! into itself.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// The versions libc's dl* functions carry: glibc 2.34 moved them into libc.so.6
/// (GLIBC_2.34); before, libdl.so.2 had them at the architecture's first version.
/// `dlmopen` came later (2.3.4 on x86_64).
const DL_VERSIONS: [&CStr; 4] = [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.3.4"];

/// The next definition of `name` after libvigil.so (libc's, or another interposer's
/// loaded after us), cached in `cache`. Found with dlvsym, which we do not hook, so
/// this is safe to call from inside our dlsym and dlopen hooks.
fn next_after_us(cache: &AtomicUsize, name: &CStr) -> usize {
    let mut p = cache.load(Ordering::Acquire);
    if p == 0 {
        for ver in DL_VERSIONS {
            // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated names; it allocates
            // nothing of ours and calls neither dlsym nor dlopen.
            let f = unsafe { libc::dlvsym(libc::RTLD_NEXT, name.as_ptr(), ver.as_ptr()) };
            if !f.is_null() {
                p = f as usize;
                break;
            }
        }
        if p != 0 {
            cache.store(p, Ordering::Release);
        }
    }
    p
}

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// libc's dlsym.
pub fn dlsym_fn() -> Option<DlsymFn> {
    match next_after_us(&REAL_DLSYM, c"dlsym") {
        0 => None,
        // SAFETY: p is the address of libc's dlsym, whose C signature is DlsymFn.
        p => Some(unsafe { std::mem::transmute::<usize, DlsymFn>(p) }),
    }
}

/// The real dlopen's address (0 if not found), for the dlopen trampoline.
pub fn dlopen_addr() -> usize {
    static P: AtomicUsize = AtomicUsize::new(0);
    next_after_us(&P, c"dlopen")
}

/// The real dlmopen's address (0 if not found), for the dlmopen trampoline.
pub fn dlmopen_addr() -> usize {
    static P: AtomicUsize = AtomicUsize::new(0);
    next_after_us(&P, c"dlmopen")
}

/// Calls the real dlsym.
pub fn dlsym(handle: *mut c_void, name: &CStr) -> Option<usize> {
    let f = dlsym_fn()?;
    // SAFETY: a handle from dlopen (or a pseudo-handle) and a NUL-terminated name.
    let p = unsafe { f(handle, name.as_ptr()) };
    (!p.is_null()).then_some(p as usize)
}

fn open(name: &CStr) -> usize {
    // SAFETY: dlopen of a system library by soname; the handle is never closed, like
    // the driver's own.
    unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) as usize }
}

/// The real libcuda.so.1 (0 if it cannot be loaded).
pub fn cuda_handle() -> usize {
    static H: OnceLock<usize> = OnceLock::new();
    *H.get_or_init(|| open(c"libcuda.so.1"))
}

/// The real libnvidia-ml.so.1 (0 if it cannot be loaded).
pub fn nvml_handle() -> usize {
    static H: OnceLock<usize> = OnceLock::new();
    *H.get_or_init(|| open(c"libnvidia-ml.so.1"))
}

/// A real libcuda function's address.
pub fn cuda_sym(name: &CStr) -> Option<usize> {
    match cuda_handle() {
        0 => None,
        h => dlsym(h as *mut c_void, name),
    }
}

pub fn nvml_sym(name: &CStr) -> Option<usize> {
    match nvml_handle() {
        0 => None,
        h => dlsym(h as *mut c_void, name),
    }
}

/// Declares a cached, typed accessor for a real function.
macro_rules! real_fn {
    ($vis:vis fn $acc:ident = $lib:ident($name:literal) as $ty:ty) => {
        $vis fn $acc() -> Option<$ty> {
            static F: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
            let p = (*F.get_or_init(|| $crate::real::$lib($name)))?;
            // SAFETY: the driver exports this symbol with exactly this C signature.
            Some(unsafe { std::mem::transmute::<usize, $ty>(p) })
        }
    };
}
pub(crate) use real_fn;

pub type CuInit = unsafe extern "C" fn(u32) -> u32;
pub type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> u32;
pub type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> u32;
pub type CuPrimaryRetain = unsafe extern "C" fn(*mut *mut c_void, i32) -> u32;
pub type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> u32;
pub type CuMemFree = unsafe extern "C" fn(u64) -> u32;
pub type CuCtxPush = unsafe extern "C" fn(*mut c_void) -> u32;
pub type CuCtxPop = unsafe extern "C" fn(*mut *mut c_void) -> u32;
pub type CuGetProcAddress = unsafe extern "C" fn(*const c_char, *mut *mut c_void, i32, u64) -> u32;
pub type CuGetProcAddressV2 =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, i32, u64, *mut i32) -> u32;

pub type CuMemAllocPitch = unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, u32) -> u32;
pub type CuMemAllocManaged = unsafe extern "C" fn(*mut u64, usize, u32) -> u32;
pub type CuMemAllocAsync = unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> u32;
pub type CuMemAllocFromPool =
    unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> u32;
pub type CuMemFreeAsync = unsafe extern "C" fn(u64, *mut c_void) -> u32;
pub type CuMemCreate = unsafe extern "C" fn(*mut u64, usize, *const c_void, u64) -> u32;
pub type CuMemRelease = unsafe extern "C" fn(u64) -> u32;
pub type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> u32;
pub type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, i32) -> u32;
pub type CuCtxGetDevice = unsafe extern "C" fn(*mut i32) -> u32;
pub type NvmlGetMemoryInfo = unsafe extern "C" fn(*mut c_void, *mut c_void) -> u32;
pub type NvmlGetIndex = unsafe extern "C" fn(*mut c_void, *mut u32) -> u32;

real_fn!(pub fn cu_init = cuda_sym(c"cuInit") as CuInit);
real_fn!(pub fn cu_device_get = cuda_sym(c"cuDeviceGet") as CuDeviceGet);
real_fn!(pub fn cu_device_get_count = cuda_sym(c"cuDeviceGetCount") as CuDeviceGetCount);
real_fn!(pub fn cu_primary_retain = cuda_sym(c"cuDevicePrimaryCtxRetain") as CuPrimaryRetain);
real_fn!(pub fn cu_mem_alloc = cuda_sym(c"cuMemAlloc_v2") as CuMemAlloc);
real_fn!(pub fn cu_mem_free = cuda_sym(c"cuMemFree_v2") as CuMemFree);
real_fn!(pub fn cu_mem_alloc_pitch = cuda_sym(c"cuMemAllocPitch_v2") as CuMemAllocPitch);
real_fn!(pub fn cu_mem_alloc_managed = cuda_sym(c"cuMemAllocManaged") as CuMemAllocManaged);
real_fn!(pub fn cu_mem_alloc_async = cuda_sym(c"cuMemAllocAsync") as CuMemAllocAsync);
real_fn!(pub fn cu_mem_alloc_async_ptsz = cuda_sym(c"cuMemAllocAsync_ptsz") as CuMemAllocAsync);
real_fn!(pub fn cu_mem_alloc_from_pool = cuda_sym(c"cuMemAllocFromPoolAsync") as CuMemAllocFromPool);
real_fn!(pub fn cu_mem_alloc_from_pool_ptsz = cuda_sym(c"cuMemAllocFromPoolAsync_ptsz") as CuMemAllocFromPool);
real_fn!(pub fn cu_mem_free_async = cuda_sym(c"cuMemFreeAsync") as CuMemFreeAsync);
real_fn!(pub fn cu_mem_free_async_ptsz = cuda_sym(c"cuMemFreeAsync_ptsz") as CuMemFreeAsync);
real_fn!(pub fn cu_mem_create = cuda_sym(c"cuMemCreate") as CuMemCreate);
real_fn!(pub fn cu_mem_release = cuda_sym(c"cuMemRelease") as CuMemRelease);
real_fn!(pub fn cu_mem_get_info = cuda_sym(c"cuMemGetInfo_v2") as CuMemGetInfo);
real_fn!(pub fn cu_device_total_mem = cuda_sym(c"cuDeviceTotalMem_v2") as CuDeviceTotalMem);
real_fn!(pub fn cu_ctx_get_device = cuda_sym(c"cuCtxGetDevice") as CuCtxGetDevice);
real_fn!(pub fn nvml_memory_info = nvml_sym(c"nvmlDeviceGetMemoryInfo") as NvmlGetMemoryInfo);
real_fn!(pub fn nvml_memory_info_v2 = nvml_sym(c"nvmlDeviceGetMemoryInfo_v2") as NvmlGetMemoryInfo);
real_fn!(pub fn nvml_device_index = nvml_sym(c"nvmlDeviceGetIndex") as NvmlGetIndex);
real_fn!(pub fn cu_ctx_push = cuda_sym(c"cuCtxPushCurrent_v2") as CuCtxPush);
real_fn!(pub fn cu_ctx_pop = cuda_sym(c"cuCtxPopCurrent_v2") as CuCtxPop);
real_fn!(pub fn cu_get_proc_address = cuda_sym(c"cuGetProcAddress") as CuGetProcAddress);
real_fn!(pub fn cu_get_proc_address_v2 = cuda_sym(c"cuGetProcAddress_v2") as CuGetProcAddressV2);

/// Tries to take an exclusive `flock` on `file` (released by the kernel if we die).
pub fn try_flock(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; flock has no memory-safety preconditions.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

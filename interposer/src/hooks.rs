//! The exported entry points. Each runs the real function and does Vigil's work
//! inside `guard`, which turns any internal panic into a log line: a hook degrades to
//! pass-through, it never takes the workload down.
//!
//! Workloads reach the driver three ways, and all three land here: linking against
//! `libcuda.so.1` (these exports win under LD_PRELOAD), `cuGetProcAddress(_v2)` (we
//! swap in our hooks for the entry points we intercept), and `dlsym` on a dlopened
//! driver (our `dlsym` does the same swap, and answers for a private copy of the
//! driver from the one we interpose). `dlopen`/`dlmopen`, which keep libraries from
//! binding around these exports, are in `dl`.

use crate::log::{vlog, DEBUG, ERROR, WARN};
use crate::mem::{self, Admit, Key};
use crate::real;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

const CUDA_ERROR_NO_DEVICE: u32 = 100;
const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;

fn guard(what: &str, f: impl FnOnce()) {
    guarded(what, f);
}

/// Runs Vigil's part of a hook; `None` if it panicked (logged), so the hook can pass
/// through.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // Normally done at load; again here (one atomic load) in case another
        // library's constructor reached a hook before ours ran.
        crate::cuda::register_driver();
        crate::testpoint::panic_point("hook.panic");
        f()
    }));
    if r.is_err() {
        vlog!(
            ERROR,
            "{what}: internal error (panic caught); passing through to the driver"
        );
    }
    r.ok()
}

macro_rules! missing {
    ($f:expr) => {
        match $f {
            Some(f) => f,
            None => return CUDA_ERROR_NO_DEVICE,
        }
    };
}

/// Exports a function and its per-thread-default-stream variant (`_ptsz`): each
/// looks up its own real function and hands it, with its own name for the log and
/// the caller's arguments, to the one hook they share.
macro_rules! with_ptsz {
    ($name:ident / $real:ident, $ptsz:ident / $real_ptsz:ident,
     $hook:ident($($arg:ident: $ty:ty),*)) => {
        with_ptsz!(@export $name / $real, $hook($($arg: $ty),*));
        with_ptsz!(@export $ptsz / $real_ptsz, $hook($($arg: $ty),*));
    };
    (@export $name:ident / $real:ident, $hook:ident($($arg:ident: $ty:ty),*)) => {
        #[no_mangle]
        #[doc = concat!(
            "# Safety\nThe caller keeps `", stringify!($name), "`'s contract in the CUDA/NVML ",
            "documentation: every pointer argument is null or valid for what the real ",
            "function does with it."
        )]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> u32 {
            let f = missing!(real::$real());
            $hook(stringify!($name), f, $($arg),*)
        }
    };
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
        guard("cuInit", explain_limits);
    }
    r
}

/// Says once per process what limit variables mean where they may surprise (a 0, an
/// ordinal past the devices this process sees).
fn explain_limits() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if crate::config().secure || DONE.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut devices = 0i32;
    if let Some(count) = real::cu_device_get_count() {
        // SAFETY: valid out-pointer; cuInit has succeeded.
        if unsafe { count(&mut devices) } != 0 {
            devices = 0;
        }
    }
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    for w in crate::limits::explain(devices.max(0) as usize, vars) {
        vlog!(WARN, "{w}");
    }
}

/// A primary context on any device takes memory the workload never asked for: it is
/// charged like an allocation (device 0's by detection, the others' here).
#[no_mangle]
/// # Safety
/// The caller keeps `cuDevicePrimaryCtxRetain`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut *mut c_void, dev: i32) -> u32 {
    let f = missing!(real::cu_primary_retain());
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { f(pctx, dev) };
    if r == 0 {
        if let Ok(d) = usize::try_from(dev) {
            guard("cuDevicePrimaryCtxRetain", || mem::context_created(d));
        }
    }
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

fn addr<T: Copy>(f: Option<T>) -> Option<usize> {
    // SAFETY: T is a function-pointer type; reading it as its address.
    f.map(|f| unsafe { std::mem::transmute_copy::<T, usize>(&f) })
}

macro_rules! hooked {
    ($( $exported:ident / $base:literal => $real:path ),* $(,)?) => {
        fn hooked() -> &'static [Hooked] {
            static TABLE: std::sync::OnceLock<Vec<Hooked>> = std::sync::OnceLock::new();
            TABLE.get_or_init(|| vec![$(
                Hooked {
                    exported: stringify!($exported).as_bytes(),
                    base: $base,
                    real: || addr($real()),
                    hook: $exported as *const () as usize,
                },
            )*])
        }
    };
}

// Every entry point Vigil intercepts, however the workload finds it.
hooked! {
    cuInit / b"cuInit" => real::cu_init,
    cuGetProcAddress / b"cuGetProcAddress" => real::cu_get_proc_address,
    cuGetProcAddress_v2 / b"cuGetProcAddress" => real::cu_get_proc_address_v2,
    cuDevicePrimaryCtxRetain / b"cuDevicePrimaryCtxRetain" => real::cu_primary_retain,
    cuMemAlloc_v2 / b"cuMemAlloc" => real::cu_mem_alloc,
    cuMemAllocPitch_v2 / b"cuMemAllocPitch" => real::cu_mem_alloc_pitch,
    cuMemAllocManaged / b"cuMemAllocManaged" => real::cu_mem_alloc_managed,
    cuMemAllocAsync / b"cuMemAllocAsync" => real::cu_mem_alloc_async,
    cuMemAllocAsync_ptsz / b"cuMemAllocAsync" => real::cu_mem_alloc_async_ptsz,
    cuMemAllocFromPoolAsync / b"cuMemAllocFromPoolAsync" => real::cu_mem_alloc_from_pool,
    cuMemAllocFromPoolAsync_ptsz / b"cuMemAllocFromPoolAsync" => real::cu_mem_alloc_from_pool_ptsz,
    cuMemFree_v2 / b"cuMemFree" => real::cu_mem_free,
    cuMemFreeAsync / b"cuMemFreeAsync" => real::cu_mem_free_async,
    cuMemFreeAsync_ptsz / b"cuMemFreeAsync" => real::cu_mem_free_async_ptsz,
    cuMemCreate / b"cuMemCreate" => real::cu_mem_create,
    cuMemRelease / b"cuMemRelease" => real::cu_mem_release,
    cuMemGetInfo_v2 / b"cuMemGetInfo" => real::cu_mem_get_info,
    cuDeviceTotalMem_v2 / b"cuDeviceTotalMem" => real::cu_device_total_mem,
    nvmlDeviceGetMemoryInfo / b"nvmlDeviceGetMemoryInfo" => real::nvml_memory_info,
    nvmlDeviceGetMemoryInfo_v2 / b"nvmlDeviceGetMemoryInfo_v2" => real::nvml_memory_info_v2,
}

/// If `got` is the real function a caller asked for by `name` (exported name for
/// dlsym, base name for cuGetProcAddress), our hook for it.
fn replacement(name: &[u8], got: usize, by_base: bool) -> Option<usize> {
    hooked()
        .iter()
        .find(|h| (if by_base { h.base } else { h.exported }) == name && (h.real)() == Some(got))
        .map(|h| h.hook)
}

/// After the real cuGetProcAddress answered `symbol` with `*pfn`: if that is the real
/// variant of a function we hook, hand out our hook instead.
///
/// # Safety
/// `symbol` is null or a NUL-terminated string, and `pfn` is null or valid for reads
/// and writes (what `cuGetProcAddress`'s caller passed, after a successful call).
unsafe fn swap_resolved(symbol: *const c_char, pfn: *mut *mut c_void) {
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
/// # Safety
/// The caller keeps `cuGetProcAddress`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuGetProcAddress(
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
        // SAFETY: the caller's arguments, after the real call succeeded.
        guard("cuGetProcAddress", || unsafe { swap_resolved(symbol, pfn) });
    }
    r
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuGetProcAddress_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuGetProcAddress_v2(
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
        // SAFETY: the caller's arguments, after the real call succeeded.
        guard("cuGetProcAddress_v2", || unsafe {
            swap_resolved(symbol, pfn)
        });
    }
    r
}

/// What Vigil's `dlsym` does with a lookup.
enum Lookup {
    /// The real dlsym answers, called as if Vigil were not there (a tail jump, so
    /// glibc sees the real caller: `RTLD_NEXT` and `RTLD_DEFAULT` depend on it).
    Real,
    /// Vigil's answer.
    Ours(*mut c_void),
}

/// `name`, if it is a driver or NVML name (`cu*`, `nvml*`) looked up on a handle other
/// than `RTLD_DEFAULT`: the only lookups that are Vigil's business. This runs for every
/// dlsym in the process, first and outside `guarded`: it allocates nothing (a malloc
/// interposer may be asking from inside its malloc) and cannot panic.
///
/// # Safety
/// `name` is null or a NUL-terminated string, as dlsym's contract says.
unsafe fn driver_name<'a>(handle: *mut c_void, name: *const c_char) -> Option<&'a CStr> {
    if name.is_null() || handle.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated per dlsym's contract.
    let name = unsafe { CStr::from_ptr(name) };
    let n = name.to_bytes();
    (n.starts_with(b"cu") || n.starts_with(b"nvml")).then_some(name)
}

/// Decides a `dlsym(handle, name)`. Only driver and NVML names (`cu*`, `nvml*`) are
/// Vigil's business:
/// - on a real handle (a dlopened driver): the real answer, with our hook swapped in
///   for a function we intercept, and for a private copy of the driver the interposed
///   driver's function (`resolved`);
/// - on `RTLD_NEXT`: the interposed driver's function (our hook where we have one),
///   as the caller would find it past an interposer; glibc would otherwise look past
///   the caller, which for a library loaded after us is the driver itself;
/// - on `RTLD_DEFAULT`: the real answer, from the caller's scope, where our exports
///   already come first.
///
/// # Safety
/// `name` is null or a NUL-terminated string, as dlsym's contract says.
unsafe fn lookup(handle: *mut c_void, name: *const c_char) -> Lookup {
    // SAFETY: passed on from our caller.
    let Some(name) = (unsafe { driver_name(handle, name) }) else {
        return Lookup::Real;
    };
    let n = name.to_bytes();
    if handle == libc::RTLD_NEXT {
        let ours = if n.starts_with(b"nvml") {
            real::nvml_sym(name)
        } else {
            real::cuda_sym(name)
        };
        return match ours {
            Some(o) => Lookup::Ours(replacement(n, o, false).unwrap_or(o) as *mut c_void),
            None => Lookup::Real,
        };
    }
    let Some(real_dlsym) = real::dlsym_fn() else {
        return Lookup::Real;
    };
    // SAFETY: forwarding the caller's arguments to the real dlsym (a real handle,
    // whose lookup does not depend on who calls).
    let p = unsafe { real_dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Lookup::Ours(p);
    }
    Lookup::Ours(resolved(name, p as usize))
}

/// Called by the `dlsym` trampoline. Stores in `*tail` the real dlsym's address when
/// the real dlsym is to answer (the return value is then unused), else 0 and returns
/// Vigil's answer. Internal failure (a caught panic) means the real dlsym answers.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// Called only by the `dlsym` trampoline, with `dlsym`'s own arguments.
unsafe extern "C" fn dlsym_prepare(
    handle: *mut c_void,
    name: *const c_char,
    tail: *mut usize,
) -> *mut c_void {
    // SAFETY: the caller's arguments, under dlsym's contract.
    let l = if unsafe { driver_name(handle, name) }.is_none() {
        Lookup::Real
    } else {
        // SAFETY: as above.
        guarded("dlsym", || unsafe { lookup(handle, name) }).unwrap_or(Lookup::Real)
    };
    let (to, answer) = match l {
        Lookup::Real => (
            real::dlsym_fn().map_or(0, |f| f as usize),
            std::ptr::null_mut(),
        ),
        Lookup::Ours(p) => (0, p),
    };
    // SAFETY: `tail` is the trampoline's own stack slot.
    unsafe { *tail = to };
    answer
}

/// `dlsym`: `dlsym_prepare`, then either its answer or a tail jump to the real dlsym
/// with the caller's return address still on the stack, so that glibc sees the real
/// caller (`RTLD_NEXT` is "the next object after the caller"; an ordinary function in
/// between would make it "the next after libvigil.so", which for an interposer
/// preloaded after us is itself: endless recursion). The stack is 16-byte aligned at
/// the call (8 at entry, two pushes and an 8-byte slot).
///
/// # Safety
/// Same contract as libc's `dlsym`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(_handle: *mut c_void, _name: *const c_char) -> *mut c_void {
    trampoline!(
        prepare = dlsym_prepare,
        save = ["rdi", "rsi"],
        restore = ["rsi", "rdi"],
        slot = 8 in "rdx",
        after = [],
        // dlsym_prepare's own answer is in rax.
        on_null = [],
    )
}

/// `dlsym` where there is no trampoline: an ordinary function, so glibc sees
/// libvigil.so as the caller (`RTLD_NEXT` then means "after libvigil.so").
///
/// # Safety
/// Same contract as libc's `dlsym`.
#[cfg(not(target_arch = "x86_64"))]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: the caller's arguments, under dlsym's contract.
    match guarded("dlsym", || unsafe { lookup(handle, name) }).unwrap_or(Lookup::Real) {
        Lookup::Ours(p) => p,
        Lookup::Real => match real::dlsym_fn() {
            // SAFETY: forwarding the caller's arguments to the real dlsym.
            Some(f) => unsafe { f(handle, name) },
            None => std::ptr::null_mut(),
        },
    }
}

/// Our answer for `name` when the real dlsym said `p`: our hook for a function we
/// intercept; for a private copy of the driver, the interposed driver's function (or
/// our hook for it); under the closed policy, nothing for an intercepted function a
/// private copy has and the interposed driver lacks.
fn resolved(name: &CStr, p: usize) -> *mut c_void {
    let n = name.to_bytes();
    if let Some(h) = replacement(n, p, false) {
        return h as *mut c_void;
    }
    match crate::dl::interposed_instead(name, p) {
        None => p as *mut c_void,
        Some(Some(ours)) => replacement(n, ours, false).unwrap_or(ours) as *mut c_void,
        Some(None) => {
            let intercepted = hooked().iter().any(|h| h.exported == n);
            if intercepted && crate::config().limit_policy == crate::config::LimitPolicy::Closed {
                vlog!(
                    WARN,
                    "dlsym({:?}) from a private copy of the driver refused: the driver Vigil interposes has no such entry point to count it through, and VIGIL_LIMIT_POLICY=closed refuses what it cannot account",
                    name.to_string_lossy()
                );
                std::ptr::null_mut()
            } else {
                p as *mut c_void
            }
        }
    }
}

/// The CUDA ordinal of the calling thread's current context.
fn current_device() -> Option<usize> {
    let f = real::cu_ctx_get_device()?;
    let mut d = -1i32;
    // SAFETY: valid out-pointer.
    let r = unsafe { f(&mut d) };
    (r == 0 && d >= 0).then_some(d as usize)
}

/// Reads `*p` if `p` is non-null.
///
/// # Safety
/// `p` is null or valid for reads: an out-pointer the driver just wrote on success.
unsafe fn read_out<T: Copy>(p: *const T) -> Option<T> {
    // SAFETY: non-null out-pointer the driver just wrote on success.
    (!p.is_null()).then(|| unsafe { p.read() })
}

/// The shape of every allocation hook: admit (or deny), the real call, then commit
/// the result under its key (`done` reads it) or give the reservation back.
fn allocate(
    what: &'static str,
    bytes: u64,
    dev: impl FnOnce() -> Option<usize>,
    real: impl FnOnce() -> u32,
    done: impl FnOnce() -> Option<(Key, u64)>,
) -> u32 {
    let admitted = guarded(what, || mem::admit(what, dev(), bytes)).unwrap_or(Admit::Pass);
    let ticket = match admitted {
        Admit::Deny => return CUDA_ERROR_OUT_OF_MEMORY,
        Admit::Pass => None,
        Admit::Charged(t) => Some(t),
    };
    let r = real();
    vlog!(DEBUG, "{what}({bytes} bytes) = {r}");
    if let Some(t) = ticket {
        guard(what, || match (r, done()) {
            (0, Some((key, actual))) => mem::commit(t, key, actual),
            _ => mem::abort(t),
        });
    }
    r
}

/// [`allocate`] of `bytes` on the current device, where the real call writes the new
/// address to the caller's `dptr`.
fn allocate_into(
    what: &'static str,
    dptr: *mut u64,
    bytes: usize,
    real: impl FnOnce() -> u32,
) -> u32 {
    allocate(
        what,
        bytes as u64,
        current_device,
        real,
        // SAFETY: the caller's out-pointer, written by the successful real call.
        || unsafe { read_out(dptr) }.map(|p| (Key::Ptr(p), bytes as u64)),
    )
}

/// The shape of every free hook: the entry leaves the map before the real free, so a
/// thread that gets the same address back at once cannot have its entry freed by us.
fn release(what: &'static str, key: Key, real: impl FnOnce() -> u32) -> u32 {
    let taken = guarded(what, || mem::take(key)).flatten();
    let r = real();
    if let Some(entry) = taken {
        guard(what, || {
            if r == 0 {
                mem::credit_entry(entry)
            } else {
                mem::restore(key, entry)
            }
        });
    }
    r
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuMemAlloc_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> u32 {
    let f = missing!(real::cu_mem_alloc());
    // SAFETY: the real function, with the caller's arguments.
    allocate_into("cuMemAlloc_v2", dptr, bytes, || unsafe { f(dptr, bytes) })
}

/// The driver pads each row to its pitch alignment (512 bytes on current GPUs);
/// reserving the padded size keeps the device itself under the limit. The charge is
/// corrected to the real pitch afterwards.
fn pitch_estimate(width: usize, height: usize) -> u64 {
    (width as u64)
        .div_ceil(512)
        .saturating_mul(512)
        .saturating_mul(height as u64)
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuMemAllocPitch_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: u32,
) -> u32 {
    let f = missing!(real::cu_mem_alloc_pitch());
    allocate(
        "cuMemAllocPitch_v2",
        pitch_estimate(width, height),
        current_device,
        // SAFETY: the real function, with the caller's arguments.
        || unsafe { f(dptr, pitch, width, height, elem) },
        || {
            // SAFETY: the caller's out-pointers, written by the successful real call.
            let p = unsafe { read_out(dptr) }?;
            // SAFETY: as above.
            let real = (unsafe { read_out(pitch) }? as u64).saturating_mul(height as u64);
            Some((Key::Ptr(p), real))
        },
    )
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuMemAllocManaged`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuMemAllocManaged(dptr: *mut u64, bytes: usize, flags: u32) -> u32 {
    let f = missing!(real::cu_mem_alloc_managed());
    // SAFETY: the real function, with the caller's arguments.
    allocate_into("cuMemAllocManaged", dptr, bytes, || unsafe {
        f(dptr, bytes, flags)
    })
}

fn alloc_async(
    what: &'static str,
    f: real::CuMemAllocAsync,
    dptr: *mut u64,
    bytes: usize,
    stream: *mut c_void,
) -> u32 {
    // SAFETY: the real function, with the caller's arguments.
    allocate_into(what, dptr, bytes, || unsafe { f(dptr, bytes, stream) })
}

with_ptsz! {
    cuMemAllocAsync / cu_mem_alloc_async,
    cuMemAllocAsync_ptsz / cu_mem_alloc_async_ptsz,
    alloc_async(dptr: *mut u64, bytes: usize, stream: *mut c_void)
}

fn alloc_from_pool(
    what: &'static str,
    f: real::CuMemAllocFromPool,
    dptr: *mut u64,
    bytes: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> u32 {
    // SAFETY: the real function, with the caller's arguments.
    allocate_into(what, dptr, bytes, || unsafe {
        f(dptr, bytes, pool, stream)
    })
}

with_ptsz! {
    cuMemAllocFromPoolAsync / cu_mem_alloc_from_pool,
    cuMemAllocFromPoolAsync_ptsz / cu_mem_alloc_from_pool_ptsz,
    alloc_from_pool(dptr: *mut u64, bytes: usize, pool: *mut c_void, stream: *mut c_void)
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> u32 {
    let f = missing!(real::cu_mem_free());
    // SAFETY: the real function, with the caller's argument.
    release("cuMemFree_v2", Key::Ptr(dptr), || unsafe { f(dptr) })
}

fn free_async(what: &'static str, f: real::CuMemFreeAsync, dptr: u64, stream: *mut c_void) -> u32 {
    // SAFETY: the real function, with the caller's arguments.
    release(what, Key::Ptr(dptr), || unsafe { f(dptr, stream) })
}

with_ptsz! {
    cuMemFreeAsync / cu_mem_free_async,
    cuMemFreeAsync_ptsz / cu_mem_free_async_ptsz,
    free_async(dptr: u64, stream: *mut c_void)
}

/// CUmemAllocationProp: `location.type` at byte 8, `location.id` at byte 12.
const PROP_LOCATION_TYPE: usize = 8;
const PROP_LOCATION_ID: usize = 12;
const CU_MEM_LOCATION_TYPE_DEVICE: i32 = 1;

/// The device a VMM allocation is placed on; `None` for host placements (not device
/// memory, not counted) or a null property struct.
///
/// # Safety
/// `prop` is null or points to a `CUmemAllocationProp` (`cuMemCreate`'s contract).
unsafe fn vmm_device(prop: *const c_void) -> Option<usize> {
    if prop.is_null() {
        return None;
    }
    let base = prop as *const u8;
    // SAFETY: `prop` points to a CUmemAllocationProp (the API's contract), which is
    // larger than 16 bytes; read_unaligned makes no alignment assumption.
    let (kind, id) = unsafe {
        (
            (base.add(PROP_LOCATION_TYPE) as *const i32).read_unaligned(),
            (base.add(PROP_LOCATION_ID) as *const i32).read_unaligned(),
        )
    };
    (kind == CU_MEM_LOCATION_TYPE_DEVICE && id >= 0).then_some(id as usize)
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuMemCreate`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const c_void,
    flags: u64,
) -> u32 {
    let f = missing!(real::cu_mem_create());
    allocate(
        "cuMemCreate",
        bytes as u64,
        // SAFETY: `prop` is cuMemCreate's argument.
        || unsafe { vmm_device(prop) },
        // SAFETY: the real function, with the caller's arguments.
        || unsafe { f(handle, bytes, prop, flags) },
        // SAFETY: the caller's out-pointer, written by the successful real call.
        || unsafe { read_out(handle) }.map(|h| (Key::Handle(h), bytes as u64)),
    )
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: u64) -> u32 {
    let f = missing!(real::cu_mem_release());
    // SAFETY: the real function, with the caller's argument.
    release("cuMemRelease", Key::Handle(handle), || unsafe { f(handle) })
}

/// (total, free) as the container should see device `dev`, if it has a limit.
fn virtualized(dev: Option<usize>, real_free: u64, real_total: u64) -> Option<(u64, u64)> {
    let (limit, used) = crate::init::usage(dev?)?;
    (limit > 0).then(|| mem::virtual_info(limit, used, real_free, real_total))
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuMemGetInfo_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> u32 {
    let f = missing!(real::cu_mem_get_info());
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { f(free, total) };
    if r == 0 {
        guard("cuMemGetInfo_v2", || {
            // SAFETY: the caller's out-pointers, written by the successful real call.
            let (Some(rf), Some(rt)) = (unsafe { read_out(free) }, unsafe { read_out(total) })
            else {
                return;
            };
            if let Some((t, fr)) = virtualized(current_device(), rf as u64, rt as u64) {
                // SAFETY: both non-null (read above) and the caller's to write.
                unsafe {
                    *free = fr as usize;
                    *total = t as usize;
                }
            }
        });
    }
    r
}

#[no_mangle]
/// # Safety
/// The caller keeps `cuDeviceTotalMem_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: i32) -> u32 {
    let f = missing!(real::cu_device_total_mem());
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { f(bytes, dev) };
    if r == 0 {
        guard("cuDeviceTotalMem_v2", || {
            // SAFETY: the caller's out-pointer, written by the successful real call.
            let Some(rt) = (unsafe { read_out(bytes) }) else {
                return;
            };
            let dev = usize::try_from(dev).ok();
            if let Some((t, _)) = virtualized(dev, rt as u64, rt as u64) {
                // SAFETY: non-null (read above), the caller's to write.
                unsafe { *bytes = t as usize };
            }
        });
    }
    r
}

const NVML_ERROR_FUNCTION_NOT_FOUND: u32 = 13;

/// The CUDA ordinal (the region's device index) of an NVML device handle.
fn nvml_ordinal(device: *mut c_void) -> Option<usize> {
    let f = real::nvml_device_index()?;
    let mut idx = 0u32;
    // SAFETY: a handle the caller got from NVML, and a valid out-pointer.
    if unsafe { f(device, &mut idx) } != 0 {
        return None;
    }
    crate::config().cuda_ordinal(idx).map(|o| o as usize)
}

/// nvmlMemory_t.
#[repr(C)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

/// nvmlMemory_v2_t.
#[repr(C)]
struct NvmlMemoryV2 {
    version: u32,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

const _: () = assert!(std::mem::size_of::<NvmlMemory>() == 24);
const _: () = assert!(std::mem::size_of::<NvmlMemoryV2>() == 40);

/// Virtualized (total, free, used) for an NVML device, if it has a limit.
fn nvml_virtualized(
    device: *mut c_void,
    real_free: u64,
    real_total: u64,
) -> Option<(u64, u64, u64)> {
    let dev = nvml_ordinal(device)?;
    let (limit, used) = crate::init::usage(dev)?;
    (limit > 0).then(|| {
        let (t, f) = mem::virtual_info(limit, used, real_free, real_total);
        (t, f, used)
    })
}

/// The two nvmlMemory layouts, as the hooks read and rewrite them.
trait MemoryInfo {
    fn free_total(&self) -> (u64, u64);
    fn set(&mut self, total: u64, free: u64, used: u64);
}

impl MemoryInfo for NvmlMemory {
    fn free_total(&self) -> (u64, u64) {
        (self.free, self.total)
    }
    fn set(&mut self, total: u64, free: u64, used: u64) {
        (self.total, self.free, self.used) = (total, free, used);
    }
}

impl MemoryInfo for NvmlMemoryV2 {
    fn free_total(&self) -> (u64, u64) {
        (self.free, self.total)
    }
    fn set(&mut self, total: u64, free: u64, used: u64) {
        (self.total, self.reserved, self.free, self.used) = (total, 0, free, used);
    }
}

/// The real call, then the container's view written over the device's.
fn memory_info<T: MemoryInfo>(
    what: &'static str,
    real: Option<real::NvmlGetMemoryInfo>,
    device: *mut c_void,
    memory: *mut c_void,
) -> u32 {
    let Some(f) = real else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    // SAFETY: the real function, with the caller's arguments.
    let r = unsafe { f(device, memory) };
    if r == 0 && !memory.is_null() {
        guard(what, || {
            // SAFETY: non-null, of the layout this entry point takes, just filled by
            // the real call, and the caller's to write.
            let m = unsafe { &mut *(memory as *mut T) };
            let (rf, rt) = m.free_total();
            if let Some((t, fr, used)) = nvml_virtualized(device, rf, rt) {
                m.set(t, fr, used);
            }
        });
    }
    r
}

#[no_mangle]
/// # Safety
/// The caller keeps `nvmlDeviceGetMemoryInfo`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: *mut c_void, memory: *mut c_void) -> u32 {
    memory_info::<NvmlMemory>(
        "nvmlDeviceGetMemoryInfo",
        real::nvml_memory_info(),
        device,
        memory,
    )
}

#[no_mangle]
/// # Safety
/// The caller keeps `nvmlDeviceGetMemoryInfo_v2`'s contract in the CUDA/NVML documentation: every
/// pointer argument is null or valid for what the real function does with it.
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *mut c_void,
    memory: *mut c_void,
) -> u32 {
    memory_info::<NvmlMemoryV2>(
        "nvmlDeviceGetMemoryInfo_v2",
        real::nvml_memory_info_v2(),
        device,
        memory,
    )
}

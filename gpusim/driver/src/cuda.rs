//! The CUDA driver API subset. Return codes and out-parameters follow the real API.

use crate::client::{self, call, current_ctx, log_warn, sim_error, state, Alloc, CHUNK};
use crate::ffi::{self, guard, out, put};
use std::ffi::{c_char, c_int, c_uint, c_void};
use vigil_gpusim::protocol::{Reply, Request};

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUcontext = *mut c_void;
pub type CUdeviceptr = u64;
pub type CUstream = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

const ERRORS: &[(CUresult, &str, &str)] = &[
    (0, "CUDA_SUCCESS\0", "no error\0"),
    (1, "CUDA_ERROR_INVALID_VALUE\0", "invalid argument\0"),
    (2, "CUDA_ERROR_OUT_OF_MEMORY\0", "out of memory\0"),
    (3, "CUDA_ERROR_NOT_INITIALIZED\0", "initialization error\0"),
    (
        100,
        "CUDA_ERROR_NO_DEVICE\0",
        "no CUDA-capable device is detected\0",
    ),
    (
        101,
        "CUDA_ERROR_INVALID_DEVICE\0",
        "invalid device ordinal\0",
    ),
    (
        201,
        "CUDA_ERROR_INVALID_CONTEXT\0",
        "invalid device context\0",
    ),
    (500, "CUDA_ERROR_NOT_FOUND\0", "named symbol not found\0"),
    (
        801,
        "CUDA_ERROR_NOT_SUPPORTED\0",
        "operation not supported\0",
    ),
    (999, "CUDA_ERROR_UNKNOWN\0", "unknown error\0"),
];

/// Common prelude: initialized, and the device ordinal valid.
fn device_ok(dev: CUdevice) -> Result<u32, CUresult> {
    let g = state();
    let s = g
        .as_ref()
        .filter(|s| s.cuda_init)
        .ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
    if dev < 0 || dev as usize >= s.devices.len() {
        return Err(CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(dev as u32)
}

fn initialized() -> Result<(), CUresult> {
    match state().as_ref() {
        Some(s) if s.cuda_init => Ok(()),
        _ => Err(CUDA_ERROR_NOT_INITIALIZED),
    }
}

/// The current context's device.
fn current_device() -> Result<u32, CUresult> {
    initialized()?;
    let ctx = current_ctx().ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
    state()
        .as_ref()
        .and_then(|s| s.contexts.get(&ctx).copied())
        .ok_or(CUDA_ERROR_INVALID_CONTEXT)
}

fn code(r: Result<(), CUresult>) -> CUresult {
    r.err().unwrap_or(CUDA_SUCCESS)
}

fn cuda_err(e: &vigil_gpusim::protocol::CallError) -> CUresult {
    sim_error(
        e,
        CUDA_ERROR_OUT_OF_MEMORY,
        CUDA_ERROR_INVALID_VALUE,
        CUDA_ERROR_INVALID_DEVICE,
        CUDA_ERROR_UNKNOWN,
    )
}

/// An export whose whole work is `call` (which takes the export's pointer arguments),
/// run under `guard`: a panic becomes CUDA_ERROR_UNKNOWN, never an unwind into C.
/// The doc comments given (its `# Safety`) go on the export.
macro_rules! guarded {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),* $(,)?) => $call:expr) => {
        $(#[$doc])*
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            guard(stringify!($name), CUDA_ERROR_UNKNOWN, || {
                // SAFETY: the pointers passed on are under this function's `# Safety` contract.
                unsafe { $call }
            })
        }
    };
}

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    guard("cuInit", CUDA_ERROR_UNKNOWN, || {
        if flags != 0 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        if let Err(e) = client::ensure_loaded() {
            log_warn(&format!("cuInit: {e:?}"));
            return CUDA_ERROR_NO_DEVICE;
        }
        if let Some(s) = state().as_mut() {
            s.cuda_init = true;
        }
        CUDA_SUCCESS
    })
}

/// # Safety
/// `v`: null or valid as the CUDA driver API specifies for `cuDriverGetVersion`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    guard("cuDriverGetVersion", CUDA_ERROR_UNKNOWN, || {
        // Works before cuInit, as the real one does.
        if client::ensure_loaded().is_err() {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            return if unsafe { out(v, 12060) } {
                CUDA_SUCCESS
            } else {
                CUDA_ERROR_INVALID_VALUE
            };
        }
        let ver = state().as_ref().map(|s| s.cuda_version).unwrap_or(12060);
        // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
        if unsafe { out(v, ver as c_int) } {
            CUDA_SUCCESS
        } else {
            CUDA_ERROR_INVALID_VALUE
        }
    })
}

/// # Safety
/// `dev`: null or valid as the CUDA driver API specifies for `cuDeviceGet`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard("cuDeviceGet", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(ordinal).and_then(|d| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(dev, d as c_int, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

/// # Safety
/// `n`: null or valid as the CUDA driver API specifies for `cuDeviceGetCount`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    guard("cuDeviceGetCount", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let c = state().as_ref().map(|s| s.devices.len()).unwrap_or(0);
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(n, c as c_int, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

/// # Safety
/// `name`: null or valid as the CUDA driver API specifies for `cuDeviceGetName`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard("cuDeviceGetName", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            let n = state()
                .as_ref()
                .map(|s| s.devices[d as usize].name.clone())
                .unwrap_or_default();
            if len <= 0 || name.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { ffi::write_str(name, len as usize, &n) };
            Ok(())
        }))
    })
}

fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let hex: String = uuid
        .trim_start_matches("GPU-")
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    b
}

/// # Safety
/// `uuid`: null or valid as the CUDA driver API specifies for `cuDeviceGetUuid`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult {
    guard("cuDeviceGetUuid", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            let u = state()
                .as_ref()
                .map(|s| s.devices[d as usize].uuid.clone())
                .unwrap_or_default();
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(uuid, uuid_bytes(&u), CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

twin! {
    /// # Safety
    /// `uuid`: null or valid as the CUDA driver API specifies for `cuDeviceGetUuid_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: CUdevice) -> CUresult = cuDeviceGetUuid
}

/// # Safety
/// `bytes`: null or valid as the CUDA driver API specifies for `cuDeviceTotalMem_v2`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard("cuDeviceTotalMem_v2", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            let t = state()
                .as_ref()
                .map(|s| s.devices[d as usize].total)
                .unwrap_or(0);
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(bytes, t as usize, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

/// # Safety
/// `pi`: null or valid as the CUDA driver API specifies for `cuDeviceGetAttribute`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    guard("cuDeviceGetAttribute", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            let v = match attrib {
                1 => 1024,            // MAX_THREADS_PER_BLOCK
                10 => 32,             // WARP_SIZE
                13 => 1_980_000,      // CLOCK_RATE (kHz)
                16 => 132,            // MULTIPROCESSOR_COUNT
                33 => d as c_int + 1, // PCI_BUS_ID
                34 => 0,              // PCI_DEVICE_ID
                41 => 1,              // UNIFIED_ADDRESSING
                50 => 0,              // PCI_DOMAIN_ID
                75 => 9,              // COMPUTE_CAPABILITY_MAJOR
                76 => 0,              // COMPUTE_CAPABILITY_MINOR
                83 => 1,              // MANAGED_MEMORY
                89 => 1,              // CONCURRENT_MANAGED_ACCESS
                102 => 1,             // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
                115 => 1,             // MEMORY_POOLS_SUPPORTED
                _ => return Err(CUDA_ERROR_INVALID_VALUE),
            };
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(pi, v, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

fn create_context(d: u32) -> Result<u64, CUresult> {
    let Reply::Context(ctx) = call(Request::CtxCreate { device: d }).map_err(|e| cuda_err(&e))?
    else {
        return Err(CUDA_ERROR_UNKNOWN);
    };
    if let Some(s) = state().as_mut() {
        s.contexts.insert(ctx, d);
    }
    Ok(ctx)
}

fn destroy_context(ctx: u64) -> Result<(), CUresult> {
    let known = state()
        .as_mut()
        .and_then(|s| s.contexts.remove(&ctx))
        .is_some();
    if !known {
        return Err(CUDA_ERROR_INVALID_CONTEXT);
    }
    client::forget_ctx(ctx);
    call(Request::CtxDestroy { ctx })
        .map(|_| ())
        .map_err(|e| cuda_err(&e))
}

/// # Safety
/// `pctx`: null or valid as the CUDA driver API specifies for
/// `cuDevicePrimaryCtxRetain` (out-parameters writable, inputs readable, buffers as
/// long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRetain", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            if pctx.is_null() {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let existing = state().as_mut().and_then(|s| {
                s.primary.get_mut(&d).map(|e| {
                    e.1 += 1;
                    e.0
                })
            });
            let ctx = match existing {
                Some(c) => c,
                None => {
                    let c = create_context(d)?;
                    if let Some(s) = state().as_mut() {
                        s.primary.insert(d, (c, 1));
                    }
                    c
                }
            };
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(pctx, ctx as CUcontext) };
            Ok(())
        }))
    })
}

fn primary_release(dev: CUdevice, reset: bool) -> CUresult {
    code(device_ok(dev).and_then(|d| {
        let drop_ctx = {
            let mut g = state();
            let s = g.as_mut().ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
            match s.primary.get_mut(&d) {
                None if reset => return Ok(()),
                None => return Err(CUDA_ERROR_INVALID_CONTEXT),
                Some(e) => {
                    e.1 = if reset { 0 } else { e.1 - 1 };
                    let ctx = e.0;
                    if e.1 == 0 {
                        s.primary.remove(&d);
                        Some(ctx)
                    } else {
                        None
                    }
                }
            }
        };
        match drop_ctx {
            Some(c) => destroy_context(c),
            None => Ok(()),
        }
    }))
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxRelease_v2", CUDA_ERROR_UNKNOWN, || {
        primary_release(dev, false)
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult {
    cuDevicePrimaryCtxRelease_v2(dev)
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    guard("cuDevicePrimaryCtxReset_v2", CUDA_ERROR_UNKNOWN, || {
        primary_release(dev, true)
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult {
    cuDevicePrimaryCtxReset_v2(dev)
}

/// # Safety
/// `flags`, `active`: null or valid as the CUDA driver API specifies for
/// `cuDevicePrimaryCtxGetState` (out-parameters writable, inputs readable, buffers as
/// long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    guard("cuDevicePrimaryCtxGetState", CUDA_ERROR_UNKNOWN, || {
        code(device_ok(dev).and_then(|d| {
            let on = state().as_ref().is_some_and(|s| s.primary.contains_key(&d));
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            if !(unsafe { out(flags, 0) } && unsafe { out(active, on as c_int) }) {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            Ok(())
        }))
    })
}

/// # Safety
/// `pctx`: null or valid as the calling export's contract requires (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
unsafe fn ctx_create(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    code(device_ok(dev).and_then(|d| {
        if pctx.is_null() {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        let c = create_context(d)?;
        client::push_ctx(c);
        // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
        unsafe { out(pctx, c as CUcontext) };
        Ok(())
    }))
}

guarded! {
    /// # Safety
    /// `pctx`: null or valid as the CUDA driver API specifies for `cuCtxCreate_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuCtxCreate_v2(pctx: *mut CUcontext, _flags: c_uint, dev: CUdevice) => ctx_create(pctx, dev)
}

guarded! {
    /// # Safety
    /// `pctx`, `_params`: null or valid as the CUDA driver API specifies for
    /// `cuCtxCreate_v3` (out-parameters writable, inputs readable, buffers as long as the
    /// sizes passed).
    cuCtxCreate_v3(
        pctx: *mut CUcontext,
        _params: *mut c_void,
        _num: c_int,
        _flags: c_uint,
        dev: CUdevice,
    ) => ctx_create(pctx, dev)
}

guarded! {
    /// # Safety
    /// `pctx`, `_params`: null or valid as the CUDA driver API specifies for
    /// `cuCtxCreate_v4` (out-parameters writable, inputs readable, buffers as long as the
    /// sizes passed).
    cuCtxCreate_v4(
        pctx: *mut CUcontext,
        _params: *mut c_void,
        _flags: c_uint,
        dev: CUdevice,
    ) => ctx_create(pctx, dev)
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    guard("cuCtxDestroy_v2", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let is_primary = state()
                .as_ref()
                .is_some_and(|s| s.primary.values().any(|p| p.0 == ctx as u64));
            if is_primary {
                return Err(CUDA_ERROR_INVALID_CONTEXT);
            }
            destroy_context(ctx as u64)
        }))
    })
}

fn known_ctx(ctx: CUcontext) -> Result<u64, CUresult> {
    let c = ctx as u64;
    if state()
        .as_ref()
        .is_some_and(|s| s.contexts.contains_key(&c))
    {
        Ok(c)
    } else {
        Err(CUDA_ERROR_INVALID_CONTEXT)
    }
}

/// # Safety
/// `pctx`: null or valid as the CUDA driver API specifies for `cuCtxGetCurrent`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxGetCurrent", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let c = current_ctx().unwrap_or(0);
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(pctx, c as CUcontext, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    guard("cuCtxSetCurrent", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            if ctx.is_null() {
                client::set_current(None);
            } else {
                client::set_current(Some(known_ctx(ctx)?));
            }
            Ok(())
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    guard("cuCtxPushCurrent_v2", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            client::push_ctx(known_ctx(ctx)?);
            Ok(())
        }))
    })
}

/// # Safety
/// `pctx`: null or valid as the CUDA driver API specifies for `cuCtxPopCurrent_v2`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    guard("cuCtxPopCurrent_v2", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let c = client::pop_ctx().ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
            if !pctx.is_null() {
                // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
                unsafe { out(pctx, c as CUcontext) };
            }
            Ok(())
        }))
    })
}

/// # Safety
/// `dev`: null or valid as the CUDA driver API specifies for `cuCtxGetDevice`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut CUdevice) -> CUresult {
    guard("cuCtxGetDevice", CUDA_ERROR_UNKNOWN, || {
        code(current_device().and_then(|d| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(dev, d as c_int, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard("cuCtxSynchronize", CUDA_ERROR_UNKNOWN, || {
        code(current_device().map(|_| ()))
    })
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(_stream: CUstream) -> CUresult {
    guard("cuStreamSynchronize", CUDA_ERROR_UNKNOWN, || {
        code(current_device().map(|_| ()))
    })
}

/// Allocates on the current context's device and records it.
///
/// # Safety
/// `dptr`: null or valid as the calling export's contract requires (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
unsafe fn alloc(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    code(current_device().and_then(|d| {
        if dptr.is_null() || size == 0 {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        let req = Request::Alloc {
            device: d,
            bytes: size as u64,
        };
        let Reply::Allocated(addr) = call(req).map_err(|e| cuda_err(&e))? else {
            return Err(CUDA_ERROR_UNKNOWN);
        };
        if let Some(s) = state().as_mut() {
            s.allocs.insert(
                addr,
                Alloc {
                    size: size as u64,
                    chunks: Default::default(),
                },
            );
        }
        // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
        unsafe { out(dptr, addr) };
        Ok(())
    }))
}

fn free(dptr: CUdeviceptr) -> CUresult {
    code(initialized().and_then(|_| {
        if dptr == 0 {
            return Ok(()); // cuMemFree(0) is a no-op
        }
        let known = state()
            .as_mut()
            .and_then(|s| s.allocs.remove(&dptr))
            .is_some();
        if !known {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        call(Request::Free { id: dptr })
            .map(|_| ())
            .map_err(|e| cuda_err(&e))
    }))
}

guarded! {
    /// # Safety
    /// `dptr`: null or valid as the CUDA driver API specifies for `cuMemAlloc_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) => alloc(dptr, size)
}

/// # Safety
/// `dptr`, `pitch`: null or valid as the CUDA driver API specifies for
/// `cuMemAllocPitch_v2` (out-parameters writable, inputs readable, buffers as long as
/// the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    guard("cuMemAllocPitch_v2", CUDA_ERROR_UNKNOWN, || {
        if !matches!(elem, 4 | 8 | 16) || pitch.is_null() || width == 0 || height == 0 {
            return CUDA_ERROR_INVALID_VALUE;
        }
        let p = width.div_ceil(512) * 512;
        let Some(bytes) = p.checked_mul(height) else {
            return CUDA_ERROR_INVALID_VALUE;
        };
        // SAFETY: the pointers passed on are under this function's `# Safety` contract.
        let r = unsafe { alloc(dptr, bytes) };
        if r == CUDA_SUCCESS {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(pitch, p) };
        }
        r
    })
}

guarded! {
    /// # Safety
    /// `dptr`: null or valid as the CUDA driver API specifies for `cuMemAllocManaged`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemAllocManaged(dptr: *mut CUdeviceptr, size: usize, _flags: c_uint) => alloc(dptr, size)
}

guarded! {
    /// # Safety
    /// `dptr`: null or valid as the CUDA driver API specifies for `cuMemAllocAsync`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemAllocAsync(dptr: *mut CUdeviceptr, size: usize, _stream: CUstream) => alloc(dptr, size)
}

twin! {
    /// # Safety
    /// `dptr`: null or valid as the CUDA driver API specifies for `cuMemAllocAsync_ptsz`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemAllocAsync_ptsz(dptr: *mut CUdeviceptr, size: usize, stream: CUstream) -> CUresult = cuMemAllocAsync
}

guarded! {
    /// # Safety
    /// `dptr`, `_pool`: null or valid as the CUDA driver API specifies for
    /// `cuMemAllocFromPoolAsync` (out-parameters writable, inputs readable, buffers as long
    /// as the sizes passed).
    cuMemAllocFromPoolAsync(
        dptr: *mut CUdeviceptr,
        size: usize,
        _pool: *mut c_void,
        _stream: CUstream,
    ) => alloc(dptr, size)
}

twin! {
    /// # Safety
    /// `dptr`, `pool`: null or valid as the CUDA driver API specifies for
    /// `cuMemAllocFromPoolAsync_ptsz` (out-parameters writable, inputs readable, buffers as
    /// long as the sizes passed).
    cuMemAllocFromPoolAsync_ptsz(
        dptr: *mut CUdeviceptr,
        size: usize,
        pool: *mut c_void,
        stream: CUstream,
    ) -> CUresult = cuMemAllocFromPoolAsync
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard("cuMemFree_v2", CUDA_ERROR_UNKNOWN, || free(dptr))
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, _stream: CUstream) -> CUresult {
    guard("cuMemFreeAsync", CUDA_ERROR_UNKNOWN, || free(dptr))
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    cuMemFreeAsync(dptr, stream)
}

/// # Safety
/// `free`, `total`: null or valid as the CUDA driver API specifies for
/// `cuMemGetInfo_v2` (out-parameters writable, inputs readable, buffers as long as the
/// sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard("cuMemGetInfo_v2", CUDA_ERROR_UNKNOWN, || {
        code(current_device().and_then(|d| {
            let Reply::MemInfo { free: f, total: t } =
                call(Request::MemInfo { device: d }).map_err(|e| cuda_err(&e))?
            else {
                return Err(CUDA_ERROR_UNKNOWN);
            };
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            if !(unsafe { out(free, f as usize) } && unsafe { out(total, t as usize) }) {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            Ok(())
        }))
    })
}

/// A copy between host memory and device memory, or a fill.
#[derive(Clone, Copy)]
enum Access {
    FromHost(*const u8),
    ToHost(*mut u8),
    Fill(u8),
}

/// Applies `op` to [dptr, dptr + n), which must lie inside one allocation, chunk by
/// chunk (see `CHUNK`).
///
/// # Safety
/// A host pointer in `op` is null or valid for `n` bytes: readable for `FromHost`,
/// writable for `ToHost`.
unsafe fn access(dptr: CUdeviceptr, n: usize, op: Access) -> CUresult {
    code(current_device().and_then(|_| {
        let mut g = state();
        let s = g.as_mut().ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
        let (base, a) = s
            .allocs
            .range_mut(..=dptr)
            .next_back()
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        let off = dptr - base;
        if off.checked_add(n as u64).is_none_or(|end| end > a.size) {
            return Err(CUDA_ERROR_INVALID_VALUE);
        }
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let (ci, co) = (pos / CHUNK, (pos % CHUNK) as usize);
            let len = (CHUNK as usize - co).min(n - done);
            let ok = match op {
                Access::ToHost(dst) => match a.chunks.get(&ci) {
                    // SAFETY: dst holds n bytes (this function's contract) and
                    // done + len <= n.
                    Some(c) => unsafe {
                        ffi::copy_to_host(&c[co..co + len], dst.wrapping_add(done))
                    },
                    // SAFETY: as above.
                    None => unsafe { ffi::fill_host(dst.wrapping_add(done), len, 0) },
                },
                Access::FromHost(src) => {
                    let c = a
                        .chunks
                        .entry(ci)
                        .or_insert_with(|| vec![0; CHUNK as usize]);
                    // SAFETY: src holds n bytes (this function's contract) and
                    // done + len <= n.
                    unsafe { ffi::copy_from_host(src.wrapping_add(done), &mut c[co..co + len]) }
                }
                Access::Fill(v) => {
                    a.chunks
                        .entry(ci)
                        .or_insert_with(|| vec![0; CHUNK as usize])[co..co + len]
                        .fill(v);
                    true
                }
            };
            if !ok {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            done += len;
        }
        Ok(())
    }))
}

guarded! {
    /// # Safety
    /// `src`: null or valid as the CUDA driver API specifies for `cuMemcpyHtoD_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemcpyHtoD_v2(
        dst: CUdeviceptr,
        src: *const c_void,
        n: usize,
    ) => access(dst, n, Access::FromHost(src.cast()))
}

twin! {
    /// # Safety
    /// `src`: null or valid as the CUDA driver API specifies for `cuMemcpyHtoD_v2_ptds`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemcpyHtoD_v2_ptds(dst: CUdeviceptr, src: *const c_void, n: usize) -> CUresult = cuMemcpyHtoD_v2
}

guarded! {
    /// # Safety
    /// `dst`: null or valid as the CUDA driver API specifies for `cuMemcpyDtoH_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemcpyDtoH_v2(
        dst: *mut c_void,
        src: CUdeviceptr,
        n: usize,
    ) => access(src, n, Access::ToHost(dst.cast()))
}

twin! {
    /// # Safety
    /// `dst`: null or valid as the CUDA driver API specifies for `cuMemcpyDtoH_v2_ptds`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    cuMemcpyDtoH_v2_ptds(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult = cuMemcpyDtoH_v2
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) -> CUresult {
    guard("cuMemsetD8_v2", CUDA_ERROR_UNKNOWN, || {
        // SAFETY: a fill carries no host pointer.
        unsafe { access(dst, n, Access::Fill(v)) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2_ptds(dst: CUdeviceptr, v: u8, n: usize) -> CUresult {
    cuMemsetD8_v2(dst, v, n)
}

/// CUmemAllocationProp: { type u32, requestedHandleTypes u32, location { type u32, id i32 }, ... }
const PROP_LOCATION_ID_OFFSET: usize = 12;

/// # Safety
/// `handle`, `prop`: null or valid as the CUDA driver API specifies for `cuMemCreate`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    size: usize,
    prop: *const c_void,
    _flags: u64,
) -> CUresult {
    guard("cuMemCreate", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            let dev: i32 = unsafe { ffi::read_field(prop.cast(), PROP_LOCATION_ID_OFFSET) }
                .ok_or(CUDA_ERROR_INVALID_VALUE)?;
            let d = device_ok(dev).map_err(|_| CUDA_ERROR_INVALID_DEVICE)?;
            if handle.is_null() || size == 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let req = Request::MemCreate {
                device: d,
                bytes: size as u64,
            };
            let Reply::MemHandle(h) = call(req).map_err(|e| cuda_err(&e))? else {
                return Err(CUDA_ERROR_UNKNOWN);
            };
            if let Some(s) = state().as_mut() {
                s.vmm.insert(h, size as u64);
            }
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(handle, h) };
            Ok(())
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    guard("cuMemRelease", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let known = state()
                .as_mut()
                .and_then(|s| s.vmm.remove(&handle))
                .is_some();
            if !known {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            call(Request::Free { id: handle })
                .map(|_| ())
                .map_err(|e| cuda_err(&e))
        }))
    })
}

/// # Safety
/// `ptr`: null or valid as the CUDA driver API specifies for `cuMemAddressReserve`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    align: usize,
    _addr: CUdeviceptr,
    _flags: u64,
) -> CUresult {
    guard("cuMemAddressReserve", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            if ptr.is_null() || size == 0 {
                return Err(CUDA_ERROR_INVALID_VALUE);
            }
            let align = (align as u64).max(2 << 20);
            let mut g = state();
            let s = g.as_mut().ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
            let va = s.next_va.div_ceil(align) * align;
            s.next_va = va + size as u64;
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(ptr, va) };
            Ok(())
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuMemAddressFree(_ptr: CUdeviceptr, _size: usize) -> CUresult {
    guard("cuMemAddressFree", CUDA_ERROR_UNKNOWN, || {
        code(initialized())
    })
}

#[no_mangle]
pub extern "C" fn cuMemMap(
    _ptr: CUdeviceptr,
    size: usize,
    _offset: usize,
    handle: u64,
    _flags: u64,
) -> CUresult {
    guard("cuMemMap", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            let hs = state().as_ref().and_then(|s| s.vmm.get(&handle).copied());
            match hs {
                Some(n) if size as u64 <= n => Ok(()),
                _ => Err(CUDA_ERROR_INVALID_VALUE),
            }
        }))
    })
}

#[no_mangle]
pub extern "C" fn cuMemUnmap(_ptr: CUdeviceptr, _size: usize) -> CUresult {
    guard("cuMemUnmap", CUDA_ERROR_UNKNOWN, || code(initialized()))
}

#[no_mangle]
pub extern "C" fn cuMemSetAccess(
    _ptr: CUdeviceptr,
    _size: usize,
    _desc: *const c_void,
    _count: usize,
) -> CUresult {
    guard("cuMemSetAccess", CUDA_ERROR_UNKNOWN, || code(initialized()))
}

/// # Safety
/// `gran`, `_prop`: null or valid as the CUDA driver API specifies for
/// `cuMemGetAllocationGranularity` (out-parameters writable, inputs readable, buffers
/// as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    gran: *mut usize,
    _prop: *const c_void,
    _option: c_int,
) -> CUresult {
    guard("cuMemGetAllocationGranularity", CUDA_ERROR_UNKNOWN, || {
        code(initialized().and_then(|_| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(gran, 2 << 20, CUDA_ERROR_INVALID_VALUE) }
        }))
    })
}

fn error_entry(e: CUresult) -> Option<&'static (CUresult, &'static str, &'static str)> {
    ERRORS.iter().find(|x| x.0 == e)
}

/// # Safety
/// `p`: null or valid as the CUDA driver API specifies for `cuGetErrorString`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: CUresult, p: *mut *const c_char) -> CUresult {
    guard(
        "cuGetErrorString",
        CUDA_ERROR_UNKNOWN,
        || match error_entry(e) {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            Some(x) if unsafe { out(p, x.2.as_ptr().cast()) } => CUDA_SUCCESS,
            Some(_) => CUDA_ERROR_INVALID_VALUE,
            None => {
                // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
                unsafe { out(p, std::ptr::null()) };
                CUDA_ERROR_INVALID_VALUE
            }
        },
    )
}

/// # Safety
/// `p`: null or valid as the CUDA driver API specifies for `cuGetErrorName`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: CUresult, p: *mut *const c_char) -> CUresult {
    guard("cuGetErrorName", CUDA_ERROR_UNKNOWN, || {
        match error_entry(e) {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            Some(x) if unsafe { out(p, x.1.as_ptr().cast()) } => CUDA_SUCCESS,
            Some(_) => CUDA_ERROR_INVALID_VALUE,
            None => {
                // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
                unsafe { out(p, std::ptr::null()) };
                CUDA_ERROR_INVALID_VALUE
            }
        }
    })
}

guarded! {
    /// # Safety
    /// `symbol`, `pfn`: null or valid as the CUDA driver API specifies for
    /// `cuGetProcAddress` (out-parameters writable, inputs readable, buffers as long as the
    /// sizes passed).
    cuGetProcAddress(
        symbol: *const c_char,
        pfn: *mut *mut c_void,
        version: c_int,
        flags: u64,
    ) => crate::procaddress::lookup(symbol, pfn, version, flags, std::ptr::null_mut())
}

guarded! {
    /// # Safety
    /// `symbol`, `pfn`, `status`: null or valid as the CUDA driver API specifies for
    /// `cuGetProcAddress_v2` (out-parameters writable, inputs readable, buffers as long as
    /// the sizes passed).
    cuGetProcAddress_v2(
        symbol: *const c_char,
        pfn: *mut *mut c_void,
        version: c_int,
        flags: u64,
        status: *mut c_int,
    ) => crate::procaddress::lookup(symbol, pfn, version, flags, status)
}

/// Entry points that exist in the real driver but not here: each logs its name and
/// returns CUDA_ERROR_NOT_SUPPORTED. (The C ABI lets a no-argument function be called
/// with arguments.)
macro_rules! unsupported {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $name() -> CUresult {
                log_warn(concat!(stringify!($name), ": not supported by vigil-gpusim"));
                CUDA_ERROR_NOT_SUPPORTED
            }
        )*
        pub(crate) fn unsupported_entries() -> Vec<(&'static str, *mut c_void)> {
            vec![$((stringify!($name), $name as *const () as *mut c_void)),*]
        }
    };
}

unsupported!(
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy_v2,
    cuStreamQuery,
    cuEventCreate,
    cuEventRecord,
    cuEventSynchronize,
    cuEventDestroy_v2,
    cuEventElapsedTime,
    cuModuleLoad,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleUnload,
    cuModuleGetFunction,
    cuModuleGetGlobal_v2,
    cuLibraryLoadData,
    cuLaunchKernel,
    cuMemcpy,
    cuMemcpyAsync,
    cuMemcpyDtoD_v2,
    cuMemcpyHtoDAsync_v2,
    cuMemcpyDtoHAsync_v2,
    cuMemsetD32_v2,
    cuMemAllocHost_v2,
    cuMemHostAlloc,
    cuMemFreeHost,
    cuMemHostRegister_v2,
    cuMemHostUnregister,
    cuArrayCreate_v2,
    cuArray3DCreate_v2,
    cuArrayDestroy,
    cuMemPoolCreate,
    cuMemPoolDestroy,
    cuDeviceGetDefaultMemPool,
    cuMemGetAddressRange_v2,
    cuPointerGetAttribute,
    cuCtxGetApiVersion,
    cuCtxGetFlags,
    cuCtxSetLimit,
    cuCtxGetLimit,
    cuDeviceGetPCIBusId,
    cuDeviceCanAccessPeer,
    cuIpcGetMemHandle,
    cuIpcOpenMemHandle_v2,
);

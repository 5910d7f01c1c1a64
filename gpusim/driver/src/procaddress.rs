//! `cuGetProcAddress` with CUDA 12/13 semantics: callers ask for a base name
//! ("cuMemAlloc") and the CUDA version they were built for; they get the newest
//! variant that version knows ("cuMemAlloc_v2"), the per-thread-default-stream variant
//! when they ask for it, and a `symbolStatus` saying why not when they get nothing.

use crate::cuda::*;
use crate::ffi::{cstr, out};
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

const CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM: u64 = 1 << 1;
const STATUS_SUCCESS: c_int = 0;
const STATUS_SYMBOL_NOT_FOUND: c_int = 1;
const STATUS_VERSION_NOT_SUFFICIENT: c_int = 2;

struct Entry {
    base: &'static str,
    since: c_int,
    ptds: bool,
    ptr: usize,
}

macro_rules! e {
    ($base:literal, $since:literal, $f:ident) => {
        Entry {
            base: $base,
            since: $since,
            ptds: false,
            ptr: $f as *const () as usize,
        }
    };
    ($base:literal, $since:literal, $f:ident, ptds) => {
        Entry {
            base: $base,
            since: $since,
            ptds: true,
            ptr: $f as *const () as usize,
        }
    };
}

fn table() -> &'static [Entry] {
    static T: OnceLock<Vec<Entry>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = vec![
            e!("cuInit", 2000, cuInit),
            e!("cuDriverGetVersion", 2020, cuDriverGetVersion),
            e!("cuDeviceGet", 2000, cuDeviceGet),
            e!("cuDeviceGetCount", 2000, cuDeviceGetCount),
            e!("cuDeviceGetName", 2000, cuDeviceGetName),
            e!("cuDeviceGetUuid", 9020, cuDeviceGetUuid),
            e!("cuDeviceGetUuid", 11040, cuDeviceGetUuid_v2),
            e!("cuDeviceTotalMem", 3020, cuDeviceTotalMem_v2),
            e!("cuDeviceGetAttribute", 2000, cuDeviceGetAttribute),
            e!("cuDevicePrimaryCtxRetain", 7000, cuDevicePrimaryCtxRetain),
            e!("cuDevicePrimaryCtxRelease", 7000, cuDevicePrimaryCtxRelease),
            e!(
                "cuDevicePrimaryCtxRelease",
                11000,
                cuDevicePrimaryCtxRelease_v2
            ),
            e!("cuDevicePrimaryCtxReset", 7000, cuDevicePrimaryCtxReset),
            e!("cuDevicePrimaryCtxReset", 11000, cuDevicePrimaryCtxReset_v2),
            e!(
                "cuDevicePrimaryCtxGetState",
                7000,
                cuDevicePrimaryCtxGetState
            ),
            e!("cuCtxCreate", 3020, cuCtxCreate_v2),
            e!("cuCtxCreate", 11040, cuCtxCreate_v3),
            e!("cuCtxCreate", 12050, cuCtxCreate_v4),
            e!("cuCtxDestroy", 4000, cuCtxDestroy_v2),
            e!("cuCtxGetCurrent", 4000, cuCtxGetCurrent),
            e!("cuCtxSetCurrent", 4000, cuCtxSetCurrent),
            e!("cuCtxPushCurrent", 4000, cuCtxPushCurrent_v2),
            e!("cuCtxPopCurrent", 4000, cuCtxPopCurrent_v2),
            e!("cuCtxGetDevice", 2000, cuCtxGetDevice),
            e!("cuCtxSynchronize", 2000, cuCtxSynchronize),
            e!("cuStreamSynchronize", 2000, cuStreamSynchronize),
            e!("cuMemAlloc", 3020, cuMemAlloc_v2),
            e!("cuMemAllocPitch", 3020, cuMemAllocPitch_v2),
            e!("cuMemAllocManaged", 6000, cuMemAllocManaged),
            e!("cuMemAllocAsync", 11020, cuMemAllocAsync),
            e!("cuMemAllocAsync", 11020, cuMemAllocAsync_ptsz, ptds),
            e!("cuMemAllocFromPoolAsync", 11020, cuMemAllocFromPoolAsync),
            e!(
                "cuMemAllocFromPoolAsync",
                11020,
                cuMemAllocFromPoolAsync_ptsz,
                ptds
            ),
            e!("cuMemFree", 3020, cuMemFree_v2),
            e!("cuMemFreeAsync", 11020, cuMemFreeAsync),
            e!("cuMemFreeAsync", 11020, cuMemFreeAsync_ptsz, ptds),
            e!("cuMemGetInfo", 3020, cuMemGetInfo_v2),
            e!("cuMemcpyHtoD", 3020, cuMemcpyHtoD_v2),
            e!("cuMemcpyHtoD", 7000, cuMemcpyHtoD_v2_ptds, ptds),
            e!("cuMemcpyDtoH", 3020, cuMemcpyDtoH_v2),
            e!("cuMemcpyDtoH", 7000, cuMemcpyDtoH_v2_ptds, ptds),
            e!("cuMemsetD8", 3020, cuMemsetD8_v2),
            e!("cuMemsetD8", 7000, cuMemsetD8_v2_ptds, ptds),
            e!("cuMemCreate", 10020, cuMemCreate),
            e!("cuMemRelease", 10020, cuMemRelease),
            e!("cuMemAddressReserve", 10020, cuMemAddressReserve),
            e!("cuMemAddressFree", 10020, cuMemAddressFree),
            e!("cuMemMap", 10020, cuMemMap),
            e!("cuMemUnmap", 10020, cuMemUnmap),
            e!("cuMemSetAccess", 10020, cuMemSetAccess),
            e!(
                "cuMemGetAllocationGranularity",
                10020,
                cuMemGetAllocationGranularity
            ),
            e!("cuGetErrorString", 6000, cuGetErrorString),
            e!("cuGetErrorName", 6000, cuGetErrorName),
            e!("cuGetProcAddress", 11030, cuGetProcAddress),
            e!("cuGetProcAddress", 12000, cuGetProcAddress_v2),
        ];
        for (name, f) in crate::cuda::unsupported_entries() {
            t.push(Entry {
                base: name.trim_end_matches("_v2"),
                since: 0,
                ptds: false,
                ptr: f as usize,
            });
        }
        t
    })
}

/// Resolves `symbol` for `version`. As the real driver does (measured on 580.159.04):
/// `_v2` reports "not found" and "version not sufficient" through `symbolStatus` with
/// CUDA_SUCCESS and a null pointer, while `_v1` (no status) returns
/// CUDA_ERROR_NOT_FOUND; only base names are accepted, never suffixed ones.
///
/// # Safety
/// `symbol`, `pfn`, `status`: null or valid as the calling export's contract requires
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
pub unsafe fn lookup(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    let has_status = !status.is_null();
    let miss = |s: c_int| {
        if has_status {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(status, s) };
            CUDA_SUCCESS
        } else {
            CUDA_ERROR_NOT_FOUND
        }
    };
    // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
    let Some(name) = (unsafe { cstr(symbol) }) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
    unsafe { out(pfn, std::ptr::null_mut()) };
    let candidates: Vec<&Entry> = table().iter().filter(|e| e.base == name).collect();
    if candidates.is_empty() {
        crate::client::log_debug(&format!("cuGetProcAddress: unknown symbol {name}"));
        return miss(STATUS_SYMBOL_NOT_FOUND);
    }
    let want_ptds = flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM != 0;
    let fits = |e: &&&Entry| e.since <= version;
    let best = candidates
        .iter()
        .filter(fits)
        .filter(|e| e.ptds == want_ptds)
        .max_by_key(|e| e.since)
        .or_else(|| {
            candidates
                .iter()
                .filter(fits)
                .filter(|e| !e.ptds)
                .max_by_key(|e| e.since)
        });
    match best {
        Some(e) => {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { out(pfn, e.ptr as *mut c_void) };
            if has_status {
                // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
                unsafe { out(status, STATUS_SUCCESS) };
            }
            CUDA_SUCCESS
        }
        None => miss(STATUS_VERSION_NOT_SUFFICIENT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn ask(name: &str, version: c_int, flags: u64, v2: bool) -> (CUresult, c_int, usize) {
        let n = CString::new(name).unwrap();
        let mut p: *mut c_void = std::ptr::null_mut();
        let mut st: c_int = -1;
        let status = if v2 {
            &mut st as *mut c_int
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: a NUL-terminated string and out-parameters that are live locals (or
        // null for the status).
        let r = unsafe { lookup(n.as_ptr(), &mut p, version, flags, status) };
        (r, st, p as usize)
    }

    /// The cases measured on the real 580.159.04 driver (gpusim/calibrate/).
    #[test]
    fn matches_the_real_driver() {
        assert_eq!(
            ask("cuMemAlloc", 12000, 0, true),
            (0, 0, cuMemAlloc_v2 as *const () as usize)
        );
        assert_eq!(ask("cuNoSuchThing", 12000, 0, true), (0, 1, 0));
        assert_eq!(
            ask("cuNoSuchThing", 12000, 0, false).0,
            CUDA_ERROR_NOT_FOUND
        );
        assert_eq!(
            ask("cuMemAlloc_v2", 12000, 0, true),
            (0, 1, 0),
            "suffixed names are not accepted"
        );
        assert_eq!(ask("cuMemAllocAsync", 11000, 0, true), (0, 2, 0));
        assert_eq!(
            ask("cuMemAllocAsync", 11000, 0, false).0,
            CUDA_ERROR_NOT_FOUND
        );
        // (symbol, version, flags): the entry point the real driver resolves it to.
        let resolved: [(&str, c_int, u64, *const ()); 8] = [
            ("cuMemAllocAsync", 12000, 2, cuMemAllocAsync_ptsz as _),
            ("cuMemcpyHtoD", 12000, 2, cuMemcpyHtoD_v2_ptds as _),
            ("cuMemcpyHtoD", 12000, 0, cuMemcpyHtoD_v2 as _),
            (
                "cuDevicePrimaryCtxRelease",
                10000,
                0,
                cuDevicePrimaryCtxRelease as _,
            ),
            (
                "cuDevicePrimaryCtxRelease",
                11000,
                0,
                cuDevicePrimaryCtxRelease_v2 as _,
            ),
            ("cuCtxCreate", 12080, 0, cuCtxCreate_v4 as _),
            ("cuCtxCreate", 11040, 0, cuCtxCreate_v3 as _),
            ("cuGetProcAddress", 12000, 0, cuGetProcAddress_v2 as _),
        ];
        for (name, version, flags, want) in resolved {
            assert_eq!(
                ask(name, version, flags, true).2,
                want as usize,
                "{name} at {version}, flags {flags}"
            );
        }
        // Known but unimplemented here: resolvable, and returns NOT_SUPPORTED when called.
        let (r, st, p) = ask("cuStreamCreate", 12000, 0, true);
        assert_eq!((r, st), (0, 0));
        assert_ne!(p, 0);
        assert_eq!(cuStreamCreate(), CUDA_ERROR_NOT_SUPPORTED);
    }

    #[test]
    fn bad_arguments_are_invalid_value_not_a_crash() {
        let mut p: *mut c_void = std::ptr::null_mut();
        assert_eq!(
            // SAFETY: a null symbol (which is the case under test) and a live out-parameter.
            unsafe { lookup(std::ptr::null(), &mut p, 12000, 0, std::ptr::null_mut()) },
            CUDA_ERROR_INVALID_VALUE
        );
        let n = CString::new("cuInit").unwrap();
        assert_eq!(
            // SAFETY: a NUL-terminated string and null out-parameters.
            unsafe {
                lookup(
                    n.as_ptr(),
                    std::ptr::null_mut(),
                    12000,
                    0,
                    std::ptr::null_mut(),
                )
            },
            CUDA_ERROR_INVALID_VALUE
        );
    }

    #[test]
    fn calls_before_cuinit_report_not_initialized() {
        let mut n = 0;
        // SAFETY: the out-parameter is a live local.
        let r = unsafe { cuDeviceGetCount(&mut n) };
        assert_eq!(r, CUDA_ERROR_NOT_INITIALIZED);
        let mut d = 0u64;
        // SAFETY: the out-parameter is a live local.
        let r = unsafe { cuMemAlloc_v2(&mut d, 16) };
        assert_eq!(r, CUDA_ERROR_NOT_INITIALIZED);
    }
}

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
    exported: &'static str,
    since: c_int,
    ptds: bool,
    ptr: usize,
}

macro_rules! e {
    ($base:literal, $since:literal, $f:ident) => {
        Entry {
            base: $base,
            exported: stringify!($f),
            since: $since,
            ptds: false,
            ptr: $f as *const () as usize,
        }
    };
    ($base:literal, $since:literal, $f:ident, ptds) => {
        Entry {
            base: $base,
            exported: stringify!($f),
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
                exported: name,
                since: 0,
                ptds: false,
                ptr: f as usize,
            });
        }
        t
    })
}

/// Resolves `symbol` for `version`. Also accepts an exported (suffixed) name as is.
pub fn lookup(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    let set_status = |s: c_int| {
        if !status.is_null() {
            out(status, s);
        }
    };
    let Some(name) = cstr(symbol) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    out(pfn, std::ptr::null_mut());
    let t = table();
    let mut candidates: Vec<&Entry> = t.iter().filter(|e| e.base == name).collect();
    if candidates.is_empty() {
        candidates = t.iter().filter(|e| e.exported == name).collect();
    }
    if candidates.is_empty() {
        crate::client::log_debug(&format!("cuGetProcAddress: unknown symbol {name}"));
        set_status(STATUS_SYMBOL_NOT_FOUND);
        return CUDA_ERROR_NOT_FOUND;
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
            out(pfn, e.ptr as *mut c_void);
            set_status(STATUS_SUCCESS);
            CUDA_SUCCESS
        }
        None => {
            set_status(STATUS_VERSION_NOT_SUFFICIENT);
            CUDA_ERROR_NOT_FOUND
        }
    }
}

//! The NVML subset. Struct layouts match NVIDIA's `nvml.h`, so `nvidia-ml-py` and
//! the `nvml-wrapper` crate work against it unchanged.

use crate::client::{self, call, sim_error, state};
use crate::ffi::{self, guard, out, put};
use std::ffi::{c_char, c_int, c_uint};
use vigil_gpusim::protocol::{Reply, Request};

pub type NvmlReturn = c_uint;
pub type NvmlDevice = *mut u8;

pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
pub const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
pub const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2`: sizeof(nvmlMemory_v2_t) | 2 << 24.
pub const NVML_MEMORY_V2: c_uint = 0x0200_0028;

/// nvmlProcessInfo_v1_t (for the unsuffixed call).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlProcessInfoV1 {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
}

/// nvmlProcessInfo_v2_t, also nvmlProcessInfo_t (for `_v2` and `_v3`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// nvmlProcessUtilizationSample_t.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlProcessUtilizationSample {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

const _: () = {
    assert!(std::mem::size_of::<NvmlProcessUtilizationSample>() == 32);
    assert!(std::mem::size_of::<NvmlMemory>() == 24);
    assert!(std::mem::size_of::<NvmlMemoryV2>() == 40);
    assert!(std::mem::size_of::<NvmlProcessInfoV1>() == 16);
    assert!(std::mem::size_of::<NvmlProcessInfo>() == 24);
    assert!(std::mem::offset_of!(NvmlProcessInfo, gpu_instance_id) == 16);
};

/// Device handles are addresses inside this array: opaque to callers, checkable here.
static HANDLES: [u8; 16] = [0; 16];

fn handle_of(i: u32) -> NvmlDevice {
    HANDLES.as_ptr().wrapping_add(i as usize) as NvmlDevice
}

/// A handle back to its index, if it is one of ours and NVML is initialized.
fn index_of(h: NvmlDevice) -> Result<u32, NvmlReturn> {
    let g = state();
    let s = g
        .as_ref()
        .filter(|s| s.nvml_refs > 0)
        .ok_or(NVML_ERROR_UNINITIALIZED)?;
    let off = (h as usize).wrapping_sub(HANDLES.as_ptr() as usize);
    if off < s.devices.len() {
        Ok(off as u32)
    } else {
        Err(NVML_ERROR_INVALID_ARGUMENT)
    }
}

fn nvml_initialized() -> Result<(), NvmlReturn> {
    match state().as_ref() {
        Some(s) if s.nvml_refs > 0 => Ok(()),
        _ => Err(NVML_ERROR_UNINITIALIZED),
    }
}

fn code(r: Result<(), NvmlReturn>) -> NvmlReturn {
    r.err().unwrap_or(NVML_SUCCESS)
}

fn nvml_err(e: &vigil_gpusim::protocol::CallError) -> NvmlReturn {
    sim_error(
        e,
        NVML_ERROR_UNKNOWN,
        NVML_ERROR_INVALID_ARGUMENT,
        NVML_ERROR_INVALID_ARGUMENT,
        NVML_ERROR_UNKNOWN,
    )
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    guard("nvmlInitWithFlags", NVML_ERROR_UNKNOWN, || {
        if let Err(e) = client::ensure_loaded() {
            client::log_warn(&format!("nvmlInit: {e:?}"));
            return NVML_ERROR_DRIVER_NOT_LOADED;
        }
        if let Some(s) = state().as_mut() {
            s.nvml_refs += 1;
        }
        NVML_SUCCESS
    })
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    nvmlInitWithFlags(0)
}

#[no_mangle]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    nvmlInitWithFlags(0)
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    guard("nvmlShutdown", NVML_ERROR_UNKNOWN, || {
        let mut g = state();
        match g.as_mut() {
            Some(s) if s.nvml_refs > 0 => {
                s.nvml_refs -= 1;
                NVML_SUCCESS
            }
            _ => NVML_ERROR_UNINITIALIZED,
        }
    })
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(r: NvmlReturn) -> *const c_char {
    let s: &'static str = match r {
        NVML_SUCCESS => "Success\0",
        NVML_ERROR_UNINITIALIZED => "Uninitialized\0",
        NVML_ERROR_INVALID_ARGUMENT => "Invalid Argument\0",
        NVML_ERROR_NOT_SUPPORTED => "Not Supported\0",
        NVML_ERROR_NOT_FOUND => "Not Found\0",
        NVML_ERROR_INSUFFICIENT_SIZE => "Insufficient Size\0",
        NVML_ERROR_DRIVER_NOT_LOADED => "Driver Not Loaded\0",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => "Argument Version Mismatch\0",
        _ => "Unknown Error\0",
    };
    s.as_ptr().cast()
}

/// # Safety
/// `buf`: null or valid as the calling export's contract requires (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
unsafe fn write_string(buf: *mut c_char, len: c_uint, s: &str) -> NvmlReturn {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (len as usize) < s.len() + 1 {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
    unsafe { ffi::write_str(buf, len as usize, s) };
    NVML_SUCCESS
}

/// # Safety
/// `buf`: null or valid as NVML specifies for `nvmlSystemGetDriverVersion`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> NvmlReturn {
    guard("nvmlSystemGetDriverVersion", NVML_ERROR_UNKNOWN, || {
        if let Err(e) = nvml_initialized() {
            return e;
        }
        let v = state()
            .as_ref()
            .map(|s| s.driver_version.clone())
            .unwrap_or_default();
        // SAFETY: the pointers passed on are under this function's `# Safety` contract.
        unsafe { write_string(buf, len, &v) }
    })
}

/// # Safety
/// `v`: null or valid as NVML specifies for `nvmlSystemGetCudaDriverVersion`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(v: *mut c_int) -> NvmlReturn {
    guard("nvmlSystemGetCudaDriverVersion", NVML_ERROR_UNKNOWN, || {
        code(nvml_initialized().and_then(|_| {
            let ver = state().as_ref().map(|s| s.cuda_version).unwrap_or(0);
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(v, ver as c_int, NVML_ERROR_INVALID_ARGUMENT) }
        }))
    })
}

twin! {
    /// # Safety
    /// `v`: null or valid as NVML specifies for `nvmlSystemGetCudaDriverVersion_v2`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> NvmlReturn = nvmlSystemGetCudaDriverVersion
}

/// # Safety
/// `n`: null or valid as NVML specifies for `nvmlDeviceGetCount_v2` (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(n: *mut c_uint) -> NvmlReturn {
    guard("nvmlDeviceGetCount_v2", NVML_ERROR_UNKNOWN, || {
        code(nvml_initialized().and_then(|_| {
            let c = state().as_ref().map(|s| s.devices.len()).unwrap_or(0);
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(n, c as c_uint, NVML_ERROR_INVALID_ARGUMENT) }
        }))
    })
}

twin! {
    /// # Safety
    /// `n`: null or valid as NVML specifies for `nvmlDeviceGetCount` (out-parameters
    /// writable, inputs readable, buffers as long as the sizes passed).
    nvmlDeviceGetCount(n: *mut c_uint) -> NvmlReturn = nvmlDeviceGetCount_v2
}

/// # Safety
/// `h`: null or valid as NVML specifies for `nvmlDeviceGetHandleByIndex_v2`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    i: c_uint,
    h: *mut NvmlDevice,
) -> NvmlReturn {
    guard("nvmlDeviceGetHandleByIndex_v2", NVML_ERROR_UNKNOWN, || {
        code(nvml_initialized().and_then(|_| {
            let n = state().as_ref().map(|s| s.devices.len()).unwrap_or(0);
            if i as usize >= n {
                return Err(NVML_ERROR_INVALID_ARGUMENT);
            }
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(h, handle_of(i), NVML_ERROR_INVALID_ARGUMENT) }
        }))
    })
}

twin! {
    /// # Safety
    /// `h`: null or valid as NVML specifies for `nvmlDeviceGetHandleByIndex`
    /// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
    nvmlDeviceGetHandleByIndex(
        i: c_uint,
        h: *mut NvmlDevice,
    ) -> NvmlReturn = nvmlDeviceGetHandleByIndex_v2
}

/// # Safety
/// `i`: null or valid as NVML specifies for `nvmlDeviceGetIndex` (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(h: NvmlDevice, i: *mut c_uint) -> NvmlReturn {
    guard("nvmlDeviceGetIndex", NVML_ERROR_UNKNOWN, || {
        code(index_of(h).and_then(|d| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe { put(i, d, NVML_ERROR_INVALID_ARGUMENT) }
        }))
    })
}

/// Writes the string `field` picks from device `h`'s description into `buf`.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
unsafe fn device_string(
    h: NvmlDevice,
    buf: *mut c_char,
    len: c_uint,
    field: impl Fn(&crate::client::DeviceInfo) -> String,
) -> NvmlReturn {
    match index_of(h) {
        Ok(d) => {
            let v = state()
                .as_ref()
                .map(|s| field(&s.devices[d as usize]))
                .unwrap_or_default();
            // SAFETY: our caller's guarantee, passed on.
            unsafe { write_string(buf, len, &v) }
        }
        Err(e) => e,
    }
}

/// Exports `name(device, buf, len)`, which writes the string `field` of the device's
/// description into `buf` (NVML's string getters).
macro_rules! device_string_getter {
    ($name:ident => $field:ident) => {
        #[doc = concat!(
            "# Safety\n`buf`: null or valid as NVML specifies for `",
            stringify!($name),
            "` (out-parameters writable, inputs readable, buffers as long as the sizes passed)."
        )]
        #[no_mangle]
        pub unsafe extern "C" fn $name(h: NvmlDevice, buf: *mut c_char, len: c_uint) -> NvmlReturn {
            guard(stringify!($name), NVML_ERROR_UNKNOWN, || {
                // SAFETY: the pointers passed on are under this function's `# Safety` contract.
                unsafe { device_string(h, buf, len, |d| d.$field.clone()) }
            })
        }
    };
}

device_string_getter!(nvmlDeviceGetUUID => uuid);
device_string_getter!(nvmlDeviceGetName => name);

fn memory(h: NvmlDevice) -> Result<(u64, u64, u64), NvmlReturn> {
    let d = index_of(h)?;
    match call(Request::NvmlMemInfo { device: d }).map_err(|e| nvml_err(&e))? {
        Reply::NvmlMemInfo { total, free, used } => Ok((total, free, used)),
        _ => Err(NVML_ERROR_UNKNOWN),
    }
}

/// # Safety
/// `m`: null or valid as NVML specifies for `nvmlDeviceGetMemoryInfo` (out-parameters
/// writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(h: NvmlDevice, m: *mut NvmlMemory) -> NvmlReturn {
    guard("nvmlDeviceGetMemoryInfo", NVML_ERROR_UNKNOWN, || {
        code(memory(h).and_then(|(total, free, used)| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe {
                put(
                    m,
                    NvmlMemory { total, free, used },
                    NVML_ERROR_INVALID_ARGUMENT,
                )
            }
        }))
    })
}

/// # Safety
/// `m`: null or valid as NVML specifies for `nvmlDeviceGetMemoryInfo_v2`
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    h: NvmlDevice,
    m: *mut NvmlMemoryV2,
) -> NvmlReturn {
    guard("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_UNKNOWN, || {
        // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
        let Some(given) = (unsafe { ffi::read(m) }) else {
            return NVML_ERROR_INVALID_ARGUMENT;
        };
        if given.version != NVML_MEMORY_V2 {
            return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
        }
        code(memory(h).map(|(total, free, used)| {
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            unsafe {
                out(
                    m,
                    NvmlMemoryV2 {
                        version: NVML_MEMORY_V2,
                        total,
                        reserved: 0,
                        free,
                        used,
                    },
                )
            };
        }))
    })
}

/// The shared body of the three process-list calls, with NVML's two-call protocol:
/// too small a buffer gets `INSUFFICIENT_SIZE` and the needed count.
///
/// # Safety
/// `count`, `infos`: null or valid as the calling export's contract requires
/// (out-parameters writable, inputs readable, buffers as long as the sizes passed).
unsafe fn running_processes<T>(
    h: NvmlDevice,
    count: *mut c_uint,
    infos: *mut T,
    make: impl Fn(u32, u64) -> T,
) -> NvmlReturn {
    let d = match index_of(h) {
        Ok(d) => d,
        Err(e) => return e,
    };
    // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
    let Some(cap) = (unsafe { ffi::read(count) }) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    let procs = match call(Request::NvmlProcs { device: d }) {
        Ok(Reply::NvmlProcs(procs)) => procs,
        Ok(_) => return NVML_ERROR_UNKNOWN,
        Err(e) => return nvml_err(&e),
    };
    // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
    unsafe { out(count, procs.len() as c_uint) };
    if procs.is_empty() {
        return NVML_SUCCESS;
    }
    if infos.is_null() || (cap as usize) < procs.len() {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (i, (pid, used)) in procs.into_iter().enumerate() {
        // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
        unsafe { out(infos.wrapping_add(i), make(pid, used)) };
    }
    NVML_SUCCESS
}

/// # Safety
/// `count`, `infos`: null or valid as NVML specifies for
/// `nvmlDeviceGetComputeRunningProcesses` (out-parameters writable, inputs readable,
/// buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    h: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfoV1,
) -> NvmlReturn {
    guard(
        "nvmlDeviceGetComputeRunningProcesses",
        NVML_ERROR_UNKNOWN,
        || {
            // SAFETY: the pointers passed on are under this function's `# Safety` contract.
            unsafe {
                running_processes(h, count, infos, |pid, used_gpu_memory| NvmlProcessInfoV1 {
                    pid,
                    used_gpu_memory,
                })
            }
        },
    )
}

fn v2_info(pid: u32, used_gpu_memory: u64) -> NvmlProcessInfo {
    NvmlProcessInfo {
        pid,
        used_gpu_memory,
        // 0xFFFFFFFF: not in a MIG instance, as NVML reports on non-MIG GPUs.
        gpu_instance_id: u32::MAX,
        compute_instance_id: u32::MAX,
    }
}

/// # Safety
/// `count`, `infos`: null or valid as NVML specifies for
/// `nvmlDeviceGetComputeRunningProcesses_v2` (out-parameters writable, inputs readable,
/// buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    h: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    guard(
        "nvmlDeviceGetComputeRunningProcesses_v2",
        NVML_ERROR_UNKNOWN,
        // SAFETY: the pointers passed on are under this function's `# Safety` contract.
        || unsafe { running_processes(h, count, infos, v2_info) },
    )
}

/// # Safety
/// `count`, `infos`: null or valid as NVML specifies for
/// `nvmlDeviceGetComputeRunningProcesses_v3` (out-parameters writable, inputs readable,
/// buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    h: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    guard(
        "nvmlDeviceGetComputeRunningProcesses_v3",
        NVML_ERROR_UNKNOWN,
        // SAFETY: the pointers passed on are under this function's `# Safety` contract.
        || unsafe { running_processes(h, count, infos, v2_info) },
    )
}

/// No graphics workloads on a simulated GPU.
///
/// # Safety
/// `count`, `_infos`: null or valid as NVML specifies for
/// `nvmlDeviceGetGraphicsRunningProcesses_v3` (out-parameters writable, inputs
/// readable, buffers as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    h: NvmlDevice,
    count: *mut c_uint,
    _infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    guard(
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        NVML_ERROR_UNKNOWN,
        || {
            code(index_of(h).and_then(|_| {
                // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
                unsafe { put(count, 0, NVML_ERROR_INVALID_ARGUMENT) }
            }))
        },
    )
}

/// Per-process utilization samples. A simulated GPU runs no kernels, so there never
/// are any, and this answers as the real driver does on an idle GPU: with or without
/// a buffer, `NVML_ERROR_NOT_FOUND` ("no valid sample entries since
/// lastSeenTimeStamp"), and the count set to 0 (the real driver's count on that path
/// is not documented; 0 is the safe value). A null count is
/// `NVML_ERROR_INVALID_ARGUMENT`. HAMi-core's libvgpu.so calls this from its
/// utilization watcher shortly after start-up and crashes if it is missing.
///
/// # Safety
/// `_utilization`, `count`: null or valid as NVML specifies for
/// `nvmlDeviceGetProcessUtilization` (out-parameters writable, inputs readable, buffers
/// as long as the sizes passed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    h: NvmlDevice,
    _utilization: *mut NvmlProcessUtilizationSample,
    count: *mut c_uint,
    _last_seen_time_stamp: u64,
) -> NvmlReturn {
    guard(
        "nvmlDeviceGetProcessUtilization",
        NVML_ERROR_UNKNOWN,
        || {
            if let Err(e) = index_of(h) {
                return e;
            }
            // SAFETY: the pointers are null or valid, as this function's `# Safety` requires.
            if !unsafe { out(count, 0) } {
                return NVML_ERROR_INVALID_ARGUMENT;
            }
            NVML_ERROR_NOT_FOUND
        },
    )
}

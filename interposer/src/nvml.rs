//! The real NVML, for detection: the process list of one device.

use crate::real::real_fn;
use std::ffi::c_void;

type NvmlInit = unsafe extern "C" fn() -> u32;
type NvmlHandleByIndex = unsafe extern "C" fn(u32, *mut *mut c_void) -> u32;
type NvmlProcs = unsafe extern "C" fn(*mut c_void, *mut u32, *mut ProcessInfo) -> u32;

real_fn!(fn nvml_init = nvml_sym(c"nvmlInit_v2") as NvmlInit);
real_fn!(fn handle_by_index = nvml_sym(c"nvmlDeviceGetHandleByIndex_v2") as NvmlHandleByIndex);
real_fn!(fn procs_v3 = nvml_sym(c"nvmlDeviceGetComputeRunningProcesses_v3") as NvmlProcs);
real_fn!(fn procs_v2 = nvml_sym(c"nvmlDeviceGetComputeRunningProcesses_v2") as NvmlProcs);

const NVML_SUCCESS: u32 = 0;
const NVML_ERROR_INSUFFICIENT_SIZE: u32 = 7;

/// nvmlProcessInfo_t (the `_v2`/`_v3` layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProcessInfo {
    pid: u32,
    used: u64,
    gpu_instance: u32,
    compute_instance: u32,
}

const _: () = assert!(std::mem::size_of::<ProcessInfo>() == 24);

/// An initialized NVML watching one device.
pub struct Nvml {
    device: *mut c_void,
    procs: NvmlProcs,
}

impl Nvml {
    pub fn open(index: u32) -> Result<Nvml, String> {
        let init = nvml_init().ok_or("libnvidia-ml.so.1 not found or lacks nvmlInit_v2")?;
        // SAFETY: plain C call with no arguments.
        let r = unsafe { init() };
        if r != NVML_SUCCESS {
            return Err(format!("nvmlInit_v2 returned {r}"));
        }
        let by_index = handle_by_index().ok_or("nvmlDeviceGetHandleByIndex_v2 missing")?;
        let mut device: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let r = unsafe { by_index(index, &mut device) };
        if r != NVML_SUCCESS {
            return Err(format!(
                "nvmlDeviceGetHandleByIndex_v2({index}) returned {r}"
            ));
        }
        let procs = procs_v3()
            .or_else(procs_v2)
            .ok_or("nvmlDeviceGetComputeRunningProcesses_v3/_v2 missing")?;
        Ok(Nvml { device, procs })
    }

    /// Bytes in use on the whole device (every process), or None.
    pub fn device_used(&self) -> Option<u64> {
        let f = crate::real::nvml_memory_info()?;
        // nvmlMemory_t: total, free, used.
        let mut m = [0u64; 3];
        // SAFETY: `m` has the layout of nvmlMemory_t and lives across the call.
        let r = unsafe { f(self.device, m.as_mut_ptr().cast()) };
        (r == NVML_SUCCESS).then_some(m[2])
    }

    /// (PID, used bytes) per compute process on the device, with NVML's two-call
    /// protocol.
    pub fn procs(&self) -> Result<Vec<(u32, u64)>, String> {
        let mut cap = 0u32;
        let mut buf: Vec<ProcessInfo> = Vec::new();
        for _ in 0..4 {
            let mut count = cap;
            let ptr = if cap == 0 {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr()
            };
            // SAFETY: `ptr` is null with count 0, or points to `cap` writable entries.
            let r = unsafe { (self.procs)(self.device, &mut count, ptr) };
            match r {
                NVML_SUCCESS => {
                    let n = (count as usize).min(buf.len());
                    return Ok(buf[..n].iter().map(|p| (p.pid, p.used)).collect());
                }
                NVML_ERROR_INSUFFICIENT_SIZE => {
                    cap = count.saturating_mul(2).saturating_add(8);
                    buf = vec![ProcessInfo::default(); cap as usize];
                }
                e => return Err(format!("nvmlDeviceGetComputeRunningProcesses returned {e}")),
            }
        }
        Err("process list kept growing".into())
    }
}

//! What the process lifecycle needs from the real CUDA driver and NVML. `libvigil.so`
//! implements it with FFI (its `cuda` and `nvml` modules) and registers it at load;
//! this crate never calls a driver function itself.

use std::sync::OnceLock;

/// The driver, as start-up and host-PID detection use it.
pub trait Driver: Sync {
    /// CUDA devices the driver reports (0 if it cannot say).
    fn device_count(&self) -> usize;
    /// NVML for physical device `index`.
    fn nvml(&self, index: u32) -> Result<Box<dyn Nvml>, String>;
    /// Retains the primary context on CUDA device 0 (kept: the workload uses it).
    fn retain_primary_context(&self) -> Result<Box<dyn Context>, String>;
    /// Takes an exclusive `flock` on `f` without waiting.
    fn try_flock(&self, f: &std::fs::File) -> bool;
}

/// One device's NVML.
pub trait Nvml {
    /// (PID, used bytes) of every compute process on the device, as NVML lists them.
    fn procs(&self) -> Result<Vec<(u32, u64)>, String>;
    /// Bytes in use on the whole device.
    fn device_used(&self) -> Option<u64>;
}

/// Our retained primary context: detection's marker allocations go through it.
pub trait Context {
    /// Allocates `bytes` of device memory with this context current; its address.
    fn alloc(&self, bytes: u64) -> Result<u64, String>;
    /// Frees what [`Context::alloc`] returned; true if the driver freed it.
    fn free(&self, ptr: u64) -> bool;
}

static DRIVER: OnceLock<&'static dyn Driver> = OnceLock::new();

/// Registers the driver (once, at load; later calls are ignored).
pub fn register(d: &'static dyn Driver) {
    let _ = DRIVER.set(d);
}

/// The registered driver, if any.
pub fn get() -> Option<&'static dyn Driver> {
    DRIVER.get().copied()
}

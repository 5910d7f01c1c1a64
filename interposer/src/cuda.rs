//! The driver calls start-up and detection make, behind `vigil_core::driver::Driver`:
//! the device count, our primary context, marker allocations in it, NVML, `flock`.
//! Registered at load (an `.init_array` entry), before any hook can run.

use crate::nvml::Nvml;
use crate::real;
use vigil_core::driver::{self, Context, Driver};

/// The real driver, as `libvigil.so` reaches it.
struct Cuda;

static CUDA: Cuda = Cuda;

/// Hands the core our driver (idempotent: only the first call stores it).
pub(crate) fn register_driver() {
    driver::register(&CUDA);
}

/// Runs when the library is loaded: only stores a reference.
extern "C" fn register() {
    register_driver();
}

#[used]
#[link_section = ".init_array"]
static REGISTER: extern "C" fn() = register;

impl Driver for Cuda {
    fn device_count(&self) -> usize {
        let Some(count) = real::cu_device_get_count() else {
            return 0;
        };
        let mut n = 0i32;
        // SAFETY: valid out-pointer; cuInit has succeeded.
        if unsafe { count(&mut n) } != 0 {
            return 0;
        }
        n.clamp(0, vigil_region::layout::MAX_DEVICES as i32) as usize
    }

    fn nvml(&self, index: u32) -> Result<Box<dyn driver::Nvml>, String> {
        Ok(Box::new(Nvml::open(index)?))
    }

    fn retain_primary_context(&self) -> Result<Box<dyn Context>, String> {
        let get = real::cu_device_get().ok_or("cuDeviceGet missing")?;
        let retain = real::cu_primary_retain().ok_or("cuDevicePrimaryCtxRetain missing")?;
        let mut dev = 0i32;
        // SAFETY: valid out-pointer; cuInit has succeeded.
        let r = unsafe { get(&mut dev, 0) };
        if r != 0 {
            return Err(format!("cuDeviceGet(0) returned {r}"));
        }
        let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer and device.
        let r = unsafe { retain(&mut ctx, dev) };
        if r != 0 {
            return Err(format!("cuDevicePrimaryCtxRetain returned {r}"));
        }
        Ok(Box::new(PrimaryContext(ctx)))
    }

    fn try_flock(&self, f: &std::fs::File) -> bool {
        real::try_flock(f)
    }
}

impl driver::Nvml for Nvml {
    fn procs(&self) -> Result<Vec<(u32, u64)>, String> {
        Nvml::procs(self)
    }
    fn device_used(&self) -> Option<u64> {
        Nvml::device_used(self)
    }
}

/// Our retained primary context.
struct PrimaryContext(*mut std::ffi::c_void);

impl PrimaryContext {
    /// Runs `f` with this context current on the calling thread, then restores it.
    fn with_current<T>(&self, f: impl FnOnce() -> T) -> Result<T, String> {
        let push = real::cu_ctx_push().ok_or("cuCtxPushCurrent_v2 missing")?;
        let pop = real::cu_ctx_pop().ok_or("cuCtxPopCurrent_v2 missing")?;
        // SAFETY: a context we retained; push/pop are balanced below.
        let r = unsafe { push(self.0) };
        if r != 0 {
            return Err(format!("cuCtxPushCurrent_v2 returned {r}"));
        }
        let v = f();
        let mut old = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        unsafe { pop(&mut old) };
        Ok(v)
    }
}

impl Context for PrimaryContext {
    fn alloc(&self, bytes: u64) -> Result<u64, String> {
        self.with_current(|| {
            let alloc = real::cu_mem_alloc().ok_or("cuMemAlloc_v2 missing")?;
            let mut p = 0u64;
            // SAFETY: valid out-pointer; our context is current.
            let r = unsafe { alloc(&mut p, bytes as usize) };
            if r == 0 {
                Ok(p)
            } else {
                Err(format!("cuMemAlloc_v2 returned {r}"))
            }
        })?
    }

    fn free(&self, ptr: u64) -> bool {
        self.with_current(|| match real::cu_mem_free() {
            // SAFETY: freeing a marker we allocated, once.
            Some(free) => (unsafe { free(ptr) }) == 0,
            None => false,
        }) == Ok(true)
    }
}

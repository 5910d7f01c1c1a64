//! `libvigil.so`: preloaded into GPU workloads (LD_PRELOAD or /etc/ld.so.preload). It
//! serializes process start-up on the shared region, detects each process's host PID
//! by polling NVML around primary-context creation, recovers from dead or stalled lock
//! owners, and records every step in exact counters and the event ring.
//!
//! This crate is only the exports and the FFI: `hooks` (the exported CUDA, NVML and
//! `dlsym` entry points), `dl` (the loader trampolines), `real` (the real functions),
//! `nvml` and `cuda` (the driver calls start-up makes). Everything else is in
//! `vigil-interposer-core`, an ordinary crate.

// Unit-test builds leave out the exported hooks (a test binary must not export
// `dlsym` or `cuInit`), so what only the hooks call is unused there.
#![cfg_attr(test, allow(dead_code))]

#[cfg(all(not(test), target_arch = "x86_64"))]
#[macro_use]
mod trampoline;

mod cuda;
mod dl;
#[cfg(not(test))]
mod hooks;
mod nvml;
mod real;

// The core's modules under their old names, for the hooks (which unit-test builds
// leave out).
pub(crate) use vigil_core::{config, log};
#[cfg(not(test))]
pub(crate) use vigil_core::{limits, mem, process as init, testpoint};

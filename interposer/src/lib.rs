//! `libvigil.so`: preloaded into GPU workloads (LD_PRELOAD or /etc/ld.so.preload). It
//! serializes process start-up on the shared region, detects each process's host PID
//! by polling NVML around primary-context creation, recovers from dead or stalled lock
//! owners, and records every step in exact counters and the event ring.
//!
//! Pure logic (`config`, `detect`) is separate from FFI (`real`, `nvml`, `hooks`).

// Unit-test builds leave out the exported hooks (a test binary must not export
// `dlsym` or `cuInit`), so what only the hooks call is unused there.
#![cfg_attr(test, allow(dead_code))]

mod config;
mod detect;
mod dl;
#[cfg(not(test))]
mod hooks;
mod init;
mod limits;
mod log;
mod mem;
mod nvml;
mod real;
mod signature;
mod testpoint;

use std::sync::OnceLock;

/// The process's settings, read once from the environment.
pub(crate) fn config() -> &'static config::Config {
    static C: OnceLock<config::Config> = OnceLock::new();
    C.get_or_init(config::Config::from_env)
}

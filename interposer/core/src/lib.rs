//! The interposer's logic, as an ordinary crate that is unit-tested and fuzzed like
//! any other: settings (`config`, `limits`), host-PID detection (`signature`,
//! `detect`), memory accounting (`mem`), the per-process lifecycle (`process`) and
//! the log. `libvigil.so` (the `vigil-interposer` cdylib) adds only the exported
//! hooks and the FFI to the real driver, which it hands in through [`driver::Driver`].

pub mod config;
pub mod detect;
pub mod driver;
pub mod limits;
pub mod log;
pub mod mem;
pub mod process;
pub mod signature;
pub mod testpoint;

use std::sync::OnceLock;

/// The process's settings, read once from the environment.
pub fn config() -> &'static config::Config {
    static C: OnceLock<config::Config> = OnceLock::new();
    C.get_or_init(config::Config::from_env)
}

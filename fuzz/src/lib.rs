//! Shared harness code for Vigil's fuzz targets.
//!
//! * [`scratch`]: the file a region target writes its input into (on tmpfs when it can),
//!   plus a second open file description that holds some slots' liveness tokens, so
//!   the reader sees both live and dead owners.
//! * [`bases`]: real regions, built in-process with the writer API (slots, locks taken
//!   and force-posted, reservations, detections, every event kind, a wrapped ring),
//!   used by the structure-aware target and written out as seeds for the raw one.
//! * [`exposition`]: a checker of the Prometheus text and OpenMetrics formats, for
//!   the exporter's `/metrics` bodies (exporter_http).
//! * [`reader`]: the oracle. It opens a file with `RegionReader`, predicts the outcome
//!   from an independent decoding of the header, and checks every read path
//!   (`snapshot`, `device_usage`, `ring_consumer`/`drain`, `revalidate`) for
//!   properties, not just for the absence of a panic.
//!
//! Checks that currently fail on known, reported bugs can be silenced one by one with
//! `VIGIL_FUZZ_ALLOW=name[,name...]` (see [`allowed`]); by default everything is checked.

pub mod bases;
pub mod exposition;
pub mod reader;
pub mod scratch;

/// Is the named check switched off through `VIGIL_FUZZ_ALLOW`? Names are listed in
/// docs/fuzzing.md; each one is an open finding with a reproducer in fuzz/regressions/.
pub fn allowed(check: &str) -> bool {
    use std::sync::OnceLock;
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| {
            std::env::var("VIGIL_FUZZ_ALLOW")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|a| a == check || a == "all")
}

/// Asserts a property unless the named check is allowed to fail (a known finding).
#[macro_export]
macro_rules! check {
    ($name:literal, $cond:expr, $($fmt:tt)+) => {
        if !($cond) && !$crate::allowed($name) {
            panic!("[{}] {}", $name, format!($($fmt)+));
        }
    };
}

/// A little-endian byte cursor over fuzz input that yields zeros once exhausted.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn remaining(&self) -> &'a [u8] {
        &self.data[self.pos.min(self.data.len())..]
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|x| *x = self.u8());
        u64::from_le_bytes(b)
    }
    /// Bytes up to the next NUL (or the end), consumed with the NUL.
    pub fn until_nul(&mut self) -> &'a [u8] {
        let rest = self.remaining();
        let n = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        self.pos += n + 1;
        &rest[..n]
    }
}

/// The interposer's pure parsers, from its core crate (an ordinary rlib: linking it
/// pulls in none of libvigil.so's exported hooks).
pub mod interposer {
    pub use vigil_core::{config, limits};
}

//! vigil-exporter: the Prometheus sidecar for Vigil shared regions.
//!
//! The exporter maps regions read-only, reads their exact counters and histograms at
//! scrape time (so `/metrics` always agrees with the region, even when ring events
//! were lost), and drains each region's event ring in the background to count lost
//! events and to assemble one trace per process start-up.
//!
//! Regions are mapped only while they are being read (see [`regions`]): a mapping of
//! a region is 1.7 MiB, most of it slot table and ring, and keeping 64 of them mapped
//! would put over 100 MiB of page cache into the exporter's RSS.

pub mod collector;
pub mod drain;
pub mod hami;
pub mod hostpid;
pub mod http;
pub mod inspect;
pub mod labels;
pub mod liveness;
pub mod logfmt;
pub mod negotiate;
pub mod nvml;
pub mod otlp;
pub mod process;
pub mod regions;
pub mod trace;
pub mod util;
pub mod webconfig;

/// The exporter's version, as exported by `vigil_exporter_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the exporter was built from (`unknown` outside a checkout).
pub const REVISION: &str = env!("VIGIL_BUILD_REVISION");
/// The version of the compiler that built it.
pub const RUSTC: &str = env!("VIGIL_BUILD_RUSTC");

/// Default port; 9477 is not taken in the Prometheus default-port allocation list's
/// neighbourhood by any GPU exporter we know of (dcgm-exporter uses 9400).
pub const DEFAULT_LISTEN: &str = ":9477";

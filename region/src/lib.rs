//! vigil-region: the one contract between Vigil's writers (the interposer in every
//! workload) and its reader (the exporter sidecar).
//!
//! A region is a file, memory-mapped shared by every process of one container. It
//! holds a versioned header, per-device limits and usage, exact counters and
//! histograms, two cross-process locks, process slots with liveness tokens, and an
//! event ring. See `docs/region.md` for the protocols and the reasons behind them.
//!
//! Unsafe code lives only in `sys` (syscalls, and the SIGBUS guard for mappings) and in
//! the one cast from mapping to layout in `region`.

#![warn(missing_docs)]

pub mod counters;
pub mod error;
pub mod fault;
mod file;
pub mod init;
pub mod layout;
pub mod lock;
pub mod mem;
pub mod procfs;
pub mod reader;
pub mod region;
pub mod ring;
pub mod slot;
pub mod snapshot;
mod sys;
mod validate;
pub mod wire;

pub use counters::{Counter, HistogramId, HistogramSnapshot, UnenforcedSetting};
pub use error::{ErrorReason, RegionError};
pub use init::{InitParams, InitPath, InitReport};
pub use lock::{ForceReason, LockId};
pub use lock::{LockGuard, LockOutcome, ReleaseOutcome};
pub use mem::Reservation;
pub use procfs::ProcessIdentity;
pub use reader::{RegionRead, RegionReader};
pub use region::{install_sigbus_guard, Region};
pub use ring::{DrainStats, Event, EventKind, LostCounts, Payload, RingConsumer, NO_SLOT};
pub use slot::DetectOutcome;
pub use slot::SlotHandle;
pub use snapshot::{
    DeviceInfo, KnownLiveness, LockInfo, PerDevice, RegionIdentity, SlotInfo, Snapshot,
};
pub use sys::{getpid, monotonic_ns, realtime_ns};

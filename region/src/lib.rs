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

pub mod counters;
pub mod error;
pub mod fault;
pub mod layout;
pub mod lock;
pub mod mem;
pub mod procfs;
pub mod region;
pub mod ring;
pub mod slot;
mod sys;
pub mod wire;

pub use counters::{Counter, HistogramId, HistogramSnapshot, UnenforcedSetting};
pub use error::{ErrorReason, RegionError};
pub use lock::{ForceReason, LockId};
pub use lock::{LockGuard, LockOutcome, ReleaseOutcome};
pub use mem::Reservation;
pub use procfs::ProcessIdentity;
pub use region::{
    install_sigbus_guard, DeviceInfo, InitParams, InitPath, InitReport, LockInfo, Region,
    RegionIdentity, RegionRead, RegionReader, SlotInfo, Snapshot,
};
pub use ring::{DrainStats, Event, EventKind, LostCounts, Payload, RingConsumer, NO_SLOT};
pub use slot::DetectOutcome;
pub use slot::SlotHandle;
pub use sys::{getpid, monotonic_ns, realtime_ns};

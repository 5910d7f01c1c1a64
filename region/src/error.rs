//! What can go wrong with a region, and what a reader counts it as.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// Everything that can go wrong with a region. Every message names the file.
#[derive(Debug, Error)]
pub enum RegionError {
    /// A system call on the file failed.
    #[error("region {}: cannot {op}: {source}", path.display())]
    Io {
        /// The region file.
        path: PathBuf,
        /// What was being done ("open", "mmap", "lock slot token", ...).
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the layout: being created, cut short, or not a region.
    #[error("region {}: file is {len} bytes but a layout v{} region needs {expected} (truncated, or not a Vigil region)", path.display(), crate::layout::LAYOUT_VERSION)]
    Truncated {
        /// The region file.
        path: PathBuf,
        /// Its length, bytes (0: probably still being created).
        len: u64,
        /// The layout's size, bytes.
        expected: u64,
    },
    /// The file does not start with the region magic (0: still all zero).
    // The bytes found are kept for tools but never printed: the file may be anything
    // a tenant pointed us at.
    #[error("region {}: bad magic (expected \"VIGILRGN\"): not a Vigil region", path.display())]
    WrongMagic {
        /// The region file.
        path: PathBuf,
        /// The first eight bytes, little-endian.
        found: u64,
    },
    /// A region of another layout version: this build cannot read it safely.
    #[error("region {}: layout version {found} is not supported (this build reads v{supported}); upgrade the reader or remove the file once no process uses it", path.display())]
    UnsupportedVersion {
        /// The region file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads ([`crate::layout::LAYOUT_VERSION`]).
        supported: u32,
    },
    /// The region is still being initialized; a reader retries later.
    #[error("region {}: not initialized yet (state {state})", path.display())]
    NotReady {
        /// The region file.
        path: PathBuf,
        /// The header's state word (`layout::STATE_*`).
        state: u32,
    },
    /// A header field holds a value no writer produces.
    #[error("region {}: impossible value {value} in {field}: {why}", path.display())]
    Corrupt {
        /// The region file.
        path: PathBuf,
        /// Which field, as `struct.field`.
        field: &'static str,
        /// The value read.
        value: u64,
        /// Why it is impossible.
        why: &'static str,
    },
    /// Another process holds the init token and has not finished initializing.
    #[error("region {}: initialization did not finish within {waited_ms} ms (initializer alive but stalled?)", path.display())]
    InitTimeout {
        /// The region file.
        path: PathBuf,
        /// How long this process waited, ms.
        waited_ms: u64,
    },
    /// Every slot is held by a live process: this one cannot join.
    #[error("region {}: all {max} process slots are held by live processes", path.display())]
    SlotsExhausted {
        /// The region file.
        path: PathBuf,
        /// Slots in the region ([`crate::layout::MAX_SLOTS`]).
        max: usize,
    },
    /// A lock could not be had within two leases plus a second (a backstop only a
    /// hostile or broken writer reaches).
    #[error("region {}: gave up on the {lock} lock after {waited_ms} ms: its word kept changing hands without any owner holding it past the lease (a hostile or broken writer?)", path.display())]
    LockTimeout {
        /// The region file.
        path: PathBuf,
        /// Which lock ([`crate::LockId::name`]).
        lock: &'static str,
        /// How long this process waited, ms.
        waited_ms: u64,
    },
    /// The file's filesystem cannot hold the whole region (ENOSPC, EDQUOT).
    #[error("region {}: no space left on its filesystem for the region's {needed} bytes (ENOSPC); free some space or put CUDA_DEVICE_MEMORY_SHARED_CACHE elsewhere", path.display())]
    NoSpace {
        /// The region file.
        path: PathBuf,
        /// The region's size, bytes.
        needed: u64,
    },
    /// The region changed under this process in a way no Vigil writer makes: the file
    /// was truncated, overwritten, zero-filled or re-initialized while mapped. Nothing
    /// in it can be trusted any more, and this process no longer writes to it.
    #[error("region {}: damaged under this process ({what}); it is no longer used", path.display())]
    Damaged {
        /// The region file.
        path: PathBuf,
        /// What the integrity check found (the first damage found, latched).
        what: &'static str,
    },
    /// The region was damaged under live processes and has not yet been told what
    /// they hold: `orphans` of them have not re-attached. Until they have, its totals
    /// understate the device's use and a reservation cannot be checked.
    #[error("region {}: recovering from damage; {orphans} process(es) that were using it have not re-attached, so its totals are incomplete", path.display())]
    Recovering {
        /// The region file.
        path: PathBuf,
        /// Live processes that used the damaged region and have not re-attached.
        orphans: usize,
    },
    /// The path names something other than one regular file (a FIFO, a device, a
    /// directory, a file with several names): never mapped or written.
    #[error("region {}: {what}; refusing to use it", path.display())]
    NotRegularFile {
        /// The path as given.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// A slot operation by a process that does not hold that slot (a forked child
    /// that did not re-attach, or a stale handle).
    #[error("region {}: slot {slot} is not held by this process{hint}", path.display())]
    SlotNotHeld {
        /// The region file.
        path: PathBuf,
        /// The slot index named.
        slot: u16,
        /// A likely cause, appended to the message ("" if none).
        hint: &'static str,
    },
    /// A lock asked for again by the slot that holds it.
    #[error("region {}: the {lock} lock is already held by this slot", path.display())]
    AlreadyHeld {
        /// The region file.
        path: PathBuf,
        /// Which lock ([`crate::LockId::name`]).
        lock: &'static str,
    },
    /// A device index past the region's device count.
    #[error("region {}: device {device} is not in this region ({devices} devices)", path.display())]
    NoSuchDevice {
        /// The region file.
        path: PathBuf,
        /// The device index asked for.
        device: usize,
        /// Devices in the region.
        devices: usize,
    },
    /// An [`InitParams`](crate::InitParams) value this crate refuses (too many
    /// devices, a zero lease).
    #[error("region {}: invalid parameter {what}: {why}", path.display())]
    InvalidParam {
        /// The region file.
        path: PathBuf,
        /// The parameter's field name.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

crate::wire_enum! {
    /// Why a reader could not use a file: the `reason` of
    /// `vigil_exporter_region_errors_total`. One list for every reader, Vigil's regions
    /// and HAMi-core's alike (see [`RegionError::error_reason`]).
    pub enum ErrorReason: u8 {
        /// Cannot open, or a named file is missing.
        OpenFailed = 0 => "open_failed",
        /// Shorter than its layout (and not empty: an empty file is being created).
        Truncated = 1 => "truncated",
        /// Not a region of a known kind.
        BadMagic = 2 => "bad_magic",
        /// A layout version this reader does not read.
        BadVersion = 3 => "bad_version",
        /// Impossible values.
        Corrupt = 4 => "corrupt",
        /// A watched file was deleted.
        Vanished = 5 => "vanished",
        /// A symlink, FIFO, socket, device or directory where a region was expected.
        NotRegular = 6 => "not_regular",
        /// Over a reader's cap on files watched.
        LimitExceeded = 7 => "limit_exceeded",
        /// Out of file descriptors (EMFILE, ENFILE): says nothing about the file.
        FdExhausted = 8 => "fd_exhausted",
    }
}

impl ErrorReason {
    /// What a failure to open or read a file counts as: running out of file
    /// descriptors says nothing about the file; anything else is a failed open.
    pub fn of_io(e: &std::io::Error) -> ErrorReason {
        match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => ErrorReason::FdExhausted,
            _ => ErrorReason::OpenFailed,
        }
    }
}

impl RegionError {
    /// What a reader counts this failure of `open` or `revalidate` as. `None` when
    /// nothing is wrong with the file yet: a region being created (not ready, empty,
    /// or still all zero), which a reader retries quietly.
    pub fn error_reason(&self) -> Option<ErrorReason> {
        Some(match self {
            RegionError::NotReady { .. }
            | RegionError::Truncated { len: 0, .. }
            | RegionError::WrongMagic { found: 0, .. } => return None,
            RegionError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ELOOP) => ErrorReason::NotRegular,
                _ => ErrorReason::of_io(source),
            },
            RegionError::NotRegularFile { .. } => ErrorReason::NotRegular,
            RegionError::Truncated { .. } => ErrorReason::Truncated,
            RegionError::WrongMagic { .. } => ErrorReason::BadMagic,
            RegionError::UnsupportedVersion { .. } => ErrorReason::BadVersion,
            _ => ErrorReason::Corrupt,
        })
    }

    /// A short stable label of the variant, for logs and tests (not a metric label:
    /// see [`RegionError::error_reason`]).
    pub fn reason(&self) -> &'static str {
        match self {
            RegionError::Io { .. } => "io",
            RegionError::Truncated { .. } => "truncated",
            RegionError::WrongMagic { .. } => "bad_magic",
            RegionError::UnsupportedVersion { .. } => "bad_version",
            RegionError::NotReady { .. } => "not_ready",
            RegionError::Corrupt { .. } => "corrupt",
            RegionError::InitTimeout { .. } => "init_timeout",
            RegionError::SlotsExhausted { .. } => "slots_exhausted",
            RegionError::LockTimeout { .. } => "lock_timeout",
            RegionError::NoSpace { .. } => "no_space",
            RegionError::Damaged { .. } => "damaged",
            RegionError::Recovering { .. } => "recovering",
            RegionError::InvalidParam { .. } => "invalid_param",
            RegionError::NotRegularFile { .. } => "not_regular",
            RegionError::SlotNotHeld { .. } => "slot_not_held",
            RegionError::AlreadyHeld { .. } => "already_held",
            RegionError::NoSuchDevice { .. } => "no_such_device",
        }
    }
}

/// Wraps an I/O failure of `op` on the region at `path`.
pub(crate) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> RegionError + 'a {
    move |source| RegionError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

use std::path::{Path, PathBuf};
use thiserror::Error;

/// Everything that can go wrong with a region. Every message names the file.
#[derive(Debug, Error)]
pub enum RegionError {
    #[error("region {}: cannot {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("region {}: file is {len} bytes but a layout v{} region needs {expected} (truncated, or not a Vigil region)", path.display(), crate::layout::LAYOUT_VERSION)]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    // The bytes found are kept for tools but never printed: the file may be anything
    // a tenant pointed us at.
    #[error("region {}: bad magic (expected \"VIGILRGN\"): not a Vigil region", path.display())]
    WrongMagic { path: PathBuf, found: u64 },
    #[error("region {}: layout version {found} is not supported (this build reads v{supported}); upgrade the reader or remove the file once no process uses it", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("region {}: not initialized yet (state {state})", path.display())]
    NotReady { path: PathBuf, state: u32 },
    #[error("region {}: impossible value {value} in {field}: {why}", path.display())]
    Corrupt {
        path: PathBuf,
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("region {}: initialization did not finish within {waited_ms} ms (initializer alive but stalled?)", path.display())]
    InitTimeout { path: PathBuf, waited_ms: u64 },
    #[error("region {}: all {max} process slots are held by live processes", path.display())]
    SlotsExhausted { path: PathBuf, max: usize },
    #[error("region {}: gave up on the {lock} lock after {waited_ms} ms: its word kept changing hands without any owner holding it past the lease (a hostile or broken writer?)", path.display())]
    LockTimeout {
        path: PathBuf,
        lock: &'static str,
        waited_ms: u64,
    },
    #[error("region {}: no space left on its filesystem for the region's {needed} bytes (ENOSPC); free some space or put CUDA_DEVICE_MEMORY_SHARED_CACHE elsewhere", path.display())]
    NoSpace { path: PathBuf, needed: u64 },
    /// The region changed under this process in a way no Vigil writer makes: the file
    /// was truncated, overwritten, zero-filled or re-initialized while mapped. Nothing
    /// in it can be trusted any more, and this process no longer writes to it.
    #[error("region {}: damaged under this process ({what}); it is no longer used", path.display())]
    Damaged { path: PathBuf, what: &'static str },
    /// The region was damaged under live processes and has not yet been told what
    /// they hold: `orphans` of them have not re-attached. Until they have, its totals
    /// understate the device's use and a reservation cannot be checked.
    #[error("region {}: recovering from damage; {orphans} process(es) that were using it have not re-attached, so its totals are incomplete", path.display())]
    Recovering { path: PathBuf, orphans: usize },
    /// The path names something other than one regular file (a FIFO, a device, a
    /// directory, a file with several names): never mapped or written.
    #[error("region {}: {what}; refusing to use it", path.display())]
    NotRegularFile { path: PathBuf, what: String },
    /// A slot operation by a process that does not hold that slot (a forked child
    /// that did not re-attach, or a stale handle).
    #[error("region {}: slot {slot} is not held by this process{hint}", path.display())]
    SlotNotHeld {
        path: PathBuf,
        slot: u16,
        hint: &'static str,
    },
    /// A lock asked for again by the slot that holds it.
    #[error("region {}: the {lock} lock is already held by this slot", path.display())]
    AlreadyHeld { path: PathBuf, lock: &'static str },
    /// A device index past the region's device count.
    #[error("region {}: device {device} is not in this region ({devices} devices)", path.display())]
    NoSuchDevice {
        path: PathBuf,
        device: usize,
        devices: usize,
    },
    #[error("region {}: invalid parameter {what}: {why}", path.display())]
    InvalidParam {
        path: PathBuf,
        what: &'static str,
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
                Some(libc::EMFILE) | Some(libc::ENFILE) => ErrorReason::FdExhausted,
                _ => ErrorReason::OpenFailed,
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

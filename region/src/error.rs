use std::path::PathBuf;
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
    #[error("region {}: invalid parameter {what}: {why}", path.display())]
    InvalidParam {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
}

impl RegionError {
    /// A short stable label for metrics (`vigil_exporter_region_errors_total{reason}`).
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
        }
    }
}

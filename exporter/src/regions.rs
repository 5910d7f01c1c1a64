//! Region discovery and tracking.
//!
//! Sources are `--region PATH` (repeatable) and `--regions-dir DIR`, rescanned every
//! scan interval. In the directory, a candidate is a **regular file named `*.cache`**
//! (not hidden) directly in it or one level down (HAMi's
//! `DIR/<pod-uid>_<container>/*.cache`). Tenants write those directories, so the walk
//! trusts nothing in them (docs/security.md, F2 and F4):
//!
//! - each level is opened relative to its parent's descriptor with `O_NOFOLLOW`
//!   (`O_DIRECTORY` for the subdirectories) and listed through that descriptor, so a
//!   symlink is never followed, whether it names a file or a directory;
//! - a new candidate is opened `O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` relative
//!   to its directory's descriptor and `fstat`ed: only a regular file goes on (a FIFO
//!   cannot block us, a device is never read). `vigil_region::RegionReader::open`
//!   applies the same flags and check whenever the region is opened again by path;
//! - symlinks, FIFOs, sockets, devices and directories named `*.cache` are counted
//!   as `reason="not_regular"`, once per file version, and never opened;
//! - at most `--regions.max-per-dir` regions per directory and `--regions.max` in
//!   all are watched; the rest are counted as `reason="limit_exceeded"` and logged,
//!   once per file. Already watched regions keep their place, then files that have
//!   not failed before, by name. At most [`MAX_DIR_ENTRIES`] entries of a directory
//!   are looked at per scan.
//!
//! By default a region stays mapped between reads (revalidated each time). With
//! `--regions.map-per-read` it is mapped only while it is read: at each scrape, each
//! drain pass and each rescan we open it read-only, validate it, read and unmap.
//!
//! Errors are counted in `vigil_exporter_region_errors_total{reason}` once per
//! failure of a given file version (device, inode, size, mtime), logged with the file
//! name, and the file is retried only when it changes. Nothing here panics on file
//! contents: `vigil_region::RegionReader` validates every field it maps, a mapping
//! that faulted because the file was truncated under it is dropped
//! (`RegionReader::is_poisoned`, `reason="truncated"`), and every per-region step of a
//! rescan or drain pass runs under `catch_unwind`, so one region can never stop the
//! others.

use crate::drain::RegionDrain;
use crate::hami::Attachments;
use crate::hostpid::{HostPidChecker, RegionChecks};
use crate::labels::{region_labels, LabelPolicy, RegionLabels};
use crate::trace::TraceSink;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{debug, error, info, warn};
use vigil_region::{RegionError, RegionReader, Snapshot};

/// Every `reason` of `vigil_exporter_region_errors_total`, all exported from start:
/// the region crate's one list.
pub use vigil_region::ErrorReason;

/// `--proc.path` default.
pub const DEFAULT_PROC_PATH: &str = "/proc";
/// `--proc.scan-interval` default.
pub const DEFAULT_PROC_SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// Entries of one directory looked at per scan; the rest are ignored (logged once).
pub const MAX_DIR_ENTRIES: usize = 4096;
/// The same for the top directory (one entry per container on the node).
pub const MAX_TOP_DIR_ENTRIES: usize = 65536;
/// Events delivered per region per drain pass (one ring's worth).
pub const MAX_EVENTS_PER_REGION_PASS: usize = vigil_region::layout::RING_CAPACITY;
/// Events delivered per drain pass over all regions; regions past it wait for the
/// next pass (their oldest events may then be counted as overwritten).
pub const MAX_EVENTS_PER_PASS: u64 = 1 << 20;

/// Caps on what discovery watches (docs/security.md, F4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--regions.max`: regions watched in all (explicit `--region` paths included,
    /// and never dropped for the cap).
    pub max_regions: usize,
    /// `--regions.max-per-dir`: regions watched per directory.
    pub max_per_dir: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_regions: 512,
            max_per_dir: 4,
        }
    }
}

/// What a failed open means for the exporter.
enum OpenFailure {
    /// Being created or re-initialized right now: retry quietly, count nothing.
    NotYet,
    /// The file is gone.
    Missing,
    /// Out of file descriptors: says nothing about the file; known regions are kept
    /// (and served as last read) and new ones retried.
    NoDescriptors,
    Error(ErrorReason),
}

fn classify(e: &RegionError) -> OpenFailure {
    match (e, e.error_reason()) {
        // Being created or re-initialized right now (see `error_reason`).
        (_, None) => OpenFailure::NotYet,
        (RegionError::Io { source, .. }, _) if source.kind() == std::io::ErrorKind::NotFound => {
            OpenFailure::Missing
        }
        (_, Some(ErrorReason::FdExhausted)) => OpenFailure::NoDescriptors,
        (_, Some(r)) => OpenFailure::Error(r),
    }
}

/// Identifies one version of a file, so a failure is counted once, not per rescan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileKey {
    fn of(m: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }
}

/// True if both name the same file (device, inode), whatever its size and mtime.
fn same_file(a: &Option<FileKey>, b: &Option<FileKey>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a.dev, a.ino) == (b.dev, b.ino),
        (None, None) => true,
        _ => false,
    }
}

/// The version of whatever the path names, without following a symlink.
fn file_key(path: &Path) -> Option<FileKey> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| FileKey::of(&m))
}

/// A kept mapping and the (device, inode) of the file it maps.
type CachedReader = (Arc<RegionReader>, (u64, u64));

/// One watched region.
pub struct Tracked {
    pub path: PathBuf,
    /// Path relative to the regions directory, if it came from there.
    pub rel: Option<PathBuf>,
    labels: Mutex<RegionLabels>,
    /// Ring cursor, lost-event counts and trace assembly; only the background task
    /// locks it for long.
    pub drain: Mutex<RegionDrain>,
    /// Copy of the drain's lost counts (overwritten, torn, abandoned), so scrapes
    /// never wait for a drain pass.
    lost: [AtomicU64; 3],
    /// Unless `--regions.map-per-read`: the mapping kept between reads, and the
    /// (device, inode) it was opened from.
    cached: Mutex<Option<CachedReader>>,
    /// Some histogram of this region is impossible (counted once per episode).
    corrupt_histograms: AtomicBool,
    /// Host-PID checks of this region's slots (see `hostpid`); only scrapes use it.
    pub host_pid_checks: Mutex<RegionChecks>,
    /// With `--regions.map-per-read`: the last snapshot a scrape read, served while
    /// the region cannot be opened for lack of file descriptors. (A kept mapping
    /// needs no new descriptor, and is itself the fallback otherwise.)
    last: Mutex<Option<Arc<Snapshot>>>,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tracked {
    pub fn lost(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.lost[i].load(Relaxed))
    }

    fn drain_once(&self, r: &RegionReader, max: usize) -> u64 {
        let mut d = lock(&self.drain);
        let n = d.drain_max(r, max);
        let l = d.lost();
        for (dst, v) in self.lost.iter().zip([l.overwritten, l.torn, l.abandoned]) {
            dst.store(v, Relaxed);
        }
        n
    }

    pub fn labels(&self) -> RegionLabels {
        lock(&self.labels).clone()
    }
}

/// A candidate file: where it is, its `region` label, its path relative to the dir,
/// and (for a new directory file) the version its descriptor was `fstat`ed at.
struct Candidate {
    path: PathBuf,
    label: String,
    rel: Option<PathBuf>,
    key: Option<FileKey>,
}

/// What one scan of the sources found.
#[derive(Default)]
struct Scan {
    /// Within the limits, explicit paths first.
    cands: Vec<Candidate>,
    /// Entries that are not regular files: (path, version, what it is).
    rejected: Vec<(PathBuf, Option<FileKey>, &'static str)>,
    /// Regular `*.cache` files over a limit: (path, which limit, version).
    over_limit: Vec<(PathBuf, &'static str, Option<FileKey>)>,
    /// Directories that could not be listed for lack of file descriptors: their
    /// watched regions are kept, and no new region is admitted in this pass.
    incomplete: Vec<PathBuf>,
}

#[derive(Default)]
struct Inner {
    tracked: BTreeMap<PathBuf, Arc<Tracked>>,
    /// HAMi-core regions (see `hami`): read at each scrape, never mapped.
    hami: BTreeMap<PathBuf, Arc<HamiTracked>>,
    /// Files that failed, with the version that failed (None: did not exist).
    failed: HashMap<PathBuf, Option<FileKey>>,
    /// Files counted as over a limit, with the version counted: counted again only
    /// once the path names another file (device, inode); forgotten once it is no
    /// longer listed. A live region's mtime moves as its workload writes it, so over
    /// the limit it stays one file, not a new version per write.
    limited: HashMap<PathBuf, Option<FileKey>>,
    /// Directories already reported as having too many entries.
    crowded: HashSet<PathBuf>,
}

/// All watched regions and the error counters. Mutated only by the background task;
/// scrapes take the lock just long enough to copy the list (or to drop a region
/// whose mapping faulted).
pub struct RegionSet {
    explicit: Vec<PathBuf>,
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
    errors: [AtomicU64; ErrorReason::ALL.len()],
    sink: Option<Arc<dyn TraceSink>>,
    keep_mapped: bool,
    policy: LabelPolicy,
    limits: Limits,
    /// Where the next drain pass starts, so a pass budget is shared fairly.
    drain_start: AtomicUsize,
    /// `--proc.path` and `--proc.scan-interval`: host-PID checks against the kernel.
    host_pid: HostPidChecker,
    /// When running out of descriptors was last logged, and failures since.
    fd_log: Mutex<(Option<std::time::Instant>, u64)>,
    /// Who maps each HAMi-core region (same `--proc.path` and interval as `host_pid`).
    attachments: Attachments,
    /// `--nvml`: the driver's view, refreshed in the background.
    nvml: crate::nvml::NvmlSource,
}

/// One watched HAMi-core region.
#[derive(Debug)]
pub struct HamiTracked {
    pub path: PathBuf,
    pub rel: Option<PathBuf>,
    pub labels: RegionLabels,
}

/// What a scrape needs of one HAMi-core region.
#[derive(Debug, Clone)]
pub struct HamiView {
    pub labels: RegionLabels,
    pub region: vigil_hami::HamiRegion,
    pub eval: crate::hami::Eval,
}

impl std::fmt::Debug for RegionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionSet")
            .field("explicit", &self.explicit)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Poisoning only means another thread panicked mid-update of plain data; the data
/// is still usable, and the exporter must keep serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The text of a caught panic, for the log.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn has_cache_suffix(name: &OsStr) -> bool {
    name.as_bytes().ends_with(b".cache")
}

/// `openat(dir, name, flags)`; `dir` None means the current directory.
fn openat(dir: Option<&OwnedFd>, name: &OsStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a valid NUL-terminated string; `at` is an open descriptor or
    // AT_FDCWD; on success we own the returned descriptor.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lists a directory through its descriptor (never through a path a tenant could
/// swap): `(name, file type without following symlinks)`, at most `max` entries,
/// and whether there were more.
/// Err(()) only when out of file descriptors (any other failure lists nothing: the
/// directory is gone).
fn list_dir(
    fd: &OwnedFd,
    fallback: &Path,
    max: usize,
) -> Result<(Vec<(OsString, std::fs::FileType)>, bool), ()> {
    // /proc/self/fd/N names exactly the directory we opened. Without /proc, fall back
    // to the path (the top directory is the operator's; subdirectories were checked
    // to be real directories when opened).
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let rd = std::fs::read_dir(&via_fd).or_else(|_| std::fs::read_dir(fallback));
    if let Err(e) = &rd {
        if crate::hostpid::is_out_of_fds(e) {
            return Err(());
        }
    }
    let mut out = Vec::new();
    let mut more = false;
    if let Ok(rd) = rd {
        for e in rd.flatten() {
            if out.len() >= max {
                more = true;
                break;
            }
            // DirEntry::file_type does not follow symlinks.
            if let Ok(ft) = e.file_type() {
                out.push((e.file_name(), ft));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, more))
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// What [`check_regular`] found.
enum Check {
    Regular(FileKey),
    /// Not a regular file: what it is.
    Not(&'static str),
    /// Gone since it was listed.
    Gone,
    /// Could not tell (e.g. permission denied): the region open will say why.
    Unknown,
}

/// Opens `name` in `dir` with `O_PATH | O_NOFOLLOW` (which opens nothing: no FIFO
/// can block, no device sees an open, a symlink is not followed) and `fstat`s the
/// descriptor: a regular file gives its version.
fn check_regular(dir: &OwnedFd, name: &OsStr) -> Check {
    match openat(Some(dir), name, libc::O_PATH | libc::O_NOFOLLOW) {
        Ok(fd) => match std::fs::File::from(fd).metadata() {
            Ok(m) if m.file_type().is_file() => Check::Regular(FileKey::of(&m)),
            Ok(m) => Check::Not(kind_of(&m.file_type())),
            Err(_) => Check::Unknown,
        },
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Check::Not("a symlink"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::Gone,
        Err(_) => Check::Unknown,
    }
}

impl RegionSet {
    pub fn new(
        explicit: Vec<PathBuf>,
        dir: Option<PathBuf>,
        sink: Option<Arc<dyn TraceSink>>,
    ) -> RegionSet {
        RegionSet {
            explicit,
            dir,
            inner: Mutex::new(Inner::default()),
            errors: Default::default(),
            sink,
            keep_mapped: false,
            policy: LabelPolicy::default(),
            limits: Limits::default(),
            drain_start: AtomicUsize::new(0),
            host_pid: HostPidChecker::new(
                PathBuf::from(DEFAULT_PROC_PATH),
                DEFAULT_PROC_SCAN_INTERVAL,
            ),
            fd_log: Mutex::new((None, 0)),
            attachments: Attachments::new(
                PathBuf::from(DEFAULT_PROC_PATH),
                DEFAULT_PROC_SCAN_INTERVAL,
            ),
            nvml: crate::nvml::NvmlSource::off(),
        }
    }

    /// Where NVML comes from (`--nvml`, `--nvml.library`, `--nvml.interval`).
    pub fn with_nvml(mut self, nvml: crate::nvml::NvmlSource) -> RegionSet {
        self.nvml = nvml;
        self
    }

    /// The latest NVML snapshot (the first call loads NVML; see `nvml`).
    pub fn nvml_state(&self) -> crate::nvml::NvmlState {
        self.nvml.state()
    }

    /// Where to look for the slots' processes (`--proc.path`) and how often `/proc`
    /// may be scanned for new ones (`--proc.scan-interval`); see `hostpid`.
    pub fn with_host_pid_checks(mut self, proc_root: PathBuf, min_interval: Duration) -> RegionSet {
        self.attachments = Attachments::new(proc_root.clone(), min_interval);
        self.host_pid = HostPidChecker::new(proc_root, min_interval);
        self
    }

    pub fn host_pid_checker(&self) -> &HostPidChecker {
        &self.host_pid
    }

    /// Keep regions mapped between reads: scrapes skip re-mapping and first-touch
    /// page faults (about 65 µs a region), at the price of the touched pages (slot
    /// table and ring, up to 1.7 MiB a region of shared page cache) counting in the
    /// exporter's RSS.
    pub fn with_keep_mapped(mut self, keep: bool) -> RegionSet {
        self.keep_mapped = keep;
        self
    }

    /// Where `namespace`, `pod` and `container` may come from (see `labels`).
    pub fn with_label_policy(mut self, policy: LabelPolicy) -> RegionSet {
        self.policy = policy;
        self
    }

    /// Caps on the number of regions watched.
    pub fn with_limits(mut self, limits: Limits) -> RegionSet {
        self.limits = Limits {
            max_regions: limits.max_regions.max(1),
            max_per_dir: limits.max_per_dir.max(1),
        };
        self
    }

    /// A read-only handle on a tracked region: a fresh mapping, or with
    /// `keep_mapped` the cached one if the path still names the same, valid file.
    pub fn reader(&self, t: &Tracked) -> Result<Arc<RegionReader>, RegionError> {
        if self.keep_mapped {
            let mut c = lock(&t.cached);
            let mut old = None;
            if let Some((r, id)) = c.as_ref() {
                let same = std::fs::symlink_metadata(&t.path)
                    .map(|m| (m.dev(), m.ino()) == *id)
                    .unwrap_or(false);
                let valid = !r.is_poisoned() && r.revalidate().is_ok();
                if same && valid {
                    return Ok(r.clone());
                }
                if valid {
                    old = c.take();
                }
                *c = None;
            }
            let r = match RegionReader::open(&t.path) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    // Out of descriptors: the mapping we have is the last known state.
                    if let (OpenFailure::NoDescriptors, Some(o)) = (classify(&e), old) {
                        self.note_no_fds(&t.path, &e.to_string());
                        let r = o.0.clone();
                        *c = Some(o);
                        return Ok(r);
                    }
                    return Err(e);
                }
            };
            if let Ok(m) = std::fs::symlink_metadata(&t.path) {
                *c = Some((r.clone(), (m.dev(), m.ino())));
            }
            return Ok(r);
        }
        Ok(Arc::new(RegionReader::open(&t.path)?))
    }

    /// How many regions are watched now.
    pub fn tracked_count(&self) -> usize {
        lock(&self.inner).tracked.len()
    }

    /// Current regions, in label order.
    pub fn tracked(&self) -> Vec<Arc<Tracked>> {
        lock(&self.inner).tracked.values().cloned().collect()
    }

    /// `(reason, count)` for every reason.
    pub fn error_counts(&self) -> [(&'static str, u64); ErrorReason::ALL.len()] {
        std::array::from_fn(|i| (ErrorReason::ALL[i].name(), self.errors[i].load(Relaxed)))
    }

    fn count_error(&self, r: ErrorReason) {
        self.errors[r as usize].fetch_add(1, Relaxed);
    }

    /// Counts an open or listing that failed for lack of file descriptors
    /// (`fd_exhausted`), logging at most once a minute. Nothing is dropped for it.
    pub fn note_no_fds(&self, path: &Path, e: &str) {
        self.count_error(ErrorReason::FdExhausted);
        let mut l = lock(&self.fd_log);
        l.1 += 1;
        if l.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            warn!(
                "{}: {e}: out of file descriptors ({} such failures since the last report; counted as reason=\"fd_exhausted\"); watched regions are kept and served as last read",
                path.display(),
                l.1
            );
            *l = (Some(std::time::Instant::now()), 0);
        }
    }

    /// A scrape's read of `t`: a snapshot, or the last one when the region cannot be
    /// opened for lack of file descriptors. None if it cannot be read now (the
    /// background task counts and drops broken ones) or its mapping faulted (dropped
    /// here).
    pub fn scrape_snapshot(&self, t: &Arc<Tracked>) -> Option<Snapshot> {
        match self.reader(t) {
            Ok(r) => {
                let snap = r.snapshot();
                if r.is_poisoned() {
                    self.mapping_faulted(t);
                    return None;
                }
                if !self.keep_mapped {
                    *lock(&t.last) = Some(Arc::new(snap.clone()));
                }
                Some(snap)
            }
            Err(e) => match classify(&e) {
                OpenFailure::NoDescriptors => {
                    self.note_no_fds(&t.path, &e.to_string());
                    lock(&t.last).as_deref().cloned()
                }
                _ => None,
            },
        }
    }

    /// A read of `t`'s mapping faulted because its file was truncated under it (the
    /// SIGBUS guard replaced the pages with zeros): what was read is worthless, and
    /// the region is dropped until its file changes.
    pub fn mapping_faulted(&self, t: &Arc<Tracked>) {
        *lock(&t.cached) = None;
        self.drop_region(t, ErrorReason::Truncated, "file truncated while mapped");
    }

    /// Notes whether `t`'s histograms were all plausible in this read; the first
    /// read with an impossible one is counted as `corrupt` and logged.
    pub fn note_histograms(&self, t: &Tracked, all_ok: bool) {
        let was_bad = t.corrupt_histograms.swap(!all_ok, Relaxed);
        if !all_ok && !was_bad {
            self.count_error(ErrorReason::Corrupt);
            warn!(
                "region {}: impossible histogram (buckets overflow or disagree with the count); its series are left out until it is consistent (counted as reason=\"corrupt\")",
                t.path.display()
            );
        }
    }

    /// Lists the sources, applying the file rules and the limits.
    fn scan(&self) -> Scan {
        let mut scan = Scan::default();
        for p in &self.explicit {
            scan.cands.push(Candidate {
                path: p.clone(),
                label: p.display().to_string(),
                rel: None,
                key: None,
            });
        }
        let Some(dir) = &self.dir else {
            return scan;
        };
        let (tracked, failed): (HashSet<PathBuf>, HashMap<PathBuf, Option<FileKey>>) = {
            let inner = lock(&self.inner);
            (
                inner
                    .tracked
                    .keys()
                    .chain(inner.hami.keys())
                    .cloned()
                    .collect(),
                inner.failed.clone(),
            )
        };
        // The top directory is the operator's: it may be reached through a symlink.
        let top = match openat(
            None,
            dir.as_os_str(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
        ) {
            Ok(fd) => fd,
            Err(e) if crate::hostpid::is_out_of_fds(&e) => {
                self.note_no_fds(dir, &e.to_string());
                scan.incomplete.push(dir.clone());
                return scan;
            }
            Err(e) => {
                warn!("regions dir {}: cannot open: {e}", dir.display());
                return scan;
            }
        };
        // Per directory, the files that may become regions, in preference order.
        let mut per_dir: Vec<Vec<Candidate>> = Vec::new();
        let mut files = Vec::new();
        let Ok((entries, more)) = list_dir(&top, dir, MAX_TOP_DIR_ENTRIES) else {
            self.note_no_fds(dir, "cannot list the directory");
            scan.incomplete.push(dir.clone());
            return scan;
        };
        self.note_crowded(dir, more, MAX_TOP_DIR_ENTRIES);
        for (name, ft) in entries {
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let path = dir.join(&name);
            if ft.is_dir() {
                let flags =
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
                let sub = match openat(Some(&top), &name, flags) {
                    Ok(sub) => sub,
                    Err(e) if crate::hostpid::is_out_of_fds(&e) => {
                        self.note_no_fds(&path, &e.to_string());
                        scan.incomplete.push(path);
                        continue;
                    }
                    Err(_) => continue, // gone, or swapped for something else: next scan
                };
                let Ok((sub_entries, more)) = list_dir(&sub, &path, MAX_DIR_ENTRIES) else {
                    self.note_no_fds(&path, "cannot list the directory");
                    scan.incomplete.push(path);
                    continue;
                };
                self.note_crowded(&path, more, MAX_DIR_ENTRIES);
                let mut sub_files = Vec::new();
                for (fname, fft) in sub_entries {
                    let fpath = path.join(&fname);
                    let rel = PathBuf::from(&name).join(&fname);
                    self.classify_entry(&sub, &fname, &fft, fpath, rel, &mut scan, &mut sub_files);
                }
                per_dir.push(sub_files);
            } else if ft.is_symlink() {
                // Would have been followed into a directory or a file elsewhere.
                scan.rejected
                    .push((path.clone(), file_key(&path), "a symlink"));
            } else {
                let rel = PathBuf::from(&name);
                self.classify_entry(&top, &name, &ft, path, rel, &mut scan, &mut files);
            }
        }
        per_dir.push(files);

        // Limits: per directory, then in all. Watched regions keep their place, then
        // files that have not failed (or changed since they failed), then by name.
        let rank = |c: &Candidate| -> u8 {
            if tracked.contains(&c.path) {
                0
            } else if c.key.is_some() && failed.get(&c.path) == Some(&c.key) {
                2
            } else {
                1
            }
        };
        // (rank, place in its directory, candidate): the overall cap then takes
        // watched regions first, and otherwise goes round the directories, so one
        // tenant's files cannot crowd out another's.
        let mut admitted: Vec<(u8, usize, Candidate)> = Vec::new();
        for mut files in per_dir {
            files.sort_by_key(|c| rank(c));
            let keep = files.len().min(self.limits.max_per_dir);
            for c in files.drain(keep..) {
                scan.over_limit
                    .push((c.path, "--regions.max-per-dir", c.key));
            }
            admitted.extend(files.into_iter().enumerate().map(|(i, c)| (rank(&c), i, c)));
        }
        admitted.sort_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| a.2.path.cmp(&b.2.path))
        });
        let mut admitted: Vec<Candidate> = admitted.into_iter().map(|(_, _, c)| c).collect();
        let room = self.limits.max_regions.saturating_sub(scan.cands.len());
        let keep = admitted.len().min(room);
        for c in admitted.drain(keep..) {
            scan.over_limit.push((c.path, "--regions.max", c.key));
        }
        // A file named by --region and also found in the directory is watched once,
        // under its --region label.
        let explicit: HashSet<PathBuf> = self.explicit.iter().cloned().collect();
        scan.cands
            .extend(admitted.into_iter().filter(|c| !explicit.contains(&c.path)));
        if !scan.incomplete.is_empty() {
            // Part of the tree is unseen: its regions' places are unknown, so the
            // limits cannot be judged. Keep what is watched, admit nothing new.
            scan.cands
                .retain(|c| c.rel.is_none() || tracked.contains(&c.path));
            scan.over_limit.clear();
        }
        scan
    }

    /// Sorts one directory entry into candidates (regular `*.cache` files) and
    /// rejects (anything else named `*.cache`); other names are ignored.
    #[allow(clippy::too_many_arguments)]
    fn classify_entry(
        &self,
        dirfd: &OwnedFd,
        name: &OsStr,
        ft: &std::fs::FileType,
        path: PathBuf,
        rel: PathBuf,
        scan: &mut Scan,
        out: &mut Vec<Candidate>,
    ) {
        if name.as_bytes().starts_with(b".") || !has_cache_suffix(name) {
            return;
        }
        if !ft.is_file() {
            let key = file_key(&path);
            scan.rejected.push((path, key, kind_of(ft)));
            return;
        }
        let known = lock(&self.inner).tracked.contains_key(&path);
        let key = if known {
            None
        } else {
            // Listed as a regular file; make sure of it through a descriptor.
            match check_regular(dirfd, name) {
                Check::Regular(k) => Some(k),
                Check::Not(what) => {
                    let key = file_key(&path);
                    scan.rejected.push((path, key, what));
                    return;
                }
                Check::Gone => return,
                Check::Unknown => None,
            }
        };
        out.push(Candidate {
            label: rel.display().to_string(),
            path,
            rel: Some(rel),
            key,
        });
    }

    fn note_crowded(&self, dir: &Path, more: bool, max: usize) {
        let mut inner = lock(&self.inner);
        if !more {
            inner.crowded.remove(dir);
        } else if inner.crowded.insert(dir.to_path_buf()) {
            drop(inner);
            warn!(
                "directory {}: more than {max} entries; only the first {max} are considered",
                dir.display()
            );
        }
    }

    /// Finds new regions, refreshes labels of known ones, and drops vanished or
    /// broken ones. Called by the background task only. A panic while handling one
    /// file is caught and logged; the others are handled regardless.
    pub fn rescan(&self) {
        let scan = match catch_unwind(AssertUnwindSafe(|| self.scan())) {
            Ok(s) => s,
            Err(p) => {
                error!("regions scan panicked: {}", panic_text(&*p));
                return;
            }
        };
        let (known, known_hami): (
            BTreeMap<PathBuf, Arc<Tracked>>,
            BTreeMap<PathBuf, Arc<HamiTracked>>,
        ) = {
            let inner = lock(&self.inner);
            (inner.tracked.clone(), inner.hami.clone())
        };
        let listed: HashSet<&Path> = scan.cands.iter().map(|c| c.path.as_path()).collect();
        let rejected: HashMap<&Path, &'static str> = scan
            .rejected
            .iter()
            .map(|(p, _, w)| (p.as_path(), *w))
            .collect();
        // Directory files that are no longer listed are gone (or were replaced by
        // something that is not a regular file).
        let unseen = |p: &Path| scan.incomplete.iter().any(|d| p.starts_with(d));
        for (p, t) in &known {
            if t.rel.is_some() && !listed.contains(p.as_path()) && !unseen(p) {
                match rejected.get(p.as_path()) {
                    Some(what) => {
                        self.drop_region(t, ErrorReason::NotRegular, &format!("now {what}"))
                    }
                    None => self.drop_region(t, ErrorReason::Vanished, "file deleted"),
                }
            }
        }
        for (p, t) in &known_hami {
            if t.rel.is_some() && !listed.contains(p.as_path()) && !unseen(p) {
                match rejected.get(p.as_path()) {
                    Some(what) => {
                        self.drop_hami(t, ErrorReason::NotRegular, &format!("now {what}"))
                    }
                    None => self.drop_hami(t, ErrorReason::Vanished, "file deleted"),
                }
            }
        }
        for (path, key, what) in &scan.rejected {
            self.note_rejected(path, *key, what);
        }
        self.note_over_limit(&scan.over_limit);
        let mut seen: HashSet<PathBuf> = HashSet::with_capacity(scan.cands.len());
        seen.extend(scan.rejected.iter().map(|(p, _, _)| p.clone()));
        // Files over a limit are still there: their failures stay remembered, or a
        // file that takes turns with another for a place would be counted each time.
        seen.extend(scan.over_limit.iter().map(|(p, _, _)| p.clone()));
        for c in scan.cands {
            seen.insert(c.path.clone());
            let path = c.path.clone();
            let res = catch_unwind(AssertUnwindSafe(|| {
                if let Some(t) = known_hami.get(&path) {
                    self.recheck_hami(t)
                } else {
                    self.rescan_one(c, known.get(&path))
                }
            }));
            if let Err(p) = res {
                error!(
                    "region {}: rescan panicked ({}); skipped this time",
                    path.display(),
                    panic_text(&*p)
                );
            }
        }
        self.refresh_attachments();
        // Forget failures of files that no longer exist, so the memo stays bounded.
        // (Files in a directory that could not be listed are not known to be gone.)
        let mut inner = lock(&self.inner);
        inner
            .failed
            .retain(|p, k| k.is_none() || seen.contains(p) || unseen(p));
        inner.limited.retain(|p, _| seen.contains(p) || unseen(p));
    }

    fn rescan_one(&self, c: Candidate, known: Option<&Arc<Tracked>>) {
        if let Some(t) = known {
            // Refresh: identity may change if the region was re-created.
            if let Some((reader, snap)) = self.read(t) {
                let labels =
                    region_labels(&c.label, c.rel.as_deref(), &snap.identity, &self.policy);
                lock(&t.drain).check_nonce(&reader, snap.init_nonce, &labels);
                *lock(&t.labels) = labels;
            }
            return;
        }
        let key = c.key.or_else(|| file_key(&c.path));
        if let Some(prev) = lock(&self.inner).failed.get(&c.path) {
            if *prev == key {
                return;
            }
        }
        if vigil_hami::read::looks_like_hami(&c.path) {
            return self.admit_hami(c, key);
        }
        match RegionReader::open(&c.path) {
            Ok(reader) => {
                let snap = reader.snapshot();
                if reader.is_poisoned() {
                    let e = RegionError::Truncated {
                        path: c.path.clone(),
                        len: 0,
                        expected: vigil_region::layout::REGION_SIZE as u64,
                    };
                    self.note_failure(&c.path, key, &e);
                    return;
                }
                let labels =
                    region_labels(&c.label, c.rel.as_deref(), &snap.identity, &self.policy);
                let drain = RegionDrain::new(&reader, &snap, &labels, self.sink.clone());
                info!(
                    "watching region {} (label region=\"{}\")",
                    c.path.display(),
                    c.label
                );
                let t = Arc::new(Tracked {
                    path: c.path.clone(),
                    rel: c.rel,
                    labels: Mutex::new(labels),
                    drain: Mutex::new(drain),
                    lost: Default::default(),
                    cached: Mutex::new(None),
                    corrupt_histograms: AtomicBool::new(false),
                    host_pid_checks: Mutex::new(RegionChecks::default()),
                    last: Mutex::new(None),
                });
                let mut inner = lock(&self.inner);
                inner.failed.remove(&c.path);
                inner.limited.remove(&c.path);
                inner.tracked.insert(c.path, t);
            }
            Err(e) => self.note_failure(&c.path, key, &e),
        }
    }

    /// Counts a directory entry that is not a regular file, once per version.
    fn note_rejected(&self, path: &Path, key: Option<FileKey>, what: &str) {
        let mut inner = lock(&self.inner);
        if inner.failed.get(path) == Some(&key) && key.is_some() {
            return;
        }
        inner.failed.insert(path.to_path_buf(), key);
        drop(inner);
        self.count_error(ErrorReason::NotRegular);
        warn!(
            "{}: {what}, not a regular file: never opened (counted as reason=\"not_regular\")",
            path.display()
        );
    }

    /// Counts files over a limit, once per file while it stays listed (see
    /// `Inner::limited`). A file whose current version already failed to open was
    /// counted then, and is not counted again for being over the limit.
    fn note_over_limit(&self, over: &[(PathBuf, &'static str, Option<FileKey>)]) {
        let mut inner = lock(&self.inner);
        let mut fresh = Vec::new();
        for (p, which, key) in over {
            let key = key.or_else(|| file_key(p));
            if key.is_some() && inner.failed.get(p) == Some(&key) {
                continue;
            }
            match inner.limited.get(p) {
                Some(prev) if same_file(prev, &key) => {}
                _ => {
                    inner.limited.insert(p.clone(), key);
                    fresh.push((p, which));
                }
            }
        }
        drop(inner);
        for (p, which) in fresh {
            self.count_error(ErrorReason::LimitExceeded);
            warn!(
                "{}: not watched: {which} reached (directory {}; counted as reason=\"limit_exceeded\")",
                p.display(),
                p.parent().unwrap_or(Path::new("")).display()
            );
        }
    }

    fn note_failure(&self, path: &Path, key: Option<FileKey>, e: &RegionError) {
        match classify(e) {
            OpenFailure::NotYet => debug!("{e} (will retry)"),
            OpenFailure::NoDescriptors => self.note_no_fds(path, &e.to_string()),
            OpenFailure::Missing => {
                // Only explicit --region paths get here; report once until it appears.
                let mut inner = lock(&self.inner);
                if inner.failed.insert(path.to_path_buf(), None) != Some(None) {
                    drop(inner);
                    self.count_error(ErrorReason::OpenFailed);
                    warn!("{e} (--region file missing; will keep looking)");
                }
            }
            OpenFailure::Error(r) => {
                let mut inner = lock(&self.inner);
                inner.failed.insert(path.to_path_buf(), key);
                // Already counted, as over a limit, in this very version: once per file.
                let counted = key.is_some() && inner.limited.get(path) == Some(&key);
                drop(inner);
                if counted {
                    debug!(
                        "{e} (already counted as reason=\"limit_exceeded\"; skipped until the file changes)"
                    );
                    return;
                }
                self.count_error(r);
                warn!(
                    "{e} (counted as reason=\"{}\"; skipped until the file changes)",
                    r.name()
                );
            }
        }
    }

    /// Stops watching `t` (if it is still the tracked entry for its path).
    /// Starts watching a HAMi-core region, or counts why it cannot be read.
    fn admit_hami(&self, c: Candidate, key: Option<FileKey>) {
        match vigil_hami::read_region(&c.path) {
            Ok(r) => {
                let labels = region_labels(
                    &c.label,
                    c.rel.as_deref(),
                    &vigil_region::RegionIdentity::default(),
                    &self.policy,
                );
                info!(
                    "watching HAMi-core region {} (version {}.{}, {} processes; label region=\"{}\")",
                    c.path.display(),
                    r.major,
                    r.minor,
                    r.slots.len(),
                    c.label
                );
                let t = Arc::new(HamiTracked {
                    path: c.path.clone(),
                    rel: c.rel,
                    labels,
                });
                let mut inner = lock(&self.inner);
                inner.failed.remove(&c.path);
                inner.limited.remove(&c.path);
                inner.hami.insert(c.path, t);
            }
            Err(e) => self.note_hami_failure(&c.path, key, &e),
        }
    }

    /// A watched HAMi-core region is re-validated at each rescan.
    fn recheck_hami(&self, t: &Arc<HamiTracked>) {
        match vigil_hami::read_region(&t.path) {
            Ok(_) => {}
            Err(vigil_hami::HamiError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                self.drop_hami(t, ErrorReason::Vanished, "file deleted")
            }
            Err(vigil_hami::HamiError::Io { source, .. })
                if crate::hostpid::is_out_of_fds(&source) =>
            {
                self.note_no_fds(&t.path, &source.to_string())
            }
            Err(e) => self.drop_hami(t, e.reason(), &e.to_string()),
        }
    }

    fn note_hami_failure(&self, path: &Path, key: Option<FileKey>, e: &vigil_hami::HamiError) {
        if let vigil_hami::HamiError::Io { source, .. } = e {
            if crate::hostpid::is_out_of_fds(source) {
                return self.note_no_fds(path, &source.to_string());
            }
            if source.kind() == std::io::ErrorKind::NotFound {
                return;
            }
        }
        let mut inner = lock(&self.inner);
        inner.failed.insert(path.to_path_buf(), key);
        drop(inner);
        let r = e.reason();
        self.count_error(r);
        warn!(
            "{e} (HAMi-core region; counted as reason=\"{}\"; skipped until the file changes)",
            r.name()
        );
    }

    fn drop_hami(&self, t: &Arc<HamiTracked>, r: ErrorReason, why: &str) {
        let mut inner = lock(&self.inner);
        match inner.hami.get(&t.path) {
            Some(cur) if Arc::ptr_eq(cur, t) => {
                inner.hami.remove(&t.path);
            }
            _ => return,
        }
        if r != ErrorReason::Vanished {
            inner.failed.insert(t.path.clone(), file_key(&t.path));
        }
        drop(inner);
        self.count_error(r);
        warn!(
            "HAMi-core region {} no longer watched: {why} (counted as reason=\"{}\")",
            t.path.display(),
            r.name()
        );
    }

    /// Rescans who maps the HAMi-core regions, when due (background task only).
    fn refresh_attachments(&self) {
        let paths: Vec<PathBuf> = lock(&self.inner).hami.keys().cloned().collect();
        if paths.is_empty() || !self.attachments.host_view() {
            return;
        }
        let files: HashSet<(u64, u64)> = paths
            .iter()
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        self.attachments.refresh(&files);
    }

    /// How many HAMi-core regions are watched now.
    pub fn hami_count(&self) -> usize {
        lock(&self.inner).hami.len()
    }

    /// Reads and judges every watched HAMi-core region (see `hami`). A region that
    /// cannot be read now is left out of this scrape; the next rescan counts it.
    pub fn hami_views(&self) -> Vec<HamiView> {
        let tracked: Vec<Arc<HamiTracked>> = lock(&self.inner).hami.values().cloned().collect();
        if tracked.is_empty() {
            return Vec::new();
        }
        let read: Vec<(Arc<HamiTracked>, vigil_hami::HamiRegion)> = tracked
            .into_iter()
            .filter_map(|t| match vigil_hami::read_region(&t.path) {
                Ok(r) => Some((t, r)),
                Err(e) => {
                    debug!("{e} (left out of this scrape)");
                    None
                }
            })
            .collect();
        let files: HashSet<(u64, u64)> = read.iter().map(|(_, r)| r.file_id).collect();
        let host = self.attachments.host_view();
        let scan = if host {
            self.attachments.get(&files)
        } else {
            crate::hami::AttachScan::default() // incomplete: judges nothing
        };
        let root = self.attachments.root().to_path_buf();
        let look = |pid: u32| {
            if host {
                crate::hami::lookup(&root, pid)
            } else {
                crate::hami::Lookup::Unknown
            }
        };
        read.into_iter()
            .map(|(t, region)| {
                let eval = crate::hami::evaluate(&region, scan.view(region.file_id), &look);
                HamiView {
                    labels: t.labels.clone(),
                    region,
                    eval,
                }
            })
            .collect()
    }

    fn drop_region(&self, t: &Arc<Tracked>, r: ErrorReason, why: &str) {
        let mut inner = lock(&self.inner);
        match inner.tracked.get(&t.path) {
            Some(cur) if Arc::ptr_eq(cur, t) => {
                inner.tracked.remove(&t.path);
            }
            _ => return,
        }
        if r != ErrorReason::Vanished {
            inner.failed.insert(t.path.clone(), file_key(&t.path));
        } else if t.rel.is_none() {
            // An explicit --region path: its absence is already counted (vanished).
            inner.failed.insert(t.path.clone(), None);
        }
        drop(inner);
        self.count_error(r);
        info!(
            "dropping region {} ({why}; counted as reason=\"{}\"); its series are gone",
            t.path.display(),
            r.name()
        );
    }

    /// Opens a tracked region for one read. On failure the region is dropped and
    /// counted (unless it is merely mid-initialization), and None is returned.
    pub fn read(&self, t: &Arc<Tracked>) -> Option<(Arc<RegionReader>, Snapshot)> {
        let reader = self.open_tracked(t)?;
        let snap = reader.snapshot();
        if reader.is_poisoned() {
            self.mapping_faulted(t);
            return None;
        }
        Some((reader, snap))
    }

    /// Opens a tracked region, dropping it on a lasting failure.
    pub fn open_tracked(&self, t: &Arc<Tracked>) -> Option<Arc<RegionReader>> {
        match self.reader(t) {
            Ok(r) => Some(r),
            Err(e) => {
                match classify(&e) {
                    OpenFailure::NotYet => debug!("{e} (will retry)"),
                    OpenFailure::NoDescriptors => self.note_no_fds(&t.path, &e.to_string()),
                    OpenFailure::Missing => {
                        self.drop_region(t, ErrorReason::Vanished, "file deleted")
                    }
                    OpenFailure::Error(r) => {
                        warn!("{e}");
                        self.drop_region(t, r, "no longer a valid region")
                    }
                }
                None
            }
        }
    }

    /// Drains every tracked region's ring once, at most [`MAX_EVENTS_PER_PASS`]
    /// events in all, starting where the previous pass ran out. Called by the
    /// background task only; a panic in one region is caught and logged.
    pub fn drain_all(&self) -> u64 {
        let tracked = self.tracked();
        if tracked.is_empty() {
            return 0;
        }
        let start = self.drain_start.load(Relaxed) % tracked.len();
        let mut n: u64 = 0;
        for i in 0..tracked.len() {
            let idx = (start + i) % tracked.len();
            let t = &tracked[idx];
            let budget = MAX_EVENTS_PER_PASS.saturating_sub(n);
            if budget == 0 {
                self.drain_start.store(idx, Relaxed);
                return n;
            }
            let max = (budget as usize).min(MAX_EVENTS_PER_REGION_PASS);
            let res = catch_unwind(AssertUnwindSafe(|| {
                let r = self.open_tracked(t)?;
                let got = t.drain_once(&r, max);
                if r.is_poisoned() {
                    self.mapping_faulted(t);
                }
                Some(got)
            }));
            match res {
                Ok(got) => n = n.saturating_add(got.unwrap_or(0)),
                Err(p) => error!(
                    "region {}: drain panicked ({}); skipped this pass",
                    t.path.display(),
                    panic_text(&*p)
                ),
            }
        }
        self.drain_start.store(start.wrapping_add(1), Relaxed);
        n
    }

    /// Flushes half-built traces (on shutdown).
    pub fn flush_traces(&self) {
        for t in self.tracked() {
            let _ = catch_unwind(AssertUnwindSafe(|| lock(&t.drain).flush_all()));
        }
    }
}

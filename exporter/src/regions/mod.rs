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

mod discovery;
mod errors;
mod hami;

use crate::drain::RegionDrain;
use crate::hami::Attachments;
use crate::hostpid::{HostPidChecker, RegionChecks};
use crate::labels::{region_labels, LabelPolicy, RegionLabels};
use crate::liveness::Probed;
use crate::trace::TraceSink;
use crate::util::{lock, panic_text};
use discovery::{file_key, same_file, Candidate, FileKey};
use errors::{classify, OpenFailure};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
    /// Slot liveness from the last background probe (see `liveness`).
    liveness: Mutex<Option<Arc<Probed>>>,
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

    /// Probes every slot's token and keeps the answers for scrapes, when the last
    /// probe is due (see `liveness`), unless the mapping faulted meanwhile (then what
    /// was read is zeros).
    fn probe_liveness(&self, r: &RegionReader) {
        let at = Instant::now();
        if lock(&self.liveness).as_ref().is_some_and(|p| !p.due(at)) {
            return;
        }
        let slots = r.snapshot().slots;
        if !r.is_poisoned() {
            *lock(&self.liveness) = Some(Arc::new(Probed::new(at, &slots)));
        }
    }
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

    /// A scrape's read of `t`: a snapshot, or the last one when the region cannot be
    /// opened for lack of file descriptors. None if it cannot be read now (the
    /// background task counts and drops broken ones) or its mapping faulted (dropped
    /// here).
    pub fn scrape_snapshot(&self, t: &Arc<Tracked>) -> Option<Snapshot> {
        match self.reader(t) {
            Ok(r) => {
                let scan_began = self.host_pid.last_scan();
                let probed = lock(&t.liveness)
                    .clone()
                    .filter(|p| p.usable(Instant::now(), scan_began));
                let snap = match probed {
                    Some(p) => r.snapshot_with(&|s| p.get(s)),
                    None => r.snapshot(),
                };
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
        let gone = |p: &Path, in_dir: bool| in_dir && !listed.contains(p) && !unseen(p);
        let why = |p: &Path| match rejected.get(p) {
            Some(what) => (ErrorReason::NotRegular, format!("now {what}")),
            None => (ErrorReason::Vanished, "file deleted".to_string()),
        };
        for (p, t) in &known {
            if gone(p, t.rel.is_some()) {
                let (r, w) = why(p);
                self.drop_region(t, r, &w);
            }
        }
        for (p, t) in &known_hami {
            if gone(p, t.rel.is_some()) {
                let (r, w) = why(p);
                self.drop_hami(t, r, &w);
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
                    liveness: Mutex::new(None),
                });
                let mut inner = lock(&self.inner);
                inner.failed.remove(&c.path);
                inner.limited.remove(&c.path);
                inner.tracked.insert(c.path, t);
            }
            Err(e) => self.note_failure(&c.path, key, &e),
        }
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
        // Where the budget ran out: the next pass starts there.
        let mut unserved = None;
        for i in 0..tracked.len() {
            let idx = (start + i) % tracked.len();
            let t = &tracked[idx];
            let budget = MAX_EVENTS_PER_PASS.saturating_sub(n);
            if budget == 0 && unserved.is_none() {
                unserved = Some(idx);
            }
            let max = (budget as usize).min(MAX_EVENTS_PER_REGION_PASS);
            let res = catch_unwind(AssertUnwindSafe(|| {
                let r = self.open_tracked(t)?;
                let got = if max > 0 { t.drain_once(&r, max) } else { 0 };
                // Every region's liveness when due, budget or not (see `liveness`).
                t.probe_liveness(&r);
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
        self.drain_start
            .store(unserved.unwrap_or(start.wrapping_add(1)), Relaxed);
        n
    }

    /// Flushes half-built traces (on shutdown).
    pub fn flush_traces(&self) {
        for t in self.tracked() {
            let _ = catch_unwind(AssertUnwindSafe(|| lock(&t.drain).flush_all()));
        }
    }
}

//! Region discovery and tracking.
//!
//! Sources are `--region PATH` (repeatable) and `--regions-dir DIR`, rescanned every
//! scan interval. In the directory, every non-hidden regular file directly in it or
//! one level down (HAMi's `DIR/<pod-uid>_<container>/*.cache`) is a candidate.
//!
//! A region is mapped only while it is read: at each scrape, each drain pass and each
//! rescan we open it read-only, validate it, read and unmap. Open + map + unmap costs
//! tens of microseconds, and it keeps the exporter's RSS independent of how many
//! regions it watches (each mapping is 1.7 MiB of slot table and ring). It also means
//! a deleted or replaced file is noticed at the next read, never read stale.
//!
//! Errors are counted in `vigil_exporter_region_errors_total{reason}` once per
//! failure of a given file version (device, inode, size, mtime), logged with the file
//! name, and the file is retried only when it changes. Nothing here panics on file
//! contents: `vigil_region::RegionReader` validates every field it maps.

use crate::drain::RegionDrain;
use crate::labels::{region_labels, RegionLabels};
use crate::trace::TraceSink;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{debug, info, warn};
use vigil_region::{RegionError, RegionReader, Snapshot};

/// Every `reason` of `vigil_exporter_region_errors_total`, all exported from start.
pub const ERROR_REASONS: [&str; 6] = [
    "open_failed",
    "truncated",
    "bad_magic",
    "bad_version",
    "corrupt",
    "vanished",
];

/// Index into [`ERROR_REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReason {
    OpenFailed = 0,
    Truncated = 1,
    BadMagic = 2,
    BadVersion = 3,
    Corrupt = 4,
    Vanished = 5,
}

/// What a failed open means for the exporter.
enum OpenFailure {
    /// Being created or re-initialized right now: retry quietly, count nothing.
    NotYet,
    /// The file is gone.
    Missing,
    Error(ErrorReason),
}

fn classify(e: &RegionError) -> OpenFailure {
    match e {
        RegionError::NotReady { .. } => OpenFailure::NotYet,
        // A new region is created empty, grown, and only then gets its magic: an
        // empty file or an all-zero header is a region being born, not garbage.
        RegionError::Truncated { len: 0, .. } => OpenFailure::NotYet,
        RegionError::WrongMagic { found: 0, .. } => OpenFailure::NotYet,
        RegionError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            OpenFailure::Missing
        }
        RegionError::Io { .. } => OpenFailure::Error(ErrorReason::OpenFailed),
        RegionError::Truncated { .. } => OpenFailure::Error(ErrorReason::Truncated),
        RegionError::WrongMagic { .. } => OpenFailure::Error(ErrorReason::BadMagic),
        RegionError::UnsupportedVersion { .. } => OpenFailure::Error(ErrorReason::BadVersion),
        _ => OpenFailure::Error(ErrorReason::Corrupt),
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

fn file_key(path: &Path) -> Option<FileKey> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
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
    /// With `--regions.keep-mapped`: the mapping kept between reads, and the
    /// (device, inode) it was opened from.
    cached: Mutex<Option<CachedReader>>,
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

    fn drain_once(&self, r: &RegionReader) -> u64 {
        let mut d = lock(&self.drain);
        let n = d.drain(r);
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

/// A candidate file: where it is, its `region` label, its path relative to the dir.
struct Candidate {
    path: PathBuf,
    label: String,
    rel: Option<PathBuf>,
}

#[derive(Default)]
struct Inner {
    tracked: BTreeMap<PathBuf, Arc<Tracked>>,
    /// Files that failed, with the version that failed (None: did not exist).
    failed: HashMap<PathBuf, Option<FileKey>>,
}

/// All watched regions and the error counters. Mutated only by the background task;
/// scrapes take the lock just long enough to copy the list.
pub struct RegionSet {
    explicit: Vec<PathBuf>,
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
    errors: [AtomicU64; ERROR_REASONS.len()],
    sink: Option<Arc<dyn TraceSink>>,
    keep_mapped: bool,
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
        }
    }

    /// Keep regions mapped between reads: scrapes skip re-mapping and first-touch
    /// page faults (about 65 µs a region), at the price of the touched pages (slot
    /// table and ring, up to 1.7 MiB a region of shared page cache) counting in the
    /// exporter's RSS.
    pub fn with_keep_mapped(mut self, keep: bool) -> RegionSet {
        self.keep_mapped = keep;
        self
    }

    /// A read-only handle on a tracked region: a fresh mapping, or with
    /// `keep_mapped` the cached one if the path still names the same, valid file.
    pub fn reader(&self, t: &Tracked) -> Result<Arc<RegionReader>, RegionError> {
        if self.keep_mapped {
            let mut c = lock(&t.cached);
            if let Some((r, id)) = c.as_ref() {
                let same = std::fs::metadata(&t.path)
                    .map(|m| (m.dev(), m.ino()) == *id)
                    .unwrap_or(false);
                if same && r.revalidate().is_ok() {
                    return Ok(r.clone());
                }
                *c = None;
            }
            let r = Arc::new(RegionReader::open(&t.path)?);
            if let Ok(m) = std::fs::metadata(&t.path) {
                *c = Some((r.clone(), (m.dev(), m.ino())));
            }
            return Ok(r);
        }
        Ok(Arc::new(RegionReader::open(&t.path)?))
    }

    /// Current regions, in label order.
    pub fn tracked(&self) -> Vec<Arc<Tracked>> {
        lock(&self.inner).tracked.values().cloned().collect()
    }

    /// `(reason, count)` for every reason.
    pub fn error_counts(&self) -> [(&'static str, u64); ERROR_REASONS.len()] {
        std::array::from_fn(|i| (ERROR_REASONS[i], self.errors[i].load(Relaxed)))
    }

    fn count_error(&self, r: ErrorReason) {
        self.errors[r as usize].fetch_add(1, Relaxed);
    }

    fn candidates(&self) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .explicit
            .iter()
            .map(|p| Candidate {
                path: p.clone(),
                label: p.display().to_string(),
                rel: None,
            })
            .collect();
        if let Some(dir) = &self.dir {
            match std::fs::read_dir(dir) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        scan_entry(dir, &e.path(), 0, &mut out);
                    }
                }
                Err(e) => warn!("regions dir {}: cannot list: {e}", dir.display()),
            }
        }
        // A file named by --region and also found in the directory is watched once,
        // under its --region label.
        let mut seen = std::collections::HashSet::new();
        out.retain(|c| seen.insert(c.path.clone()));
        out
    }

    /// Finds new regions, refreshes labels of known ones, and drops vanished or
    /// broken ones. Called by the background task only.
    pub fn rescan(&self) {
        let cands = self.candidates();
        let known: BTreeMap<PathBuf, Arc<Tracked>> = lock(&self.inner).tracked.clone();
        // Directory files that are no longer listed are gone.
        for (p, t) in &known {
            if t.rel.is_some() && !cands.iter().any(|c| &c.path == p) {
                self.drop_region(t, ErrorReason::Vanished, "file deleted");
            }
        }
        let mut seen = std::collections::HashSet::with_capacity(cands.len());
        for c in cands {
            seen.insert(c.path.clone());
            if let Some(t) = known.get(&c.path) {
                // Refresh: identity may change if the region was re-created.
                if let Some((reader, snap)) = self.read(t) {
                    let labels = region_labels(&c.label, c.rel.as_deref(), &snap.identity);
                    lock(&t.drain).check_nonce(&reader, snap.init_nonce, &labels);
                    *lock(&t.labels) = labels;
                }
                continue;
            }
            let key = file_key(&c.path);
            if let Some(prev) = lock(&self.inner).failed.get(&c.path) {
                if *prev == key {
                    continue;
                }
            }
            match RegionReader::open(&c.path) {
                Ok(reader) => {
                    let snap = reader.snapshot();
                    let labels = region_labels(&c.label, c.rel.as_deref(), &snap.identity);
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
                    });
                    let mut inner = lock(&self.inner);
                    inner.failed.remove(&c.path);
                    inner.tracked.insert(c.path, t);
                }
                Err(e) => self.note_failure(&c.path, key, &e),
            }
        }
        // Forget failures of files that no longer exist, so the memo stays bounded.
        lock(&self.inner)
            .failed
            .retain(|p, k| k.is_none() || seen.contains(p));
    }

    fn note_failure(&self, path: &Path, key: Option<FileKey>, e: &RegionError) {
        match classify(e) {
            OpenFailure::NotYet => debug!("{e} (will retry)"),
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
                lock(&self.inner).failed.insert(path.to_path_buf(), key);
                self.count_error(r);
                warn!(
                    "{e} (counted as reason=\"{}\"; skipped until the file changes)",
                    ERROR_REASONS[r as usize]
                );
            }
        }
    }

    /// Stops watching `t` (if it is still the tracked entry for its path).
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
            ERROR_REASONS[r as usize]
        );
    }

    /// Opens a tracked region for one read. On failure the region is dropped and
    /// counted (unless it is merely mid-initialization), and None is returned.
    pub fn read(&self, t: &Arc<Tracked>) -> Option<(Arc<RegionReader>, Snapshot)> {
        let reader = self.open_tracked(t)?;
        let snap = reader.snapshot();
        Some((reader, snap))
    }

    /// Opens a tracked region, dropping it on a lasting failure.
    pub fn open_tracked(&self, t: &Arc<Tracked>) -> Option<Arc<RegionReader>> {
        match self.reader(t) {
            Ok(r) => Some(r),
            Err(e) => {
                match classify(&e) {
                    OpenFailure::NotYet => debug!("{e} (will retry)"),
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

    /// Drains every tracked region's ring once. Called by the background task only.
    pub fn drain_all(&self) -> u64 {
        let mut n = 0;
        for t in self.tracked() {
            if let Some(r) = self.open_tracked(&t) {
                n += t.drain_once(&r);
            }
        }
        n
    }

    /// Flushes half-built traces (on shutdown).
    pub fn flush_traces(&self) {
        for t in self.tracked() {
            lock(&t.drain).flush_all();
        }
    }
}

/// Adds regular, non-hidden files at depth 0 and 1 below `dir` to `out`.
fn scan_entry(dir: &Path, p: &Path, depth: usize, out: &mut Vec<Candidate>) {
    let hidden = p
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    if hidden {
        return;
    }
    let Ok(meta) = std::fs::metadata(p) else {
        return;
    };
    if meta.is_file() {
        let rel = p.strip_prefix(dir).unwrap_or(p).to_path_buf();
        out.push(Candidate {
            path: p.to_path_buf(),
            label: rel.display().to_string(),
            rel: Some(rel),
        });
    } else if meta.is_dir() && depth == 0 {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                scan_entry(dir, &e.path(), depth + 1, out);
            }
        }
    }
}

//! Counting what cannot be used: each failing file version once, under the region
//! crate's one list of reasons ([`ErrorReason`]), with the file named in the log.

use super::*;

/// What a failed open means for the exporter.
pub(super) enum OpenFailure {
    /// Being created or re-initialized right now: retry quietly, count nothing.
    NotYet,
    /// The file is gone.
    Missing,
    /// Out of file descriptors: says nothing about the file; known regions are kept
    /// (and served as last read) and new ones retried.
    NoDescriptors,
    Error(ErrorReason),
}

pub(super) fn classify(e: &RegionError) -> OpenFailure {
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

impl RegionSet {
    /// `(reason, count)` for every reason.
    pub fn error_counts(&self) -> [(&'static str, u64); ErrorReason::ALL.len()] {
        std::array::from_fn(|i| (ErrorReason::ALL[i].name(), self.errors[i].load(Relaxed)))
    }

    pub(super) fn count_error(&self, r: ErrorReason) {
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

    /// Counts a directory entry that is not a regular file, once per version.
    pub(super) fn note_rejected(&self, path: &Path, key: Option<FileKey>, what: &str) {
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
    pub(super) fn note_over_limit(&self, over: &[(PathBuf, &'static str, Option<FileKey>)]) {
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

    pub(super) fn note_failure(&self, path: &Path, key: Option<FileKey>, e: &RegionError) {
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

    pub(super) fn note_hami_failure(
        &self,
        path: &Path,
        key: Option<FileKey>,
        e: &vigil_hami::HamiError,
    ) {
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

    /// Stops watching `t`, if it is still the entry for `path` in the map `map` picks
    /// (a rescan may have replaced it meanwhile): false if it was not. A file that
    /// failed, rather than vanished, is remembered, to be skipped until it changes;
    /// a vanished one only if `explicit` (a --region path: its absence is already
    /// counted, as vanished). The error is counted.
    fn unwatch<T>(
        &self,
        map: impl FnOnce(&mut Inner) -> &mut BTreeMap<PathBuf, Arc<T>>,
        (path, t): (&Path, &Arc<T>),
        r: ErrorReason,
        explicit: bool,
    ) -> bool {
        let mut inner = lock(&self.inner);
        let m = map(&mut inner);
        match m.get(path) {
            Some(cur) if Arc::ptr_eq(cur, t) => {
                m.remove(path);
            }
            _ => return false,
        }
        if r != ErrorReason::Vanished {
            inner.failed.insert(path.to_path_buf(), file_key(path));
        } else if explicit {
            inner.failed.insert(path.to_path_buf(), None);
        }
        drop(inner);
        self.count_error(r);
        true
    }

    pub(super) fn drop_hami(&self, t: &Arc<HamiTracked>, r: ErrorReason, why: &str) {
        if self.unwatch(|i| &mut i.hami, (&t.path, t), r, false) {
            warn!(
                "HAMi-core region {} no longer watched: {why} (counted as reason=\"{}\")",
                t.path.display(),
                r.name()
            );
        }
    }

    pub(super) fn drop_region(&self, t: &Arc<Tracked>, r: ErrorReason, why: &str) {
        if self.unwatch(|i| &mut i.tracked, (&t.path, t), r, t.rel.is_none()) {
            info!(
                "dropping region {} ({why}; counted as reason=\"{}\"); its series are gone",
                t.path.display(),
                r.name()
            );
        }
    }
}

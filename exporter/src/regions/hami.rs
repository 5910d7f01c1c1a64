//! HAMi-core regions in the same sources: admitted when a file has HAMi-core's magic,
//! re-validated at each rescan, read (never mapped) and judged at each scrape (see
//! `crate::hami`).

use super::*;

impl RegionSet {
    /// Stops watching `t` (if it is still the tracked entry for its path).
    /// Starts watching a HAMi-core region, or counts why it cannot be read.
    pub(super) fn admit_hami(&self, c: Candidate, key: Option<FileKey>) {
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
    pub(super) fn recheck_hami(&self, t: &Arc<HamiTracked>) {
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

    /// Rescans who maps the HAMi-core regions, when due (background task only).
    pub(super) fn refresh_attachments(&self) {
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
}

//! Walking the sources: `--region` paths and the regions directory, one level of
//! subdirectories, each opened through its parent's descriptor without following
//! symlinks; candidates, rejects, and the caps (see the parent module).

use super::*;

/// Identifies one version of a file, so a failure is counted once, not per rescan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileKey {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) len: u64,
    pub(super) mtime_ns: i128,
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
pub(super) fn same_file(a: &Option<FileKey>, b: &Option<FileKey>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a.dev, a.ino) == (b.dev, b.ino),
        (None, None) => true,
        _ => false,
    }
}

/// The version of whatever the path names, without following a symlink.
pub(super) fn file_key(path: &Path) -> Option<FileKey> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| FileKey::of(&m))
}

/// A candidate file: where it is, its `region` label, its path relative to the dir,
/// and (for a new directory file) the version its descriptor was `fstat`ed at.
pub(super) struct Candidate {
    pub(super) path: PathBuf,
    pub(super) label: String,
    pub(super) rel: Option<PathBuf>,
    pub(super) key: Option<FileKey>,
}

/// What one scan of the sources found.
#[derive(Default)]
pub(super) struct Scan {
    /// Within the limits, explicit paths first.
    pub(super) cands: Vec<Candidate>,
    /// Entries that are not regular files: (path, version, what it is).
    pub(super) rejected: Vec<(PathBuf, Option<FileKey>, &'static str)>,
    /// Regular `*.cache` files over a limit: (path, which limit, version).
    pub(super) over_limit: Vec<(PathBuf, &'static str, Option<FileKey>)>,
    /// Directories that could not be listed for lack of file descriptors: their
    /// watched regions are kept, and no new region is admitted in this pass.
    pub(super) incomplete: Vec<PathBuf>,
}

pub(super) fn has_cache_suffix(name: &OsStr) -> bool {
    name.as_bytes().ends_with(b".cache")
}

/// `openat(dir, name, flags)`; `dir` None means the current directory.
pub(super) fn openat(
    dir: Option<&OwnedFd>,
    name: &OsStr,
    flags: libc::c_int,
) -> std::io::Result<OwnedFd> {
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
pub(super) fn list_dir(
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

pub(super) fn kind_of(ft: &std::fs::FileType) -> &'static str {
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
pub(super) enum Check {
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
pub(super) fn check_regular(dir: &OwnedFd, name: &OsStr) -> Check {
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
    /// Lists the sources, applying the file rules and the limits.
    pub(super) fn scan(&self) -> Scan {
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
    pub(super) fn classify_entry(
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

    pub(super) fn note_crowded(&self, dir: &Path, more: bool, max: usize) {
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
}

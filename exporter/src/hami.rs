//! HAMi-core regions: which of their slots and lock holders are alive.
//!
//! HAMi-core records each process's namespace PID and the host PID it detected (often
//! 0, see issue 14), and for its `sem` lock the namespace PID of the holder. Neither
//! says whether that process still exists: a namespace PID of 1 exists in every
//! container. The truth is who maps the region file: a HAMi-core process maps it at
//! start and keeps it mapped until it exits. So the exporter lists, from `/proc`, the
//! processes mapping each HAMi-core file (by device and inode), with their PID in
//! their innermost namespace, and judges slots and lock owners against that list.
//!
//! Reading another user's `/proc/PID/maps` needs ptrace access (the exporter as root
//! with `hostPID`). A process whose maps cannot be read might map the file: a slot or
//! owner it could be (same namespace PID) is unknown, not dead. The view's own PID 1
//! (the host's init) is never taken for a GPU process. When `/proc` cannot be listed at
//! all, a slot is judged only by its recorded host PID: gone from `/proc` means dead;
//! present with the recorded namespace PID means alive; anything else is unknown. And a `/proc` that is not the
//! host's (a pod without `hostPID` sees only itself) proves nothing at all: every slot
//! is unknown. Nothing is ever called dead on a guess.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vigil_hami::HamiRegion;
use vigil_region::procfs;

/// A process mapping a HAMi-core region file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// PID in the exporter's `/proc` (the host's, with `hostPID`).
    pub host_pid: u32,
    /// PID in the process's own, innermost, namespace: what HAMi-core records.
    pub ns_pid: u32,
}

/// One pass over `/proc`: who maps which file.
#[derive(Debug, Clone, Default)]
pub struct AttachScan {
    pub by_file: HashMap<(u64, u64), Vec<Attached>>,
    /// Processes whose maps could not be read (permission): each might map any file.
    pub unreadable: Vec<Attached>,
    /// `/proc` was listed: absence from `by_file` and `unreadable` proves a process
    /// does not map a file.
    pub complete: bool,
    pub processes: usize,
}

impl AttachScan {
    /// What this scan says about the file `id`, if it says anything.
    pub fn view(&self, id: (u64, u64)) -> Option<View<'_>> {
        self.complete.then(|| View {
            mapping: self.by_file.get(&id).map_or(&[][..], |v| v.as_slice()),
            unreadable: &self.unreadable,
        })
    }
}

/// Who maps one file: those known to, and those that might.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub mapping: &'a [Attached],
    pub unreadable: &'a [Attached],
}

/// `major:minor` of a `st_dev`, as `/proc/PID/maps` prints it.
fn dev_parts(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major, minor)
}

/// The `(major, minor, inode)` of every file-backed line of a maps file.
fn mapped_files(maps: &[u8]) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    maps.split(|&c| c == b'\n').filter_map(|line| {
        let mut f = line.split(|&c| c == b' ').filter(|s| !s.is_empty()).skip(3);
        let dev = std::str::from_utf8(f.next()?).ok()?;
        let ino: u64 = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
        if ino == 0 {
            return None;
        }
        let (ma, mi) = dev.split_once(':')?;
        Some((
            u64::from_str_radix(ma, 16).ok()?,
            u64::from_str_radix(mi, 16).ok()?,
            ino,
        ))
    })
}

/// Finds the processes mapping any of `files` ((device, inode) pairs).
pub fn scan_attachments(root: &Path, files: &HashSet<(u64, u64)>) -> AttachScan {
    let mut scan = AttachScan {
        complete: true,
        ..Default::default()
    };
    let wanted: HashMap<(u64, u64, u64), (u64, u64)> = files
        .iter()
        .map(|&(dev, ino)| {
            let (ma, mi) = dev_parts(dev);
            ((ma, mi, ino), (dev, ino))
        })
        .collect();
    if wanted.is_empty() {
        return scan;
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        scan.complete = false;
        return scan;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        scan.processes += 1;
        let dir = e.path();
        let maps = match read_maps(&dir.join("maps")) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // exited
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(_) => {
                // The host's init never runs CUDA; anything else might map the file.
                if pid != 1 {
                    if let Some(ns_pid) = ns_pid_of(&dir) {
                        scan.unreadable.push(Attached {
                            host_pid: pid,
                            ns_pid,
                        });
                    }
                }
                continue;
            }
        };
        let mut hits: Vec<(u64, u64)> = mapped_files(&maps)
            .filter_map(|k| wanted.get(&k).copied())
            .collect();
        if hits.is_empty() {
            continue;
        }
        hits.sort_unstable();
        hits.dedup();
        let Some(ns_pid) = ns_pid_of(&dir) else {
            continue; // exited between the two reads
        };
        for f in hits {
            scan.by_file.entry(f).or_default().push(Attached {
                host_pid: pid,
                ns_pid,
            });
        }
    }
    scan
}

/// The innermost namespace PID of the process at `dir` (its `status` is world-readable).
fn ns_pid_of(dir: &Path) -> Option<u32> {
    procfs::read_small(&dir.join("status"))
        .ok()
        .and_then(|s| procfs::parse_nspid(&s))
        .and_then(|v| v.last().copied())
}

/// A maps file, whole: a process with a few thousand mappings has a few hundred KiB.
fn read_maps(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(64 << 20)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// What `/proc/HOSTPID` says about a recorded host PID (the fallback without maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Gone,
    /// Exists; its innermost namespace PID.
    NsPid(u32),
    Unknown,
}

pub fn lookup(root: &Path, host_pid: u32) -> Lookup {
    match procfs::read_small(&root.join(host_pid.to_string()).join("status")) {
        Ok(s) => procfs::parse_nspid(&s)
            .and_then(|v| v.last().copied())
            .map_or(Lookup::Unknown, Lookup::NsPid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lookup::Gone,
        Err(_) => Lookup::Unknown,
    }
}

/// A slot's process, as far as can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    Unknown,
}

/// Whether a lock is held, and by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    Free,
    /// Held by a live process, or by one whose liveness cannot be told.
    Held,
    /// Held, and no live process can be its holder: everyone who waits for it waits
    /// forever (HAMi-core gives up after a timeout and force-posts, or hangs).
    HeldByDeadOwner,
}

/// The judgement of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eval {
    pub slots: Vec<Liveness>,
    /// Slots whose recorded host PID is 0: HAMi-core's detection failed.
    pub host_pid_zero: usize,
    /// Slots whose process is alive but whose recorded host PID is another process's.
    pub host_pid_wrong: usize,
    /// Per device: bytes charged to slots whose process is dead.
    pub dead_bytes: Vec<u64>,
    pub sem: LockState,
    pub sem_postinit: Option<LockState>,
}

impl Eval {
    pub fn count(&self, l: Liveness) -> usize {
        self.slots.iter().filter(|&&s| s == l).count()
    }
}

/// Judges `r` against who maps it (`None` when `/proc` could not be listed) and,
/// failing that, against `/proc` through `lookup`.
pub fn evaluate(r: &HamiRegion, view: Option<View<'_>>, lookup: &dyn Fn(u32) -> Lookup) -> Eval {
    let mut slots = Vec::with_capacity(r.slots.len());
    let mut host_pid_wrong = 0;
    let mut dead_bytes = vec![0u64; r.devices];
    for s in &r.slots {
        let live = match view {
            Some(v) => {
                let by_ns = v.mapping.iter().any(|p| p.ns_pid == s.pid);
                let by_host = s.host_pid != 0 && v.mapping.iter().any(|p| p.host_pid == s.host_pid);
                let maybe = v
                    .unreadable
                    .iter()
                    .any(|p| p.ns_pid == s.pid || (s.host_pid != 0 && p.host_pid == s.host_pid));
                if by_ns && s.host_pid != 0 && !by_host {
                    host_pid_wrong += 1;
                }
                if by_host || by_ns {
                    Liveness::Alive
                } else if maybe {
                    Liveness::Unknown
                } else {
                    Liveness::Dead
                }
            }
            None if s.host_pid == 0 => Liveness::Unknown,
            None => match lookup(s.host_pid) {
                Lookup::Gone => Liveness::Dead,
                Lookup::NsPid(n) if n == s.pid => Liveness::Alive,
                _ => Liveness::Unknown,
            },
        };
        if live == Liveness::Dead {
            for (d, dev) in s.devices.iter().enumerate() {
                dead_bytes[d] = dead_bytes[d].saturating_add(dev.total);
            }
        }
        slots.push(live);
    }
    // Every process of the region is gone: whoever holds a lock is gone too (a holder
    // without a slot yet would still map the file).
    let all_gone =
        view.is_some_and(|v| v.mapping.is_empty()) && slots.iter().all(|&l| l == Liveness::Dead);
    let state = |held: bool, owner_gone: bool| match (held, owner_gone) {
        (false, _) => LockState::Free,
        (true, true) => LockState::HeldByDeadOwner,
        (true, false) => LockState::Held,
    };
    let owner = r.owner_pid;
    let owner_gone = match view {
        Some(v) if owner != 0 => {
            let is_owner = |p: &Attached| u64::from(p.ns_pid) == owner;
            !v.mapping.iter().any(is_owner) && !v.unreadable.iter().any(is_owner)
        }
        _ => all_gone,
    };
    Eval {
        host_pid_zero: r.slots.iter().filter(|s| s.host_pid == 0).count(),
        host_pid_wrong,
        slots,
        dead_bytes,
        sem: state(r.sem.held(), owner_gone),
        // `sem_postinit` records no owner.
        sem_postinit: r.sem_postinit.map(|p| state(p.held(), all_gone)),
    }
}

/// When the last scan ran, for which files, and what it found.
type LastScan = (Instant, HashSet<(u64, u64)>, AttachScan);

/// The kernel's initial PID namespace has this inode (`PROC_PID_INIT_INO`).
const INIT_PIDNS_INODE: u64 = 0xEFFF_FFFC;

/// True if `root` shows every process of the node: the exporter itself lives in the
/// kernel's initial PID namespace (`hostPID`), or the view's PID 1 does (a host procfs
/// mounted elsewhere). Unreadable means no.
pub fn is_host_view(root: &Path) -> bool {
    let initial =
        |dir: &str| procfs::pidns_inode(&root.join(dir)).is_ok_and(|i| i == INIT_PIDNS_INODE);
    initial("self") || initial("1")
}

/// Attachment scans shared by all HAMi-core regions, at most one per interval.
#[derive(Debug)]
pub struct Attachments {
    root: PathBuf,
    min_interval: Duration,
    last: std::sync::Mutex<Option<LastScan>>,
    /// Whether `root` is the host's view, once known.
    host_view: std::sync::OnceLock<bool>,
}

impl Attachments {
    pub fn new(root: PathBuf, min_interval: Duration) -> Attachments {
        Attachments {
            root,
            min_interval,
            last: Default::default(),
            host_view: Default::default(),
        }
    }

    /// Whether liveness can be judged at all (see the module documentation); logged
    /// once when it cannot.
    pub fn host_view(&self) -> bool {
        *self.host_view.get_or_init(|| {
            let host = is_host_view(&self.root);
            if !host {
                tracing::warn!(
                    "HAMi-core regions: {} is not the host's /proc (its PID 1 is not in the initial PID namespace, or cannot be read); their slots are reported as unknown and no lock owner is called dead. Run the node-wide exporter with hostPID: true (docs/adoption.md)",
                    self.root.display()
                );
            }
            host
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The processes mapping each of `files`: the latest background scan (see
    /// [`Attachments::refresh`]) when it covered them all, else a scan now (a region
    /// admitted since). Scrapes call this; they never wait for a scan in progress.
    pub fn get(&self, files: &HashSet<(u64, u64)>) -> AttachScan {
        if let Some((_, f, scan)) = crate::util::lock(&self.last).as_ref() {
            if files.is_subset(f) {
                return scan.clone();
            }
        }
        let scan = scan_attachments(&self.root, files);
        *crate::util::lock(&self.last) = Some((Instant::now(), files.clone(), scan.clone()));
        scan
    }

    /// Scans again if the last scan is older than the interval or covered other files.
    /// The background task calls this, so that scrapes find a fresh scan ready.
    pub fn refresh(&self, files: &HashSet<(u64, u64)>) {
        let due = match crate::util::lock(&self.last).as_ref() {
            Some((at, f, _)) => at.elapsed() >= self.min_interval || f != files,
            None => true,
        };
        if due && !files.is_empty() {
            let scan = scan_attachments(&self.root, files);
            *crate::util::lock(&self.last) = Some((Instant::now(), files.clone(), scan));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_hami::{HamiSlot, SemState, SlotDevice};

    fn region(slots: &[(u32, u32, u64)], owner: u64, sem_held: bool) -> HamiRegion {
        HamiRegion {
            major: 1,
            minor: 2,
            devices: 1,
            uuids: vec!["GPU-x".into()],
            limits: vec![1 << 30],
            sm_limits: vec![0],
            owner_pid: owner,
            sem: SemState::from_word(if sem_held { 0 } else { 1 }),
            sem_postinit: Some(SemState::from_word(1)),
            priority: 1,
            slots: slots
                .iter()
                .enumerate()
                .map(|(index, &(pid, host_pid, total))| HamiSlot {
                    index,
                    pid,
                    host_pid,
                    status: 1,
                    devices: vec![SlotDevice {
                        total,
                        ..Default::default()
                    }],
                })
                .collect(),
            file_id: (1, 2),
        }
    }

    fn at(host_pid: u32, ns_pid: u32) -> Attached {
        Attached { host_pid, ns_pid }
    }

    fn view<'a>(mapping: &'a [Attached], unreadable: &'a [Attached]) -> Option<View<'a>> {
        Some(View {
            mapping,
            unreadable,
        })
    }

    #[test]
    fn a_process_whose_maps_cannot_be_read_makes_its_slot_and_lock_unknown() {
        let r = region(&[(1, 0, 100), (7, 4007, 50)], 1, true);
        let a = [at(4007, 7)];
        let u = [at(6000, 1)];
        let e = evaluate(&r, view(&a, &u), &no_proc);
        assert_eq!(e.sem, LockState::Held);
        assert_eq!(e.slots, vec![Liveness::Unknown, Liveness::Alive]);
        assert_eq!(e.dead_bytes, vec![0]);
        // sem_postinit records no owner: dead only when every slot is dead.
        let mut r2 = region(&[(4, 0, 0)], 0, false);
        r2.sem_postinit = Some(SemState::from_word(0));
        let e = evaluate(&r2, view(&[], &[]), &no_proc);
        assert_eq!(e.sem_postinit, Some(LockState::HeldByDeadOwner));
        let maybe = [at(77, 4)];
        let e = evaluate(&r2, view(&[], &maybe), &no_proc);
        assert_eq!(e.sem_postinit, Some(LockState::Held));
    }

    fn no_proc(_: u32) -> Lookup {
        panic!("the maps list is complete: /proc must not be consulted")
    }

    #[test]
    fn a_pid_1_owner_is_dead_when_no_attached_process_is_pid_1_in_its_namespace() {
        let r = region(&[(1, 0, 100), (7, 4007, 50)], 1, true);
        let a = [at(4007, 7)];
        let e = evaluate(&r, view(&a, &[]), &no_proc);
        assert_eq!(e.sem, LockState::HeldByDeadOwner);
        assert_eq!(e.slots, vec![Liveness::Dead, Liveness::Alive]);
        assert_eq!(e.dead_bytes, vec![100]);
        assert_eq!(e.host_pid_zero, 1);
        // The same owner, alive in another container, keeps the lock legitimately held.
        let a2 = [a[0], at(5000, 1)];
        assert_eq!(evaluate(&r, view(&a2, &[]), &no_proc).sem, LockState::Held);
    }

    #[test]
    fn a_wrong_host_pid_is_told_apart_from_a_dead_process() {
        let r = region(&[(3, 999, 10)], 0, false);
        let a = [at(4003, 3)];
        let e = evaluate(&r, view(&a, &[]), &no_proc);
        assert_eq!(e.slots, vec![Liveness::Alive]);
        assert_eq!(e.host_pid_wrong, 1);
        assert_eq!(e.sem, LockState::Free);
    }

    #[test]
    fn without_the_maps_list_only_a_recorded_host_pid_decides() {
        let r = region(
            &[(3, 400, 10), (4, 401, 20), (5, 0, 30), (6, 402, 40)],
            9,
            true,
        );
        let look = |p: u32| match p {
            400 => Lookup::Gone,
            401 => Lookup::NsPid(4),
            _ => Lookup::NsPid(77), // reused by another process
        };
        let e = evaluate(&r, None, &look);
        assert_eq!(
            e.slots,
            vec![
                Liveness::Dead,
                Liveness::Alive,
                Liveness::Unknown,
                Liveness::Unknown
            ]
        );
        assert_eq!(e.dead_bytes, vec![10]);
        // Never "dead owner" on a guess.
        assert_eq!(e.sem, LockState::Held);
    }

    #[test]
    fn a_held_lock_with_nobody_attached_has_a_dead_owner() {
        let mut r = region(&[], 0, true);
        r.sem_postinit = Some(SemState::from_word(0));
        let e = evaluate(&r, view(&[], &[]), &no_proc);
        assert_eq!(e.sem, LockState::HeldByDeadOwner);
        assert_eq!(e.sem_postinit, Some(LockState::HeldByDeadOwner));
    }

    #[test]
    fn maps_lines_give_device_and_inode() {
        let maps = b"7f00-7f10 rw-s 00000000 fd:01 123456 /tmp/x.cache\n\
                     7f10-7f20 r-xp 00000000 00:00 0 \n\
                     7f20-7f30 rw-s 00000000 103:02 99 /dev/shm/a (deleted)\n";
        let v: Vec<_> = mapped_files(maps).collect();
        assert_eq!(v, vec![(0xfd, 1, 123456), (0x103, 2, 99)]);
        let dev = libc::makedev(0xfd, 1);
        assert_eq!(dev_parts(dev), (0xfd, 1));
        let big = libc::makedev(259, 70000);
        assert_eq!(dev_parts(big), (259, 70000));
    }
}

//! Host PIDs from the kernel: each slot's recorded host PID, checked against the
//! exporter's own view of `/proc` (`--proc.path`).
//!
//! A slot records its owner's identity as the kernel knows it (`vigil_region::procfs`):
//! PID in its own namespace, PID-namespace inode, start time. The process with that
//! identity is the one `P` in `<proc>/[0-9]*` whose `ns/pid` inode is the slot's, whose
//! `status` `NSpid:` line ends with the slot's PID, and whose `stat` start time is the
//! slot's; `P` is its PID in the exporter's view. That is a **host** PID when the view is
//! an ancestor of the process's namespace (`NSpid:` has more than one field: a
//! DaemonSet with `hostPID: true`, or a host process looking into a container) or when
//! the process lives in the kernel's initial namespace. A view that shares the
//! process's own, non-initial namespace (a sidecar with `shareProcessNamespace`)
//! cannot see host PIDs.
//!
//! Each slot incarnation (region, slot index, generation) is checked once and counted
//! in `vigil_host_pid_checks_total{result}`:
//! - `match` / `mismatch`: the outcome is `found` and the recorded host PID is / is not
//!   the resolved one;
//! - `unresolvable`: the outcome is `found` but no process of the view matched (the
//!   exporter cannot see the host's `/proc`, cannot read the process's `ns/pid`, the
//!   slot recorded no identity), or the view is not the host's;
//! - `not_recorded`: there is no host PID to compare (any other outcome, e.g.
//!   `same_namespace`, whose recorded PID is the namespace PID; or none recorded).
//!
//! A slot is counted once its detection outcome is set; a slot whose process goes away
//! before that, or before the exporter could look for it, is not counted. `/proc` is
//! scanned only for live `found` slots not looked up before, in one directory pass
//! for all regions, at most once per `--proc.scan-interval`. A "no such process"
//! answer is confirmed by the next scrape: the slot must still be alive then (so its
//! process was alive during the scan), otherwise it is not counted.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use vigil_region::procfs::{self, ProcessIdentity, PROC_PID_INIT_INO};
use vigil_region::{DetectOutcome, SlotInfo};

/// Every `result` of `vigil_host_pid_checks_total`, all exported from the start.
pub const RESULTS: [&str; 4] = ["match", "mismatch", "unresolvable", "not_recorded"];

/// Index into [`RESULTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Match = 0,
    Mismatch = 1,
    Unresolvable = 2,
    NotRecorded = 3,
}

impl CheckResult {
    pub fn name(self) -> &'static str {
        RESULTS[self as usize]
    }
}

/// What the exporter's `/proc` says about a slot's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Found; its PID in the exporter's view, a host PID.
    Host(u32),
    /// Found, but the view shares the process's own non-initial PID namespace: the
    /// PID seen (given) is not a host PID.
    NotHostView(u32),
    /// No process of the view has the slot's identity (or its `ns/pid` could not be
    /// read).
    NotFound,
    /// The slot recorded no complete identity (its process could not read `/proc`).
    NoIdentity,
}

impl Resolution {
    pub fn host_pid(self) -> Option<u32> {
        match self {
            Resolution::Host(p) => Some(p),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Resolution::Host(_) => "host",
            Resolution::NotHostView(_) => "not_host_view",
            Resolution::NotFound => "not_found",
            Resolution::NoIdentity => "no_identity",
        }
    }
}

/// True if a slot with this outcome and recorded host PID has a host PID to compare.
pub fn has_host_pid(outcome: u32, recorded: u32) -> bool {
    outcome == DetectOutcome::Found as u32 && recorded != 0
}

/// The check of one slot. None while there is nothing to say: no detection outcome
/// yet, or a host PID to compare but no resolution yet.
pub fn classify(outcome: u32, recorded: u32, res: Option<Resolution>) -> Option<CheckResult> {
    if outcome == 0 {
        return None;
    }
    if !has_host_pid(outcome, recorded) {
        return Some(CheckResult::NotRecorded);
    }
    Some(match res? {
        Resolution::Host(p) if p == recorded => CheckResult::Match,
        Resolution::Host(_) => CheckResult::Mismatch,
        Resolution::NotHostView(_) | Resolution::NotFound | Resolution::NoIdentity => {
            CheckResult::Unresolvable
        }
    })
}

/// What one pass over `/proc` cost and met.
#[derive(Debug, Clone, Default)]
pub struct ScanStats {
    /// Numeric entries looked at.
    pub processes: usize,
    /// Processes whose start time and namespace PID matched a wanted slot.
    pub candidates: usize,
    /// Candidates whose `ns/pid` could not be read: permission denied.
    pub ns_denied: usize,
    /// Wanted identities found.
    pub found: usize,
    /// Of those, found by namespace PID and start time alone (`ns/pid` unreadable).
    pub by_pair: usize,
    pub duration: Duration,
    /// The directory itself could not be listed.
    pub error: Option<String>,
    /// The exporter ran out of file descriptors during the pass: what it found is
    /// incomplete, and "not found" means nothing.
    pub no_fds: bool,
}

/// True for EMFILE and ENFILE: out of file descriptors, a passing condition.
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

fn is_pid(name: &[u8]) -> Option<u32> {
    if name.is_empty() || name.len() > 10 || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name)
        .ok()?
        .parse()
        .ok()
        .filter(|&p| p != 0)
}

/// One pass over `root` (`/proc` or `--proc.path`) resolving every identity in
/// `wanted` at once. Each process costs one read of `stat`; only those whose start
/// time is wanted have `status` read, and only those whose namespace PID also matches
/// have `ns/pid` looked at. Stops as soon as everything is found.
pub fn scan(
    root: &Path,
    wanted: &[ProcessIdentity],
) -> (HashMap<ProcessIdentity, Resolution>, ScanStats) {
    let t0 = Instant::now();
    let mut stats = ScanStats::default();
    let mut out: HashMap<ProcessIdentity, Resolution> = HashMap::with_capacity(wanted.len());
    let mut by_start: HashMap<u64, Vec<ProcessIdentity>> = HashMap::new();
    for id in wanted {
        if id.is_complete() {
            if out.insert(*id, Resolution::NotFound).is_none() {
                by_start.entry(id.start_time_ticks).or_default().push(*id);
            }
        } else {
            out.insert(*id, Resolution::NoIdentity);
        }
    }
    let mut missing = by_start.values().map(Vec::len).sum::<usize>();
    if missing == 0 {
        stats.duration = t0.elapsed();
        return (out, stats);
    }
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) => {
            stats.no_fds = is_out_of_fds(&e);
            stats.error = Some(format!("cannot list {}: {e}", root.display()));
            stats.duration = t0.elapsed();
            return (out, stats);
        }
    };
    // Candidates whose `ns/pid` could not be read, by (namespace PID, start time):
    // (PID in the view, NSpid length).
    let mut unverified: HashMap<(u32, u64), Vec<(u32, usize)>> = HashMap::new();
    for e in rd.flatten() {
        let Some(pid) = is_pid(e.file_name().as_encoded_bytes()) else {
            continue;
        };
        stats.processes += 1;
        let dir = e.path();
        // Reads one of the process's files. Out of descriptors: the scan stops (and
        // says so); any other failure: on to the next process.
        macro_rules! read_or_next {
            ($name:literal) => {
                match procfs::read_small(&dir.join($name)) {
                    Ok(s) => s,
                    Err(e) if is_out_of_fds(&e) => {
                        stats.no_fds = true;
                        break;
                    }
                    Err(_) => continue,
                }
            };
        }
        let stat = read_or_next!("stat");
        let Some(start) = procfs::parse_stat_start_time(&stat) else {
            continue;
        };
        let Some(same_start) = by_start.get(&start) else {
            continue;
        };
        let status = read_or_next!("status");
        let Some(nspid) = procfs::parse_nspid(&status) else {
            continue;
        };
        // NSpid starts with the PID in the view's namespace: the directory's name.
        let (Some(&first), Some(&own)) = (nspid.first(), nspid.last()) else {
            continue;
        };
        if first != pid || !same_start.iter().any(|id| id.pid == own) {
            continue;
        }
        stats.candidates += 1;
        let ino = match procfs::pidns_inode(&dir) {
            Ok(i) => i,
            Err(e) if is_out_of_fds(&e) => {
                stats.no_fds = true;
                break;
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    stats.ns_denied += 1;
                }
                unverified
                    .entry((own, start))
                    .or_default()
                    .push((pid, nspid.len()));
                continue;
            }
        };
        let id = ProcessIdentity {
            pid: own,
            pidns_inode: ino,
            start_time_ticks: start,
        };
        if let Some(r) = out.get_mut(&id) {
            if *r == Resolution::NotFound {
                *r = if nspid.len() >= 2 || ino == PROC_PID_INIT_INO {
                    Resolution::Host(pid)
                } else {
                    Resolution::NotHostView(pid)
                };
                stats.found += 1;
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
    }
    // Without ptrace access to a workload (another UID, no CAP_SYS_PTRACE) its
    // `ns/pid` cannot be read. Namespace PID plus start time (in clock ticks) then
    // still names it when exactly one process of the view, and exactly one wanted
    // slot, has that pair; two containers whose PID 1 started in the same tick are
    // left unresolvable rather than guessed.
    if missing > 0 && !unverified.is_empty() {
        let mut wanted_pairs: HashMap<(u32, u64), usize> = HashMap::new();
        for id in out.keys().filter(|id| id.is_complete()) {
            *wanted_pairs
                .entry((id.pid, id.start_time_ticks))
                .or_default() += 1;
        }
        for (id, r) in out.iter_mut() {
            let key = (id.pid, id.start_time_ticks);
            if *r != Resolution::NotFound || wanted_pairs.get(&key) != Some(&1) {
                continue;
            }
            if let Some([(pid, len)]) = unverified.get(&key).map(Vec::as_slice) {
                *r = if *len >= 2 {
                    Resolution::Host(*pid)
                } else {
                    Resolution::NotHostView(*pid)
                };
                stats.found += 1;
                stats.by_pair += 1;
            }
        }
    }
    stats.duration = t0.elapsed();
    (out, stats)
}

/// One slot incarnation the exporter has seen.
#[derive(Debug, Clone)]
struct Incarnation {
    generation: u32,
    identity: ProcessIdentity,
    /// Outcome and recorded host PID as last seen.
    outcome: u32,
    recorded: u32,
    resolution: Option<Resolution>,
    /// Counted (or given up on): never looked at again.
    done: bool,
}

/// One region's checks: the slot incarnations in its current snapshot and the counts
/// (indexed like [`RESULTS`]; they only grow while the region is watched).
#[derive(Debug, Default)]
pub struct RegionChecks {
    /// The region's init nonce: a re-created region's slots are new incarnations even
    /// where index and generation repeat.
    nonce: u64,
    /// By slot index, in index order.
    slots: Vec<(u16, Incarnation)>,
    counts: [u64; 4],
}

impl RegionChecks {
    pub fn counts(&self) -> [u64; 4] {
        self.counts
    }

    fn count(&mut self, r: CheckResult) {
        self.counts[r as usize] = self.counts[r as usize].saturating_add(1);
    }

    /// Step 1 of a scrape: takes in a snapshot's slots, counts every incarnation whose
    /// result is now known, and returns the identities to look up in `/proc`.
    pub fn observe(&mut self, nonce: u64, slots: &[SlotInfo]) -> Vec<ProcessIdentity> {
        if nonce != self.nonce {
            self.nonce = nonce;
            self.slots.clear();
        }
        // Keep the incarnations of slots still present: as they are when the same
        // slots are in use, else by one merge of two lists in slot order (no
        // hashing: this runs for every region on every scrape). Slots that are gone
        // (released, reaped) are forgotten, so memory stays bounded by the current
        // snapshot.
        let mut order: Vec<&SlotInfo> = slots.iter().collect();
        if !order.windows(2).all(|w| w[0].index < w[1].index) {
            order.sort_by_key(|s| s.index);
            order.dedup_by_key(|s| s.index);
        }
        let same_slots = self.slots.len() == order.len()
            && self
                .slots
                .iter()
                .zip(&order)
                .all(|((i, _), s)| *i == s.index);
        if !same_slots {
            let mut old = std::mem::take(&mut self.slots).into_iter().peekable();
            self.slots.reserve(order.len());
            for s in &order {
                while old.next_if(|(i, _)| *i < s.index).is_some() {}
                let inc = old
                    .next_if(|(i, _)| *i == s.index)
                    .map_or_else(|| Incarnation::new(s), |(_, inc)| inc);
                self.slots.push((s.index, inc));
            }
        }
        let mut wanted = Vec::new();
        let mut counted = Vec::new();
        for (s, (_, inc)) in order.iter().zip(self.slots.iter_mut()) {
            if inc.generation != s.generation {
                *inc = Incarnation::new(s);
            }
            if inc.done {
                continue;
            }
            if inc.identity != s.identity() {
                // Only seen mid-claim (with the outcome cleared) or from a forging
                // writer: start over, still once per incarnation.
                inc.identity = s.identity();
                inc.resolution = None;
            }
            inc.outcome = s.detect_outcome;
            inc.recorded = s.host_pid;
            let result = match classify(inc.outcome, inc.recorded, inc.resolution) {
                None if inc.outcome == 0 => continue,
                None if !inc.identity.is_complete() => Some(CheckResult::Unresolvable),
                None if s.alive => {
                    wanted.push(inc.identity);
                    continue;
                }
                // Dead before it could be looked up: not counted.
                None => None,
                // "Not found" by a scan that ran before this snapshot, and the owner
                // still alive now: it was alive during the scan.
                Some(CheckResult::Unresolvable)
                    if inc.resolution == Some(Resolution::NotFound) && !s.alive =>
                {
                    None
                }
                r => r,
            };
            inc.done = true;
            counted.extend(result);
        }
        for r in counted {
            self.count(r);
        }
        wanted
    }

    /// Step 2: the resolutions of a scan run after [`RegionChecks::observe`]. A found
    /// process is counted at once; "not found" waits for the next snapshot to confirm
    /// the owner was alive.
    pub fn resolved(&mut self, results: &HashMap<ProcessIdentity, Resolution>) {
        let mut counted = Vec::new();
        for (_, inc) in self.slots.iter_mut() {
            if inc.done || inc.resolution.is_some() {
                continue;
            }
            let Some(&r) = results.get(&inc.identity) else {
                continue;
            };
            inc.resolution = Some(r);
            if r == Resolution::NotFound {
                continue;
            }
            if let Some(c) = classify(inc.outcome, inc.recorded, Some(r)) {
                inc.done = true;
                counted.push(c);
            }
        }
        for c in counted {
            self.count(c);
        }
    }
}

impl Incarnation {
    fn new(s: &SlotInfo) -> Incarnation {
        Incarnation {
            generation: s.generation,
            identity: s.identity(),
            outcome: s.detect_outcome,
            recorded: s.host_pid,
            resolution: None,
            done: false,
        }
    }
}

/// The exporter's side of the checks: where `/proc` is, and how often it may be
/// scanned.
#[derive(Debug)]
pub struct HostPidChecker {
    root: PathBuf,
    min_interval: Duration,
    last_scan: Mutex<Option<Instant>>,
    warned_denied: AtomicBool,
    warned_list: AtomicBool,
}

impl HostPidChecker {
    pub fn new(root: PathBuf, min_interval: Duration) -> HostPidChecker {
        HostPidChecker {
            root,
            min_interval,
            last_scan: Mutex::new(None),
            warned_denied: AtomicBool::new(false),
            warned_list: AtomicBool::new(false),
        }
    }

    /// When the last `/proc` scan began, if one has.
    pub fn last_scan(&self) -> Option<Instant> {
        *crate::util::lock(&self.last_scan)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Scans for `wanted` unless a scan ran less than the interval ago (then None:
    /// the slots wait for a later scrape). The caller serializes calls.
    pub fn scan_if_due(
        &self,
        wanted: &[ProcessIdentity],
    ) -> Option<HashMap<ProcessIdentity, Resolution>> {
        if wanted.is_empty() {
            return None;
        }
        {
            let mut last = crate::util::lock(&self.last_scan);
            if last.is_some_and(|t| t.elapsed() < self.min_interval) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let (res, st) = scan(&self.root, wanted);
        if st.no_fds {
            // Out of descriptors: nothing is concluded; the slots wait for a later scan.
            warn!(
                "host-PID check: out of file descriptors while reading {}; the slots are checked at a later scan",
                self.root.display()
            );
            return None;
        }
        debug!(
            "host-PID check: {} slot(s) looked up in {}: {} processes, {} candidates, {} found ({} by namespace PID and start time alone), {} ns/pid denied, {:?}",
            wanted.len(),
            self.root.display(),
            st.processes,
            st.candidates,
            st.found,
            st.by_pair,
            st.ns_denied,
            st.duration
        );
        if let Some(e) = &st.error {
            if !self.warned_list.swap(true, Relaxed) {
                warn!("host-PID check: {e}; every found slot counts as unresolvable (logged once)");
            }
        }
        if st.ns_denied > 0 && !self.warned_denied.swap(true, Relaxed) {
            warn!(
                "host-PID check: permission denied reading {}/<pid>/ns/pid of {} process(es) (the exporter lacks ptrace read access: another UID, no CAP_SYS_PTRACE); they are matched by namespace PID and start time alone where that pair is unique, else unresolvable (logged once)",
                self.root.display(),
                st.ns_denied
            );
        }
        Some(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOUND: u32 = DetectOutcome::Found as u32;
    const SAME_NS: u32 = DetectOutcome::SameNamespace as u32;

    fn slot(index: u16, generation: u32, outcome: u32, host_pid: u32, alive: bool) -> SlotInfo {
        SlotInfo {
            index,
            generation,
            pid: 7,
            pidns_inode: 4026532000 + index as u64,
            start_time_ticks: 1000 + generation as u64,
            host_pid,
            detect_outcome: outcome,
            mem_used: Default::default(),
            alive,
            unenforced: vec![],
        }
    }

    #[test]
    fn classification() {
        use CheckResult::*;
        use Resolution::*;
        assert_eq!(classify(0, 0, None), None, "no outcome yet");
        assert_eq!(classify(0, 5, Some(Host(5))), None);
        assert_eq!(classify(FOUND, 5, None), None, "not looked up yet");
        assert_eq!(classify(FOUND, 5, Some(Host(5))), Some(Match));
        assert_eq!(classify(FOUND, 5, Some(Host(6))), Some(Mismatch));
        for r in [NotHostView(5), NotFound, NoIdentity] {
            assert_eq!(classify(FOUND, 5, Some(r)), Some(Unresolvable));
        }
        assert_eq!(classify(FOUND, 0, Some(Host(5))), Some(NotRecorded));
        assert_eq!(classify(SAME_NS, 7, Some(Host(5))), Some(NotRecorded));
        assert_eq!(classify(SAME_NS, 7, None), Some(NotRecorded));
        assert_eq!(classify(99, 7, None), Some(NotRecorded), "forged outcome");
    }

    #[test]
    fn each_incarnation_is_counted_once() {
        let mut c = RegionChecks::default();
        let s = slot(0, 1, 0, 0, true);
        assert!(
            c.observe(1, std::slice::from_ref(&s)).is_empty(),
            "no outcome yet"
        );
        let s = slot(0, 1, FOUND, 500, true);
        let want = c.observe(1, std::slice::from_ref(&s));
        assert_eq!(want, vec![s.identity()]);
        let res = HashMap::from([(s.identity(), Resolution::Host(500))]);
        c.resolved(&res);
        assert_eq!(c.counts(), [1, 0, 0, 0]);
        for _ in 0..3 {
            assert!(c.observe(1, std::slice::from_ref(&s)).is_empty());
            c.resolved(&res);
        }
        assert_eq!(c.counts(), [1, 0, 0, 0], "scrapes do not count again");
        // The next incarnation of the slot is a new check.
        let s2 = slot(0, 2, FOUND, 500, true);
        assert_eq!(c.observe(1, std::slice::from_ref(&s2)), vec![s2.identity()]);
        c.resolved(&HashMap::from([(s2.identity(), Resolution::Host(501))]));
        assert_eq!(c.counts(), [1, 1, 0, 0]);
        // A re-created region starts its generations over: new incarnations too.
        let s3 = slot(0, 2, SAME_NS, 7, true);
        assert!(c.observe(2, &[s3]).is_empty());
        assert_eq!(c.counts(), [1, 1, 0, 1]);
    }

    #[test]
    fn not_found_counts_only_if_the_owner_outlived_the_scan() {
        let mut c = RegionChecks::default();
        let a = slot(0, 1, FOUND, 500, true);
        let b = slot(1, 1, FOUND, 600, true);
        let want = c.observe(1, &[a.clone(), b.clone()]);
        assert_eq!(want.len(), 2);
        c.resolved(&HashMap::from([
            (a.identity(), Resolution::NotFound),
            (b.identity(), Resolution::NotFound),
        ]));
        assert_eq!(
            c.counts(),
            [0; 4],
            "not yet: confirmed by the next snapshot"
        );
        let b_dead = slot(1, 1, FOUND, 600, false);
        assert!(c.observe(1, &[a.clone(), b_dead.clone()]).is_empty());
        assert_eq!(
            c.counts(),
            [0, 0, 1, 0],
            "a alive: unresolvable; b died: skipped"
        );
        c.observe(1, &[a, b_dead]);
        assert_eq!(c.counts(), [0, 0, 1, 0]);
    }

    #[test]
    fn dead_or_identityless_slots() {
        let mut c = RegionChecks::default();
        // Dead before any lookup: nothing to count, nothing to scan.
        assert!(c.observe(1, &[slot(0, 1, FOUND, 5, false)]).is_empty());
        // No identity recorded: unresolvable without a scan.
        let mut s = slot(1, 1, FOUND, 5, true);
        s.pidns_inode = 0;
        assert!(c.observe(1, &[s]).is_empty());
        assert_eq!(c.counts(), [0, 0, 1, 0]);
        // A slot that disappears is forgotten.
        c.observe(1, &[]);
        assert!(c.slots.is_empty());
    }

    #[test]
    fn scan_finds_this_process_in_proc() {
        let me = ProcessIdentity::current();
        if !me.is_complete() {
            eprintln!("SKIPPED: no readable /proc/self here");
            return;
        }
        let other = ProcessIdentity {
            start_time_ticks: me.start_time_ticks + 1,
            ..me
        };
        let (res, st) = scan(Path::new("/proc"), &[me, other, ProcessIdentity::default()]);
        let want = if me.pidns_inode == PROC_PID_INIT_INO {
            Resolution::Host(me.pid)
        } else {
            Resolution::NotHostView(me.pid)
        };
        assert_eq!(res[&me], want, "{st:?}");
        assert_eq!(res[&other], Resolution::NotFound);
        assert_eq!(res[&ProcessIdentity::default()], Resolution::NoIdentity);
        assert!(st.processes >= 1 && st.error.is_none(), "{st:?}");

        let empty = tempfile::tempdir().unwrap();
        let (res, st) = scan(empty.path(), &[me]);
        assert_eq!(res[&me], Resolution::NotFound);
        assert_eq!(st.processes, 0);
        let (res, st) = scan(&empty.path().join("nope"), &[me]);
        assert_eq!(res[&me], Resolution::NotFound);
        assert!(st.error.is_some());
    }

    #[test]
    fn only_numeric_entries_are_processes() {
        assert_eq!(is_pid(b"1234"), Some(1234));
        for bad in [&b""[..], b"0", b"self", b"12a", b"99999999999", b"-1"] {
            assert_eq!(is_pid(bad), None, "{bad:?}");
        }
    }

    /// A fake /proc entry: `stat` with start time `start`, `status` with `nspid`,
    /// and no `ns/` (as unreadable as without ptrace access).
    fn fake(root: &Path, pid: u32, start: u64, nspid: &str) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let mut stat = format!("{pid} (a b) S");
        for _ in 4..22 {
            stat.push_str(" 0");
        }
        stat.push_str(&format!(" {start} 0 0\n"));
        std::fs::write(d.join("stat"), stat).unwrap();
        std::fs::write(d.join("status"), format!("Name:\tw\nNSpid:\t{nspid}\n")).unwrap();
    }

    #[test]
    fn without_ns_access_a_unique_namespace_pid_and_start_time_still_resolves() {
        let root = tempfile::tempdir().unwrap();
        fake(root.path(), 4100, 777, "4100\t1");
        fake(root.path(), 4200, 888, "4200\t1");
        fake(root.path(), 4300, 888, "4300\t1"); // same pair as 4200: ambiguous
        let id = |start| ProcessIdentity {
            pid: 1,
            pidns_inode: 4026532999,
            start_time_ticks: start,
        };
        let (res, st) = scan(root.path(), &[id(777), id(888)]);
        assert_eq!(res[&id(777)], Resolution::Host(4100));
        assert_eq!(
            res[&id(888)],
            Resolution::NotFound,
            "two processes share the pair"
        );
        assert_eq!((st.found, st.by_pair), (1, 1));
        // Two wanted slots sharing the pair are not guessed either.
        let other = ProcessIdentity {
            pidns_inode: 4026533000,
            ..id(777)
        };
        let (res, _) = scan(root.path(), &[id(777), other]);
        assert_eq!(res[&id(777)], Resolution::NotFound);
    }
}

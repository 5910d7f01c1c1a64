//! Host-PID detection, the pure part. Two algorithms share one `Probe` on the world:
//!
//! - `run_signature` (the default, `VIGIL_DETECT_MODE=parallel`): no lock. After our
//!   primary context exists we take a staircase of marker allocations of random page
//!   sizes, one step at a time, and accept the one NVML entry that is seen moving onto
//!   every step (see `signature`). Processes of one container, or of many, detect at
//!   the same time without waiting for each other; another process's entry cannot
//!   pass unless it steps by our sizes at our moments.
//! - `run_serial` (`VIGIL_DETECT_MODE=serial`, the seed's design): under the region's
//!   detection lock, poll until exactly one new PID that no live slot has claimed
//!   appears, then confirm it with one 2 MiB marker. Correct while one container
//!   starts at a time; across containers it cannot tell whose PID is whose.
//!
//! Polling is adaptive in both: the first poll comes at once, then the wait doubles up
//! to a cap, under a deadline, and drops back to the start after each marker step.

use crate::signature::{self, Tracker};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use vigil_region::DetectOutcome;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub poll_start: Duration,
    pub poll_max: Duration,
    pub deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub outcome: DetectOutcome,
    /// The host PID, for `Found` (and our own PID for `SameNamespace`).
    pub host_pid: Option<u32>,
    pub polls: u32,
    /// Candidates seen last when the outcome is `Ambiguous`.
    pub candidates: Vec<u32>,
    /// Candidates that failed confirmation (other containers' processes).
    pub foreign: Vec<u32>,
    /// Our usage before any marker, as NVML showed it (the context's footprint): from
    /// the accepted entry, or when none was, the smallest seen on entries like ours.
    pub footprint: Option<u64>,
    /// Why detection gave up early, for the log.
    pub note: Option<String>,
}

/// The staircase: how many steps, of how many pages at most each.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    pub steps: usize,
    pub max_pages: u64,
}

/// NVML's "not available" for a process's memory (some vGPU and Windows setups).
pub const NOT_AVAILABLE: u64 = u64::MAX;

/// What detection needs from the world; the interposer passes NVML, the region and
/// the driver, tests pass scripts.
pub trait Probe {
    /// (PID, used bytes) per process NVML lists on the detection device. A PID can
    /// repeat when the driver reports namespace PIDs. Err on an NVML error.
    fn nvml_procs(&mut self) -> Result<Vec<(u32, u64)>, String>;
    /// Host PIDs already recorded by other live slots.
    fn claimed(&mut self) -> BTreeSet<u32>;
    /// Whether another process of our region already saw namespace PIDs from the driver.
    fn namespace_pids_seen(&mut self) -> bool;
    /// Allocates a marker of `bytes` on our context, charged against the limit like
    /// any allocation. Err when refused (the limit, the driver).
    fn mark(&mut self, bytes: u64) -> Result<(), String>;
    /// Frees the newest marker.
    fn unmark(&mut self);
    /// Randomness for the marker sizes.
    fn random(&mut self) -> u64;
    /// A named point where a test can kill us (`fault-injection`).
    fn fault(&mut self, _point: &'static str) {}
    /// Whether we run in the host's (initial) PID namespace: NVML then lists us by the
    /// PID we know, and markers are pointless.
    fn in_initial_pid_namespace(&mut self) -> bool {
        false
    }
    /// Time since detection started.
    fn elapsed(&mut self) -> Duration;
    fn sleep(&mut self, d: Duration);
}

fn counts(procs: &[(u32, u64)]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for (p, _) in procs {
        *m.entry(*p).or_insert(0) += 1;
    }
    m
}

/// How many entries `counts` found for `pid`.
fn entries(m: &BTreeMap<u32, usize>, pid: u32) -> usize {
    m.get(&pid).copied().unwrap_or(0)
}

fn used_of(procs: &[(u32, u64)], pid: u32) -> Option<u64> {
    procs.iter().find(|(p, _)| *p == pid).map(|(_, u)| *u)
}

fn done(
    outcome: DetectOutcome,
    host_pid: Option<u32>,
    polls: u32,
    foreign: &BTreeSet<u32>,
) -> Detection {
    Detection {
        outcome,
        host_pid,
        polls,
        candidates: Vec::new(),
        foreign: foreign.iter().copied().collect(),
        footprint: None,
        note: None,
    }
}

/// Whether NVML now lists one more entry with our own PID than before (or ours at all,
/// once the region knows the driver reports namespace PIDs): the driver speaks
/// namespace PIDs and the new entry is us. Lists are multisets: with such a driver
/// every container's first process is PID 1.
fn ours_by_namespace(
    before: &BTreeMap<u32, usize>,
    now: &BTreeMap<u32, usize>,
    me: u32,
    probe: &mut impl Probe,
) -> bool {
    let mine = |m| entries(m, me);
    mine(now) > mine(before) || (mine(now) > 0 && probe.namespace_pids_seen())
}

/// Takes a staircase step of `bytes` (or one page if that is refused); Err says why
/// not even a page could be had.
fn step(
    t: &mut Tracker,
    held: &mut Vec<u64>,
    bytes: u64,
    probe: &mut impl Probe,
) -> Result<(), String> {
    let mut why = String::new();
    for b in [bytes, signature::UNIT] {
        match probe.mark(b) {
            Ok(()) => {
                t.step_up(b);
                held.push(b);
                return Ok(());
            }
            Err(e) => why = e,
        }
        if b == signature::UNIT {
            break;
        }
    }
    Err(format!("no detection marker could be allocated ({why})"))
}

/// Frees every marker, newest first, and ends the round.
fn unwind(t: &mut Tracker, held: &mut Vec<u64>, probe: &mut impl Probe) {
    while let Some(b) = held.pop() {
        probe.unmark();
        t.step_down(b);
    }
    t.new_round();
}

/// Signature detection (see the module doc and `signature`). `before` is the list
/// taken before our context was created, `me` our PID as we see it.
pub fn run_signature(
    policy: &Policy,
    sig: &Signature,
    before: &[(u32, u64)],
    me: u32,
    probe: &mut impl Probe,
) -> Detection {
    let before = counts(before);
    let mut t = Tracker::new();
    let mut held: Vec<u64> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut step_at = Duration::ZERO;
    let mut first_show: Option<Duration> = None;
    let mut wait = policy.poll_start;
    let (mut polls, mut errors) = (0u32, 0u32);
    let mut note: Option<String> = None;
    let host_ns = probe.in_initial_pid_namespace();
    // A step nobody shows within this long starts a new round.
    let stuck = (policy.poll_max * 15).max(Duration::from_millis(100));
    // After the first entry shows a step, how long the others get to show it too.
    let grace = policy.poll_max;
    loop {
        polls += 1;
        match probe.nvml_procs() {
            Ok(procs) => {
                errors = 0;
                let now_c = counts(&procs);
                if ours_by_namespace(&before, &now_c, me, probe) {
                    unwind(&mut t, &mut held, probe);
                    let mut d = done(DetectOutcome::SameNamespace, Some(me), polls, t.rejected());
                    if t.actions() > 0 {
                        // NVML may still show our markers on our own entry: its value
                        // now is no measure of the context by itself. The smallest of
                        // it and of what entries like ours showed first is.
                        let ours = procs.iter().find(|p| p.0 == me).map(|p| p.1);
                        d.footprint = match (ours, t.first_min()) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    return d;
                }
                if host_ns {
                    // Only our own PID can be ours: wait for it, no markers.
                    let left = policy.deadline.saturating_sub(probe.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    probe.sleep(wait.min(left));
                    wait = (wait * 2).min(policy.poll_max);
                    continue;
                }
                let claimed = probe.claimed();
                let mut present = BTreeSet::new();
                let mut unavailable = 0usize;
                for &(pid, used) in &procs {
                    // Fresh, listed once (a repeated PID is a namespace PID), unclaimed.
                    if entries(&now_c, pid) <= entries(&before, pid) || entries(&now_c, pid) != 1 {
                        continue;
                    }
                    if claimed.contains(&pid) {
                        t.reject(pid);
                        continue;
                    }
                    if used == NOT_AVAILABLE {
                        unavailable += 1;
                        continue;
                    }
                    present.insert(pid);
                    t.observe(pid, used);
                }
                let gone: Vec<u32> = t.alive().filter(|p| !present.contains(p)).collect();
                for p in gone {
                    t.reject(p);
                }
                if unavailable > 0 && present.is_empty() && t.alive().next().is_none() {
                    note = Some("NVML does not report per-process memory here (usedGpuMemory not available): no signature can be seen".into());
                    break;
                }
                let now = probe.elapsed();
                if held.is_empty() {
                    // Between rounds: start one as soon as there is anyone to watch.
                    if t.alive().next().is_some() {
                        sizes = signature::step_sizes(sig.steps, sig.max_pages, || probe.random());
                        if let Err(e) = step(&mut t, &mut held, sizes[0], probe) {
                            note = Some(e);
                            break;
                        }
                        probe.fault("detect.marker_held");
                        (step_at, first_show, wait) = (now, None, policy.poll_start);
                    }
                } else {
                    let cur = *t.round().last().unwrap_or(&0);
                    let showers = t.alive().filter(|p| t.shown(*p, cur)).count();
                    if showers == 0 {
                        // Someone who could not have seen the step arrived (ours,
                        // late?), or nobody moves: start over with new sizes.
                        let newcomer = t.alive().any(|p| t.seen_after(p, cur));
                        if newcomer || now.saturating_sub(step_at) >= stuck {
                            unwind(&mut t, &mut held, probe);
                            wait = policy.poll_start;
                            continue;
                        }
                    } else {
                        let shown_at = *first_show.get_or_insert(now);
                        let all = t
                            .alive()
                            .filter(|p| !t.seen_after(*p, cur))
                            .all(|p| t.shown(p, cur));
                        if all || now.saturating_sub(shown_at) >= grace {
                            if held.len() >= sizes.len() {
                                let complete = t.complete();
                                unwind(&mut t, &mut held, probe);
                                if let [(pid, base)] = complete[..] {
                                    let mut d =
                                        done(DetectOutcome::Found, Some(pid), polls, t.rejected());
                                    d.footprint = Some(base);
                                    return d;
                                }
                                // Nobody, or more than one, showed every step: again.
                                wait = policy.poll_start;
                                continue;
                            }
                            let next = sizes[held.len()];
                            if let Err(e) = step(&mut t, &mut held, next, probe) {
                                unwind(&mut t, &mut held, probe);
                                note = Some(e);
                                break;
                            }
                            (step_at, first_show, wait) = (now, None, policy.poll_start);
                        }
                    }
                }
            }
            Err(_) => errors += 1,
        }
        if probe.elapsed() >= policy.deadline {
            break;
        }
        let left = policy.deadline.saturating_sub(probe.elapsed());
        probe.sleep(wait.min(left));
        wait = (wait * 2).min(policy.poll_max);
    }
    unwind(&mut t, &mut held, probe);
    let candidates: Vec<u32> = t.alive().collect();
    let outcome = if note.is_some() || !candidates.is_empty() || !t.rejected().is_empty() {
        DetectOutcome::Ambiguous
    } else if errors > 0 {
        DetectOutcome::NvmlError
    } else {
        DetectOutcome::Timeout
    };
    let mut d = done(outcome, None, polls, t.rejected());
    d.candidates = candidates;
    d.footprint = t.bases().into_iter().chain(t.first_min()).min();
    d.note = note;
    d
}

/// The confirmation marker of the serial mode: one 2 MiB page.
pub const MARKER: u64 = signature::UNIT;

/// Serial detection, under the detection lock. `before` is the snapshot taken before
/// our context was created, `me` our PID as we see it.
pub fn run_serial(
    policy: &Policy,
    before: &[(u32, u64)],
    me: u32,
    probe: &mut impl Probe,
) -> Detection {
    let before = counts(before);
    let mut wait = policy.poll_start;
    let mut polls = 0u32;
    let mut last_candidates: Vec<u32> = Vec::new();
    let mut errors = 0u32;
    let mut foreign: BTreeSet<u32> = BTreeSet::new();
    // While confirming: (candidate, its usage before the marker, marker size, when).
    let mut confirming: Option<(u32, u64, u64, Duration)> = None;
    // NVML shows a process's memory some time after the allocation (tens of ms on
    // the simulator's default): a candidate that has not moved within this is foreign.
    let confirm_window = (policy.poll_max * 20)
        .max(Duration::from_millis(200))
        .min(policy.deadline / 4);
    loop {
        polls += 1;
        match probe.nvml_procs() {
            Ok(procs) => {
                errors = 0;
                let now = counts(&procs);
                // (The entry we see may be a predecessor's that is about to go, but the
                // answer is the same.)
                if ours_by_namespace(&before, &now, me, probe) {
                    if confirming.is_some() {
                        probe.unmark();
                    }
                    return done(DetectOutcome::SameNamespace, Some(me), polls, &foreign);
                }
                if let Some((cand, base, size, _)) = confirming {
                    match used_of(&procs, cand) {
                        Some(u) if u >= base.saturating_add(size) => {
                            probe.unmark();
                            return done(DetectOutcome::Found, Some(cand), polls, &foreign);
                        }
                        Some(_) => {
                            // Not yet reflected; give it until the window closes.
                        }
                        None => {
                            probe.unmark();
                            foreign.insert(cand);
                            confirming = None;
                        }
                    }
                } else {
                    let claimed = probe.claimed();
                    let fresh: Vec<u32> = now
                        .iter()
                        .filter(|(p, n)| {
                            **n > entries(&before, **p)
                                && !claimed.contains(p)
                                && !foreign.contains(p)
                        })
                        .map(|(p, _)| *p)
                        .collect();
                    if fresh.len() == 1 {
                        let cand = fresh[0];
                        match probe.mark(MARKER) {
                            Ok(()) => {
                                confirming = Some((
                                    cand,
                                    used_of(&procs, cand).unwrap_or(0),
                                    MARKER,
                                    probe.elapsed(),
                                ));
                                wait = policy.poll_start;
                            }
                            // Cannot confirm (driver refused the marker): accept, as a
                            // diff-only detector would.
                            Err(_) => {
                                return done(DetectOutcome::Found, Some(cand), polls, &foreign)
                            }
                        }
                    }
                    // Zero: not visible yet. Several: keep polling, a foreign process
                    // may go away or be told apart.
                    last_candidates = fresh;
                }
            }
            Err(_) => errors += 1,
        }
        if probe.elapsed() >= policy.deadline {
            if let Some((cand, ..)) = confirming.take() {
                probe.unmark();
                foreign.insert(cand);
            }
            let outcome = if errors > 0 && last_candidates.is_empty() {
                DetectOutcome::NvmlError
            } else if last_candidates.len() > 1 || !foreign.is_empty() {
                DetectOutcome::Ambiguous
            } else {
                DetectOutcome::Timeout
            };
            let mut d = done(outcome, None, polls, &foreign);
            d.candidates = last_candidates;
            return d;
        }
        // A candidate whose usage did not move within the window is foreign.
        if let Some((cand, _, _, since)) = confirming {
            if probe.elapsed().saturating_sub(since) >= confirm_window {
                probe.unmark();
                foreign.insert(cand);
                confirming = None;
            }
        }
        let left = policy.deadline.saturating_sub(probe.elapsed());
        probe.sleep(wait.min(left));
        wait = (wait * 2).min(policy.poll_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: u64 = 2 << 20;

    /// A scripted NVML: `polls[i]` is what poll i returns (the last one repeats); the
    /// marker adds MARK to `owner`'s usage in later polls; the clock moves by sleeps.
    struct Script {
        polls: Vec<Result<Vec<(u32, u64)>, ()>>,
        claimed: Vec<u32>,
        ns_seen: bool,
        owner: u32,
        marked: bool,
        unmarks: u32,
        t: Duration,
        i: usize,
        sleeps: Vec<Duration>,
    }

    impl Probe for Script {
        fn nvml_procs(&mut self) -> Result<Vec<(u32, u64)>, String> {
            let r = self.polls[self.i.min(self.polls.len() - 1)].clone();
            self.i += 1;
            let (owner, marked) = (self.owner, self.marked);
            r.map(|v| {
                v.into_iter()
                    .map(|(p, u)| (p, if marked && p == owner { u + MARK } else { u }))
                    .collect()
            })
            .map_err(|_| "nvml".into())
        }
        fn claimed(&mut self) -> BTreeSet<u32> {
            self.claimed.iter().copied().collect()
        }
        fn namespace_pids_seen(&mut self) -> bool {
            self.ns_seen
        }
        fn mark(&mut self, bytes: u64) -> Result<(), String> {
            assert_eq!(bytes, MARK);
            self.marked = true;
            Ok(())
        }
        fn unmark(&mut self) {
            self.marked = false;
            self.unmarks += 1;
        }
        fn random(&mut self) -> u64 {
            0
        }
        fn elapsed(&mut self) -> Duration {
            self.t
        }
        fn sleep(&mut self, d: Duration) {
            self.sleeps.push(d);
            self.t += d;
        }
    }

    fn script(polls: Vec<Result<Vec<u32>, ()>>, claimed: Vec<u32>, owner: u32) -> Script {
        Script {
            polls: polls
                .into_iter()
                .map(|r| r.map(|v| v.into_iter().map(|p| (p, 100)).collect()))
                .collect(),
            claimed,
            ns_seen: false,
            owner,
            marked: false,
            unmarks: 0,
            t: Duration::ZERO,
            i: 0,
            sleeps: Vec::new(),
        }
    }

    const P: Policy = Policy {
        poll_start: Duration::from_millis(1),
        poll_max: Duration::from_millis(8),
        deadline: Duration::from_millis(100),
    };

    fn before() -> Vec<(u32, u64)> {
        vec![(10, 100), (11, 100)]
    }

    #[test]
    fn found_and_confirmed_in_two_polls() {
        let mut s = script(vec![Ok(vec![10, 11, 500])], vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!(
            (d.outcome, d.host_pid, d.polls),
            (DetectOutcome::Found, Some(500), 2)
        );
        assert_eq!(s.unmarks, 1, "the marker is always freed");
        assert_eq!(s.sleeps, vec![Duration::from_millis(1)]);
    }

    #[test]
    fn backs_off_from_the_start_to_the_cap() {
        let mut polls: Vec<Result<Vec<u32>, ()>> = vec![Ok(vec![10, 11]); 6];
        polls.push(Ok(vec![10, 11, 500]));
        let mut s = script(polls, vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!(d.outcome, DetectOutcome::Found);
        let ms: Vec<u64> = s.sleeps.iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(
            ms,
            vec![1, 2, 4, 8, 8, 8, 1],
            "backoff, then a quick confirmation poll"
        );
    }

    #[test]
    fn a_foreign_process_that_shows_up_first_is_not_taken() {
        // 900 (another container) appears first; we (500) appear later.
        let polls = vec![
            Ok(vec![10, 11, 900]),
            Ok(vec![10, 11, 900]),
            Ok(vec![10, 11, 900]),
            Ok(vec![10, 11, 900]),
            Ok(vec![10, 11, 900, 500]),
        ];
        let mut s = script(polls, vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(500)));
        assert_eq!(d.foreign, vec![900]);
        assert!(!s.marked, "the marker is freed");
    }

    #[test]
    fn only_a_foreign_process_is_ambiguous_never_found() {
        let mut s = script(vec![Ok(vec![10, 11, 900])], vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Ambiguous, None));
        assert_eq!(d.foreign, vec![900]);
        assert!(!s.marked);
    }

    #[test]
    fn pids_claimed_by_live_slots_are_never_taken() {
        let mut s = script(
            vec![Ok(vec![10, 11, 400]), Ok(vec![10, 11, 400, 500])],
            vec![400],
            500,
        );
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!(d.host_pid, Some(500));
    }

    #[test]
    fn two_unclaimed_newcomers_wait_until_one_leaves() {
        let mut s = script(
            vec![
                Ok(vec![10, 11, 500, 900]),
                Ok(vec![10, 11, 500, 900]),
                Ok(vec![10, 11, 500]),
            ],
            vec![],
            500,
        );
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(500)));
        let mut s = script(vec![Ok(vec![10, 11, 500, 900])], vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Ambiguous, None));
        assert_eq!(d.candidates, vec![500, 900]);
    }

    #[test]
    fn our_own_pid_means_the_driver_reports_namespace_pids() {
        let mut s = script(vec![Ok(vec![10, 11, 7])], vec![], 7);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!(
            (d.outcome, d.host_pid),
            (DetectOutcome::SameNamespace, Some(7))
        );
    }

    #[test]
    fn namespace_pids_repeat_and_one_more_of_ours_is_us() {
        let b = vec![(1, 100), (1, 100), (1, 100)];
        let mut s = script(vec![Ok(vec![1, 1, 1]), Ok(vec![1, 1, 1, 1])], vec![1], 1);
        let d = run_serial(&P, &b, 1, &mut s);
        assert_eq!((d.outcome, d.polls), (DetectOutcome::SameNamespace, 2));
        // The predecessor leaves as we arrive: the count of PID 1 never rises. Once the
        // region knows namespace PIDs, seeing ours listed is enough.
        let mut s = script(vec![Ok(vec![1])], vec![], 1);
        assert_eq!(
            run_serial(&P, &[(1, 100)], 1, &mut s).outcome,
            DetectOutcome::Timeout
        );
        let mut s = script(vec![Ok(vec![1])], vec![], 1);
        s.ns_seen = true;
        assert_eq!(
            run_serial(&P, &[(1, 100)], 1, &mut s).outcome,
            DetectOutcome::SameNamespace
        );
    }

    #[test]
    fn nothing_new_times_out_and_errors_are_nvml_errors() {
        let mut s = script(vec![Ok(vec![10, 11])], vec![], 500);
        let d = run_serial(&P, &before(), 7, &mut s);
        assert_eq!(d.outcome, DetectOutcome::Timeout);
        assert!(
            s.t >= P.deadline && s.t < P.deadline + P.poll_max,
            "honours the deadline"
        );
        let mut s = script(vec![Err(())], vec![], 500);
        assert_eq!(
            run_serial(&P, &before(), 7, &mut s).outcome,
            DetectOutcome::NvmlError
        );
    }
}

#[cfg(test)]
mod signature_tests {
    use super::*;
    use crate::signature::UNIT;

    const OURS: u32 = 4242;
    const BASE: u64 = 259 * UNIT;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn ms(&mut self, lo: u64, hi: u64) -> Duration {
            Duration::from_millis(lo + self.next() % (hi - lo + 1))
        }
    }

    /// One process as NVML shows it: usage changes that become visible after a lag,
    /// in order.
    struct Shown {
        pid: u32,
        listed_from: Duration,
        base: u64,
        /// (visible at, level after the change)
        changes: Vec<(Duration, u64)>,
    }

    impl Shown {
        fn at(&self, t: Duration) -> Option<(u32, u64)> {
            (t >= self.listed_from).then(|| {
                let level = self
                    .changes
                    .iter()
                    .take_while(|c| c.0 <= t)
                    .last()
                    .map_or(0, |c| c.1);
                (self.pid, self.base + level)
            })
        }
        fn push(&mut self, now: Duration, lag: Duration, level: u64) {
            let after = self.changes.last().map_or(Duration::ZERO, |c| c.0);
            self.changes.push(((now + lag).max(after), level));
        }
    }

    /// A node: us, and other processes that detect at the same time with their own
    /// staircases (another container's Vigil), or sit idle.
    struct World {
        t: Duration,
        rng: Rng,
        lag: (u64, u64),
        ours: Shown,
        held: Vec<u64>,
        others: Vec<Shown>,
        cap: u64,
        marks: u32,
        host_ns: bool,
    }

    impl World {
        fn new(seed: u64, lag: (u64, u64), ours_listed_ms: u64) -> World {
            World {
                t: Duration::ZERO,
                rng: Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                lag,
                ours: Shown {
                    pid: OURS,
                    listed_from: Duration::from_millis(ours_listed_ms),
                    base: BASE,
                    changes: Vec::new(),
                },
                held: Vec::new(),
                others: Vec::new(),
                cap: u64::MAX,
                marks: 0,
                host_ns: false,
            }
        }

        /// Another detector: rounds of `steps` random steps, one every 10-40 ms.
        fn detector(&mut self, pid: u32, listed_ms: u64, steps: usize) {
            let mut s = Shown {
                pid,
                listed_from: Duration::from_millis(listed_ms),
                base: BASE,
                changes: Vec::new(),
            };
            let mut now = Duration::from_millis(listed_ms);
            for _ in 0..20 {
                let mut level = 0;
                for _ in 0..steps {
                    level += (1 + self.rng.next() % 16) * UNIT;
                    let lag = self.rng.ms(self.lag.0, self.lag.1);
                    s.push(now, lag, level);
                    now += self.rng.ms(10, 40);
                }
                let lag = self.rng.ms(self.lag.0, self.lag.1);
                s.push(now, lag, 0);
                now += self.rng.ms(5, 20);
            }
            self.others.push(s);
        }

        fn idle(&mut self, pid: u32, listed_ms: u64) {
            self.others.push(Shown {
                pid,
                listed_from: Duration::from_millis(listed_ms),
                base: BASE,
                changes: Vec::new(),
            });
        }
    }

    impl Probe for World {
        fn nvml_procs(&mut self) -> Result<Vec<(u32, u64)>, String> {
            let t = self.t;
            let mut v: Vec<(u32, u64)> = self.others.iter().filter_map(|s| s.at(t)).collect();
            v.extend(self.ours.at(t));
            v.sort_unstable();
            Ok(v)
        }
        fn claimed(&mut self) -> BTreeSet<u32> {
            BTreeSet::new()
        }
        fn namespace_pids_seen(&mut self) -> bool {
            false
        }
        fn mark(&mut self, bytes: u64) -> Result<(), String> {
            let level: u64 = self.held.iter().sum::<u64>() + bytes;
            if level > self.cap {
                return Err(format!("{bytes} bytes refused by the memory limit"));
            }
            self.held.push(bytes);
            self.marks += 1;
            let lag = self.rng.ms(self.lag.0, self.lag.1);
            self.ours.push(self.t, lag, level);
            Ok(())
        }
        fn unmark(&mut self) {
            self.held.pop();
            let level = self.held.iter().sum();
            let lag = self.rng.ms(self.lag.0, self.lag.1);
            self.ours.push(self.t, lag, level);
        }
        fn random(&mut self) -> u64 {
            self.rng.next()
        }
        fn in_initial_pid_namespace(&mut self) -> bool {
            self.host_ns
        }
        fn elapsed(&mut self) -> Duration {
            self.t
        }
        fn sleep(&mut self, d: Duration) {
            // Each poll also costs a little.
            self.t += d + Duration::from_micros(200);
        }
    }

    const P: Policy = Policy {
        poll_start: Duration::from_millis(1),
        poll_max: Duration::from_millis(10),
        deadline: Duration::from_secs(5),
    };
    const SIG: Signature = Signature {
        steps: 5,
        max_pages: 16,
    };

    #[test]
    fn alone_it_finds_itself_and_its_footprint() {
        let mut w = World::new(1, (5, 30), 0);
        let d = run_signature(&P, &SIG, &[], 1, &mut w);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(OURS)));
        assert_eq!(d.footprint, Some(BASE));
        assert!(w.held.is_empty(), "every marker is freed");
        assert!(w.t < Duration::from_millis(400), "took {:?}", w.t);
    }

    #[test]
    fn among_concurrent_detectors_it_is_never_wrong() {
        let (mut found, mut wrong, runs) = (0, 0, 300);
        for seed in 1..=runs {
            let mut w = World::new(seed, (5, 30), seed % 40);
            for k in 0..15 {
                w.detector(1000 + k, (seed * 7 + k as u64 * 13) % 60, 5);
            }
            w.idle(3000, 10);
            let d = run_signature(&P, &SIG, &[], 1, &mut w);
            match d.host_pid {
                Some(OURS) => found += 1,
                Some(_) => wrong += 1,
                None => {}
            }
            assert!(w.held.is_empty());
        }
        assert_eq!(wrong, 0);
        assert!(found * 100 >= runs * 99, "found {found} of {runs}");
    }

    #[test]
    fn listed_late_it_starts_over_and_is_found() {
        // Others are listed at once; we only after 150 ms (a long NVML lag).
        let mut w = World::new(3, (5, 30), 150);
        w.detector(1000, 0, 5);
        w.idle(3000, 0);
        let d = run_signature(&P, &SIG, &[], 1, &mut w);
        assert_eq!(d.host_pid, Some(OURS));
    }

    #[test]
    fn never_listed_is_ambiguous_not_someone_else() {
        let mut w = World::new(4, (5, 30), 1_000_000);
        w.detector(1000, 0, 5);
        w.idle(3000, 0);
        let d = run_signature(&P, &SIG, &[], 1, &mut w);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Ambiguous, None));
        assert!(w.held.is_empty());
        assert_eq!(d.footprint, Some(BASE), "the footprint seen on the others");
    }

    #[test]
    fn no_room_for_a_marker_gives_up_at_once() {
        let mut w = World::new(5, (5, 30), 0);
        w.cap = UNIT / 2;
        let d = run_signature(&P, &SIG, &[], 1, &mut w);
        assert_eq!(d.outcome, DetectOutcome::Ambiguous);
        assert!(d.note.unwrap().contains("memory limit"));
        assert!(w.t < Duration::from_millis(50));
    }

    #[test]
    fn a_tight_limit_falls_back_to_single_pages() {
        let mut w = World::new(6, (5, 30), 0);
        w.cap = 5 * UNIT;
        let d = run_signature(&P, &SIG, &[], 1, &mut w);
        assert_eq!(d.host_pid, Some(OURS));
    }

    #[test]
    fn entries_from_before_our_context_are_not_candidates() {
        let mut w = World::new(7, (5, 30), 0);
        w.idle(3000, 0);
        let before = vec![(3000, BASE)];
        let d = run_signature(&P, &SIG, &before, 1, &mut w);
        assert_eq!(d.host_pid, Some(OURS));
        assert!(d.foreign.is_empty());
    }

    #[test]
    fn our_namespace_pid_listed_means_same_namespace() {
        let mut w = World::new(8, (5, 30), 0);
        w.ours.pid = 7;
        let d = run_signature(&P, &SIG, &[], 7, &mut w);
        assert_eq!(
            (d.outcome, d.host_pid),
            (DetectOutcome::SameNamespace, Some(7))
        );
    }

    #[test]
    fn in_the_host_namespace_it_waits_for_its_own_pid_without_markers() {
        // Others start at once and are listed first; we are listed late, by our PID.
        let mut w = World::new(9, (5, 30), 120);
        w.ours.pid = 7;
        w.host_ns = true;
        w.detector(1000, 0, 5);
        let d = run_signature(&P, &SIG, &[], 7, &mut w);
        assert_eq!(
            (d.outcome, d.host_pid),
            (DetectOutcome::SameNamespace, Some(7))
        );
        assert_eq!(w.marks, 0, "no marker in the host namespace");
        assert_eq!(d.footprint, None, "our own entry measures the context");
    }

    #[test]
    fn markers_taken_before_our_pid_showed_are_not_measured_as_the_context() {
        // A namespace-PID driver: a foreign entry appears first and a round starts;
        // then our own PID is listed, possibly with a marker on it.
        let mut w = World::new(10, (5, 30), 60);
        w.ours.pid = 7;
        w.detector(1000, 0, 5);
        let d = run_signature(&P, &SIG, &[], 7, &mut w);
        assert_eq!(d.outcome, DetectOutcome::SameNamespace);
        assert!(w.marks > 0);
        assert_eq!(
            d.footprint,
            Some(BASE),
            "from entries like ours, not ours with markers"
        );
        assert!(w.held.is_empty());
    }
}

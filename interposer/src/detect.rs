//! Host-PID detection, the pure part: given the NVML process list from before our
//! primary context existed, poll until exactly one new PID that no live slot has
//! claimed appears, then *confirm* it is ours before accepting it.
//!
//! Polling is adaptive: the first poll comes at once (on the 580 driver the process is
//! already listed when the context call returns), then the wait doubles up to a cap,
//! under a deadline.
//!
//! Confirmation closes the hole in diff-based detection (HAMi's included): a process
//! of another container that creates a context in our window and shows up in NVML
//! before we do is "exactly one new PID" too. So we allocate a small marker on our own
//! context and accept the candidate only if NVML shows *its* memory grow by at least
//! that much; otherwise it is foreign, excluded, and polling goes on.

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
}

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
    /// Allocates the confirmation marker on our context; returns its size.
    fn mark(&mut self) -> Result<u64, String>;
    /// Frees the marker.
    fn unmark(&mut self);
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
    }
}

/// Polls until the outcome is known. `before` is the snapshot taken before our context
/// was created, `me` our PID as we see it.
///
/// Lists are compared as multisets: with a driver that reports namespace PIDs, every
/// container's first process is PID 1, so "one more entry with our own PID" is the
/// sign that the new entry is us.
pub fn run(policy: &Policy, before: &[(u32, u64)], me: u32, probe: &mut impl Probe) -> Detection {
    let before = counts(before);
    let had = |m: &BTreeMap<u32, usize>, p: u32| m.get(&p).copied().unwrap_or(0);
    let mut wait = policy.poll_start;
    let mut polls = 0u32;
    let mut last_candidates: Vec<u32> = Vec::new();
    let mut errors = 0u32;
    let mut foreign: BTreeSet<u32> = BTreeSet::new();
    // While confirming: (candidate, its usage before the marker, marker size).
    let mut confirming: Option<(u32, u64, u64)> = None;
    loop {
        polls += 1;
        match probe.nvml_procs() {
            Ok(procs) => {
                errors = 0;
                let now = counts(&procs);
                // One more entry with our PID, or our PID listed at all once the region
                // knows the driver speaks namespace PIDs (the entry we see may be a
                // predecessor's that is about to go, but the answer is the same).
                if had(&now, me) > had(&before, me)
                    || (had(&now, me) > 0 && probe.namespace_pids_seen())
                {
                    if confirming.is_some() {
                        probe.unmark();
                    }
                    return done(DetectOutcome::SameNamespace, Some(me), polls, &foreign);
                }
                if let Some((cand, base, size)) = confirming {
                    match used_of(&procs, cand) {
                        Some(u) if u >= base.saturating_add(size) => {
                            probe.unmark();
                            return done(DetectOutcome::Found, Some(cand), polls, &foreign);
                        }
                        Some(_) => {
                            // Not yet reflected; give it until a few polls at the cap.
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
                            **n > had(&before, **p) && !claimed.contains(p) && !foreign.contains(p)
                        })
                        .map(|(p, _)| *p)
                        .collect();
                    if fresh.len() == 1 {
                        let cand = fresh[0];
                        match probe.mark() {
                            Ok(size) => {
                                confirming = Some((cand, used_of(&procs, cand).unwrap_or(0), size));
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
            if let Some((cand, _, _)) = confirming.take() {
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
        // A candidate whose usage did not move within a few capped polls is foreign.
        if let Some((cand, _, _)) = confirming {
            if wait >= policy.poll_max && polls.is_multiple_of(4) {
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
        fn mark(&mut self) -> Result<u64, String> {
            self.marked = true;
            Ok(MARK)
        }
        fn unmark(&mut self) {
            self.marked = false;
            self.unmarks += 1;
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
        let d = run(&P, &before(), 7, &mut s);
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
        let d = run(&P, &before(), 7, &mut s);
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
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(500)));
        assert_eq!(d.foreign, vec![900]);
        assert!(!s.marked, "the marker is freed");
    }

    #[test]
    fn only_a_foreign_process_is_ambiguous_never_found() {
        let mut s = script(vec![Ok(vec![10, 11, 900])], vec![], 500);
        let d = run(&P, &before(), 7, &mut s);
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
        let d = run(&P, &before(), 7, &mut s);
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
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(500)));
        let mut s = script(vec![Ok(vec![10, 11, 500, 900])], vec![], 500);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Ambiguous, None));
        assert_eq!(d.candidates, vec![500, 900]);
    }

    #[test]
    fn our_own_pid_means_the_driver_reports_namespace_pids() {
        let mut s = script(vec![Ok(vec![10, 11, 7])], vec![], 7);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(
            (d.outcome, d.host_pid),
            (DetectOutcome::SameNamespace, Some(7))
        );
    }

    #[test]
    fn namespace_pids_repeat_and_one_more_of_ours_is_us() {
        let b = vec![(1, 100), (1, 100), (1, 100)];
        let mut s = script(vec![Ok(vec![1, 1, 1]), Ok(vec![1, 1, 1, 1])], vec![1], 1);
        let d = run(&P, &b, 1, &mut s);
        assert_eq!((d.outcome, d.polls), (DetectOutcome::SameNamespace, 2));
        // The predecessor leaves as we arrive: the count of PID 1 never rises. Once the
        // region knows namespace PIDs, seeing ours listed is enough.
        let mut s = script(vec![Ok(vec![1])], vec![], 1);
        assert_eq!(
            run(&P, &[(1, 100)], 1, &mut s).outcome,
            DetectOutcome::Timeout
        );
        let mut s = script(vec![Ok(vec![1])], vec![], 1);
        s.ns_seen = true;
        assert_eq!(
            run(&P, &[(1, 100)], 1, &mut s).outcome,
            DetectOutcome::SameNamespace
        );
    }

    #[test]
    fn nothing_new_times_out_and_errors_are_nvml_errors() {
        let mut s = script(vec![Ok(vec![10, 11])], vec![], 500);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(d.outcome, DetectOutcome::Timeout);
        assert!(
            s.t >= P.deadline && s.t < P.deadline + P.poll_max,
            "honours the deadline"
        );
        let mut s = script(vec![Err(())], vec![], 500);
        assert_eq!(
            run(&P, &before(), 7, &mut s).outcome,
            DetectOutcome::NvmlError
        );
    }
}

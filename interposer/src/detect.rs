//! Host-PID detection, the pure part: given the NVML process list from before our
//! primary context existed, poll until exactly one new PID that no live slot has
//! claimed appears. Adaptive: the first poll comes almost at once (on the 580 driver
//! the process is already listed when the context call returns), then the wait
//! doubles up to a cap, under a deadline.

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
}

/// What detection needs from the world; the interposer passes NVML and the region,
/// tests pass scripts.
pub trait Probe {
    /// PIDs NVML lists on the detection device, one entry per process (a PID can
    /// repeat when the driver reports namespace PIDs); Err on an NVML error.
    fn nvml_pids(&mut self) -> Result<Vec<u32>, String>;
    /// Host PIDs already recorded by other live slots.
    fn claimed(&mut self) -> BTreeSet<u32>;
    /// Time since detection started.
    fn elapsed(&mut self) -> Duration;
    fn sleep(&mut self, d: Duration);
}

fn counts(pids: &[u32]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for p in pids {
        *m.entry(*p).or_insert(0) += 1;
    }
    m
}

/// Polls until the outcome is known. `before` is the snapshot taken before our context
/// was created, `me` our PID as we see it.
///
/// Lists are compared as multisets: with a driver that reports namespace PIDs, every
/// container's first process is PID 1, so "one more entry with our own PID" is the
/// only sign that the new entry is us.
pub fn run(policy: &Policy, before: &[u32], me: u32, probe: &mut impl Probe) -> Detection {
    let before = counts(before);
    let had = |m: &BTreeMap<u32, usize>, p: u32| m.get(&p).copied().unwrap_or(0);
    let mut wait = policy.poll_start;
    let mut polls = 0u32;
    let mut last_candidates: Vec<u32> = Vec::new();
    let mut errors = 0u32;
    loop {
        polls += 1;
        match probe.nvml_pids() {
            Ok(now) => {
                errors = 0;
                let now = counts(&now);
                if had(&now, me) > had(&before, me) {
                    // The driver reports PIDs as we see them: there is nothing to translate.
                    return Detection {
                        outcome: DetectOutcome::SameNamespace,
                        host_pid: Some(me),
                        polls,
                        candidates: Vec::new(),
                    };
                }
                let claimed = probe.claimed();
                let fresh: Vec<u32> = now
                    .iter()
                    .filter(|(p, n)| **n > had(&before, **p) && !claimed.contains(p))
                    .map(|(p, _)| *p)
                    .collect();
                if fresh.len() == 1 {
                    return Detection {
                        outcome: DetectOutcome::Found,
                        host_pid: Some(fresh[0]),
                        polls,
                        candidates: Vec::new(),
                    };
                }
                // Zero: not visible yet. Several: a foreign process created a context
                // too; keep polling, it may go away or be claimed.
                last_candidates = fresh;
            }
            Err(_) => errors += 1,
        }
        if probe.elapsed() >= policy.deadline {
            let outcome = if errors > 0 && last_candidates.is_empty() {
                DetectOutcome::NvmlError
            } else if last_candidates.len() > 1 {
                DetectOutcome::Ambiguous
            } else {
                DetectOutcome::Timeout
            };
            return Detection {
                outcome,
                host_pid: None,
                polls,
                candidates: last_candidates,
            };
        }
        let left = policy.deadline.saturating_sub(probe.elapsed());
        probe.sleep(wait.min(left));
        wait = (wait * 2).min(policy.poll_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted NVML: `script[i]` is what poll i returns; the clock advances only
    /// by sleeps.
    struct Script {
        polls: Vec<Result<Vec<u32>, ()>>,
        claimed: Vec<u32>,
        t: Duration,
        i: usize,
        sleeps: Vec<Duration>,
    }

    impl Probe for Script {
        fn nvml_pids(&mut self) -> Result<Vec<u32>, String> {
            let r = self.polls[self.i.min(self.polls.len() - 1)].clone();
            self.i += 1;
            r.map_err(|_| "nvml".into())
        }
        fn claimed(&mut self) -> BTreeSet<u32> {
            self.claimed.iter().copied().collect()
        }
        fn elapsed(&mut self) -> Duration {
            self.t
        }
        fn sleep(&mut self, d: Duration) {
            self.sleeps.push(d);
            self.t += d;
        }
    }

    fn script(polls: Vec<Result<Vec<u32>, ()>>, claimed: Vec<u32>) -> Script {
        Script {
            polls,
            claimed,
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

    fn before() -> Vec<u32> {
        vec![10, 11]
    }

    #[test]
    fn found_on_the_first_poll_costs_no_sleep() {
        let mut s = script(vec![Ok(vec![10, 11, 500])], vec![]);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(
            (d.outcome, d.host_pid, d.polls),
            (DetectOutcome::Found, Some(500), 1)
        );
        assert!(s.sleeps.is_empty());
    }

    #[test]
    fn backs_off_from_the_start_to_the_cap() {
        let mut polls: Vec<Result<Vec<u32>, ()>> = vec![Ok(vec![10, 11]); 6];
        polls.push(Ok(vec![10, 11, 500]));
        let mut s = script(polls, vec![]);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.polls), (DetectOutcome::Found, 7));
        let ms: Vec<u64> = s.sleeps.iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(ms, vec![1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn pids_claimed_by_live_slots_are_never_taken() {
        let mut s = script(
            vec![Ok(vec![10, 11, 400]), Ok(vec![10, 11, 400, 500])],
            vec![400],
        );
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(d.host_pid, Some(500));
    }

    #[test]
    fn two_unclaimed_newcomers_are_not_guessed_until_one_leaves() {
        let mut s = script(
            vec![
                Ok(vec![10, 11, 500, 900]),
                Ok(vec![10, 11, 500, 900]),
                Ok(vec![10, 11, 500]),
            ],
            vec![],
        );
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Found, Some(500)));
        let mut s = script(vec![Ok(vec![10, 11, 500, 900])], vec![]);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!((d.outcome, d.host_pid), (DetectOutcome::Ambiguous, None));
        assert_eq!(d.candidates, vec![500, 900]);
    }

    #[test]
    fn our_own_pid_means_the_driver_reports_namespace_pids() {
        let mut s = script(vec![Ok(vec![10, 11, 7])], vec![]);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(
            (d.outcome, d.host_pid),
            (DetectOutcome::SameNamespace, Some(7))
        );
    }

    #[test]
    fn namespace_pids_repeat_and_one_more_of_ours_is_us() {
        // Other containers' first processes are PID 1 too, and already listed.
        let before = vec![1, 1, 1];
        let mut s = script(vec![Ok(vec![1, 1, 1]), Ok(vec![1, 1, 1, 1])], vec![1]);
        let d = run(&P, &before, 1, &mut s);
        assert_eq!((d.outcome, d.polls), (DetectOutcome::SameNamespace, 2));
    }

    #[test]
    fn nothing_new_times_out_and_errors_are_nvml_errors() {
        let mut s = script(vec![Ok(vec![10, 11])], vec![]);
        let d = run(&P, &before(), 7, &mut s);
        assert_eq!(d.outcome, DetectOutcome::Timeout);
        assert!(
            s.t >= P.deadline && s.t < P.deadline + P.poll_max,
            "honours the deadline"
        );
        let mut s = script(vec![Err(())], vec![]);
        assert_eq!(
            run(&P, &before(), 7, &mut s).outcome,
            DetectOutcome::NvmlError
        );
    }
}

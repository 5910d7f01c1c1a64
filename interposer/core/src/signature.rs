//! Memory signatures, the pure part: which NVML process entry is moving exactly as
//! our own markers do?
//!
//! A detector holds a *history*: the total bytes of markers it holds after each of its
//! actions (allocations step up, frees step down). NVML shows each process's usage
//! with some delay, but in order, so the entry that is ours shows a prefix of that
//! history on top of a base (the context footprint): `used = base + level(j)` with `j`
//! never going backwards. An entry of another process does not, unless that process
//! happens to step by the same sizes at the same moments.
//!
//! We do not know an entry's base, nor how far through the history it was when we
//! first saw it, so each entry carries *hypotheses* (base, position); an observation
//! that no hypothesis explains rejects the entry for good. A step up is *credited* to
//! a hypothesis only when that entry is seen moving onto it from an earlier position:
//! an entry first seen already at a step proves nothing about that step.

use std::collections::{BTreeMap, BTreeSet};

/// NVML accounts device memory in 2 MiB pages: markers are whole pages.
pub const UNIT: u64 = 2 << 20;

#[derive(Debug, Clone)]
struct Hyp {
    base: u64,
    pos: usize,
    credited: BTreeSet<usize>,
}

#[derive(Debug, Clone)]
struct Entry {
    hyps: Vec<Hyp>,
    last: u64,
    /// Action count when the entry was first seen.
    first_seen: usize,
}

/// The history and every entry's hypotheses.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// Marker bytes held after each action; `levels[0]` = 0, before any.
    levels: Vec<u64>,
    /// Actions of the current round that stepped up.
    round: Vec<usize>,
    entries: BTreeMap<u32, Entry>,
    rejected: BTreeSet<u32>,
    /// The smallest usage any entry showed when first seen (rejected ones included).
    first_min: Option<u64>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            levels: vec![0],
            round: Vec::new(),
            entries: BTreeMap::new(),
            rejected: BTreeSet::new(),
            first_min: None,
        }
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Actions taken so far.
    pub fn actions(&self) -> usize {
        self.levels.len() - 1
    }

    /// Marker bytes held now.
    pub fn level(&self) -> u64 {
        *self.levels.last().unwrap_or(&0)
    }

    /// The steps of the current round, as action indices.
    pub fn round(&self) -> &[usize] {
        &self.round
    }

    /// We allocated a marker of `bytes`: a step up, part of the current round.
    pub fn step_up(&mut self, bytes: u64) -> usize {
        self.levels.push(self.level().saturating_add(bytes));
        self.round.push(self.actions());
        self.actions()
    }

    /// We freed a marker of `bytes`.
    pub fn step_down(&mut self, bytes: u64) {
        self.levels.push(self.level().saturating_sub(bytes));
    }

    /// A new round begins (markers all freed): its steps are credited afresh.
    pub fn new_round(&mut self) {
        self.round.clear();
    }

    /// The smallest position at or after `from` whose level is `level`.
    fn find(&self, from: usize, level: u64) -> Option<usize> {
        (from..self.levels.len()).find(|&j| self.levels[j] == level)
    }

    fn is_step_up(&self, j: usize) -> bool {
        j > 0 && self.levels[j] > self.levels[j - 1]
    }

    /// NVML lists `pid` using `used` bytes.
    pub fn observe(&mut self, pid: u32, used: u64) {
        if self.rejected.contains(&pid) {
            return;
        }
        if let Some(e) = self.entries.get(&pid) {
            if e.last == used {
                return;
            }
        }
        let actions = self.actions();
        let Some(mut e) = self.entries.remove(&pid) else {
            self.first_min = Some(self.first_min.map_or(used, |m| m.min(used)));
            // First sight: any level reached so far may be what it shows.
            let mut hyps: Vec<Hyp> = Vec::new();
            for j in 0..self.levels.len() {
                let l = self.levels[j];
                if l <= used && !hyps.iter().any(|h| h.base == used - l) {
                    hyps.push(Hyp {
                        base: used - l,
                        pos: j,
                        credited: BTreeSet::new(),
                    });
                }
            }
            self.entries.insert(
                pid,
                Entry {
                    hyps,
                    last: used,
                    first_seen: actions,
                },
            );
            return;
        };
        let mut kept = Vec::with_capacity(e.hyps.len());
        for mut h in std::mem::take(&mut e.hyps) {
            let Some(level) = used.checked_sub(h.base) else {
                continue;
            };
            let Some(j) = self.find(h.pos, level) else {
                continue;
            };
            // Moving onto a step from before it: the step is shown.
            if j > h.pos && self.is_step_up(j) {
                h.credited.insert(j);
            }
            h.pos = j;
            kept.push(h);
        }
        if kept.is_empty() {
            self.rejected.insert(pid);
            return;
        }
        e.hyps = kept;
        e.last = used;
        self.entries.insert(pid, e);
    }

    /// `pid` cannot be ours (it left NVML while we live, or another process of our
    /// region claimed it).
    pub fn reject(&mut self, pid: u32) {
        self.entries.remove(&pid);
        self.rejected.insert(pid);
    }

    /// Candidates still consistent with our history.
    pub fn alive(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.keys().copied()
    }

    #[cfg(test)]
    pub fn is_rejected(&self, pid: u32) -> bool {
        self.rejected.contains(&pid)
    }

    pub fn rejected(&self) -> &BTreeSet<u32> {
        &self.rejected
    }

    /// Whether `pid` has shown step `action`.
    pub fn shown(&self, pid: u32, action: usize) -> bool {
        self.entries
            .get(&pid)
            .is_some_and(|e| e.hyps.iter().any(|h| h.credited.contains(&action)))
    }

    /// Whether `pid` was first seen after `action`.
    pub fn seen_after(&self, pid: u32, action: usize) -> bool {
        self.entries
            .get(&pid)
            .is_some_and(|e| e.first_seen >= action)
    }

    /// Entries that have shown every step of the current round, with the base (our
    /// usage before any marker: the context footprint) their hypothesis implies.
    pub fn complete(&self) -> Vec<(u32, u64)> {
        if self.round.is_empty() {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter_map(|(pid, e)| {
                e.hyps
                    .iter()
                    .find(|h| self.round.iter().all(|a| h.credited.contains(a)))
                    .map(|h| (*pid, h.base))
            })
            .collect()
    }

    /// The smallest usage any entry showed when first seen: a process like ours, its
    /// context and little else.
    pub fn first_min(&self) -> Option<u64> {
        self.first_min
    }

    /// The bases of every entry still consistent (what a context takes, seen on
    /// processes like ours), for charging a context when detection fails.
    pub fn bases(&self) -> Vec<u64> {
        self.entries
            .values()
            .filter_map(|e| e.hyps.first().map(|h| h.base))
            .collect()
    }
}

/// Draws `k` distinct step sizes of 1..=`max_units` pages from `rand`.
pub fn step_sizes(k: usize, max_units: u64, mut rand: impl FnMut() -> u64) -> Vec<u64> {
    let max_units = max_units.max(k as u64).max(1);
    let mut out: Vec<u64> = Vec::with_capacity(k);
    while out.len() < k {
        let mut u = 1 + rand() % max_units;
        while out.contains(&(u * UNIT)) {
            u = u % max_units + 1;
        }
        out.push(u * UNIT);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = UNIT;

    #[test]
    fn our_entry_is_credited_step_by_step_and_its_base_is_the_footprint() {
        let mut t = Tracker::new();
        t.observe(500, 518 * M);
        let a1 = t.step_up(3 * M);
        t.observe(500, 518 * M); // not reflected yet
        assert!(!t.shown(500, a1));
        t.observe(500, 521 * M);
        assert!(t.shown(500, a1));
        let a2 = t.step_up(5 * M);
        t.observe(500, 526 * M);
        assert!(t.shown(500, a2));
        assert_eq!(t.complete(), vec![(500, 518 * M)]);
    }

    #[test]
    fn an_entry_moving_by_other_sizes_is_rejected() {
        let mut t = Tracker::new();
        t.observe(900, 518 * M);
        t.step_up(3 * M);
        t.observe(900, 522 * M); // +4 pages: not ours
        assert!(t.is_rejected(900));
        assert!(t.complete().is_empty());
        // Rejection is final.
        t.observe(900, 521 * M);
        assert!(t.alive().next().is_none());
    }

    #[test]
    fn an_idle_entry_stays_alive_but_never_completes() {
        let mut t = Tracker::new();
        t.observe(900, 518 * M);
        t.step_up(3 * M);
        t.observe(900, 518 * M);
        assert_eq!(t.alive().collect::<Vec<_>>(), vec![900]);
        assert!(t.complete().is_empty());
    }

    #[test]
    fn polls_may_skip_levels_but_skipped_steps_are_not_credited() {
        let mut t = Tracker::new();
        t.observe(500, 100 * M);
        let a1 = t.step_up(2 * M);
        let a2 = t.step_up(7 * M);
        t.observe(500, 109 * M); // jumped over the first step
        assert!(!t.shown(500, a1) && t.shown(500, a2));
        assert!(
            t.complete().is_empty(),
            "a step it never showed proves nothing"
        );
    }

    #[test]
    fn an_entry_first_seen_on_a_step_keeps_both_readings() {
        let mut t = Tracker::new();
        let a1 = t.step_up(3 * M);
        // First seen with the marker already counted (or not): both bases kept.
        t.observe(500, 521 * M);
        assert!(!t.shown(500, a1));
        t.step_down(3 * M);
        t.new_round();
        t.observe(500, 518 * M); // the free shows: base 518 it is
        let b1 = t.step_up(4 * M);
        t.observe(500, 522 * M);
        assert!(t.shown(500, b1));
        assert_eq!(t.complete(), vec![(500, 518 * M)]);
    }

    #[test]
    fn an_entry_ahead_of_our_history_is_rejected() {
        let mut t = Tracker::new();
        t.observe(900, 100 * M);
        let _ = t.step_up(3 * M);
        // Shows our first step, then a second step we have not taken yet.
        t.observe(900, 103 * M);
        t.observe(900, 108 * M);
        assert!(t.is_rejected(900));
    }

    #[test]
    fn unwinding_then_a_new_round() {
        let mut t = Tracker::new();
        t.observe(500, 10 * M);
        t.step_up(2 * M);
        t.step_up(3 * M);
        t.observe(500, 15 * M);
        t.step_down(3 * M);
        t.step_down(2 * M);
        t.new_round();
        t.observe(500, 12 * M); // the unwinding, half seen
        t.observe(500, 10 * M);
        let c1 = t.step_up(6 * M);
        t.observe(500, 16 * M);
        assert!(t.shown(500, c1));
        assert_eq!(t.complete(), vec![(500, 10 * M)]);
    }

    #[test]
    fn step_sizes_are_distinct_pages() {
        let mut x = 7u64;
        let s = step_sizes(5, 16, || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            x >> 33
        });
        assert_eq!(s.len(), 5);
        let set: BTreeSet<u64> = s.iter().copied().collect();
        assert_eq!(set.len(), 5);
        assert!(s
            .iter()
            .all(|b| b % UNIT == 0 && *b >= UNIT && *b <= 16 * UNIT));
        // A constant source still terminates (max is raised to k).
        assert_eq!(step_sizes(3, 1, || 0).len(), 3);
    }
}

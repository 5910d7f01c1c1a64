//! Slot liveness probed in the background, so that scrapes make no syscall per slot.
//!
//! A slot's owner is alive while it holds its liveness token (an OFD lock the kernel
//! drops when the process dies). Asking is one `fcntl` per slot: at 64 regions of 32
//! processes that was a fifth of a scrape. The background pass (every
//! `--drain.interval`, 100 ms by default) probes a region's slots when its last probe
//! is [`PROBE_EVERY`] old, and keeps the answers here; a scrape takes them for the
//! incarnations they cover and probes only slots claimed since. So `vigil_processes`
//! and `vigil_device_memory_dead_bytes` see a death at most a few tenths of a second
//! late, which no scrape interval can tell apart. Answers older than [`MAX_AGE`] are
//! not used (a long `--drain.interval`, or a pass stuck on one region): scrapes then
//! probe every slot themselves, as before.
//!
//! Answers are kept per slot index, that is per token byte. The incarnation fields are
//! tenant-written (docs/security.md, F5), but rewriting them can at most make a scrape
//! reuse what the kernel said of that same token at the last pass.
//!
//! One exception keeps the host-PID check exact (see `hostpid`): a "no such process"
//! answer is confirmed by the *next* read of the slot finding its owner alive, which
//! is only proof if that read probed after the `/proc` scan began. Answers probed
//! before the last scan are therefore not used.

use std::time::{Duration, Instant};
use vigil_region::SlotInfo;

/// The oldest probe a scrape uses.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// How old a region's probe gets before the background pass probes again: probing on
/// every 100 ms pass cost an idle exporter 1 % of a core at 2,048 live slots.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// One owner of one slot: a slot reused by another process, or by the same PID after
/// the region was re-created, is another incarnation. The slot index comes first, so
/// a list of them sorts by slot.
type Incarnation = (u16, u32, u32, u64);

fn incarnation(s: &SlotInfo) -> Incarnation {
    (s.index, s.generation, s.pid, s.start_time_ticks)
}

/// The liveness of a region's active slots at one probe.
#[derive(Debug, Clone)]
pub struct Probed {
    at: Instant,
    /// In slot order, one per slot (a lookup is a binary search, no hashing).
    alive: Vec<(Incarnation, bool)>,
}

impl Probed {
    /// From the slots of a snapshot that probed every token (`RegionReader::snapshot`)
    /// and began at `at`.
    pub fn new(at: Instant, slots: &[SlotInfo]) -> Probed {
        let mut alive: Vec<_> = slots.iter().map(|s| (incarnation(s), s.alive)).collect();
        alive.sort_unstable_by_key(|(i, _)| i.0);
        alive.dedup_by_key(|(i, _)| i.0);
        Probed { at, alive }
    }

    /// Old enough at `now` for the background pass to probe again.
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) >= PROBE_EVERY
    }

    /// Usable by a read at `now`, after a `/proc` scan that began at `scan_began`
    /// (see the module documentation).
    pub fn usable(&self, now: Instant, scan_began: Option<Instant>) -> bool {
        now.saturating_duration_since(self.at) <= MAX_AGE && scan_began.is_none_or(|t| self.at > t)
    }

    /// The probed answer for `s`'s incarnation, if this probe saw it.
    pub fn get(&self, s: &SlotInfo) -> Option<bool> {
        let i = self
            .alive
            .binary_search_by_key(&s.index, |(i, _)| i.0)
            .ok()?;
        let (inc, alive) = self.alive[i];
        (inc == incarnation(s)).then_some(alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(index: u16, generation: u32, pid: u32, start: u64, alive: bool) -> SlotInfo {
        SlotInfo {
            index,
            generation,
            pid,
            pidns_inode: 1,
            start_time_ticks: start,
            host_pid: 0,
            detect_outcome: 0,
            mem_used: Default::default(),
            alive,
            unenforced: vec![],
        }
    }

    #[test]
    fn answers_only_for_the_incarnations_it_probed() {
        let p = Probed::new(
            Instant::now(),
            &[slot(0, 1, 10, 100, true), slot(1, 4, 11, 100, false)],
        );
        assert_eq!(p.get(&slot(0, 1, 10, 100, false)), Some(true));
        assert_eq!(p.get(&slot(1, 4, 11, 100, true)), Some(false));
        // The slot was claimed again (generation), by another process with the same
        // generation after a re-creation (pid, start time), or never probed.
        assert_eq!(p.get(&slot(0, 2, 10, 100, true)), None);
        assert_eq!(p.get(&slot(0, 1, 12, 100, true)), None);
        assert_eq!(p.get(&slot(0, 1, 10, 101, true)), None);
        assert_eq!(p.get(&slot(2, 1, 10, 100, true)), None);
    }

    #[test]
    fn a_probe_older_than_the_last_proc_scan_is_not_used() {
        let scan = Instant::now();
        let now = scan + Duration::from_millis(5);
        let before = Probed::new(scan - Duration::from_millis(1), &[]);
        let after = Probed::new(scan + Duration::from_millis(1), &[]);
        assert!(before.usable(now, None));
        assert!(!before.usable(now, Some(scan)));
        assert!(after.usable(now, Some(scan)));
    }

    #[test]
    fn the_background_probes_again_once_a_probe_is_probe_every_old() {
        let at = Instant::now();
        let p = Probed::new(at, &[]);
        assert!(!p.due(at));
        assert!(!p.due(at + PROBE_EVERY - Duration::from_millis(1)));
        assert!(p.due(at + PROBE_EVERY));
        // Always probed again well before scrapes stop using it.
        const { assert!(PROBE_EVERY.as_millis() * 2 < MAX_AGE.as_millis()) };
    }

    #[test]
    fn a_probe_older_than_max_age_is_not_used() {
        let at = Instant::now();
        let p = Probed::new(at, &[]);
        assert!(p.usable(at + MAX_AGE, None));
        assert!(!p.usable(at + MAX_AGE + Duration::from_millis(1), None));
        // A clock that went backwards relative to the probe is not "old".
        assert!(p.usable(at, None));
    }
}

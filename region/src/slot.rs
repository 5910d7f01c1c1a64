//! Process slots and their liveness tokens.
//!
//! A slot is owned by whoever holds the open-file-description lock on its token byte.
//! The kernel drops that lock when the last descriptor of the owner's open file
//! description closes, which happens when the process dies however it dies. OFD
//! locks belong to the file description, not to a PID, so they work across PID
//! namespaces and cannot be fooled by PID reuse. A forked child shares its parent's
//! description, which is why it must `reattach_after_fork` and claim its own slot.

use crate::counters::Counter;
use crate::error::RegionError;
use crate::layout::*;
use crate::procfs::ProcessIdentity;
use crate::region::Region;
use crate::ring::{Event, Payload};
use crate::sys;
use std::sync::atomic::Ordering::*;

crate::wire_enum! {
    /// Outcome of one host-PID detection, as recorded in the slot and the event ring.
    pub enum DetectOutcome: u8 {
        /// The host PID was found (and recorded in the slot).
        Found = 1 => "found",
        /// The driver reports container PIDs: our own PID appeared.
        SameNamespace = 2 => "same_namespace",
        /// More than one unclaimed new PID: refused to guess.
        Ambiguous = 3 => "ambiguous",
        /// No answer before the detection deadline.
        Timeout = 4 => "timeout",
        /// NVML kept failing.
        NvmlError = 5 => "nvml_error",
    }
}

/// This process's claim on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHandle {
    /// Position in the region's slot array.
    pub index: u16,
    /// The slot's generation when claimed: a later owner of the same index has
    /// another one, so a stale handle is told apart.
    pub generation: u32,
}

impl Region {
    fn mark_held(&self, i: usize) -> bool {
        let bit = 1u64 << (i % 64);
        self.held[i / 64].fetch_or(bit, AcqRel) & bit == 0
    }

    fn unmark_held(&self, i: usize) {
        self.held[i / 64].fetch_and(!(1u64 << (i % 64)), AcqRel);
    }

    pub(crate) fn holds(&self, i: usize) -> bool {
        self.held[i / 64].load(Acquire) & (1u64 << (i % 64)) != 0
    }

    /// Claims a free slot, or reclaims one whose owner died. Free slots are tried first
    /// so that a dead process's slot (and its accounting) is kept for inspection until
    /// space runs short or someone reaps it.
    ///
    /// The slot records the claimant's identity as the kernel knows it (its PID, PID
    /// namespace inode and start time, read from `/proc/self`; 0 for what cannot be
    /// read), so that a reader can find the same process in its own view of `/proc`.
    pub fn claim_slot(&self) -> Result<SlotHandle, RegionError> {
        let l = self.layout();
        // Read once per claim, before any slot is touched: /proc/self of whoever calls
        // (a forked child re-claiming gets its own).
        let me = ProcessIdentity::current();
        for pass in 0..2 {
            for i in 0..MAX_SLOTS {
                if pass == 0 && l.slots[i].state.load(Relaxed) != SLOT_FREE {
                    continue;
                }
                if let Some(h) = self.try_claim(i, &me)? {
                    return Ok(h);
                }
            }
        }
        Err(RegionError::SlotsExhausted {
            path: self.path.clone(),
            max: MAX_SLOTS,
        })
    }

    fn try_claim(&self, i: usize, me: &ProcessIdentity) -> Result<Option<SlotHandle>, RegionError> {
        if !self.mark_held(i) {
            return Ok(None);
        }
        match sys::ofd_try_lock(&self.file, slot_token_offset(i)) {
            Ok(true) => {}
            Ok(false) => {
                self.unmark_held(i);
                return Ok(None);
            }
            Err(source) => {
                self.unmark_held(i);
                return Err(RegionError::Io {
                    path: self.path.clone(),
                    op: "lock slot token",
                    source,
                });
            }
        }
        let s = &self.layout().slots[i];
        self.layout()
            .header
            .slot_high_water
            .fetch_max(i as u32 + 1, AcqRel);
        // A dead owner's leftovers: take the slot over first (new generation, so the
        // dead incarnation can no longer look like a lock owner), then credit its
        // memory under the region lock as the new owner. Dying in between leaves the
        // bytes in the slot, still counted, for the next reaper.
        let leftovers = s.state.load(Acquire) != SLOT_FREE;
        crate::fault::point("slot.claim.mid");
        // No detection yet, then the new owner's identity (Release), then the new
        // generation. A reader loads in the opposite order (generation, identity, then
        // outcome, all Acquire; see `Snapshot::read`): whatever new identity field it
        // sees, it also sees the cleared outcome, so it never pairs the new owner's
        // identity with the dead owner's host PID and outcome. With the new generation
        // it sees the whole new identity.
        s.host_pid.store(0, Relaxed);
        s.detect_outcome.store(0, Relaxed);
        s.pid.store(me.pid, Release);
        s.pidns_inode.store(me.pidns_inode, Release);
        s.start_time_ticks.store(me.start_time_ticks, Release);
        let generation = s.generation.fetch_add(1, AcqRel).wrapping_add(1);
        s.claimed_realtime_ns.store(sys::realtime_ns(), Relaxed);
        let handle = SlotHandle {
            index: i as u16,
            generation,
        };
        if leftovers {
            s.counters.iter().for_each(|c| c.store(0, Relaxed));
            let freed = self.credit_slot(i, handle).unwrap_or(0);
            self.note_reclaimed(i, handle, freed);
        }
        s.state.store(SLOT_ACTIVE, Release);
        self.count(Some(handle.index), Counter::SlotsClaimed, 1);
        Ok(Some(handle))
    }

    /// Credits a dead owner's memory back and clears its attribution. The caller holds
    /// the slot's token, so the owner is gone and nobody else is reclaiming it. If the
    /// credit cannot be done under the lock, the slot is left for a later reaper.
    fn reclaim_holding_token(&self, i: usize, by: SlotHandle) -> bool {
        let s = &self.layout().slots[i];
        let Ok(freed) = self.credit_slot(i, by) else {
            return false;
        };
        s.counters.iter().for_each(|c| c.store(0, Relaxed));
        s.host_pid.store(0, Relaxed);
        s.state.store(SLOT_FREE, Release);
        self.note_reclaimed(i, by, freed);
        true
    }

    fn note_reclaimed(&self, i: usize, by: SlotHandle, freed: u64) {
        self.count(Some(by.index), Counter::SlotsReclaimedDead, 1);
        self.emit(&Event::from_payload(
            by.index,
            Payload::SlotReclaimed {
                victim_slot: i as u64,
                bytes: freed,
            },
        ));
    }

    /// Releases a slot this process holds (normal exit). Its memory is credited back:
    /// the driver frees a process's allocations when it goes away.
    pub fn release_slot(&self, h: SlotHandle) -> Result<(), RegionError> {
        let i = h.index as usize;
        if i >= MAX_SLOTS || !self.holds(i) {
            return Err(RegionError::SlotNotHeld {
                path: self.path.clone(),
                slot: h.index,
                hint: "",
            });
        }
        if let Err(e) = self.check_integrity(h) {
            // Nothing of ours is in a damaged region any more: only let the token go.
            let _ = sys::ofd_unlock(&self.file, slot_token_offset(i));
            self.unmark_held(i);
            return Err(e);
        }
        let s = &self.layout().slots[i];
        // If the lock cannot be had the bytes stay in the slot; the slot is then
        // reclaimed (and credited) as dead once our token goes.
        if self.credit_slot(i, h).is_ok() {
            s.state.store(SLOT_FREE, Release);
        }
        self.count(None, Counter::SlotsReleased, 1);
        let r = sys::ofd_unlock(&self.file, slot_token_offset(i));
        self.unmark_held(i);
        r.map_err(|source| RegionError::Io {
            path: self.path.clone(),
            op: "unlock slot token",
            source,
        })
    }

    /// Lets go of every slot token this handle holds, without touching the region
    /// (it may be damaged). The locks belong to the open file description, so this
    /// also frees them for forked children that still share it and never exec.
    pub(crate) fn drop_tokens(&self) {
        for i in 0..MAX_SLOTS {
            if self.holds(i) {
                let _ = sys::ofd_unlock(&self.file, slot_token_offset(i));
                self.unmark_held(i);
            }
        }
    }

    /// Reclaims every active slot whose owner is dead; returns how many. Cheap enough
    /// to run at every process start and before denying an allocation.
    pub fn reap_dead_slots(&self, by: SlotHandle) -> usize {
        let l = self.layout();
        let mut n = 0;
        for i in 0..crate::region::slots_in_use(l) {
            if l.slots[i].state.load(Acquire) != SLOT_ACTIVE || self.holds(i) {
                continue;
            }
            if !self.mark_held(i) {
                continue;
            }
            if let Ok(true) = sys::ofd_try_lock(&self.file, slot_token_offset(i)) {
                if l.slots[i].state.load(Acquire) == SLOT_ACTIVE
                    && self.reclaim_holding_token(i, by)
                {
                    n += 1;
                }
                let _ = sys::ofd_unlock(&self.file, slot_token_offset(i));
            }
            self.unmark_held(i);
        }
        n
    }

    /// Is slot `i`, incarnation `gen16` (the generation's low 16 bits), still alive?
    /// On an error we cannot tell, and answer "alive": the lease still bounds the wait.
    pub(crate) fn slot_alive(&self, i: usize, gen16: u16) -> bool {
        let Some(s) = self.layout().slots.get(i) else {
            return false;
        };
        if s.generation.load(Acquire) as u16 != gen16 {
            return false;
        }
        if self.holds(i) {
            return true;
        }
        sys::ofd_is_locked(&self.file, slot_token_offset(i)).unwrap_or(true)
    }

    /// Records a detection in the slot (host PID if any, and the outcome), and in the
    /// counters, histograms and event ring.
    pub fn record_detection(
        &self,
        h: SlotHandle,
        outcome: crate::DetectOutcome,
        host_pid: Option<u32>,
        latency_ns: u64,
        polls: u32,
        context_ns: u64,
    ) {
        if let Some(s) = self.layout().slots.get(h.index as usize) {
            if let Some(p) = host_pid {
                s.host_pid.store(p, Release);
            }
            s.detect_outcome.store(outcome as u32, Release);
        }
        if outcome == crate::DetectOutcome::SameNamespace {
            self.layout()
                .header
                .flags
                .fetch_or(FLAG_NAMESPACE_PIDS, Release);
        }
        self.count(Some(h.index), Counter::detections(outcome), 1);
        self.observe(crate::HistogramId::DetectionLatency, latency_ns);
        self.observe(crate::HistogramId::DetectionPolls, polls as u64);
        let ev = Event::from_payload(
            h.index,
            Payload::Detection {
                outcome: Some(outcome),
                latency_ns,
                polls: polls as u64,
                host_pid: host_pid.unwrap_or(0) as u64,
                context_ns,
            },
        );
        self.emit(&ev);
    }

    /// True once a process of this region has seen the driver report namespace PIDs
    /// (they all share one PID namespace, so the answer holds for every one of them).
    pub fn namespace_pids_seen(&self) -> bool {
        self.layout().header.flags.load(Acquire) & FLAG_NAMESPACE_PIDS != 0
    }

    /// Host PIDs recorded by live slots other than `except`. A dead slot's PID is not
    /// claimed: the kernel may already have given it to the process now detecting.
    pub fn claimed_host_pids(&self, except: Option<u16>) -> Vec<u32> {
        let l = self.layout();
        l.slots[..crate::region::slots_in_use(l)]
            .iter()
            .enumerate()
            .filter(|(i, s)| Some(*i as u16) != except && s.state.load(Acquire) == SLOT_ACTIVE)
            .filter(|(_, s)| s.host_pid.load(Acquire) != 0)
            .filter(|(i, s)| self.slot_alive(*i, s.generation.load(Acquire) as u16))
            .map(|(_, s)| s.host_pid.load(Acquire))
            .filter(|&p| p != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_outcome_round_trips() {
        for o in DetectOutcome::ALL {
            assert_eq!(DetectOutcome::from_wire(o as u64), Some(o));
        }
        assert_eq!(
            DetectOutcome::from_wire(0),
            None,
            "0 means no detection yet"
        );
        // What a truncating conversion would have accepted.
        assert_eq!(DetectOutcome::from_wire(256 + 1), None);
    }
}

//! The cross-process lock (used for both the region lock and the detection lock).
//!
//! - The lock word is {owner slot + 1 | owner slot generation | epoch}, taken by one
//!   CAS, so the lock is never held by an unrecorded owner (the `sem_wait` then
//!   `owner_pid = ...` window of a semaphore).
//! - Waiters sleep on a shared futex over the word's low half (the epoch, which changes
//!   on every acquire and release) in short slices; each timed-out slice is a retry.
//! - After each slice a waiter checks the owner's liveness token. A dead owner is
//!   taken over by CAS from (dead, e) to (me, e+1): a force-post. Only one waiter can
//!   win that CAS, so a force-post never lets two processes in.
//! - A live owner that holds the word longer than the lease (as observed by the
//!   waiter) is evicted the same way. Its eventual release CAS fails because the word
//!   moved on: the release is *fenced*, counted, and leaves the new owner untouched.
//!   Code that must not act after eviction checks [`LockGuard::is_current`] before
//!   publishing (the detection lock does; see DESIGN notes in docs/region.md).
//! - The slot generation in the word means a slot that died and was re-claimed by a
//!   new process does not look like a live owner.

use crate::counters::{Counter, HistogramId};
use crate::error::RegionError;
use crate::layout::LockState;
use crate::region::Region;
use crate::ring::{Event, Payload};
use crate::slot::SlotHandle;
use crate::sys::{self, monotonic_ns, Wait};
use std::sync::atomic::Ordering::*;
use std::time::Duration;

crate::wire_enum! {
    /// Which lock. The discriminant indexes `RegionLayout::locks`.
    pub enum LockId: u8 {
        /// Short region bookkeeping.
        Region = 0 => "region",
        /// Host-PID detection (serial mode): held from the NVML snapshot to the slot write.
        Detect = 1 => "detect",
    }
}

crate::wire_enum! {
    /// Why a lock was taken from its owner.
    pub enum ForceReason: u8 {
        /// The owner's liveness token was free: it died holding the lock.
        OwnerDead = 0 => "owner_dead",
        /// The owner is alive but held the lock past its lease: evicted, fenced.
        LeaseExpired = 1 => "lease_expired",
    }
}

/// The longest lease honoured, whatever the region says (an hour).
const MAX_LEASE_NS: u64 = 3_600_000_000_000;

/// How long a waiter sleeps before re-checking the owner's liveness.
pub const WAIT_SLICE: Duration = Duration::from_millis(2);

/// Packs a lock word. `owner` is the slot index + 1 (0 = free).
pub fn pack(owner: u16, gen16: u16, epoch: u32) -> u64 {
    (owner as u64) << 48 | (gen16 as u64) << 32 | epoch as u64
}

/// The (slot index, generation low bits) holding the word, if any.
pub fn owner_of(word: u64) -> Option<(u16, u16)> {
    let o = (word >> 48) as u16;
    (o != 0).then(|| (o - 1, (word >> 32) as u16))
}

/// The word's epoch: bumped by every acquire and release, so a waiter's futex wait
/// on it returns as soon as the lock moves.
pub fn epoch_of(word: u64) -> u32 {
    word as u32
}

/// The word a slot installs when it takes the lock after `prev`.
fn take_word(prev: u64, me: SlotHandle) -> u64 {
    pack(
        me.index + 1,
        me.generation as u16,
        epoch_of(prev).wrapping_add(1),
    )
}

/// The word a release installs.
fn free_word(held: u64) -> u64 {
    pack(0, 0, epoch_of(held).wrapping_add(1))
}

/// What happened while acquiring, for telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOutcome {
    /// Time from asking to holding, ns (0 on the uncontended fast path).
    pub wait_ns: u64,
    /// Timed-out wait slices.
    pub retries: u32,
    /// Set if the lock was taken from its owner: why, and the victim's slot.
    pub forced: Option<(ForceReason, u16)>,
    /// The epoch this holder installed (see [`epoch_of`]).
    pub epoch: u32,
}

/// How a release went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// We still owned the lock, and freed it.
    Released,
    /// The lock had been taken over (lease expiry) before we released it; the new
    /// owner was left alone.
    Fenced,
}

/// A held lock. Released on drop if not released explicitly.
pub struct LockGuard<'a> {
    region: &'a Region,
    lock: LockId,
    me: SlotHandle,
    word: u64,
    outcome: LockOutcome,
    done: bool,
}

fn futex_addr(st: &LockState) -> *const u32 {
    let p = st.word.as_ptr() as *const u32;
    if cfg!(target_endian = "big") {
        p.wrapping_add(1)
    } else {
        p
    }
}

impl Region {
    /// Acquires `lock` for slot `me`. Always succeeds eventually: a dead owner is taken
    /// over within a wait slice or so, and a stalled one after the lease.
    pub fn lock(&self, lock: LockId, me: SlotHandle) -> Result<LockGuard<'_>, RegionError> {
        if self.is_forked_copy() || !self.holds(me.index as usize) {
            return Err(RegionError::SlotNotHeld {
                path: self.path.clone(),
                slot: me.index,
                hint: " (forked child not reattached?)",
            });
        }
        let st = &self.layout().locks[lock as usize];
        let w = st.word.load(Relaxed);
        if owner_of(w).is_none() {
            let new = take_word(w, me);
            if st.word.compare_exchange(w, new, Acquire, Relaxed).is_ok() {
                self.count(None, Counter::lock_acquisitions(lock), 1);
                return Ok(LockGuard {
                    region: self,
                    lock,
                    me,
                    word: new,
                    outcome: LockOutcome {
                        wait_ns: 0,
                        retries: 0,
                        forced: None,
                        epoch: epoch_of(new),
                    },
                    done: false,
                });
            }
        }
        self.lock_slow(lock, me)
    }

    #[cold]
    fn lock_slow(&self, lock: LockId, me: SlotHandle) -> Result<LockGuard<'_>, RegionError> {
        let st = &self.layout().locks[lock as usize];
        let t0 = monotonic_ns();
        // A zero or absurd lease in a damaged region must neither evict everyone nor
        // make waiters wait for ever.
        let lease = st.lease_ns.load(Relaxed).clamp(1_000_000, MAX_LEASE_NS);
        // A backstop no legitimate sequence of owners reaches: each owner is evicted
        // after one lease, so only a word that keeps changing hands without anyone
        // holding it (a hostile writer) gets here.
        let give_up = t0.saturating_add(2 * lease + 1_000_000_000);
        let mut retries = 0u32;
        // The word we last saw, and the owner we are timing with when we first saw it.
        // The lease runs per owner (slot and generation), not per word: a writer that
        // only bumps the epoch must not restart it.
        let mut seen_word = u64::MAX;
        let mut seen = (u64::MAX, t0);
        let mut check_owner = true;
        st.waiters.fetch_add(1, SeqCst);
        let result = loop {
            let w = st.word.load(SeqCst);
            let Some((owner, gen16)) = owner_of(w) else {
                let new = take_word(w, me);
                if st.word.compare_exchange(w, new, SeqCst, Relaxed).is_ok() {
                    break Ok((new, None));
                }
                continue;
            };
            if owner == me.index && gen16 == me.generation as u16 {
                break Err(RegionError::AlreadyHeld {
                    path: self.path.clone(),
                    lock: lock.name(),
                });
            }
            let now = monotonic_ns();
            if now >= give_up {
                break Err(RegionError::LockTimeout {
                    path: self.path.clone(),
                    lock: lock.name(),
                    waited_ms: (now - t0) / 1_000_000,
                });
            }
            if w != seen_word {
                seen_word = w;
                check_owner = true;
            }
            if w >> 32 != seen.0 {
                seen = (w >> 32, now);
            }
            let reason = if check_owner && !self.slot_alive(owner as usize, gen16) {
                Some(ForceReason::OwnerDead)
            } else if now.saturating_sub(seen.1) >= lease {
                Some(ForceReason::LeaseExpired)
            } else {
                None
            };
            if let Some(reason) = reason {
                let new = take_word(w, me);
                if st.word.compare_exchange(w, new, SeqCst, Relaxed).is_ok() {
                    break Ok((new, Some((reason, owner, gen16, now - seen.1))));
                }
                continue;
            }
            check_owner = false;
            if sys::futex_wait(futex_addr(st), w as u32, WAIT_SLICE) == Wait::TimedOut {
                retries += 1;
                check_owner = true;
            }
        };
        st.waiters.fetch_sub(1, SeqCst);
        let (word, forced) = result?;
        let wait_ns = monotonic_ns().saturating_sub(t0);
        let slot = Some(me.index);
        self.count(None, Counter::lock_acquisitions(lock), 1);
        if retries > 0 {
            self.count(slot, Counter::lock_retries(lock), retries as u64);
        }
        self.observe(HistogramId::lock_wait(lock), wait_ns);
        if let Some((reason, victim, victim_gen, held_ns)) = forced {
            self.count(slot, Counter::force_posts(lock, reason), 1);
            self.emit(&Event::from_payload(
                me.index,
                Payload::ForcePost {
                    lock: Some(lock),
                    reason: Some(reason),
                    victim_slot: victim as u64,
                    victim_generation: victim_gen as u64,
                    held_ns,
                },
            ));
        }
        self.emit(&Event::from_payload(
            me.index,
            Payload::LockWait {
                lock: Some(lock),
                wait_ns,
                retries: retries as u64,
            },
        ));
        Ok(LockGuard {
            region: self,
            lock,
            me,
            word,
            outcome: LockOutcome {
                wait_ns,
                retries,
                forced: forced.map(|(r, v, _, _)| (r, v)),
                epoch: epoch_of(word),
            },
            done: false,
        })
    }
}

impl LockGuard<'_> {
    /// What happened while acquiring (wait, retries, a force-post).
    pub fn outcome(&self) -> LockOutcome {
        self.outcome
    }

    /// False once this holder has been evicted. Check it before publishing anything
    /// that must only be written by the lock's owner.
    pub fn is_current(&self) -> bool {
        self.region.layout().locks[self.lock as usize]
            .word
            .load(Acquire)
            == self.word
    }

    /// Releases the lock; tells whether we still owned it.
    pub fn release(mut self) -> ReleaseOutcome {
        self.release_inner()
    }

    fn release_inner(&mut self) -> ReleaseOutcome {
        self.done = true;
        let st = &self.region.layout().locks[self.lock as usize];
        match st
            .word
            .compare_exchange(self.word, free_word(self.word), SeqCst, Relaxed)
        {
            Ok(_) => {
                if st.waiters.load(SeqCst) > 0 {
                    sys::futex_wake(futex_addr(st), 1);
                }
                ReleaseOutcome::Released
            }
            Err(_) => {
                let r = self.region;
                r.count(Some(self.me.index), Counter::fenced_releases(self.lock), 1);
                r.emit(&Event::from_payload(
                    self.me.index,
                    Payload::FencedRelease {
                        lock: Some(self.lock),
                    },
                ));
                ReleaseOutcome::Fenced
            }
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.release_inner();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_packing_round_trips() {
        let me = SlotHandle {
            index: 5,
            generation: 0x1_0003,
        };
        let w = take_word(pack(0, 0, 41), me);
        assert_eq!(owner_of(w), Some((5, 3)));
        assert_eq!(epoch_of(w), 42);
        let f = free_word(w);
        assert_eq!(owner_of(f), None);
        assert_eq!(epoch_of(f), 43);
        assert_eq!(owner_of(0), None);
        // Epoch wraps without touching the owner bits.
        let w = take_word(pack(0, 0, u32::MAX), me);
        assert_eq!(epoch_of(w), 0);
        assert_eq!(owner_of(w), Some((5, 3)));
    }

    #[test]
    fn wire_enums_round_trip() {
        for l in LockId::ALL {
            assert_eq!(LockId::from_wire(l as u64), Some(l));
        }
        for r in ForceReason::ALL {
            assert_eq!(ForceReason::from_wire(r as u64), Some(r));
        }
        assert_eq!(LockId::from_wire(9), None);
    }

    #[test]
    fn every_transition_changes_the_futex_half() {
        let me = SlotHandle {
            index: 0,
            generation: 1,
        };
        let mut w = 0u64;
        for _ in 0..10 {
            let held = take_word(w, me);
            assert_ne!(held as u32, w as u32);
            let free = free_word(held);
            assert_ne!(free as u32, held as u32);
            w = free;
        }
    }
}

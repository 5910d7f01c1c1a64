//! Device-memory accounting: kill-safe reservations against per-device limits.
//!
//! Every change to `devices[d].used` and to a slot's `mem_used[d]` happens under the
//! region lock, as one check-and-charge. The invariant kept is
//! `devices[d].used == sum over slots of slots[s].mem_used[d]`, where a dead process's
//! slot still counts until it is reclaimed (and reclaiming credits it, under the lock).
//!
//! Why a lock rather than a bare CAS loop on `used`: the charge touches two words (the
//! device total and the owner's share). A process SIGKILLed between them would leak
//! the bytes forever (false OOMs) or credit bytes it never charged (overrun). Under the
//! lock, a holder that dies makes the next taker's acquisition a force-post, and the
//! taker recomputes every device total from the slots before doing anything else: the
//! half-done update is repaired, whichever instruction the holder died on.
//!
//! A holder evicted for outliving its lease (stopped, not dead) may still write after
//! the new owner recomputed. Its release is then fenced; it rolls its own charge back
//! under a fresh acquisition, recomputes, and retries the reservation from the start.
//! Between those two moments the totals can be off by that one reservation, only ever
//! before the real allocation happens, so the device itself never goes past the limit.

use crate::counters::Counter;
use crate::error::RegionError;
use crate::layout::*;
use crate::lock::LockId;
use crate::region::{Region, DAMAGE_LIMIT};
use crate::ring::{Event, Payload};
use crate::slot::SlotHandle;
use crate::ReleaseOutcome;
use std::sync::atomic::Ordering::*;

/// What a reservation's critical section found.
enum Answer {
    Is(Reservation),
    /// Damage (an index into the region's reasons).
    Damaged(u8),
    /// The region is recovering; it waits for this many processes.
    Recovering(usize),
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Charged to the caller's slot and the device.
    Granted,
    /// It would pass the limit; nothing was charged. `used` is the device total seen.
    Denied {
        /// The device total seen, bytes.
        used: u64,
        /// The limit checked against (the strictest this process enforces, with the
        /// caller's cap), bytes.
        limit: u64,
    },
}

impl Region {
    /// Runs `f` under the region lock, after repairing the totals if the previous
    /// holder died or was evicted. Returns `f`'s value and whether our own release was
    /// fenced (the caller must then not trust what `f` did).
    ///
    /// The region's integrity is checked under the lock, before `f` writes anything
    /// (see [`Region::check_integrity`]), and a region already found damaged is not
    /// even locked: a damaged region is never written to.
    fn with_totals<T>(
        &self,
        me: SlotHandle,
        f: impl FnOnce(&RegionLayout) -> T,
    ) -> Result<(T, bool), RegionError> {
        self.check_latched()?;
        let _local = self.local_mem_lock();
        let guard = self.lock(LockId::Region, me)?;
        if let Err(e) = self.check_fast(me) {
            guard.release();
            return Err(e);
        }
        if guard.outcome().forced.is_some() {
            self.recompute_totals();
        }
        crate::fault::point("region_lock.held");
        let v = f(self.layout());
        let fenced = guard.release() == ReleaseOutcome::Fenced;
        Ok((v, fenced))
    }

    /// Our own copy of our slot's share (see `Region::own`). Only changed under
    /// `mem_local`, so a plain load and store (no locked instruction) is exact.
    fn add_own(&self, dev: usize, bytes: u64) {
        let o = &self.own[dev];
        o.store(o.load(Relaxed).saturating_add(bytes), Relaxed);
    }

    fn sub_own(&self, dev: usize, bytes: u64) {
        let o = &self.own[dev];
        o.store(o.load(Relaxed).saturating_sub(bytes), Relaxed);
    }

    /// Serializes this process's threads: the region lock is held per slot, and a
    /// process has one slot.
    fn local_mem_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.mem_local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets each device total to the sum of the slots' shares. Caller holds the lock.
    fn recompute_totals(&self) {
        let l = self.layout();
        for d in 0..MAX_DEVICES {
            let sum = l.slots[..crate::region::slots_in_use(l)]
                .iter()
                .fold(0u64, |acc, s| {
                    acc.saturating_add(s.mem_used[d].load(Acquire))
                });
            l.devices[d].used.store(sum, Release);
        }
    }

    /// Charges `bytes` on device `dev` to slot `me` if the device's limit allows it.
    /// Before saying no, dead processes' slots are reclaimed and the check is redone:
    /// a process never pays for memory that no live process holds.
    pub fn reserve(
        &self,
        me: SlotHandle,
        dev: usize,
        bytes: u64,
    ) -> Result<Reservation, RegionError> {
        self.reserve_within(me, dev, bytes, 0)
    }

    /// [`reserve`](Self::reserve) against the stricter of the region's limit and `cap`
    /// (0 = no cap of our own): a process whose own limit is below the region's keeps
    /// to it, checked in the same critical section as everyone's.
    pub fn reserve_within(
        &self,
        me: SlotHandle,
        dev: usize,
        bytes: u64,
        cap: u64,
    ) -> Result<Reservation, RegionError> {
        self.reserve_inner(me, dev, bytes, cap, true)
    }

    /// [`reserve_within`](Self::reserve_within) for memory the workload did not ask
    /// for (host-PID detection's markers): a refusal is the caller's to handle and is
    /// not counted as the workload's denial.
    pub fn reserve_quietly(
        &self,
        me: SlotHandle,
        dev: usize,
        bytes: u64,
        cap: u64,
    ) -> Result<Reservation, RegionError> {
        self.reserve_inner(me, dev, bytes, cap, false)
    }

    /// The limit checked is the one this process attached with (or a stricter one
    /// it kept, see [`Region::keep_limits`]), never a value read from the region
    /// now: the region's is compared with it, and a difference is damage. The
    /// region's integrity is checked under the lock before the check and again after
    /// the charge, so a grant is only ever made while the region was the one we
    /// attached to. A region recovering from damage (`FLAG_RECOVERING`) grants
    /// nothing until every process that used it before has re-attached.
    fn reserve_inner(
        &self,
        me: SlotHandle,
        dev: usize,
        bytes: u64,
        cap: u64,
        count_denial: bool,
    ) -> Result<Reservation, RegionError> {
        self.check_device(dev)?;
        let deny = |answer| {
            if count_denial {
                self.deny(me, dev, bytes, answer)
            } else {
                answer
            }
        };
        let effective = match (self.attached.caps[dev], cap) {
            (0, c) => c,
            (l, 0) => l,
            (l, c) => l.min(c),
        };
        let mut reaped = false;
        for _ in 0..4 {
            let (answer, fenced) = self.with_totals(me, |l| {
                let d = &l.devices[dev];
                if d.limit.load(Relaxed) != self.attached.limits[dev] {
                    return Answer::Damaged(DAMAGE_LIMIT);
                }
                if l.header.flags.load(Acquire) & FLAG_RECOVERING != 0 {
                    if let Some(orphans) = self.finish_recovery() {
                        return Answer::Recovering(orphans);
                    }
                }
                let limit = effective;
                let mut used = d.used.load(Acquire);
                if limit > 0 && used.saturating_add(bytes) > limit {
                    // Before refusing, trust nothing but the slots: a total damaged by
                    // a buggy or hostile writer must not turn into lasting false OOMs.
                    self.recompute_totals();
                    used = d.used.load(Acquire);
                }
                match used.checked_add(bytes) {
                    Some(total) if limit == 0 || total <= limit => {
                        l.slots[me.index as usize].mem_used[dev].fetch_add(bytes, AcqRel);
                        crate::fault::point("mem.reserve.mid");
                        d.used.fetch_add(bytes, AcqRel);
                        d.peak.fetch_max(total, Relaxed);
                        // Damaged while we charged (someone zero-filling the file
                        // right now)? Then this grant was checked against garbage:
                        // take the charge back out of whatever the file holds now
                        // (a region re-initialized meanwhile must not keep it).
                        match self.damaged_since(dev) {
                            0 => {
                                self.add_own(dev, bytes);
                                Answer::Is(Reservation::Granted)
                            }
                            damage => {
                                sub(&l.slots[me.index as usize].mem_used[dev], bytes);
                                sub(&d.used, bytes);
                                Answer::Damaged(damage)
                            }
                        }
                    }
                    _ => Answer::Is(Reservation::Denied { used, limit }),
                }
            })?;
            let answer = match answer {
                Answer::Is(a) => a,
                Answer::Damaged(d) => return Err(self.damaged(d)),
                Answer::Recovering(orphans) => {
                    return Err(RegionError::Recovering {
                        path: self.path.clone(),
                        orphans,
                    })
                }
            };
            if fenced {
                // Our update may have raced the new owner's repair: undo it under a
                // clean acquisition and start over.
                if answer == Reservation::Granted {
                    self.rollback(me, dev, bytes)?;
                }
                continue;
            }
            match answer {
                Reservation::Denied { .. } if !reaped => {
                    reaped = true;
                    if self.reap_dead_slots(me) > 0 {
                        continue;
                    }
                    return Ok(deny(answer));
                }
                Reservation::Denied { .. } => return Ok(deny(answer)),
                Reservation::Granted => return Ok(answer),
            }
        }
        // Fenced every time: someone keeps evicting us. Refuse rather than guess.
        let l = self.layout();
        let answer = Reservation::Denied {
            used: l.devices[dev].used.load(Acquire),
            limit: effective,
        };
        Ok(deny(answer))
    }

    /// Under the region lock, in a region marked recovering: if every live slot token
    /// belongs to an active slot again (the processes that used the damaged region
    /// all re-attached and re-charged), rebuild the totals from the slots and clear
    /// the mark. Otherwise nothing can be checked yet.
    /// Returns how many processes it still waits for, if any.
    #[cold]
    #[inline(never)]
    fn finish_recovery(&self) -> Option<usize> {
        match self.orphans() {
            0 => {
                self.recompute_totals();
                self.layout()
                    .header
                    .flags
                    .fetch_and(!FLAG_RECOVERING, AcqRel);
                self.count(None, Counter::DamageRecoveries, 1);
                None
            }
            orphans => Some(orphans),
        }
    }

    fn rollback(&self, me: SlotHandle, dev: usize, bytes: u64) -> Result<(), RegionError> {
        self.with_totals(me, |l| {
            let n = sub(&l.slots[me.index as usize].mem_used[dev], bytes);
            self.sub_own(dev, n);
            // The lock was fenced: the totals may be off either way. Rebuild them.
            self.recompute_totals();
        })?;
        Ok(())
    }

    fn deny(&self, me: SlotHandle, dev: usize, bytes: u64, answer: Reservation) -> Reservation {
        if let Reservation::Denied { used, limit } = answer {
            self.layout().devices[dev].denials.fetch_add(1, Relaxed);
            self.count(Some(me.index), Counter::AllocationDenials, 1);
            self.emit(&Event::from_payload(
                me.index,
                Payload::AllocationDenied {
                    device: dev as u32,
                    requested: bytes,
                    used,
                    limit,
                },
            ));
        }
        answer
    }

    /// Charges memory that already exists (a context's own footprint), limit or not.
    pub fn charge(&self, me: SlotHandle, dev: usize, bytes: u64) -> Result<(), RegionError> {
        self.check_device(dev)?;
        if bytes == 0 {
            return Ok(());
        }
        let (_, fenced) = self.with_totals(me, |l| {
            l.slots[me.index as usize].mem_used[dev].fetch_add(bytes, AcqRel);
            self.add_own(dev, bytes);
            let d = &l.devices[dev];
            let total = d
                .used
                .fetch_update(AcqRel, Acquire, |u| Some(u.saturating_add(bytes)))
                .unwrap_or(0)
                .saturating_add(bytes);
            d.peak.fetch_max(total, Relaxed);
        })?;
        if fenced {
            self.with_totals(me, |_| self.recompute_totals())?;
        }
        Ok(())
    }

    /// Credits back memory slot `me` freed (or a reservation whose allocation failed).
    /// Saturates at the slot's own share: a double free can never eat into others'.
    pub fn credit(&self, me: SlotHandle, dev: usize, bytes: u64) -> Result<u64, RegionError> {
        self.check_device(dev)?;
        if bytes == 0 {
            return Ok(0);
        }
        let (credited, fenced) = self.with_totals(me, |l| {
            let n = sub(&l.slots[me.index as usize].mem_used[dev], bytes);
            sub(&l.devices[dev].used, n);
            self.sub_own(dev, n);
            n
        })?;
        if fenced {
            self.with_totals(me, |_| self.recompute_totals())?;
        }
        Ok(credited)
    }

    /// Moves slot `i`'s usage out of the device totals, under the region lock taken as
    /// `by`. Returns the bytes credited.
    pub(crate) fn credit_slot(&self, i: usize, by: SlotHandle) -> Result<u64, RegionError> {
        // Only the token holder changes a slot's shares, and the caller holds it: if
        // they are all zero there is nothing to credit, and no lock to take.
        if self.layout().slots[i]
            .mem_used
            .iter()
            .all(|m| m.load(Acquire) == 0)
        {
            return Ok(0);
        }
        let (freed, fenced) = self.with_totals(by, |l| {
            let mut freed = 0u64;
            for (d, used) in l.slots[i].mem_used.iter().enumerate() {
                let v = used.swap(0, AcqRel);
                sub(&l.devices[d].used, v);
                if i == by.index as usize {
                    // Our own slot (released at exit): we hold nothing any more.
                    self.own[d].store(0, Relaxed);
                }
                freed = freed.saturating_add(v);
            }
            freed
        })?;
        if fenced {
            self.with_totals(by, |_| self.recompute_totals())?;
        }
        Ok(freed)
    }

    /// The last measured primary-context footprint (0 = never measured).
    pub fn ctx_footprint(&self) -> u64 {
        self.layout().header.ctx_footprint.load(Relaxed)
    }

    /// Records a primary context's measured size, so later processes charge it
    /// before creating theirs (see `Header::ctx_footprint`).
    pub fn set_ctx_footprint(&self, bytes: u64) {
        self.layout().header.ctx_footprint.store(bytes, Relaxed);
    }

    /// This slot's own usage on `dev`.
    pub fn slot_usage(&self, me: SlotHandle, dev: usize) -> u64 {
        self.layout()
            .slots
            .get(me.index as usize)
            .and_then(|s| s.mem_used.get(dev))
            .map_or(0, |m| m.load(Acquire))
    }

    /// Against the device count this process attached with: a damaged header must
    /// show up as damage (see `check_integrity`), not as a missing device.
    fn check_device(&self, dev: usize) -> Result<(), RegionError> {
        let n = self.attached.device_count as usize;
        if dev < n.min(MAX_DEVICES) {
            Ok(())
        } else {
            Err(RegionError::NoSuchDevice {
                path: self.path.clone(),
                device: dev,
                devices: n,
            })
        }
    }
}

/// Subtracts up to `n` without going below zero; returns what was subtracted.
fn sub(a: &std::sync::atomic::AtomicU64, n: u64) -> u64 {
    match a.fetch_update(AcqRel, Acquire, |v| Some(v.saturating_sub(n))) {
        Ok(prev) | Err(prev) => prev.min(n),
    }
}

//! The writer's handle on a region: the mapping and the open file description whose
//! byte locks are this process's liveness tokens, the integrity checks every
//! accounting call makes, and re-attaching after damage or a fork.
//!
//! Opening and initializing a region is in `init`, the read-only handle in `reader`,
//! the copies readers take in `snapshot`; their types are re-exported here, at the
//! paths they have always had.

use crate::counters::{Counter, HistogramId};
use crate::error::{io_err, RegionError};
use crate::layout::*;
use crate::ring::{self, Event};
use crate::slot::SlotHandle;
use crate::sys::{self, Mapping};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::*};

pub use crate::init::{InitParams, InitPath, InitReport};
pub use crate::reader::{RegionRead, RegionReader};
pub use crate::snapshot::{DeviceInfo, LockInfo, RegionIdentity, SlotInfo, Snapshot};

/// A writer's handle on a region: a read-write mapping plus the open file description
/// whose byte locks are this process's liveness tokens.
pub struct Region {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    map: Mapping,
    /// Slots this process holds, so we never "reclaim" our own (our own OFD locks
    /// never conflict with us) and threads never claim the same one.
    pub(crate) held: Box<[AtomicU64; MAX_SLOTS / 64]>,
    /// Serializes this process's threads around the region lock (see `mem`).
    pub(crate) mem_local: std::sync::Mutex<()>,
    opened_pid: u32,
    fork_gen: Option<u64>,
    /// Our entry in the SIGBUS guard (`install_sigbus_guard`), if it had room.
    guard: Option<usize>,
    /// What this process attached to, to tell damage from the protocol's own writes.
    pub(crate) attached: Attached,
    /// Why the region was found damaged (an index into `DAMAGE`; 0 = not damaged).
    /// Latched: once set, nothing is written to the region through this handle again.
    damage: AtomicU8,
    /// What our slot holds on each device, as this process charged it: our own copy,
    /// which survives the region's damage and is re-charged in the region we
    /// re-attach to (see `Region::reattach_after_damage`).
    pub(crate) own: [AtomicU64; MAX_DEVICES],
}

/// The region as this process attached to it. Nothing a Vigil writer does after
/// initialization changes these, so a difference means the file was damaged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attached {
    pub(crate) nonce: u64,
    pub(crate) device_count: u32,
    /// The limits in the region when we attached.
    pub(crate) limits: [u64; MAX_DEVICES],
    /// The limits this process enforces: the region's, or stricter ones it knew from
    /// a region it had to leave (see `reattach_after_damage`); 0 = none.
    pub(crate) caps: [u64; MAX_DEVICES],
}

impl Attached {
    const NONE: Attached = Attached {
        nonce: 0,
        device_count: 0,
        limits: [0; MAX_DEVICES],
        caps: [0; MAX_DEVICES],
    };

    fn read(l: &RegionLayout) -> Attached {
        let h = &l.header;
        let mut limits = [0; MAX_DEVICES];
        for (v, d) in limits.iter_mut().zip(&l.devices) {
            *v = d.limit.load(Relaxed);
        }
        Attached {
            nonce: h.init_nonce.load(Relaxed),
            device_count: h.device_count.load(Relaxed),
            limits,
            caps: limits,
        }
    }
}

/// What the integrity check found, by index (0: nothing).
const DAMAGE: [&str; 9] = [
    "",
    "the file shrank under the mapping: an access faulted (SIGBUS caught)",
    "its magic is gone (overwritten or zero-filled)",
    "its layout version changed",
    "its state is no longer READY",
    "it was re-initialized (init nonce changed)",
    "its device count changed",
    "a device limit changed",
    "this process's slot was wiped",
];
const DAMAGE_SIGBUS: u8 = 1;
pub(crate) const DAMAGE_LIMIT: u8 = 7;
const DAMAGE_SLOT: u8 = 8;

impl Drop for Region {
    fn drop(&mut self) {
        // Before the mapping goes: the guard must never touch an address that is no
        // longer ours.
        if let Some(g) = self.guard.take() {
            sys::sigbus::unregister(g);
        }
    }
}

/// Reinterprets a mapping of at least REGION_SIZE bytes as the layout.
pub(crate) fn layout_of(map: &Mapping) -> &RegionLayout {
    // SAFETY: every mapping passed here is REGION_SIZE bytes long (checked by the
    // callers before mapping) and page-aligned, which satisfies RegionLayout's 64-byte
    // alignment. RegionLayout consists only of atomics, valid for any bit pattern and
    // sound to share across threads and processes. The reference borrows `map`, so it
    // cannot outlive the mapping.
    unsafe { &*(map.as_ptr() as *const RegionLayout) }
}

/// How many leading slots can be in use (the high-water mark, clamped).
pub(crate) fn slots_in_use(l: &RegionLayout) -> usize {
    (l.header.slot_high_water.load(Acquire) as usize).min(MAX_SLOTS)
}

/// Makes a region file truncated (or unbacked on a full filesystem) under a mapping
/// harmless to the process: the mapping reads as zeros from then on, and
/// [`RegionReader::is_poisoned`] / [`Region::is_poisoned`] say so (a writer's
/// accounting calls then fail with [`RegionError::Damaged`]), instead of the process
/// dying of SIGBUS. Call once, before mapping: the exporter and tools at start, the
/// interposer just before it opens its region. Other SIGBUS faults go to the handler
/// installed before (or the default action); a handler the application installs
/// *after* this one replaces it.
pub fn install_sigbus_guard() {
    sys::sigbus::install();
}

impl Region {
    /// A handle on `file` (already the layout's size, every block reserved), mapped
    /// read-write and registered with the SIGBUS guard, but not yet attached: the open
    /// protocol (see `init`) initializes or validates the region, then calls
    /// [`record_attached`](Self::record_attached).
    pub(crate) fn map(path: &Path, file: File) -> Result<Region, RegionError> {
        let map = Mapping::new(&file, REGION_SIZE, true).map_err(io_err(path, "mmap"))?;
        let guard = sys::sigbus::register(map.as_ptr() as usize, REGION_SIZE, true);
        Ok(Region {
            path: path.to_path_buf(),
            file,
            map,
            held: Box::new([const { AtomicU64::new(0) }; MAX_SLOTS / 64]),
            mem_local: std::sync::Mutex::new(()),
            opened_pid: sys::getpid(),
            fork_gen: sys::fork_generation(),
            guard,
            attached: Attached::NONE,
            damage: AtomicU8::new(0),
            own: [const { AtomicU64::new(0) }; MAX_DEVICES],
        })
    }

    /// Records the region as it is now as the one this process attached to (see
    /// [`Attached`]): called once it is READY and validated.
    pub(crate) fn record_attached(&mut self) {
        self.attached = Attached::read(self.layout());
    }

    pub(crate) fn layout(&self) -> &RegionLayout {
        layout_of(&self.map)
    }

    /// The path this handle was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once an access to this mapping faulted (the file shrank under it) and the
    /// SIGBUS guard put zeros in its place: nothing read from it since is the file's.
    pub fn is_poisoned(&self) -> bool {
        self.guard.is_some_and(sys::sigbus::poisoned)
    }

    /// The check every accounting call makes under the region lock, cheap enough for
    /// the allocation path (a few loads of lines the call touches anyway): the mapping
    /// was never poisoned, the header still has the magic and the init nonce this
    /// process attached to (zero-filling, overwriting or re-initializing the file
    /// changes one of them), and slot `me` is still ours (a truncation that spared the
    /// header lost the slots). 0 if so, else an index in DAMAGE.
    #[inline(always)]
    pub(crate) fn find_damage_fast(&self, me: SlotHandle) -> u8 {
        let l = self.layout();
        let h = &l.header;
        if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else if h.magic.load(Acquire) != MAGIC {
            2
        } else if h.init_nonce.load(Relaxed) != self.attached.nonce {
            5
        } else {
            match l.slots.get(me.index as usize) {
                Some(s)
                    if s.state.load(Relaxed) == SLOT_ACTIVE
                        && s.generation.load(Relaxed) == me.generation =>
                {
                    0
                }
                _ => DAMAGE_SLOT,
            }
        }
    }

    /// [`find_damage_fast`](Self::find_damage_fast), plus the header fields only a
    /// deliberate forgery changes on their own (layout version, state, device count;
    /// none of them is read on the accounting path).
    fn find_damage(&self, me: SlotHandle) -> u8 {
        let h = &self.layout().header;
        match self.find_damage_fast(me) {
            0 if h.version.load(Relaxed) != LAYOUT_VERSION => 3,
            0 if h.state.load(Relaxed) != STATE_READY => 4,
            0 if h.device_count.load(Relaxed) != self.attached.device_count => 6,
            d => d,
        }
    }

    /// After a reservation charged: was the region damaged meanwhile (someone
    /// zero-filling the file right now)? Then the grant was checked against garbage.
    #[inline(always)]
    pub(crate) fn damaged_since(&self, dev: usize) -> u8 {
        let l = self.layout();
        if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else if l.header.magic.load(Acquire) != MAGIC {
            2
        } else if l.header.init_nonce.load(Relaxed) != self.attached.nonce {
            5
        } else if l.devices[dev].limit.load(Relaxed) != self.attached.limits[dev] {
            DAMAGE_LIMIT
        } else {
            0
        }
    }

    /// Latches damage `what` (the first reason wins) and returns it as an error.
    #[cold]
    #[inline(never)]
    pub(crate) fn damaged(&self, what: u8) -> RegionError {
        // A check that read zeros because its own load faulted says so.
        let what = if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else {
            what
        };
        let _ = self.damage.compare_exchange(0, what, AcqRel, Acquire);
        let first = self.damage.load(Acquire);
        RegionError::Damaged {
            path: self.path.clone(),
            what: DAMAGE[(first as usize).min(DAMAGE.len() - 1)],
        }
    }

    /// Checks that the region is still the one this process attached to, with slot
    /// `me` ours: the mapping never faulted, and the magic, init nonce, layout version,
    /// state and device count are unchanged (`find_damage`); once it was found damaged
    /// it stays damaged for this handle. Every accounting call checks it: a damaged
    /// region is never written again through this handle.
    #[inline]
    pub fn check_integrity(&self, me: SlotHandle) -> Result<(), RegionError> {
        match self.damage.load(Relaxed) {
            0 => match self.find_damage(me) {
                0 => Ok(()),
                d => Err(self.damaged(d)),
            },
            d => Err(self.damaged(d)),
        }
    }

    /// The accounting path's check (see [`find_damage_fast`](Self::find_damage_fast)).
    #[inline(always)]
    pub(crate) fn check_fast(&self, me: SlotHandle) -> Result<(), RegionError> {
        match (self.damage.load(Relaxed), self.find_damage_fast(me)) {
            (0, 0) => Ok(()),
            (0, d) | (d, _) => Err(self.damaged(d)),
        }
    }

    /// Only whether damage was already found: one load, for paths that then check
    /// properly under the region lock.
    #[inline]
    pub(crate) fn check_latched(&self) -> Result<(), RegionError> {
        match self.damage.load(Relaxed) {
            0 => Ok(()),
            d => Err(self.damaged(d)),
        }
    }

    /// Why the region was found damaged, if it was (by any check so far).
    pub fn damage(&self) -> Option<&'static str> {
        match self.damage.load(Acquire) {
            0 => None,
            d => Some(DAMAGE[(d as usize).min(DAMAGE.len() - 1)]),
        }
    }

    /// The init nonce of the region this handle attached to.
    pub fn attached_nonce(&self) -> u64 {
        self.attached.nonce
    }

    /// The limits this process enforces, per device of the region: the region's as
    /// it attached, or stricter ones set with [`keep_limits`](Self::keep_limits).
    pub fn enforced_limits(&self) -> Vec<u64> {
        let n = (self.attached.device_count as usize).min(MAX_DEVICES);
        self.attached.caps[..n].to_vec()
    }

    /// Keeps enforcing limits this process knew from a region it had to leave, where
    /// they are stricter than this region's (0 = none): a region re-initialized after
    /// damage by a process with another (or no) limit must not lift ours.
    pub fn keep_limits(&mut self, known: &[u64]) {
        for (cap, &k) in self.attached.caps.iter_mut().zip(known) {
            *cap = match (*cap, k) {
                (c, 0) => c,
                (0, k) => k,
                (c, k) => c.min(k),
            };
        }
    }

    /// What this process charged to its slot and has not credited, per device: its
    /// own copy, readable after the region was damaged.
    pub fn holdings(&self) -> [u64; MAX_DEVICES] {
        let mut h = [0; MAX_DEVICES];
        for (v, o) in h.iter_mut().zip(&self.own) {
            *v = o.load(Acquire);
        }
        h
    }

    /// True while the region waits for processes that used it before it was damaged
    /// to re-attach (see `FLAG_RECOVERING`).
    pub fn is_recovering(&self) -> bool {
        self.layout().header.flags.load(Acquire) & FLAG_RECOVERING != 0
    }

    /// Marks the region as recovering: called by a process that found the region it
    /// used damaged and re-attached to one that was not re-initialized (the header
    /// survived, the slots did not), so the others' memory is missing from it.
    pub fn mark_recovering(&self) {
        self.layout().header.flags.fetch_or(FLAG_RECOVERING, AcqRel);
    }

    /// Processes that hold a slot token (so they are alive and were given a slot in
    /// this file) whose slot is not active here: they used the file before it was
    /// damaged and have not re-attached. At most `MAX_SLOTS`; an error counts as one.
    pub(crate) fn orphans(&self) -> usize {
        let l = self.layout();
        let base = slot_token_offset(0);
        let mut todo = vec![(0u64, MAX_SLOTS as u64)];
        let mut n = 0;
        // A probe reports one conflicting lock anywhere in the range: search both
        // sides of each one found. Costs about two calls per lock held.
        while let Some((from, to)) = todo.pop() {
            if from >= to {
                continue;
            }
            let (start, len) = match sys::ofd_lock_in(&self.file, base + from, to - from) {
                Ok(None) => continue,
                Ok(Some(found)) => found,
                Err(_) => return n + 1,
            };
            let a = start.saturating_sub(base).clamp(from, to);
            if a >= to {
                continue;
            }
            let b = if len == 0 {
                to
            } else {
                (start + len).saturating_sub(base).clamp(a, to)
            };
            let b = b.max(a + 1).min(to);
            n += (a..b)
                .filter(|&i| l.slots[i as usize].state.load(Acquire) != SLOT_ACTIVE)
                .count();
            todo.push((from, a));
            todo.push((b, to));
        }
        n
    }

    /// After this handle found its region damaged (see
    /// [`check_integrity`](Self::check_integrity)): opens the file's current region
    /// afresh (initializing it if the damage left it empty or zeroed), claims a slot
    /// in it, keeps enforcing this handle's limits where they are stricter, and
    /// re-charges what this process holds ([`holdings`](Self::holdings)), so that the
    /// others see it. A region that was not re-initialized (its header survived the
    /// damage, its slots did not) is marked recovering: the memory of the processes
    /// that have not re-attached yet is missing from it. On success this handle's
    /// slot tokens are released; use the new handle from then on.
    pub fn reattach_after_damage(
        &self,
        params: &InitParams,
    ) -> Result<(Region, SlotHandle), RegionError> {
        let (mut fresh, _) = Region::open(&self.path, params)?;
        fresh.keep_limits(&self.attached.caps);
        let slot = fresh.claim_slot()?;
        if fresh.attached.nonce == self.attached.nonce {
            fresh.mark_recovering();
        }
        let devices = (fresh.attached.device_count as usize).min(MAX_DEVICES);
        for (dev, &bytes) in self.holdings().iter().enumerate().take(devices) {
            fresh.charge(slot, dev, bytes)?;
        }
        fresh.count(Some(slot.index), Counter::DamageReattachments, 1);
        // Our old slot's token, held until now so that the claim above could not
        // take our own old index: the region waits for it no longer. Released
        // through the description, so forked children sharing it do not keep it.
        self.drop_tokens();
        Ok((fresh, slot))
    }

    /// True in a child forked after this handle was opened: the child must call
    /// [`Region::reattach_after_fork`] before touching slots or locks.
    pub fn is_forked_copy(&self) -> bool {
        match (self.fork_gen, sys::fork_generation()) {
            (Some(then), Some(now)) => then != now,
            _ => self.opened_pid != sys::getpid(),
        }
    }

    /// In a forked child: drops the parent's open file description (and with it any
    /// claim on the parent's liveness tokens) and opens a fresh one, so the child
    /// gets its own identity. The mapping is replaced too: a mapping holds a reference
    /// to the description it was made from, so the inherited one alone would keep the
    /// parent's tokens held after the parent died.
    pub fn reattach_after_fork(&mut self) -> Result<(), RegionError> {
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let fresh = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&proc_path)
            .map_err(io_err(&self.path, "reopen after fork"))?;
        let map = Mapping::new(&fresh, REGION_SIZE, true)
            .map_err(io_err(&self.path, "mmap after fork"))?;
        if let Some(g) = self.guard.take() {
            sys::sigbus::unregister(g);
        }
        self.map = map;
        self.guard = sys::sigbus::register(self.map.as_ptr() as usize, REGION_SIZE, true);
        self.file = fresh;
        for w in self.held.iter() {
            w.store(0, Relaxed);
        }
        // The child holds none of its parent's memory, and sees the file afresh.
        for o in &self.own {
            o.store(0, Relaxed);
        }
        self.damage.store(0, Relaxed);
        self.opened_pid = sys::getpid();
        self.fork_gen = sys::fork_generation();
        // Another parent thread may have held it at the fork; the child has no such thread.
        self.mem_local = std::sync::Mutex::new(());
        Ok(())
    }

    /// Adds `n` to a region-wide counter, and to `slot`'s share if given.
    pub fn count(&self, slot: Option<u16>, c: Counter, n: u64) {
        let l = self.layout();
        l.counters[c as usize].fetch_add(n, Relaxed);
        if let Some(s) = slot.and_then(|s| l.slots.get(s as usize)) {
            s.counters[c as usize].fetch_add(n, Relaxed);
        }
    }

    /// Records `value` in histogram `h` (ns for durations, see [`HistogramId::unit`]).
    pub fn observe(&self, h: HistogramId, value: u64) {
        self.layout().histograms[h as usize].observe(value, h.unit());
    }

    /// Appends an event to the ring. Never blocks; see `ring`.
    pub fn emit(&self, ev: &Event) -> bool {
        ring::write(self.layout(), ev)
    }

    /// Device limits as recorded in the region (the first process's view).
    pub fn device_limits(&self) -> Vec<u64> {
        let l = self.layout();
        let n = (l.header.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
        l.devices[..n]
            .iter()
            .map(|d| d.limit.load(Relaxed))
            .collect()
    }

    /// A consistent-enough copy for tools and tests (same as the reader's).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(self.layout(), &self.file, &|_| None)
    }
}

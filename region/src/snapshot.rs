//! Plain copies of a region for readers, tools and tests: nothing in them points into
//! shared memory, so a tenant writing the region cannot change them once taken.

use crate::counters::{Counter, HistogramId, HistogramSnapshot};
use crate::layout::*;
use crate::region::slots_in_use;
use crate::sys;
use std::fs::File;
use std::sync::atomic::Ordering::*;

/// The region's owner as Kubernetes names it. Empty = unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name.
    pub container: String,
}

impl RegionIdentity {
    /// From the downward-API variables `POD_NAMESPACE`, `POD_NAME`, `CONTAINER_NAME`.
    pub fn from_env() -> RegionIdentity {
        let var = |k| std::env::var(k).unwrap_or_default();
        RegionIdentity {
            namespace: var("POD_NAMESPACE"),
            pod: var("POD_NAME"),
            container: var("CONTAINER_NAME"),
        }
    }
}

/// Reads a NUL-padded field; anything that is not clean UTF-8 text yields "" (the
/// reader must never turn garbage into a label value).
fn load_str(src: &[std::sync::atomic::AtomicU8; IDENTITY_FIELD_LEN]) -> String {
    let bytes: Vec<u8> = src
        .iter()
        .map(|b| b.load(Relaxed))
        .take_while(|&b| b != 0)
        .collect();
    match String::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s,
        _ => String::new(),
    }
}

/// One value per device of a region, held inline: a scrape copies every slot of
/// every region, and a heap allocation per slot was a tenth of its time.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PerDevice {
    n: u8,
    v: [u64; MAX_DEVICES],
}

impl PerDevice {
    /// The first [`MAX_DEVICES`] values of `it`; any beyond are dropped.
    pub fn collect(it: impl IntoIterator<Item = u64>) -> PerDevice {
        let mut p = PerDevice::default();
        for (dst, x) in p.v.iter_mut().zip(it) {
            *dst = x;
            p.n += 1;
        }
        p
    }
}

impl std::ops::Deref for PerDevice {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        &self.v[..self.n as usize]
    }
}

impl std::fmt::Debug for PerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<Vec<u64>> for PerDevice {
    fn from(v: Vec<u64>) -> PerDevice {
        PerDevice::collect(v)
    }
}

/// One active process slot, as read (its owner may have died since: see `alive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Position in the region's slot array.
    pub index: u16,
    /// Bumped on every claim: tells one owner of the slot from the next.
    pub generation: u32,
    /// The owner's PID in its own namespace.
    pub pid: u32,
    /// Inode of the owner's PID namespace; 0 = unknown.
    pub pidns_inode: u64,
    /// The owner's start time, clock ticks after boot; 0 = unknown.
    pub start_time_ticks: u64,
    /// Host PID as recorded by detection; 0 = none. Tenant-written: check it against
    /// the kernel with [`SlotInfo::identity`] before trusting it.
    pub host_pid: u32,
    /// The last detection's outcome as stored (`DetectOutcome::from_wire` decodes
    /// it; 0 = no detection yet).
    pub detect_outcome: u32,
    /// Bytes the owner holds, per device of the region.
    pub mem_used: PerDevice,
    /// Its liveness token is held: the owner is running (or is this process).
    pub alive: bool,
    /// HAMi-core settings the owner started with that Vigil does not enforce.
    pub unenforced: Vec<crate::counters::UnenforcedSetting>,
}

impl SlotInfo {
    /// The owner as the kernel knows it (see `procfs`).
    pub fn identity(&self) -> crate::procfs::ProcessIdentity {
        crate::procfs::ProcessIdentity {
            pid: self.pid,
            pidns_inode: self.pidns_inode,
            start_time_ticks: self.start_time_ticks,
        }
    }
}

/// One device's limit and usage, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Bytes the region's processes may hold together; 0 = no limit.
    pub limit: u64,
    /// Bytes held by every slot (dead ones not yet reclaimed included).
    pub used: u64,
    /// Reservations refused on this device.
    pub denials: u64,
    /// Highest `used` seen since initialization, bytes.
    pub peak: u64,
}

/// A plain copy of everything a reader exports. Values are clamped to the layout's
/// bounds, so garbage in the region yields garbage numbers, never a crash.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Whose region it is ("" where unknown or not clean text).
    pub identity: RegionIdentity,
    /// Times the region was initialized: 1, plus one per recovery.
    pub init_count: u32,
    /// Changes with every initialization: a reader seeing another one knows the
    /// region was re-created.
    pub init_nonce: u64,
    /// Wall-clock time of the last initialization, ns since the Unix epoch.
    pub created_realtime_ns: u64,
    /// One per device of the region.
    pub devices: Vec<DeviceInfo>,
    /// Region-wide totals, indexed by [`Counter`] (use [`Snapshot::counter`]).
    pub counters: Vec<u64>,
    /// Indexed by [`HistogramId`] (use [`Snapshot::histogram`]).
    pub histograms: Vec<HistogramSnapshot>,
    /// Slots marked active, each with its owner's liveness.
    pub slots: Vec<SlotInfo>,
    /// Per lock (indexed by `LockId`).
    pub locks: Vec<LockInfo>,
    /// Events ever started in the ring (its head position).
    pub ring_head: u64,
}

/// One cross-process lock's state, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// Slot index of the owner, if held.
    pub owner: Option<u16>,
    /// Bumped on every acquire and release: a changing epoch means the lock moves.
    pub epoch: u32,
    /// Processes asleep on the lock (may over-count waiters that were killed asleep).
    pub waiters: u32,
    /// How long an owner may hold it before a waiter evicts it, ns.
    pub lease_ns: u64,
}

impl Snapshot {
    /// The region-wide total of `c` (0 if the snapshot has no such counter).
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c as usize).copied().unwrap_or(0)
    }
    /// The histogram `h`.
    pub fn histogram(&self, h: HistogramId) -> &HistogramSnapshot {
        &self.histograms[h as usize]
    }
}

/// Liveness a caller already knows, by slot incarnation: `Some` is taken as is, `None`
/// means probe the token now.
pub type KnownLiveness<'a> = &'a dyn Fn(&SlotInfo) -> Option<bool>;

impl Snapshot {
    /// Copies everything a reader exports out of `l`; slot liveness is probed through
    /// `file` (the handle's own open file description), unless `known` has it.
    pub(crate) fn read(l: &RegionLayout, file: &File, known: KnownLiveness) -> Snapshot {
        let h = &l.header;
        let dc = (h.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
        let devices = l.devices[..dc]
            .iter()
            .map(|d| DeviceInfo {
                limit: d.limit.load(Relaxed),
                used: d.used.load(Relaxed),
                denials: d.denials.load(Relaxed),
                peak: d.peak.load(Relaxed),
            })
            .collect();
        let histograms = [
            HistogramId::LockWaitRegion,
            HistogramId::LockWaitDetect,
            HistogramId::DetectionLatency,
            HistogramId::DetectionPolls,
            HistogramId::InitDuration,
        ]
        .into_iter()
        .map(|id| {
            let src = &l.histograms[id as usize];
            HistogramSnapshot {
                unit: id.unit(),
                buckets: src.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                count: src.count.load(Relaxed),
                sum: src.sum.load(Relaxed),
            }
        })
        .collect();
        let slots = l.slots[..slots_in_use(l)]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.load(Acquire) == SLOT_ACTIVE)
            .map(|(i, s)| {
                // The order matters (see `Region::try_claim` and `record_detection`):
                // generation, then the owner's identity, then the outcome, then the host
                // PID. An identity seen is never paired with an earlier owner's outcome,
                // and an outcome seen comes with the host PID recorded before it.
                let generation = s.generation.load(Acquire);
                let pid = s.pid.load(Acquire);
                let pidns_inode = s.pidns_inode.load(Acquire);
                let start_time_ticks = s.start_time_ticks.load(Acquire);
                let detect_outcome = s.detect_outcome.load(Acquire);
                let host_pid = s.host_pid.load(Acquire);
                let mut slot = SlotInfo {
                    index: i as u16,
                    generation,
                    pid,
                    pidns_inode,
                    start_time_ticks,
                    host_pid,
                    detect_outcome,
                    mem_used: PerDevice::collect(s.mem_used[..dc].iter().map(|m| m.load(Relaxed))),
                    alive: true,
                    unenforced: crate::counters::UnenforcedSetting::ALL
                        .into_iter()
                        .filter(|u| s.counters[u.counter() as usize].load(Relaxed) > 0)
                        .collect(),
                };
                slot.alive = known(&slot).unwrap_or_else(|| {
                    sys::ofd_is_locked(file, slot_token_offset(i)).unwrap_or(true)
                });
                slot
            })
            .collect();
        Snapshot {
            identity: RegionIdentity {
                namespace: load_str(&l.identity.namespace),
                pod: load_str(&l.identity.pod),
                container: load_str(&l.identity.container),
            },
            init_count: h.init_count.load(Relaxed),
            init_nonce: h.init_nonce.load(Relaxed),
            created_realtime_ns: h.created_realtime_ns.load(Relaxed),
            devices,
            counters: l.counters.iter().map(|c| c.load(Relaxed)).collect(),
            histograms,
            slots,
            locks: l
                .locks
                .iter()
                .map(|st| {
                    let w = st.word.load(Acquire);
                    LockInfo {
                        // A forged word can name any of 65535 owners; only real slots count.
                        owner: crate::lock::owner_of(w)
                            .map(|(o, _)| o)
                            .filter(|o| (*o as usize) < MAX_SLOTS),
                        epoch: crate::lock::epoch_of(w),
                        waiters: st.waiters.load(Relaxed),
                        lease_ns: st.lease_ns.load(Relaxed),
                    }
                })
                .collect(),
            ring_head: l.ring.head.load(Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_device_holds_up_to_max_devices_values_in_order() {
        let p = PerDevice::collect([3, 1, 2]);
        assert_eq!(&p[..], &[3, 1, 2]);
        assert_eq!(format!("{p:?}"), "[3, 1, 2]");
        assert!(PerDevice::default().is_empty());
        let many = PerDevice::from((0..MAX_DEVICES as u64 + 5).collect::<Vec<_>>());
        assert_eq!(many.len(), MAX_DEVICES);
        assert_eq!(many[MAX_DEVICES - 1], MAX_DEVICES as u64 - 1);
        // Equality is by the values held, whatever sits in the unused entries.
        assert_eq!(PerDevice::collect([7]), PerDevice::from(vec![7]));
    }
}

//! Exact counters and histograms.
//!
//! Region-wide totals are incremented *at the source*, in the header, at the same time
//! as the slot's own share. A slot's death therefore never loses a count, and a reader
//! summing nothing cannot see a fold half done: reclaiming a slot only clears its
//! attribution copy. That is the "fold into region totals" done with one add per
//! counter instead of a cross-field transaction a dying process could tear.

use crate::layout::{Histogram, HIST_BUCKETS, NUM_COUNTERS};
use crate::lock::{ForceReason, LockId};
use crate::slot::DetectOutcome;
use std::sync::atomic::Ordering::Relaxed;

crate::wire_enum! {
    /// A HAMi-core setting that Vigil does not enforce. A user who swaps `libvgpu.so`
    /// for `libvigil.so` must see that it stopped working, not find out from a noisy
    /// neighbour: the interposer warns, counts it here, and the exporter exports it.
    /// The label is `vigil_unenforced_settings{setting}`.
    pub enum UnenforcedSetting: u8 {
        /// `CUDA_DEVICE_SM_LIMIT[_i]`: HAMi-core's share of the SMs (`gpucores`).
        SmLimit = 0 => "sm_limit",
        /// `CUDA_OVERSUBSCRIBE`: device memory backed by host memory past the limit.
        Oversubscribe = 1 => "oversubscribe",
        /// `GPU_CORE_UTILIZATION_POLICY` (`force`, `disable`): how the SM limit applies.
        CoreUtilizationPolicy = 2 => "core_utilization_policy",
        /// `CUDA_TASK_PRIORITY`: HAMi-core's kernel priority between tasks.
        TaskPriority = 3 => "task_priority",
        /// `ACTIVE_OOM_KILLER`: HAMi-core kills processes over the memory limit.
        ActiveOomKiller = 4 => "active_oom_killer",
    }
}

impl UnenforcedSetting {
    /// The counter that records it.
    pub fn counter(self) -> Counter {
        match self {
            UnenforcedSetting::SmLimit => Counter::UnenforcedSmLimit,
            UnenforcedSetting::Oversubscribe => Counter::UnenforcedOversubscribe,
            UnenforcedSetting::CoreUtilizationPolicy => Counter::UnenforcedCoreUtilizationPolicy,
            UnenforcedSetting::TaskPriority => Counter::UnenforcedTaskPriority,
            UnenforcedSetting::ActiveOomKiller => Counter::UnenforcedActiveOomKiller,
        }
    }
}

/// Every exact counter. The discriminant is the index in the counter arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Counter {
    /// Times the region was initialized: 1, plus one per recovery.
    RegionInitializations = 0,
    /// Times a region left half-initialized by a dead initializer was re-initialized.
    RegionRecoveries,
    /// Processes that attached by initializing the region (recoveries included).
    ProcessInitsInitializer,
    /// Processes that attached to a region already READY (no lock taken).
    ProcessInitsFastPath,
    /// Slots claimed (free or reclaimed).
    SlotsClaimed,
    /// Slots released by their own process at exit.
    SlotsReleased,
    /// Slots of dead processes reclaimed (their memory credited back).
    SlotsReclaimedDead,
    /// Acquisitions of the region lock.
    LockAcquisitionsRegion,
    /// Acquisitions of the detection lock.
    LockAcquisitionsDetect,
    /// Timed-out wait slices while waiting for the region lock.
    LockRetriesRegion,
    /// Timed-out wait slices while waiting for the detection lock.
    LockRetriesDetect,
    /// Region lock taken from an owner that died holding it.
    ForcePostsRegionOwnerDead,
    /// Region lock taken from a live owner past its lease.
    ForcePostsRegionLeaseExpired,
    /// Detection lock taken from an owner that died holding it.
    ForcePostsDetectOwnerDead,
    /// Detection lock taken from a live owner past its lease.
    ForcePostsDetectLeaseExpired,
    /// Region lock releases that found the lock already taken over.
    FencedReleasesRegion,
    /// Detection lock releases that found the lock already taken over.
    FencedReleasesDetect,
    /// Detections that found the host PID.
    DetectFound,
    /// Detections that found the driver reports container PIDs.
    DetectSameNamespace,
    /// Detections that refused to guess between several new PIDs.
    DetectAmbiguous,
    /// Detections that gave up at their deadline.
    DetectTimeout,
    /// Detections that failed on NVML errors.
    DetectNvmlError,
    /// Reservations refused because they would pass a device's limit (the workload's
    /// own; detection markers refused are not counted).
    AllocationDenials,
    /// A process found the region it had attached damaged under it (truncated,
    /// overwritten, zero-filled) and re-attached to the file's current region,
    /// re-charging what it holds. Counted in the region it re-attached to.
    DamageReattachments,
    /// A region damaged under live processes got every one of them back (see
    /// `FLAG_RECOVERING`): its totals are complete again.
    DamageRecoveries,
    /// Processes that started with a HAMi-core setting Vigil does not enforce (see
    /// [`UnenforcedSetting`]); each process's share says which it had.
    UnenforcedSmLimit,
    /// Processes that started with `CUDA_OVERSUBSCRIBE` set.
    UnenforcedOversubscribe,
    /// Processes that started with `GPU_CORE_UTILIZATION_POLICY` set.
    UnenforcedCoreUtilizationPolicy,
    /// Processes that started with `CUDA_TASK_PRIORITY` set.
    UnenforcedTaskPriority,
    /// Processes that started with `ACTIVE_OOM_KILLER` set.
    UnenforcedActiveOomKiller,
    /// The number of counters, not a counter. Must stay last.
    _Count,
}

const _: () = assert!((Counter::_Count as usize) <= NUM_COUNTERS);
const _: () = assert!(Counter::ALL.len() == Counter::_Count as usize);

impl Counter {
    /// Every counter, in index order (without `_Count`).
    pub const ALL: [Counter; 30] = [
        Counter::RegionInitializations,
        Counter::RegionRecoveries,
        Counter::ProcessInitsInitializer,
        Counter::ProcessInitsFastPath,
        Counter::SlotsClaimed,
        Counter::SlotsReleased,
        Counter::SlotsReclaimedDead,
        Counter::LockAcquisitionsRegion,
        Counter::LockAcquisitionsDetect,
        Counter::LockRetriesRegion,
        Counter::LockRetriesDetect,
        Counter::ForcePostsRegionOwnerDead,
        Counter::ForcePostsRegionLeaseExpired,
        Counter::ForcePostsDetectOwnerDead,
        Counter::ForcePostsDetectLeaseExpired,
        Counter::FencedReleasesRegion,
        Counter::FencedReleasesDetect,
        Counter::DetectFound,
        Counter::DetectSameNamespace,
        Counter::DetectAmbiguous,
        Counter::DetectTimeout,
        Counter::DetectNvmlError,
        Counter::AllocationDenials,
        Counter::DamageReattachments,
        Counter::DamageRecoveries,
        Counter::UnenforcedSmLimit,
        Counter::UnenforcedOversubscribe,
        Counter::UnenforcedCoreUtilizationPolicy,
        Counter::UnenforcedTaskPriority,
        Counter::UnenforcedActiveOomKiller,
    ];

    /// The acquisitions counter of `lock`.
    pub fn lock_acquisitions(lock: LockId) -> Counter {
        match lock {
            LockId::Region => Counter::LockAcquisitionsRegion,
            LockId::Detect => Counter::LockAcquisitionsDetect,
        }
    }
    /// The timed-out wait slices counter of `lock`.
    pub fn lock_retries(lock: LockId) -> Counter {
        match lock {
            LockId::Region => Counter::LockRetriesRegion,
            LockId::Detect => Counter::LockRetriesDetect,
        }
    }
    /// The counter of `lock` taken from its owner for `reason`.
    pub fn force_posts(lock: LockId, reason: ForceReason) -> Counter {
        match (lock, reason) {
            (LockId::Region, ForceReason::OwnerDead) => Counter::ForcePostsRegionOwnerDead,
            (LockId::Region, ForceReason::LeaseExpired) => Counter::ForcePostsRegionLeaseExpired,
            (LockId::Detect, ForceReason::OwnerDead) => Counter::ForcePostsDetectOwnerDead,
            (LockId::Detect, ForceReason::LeaseExpired) => Counter::ForcePostsDetectLeaseExpired,
        }
    }
    /// The fenced releases counter of `lock`.
    pub fn fenced_releases(lock: LockId) -> Counter {
        match lock {
            LockId::Region => Counter::FencedReleasesRegion,
            LockId::Detect => Counter::FencedReleasesDetect,
        }
    }
    /// The counter of detections that ended in `outcome`.
    pub fn detections(outcome: DetectOutcome) -> Counter {
        match outcome {
            DetectOutcome::Found => Counter::DetectFound,
            DetectOutcome::SameNamespace => Counter::DetectSameNamespace,
            DetectOutcome::Ambiguous => Counter::DetectAmbiguous,
            DetectOutcome::Timeout => Counter::DetectTimeout,
            DetectOutcome::NvmlError => Counter::DetectNvmlError,
        }
    }
}

/// Which histogram. The discriminant indexes `RegionLayout::histograms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum HistogramId {
    /// Region lock waits, ns. Contended waits only; uncontended acquisitions are
    /// `acquisitions - count`.
    LockWaitRegion = 0,
    /// Detection lock waits, ns (contended waits only, as above).
    LockWaitDetect = 1,
    /// Host-PID detection latency from the start of context creation, ns.
    DetectionLatency = 2,
    /// NVML polls per host-PID detection (a count, not a duration).
    DetectionPolls = 3,
    /// Time `Region::open` took, ns.
    InitDuration = 4,
}

impl HistogramId {
    /// The wait-time histogram of `lock`.
    pub fn lock_wait(lock: LockId) -> HistogramId {
        match lock {
            LockId::Region => HistogramId::LockWaitRegion,
            LockId::Detect => HistogramId::LockWaitDetect,
        }
    }
    /// The value of bucket 0's upper bound: 1 µs for durations (stored in ns), 1 for counts.
    pub fn unit(self) -> u64 {
        match self {
            HistogramId::DetectionPolls => 1,
            _ => 1_000,
        }
    }
}

/// Index of the bucket for `value`: the smallest `i` with `value <= unit << i`.
pub fn bucket_index(value: u64, unit: u64) -> usize {
    if value <= unit {
        return 0;
    }
    // ceil(value / unit), then ceil(log2).
    let q = value.div_ceil(unit);
    let idx = (64 - (q - 1).leading_zeros()) as usize;
    idx.min(HIST_BUCKETS - 1)
}

/// Upper bound of bucket `i` in the histogram's own unit; `None` for +Inf.
pub fn bucket_upper_bound(i: usize, unit: u64) -> Option<u64> {
    if i + 1 >= HIST_BUCKETS {
        None
    } else {
        Some(unit << i)
    }
}

impl Histogram {
    /// Records one observation of `value` (in units where bucket 0's bound is `unit`).
    pub fn observe(&self, value: u64, unit: u64) {
        self.buckets[bucket_index(value, unit)].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

/// A plain copy of a histogram.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistogramSnapshot {
    /// Bucket 0's upper bound (see [`HistogramId::unit`]); bucket `i`'s is `unit << i`.
    pub unit: u64,
    /// Non-cumulative bucket counts; the last is +Inf.
    pub buckets: Vec<u64>,
    /// Observations in all.
    pub count: u64,
    /// Sum of the observed values (ns for durations).
    pub sum: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_inclusive_powers_of_two() {
        assert_eq!(bucket_index(0, 1000), 0);
        assert_eq!(bucket_index(1000, 1000), 0);
        assert_eq!(bucket_index(1001, 1000), 1);
        assert_eq!(bucket_index(2000, 1000), 1);
        assert_eq!(bucket_index(2001, 1000), 2);
        assert_eq!(bucket_index(1, 1), 0);
        assert_eq!(bucket_index(2, 1), 1);
        assert_eq!(bucket_index(3, 1), 2);
        assert_eq!(bucket_index(4, 1), 2);
        assert_eq!(bucket_index(u64::MAX, 1), HIST_BUCKETS - 1);
        for v in [1u64, 7, 999, 1_000_000, 123_456_789] {
            let i = bucket_index(v, 1000);
            if let Some(ub) = bucket_upper_bound(i, 1000) {
                assert!(v <= ub);
            }
            if i > 0 {
                assert!(v > bucket_upper_bound(i - 1, 1000).unwrap());
            }
        }
    }

    #[test]
    fn unenforced_settings_round_trip() {
        for u in UnenforcedSetting::ALL {
            assert_eq!(UnenforcedSetting::from_wire(u as u64), Some(u));
        }
    }
}

//! The custom collector: reads every region's exact counters and histograms at
//! scrape time and encodes the metrics contract (see `docs/metrics.md`).
//!
//! Every family is described on every scrape, even with no regions, and every series
//! a region is known to have is exported from the moment the region appears (its
//! counters start at 0 in the region, and we export them whatever their value).
//!
//! Region contents are written by tenants (docs/security.md, F5): each region is read
//! under `catch_unwind`, a histogram whose buckets overflow or disagree with its count
//! is left out (and counted once as `reason="corrupt"`), and a mapping that faulted
//! because its file was truncated is dropped (`reason="truncated"`). Should encoding
//! still panic, `http::Metrics::render` renders again in isolation mode: each region
//! is first encoded on its own, and one that panics is left out of that scrape.

use crate::hostpid::RESULTS;
use crate::labels::RegionLabels;
use crate::regions::{lock, panic_text, RegionSet, Tracked};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tracing::{error, warn};
use vigil_region::{
    Counter, DetectOutcome, ForceReason, HistogramId, HistogramSnapshot, LockId, Snapshot,
};

/// How far a histogram's `count` word may be from the sum of its buckets: they are
/// incremented separately, so observations in flight make them differ briefly.
pub const HISTOGRAM_COUNT_SLACK: u64 = 1 << 20;

/// True if a histogram can be encoded: the sum of its buckets does not overflow,
/// and it is within [`HISTOGRAM_COUNT_SLACK`] of the separately read count.
pub fn histogram_is_plausible(h: &HistogramSnapshot) -> bool {
    let total = h.buckets.iter().try_fold(0u64, |a, &b| a.checked_add(b));
    match total {
        Some(total) => !h.buckets.is_empty() && total.abs_diff(h.count) <= HISTOGRAM_COUNT_SLACK,
        None => false,
    }
}

/// What one scrape read from one region, with each histogram checked.
#[derive(Debug, Clone)]
struct View {
    tracked: Arc<Tracked>,
    labels: RegionLabels,
    snap: Snapshot,
    lost: [u64; 3],
    /// Per histogram (indexed like `snap.histograms`): safe to encode.
    hist_ok: Vec<bool>,
    /// `vigil_host_pid_checks_total` by result (indexed like `hostpid::RESULTS`).
    host_pid_checks: [u64; 4],
}

impl View {
    fn histogram(&self, id: HistogramId) -> Option<&HistogramSnapshot> {
        let i = id as usize;
        match (self.snap.histograms.get(i), self.hist_ok.get(i)) {
            (Some(h), Some(true)) => Some(h),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct VigilCollector {
    set: Arc<RegionSet>,
    /// Set by `http::Metrics` to re-render after a panic: encode each region alone
    /// first and leave out those that panic.
    isolate: Arc<AtomicBool>,
}

impl VigilCollector {
    pub fn new(set: Arc<RegionSet>) -> VigilCollector {
        VigilCollector::with_isolation(set, Arc::new(AtomicBool::new(false)))
    }

    pub fn with_isolation(set: Arc<RegionSet>, isolate: Arc<AtomicBool>) -> VigilCollector {
        VigilCollector { set, isolate }
    }

    /// Reads one region; None if it cannot be read now (the background task counts
    /// and drops broken ones) or its mapping faulted (dropped here).
    fn read(&self, t: &Arc<Tracked>) -> Option<View> {
        let res = catch_unwind(AssertUnwindSafe(|| {
            let snap = self.set.scrape_snapshot(t)?;
            let hist_ok: Vec<bool> = snap.histograms.iter().map(histogram_is_plausible).collect();
            self.set.note_histograms(t, hist_ok.iter().all(|ok| *ok));
            Some(View {
                tracked: t.clone(),
                labels: t.labels(),
                snap,
                lost: t.lost(),
                hist_ok,
                host_pid_checks: [0; 4],
            })
        }));
        res.unwrap_or_else(|p| {
            error!(
                "region {}: reading it panicked ({}); left out of this scrape",
                t.path.display(),
                panic_text(&*p)
            );
            None
        })
    }

    /// Checks the host PIDs of new slot incarnations against `/proc` (see `hostpid`):
    /// every region's slots first, then one scan for all of them if one is due, and
    /// fills in each view's counts. A panic leaves the counts as they were.
    fn check_host_pids(&self, views: &mut [View]) {
        // Renders are serialized already (http::MAX_CONCURRENT_RENDERS); this keeps
        // the observe/scan/resolve sequence whole whatever calls it.
        static BUSY: Mutex<()> = Mutex::new(());
        let _busy = lock(&BUSY);
        let checker = self.set.host_pid_checker();
        let res = catch_unwind(AssertUnwindSafe(|| {
            let mut wanted = Vec::new();
            for v in views.iter() {
                let mut c = lock(&v.tracked.host_pid_checks);
                wanted.extend(c.observe(v.snap.init_nonce, &v.snap.slots));
            }
            wanted.sort_unstable();
            wanted.dedup();
            if let Some(found) = checker.scan_if_due(&wanted) {
                for v in views.iter() {
                    lock(&v.tracked.host_pid_checks).resolved(&found);
                }
            }
        }));
        if let Err(p) = res {
            error!(
                "host-PID check panicked ({}); counts left as they were",
                panic_text(&*p)
            );
        }
        for v in views.iter_mut() {
            v.host_pid_checks = lock(&v.tracked.host_pid_checks).counts();
        }
    }
}

/// Per device, the memory accounted to active slots whose owner is gone (its liveness
/// token is free): `used` minus this is what live processes hold. Saturating: the
/// numbers are tenant-written.
pub fn dead_bytes(s: &Snapshot) -> Vec<u64> {
    let mut out = vec![0u64; s.devices.len()];
    for slot in s.slots.iter().filter(|sl| !sl.alive) {
        for (acc, m) in out.iter_mut().zip(slot.mem_used.iter()) {
            *acc = acc.saturating_add(*m);
        }
    }
    out
}

/// Encodes a fixed set of views (isolation mode's trial encodings).
#[derive(Debug)]
struct Trial(Vec<View>);

impl Collector for Trial {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        encode_views(&mut enc, &self.0, 0, &[])
    }
}

/// True if `v` encodes in both formats without panicking or failing.
fn encodes_alone(v: &View) -> bool {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Trial(vec![v.clone()])));
    catch_unwind(AssertUnwindSafe(|| {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).is_ok() && {
            s.clear();
            prometheus_client::encoding::prometheus_text::encode(&mut s, &reg).is_ok()
        }
    }))
    .unwrap_or(false)
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn with<'a>(base: &[(&'static str, &'a str)], extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    let mut v = Vec::with_capacity(base.len() + extra.len());
    v.extend_from_slice(base);
    v.extend_from_slice(extra);
    v
}

/// Encodes one counter family (the encoder appends `_total`).
fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

fn gauges<'a>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// Encodes histograms from the region's exact log2 histograms. `divisor` converts the
/// region's unit (ns, or 1 for counts) into the exported base unit; dividing (not
/// multiplying by 1e-9) keeps bounds such as 1e-06 exact.
/// Which of a region histogram's log2 buckets are exported: `lo..=hi` by index (bucket
/// `i`'s upper bound is `unit << i`). Buckets below `lo` are folded into `lo` and those
/// above `hi` into `+Inf`, so every exported count stays exact; the range only drops
/// boundaries no real value comes near (a detection never takes 1 µs, nor 10^5
/// polls), which keeps a 64-region scrape a fifth smaller.
#[derive(Clone, Copy)]
struct Range {
    lo: usize,
    hi: usize,
}

/// Lock waits: 1 µs to 67 s.
const LOCK_WAIT: Range = Range { lo: 0, hi: 26 };
/// Detection latency (context creation included): 1.02 ms to 34 s.
const DETECTION: Range = Range { lo: 10, hi: 25 };
/// Polls per detection: 1 to 8192.
const POLLS: Range = Range { lo: 0, hi: 13 };
/// Attaching to the region: 1 µs to 16.8 s.
const INIT: Range = Range { lo: 0, hi: 24 };

fn histograms<'a>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    divisor: f64,
    range: Range,
    rows: impl IntoIterator<Item = (Labels<'a>, &'a HistogramSnapshot)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for (labels, h) in rows {
        buckets.clear();
        let n = h.buckets.len();
        let hi = range.hi.min(n.saturating_sub(2));
        let mut pending = 0u64;
        for (i, &c) in h.buckets.iter().enumerate() {
            pending = pending.saturating_add(c);
            if i + 1 == n {
                buckets.push((f64::INFINITY, pending));
            } else if i >= range.lo && i <= hi {
                let le = h.unit.checked_shl(i as u32).unwrap_or(u64::MAX) as f64 / divisor;
                buckets.push((le, pending));
                pending = 0;
            }
        }
        // Count is the bucket total, not the separately read `count` word: a scrape
        // between an observation's bucket and count increments must still give a
        // histogram whose +Inf bucket equals its count. Both settle to the same value.
        // (`histogram_is_plausible` has checked that the total does not overflow.)
        let count: u64 = h.buckets.iter().fold(0u64, |a, &b| a.saturating_add(b));
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            h.sum as f64 / divisor,
            count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

const NS: f64 = 1e9;

impl Collector for VigilCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let t0 = std::time::Instant::now();
        let tracked = self.set.tracked();
        // Read each region once (see `regions` for mapping policy). A region that
        // fails to open now is skipped; the background task counts and drops it.
        let read = |t: &Arc<Tracked>| self.read(t);
        // Reading is syscalls and page faults per region: spread it over the cores.
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
            .min(tracked.len().div_ceil(8))
            .max(1);
        let mut views: Vec<View> = if workers == 1 {
            tracked.iter().filter_map(read).collect()
        } else {
            let chunk = tracked.len().div_ceil(workers);
            std::thread::scope(|sc| {
                let handles: Vec<_> = tracked
                    .chunks(chunk)
                    .map(|part| sc.spawn(move || part.iter().filter_map(read).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        };
        if self.isolate.load(Relaxed) {
            views.retain(|v| {
                let ok = encodes_alone(v);
                if !ok {
                    warn!(
                        "region {:?}: encoding its series panicked; left out of this scrape",
                        v.labels.region
                    );
                }
                ok
            });
        }
        self.check_host_pids(&mut views);
        let read_time = t0.elapsed();
        let errs = self.set.error_counts();
        encode_views(&mut enc, &views, tracked.len(), &errs)?;
        tracing::debug!(
            "scrape: read {} regions in {:?}, encoded in {:?}",
            views.len(),
            read_time,
            t0.elapsed() - read_time
        );
        Ok(())
    }
}

/// Encodes every family for `views`, then the exporter's self-metrics.
fn encode_views(
    enc: &mut DescriptorEncoder,
    views: &[View],
    regions: usize,
    errs: &[(&'static str, u64)],
) -> fmt::Result {
    {
        let bases: Vec<Labels> = views.iter().map(|v| v.labels.pairs()).collect();
        let each = || views.iter().zip(bases.iter());
        let c = |v: &View, c: Counter| v.snap.counter(c);

        counters(
            enc,
            "vigil_region_initializations",
            "Times the region was initialized (1, plus one per recovery)",
            each().map(|(v, b)| (b.clone(), c(v, Counter::RegionInitializations))),
        )?;
        counters(
            enc,
            "vigil_region_recoveries",
            "Times the region was re-initialized because its initializer died half-way",
            each().map(|(v, b)| (b.clone(), c(v, Counter::RegionRecoveries))),
        )?;
        counters(
            enc,
            "vigil_process_inits",
            "Processes that attached to the region, by path (initializer includes recoveries)",
            each().flat_map(|(v, b)| {
                [
                    ("initializer", Counter::ProcessInitsInitializer),
                    ("fast_path", Counter::ProcessInitsFastPath),
                ]
                .map(|(p, k)| (with(b, &[("path", p)]), c(v, k)))
            }),
        )?;
        gauges(
            enc,
            "vigil_processes",
            "Live processes: active slots whose owner's liveness token is held",
            each().map(|(v, b)| {
                (
                    b.clone(),
                    v.snap.slots.iter().filter(|s| s.alive).count() as i64,
                )
            }),
        )?;
        counters(
            enc,
            "vigil_process_slots_claimed",
            "Process slots claimed",
            each().map(|(v, b)| (b.clone(), c(v, Counter::SlotsClaimed))),
        )?;
        counters(
            enc,
            "vigil_process_slots_reclaimed",
            "Process slots given back: released by their process, or reclaimed from a dead one",
            each().flat_map(|(v, b)| {
                [
                    ("released", Counter::SlotsReleased),
                    ("dead", Counter::SlotsReclaimedDead),
                ]
                .map(|(r, k)| (with(b, &[("reason", r)]), c(v, k)))
            }),
        )?;
        counters(
            enc,
            "vigil_lock_acquisitions",
            "Lock acquisitions",
            each().flat_map(|(v, b)| {
                LockId::ALL.map(|l| {
                    (
                        with(b, &[("lock", l.name())]),
                        c(v, Counter::lock_acquisitions(l)),
                    )
                })
            }),
        )?;
        counters(
            enc,
            "vigil_lock_retries",
            "Timed-out futex wait slices while waiting for a lock",
            each().flat_map(|(v, b)| {
                LockId::ALL.map(|l| {
                    (
                        with(b, &[("lock", l.name())]),
                        c(v, Counter::lock_retries(l)),
                    )
                })
            }),
        )?;
        counters(
            enc,
            "vigil_lock_force_posts",
            "Locks taken over from their owner: owner_dead (liveness token free) or lease_expired (fenced eviction)",
            each().flat_map(|(v, b)| {
                LockId::ALL.into_iter().flat_map(move |l| {
                    ForceReason::ALL.map(|r| {
                        (
                            with(b, &[("lock", l.name()), ("reason", r.name())]),
                            c(v, Counter::force_posts(l, r)),
                        )
                    })
                })
            }),
        )?;
        counters(
            enc,
            "vigil_lock_fenced_releases",
            "Releases that failed because the holder had been evicted (fenced) meanwhile",
            each().flat_map(|(v, b)| {
                LockId::ALL.map(|l| {
                    (
                        with(b, &[("lock", l.name())]),
                        c(v, Counter::fenced_releases(l)),
                    )
                })
            }),
        )?;
        histograms(
            enc,
            "vigil_lock_wait_seconds",
            "Time from asking for a lock to holding it",
            NS,
            LOCK_WAIT,
            each().flat_map(|(v, b)| {
                LockId::ALL.into_iter().filter_map(|l| {
                    Some((
                        with(b, &[("lock", l.name())]),
                        v.histogram(HistogramId::lock_wait(l))?,
                    ))
                })
            }),
        )?;
        counters(
            enc,
            "vigil_host_pid_detections",
            "Host-PID detections by outcome",
            each().flat_map(|(v, b)| {
                DetectOutcome::ALL.map(|o| {
                    (
                        with(b, &[("outcome", o.name())]),
                        c(v, Counter::detections(o)),
                    )
                })
            }),
        )?;
        histograms(
            enc,
            "vigil_host_pid_detection_seconds",
            "Host-PID detection latency, from the start of context creation to the outcome",
            NS,
            DETECTION,
            each().filter_map(|(v, b)| {
                Some((b.clone(), v.histogram(HistogramId::DetectionLatency)?))
            }),
        )?;
        histograms(
            enc,
            "vigil_host_pid_detection_polls",
            "NVML polls per host-PID detection",
            1.0,
            POLLS,
            each()
                .filter_map(|(v, b)| Some((b.clone(), v.histogram(HistogramId::DetectionPolls)?))),
        )?;
        counters(
            enc,
            "vigil_host_pid_checks",
            "Slot incarnations whose recorded host PID was checked against the exporter's /proc (once each), by result: match, mismatch, unresolvable (no process of the exporter's view matched), not_recorded (no host PID to compare, e.g. same_namespace)",
            each().flat_map(|(v, b)| {
                RESULTS
                    .into_iter()
                    .zip(v.host_pid_checks)
                    .map(|(r, n)| (with(b, &[("result", r)]), n))
            }),
        )?;
        histograms(
            enc,
            "vigil_init_duration_seconds",
            "Time a process took to attach to the region (map, initialize or wait for READY)",
            NS,
            INIT,
            each().filter_map(|(v, b)| Some((b.clone(), v.histogram(HistogramId::InitDuration)?))),
        )?;
        let devs: Vec<Vec<String>> = views
            .iter()
            .map(|v| (0..v.snap.devices.len()).map(|i| i.to_string()).collect())
            .collect();
        let per_device = |f: fn(&vigil_region::DeviceInfo) -> u64| {
            each().zip(devs.iter()).flat_map(move |((v, b), names)| {
                v.snap
                    .devices
                    .iter()
                    .zip(names.iter())
                    .map(move |(d, n)| (with(b, &[("device", n.as_str())]), f(d)))
            })
        };
        gauges(
            enc,
            "vigil_device_memory_limit_bytes",
            "Per-device memory limit; 0 means no limit",
            per_device(|d| d.limit).map(|(l, v)| (l, v.min(i64::MAX as u64) as i64)),
        )?;
        gauges(
            enc,
            "vigil_device_memory_used_bytes",
            "Device memory the region's processes hold, as the interposer accounted it (memory of processes that died is included until their slot is reclaimed: see dead_bytes)",
            per_device(|d| d.used).map(|(l, v)| (l, v.min(i64::MAX as u64) as i64)),
        )?;
        // Held by slots whose process is gone (SIGKILLed, `_exit`): still in `used`
        // until a later process of the region reclaims the slot. Told apart by the
        // reader's liveness probe on each slot's token; nothing is written.
        let dead: Vec<Vec<u64>> = views.iter().map(|v| dead_bytes(&v.snap)).collect();
        gauges(
            enc,
            "vigil_device_memory_dead_bytes",
            "Device memory still accounted to process slots whose process is gone (included in used_bytes until a later process of the region reclaims the slot)",
            each()
                .zip(devs.iter())
                .zip(dead.iter())
                .flat_map(|(((_, b), names), held)| {
                    names.iter().zip(held.iter()).map(move |(n, v)| {
                        (
                            with(b, &[("device", n.as_str())]),
                            (*v).min(i64::MAX as u64) as i64,
                        )
                    })
                }),
        )?;
        gauges(
            enc,
            "vigil_device_memory_peak_bytes",
            "Highest device memory use accounted since the region was created",
            per_device(|d| d.peak).map(|(l, v)| (l, v.min(i64::MAX as u64) as i64)),
        )?;
        counters(
            enc,
            "vigil_device_memory_allocation_denials",
            "Allocations refused because they would exceed the device limit",
            per_device(|d| d.denials),
        )?;
        counters(
            enc,
            "vigil_ring_events",
            "Events ever written to the region's event ring (its head position)",
            each().map(|(v, b)| (b.clone(), v.snap.ring_head)),
        )?;
        counters(
            enc,
            "vigil_ring_events_lost",
            "Ring events this exporter could not deliver: overwritten before being drained, torn, or abandoned by a writer that died mid-write",
            each().flat_map(|(v, b)| {
                ["overwritten", "torn", "abandoned"]
                    .into_iter()
                    .zip(v.lost)
                    .map(|(r, n)| (with(b, &[("reason", r)]), n))
            }),
        )?;

        // Exporter self-metrics.
        gauges(
            enc,
            "vigil_exporter_build_info",
            "Always 1; the version label says which exporter build this is",
            [(vec![("version", crate::VERSION)], 1)],
        )?;
        gauges(
            enc,
            "vigil_exporter_regions",
            "Regions currently watched",
            [(vec![], regions as i64)],
        )?;
        counters(
            enc,
            "vigil_exporter_region_errors",
            "Region files that could not be used, by reason (each failing file version counted once)",
            errs.iter().map(|(r, n)| (vec![("reason", *r)], *n)),
        )?;
        Ok(())
    }
}

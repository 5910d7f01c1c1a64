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

use crate::hami::{Liveness, LockState};
use crate::hostpid::RESULTS;
use crate::labels::RegionLabels;
use crate::nvml::NvmlState;
use crate::regions::{HamiView, RegionSet, Tracked};
use crate::util::{lock, panic_text};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tracing::{error, warn};
use vigil_region::{
    Counter, DetectOutcome, ForceReason, HistogramId, HistogramSnapshot, LockId, Snapshot,
    UnenforcedSetting,
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
        encode_views(&mut enc, &self.0, &Extra::default(), 0, &[])
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

/// A region's labels (`region`, `namespace`, ..., `interposer`), rendered once per
/// scrape. Every series of the region writes them in one piece: label by label they
/// were a fifth of a 64-region scrape (five small writes and an escaping scan each).
#[derive(Debug)]
struct Base<'a> {
    /// Every label but the last, escaped and rendered (`region="r",pod_uid="u",`),
    /// then the last one's name. It goes to the encoder as one label *name*: names
    /// are written as given, while values are escaped, which these already are.
    head: String,
    /// The last label's value, escaped by the encoder like any value.
    last: &'a str,
}

impl<'a> Base<'a> {
    /// From `(name, value)` pairs, in order; `pairs` must not be empty.
    fn new(pairs: &[(&'static str, &'a str)]) -> Base<'a> {
        let Some(((last_name, last), rest)) = pairs.split_last() else {
            // A region always has `region`; a base without labels would write `{="`.
            panic!("a region's base labels are empty");
        };
        let mut head = String::with_capacity(128);
        for (name, value) in rest {
            head.push_str(name);
            head.push_str("=\"");
            escape_into(&mut head, value);
            head.push_str("\",");
        }
        head.push_str(last_name);
        Base { head, last }
    }
}

/// Appends `v` escaped as the exposition formats escape label values (backslash,
/// double quote, newline), as `prometheus-client` does for the values it writes.
fn escape_into(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// One series' labels: its region's, rendered, and up to three of the family's own.
/// Copied, never allocated: a 64-region scrape has thousands of series, and a `Vec`
/// each was a tenth of its time in malloc and free.
#[derive(Clone, Copy)]
struct Labels<'a> {
    base: Option<&'a Base<'a>>,
    extra: [(&'static str, &'a str); 3],
    n: usize,
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        if let Some(b) = self.base {
            EncodeLabel::encode(&(b.head.as_str(), b.last), encoder.encode_label())?;
        }
        (&self.extra[..self.n]).encode(encoder)
    }
}

/// `base` plus `extra`. At most three of a family's own: every caller is in this file
/// with a literal list, and more would panic here, which the scrape's `catch_unwind`
/// turns into a logged error rather than a series with a label missing.
fn with<'a>(base: &'a Base<'a>, extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    labels(Some(base), extra)
}

fn labels<'a>(base: Option<&'a Base<'a>>, extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    let mut l = Labels {
        base,
        extra: [("", ""); 3],
        n: extra.len(),
    };
    l.extra[..extra.len()].copy_from_slice(extra);
    l
}

/// A region as the NVML check sees it: its labels, the host PIDs of its live
/// processes, and what the interposer accounted to them per device.
type Checked<'a> = (&'a Base<'a>, Vec<u32>, Vec<u64>);

/// Labels of a series that belongs to no region (the exporter's own, NVML's devices).
fn own<'a>(extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    labels(None, extra)
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

/// Which of a region histogram's log2 buckets are exported: every `step`-th index
/// from `lo` to `hi` (bucket `i`'s upper bound is `unit << i`). Buckets in between are
/// folded into the next exported one, those below `lo` into `lo` and those above `hi`
/// into `+Inf`, so every exported count stays exact. The boundaries are fixed, never
/// chosen by the data, so the same `le` values line up across regions and
/// `sum by (le)` stays a valid histogram. Few, wide buckets: the dashboard and alert
/// quantiles need the order of magnitude and the tail, and each boundary costs a
/// series per region (issue 15 asked for at most 60 per one-device region).
#[derive(Clone, Copy)]
struct Range {
    lo: usize,
    hi: usize,
    step: usize,
}

impl Range {
    fn exports(&self, i: usize) -> bool {
        i >= self.lo && i <= self.hi && (i - self.lo).is_multiple_of(self.step)
    }
}

/// Contended lock waits (uncontended acquisitions record nothing), ×16 apart:
/// 262 µs, 4.2 ms, 67 ms, 1.07 s, 17.2 s. The alert thresholds (0.5 s region lock,
/// 10 s detection lock) fall inside the range.
const LOCK_WAIT: Range = Range {
    lo: 8,
    hi: 24,
    step: 4,
};
/// Detection latency (context creation included), ×4 apart: 65.5 ms, 262 ms, 1.05 s,
/// 4.2 s, 16.8 s. Faster detections all land in the first bucket.
const DETECTION: Range = Range {
    lo: 16,
    hi: 24,
    step: 2,
};
/// Attaching to the region, ×16 apart: 262 µs, 4.2 ms, 67 ms, 1.07 s, 17.2 s (a wait
/// on a dead initializer is the tail that matters).
const INIT: Range = Range {
    lo: 8,
    hi: 24,
    step: 4,
};

/// Encodes histograms from the region's exact log2 histograms. `divisor` converts the
/// region's unit (ns) into seconds; dividing (not multiplying by 1e-9) keeps bounds
/// exact. A histogram with no observation is left out: in the default (parallel)
/// detection mode the detection lock is never taken, and an uncontended region lock
/// records nothing, so most regions export no lock-wait series at all.
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
        let range = Range {
            hi: range.hi.min(n.saturating_sub(2)),
            ..range
        };
        let mut pending = 0u64;
        for (i, &c) in h.buckets.iter().enumerate() {
            pending = pending.saturating_add(c);
            if i + 1 == n {
                buckets.push((f64::INFINITY, pending));
            } else if range.exports(i) {
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
        if count == 0 {
            continue;
        }
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
        let extra = Extra {
            hami: self.set.hami_views(),
            nvml: self.set.nvml_state(),
        };
        let errs = self.set.error_counts();
        encode_views(&mut enc, &views, &extra, tracked.len(), &errs)?;
        tracing::debug!(
            "scrape: read {} regions in {:?}, encoded in {:?}",
            views.len(),
            read_time,
            t0.elapsed() - read_time
        );
        Ok(())
    }
}

/// What a scrape exports besides Vigil's own regions.
#[derive(Debug, Default)]
struct Extra {
    /// HAMi-core regions (issue 14): some of Vigil's families, marked
    /// `interposer="hami-core"`, plus `vigil_hami_*`.
    hami: Vec<HamiView>,
    nvml: NvmlState,
}

/// The `interposer` label of HAMi-core regions' series. Vigil's own series carry none,
/// so every existing query keeps its meaning; `{interposer=""}` selects Vigil's only.
const HAMI: (&str, &str) = ("interposer", "hami-core");

fn lock_state_value(s: LockState) -> (i64, i64) {
    match s {
        LockState::Free => (0, 0),
        LockState::Held => (1, 0),
        LockState::HeldByDeadOwner => (1, 1),
    }
}

/// Encodes every family for `views` and `extra`, then the exporter's self-metrics.
fn encode_views(
    enc: &mut DescriptorEncoder,
    views: &[View],
    extra: &Extra,
    regions: usize,
    errs: &[(&'static str, u64)],
) -> fmt::Result {
    {
        let bases: Vec<Base> = views.iter().map(|v| Base::new(&v.labels.pairs())).collect();
        let each = || views.iter().zip(bases.iter());
        let hami = &extra.hami;
        let hbases: Vec<Base> = hami
            .iter()
            .map(|h| {
                let mut b = h.labels.pairs();
                b.push(HAMI);
                Base::new(&b)
            })
            .collect();
        let heach = || hami.iter().zip(hbases.iter());
        let hdevs: Vec<Vec<String>> = hami
            .iter()
            .map(|h| (0..h.region.devices).map(|i| i.to_string()).collect())
            .collect();
        let hper_device = |f: &'static dyn Fn(&HamiView, usize) -> u64| {
            heach().zip(hdevs.iter()).flat_map(move |((h, b), names)| {
                names
                    .iter()
                    .enumerate()
                    .map(move |(d, n)| (with(b, &[("device", n.as_str())]), clamp(f(h, d))))
            })
        };
        let c = |v: &View, c: Counter| v.snap.counter(c);

        counters(
            enc,
            "vigil_region_recoveries",
            "Times the region was re-initialized because its initializer died half-way (it was initialized 1 + this many times)",
            each().map(|(v, b)| (with(b, &[]), c(v, Counter::RegionRecoveries))),
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
            "Live processes: active slots whose owner's liveness token is held (HAMi-core: used slots not known to be dead)",
            each()
                .map(|(v, b)| {
                    (
                        with(b, &[]),
                        v.snap.slots.iter().filter(|s| s.alive).count() as i64,
                    )
                })
                .chain(heach().map(|(h, b)| {
                    (
                        with(b, &[]),
                        (h.region.slots.len() - h.eval.count(Liveness::Dead)) as i64,
                    )
                })),
        )?;
        gauges(
            enc,
            "vigil_unenforced_settings",
            "Live processes that started with a HAMi-core setting Vigil does not enforce (sm_limit: CUDA_DEVICE_SM_LIMIT, i.e. gpucores; see docs/adoption.md)",
            // Only settings in use: each is a misconfiguration to fix, and five zeros
            // per region were a tenth of a scrape.
            each().flat_map(|(v, b)| {
                UnenforcedSetting::ALL.into_iter().filter_map(|u| {
                    let n = v
                        .snap
                        .slots
                        .iter()
                        .filter(|s| s.alive && s.unenforced.contains(&u))
                        .count() as i64;
                    (n > 0).then(|| (with(b, &[("setting", u.name())]), n))
                })
            }),
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
                Some((with(b, &[]), v.histogram(HistogramId::DetectionLatency)?))
            }),
        )?;
        counters(
            enc,
            "vigil_host_pid_detection_polls",
            "NVML polls made by host-PID detections (per detection: divide by the sum of vigil_host_pid_detections_total)",
            each().map(|(v, b)| {
                let polls = v.histogram(HistogramId::DetectionPolls).map_or(0, |h| h.sum);
                (with(b, &[]), polls)
            }),
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
            each()
                .filter_map(|(v, b)| Some((with(b, &[]), v.histogram(HistogramId::InitDuration)?))),
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
            per_device(|d| d.limit)
                .map(|(l, v)| (l, v.min(i64::MAX as u64) as i64))
                .chain(hper_device(&|h, d| h.region.limits[d])),
        )?;
        gauges(
            enc,
            "vigil_device_memory_used_bytes",
            "Device memory the region's processes hold, as the interposer accounted it (memory of processes that died is included until their slot is reclaimed: see dead_bytes)",
            per_device(|d| d.used)
                .map(|(l, v)| (l, v.min(i64::MAX as u64) as i64))
                .chain(hper_device(&|h, d| h.region.used(d))),
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
                })
                .chain(hper_device(&|h, d| h.eval.dead_bytes[d])),
        )?;
        encode_hami(enc, hami, &hbases, &hdevs)?;
        if extra.nvml.enabled {
            // Per region and device: (host PIDs of live slots, what Vigil accounted to them).
            let mut checked: Vec<Checked> = Vec::new();
            for (v, b) in each() {
                let live: Vec<_> = v
                    .snap
                    .slots
                    .iter()
                    .filter(|s| s.alive && s.host_pid != 0)
                    .collect();
                let mut acc = vec![0u64; v.snap.devices.len()];
                for s in &live {
                    for (a, &u) in acc.iter_mut().zip(s.mem_used.iter()) {
                        *a = a.saturating_add(u);
                    }
                }
                checked.push((b, live.iter().map(|s| s.host_pid).collect(), acc));
            }
            for ((h, b), ev) in heach().zip(hami.iter().map(|h| &h.eval)) {
                let live: Vec<_> = h
                    .region
                    .slots
                    .iter()
                    .zip(ev.slots.iter())
                    .filter(|(s, l)| **l == Liveness::Alive && s.host_pid != 0)
                    .map(|(s, _)| s)
                    .collect();
                let acc = (0..h.region.devices)
                    .map(|d| {
                        live.iter()
                            .fold(0u64, |a, s| a.saturating_add(s.devices[d].total))
                    })
                    .collect();
                checked.push((b, live.iter().map(|s| s.host_pid).collect(), acc));
            }
            encode_nvml(enc, &extra.nvml, &checked)?;
        }
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
            each().map(|(v, b)| (with(b, &[]), v.snap.ring_head)),
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
            "Always 1; the labels say which exporter build this is: version, git revision, compiler",
            [(
                own(&[
                    ("version", crate::VERSION),
                    ("revision", crate::REVISION),
                    ("rustc", crate::RUSTC),
                ]),
                1,
            )],
        )?;
        encode_process(enc, &crate::process::read())?;
        gauges(
            enc,
            "vigil_exporter_regions",
            "Regions currently watched",
            [(own(&[]), regions as i64)],
        )?;
        gauges(
            enc,
            "vigil_exporter_hami_regions",
            "HAMi-core regions currently watched",
            [(own(&[]), hami.len() as i64)],
        )?;
        counters(
            enc,
            "vigil_exporter_region_errors",
            "Region files that could not be used, by reason (each failing file version counted once)",
            errs.iter().map(|(r, n)| (own(&[("reason", *r)]), *n)),
        )?;
        Ok(())
    }
}

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The families only HAMi-core regions have.
fn encode_hami(
    enc: &mut DescriptorEncoder,
    hami: &[HamiView],
    bases: &[Base],
    devs: &[Vec<String>],
) -> fmt::Result {
    let each = || hami.iter().zip(bases.iter());
    gauges(
        enc,
        "vigil_hami_region_info",
        "Always 1 per HAMi-core region; version is the shared_region_t version its libvgpu.so wrote",
        each().map(|(h, b)| {
            (
                with(b, &[("version", if h.region.minor >= 2 { "1.2" } else { "1.1" })]),
                1,
            )
        }),
    )?;
    gauges(
        enc,
        "vigil_hami_device_info",
        "Always 1 per device of a HAMi-core region; uuid is the one HAMi-core recorded (joins with HAMi's deviceuuid and dcgm-exporter's UUID)",
        each().zip(devs.iter()).flat_map(|((h, b), names)| {
            names.iter().zip(h.region.uuids.iter()).map(move |(n, u)| {
                (with(b, &[("device", n.as_str()), ("uuid", u.as_str())]), 1)
            })
        }),
    )?;
    {
        let mut m = enc.encode_descriptor(
            "vigil_hami_device_sm_limit_ratio",
            "HAMi-core's SM (core) limit per device, as a fraction of the device; 0 means no limit. Vigil's interposer does not enforce it",
            None,
            MetricType::Gauge,
        )?;
        for ((h, b), names) in each().zip(devs.iter()) {
            for (n, &p) in names.iter().zip(h.region.sm_limits.iter()) {
                m.encode_family(&with(b, &[("device", n.as_str())]))?
                    .encode_gauge(&(p as f64 / 100.0))?;
            }
        }
    }
    gauges(
        enc,
        "vigil_hami_process_slots",
        "Used process slots of a HAMi-core region, by whether their process is alive (judged from who maps the region file; unknown without ptrace access to /proc)",
        each().flat_map(|(h, b)| {
            [
                ("alive", Liveness::Alive),
                ("dead", Liveness::Dead),
                ("unknown", Liveness::Unknown),
            ]
            .map(|(n, l)| (with(b, &[("state", n)]), h.eval.count(l) as i64))
        }),
    )?;
    gauges(
        enc,
        "vigil_hami_host_pid_zero_slots",
        "Used slots of a HAMi-core region whose recorded host PID is 0: HAMi-core's host-PID detection failed for them",
        each().map(|(h, b)| (with(b, &[]), h.eval.host_pid_zero as i64)),
    )?;
    gauges(
        enc,
        "vigil_hami_host_pid_wrong_slots",
        "Slots of a HAMi-core region whose process is alive but whose recorded host PID is another process's",
        each().map(|(h, b)| (with(b, &[]), h.eval.host_pid_wrong as i64)),
    )?;
    let locks = |h: &HamiView| -> Vec<(&'static str, LockState, u32)> {
        let mut v = vec![("sem", h.eval.sem, h.region.sem.waiters)];
        if let (Some(s), Some(raw)) = (h.eval.sem_postinit, h.region.sem_postinit) {
            v.push(("sem_postinit", s, raw.waiters));
        }
        v
    };
    gauges(
        enc,
        "vigil_hami_lock_held",
        "1 while a HAMi-core lock (sem: slot table; sem_postinit: host-PID detection) is held",
        each().flat_map(|(h, b)| {
            locks(h)
                .into_iter()
                .map(move |(n, s, _)| (with(b, &[("lock", n)]), lock_state_value(s).0))
        }),
    )?;
    gauges(
        enc,
        "vigil_hami_lock_owner_dead",
        "1 while a HAMi-core lock is held and no live process can be its holder: a deadlock in progress for every process that starts in the container",
        each().flat_map(|(h, b)| {
            locks(h)
                .into_iter()
                .map(move |(n, s, _)| (with(b, &[("lock", n)]), lock_state_value(s).1))
        }),
    )?;
    gauges(
        enc,
        "vigil_hami_lock_waiters",
        "Processes blocked on a HAMi-core lock right now (from the semaphore's waiter count)",
        each().flat_map(|(h, b)| {
            locks(h)
                .into_iter()
                .map(move |(n, _, w)| (with(b, &[("lock", n)]), w as i64))
        }),
    )?;
    Ok(())
}

/// NVML's families: devices, and per region NVML's usage of its live processes next
/// to Vigil's accounting of them (see `nvml`).
fn encode_nvml(enc: &mut DescriptorEncoder, st: &NvmlState, regions: &[Checked]) -> fmt::Result {
    gauges(
        enc,
        "vigil_exporter_nvml_up",
        "1 if NVML is loaded and its last refresh succeeded",
        [(own(&[]), st.up as i64)],
    )?;
    counters(
        enc,
        "vigil_exporter_nvml_errors",
        "NVML refreshes that failed, including attempts to load the library",
        [(own(&[]), st.errors)],
    )?;
    let snap = st.snapshot.as_deref();
    let devices = snap.map_or(&[][..], |s| s.devices.as_slice());
    let idx: Vec<String> = devices.iter().map(|d| d.index.to_string()).collect();
    {
        let mut m = enc.encode_descriptor(
            "vigil_exporter_nvml_refresh_seconds",
            "How long the last NVML refresh took (done in the background, not by scrapes)",
            None,
            MetricType::Gauge,
        )?;
        if let Some(s) = snap {
            m.encode_family(&Vec::<(&str, &str)>::new())?
                .encode_gauge(&s.duration.as_secs_f64())?;
        }
    }
    gauges(
        enc,
        "vigil_device_info",
        "Always 1 per physical device NVML lists; device is NVML's index (joins with dcgm-exporter's UUID and HAMi's deviceuuid through uuid)",
        devices.iter().zip(idx.iter()).map(|(d, i)| {
            (
                own(&[("device", i.as_str()), ("uuid", d.uuid.as_str()), ("model", d.model.as_str())]),
                1,
            )
        }),
    )?;
    gauges(
        enc,
        "vigil_nvml_device_memory_total_bytes",
        "Physical device memory, from NVML",
        devices
            .iter()
            .zip(idx.iter())
            .map(|(d, i)| (own(&[("device", i.as_str())]), clamp(d.total))),
    )?;
    gauges(
        enc,
        "vigil_nvml_device_memory_used_bytes",
        "Physical device memory in use by anyone, from NVML",
        devices
            .iter()
            .zip(idx.iter())
            .map(|(d, i)| (own(&[("device", i.as_str())]), clamp(d.used))),
    )?;
    let mut rows: Vec<(Labels, i64, i64)> = Vec::new();
    let names: Vec<Vec<String>> = regions
        .iter()
        .map(|(_, _, acc)| (0..acc.len()).map(|d| d.to_string()).collect())
        .collect();
    if let Some(s) = snap {
        for ((b, pids, acc), names) in regions.iter().zip(names.iter()) {
            let Some(pairs) = crate::nvml::pair_devices(s, pids, acc) else {
                continue;
            };
            for ((d, n), name) in pairs.iter().enumerate().zip(names.iter()) {
                let seen = n.map_or(0, |n| crate::nvml::usage_of(s, n, pids));
                let drift = seen as i128 - acc[d] as i128;
                rows.push((
                    with(b, &[("device", name.as_str())]),
                    clamp(seen),
                    drift.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                ));
            }
        }
    }
    gauges(
        enc,
        "vigil_nvml_process_memory_bytes",
        "Device memory NVML reports for the region's live processes whose host PID is known (device is the region's ordinal, paired with the physical device its processes use)",
        rows.iter().map(|(l, v, _)| (*l, *v)),
    )?;
    gauges(
        enc,
        "vigil_device_memory_accounting_drift_bytes",
        "NVML's usage of the region's live processes minus what the interposer accounted to them: positive means allocations Vigil did not count",
        rows.iter().map(|(l, _, d)| (*l, *d)),
    )?;
    Ok(())
}

/// The standard `process_*` families, for the exporter itself.
fn encode_process(enc: &mut DescriptorEncoder, p: &crate::process::ProcessStats) -> fmt::Result {
    let none = own(&[]);
    {
        let mut m = enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        if let Some(v) = p.cpu_seconds {
            m.encode_family(&none)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
    }
    for (name, help, v) in [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors",
            p.max_fds,
        ),
    ] {
        gauges(
            enc,
            name,
            help,
            v.map(|v| (none, v.min(i64::MAX as u64) as i64)),
        )?;
    }
    let mut m = enc.encode_descriptor(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        None,
        MetricType::Gauge,
    )?;
    if let Some(v) = p.start_time_seconds {
        m.encode_family(&none)?.encode_gauge(&v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs = Vec<(&'static str, &'static str)>;

    /// One gauge family, one series per `(base, extra)` row: with `Base` when
    /// `prerendered` (an empty base meaning `own`), else label by label.
    #[derive(Debug)]
    struct Rows {
        rows: Vec<(Pairs, Pairs)>,
        prerendered: bool,
    }

    impl Collector for Rows {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            let mut m = enc.encode_descriptor("t", "h", None, MetricType::Gauge)?;
            for (base, extra) in &self.rows {
                if !self.prerendered {
                    let mut all = base.clone();
                    all.extend_from_slice(extra);
                    m.encode_family(&all)?.encode_gauge(&1i64)?;
                } else if base.is_empty() {
                    m.encode_family(&own(extra))?.encode_gauge(&1i64)?;
                } else {
                    let b = Base::new(base);
                    m.encode_family(&with(&b, extra))?.encode_gauge(&1i64)?;
                }
            }
            Ok(())
        }
    }

    /// Both text formats.
    fn render(rows: &[(Pairs, Pairs)], prerendered: bool) -> [String; 2] {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Rows {
            rows: rows.to_vec(),
            prerendered,
        }));
        let (mut a, mut b) = (String::new(), String::new());
        prometheus_client::encoding::text::encode(&mut a, &reg).unwrap();
        prometheus_client::encoding::prometheus_text::encode(&mut b, &reg).unwrap();
        [a, b]
    }

    /// `Base` writes a region's labels as one pre-rendered piece: the output must be
    /// byte for byte what label-by-label encoding gives, escaping included, in both
    /// formats.
    #[test]
    fn prerendered_region_labels_encode_as_label_by_label() {
        let tricky = "a\"b\\c\nd,e=f}{ \u{e9}";
        let mut rows = Vec::new();
        for base in [
            vec![],
            vec![("region", "r.cache")],
            vec![("region", tricky), ("pod_uid", "u")],
            vec![("region", "r"), ("namespace", ""), ("container", tricky)],
            vec![("region", "\\"), ("interposer", "hami-core")],
        ] {
            for extra in [
                vec![],
                vec![("device", "0")],
                vec![("lock", "region"), ("reason", tricky)],
                vec![("a", "1"), ("b", "2"), ("c", "\"")],
            ] {
                let one = [(base.clone(), extra.clone())];
                assert_eq!(
                    render(&one, true),
                    render(&one, false),
                    "base {base:?} extra {extra:?}"
                );
                rows.push((base.clone(), extra));
            }
        }
        let [open_metrics, text] = render(&rows, true);
        assert_eq!([open_metrics.clone(), text], render(&rows, false));
        assert!(open_metrics.contains(r#"t{region="a\"b\\c\nd,e=f}{ é",pod_uid="u",lock="region"#));
    }

    #[test]
    #[should_panic(expected = "base labels are empty")]
    fn a_base_without_labels_is_refused() {
        let _ = Base::new(&[]);
    }
}

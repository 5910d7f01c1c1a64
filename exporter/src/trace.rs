//! Assembling one trace per process start-up from ring events.
//!
//! A start-up, as the ring records it: an `Init` event (no slot yet: the process has
//! not claimed one when it attaches), then on the process's slot an optional
//! `ForcePost` and a `LockWait` on the detection lock, then a `Detection` event
//! carrying the context-creation time, the detection latency and the poll count.
//! Region-lock waits on that slot in between are added too.
//!
//! The `Init` event has no slot, so it is paired with the next start-up that begins
//! after it (first in, first out). That pairing is a heuristic when several processes
//! attach within the same instant; the spans' times are exact either way.
//!
//! Traces are handed to a [`TraceSink`] (OTLP in production, a vector in tests). A
//! start-up whose process died before detecting is flushed, marked incomplete, when
//! its slot starts a new one or after [`OPEN_TRACE_TIMEOUT_NS`].

use crate::labels::RegionLabels;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use vigil_region::{monotonic_ns, realtime_ns, Event, LockId, Payload};

/// An `Init` with no start-up after it this long becomes an attach-only trace.
pub const PENDING_INIT_TIMEOUT_NS: u64 = 30_000_000_000;
/// An unfinished start-up is flushed as incomplete after this long without events,
pub const OPEN_TRACE_TIMEOUT_NS: u64 = 60_000_000_000;
/// or this long after it began, however busy (a writer could keep one open forever).
pub const OPEN_TRACE_MAX_AGE_NS: u64 = 600_000_000_000;
/// Bounds the builder's memory whatever the ring delivers (docs/security.md, F15):
/// attaches waiting for a start-up,
const MAX_PENDING: usize = 4096;
/// start-ups in progress (one per slot in a sane region; events carry any `u16`
/// slot, so a forged ring could open 65,536): past this, the stalest is flushed
/// as incomplete,
pub const MAX_OPEN_TRACES: usize = vigil_region::layout::MAX_SLOTS;
/// and lock-wait or force-post spans per start-up (a real one has one or two);
/// further ones are dropped and counted in the root's `vigil.spans_dropped`.
pub const MAX_SPANS_PER_TRACE: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// One span; times are Unix-epoch nanoseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRec {
    pub name: &'static str,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attrs: Vec<(&'static str, AttrValue)>,
}

/// A finished start-up: a root span and its children.
#[derive(Debug, Clone)]
pub struct FinishedTrace {
    pub trace_id: u128,
    pub root: SpanRec,
    pub children: Vec<SpanRec>,
    /// False if the process never recorded a detection (it died, or timed out).
    pub complete: bool,
}

/// Where finished traces go.
pub trait TraceSink: Send + Sync + std::fmt::Debug {
    fn export(&self, t: FinishedTrace);
}

/// A span still in monotonic time.
#[derive(Debug)]
struct RawSpan {
    name: &'static str,
    start: u64,
    end: u64,
    attrs: Vec<(&'static str, AttrValue)>,
}

#[derive(Debug)]
struct PendingInit {
    trace_id: u128,
    start: u64,
    end: u64,
    path: Option<vigil_region::InitPath>,
}

#[derive(Debug)]
struct OpenTrace {
    trace_id: u128,
    slot: u16,
    attach: Option<PendingInit>,
    spans: Vec<RawSpan>,
    /// Started by a force-post whose lock-wait event has not arrived yet.
    awaiting_wait: bool,
    last: u64,
    /// Spans left out past [`MAX_SPANS_PER_TRACE`].
    dropped_spans: u64,
    /// When the start-up began (monotonic ns).
    began: u64,
}

impl OpenTrace {
    fn push(&mut self, span: RawSpan, at: u64) {
        if self.spans.len() < MAX_SPANS_PER_TRACE {
            self.spans.push(span);
        } else {
            self.dropped_spans = self.dropped_spans.saturating_add(1);
        }
        self.last = at;
    }
}

/// Per-region trace assembly state.
#[derive(Debug)]
pub struct TraceBuilder {
    labels: RegionLabels,
    sink: Arc<dyn TraceSink>,
    pending: VecDeque<PendingInit>,
    open: HashMap<u16, OpenTrace>,
    rng: u64,
}

fn lock_name(v: Option<LockId>) -> &'static str {
    v.map_or("unknown", |l| l.name())
}

impl TraceBuilder {
    pub fn new(labels: &RegionLabels, sink: Arc<dyn TraceSink>) -> TraceBuilder {
        TraceBuilder {
            labels: labels.clone(),
            sink,
            pending: VecDeque::new(),
            open: HashMap::new(),
            rng: realtime_ns() ^ (std::process::id() as u64).rotate_left(32) ^ monotonic_ns(),
        }
    }

    pub fn set_labels(&mut self, labels: &RegionLabels) {
        self.labels = labels.clone();
    }

    /// splitmix64: trace IDs only need to be unique, not unpredictable.
    fn next_id(&mut self) -> u128 {
        let mut half = || {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        ((half() as u128) << 64 | half() as u128).max(1)
    }

    /// The trace ID a start-up on `slot` has (for exemplars), if one is open.
    pub fn trace_id_of(&self, slot: u16) -> Option<u128> {
        self.open.get(&slot).map(|t| t.trace_id)
    }

    pub fn on_event(&mut self, ev: &Event) {
        match ev.payload() {
            Payload::Init { path, duration_ns } => {
                if self.pending.len() >= MAX_PENDING {
                    if let Some(p) = self.pending.pop_front() {
                        self.export_attach_only(p);
                    }
                }
                let trace_id = self.next_id();
                self.pending.push_back(PendingInit {
                    trace_id,
                    start: ev.ts_ns.saturating_sub(duration_ns),
                    end: ev.ts_ns,
                    path,
                });
            }
            Payload::ForcePost {
                lock,
                reason,
                victim_slot,
                held_ns,
                ..
            } => {
                let span = RawSpan {
                    name: "vigil.lock_force_post",
                    start: ev.ts_ns,
                    end: ev.ts_ns,
                    attrs: vec![
                        ("vigil.lock", AttrValue::Str(lock_name(lock).into())),
                        (
                            "vigil.reason",
                            AttrValue::Str(reason.map_or("unknown", |r| r.name()).into()),
                        ),
                        ("vigil.victim_slot", AttrValue::Int(victim_slot as i64)),
                        ("vigil.victim_held_ns", AttrValue::Int(held_ns as i64)),
                    ],
                };
                if lock == Some(LockId::Detect) {
                    let t = self.start(ev.slot, ev.ts_ns);
                    t.awaiting_wait = true;
                    t.push(span, ev.ts_ns);
                } else if let Some(t) = self.open.get_mut(&ev.slot) {
                    t.push(span, ev.ts_ns);
                }
            }
            Payload::LockWait {
                lock,
                wait_ns,
                retries,
            } => {
                let start = ev.ts_ns.saturating_sub(wait_ns);
                let span = RawSpan {
                    name: "vigil.lock_wait",
                    start,
                    end: ev.ts_ns,
                    attrs: vec![
                        ("vigil.lock", AttrValue::Str(lock_name(lock).into())),
                        ("vigil.retries", AttrValue::Int(retries as i64)),
                    ],
                };
                let t = if lock == Some(LockId::Detect) {
                    match self.open.get_mut(&ev.slot) {
                        Some(t) if t.awaiting_wait => {
                            t.awaiting_wait = false;
                            t
                        }
                        _ => self.start(ev.slot, start),
                    }
                } else {
                    match self.open.get_mut(&ev.slot) {
                        Some(t) => t,
                        None => return,
                    }
                };
                t.push(span, ev.ts_ns);
            }
            Payload::Detection {
                outcome,
                latency_ns,
                polls,
                host_pid,
                context_ns,
            } => {
                let det_start = ev.ts_ns.saturating_sub(latency_ns);
                let ctx_end = det_start.saturating_add(context_ns).min(ev.ts_ns);
                let outcome = outcome.map_or("unknown", |o| o.name());
                let mut t = match self.open.remove(&ev.slot) {
                    Some(t) => t,
                    None => {
                        self.start(ev.slot, det_start);
                        match self.open.remove(&ev.slot) {
                            Some(t) => t,
                            None => return,
                        }
                    }
                };
                t.spans.push(RawSpan {
                    name: "vigil.context_creation",
                    start: det_start,
                    end: ctx_end,
                    attrs: vec![],
                });
                t.spans.push(RawSpan {
                    name: "vigil.host_pid_detection",
                    start: ctx_end,
                    end: ev.ts_ns,
                    attrs: vec![
                        ("vigil.detection.outcome", AttrValue::Str(outcome.into())),
                        ("vigil.detection.polls", AttrValue::Int(polls as i64)),
                    ],
                });
                let extra = vec![
                    ("vigil.detection.outcome", AttrValue::Str(outcome.into())),
                    ("vigil.host_pid", AttrValue::Int(host_pid as i64)),
                ];
                self.finish(t, true, extra);
            }
            _ => {}
        }
    }

    /// Opens a start-up trace on `slot` beginning at `at`, flushing any unfinished
    /// one there (its process is gone: the slot has a new owner).
    fn start(&mut self, slot: u16, at: u64) -> &mut OpenTrace {
        if let Some(old) = self.open.remove(&slot) {
            self.finish(old, false, vec![]);
        }
        if self.open.len() >= MAX_OPEN_TRACES {
            let stalest = self
                .open
                .iter()
                .min_by_key(|(_, t)| t.last)
                .map(|(s, _)| *s);
            if let Some(old) = stalest.and_then(|s| self.open.remove(&s)) {
                self.finish(old, false, vec![]);
            }
        }
        // Pair with the oldest attach that ended before this start-up began.
        let attach = match self.pending.front() {
            Some(p) if p.end <= at.saturating_add(1_000_000) => self.pending.pop_front(),
            _ => None,
        };
        let trace_id = match &attach {
            Some(p) => p.trace_id,
            None => self.next_id(),
        };
        self.open.entry(slot).or_insert(OpenTrace {
            trace_id,
            slot,
            attach,
            spans: Vec::with_capacity(4),
            awaiting_wait: false,
            last: at,
            dropped_spans: 0,
            began: at,
        })
    }

    /// Flushes what timed out; `now` is CLOCK_MONOTONIC ns.
    pub fn expire(&mut self, now: u64) {
        while let Some(p) = self.pending.front() {
            if now.saturating_sub(p.end) < PENDING_INIT_TIMEOUT_NS {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                self.export_attach_only(p);
            }
        }
        let stale: Vec<u16> = self
            .open
            .iter()
            .filter(|(_, t)| {
                now.saturating_sub(t.last) >= OPEN_TRACE_TIMEOUT_NS
                    || now.saturating_sub(t.began) >= OPEN_TRACE_MAX_AGE_NS
            })
            .map(|(s, _)| *s)
            .collect();
        for s in stale {
            if let Some(t) = self.open.remove(&s) {
                self.finish(t, false, vec![]);
            }
        }
    }

    /// Flushes everything (shutdown).
    pub fn flush_all(&mut self) {
        let open: Vec<OpenTrace> = self.open.drain().map(|(_, t)| t).collect();
        for t in open {
            self.finish(t, false, vec![]);
        }
        while let Some(p) = self.pending.pop_front() {
            self.export_attach_only(p);
        }
    }

    fn export_attach_only(&self, p: PendingInit) {
        let t = OpenTrace {
            trace_id: p.trace_id,
            slot: vigil_region::NO_SLOT,
            attach: Some(p),
            spans: vec![],
            awaiting_wait: false,
            last: 0,
            dropped_spans: 0,
            began: 0,
        };
        self.finish(t, false, vec![]);
    }

    fn finish(&self, t: OpenTrace, complete: bool, extra: Vec<(&'static str, AttrValue)>) {
        // CLOCK_MONOTONIC -> Unix time, at the current offset between the clocks.
        let offset = realtime_ns() as i128 - monotonic_ns() as i128;
        let unix = |m: u64| (m as i128 + offset).clamp(0, u64::MAX as i128) as u64;
        let mut children: Vec<SpanRec> = Vec::with_capacity(t.spans.len() + 1);
        let mut root_attrs = vec![("vigil.region", AttrValue::Str(self.labels.region.clone()))];
        for (k, v) in [
            ("k8s.namespace.name", &self.labels.namespace),
            ("k8s.pod.name", &self.labels.pod),
            ("k8s.pod.uid", &self.labels.pod_uid),
            ("k8s.container.name", &self.labels.container),
        ] {
            if let Some(v) = v {
                root_attrs.push((k, AttrValue::Str(v.clone())));
            }
        }
        if t.slot != vigil_region::NO_SLOT {
            root_attrs.push(("vigil.slot", AttrValue::Int(t.slot as i64)));
        }
        if let Some(p) = &t.attach {
            let path = p.path.map_or("unknown", |x| x.name());
            root_attrs.push(("vigil.init.path", AttrValue::Str(path.into())));
            children.push(SpanRec {
                name: "vigil.region_attach",
                start_unix_ns: unix(p.start),
                end_unix_ns: unix(p.end),
                attrs: vec![("vigil.init.path", AttrValue::Str(path.into()))],
            });
        }
        for s in t.spans {
            children.push(SpanRec {
                name: s.name,
                start_unix_ns: unix(s.start),
                end_unix_ns: unix(s.end),
                attrs: s.attrs,
            });
        }
        if t.dropped_spans > 0 {
            root_attrs.push((
                "vigil.spans_dropped",
                AttrValue::Int(t.dropped_spans.min(i64::MAX as u64) as i64),
            ));
        }
        root_attrs.extend(extra);
        root_attrs.push(("vigil.complete", AttrValue::Int(complete as i64)));
        let start = children.iter().map(|c| c.start_unix_ns).min().unwrap_or(0);
        let end = children
            .iter()
            .map(|c| c.end_unix_ns)
            .max()
            .unwrap_or(start);
        self.sink.export(FinishedTrace {
            trace_id: t.trace_id,
            root: SpanRec {
                name: "vigil.process_startup",
                start_unix_ns: start,
                end_unix_ns: end,
                attrs: root_attrs,
            },
            children,
            complete,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vigil_region::EventKind;

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<FinishedTrace>>);
    impl TraceSink for Collect {
        fn export(&self, t: FinishedTrace) {
            self.0.lock().unwrap().push(t);
        }
    }

    fn ev(kind: EventKind, ts: u64, slot: u16, arg: u32, a: u64, b: u64) -> Event {
        let mut e = Event::new(kind, slot, arg, a, b, 0);
        e.ts_ns = ts;
        e
    }

    #[test]
    fn startup_becomes_one_trace_with_expected_spans() {
        let sink = Arc::new(Collect::default());
        let mut b = TraceBuilder::new(&RegionLabels::default(), sink.clone());
        let base = monotonic_ns();
        b.on_event(&ev(
            EventKind::Init,
            base + 1_000,
            vigil_region::NO_SLOT,
            1,
            500,
            0,
        ));
        b.on_event(&ev(EventKind::LockWait, base + 5_000, 3, 1, 2_000, 1));
        let mut det = ev(EventKind::Detection, base + 90_000, 3, 1, 60_000, 7);
        det.d = 40_000;
        det.c = 4242;
        b.on_event(&det);
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        let names: Vec<_> = got[0].children.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "vigil.region_attach",
                "vigil.lock_wait",
                "vigil.context_creation",
                "vigil.host_pid_detection"
            ]
        );
        assert!(got[0].complete);
        let ctx = &got[0].children[2];
        assert_eq!(ctx.end_unix_ns - ctx.start_unix_ns, 40_000);
    }

    #[test]
    fn open_traces_and_spans_are_bounded() {
        let sink = Arc::new(Collect::default());
        let mut b = TraceBuilder::new(&RegionLabels::default(), sink.clone());
        // A forged ring: a start-up on every u16 slot, and one with 10,000 waits.
        let detect = LockId::Detect as u32;
        for slot in 0..=u16::MAX {
            b.on_event(&ev(
                EventKind::LockWait,
                10 + slot as u64,
                slot,
                detect,
                5,
                0,
            ));
        }
        assert!(b.open.len() <= MAX_OPEN_TRACES);
        let base = 1_000_000;
        b.on_event(&ev(
            EventKind::LockWait,
            base,
            7,
            LockId::Detect as u32,
            5,
            0,
        ));
        for i in 0..10_000u64 {
            let region = LockId::Region as u32;
            b.on_event(&ev(EventKind::LockWait, base + 1 + i, 7, region, 5, 0));
        }
        assert_eq!(b.open[&7].spans.len(), MAX_SPANS_PER_TRACE);
        b.flush_all();
        let got = sink.0.lock().unwrap();
        assert_eq!(
            got.len(),
            (1 << 16) + 1,
            "every start-up flushed exactly once"
        );
        assert!(got
            .iter()
            .all(|t| t.children.len() <= MAX_SPANS_PER_TRACE + 3));
        let dropped = AttrValue::Int(10_001 - MAX_SPANS_PER_TRACE as i64);
        assert!(
            got.iter().any(|t| t
                .root
                .attrs
                .contains(&("vigil.spans_dropped", dropped.clone()))),
            "dropped spans are counted"
        );
    }

    #[test]
    fn dead_holder_is_flushed_incomplete_when_slot_is_reused() {
        let sink = Arc::new(Collect::default());
        let mut b = TraceBuilder::new(&RegionLabels::default(), sink.clone());
        b.on_event(&ev(EventKind::LockWait, 10, 2, 1, 5, 0));
        b.on_event(&ev(EventKind::LockWait, 20, 2, 1, 5, 0));
        let got = sink.0.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert!(!got[0].complete);
    }
}

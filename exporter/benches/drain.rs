//! Drain throughput: a full ring of start-up-shaped events (init, lock wait,
//! detection, plus markers), drained through the exporter's own `RegionDrain` with
//! trace assembly off (the default) and on (into a sink that drops traces).
//! Writing is excluded from the timing; the drain runs on one core.
//!
//! cargo bench -p vigil-exporter --bench drain

use std::sync::Arc;
use std::time::{Duration, Instant};
use vigil_exporter::drain::RegionDrain;
use vigil_exporter::labels::RegionLabels;
use vigil_exporter::trace::{FinishedTrace, TraceSink};
use vigil_region::layout::RING_CAPACITY;
use vigil_region::{Event, EventKind, InitParams, Region, RegionReader, NO_SLOT};

#[derive(Debug)]
struct Discard;
impl TraceSink for Discard {
    fn export(&self, t: FinishedTrace) {
        std::hint::black_box(t);
    }
}

fn fill(w: &Region, n: usize) {
    for i in 0..n {
        let slot = (i % 32) as u16;
        let ev = match i % 4 {
            0 => Event::new(EventKind::Init, NO_SLOT, 1, 300_000, 0, 0),
            1 => Event::new(EventKind::LockWait, slot, 1, 5_000, 0, 0),
            2 => {
                let mut e = Event::new(EventKind::Detection, slot, 1, 280_000_000, 9, 4242);
                e.d = 200_000_000;
                e
            }
            _ => Event::new(EventKind::Marker, slot, 0, i as u64, 0, 0),
        };
        w.emit(&ev);
    }
}

fn run(w: &Region, reader: &RegionReader, tracing: bool) -> f64 {
    let snap = reader.snapshot();
    let sink: Option<Arc<dyn TraceSink>> = if tracing {
        Some(Arc::new(Discard))
    } else {
        None
    };
    let mut d = RegionDrain::new(reader, &snap, &RegionLabels::default(), sink);
    d.drain(reader); // start from an empty backlog
    let (mut events, mut busy) = (0u64, Duration::ZERO);
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        fill(w, RING_CAPACITY);
        let t = Instant::now();
        events += d.drain(reader);
        busy += t.elapsed();
    }
    assert_eq!(d.lost().overwritten + d.lost().torn + d.lost().abandoned, 0);
    events as f64 / busy.as_secs_f64()
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.cache");
    let (w, _) = Region::open(&path, &InitParams::default()).expect("region");
    let reader = RegionReader::open(&path).expect("reader");
    for (name, tracing) in [("tracing off", false), ("tracing on", true)] {
        let rate = run(&w, &reader, tracing);
        println!("drain ({name}): {:.1} M events/s on one core", rate / 1e6);
    }
}

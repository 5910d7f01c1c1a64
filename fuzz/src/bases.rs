//! Real regions, made in-process with the writer API, as starting points.
//!
//! Each base is the bytes of a region file after some activity. Together they put
//! every event kind in the ring, active slots (live and dead, once the harness holds
//! some tokens), held and force-posted locks, memory accounting on several devices,
//! identity labels, a wrapped ring, a torn event and an abandoned position.
//! Building them takes well under a second; it happens once per fuzzing process.

use crate::reader::{event_off, RING_HEAD};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use vigil_region::layout::*;
use vigil_region::{
    DetectOutcome, Event, EventKind, InitParams, LockId, Region, RegionIdentity, SlotHandle,
};

fn params(limits: &[u64]) -> InitParams {
    InitParams {
        device_limits: limits.to_vec(),
        region_lock_lease: Duration::from_millis(5000),
        detect_lock_lease: Duration::from_millis(30000),
        init_timeout: Duration::from_secs(5),
        ..InitParams::default()
    }
}

fn open(path: &Path, p: &InitParams) -> Region {
    Region::open(path, p)
        .unwrap_or_else(|e| panic!("harness: cannot build base region: {e}"))
        .0
}

fn marker(r: &Region, slot: u16, a: u64, b: u64) {
    r.emit(&Event::new(EventKind::Marker, slot, 0, a, b, 0));
}

/// A process dies holding `lock` (its handle closes, so its token goes): the next
/// taker force-posts (owner dead), repairs the totals and records it all.
fn die_holding(path: &Path, p: &InitParams, lock: LockId, reserve: u64) {
    let victim = open(path, p);
    let h = victim.claim_slot().expect("harness: claim");
    let _ = victim.reserve(h, 0, reserve);
    let g = victim.lock(lock, h).expect("harness: lock");
    std::mem::forget(g);
    drop(victim);
}

fn busy(r: &Region, me: SlotHandle, i: u64) {
    let _ = r.reserve(me, (i % 2) as usize, (i + 1) << 20);
    if let Ok(g) = r.lock(LockId::Detect, me) {
        g.release();
    }
    r.record_detection(
        me,
        DetectOutcome::ALL[(i as usize) % DetectOutcome::ALL.len()],
        (!i.is_multiple_of(3)).then_some(4000 + i as u32),
        1_000 * (i + 1) * 997,
        (i % 40) as u32,
        50_000,
    );
}

fn build(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let read = |p: &PathBuf| std::fs::read(p).expect("harness: read base");

    // 1. Fresh: one device with a 1 GiB limit, nothing else (what `vigil-region create
    //    PATH --device-limit 1073741824` makes).
    let p = dir.join("fresh");
    drop(open(&p, &params(&[1 << 30])));
    out.push(("fresh", read(&p)));

    // 2. Busy: four devices, identity labels, slots held (some by "dead" processes in
    //    the copy), reservations and denials, detections of every outcome, lock waits,
    //    a force-post after a holder died, a released and a reclaimed slot.
    let p = dir.join("busy");
    let mut pr = params(&[1 << 30, 2 << 30, 0, 512 << 20]);
    pr.identity = RegionIdentity {
        namespace: "ml-team".into(),
        pod: "trainer-7f9c".into(),
        container: "cuda".into(),
    };
    let r = open(&p, &pr);
    let slots: Vec<SlotHandle> = (0..8).map(|_| r.claim_slot().expect("claim")).collect();
    for (i, &h) in slots.iter().enumerate() {
        busy(&r, h, i as u64);
        let _ = r.reserve(h, 3, 200 << 20); // the third of these is denied
    }
    r.set_ctx_footprint(300 << 20);
    r.release_slot(slots[1]).expect("release");
    die_holding(&p, &pr, LockId::Region, 64 << 20);
    let _ = r.reserve(slots[0], 0, 1 << 20); // force-posts the region lock
    die_holding(&p, &pr, LockId::Detect, 0);
    if let Ok(g) = r.lock(LockId::Detect, slots[2]) {
        g.release();
    }
    r.reap_dead_slots(slots[0]);
    for i in 0..300 {
        marker(&r, slots[(i % 8) as usize].index, i, i * i);
    }
    drop(r);
    out.push(("busy", read(&p)));

    // 3. Wrapped: sixteen devices, many slots, a lock left held by a live owner, and
    //    more events than the ring holds, so the oldest were overwritten.
    let p = dir.join("wrapped");
    let limits: Vec<u64> = (0..MAX_DEVICES as u64).map(|d| (d + 1) << 30).collect();
    let r = open(&p, &params(&limits));
    let slots: Vec<SlotHandle> = (0..40).map(|_| r.claim_slot().expect("claim")).collect();
    for (i, &h) in slots.iter().enumerate() {
        let _ = r.reserve(h, i % MAX_DEVICES, (i as u64 + 1) << 24);
    }
    for i in 0..(RING_CAPACITY as u64 + 3000) {
        if i % 1000 == 0 {
            busy(&r, slots[(i / 1000) as usize % 40], i / 1000);
        } else {
            marker(&r, (i % 40) as u16, i, u64::MAX - i);
        }
    }
    std::mem::forget(r.lock(LockId::Region, slots[3]).expect("lock"));
    drop(r);
    out.push(("wrapped", read(&p)));

    // 4. Damaged ring: the busy region with its newest event torn (a writer that woke
    //    up late and scribbled), one left busy, and an abandoned reserved position.
    let mut img = out[1].1.clone();
    let head = u64::from_le_bytes(img[RING_HEAD..RING_HEAD + 8].try_into().unwrap());
    let torn = event_off(((head - 1) % RING_CAPACITY as u64) as usize) + 8 + 16;
    img[torn] ^= 0x40;
    let busy_at = event_off(((head - 2) % RING_CAPACITY as u64) as usize);
    img[busy_at] |= 1;
    img[RING_HEAD..RING_HEAD + 8].copy_from_slice(&(head + 2).to_le_bytes());
    out.push(("damaged", img));

    for (_, b) in &out {
        assert_eq!(b.len(), REGION_SIZE, "harness: base region size");
    }
    out
}

/// The base regions, built on first use (in a private folder that is removed again).
pub fn bases() -> &'static [(&'static str, Vec<u8>)] {
    static B: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    B.get_or_init(|| {
        let dir = crate::scratch::private_dir("bases");
        let b = build(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        b
    })
}

/// Writes each base, prefixed with the raw target's length-policy byte (0 = as is),
/// into `dir`: the raw target's generated seeds (too big to check in).
pub fn write_raw_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).expect("harness: seed dir");
    for (name, b) in bases() {
        let mut v = Vec::with_capacity(b.len() + 1);
        v.push(0u8);
        v.extend_from_slice(b);
        std::fs::write(dir.join(format!("base-{name}")), v).expect("harness: write seed");
    }
}

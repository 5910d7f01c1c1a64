//! The oracle for the region targets: what `RegionReader` must do with a given file.
//!
//! It decodes the file itself, field by field from the layout's own offsets, and
//! checks the reader against that independent decoding:
//!
//! * `open` succeeds exactly when the header passes the documented checks, and a
//!   failure carries the documented reason label and names the file;
//! * `snapshot` is a faithful copy of the file, within the layout's bounds (device
//!   count, slot indices, lock owners, identity strings that are clean text or empty);
//! * slot liveness is what the harness set up (it holds some tokens itself);
//! * `device_usage`, `ring_head` and `revalidate` agree with the snapshot;
//! * draining the ring visits every position once and accounts for it (delivered +
//!   overwritten + torn + abandoned = positions passed), delivers exactly the committed
//!   events whose checksum verifies, in order, whatever the chunk size, and never
//!   blocks; a consumer "from now" sees nothing in a file nobody writes.
//!
//! Panics (assertion failures) are what the fuzzer reports.

use crate::check;
use crate::scratch::HELD_SLOT_TOKENS;
use std::mem::{offset_of, size_of};
use std::path::Path;
use vigil_region::layout::*;
use vigil_region::{Counter, Event, EventKind, HistogramId, RegionError, RegionRead, RegionReader};

/// The file's bytes; everything past the end of `bytes` reads as zero (the harness
/// zero-extends files, so this is also what the reader sees there).
#[derive(Clone, Copy)]
pub struct Image<'a> {
    pub bytes: &'a [u8],
    pub len: u64,
}

impl Image<'_> {
    fn get<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut b = [0u8; N];
        if ((off + N) as u64) <= self.len && off + N <= self.bytes.len() {
            b.copy_from_slice(&self.bytes[off..off + N]);
            return b;
        }
        for (i, x) in b.iter_mut().enumerate() {
            if ((off + i) as u64) < self.len {
                *x = self.bytes.get(off + i).copied().unwrap_or(0);
            }
        }
        b
    }
    pub fn u8(&self, off: usize) -> u8 {
        self.get::<1>(off)[0]
    }
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.get(off))
    }
    pub fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.get(off))
    }
}

// Offsets, from the layout's own definitions.
pub const HDR: usize = offset_of!(RegionLayout, header);
pub const H_MAGIC: usize = HDR + offset_of!(Header, magic);
pub const H_VERSION: usize = HDR + offset_of!(Header, version);
pub const H_STATE: usize = HDR + offset_of!(Header, state);
pub const H_SIZE: usize = HDR + offset_of!(Header, region_size);
pub const H_INIT_COUNT: usize = HDR + offset_of!(Header, init_count);
pub const H_NONCE: usize = HDR + offset_of!(Header, init_nonce);
pub const H_CREATED: usize = HDR + offset_of!(Header, created_realtime_ns);
pub const H_DEVICES: usize = HDR + offset_of!(Header, device_count);
pub const H_SLOTS: usize = HDR + offset_of!(Header, slot_count);
pub const H_RING: usize = HDR + offset_of!(Header, ring_capacity);
pub const H_HIGH_WATER: usize = HDR + offset_of!(Header, slot_high_water);
pub const IDENTITY: usize = offset_of!(RegionLayout, identity);
pub const DEVICES: usize = offset_of!(RegionLayout, devices);
pub const COUNTERS: usize = offset_of!(RegionLayout, counters);
pub const HISTOGRAMS: usize = offset_of!(RegionLayout, histograms);
pub const LOCKS: usize = offset_of!(RegionLayout, locks);
pub const RING_HEAD: usize = offset_of!(RegionLayout, ring) + offset_of!(RingHeader, head);
pub const SLOTS: usize = offset_of!(RegionLayout, slots);
pub const EVENTS: usize = offset_of!(RegionLayout, events);

pub fn device_off(d: usize) -> usize {
    DEVICES + d * size_of::<DeviceEntry>()
}
pub fn histogram_off(h: usize) -> usize {
    HISTOGRAMS + h * size_of::<Histogram>()
}
pub fn lock_off(l: usize) -> usize {
    LOCKS + l * size_of::<LockState>()
}
pub fn slot_off(s: usize) -> usize {
    SLOTS + s * size_of::<Slot>()
}
pub fn event_off(e: usize) -> usize {
    EVENTS + e * size_of::<EventSlot>()
}

/// The ring's checksum, as documented in region/src/ring.rs (the format binds each
/// payload to its position). Kept here so the structure-aware target can forge valid
/// events; if the format changes, forged events read as torn and this must follow.
pub fn checksum(pos: u64, w: &[u64; 6]) -> u64 {
    let mut h = pos ^ 0x243F_6A88_85A3_08D3;
    for &x in w {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h
}

/// The outcome `RegionReader::open` must have, as a reason label (`RegionError::reason`).
pub fn predict_open(img: Image) -> Result<(), &'static str> {
    let len = img.len;
    if len < size_of::<Header>() as u64 {
        return Err("truncated");
    }
    if img.u64(H_MAGIC) != MAGIC {
        return Err("bad_magic");
    }
    if img.u32(H_VERSION) != LAYOUT_VERSION {
        return Err("bad_version");
    }
    if len < REGION_SIZE as u64 {
        return Err("truncated");
    }
    match img.u32(H_STATE) {
        STATE_READY => {}
        s if s > STATE_READY => return Err("corrupt"),
        _ => return Err("not_ready"),
    }
    if img.u64(H_SIZE) != REGION_SIZE as u64
        || img.u32(H_DEVICES) as usize > MAX_DEVICES
        || img.u32(H_SLOTS) as usize != MAX_SLOTS
        || img.u32(H_RING) as usize != RING_CAPACITY
        || (0..NUM_LOCKS).any(|l| img.u64(lock_off(l) + offset_of!(LockState, lease_ns)) == 0)
    {
        return Err("corrupt");
    }
    Ok(())
}

fn identity_str(img: Image, off: usize) -> String {
    let bytes: Vec<u8> = (0..IDENTITY_FIELD_LEN)
        .map(|i| img.u8(off + i))
        .take_while(|&b| b != 0)
        .collect();
    match String::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s,
        _ => String::new(),
    }
}

/// What one committed event slot decodes to, if anything.
enum Pos {
    Delivered(Event),
    Torn,
    Overwritten,
    Unpublished,
}

fn model_position(img: Image, pos: u64) -> Pos {
    let off = event_off((pos & (RING_CAPACITY as u64 - 1)) as usize);
    let seq = img.u64(off);
    let committed = (pos.wrapping_add(1)) << 1;
    if seq == committed {
        let mut w = [0u64; 6];
        for (i, x) in w.iter_mut().enumerate() {
            *x = img.u64(off + 8 + 8 * i);
        }
        let sum = img.u64(off + 8 + 8 * 6);
        match EventKind::from_wire(w[1] & 0xffff) {
            Some(kind) if checksum(pos, &w) == sum => Pos::Delivered(Event {
                ts_ns: w[0],
                kind,
                slot: (w[1] >> 16) as u16,
                arg: (w[1] >> 32) as u32,
                a: w[2],
                b: w[3],
                c: w[4],
                d: w[5],
            }),
            _ => Pos::Torn,
        }
    } else if seq >> 1 > pos + 1 {
        Pos::Overwritten
    } else {
        Pos::Unpublished
    }
}

/// Opens `path` (whose contents are `img`) and checks everything above. `chunk`
/// picks the drain chunk sizes for the chunking-invariance check.
pub fn check_file(path: &Path, img: Image, chunk: u8) {
    let expected = predict_open(img);
    let reader = match (RegionReader::open(path), expected) {
        (Ok(r), Ok(())) => r,
        (Err(e), Err(reason)) => {
            check_error(&e, path);
            check!(
                "open-reason",
                e.reason() == reason,
                "open failed with {:?} ({e}), expected reason {reason}",
                e.reason()
            );
            return;
        }
        (Ok(_), Err(reason)) => panic!("[open-accepts] open succeeded, expected {reason}"),
        (Err(e), Ok(())) => {
            check_error(&e, path);
            panic!("[open-rejects] open failed ({e}), expected success")
        }
    };
    check_snapshot(&reader, img);
    check_ring(&reader, img, chunk);
    if let Err(e) = reader.revalidate() {
        panic!("[revalidate] unchanged file no longer validates: {e}");
    }
}

fn check_error(e: &RegionError, path: &Path) {
    let msg = e.to_string();
    check!(
        "error-names-file",
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    const REASONS: [&str; 10] = [
        "io",
        "not_regular",
        "truncated",
        "bad_magic",
        "bad_version",
        "not_ready",
        "corrupt",
        "init_timeout",
        "slots_exhausted",
        "invalid_param",
    ];
    assert!(
        REASONS.contains(&e.reason()),
        "unknown reason {}",
        e.reason()
    );
}

pub fn check_snapshot(r: &RegionReader, img: Image) {
    let s = r.snapshot();
    let dc = img.u32(H_DEVICES) as usize;
    assert!(dc <= MAX_DEVICES);
    // Header and identity.
    assert_eq!(s.init_count, img.u32(H_INIT_COUNT), "init_count");
    assert_eq!(s.init_nonce, img.u64(H_NONCE), "init_nonce");
    assert_eq!(
        s.created_realtime_ns,
        img.u64(H_CREATED),
        "created_realtime_ns"
    );
    for (got, field) in [
        (&s.identity.namespace, 0),
        (&s.identity.pod, 1),
        (&s.identity.container, 2),
    ] {
        let want = identity_str(img, IDENTITY + field * IDENTITY_FIELD_LEN);
        assert_eq!(*got, want, "identity field {field}");
        assert!(got.len() <= IDENTITY_FIELD_LEN);
        assert!(
            !got.chars().any(char::is_control),
            "control char in label {got:?}"
        );
    }
    // Devices.
    assert_eq!(s.devices.len(), dc, "device count");
    for (d, dev) in s.devices.iter().enumerate() {
        let o = device_off(d);
        assert_eq!(
            (dev.limit, dev.used, dev.denials, dev.peak),
            (img.u64(o), img.u64(o + 8), img.u64(o + 16), img.u64(o + 24)),
            "device {d}"
        );
        assert_eq!(
            r.device_usage(d),
            Some((dev.limit, dev.used)),
            "device_usage({d})"
        );
    }
    for d in dc..=MAX_DEVICES + 1 {
        assert_eq!(
            r.device_usage(d),
            None,
            "device_usage({d}) past the device count"
        );
    }
    assert_eq!(r.device_usage(usize::MAX), None);
    // Counters.
    assert_eq!(s.counters.len(), NUM_COUNTERS);
    for (i, &c) in s.counters.iter().enumerate() {
        assert_eq!(c, img.u64(COUNTERS + 8 * i), "counter {i}");
    }
    for c in Counter::ALL {
        assert_eq!(s.counter(c), s.counters[c as usize]);
    }
    // Histograms.
    let ids = [
        HistogramId::LockWaitRegion,
        HistogramId::LockWaitDetect,
        HistogramId::DetectionLatency,
        HistogramId::DetectionPolls,
        HistogramId::InitDuration,
    ];
    assert_eq!(s.histograms.len(), ids.len());
    for id in ids {
        let h = s.histogram(id);
        let o = histogram_off(id as usize);
        assert_eq!(h.unit, id.unit());
        assert_eq!(h.buckets.len(), HIST_BUCKETS);
        for (b, &v) in h.buckets.iter().enumerate() {
            assert_eq!(v, img.u64(o + 8 * b), "histogram {id:?} bucket {b}");
        }
        assert_eq!(h.count, img.u64(o + 8 * HIST_BUCKETS));
        assert_eq!(h.sum, img.u64(o + 8 * HIST_BUCKETS + 8));
    }
    // Slots: exactly the ACTIVE ones below the high-water mark (clamped to the
    // layout), in order, alive iff the harness holds the token.
    let high_water = (img.u32(H_HIGH_WATER) as usize).min(MAX_SLOTS);
    let active: Vec<usize> = (0..high_water)
        .filter(|&i| img.u32(slot_off(i) + offset_of!(Slot, state)) == SLOT_ACTIVE)
        .collect();
    assert_eq!(
        s.slots.iter().map(|x| x.index as usize).collect::<Vec<_>>(),
        active,
        "active slots"
    );
    for si in &s.slots {
        let i = si.index as usize;
        let o = slot_off(i);
        assert_eq!(si.generation, img.u32(o + offset_of!(Slot, generation)));
        assert_eq!(si.pid, img.u32(o + offset_of!(Slot, pid)));
        assert_eq!(si.host_pid, img.u32(o + offset_of!(Slot, host_pid)));
        assert_eq!(
            si.detect_outcome,
            img.u32(o + offset_of!(Slot, detect_outcome))
        );
        assert_eq!(si.mem_used.len(), dc, "slot {i} mem_used length");
        for (d, &m) in si.mem_used.iter().enumerate() {
            assert_eq!(m, img.u64(o + offset_of!(Slot, mem_used) + 8 * d));
        }
        assert_eq!(si.alive, HELD_SLOT_TOKENS.contains(&i), "slot {i} liveness");
    }
    // Locks.
    assert_eq!(s.locks.len(), NUM_LOCKS);
    for (l, li) in s.locks.iter().enumerate() {
        let o = lock_off(l);
        let word = img.u64(o + offset_of!(LockState, word));
        let owner = (word >> 48) as u16;
        assert_eq!(
            li.owner,
            owner.checked_sub(1).filter(|o| (*o as usize) < MAX_SLOTS),
            "lock {l} owner (only real slots)"
        );
        assert_eq!(li.epoch, word as u32);
        assert_eq!(li.waiters, img.u32(o + offset_of!(LockState, waiters)));
        assert_eq!(li.lease_ns, img.u64(o + offset_of!(LockState, lease_ns)));
        if let Some(ow) = li.owner {
            check!(
                "lock-owner-range",
                (ow as usize) < MAX_SLOTS,
                "lock {l} owner slot {ow} is outside the layout's {MAX_SLOTS} slots (word {word:#018x})"
            );
        }
    }
    assert_eq!(s.ring_head, img.u64(RING_HEAD));
    assert_eq!(r.ring_head(), s.ring_head);
}

fn check_ring(r: &RegionReader, img: Image, chunk: u8) {
    let head = img.u64(RING_HEAD);
    let start = head.saturating_sub(RING_CAPACITY as u64);

    // The model: every position in [start, head), in order.
    let mut want = Vec::new();
    let (mut torn, mut over, mut unpub, mut first_unpub) = (0u64, 0u64, 0u64, None);
    for pos in start..head {
        match model_position(img, pos) {
            Pos::Delivered(e) => want.push(e),
            Pos::Torn => torn += 1,
            Pos::Overwritten => over += 1,
            Pos::Unpublished => {
                unpub += 1;
                first_unpub.get_or_insert(pos);
            }
        }
    }

    // A default consumer (100 ms abandon time) never waits: it stops at the first
    // unpublished position and says so.
    let mut c = r.ring_consumer();
    assert_eq!(
        c.position(),
        start,
        "consumer starts at the oldest position"
    );
    let mut got = Vec::new();
    let st = r.drain(&mut c, usize::MAX, |e| got.push(e));
    let stop = first_unpub.unwrap_or(head);
    assert_eq!(
        c.position(),
        stop,
        "default consumer stops at the first unpublished position"
    );
    assert_eq!(st.waiting, first_unpub.is_some(), "waiting flag");
    assert_eq!(st.lost.abandoned, 0);
    assert_eq!(
        st.delivered + st.lost.total(),
        stop - start,
        "accounting (default consumer)"
    );
    let n_before_stop = got.len();
    assert_eq!(
        &got[..],
        &want[..n_before_stop],
        "events before the first unpublished position"
    );

    // A consumer that abandons at once passes everything, in chunks chosen by the
    // input; each unpublished position takes one more call (first seen, then abandoned).
    let mut c = r.ring_consumer().with_abandon_after(0);
    let mut got = Vec::new();
    let mut calls = 0u64;
    let sizes = [1usize, 3, 64, 1000, 5000, usize::MAX];
    let mut k = chunk as usize;
    while c.position() < head {
        calls += 1;
        assert!(
            calls <= 2 * RING_CAPACITY as u64 + 2,
            "drain makes no progress at position {} (head {head})",
            c.position()
        );
        let before = c.position();
        let max = sizes[k % sizes.len()];
        k = k / sizes.len() + 1;
        let st = r.drain(&mut c, max, |e| got.push(e));
        assert!(
            c.position() - before <= max as u64,
            "drain passed more than max"
        );
        assert_eq!(
            st.delivered + st.lost.total(),
            c.position() - before,
            "accounting (one drain call)"
        );
    }
    assert_eq!(c.position(), head);
    assert_eq!(got, want, "delivered events");
    let lost = c.lost();
    assert_eq!(c.delivered(), want.len() as u64);
    assert_eq!(
        (lost.torn, lost.overwritten, lost.abandoned),
        (torn, over, unpub),
        "lost counts (torn, overwritten, abandoned)"
    );
    assert_eq!(
        c.delivered() + lost.total(),
        head - start,
        "accounting (whole ring)"
    );
    // Nothing more to see, and nothing new for a consumer starting now.
    let st = r.drain(&mut c, usize::MAX, |_| panic!("event past the head"));
    assert_eq!(st.delivered + st.lost.total(), 0);
    let mut now = r.ring_consumer_from_now();
    assert_eq!(now.position(), head);
    let st = r.drain(&mut now, usize::MAX, |_| {
        panic!("event for a consumer from now")
    });
    assert_eq!((st.delivered, st.lost.total(), st.waiting), (0, 0, false));
    let st = r.drain(&mut r.ring_consumer(), 0, |_| panic!("event with max = 0"));
    assert_eq!(st.delivered + st.lost.total(), 0);
}

/// A neighbour truncates the file while a reader has it open (the exporter keeps
/// regions mapped between scrapes). The reader must report the file as truncated
/// from then on, and never crash. `shrink` truncates the file to `len`.
pub fn check_shrink_under_reader(path: &Path, img: Image, len: u64, shrink: impl FnOnce(u64)) {
    if predict_open(img).is_err() {
        return;
    }
    let r = RegionReader::open(path).expect("[open-rejects] valid region refused");
    shrink(len);
    match r.revalidate() {
        Err(e) => assert_eq!(e.reason(), "truncated", "revalidate after truncation: {e}"),
        Ok(()) => panic!("[revalidate] a file cut to {len} bytes still validates"),
    }
    // Whatever a caller reads next must not crash it either.
    let _ = r.snapshot();
    let mut c = r.ring_consumer().with_abandon_after(0);
    let _ = r.drain(&mut c, 64, |_| {});
    let _ = r.device_usage(0);
}

/// The file changes while a reader has it open (another process writes the region
/// between two scrapes). `phases` apply changes to the image and the file; after each,
/// `revalidate` must give the outcome `open` would give now, the snapshot must copy the
/// file, and one consumer kept across phases must account for every position it passes
/// and keep monotonic totals (no overflow, whatever the head does).
pub fn check_live(path: &Path, img: Image, mut phases: impl FnMut(usize) -> Option<Vec<u8>>) {
    if predict_open(img).is_err() {
        return;
    }
    let r = RegionReader::open(path).expect("[open-rejects] valid region refused");
    let mut c = r.ring_consumer().with_abandon_after(0);
    let drain = |c: &mut vigil_region::RingConsumer| {
        for _ in 0..3 {
            let (t0, d0, l0) = (c.position(), c.delivered(), c.lost().total());
            let st = r.drain(c, usize::MAX, |_| {});
            if c.position() >= t0 {
                assert_eq!(
                    st.delivered + st.lost.total(),
                    c.position() - t0,
                    "accounting across a changing ring"
                );
            }
            assert!(
                c.delivered() >= d0 && c.lost().total() >= l0,
                "consumer totals went back"
            );
        }
    };
    drain(&mut c);
    let mut phase = 0;
    while let Some(bytes) = phases(phase) {
        phase += 1;
        let now = Image {
            bytes: &bytes,
            len: img.len,
        };
        match (r.revalidate(), predict_open(now)) {
            (Ok(()), Ok(())) => check_snapshot(&r, now),
            (Err(e), Err(reason)) => {
                check!(
                    "open-reason",
                    e.reason() == reason,
                    "revalidate: {e}, expected {reason}"
                );
                let _ = r.snapshot();
            }
            (Ok(()), Err(reason)) => {
                panic!("[revalidate] damaged region still validates ({reason})")
            }
            (Err(e), Ok(())) => panic!("[revalidate] valid region refused: {e}"),
        }
        drain(&mut c);
    }
}

//! The event ring: multi-producer, single-consumer, fixed-size events, overwrite when
//! full.
//!
//! Producers reserve a position with one `fetch_add` on `head`, then claim the slot at
//! `pos % CAPACITY` by CAS-ing its sequence word to "busy for pos", write seven words
//! and publish "committed pos". They never wait: a slot owned by a newer lap drops the
//! older event (the consumer counts it as overwritten), and a slot left busy by an
//! older lap (a writer that died or stalled mid-write) is simply taken over. A stalled
//! writer that wakes up and scribbles over the new event is caught by the checksum,
//! which covers the position, so the consumer counts a torn event instead of
//! delivering garbage.
//!
//! The consumer visits every position exactly once and either delivers it or counts
//! it lost as overwritten, torn or abandoned (a position still unwritten after a grace
//! period: its producer died between reserving and publishing).

use crate::layout::{EventSlot, RegionLayout, RING_CAPACITY};
use crate::sys::monotonic_ns;
use std::sync::atomic::{fence, Ordering::*};

const MASK: u64 = RING_CAPACITY as u64 - 1;
/// `Event::slot` when the event belongs to no process slot.
pub const NO_SLOT: u16 = u16::MAX;

crate::wire_enum! {
    /// What an event records. Its words are decoded by [`Event::payload`]; the raw
    /// layout per kind is noted on each variant.
    pub enum EventKind: u16 {
        /// arg: `InitPath`; a: duration ns.
        Init = 1 => "init",
        /// arg: lock; a: wait ns; b: retries (timed-out wait slices).
        LockWait = 2 => "lock_wait",
        /// arg: lock | reason << 8; a: victim slot; b: victim generation; c: ns the
        /// taker saw the victim hold the lock.
        ForcePost = 3 => "force_post",
        /// arg: lock; no payload (the force-post event that evicted the holder has the details).
        FencedRelease = 4 => "fenced_release",
        /// arg: outcome; a: latency ns (from the start of context creation); b: polls;
        /// c: host pid (0 if none); d: ns the context creation itself took.
        Detection = 5 => "detection",
        /// a: victim slot; b: bytes credited back.
        SlotReclaimed = 6 => "slot_reclaimed",
        /// arg: device; a: requested bytes; b: used bytes; c: limit bytes.
        AllocationDenied = 7 => "allocation_denied",
        /// Free-form, for tools and tests: a..d as given.
        Marker = 8 => "marker",
    }
}

/// An event's meaning. Enum fields are `None` when the word read back is not a valid
/// value (the ring is tenant-writable): consumers say "unknown" instead of guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A process attached to the region (written once per process, at open).
    Init {
        /// How it got the region: initialized it, found it ready, or recovered it.
        path: Option<crate::init::InitPath>,
        /// Time `Region::open` took, ns.
        duration_ns: u64,
    },
    /// A lock acquisition that took the slow path (the lock was held, or the first
    /// CAS lost a race); fast-path acquisitions are only counted.
    LockWait {
        /// The lock waited for.
        lock: Option<crate::lock::LockId>,
        /// Time from the first attempt to holding the lock, ns.
        wait_ns: u64,
        /// Wait slices that timed out (each one re-checked the owner).
        retries: u64,
    },
    /// A lock was taken from its owner (dead, or past its lease).
    ForcePost {
        /// The lock taken over.
        lock: Option<crate::lock::LockId>,
        /// Why the owner lost it.
        reason: Option<crate::lock::ForceReason>,
        /// The evicted owner's slot index.
        victim_slot: u64,
        /// The evicted owner's slot generation (low 16 bits, as in the lock word).
        victim_generation: u64,
        /// How long the taker saw the victim hold the lock.
        held_ns: u64,
    },
    /// A holder released a lock it had already lost to a force-post.
    FencedRelease {
        /// The lock whose release was fenced.
        lock: Option<crate::lock::LockId>,
    },
    /// One host-PID detection finished.
    Detection {
        /// What the detection concluded.
        outcome: Option<crate::slot::DetectOutcome>,
        /// From the start of context creation.
        latency_ns: u64,
        /// NVML process-list polls it made.
        polls: u64,
        /// 0 if none.
        host_pid: u64,
        /// How long the context creation itself took.
        context_ns: u64,
    },
    /// A dead process's slot was reclaimed and its memory credited back.
    SlotReclaimed {
        /// The reclaimed slot's index.
        victim_slot: u64,
        /// Bytes credited back to the devices.
        bytes: u64,
    },
    /// A reservation was refused: it would have passed the device's limit.
    AllocationDenied {
        /// Device index in the region.
        device: u32,
        /// Bytes asked for.
        requested: u64,
        /// The device total seen when refusing, bytes.
        used: u64,
        /// The limit checked against, bytes.
        limit: u64,
    },
    /// Free-form, for tools and tests: the raw words as written.
    Marker {
        /// The raw 32-bit argument.
        arg: u32,
        /// Raw word a.
        a: u64,
        /// Raw word b.
        b: u64,
        /// Raw word c.
        c: u64,
        /// Raw word d.
        d: u64,
    },
}

impl Payload {
    /// The kind of event this payload is written as.
    pub fn kind(&self) -> EventKind {
        match self {
            Payload::Init { .. } => EventKind::Init,
            Payload::LockWait { .. } => EventKind::LockWait,
            Payload::ForcePost { .. } => EventKind::ForcePost,
            Payload::FencedRelease { .. } => EventKind::FencedRelease,
            Payload::Detection { .. } => EventKind::Detection,
            Payload::SlotReclaimed { .. } => EventKind::SlotReclaimed,
            Payload::AllocationDenied { .. } => EventKind::AllocationDenied,
            Payload::Marker { .. } => EventKind::Marker,
        }
    }
}

/// One decoded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC ns at write.
    pub ts_ns: u64,
    /// What the event records; it says how to read `arg` and `a`..`d`.
    pub kind: EventKind,
    /// Writer's slot, or [`NO_SLOT`].
    pub slot: u16,
    /// Kind-specific small argument (see [`EventKind`]); prefer [`Event::payload`].
    pub arg: u32,
    /// First kind-specific word (see [`EventKind`]).
    pub a: u64,
    /// Second kind-specific word.
    pub b: u64,
    /// Third kind-specific word.
    pub c: u64,
    /// Fourth kind-specific word.
    pub d: u64,
}

impl Event {
    /// A raw event with `d` = 0 and the timestamp set when written. Writers of known
    /// kinds use [`Event::from_payload`], which cannot get the encoding wrong.
    pub fn new(kind: EventKind, slot: u16, arg: u32, a: u64, b: u64, c: u64) -> Event {
        Event {
            ts_ns: 0,
            kind,
            slot,
            arg,
            a,
            b,
            c,
            d: 0,
        }
    }

    /// The event that records `p` for `slot` (the timestamp is set when it is written).
    pub fn from_payload(slot: u16, p: Payload) -> Event {
        let code = |v: Option<u8>| v.map_or(u32::from(u8::MAX), u32::from);
        let (arg, a, b, c, d) = match p {
            Payload::Init { path, duration_ns } => {
                (code(path.map(|x| x as u8)), duration_ns, 0, 0, 0)
            }
            Payload::LockWait {
                lock,
                wait_ns,
                retries,
            } => (code(lock.map(|x| x as u8)), wait_ns, retries, 0, 0),
            Payload::ForcePost {
                lock,
                reason,
                victim_slot,
                victim_generation,
                held_ns,
            } => (
                code(lock.map(|x| x as u8)) | code(reason.map(|x| x as u8)) << 8,
                victim_slot,
                victim_generation,
                held_ns,
                0,
            ),
            Payload::FencedRelease { lock } => (code(lock.map(|x| x as u8)), 0, 0, 0, 0),
            Payload::Detection {
                outcome,
                latency_ns,
                polls,
                host_pid,
                context_ns,
            } => (
                code(outcome.map(|x| x as u8)),
                latency_ns,
                polls,
                host_pid,
                context_ns,
            ),
            Payload::SlotReclaimed { victim_slot, bytes } => (0, victim_slot, bytes, 0, 0),
            Payload::AllocationDenied {
                device,
                requested,
                used,
                limit,
            } => (device, requested, used, limit, 0),
            Payload::Marker { arg, a, b, c, d } => (arg, a, b, c, d),
        };
        Event {
            ts_ns: 0,
            kind: p.kind(),
            slot,
            arg,
            a,
            b,
            c,
            d,
        }
    }

    /// What the event says, decoded once here for every consumer.
    pub fn payload(&self) -> Payload {
        let lock = |v: u32| crate::lock::LockId::from_wire(u64::from(v));
        match self.kind {
            EventKind::Init => Payload::Init {
                path: crate::init::InitPath::from_wire(u64::from(self.arg)),
                duration_ns: self.a,
            },
            EventKind::LockWait => Payload::LockWait {
                lock: lock(self.arg),
                wait_ns: self.a,
                retries: self.b,
            },
            EventKind::ForcePost => Payload::ForcePost {
                lock: lock(self.arg & 0xff),
                // Bits past the reason byte are never written: their presence makes
                // the reason unknown rather than silently dropped.
                reason: crate::lock::ForceReason::from_wire(u64::from(self.arg >> 8)),
                victim_slot: self.a,
                victim_generation: self.b,
                held_ns: self.c,
            },
            EventKind::FencedRelease => Payload::FencedRelease {
                lock: lock(self.arg),
            },
            EventKind::Detection => Payload::Detection {
                outcome: crate::slot::DetectOutcome::from_wire(u64::from(self.arg)),
                latency_ns: self.a,
                polls: self.b,
                host_pid: self.c,
                context_ns: self.d,
            },
            EventKind::SlotReclaimed => Payload::SlotReclaimed {
                victim_slot: self.a,
                bytes: self.b,
            },
            EventKind::AllocationDenied => Payload::AllocationDenied {
                device: self.arg,
                requested: self.a,
                used: self.b,
                limit: self.c,
            },
            EventKind::Marker => Payload::Marker {
                arg: self.arg,
                a: self.a,
                b: self.b,
                c: self.c,
                d: self.d,
            },
        }
    }

    fn encode(&self) -> [u64; 6] {
        [
            self.ts_ns,
            self.kind as u64 | (self.slot as u64) << 16 | (self.arg as u64) << 32,
            self.a,
            self.b,
            self.c,
            self.d,
        ]
    }

    fn decode(w: &[u64; 6]) -> Option<Event> {
        Some(Event {
            ts_ns: w[0],
            kind: EventKind::from_wire(w[1] & 0xffff)?,
            slot: (w[1] >> 16) as u16,
            arg: (w[1] >> 32) as u32,
            a: w[2],
            b: w[3],
            c: w[4],
            d: w[5],
        })
    }
}

/// Binds the payload to its position, so stale or mixed words never verify.
fn checksum(pos: u64, w: &[u64; 6]) -> u64 {
    let mut h = pos ^ 0x243F_6A88_85A3_08D3;
    for &x in w {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h
}

/// Writes one event, stamping `ts_ns` if it is 0. Never blocks. Returns false if the
/// event was dropped because a newer lap already owns the slot (the consumer counts
/// that position as overwritten, so nothing goes missing silently).
pub(crate) fn write(layout: &RegionLayout, ev: &Event) -> bool {
    let mut ev = *ev;
    if ev.ts_ns == 0 {
        ev.ts_ns = monotonic_ns();
    }
    let words = ev.encode();
    let pos = layout.ring.head.fetch_add(1, Relaxed);
    write_at(&layout.events[(pos & MASK) as usize], pos, &words)
}

/// The sequence word of committed event `pos`. Wrapping: a forged head near 2^64 must
/// give garbage, never an overflow panic.
fn committed_seq(pos: u64) -> u64 {
    pos.wrapping_add(1).wrapping_shl(1)
}

fn write_at(slot: &EventSlot, pos: u64, words: &[u64; 6]) -> bool {
    let committed = committed_seq(pos);
    let busy = committed | 1;
    let mut cur = slot.seq.load(Relaxed);
    loop {
        if cur >> 1 > pos.wrapping_add(1) {
            return false;
        }
        match slot.seq.compare_exchange_weak(cur, busy, Relaxed, Relaxed) {
            Ok(_) => break,
            Err(now) => cur = now,
        }
    }
    // Seqlock writer: the busy mark must be visible before any payload word.
    fence(Release);
    for (i, (dst, &w)) in slot.words.iter().zip(words.iter()).enumerate() {
        dst.store(w, Relaxed);
        if i == 2 {
            crate::fault::point("ring.mid_write");
        }
    }
    slot.words[6].store(checksum(pos, words), Relaxed);
    slot.seq
        .compare_exchange(busy, committed, Release, Relaxed)
        .is_ok()
}

/// Lost events by reason, cumulative over a consumer's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostCounts {
    /// The ring lapped the consumer, or a newer event took the slot first.
    pub overwritten: u64,
    /// The payload failed its checksum or did not decode.
    pub torn: u64,
    /// A position never got published: its producer died mid-write.
    pub abandoned: u64,
}

impl LostCounts {
    /// Every lost event, whatever the reason (saturating).
    pub fn total(&self) -> u64 {
        self.overwritten
            .saturating_add(self.torn)
            .saturating_add(self.abandoned)
    }
}

/// The single consumer's cursor. It lives in the consumer's own memory, so a
/// read-only mapping is enough.
#[derive(Debug)]
pub struct RingConsumer {
    tail: u64,
    stalled: Option<(u64, u64)>,
    abandon_after_ns: u64,
    delivered: u64,
    lost: LostCounts,
}

/// What one `drain` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Events handed to the callback.
    pub delivered: u64,
    /// Positions passed over without delivery, by reason (this call only).
    pub lost: LostCounts,
    /// True if the drain stopped at an event still being written.
    pub waiting: bool,
}

impl RingConsumer {
    /// Starts at the oldest event still in the ring.
    pub(crate) fn new(layout: &RegionLayout) -> RingConsumer {
        let head = layout.ring.head.load(Acquire);
        RingConsumer {
            tail: head.saturating_sub(RING_CAPACITY as u64),
            stalled: None,
            abandon_after_ns: 100_000_000,
            delivered: 0,
            lost: LostCounts::default(),
        }
    }

    /// Starts at the current head: only events written from now on.
    pub(crate) fn from_now(layout: &RegionLayout) -> RingConsumer {
        let mut c = RingConsumer::new(layout);
        c.tail = layout.ring.head.load(Acquire);
        c
    }

    /// How long a reserved but unpublished position may stay so before it is
    /// counted as abandoned. Default 100 ms.
    pub fn with_abandon_after(mut self, ns: u64) -> RingConsumer {
        self.abandon_after_ns = ns;
        self
    }

    /// The next ring position this consumer will look at.
    pub fn position(&self) -> u64 {
        self.tail
    }
    /// Events lost since this consumer started, by reason.
    pub fn lost(&self) -> LostCounts {
        self.lost
    }
    /// Events delivered since this consumer started.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Delivers up to `max` events to `f`, in position order, and accounts for every
    /// position passed over.
    pub(crate) fn drain(
        &mut self,
        layout: &RegionLayout,
        max: usize,
        mut f: impl FnMut(Event),
    ) -> DrainStats {
        let mut stats = DrainStats::default();
        let head = layout.ring.head.load(Acquire);
        if head < self.tail {
            // The region was re-initialized under us; start over from its oldest event.
            self.tail = head.saturating_sub(RING_CAPACITY as u64);
            self.stalled = None;
        }
        if head - self.tail > RING_CAPACITY as u64 {
            let skipped = head - RING_CAPACITY as u64 - self.tail;
            stats.lost.overwritten += skipped;
            self.tail += skipped;
        }
        let mut n = 0usize;
        while self.tail < head && n < max {
            let pos = self.tail;
            let slot = &layout.events[(pos & MASK) as usize];
            let committed = committed_seq(pos);
            let s1 = slot.seq.load(Acquire);
            if s1 == committed {
                let mut w = [0u64; 6];
                for (dst, src) in w.iter_mut().zip(slot.words.iter()) {
                    *dst = src.load(Relaxed);
                }
                let sum = slot.words[6].load(Relaxed);
                fence(Acquire);
                let s2 = slot.seq.load(Relaxed);
                if s2 != s1 {
                    stats.lost.overwritten = stats.lost.overwritten.saturating_add(1);
                } else {
                    match Event::decode(&w) {
                        Some(ev) if checksum(pos, &w) == sum => {
                            f(ev);
                            stats.delivered += 1;
                        }
                        _ => stats.lost.torn = stats.lost.torn.saturating_add(1),
                    }
                }
            } else if s1 >> 1 > pos.wrapping_add(1) {
                stats.lost.overwritten = stats.lost.overwritten.saturating_add(1);
            } else {
                // Reserved but not yet published (or being written right now).
                let now = monotonic_ns();
                match self.stalled {
                    Some((p, since)) if p == pos => {
                        if now.saturating_sub(since) < self.abandon_after_ns {
                            stats.waiting = true;
                            break;
                        }
                        stats.lost.abandoned = stats.lost.abandoned.saturating_add(1);
                    }
                    _ => {
                        self.stalled = Some((pos, now));
                        stats.waiting = true;
                        break;
                    }
                }
            }
            self.stalled = None;
            self.tail += 1;
            n += 1;
        }
        // Saturating: a forged head can claim any number of positions passed.
        self.delivered = self.delivered.saturating_add(stats.delivered);
        self.lost.overwritten = self.lost.overwritten.saturating_add(stats.lost.overwritten);
        self.lost.torn = self.lost.torn.saturating_add(stats.lost.torn);
        self.lost.abandoned = self.lost.abandoned.saturating_add(stats.lost.abandoned);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let ev = Event {
            ts_ns: 42,
            kind: EventKind::ForcePost,
            slot: 7,
            arg: 0x0101,
            a: 1,
            b: 2,
            c: 3,
            d: u64::MAX,
        };
        assert_eq!(Event::decode(&ev.encode()), Some(ev));
        let mut bad = ev.encode();
        bad[1] = (bad[1] & !0xffff) | 999;
        assert_eq!(Event::decode(&bad), None);
    }

    #[test]
    fn checksum_binds_position_and_every_word() {
        let w = Event::new(EventKind::Marker, 1, 2, 3, 4, 5).encode();
        let base = checksum(10, &w);
        assert_ne!(base, checksum(10 + RING_CAPACITY as u64, &w));
        for i in 0..6 {
            let mut m = w;
            m[i] ^= 1;
            assert_ne!(base, checksum(10, &m), "word {i}");
        }
    }
}

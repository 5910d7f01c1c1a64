//! The shared-memory layout: the one contract between the interposer (writer) and the
//! exporter (reader). Everything is `#[repr(C)]`, every field is an atomic (the region
//! is shared between processes that may die at any instruction), and the size and
//! offsets are pinned below so that a change is a deliberate version bump.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

/// "VIGILRGN", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VIGILRGN");
/// Bump on any change to this file's structs. 3: slots record their owner's PID
/// namespace inode and start time (`Slot::pidns_inode`, `Slot::start_time_ticks`).
pub const LAYOUT_VERSION: u32 = 3;

/// Devices a region can describe; `Header::device_count` is at most this.
pub const MAX_DEVICES: usize = 16;
/// Process slots: at most this many processes use one region at once.
pub const MAX_SLOTS: usize = 1024;
/// Events in the ring; a power of two.
pub const RING_CAPACITY: usize = 16384;
/// Room for counters (`counters::Counter` uses the first ones; the rest is spare).
pub const NUM_COUNTERS: usize = 64;
/// Cross-process locks, indexed by `lock::LockId`.
pub const NUM_LOCKS: usize = 2;
/// Buckets per histogram, the last one +Inf.
pub const HIST_BUCKETS: usize = 30;
/// Room for histograms (`counters::HistogramId` uses the first ones; the rest is spare).
pub const NUM_HISTOGRAMS: usize = 8;

/// `Header::state` of a new (all-zero) file: nobody has started initializing it.
pub const STATE_UNINIT: u32 = 0;
/// `Header::state` while the holder of the init token writes the header.
pub const STATE_INITIALIZING: u32 = 1;
/// `Header::state` once the header is complete: the only state anyone uses.
pub const STATE_READY: u32 = 2;

/// `Header::flags`: some process of this region saw the driver report namespace PIDs.
pub const FLAG_NAMESPACE_PIDS: u32 = 1;
/// `Header::flags`: the region was (re)initialized, or re-attached to after damage,
/// while processes that used the damaged one were still alive (their slot tokens were
/// held). Their memory is not in the totals until they re-attach and re-charge it;
/// until then no reservation is checked against the limit (see `mem`).
pub const FLAG_RECOVERING: u32 = 2;

/// `Slot::state` of a slot nobody owns (never claimed, released, or reclaimed).
pub const SLOT_FREE: u32 = 0;
/// `Slot::state` of a claimed slot; its owner may since have died (see its token).
pub const SLOT_ACTIVE: u32 = 1;

/// The region's first 128 bytes: what it is, whether it is ready, and its shape.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`] once initialization has started; anything else is not a region.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`] of the writer that initialized it.
    pub version: AtomicU32,
    /// `STATE_UNINIT`, `STATE_INITIALIZING` or `STATE_READY`.
    pub state: AtomicU32,
    /// Total size the writer expects; readers check it against the file.
    pub region_size: AtomicU64,
    /// PID (in its own namespace) of the last process that initialized the region.
    pub init_pid: AtomicU32,
    /// How many times the region was initialized: 1, plus one per recovery.
    pub init_count: AtomicU32,
    /// Identity of the initialization (random per init), so readers can tell a
    /// re-created region from the one they knew.
    pub init_nonce: AtomicU64,
    /// Wall-clock time of the last initialization, ns since the Unix epoch.
    pub created_realtime_ns: AtomicU64,
    /// CLOCK_MONOTONIC time of the last initialization, ns.
    pub created_monotonic_ns: AtomicU64,
    /// Devices in `RegionLayout::devices` that are in use (at most [`MAX_DEVICES`]).
    pub device_count: AtomicU32,
    /// [`MAX_SLOTS`], written for readers to check against their own layout.
    pub slot_count: AtomicU32,
    /// [`RING_CAPACITY`], written for readers to check against their own layout.
    pub ring_capacity: AtomicU32,
    /// `FLAG_*` bits.
    pub flags: AtomicU32,
    /// Bytes a primary context took, as last measured through NVML; later processes
    /// charge this before creating theirs, so the limit covers contexts being born.
    pub ctx_footprint: AtomicU64,
    /// One past the highest slot ever claimed since initialization: readers and
    /// reapers scan only `slots[..slot_high_water]` (a few KiB instead of 720 KiB).
    /// Raised before a slot becomes active; readers clamp it to MAX_SLOTS.
    pub slot_high_water: AtomicU32,
    /// Padding; always 0.
    pub _pad: AtomicU32,
    /// Reserved for later versions; always 0.
    pub _reserved: [AtomicU64; 5],
}

/// Bytes of each identity string; longer values are truncated at a UTF-8 boundary.
pub const IDENTITY_FIELD_LEN: usize = 128;

/// Who the region belongs to, from the Kubernetes downward API (`POD_NAMESPACE`,
/// `POD_NAME`, `CONTAINER_NAME`) of the initializing process, so the exporter can
/// label series even where the directory name says nothing. NUL-padded UTF-8.
#[repr(C)]
pub struct Identity {
    /// The pod's namespace (`POD_NAMESPACE`).
    pub namespace: [AtomicU8; IDENTITY_FIELD_LEN],
    /// The pod's name (`POD_NAME`).
    pub pod: [AtomicU8; IDENTITY_FIELD_LEN],
    /// The container's name (`CONTAINER_NAME`).
    pub container: [AtomicU8; IDENTITY_FIELD_LEN],
    /// Reserved for later versions; always 0.
    pub _reserved: [AtomicU8; IDENTITY_FIELD_LEN],
}

/// Per-device memory limit and accounting. `used` is the sum of all slots' `mem_used`.
#[repr(C)]
pub struct DeviceEntry {
    /// Bytes the device's processes may hold together; 0 = no limit.
    pub limit: AtomicU64,
    /// Bytes held by every slot, live or not yet reclaimed.
    pub used: AtomicU64,
    /// Reservations refused on this device.
    pub denials: AtomicU64,
    /// Highest `used` seen since initialization, bytes.
    pub peak: AtomicU64,
}

/// A log2 histogram: bucket `i` counts observations `<= unit << i`; the last bucket is
/// +Inf. Exact, because it is only ever incremented.
#[repr(C)]
pub struct Histogram {
    /// Observations per bucket (not cumulative).
    pub buckets: [AtomicU64; HIST_BUCKETS],
    /// Observations in all.
    pub count: AtomicU64,
    /// Sum of the observed values as observed (ns for durations).
    pub sum: AtomicU64,
}

/// One cross-process lock. See `lock` for the protocol.
#[repr(C, align(64))]
pub struct LockState {
    /// {owner slot + 1 (16 bits) | owner slot generation (16) | epoch (32)}; owner 0 = free.
    pub word: AtomicU64,
    /// Processes currently sleeping on the word's futex.
    pub waiters: AtomicU32,
    /// Padding; always 0.
    pub _pad: AtomicU32,
    /// Lease: a live owner holding longer than this is evicted (fenced).
    pub lease_ns: AtomicU64,
    /// Reserved for later versions; always 0.
    pub _reserved: [AtomicU64; 5],
}

/// One process slot.
#[repr(C, align(64))]
pub struct Slot {
    /// `SLOT_FREE` or `SLOT_ACTIVE`.
    pub state: AtomicU32,
    /// Bumped on every claim, so a lock word naming an old incarnation is stale.
    pub generation: AtomicU32,
    /// PID in the process's own namespace.
    pub pid: AtomicU32,
    /// Host PID, once detected; 0 = unknown.
    pub host_pid: AtomicU32,
    /// Wall-clock time the current owner claimed the slot, ns since the Unix epoch.
    pub claimed_realtime_ns: AtomicU64,
    /// Last host-PID detection outcome (see `slot::DetectOutcome`), 0 = none yet.
    pub detect_outcome: AtomicU32,
    /// Per-slot flags; none is defined yet (never written).
    pub flags: AtomicU32,
    /// Inode of the owner's PID namespace (`stat /proc/self/ns/pid`); 0 = unknown.
    /// With `pid` and `start_time_ticks` it names the owner to any reader that can
    /// see its `/proc` (see `procfs`).
    pub pidns_inode: AtomicU64,
    /// Owner's start time, clock ticks after boot (`/proc/self/stat` field 22); 0 =
    /// unknown. Tells the owner apart from a later process that reuses its PID.
    pub start_time_ticks: AtomicU64,
    /// Reserved for later versions; always 0.
    pub _reserved: [AtomicU64; 2],
    /// Bytes this process holds on each device.
    pub mem_used: [AtomicU64; MAX_DEVICES],
    /// This process's share of the region counters (attribution only; the region
    /// totals are incremented at the source, see `counters`).
    pub counters: [AtomicU64; NUM_COUNTERS],
}

/// One event in the ring: a seqlock word and seven payload words.
#[repr(C, align(64))]
pub struct EventSlot {
    /// 0 = never written; ((pos + 1) << 1) = committed event `pos`; | 1 = being written.
    pub seq: AtomicU64,
    /// The encoded event (six words) and its checksum (the seventh); see `ring`.
    pub words: [AtomicU64; 7],
}

/// The event ring's shared state: only the producers' position.
#[repr(C, align(64))]
pub struct RingHeader {
    /// Next position to hand out; also the total number of events ever started.
    pub head: AtomicU64,
    /// Reserved for later versions; always 0.
    pub _reserved: [AtomicU64; 7],
}

/// Bytes whose open-file-description locks are liveness tokens. Their contents are
/// never read; only the locks on them matter.
#[repr(C)]
pub struct Tokens {
    /// Byte 0 is the init token ([`INIT_TOKEN_OFFSET`]); the rest pads to 64 bytes.
    pub init: [AtomicU8; 64],
    /// Byte `i` is slot `i`'s liveness token ([`slot_token_offset`]).
    pub slots: [AtomicU8; MAX_SLOTS],
}

/// The whole region file, as every handle maps it.
#[repr(C)]
pub struct RegionLayout {
    /// What the file is and whether it is ready.
    pub header: Header,
    /// Whose region it is, for readers' labels.
    pub identity: Identity,
    /// Limit and usage per device; the first `Header::device_count` are in use.
    pub devices: [DeviceEntry; MAX_DEVICES],
    /// Region-wide totals, indexed by `counters::Counter`.
    pub counters: [AtomicU64; NUM_COUNTERS],
    /// Indexed by `counters::HistogramId`.
    pub histograms: [Histogram; NUM_HISTOGRAMS],
    /// Indexed by `lock::LockId`.
    pub locks: [LockState; NUM_LOCKS],
    /// The event ring's head.
    pub ring: RingHeader,
    /// The bytes whose OFD locks are liveness tokens.
    pub tokens: Tokens,
    /// One per process; only `slots[..Header::slot_high_water]` were ever claimed.
    pub slots: [Slot; MAX_SLOTS],
    /// The event ring; position `p` lives at `events[p % RING_CAPACITY]`.
    pub events: [EventSlot; RING_CAPACITY],
}

/// Bytes of a region file (the layout's size); a shorter file is never mapped.
pub const REGION_SIZE: usize = size_of::<RegionLayout>();

/// File offset of the initializer's liveness token.
pub const INIT_TOKEN_OFFSET: u64 = offset_of!(RegionLayout, tokens) as u64;
/// File offset of slot `i`'s liveness token.
pub fn slot_token_offset(i: usize) -> u64 {
    (offset_of!(RegionLayout, tokens) + offset_of!(Tokens, slots) + i) as u64
}

// Pinned layout. If one of these fails you changed the shared format: bump
// LAYOUT_VERSION and update the numbers together.
const _: () = {
    assert!(size_of::<Header>() == 128);
    assert!(offset_of!(Header, magic) == 0);
    assert!(offset_of!(Header, version) == 8);
    assert!(offset_of!(Header, state) == 12);
    assert!(offset_of!(Header, region_size) == 16);
    assert!(offset_of!(Header, init_pid) == 24);
    assert!(offset_of!(Header, init_nonce) == 32);
    assert!(offset_of!(Header, device_count) == 56);
    assert!(offset_of!(Header, slot_count) == 60);
    assert!(offset_of!(Header, ring_capacity) == 64);
    assert!(offset_of!(Header, ctx_footprint) == 72);
    assert!(offset_of!(Header, slot_high_water) == 80);
    assert!(size_of::<DeviceEntry>() == 32);
    assert!(size_of::<Histogram>() == 256);
    assert!(size_of::<LockState>() == 64);
    assert!(size_of::<Slot>() == 704);
    assert!(offset_of!(Slot, generation) == 4);
    assert!(offset_of!(Slot, pid) == 8);
    assert!(offset_of!(Slot, host_pid) == 12);
    assert!(offset_of!(Slot, claimed_realtime_ns) == 16);
    assert!(offset_of!(Slot, detect_outcome) == 24);
    assert!(offset_of!(Slot, pidns_inode) == 32);
    assert!(offset_of!(Slot, start_time_ticks) == 40);
    assert!(offset_of!(Slot, _reserved) == 48);
    assert!(offset_of!(Slot, mem_used) == 64);
    assert!(offset_of!(Slot, counters) == 192);
    assert!(size_of::<EventSlot>() == 64);
    assert!(size_of::<Tokens>() == 64 + MAX_SLOTS);
    assert!(offset_of!(RegionLayout, devices) == 640);
    assert!(offset_of!(RegionLayout, counters) == 1152);
    assert!(offset_of!(RegionLayout, histograms) == 1664);
    assert!(offset_of!(RegionLayout, locks) == 3712);
    assert!(offset_of!(RegionLayout, ring) == 3840);
    assert!(offset_of!(RegionLayout, tokens) == 3904);
    assert!(offset_of!(RegionLayout, slots) == 4992);
    assert!(offset_of!(RegionLayout, events) == 725888);
    assert!(REGION_SIZE == 1774464);
    assert!(size_of::<Identity>() == 4 * IDENTITY_FIELD_LEN);
    assert!(offset_of!(RegionLayout, identity) == 128);
    assert!(RING_CAPACITY.is_power_of_two());
    assert!(MAX_SLOTS < u16::MAX as usize);
    // The futex word is the low half of the lock word.
    assert!(offset_of!(LockState, word) == 0);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_pinned() {
        assert_eq!(REGION_SIZE, 1774464);
        assert_eq!(offset_of!(RegionLayout, events) % 64, 0);
        assert_eq!(offset_of!(RegionLayout, slots) % 64, 0);
        assert_eq!(slot_token_offset(0), INIT_TOKEN_OFFSET + 64);
    }
}

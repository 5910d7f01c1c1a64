//! hami_patch: structure-aware, over HAMi-core's region files. Starts from a file
//! written by HAMi-core's own `libvgpu.so` (tests/fixtures/hami) and changes chosen
//! fields, so mutations land where the reader looks: versions, owner PID, both
//! semaphores, device count, UUIDs, limits, SM limits, `proc_num`, and the slots'
//! PIDs and usage. The reader must never panic or read out of bounds, refuse with a
//! reason what it cannot use, and hand out only values within its documented bounds;
//! the exporter's liveness judgement must account for every slot.
//!
//! Input: [base/length byte] then 11-byte records [selector u8][index u16 LE][value
//! u64 LE]. The first byte's low 2 bits pick the base (live, sem-dead-owner, hostpid0,
//! v1.1 dead-slots); bits 2-3 the length: 0-1 the file's own (sizeof + 1), 2 cut to
//! index-scaled length, 3 longer. Selector: low nibble = field, high nibble = set /
//! xor / interesting constant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;
use std::sync::Mutex;
use vigil_fuzz::scratch::Scratch;
use vigil_fuzz::{check, Bytes};
use vigil_hami::layout::{self, MAX_DEVICES, MAX_PROCS, REGION_SIZE, SLOT_SIZE};

const BASES: [&[u8]; 4] = [
    include_bytes!("../../tests/fixtures/hami/live.cache.gz"),
    include_bytes!("../../tests/fixtures/hami/sem-dead-owner.cache.gz"),
    include_bytes!("../../tests/fixtures/hami/hostpid0.cache.gz"),
    include_bytes!("../../tests/fixtures/hami/v1_1-dead-slots.cache.gz"),
];

struct State {
    scratch: Scratch,
    bases: Vec<Vec<u8>>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    16,
    17,
    1024,
    1025,
    0xffff_ffff,
    i64::MAX as u64,
    u64::MAX,
    1 << 56,
    layout::MAGIC as u64,
];

/// (offset, width) of a field, chosen by the selector's low nibble and the index.
fn field(class: u8, index: u16) -> (usize, usize) {
    let i = index as usize;
    let slot = layout::HEADER_LEN + (i % (MAX_PROCS + 2)) * SLOT_SIZE;
    match class % 12 {
        0 => (4 + 4 * (i % 2), 4),                              // major / minor
        1 => (16, 8),                                           // owner_pid
        2 => (24 + 8 * (i % 4), 8),                             // sem
        3 => (56, 8),                                           // device_num
        4 => (64 + i % (96 * MAX_DEVICES), 1),                  // uuid bytes
        5 => (1600 + 8 * (i % MAX_DEVICES), 8),                 // limit
        6 => (1728 + 8 * (i % MAX_DEVICES), 8),                 // sm_limit
        7 => (layout::TAIL_OFFSET, 4),                          // proc_num
        8 => (layout::TAIL_OFFSET + 24 + 8 * (i % 4), 8),       // sem_postinit
        9 => (slot + 4 * (i % 2), 4),                           // slot pid / hostpid
        10 => (slot + 8 + 64 * (i % MAX_DEVICES) + 32, 8),      // slot used[d].total
        _ => (slot + 1928, 4),                                  // slot status
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let st = guard.get_or_insert_with(|| State {
        scratch: Scratch::new("hami_patch"),
        bases: BASES
            .iter()
            .map(|gz| {
                let mut raw = Vec::new();
                flate2::read::GzDecoder::new(*gz)
                    .read_to_end(&mut raw)
                    .expect("harness: fixture");
                raw
            })
            .collect(),
    });
    let mut b = Bytes::new(data);
    let first = b.u8();
    let mut img = st.bases[(first & 3) as usize].clone();
    let mut len = img.len() as u64;
    let mut records = Vec::new();
    while b.remaining().len() >= 11 {
        records.push((b.u8(), b.u16(), b.u64()));
    }
    for &(sel, index, value) in &records {
        let (off, width) = field(sel & 0x0f, index);
        if off + width > img.len() {
            continue;
        }
        let old = {
            let mut w = [0u8; 8];
            w[..width].copy_from_slice(&img[off..off + width]);
            u64::from_le_bytes(w)
        };
        let v = match sel >> 4 {
            0..=5 => value,
            6..=9 => old ^ value,
            _ => INTERESTING[(value % INTERESTING.len() as u64) as usize],
        };
        img[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
    }
    match (first >> 2) & 3 {
        2 => len = (records.first().map_or(0, |r| r.1 as u64) * 31).min(len),
        3 => len += 4096,
        _ => {}
    }
    st.scratch.write(&img, len);
    let path = &st.scratch.path;
    match vigil_hami::read_region(path) {
        Ok(r) => {
            check!("hami_bounds", len >= REGION_SIZE as u64, "read a {len}-byte file");
            check!("hami_bounds", r.devices <= MAX_DEVICES, "devices {}", r.devices);
            check!("hami_bounds", r.slots.len() <= MAX_PROCS, "slots {}", r.slots.len());
            check!(
                "hami_bounds",
                r.limits.len() == r.devices && r.sm_limits.len() == r.devices && r.uuids.len() == r.devices,
                "per-device vectors disagree with {} devices",
                r.devices
            );
            check!("hami_bounds", r.sm_limits.iter().all(|&p| p <= 100), "sm limit over 100");
            check!(
                "hami_bounds",
                r.slots.iter().all(|s| s.devices.len() == r.devices && s.devices.iter().all(|d| d.total < 1 << 56)),
                "slot usage out of bounds"
            );
            for d in 0..r.devices {
                let _ = r.used(d);
            }
            let e = vigil_exporter::hami::evaluate(
                &r,
                Some(vigil_exporter::hami::View { mapping: &[], unreadable: &[] }),
                &|_| vigil_exporter::hami::Lookup::Unknown,
            );
            check!("hami_eval", e.slots.len() == r.slots.len(), "a slot left unjudged");
            check!("hami_eval", e.dead_bytes.len() == r.devices, "dead bytes per device");
        }
        Err(e) => {
            let reasons = ["open_failed", "not_regular", "bad_magic", "bad_version", "truncated", "corrupt"];
            check!("hami_reason", reasons.contains(&e.reason().name()), "unknown reason {}", e.reason().name());
            let text = e.to_string();
            check!("hami_reason", text.contains(&*path.to_string_lossy()), "error names no file: {text}");
        }
    }
});

//! region_patch: structure-aware. Starts from a real region (see vigil_fuzz::bases)
//! and changes chosen fields, so every mutation lands somewhere the reader looks:
//! header fields, identity bytes, devices, counters, histograms, locks, the ring head,
//! slots, event slots, and forged events that pass the checksum.
//!
//! Input: [base/length byte][drain-chunk byte] then 11-byte records
//! [selector u8][index u16 LE][value u64 LE]. The first byte's low two bits pick the
//! base; bits 2-4 the file's length: 0-4 the layout size, 5 cut to chunk * 6911 bytes
//! while a reader has it open, 6 cut short before opening, 7 longer than the layout.
//! A record of class 13 starts a new phase: the records after it change the file
//! while one reader and one ring consumer stay open (a writer between two scrapes). Selector low nibble = field class,
//! high nibble = operation (set / add a small signed value / xor / set an interesting
//! constant) and sub-field. See `apply` below.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::mem::size_of;
use std::sync::Mutex;
use vigil_fuzz::bases::bases;
use vigil_fuzz::reader::*;
use vigil_fuzz::scratch::Scratch;
use vigil_fuzz::Bytes;
use vigil_region::layout::*;

struct State {
    scratch: Scratch,
    base: Option<usize>,
    img: Vec<u8>,
    /// Byte ranges changed since the image last equalled the base.
    dirty: Vec<(usize, usize)>,
    /// The file still has the layout's length.
    full: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

const INTERESTING: [u64; 20] = [
    0,
    1,
    2,
    3,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
    MAGIC,
    REGION_SIZE as u64,
    MAX_SLOTS as u64,
    MAX_DEVICES as u64 + 1,
    RING_CAPACITY as u64,
    RING_CAPACITY as u64 + 1,
];

// Header fields: (offset, width).
const HEADER: [(usize, usize); 17] = [
    (H_MAGIC, 8),
    (H_VERSION, 4),
    (H_STATE, 4),
    (H_SIZE, 8),
    (HDR + 24, 4), // init_pid
    (H_INIT_COUNT, 4),
    (H_NONCE, 8),
    (H_CREATED, 8),
    (HDR + 48, 8), // created_monotonic_ns
    (H_DEVICES, 4),
    (H_SLOTS, 4),
    (H_RING, 4),
    (HDR + 68, 4), // flags
    (HDR + 72, 8), // ctx_footprint
    (H_HIGH_WATER, 4),
    (HDR + 84, 4), // padding
    (HDR + 88, 8), // reserved
];

fn read(img: &[u8], off: usize, w: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..w].copy_from_slice(&img[off..off + w]);
    u64::from_le_bytes(b)
}

fn write(st: &mut State, off: usize, w: usize, v: u64) {
    st.img[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
    st.dirty.push((off, w));
}

/// Applies one operation to the `w`-byte field at `off`.
fn op(st: &mut State, off: usize, w: usize, sub: u8, val: u64) {
    let cur = read(&st.img, off, w);
    let v = match sub & 3 {
        0 => val,
        1 => cur.wrapping_add(val as i8 as i64 as u64),
        2 => cur ^ val,
        _ => INTERESTING[(val % INTERESTING.len() as u64) as usize],
    };
    write(st, off, w, v);
}

fn apply(st: &mut State, sel: u8, idx: u16, val: u64) {
    let (class, sub) = (sel & 15, sel >> 4);
    let i = idx as usize;
    match class {
        0 => {
            let (off, w) = HEADER[i % HEADER.len()];
            op(st, off, w, sub, val);
        }
        1 => {
            // Identity bytes: eight at a time, anywhere in the four fields.
            let off = IDENTITY + i % (4 * IDENTITY_FIELD_LEN - 7);
            op(st, off, 8, sub, val);
        }
        2 => op(
            st,
            device_off(i % MAX_DEVICES) + 8 * ((i / MAX_DEVICES) % 4),
            8,
            sub,
            val,
        ),
        3 => op(st, COUNTERS + 8 * (i % NUM_COUNTERS), 8, sub, val),
        4 => {
            let h = histogram_off(i % NUM_HISTOGRAMS);
            op(
                st,
                h + 8 * ((i / NUM_HISTOGRAMS) % (HIST_BUCKETS + 2)),
                8,
                sub,
                val,
            );
        }
        5 => {
            let l = lock_off(i % NUM_LOCKS);
            let (o, w) = [(0, 8), (8, 4), (16, 8)][(i / NUM_LOCKS) % 3];
            op(st, l + o, w, sub, val);
        }
        6 => op(st, RING_HEAD, 8, sub, val),
        7 => {
            // A slot field: state, generation, pid, host_pid, claimed, detect_outcome,
            // flags, mem_used[16], then counters.
            let s = slot_off(i % MAX_SLOTS);
            let f = (i / MAX_SLOTS) % 64;
            let (o, w) = match f {
                0 => (0, 4),
                1 => (4, 4),
                2 => (8, 4),
                3 => (12, 4),
                4 => (16, 8),
                5 => (24, 4),
                6 => (28, 4),
                7..=22 => (64 + 8 * (f - 7), 8),
                _ => (192 + 8 * (f - 23), 8),
            };
            op(st, s + o, w, sub, val);
        }
        8 => {
            // Slot state, cheaply: free, active, or anything else.
            // With sub & 4, also raise the high-water mark over it, as a claim would.
            let v = [
                SLOT_FREE as u64,
                SLOT_ACTIVE as u64,
                val,
                SLOT_ACTIVE as u64,
            ][(sub & 3) as usize];
            write(st, slot_off(i % MAX_SLOTS), 4, v);
            if sub & 4 != 0 {
                let hw = read(&st.img, H_HIGH_WATER, 4).max((i % MAX_SLOTS) as u64 + 1);
                write(st, H_HIGH_WATER, 4, hw);
            }
        }
        9 => {
            // An event slot's sequence word or payload word.
            let e = event_off(i % RING_CAPACITY);
            op(st, e + 8 * (sub as usize % 8), 8, sub >> 3, val);
        }
        10 => {
            // Forge a committed event with a valid checksum at a position near the head
            // (or anywhere, by sub): the delivered path with arbitrary payloads.
            let head = read(&st.img, RING_HEAD, 8);
            let pos = match sub & 3 {
                0 | 1 => head.wrapping_sub(1 + (i % RING_CAPACITY) as u64),
                2 => i as u64,
                _ => val.rotate_left(17),
            };
            let kind = val % 10; // 0 and 9 are not event kinds
            let w: [u64; 6] = [
                val,
                kind | (val >> 40) << 16,
                val.rotate_left(7),
                val ^ 0x5555,
                !val,
                i as u64,
            ];
            let e = event_off((pos & (RING_CAPACITY as u64 - 1)) as usize);
            let seq = if sub & 4 == 0 {
                pos.wrapping_add(1) << 1
            } else {
                (pos.wrapping_add(1) << 1) | 1
            };
            write(st, e, 8, seq);
            for (k, &x) in w.iter().enumerate() {
                write(st, e + 8 + 8 * k, 8, x);
            }
            let sum = if sub & 8 == 0 {
                checksum(pos, &w)
            } else {
                checksum(pos, &w) ^ 1
            };
            write(st, e + 56, 8, sum);
        }
        11 => {
            // Anywhere in the file.
            let off = (i * 29 + ((val >> 48) as usize) * 65536) % (REGION_SIZE - 8);
            op(st, off, 8, sub, val);
        }
        12 => {
            // Copy a whole slot or event slot over another (plausible structure, wrong place).
            let (a, b, n) = if sub & 1 == 0 {
                (
                    slot_off(i % MAX_SLOTS),
                    slot_off((val as usize) % MAX_SLOTS),
                    size_of::<Slot>(),
                )
            } else {
                (
                    event_off(i % RING_CAPACITY),
                    event_off((val as usize) % RING_CAPACITY),
                    size_of::<EventSlot>(),
                )
            };
            let chunk = st.img[a..a + n].to_vec();
            st.img[b..b + n].copy_from_slice(&chunk);
            st.dirty.push((b, n));
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // As the exporter does: a file cut under a reader must read as truncated, not kill.
    vigil_region::install_sigbus_guard();
    let mut b = Bytes::new(data);
    let first = b.u8();
    let chunk = b.u8();
    let all = bases();
    let base = (first & 3) as usize % all.len();
    let policy = (first >> 2) & 7;

    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let st = guard.get_or_insert_with(|| State {
        scratch: Scratch::new("region_patch"),
        base: None,
        img: Vec::new(),
        dirty: Vec::new(),
        full: false,
    });
    let src = &all[base].1;
    if st.base != Some(base) || !st.full {
        st.img.clear();
        st.img.extend_from_slice(src);
        st.scratch.write(&st.img, REGION_SIZE as u64);
        st.base = Some(base);
        st.full = true;
    } else {
        for (off, n) in std::mem::take(&mut st.dirty) {
            st.img[off..off + n].copy_from_slice(&src[off..off + n]);
            st.scratch.write_at(&st.img[off..off + n], off as u64);
        }
    }
    st.dirty.clear();

    // Records up to the first "next phase" record (class 13) make the file; later
    // phases change it while a reader has it open (see check_live).
    let mut phases: Vec<Vec<(u8, u16, u64)>> = vec![Vec::new()];
    while !b.is_empty() && phases.iter().map(Vec::len).sum::<usize>() < 256 {
        let (sel, idx, val) = (b.u8(), b.u16(), b.u64());
        if sel & 15 == 13 {
            phases.push(Vec::new());
        } else {
            phases.last_mut().unwrap().push((sel, idx, val));
        }
    }
    for &(sel, idx, val) in &phases[0] {
        apply(st, sel, idx, val);
    }
    for &(off, len) in &st.dirty {
        st.scratch.write_at(&st.img[off..off + len], off as u64);
    }

    if policy == 5 {
        // Cut the file while a reader holds it open (see check_shrink_under_reader).
        let cut = (chunk as u64) * 6_911;
        st.full = false;
        let (path, scratch) = (st.scratch.path.clone(), &st.scratch);
        let img = Image {
            bytes: &st.img,
            len: REGION_SIZE as u64,
        };
        check_shrink_under_reader(&path, img, cut, |n| scratch.set_len(n));
        return;
    }
    let len = match policy {
        6 => REGION_SIZE as u64 - 1 - (chunk as u64) * 6_911,
        7 => REGION_SIZE as u64 + (chunk as u64) * 17,
        _ => REGION_SIZE as u64,
    };
    if len != REGION_SIZE as u64 {
        st.scratch.set_len(len);
        st.full = false;
    }
    let path = st.scratch.path.clone();
    check_file(
        &path,
        Image {
            bytes: &st.img,
            len,
        },
        chunk,
    );

    if phases.len() > 1 && len == REGION_SIZE as u64 {
        let start = st.img.clone();
        check_live(&path, Image { bytes: &start, len }, |p| {
            let ph = phases.get(p + 1)?;
            let from = st.dirty.len();
            for &(sel, idx, val) in ph {
                apply(st, sel, idx, val);
            }
            for &(off, n) in &st.dirty[from..] {
                st.scratch.write_at(&st.img[off..off + n], off as u64);
            }
            Some(st.img.clone())
        });
    }
});

//! A region file truncated while a reader has it mapped: with the SIGBUS guard the
//! reader sees zeros and says so, and the process lives.

mod common;
use common::*;
use vigil_region::*;

#[test]
fn a_truncated_region_poisons_the_reader_instead_of_killing_it() {
    install_sigbus_guard();
    let (dir, path) = scratch("r.cache");
    let (w, _) = Region::open(&path, &InitParams::default()).unwrap();
    let me = w.claim_slot().unwrap();
    let reader = RegionReader::open(&path).unwrap();
    assert_eq!(reader.snapshot().slots.len(), 1);
    assert!(!reader.is_poisoned());
    // Another process of the container truncates the file (here: us).
    truncate_to_zero(&path);
    // Every page now faults; the guard maps zeros over them one by one.
    let snap = reader.snapshot();
    let mut c = reader.ring_consumer();
    reader.drain(&mut c, usize::MAX, |_| {});
    assert!(reader.is_poisoned(), "the fault must be reported");
    assert!(snap.slots.is_empty(), "zeros read as no slots, not garbage");
    let err = reader.revalidate().unwrap_err();
    assert!(
        matches!(err, RegionError::Truncated { .. }),
        "revalidate must refuse a poisoned mapping: {err}"
    );
    let _ = me;
    // A fresh reader of a healthy region is not affected by the old one's poison.
    let path2 = dir.path().join("r2.cache");
    let (_w2, _) = Region::open(&path2, &InitParams::default()).unwrap();
    let r2 = RegionReader::open(&path2).unwrap();
    assert!(!r2.is_poisoned());
    r2.snapshot();
    assert!(!r2.is_poisoned());
}

#[test]
fn readers_refuse_symlinks_and_fifos() {
    let (dir, path) = scratch("r.cache");
    let _ = Region::open(&path, &InitParams::default()).unwrap();
    let link = dir.path().join("link.cache");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = RegionReader::open(&link)
        .err()
        .expect("a symlink must be refused");
    assert!(err.to_string().contains("link.cache"), "{err}");
    let fifo = dir.path().join("fifo.cache");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = RegionReader::open(&fifo)
        .err()
        .expect("a FIFO must be refused, without blocking");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn a_forged_ring_head_never_panics_the_consumer() {
    use std::os::unix::fs::FileExt;
    let (_dir, path) = scratch("r.cache");
    let (w, _) = Region::open(&path, &InitParams::default()).unwrap();
    for i in 0..10 {
        w.emit(&Event::new(EventKind::Marker, 0, 0, i, 0, 0));
    }
    let reader = RegionReader::open(&path).unwrap();
    let mut c = reader.ring_consumer();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let head_at = std::mem::offset_of!(vigil_region::layout::RegionLayout, ring) as u64;
    // A hostile writer flips the head between absurd values while we drain.
    for v in [u64::MAX, 3, u64::MAX - 1, 0, 1 << 63, u64::MAX] {
        f.write_all_at(&v.to_le_bytes(), head_at).unwrap();
        reader.drain(&mut c, 100_000, |_| {});
        let _ = c.lost().total();
    }
    // And a writer whose head is forged keeps working (it never panics either).
    f.write_all_at(&(u64::MAX - 2).to_le_bytes(), head_at)
        .unwrap();
    for _ in 0..5 {
        w.emit(&Event::new(EventKind::Marker, 0, 0, 1, 0, 0));
    }
}

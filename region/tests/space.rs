//! A region file on a full filesystem: creating or attaching it is an error naming the
//! file and ENOSPC, never a region whose pages fault with SIGBUS later; and a region
//! created while there was room keeps working once the filesystem is full.
//!
//! These tests mount a small tmpfs (root only); where mounting fails they print why
//! and check nothing.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use vigil_region::layout::*;
use vigil_region::*;

const MIB: u64 = 1 << 20;

fn limited(limit: u64) -> InitParams {
    InitParams {
        device_limits: vec![limit],
        ..InitParams::default()
    }
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn creating_a_region_on_a_full_filesystem_is_a_clear_error_and_leaves_no_sparse_file() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    fs.fill();
    let path = fs.path.join("r.cache");
    let err = Region::open(&path, &InitParams::default())
        .err()
        .expect("no room for the region: an error, not a region that faults later");
    assert!(matches!(err, RegionError::NoSpace { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("ENOSPC"),
        "{msg}"
    );
    assert_eq!(err.reason(), "no_space");
    // The file was never grown sparse: a later process must not map holes either.
    assert_eq!(len(&path), 0);
    let again = Region::open(&path, &InitParams::default()).err().unwrap();
    assert!(matches!(again, RegionError::NoSpace { .. }), "{again:?}");
}

#[test]
fn attaching_to_a_sparse_region_on_a_full_filesystem_is_refused_not_a_later_sigbus() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    // A region whose pages are holes, as one created before this fix (or copied
    // sparse) is: made elsewhere, copied in with its zeros as holes.
    let (_dir, src) = scratch("r.cache");
    drop(Region::open(&src, &InitParams::default()).unwrap());
    let path = fs.path.join("r.cache");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    fs.fill();
    let err = Region::open(&path, &InitParams::default())
        .err()
        .expect("attaching must reserve the holes, and fail while it cannot");
    assert!(matches!(err, RegionError::NoSpace { .. }), "{err:?}");
    // With room again, the same file attaches (and is whole from then on).
    std::fs::remove_file(fs.path.join("fill")).unwrap();
    let (r, rep) = Region::open(&path, &InitParams::default()).unwrap();
    assert_eq!(rep.path, InitPath::FastPath);
    r.claim_slot().unwrap();
}

#[test]
fn a_region_created_with_room_keeps_working_once_the_filesystem_is_full() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let path = fs.path.join("r.cache");
    let (r, _) = Region::open(&path, &limited(1 << 30)).unwrap();
    fs.fill();
    // Touch every page the region has: many slots, a full lap of the ring, the
    // accounting. Before the fix the file was sparse and the first touch of a page
    // that had never been written killed the process with SIGBUS.
    let mut slots = Vec::new();
    for _ in 0..MAX_SLOTS {
        slots.push(r.claim_slot().unwrap());
    }
    for i in 0..RING_CAPACITY as u64 {
        r.emit(&Event::new(EventKind::Marker, 0, 0, i, 0, 0));
    }
    assert_eq!(r.reserve(slots[0], 0, MIB).unwrap(), Reservation::Granted);
    // And another process attaches on the full filesystem: its blocks are all there.
    let (r2, _) = Region::open(&path, &limited(1 << 30)).unwrap();
    assert!(r2.snapshot().slots.len() >= MAX_SLOTS - 1);
}

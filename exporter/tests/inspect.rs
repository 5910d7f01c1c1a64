//! `vigil-exporter inspect PATH [--json]` prints what the region holds.

mod common;
use common::*;
use std::process::Command;
use vigil_region::{Counter, DetectOutcome, InitParams, LockId, Region, RegionReader};

#[test]
fn inspect_json_and_text_agree_with_the_region() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.cache");
    let params = InitParams {
        device_limits: vec![4 << 30],
        ..InitParams::default()
    };
    let (w, _) = Region::open(&path, &params).unwrap();
    let me = w.claim_slot().unwrap();
    let g = w.lock(LockId::Detect, me).unwrap();
    w.record_detection(me, DetectOutcome::Found, Some(31337), 1_000_000, 2, 500_000);
    let snap = RegionReader::open(&path).unwrap().snapshot();

    let v = inspect_json(&path, None);
    assert_eq!(v["devices"][0]["limit_bytes"], 4u64 << 30);
    assert_eq!(v["slots"][0]["host_pid"], 31337);
    assert_eq!(v["slots"][0]["alive"], true);
    assert_eq!(v["locks"][1]["lock"], "detect");
    assert_eq!(v["locks"][1]["owner_slot"], me.index);
    assert_eq!(v["ring"]["head"], snap.ring_head);
    assert_eq!(
        v["counters"]["DetectFound"],
        snap.counter(Counter::DetectFound)
    );
    drop(g);

    let out = Command::new(BIN)
        .args(["inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("host_pid=31337"), "{text}");
    assert!(text.contains("lock detect: free"), "{text}");

    // Garbage: a clear error naming the file, non-zero exit, no panic.
    let junk = dir.path().join("junk.cache");
    std::fs::write(&junk, vec![0xabu8; 8192]).unwrap();
    let out = Command::new(BIN)
        .args(["inspect", junk.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.cache") && err.contains("magic"), "{err}");
}

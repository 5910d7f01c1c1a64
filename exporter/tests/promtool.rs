//! `promtool check metrics` reports no problems on /metrics. Skips (with a message)
//! only when promtool is not installed; scripts/exporter-e2e.sh installs it.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use vigil_region::{DetectOutcome, InitParams, LockId, Region, RegionIdentity};

#[test]
fn promtool_finds_no_problems() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool not installed (apt-get install prometheus)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("uid-9_main");
    std::fs::create_dir(&sub).unwrap();
    let params = InitParams {
        device_limits: vec![1 << 30, 0],
        identity: RegionIdentity {
            namespace: "ns".into(),
            pod: "p\"q".into(), // a quote, to exercise escaping
            container: String::new(),
        },
        ..InitParams::default()
    };
    let (w, _) = Region::open(sub.join("r.cache"), &params).unwrap();
    let me = w.claim_slot().unwrap();
    drop(w.lock(LockId::Detect, me).unwrap());
    w.record_detection(me, DetectOutcome::Found, Some(77), 5_000_000, 3, 1_000_000);
    std::fs::write(dir.path().join("junk.cache"), vec![7u8; 4096]).unwrap();
    // The identity block supplies namespace/pod/container only when trusted.
    let ex = Exporter::watching(dir.path(), &["--labels.from-region-identity"]);
    let body = ex.get("/metrics").body;
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {report}");
    assert!(report.trim().is_empty(), "promtool reported: {report}");
}

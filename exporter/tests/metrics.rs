//! /metrics against regions driven by real processes: every series present from the
//! start, values equal to what the region itself says, formats, deletion.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vigil_region::{
    Counter, DetectOutcome, ForceReason, HistogramId, InitParams, LockId, Region, RegionIdentity,
    RegionReader, SlotHandle, Snapshot,
};

fn params(limits: Vec<u64>, ns: &str, pod: &str) -> InitParams {
    InitParams {
        device_limits: limits,
        identity: RegionIdentity {
            namespace: ns.into(),
            pod: pod.into(),
            container: String::new(),
        },
        ..InitParams::default()
    }
}

/// Child-process mode: when VIGIL_TEST_HOLDER names a region, claim a slot, take the
/// region lock, say "ready" and wait to be killed. Run by `spawn_holder`.
#[test]
#[ignore = "helper run as a child process by the other tests"]
fn holder_child() {
    let Some((r, me)) = child_region("VIGIL_TEST_HOLDER") else {
        return;
    };
    let _g = r.lock(LockId::Region, me).unwrap();
    println!("ready");
    wait_to_be_killed();
}

/// Child-process mode: when VIGIL_TEST_CHARGER names a region, claim a slot, charge
/// 576 MiB on device 0 and 8 MiB on device 1, say "ready" and wait to be killed (it
/// never releases: a SIGKILLed workload).
#[test]
#[ignore = "helper run as a child process by the other tests"]
fn charger_child() {
    let Some((r, me)) = child_region("VIGIL_TEST_CHARGER") else {
        return;
    };
    r.reserve(me, 0, 576 << 20).unwrap();
    r.reserve(me, 1, 8 << 20).unwrap();
    println!("ready");
    wait_to_be_killed();
}

/// `dir/r.cache` (a 4 GiB limit on device 0) with two live slots: this process, holding
/// 64 MiB on device 0, and a `charger_child` (576 MiB on device 0, 8 MiB on device 1),
/// ready to be killed.
fn region_with_charger(dir: &Path) -> (PathBuf, Region, SlotHandle, std::process::Child) {
    let path = dir.join("r.cache");
    let (w, _) = Region::open(&path, &params(vec![4 << 30, 0], "", "")).unwrap();
    let me = w.claim_slot().unwrap();
    w.reserve(me, 0, 64 << 20).unwrap();
    let child = spawn_child("charger_child", "VIGIL_TEST_CHARGER", &path);
    (path, w, me, child)
}

#[test]
fn memory_of_a_killed_process_shows_as_dead_without_writing_the_region() {
    let dir = tempfile::tempdir().unwrap();
    let (path, w, me, mut child) = region_with_charger(dir.path());
    let ex = Exporter::start(&["--region", path.to_str().unwrap()]);
    let p = path.to_str().unwrap();
    let dl = |d: &'static str| [("region", p), ("device", d)];
    let m = ex.scrape();
    assert_eq!(m.value("vigil_processes", &[("region", p)]), 2.0);
    assert_eq!(
        m.value("vigil_device_memory_used_bytes", &dl("0")),
        (640u64 << 20) as f64
    );
    assert_eq!(m.value("vigil_device_memory_dead_bytes", &dl("0")), 0.0);
    assert_eq!(m.value("vigil_device_memory_dead_bytes", &dl("1")), 0.0);

    // SIGKILL: nothing releases the slot; the region still says 640 MiB used.
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read(&path).unwrap();
    wait_until(
        "the killed process seen dead",
        Duration::from_secs(10),
        || ex.scrape().value("vigil_processes", &[("region", p)]) == 1.0,
    );
    let m = ex.scrape();
    // (series, device, MiB): the dead process's 576 + 8 MiB is now dead memory.
    for (name, device, mib) in [
        ("vigil_device_memory_used_bytes", "0", 640u64),
        ("vigil_device_memory_dead_bytes", "0", 576),
        ("vigil_device_memory_used_bytes", "1", 8),
        ("vigil_device_memory_dead_bytes", "1", 8),
    ] {
        assert_eq!(
            m.value(name, &dl(device)),
            (mib << 20) as f64,
            "{name} of device {device}"
        );
    }
    assert_matches(&m, p, &truth(&path));

    // inspect says the same, live and dead apart.
    let v = inspect_json(&path, None);
    assert_eq!(v["devices"][0]["used_bytes"], 640u64 << 20);
    assert_eq!(v["devices"][0]["live_bytes"], 64u64 << 20);
    assert_eq!(v["devices"][0]["dead_bytes"], 576u64 << 20);
    assert_eq!(v["devices"][1]["live_bytes"], 0);
    assert_eq!(v["devices"][1]["dead_bytes"], 8u64 << 20);
    let out = Command::new(BIN).args(["inspect", p]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "used={} (live={} dead={})",
            640u64 << 20,
            64u64 << 20,
            576u64 << 20
        )),
        "{text}"
    );
    // Neither the exporter nor inspect wrote a byte of the region.
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the region changed"
    );

    // A later process of the region reclaims the slot: the dead memory is gone.
    assert_eq!(w.reap_dead_slots(me), 1);
    wait_until("the dead slot reclaimed", Duration::from_secs(10), || {
        let m = ex.scrape();
        m.value("vigil_device_memory_dead_bytes", &dl("0")) == 0.0
            && m.value("vigil_device_memory_used_bytes", &dl("0")) == (64u64 << 20) as f64
    });
}

/// Scrapes take slot liveness from the background pass's probe only while it is at
/// most a second old: with `--drain.interval 60m` there is no pass after the first, and
/// a death is seen by the very next scrape, as when every scrape probed every slot.
#[test]
fn a_background_probe_older_than_a_second_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _w, _me, mut child) = region_with_charger(dir.path());
    let p = path.to_str().unwrap();
    // The only background pass runs at start, and probes both slots alive.
    let ex = Exporter::start_raw(&["--region", p, "--drain.interval", "60m"]);
    assert_eq!(ex.scrape().value("vigil_processes", &[("region", p)]), 2.0);
    std::thread::sleep(vigil_exporter::liveness::MAX_AGE + Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let m = ex.scrape();
    assert_eq!(
        m.value("vigil_processes", &[("region", p)]),
        1.0,
        "the first scrape after the kill, with only a stale probe to go by"
    );
    assert_eq!(
        m.value(
            "vigil_device_memory_dead_bytes",
            &[("region", p), ("device", "0")]
        ),
        (576u64 << 20) as f64
    );
}

fn spawn_holder(path: &Path) -> std::process::Child {
    spawn_child("holder_child", "VIGIL_TEST_HOLDER", path)
}

fn truth(path: &Path) -> Snapshot {
    RegionReader::open(path).unwrap().snapshot()
}

/// Checks every contract series of `region` against the region's own snapshot.
fn assert_matches(m: &Exposition, region: &str, s: &Snapshot) {
    let r = [("region", region)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = r.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let c = |n| s.counter(n) as f64;
    // Initializations are 1 + recoveries: only the recoveries are exported.
    assert_eq!(
        c(Counter::RegionInitializations),
        1.0 + c(Counter::RegionRecoveries)
    );
    assert!(m.find("vigil_region_initializations_total", &r).is_empty());
    assert_eq!(
        m.value("vigil_region_recoveries_total", &r),
        c(Counter::RegionRecoveries)
    );
    assert_eq!(
        m.value(
            "vigil_process_inits_total",
            &with(&[("path", "initializer")])
        ),
        c(Counter::ProcessInitsInitializer)
    );
    assert_eq!(
        m.value("vigil_process_inits_total", &with(&[("path", "fast_path")])),
        c(Counter::ProcessInitsFastPath)
    );
    assert_eq!(
        m.value("vigil_processes", &r),
        s.slots.iter().filter(|x| x.alive).count() as f64
    );
    assert_eq!(
        m.value(
            "vigil_process_slots_reclaimed_total",
            &with(&[("reason", "released")])
        ),
        c(Counter::SlotsReleased)
    );
    assert_eq!(
        m.value(
            "vigil_process_slots_reclaimed_total",
            &with(&[("reason", "dead")])
        ),
        c(Counter::SlotsReclaimedDead)
    );
    for l in LockId::ALL {
        let lw = with(&[("lock", l.name())]);
        assert_eq!(
            m.value("vigil_lock_acquisitions_total", &lw),
            c(Counter::lock_acquisitions(l))
        );
        assert_eq!(
            m.value("vigil_lock_retries_total", &lw),
            c(Counter::lock_retries(l))
        );
        assert_eq!(
            m.value("vigil_lock_fenced_releases_total", &lw),
            c(Counter::fenced_releases(l))
        );
        for fr in ForceReason::ALL {
            assert_eq!(
                m.value(
                    "vigil_lock_force_posts_total",
                    &with(&[("lock", l.name()), ("reason", fr.name())])
                ),
                c(Counter::force_posts(l, fr))
            );
        }
        assert_histogram(
            m,
            "vigil_lock_wait_seconds",
            &lw,
            s.histogram(HistogramId::lock_wait(l)),
            1e9,
        );
    }
    for o in DetectOutcome::ALL {
        assert_eq!(
            m.value(
                "vigil_host_pid_detections_total",
                &with(&[("outcome", o.name())])
            ),
            c(Counter::detections(o))
        );
    }
    assert_histogram(
        m,
        "vigil_host_pid_detection_seconds",
        &r,
        s.histogram(HistogramId::DetectionLatency),
        1e9,
    );
    // Polls are a counter of their total (the histogram's sum), not a histogram.
    assert_eq!(
        m.value("vigil_host_pid_detection_polls_total", &r),
        s.histogram(HistogramId::DetectionPolls).sum as f64
    );
    assert!(m
        .find("vigil_host_pid_detection_polls_bucket", &r)
        .is_empty());
    assert_histogram(
        m,
        "vigil_init_duration_seconds",
        &r,
        s.histogram(HistogramId::InitDuration),
        1e9,
    );
    for (i, d) in s.devices.iter().enumerate() {
        let dev = i.to_string();
        let dl = [("region", region), ("device", dev.as_str())];
        assert_eq!(
            m.value("vigil_device_memory_limit_bytes", &dl),
            d.limit as f64
        );
        assert_eq!(
            m.value("vigil_device_memory_used_bytes", &dl),
            d.used as f64
        );
        assert_eq!(
            m.value("vigil_device_memory_peak_bytes", &dl),
            d.peak as f64
        );
        let dead: u64 = s
            .slots
            .iter()
            .filter(|x| !x.alive)
            .map(|x| x.mem_used[i])
            .sum();
        assert_eq!(m.value("vigil_device_memory_dead_bytes", &dl), dead as f64);
        assert_eq!(
            m.value("vigil_device_memory_allocation_denials_total", &dl),
            d.denials as f64
        );
    }
    assert_eq!(m.value("vigil_ring_events_total", &r), s.ring_head as f64);
    for reason in ["overwritten", "torn", "abandoned"] {
        assert_eq!(
            m.find("vigil_ring_events_lost_total", &with(&[("reason", reason)]))
                .len(),
            1
        );
    }
}

fn assert_histogram(
    m: &Exposition,
    name: &str,
    labels: &[(&str, &str)],
    h: &vigil_region::HistogramSnapshot,
    divisor: f64,
) {
    if h.count == 0 {
        assert!(
            m.find(&format!("{name}_count"), labels).is_empty(),
            "{name}"
        );
        assert!(
            m.find(&format!("{name}_bucket"), labels).is_empty(),
            "{name}"
        );
        return;
    }
    assert_eq!(
        m.value(&format!("{name}_count"), labels),
        h.count as f64,
        "{name} count"
    );
    let sum = m.value(&format!("{name}_sum"), labels);
    assert!(
        (sum - h.sum as f64 / divisor).abs() <= 1e-9 * sum.abs().max(1.0),
        "{name} sum {sum} vs {}",
        h.sum
    );
    // The exporter shows a range of the region's log2 boundaries (values below the
    // first fold into it, above the last into +Inf): every exported cumulative count
    // must equal the region's count of observations at or below that boundary.
    let buckets = m.find(&format!("{name}_bucket"), labels);
    if h.count == 0 {
        // A histogram with no observation is not exported at all.
        assert!(buckets.is_empty(), "{name}: empty histogram exported");
        assert!(m.find(&format!("{name}_count"), labels).is_empty());
        return;
    }
    // Fixed boundaries (docs/metrics.md): 5 or 6 and +Inf.
    assert!(
        (6..=7).contains(&buckets.len()),
        "{name}: {} buckets",
        buckets.len()
    );
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf", "{name}");
    let total: u64 = h.buckets.iter().sum();
    let mut last_le = 0.0f64;
    for b in &buckets {
        let le = &b.labels["le"];
        let want = if le == "+Inf" {
            total
        } else {
            let got: f64 = le.parse().unwrap();
            assert!(got > last_le, "{name}: le {le} out of order");
            last_le = got;
            let i = (0..h.buckets.len() - 1)
                .find(|&i| ((h.unit << i) as f64 / divisor - got).abs() <= got * 1e-12)
                .unwrap_or_else(|| panic!("{name}: le {le} is not a region boundary"));
            h.buckets[..=i].iter().sum()
        };
        assert_eq!(b.value, want as f64, "{name} bucket le={le}");
    }
}

#[test]
fn series_are_exact_and_present_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("8d1f-4c2a_trainer");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("vigil.cache");
    let (w, _) = Region::open(&path, &params(vec![1 << 30, 0], "ml", "trainer-0")).unwrap();
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    let label = "8d1f-4c2a_trainer/vigil.cache";

    // Fresh region: every known series is there, equal to the (mostly zero) region.
    let m = ex.scrape();
    assert_matches(&m, label, &truth(&path));
    // Labels come from the HAMi directory only: the identity block ("ml",
    // "trainer-0") is tenant-written and ignored without --labels.from-region-identity.
    let s = m.find("vigil_processes", &[]);
    assert_eq!(s.len(), 1);
    let want: BTreeMap<String, String> = [
        ("region", "vigil.cache"),
        ("pod_uid", "8d1f-4c2a"),
        ("container", "trainer"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        s[0].labels, want,
        "pod_uid and container from the HAMi directory, region the file name, no pod \
         name or namespace from the tenant-written identity block"
    );
    assert_eq!(m.value("vigil_exporter_regions", &[]), 1.0);
    assert!(m.samples.iter().all(|s| !s.labels.contains_key("pid")));

    // Drive it: slots, locks, detections, memory, a second attach, a live holder in
    // another process that then dies.
    let me = w.claim_slot().unwrap();
    let other = w.claim_slot().unwrap();
    for _ in 0..5 {
        drop(w.lock(LockId::Region, me).unwrap());
    }
    record_found_4242(&w, me);
    w.record_detection(other, DetectOutcome::Timeout, None, 900_000_000, 40, 0);
    let _ = w.reserve(me, 0, 512 << 20);
    let _ = w.reserve(me, 0, 1 << 30); // over the limit: denied
    let (_w2, _) = Region::open(&path, &InitParams::default()).unwrap();
    let mut holder = spawn_holder(&path);
    wait_until("holder counted", Duration::from_secs(10), || {
        ex.scrape().value("vigil_processes", &[("region", label)]) == 3.0
    });
    holder.kill().unwrap();
    holder.wait().unwrap();
    w.release_slot(other).unwrap();
    // Liveness comes from the background pass's probe (every 250 ms): the death is
    // seen within a few tenths of a second.
    wait_until("holder seen dead", Duration::from_secs(10), || {
        ex.scrape().value("vigil_processes", &[("region", label)]) == 1.0
    });

    let t = truth(&path);
    let m = ex.scrape();
    assert_matches(&m, label, &t);
    // Sanity: the drive really moved the numbers the comparison covers.
    assert_eq!(m.value("vigil_processes", &[("region", label)]), 1.0);
    assert_eq!(
        m.value(
            "vigil_host_pid_detections_total",
            &[("region", label), ("outcome", "found")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "vigil_process_inits_total",
            &[("region", label), ("path", "fast_path")]
        ),
        t.counter(Counter::ProcessInitsFastPath) as f64
    );
    assert!(t.counter(Counter::ProcessInitsFastPath) >= 2);
    assert!(t.devices[0].used > 0);
}

#[test]
fn formats_health_landing_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.cache");
    let (_w, _) = Region::open(&path, &params(vec![0], "", "")).unwrap();
    let solo = dir.path().join("solo.region");
    let (_s, _) = Region::open(&solo, &params(vec![], "", "")).unwrap();
    let ex = Exporter::watching(
        dir.path(),
        &[
            "--region",
            solo.to_str().unwrap(),
            "--web.telemetry-path",
            "/custom",
        ],
    );

    let text = http_get(ex.addr, "/custom", None);
    assert_eq!(text.status, 200);
    assert!(text.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    assert!(!text.body.contains("# EOF"));
    let om = http_get(
        ex.addr,
        "/custom",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(om.headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(om.body.trim_end().ends_with("# EOF"));
    assert!(om.body.contains("# TYPE vigil_process_inits counter"));
    assert!(om.body.contains("vigil_process_inits_total{"));

    let h = ex.get("/healthz");
    assert_eq!((h.status, h.body.trim()), (200, "ok"));
    let landing = ex.get("/");
    assert_eq!(landing.status, 200);
    assert!(landing.body.contains("href=\"/custom\""));
    assert_eq!(ex.get("/nope").status, 404);

    // Both regions are there (the explicit one labelled by its path); a region with
    // no devices has no device series.
    let m = Exposition::parse(&text.body);
    let solo_label = solo.to_str().unwrap();
    assert_eq!(
        m.value("vigil_region_recoveries_total", &[("region", solo_label)]),
        0.0
    );
    assert!(!m.has("vigil_device_memory_limit_bytes", &[("region", solo_label)]));
    assert_eq!(
        m.value(
            "vigil_device_memory_limit_bytes",
            &[("region", "a.cache"), ("device", "0")]
        ),
        0.0
    );

    // Deleting a mapped region drops its series and counts it.
    std::fs::remove_file(&path).unwrap();
    wait_until("deleted region dropped", Duration::from_secs(10), || {
        let r = http_get(ex.addr, "/custom", None);
        let m = Exposition::parse(&r.body);
        !m.has("vigil_ring_events_total", &[("region", "a.cache")])
            && m.region_errors("vanished") == 1.0
    });
    assert!(ex.log_text().contains("a.cache"), "{}", ex.log_text());
}

#[test]
fn graceful_shutdown_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    let pid = ex.child.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success());
    let code = ex.child.wait().unwrap();
    assert!(code.success(), "exit status {code:?}");
}

#[test]
fn bad_flags_are_named() {
    let out = Command::new(BIN)
        .args(["--regions-dir", "/nonexistent/vigil-dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--regions-dir /nonexistent/vigil-dir"),
        "{err}"
    );
    let out = Command::new(BIN).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--region"));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--web.listen-address",
        "--web.telemetry-path",
        "--log.level",
        "--otlp-endpoint",
        "--regions-dir",
        "--region",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

/// Issue 15's budget: at most 60 series for a one-device region, with everything an
/// alert or a dashboard panel reads. The worst case of the default detection mode is
/// counted here: a detection, an attach, and contended region-lock waits (a histogram
/// with no observation is left out). Serial mode's `detect` lock adds one more
/// histogram, and each unenforced HAMi-core setting in use a gauge (docs/metrics.md).
#[test]
fn a_one_device_region_exports_at_most_60_series() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("0d6c-44_main");
    std::fs::create_dir(&sub).unwrap();
    let (w, _) = Region::open(sub.join("vigil.cache"), &params(vec![8 << 30], "", "")).unwrap();
    let me = w.claim_slot().unwrap();
    w.record_detection(
        me,
        DetectOutcome::Found,
        Some(4242),
        250_000_000,
        12,
        200_000_000,
    );
    w.observe(HistogramId::lock_wait(LockId::Region), 3_000_000);
    w.reserve(me, 0, 1 << 30).unwrap();
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    let m = ex.scrape();
    let per_region: Vec<_> = m
        .samples
        .iter()
        .filter(|s| s.labels.get("pod_uid").map(String::as_str) == Some("0d6c-44"))
        .collect();
    let n = per_region.len();
    eprintln!("a one-device region: {n} series");
    assert!(n <= 60, "{n} series for a one-device region (budget 60)");
    // What the alerts and panels read is all there.
    for family in [
        "vigil_processes",
        "vigil_region_recoveries_total",
        "vigil_lock_force_posts_total",
        "vigil_lock_fenced_releases_total",
        "vigil_lock_wait_seconds_bucket",
        "vigil_host_pid_detections_total",
        "vigil_host_pid_detection_seconds_bucket",
        "vigil_host_pid_detection_polls_total",
        "vigil_host_pid_checks_total",
        "vigil_init_duration_seconds_bucket",
        "vigil_device_memory_used_bytes",
        "vigil_device_memory_dead_bytes",
        "vigil_device_memory_allocation_denials_total",
        "vigil_ring_events_lost_total",
    ] {
        assert!(
            per_region.iter().any(|s| s.name == family),
            "{family} missing"
        );
    }
}

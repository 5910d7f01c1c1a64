//! The attacks of docs/security.md against the exporter (F1–F5, F14), each made
//! for real (files, FIFOs, symlinks, processes, HTTP), and shown to be harmless.

mod common;
use common::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vigil_region::layout::REGION_SIZE;
use vigil_region::{HistogramId, InitParams, Region, RegionIdentity};

/// Offsets pinned in region/src/layout.rs.
const HISTOGRAMS_OFFSET: u64 = 1664;
const HISTOGRAM_SIZE: u64 = 256;
const HISTOGRAM_COUNT: u64 = 240;
const RING_HEAD_OFFSET: u64 = 3840;

fn errors(m: &Exposition, reason: &str) -> f64 {
    m.region_errors(reason)
}

/// The region labelled `region` is watched: its ring's series are exported.
fn watched(m: &Exposition, region: &str) -> bool {
    m.has("vigil_ring_events_total", &[("region", region)])
}

fn regions(m: &Exposition) -> f64 {
    m.value("vigil_exporter_regions", &[])
}

/// A scrape that must answer 200 within `limit`.
fn prompt_scrape(ex: &Exporter, limit: Duration) -> Exposition {
    let t = Instant::now();
    let m = ex.scrape();
    assert!(t.elapsed() < limit, "scrape took {:?}", t.elapsed());
    m
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {p:?}");
}

/// A valid region file, no process attached (the writer is dropped).
/// Creates a region at `p` (and its directory); the handle keeps it open.
fn region_at(p: &Path) -> Region {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    Region::open(p, &InitParams::default()).unwrap().0
}

/// A regions directory with one healthy region, `uidG_main/r.cache`, kept open.
fn with_good_region() -> (tempfile::TempDir, Region) {
    let dir = tempfile::tempdir().unwrap();
    let w = region_at(&dir.path().join("uidG_main/r.cache"));
    (dir, w)
}

fn labels_of<'a>(
    m: &'a Exposition,
    region: &str,
) -> &'a std::collections::BTreeMap<String, String> {
    let s = m.find("vigil_region_recoveries_total", &[("region", region)]);
    assert_eq!(s.len(), 1, "region {region}");
    &s[0].labels
}

#[test]
fn f2_symlinks_fifos_and_directories_are_never_followed_or_opened() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("uidA_main");
    region_at(&a.join("good.cache"));
    region_at(&d.join("uidB_main/victim.cache"));
    // A root-only-looking file outside the regions directory.
    let secret = outside.path().join("shadow");
    let mut bytes = b"root:$6$secret-hash:19000:0:99999:7:::\n".to_vec();
    bytes.resize(4096, b'x');
    std::fs::write(&secret, &bytes).unwrap();
    std::os::unix::fs::symlink(&secret, a.join("z.cache")).unwrap();
    // Cross-tenant alias: tenant A links tenant B's region into its own directory.
    std::os::unix::fs::symlink("../uidB_main/victim.cache", a.join("alias.cache")).unwrap();
    mkfifo(&a.join("f.cache"));
    std::fs::create_dir(a.join("d.cache")).unwrap();
    // A symlinked directory at depth 0, full of regions.
    region_at(&outside.path().join("regions/x.cache"));
    std::os::unix::fs::symlink(outside.path().join("regions"), d.join("uidC_main")).unwrap();

    let ex = Exporter::start(&["--regions-dir", d.to_str().unwrap()]);
    let m = prompt_scrape(&ex, Duration::from_secs(5));
    assert_eq!(regions(&m), 2.0, "only the two real regions");
    labels_of(&m, "uidA_main/good.cache");
    labels_of(&m, "uidB_main/victim.cache");
    for bad in [
        "uidA_main/alias.cache",
        "uidC_main/x.cache",
        "uidA_main/z.cache",
    ] {
        assert!(!watched(&m, bad));
    }
    // z, alias, f, d.cache and the linked directory.
    assert_eq!(errors(&m, "not_regular"), 5.0);
    assert_eq!(
        errors(&m, "bad_magic"),
        0.0,
        "the symlinked file was never read"
    );
    let log = ex.log_text();
    assert!(!log.contains("root:"), "{log}");
    assert!(!log.contains("0x2436243a746f6f72"), "{log}");
    assert!(log.contains("f.cache") && log.contains("a FIFO"), "{log}");

    // Rescans do not count them again.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        errors(&prompt_scrape(&ex, Duration::from_secs(5)), "not_regular"),
        5.0
    );

    // The wedge: a watched region replaced by a FIFO. Scrapes keep answering
    // promptly, the region is dropped, and discovery (the background thread) goes on.
    let tmp = a.join(".f");
    mkfifo(&tmp);
    std::fs::rename(&tmp, a.join("good.cache")).unwrap();
    for _ in 0..10 {
        prompt_scrape(&ex, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(30));
    }
    region_at(&d.join("uidD_main/new.cache"));
    wait_until(
        "FIFO dropped, new region found",
        Duration::from_secs(10),
        || {
            let m = prompt_scrape(&ex, Duration::from_secs(5));
            errors(&m, "not_regular") == 6.0
                && !watched(&m, "uidA_main/good.cache")
                && watched(&m, "uidD_main/new.cache")
        },
    );
    assert_eq!(ex.get("/healthz").status, 200);
}

#[test]
fn f3_tenant_identity_cannot_choose_tenancy_labels() {
    let dir = tempfile::tempdir().unwrap();
    let forged = InitParams {
        identity: RegionIdentity {
            namespace: "kube-system".into(),
            pod: "victim-0\"} 1\\".into(),
            container: "x".into(),
        },
        ..InitParams::default()
    };
    let path = dir.path().join("uid2_main/r.cache");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let (_w, _) = Region::open(&path, &forged).unwrap();
    let d = dir.path().to_str().unwrap();

    // Node-wide default: only the HAMi directory name counts.
    let ex = Exporter::start(&["--regions-dir", d]);
    let m = ex.scrape();
    let l = labels_of(&m, "uid2_main/r.cache");
    assert_eq!(l.get("namespace"), None);
    assert_eq!(l.get("pod"), None, "a UID is not a pod name");
    assert_eq!(l.get("pod_uid").map(String::as_str), Some("uid2"));
    assert_eq!(l.get("container").map(String::as_str), Some("main"));
    assert!(m
        .samples
        .iter()
        .all(|s| !s.labels.contains_key("namespace")));
    drop(ex);

    // Sidecar: the exporter's own downward-API values win, even over a trusted header.
    let ex = Exporter::start(&[
        "--regions-dir",
        d,
        "--labels.namespace",
        "ml",
        "--labels.pod",
        "trainer-0",
        "--labels.from-region-identity",
    ]);
    let m = ex.scrape();
    let l = labels_of(&m, "uid2_main/r.cache");
    assert_eq!(l.get("namespace").map(String::as_str), Some("ml"));
    assert_eq!(l.get("pod").map(String::as_str), Some("trainer-0"));
    assert_eq!(l.get("pod_uid").map(String::as_str), Some("uid2"));
    assert_eq!(
        l.get("container").map(String::as_str),
        Some("x"),
        "trusted header"
    );
    drop(ex);

    // Opt-in only: --labels.from-region-identity exports what the tenant wrote.
    let ex = Exporter::start(&["--regions-dir", d, "--labels.from-region-identity"]);
    let l = labels_of(&ex.scrape(), "uid2_main/r.cache").clone();
    assert_eq!(l.get("namespace").map(String::as_str), Some("kube-system"));
}

#[test]
fn f4_regions_per_directory_and_in_all_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let template = d.join(".template");
    region_at(&template.join("t.cache"));
    let a = d.join("uidA_main");
    std::fs::create_dir(&a).unwrap();
    for i in 0..40 {
        std::fs::copy(template.join("t.cache"), a.join(format!("r{i:02}.cache"))).unwrap();
    }
    region_at(&d.join("uidB_main/vigil.cache"));

    let ex = Exporter::start(&["--regions-dir", d.to_str().unwrap()]);
    let m = prompt_scrape(&ex, Duration::from_secs(5));
    assert_eq!(regions(&m), 5.0, "4 of tenant A's 40, and tenant B's");
    labels_of(&m, "uidB_main/vigil.cache");
    assert_eq!(errors(&m, "limit_exceeded"), 36.0);
    let log = ex.log_text();
    assert_eq!(log.matches("r39.cache: not watched").count(), 1, "{log}");
    assert!(log.contains("uidA_main"));
    // Counted once per file, not per rescan.
    std::thread::sleep(Duration::from_millis(500));
    let m = prompt_scrape(&ex, Duration::from_secs(5));
    assert_eq!(errors(&m, "limit_exceeded"), 36.0);
    assert_eq!(regions(&m), 5.0);
    drop(ex);

    // The overall cap goes round the directories: B keeps its region.
    let ex = Exporter::start(&["--regions-dir", d.to_str().unwrap(), "--regions.max", "3"]);
    let m = ex.scrape();
    assert_eq!(regions(&m), 3.0);
    labels_of(&m, "uidB_main/vigil.cache");
    assert_eq!(errors(&m, "limit_exceeded"), 38.0);
}

/// Writes `v` at `off` in the file, as a hostile writer would.
fn poke(path: &Path, off: u64, v: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), off).unwrap();
}

fn histogram_word(id: HistogramId, word: u64) -> u64 {
    HISTOGRAMS_OFFSET + id as u64 * HISTOGRAM_SIZE + word
}

#[test]
fn f5_forged_histograms_and_ring_head_break_nothing() {
    let (dir, w) = with_good_region();
    let d = dir.path();
    let me = w.claim_slot().unwrap();
    record_found_4242(&w, me);

    let bad = d.join("uidX_main/r.cache");
    region_at(&bad);
    // Two buckets at u64::MAX: their sum overflows (prometheus-client's cumulative
    // sum panicked, and the whole scrape answered 500).
    poke(
        &bad,
        histogram_word(HistogramId::DetectionLatency, 0),
        u64::MAX,
    );
    poke(
        &bad,
        histogram_word(HistogramId::DetectionLatency, 8),
        u64::MAX,
    );
    poke(
        &bad,
        histogram_word(HistogramId::DetectionLatency, HISTOGRAM_COUNT),
        2,
    );
    // A count far from its (empty) buckets.
    poke(
        &bad,
        histogram_word(HistogramId::LockWaitRegion, HISTOGRAM_COUNT),
        1 << 40,
    );

    let ex = Exporter::start(&["--regions-dir", d.to_str().unwrap()]);
    // Meanwhile the ring head jumps between 2^64-16 and 5 (it killed the drain thread).
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (bad, stop) = (bad.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let head = if n & 1 == 0 { u64::MAX - 15 } else { 5 };
                poke(&bad, RING_HEAD_OFFSET, head);
                n += 1;
                std::thread::sleep(Duration::from_millis(60));
            }
        })
    };
    let started = Instant::now();
    let mut m = ex.scrape();
    while started.elapsed() < Duration::from_secs(2) {
        m = prompt_scrape(&ex, Duration::from_secs(5)); // 200, every time
        let good_found = m.value(
            "vigil_host_pid_detections_total",
            &[("region", "uidG_main/r.cache"), ("outcome", "found")],
        );
        assert_eq!(good_found, 1.0);
        std::thread::sleep(Duration::from_millis(25));
    }
    stop.store(true, Ordering::Relaxed);
    toggler.join().unwrap();

    // The good region's histogram is intact; the forged ones are left out, the rest
    // of the bad region is exported, and the corruption was counted once.
    let det = [("region", "uidG_main/r.cache")];
    assert_eq!(m.value("vigil_host_pid_detection_seconds_count", &det), 1.0);
    let badl = [("region", "uidX_main/r.cache")];
    assert!(m
        .find("vigil_host_pid_detection_seconds_count", &badl)
        .is_empty());
    let bad_region_wait = [("region", "uidX_main/r.cache"), ("lock", "region")];
    assert!(m
        .find("vigil_lock_wait_seconds_count", &bad_region_wait)
        .is_empty());
    assert_eq!(m.value("vigil_init_duration_seconds_count", &badl), 1.0);
    assert_eq!(m.value("vigil_region_recoveries_total", &badl), 0.0);
    assert_eq!(errors(&m, "corrupt"), 1.0);
    for s in m.find("vigil_ring_events_lost_total", &badl) {
        assert!(s.value.is_finite() && s.value >= 0.0);
    }
    // Both formats encode.
    let om = http_get(ex.addr, "/metrics", Some("application/openmetrics-text"));
    assert_eq!(om.status, 200);

    // The drain/rescan thread is alive: a new region elsewhere is found and drained.
    let late = d.join("uidL_main/r.cache");
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    let (lw, _) = Region::open(&late, &InitParams::default()).unwrap();
    wait_until("late region watched", Duration::from_secs(10), || {
        watched(&ex.scrape(), "uidL_main/r.cache")
    });
    drop(lw);
    assert!(!ex.log_text().contains("drain/rescan pass panicked"));
    assert_eq!(ex.get("/healthz").status, 200);
}

/// Child-process mode: truncate VIGIL_TEST_TRUNCATE to 4096 bytes and back, in a
/// loop, until killed. Run by the F1 test.
#[test]
#[ignore = "helper run as a child process by the other tests"]
fn truncator_child() {
    let Ok(path) = std::env::var("VIGIL_TEST_TRUNCATE") else {
        return;
    };
    let f = OpenOptions::new().write(true).open(path).unwrap();
    println!("ready");
    loop {
        f.set_len(4096).unwrap();
        std::thread::sleep(Duration::from_micros(200));
        f.set_len(REGION_SIZE as u64).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_truncator(path: &Path) -> KillOnDrop {
    use std::io::BufRead;
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "truncator_child", "--ignored", "--nocapture"])
        .env("VIGIL_TEST_TRUNCATE", path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = c.stdout.take().unwrap();
    let child = KillOnDrop(c);
    for l in std::io::BufReader::new(out).lines() {
        if l.unwrap().trim() == "ready" {
            return child;
        }
    }
    panic!("truncator child did not start");
}

#[test]
fn f1_region_truncated_in_a_loop_while_scraped_never_kills_the_exporter() {
    let (dir, _w) = with_good_region();
    let d = dir.path();
    let victim: PathBuf = d.join("uidT_main/r.cache");
    region_at(&victim);
    let mut ex = Exporter::start_raw(&[
        "--regions-dir",
        d.to_str().unwrap(),
        "--drain.interval",
        "1ms",
        "--regions-dir.scan-interval",
        "20ms",
    ]);
    let truncator = spawn_truncator(&victim);
    let started = Instant::now();
    let mut scrapes = 0;
    while started.elapsed() < Duration::from_secs(3) {
        assert!(
            ex.child.try_wait().unwrap().is_none(),
            "exporter died: {}",
            ex.log_text()
        );
        let m = prompt_scrape(&ex, Duration::from_secs(5));
        assert_eq!(
            m.value(
                "vigil_region_recoveries_total",
                &[("region", "uidG_main/r.cache")]
            ),
            0.0
        );
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(truncator);
    assert!(
        ex.child.try_wait().unwrap().is_none(),
        "exporter died: {}",
        ex.log_text()
    );
    let m = ex.scrape();
    assert!(
        errors(&m, "truncated") >= 1.0,
        "the truncations were seen and counted"
    );
    // Not a speed check (the machine may be slow): scrapes kept being answered.
    assert!(scrapes >= 3, "only {scrapes} scrapes in 3 s");
    // Once the file is whole again, the region is watched again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(REGION_SIZE as u64)
        .unwrap();
    wait_until("victim watched again", Duration::from_secs(10), || {
        watched(&ex.scrape(), "uidT_main/r.cache")
    });
    assert_eq!(ex.get("/healthz").status, 200);
}

#[test]
fn f14_concurrent_scrapes_share_renders() {
    let dir = tempfile::tempdir().unwrap();
    let mut keep = Vec::new();
    for i in 0..32 {
        let p = dir.path().join(format!("uid{i}_main/r.cache"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        keep.push(Region::open(&p, &InitParams::default()).unwrap());
    }
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    let renders = |m: &Exposition| m.value("vigil_exporter_scrape_duration_seconds_count", &[]);
    let before = renders(&ex.scrape());
    const CLIENTS: usize = 100;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let addr = ex.addr;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let r = http_get(addr, "/metrics", None);
                assert_eq!(r.status, 200);
                Exposition::parse(&r.body)
            })
        })
        .collect();
    let bodies: Vec<Exposition> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for b in &bodies {
        assert_eq!(regions(b), 32.0);
    }
    // Each body shows the number of renders before it: equal numbers, same render.
    let distinct: std::collections::BTreeSet<u64> =
        bodies.iter().map(|b| renders(b) as u64).collect();
    let after = renders(&ex.scrape());
    let done = after - before - 1.0;
    assert!(
        distinct.len() * 2 <= CLIENTS && done * 2.0 <= CLIENTS as f64,
        "{CLIENTS} concurrent scrapes took {done} renders ({} distinct bodies)",
        distinct.len()
    );
}

//! The exporter over region files written by HAMi-core's own `libvgpu.so`
//! (`tests/fixtures/hami/`): what it exports for each state, how it judges liveness
//! from the processes that map a file, and how it counts files it cannot use.

mod common;

use common::*;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const HAMI: (&str, &str) = ("interposer", "hami-core");
/// Offsets in HAMi-core's `shared_region_t` (see `hami/src/layout.rs`).
const PROCS: u64 = 1856;
const SLOT: u64 = 1960;
const OWNER_PID: u64 = 16;

fn fixture(name: &str) -> Vec<u8> {
    let p = repo_root().join("tests/fixtures/hami").join(name);
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    raw
}

/// Places fixture `name` as `<dir>/<pod>_main/vgpu.cache`, HAMi's layout.
fn place(dir: &Path, pod: &str, name: &str) -> PathBuf {
    let sub = dir.join(format!("{pod}_main"));
    std::fs::create_dir_all(&sub).unwrap();
    let p = sub.join("vgpu.cache");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&fixture(name))
        .unwrap();
    p
}

fn region(pod: &str) -> (&'static str, String) {
    ("region", format!("{pod}_main/vgpu.cache"))
}

/// A process that maps `file` as a HAMi-core process does; killed on drop.
struct Mapper {
    child: Child,
    pid: u32,
}

impl Drop for Mapper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mapper_bin(dir: &Path) -> PathBuf {
    let out = dir.join("mapper");
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mapper.c");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let res = Command::new(&cc)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("{cc}: {e}: install a C compiler or set CC"));
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    out
}

/// Starts `cmd` (which ends in the mapper) and waits for its "ready PID".
fn spawn_mapper(mut cmd: Command) -> Mapper {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("mapper did not start: {line:?}"));
    Mapper { child, pid }
}

fn map(bin: &Path, file: &Path) -> Mapper {
    let mut c = Command::new(bin);
    c.arg(file);
    spawn_mapper(c)
}

fn write_i32(file: &Path, at: u64, v: i32) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(&v.to_ne_bytes(), at)
        .unwrap();
}

fn exporter(dir: &Path) -> Exporter {
    Exporter::watching(dir, &["--proc.scan-interval", "10ms", "--nvml", "off"])
}

/// A temporary directory and the HAMi regions directory to be in it.
fn regions_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let regions = tmp.path().join("regions");
    (tmp, regions)
}

fn wait_for_region(e: &Exporter, n: usize) -> Exposition {
    e.scrape_until("HAMi-core regions to be watched", |m| {
        m.value("vigil_exporter_hami_regions", &[]) == n as f64
    })
}

fn v(m: &Exposition, name: &str, want: &[(&str, &str)]) -> f64 {
    m.value(name, want)
}

#[test]
fn a_sem_held_by_a_killed_owner_is_a_dead_owner_and_a_live_owner_is_not() {
    let (tmp, regions) = regions_dir();
    place(&regions, "pod-dead", "sem-dead-owner.cache.gz");
    let live = place(&regions, "pod-live", "sem-dead-owner.cache.gz");
    // In the second copy the recorded owner is a process that maps the file.
    let bin = mapper_bin(tmp.path());
    let owner = map(&bin, &live);
    write_i32(&live, OWNER_PID, owner.pid as i32);
    let e = exporter(&regions);
    let m = wait_for_region(&e, 2);
    let (rd, rl) = (region("pod-dead"), region("pod-live"));
    fn lock<'a>(r: &'a (&'static str, String), l: &'static str) -> Vec<(&'static str, &'a str)> {
        vec![
            (r.0, r.1.as_str()),
            HAMI,
            ("lock", l),
            ("pod_uid", r.1.split('_').next().unwrap()),
        ]
    }
    assert_eq!(v(&m, "vigil_hami_lock_held", &lock(&rd, "sem")), 1.0);
    assert_eq!(v(&m, "vigil_hami_lock_owner_dead", &lock(&rd, "sem")), 1.0);
    assert_eq!(
        v(&m, "vigil_hami_lock_owner_dead", &lock(&rd, "sem_postinit")),
        0.0
    );
    assert_eq!(v(&m, "vigil_hami_lock_held", &lock(&rl, "sem")), 1.0);
    assert_eq!(v(&m, "vigil_hami_lock_owner_dead", &lock(&rl, "sem")), 0.0);
    assert_eq!(
        m.value(
            "vigil_hami_region_info",
            &[(rd.0, rd.1.as_str()), ("version", "1.2")]
        ),
        1.0
    );
    // The owner dies: the next scrape says so.
    drop(owner);
    wait_until("the owner's death to show", Duration::from_secs(10), || {
        e.scrape()
            .value("vigil_hami_lock_owner_dead", &lock(&rl, "sem"))
            == 1.0
    });
    // Labels: pod UID and container from HAMi's directory name.
    let held = m.find(
        "vigil_hami_lock_held",
        &[(rd.0, rd.1.as_str()), ("lock", "sem")],
    );
    assert_eq!(held[0].labels["pod_uid"], "pod-dead");
    assert_eq!(held[0].labels["region"], "vgpu.cache");
    assert!(
        !held[0].labels.contains_key("pod"),
        "a UID is not a pod name"
    );
    assert_eq!(held[0].labels["container"], "main");
}

#[test]
fn slots_are_alive_while_a_process_with_their_pid_maps_the_file() {
    let (tmp, regions) = regions_dir();
    let file = place(&regions, "pod-a", "live.cache.gz");
    let bin = mapper_bin(tmp.path());
    // Two of the three recorded processes are "running again": mappers whose PIDs are
    // written into slots 0 and 1 (PID and host PID, as HAMi-core records them in the
    // host's namespace).
    let m0 = map(&bin, &file);
    let m1 = map(&bin, &file);
    for (i, m) in [&m0, &m1].iter().enumerate() {
        write_i32(&file, PROCS + i as u64 * SLOT, m.pid as i32);
        write_i32(&file, PROCS + i as u64 * SLOT + 4, m.pid as i32);
    }
    let e = exporter(&regions);
    let m = wait_for_region(&e, 1);
    let r = region("pod-a");
    let base = [(r.0, r.1.as_str()), HAMI];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = base.to_vec();
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(
        v(&m, "vigil_hami_process_slots", &with(&[("state", "alive")])),
        2.0
    );
    assert_eq!(
        v(&m, "vigil_hami_process_slots", &with(&[("state", "dead")])),
        1.0
    );
    assert_eq!(v(&m, "vigil_processes", &base), 2.0);
    // The manifest's figures: slot 2 (256 MiB + context, device 1) is the dead one.
    let used1 = v(
        &m,
        "vigil_device_memory_used_bytes",
        &with(&[("device", "1")]),
    );
    for (name, device, want) in [
        ("vigil_device_memory_dead_bytes", "1", used1),
        ("vigil_device_memory_dead_bytes", "0", 0.0),
        ("vigil_device_memory_limit_bytes", "0", 4294967296.0),
        ("vigil_device_memory_limit_bytes", "1", 3221225472.0),
        ("vigil_hami_device_sm_limit_ratio", "0", 0.5),
    ] {
        assert_eq!(
            v(&m, name, &with(&[("device", device)])),
            want,
            "{name} of device {device}"
        );
    }
    let info = m.find("vigil_hami_device_info", &with(&[("device", "1")]));
    assert_eq!(
        info[0].labels["uuid"],
        "GPU-56494749-4c2d-4750-5553-494d2d000001"
    );
    assert_eq!(v(&m, "vigil_hami_host_pid_zero_slots", &base), 0.0);
    // Vigil's own series carry no interposer label, so existing queries are unchanged.
    assert!(m.find("vigil_exporter_regions", &[]).len() == 1);
}

#[test]
fn host_pid_zero_slots_are_judged_by_their_namespace_pid() {
    // HAMi-core's detection failed for all four processes of one container (namespace
    // PIDs 2, 5, 8, 11). A container whose PID 2 maps the file has that slot alive.
    let (tmp, regions) = regions_dir();
    let file = place(&regions, "pod-z", "hostpid0.cache.gz");
    let bin = mapper_bin(tmp.path());
    let mut c = vigil_gpusim::testing::in_new_pid_namespace("sh");
    c.arg("-c")
        .arg(format!("{} {} & wait", bin.display(), file.display()));
    let _container = spawn_mapper(c);
    let e = exporter(&regions);
    let r = region("pod-z");
    let base = [(r.0, r.1.as_str()), HAMI];
    wait_for_region(&e, 1);
    let m = e.scrape_until("the container's process to be seen", |m| {
        m.value(
            "vigil_hami_process_slots",
            &[base[0], base[1], ("state", "alive")],
        ) == 1.0
    });
    assert_eq!(v(&m, "vigil_hami_host_pid_zero_slots", &base), 4.0);
    assert_eq!(
        v(
            &m,
            "vigil_hami_process_slots",
            &[base[0], base[1], ("state", "dead")]
        ),
        3.0
    );
}

#[test]
fn dead_slots_and_the_older_layout_are_exported() {
    let (_tmp, regions) = regions_dir();
    place(&regions, "pod-d", "dead-slots.cache.gz");
    place(&regions, "pod-old", "v1_1-dead-slots.cache.gz");
    let e = exporter(&regions);
    let m = wait_for_region(&e, 2);
    for pod in ["pod-d", "pod-old"] {
        let r = region(pod);
        let l = |d: &'static str| vec![(r.0, r.1.as_str()), HAMI, ("device", d)];
        for d in ["0", "1"] {
            let used = v(&m, "vigil_device_memory_used_bytes", &l(d));
            assert!(used > 0.0, "{pod} device {d}");
            // Nobody maps these files: everything charged is charged to the dead.
            assert_eq!(
                v(&m, "vigil_device_memory_dead_bytes", &l(d)),
                used,
                "{pod}"
            );
        }
    }
    let old = region("pod-old");
    assert_eq!(
        v(
            &m,
            "vigil_hami_region_info",
            &[(old.0, old.1.as_str()), ("version", "1.1")]
        ),
        1.0
    );
    // 1.1 has no sem_postinit.
    assert!(!m.has(
        "vigil_hami_lock_held",
        &[(old.0, old.1.as_str()), ("lock", "sem_postinit")]
    ));
}

#[test]
fn damaged_hami_files_are_counted_once_by_reason_and_the_good_ones_still_served() {
    let (_tmp, regions) = regions_dir();
    place(&regions, "pod-ok", "live.cache.gz");
    let bad = place(&regions, "pod-bad", "live.cache.gz");
    write_i32(&bad, 2008896, 5000); // proc_num
    let old = place(&regions, "pod-ver", "live.cache.gz");
    write_i32(&old, 8, 9); // minor version 9
    let short = place(&regions, "pod-short", "live.cache.gz");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(100_000)
        .unwrap();
    let e = exporter(&regions);
    let m = wait_for_region(&e, 1);
    wait_until("the errors to be counted", Duration::from_secs(10), || {
        let m = e.scrape();
        m.region_errors("corrupt") == 1.0
            && m.region_errors("bad_version") == 1.0
            && m.region_errors("truncated") == 1.0
    });
    std::thread::sleep(Duration::from_millis(500)); // several rescans: still once each
    let again = e.scrape();
    for reason in ["corrupt", "bad_version", "truncated"] {
        assert_eq!(again.region_errors(reason), 1.0, "{reason}");
    }
    let ok = region("pod-ok");
    assert!(
        v(
            &m,
            "vigil_device_memory_used_bytes",
            &[(ok.0, ok.1.as_str()), HAMI, ("device", "0")]
        ) > 0.0
    );
    let log = e.log_text();
    assert!(
        log.contains("pod-bad_main/vgpu.cache") && log.contains("proc_num"),
        "{log}"
    );
    // Damaged under a watching exporter: dropped and counted, never a crash.
    write_i32(&regions.join("pod-ok_main/vgpu.cache"), 56, 99); // device_num
    e.scrape_until("the damaged region to be dropped and counted", |m| {
        m.value("vigil_exporter_hami_regions", &[]) == 0.0 && m.region_errors("corrupt") == 2.0
    });
}

#[test]
fn without_the_hosts_proc_nothing_is_called_dead() {
    // An exporter whose /proc is not the host's (here: an empty directory) cannot see
    // who maps the files: every slot is unknown and no owner is dead.
    let (tmp, regions) = regions_dir();
    place(&regions, "pod-dead", "sem-dead-owner.cache.gz");
    let fake_proc = tmp.path().join("proc");
    std::fs::create_dir(&fake_proc).unwrap();
    let e = Exporter::watching(
        &regions,
        &["--proc.path", fake_proc.to_str().unwrap(), "--nvml", "off"],
    );
    let m = wait_for_region(&e, 1);
    let r = region("pod-dead");
    let base = [(r.0, r.1.as_str()), HAMI];
    assert_eq!(
        v(
            &m,
            "vigil_hami_lock_owner_dead",
            &[base[0], base[1], ("lock", "sem")]
        ),
        0.0
    );
    assert_eq!(
        v(
            &m,
            "vigil_hami_process_slots",
            &[base[0], base[1], ("state", "unknown")]
        ),
        1.0
    );
    assert_eq!(
        v(
            &m,
            "vigil_device_memory_dead_bytes",
            &[base[0], base[1], ("device", "0")]
        ),
        0.0
    );
    assert!(
        e.log_text().contains("not the host's /proc"),
        "{}",
        e.log_text()
    );
}

#[test]
fn inspect_shows_a_hami_region_with_liveness() {
    let (_tmp, regions) = regions_dir();
    let file = place(&regions, "pod-i", "sem-dead-owner.cache.gz");
    let j = inspect_json(&file, None);
    assert_eq!(j["kind"], "hami-core");
    assert_eq!(j["version"], "1.2");
    assert_eq!(j["sem"]["state"], "held_by_dead_owner");
    assert_eq!(j["owner_pid"], 15944);
    assert_eq!(j["slots"][0]["liveness"], "dead");
    let text = Command::new(BIN)
        .arg("inspect")
        .arg(&file)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(
        t.contains("HAMi-core region") && t.contains("held_by_dead_owner"),
        "{t}"
    );
}

//! The conventions Prometheus exporters share: every flag from a `VIGIL_EXPORTER_*`
//! variable, `--log.format logfmt|json`, build info with revision and compiler, and the
//! standard `process_*` metrics.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn every_flag_can_come_from_the_environment_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("u1_main");
    std::fs::create_dir(&sub).unwrap();
    vigil_region::Region::open(sub.join("r.cache"), &Default::default()).unwrap();
    // The regions directory and a label only from the environment; the listen address
    // from both (the flag must win: the test's own 127.0.0.1:0).
    let ex = Exporter::start_with(&["--nvml", "off"], |c| {
        c.env("VIGIL_EXPORTER_REGIONS_DIR", dir.path())
            .env("VIGIL_EXPORTER_LABELS_NAMESPACE", "from-env")
            .env("VIGIL_EXPORTER_WEB_LISTEN_ADDRESS", "127.0.0.1:1")
            .env("VIGIL_EXPORTER_REGIONS_MAP_PER_READ", "true");
    });
    let m = ex.scrape_until("the region from the environment's directory", |m| {
        m.value("vigil_exporter_regions", &[]) == 1.0
    });
    let s = m.find(
        "vigil_region_recoveries_total",
        &[("region", "u1_main/r.cache")],
    );
    assert_eq!(s[0].labels["namespace"], "from-env");
    // A bad value names the flag it was for.
    let out = Command::new(BIN)
        .env("VIGIL_EXPORTER_REGIONS_MAX", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--regions.max") && err.contains("lots"),
        "{err}"
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("VIGIL_EXPORTER_WEB_LISTEN_ADDRESS"), "{help}");
}

/// The exporter's first log lines with `args`, until it says it listens.
fn first_lines(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--regions-dir", dir.path().to_str().unwrap()])
        .args(["--web.listen-address", "127.0.0.1:0", "--nvml", "off"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let r = std::io::BufReader::new(child.stderr.take().unwrap());
    for l in std::io::BufRead::lines(r).map_while(Result::ok) {
        let done = l.contains("listening on");
        lines.push(l);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn logs_are_logfmt_by_default_and_json_on_request() {
    let lines = first_lines(&[]);
    let last = lines.last().expect("a log line");
    assert!(
        last.starts_with("ts=")
            && last.contains(" level=info ")
            && last.contains(" msg=\"listening on http://"),
        "{lines:?}"
    );
    let lines = first_lines(&["--log.format", "json"]);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    assert!(lines.last().unwrap().contains("listening on"), "{lines:?}");
}

#[test]
fn build_info_and_process_metrics_follow_the_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Exporter::watching(dir.path(), &["--nvml", "off"]);
    let m = ex.scrape();
    let info = m.find("vigil_exporter_build_info", &[]);
    assert_eq!(info.len(), 1);
    let l = &info[0].labels;
    assert_eq!(l["version"], env!("CARGO_PKG_VERSION"));
    assert!(!l["revision"].is_empty() && !l["rustc"].is_empty(), "{l:?}");
    assert!(l["rustc"].chars().next().unwrap().is_ascii_digit(), "{l:?}");
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);
    assert!(m.value("process_resident_memory_bytes", &[]) > 1e6);
    let open = m.value("process_open_fds", &[]);
    assert!(open >= 3.0 && open <= m.value("process_max_fds", &[]));
    let started = m.value("process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - started).abs() < 120.0,
        "started {started}, now {now}"
    );
}

#[test]
fn a_bare_port_listens_on_ipv4_and_ipv6() {
    // A free port, then `:PORT` (every interface of both families).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!(":{port}");
    let child = exporter_command(dir.path(), &listen)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = common::sim::Kill(child);
    let v4addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v4 = get_until_ok(v4addr, "/healthz", Duration::from_secs(10));
    assert_eq!(v4.status, 200);
    // Where the host has IPv6 loopback (this one does; a host without IPv6 falls back
    // to IPv4 only, and says so in the log).
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let v6 = http_get(format!("[::1]:{port}").parse().unwrap(), "/healthz", None);
        assert_eq!(v6.status, 200);
    }
}

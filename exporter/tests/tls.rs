//! `--web.config.file`: TLS and basic authentication, checked with a real client
//! (curl) against certificates made by openssl.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, made by openssl.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let sh = |script: &str| {
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=vigil-test-ca \
        -keyout ca.key -out ca.crt 2>/dev/null",
    );
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
        -keyout server.key -out server.csr 2>/dev/null");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    sh(
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 2 -extfile ext.cnf -out server.crt 2>/dev/null",
    );
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// curl's HTTP status for `url` with extra arguments ("000" when it could not connect).
fn curl(args: &[&str], url: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn tls_and_basic_auth_with_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = certificates(dir.path());
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    // Relative paths: relative to the file.
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let regions = dir.path().join("regions");
    std::fs::create_dir(&regions).unwrap();
    let ex = Exporter::watching(
        &regions,
        &["--nvml", "off", "--web.config.file", web.to_str().unwrap()],
    );
    let base = format!("https://127.0.0.1:{}", ex.addr.port());
    let ca = ca.to_str().unwrap();
    let metrics = format!("{base}/metrics");
    assert_eq!(
        curl(&["--cacert", ca, "-u", "prometheus:s3cret"], &metrics),
        "200"
    );
    assert_eq!(curl(&["--cacert", ca], &metrics), "401");
    assert_eq!(
        curl(&["--cacert", ca, "-u", "prometheus:wrong"], &metrics),
        "401"
    );
    assert_eq!(
        curl(&["--cacert", ca, "-u", "nobody:s3cret"], &metrics),
        "401"
    );
    // The body really is the metrics.
    let out = Command::new("curl")
        .args(["-s", "--cacert", ca, "-u", "prometheus:s3cret", &metrics])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("vigil_exporter_build_info"));
    // Liveness probes need no secret; plain HTTP gets nothing.
    assert_eq!(curl(&["--cacert", ca], &format!("{base}/healthz")), "200");
    let plain = format!("http://127.0.0.1:{}/healthz", ex.addr.port());
    assert_ne!(curl(&[], &plain), "200");
    assert!(
        ex.log_text().contains("listening on https://"),
        "{}",
        ex.log_text()
    );
    assert!(ex.log_text().contains("TLS, basic authentication required"));
}

#[test]
fn a_bad_web_config_file_stops_the_exporter_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    for (text, want) in [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            "missing.crt",
        ),
        ("basic_auth_users:\n  prometheus: not-a-hash\n", "bcrypt"),
        ("tls_server_cofig: {}\n", "tls_server_cofig"),
    ] {
        std::fs::write(&web, text).unwrap();
        let out = exporter_command(dir.path(), "127.0.0.1:0")
            .args(["--web.config.file", web.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("web.yml") && err.contains(want),
            "{text}: {err}"
        );
    }
}

//! --otlp-endpoint: every process start-up arrives as one trace, with the expected
//! spans, at an OTLP/HTTP receiver this test runs itself.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vigil_region::{DetectOutcome, InitParams, LockId, Region};

/// A minimal OTLP/HTTP (JSON) receiver: stores every request body.
fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    if let Ok(v) = serde_json::from_slice(&body) {
                        g.lock().unwrap().push(v);
                    }
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                    );
                }
            });
        }
    });
    (url, got)
}

/// trace id -> [(span name, span id, parent span id, attributes)]
type Traces = BTreeMap<String, Vec<(String, String, String, Value)>>;

fn traces(bodies: &[Value]) -> Traces {
    let mut out: Traces = BTreeMap::new();
    for b in bodies {
        for rs in b["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let f = |k: &str| s[k].as_str().unwrap_or("").to_string();
                    out.entry(f("traceId")).or_default().push((
                        f("name"),
                        f("spanId"),
                        f("parentSpanId"),
                        s["attributes"].clone(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn one_trace_per_process_startup_reaches_the_receiver() {
    let (url, got) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let ex = Exporter::watching(dir.path(), &["--otlp-endpoint", &url]);
    let path = dir.path().join("r.cache");
    let mut keep = Vec::new();
    const STARTUPS: usize = 3;
    for i in 0..STARTUPS {
        let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
        let me = r.claim_slot().unwrap();
        // Start-ups after the first find the detection lock held by another slot for
        // a moment, so they record a lock wait (an uncontended lock records none).
        let g = if i == 0 {
            r.lock(LockId::Detect, me).unwrap()
        } else {
            let other = r.claim_slot().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    let g = r.lock(LockId::Detect, other).unwrap();
                    tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    drop(g);
                });
                rx.recv().unwrap();
                r.lock(LockId::Detect, me).unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        r.record_detection(
            me,
            DetectOutcome::Found,
            Some(1000 + i as u32),
            4_000_000,
            3,
            2_000_000,
        );
        drop(g);
        keep.push((r, me));
    }
    let mut t = Traces::new();
    wait_until("traces at the receiver", Duration::from_secs(20), || {
        t = traces(&got.lock().unwrap());
        t.values()
            .filter(|s| s.iter().any(|x| x.0 == "vigil.host_pid_detection"))
            .count()
            >= STARTUPS
    });
    let startups: Vec<_> = t
        .values()
        .filter(|s| s.iter().any(|x| x.0 == "vigil.process_startup"))
        .collect();
    assert_eq!(
        startups.len(),
        STARTUPS,
        "traces: {t:#?}\nlog: {}",
        ex.log_text()
    );
    let mut contended = 0;
    for spans in startups {
        let root = spans
            .iter()
            .find(|s| s.0 == "vigil.process_startup")
            .unwrap();
        assert!(root.2.is_empty(), "root has no parent");
        let mut names: Vec<&str> = spans
            .iter()
            .filter(|s| s.2 == root.1)
            .map(|s| s.0.as_str())
            .collect();
        names.sort();
        let mut want = vec![
            "vigil.context_creation",
            "vigil.host_pid_detection",
            "vigil.region_attach",
        ];
        if names.contains(&"vigil.lock_wait") {
            contended += 1;
            want.push("vigil.lock_wait");
            want.sort();
        }
        assert_eq!(names, want, "children of the start-up span: {t:#?}");
        assert!(root.3.to_string().contains("vigil.host_pid"));
    }
    assert_eq!(contended, STARTUPS - 1, "start-ups with a lock-wait span");
}

//! Shared test helpers: run the real exporter binary, talk raw HTTP to it, parse the
//! exposition format.
#![allow(dead_code)]

pub mod sim;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vigil-exporter");

/// The exporter's command (not started) watching the regions directory `dir`, NVML
/// off, listening on `listen`.
pub fn exporter_command(dir: &Path, listen: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--regions-dir", dir.to_str().unwrap(), "--nvml", "off"])
        .args(["--web.listen-address", listen]);
    c
}

/// A running exporter; killed on drop.
pub struct Exporter {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Exporter {
    /// Starts the exporter on an ephemeral loopback port with fast scan and drain
    /// intervals, plus `args`, and waits until it listens.
    pub fn start(args: &[&str]) -> Exporter {
        let mut all = vec![
            "--regions-dir.scan-interval",
            "100ms",
            "--drain.interval",
            "50ms",
        ];
        all.extend_from_slice(args);
        Exporter::start_raw(&all)
    }

    /// `start` watching the regions directory `dir`, plus `args`.
    pub fn watching(dir: impl AsRef<Path>, args: &[&str]) -> Exporter {
        let mut all = vec!["--regions-dir", dir.as_ref().to_str().unwrap()];
        all.extend_from_slice(args);
        Exporter::start(&all)
    }

    /// Like `start`, with only the listen address added to `args`.
    pub fn start_raw(args: &[&str]) -> Exporter {
        Exporter::start_with(args, |_| {})
    }

    /// Like `start_raw`, with the command adjusted by `configure` first (e.g. a
    /// `pre_exec` that lowers a resource limit).
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Exporter {
        let mut cmd = Command::new(BIN);
        configure(&mut cmd);
        let mut child = cmd
            .args(["--web.listen-address", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vigil-exporter");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let rest = line
                    .split("listening on http://")
                    .nth(1)
                    .or_else(|| line.split("listening on https://").nth(1));
                if let Some(rest) = rest {
                    let addr: String = rest.chars().take_while(|c| *c != '/').collect();
                    if let Some(t) = tx.take() {
                        let _ = t.send(addr);
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("exporter did not start: {:?}", log.lock().unwrap()));
        Exporter {
            child,
            addr: addr.parse().unwrap(),
            log,
        }
    }

    pub fn get(&self, path: &str) -> Response {
        http_get(self.addr, path, None)
    }

    /// `/metrics` in Prometheus text format, parsed.
    pub fn scrape(&self) -> Exposition {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        Exposition::parse(&r.body)
    }

    /// Scrapes until `ok` holds (10 s at the most, else a panic naming `what`) and
    /// returns that scrape.
    pub fn scrape_until(&self, what: &str, ok: impl Fn(&Exposition) -> bool) -> Exposition {
        let mut last = None;
        wait_until(what, Duration::from_secs(10), || {
            let m = self.scrape();
            let done = ok(&m);
            last = Some(m);
            done
        });
        last.expect("scraped at least once")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The body's bytes (`body` is them as lossy UTF-8).
    pub raw: Vec<u8>,
}

/// One HTTP/1.1 GET with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Response {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    try_http_get(addr, path, &accept).expect("GET")
}

/// One HTTP/1.1 GET with `Connection: close` and `extra` header lines (each ending in
/// CRLF); the body as raw bytes in `Response::raw`.
pub fn try_http_get(addr: SocketAddr, path: &str, extra: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response"))
}

/// A whole HTTP/1.1 response (head and body as sent).
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body_raw = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body_raw).to_string(),
        raw: body_raw,
    })
}

/// GETs `path` until it answers 200 (a capped exporter may refuse or close while it
/// is full), for at most `timeout`; panics naming the last failure.
pub fn get_until_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Response {
    let end = Instant::now() + timeout;
    loop {
        let last = match try_http_get(addr, path, "") {
            Ok(r) if r.status == 200 => return r,
            Ok(r) => format!("status {}", r.status),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            panic!("GET {path}: no 200 within {timeout:?} (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name -> type, from `# TYPE` lines.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let eq = s[i..].find('=').map(|p| p + i).expect("label =");
        let key = s[i..eq].trim_matches(|c| c == ',' || c == ' ').to_string();
        let mut j = eq + 2; // skip ="
        let mut val = String::new();
        while b[j] != b'"' {
            if b[j] == b'\\' {
                j += 1;
                val.push(match b[j] {
                    b'n' => '\n',
                    c => c as char,
                });
            } else {
                val.push(b[j] as char);
            }
            j += 1;
        }
        out.insert(key, val);
        i = j + 1;
    }
    out
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                e.types
                    .insert(it.next().unwrap().into(), it.next().unwrap().into());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let line = line.split(" # ").next().unwrap(); // drop exemplars
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n.to_string(), parse_labels(l.trim_end_matches('}'))),
                None => (series.to_string(), BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            e.samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        e
    }

    /// Samples named `name` whose labels include all of `want`.
    ///
    /// A `region` wanted as `<pod-uid>_<container>/<file>` (a region in HAMi's layout,
    /// relative to the regions directory) matches the labels the exporter gives such
    /// a region: `pod_uid`, and `region` = the file name alone
    /// (`exporter/src/labels.rs`; `metrics.rs` checks that label set itself).
    pub fn find(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        let mut expanded: Vec<(&str, &str)> = Vec::with_capacity(want.len() + 2);
        for &(k, v) in want {
            match (k, hami_dir_region(v)) {
                // Not `container`: an operator's --labels.container (or a trusted
                // identity block) may override the directory's.
                ("region", Some((uid, _container, file))) => {
                    expanded.extend([("region", file), ("pod_uid", uid)])
                }
                _ => expanded.push((k, v)),
            }
        }
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && expanded
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample matching, or a panic naming what was looked for.
    pub fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let f = self.find(name, want);
        assert_eq!(f.len(), 1, "expected one {name}{want:?}, got {f:?}");
        f[0].value
    }

    /// There is a sample of `name` with these labels.
    pub fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        !self.find(name, want).is_empty()
    }

    /// `vigil_exporter_region_errors_total{reason}`.
    pub fn region_errors(&self, reason: &str) -> f64 {
        self.value("vigil_exporter_region_errors_total", &[("reason", reason)])
    }

    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want).iter().map(|s| s.value).sum()
    }
}

/// `vigil-exporter inspect REGION --json` (with `--proc.path` when given), which must
/// succeed, parsed.
pub fn inspect_json(region: &Path, proc_path: Option<&Path>) -> serde_json::Value {
    let mut c = Command::new(BIN);
    c.args(["inspect", region.to_str().unwrap(), "--json"]);
    if let Some(p) = proc_path {
        c.arg("--proc.path").arg(p);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// For a test run as a child process (`spawn_child`): the region that `var` names,
/// opened, with a slot claimed; `None` in an ordinary run, where `var` is unset.
pub fn child_region(var: &str) -> Option<(vigil_region::Region, vigil_region::SlotHandle)> {
    let path = std::env::var(var).ok()?;
    let (r, _) = vigil_region::Region::open(&path, &Default::default()).unwrap();
    let me = r.claim_slot().unwrap();
    Some((r, me))
}

/// Records a detection that found host PID 4242 (3 ms, 4 polls, 1 ms creating the
/// context), under the detect lock as the interposer does.
pub fn record_found_4242(w: &vigil_region::Region, me: vigil_region::SlotHandle) {
    let _g = w.lock(vigil_region::LockId::Detect, me).unwrap();
    w.record_detection(
        me,
        vigil_region::DetectOutcome::Found,
        Some(4242),
        3_000_000,
        4,
        1_000_000,
    );
}

/// The end of a child process's test: it waits to be killed.
pub fn wait_to_be_killed() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the ignored test `test` of this test binary as a child process with `var`
/// set to `path`, and returns once it printed "ready".
pub fn spawn_child(test: &str, var: &str, path: &Path) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--ignored", "--nocapture"])
        .env(var, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = c.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.trim() == "ready" => break,
            Some(Ok(_)) => {}
            _ => panic!("{test} child did not start"),
        }
    }
    c
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// A sibling binary of the workspace (e.g. `vigil-region`), if it has been built.
pub fn workspace_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?; // target/<profile>/deps -> target/<profile>
    let p = dir.join(name);
    p.exists().then_some(p)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// An HTTP/1.1 keep-alive connection: requests one after another on one socket.
pub struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> KeepAlive {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        KeepAlive { s, buf: Vec::new() }
    }

    /// GET `path` with `extra` header lines; the response, framed by Content-Length.
    pub fn get(&mut self, path: &str, extra: &str) -> Response {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("content-length");
                if self.buf.len() >= end + 4 + len {
                    let rest = self.buf.split_off(end + 4 + len);
                    let r = parse_response(&self.buf).expect("response");
                    self.buf = rest;
                    return r;
                }
            }
            let n = self.s.read(&mut chunk).expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Descriptors `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Bytes `pid`'s TCP sockets have queued for sending (written, not yet acknowledged:
/// kernel memory a client that does not read makes it hold), and how many sockets.
pub fn tcp_send_queued(pid: u32) -> (u64, usize) {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            if let Ok(l) = std::fs::read_link(e.path()) {
                let l = l.to_string_lossy().to_string();
                if let Some(i) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let (mut bytes, mut n) = (0u64, 0usize);
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let p: Vec<&str> = line.split_whitespace().collect();
            if p.len() > 9 && inodes.contains(p[9]) {
                let tx = p[4].split(':').next().unwrap_or("0");
                bytes += u64::from_str_radix(tx, 16).unwrap_or(0);
                n += 1;
            }
        }
    }
    (bytes, n)
}

/// Bytes queued for sending on every TCP socket whose local port is `port`, including
/// sockets already closed by their process but not yet freed by the kernel (orphans).
pub fn port_send_queued(port: u16) -> u64 {
    let want = format!(":{port:04X}");
    let mut bytes = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let p: Vec<&str> = line.split_whitespace().collect();
            if p.len() > 4 && p[1].ends_with(&want) {
                let tx = p[4].split(':').next().unwrap_or("0");
                bytes += u64::from_str_radix(tx, 16).unwrap_or(0);
            }
        }
    }
    bytes
}

/// `(pod_uid, container, file)` if `rel` is `<pod-uid>_<container>/<file>`.
pub fn hami_dir_region(rel: &str) -> Option<(&str, &str, &str)> {
    let (dir, file) = rel.split_once('/')?;
    if file.contains('/') || dir.starts_with('/') {
        return None;
    }
    let (uid, container) = dir.split_once('_')?;
    (!uid.is_empty() && !container.is_empty() && !file.is_empty()).then_some((uid, container, file))
}

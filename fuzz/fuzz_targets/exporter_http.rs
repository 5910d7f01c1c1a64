//! exporter_http: the exporter's HTTP service on what a network client sends.
//!
//! The real service (`vigil_exporter::http::serve_connection`, the function `serve`
//! runs for every accepted socket: hyper's HTTP/1 server with the header-read timeout,
//! the routes, content negotiation and shared renders) answers the input over an
//! in-memory stream (`tokio::io::duplex`). It runs on one current-thread tokio runtime
//! made once per process, with the clock paused: time only moves when every task is
//! waiting, and jumps straight to the next timer, so the 10 s header timeout costs no
//! real time and each input's outcome does not depend on the machine's speed (the
//! blocking pool, where renders run, holds the clock while it works). The regions are
//! two real ones (`bases`: *busy* with identity labels, *fresh* under a file name
//! full of characters that need escaping), read with identity labels on.
//!
//! Input: one flags byte, then the bytes the client sends.
//!   bits 0-1  how the bytes are written: all at once, or in pieces of 1, 7 or 61
//!             bytes with a yield between (partial reads in hyper)
//!   bit  2    telemetry path `/probe/m&trics` instead of `/metrics`
//!   bit  3    the client shuts its write side down after the last byte (half-close)
//!   bits 4-5  an amplifier inserted after the first line: 0 none, 1 a 16 KiB Accept
//!             header, 2 ninety-nine Accept headers, 3 a 1 MiB header (over hyper's
//!             limit); too big for the fuzzer to grow by itself
//!   bit  6    the client hangs up right after writing, without reading; then a fresh
//!             connection must still be served (nothing is left wedged)
//!   bit  7    two connections send the same bytes at once (shared renders)
//!
//! Checks (named, see docs/fuzzing.md): no panic anywhere (libfuzzer-sys aborts on any
//! panic, in every task and thread); the server closes every connection in bounded
//! (virtual) time, idle or not, and its task ends once the client is gone; the bytes
//! that come back are a sequence of well-formed HTTP/1.x responses framed by
//! Content-Length; and the requests the harness can judge exactly ("plain": HTTP/1.1,
//! no body, no Transfer-Encoding/Expect/Upgrade, valid names and values, at most one
//! Connection header saying close or keep-alive) each get exactly the documented answer
//! of exporter/src/http.rs, in order:
//!   * a method other than GET or HEAD: 405, text/plain;
//!   * GET/HEAD on the telemetry path: 200; OpenMetrics exactly when all the Accept
//!     headers together prefer it (`vigil_exporter::negotiate::negotiate_format`,
//!     whose rules its unit tests pin; here: that the service applies them), else
//!     Prometheus text 0.0.4; `Content-Encoding: gzip` exactly when the
//!     Accept-Encoding headers accept gzip (`negotiate::wants_gzip`); a GET body that
//!     (gunzipped if so) passes `vigil_fuzz::exposition::check` for that format; HEAD:
//!     the same headers and no body;
//!   * `/healthz`: 200 "ok"; `/`: 200 HTML linking the (escaped) telemetry path;
//!   * any other path (no decoding: `/%6Detrics` is not `/metrics`): 404.
//!
//! After `Connection: close` nothing more is answered and the connection closes. The
//! first request the harness cannot judge exactly ends the exact part; its answer must
//! still be one of the service's (with a valid body) or one of hyper's error answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vigil_exporter::http::{serve_connection, Metrics, WebConfig, OPENMETRICS_CONTENT_TYPE};
use vigil_exporter::labels::LabelPolicy;
use vigil_exporter::negotiate::{negotiate_format, wants_gzip, Format as Negotiated};
use vigil_exporter::regions::RegionSet;
use vigil_fuzz::check;
use vigil_fuzz::exposition::{self, Format};

const TEXT_CT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN_CT: &str = "text/plain; charset=utf-8";
const HTML_CT: &str = "text/html; charset=utf-8";
const PATHS: [&str; 2] = ["/metrics", "/probe/m&trics"];
/// hyper's default limit on the number of request headers.
const MAX_HEADERS: usize = 100;
/// Requests with a longer head are not judged exactly (hyper's buffer limit is
/// about 400 KiB, the URI limit 64 KiB).
const PLAIN_HEAD_MAX: usize = 32 * 1024;
/// How long (virtual) a client waits for the server to close; the server's header
/// timeout is 10 s, so anything past this is a connection held open.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

struct Harness {
    rt: tokio::runtime::Runtime,
    metrics: Arc<Metrics>,
    cfgs: [Arc<WebConfig>; 2],
}

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Times hyper's `debug_assert!(self.can_write_head())` (proto/h1/conn.rs, in
/// `encode_head` from `on_parse_error`) fired. It is an internal invariant of hyper
/// 1.12, compiled in only because the fuzz build turns debug assertions on for every
/// crate: a malformed request read after a pipelined request with an unread body, while
/// the previous answer is still buffered (reproducer
/// fuzz/regressions/exporter_http/hyper-can-write-head). The release exporter answers
/// the same bytes correctly over TCP. The connection's task dies, so its answers are
/// not judged. `VIGIL_FUZZ_ALLOW=no-hyper-debug-assert` makes it fatal again.
static HYPER_ASSERTS: AtomicU64 = AtomicU64::new(0);

extern "C" fn remove_dir_at_exit() {
    if let Some(d) = DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        vigil_region::install_sigbus_guard();
        // libfuzzer-sys's hook aborts on every panic; let hyper's one known internal
        // debug assertion through to tokio instead (see HYPER_ASSERTS).
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let hyper_assert = info.location().is_some_and(|l| {
                l.file().contains("hyper-") && l.file().ends_with("proto/h1/conn.rs")
            }) && info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| m.contains("self.can_write_head()"));
            if hyper_assert && !vigil_fuzz::allowed("no-hyper-debug-assert") {
                HYPER_ASSERTS.fetch_add(1, Relaxed);
                return;
            }
            abort_hook(info)
        }));
        let dir = vigil_fuzz::scratch::private_dir("http");
        if DIR.set(dir.clone()).is_ok() {
            // SAFETY: registers a plain extern "C" function.
            unsafe { libc::atexit(remove_dir_at_exit) };
        }
        let bases = vigil_fuzz::bases::bases();
        let get = |n: &str| &bases.iter().find(|(name, _)| *name == n).unwrap().1;
        let busy = dir.join("busy.cache");
        // The region label is the path as given: make it need every escape.
        let odd = dir.join("odd \"q\" \\ é\nx.cache");
        std::fs::write(&busy, get("busy")).expect("harness: write region");
        std::fs::write(&odd, get("fresh")).expect("harness: write region");
        let set = Arc::new(
            RegionSet::new(vec![busy, odd], None, None).with_label_policy(LabelPolicy {
                from_region_identity: true,
                ..LabelPolicy::default()
            }),
        );
        set.rescan();
        assert_eq!(set.tracked().len(), 2, "harness: regions not tracked");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("harness: runtime");
        let h = Harness {
            rt,
            metrics: Arc::new(Metrics::new(set)),
            cfgs: PATHS.map(|p| {
                Arc::new(WebConfig::plain(p.to_string()))
            }),
        };
        // The harness itself works: a plain scrape in both formats is judged good.
        for wire in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n",
        ] {
            let out = h.rt.block_on(exchange(&h, wire, 0, usize::MAX, false));
            let n = judge(wire, 0, &out, false);
            assert_eq!(
                n,
                1,
                "harness self-test: {}",
                String::from_utf8_lossy(&out.bytes)
            );
        }
        h
    })
}

/// What came back on one connection.
struct Outcome {
    bytes: Vec<u8>,
    /// The server closed the connection (EOF) within CLIENT_WAIT.
    closed: bool,
    /// hyper's debug assertion killed the connection's task (HYPER_ASSERTS).
    hyper_assert: bool,
}

/// One connection: writes `wire` (in pieces of `chunk`), reads everything back until
/// the server closes or CLIENT_WAIT passes, then hangs up and waits for the server's
/// task to end.
async fn exchange(h: &Harness, wire: &[u8], cfg: usize, chunk: usize, half_close: bool) -> Outcome {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(serve_connection(
        server,
        h.metrics.clone(),
        h.cfgs[cfg].clone(),
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut bytes = Vec::new();
    let mut closed = false;
    let write = async {
        for piece in wire.chunks(chunk.max(1)) {
            if wr.write_all(piece).await.is_err() {
                break; // the server hung up; keep reading what it sent
            }
            if chunk != usize::MAX {
                tokio::task::yield_now().await;
            }
        }
        if half_close {
            let _ = wr.shutdown().await;
        }
        // Otherwise the write side stays open, as real clients leave it.
        std::future::pending::<()>().await
    };
    let read = async {
        loop {
            match rd.read_buf(&mut bytes).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    return;
                }
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(CLIENT_WAIT, async {
        tokio::select! {
            _ = read => {}
            _ = async { write.await; } => {}
        }
    })
    .await;
    drop((rd, wr));
    let ended = tokio::time::timeout(CLIENT_WAIT, srv).await;
    check!(
        "conn-ends",
        ended.is_ok(),
        "the connection task still runs {CLIENT_WAIT:?} after the client hung up"
    );
    let mut hyper_assert = false;
    if let Ok(Err(e)) = ended {
        if e.is_panic() {
            let p = e.into_panic();
            let known = p
                .downcast_ref::<&str>()
                .is_some_and(|m| m.contains("self.can_write_head()"));
            if !known || HYPER_ASSERTS.load(Relaxed) == 0 {
                std::panic::resume_unwind(p);
            }
            hyper_assert = true;
        }
    }
    Outcome {
        bytes,
        closed,
        hyper_assert,
    }
}

/// The harness's reading of one request, where it can judge the answer exactly.
#[derive(Debug)]
struct Req {
    /// The method, if the head parsed at all.
    method: Option<String>,
    /// Judged exactly (see the module doc).
    plain: bool,
    /// `Uri::path()`, as hyper's request would give it.
    path: String,
    openmetrics: bool,
    /// Accept-Encoding accepts gzip: a metrics answer is gzipped.
    gzip: bool,
    close: bool,
    /// The request is the last thing on the wire (for half-close).
    at_end: bool,
}

fn header_is(name: &str, want: &str) -> bool {
    name.eq_ignore_ascii_case(want)
}

/// The requests on the wire, as far as they can be judged: every plain one, then the
/// first that is not plain (if its head is complete or wrong), then nothing.
fn requests(wire: &[u8]) -> Vec<Req> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < wire.len() {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut hdrs);
        let n = match r.parse(&wire[pos..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => break, // incomplete: no answer is due
            Err(_) => {
                out.push(Req {
                    method: None,
                    plain: false,
                    path: String::new(),
                    openmetrics: false,
                    gzip: false,
                    close: true,
                    at_end: false,
                });
                break;
            }
        };
        let method = r.method.unwrap_or("").to_string();
        let target = r.path.unwrap_or("");
        let mut plain = r.version == Some(1)
            && n <= PLAIN_HEAD_MAX
            && http::Method::from_bytes(method.as_bytes()).is_ok()
            && method != "CONNECT";
        let lower = target.to_ascii_lowercase();
        plain &= target.starts_with('/')
            || lower.starts_with("http://")
            || lower.starts_with("https://");
        let path = match http::Uri::try_from(target) {
            Ok(u) => u.path().to_string(),
            Err(_) => {
                plain = false;
                String::new()
            }
        };
        let mut accept: Vec<&[u8]> = Vec::new();
        let mut accept_encoding: Vec<&[u8]> = Vec::new();
        let mut connection = Vec::new();
        for hd in r.headers.iter() {
            plain &= http::HeaderName::from_bytes(hd.name.as_bytes()).is_ok()
                && http::HeaderValue::from_bytes(hd.value).is_ok();
            if header_is(hd.name, "accept") {
                accept.push(hd.value);
            }
            if header_is(hd.name, "accept-encoding") {
                accept_encoding.push(hd.value);
            }
            if header_is(hd.name, "connection") {
                connection.push(hd.value.to_ascii_lowercase());
            }
            if header_is(hd.name, "content-length") && hd.value != b"0" {
                plain = false; // a body
            }
            for other in ["transfer-encoding", "expect", "upgrade"] {
                plain &= !header_is(hd.name, other);
            }
        }
        let close = match connection.as_slice() {
            [] => false,
            [v] if v == b"close" => true,
            [v] if v == b"keep-alive" => false,
            _ => {
                plain = false;
                true
            }
        };
        // Negotiation as exporter/src/negotiate.rs defines it, over every header.
        let openmetrics = negotiate_format(accept) == Negotiated::OpenMetrics;
        let gzip = wants_gzip(accept_encoding);
        pos += n;
        out.push(Req {
            method: Some(method),
            plain,
            path,
            openmetrics,
            gzip,
            close,
            at_end: pos == wire.len(),
        });
        if !plain || close {
            break;
        }
    }
    out
}

struct Resp<'a> {
    status: u16,
    content_type: Option<String>,
    /// `Content-Encoding: gzip`.
    gzip: bool,
    body: &'a [u8],
}

/// A response body as sent, gunzipped if it says it is gzipped.
fn decoded<'a>(r: &Resp<'a>, what: &str) -> std::borrow::Cow<'a, [u8]> {
    if !r.gzip {
        return std::borrow::Cow::Borrowed(r.body);
    }
    let mut out = Vec::new();
    let ok = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(r.body), &mut out);
    check!("gzip", ok.is_ok(), "{what}: a gzip body that does not decode: {ok:?}");
    std::borrow::Cow::Owned(out)
}

/// The next response in `out` at `pos`, framed by Content-Length (no body for HEAD).
/// Interim 1xx answers are skipped.
fn response<'a>(out: &'a [u8], pos: &mut usize, head_req: bool) -> Result<Resp<'a>, String> {
    loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut hdrs);
        let n = match r.parse(&out[*pos..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err("a truncated response head".into()),
            Err(e) => return Err(format!("a malformed response head ({e})")),
        };
        let status = r.code.unwrap_or(0);
        let mut cl = Vec::new();
        let mut ct = None;
        let mut gzip = false;
        for hd in r.headers.iter() {
            if header_is(hd.name, "content-encoding") {
                gzip |= hd.value.eq_ignore_ascii_case(b"gzip");
            }
            if header_is(hd.name, "content-length") {
                cl.push(hd.value);
            }
            if header_is(hd.name, "content-type") {
                ct = Some(String::from_utf8_lossy(hd.value).into_owned());
            }
            if header_is(hd.name, "transfer-encoding") {
                return Err("a response with Transfer-Encoding (bodies have a known size)".into());
            }
        }
        *pos += n;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let len: usize = match cl.as_slice() {
            [v] => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("a bad Content-Length")?,
            _ => return Err(format!("{} Content-Length headers in a {status}", cl.len())),
        };
        let len = if head_req { 0 } else { len };
        if out.len() - *pos < len {
            return Err(format!(
                "a body cut short ({} of {len} bytes)",
                out.len() - *pos
            ));
        }
        let body = &out[*pos..*pos + len];
        *pos += len;
        return Ok(Resp {
            status,
            content_type: ct,
            gzip,
            body,
        });
    }
}

fn check_metrics_body(body: &[u8], om: bool, what: &str) {
    let fmt = if om {
        Format::OpenMetrics
    } else {
        Format::Text
    };
    if let Err(e) = exposition::check(body, fmt) {
        check!(
            "metrics-format",
            false,
            "{what}: the {fmt:?} body does not parse: {e}"
        );
    }
}

/// Judges one connection's answers. Returns the number of responses judged exactly.
fn judge(wire: &[u8], cfg: usize, out: &Outcome, half_close: bool) -> usize {
    if out.hyper_assert {
        return 0; // the connection died inside hyper (HYPER_ASSERTS)
    }
    let reqs = requests(wire);
    let telemetry = PATHS[cfg];
    let mut pos = 0;
    let mut exact = 0;
    for (i, q) in reqs.iter().enumerate() {
        if pos == out.bytes.len() {
            // No answer (any more). Every plain request is owed one, unless the
            // client half-closed right after it (hyper then drops it, by design).
            check!(
                "response-missing",
                !q.plain || (half_close && q.at_end),
                "request {i} ({} {}) got no response; {} bytes came back, closed: {}",
                q.method.as_deref().unwrap_or("?"),
                q.path,
                out.bytes.len(),
                out.closed
            );
            break;
        }
        let is_head = q.method.as_deref() == Some("HEAD");
        let r = match response(&out.bytes, &mut pos, is_head) {
            Ok(r) => r,
            Err(e) => {
                check!(
                    "response-framing",
                    false,
                    "response {i}: {e}; the bytes: {:?}",
                    String::from_utf8_lossy(&out.bytes[..out.bytes.len().min(2000)])
                );
                return exact;
            }
        };
        let ct = r.content_type.as_deref();
        if !q.plain {
            // The answer to a request the harness cannot judge exactly: one of the
            // service's answers with its body, or one of hyper's errors (no body type).
            let service = match (r.status, ct) {
                (200, Some(OPENMETRICS_CONTENT_TYPE)) => {
                    if !is_head {
                        let body = decoded(&r, "an unjudged request");
                        check_metrics_body(&body, true, "an unjudged request");
                    }
                    true
                }
                (200, Some(TEXT_CT)) => {
                    if !is_head {
                        let body = decoded(&r, "an unjudged request");
                        check_metrics_body(&body, false, "an unjudged request");
                    }
                    true
                }
                (200, Some(HTML_CT)) | (200 | 404 | 405, Some(PLAIN_CT)) => true,
                _ => false,
            };
            let hyper_error = ct.is_none() && (400..600).contains(&r.status) && r.status != 500;
            check!(
                "unexpected-status",
                service || hyper_error,
                "request {i} (not plain) got {} with content type {ct:?}",
                r.status
            );
            return exact;
        }
        let method = q.method.as_deref().unwrap_or("");
        let (want_status, want_ct, want_body): (u16, &str, Option<&[u8]>) =
            if method != "GET" && method != "HEAD" {
                (405, PLAIN_CT, Some(b"only GET and HEAD are supported\n"))
            } else if q.path == telemetry {
                let ct = if q.openmetrics {
                    OPENMETRICS_CONTENT_TYPE
                } else {
                    TEXT_CT
                };
                (200, ct, None)
            } else if q.path == "/healthz" {
                (200, PLAIN_CT, Some(b"ok\n"))
            } else if q.path == "/" {
                (200, HTML_CT, None)
            } else {
                (404, PLAIN_CT, Some(b"not found\n"))
            };
        check!(
            "route",
            r.status == want_status,
            "{method} {:?} (telemetry path {telemetry}) got status {}, want {want_status}",
            q.path,
            r.status
        );
        let want_gzip = q.gzip && want_status == 200 && q.path == telemetry;
        check!(
            "content-encoding",
            r.gzip == want_gzip,
            "{method} {:?} (gzip accepted: {}) got Content-Encoding gzip: {}",
            q.path,
            q.gzip,
            r.gzip
        );
        check!(
            "content-type",
            ct == Some(want_ct),
            "{method} {:?} (OpenMetrics asked: {}) got content type {ct:?}, want {want_ct:?}",
            q.path,
            q.openmetrics
        );
        if !is_head {
            match want_body {
                Some(b) => check!(
                    "body",
                    r.body == b,
                    "{method} {:?} body {:?}",
                    q.path,
                    String::from_utf8_lossy(r.body)
                ),
                None if want_ct == HTML_CT => {
                    let esc = telemetry.replace('&', "&amp;");
                    let page = String::from_utf8_lossy(r.body);
                    check!(
                        "body",
                        page.starts_with("<!doctype html>")
                            && page.contains(&format!("<a href=\"{esc}\">")),
                        "landing page {page:?}"
                    );
                }
                None => {
                    let what = format!("{method} {}", q.path);
                    check_metrics_body(&decoded(&r, &what), q.openmetrics, &what)
                }
            }
        } else {
            check!("body", r.body.is_empty(), "a body for HEAD");
        }
        exact += 1;
        if q.close || i + 1 == reqs.len() {
            if q.close {
                check!(
                    "close-honoured",
                    pos == out.bytes.len() && out.closed,
                    "after Connection: close, {} more bytes came and closed = {}",
                    out.bytes.len() - pos,
                    out.closed
                );
            }
            break;
        }
    }
    exact
}

/// Inserts the amplifier after the first line of `rest`.
fn amplify(rest: &[u8], amp: u8) -> Vec<u8> {
    let extra: Vec<u8> = match amp {
        1 => {
            let mut v = b"Accept: ".to_vec();
            for _ in 0..900 {
                v.extend_from_slice(b"text/plain;q=0.1, ");
            }
            v.extend_from_slice(b"application/openmetrics-text;version=1.0.0\r\n");
            v
        }
        2 => b"Accept: application/openmetrics-text\r\n".repeat(99),
        3 => {
            let mut v = b"X-Pad: ".to_vec();
            v.resize(1024 * 1024, b'a');
            v.extend_from_slice(b"\r\n");
            v
        }
        _ => return rest.to_vec(),
    };
    let at = rest
        .iter()
        .position(|&b| b == b'\n')
        .map_or(rest.len(), |p| p + 1);
    let mut v = Vec::with_capacity(rest.len() + extra.len());
    v.extend_from_slice(&rest[..at]);
    v.extend_from_slice(&extra);
    v.extend_from_slice(&rest[at..]);
    v
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let amp = (flags >> 4) & 3;
    let chunk = match (flags & 3, amp) {
        (_, 3) | (0, _) => usize::MAX,
        (1, _) => 1,
        (2, _) => 7,
        _ => 61,
    };
    let cfg = ((flags >> 2) & 1) as usize;
    let half_close = flags & 8 != 0;
    let hang_up = flags & 0x40 != 0;
    let twice = flags & 0x80 != 0;
    let wire = amplify(rest, amp);
    h.rt.block_on(async {
        if hang_up {
            // Write, hang up at once; the service must finish and stay usable.
            let (client, server) = tokio::io::duplex(64 * 1024);
            let srv = tokio::spawn(serve_connection(
                server,
                h.metrics.clone(),
                h.cfgs[cfg].clone(),
            ));
            let mut client = client;
            let _ = tokio::time::timeout(Duration::from_millis(1), client.write_all(&wire)).await;
            drop(client);
            let ended = tokio::time::timeout(CLIENT_WAIT, srv).await;
            check!(
                "conn-ends",
                ended.is_ok(),
                "the connection task still runs {CLIENT_WAIT:?} after the client hung up"
            );
            let probe = format!("GET {} HTTP/1.1\r\nConnection: close\r\n\r\n", PATHS[cfg]);
            let out = exchange(h, probe.as_bytes(), cfg, usize::MAX, false).await;
            let n = judge(probe.as_bytes(), cfg, &out, false);
            check!(
                "no-wedge",
                n == 1,
                "a scrape after a hang-up was not answered"
            );
            return;
        }
        let outs = if twice {
            let (a, b) = tokio::join!(
                exchange(h, &wire, cfg, chunk, half_close),
                exchange(h, &wire, cfg, chunk, half_close)
            );
            vec![a, b]
        } else {
            vec![exchange(h, &wire, cfg, chunk, half_close).await]
        };
        for out in &outs {
            check!(
                "idle-close",
                out.closed,
                "the server kept the connection open {CLIENT_WAIT:?} after the last byte \
                 (header timeout is 10 s); {} bytes came back",
                out.bytes.len()
            );
            let n = judge(&wire, cfg, out, half_close);
            if std::env::var_os("VIGIL_FUZZ_DEBUG").is_some() {
                let reqs = requests(&wire);
                eprintln!(
                    "exporter_http: {} requests modelled ({} plain), {n} answers judged exactly, \
                     {} bytes back, closed {}, hyper assertions so far {}; statuses {:?}",
                    reqs.len(),
                    reqs.iter().filter(|q| q.plain).count(),
                    out.bytes.len(),
                    out.closed,
                    HYPER_ASSERTS.load(Relaxed),
                    String::from_utf8_lossy(&out.bytes)
                        .match_indices("HTTP/1.")
                        .map(|(i, _)| String::from_utf8_lossy(
                            &out.bytes[i..(i + 12).min(out.bytes.len())]
                        )
                        .into_owned())
                        .collect::<Vec<_>>()
                );
            }
        }
    });
});

//! The HTTP side: `/metrics` (or `--web.telemetry-path`), `/healthz`, and `/`.
//!
//! Each connection is its own task, so a slow client only ever holds up itself.
//! Encoding runs on the blocking pool: it maps regions and makes syscalls, and must
//! not occupy the async workers that accept and answer other connections.
//!
//! Renders are shared (docs/security.md, F14): a `/metrics` request that arrives while
//! a render of the same variant (format, gzip or not) is in progress waits for it and
//! gets the same body, and at most [`MAX_CONCURRENT_RENDERS`] renders run at once.
//! However many clients ask, the exporter reads the regions at most that many times
//! at a time.
//!
//! What clients can make the exporter hold is bounded:
//!
//! - **Connections**: at most `--web.max-connections` (64) served at once, and as many
//!   more accepted and waiting (up to [`EVICT_AFTER`], twice) for a place; fewer in
//!   all if the descriptor limit leaves less room (see [`connection_cap`]). At the
//!   cap, the connection that has gone longest without moving a byte (at least
//!   [`EVICT_AFTER`], and not waiting for a render) is closed to make room; if none
//!   frees up, the waiting connection gets a quick 503 and is closed. A scraper
//!   therefore gets in past any number of idle or stuck connections.
//! - **Stuck readers**: a reply that cannot be written out within `--web.write-timeout`
//!   (10 s) of the moment the client stopped taking it closes the connection; a client
//!   that never sends a full request is cut off after 10 s (hyper's header timeout,
//!   which also closes idle keep-alive connections).
//! - **Reply memory**: each reply is one shared, immutable body (`Bytes`): a client
//!   holds a reference, never a copy. The socket send buffer is [`SEND_BUFFER`], so
//!   the kernel holds at most that much of a copy per connection. While bodies still
//!   held by unfinished replies add up to more than [`REPLY_MEMORY_BUDGET`], a request
//!   gets the newest finished body of its variant instead of a fresh render.

use crate::collector::VigilCollector;
use crate::negotiate::{self, Format};
use crate::regions::RegionSet;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, error, warn};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders running at once, whatever the number of clients (one per variant at most
/// anyway, since concurrent requests share a render).
pub const MAX_CONCURRENT_RENDERS: usize = 1;

/// `--web.max-connections` default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// `--web.write-timeout` default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors kept free for everything but client connections, besides one per
/// watched region: stdio, the listener, the runtime's, directory scans, `/proc`
/// lookups, OTLP connections, and regions that appear.
pub const FD_RESERVE: u64 = 64;
/// At the connection cap, a connection that has moved no byte for this long (and is
/// not waiting for a render) may be closed to make room for a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// `SO_SNDBUF` of client connections (the kernel doubles it): a client that does not
/// read holds at most about this much of a reply in kernel memory; the rest stays in
/// the one shared body.
pub const SEND_BUFFER: usize = 128 * 1024;
/// Bodies still held by unfinished replies (and the newest of each variant), in
/// bytes, above which requests are answered with the newest finished body instead of
/// a fresh render (see the module documentation).
pub const REPLY_MEMORY_BUDGET: usize = 16 << 20;
/// How long a client that never finishes its request headers is waited for.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A render's outcome, shared by every request that waited for it.
type Rendered = Result<Bytes, ()>;

/// What a `/metrics` answer is: a format, gzipped or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub format: Format,
    pub gzip: bool,
}

impl Variant {
    fn index(self) -> usize {
        (self.format == Format::OpenMetrics) as usize * 2 + self.gzip as usize
    }
}

/// A rendered body: counted in `pinned` (bytes) for as long as any reply holds it.
struct PinnedBody {
    data: Vec<u8>,
    pinned: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for PinnedBody {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PinnedBody {
    fn drop(&mut self) {
        self.pinned.fetch_sub(self.data.len(), Relaxed);
    }
}

/// Why the exporter closed a client connection itself.
pub const DROP_REASONS: [&str; 3] = ["refused", "evicted", "write_timeout"];
const REFUSED: usize = 0;
const EVICTED: usize = 1;
const WRITE_TIMEOUT: usize = 2;

/// Client connection figures, exported as self-metrics.
#[derive(Debug, Default)]
pub struct ConnStats {
    open: AtomicUsize,
    dropped: [AtomicU64; 3],
}

impl ConnStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }
    /// `(reason, count)` of connections the exporter closed itself.
    pub fn dropped(&self) -> [(&'static str, u64); 3] {
        std::array::from_fn(|i| (DROP_REASONS[i], self.dropped[i].load(Relaxed)))
    }
    fn count(&self, reason: usize) {
        self.dropped[reason].fetch_add(1, Relaxed);
    }
}

#[derive(Debug)]
struct ConnCollector(Arc<ConnStats>);

impl Collector for ConnCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(
            "vigil_exporter_http_connections",
            "Client connections open now (at most --web.max-connections)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&Vec::<(&str, &str)>::new())?
            .encode_gauge(&(self.0.open() as i64))?;
        let mut m = enc.encode_descriptor(
            "vigil_exporter_http_connections_dropped",
            "Client connections the exporter closed itself: refused (at the connection cap with none to evict), evicted (idle, to make room), write_timeout (the client did not take its reply)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in self.0.dropped() {
            m.encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        Ok(())
    }
}

/// Per variant: the render in progress, if any, and the newest finished body.
#[derive(Default)]
struct Renders {
    flights: [Option<watch::Receiver<Option<Rendered>>>; 4],
    newest: [Option<Bytes>; 4],
}

/// The registry and the scrape-duration histogram it includes.
pub struct Metrics {
    registry: Registry,
    scrape_duration: Histogram,
    /// Tells the collector to encode each region alone first (after a panic).
    isolate: Arc<AtomicBool>,
    state: Mutex<Renders>,
    renders: Arc<Semaphore>,
    /// Bytes of bodies alive (held by replies being written, or as the newest).
    pinned: Arc<AtomicUsize>,
    /// Length of the last render, to size the next one's buffer.
    last_len: AtomicUsize,
    set: Arc<RegionSet>,
    conns: Arc<ConnStats>,
}

impl Metrics {
    pub fn new(set: Arc<RegionSet>) -> Metrics {
        let mut registry = Registry::default();
        let isolate = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(VigilCollector::with_isolation(
            set.clone(),
            isolate.clone(),
        )));
        // 100 µs .. ~0.8 s: a scrape of 64 regions takes a few milliseconds.
        let scrape_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register(
            "vigil_exporter_scrape_duration_seconds",
            "Time to read all regions and encode one /metrics answer (recorded after it was sent, so it shows from the next scrape)",
            scrape_duration.clone(),
        );
        let conns = Arc::new(ConnStats::default());
        registry.register_collector(Box::new(ConnCollector(conns.clone())));
        Metrics {
            registry,
            scrape_duration,
            isolate,
            state: Mutex::new(Renders::default()),
            renders: Arc::new(Semaphore::new(MAX_CONCURRENT_RENDERS)),
            pinned: Arc::new(AtomicUsize::new(0)),
            last_len: AtomicUsize::new(0),
            set,
            conns,
        }
    }

    /// Client connection figures.
    pub fn connections(&self) -> &ConnStats {
        &self.conns
    }

    /// Bytes of rendered bodies alive now.
    pub fn pinned_bytes(&self) -> usize {
        self.pinned.load(Relaxed)
    }

    fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let hint = self.last_len.load(Relaxed);
        let mut out = String::with_capacity((hint + hint / 8).max(64 * 1024));
        if openmetrics {
            text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_text::encode(&mut out, &self.registry)?;
        }
        self.last_len.store(out.len(), Relaxed);
        Ok(out)
    }

    /// Encodes every metric: OpenMetrics 1.0 text, or Prometheus text 0.0.4. If
    /// encoding panics (numbers no check anticipated), renders again with each region
    /// encoded alone first, leaving out any that panics: one region can never fail
    /// the whole scrape.
    pub fn render(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let t0 = Instant::now();
        let out = match catch_unwind(AssertUnwindSafe(|| self.encode(openmetrics))) {
            Ok(r) => r,
            Err(p) => {
                error!(
                    "encoding /metrics panicked ({}); rendering again with each region isolated",
                    crate::util::panic_text(&*p)
                );
                self.isolate.store(true, Relaxed);
                let r = catch_unwind(AssertUnwindSafe(|| self.encode(openmetrics)));
                self.isolate.store(false, Relaxed);
                r.unwrap_or(Err(std::fmt::Error))
            }
        };
        self.scrape_duration.observe(t0.elapsed().as_secs_f64());
        out
    }

    /// A body for `v`: rendered, gzipped if asked, and counted as pinned while alive.
    fn render_body(&self, v: Variant) -> Rendered {
        let s = self
            .render(v.format == Format::OpenMetrics)
            .map_err(|_| ())?;
        let mut data = if v.gzip {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(s.len() / 8 + 64),
                flate2::Compression::fast(),
            );
            gz.write_all(s.as_bytes()).map_err(|_| ())?;
            gz.finish().map_err(|_| ())?
        } else {
            s.into_bytes()
        };
        data.shrink_to_fit();
        self.pinned.fetch_add(data.len(), Relaxed);
        Ok(Bytes::from_owner(PinnedBody {
            data,
            pinned: self.pinned.clone(),
        }))
    }

    /// A body for a request: joins the render in progress for this variant, or
    /// starts one (or, over [`REPLY_MEMORY_BUDGET`], reuses the newest body). The
    /// render runs in a task of its own, so waiters are answered even if the request
    /// that started it goes away.
    pub async fn render_shared(self: &Arc<Self>, v: Variant) -> Rendered {
        let idx = v.index();
        let mut rx = {
            let mut st = crate::util::lock(&self.state);
            if let Some(rx) = &st.flights[idx] {
                rx.clone()
            } else if let (true, Some(b)) =
                (self.pinned_bytes() > REPLY_MEMORY_BUDGET, &st.newest[idx])
            {
                debug!(
                    "{} bytes of replies still held by clients: answering with the newest body",
                    self.pinned_bytes()
                );
                return Ok(b.clone());
            } else {
                let (tx, rx) = watch::channel(None);
                st.flights[idx] = Some(rx.clone());
                let me = self.clone();
                tokio::spawn(async move {
                    let permit = me.renders.clone().acquire_owned().await;
                    let m = me.clone();
                    let res = tokio::task::spawn_blocking(move || m.render_body(v)).await;
                    drop(permit);
                    let body = res.unwrap_or(Err(()));
                    // Requests from now on get a fresh render.
                    let mut st = crate::util::lock(&me.state);
                    st.flights[idx] = None;
                    if let Ok(b) = &body {
                        st.newest[idx] = Some(b.clone());
                    }
                    drop(st);
                    let _ = tx.send(Some(body));
                });
                rx
            }
        };
        let got = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Err(())),
            Err(_) => Err(()),
        };
        got
    }
}

/// How many client connections may be open at once: `max`, but never so many that
/// connections, the watched regions (one descriptor each) and [`FD_RESERVE`] would
/// reach the descriptor limit `nofile`.
pub fn connection_cap(max: usize, nofile: u64, regions: usize) -> usize {
    let room = nofile.saturating_sub(regions as u64 + FD_RESERVE);
    max.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// The soft `RLIMIT_NOFILE` now.
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return u64::MAX;
    }
    r.rlim_cur
}

/// What `serve` lets clients hold (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// `--web.max-connections`.
    pub max_connections: usize,
    /// `--web.write-timeout`.
    pub write_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// One open client connection, as the connection table sees it.
#[derive(Debug)]
struct ConnState {
    /// Milliseconds after the table's epoch when the connection last moved a byte.
    last_progress: AtomicU64,
    /// Requests of this connection inside the handler (waiting for a render).
    in_handler: AtomicU32,
    evict: Notify,
    /// The socket's descriptor (valid while the connection's task runs), to make
    /// closing it reset the connection (see [`discard_on_close`]).
    fd: std::os::fd::RawFd,
}

/// Open client connections, to cap them and evict the stalest.
struct ConnTable {
    epoch: Instant,
    next_id: u64,
    open: HashMap<u64, Arc<ConnState>>,
}

impl ConnTable {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes the connection that has moved no byte for longest, if that is at least
    /// [`EVICT_AFTER`] and it is not waiting for a render.
    fn evict_one(&mut self) -> bool {
        let now = self.now_ms();
        let min_idle = EVICT_AFTER.as_millis() as u64;
        let victim = self
            .open
            .iter()
            .filter(|(_, c)| c.in_handler.load(Relaxed) == 0)
            .map(|(id, c)| (c.last_progress.load(Relaxed), *id))
            .filter(|(last, _)| now.saturating_sub(*last) >= min_idle)
            .min();
        match victim.and_then(|(_, id)| self.open.remove(&id)) {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A client socket that records when it last moved a byte, and fails a write that
/// has been blocked for longer than the write timeout (counted from the first write
/// the client did not take, until the whole reply is out).
struct TrackedIo<T> {
    io: T,
    conn: Arc<ConnState>,
    epoch: Instant,
    write_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    stats: Arc<ConnStats>,
}

impl<T> TrackedIo<T> {
    fn progress(&self) {
        self.conn
            .last_progress
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// The write could not go on: start (or check) the write-timeout clock.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let t = self.write_timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stats.count(WRITE_TIMEOUT);
                discard_on_close(self.conn.fd);
                Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not take its reply within --web.write-timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.blocked(cx).map(Err),
            other => other,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.progress();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then queues the shared body instead of copying it into a buffer.
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper flushes the socket once its own buffer is empty: the reply is out.
        let r = Pin::new(&mut self.io).poll_flush(cx);
        match r {
            Poll::Ready(Ok(())) => {
                self.stalled = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.blocked(cx).map(Err),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answers a connection over the cap: what it has sent so far is read (so closing
/// does not reset the 503 away), a 503 is written if it fits, and the socket closed.
/// Nothing waits: the accept loop does this inline.
fn refuse(stream: TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
          retry-after: 1\r\nconnection: close\r\ncontent-length: 21\r\n\r\ntoo many connections\n",
    );
}

/// Makes closing `fd` reset the connection and free what it still has queued at
/// once (`SO_LINGER` 0). Otherwise a closed socket whose client does not read stays
/// an orphan holding its send queue (up to twice [`SEND_BUFFER`]) until the kernel
/// gives up on it, minutes later. For connections the exporter abandons: a write
/// timeout, an eviction. `fd` must be open.
fn discard_on_close(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: an open socket descriptor and a linger value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn set_send_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = SEND_BUFFER as libc::c_int;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub telemetry_path: String,
    /// `--web.config.file`: TLS and basic authentication (none by default).
    pub security: Arc<crate::webconfig::WebSecurity>,
}

impl WebConfig {
    /// Plain HTTP, no authentication.
    pub fn plain(telemetry_path: impl Into<String>) -> WebConfig {
        WebConfig {
            telemetry_path: telemetry_path.into(),
            security: Default::default(),
        }
    }
}

/// `:9477` means every interface; otherwise `host:port` as usual.
pub fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    // `:PORT` is every interface of both families: `[::]` with IPv4-mapped addresses
    // accepted (see `listen`).
    let full = if s.starts_with(':') {
        format!("[::]{s}")
    } else {
        s.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| format!("--web.listen-address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--web.listen-address {s:?}: resolves to no address"))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Marks a connection as waiting in the handler (not to be evicted) while alive.
struct InHandler(Option<Arc<ConnState>>);

impl InHandler {
    fn new(c: Option<Arc<ConnState>>) -> InHandler {
        if let Some(c) = &c {
            c.in_handler.fetch_add(1, Relaxed);
        }
        InHandler(c)
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.in_handler.fetch_sub(1, Relaxed);
        }
    }
}

/// The variant a request asks for (see `negotiate`).
pub fn variant_of<B>(req: &Request<B>) -> Variant {
    let h = req.headers();
    Variant {
        format: negotiate::negotiate_format(h.get_all(ACCEPT).iter().map(HeaderValue::as_bytes)),
        gzip: negotiate::wants_gzip(h.get_all(ACCEPT_ENCODING).iter().map(HeaderValue::as_bytes)),
    }
}

async fn handle(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
    conn: Option<Arc<ConnState>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let _busy = InHandler::new(conn);
    // /healthz answers without credentials (it says nothing but "ok"), so that
    // liveness probes need no secret.
    if req.uri().path() != "/healthz"
        && !cfg.security.authorized(
            req.headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    {
        let mut r = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"vigil-exporter\""),
        );
        return Ok(r);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are supported\n",
        ));
    }
    let path = req.uri().path();
    if path == cfg.telemetry_path {
        let v = variant_of(&req);
        return Ok(match metrics.render_shared(v).await {
            Ok(body) => {
                let mut r = Response::new(Full::new(body));
                let ct = match v.format {
                    Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
                    Format::Text => prometheus_text::CONTENT_TYPE,
                };
                let h = r.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
                if v.gzip {
                    h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                h.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
                r
            }
            _ => {
                warn!("encoding /metrics failed");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
            }
        });
    }
    Ok(match path {
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/" => {
            let page = format!(
                "<!doctype html><html><head><title>Vigil exporter</title></head><body>\
                 <h1>Vigil exporter</h1><p>Version {}.</p><ul>\
                 <li><a href=\"{p}\">{p}</a>: metrics (Prometheus text, or OpenMetrics on request)</li>\
                 <li><a href=\"/healthz\">/healthz</a>: health</li></ul></body></html>\n",
                crate::VERSION,
                p = html_escape(&cfg.telemetry_path)
            );
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One client connection, as [`serve`] runs it for each accepted socket: HTTP/1.1
/// with the routes above, cut off if the request headers take over 10 s. Public for
/// the fuzz target (fuzz/fuzz_targets/exporter_http.rs), which feeds it in-memory
/// streams; not a stable API. (`serve` adds the connection cap and the write
/// timeout around it.)
#[doc(hidden)]
pub fn serve_connection<I>(
    io: I,
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = hyper::Error> + Send
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    connection(io, metrics, cfg, None)
}

fn connection<I>(
    io: I,
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
    conn: Option<Arc<ConnState>>,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = hyper::Error> + Send
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, metrics.clone(), cfg.clone(), conn.clone()));
    http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that never finishes its request headers is cut off (and so is an
        // idle keep-alive connection).
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc)
}

/// Logs failed accepts (out of descriptors, typically) at most once a minute.
#[derive(Default)]
struct AcceptErrors {
    last_log: Option<Instant>,
    since: u64,
}

impl AcceptErrors {
    fn note(&mut self, e: &std::io::Error) {
        self.since += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            warn!(
                "accept failed: {e} ({} failures since the last report; retrying every 20 ms)",
                self.since
            );
            self.last_log = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// What the accept loop and the connection tasks share.
struct Gate {
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
    opts: ServeOptions,
    /// One permit per connection served at once (`--web.max-connections`).
    slots: Arc<Semaphore>,
    table: Mutex<ConnTable>,
    /// Connections accepted and waiting for a permit.
    waiting: AtomicUsize,
    stats: Arc<ConnStats>,
}

impl Gate {
    fn evict_one(&self) -> bool {
        let evicted = crate::util::lock(&self.table).evict_one();
        if evicted {
            self.stats.count(EVICTED);
        }
        evicted
    }

    /// Serves an admitted connection in a task of its own, which holds its permit.
    fn start(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let (id, c, epoch) = {
            let mut t = crate::util::lock(&self.table);
            let c = Arc::new(ConnState {
                last_progress: AtomicU64::new(t.now_ms()),
                in_handler: AtomicU32::new(0),
                evict: Notify::new(),
                fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
            });
            let id = t.next_id;
            t.next_id += 1;
            t.open.insert(id, c.clone());
            self.stats.open.store(t.open.len(), Relaxed);
            (id, c, t.epoch)
        };
        let _ = stream.set_nodelay(true);
        set_send_buffer(&stream);
        let io = TrackedIo {
            io: stream,
            conn: c.clone(),
            epoch,
            write_timeout: self.opts.write_timeout,
            stalled: None,
            stats: self.stats.clone(),
        };
        let (metrics, cfg, c2) = (self.metrics.clone(), self.cfg.clone(), c.clone());
        // With TLS, the handshake happens in the connection's task, under the same
        // eviction as the rest of its life (a client that stalls it holds a slot).
        let conn = async move {
            match cfg.security.tls.clone() {
                None => watcher.watch(connection(io, metrics, cfg, Some(c2))).await,
                Some(acc) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acc.accept(io)).await {
                        Ok(Ok(tls)) => watcher.watch(connection(tls, metrics, cfg, Some(c2))).await,
                        Ok(Err(e)) => {
                            debug!("connection from {peer}: TLS handshake failed: {e}");
                            Ok(())
                        }
                        Err(_) => {
                            debug!("connection from {peer}: TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            {
                // Pinned out here, so that the socket is still open in the eviction
                // arm; closed at the end of this block.
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    r = &mut conn => if let Err(e) = r {
                        debug!("connection from {peer}: {e}");
                    },
                    _ = c.evict.notified() => {
                        debug!("connection from {peer} evicted");
                        discard_on_close(c.fd);
                    }
                }
            }
            let mut t = crate::util::lock(&me.table);
            t.open.remove(&id);
            me.stats.open.store(t.open.len(), Relaxed);
            drop(t);
            drop(permit);
        });
    }

    /// A connection accepted at the cap waits (at most [`EVICT_AFTER`], twice if a
    /// connection could be evicted meanwhile) for a permit, then is served or refused.
    fn wait(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        self.waiting.fetch_add(1, Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            let mut permit = None;
            for round in 0..2 {
                if round == 1 && !me.evict_one() {
                    break;
                }
                if let Ok(Ok(p)) =
                    tokio::time::timeout(EVICT_AFTER, me.slots.clone().acquire_owned()).await
                {
                    permit = Some(p);
                    break;
                }
            }
            me.waiting.fetch_sub(1, Relaxed);
            match permit {
                Some(p) => me.start(stream, peer, p, watcher),
                None => {
                    me.stats.count(REFUSED);
                    debug!("connection from {peer} refused: no room within {EVICT_AFTER:?}");
                    refuse(stream);
                }
            }
        });
    }
}

/// Serves until `shutdown` resolves, then lets open connections finish (at most 5 s).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cfg: WebConfig,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let gate = Arc::new(Gate {
        stats: metrics.conns.clone(),
        metrics,
        cfg: Arc::new(cfg),
        opts,
        slots: Arc::new(Semaphore::new(opts.max_connections)),
        table: Mutex::new(ConnTable {
            epoch: Instant::now(),
            next_id: 0,
            open: HashMap::new(),
        }),
        waiting: AtomicUsize::new(0),
    });
    let mut accept_errors = AcceptErrors::default();
    let mut low_fds = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, typically: back off, keep serving.
                        accept_errors.note(&e);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                // Connections served and waiting must leave descriptors for the
                // regions and the exporter itself.
                let nofile = nofile_limit();
                let room = connection_cap(usize::MAX, nofile, gate.metrics.set.tracked_count());
                let open = crate::util::lock(&gate.table).open.len();
                let held = open + gate.waiting.load(Relaxed);
                if held >= room.min(2 * opts.max_connections) {
                    if held >= room && !low_fds {
                        warn!(
                            "{held} client connections and the descriptor limit ({nofile}) leave no room for more: refusing new ones"
                        );
                    }
                    low_fds = held >= room;
                    gate.stats.count(REFUSED);
                    refuse(stream);
                    continue;
                }
                low_fds = false;
                match gate.slots.clone().try_acquire_owned() {
                    Ok(p) => gate.start(stream, peer, p, graceful.watcher()),
                    Err(_) => {
                        // At the cap: make room if a connection is idle or stuck,
                        // and let this one wait a little for it.
                        gate.evict_one();
                        gate.wait(stream, peer, graceful.watcher());
                    }
                }
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {
            warn!("connections still open after 5 s; closing them");
        }
    }
}

/// Binds `addr` for serving. The IPv6 wildcard (`:PORT`) is bound dual-stack (IPv4 too,
/// whatever `net.ipv6.bindv6only` says); on a host without IPv6 it falls back to
/// `0.0.0.0` with the same port.
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let bind = |a: SocketAddr, dual: bool| -> std::io::Result<std::net::TcpListener> {
        let sock = Socket::new(Domain::for_address(a), Type::STREAM, None)?;
        if dual {
            sock.set_only_v6(false)?;
        }
        sock.set_reuse_address(true)?;
        sock.bind(&a.into())?;
        sock.listen(1024)?;
        sock.set_nonblocking(true)?;
        Ok(sock.into())
    };
    match addr {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => bind(addr, true).or_else(|e| {
            tracing::warn!("cannot listen on [::]:{} ({e}); IPv4 only", v6.port());
            bind(SocketAddr::from(([0, 0, 0, 0], v6.port())), false)
        }),
        _ => bind(addr, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cap_leaves_room_for_regions() {
        assert_eq!(connection_cap(64, 1 << 20, 512), 64);
        assert_eq!(connection_cap(64, 1024, 512), 64);
        assert_eq!(connection_cap(64, 256, 8), 64);
        assert_eq!(connection_cap(64, 128, 8), 56);
        assert_eq!(connection_cap(64, 100, 40), 0);
        assert_eq!(connection_cap(64, 0, 0), 0);
        assert_eq!(connection_cap(1000, u64::MAX, 0), 1000);
    }
}

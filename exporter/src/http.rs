//! The HTTP side: `/metrics` (or `--web.telemetry-path`), `/healthz`, and `/`.
//!
//! Each connection is its own task, so a slow client only ever holds up itself.
//! Encoding runs on the blocking pool: it maps regions and makes syscalls, and must
//! not occupy the async workers that accept and answer other connections.
//!
//! Renders are shared (docs/security.md, F14): a `/metrics` request that arrives while
//! a render of the same format is in progress waits for it and gets the same body,
//! and at most [`MAX_CONCURRENT_RENDERS`] renders run at once. However many clients
//! ask, the exporter reads the regions at most that many times at a time.

use crate::collector::VigilCollector;
use crate::regions::RegionSet;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, warn};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders running at once, whatever the number of clients (one per format at most
/// anyway, since concurrent requests share a render).
pub const MAX_CONCURRENT_RENDERS: usize = 1;

/// A render's outcome, shared by every request that waited for it.
type Rendered = Result<Bytes, ()>;

/// The registry and the scrape-duration histogram it includes.
pub struct Metrics {
    registry: Registry,
    scrape_duration: Histogram,
    /// Tells the collector to encode each region alone first (after a panic).
    isolate: Arc<AtomicBool>,
    /// The render in progress per format (text, OpenMetrics), if any.
    flights: Mutex<[Option<watch::Receiver<Option<Rendered>>>; 2]>,
    renders: Arc<Semaphore>,
}

impl Metrics {
    pub fn new(set: Arc<RegionSet>) -> Metrics {
        let mut registry = Registry::default();
        let isolate = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(VigilCollector::with_isolation(
            set,
            isolate.clone(),
        )));
        // 100 µs .. ~0.8 s: a scrape of 64 regions takes a few milliseconds.
        let scrape_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register(
            "vigil_exporter_scrape_duration_seconds",
            "Time to read all regions and encode one /metrics answer (recorded after it was sent, so it shows from the next scrape)",
            scrape_duration.clone(),
        );
        Metrics {
            registry,
            scrape_duration,
            isolate,
            flights: Mutex::new([None, None]),
            renders: Arc::new(Semaphore::new(MAX_CONCURRENT_RENDERS)),
        }
    }

    fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(256 * 1024);
        if openmetrics {
            text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_text::encode(&mut out, &self.registry)?;
        }
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
                    crate::regions::panic_text(&*p)
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

    /// A render for a request: joins the one in progress for this format, or starts
    /// one. The render runs in a task of its own, so waiters are answered even if
    /// the request that started it goes away.
    pub async fn render_shared(self: &Arc<Self>, openmetrics: bool) -> Rendered {
        let idx = openmetrics as usize;
        let mut rx = {
            let mut flights = crate::regions::lock(&self.flights);
            match &flights[idx] {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights[idx] = Some(rx.clone());
                    let me = self.clone();
                    tokio::spawn(async move {
                        let permit = me.renders.clone().acquire_owned().await;
                        let m = me.clone();
                        let res = tokio::task::spawn_blocking(move || m.render(openmetrics)).await;
                        drop(permit);
                        let body = match res {
                            Ok(Ok(s)) => Ok(Bytes::from(s)),
                            _ => Err(()),
                        };
                        // Requests from now on get a fresh render.
                        crate::regions::lock(&me.flights)[idx] = None;
                        let _ = tx.send(Some(body));
                    });
                    rx
                }
            }
        };
        let got = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Err(())),
            Err(_) => Err(()),
        };
        got
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub telemetry_path: String,
}

/// `:9477` means every interface; otherwise `host:port` as usual.
pub fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| format!("--web.listen-address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--web.listen-address {s:?}: resolves to no address"))
}

/// True if the scraper prefers OpenMetrics (Prometheus itself asks for it first).
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"))
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

async fn handle(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are supported\n",
        ));
    }
    let path = req.uri().path();
    if path == cfg.telemetry_path {
        let om = wants_openmetrics(req.headers().get(ACCEPT));
        return Ok(match metrics.render_shared(om).await {
            Ok(body) => {
                let mut r = Response::new(Full::new(body));
                let ct = if om {
                    OPENMETRICS_CONTENT_TYPE
                } else {
                    prometheus_text::CONTENT_TYPE
                };
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
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
/// streams; not a stable API.
#[doc(hidden)]
pub fn serve_connection<I>(
    io: I,
    metrics: Arc<Metrics>,
    cfg: Arc<WebConfig>,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = hyper::Error> + Send
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, metrics.clone(), cfg.clone()));
    http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that never finishes its request headers is cut off.
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc)
}

/// Serves until `shutdown` resolves, then lets open connections finish (at most 5 s).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cfg: WebConfig,
    shutdown: impl Future<Output = ()>,
) {
    let cfg = Arc::new(cfg);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, typically: back off, keep serving.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = graceful.watch(serve_connection(stream, metrics.clone(), cfg.clone()));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!("connection from {peer}: {e}");
                    }
                });
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

//! Scrape latency: N sequential GETs of /metrics over fresh connections, as Prometheus
//! would make them; prints p50/p99/max and the body size.
//!
//! cargo run --release --example scrape_bench -- 127.0.0.1:9477 [N]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: scrape_bench HOST:PORT [N]");
    let n: usize = args.next().map(|a| a.parse().expect("N")).unwrap_or(1000);
    let mut lat = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut body = Vec::with_capacity(1 << 20);
        s.read_to_end(&mut body).expect("read");
        lat.push(t.elapsed());
        assert!(body.starts_with(b"HTTP/1.1 200"), "bad answer");
        bytes = body.len();
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "scrapes={n} bytes={bytes} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(*lat.last().unwrap())
    );
}

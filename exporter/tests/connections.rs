//! What clients can make the exporter hold: connections (--web.max-connections),
//! replies nobody reads (--web.write-timeout, shared bodies, small send buffers), file
//! descriptors (regions kept, and served as last read, when they run out), and what
//! /metrics answers to Accept and Accept-Encoding.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};
use vigil_region::{InitParams, Region};

/// A client socket with a 4 KiB receive buffer (set before connecting, so the window
/// it advertises stays small): a client that will never read.
fn small_window_client(addr: SocketAddr) -> TcpStream {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on a descriptor we own until TcpStream takes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let v: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// `n` regions in HAMi's layout under `dir`, each with 1 GiB charged on device 0 by
/// this process (which holds their slots).
fn regions(dir: &Path, n: usize) -> Vec<Region> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("uid{i:03}_main/vigil.cache"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let params = InitParams {
                device_limits: vec![4 << 30],
                ..InitParams::default()
            };
            let (r, _) = Region::open(&p, &params).unwrap();
            let me = r.claim_slot().unwrap();
            r.reserve(me, 0, 1 << 30).unwrap();
            r
        })
        .collect()
}

fn dropped(m: &Exposition, reason: &str) -> f64 {
    m.value(
        "vigil_exporter_http_connections_dropped_total",
        &[("reason", reason)],
    )
}

fn region_errors(m: &Exposition, reason: &str) -> f64 {
    m.region_errors(reason)
}

/// Row 6 of "Robustness, second round": clients that each send `GET /metrics` and
/// never read used to keep a whole reply each (1.2 MB with the 155-series regions of then; 160 regions give a reply of that order now) in the exporter's socket
/// buffers, for as long as they stayed.
#[test]
fn clients_that_never_read_are_capped_and_dropped_and_a_scraper_still_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let _keep = regions(dir.path(), 160);
    let ex = Exporter::watching(
        dir.path(),
        &["--regions.max-per-dir", "1", "--web.write-timeout", "3s"],
    );
    let pid = ex.child.id();
    let body = ex.get("/metrics").body.len();
    assert!(
        body > 500_000,
        "a {body}-byte reply is too small to show anything"
    );
    let rss0 = vigil_exporter::util::rss_bytes(pid);

    const STUCK: usize = 150;
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let mut s = small_window_client(ex.addr);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        stuck.push(s);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (queued, sockets) = tcp_send_queued(pid);
    let rss = vigil_exporter::util::rss_bytes(pid);
    eprintln!(
        "{STUCK} clients not reading a {body}-byte reply: exporter RSS {} -> {} KiB, {} KiB queued in {sockets} sockets",
        rss0 >> 10,
        rss >> 10,
        queued >> 10
    );
    // Unbounded, this is STUCK replies (180 MB); bounded, at most 128 connections
    // (64 served, 64 waiting) with 256 KiB send buffers.
    assert!(
        queued < 40 << 20,
        "{} MiB queued for clients that do not read",
        queued >> 20
    );
    assert!(sockets <= 2 * 64 + 2, "{sockets} sockets open");
    assert!(rss < 160 << 20, "RSS {} MiB", rss >> 20);

    // A scraper still gets a whole answer while they hang on.
    let t = Instant::now();
    let r = get_until_ok(ex.addr, "/metrics", Duration::from_secs(30));
    let m = Exposition::parse(&r.body);
    assert_eq!(m.value("vigil_exporter_regions", &[]), 160.0);
    eprintln!(
        "a scraper got /metrics after {:?} with the stuck clients connected",
        t.elapsed()
    );

    // The write timeout (3 s) closes every stuck connection, and nothing stays
    // queued for them, not even in sockets the kernel keeps after the close.
    wait_until("stuck connections closed", Duration::from_secs(20), || {
        tcp_send_queued(pid).1 <= 2
    });
    wait_until("send queues freed", Duration::from_secs(10), || {
        port_send_queued(ex.addr.port()) < 1 << 20
    });
    let m = ex.scrape();
    assert!(dropped(&m, "write_timeout") >= 1.0);
    assert!(
        dropped(&m, "refused") >= 1.0,
        "150 > 64 served + 64 waiting"
    );
    assert!(m.value("vigil_exporter_http_connections", &[]) <= 2.0);
    // The stuck clients see their connections closed.
    let mut buf = vec![0u8; 1 << 20];
    let s = &mut stuck[0];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut closed = false;
    for _ in 0..100 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(closed, "a stuck client's connection stayed open");
    eprintln!(
        "after the write timeout: RSS {} KiB",
        vigil_exporter::util::rss_bytes(pid) >> 10
    );
}

/// Sets `pid`'s soft RLIMIT_NOFILE; returns the old limits.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limits into `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the limits from `new`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Row 7: 1,000 idle connections under `ulimit -n 1024` used to take every
/// descriptor; rescans then listed nothing and dropped every region
/// (`vigil_exporter_regions 0`, thousands of `open_failed`).
#[test]
fn idle_connections_under_a_low_descriptor_limit_leave_the_regions_watched() {
    let dir = tempfile::tempdir().unwrap();
    let _keep = regions(dir.path(), 8);
    // Soft limit 200, hard 256: the exporter raises it to 256, and no further.
    let ex = Exporter::start_with(&["--regions-dir", dir.path().to_str().unwrap()], |c| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
        unsafe {
            c.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: 200,
                    rlim_max: 256,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let pid = ex.child.id();
    assert!(
        ex.log_text()
            .contains("soft limit raised from 200 to the hard limit 256"),
        "{}",
        ex.log_text()
    );
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(TcpStream::connect(ex.addr).unwrap());
    }
    // Ten rescans with the connections held.
    std::thread::sleep(Duration::from_millis(1000));
    let fds = fd_count(pid);
    assert!(
        fds < 200,
        "the exporter holds {fds} descriptors (limit 256)"
    );
    let r = get_until_ok(ex.addr, "/metrics", Duration::from_secs(30));
    let m = Exposition::parse(&r.body);
    assert_eq!(m.value("vigil_exporter_regions", &[]), 8.0);
    for reason in ["open_failed", "vanished", "fd_exhausted"] {
        assert_eq!(region_errors(&m, reason), 0.0, "{reason}");
    }
    assert_eq!(
        m.value(
            "vigil_device_memory_used_bytes",
            &[("region", "uid003_main/vigil.cache"), ("device", "0")]
        ),
        (1u64 << 30) as f64
    );
    assert!(dropped(&m, "refused") >= 1.0);
    // Discovery goes on: a new region is watched while the connections stay.
    let _new = regions(&dir.path().join("late"), 1);
    std::fs::rename(
        dir.path().join("late/uid000_main"),
        dir.path().join("uid999_main"),
    )
    .unwrap();
    wait_until("the new region watched", Duration::from_secs(30), || {
        let r = get_until_ok(ex.addr, "/metrics", Duration::from_secs(30));
        Exposition::parse(&r.body).value("vigil_exporter_regions", &[]) == 9.0
    });
    drop(idle);
}

/// Row 7, the other half: when opening fails for lack of descriptors (EMFILE), the
/// regions already known stay, with their last known state, and the failures are
/// counted as `fd_exhausted`, not as broken files.
#[test]
fn regions_are_kept_and_served_as_last_read_when_descriptors_run_out() {
    for mode in [None, Some("--regions.map-per-read")] {
        let dir = tempfile::tempdir().unwrap();
        let keep = regions(dir.path(), 3);
        let mut args = vec!["--regions-dir", dir.path().to_str().unwrap()];
        args.extend(mode);
        let ex = Exporter::start(&args);
        let pid = ex.child.id();
        let mut conn = KeepAlive::connect(ex.addr);
        let m = Exposition::parse(&conn.get("/metrics", "").body);
        assert_eq!(m.value("vigil_exporter_regions", &[]), 3.0, "{mode:?}");

        // No new descriptor at all from now on; the connection we have stays.
        let old = set_nofile(pid, 0);
        // Meanwhile a region changes and a new one appears.
        let me = keep[1].claim_slot().unwrap();
        keep[1].reserve(me, 0, 1 << 20).unwrap();
        let _late = regions(&dir.path().join("late"), 1);
        std::fs::rename(
            dir.path().join("late/uid000_main"),
            dir.path().join("uid999_main"),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(600)); // six rescans
        let m = Exposition::parse(&conn.get("/metrics", "").body);
        assert_eq!(m.value("vigil_exporter_regions", &[]), 3.0, "{mode:?}");
        for reason in ["open_failed", "vanished", "truncated", "corrupt"] {
            assert_eq!(region_errors(&m, reason), 0.0, "{mode:?} {reason}");
        }
        assert!(region_errors(&m, "fd_exhausted") >= 1.0, "{mode:?}");
        let used = |m: &Exposition, r: &str| {
            m.value(
                "vigil_device_memory_used_bytes",
                &[("region", r), ("device", "0")],
            )
        };
        assert_eq!(used(&m, "uid000_main/vigil.cache"), (1u64 << 30) as f64);
        if mode.is_none() {
            // A kept mapping needs no descriptor: still live.
            assert_eq!(
                used(&m, "uid001_main/vigil.cache"),
                ((1u64 << 30) + (1 << 20)) as f64
            );
        }
        assert!(ex.log_text().contains("out of file descriptors"));

        // Descriptors back: the new region is found, the changed one read again.
        set_nofile(pid, old.rlim_cur as u64);
        wait_until("recovered", Duration::from_secs(20), || {
            let r = get_until_ok(ex.addr, "/metrics", Duration::from_secs(20));
            let m = Exposition::parse(&r.body);
            m.value("vigil_exporter_regions", &[]) == 4.0
                && used(&m, "uid001_main/vigil.cache") == ((1u64 << 30) + (1 << 20)) as f64
        });
        let m = ex.scrape();
        assert_eq!(region_errors(&m, "open_failed"), 0.0);
        assert_eq!(region_errors(&m, "vanished"), 0.0);
    }
}

/// Row 11: content negotiation as Prometheus's client libraries do it, and gzip.
#[test]
fn metrics_negotiates_format_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let _keep = regions(dir.path(), 2);
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    const OM: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    let cases: &[(&str, &str)] = &[
        ("", TEXT),
        ("Accept: application/openmetrics-text;q=0\r\n", TEXT),
        ("Accept: APPLICATION/OPENMETRICS-TEXT\r\n", OM),
        (
            "Accept: text/plain;q=0.2\r\nAccept: application/openmetrics-text\r\n",
            OM,
        ),
        (
            "Accept: application/openmetrics-text;q=0.2\r\nAccept: text/plain;q=0.5\r\n",
            TEXT,
        ),
        (
            "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n",
            OM,
        ),
    ];
    for (headers, want) in cases {
        let r = try_http_get(ex.addr, "/metrics", headers).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], *want, "{headers:?}");
        assert!(!r.headers.contains_key("content-encoding"), "{headers:?}");
        assert!(r.headers["vary"].contains("Accept-Encoding"));
        if *want == OM {
            assert!(r.body.ends_with("# EOF\n"));
        }
    }

    // gzip, as Prometheus asks for it: the same exposition, compressed.
    for (accept, want) in [("", TEXT), ("Accept: application/openmetrics-text\r\n", OM)] {
        let plain = try_http_get(ex.addr, "/metrics", accept).unwrap();
        let r = try_http_get(
            ex.addr,
            "/metrics",
            &format!("{accept}Accept-Encoding: gzip\r\n"),
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], want);
        assert_eq!(r.headers["content-encoding"], "gzip");
        assert!(r.headers["vary"].contains("Accept-Encoding"));
        assert_eq!(r.headers["content-length"], r.raw.len().to_string());
        let mut text = String::new();
        flate2::read::GzDecoder::new(&r.raw[..])
            .read_to_string(&mut text)
            .expect("a gzip body");
        assert!(
            r.raw.len() * 4 < text.len(),
            "{} -> {}",
            text.len(),
            r.raw.len()
        );
        let (a, b) = (Exposition::parse(&text), Exposition::parse(&plain.body));
        assert_eq!(a.types, b.types);
        assert_eq!(
            a.value("vigil_exporter_regions", &[]),
            b.value("vigil_exporter_regions", &[])
        );
        assert_eq!(
            a.find("vigil_device_memory_used_bytes", &[]),
            b.find("vigil_device_memory_used_bytes", &[])
        );
    }
    // gzip refused with q=0: plain.
    let r = try_http_get(
        ex.addr,
        "/metrics",
        "Accept-Encoding: gzip;q=0, identity\r\n",
    )
    .unwrap();
    assert!(!r.headers.contains_key("content-encoding"));
    assert!(r.body.contains("vigil_exporter_regions 2"));
}

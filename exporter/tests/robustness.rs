//! Garbage, truncated, foreign-version and deleted files; slow and numerous clients.
//! The exporter must count each problem, name the file, and keep answering.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use vigil_region::{InitParams, Region};

#[test]
fn garbage_truncated_foreign_and_deleted_files_are_counted_and_serving_continues() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.cache");
    let (_w, _) = Region::open(&good, &InitParams::default()).unwrap();
    let valid = std::fs::read(&good).unwrap();

    // 1,000 garbage files, half of them in HAMi-style subdirectories.
    let mut seed = 0x1234_5678_9abc_def0u64;
    for i in 0..1000 {
        let d = if i % 2 == 0 {
            dir.path().to_path_buf()
        } else {
            let d = dir.path().join(format!("pod{}_c", i % 20));
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let len = 200 + (i * 37) % 4000; // past the header: read as bad magic
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed | 1) as u8 // never all-zero: all-zero files are regions being born
            })
            .collect();
        std::fs::write(d.join(format!("junk{i}.cache")), bytes).unwrap();
    }
    // A real region cut short, and one claiming a future layout version.
    std::fs::write(dir.path().join("short.cache"), &valid[..valid.len() / 2]).unwrap();
    let mut future = valid.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(dir.path().join("future.cache"), &future).unwrap();
    // A region that will be deleted while the exporter watches it.
    let doomed = dir.path().join("doomed.cache");
    let (_d, _) = Region::open(&doomed, &InitParams::default()).unwrap();

    // Limits raised: this test is about garbage, security.rs about the limits.
    let ex = Exporter::watching(
        dir.path(),
        &["--regions.max-per-dir", "1000", "--regions.max", "2000"],
    );
    let m = ex.scrape();
    assert_eq!(m.region_errors("bad_magic"), 1000.0);
    assert_eq!(m.region_errors("truncated"), 1.0);
    assert_eq!(m.region_errors("bad_version"), 1.0);
    assert_eq!(m.value("vigil_exporter_regions", &[]), 2.0);
    let log = ex.log_text();
    assert!(log.contains("short.cache") && log.contains("future.cache"));
    assert!(log.contains("junk999.cache"));

    // Rescans do not count the same broken files again.
    std::thread::sleep(Duration::from_millis(400));
    let m = ex.scrape();
    assert_eq!(m.region_errors("bad_magic"), 1000.0);

    // Deleted while watched: dropped and counted; the good region is unaffected.
    std::fs::remove_file(&doomed).unwrap();
    wait_until("doomed region dropped", Duration::from_secs(10), || {
        ex.scrape().region_errors("vanished") == 1.0
    });
    // A region overwritten with garbage in place is dropped as corrupt-or-worse.
    std::fs::write(&good, vec![b'x'; 4096]).unwrap();
    ex.scrape_until("overwritten region dropped", |m| {
        m.value("vigil_exporter_regions", &[]) == 0.0 && m.region_errors("bad_magic") == 1001.0
    });
    assert_eq!(ex.get("/healthz").status, 200);
}

#[test]
fn slow_clients_and_500_connections_do_not_block_scrapes() {
    let dir = tempfile::tempdir().unwrap();
    let (_w, _) = Region::open(dir.path().join("r.cache"), &InitParams::default()).unwrap();
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);

    // A client that sends half a request and stalls.
    let mut stalled = TcpStream::connect(ex.addr).unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A client that asks for /metrics many times over and never reads the answers.
    let mut hog = TcpStream::connect(ex.addr).unwrap();
    for _ in 0..200 {
        let _ = hog.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    // 500 concurrent idle connections.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(ex.addr).unwrap());
    }
    // And 500 more that each make a request and read it slowly, from threads.
    let mut readers = Vec::new();
    for _ in 0..50 {
        let addr = ex.addr;
        readers.push(std::thread::spawn(move || {
            for _ in 0..10 {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut buf = [0u8; 512];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }));
    }
    // Meanwhile ordinary scrapes are answered: the connection cap (64) refuses or
    // queues what is over it, and a scraper gets in by evicting a connection that
    // has been idle for a second (so a scrape may need a retry, not a long wait).
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = get_until_ok(ex.addr, "/metrics", Duration::from_secs(30));
        let m = Exposition::parse(&r.body);
        worst = worst.max(t.elapsed());
        assert_eq!(m.value("vigil_exporter_regions", &[]), 1.0);
    }
    assert!(worst < Duration::from_secs(10), "slowest scrape {worst:?}");
    for r in readers {
        r.join().unwrap();
    }
    drop((stalled, hog, idle));
    assert_eq!(ex.get("/healthz").status, 200);
}

/// Sum of `vigil_exporter_region_errors_total` over every reason.
fn errors_total(m: &Exposition) -> f64 {
    m.sum("vigil_exporter_region_errors_total", &[])
}

#[test]
fn bad_files_over_the_per_dir_limit_are_counted_once_each_until_they_change() {
    // Five broken files in one tenant directory (--regions.max-per-dir is 4): the
    // files taking turns for the four places must not be counted again and again.
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let good = scratch.path().join("good.cache");
    let (_w, _) = Region::open(&good, &InitParams::default()).unwrap();
    let valid = std::fs::read(&good).unwrap();
    let tenant = dir.path().join("uid-1_main");
    std::fs::create_dir(&tenant).unwrap();
    for i in 0..5 {
        // Cut short at different lengths (reason "truncated").
        std::fs::write(
            tenant.join(format!("junk{i}.cache")),
            &valid[..valid.len() / 2 - i * 4096],
        )
        .unwrap();
    }
    let ex = Exporter::start(&["--regions-dir", dir.path().to_str().unwrap()]);
    wait_until("five files counted", Duration::from_secs(10), || {
        errors_total(&ex.scrape()) >= 5.0
    });
    // 20 rescans later (100 ms each): still one count and one log line per file.
    std::thread::sleep(Duration::from_secs(2));
    let m = ex.scrape();
    assert_eq!(
        errors_total(&m),
        5.0,
        "{:?}",
        m.find("vigil_exporter_region_errors_total", &[])
    );
    assert_eq!(m.value("vigil_exporter_regions", &[]), 0.0);
    let lines = |log: &str| log.lines().filter(|l| l.contains("junk")).count();
    assert_eq!(lines(&ex.log_text()), 5, "{}", ex.log_text());

    // A file that changes is a new version: counted (and logged) once more.
    let mut changed = valid[..valid.len() / 3].to_vec();
    changed.push(1);
    std::fs::write(tenant.join("junk4.cache"), &changed).unwrap();
    wait_until("the changed file counted", Duration::from_secs(10), || {
        errors_total(&ex.scrape()) >= 6.0
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(errors_total(&ex.scrape()), 6.0);
    assert_eq!(lines(&ex.log_text()), 6, "{}", ex.log_text());

    // Deleted and written again: a new file, counted once.
    std::fs::remove_file(tenant.join("junk0.cache")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(tenant.join("junk0.cache"), &valid[..1000]).unwrap();
    wait_until(
        "the re-created file counted",
        Duration::from_secs(10),
        || errors_total(&ex.scrape()) >= 7.0,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(errors_total(&ex.scrape()), 7.0);
}

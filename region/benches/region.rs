//! Hot-path costs of the region: `cargo bench -p vigil-region --bench region`.
// Not public surface: `criterion_group!` declares an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vigil_region::layout::RING_CAPACITY;
use vigil_region::*;

fn region() -> (tempfile::TempDir, Region) {
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = Region::open(dir.path().join("bench.cache"), &InitParams::default()).unwrap();
    (dir, r)
}

fn uncontended(c: &mut Criterion) {
    let (_d, r) = region();
    let me = r.claim_slot().unwrap();
    c.bench_function("lock_unlock_uncontended", |b| {
        b.iter(|| drop(r.lock(LockId::Region, me).unwrap()))
    });
}

/// What every counted allocation and its free add: a reservation and a credit, each
/// under the region lock.
fn reserve_credit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let params = InitParams {
        device_limits: vec![1 << 40],
        ..InitParams::default()
    };
    let (r, _) = Region::open(dir.path().join("bench.cache"), &params).unwrap();
    let me = r.claim_slot().unwrap();
    c.bench_function("reserve_then_credit", |b| {
        b.iter(|| {
            assert_eq!(r.reserve(me, 0, 4096).unwrap(), Reservation::Granted);
            r.credit(me, 0, 4096).unwrap();
        })
    });
}

fn event_write(c: &mut Criterion) {
    let (_d, r) = region();
    let ev = Event::new(EventKind::LockWait, 3, 0, 1234, 0, 0);
    c.bench_function("event_write", |b| {
        b.iter(|| r.emit(std::hint::black_box(&ev)))
    });
}

fn drain(c: &mut Criterion) {
    let (_d, r) = region();
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1_000_000));
    g.sample_size(10);
    // Drain 1M events: the ring holds RING_CAPACITY, so refill between (untimed) drains.
    g.bench_function("drain_1m_events", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut cons = r.ring_consumer_from_now();
                let mut left = 1_000_000usize;
                while left > 0 {
                    let n = left.min(RING_CAPACITY);
                    for i in 0..n {
                        r.emit(&Event::new(EventKind::Marker, 0, 0, i as u64, 0, 0));
                    }
                    let t = Instant::now();
                    let mut got = 0usize;
                    r.drain(&mut cons, usize::MAX, |e| got += e.a as usize & 1);
                    total += t.elapsed();
                    std::hint::black_box(got);
                    left -= n;
                }
            }
            total
        })
    });
    g.finish();
}

fn two_processes(c: &mut Criterion) {
    let (_d, r) = region();
    let me = r.claim_slot().unwrap();
    let mut g = c.benchmark_group("lock_two_processes");
    g.sample_size(20);
    g.bench_function("lock_unlock_contended", |b| {
        b.iter_batched(
            || {
                // A second process hammering the same lock for the batch's duration.
                let mut child = Command::new(env!("CARGO_BIN_EXE_vigil-region"))
                    .args(["exercise", "contend"])
                    .arg(r.path())
                    .args(["--duration-ms", "400"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                BufReader::new(child.stdout.as_mut().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                child
            },
            |mut child| {
                for _ in 0..1000 {
                    drop(r.lock(LockId::Region, me).unwrap());
                }
                let _ = child.kill();
                let _ = child.wait();
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    uncontended,
    reserve_credit,
    event_write,
    drain,
    two_processes
);
criterion_main!(benches);

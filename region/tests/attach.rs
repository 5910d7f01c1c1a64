//! Attaching: one initializer among racing processes, recovery from a dead
//! initializer, and clear errors for bad files in both modes.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::io::Write;
use vigil_region::*;

#[test]
fn sixty_four_racing_processes_elect_exactly_one_initializer_every_round() {
    let dir = tempdir();
    for round in 0..20 {
        let path = dir.path().join(format!("race-{round}.cache"));
        // A start barrier in the near future, so the attaches really race.
        let start = monotonic_ns() + 150_000_000;
        let procs: Vec<Proc> = (0..64)
            .map(|_| {
                Proc::spawn(exercise(&[
                    "attach",
                    path.to_str().unwrap(),
                    "--start-at-ns",
                    &start.to_string(),
                ]))
            })
            .collect();
        let mut paths: HashMap<String, usize> = HashMap::new();
        for mut p in procs {
            let kv = p.expect("init");
            *paths.entry(kv["path"].clone()).or_default() += 1;
            p.wait_ok();
        }
        assert_eq!(
            paths.get("initializer"),
            Some(&1),
            "round {round}: {paths:?}"
        );
        assert_eq!(
            paths.get("fast_path"),
            Some(&63),
            "round {round}: {paths:?}"
        );
        let r = RegionReader::open(&path).unwrap();
        let s = r.snapshot();
        assert_eq!(s.init_count, 1);
        assert_eq!(s.counter(Counter::RegionInitializations), 1);
        assert_eq!(s.counter(Counter::ProcessInitsInitializer), 1);
        assert_eq!(s.counter(Counter::ProcessInitsFastPath), 63);
    }
}

#[test]
fn a_region_whose_initializer_died_mid_init_is_recovered() {
    let (_dir, path) = scratch("r.cache");
    run_killed_at(
        exercise(&["attach", path.to_str().unwrap()]),
        "region.init.mid",
        "the initializer",
    );
    // Left in INITIALIZING: a reader refuses it, with the file named.
    let err = RegionReader::open(&path)
        .err()
        .expect("half-initialized region must not validate");
    assert!(err.to_string().contains("r.cache"), "{err}");

    let (r, rep) = Region::open(&path, &InitParams::default()).unwrap();
    assert_eq!(rep.path, InitPath::Recovered);
    let s = r.snapshot();
    assert_eq!(s.counter(Counter::RegionRecoveries), 1);
    // The victim died before finishing, so only the recovery completed an init.
    assert_eq!(s.init_count, 1);
    let (_r2, rep2) = Region::open(&path, &InitParams::default()).unwrap();
    assert_eq!(rep2.path, InitPath::FastPath);
}

fn write_file(path: &std::path::Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn valid_region_bytes(dir: &std::path::Path) -> Vec<u8> {
    let p = dir.join("valid.cache");
    let _ = Region::open(&p, &InitParams::default()).unwrap();
    std::fs::read(&p).unwrap()
}

/// Both modes must reject `bytes` with an error naming the file and containing `what`.
fn assert_rejected(dir: &std::path::Path, name: &str, bytes: &[u8], what: &str) {
    let p = dir.join(name);
    write_file(&p, bytes);
    let says = |who: &str, err: Option<RegionError>| {
        let err = err.unwrap_or_else(|| panic!("{who} accepted a bad region"));
        assert!(
            err.to_string().contains(name),
            "{who} error must name the file: {err}"
        );
        assert!(
            err.to_string().contains(what),
            "{who} error must say {what:?}: {err}"
        );
    };
    says("reader", RegionReader::open(&p).err());
    let before = std::fs::read(&p).unwrap();
    says("writer", Region::open(&p, &InitParams::default()).err());
    assert_eq!(
        before,
        std::fs::read(&p).unwrap(),
        "a bad region must never be modified"
    );
}

#[test]
fn bad_regions_get_errors_that_name_the_file_and_the_problem() {
    let dir = tempdir();
    let good = valid_region_bytes(dir.path());

    assert_rejected(dir.path(), "truncated.cache", &good[..4096], "truncated");

    let mut magic = good.clone();
    magic[0] ^= 0xff;
    assert_rejected(dir.path(), "magic.cache", &magic, "bad magic");

    let mut future = good.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    assert_rejected(dir.path(), "future.cache", &future, "version 99");

    let mut seed = 0x1234_5678_9abc_def0u64;
    let random: Vec<u8> = (0..good.len())
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    assert_rejected(dir.path(), "random.cache", &random, "bad magic");

    let mut devices = good.clone();
    devices[56..60].copy_from_slice(&1000u32.to_le_bytes());
    assert_rejected(dir.path(), "devices.cache", &devices, "device_count");

    // A short file that holds data is never grown over.
    assert_rejected(
        dir.path(),
        "short-random.cache",
        &random[..100],
        "truncated",
    );
}

#[test]
fn an_empty_file_is_initialized_not_rejected() {
    let (_dir, p) = scratch("empty.cache");
    write_file(&p, &[]);
    let (_r, rep) = Region::open(&p, &InitParams::default()).unwrap();
    assert_eq!(rep.path, InitPath::Initializer);
    RegionReader::open(&p).unwrap();
}

#[test]
fn missing_file_error_names_it() {
    let err = RegionReader::open("/nonexistent/vigil/x.cache")
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("/nonexistent/vigil/x.cache"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The read-only parser never panics on arbitrary bytes, and whatever it accepts
    /// can be snapshotted and drained without panicking.
    #[test]
    fn reader_survives_arbitrary_bytes(
        prefix in proptest::collection::vec(any::<u8>(), 0..256),
        keep_header in any::<bool>(),
        flips in proptest::collection::vec((0usize..1_800_000, any::<u8>()), 0..64),
    ) {
        let dir = tempdir();
        let mut bytes = if keep_header { valid_region_bytes(dir.path()) } else { prefix.clone() };
        if keep_header {
            for (i, v) in &flips {
                if let Some(b) = bytes.get_mut(*i) { *b = *v; }
            }
        }
        let p = dir.path().join("fuzz.cache");
        write_file(&p, &bytes);
        if let Ok(r) = RegionReader::open(&p) {
            let _ = r.snapshot();
            let mut c = r.ring_consumer();
            r.drain(&mut c, usize::MAX, |_| {});
        }
    }
}

#[test]
fn identity_from_the_initializer_reaches_readers_and_garbage_reads_as_unknown() {
    let (_dir, path) = scratch("id.cache");
    let long_pod = "p".repeat(300);
    let params = InitParams {
        identity: RegionIdentity {
            namespace: "team-a".into(),
            pod: long_pod,
            container: "trainer".into(),
        },
        ..InitParams::default()
    };
    let (region, _) = Region::open(&path, &params).unwrap();
    let reader = RegionReader::open(&path).unwrap();
    let id = reader.snapshot().identity;
    assert_eq!(id.namespace, "team-a");
    assert_eq!(id.pod.len(), 128, "truncated to the field");
    assert_eq!(id.container, "trainer");
    // A later process's identity does not overwrite the region's.
    let (_second, _) = Region::open(&path, &InitParams::default()).unwrap();
    assert_eq!(reader.snapshot().identity.namespace, "team-a");
    // Control bytes in the field (a hostile writer) read as "unknown", never a label.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(128)).unwrap();
    f.write_all(b"bad\x01ns").unwrap();
    drop(f);
    assert_eq!(reader.snapshot().identity.namespace, "");
    drop(region);
}

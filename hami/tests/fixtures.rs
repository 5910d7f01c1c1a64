//! The reader against region files written by HAMi-core's own `libvgpu.so`
//! (`tests/fixtures/hami/`, made by `make_fixtures.sh`): every field it reports agrees
//! with the manifest the generator wrote; damaged copies are refused with the reason.

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vigil_hami::{read_region, HamiError};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hami")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

/// The fixture, decompressed into a file of its own.
fn unpack(name: &str, into: &Path) -> PathBuf {
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(dir().join(name)).unwrap());
    let mut raw = Vec::new();
    gz.read_to_end(&mut raw).unwrap();
    let out = into.join(name.trim_end_matches(".gz"));
    std::fs::File::create(&out)
        .unwrap()
        .write_all(&raw)
        .unwrap();
    out
}

#[test]
fn every_fixture_reads_as_its_manifest_says() {
    let m = manifest();
    let fixtures = m["fixtures"].as_object().unwrap();
    assert!(
        fixtures.len() >= 8,
        "fixtures missing: {:?}",
        fixtures.keys()
    );
    let tmp = tempfile::tempdir().unwrap();
    for (name, f) in fixtures {
        let r = read_region(&unpack(name, tmp.path())).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = &f["region"];
        let ctx = |what: &str| format!("{name}: {what}");
        assert_eq!(
            format!("{}.{}", r.major, r.minor),
            f["hami_version"].as_str().unwrap(),
            "{name}"
        );
        let devs = want["device_num"].as_u64().unwrap() as usize;
        assert_eq!(r.devices, devs, "{}", ctx("devices"));
        for d in 0..devs {
            assert_eq!(
                r.limits[d],
                want["limit"][d].as_u64().unwrap(),
                "{}",
                ctx("limit")
            );
            assert_eq!(
                r.sm_limits[d],
                want["sm_limit"][d].as_u64().unwrap(),
                "{}",
                ctx("sm_limit")
            );
            assert_eq!(
                r.uuids[d],
                want["uuids"][d].as_str().unwrap(),
                "{}",
                ctx("uuid")
            );
        }
        assert_eq!(
            r.owner_pid,
            want["owner_pid"].as_u64().unwrap(),
            "{}",
            ctx("owner_pid")
        );
        assert_eq!(
            u64::from(r.sem.value),
            want["sem_value"].as_u64().unwrap(),
            "{}",
            ctx("sem")
        );
        assert_eq!(
            u64::from(r.sem.waiters),
            want["sem_waiters"].as_u64().unwrap(),
            "{}",
            ctx("sem")
        );
        match r.minor {
            2 => assert_eq!(
                u64::from(r.sem_postinit.unwrap().value),
                want["sem_postinit_value"].as_u64().unwrap(),
                "{}",
                ctx("sem_postinit")
            ),
            _ => assert!(
                r.sem_postinit.is_none(),
                "{}",
                ctx("1.1 has no sem_postinit")
            ),
        }
        let slots = want["slots"].as_array().unwrap();
        assert_eq!(
            r.slots.len(),
            want["proc_num"].as_u64().unwrap() as usize,
            "{}",
            ctx("proc_num")
        );
        assert_eq!(r.slots.len(), slots.len(), "{}", ctx("slots"));
        for (got, s) in r.slots.iter().zip(slots) {
            assert_eq!(
                u64::from(got.pid),
                s["pid"].as_u64().unwrap(),
                "{}",
                ctx("pid")
            );
            assert_eq!(
                u64::from(got.host_pid),
                s["hostpid"].as_u64().unwrap(),
                "{}",
                ctx("hostpid")
            );
            assert_eq!(
                i64::from(got.status),
                s["status"].as_i64().unwrap(),
                "{}",
                ctx("status")
            );
            for d in 0..devs {
                let used = &s["used"][d.to_string()];
                let total = used["total"].as_u64().unwrap_or(0);
                assert_eq!(
                    got.devices[d].total,
                    total,
                    "{}",
                    ctx(&format!("slot {} device {d}", got.index))
                );
                assert_eq!(
                    got.devices[d].context,
                    used["context_size"].as_u64().unwrap_or(0),
                    "{}",
                    ctx("context")
                );
                assert_eq!(
                    got.devices[d].data,
                    used["data_size"].as_u64().unwrap_or(0),
                    "{}",
                    ctx("data")
                );
            }
        }
    }
}

#[test]
fn the_states_issue_14_asks_for_are_all_there() {
    let tmp = tempfile::tempdir().unwrap();
    let r = |n: &str| read_region(&unpack(n, tmp.path())).unwrap();
    let dead_owner = r("sem-dead-owner.cache.gz");
    assert!(dead_owner.sem.held() && dead_owner.owner_pid != 0);
    assert!(r("postinit-dead-owner.cache.gz")
        .sem_postinit
        .unwrap()
        .held());
    assert!(r("hostpid0.cache.gz").slots.iter().all(|s| s.host_pid == 0));
    let dead = r("dead-slots.cache.gz");
    assert!(
        dead.used(0) + dead.used(1) > 1 << 30,
        "memory left in dead slots"
    );
    let old = r("v1_1-live.cache.gz");
    assert_eq!((old.major, old.minor), (1, 1));
}

/// A copy of `name` with `bytes` written at `at`.
fn damaged(name: &str, dir: &Path, at: u64, bytes: &[u8]) -> PathBuf {
    let p = unpack(name, dir);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
    p
}

#[test]
fn damaged_copies_are_refused_with_the_field_that_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let err = |p: PathBuf| read_region(&p).unwrap_err();
    // Each damage (bytes written at an offset), and the field the refusal names.
    let corrupt: [(u64, Vec<u8>, &str); 6] = [
        // proc_num past the table, and negative.
        (2008896, 5000i32.to_ne_bytes().to_vec(), "proc_num"),
        (2008896, (-1i32).to_ne_bytes().to_vec(), "proc_num"),
        // device_num past 16.
        (56, 99u64.to_ne_bytes().to_vec(), "device_num"),
        // A UUID without its terminating NUL.
        (64, vec![b'A'; 96], "device uuid"),
        // A usage no device has.
        (
            1856 + 8 + 32,
            u64::MAX.to_ne_bytes().to_vec(),
            "slot used total",
        ),
        // An SM limit over 100 %.
        (1728, 250u64.to_ne_bytes().to_vec(), "sm_limit"),
    ];
    for (at, bytes, field) in corrupt {
        let e = err(damaged("live.cache.gz", t, at, &bytes));
        assert!(
            matches!(&e, HamiError::Corrupt { field: f, .. } if *f == field),
            "{bytes:?} at {at}: {e}"
        );
        assert_eq!(e.reason().name(), "corrupt", "{e}");
    }
    // The message names the file and the value.
    let e = err(damaged("live.cache.gz", t, 2008896, &5000i32.to_ne_bytes()));
    assert!(
        e.to_string().contains("live.cache") && e.to_string().contains("5000"),
        "{e}"
    );
    // A version nobody shipped, and a file from before versioning (major reads 0).
    let e = err(damaged("live.cache.gz", t, 4, &[7, 0, 0, 0, 0, 0, 0, 0]));
    assert!(
        matches!(e, HamiError::UnsupportedVersion { major: 7, .. }),
        "{e}"
    );
    assert_eq!(e.reason().name(), "bad_version");
    // Not HAMi's magic.
    let e = err(damaged("live.cache.gz", t, 0, &[0, 0, 0, 0]));
    assert!(matches!(e, HamiError::WrongMagic { found: 0, .. }), "{e}");
}

#[test]
fn truncated_files_symlinks_and_fifos_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for len in [0u64, 12, 1856, 2008895, 2008951] {
        let p = unpack("live.cache.gz", t);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        let e = read_region(&p).unwrap_err();
        assert!(matches!(e, HamiError::Truncated { .. }), "{len}: {e}");
        assert!(!vigil_hami::read::looks_like_hami(&p) || len >= 4, "{len}");
    }
    let real = unpack("dead-slots.cache.gz", t);
    let link = t.join("link.cache");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = read_region(&link).unwrap_err();
    assert!(
        matches!(
            e,
            HamiError::NotRegularFile {
                what: "a symlink",
                ..
            }
        ),
        "{e}"
    );
    assert!(!vigil_hami::read::looks_like_hami(&link));
    let fifo = t.join("fifo.cache");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = read_region(&fifo).unwrap_err();
    assert!(matches!(e, HamiError::NotRegularFile { .. }), "{e}");
    let e = read_region(t).unwrap_err();
    assert!(
        matches!(e, HamiError::NotRegularFile { .. } | HamiError::Io { .. }),
        "{e}"
    );
}

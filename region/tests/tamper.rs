//! A region file damaged from outside while a writer has it mapped (truncated,
//! zero-filled, re-initialized, its limit forged): the writer gets typed errors and
//! never a signal, never grants past the limit it attached with, and re-attaches.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use vigil_region::layout::*;
use vigil_region::*;

const MIB: u64 = 1 << 20;

fn limited(limit: u64) -> InitParams {
    InitParams {
        device_limits: vec![limit],
        ..InitParams::default()
    }
}

/// A reservation once the region stopped waiting for processes that left: a handle
/// dropped a moment ago can still hold its tokens while another thread of this test
/// binary forks (the child has every descriptor until it execs).
fn reserve_settled(r: &Region, me: SlotHandle, bytes: u64) -> Result<Reservation, RegionError> {
    let t = std::time::Instant::now();
    loop {
        match r.reserve(me, 0, bytes) {
            Err(RegionError::Recovering { .. }) if t.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            other => return other,
        }
    }
}

/// Two handles on the region at `path` (two processes), each granted 100 MiB.
fn two_holding_100_mib(path: &Path, limit: u64) -> [(Region, SlotHandle); 2] {
    [(), ()].map(|()| {
        let (r, _) = Region::open(path, &limited(limit)).unwrap();
        let me = r.claim_slot().unwrap();
        assert_eq!(r.reserve(me, 0, 100 * MIB).unwrap(), Reservation::Granted);
        (r, me)
    })
}

#[test]
fn a_writer_whose_file_is_truncated_lives_and_sees_damage() {
    install_sigbus_guard();
    let (_dir, path) = scratch("r.cache");
    let (r, _) = Region::open(&path, &limited(1 << 30)).unwrap();
    let me = r.claim_slot().unwrap();
    assert_eq!(r.reserve(me, 0, 64 * MIB).unwrap(), Reservation::Granted);
    truncate_to_zero(&path);
    // Without the guard this reservation died of SIGBUS.
    let err = r.reserve(me, 0, MIB).unwrap_err();
    assert!(
        matches!(err, RegionError::Damaged { what, .. } if what.contains("SIGBUS")),
        "{err:?}"
    );
    assert!(r.is_poisoned());
    assert_eq!(err.reason(), "damaged");
    // Once damaged, always damaged, and nothing else is written either.
    assert!(r.credit(me, 0, MIB).is_err());
    assert!(r.charge(me, 0, MIB).is_err());
    assert!(r.release_slot(me).is_err());
    assert_eq!(r.holdings()[0], 64 * MIB, "our own copy survives");
}

#[test]
fn a_zero_filled_or_forged_region_never_grants_past_the_limit_attached_with() {
    let (_dir, path) = scratch("r.cache");
    let limit = 256 * MIB;
    let mut f = std::fs::OpenOptions::new();
    f.write(true);
    let limit_at = std::mem::offset_of!(RegionLayout, devices) as u64;
    let nonce_at = std::mem::offset_of!(Header, init_nonce) as u64;
    // Each way of damaging it, on a fresh region holding 200 MiB of a 256 MiB limit.
    type Damage = fn(&std::fs::File, u64, u64);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "limit forged to 0 (unlimited)",
            |f, limit_at, _| f.write_all_at(&0u64.to_le_bytes(), limit_at).unwrap(),
            "limit",
        ),
        (
            "zero-filled",
            |f, _, _| f.write_all_at(&vec![0u8; REGION_SIZE], 0).unwrap(),
            "magic",
        ),
        (
            "nonce changed",
            |f, _, nonce_at| f.write_all_at(&7u64.to_le_bytes(), nonce_at).unwrap(),
            "re-initialized",
        ),
    ];
    for (what, damage, says) in cases {
        let _ = std::fs::remove_file(&path);
        let (r, _) = Region::open(&path, &limited(limit)).unwrap();
        let me = r.claim_slot().unwrap();
        assert_eq!(r.reserve(me, 0, 200 * MIB).unwrap(), Reservation::Granted);
        damage(&f.open(&path).unwrap(), limit_at, nonce_at);
        let err = r.reserve(me, 0, 100 * MIB).expect_err(what);
        match &err {
            RegionError::Damaged { what: w, .. } => assert!(w.contains(says), "{what}: {w}"),
            e => panic!("{what}: {e:?}"),
        }
        assert_eq!(r.damage().map(|d| d.contains(says)), Some(true));
        assert_eq!(r.enforced_limits(), vec![limit]);
    }
}

/// Two handles on one file stand for two processes (each has its own open file
/// description, so its own tokens). The file is zero-filled under both; the first
/// re-attaches and initializes it afresh, and may not grant anything until the second
/// has re-attached and re-charged what it holds: then the limit holds for both.
#[test]
fn a_region_reinitialized_under_live_processes_grants_nothing_until_they_are_back() {
    let (_dir, path) = scratch("r.cache");
    let limit = 256 * MIB;
    let [(a, sa), (b, sb)] = two_holding_100_mib(&path, limit);
    zero_fill(&path, REGION_SIZE);
    assert!(matches!(
        a.reserve(sa, 0, MIB),
        Err(RegionError::Damaged { .. })
    ));
    // A re-attaches: the zeroed file is initialized afresh (a new nonce), and it sees
    // that processes of the old one are alive.
    let (a2, sa2) = a.reattach_after_damage(&limited(limit)).unwrap();
    assert_ne!(a2.attached_nonce(), a.attached_nonce());
    assert!(a2.is_recovering());
    assert_eq!(
        a2.slot_usage(sa2, 0),
        100 * MIB,
        "A re-charged what it holds"
    );
    drop(a);
    // B has not re-attached: its 100 MiB are missing from the totals.
    match a2.reserve(sa2, 0, 100 * MIB) {
        // 1 (B), or 2 while a fork elsewhere in this binary still holds A's old handle.
        Err(RegionError::Recovering { orphans, .. }) => assert!((1..=2).contains(&orphans)),
        other => panic!("granted while B's memory is unknown: {other:?}"),
    }
    // Charging what already exists (a context) is never refused.
    a2.charge(sa2, 0, MIB).unwrap();
    assert_eq!(a2.credit(sa2, 0, MIB).unwrap(), MIB);
    // B notices, re-attaches to the same fresh region and re-charges.
    assert!(b.reserve(sb, 0, MIB).is_err());
    let (b2, sb2) = b.reattach_after_damage(&limited(limit)).unwrap();
    assert_eq!(b2.attached_nonce(), a2.attached_nonce());
    drop(b);
    // Everyone is back: 200 MiB in use, 56 MiB left under the limit.
    assert!(matches!(
        reserve_settled(&a2, sa2, 100 * MIB).unwrap(),
        Reservation::Denied { used, .. } if used == 200 * MIB
    ));
    assert_eq!(a2.reserve(sa2, 0, 56 * MIB).unwrap(), Reservation::Granted);
    assert!(!a2.is_recovering());
    let s = b2.snapshot();
    assert_eq!(s.devices[0].used, 256 * MIB);
    assert_eq!(s.counter(Counter::DamageReattachments), 2);
    assert_eq!(s.counter(Counter::DamageRecoveries), 1);
    let _ = sb2;
}

/// The file truncated and grown back: the header survives (same nonce), the slots do
/// not. A process that re-attaches marks the region recovering; a new process that
/// attaches meanwhile cannot be granted anything until the others are back.
#[test]
fn a_region_whose_slots_were_lost_recovers_before_granting() {
    install_sigbus_guard();
    let (_dir, path) = scratch("r.cache");
    let limit = 256 * MIB;
    let [(a, sa), (b, _)] = two_holding_100_mib(&path, limit);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096).unwrap();
    f.set_len(REGION_SIZE as u64).unwrap();
    let err = a.reserve(sa, 0, MIB).unwrap_err();
    assert!(
        matches!(&err, RegionError::Damaged { what, .. } if what.contains("slot")),
        "{err:?}"
    );
    let (a2, sa2) = a.reattach_after_damage(&limited(limit)).unwrap();
    assert_eq!(a2.attached_nonce(), a.attached_nonce(), "same region");
    assert!(a2.is_recovering());
    drop(a);
    // A newcomer attaches to the recovering region and is held back too.
    let (c, _) = Region::open(&path, &limited(limit)).unwrap();
    let sc = c.claim_slot().unwrap();
    assert!(matches!(
        c.reserve(sc, 0, 100 * MIB),
        Err(RegionError::Recovering { orphans: 1..=2, .. })
    ));
    let (_b2, _) = b.reattach_after_damage(&limited(limit)).unwrap();
    drop(b);
    // The totals are rebuilt from the slots (the header's old total was stale).
    assert!(matches!(
        reserve_settled(&c, sc, 100 * MIB).unwrap(),
        Reservation::Denied { used, .. } if used == 200 * MIB
    ));
    assert_eq!(c.reserve(sc, 0, 50 * MIB).unwrap(), Reservation::Granted);
    let _ = sa2;
}

/// A region re-initialized after damage by a process with a weaker limit (or none)
/// does not lift the limit a re-attaching process knew.
#[test]
fn re_attaching_keeps_the_stricter_limit_known_before() {
    let (_dir, path) = scratch("r.cache");
    let (a, _) = Region::open(&path, &limited(100 * MIB)).unwrap();
    let sa = a.claim_slot().unwrap();
    truncate_to_zero(&path);
    // The damage is only noticed at the next call; here the file was re-created
    // empty, so the damaged handle reads zeros (no mapping fault: the guard is not
    // needed for a file grown back before the next access).
    let (other, _) = Region::open(&path, &limited(0)).unwrap();
    assert_eq!(
        other.device_limits(),
        vec![0],
        "re-initialized without a limit"
    );
    assert!(a.reserve(sa, 0, MIB).is_err());
    let (a2, sa2) = a.reattach_after_damage(&limited(100 * MIB)).unwrap();
    drop(a);
    assert_eq!(a2.enforced_limits(), vec![100 * MIB]);
    assert!(matches!(
        reserve_settled(&a2, sa2, 200 * MIB).unwrap(),
        Reservation::Denied { limit, .. } if limit == 100 * MIB
    ));
}

/// What a child process does in the guard tests below (this binary re-run).
const CHILD: &str = "VIGIL_TAMPER_CHILD";

fn run_child(test: &str, mode: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(CHILD, mode)
        .status()
        .unwrap()
}

/// Maps `path` shared and returns a pointer to its first page; the file is then
/// truncated to 0, so touching the page faults.
fn truncated_mapping(path: &Path) -> *const u8 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(4096).unwrap();
    // SAFETY: a fresh 4 KiB shared mapping of a file we own, never unmapped (the
    // child process exits).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    f.set_len(0).unwrap();
    p as *const u8
}

extern "C" fn app_handler(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(42) }
}

/// The guard handles faults in region mappings only: any other SIGBUS still goes to
/// the handler the application installed before it, or kills as it would have.
#[test]
fn the_guard_leaves_other_sigbus_faults_to_the_application_or_the_default() {
    let name = "the_guard_leaves_other_sigbus_faults_to_the_application_or_the_default";
    if let Ok(mode) = std::env::var(CHILD) {
        let dir = tempdir();
        if mode == "app" {
            // SAFETY: installs a plain handler that only calls _exit.
            unsafe { libc::signal(libc::SIGBUS, app_handler as *const () as usize) };
        }
        install_sigbus_guard();
        // A region truncated under us first: the guard handles that one itself.
        let path = dir.path().join("r.cache");
        let (r, _) = Region::open(&path, &limited(1 << 30)).unwrap();
        let me = r.claim_slot().unwrap();
        truncate_to_zero(&path);
        assert!(r.reserve(me, 0, 1).is_err());
        assert!(r.is_poisoned());
        // Then a fault in a mapping that is not a region's.
        let p = truncated_mapping(&dir.path().join("other"));
        // SAFETY: deliberately faults (the file under the mapping is gone).
        let v = unsafe { std::ptr::read_volatile(p) };
        eprintln!("read {v}: survived a fault outside any region");
        std::process::exit(0);
    }
    let app = run_child(name, "app");
    assert_eq!(app.code(), Some(42), "the application's handler ran: {app}");
    let dfl = run_child(name, "default");
    assert_eq!(
        dfl.signal(),
        Some(libc::SIGBUS),
        "killed by SIGBUS as without the guard: {dfl}"
    );
}

/// A process that forked children which never exec (data-loader workers) shares its
/// open file description, and with it its slot token, with them. When it re-attaches
/// after damage its old token must not stay held by the children, or the region
/// would wait for it for as long as they live.
#[test]
fn re_attaching_releases_the_old_token_even_where_forked_children_share_it() {
    let (_dir, path) = scratch("r.cache");
    let (a, _) = Region::open(&path, &limited(MIB << 10)).unwrap();
    let sa = a.claim_slot().unwrap();
    // SAFETY: the child only sleeps and exits (async-signal-safe calls only).
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: plain syscalls in the forked child.
        unsafe {
            libc::sleep(30);
            libc::_exit(0);
        }
    }
    assert!(child > 0);
    zero_fill(&path, REGION_SIZE);
    assert!(a.reserve(sa, 0, MIB).is_err());
    let (a2, sa2) = a.reattach_after_damage(&limited(MIB << 10)).unwrap();
    drop(a);
    let r = reserve_settled(&a2, sa2, MIB);
    // SAFETY: ends and reaps the child we forked.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    assert_eq!(r.unwrap(), Reservation::Granted);
}

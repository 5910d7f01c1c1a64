//! Memory reservations across real processes: never past the limit, never leaking,
//! and repaired when a process dies in the middle of one.

mod common;
use common::*;
use std::process::Command;
use vigil_region::*;

const MIB: u64 = 1 << 20;

fn mem(path: &std::path::Path, limit: u64, iterations: u64, seed: u64) -> Command {
    exercise(&[
        "mem",
        path.to_str().unwrap(),
        "--iterations",
        &iterations.to_string(),
        "--seed",
        &seed.to_string(),
        "--device-limit",
        &limit.to_string(),
    ])
}

#[test]
fn sixteen_racing_processes_never_pass_the_limit_and_leave_nothing_behind() {
    let (_dir, path) = scratch("mem.cache");
    let limit = 1024 * MIB;
    let procs: Vec<Proc> = (0..16)
        .map(|i| Proc::spawn(mem(&path, limit, 3000, i + 1)))
        .collect();
    let mut denied = 0;
    for mut p in procs {
        let kv = p.expect("done");
        assert_eq!(
            kv["holding"], kv["slot_usage"],
            "slot share = what it holds"
        );
        denied += get(&kv, "denied");
        p.wait_ok();
    }
    assert!(
        denied > 0,
        "the limit was never reached: the test proves nothing"
    );
    let s = RegionReader::open(&path).unwrap().snapshot();
    assert_eq!(s.devices[0].used, 0, "usage returns to 0");
    assert!(
        s.devices[0].peak <= limit,
        "peak {} > limit",
        s.devices[0].peak
    );
    assert_eq!(s.devices[0].denials, denied);
    assert_eq!(s.counter(Counter::AllocationDenials), denied);
}

#[test]
fn killed_holders_are_credited_back_and_survivors_are_never_falsely_refused() {
    let (_dir, path) = scratch("mem.cache");
    let limit = 512 * MIB;
    // Holders take memory and are SIGKILLed while holding it.
    for seed in 0..4 {
        let mut cmd = mem(&path, limit, 40, 100 + seed);
        cmd.arg("--hold");
        let mut p = Proc::spawn(cmd);
        p.expect("done");
        p.kill9();
    }
    let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
    assert!(
        r.device_usage(0).unwrap().1 > 0,
        "the dead still hold memory"
    );
    let me = r.claim_slot().unwrap();
    let denials_before = r.snapshot().counter(Counter::AllocationDenials);
    // The whole limit fits once the dead are counted out.
    assert_eq!(r.reserve(me, 0, limit).unwrap(), Reservation::Granted);
    assert_eq!(r.device_usage(0), Some((limit, limit)));
    assert_eq!(
        r.snapshot().counter(Counter::AllocationDenials),
        denials_before,
        "no false refusal"
    );
    assert_eq!(
        r.reserve(me, 0, 1).unwrap(),
        Reservation::Denied { used: limit, limit }
    );
    assert_eq!(r.credit(me, 0, limit).unwrap(), limit);
    assert_eq!(
        r.credit(me, 0, 1).unwrap(),
        0,
        "a double free credits nothing"
    );
    assert_eq!(r.device_usage(0), Some((limit, 0)));
}

#[test]
fn a_process_killed_in_the_middle_of_a_reservation_is_repaired() {
    let (_dir, path) = scratch("mem.cache");
    let limit = 256 * MIB;
    // Dies between charging its slot and charging the device, holding the lock.
    run_killed_at(mem(&path, limit, 10, 7), "mem.reserve.mid", "the process");
    let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
    let me = r.claim_slot().unwrap();
    // The next reservation force-posts the lock, rebuilds the totals from the slots
    // (so the dead slot's half-made charge is counted), then reaps the dead slot when
    // the limit would refuse: the whole limit is available.
    assert_eq!(r.reserve(me, 0, limit).unwrap(), Reservation::Granted);
    let s = r.snapshot();
    assert_eq!(s.counter(Counter::ForcePostsRegionOwnerDead), 1);
    assert_eq!(s.devices[0].used, limit);
    r.credit(me, 0, limit).unwrap();
    assert_eq!(r.device_usage(0), Some((limit, 0)));
}

#[test]
fn a_forged_device_total_does_not_cause_lasting_false_ooms() {
    use std::os::unix::fs::FileExt;
    let (_dir, path) = scratch("mem.cache");
    let limit = 256 * MIB;
    let params = InitParams {
        device_limits: vec![limit],
        ..InitParams::default()
    };
    let (r, _) = Region::open(&path, &params).unwrap();
    let me = r.claim_slot().unwrap();
    // Someone writes used = limit into device 0's entry.
    let at = std::mem::offset_of!(vigil_region::layout::RegionLayout, devices) as u64 + 8;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&limit.to_le_bytes(), at).unwrap();
    assert_eq!(r.device_usage(0), Some((limit, limit)));
    // The next reservation that would be refused rebuilds the total from the slots.
    assert_eq!(r.reserve(me, 0, 64 * MIB).unwrap(), Reservation::Granted);
    assert_eq!(r.device_usage(0), Some((limit, 64 * MIB)));
}

#[test]
fn a_process_cap_below_the_region_limit_is_enforced_in_the_same_check() {
    let (dir, path) = scratch("mem.cache");
    let params = InitParams {
        device_limits: vec![1024 * MIB],
        ..InitParams::default()
    };
    let (r, _) = Region::open(&path, &params).unwrap();
    let me = r.claim_slot().unwrap();
    assert_eq!(
        r.reserve_within(me, 0, 200 * MIB, 256 * MIB).unwrap(),
        Reservation::Granted
    );
    assert_eq!(
        r.reserve_within(me, 0, 100 * MIB, 256 * MIB).unwrap(),
        Reservation::Denied {
            used: 200 * MIB,
            limit: 256 * MIB
        }
    );
    // Without the cap the region's own limit applies.
    assert_eq!(r.reserve(me, 0, 100 * MIB).unwrap(), Reservation::Granted);
    // A cap on a device with no region limit is a limit of its own.
    let (u, _) = Region::open(
        dir.path().join("u.cache"),
        &InitParams {
            device_limits: vec![0],
            ..InitParams::default()
        },
    )
    .unwrap();
    let me = u.claim_slot().unwrap();
    assert!(matches!(
        u.reserve_within(me, 0, 2 * MIB, MIB).unwrap(),
        Reservation::Denied { .. }
    ));
}

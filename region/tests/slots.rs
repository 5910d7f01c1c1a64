//! Process slots: claim, release, reclaim after death, fork, PID namespaces.

mod common;
use common::*;
use std::time::Duration;
use vigil_region::procfs;
use vigil_region::*;

#[test]
fn claim_release_and_reclaim_after_sigkill() {
    let (_dir, path) = scratch("r.cache");
    let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
    let a = r.claim_slot().unwrap();
    let b = r.claim_slot().unwrap();
    assert_ne!(a.index, b.index, "two claims in one process get two slots");
    r.release_slot(b).unwrap();
    let c = r.claim_slot().unwrap();
    assert_eq!(c.index, b.index, "a released slot is reused first");
    assert_ne!(c.generation, b.generation, "reuse bumps the generation");
    assert!(r
        .release_slot(SlotHandle {
            index: 999,
            generation: 0
        })
        .is_err());

    // A child holds a slot and takes the detect lock, then is SIGKILLed.
    let mut child = Proc::spawn(exercise(&[
        "hold",
        path.to_str().unwrap(),
        "--lock",
        "detect",
    ]));
    let slot = get(&child.expect("slot"), "index") as u16;
    child.expect("locked");
    let alive = |r: &Region| {
        r.snapshot()
            .slots
            .iter()
            .find(|s| s.index == slot)
            .map(|s| s.alive)
    };
    assert_eq!(alive(&r), Some(true));
    child.kill9();
    assert_eq!(
        alive(&r),
        Some(false),
        "a SIGKILLed owner's token must be free"
    );

    // Its counters were already in the totals; reaping folds nothing twice.
    let before = r.snapshot().counter(Counter::LockAcquisitionsDetect);
    assert_eq!(r.reap_dead_slots(a), 1);
    assert_eq!(r.reap_dead_slots(a), 0, "reaping is idempotent");
    let s = r.snapshot();
    assert_eq!(s.counter(Counter::SlotsReclaimedDead), 1);
    assert_eq!(s.counter(Counter::LockAcquisitionsDetect), before);
    assert!(s.slots.iter().all(|x| x.index != slot));

    // The dead owner's lock is taken over by the next process that wants it.
    let g = r.lock(LockId::Detect, a).unwrap();
    assert_eq!(
        g.outcome().forced.map(|f| f.0),
        Some(ForceReason::OwnerDead)
    );
}

#[test]
fn slots_reclaimed_by_a_new_claimer_when_space_runs_out_of_free_ones() {
    let (_dir, path) = scratch("r.cache");
    let mut child = Proc::spawn(exercise(&["hold", path.to_str().unwrap()]));
    let slot = get(&child.expect("slot"), "index") as u16;
    child.expect("locked");
    child.kill9();
    let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
    // Fill every free slot; the last claim must reclaim the dead one.
    let mut got = Vec::new();
    loop {
        match r.claim_slot() {
            Ok(h) => {
                let reclaimed = h.index == slot;
                got.push(h);
                if reclaimed {
                    break;
                }
            }
            Err(e) => panic!("claim failed before reclaiming the dead slot: {e}"),
        }
    }
    assert_eq!(got.len(), vigil_region::layout::MAX_SLOTS);
    let err = r
        .claim_slot()
        .expect_err("all slots held by a live process");
    assert!(
        err.to_string().contains("r.cache") && err.to_string().contains("1024"),
        "{err}"
    );
    assert_eq!(r.snapshot().counter(Counter::SlotsReclaimedDead), 1);
}

fn fork_pair(path: &std::path::Path, extra: &[&str]) -> (Proc, u64, u64, u64) {
    let mut args = vec!["fork", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(exercise(&args));
    let parent = p.expect("parent");
    let child = p.expect("child");
    let child_pid = get(&child, "pid");
    let child_slot = child
        .get("slot")
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    (p, get(&parent, "slot"), child_slot, child_pid)
}

#[test]
fn a_forked_child_takes_its_own_slot_and_not_its_parents_identity() {
    let (_dir, path) = scratch("r.cache");
    let (mut parent, parent_slot, child_slot, child_pid) = fork_pair(&path, &[]);
    assert_ne!(parent_slot, child_slot);
    parent.kill9();
    let r = RegionReader::open(&path).unwrap();
    let alive = |slot: u64| {
        r.snapshot()
            .slots
            .iter()
            .find(|s| s.index as u64 == slot)
            .map(|s| s.alive)
    };
    assert_eq!(
        alive(parent_slot),
        Some(false),
        "the parent died: its slot must look dead"
    );
    assert_eq!(alive(child_slot), Some(true));
    signal(child_pid as i32, libc::SIGKILL);
    wait_for("the child to die", Duration::from_secs(5), || {
        alive(child_slot) == Some(false)
    });
}

#[test]
fn without_reattach_a_child_would_keep_its_dead_parent_looking_alive() {
    // The negative control for the test above: it proves the check can fail.
    let (_dir, path) = scratch("r.cache");
    let (mut parent, parent_slot, _, child_pid) = fork_pair(&path, &["--no-reattach"]);
    parent.kill9();
    let r = RegionReader::open(&path).unwrap();
    let s = r.snapshot();
    let slot = s
        .slots
        .iter()
        .find(|s| s.index as u64 == parent_slot)
        .unwrap();
    assert!(slot.alive, "the inherited description keeps the token held");
    signal(child_pid as i32, libc::SIGKILL);
}

#[test]
fn processes_in_separate_pid_namespaces_both_pid_1_get_distinct_live_slots() {
    if !unshare_or_skip() {
        return;
    }
    let (_dir, path) = scratch("r.cache");
    let ns = |lock: &str| {
        Proc::spawn(exercise_in_pid_namespace(&[
            "hold",
            path.to_str().unwrap(),
            "--lock",
            lock,
        ]))
    };
    let mut a = ns("region");
    let ka = a.expect("slot");
    a.expect("locked");
    let mut b = ns("detect");
    let kb = b.expect("slot");
    b.expect("locked");
    assert_eq!(ka["pid"], "1");
    assert_eq!(kb["pid"], "1", "both see themselves as PID 1");
    assert_ne!(ka["index"], kb["index"]);
    let r = RegionReader::open(&path).unwrap();
    let alive = |i: &str| {
        r.snapshot()
            .slots
            .iter()
            .find(|s| s.index.to_string() == i)
            .map(|s| s.alive)
    };
    assert_eq!(alive(&ka["index"]), Some(true));
    assert_eq!(alive(&kb["index"]), Some(true));
    a.kill9();
    wait_for(
        "namespace A's process to die",
        Duration::from_secs(5),
        || alive(&ka["index"]) == Some(false),
    );
    assert_eq!(
        alive(&kb["index"]),
        Some(true),
        "same PID, other process: still alive"
    );
    // The region lock A died holding is taken over by a third process.
    let (w, _) = Region::open(&path, &InitParams::default()).unwrap();
    let me = w.claim_slot().unwrap();
    let g = w.lock(LockId::Region, me).unwrap();
    assert_eq!(
        g.outcome().forced.map(|f| f.0),
        Some(ForceReason::OwnerDead)
    );
    drop(g);
    b.kill9();
}

/// The kernel's view of `pid` (as this test sees it), read the same way `claim_slot`
/// reads `/proc/self`.
fn identity_of(pid: u32, ns_pid: u32) -> ProcessIdentity {
    let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    ProcessIdentity {
        pid: ns_pid,
        pidns_inode: procfs::pidns_inode(&dir).unwrap(),
        start_time_ticks: procfs::start_time_ticks(&dir).unwrap(),
    }
}

fn slot_identity(path: &std::path::Path, index: u64) -> ProcessIdentity {
    let s = RegionReader::open(path).unwrap().snapshot();
    s.slots
        .iter()
        .find(|s| s.index as u64 == index)
        .unwrap_or_else(|| panic!("slot {index} not active"))
        .identity()
}

#[test]
fn every_claimant_records_its_kernel_identity_forked_children_included() {
    let (_dir, path) = scratch("r.cache");
    let (r, _) = Region::open(&path, &InitParams::default()).unwrap();
    let me = r.claim_slot().unwrap();
    let mine = slot_identity(&path, me.index as u64);
    assert_eq!(mine, ProcessIdentity::current());
    assert_eq!(mine, identity_of(std::process::id(), std::process::id()));
    assert!(mine.is_complete(), "{mine:?}");

    // A forked child re-claims after reattaching: its own identity, not the parent's.
    let (mut parent, parent_slot, child_slot, child_pid) = fork_pair(&path, &[]);
    let p = slot_identity(&path, parent_slot);
    let c = slot_identity(&path, child_slot);
    assert_eq!(p, identity_of(parent.pid() as u32, parent.pid() as u32));
    assert_eq!(c, identity_of(child_pid as u32, child_pid as u32));
    assert_ne!(p.pid, c.pid);
    assert_eq!(p.pidns_inode, c.pidns_inode, "fork keeps the PID namespace");
    signal(child_pid as i32, libc::SIGKILL);
    parent.kill9();

    // A dead owner's slot reclaimed by a new claimer carries the new claimer's identity.
    let mut holder = Proc::spawn(exercise(&["claim", path.to_str().unwrap()]));
    let kv = holder.expect("slot");
    let slot = get(&kv, "index");
    let pid = holder.pid() as u32;
    assert_eq!(slot_identity(&path, slot), identity_of(pid, pid));
    holder.kill9();
    r.release_slot(me).unwrap();
    let mut got = Vec::new();
    while let Ok(h) = r.claim_slot() {
        got.push(h);
        if h.index as u64 == slot {
            break;
        }
    }
    assert_eq!(slot_identity(&path, slot), ProcessIdentity::current());
}

#[test]
fn a_claimant_in_its_own_pid_namespace_records_that_namespace_and_its_start_time() {
    if !unshare_or_skip() {
        return;
    }
    let (_dir, path) = scratch("r.cache");
    let mut p = Proc::spawn(exercise_in_pid_namespace(&[
        "claim",
        path.to_str().unwrap(),
    ]));
    let kv = p.expect("slot");
    assert_eq!(kv["pid"], "1");
    // The claimant is unshare's only child; its PID as this test sees it:
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.pid()))
        .expect("/proc/<pid>/task/<pid>/children (CONFIG_PROC_CHILDREN)");
    let host_pid: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let want = identity_of(host_pid, 1);
    let got = slot_identity(&path, get(&kv, "index"));
    assert_eq!(got, want);
    assert_ne!(
        got.pidns_inode,
        ProcessIdentity::current().pidns_inode,
        "a namespace of its own"
    );
    assert_eq!(get(&kv, "pidns_inode"), want.pidns_inode);
    assert_eq!(get(&kv, "start_time_ticks"), want.start_time_ticks);
}

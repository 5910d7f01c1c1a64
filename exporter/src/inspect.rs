//! `vigil-exporter inspect PATH [--json]`: a region's state for an operator.
//!
//! Read-only (the region is mapped `PROT_READ`, nothing is locked), so it is safe to
//! run against a region in use. HAMi's `shrreg_tool`, with validation and JSON.
//!
//! Each live slot's process is also looked up in `/proc` (`--proc.path`), as the
//! exporter does (see `hostpid`): `resolved_host_pid` is its PID in that view when
//! that is a host PID. On drivers that report namespace PIDs (`same_namespace`) the
//! recorded PID is not a host PID, and this is how an operator learns the real one.

use crate::hostpid::{self, Resolution};
use serde_json::{json, Value};
use std::path::Path;
use vigil_region::layout::RING_CAPACITY;
use vigil_region::{Counter, DetectOutcome, LockId, RegionReader, SlotInfo, Snapshot};

/// One slot's host PID as the kernel tells it (see `hostpid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCheck {
    /// None for a dead slot: its process is gone, nothing was looked up.
    pub resolution: Option<Resolution>,
    /// `match`, `mismatch`, `unresolvable`, `not_recorded` (as the metric), `pending`
    /// (no detection outcome yet) or `not_checked` (dead slot).
    pub result: &'static str,
}

/// Looks every live slot up in `proc_root` (one pass) and checks it.
pub fn check_slots(proc_root: &Path, slots: &[SlotInfo]) -> Vec<SlotCheck> {
    let wanted: Vec<_> = slots
        .iter()
        .filter(|s| s.alive)
        .map(|s| s.identity())
        .collect();
    let (found, _) = hostpid::scan(proc_root, &wanted);
    slots
        .iter()
        .map(|s| {
            if !s.alive {
                return SlotCheck {
                    resolution: None,
                    result: "not_checked",
                };
            }
            let r = found
                .get(&s.identity())
                .copied()
                .unwrap_or(Resolution::NotFound);
            SlotCheck {
                resolution: Some(r),
                result: hostpid::classify(s.detect_outcome, s.host_pid, Some(r))
                    .map(|c| c.name())
                    .unwrap_or("pending"),
            }
        })
        .collect()
}

fn outcome_name(v: u32) -> &'static str {
    if v == 0 {
        return "none";
    }
    DetectOutcome::from_wire(u64::from(v))
        .map(|o| o.name())
        .unwrap_or("unknown")
}

/// Everything `inspect` prints, as JSON (the text form is rendered from it). `checks`
/// is indexed like `s.slots` (see [`check_slots`]); missing entries print as unknown.
pub fn to_json(path: &Path, s: &Snapshot, checks: &[SlotCheck]) -> Value {
    let created_s = s.created_realtime_ns / 1_000_000_000;
    let dead = crate::collector::dead_bytes(s);
    json!({
        "path": path.display().to_string(),
        "header": {
            "initializations": s.init_count,
            "init_nonce": format!("{:#018x}", s.init_nonce),
            "created_unix_seconds": created_s,
        },
        "identity": {
            "namespace": s.identity.namespace,
            "pod": s.identity.pod,
            "container": s.identity.container,
        },
        "devices": s.devices.iter().enumerate().map(|(i, d)| {
            let dead = dead.get(i).copied().unwrap_or(0);
            json!({
                "device": i, "limit_bytes": d.limit, "used_bytes": d.used,
                "live_bytes": d.used.saturating_sub(dead), "dead_bytes": dead,
                "peak_bytes": d.peak, "allocation_denials": d.denials,
            })
        }).collect::<Vec<_>>(),
        "slots": s.slots.iter().enumerate().map(|(i, sl)| {
            let c = checks.get(i);
            let resolution = c.and_then(|c| c.resolution);
            json!({
                "slot": sl.index, "generation": sl.generation, "pid": sl.pid,
                "pidns_inode": sl.pidns_inode, "start_time_ticks": sl.start_time_ticks,
                "host_pid": sl.host_pid, "detect_outcome": outcome_name(sl.detect_outcome),
                "resolved_host_pid": resolution.and_then(Resolution::host_pid),
                "resolution": resolution.map(Resolution::name).unwrap_or("not_checked"),
                "host_pid_check": c.map(|c| c.result).unwrap_or("not_checked"),
                "alive": sl.alive, "mem_used_bytes": &sl.mem_used[..],
            })
        }).collect::<Vec<_>>(),
        "locks": LockId::ALL.iter().zip(&s.locks).map(|(id, l)| json!({
            "lock": id.name(), "owner_slot": l.owner, "epoch": l.epoch,
            "waiters": l.waiters, "lease_ms": l.lease_ns / 1_000_000,
        })).collect::<Vec<_>>(),
        "counters": Counter::ALL.iter()
            .map(|c| (format!("{c:?}"), json!(s.counter(*c))))
            .collect::<serde_json::Map<_, _>>(),
        "ring": {
            "head": s.ring_head,
            "capacity": RING_CAPACITY,
            "oldest_retained": s.ring_head.saturating_sub(RING_CAPACITY as u64),
        },
    })
}

/// Human-readable rendering.
pub fn to_text(v: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let h = &v["header"];
    let id = &v["identity"];
    let _ = writeln!(o, "region {}", v["path"].as_str().unwrap_or(""));
    let _ = writeln!(
        o,
        "  header: initializations={} nonce={} created_unix={}",
        h["initializations"],
        h["init_nonce"].as_str().unwrap_or(""),
        h["created_unix_seconds"]
    );
    let show = |x: &Value| match x.as_str() {
        Some("") | None => "-".to_string(),
        Some(s) => s.to_string(),
    };
    let _ = writeln!(
        o,
        "  identity: namespace={} pod={} container={}",
        show(&id["namespace"]),
        show(&id["pod"]),
        show(&id["container"])
    );
    for d in v["devices"].as_array().into_iter().flatten() {
        let limit = match d["limit_bytes"].as_u64() {
            Some(0) => "none".to_string(),
            Some(l) => l.to_string(),
            None => "?".into(),
        };
        let _ = writeln!(
            o,
            "  device {}: limit={} used={} (live={} dead={}) peak={} denials={}",
            d["device"],
            limit,
            d["used_bytes"],
            d["live_bytes"],
            d["dead_bytes"],
            d["peak_bytes"],
            d["allocation_denials"]
        );
    }
    for l in v["locks"].as_array().into_iter().flatten() {
        let owner = if l["owner_slot"].is_null() {
            "free".to_string()
        } else {
            format!("slot {}", l["owner_slot"])
        };
        let _ = writeln!(
            o,
            "  lock {}: {} epoch={} waiters={} lease={}ms",
            l["lock"].as_str().unwrap_or(""),
            owner,
            l["epoch"],
            l["waiters"],
            l["lease_ms"]
        );
    }
    let slots = v["slots"].as_array().cloned().unwrap_or_default();
    let alive = slots.iter().filter(|s| s["alive"] == json!(true)).count();
    let _ = writeln!(o, "  slots: {} active, {} alive", slots.len(), alive);
    for s in &slots {
        let resolved = match s["resolved_host_pid"].as_u64() {
            Some(p) => p.to_string(),
            None => "-".into(),
        };
        let _ = writeln!(
            o,
            "    slot {:>4} gen={} pid={} pidns_inode={} start_time_ticks={} host_pid={} resolved_host_pid={} resolution={} check={} detect={} alive={} mem={}",
            s["slot"],
            s["generation"],
            s["pid"],
            s["pidns_inode"],
            s["start_time_ticks"],
            s["host_pid"],
            resolved,
            s["resolution"].as_str().unwrap_or(""),
            s["host_pid_check"].as_str().unwrap_or(""),
            s["detect_outcome"].as_str().unwrap_or(""),
            s["alive"],
            s["mem_used_bytes"]
        );
    }
    let _ = writeln!(o, "  counters:");
    for (k, c) in v["counters"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "    {k:<30} {c}");
    }
    let r = &v["ring"];
    let _ = writeln!(
        o,
        "  ring: head={} capacity={} oldest_retained={}",
        r["head"], r["capacity"], r["oldest_retained"]
    );
    o
}

/// Prints the region at `path`, each live slot's host PID resolved in `proc_root`;
/// errors name the file.
pub fn run(path: &Path, as_json: bool, proc_root: &Path) -> Result<(), String> {
    if vigil_hami::read::looks_like_hami(path) {
        let r = vigil_hami::read_region(path).map_err(|e| e.to_string())?;
        let files = std::collections::HashSet::from([r.file_id]);
        // A /proc that is not the host's proves nothing (see `hami`).
        let host = crate::hami::is_host_view(proc_root);
        let scan = if host {
            crate::hami::scan_attachments(proc_root, &files)
        } else {
            crate::hami::AttachScan::default()
        };
        let attached = scan.by_file.get(&r.file_id).cloned().unwrap_or_default();
        let look = |pid| match host {
            true => crate::hami::lookup(proc_root, pid),
            false => crate::hami::Lookup::Unknown,
        };
        let eval = crate::hami::evaluate(&r, scan.view(r.file_id), &look);
        let v = hami_json(path, &r, &eval, &attached, scan.complete);
        return print_as(&v, as_json, hami_text);
    }
    let r = RegionReader::open(path).map_err(|e| e.to_string())?;
    let snap = r.snapshot();
    let checks = check_slots(proc_root, &snap.slots);
    let v = to_json(path, &snap, &checks);
    print_as(&v, as_json, to_text)
}

/// Prints `v` as pretty JSON, or as the text `text` makes of it.
fn print_as(v: &Value, as_json: bool, text: fn(&Value) -> String) -> Result<(), String> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", text(v));
    }
    Ok(())
}

fn lock_state_name(s: crate::hami::LockState) -> &'static str {
    match s {
        crate::hami::LockState::Free => "free",
        crate::hami::LockState::Held => "held",
        crate::hami::LockState::HeldByDeadOwner => "held_by_dead_owner",
    }
}

fn liveness_name(l: crate::hami::Liveness) -> &'static str {
    match l {
        crate::hami::Liveness::Alive => "alive",
        crate::hami::Liveness::Dead => "dead",
        crate::hami::Liveness::Unknown => "unknown",
    }
}

/// A HAMi-core region as JSON: the header, both locks, and every used slot with its
/// liveness as the exporter judges it.
pub fn hami_json(
    path: &Path,
    r: &vigil_hami::HamiRegion,
    eval: &crate::hami::Eval,
    attached: &[crate::hami::Attached],
    complete: bool,
) -> Value {
    let lock = |s: vigil_hami::SemState, st: crate::hami::LockState| json!({"value": s.value, "waiters": s.waiters, "state": lock_state_name(st)});
    json!({
        "path": path.display().to_string(),
        "kind": "hami-core",
        "version": format!("{}.{}", r.major, r.minor),
        "devices": (0..r.devices).map(|d| json!({
            "index": d,
            "uuid": r.uuids[d],
            "limit_bytes": r.limits[d],
            "sm_limit_percent": r.sm_limits[d],
            "used_bytes": r.used(d),
            "dead_bytes": eval.dead_bytes[d],
        })).collect::<Vec<_>>(),
        "owner_pid": r.owner_pid,
        "sem": lock(r.sem, eval.sem),
        "sem_postinit": match (r.sem_postinit, eval.sem_postinit) {
            (Some(s), Some(st)) => lock(s, st),
            _ => Value::Null,
        },
        "priority": r.priority,
        "processes_mapping_file": attached.iter().map(|a| json!({"host_pid": a.host_pid, "ns_pid": a.ns_pid})).collect::<Vec<_>>(),
        "mapping_list_complete": complete,
        "slots": r.slots.iter().zip(eval.slots.iter()).map(|(s, l)| json!({
            "index": s.index,
            "pid": s.pid,
            "hostpid": s.host_pid,
            "status": s.status,
            "liveness": liveness_name(*l),
            "used_bytes": s.devices.iter().map(|d| d.total).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The text form of [`hami_json`].
pub fn hami_text(v: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "HAMi-core region {} (version {})",
        v["path"].as_str().unwrap_or(""),
        v["version"].as_str().unwrap_or("")
    );
    for d in v["devices"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  device {}: {} limit {} B, SM limit {}%, used {} B ({} B by dead processes)",
            d["index"],
            d["uuid"].as_str().unwrap_or(""),
            d["limit_bytes"],
            d["sm_limit_percent"],
            d["used_bytes"],
            d["dead_bytes"]
        );
    }
    for name in ["sem", "sem_postinit"] {
        let l = &v[name];
        if l.is_null() {
            continue;
        }
        let _ = writeln!(
            o,
            "  {name}: {} (value {}, {} waiting){}",
            l["state"].as_str().unwrap_or(""),
            l["value"],
            l["waiters"],
            if name == "sem" {
                format!(", owner_pid {}", v["owner_pid"])
            } else {
                String::new()
            }
        );
    }
    if v["mapping_list_complete"] == Value::Bool(false) {
        let _ = writeln!(
            o,
            "  (some /proc/PID/maps were unreadable: liveness from recorded host PIDs only)"
        );
    }
    let slots = v["slots"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "  {} slot(s):", slots.len());
    for s in slots {
        let _ = writeln!(
            o,
            "    [{}] pid {} hostpid {} {} used {}",
            s["index"],
            s["pid"],
            s["hostpid"],
            s["liveness"].as_str().unwrap_or(""),
            s["used_bytes"]
        );
    }
    o
}

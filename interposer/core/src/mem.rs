//! Device-memory accounting for the allocation hooks: admit (reserve against the
//! region's limit), then commit the real allocation under its key, or roll back if the
//! driver refused it; credit on free. The region does the cross-process part (see
//! `vigil_region::mem`); this module keeps the process-local map from pointer or VMM
//! handle to (device, bytes), which the frees need because they name only the pointer.

use crate::log::{vlog, DEBUG, WARN};
use std::collections::HashMap;
use std::sync::Mutex;
use vigil_region::{RegionError, Reservation};

/// What an allocation is known by when it is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A device pointer (cuMemAlloc*, cuMemAllocManaged, the async allocators).
    Ptr(u64),
    /// A VMM physical allocation handle (cuMemCreate / cuMemRelease).
    Handle(u64),
}

/// The outcome of admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Vigil is not accounting here (not running, unknown device): call the driver.
    Pass,
    /// Reserved; finish with `commit` or `abort`.
    Charged(Ticket),
    /// Over the limit: the hook returns CUDA_ERROR_OUT_OF_MEMORY.
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    dev: usize,
    bytes: u64,
}

static LIVE: Mutex<Option<HashMap<Key, (usize, u64)>>> = Mutex::new(None);

fn live<T>(f: impl FnOnce(&mut HashMap<Key, (usize, u64)>) -> T) -> T {
    let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// This process's own limits from its environment, for `VIGIL_LIMIT_POLICY=closed`.
static OWN: std::sync::OnceLock<crate::limits::Parsed> = std::sync::OnceLock::new();

pub fn set_own_limits(p: &crate::limits::Parsed) {
    let _ = OWN.set(p.clone());
}

fn closed() -> bool {
    crate::config().limit_policy == crate::config::LimitPolicy::Closed
}

/// Under the closed policy, this process's own limit for `dev` (0 = none) and whether
/// its limit variable for the device was invalid. Read after Vigil started here
/// (`with_process` starts it, which records OWN).
fn own_limit(dev: usize) -> (u64, bool) {
    match OWN.get() {
        Some(own) if closed() => (
            own.limits.get(dev).copied().unwrap_or(0),
            own.invalid.get(dev) == Some(&true),
        ),
        _ => (0, false),
    }
}

/// Says once per process why the closed policy refuses everything here.
fn refuse_unenforceable(what: &str, why: &str) -> Admit {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        vlog!(
            WARN,
            "{what}: refused: {why}, and VIGIL_LIMIT_POLICY=closed (the default when a limit is set) refuses what it cannot account"
        );
    }
    Admit::Deny
}

/// Reserves `bytes` on CUDA device `dev` for `what`.
pub fn admit(what: &str, dev: Option<usize>, bytes: u64) -> Admit {
    let Some(dev) = dev else {
        return Admit::Pass;
    };
    if bytes == 0 {
        return Admit::Pass;
    }
    let r = crate::process::with_region(|region, slot| {
        let (cap, invalid) = own_limit(dev);
        if invalid {
            return Ok(Err(format!(
                "the CUDA_DEVICE_MEMORY_LIMIT setting for device {dev} is invalid (see the error at start-up)"
            )));
        }
        let theirs = region.enforced_limits().get(dev).copied().unwrap_or(0);
        region
            .reserve_within(slot, dev, bytes, cap)
            .map(|res| Ok((res, cap, theirs)))
    });
    match r {
        None if closed() => refuse_unenforceable(what, "Vigil is not running in this process"),
        None => Admit::Pass,
        Some(Ok(Err(why))) => {
            vlog!(WARN, "{what}({bytes} bytes) on device {dev} refused: {why}");
            Admit::Deny
        }
        Some(Ok(Ok((Reservation::Granted, ..)))) => Admit::Charged(Ticket { dev, bytes }),
        Some(Ok(Ok((Reservation::Denied { used, limit }, cap, theirs)))) => {
            let whose = if cap > 0 && cap == limit && (theirs == 0 || cap < theirs) {
                "this process's own CUDA_DEVICE_MEMORY_LIMIT, stricter than the region's"
            } else {
                "CUDA_DEVICE_MEMORY_LIMIT"
            };
            vlog!(
                WARN,
                "{what}({bytes} bytes) on device {dev} refused: {used} of the {limit}-byte limit ({whose}) in use; returning CUDA_ERROR_OUT_OF_MEMORY"
            );
            Admit::Deny
        }
        // Damaged and not re-attached (yet): nothing in the region can be trusted.
        Some(Err(RegionError::Damaged { .. })) => unchecked(),
        // Re-attached, but others that used the damaged region have not yet: their
        // memory is missing from the totals, so no limit can be checked. The open
        // policy still accounts what it lets through.
        Some(Err(e @ RegionError::Recovering { .. })) => {
            note_recovering(&e);
            if closed() {
                return unchecked();
            }
            match crate::process::with_region(|region, slot| region.charge(slot, dev, bytes)) {
                Some(Ok(())) => {
                    crate::process::DAMAGE
                        .passed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Admit::Charged(Ticket { dev, bytes })
                }
                _ => unchecked(),
            }
        }
        Some(Err(e)) if closed() => refuse_unenforceable(what, &e.to_string()),
        Some(Err(e)) => {
            note_error(what, &e);
            Admit::Pass
        }
    }
}

/// An allocation the region cannot check (damaged, or recovering from damage):
/// refused under the closed policy, passed through under the open one; counted
/// either way (the counts are logged at exit, see `init::report_damage`).
fn unchecked() -> Admit {
    use std::sync::atomic::Ordering::Relaxed;
    if closed() {
        crate::process::DAMAGE.refused.fetch_add(1, Relaxed);
        Admit::Deny
    } else {
        crate::process::DAMAGE.passed.fetch_add(1, Relaxed);
        Admit::Pass
    }
}

/// Says once per recovery (not per allocation) that the region waits for others.
fn note_recovering(e: &RegionError) {
    static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);
    let episode = crate::process::DAMAGE
        .reattached
        .load(std::sync::atomic::Ordering::Relaxed);
    if SAID.swap(episode, std::sync::atomic::Ordering::Relaxed) != episode {
        vlog!(WARN, "{e}; {}", match closed() {
            true => "refusing allocations until they have (VIGIL_LIMIT_POLICY=closed)",
            false => "allocations are accounted but not limited until they have (VIGIL_LIMIT_POLICY=open)",
        });
    }
}

/// Reserves a detection marker. Detection runs while Vigil is starting, so it cannot
/// go through `admit` (which would wait for the start to finish); the limits are the
/// same. Ok(false): over a limit.
pub fn reserve_marker(
    region: &vigil_region::Region,
    slot: vigil_region::SlotHandle,
    dev: usize,
    bytes: u64,
) -> Result<bool, String> {
    let (cap, invalid) = own_limit(dev);
    if invalid {
        return Ok(false);
    }
    match region.reserve_quietly(slot, dev, bytes, cap) {
        Ok(Reservation::Granted) => Ok(true),
        Ok(Reservation::Denied { .. }) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// What our detection-device context measured, for contexts on other devices.
static FOOTPRINT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn note_context_footprint(bytes: u64) {
    FOOTPRINT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Devices whose primary context this process has charged (bit per ordinal; device
/// 0's is charged by detection).
static CTX_CHARGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A context now exists on CUDA device `dev`: charge what a context takes (measured
/// on our detection device, else the region's estimate) once per device. Contexts
/// are not refused: the driver already made it; the limit then leaves less for
/// allocations. Credited with the slot at exit.
pub fn context_created(dev: usize) {
    if dev >= 64 {
        return;
    }
    let bit = 1u64 << dev;
    if CTX_CHARGED.fetch_or(bit, std::sync::atomic::Ordering::AcqRel) & bit != 0 {
        return;
    }
    let r = crate::process::with_region(|region, slot| {
        let bytes = match FOOTPRINT.load(std::sync::atomic::Ordering::Relaxed) {
            0 => region.ctx_footprint().min(8 << 30),
            b => b,
        };
        region.charge(slot, dev, bytes).map(|()| bytes)
    });
    match r {
        Some(Ok(bytes)) => {
            vlog!(
                DEBUG,
                "primary context on device {dev}: {bytes} bytes charged"
            )
        }
        Some(Err(e)) => note_error("context", &e),
        None => {
            // Not running: let a later start try again.
            CTX_CHARGED.fetch_and(!bit, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// A forked child charges its own contexts afresh.
pub fn forget_contexts() {
    CTX_CHARGED.store(1, std::sync::atomic::Ordering::Release);
}

fn note_error(what: &str, e: &RegionError) {
    // Damage is logged once, where it was found (`init`), not on every call.
    if !matches!(e, RegionError::Damaged { .. }) {
        vlog!(
            WARN,
            "{what}: accounting unavailable ({e}); passing through"
        );
    }
}

/// The real allocation succeeded as `key`, of `actual` bytes (which may differ from
/// the reservation, as with a pitched allocation's padding).
pub fn commit(t: Ticket, key: Key, actual: u64) {
    // Only a pitched allocation can differ: do not take the region lock for nothing.
    let adjust = (actual != t.bytes)
        .then(|| {
            crate::process::with_region(|region, slot| {
                if actual > t.bytes {
                    region.charge(slot, t.dev, actual - t.bytes)
                } else {
                    region.credit(slot, t.dev, t.bytes - actual).map(|_| ())
                }
            })
        })
        .flatten();
    if let Some(Err(e)) = adjust {
        note_error("allocation", &e);
    }
    if let Some((dev, bytes)) = live(|m| m.insert(key, (t.dev, actual))) {
        // The driver reused a key we thought live: its free went past us. Credit
        // the stale entry so it cannot leak.
        vlog!(DEBUG, "{key:?} reused; crediting {bytes} stale bytes");
        credit(dev, bytes);
    }
}

/// The real allocation failed: give the reservation back.
pub fn abort(t: Ticket) {
    credit(t.dev, t.bytes);
}

/// What `key` holds, out of the map (before the real free).
pub fn take(key: Key) -> Option<(usize, u64)> {
    live(|m| m.remove(&key))
}

/// The real free succeeded: credit what the entry held.
pub fn credit_entry((dev, bytes): (usize, u64)) {
    credit(dev, bytes);
}

/// The real free failed: the allocation lives on.
pub fn restore(key: Key, entry: (usize, u64)) {
    live(|m| m.insert(key, entry));
}

fn credit(dev: usize, bytes: u64) {
    if let Some(Err(e)) =
        crate::process::with_region(|region, slot| region.credit(slot, dev, bytes))
    {
        note_error("free", &e);
    }
}

/// Virtualized (total, free) for a device with a limit: total is the limit, free is
/// what the limit leaves (never more than the device really has free). The
/// subtraction saturates: usage past the limit reads as 0 free, never 17 TB.
pub fn virtual_info(limit: u64, used: u64, real_free: u64, real_total: u64) -> (u64, u64) {
    let total = if real_total == 0 {
        limit
    } else {
        limit.min(real_total)
    };
    (total, limit.saturating_sub(used).min(real_free).min(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_info_saturates_and_never_exceeds_the_device() {
        let g = 1u64 << 30;
        assert_eq!(virtual_info(4 * g, g, 70 * g, 80 * g), (4 * g, 3 * g));
        // Usage past the limit (contexts are charged regardless): 0 free, not 2^64.
        assert_eq!(virtual_info(g, 2 * g, 70 * g, 80 * g), (g, 0));
        // The device itself has less free than the limit leaves.
        assert_eq!(virtual_info(4 * g, 0, g / 2, 80 * g), (4 * g, g / 2));
        // A limit above the device's size is capped by the device.
        assert_eq!(virtual_info(100 * g, 0, 80 * g, 80 * g), (80 * g, 80 * g));
    }
}

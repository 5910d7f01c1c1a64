//! The header check every handle makes before it trusts a region: writers after
//! initializing or joining one, readers at open and on every revalidation.

use crate::error::RegionError;
use crate::layout::*;
use std::path::Path;
use std::sync::atomic::Ordering::*;

/// Checks every header field a reader relies on. Used by writers and readers alike.
pub(crate) fn validate(
    layout: &RegionLayout,
    path: &Path,
    file_len: u64,
) -> Result<(), RegionError> {
    let h = &layout.header;
    let corrupt = |field, value: u64, why| RegionError::Corrupt {
        path: path.to_path_buf(),
        field,
        value,
        why,
    };
    let magic = h.magic.load(Acquire);
    if magic != MAGIC {
        return Err(RegionError::WrongMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let version = h.version.load(Relaxed);
    if version != LAYOUT_VERSION {
        return Err(RegionError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: LAYOUT_VERSION,
        });
    }
    let state = h.state.load(Acquire);
    if state != STATE_READY {
        if state > STATE_READY {
            return Err(corrupt("header.state", state as u64, "not a known state"));
        }
        return Err(RegionError::NotReady {
            path: path.to_path_buf(),
            state,
        });
    }
    let size = h.region_size.load(Relaxed);
    if size != REGION_SIZE as u64 {
        return Err(corrupt(
            "header.region_size",
            size,
            "does not match layout size",
        ));
    }
    if file_len < REGION_SIZE as u64 {
        return Err(RegionError::Truncated {
            path: path.to_path_buf(),
            len: file_len,
            expected: REGION_SIZE as u64,
        });
    }
    let dc = h.device_count.load(Relaxed);
    if dc as usize > MAX_DEVICES {
        return Err(corrupt(
            "header.device_count",
            dc as u64,
            "exceeds 16 devices",
        ));
    }
    // The fixed-size arrays: a region of another build's layout is corrupt here.
    for (what, found, want) in [
        ("header.slot_count", h.slot_count.load(Relaxed), MAX_SLOTS),
        (
            "header.ring_capacity",
            h.ring_capacity.load(Relaxed),
            RING_CAPACITY,
        ),
    ] {
        if found as usize != want {
            return Err(corrupt(what, found as u64, "does not match layout"));
        }
    }
    for l in &layout.locks {
        if l.lease_ns.load(Relaxed) == 0 {
            return Err(corrupt(
                "locks.lease_ns",
                0,
                "a lease of zero would evict every owner",
            ));
        }
    }
    Ok(())
}

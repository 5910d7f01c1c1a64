//! Test-only hold and panic points, compiled in only with the `fault-injection`
//! feature (the scenario tests build libvigil.so with it; releases never do).

/// Panics here if `VIGIL_FAULT` names this point.
pub fn panic_point(name: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("VIGIL_FAULT").is_ok_and(|v| v.split(',').any(|p| p.trim() == name)) {
        panic!("vigil test panic at {name}");
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

/// `VIGIL_TEST_HOLD_DETECT_MS`, if set to a number.
#[cfg(feature = "fault-injection")]
fn hold_ms() -> Option<u64> {
    std::env::var("VIGIL_TEST_HOLD_DETECT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
}

/// Holds the detection lock for `VIGIL_TEST_HOLD_DETECT_MS` before detecting, so a
/// test can kill the holder at a known point.
pub fn hold_detect() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = hold_ms() {
        crate::log::vlog!(
            crate::log::INFO,
            "test hold point: holding the detection lock {ms} ms"
        );
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Parallel detection holds no detection lock: the same test variable holds the
/// region lock instead, so a test can still kill a lock holder at a known point.
pub fn hold_region_lock(region: &vigil_region::Region, slot: vigil_region::SlotHandle) {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = hold_ms() {
        crate::log::vlog!(
            crate::log::INFO,
            "test hold point: holding the region lock {ms} ms"
        );
        if let Ok(g) = region.lock(vigil_region::LockId::Region, slot) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            g.release();
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = (region, slot);
}

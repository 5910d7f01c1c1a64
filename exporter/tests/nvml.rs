//! NVML through nvml-wrapper, against the simulator's stand-in `libnvidia-ml.so.1`:
//! device identity and memory, per-region NVML usage, and an accounting drift made to
//! appear on purpose by a workload that allocates past the interposer.

mod common;

use common::sim::*;
use common::*;
use std::time::Duration;

const MIB: f64 = (1u64 << 20) as f64;

const REGION: (&str, &str) = ("region", "u1_main/vigil.cache");

/// The simulator, the uncounted fixture running with `n` contexts created past the
/// interposer, and an exporter reading NVML.
fn uncounted_contexts(n: u32) -> (Sim, Kill, Exporter) {
    let sim = Sim::start();
    let prog = sim.build_uncounted();
    let w = Kill(sim.workload(&prog, &[&n.to_string()]));
    let e = sim.exporter(&[]);
    (sim, w, e)
}

#[test]
fn memory_allocated_past_the_interposer_shows_as_drift() {
    let (_sim, _w, e) = uncounted_contexts(2);
    let want = (2 * CTX_MIB) as f64 * MIB;
    let mut last = String::new();
    wait_until(
        "a drift of the two uncounted contexts",
        Duration::from_secs(20),
        || {
            let m = e.scrape();
            let drift = m.find(
                "vigil_device_memory_accounting_drift_bytes",
                &[REGION, ("device", "0")],
            );
            last = format!(
                "{:?} {:?} {:?}",
                drift.iter().map(|s| s.value).collect::<Vec<_>>(),
                m.find("vigil_exporter_nvml_up", &[])
                    .first()
                    .map(|s| s.value),
                m.find("vigil_device_memory_used_bytes", &[])
                    .iter()
                    .map(|s| s.value)
                    .collect::<Vec<_>>()
            );
            drift.len() == 1 && drift[0].value == want
        },
    );
    let m = e.scrape();
    // NVML's side is Vigil's plus the two contexts, and the device's identity is there.
    let seen = m.value(
        "vigil_nvml_process_memory_bytes",
        &[REGION, ("device", "0")],
    );
    let used = m.value("vigil_device_memory_used_bytes", &[REGION, ("device", "0")]);
    assert_eq!(seen - used, want, "last drift seen {last}");
    let info = m.find("vigil_device_info", &[("device", "0")]);
    assert_eq!(info.len(), 1);
    assert!(
        info[0].labels["uuid"].starts_with("GPU-"),
        "{:?}",
        info[0].labels
    );
    assert_eq!(info[0].labels["model"], "Vigil Simulated GPU");
    assert_eq!(
        m.value("vigil_nvml_device_memory_total_bytes", &[("device", "0")]),
        16.0 * 1024.0 * MIB
    );
    assert!(m.value("vigil_nvml_device_memory_used_bytes", &[("device", "0")]) >= seen);
    assert_eq!(m.value("vigil_exporter_nvml_up", &[]), 1.0);
}

#[test]
fn a_fully_counted_workload_has_no_drift() {
    let (_sim, _w, e) = uncounted_contexts(0);
    wait_until(
        "NVML's view of the workload",
        Duration::from_secs(20),
        || {
            e.scrape()
                .find(
                    "vigil_nvml_process_memory_bytes",
                    &[REGION, ("device", "0")],
                )
                .iter()
                .any(|s| s.value > 0.0)
        },
    );
    let m = e.scrape();
    assert_eq!(
        m.value(
            "vigil_device_memory_accounting_drift_bytes",
            &[REGION, ("device", "0")]
        ),
        0.0
    );
}

#[test]
fn without_a_driver_library_nvml_series_are_absent_and_the_rest_unchanged() {
    let sim = Sim::start();
    let prog = sim.build_uncounted();
    let _w = Kill(sim.workload(&prog, &["0"]));
    let regions = sim.regions();
    let e = Exporter::watching(
        &regions,
        &["--nvml.library", "/nonexistent/libnvidia-ml.so.1"],
    );
    wait_until("the region", Duration::from_secs(10), || {
        e.scrape().has("vigil_device_memory_used_bytes", &[REGION])
    });
    let m = e.scrape();
    assert_eq!(m.value("vigil_exporter_nvml_up", &[]), 0.0);
    assert!(m.value("vigil_exporter_nvml_errors_total", &[]) >= 1.0);
    for name in [
        "vigil_device_info",
        "vigil_nvml_device_memory_total_bytes",
        "vigil_nvml_process_memory_bytes",
        "vigil_device_memory_accounting_drift_bytes",
    ] {
        assert!(!m.has(name, &[]), "{name} without a driver");
    }
    assert!(
        e.log_text().contains("/nonexistent/libnvidia-ml.so.1"),
        "{}",
        e.log_text()
    );
    // --nvml off: not even the exporter's NVML self-metrics.
    let off = Exporter::start(&["--regions-dir", regions.to_str().unwrap(), "--nvml", "off"]);
    let body = off.get("/metrics").body;
    assert!(
        !body.contains("vigil_exporter_nvml") && !body.contains("vigil_device_info"),
        "{body}"
    );
    assert!(body.contains("vigil_device_memory_used_bytes{"));
}

#[test]
fn an_nvml_that_hangs_never_stalls_a_scrape() {
    // Every NVML call of this simulator hangs for a minute, nvmlInit included.
    let sim = Sim::start_with(&["--nvml-hang", "60s", "--nvml-hang-rate", "1"]);
    let e = sim.exporter(&[]);
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let m = e.scrape();
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(m.value("vigil_exporter_nvml_up", &[]), 0.0);
        assert!(!m.has("vigil_device_info", &[]));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

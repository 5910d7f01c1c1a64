//! HAMi-core settings Vigil does not enforce: a workload that sets one is warned at
//! start, counted in the region, and exported while it lives.

mod common;

use common::sim::*;
use common::*;
use std::io::Read;
use std::time::Duration;

const REGION: (&str, &str) = ("region", "u1_main/vigil.cache");

fn gauge(e: &Exporter, setting: &str) -> Option<f64> {
    e.scrape()
        .find("vigil_unenforced_settings", &[REGION, ("setting", setting)])
        .first()
        .map(|s| s.value)
}

#[test]
fn an_sm_limit_is_warned_counted_and_exported_while_its_process_lives() {
    let sim = Sim::start();
    let prog = sim.build_uncounted();
    let mut limited = Kill(sim.workload_env(
        &prog,
        &["0"],
        &[("CUDA_DEVICE_SM_LIMIT", "50"), ("CUDA_TASK_PRIORITY", "1")],
    ));
    let _plain = Kill(sim.workload(&prog, &["0"]));
    let e = sim.exporter(&[]);
    wait_until("the region's series", Duration::from_secs(10), || {
        gauge(&e, "sm_limit").is_some()
    });
    assert_eq!(gauge(&e, "sm_limit"), Some(1.0));
    assert_eq!(gauge(&e, "task_priority"), Some(1.0));
    // Settings nobody uses are not exported (a series each per region otherwise).
    for other in [
        "oversubscribe",
        "core_utilization_policy",
        "active_oom_killer",
    ] {
        assert_eq!(gauge(&e, other), None, "{other}");
    }
    let mut err = limited.0.stderr.take().unwrap();
    limited.0.kill().unwrap();
    limited.0.wait().unwrap();
    let mut text = String::new();
    err.read_to_string(&mut text).unwrap();
    assert!(
        text.contains(r#"CUDA_DEVICE_SM_LIMIT="50""#)
            && text.contains("not enforced by Vigil")
            && text.contains("sm_limit"),
        "{text}"
    );
    // Gone with its process: the series goes (no live process has it any more),
    // while the region's other series stay.
    wait_until(
        "the gauge to follow the process",
        Duration::from_secs(10),
        || gauge(&e, "sm_limit").is_none(),
    );
    assert_eq!(e.scrape().value("vigil_processes", &[REGION]), 1.0);
}

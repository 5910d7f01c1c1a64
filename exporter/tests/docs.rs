//! docs/metrics.md and /metrics must agree: same families, types and label names.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use vigil_region::{HistogramId, InitParams, LockId, Region, RegionIdentity, UnenforcedSetting};

const REGION_LABELS: [&str; 5] = ["region", "namespace", "pod", "pod_uid", "container"];

/// Family name -> (type, label names), from the tables in docs/metrics.md.
fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let md = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in md.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5
            || !(cells[1].starts_with("`vigil_") || cells[1].starts_with("`process_"))
        {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let mut labels = BTreeSet::new();
        for part in cells[3].split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "*region labels*" {
                labels.extend(REGION_LABELS.iter().map(|s| s.to_string()));
            } else {
                labels.insert(part.trim_matches('`').to_string());
            }
        }
        assert!(
            out.insert(name.clone(), (cells[2].to_string(), labels))
                .is_none(),
            "{name} documented twice"
        );
    }
    out
}

#[test]
fn docs_metrics_md_matches_metrics_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("uid-1_main");
    std::fs::create_dir(&sub).unwrap();
    let params = InitParams {
        device_limits: vec![1 << 30],
        identity: RegionIdentity {
            namespace: "ns".into(),
            pod: "p".into(),
            container: "c".into(),
        },
        ..InitParams::default()
    };
    let (w, _) = Region::open(sub.join("r.cache"), &params).unwrap();
    // Families exported only with data: a histogram with no observation, a setting
    // nobody uses. Give each some, by the region's own API.
    let me = w.claim_slot().unwrap();
    w.count(Some(me.index), UnenforcedSetting::SmLimit.counter(), 1);
    for id in [
        HistogramId::lock_wait(LockId::Region),
        HistogramId::DetectionLatency,
        HistogramId::DetectionPolls,
    ] {
        w.observe(id, 1_000_000);
    }
    // A HAMi-core region (written by HAMi-core's libvgpu.so), for the families only
    // those have and the `interposer` label.
    let hami = dir.path().join("uid-2_main");
    std::fs::create_dir(&hami).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(
            std::fs::File::open(repo_root().join("tests/fixtures/hami/live.cache.gz")).unwrap(),
        ),
        &mut raw,
    )
    .unwrap();
    std::fs::write(hami.join("vgpu.cache"), raw).unwrap();
    // NVML from the simulator's stand-in, for the NVML families.
    let sim = common::sim::Sim::start();
    let nvml = sim.lib().join("libnvidia-ml.so.1");
    let sock = sim.socket();
    // The identity block supplies namespace/pod/container only when trusted.
    let ex = Exporter::start_with(
        &[
            "--regions-dir.scan-interval",
            "100ms",
            "--regions-dir",
            dir.path().to_str().unwrap(),
            "--labels.from-region-identity",
            // HAMi-core regions have no identity block: a fixed namespace and pod for
            // all (pod_uid comes from the directories).
            "--labels.namespace",
            "ns",
            "--labels.pod",
            "p",
            "--nvml.library",
            nvml.to_str().unwrap(),
            "--nvml.interval",
            "100ms",
        ],
        |c| {
            c.env("VIGIL_GPUSIM_SOCKET", &sock);
        },
    );
    let m = ex.scrape_until("every family to have series", |m| {
        m.value("vigil_exporter_hami_regions", &[]) == 1.0
            && m.has("vigil_device_memory_accounting_drift_bytes", &[])
    });

    let mut served: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for (fam, ty) in &m.types {
        let mut labels = BTreeSet::new();
        for s in &m.samples {
            let base = match ty.as_str() {
                "histogram" => s
                    .name
                    .strip_suffix("_bucket")
                    .or_else(|| s.name.strip_suffix("_sum"))
                    .or_else(|| s.name.strip_suffix("_count"))
                    .unwrap_or(&s.name),
                _ => &s.name,
            };
            if base == fam {
                labels.extend(s.labels.keys().filter(|k| *k != "le").cloned());
            }
        }
        served.insert(fam.clone(), (ty.clone(), labels));
    }
    let docs = documented();
    let names = |m: &BTreeMap<String, _>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        names(&docs),
        names(&served),
        "metric names differ between docs/metrics.md (left) and /metrics (right)"
    );
    for (name, (ty, labels)) in &docs {
        let (sty, slabels) = &served[name];
        assert_eq!(ty, sty, "{name}: type");
        assert_eq!(labels, slabels, "{name}: labels");
    }
}

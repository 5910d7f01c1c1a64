//! Named fault points for crash testing. With the `fault-injection` feature, a point
//! whose name is in `VIGIL_FAULT` (comma-separated) SIGKILLs the process when reached,
//! so tests can die at exactly the instant shared state is in flux. Without the
//! feature every point compiles to nothing: release builds carry none of this.

/// A place where a process can die with shared state in flux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPoint {
    /// The name `VIGIL_FAULT` arms it by.
    pub name: &'static str,
    /// What the process is doing when it dies there.
    pub means: &'static str,
    /// The detection modes (`VIGIL_DETECT_MODE`) whose start-up reaches it.
    pub modes: &'static [&'static str],
}

const BOTH: &[&str] = &["parallel", "serial"];

/// Every fault point of the region and the interposer: the one list the crash tests
/// (`tests/kill_sweep.py`, through `vigil-region fault-points`) sweep, and that a test
/// checks every `fault::point` in the sources against.
pub const POINTS: &[FaultPoint] = &[
    FaultPoint {
        name: "region.init.mid",
        means: "initializing the region (header half written)",
        modes: BOTH,
    },
    FaultPoint {
        name: "slot.claim.mid",
        means: "claiming a process slot (token held, slot not yet active)",
        modes: BOTH,
    },
    FaultPoint {
        name: "ring.mid_write",
        means: "writing an event (sequence word odd)",
        modes: BOTH,
    },
    FaultPoint {
        name: "detect.before_ctx",
        means: "before the context exists (serial: holding the detection lock)",
        modes: BOTH,
    },
    FaultPoint {
        name: "detect.after_ctx",
        means: "after the context exists (serial: holding the detection lock)",
        modes: BOTH,
    },
    FaultPoint {
        name: "detect.marker_held",
        means: "holding a charged detection marker allocation (no lock)",
        modes: &["parallel"],
    },
    FaultPoint {
        name: "region_lock.held",
        means: "holding the region lock (serial: and the detection lock)",
        modes: BOTH,
    },
    FaultPoint {
        name: "mem.reserve.mid",
        means: "in the middle of a memory reservation (slot charged, device not)",
        modes: BOTH,
    },
];

/// Dies here if `VIGIL_FAULT` names this point (fault-injection builds only).
#[inline(always)]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-injection")]
    armed::hit(name);
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::OnceLock;

    fn armed() -> &'static [String] {
        static ARMED: OnceLock<Vec<String>> = OnceLock::new();
        ARMED.get_or_init(|| {
            std::env::var("VIGIL_FAULT")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }

    pub(super) fn hit(name: &str) {
        if armed().iter().any(|a| a == name) {
            crate::sys::kill_self();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::POINTS;
    use std::path::Path;

    /// Every `fault::point("…")` and `probe.fault("…")` in the region and interposer
    /// sources names a listed point, and every listed point is used: the list and the
    /// code cannot drift apart.
    #[test]
    fn the_list_and_the_sources_name_the_same_points() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut used = std::collections::BTreeSet::new();
        let mut stack = vec![
            root.join("region/src"),
            root.join("interposer/src"),
            root.join("interposer/core/src"),
        ];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fault.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for pat in ["fault::point(\"", "probe.fault(\""] {
                        for part in text.split(pat).skip(1) {
                            used.insert(part.split('"').next().unwrap().to_string());
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            POINTS.iter().map(|p| p.name.to_string()).collect();
        assert_eq!(
            used, listed,
            "fault points in the sources (left) vs fault::POINTS (right)"
        );
    }
}

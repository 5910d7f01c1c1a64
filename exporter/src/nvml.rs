//! NVML, the driver's own view, through `nvml-wrapper`: device identity, physical
//! memory, and per-process usage to check Vigil's accounting against.
//!
//! Optional and lazy: the library is loaded by the first scrape, on a thread of its
//! own, and re-tried at most once a minute while it is missing. No driver means the
//! NVML families are empty and nothing else changes. NVML calls can block (a GPU
//! falling off the bus, a wedged driver), so scrapes never call NVML: a background
//! thread refreshes a snapshot every `--nvml.interval`, and scrapes read the latest.

use nvml_wrapper::Nvml;
use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// One device as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlDevice {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub total: u64,
    pub used: u64,
    /// PID (NVML's, the host's in the exporter's namespace) -> bytes on this device.
    pub processes: HashMap<u32, u64>,
}

/// One refresh.
#[derive(Debug, Clone, Default)]
pub struct NvmlSnapshot {
    pub devices: Vec<NvmlDevice>,
    /// How long the refresh took.
    pub duration: Duration,
}

/// Whether and how NVML is used (`--nvml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Use NVML if a driver library can be loaded; without one, export no NVML series.
    Auto,
    /// Never load NVML.
    Off,
}

/// The state scrapes read.
#[derive(Debug, Default)]
struct Shared {
    latest: Option<Arc<NvmlSnapshot>>,
    /// The library loaded and the last refresh succeeded.
    up: bool,
    /// Refreshes that failed (the library could not be loaded, or a call failed).
    errors: u64,
}

/// The background NVML reader.
#[derive(Debug)]
pub struct NvmlSource {
    mode: Mode,
    library: OsString,
    interval: Duration,
    shared: Arc<Mutex<Shared>>,
    started: std::sync::Once,
}

/// What a scrape exports.
#[derive(Debug, Clone, Default)]
pub struct NvmlState {
    pub snapshot: Option<Arc<NvmlSnapshot>>,
    pub up: bool,
    pub errors: u64,
    /// False with `--nvml off`: no NVML family is described at all.
    pub enabled: bool,
}

impl NvmlSource {
    pub fn new(mode: Mode, library: OsString, interval: Duration) -> NvmlSource {
        NvmlSource {
            mode,
            library,
            interval: interval.max(Duration::from_millis(100)),
            shared: Default::default(),
            started: std::sync::Once::new(),
        }
    }

    /// A source that never loads NVML (tests, benches, `--nvml off`).
    pub fn off() -> NvmlSource {
        NvmlSource::new(Mode::Off, OsString::new(), Duration::from_secs(60))
    }

    /// The latest snapshot; the first call starts the background thread.
    pub fn state(&self) -> NvmlState {
        if self.mode == Mode::Off {
            return NvmlState::default();
        }
        self.started.call_once(|| {
            let shared = self.shared.clone();
            let lib = self.library.clone();
            let every = self.interval;
            let spawned = std::thread::Builder::new()
                .name("vigil-nvml".into())
                .spawn(move || run(lib, every, shared));
            if let Err(e) = spawned {
                warn!("NVML: cannot start its thread ({e}); NVML series are left out");
            }
        });
        let s = crate::util::lock(&self.shared);
        NvmlState {
            snapshot: s.latest.clone(),
            up: s.up,
            errors: s.errors,
            enabled: true,
        }
    }
}

const RETRY_LOAD: Duration = Duration::from_secs(60);

fn run(lib: OsString, every: Duration, shared: Arc<Mutex<Shared>>) {
    let mut nvml: Option<Nvml> = None;
    let mut last_load: Option<Instant> = None;
    let mut logged_missing = false;
    loop {
        if nvml.is_none() && last_load.is_none_or(|t| t.elapsed() >= RETRY_LOAD) {
            last_load = Some(Instant::now());
            match Nvml::builder().lib_path(&lib).init() {
                Ok(n) => {
                    info!("NVML: loaded {}", lib.to_string_lossy());
                    nvml = Some(n);
                }
                Err(e) => {
                    let mut s = crate::util::lock(&shared);
                    s.errors += 1;
                    s.up = false;
                    drop(s);
                    if !logged_missing {
                        info!(
                            "NVML: {} not usable ({e}); NVML series are left out, retrying once a minute",
                            lib.to_string_lossy()
                        );
                        logged_missing = true;
                    }
                }
            }
        }
        if let Some(n) = &nvml {
            let t0 = Instant::now();
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| collect(n)));
            let mut s = crate::util::lock(&shared);
            match res {
                Ok(Ok(mut snap)) => {
                    snap.duration = t0.elapsed();
                    s.latest = Some(Arc::new(snap));
                    s.up = true;
                }
                Ok(Err(e)) => {
                    s.errors += 1;
                    s.up = false;
                    drop(s);
                    warn!("NVML: refresh failed: {e}; serving the previous one");
                }
                Err(_) => {
                    s.errors += 1;
                    s.up = false;
                    drop(s);
                    warn!("NVML: refresh panicked; serving the previous one");
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// One pass over the devices. A device that fails a call is left out.
fn collect(n: &Nvml) -> Result<NvmlSnapshot, nvml_wrapper::error::NvmlError> {
    let count = n.device_count()?;
    let mut devices = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = match n.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                warn!("NVML: device {index}: {e}; left out");
                continue;
            }
        };
        let uuid = dev.uuid().unwrap_or_default();
        let model = dev.name().unwrap_or_default();
        let (total, used) = match dev.memory_info() {
            Ok(m) => (m.total, m.used),
            Err(e) => {
                warn!("NVML: device {index} memory: {e}; left out");
                continue;
            }
        };
        let mut processes = HashMap::new();
        match dev.running_compute_processes() {
            Ok(ps) => {
                for p in ps {
                    if let nvml_wrapper::enums::device::UsedGpuMemory::Used(b) = p.used_gpu_memory {
                        let e = processes.entry(p.pid).or_insert(0u64);
                        *e = e.saturating_add(b);
                    }
                }
            }
            Err(e) => warn!("NVML: device {index} processes: {e}"),
        }
        devices.push(NvmlDevice {
            index,
            uuid,
            model,
            total,
            used,
            processes,
        });
    }
    Ok(NvmlSnapshot {
        devices,
        duration: Duration::ZERO,
    })
}

/// Pairs a region's device ordinals with NVML devices. The region's ordinals are
/// CUDA's inside the container (after `CUDA_VISIBLE_DEVICES`), which name no physical
/// device, so the pairing is inferred: the ordinals where Vigil accounted memory to the
/// live processes, in order, pair with the NVML devices where those processes appear,
/// in index order; the other ordinals pair with nothing (NVML's side is 0 there). When
/// the two counts differ, a region that lists as many devices as NVML does is taken
/// to see them all in index order; otherwise the pairing is unknown and None is
/// returned (no drift is exported rather than a wrong one).
pub fn pair_devices(
    snap: &NvmlSnapshot,
    host_pids: &[u32],
    accounted: &[u64],
) -> Option<Vec<Option<usize>>> {
    let seen: Vec<usize> = snap
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| host_pids.iter().any(|p| d.processes.contains_key(p)))
        .map(|(i, _)| i)
        .collect();
    let used: Vec<usize> = (0..accounted.len()).filter(|&d| accounted[d] > 0).collect();
    if seen.len() == used.len() {
        let mut out = vec![None; accounted.len()];
        for (&d, &n) in used.iter().zip(seen.iter()) {
            out[d] = Some(n);
        }
        return Some(out);
    }
    (accounted.len() == snap.devices.len()).then(|| (0..accounted.len()).map(Some).collect())
}

/// NVML's per-process usage summed over `host_pids`, on NVML device `i`.
pub fn usage_of(snap: &NvmlSnapshot, i: usize, host_pids: &[u32]) -> u64 {
    let d = &snap.devices[i];
    host_pids
        .iter()
        .filter_map(|p| d.processes.get(p))
        .fold(0u64, |a, &b| a.saturating_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, procs: &[(u32, u64)]) -> NvmlDevice {
        NvmlDevice {
            index,
            uuid: format!("GPU-{index}"),
            model: "m".into(),
            total: 100,
            used: 0,
            processes: procs.iter().copied().collect(),
        }
    }

    #[test]
    fn region_ordinals_pair_with_the_devices_its_processes_use() {
        let snap = NvmlSnapshot {
            devices: vec![dev(0, &[(10, 5)]), dev(1, &[]), dev(2, &[(11, 7), (12, 1)])],
            duration: Duration::ZERO,
        };
        // A container that sees one GPU (physical 2) as its device 0.
        assert_eq!(pair_devices(&snap, &[11, 12], &[8]), Some(vec![Some(2)]));
        assert_eq!(usage_of(&snap, 2, &[11, 12]), 8);
        // Two ordinals, one used: the used one pairs, the other has nothing.
        assert_eq!(
            pair_devices(&snap, &[11], &[0, 7]),
            Some(vec![None, Some(2)])
        );
        assert_eq!(
            pair_devices(&snap, &[10, 11], &[5, 7]),
            Some(vec![Some(0), Some(2)])
        );
        // Processes on two devices, memory accounted on one: unknown, not guessed...
        assert_eq!(pair_devices(&snap, &[10, 11], &[5, 0]), None);
        // ...unless the region sees every device NVML lists.
        assert_eq!(
            pair_devices(&snap, &[10, 11], &[5, 0, 0]),
            Some(vec![Some(0), Some(1), Some(2)])
        );
    }
}

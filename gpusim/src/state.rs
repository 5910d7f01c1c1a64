//! The simulated GPUs' state: devices, and per client process its contexts and
//! memory. Pure logic with time passed in, so it is unit-tested without a daemon.

use crate::config::{Lag, Rng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How NVML reports a process's PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidMode {
    /// As the real driver normally does: the host PID, whatever namespace it runs in.
    Host,
    /// As some drivers (535 open modules, 560) do: the PID in the process's namespace.
    Namespace,
    /// As the 580 driver does (seen on an H100): PIDs translated into the namespace of
    /// the process *asking*; processes outside it are not listed.
    Caller,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub devices: u32,
    pub memory: u64,
    pub device_name: String,
    pub nvml_lag: Lag,
    pub ctx_create_time: Duration,
    pub ctx_memory: u64,
    /// How long a dead process's contexts and memory stay visible after its
    /// connection closes (the real driver takes about 100 ms).
    pub teardown_time: Duration,
    pub pid_mode: PidMode,
    pub nvml_error_rate: f64,
    pub nvml_hang: Duration,
    pub nvml_hang_rate: f64,
    pub ctx_refuse_rate: f64,
    pub seed: u64,
    pub driver_version: String,
    pub cuda_version: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            devices: 2,
            memory: 16 << 30,
            device_name: "Vigil Simulated GPU".into(),
            nvml_lag: Lag::Uniform(Duration::from_millis(20), Duration::from_millis(200)),
            ctx_create_time: Duration::from_millis(130),
            ctx_memory: 518 << 20,
            teardown_time: Duration::ZERO,
            pid_mode: PidMode::Host,
            nvml_error_rate: 0.0,
            nvml_hang: Duration::ZERO,
            nvml_hang_rate: 1.0,
            ctx_refuse_rate: 0.0,
            seed: 0x5eed,
            driver_version: "560.35.03".into(),
            cuda_version: 12060,
        }
    }
}

/// Why a request failed, mapped to CUDA/NVML codes by the client library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    OutOfMemory,
    InvalidValue,
    InvalidDevice,
    Refused,
    NvmlUnknown,
}

impl SimError {
    pub fn code(self) -> &'static str {
        match self {
            SimError::OutOfMemory => "oom",
            SimError::InvalidValue => "invalid",
            SimError::InvalidDevice => "invalid_device",
            SimError::Refused => "refused",
            SimError::NvmlUnknown => "nvml_unknown",
        }
    }
    pub fn from_code(s: &str) -> Option<SimError> {
        [
            SimError::OutOfMemory,
            SimError::InvalidValue,
            SimError::InvalidDevice,
            SimError::Refused,
            SimError::NvmlUnknown,
        ]
        .into_iter()
        .find(|e| e.code() == s)
    }
}

#[derive(Debug)]
struct Context {
    device: u32,
    visible_at: Instant,
}

#[derive(Debug)]
struct Process {
    host_pid: u32,
    ns_pid: u32,
    contexts: HashMap<u64, Context>,
    /// Device allocations and VMM physical handles: id -> (device, bytes).
    allocations: HashMap<u64, (u32, u64)>,
    /// Bytes in use per device, context footprints included.
    used: Vec<u64>,
    /// Set when the client went away: it still counts until then (teardown).
    gone_at: Option<Instant>,
}

impl Process {
    fn alive_at(&self, now: Instant) -> bool {
        self.gone_at.is_none_or(|g| now < g)
    }
}

/// Totals for tests and the daemon's status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub processes: usize,
    pub contexts: usize,
    pub allocations: usize,
    pub used: u64,
    /// Highest total ever in use on one device (the truth limit tests compare with).
    pub peak: u64,
}

pub struct Sim {
    pub cfg: SimConfig,
    procs: HashMap<u64, Process>,
    next_id: u64,
    /// Next device address per device.
    next_addr: Vec<u64>,
    /// Highest `device_used` seen per device, context footprints included.
    peak: Vec<u64>,
    rng: Rng,
}

/// Device pointers live in a per-device window, so a pointer names its device.
pub fn device_base(device: u32) -> u64 {
    0x7000_0000_0000 + ((device as u64) << 40)
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        Sim {
            next_addr: (0..cfg.devices).map(device_base).collect(),
            peak: vec![0; cfg.devices as usize],
            rng: Rng::new(cfg.seed),
            cfg,
            procs: HashMap::new(),
            next_id: 1,
        }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// A device's deterministic UUID bytes.
    pub fn uuid(device: u32) -> [u8; 16] {
        let mut u = *b"VIGIL-GPUSIM-\0\0\0";
        u[13..16].copy_from_slice(&device.to_be_bytes()[1..]);
        u
    }

    /// The NVML form: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx.
    pub fn uuid_string(device: u32) -> String {
        let h: Vec<String> = Sim::uuid(device)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "GPU-{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }

    fn check_device(&self, device: u32) -> Result<(), SimError> {
        if device < self.cfg.devices {
            Ok(())
        } else {
            Err(SimError::InvalidDevice)
        }
    }

    pub fn connect(&mut self, conn: u64, host_pid: u32, ns_pid: u32) {
        self.procs.insert(
            conn,
            Process {
                host_pid,
                ns_pid,
                contexts: HashMap::new(),
                allocations: HashMap::new(),
                used: vec![0; self.cfg.devices as usize],
                gone_at: None,
            },
        );
    }

    /// The client went away (exit or kill): everything it held is freed, after the
    /// configured teardown time.
    pub fn disconnect(&mut self, conn: u64, now: Instant) {
        let teardown = self.cfg.teardown_time;
        match self.procs.get_mut(&conn) {
            Some(p) if !teardown.is_zero() => p.gone_at = Some(now + teardown),
            _ => {
                self.procs.remove(&conn);
            }
        }
    }

    /// Forgets processes whose teardown is over.
    pub fn purge(&mut self, now: Instant) {
        self.procs.retain(|_, p| p.alive_at(now));
    }

    pub fn device_used(&self, device: u32, now: Instant) -> u64 {
        self.procs
            .values()
            .filter(|p| p.alive_at(now))
            .map(|p| p.used.get(device as usize).copied().unwrap_or(0))
            .sum()
    }

    fn proc_mut(&mut self, conn: u64) -> Result<&mut Process, SimError> {
        self.procs.get_mut(&conn).ok_or(SimError::InvalidValue)
    }

    fn charge(&mut self, conn: u64, device: u32, bytes: u64) -> Result<(), SimError> {
        self.check_device(device)?;
        let now = Instant::now();
        self.purge(now);
        let used = self.device_used(device, now);
        if used.checked_add(bytes).is_none_or(|t| t > self.cfg.memory) {
            return Err(SimError::OutOfMemory);
        }
        self.proc_mut(conn)?.used[device as usize] += bytes;
        let p = &mut self.peak[device as usize];
        *p = (*p).max(used + bytes);
        Ok(())
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Creates a context whose creation began at `started`: NVML shows it `lag` after
    /// that, which can be before creation finishes (as on the 580 driver, where it
    /// shows about 30 ms into a 130 ms creation) or long after (older drivers).
    pub fn create_context(
        &mut self,
        conn: u64,
        device: u32,
        started: Instant,
    ) -> Result<u64, SimError> {
        self.check_device(device)?;
        if self.rng.chance(self.cfg.ctx_refuse_rate) {
            return Err(SimError::Refused);
        }
        let footprint = self.cfg.ctx_memory;
        self.charge(conn, device, footprint)?;
        let (u1, u2) = (self.rng.unit(), self.rng.unit());
        let lag = self.cfg.nvml_lag.sample(u1, u2);
        let id = self.fresh_id();
        self.proc_mut(conn)?.contexts.insert(
            id,
            Context {
                device,
                visible_at: started + lag,
            },
        );
        Ok(id)
    }

    pub fn destroy_context(&mut self, conn: u64, ctx: u64) -> Result<(), SimError> {
        let footprint = self.cfg.ctx_memory;
        let p = self.proc_mut(conn)?;
        let c = p.contexts.remove(&ctx).ok_or(SimError::InvalidValue)?;
        let u = &mut p.used[c.device as usize];
        *u = u.saturating_sub(footprint);
        Ok(())
    }

    /// A device allocation; returns its device address.
    pub fn alloc(&mut self, conn: u64, device: u32, bytes: u64) -> Result<u64, SimError> {
        if bytes == 0 {
            return Err(SimError::InvalidValue);
        }
        self.charge(conn, device, bytes)?;
        let addr = self.next_addr[device as usize];
        self.next_addr[device as usize] = addr + bytes.div_ceil(512) * 512;
        self.proc_mut(conn)?
            .allocations
            .insert(addr, (device, bytes));
        Ok(addr)
    }

    /// A VMM physical allocation (cuMemCreate); returns its handle.
    pub fn mem_create(&mut self, conn: u64, device: u32, bytes: u64) -> Result<u64, SimError> {
        if bytes == 0 {
            return Err(SimError::InvalidValue);
        }
        self.charge(conn, device, bytes)?;
        let h = self.fresh_id() << 8;
        self.proc_mut(conn)?.allocations.insert(h, (device, bytes));
        Ok(h)
    }

    /// Frees a device address or a VMM handle; returns the bytes freed.
    pub fn free(&mut self, conn: u64, id: u64) -> Result<u64, SimError> {
        let p = self.proc_mut(conn)?;
        let (device, bytes) = p.allocations.remove(&id).ok_or(SimError::InvalidValue)?;
        let u = &mut p.used[device as usize];
        *u = u.saturating_sub(bytes);
        Ok(bytes)
    }

    /// (free, total) for a device, as cuMemGetInfo sees it: the whole device.
    pub fn mem_info(&self, device: u32, now: Instant) -> Result<(u64, u64), SimError> {
        self.check_device(device)?;
        Ok((
            self.cfg
                .memory
                .saturating_sub(self.device_used(device, now)),
            self.cfg.memory,
        ))
    }

    /// NVML's compute process list for a device: processes with a context on it
    /// whose visibility lag has passed, as (pid, used bytes).
    pub fn nvml_processes(&self, device: u32, now: Instant) -> Result<Vec<(u32, u64)>, SimError> {
        self.check_device(device)?;
        let mut v: Vec<(u32, u64)> = self
            .procs
            .values()
            .filter(|p| p.alive_at(now))
            .filter(|p| {
                p.contexts
                    .values()
                    .any(|c| c.device == device && c.visible_at <= now)
            })
            .map(|p| {
                let pid = match self.cfg.pid_mode {
                    // Caller mode is translated by the daemon, which can read /proc.
                    PidMode::Host | PidMode::Caller => p.host_pid,
                    PidMode::Namespace => p.ns_pid,
                };
                (pid, p.used[device as usize])
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Totals, not counting connection `asking` (the one asking for them).
    pub fn stats(&self, asking: Option<u64>) -> Stats {
        Stats {
            processes: self.procs.keys().filter(|k| Some(**k) != asking).count(),
            contexts: self.procs.values().map(|p| p.contexts.len()).sum(),
            allocations: self.procs.values().map(|p| p.allocations.len()).sum(),
            used: (0..self.cfg.devices)
                .map(|d| self.device_used(d, Instant::now()))
                .sum(),
            peak: self.peak.iter().copied().max().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(lag_ms: u64) -> Sim {
        Sim::new(SimConfig {
            devices: 2,
            memory: 1 << 30,
            ctx_memory: 100 << 20,
            nvml_lag: Lag::Fixed(Duration::from_millis(lag_ms)),
            ..SimConfig::default()
        })
    }

    #[test]
    fn contexts_become_visible_after_the_lag_and_vanish_with_the_process() {
        let mut s = sim(100);
        let t0 = Instant::now();
        s.connect(1, 4242, 7);
        s.create_context(1, 0, t0).unwrap();
        assert!(s
            .nvml_processes(0, t0 + Duration::from_millis(99))
            .unwrap()
            .is_empty());
        assert_eq!(
            s.nvml_processes(0, t0 + Duration::from_millis(100))
                .unwrap(),
            vec![(4242, 100 << 20)]
        );
        assert!(s
            .nvml_processes(1, t0 + Duration::from_secs(1))
            .unwrap()
            .is_empty());
        s.cfg.pid_mode = PidMode::Namespace;
        assert_eq!(
            s.nvml_processes(0, t0 + Duration::from_secs(1)).unwrap()[0].0,
            7
        );
        s.disconnect(1, t0);
        assert!(s
            .nvml_processes(0, t0 + Duration::from_secs(1))
            .unwrap()
            .is_empty());
        assert_eq!(
            s.stats(None),
            Stats {
                peak: 100 << 20,
                ..Stats::default()
            }
        );
    }

    #[test]
    fn memory_is_charged_freed_and_bounded() {
        let mut s = sim(0);
        let now = Instant::now();
        s.connect(1, 10, 10);
        s.connect(2, 20, 20);
        let c = s.create_context(1, 0, now).unwrap();
        let a = s.alloc(1, 0, 600 << 20).unwrap();
        assert_eq!(s.alloc(2, 0, 400 << 20), Err(SimError::OutOfMemory));
        let b = s.alloc(2, 0, 300 << 20).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.mem_info(0, now).unwrap(), (24 << 20, 1 << 30));
        assert_eq!(
            s.free(2, a),
            Err(SimError::InvalidValue),
            "not its allocation"
        );
        assert_eq!(s.free(1, a), Ok(600 << 20));
        assert_eq!(s.free(1, a), Err(SimError::InvalidValue), "double free");
        s.destroy_context(1, c).unwrap();
        assert_eq!(s.alloc(1, 5, 1), Err(SimError::InvalidDevice));
        assert_eq!(s.alloc(1, 0, 0), Err(SimError::InvalidValue));
        s.disconnect(2, now);
        assert_eq!(s.stats(None).used, 0);
        let h = s.mem_create(1, 1, 1 << 20).unwrap();
        assert_eq!(s.device_used(1, now), 1 << 20);
        s.free(1, h).unwrap();
        assert_eq!(s.stats(None).used, 0);
    }

    #[test]
    fn a_dead_process_lingers_for_the_teardown_time() {
        let mut s = sim(0);
        s.cfg.teardown_time = Duration::from_millis(100);
        let t0 = Instant::now();
        s.connect(1, 42, 42);
        s.create_context(1, 0, t0).unwrap();
        s.disconnect(1, t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(s.nvml_processes(0, at(99)).unwrap().len(), 1);
        assert_eq!(s.device_used(0, at(99)), 100 << 20);
        assert!(s.nvml_processes(0, at(100)).unwrap().is_empty());
        assert_eq!(s.mem_info(0, at(100)).unwrap().0, 1 << 30);
        s.purge(at(100));
        assert_eq!(s.stats(None).used, 0);
        assert_eq!(s.stats(None).processes, 0);
    }

    #[test]
    fn uuid_string_has_nvml_shape() {
        let u = Sim::uuid_string(3);
        assert_eq!(u.len(), 40);
        assert!(u.starts_with("GPU-"));
        assert_ne!(Sim::uuid_string(0), Sim::uuid_string(1));
    }
}

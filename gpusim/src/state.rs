//! The simulated GPUs' state: devices, and per client process its contexts and
//! memory. Pure logic with time passed in, so it is unit-tested without a daemon.

use crate::config::{Lag, Rng};
use std::collections::{HashMap, VecDeque};
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
    /// Delay from a change of a process's memory (alloc, free, context footprint)
    /// until NVML's per-process `usedGpuMemory` shows it. Device totals never lag.
    pub nvml_mem_lag: Lag,
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
            // An estimate, not yet measured on a real GPU (gpusim/calibrate/).
            nvml_mem_lag: Lag::Uniform(Duration::from_millis(5), Duration::from_millis(30)),
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

/// What NVML shows of one process's usage on one device: a prefix of the history of
/// that usage. Changes already visible are collapsed into `shown`; only changes still
/// pending are kept, so memory stays bounded by the changes made within one lag.
#[derive(Debug, Default)]
struct NvmlMem {
    /// The usage as of the last change that became visible.
    shown: u64,
    /// Changes not yet visible when last looked at: (visible from, usage after it),
    /// in order of both.
    pending: VecDeque<(Instant, u64)>,
    /// When the latest change becomes visible: no later change may become visible
    /// before it.
    horizon: Option<Instant>,
}

impl NvmlMem {
    /// Folds the changes visible at `now` into `shown`.
    fn collapse(&mut self, now: Instant) {
        while let Some(&(at, v)) = self.pending.front() {
            if at > now {
                break;
            }
            self.shown = v;
            self.pending.pop_front();
        }
    }

    /// Records that usage became `value`, visible to NVML from `at` or, to keep the
    /// order of changes, from when the previous change becomes visible if later.
    fn record(&mut self, value: u64, at: Instant, now: Instant) {
        self.collapse(now);
        let at = self.horizon.map_or(at, |h| h.max(at));
        self.horizon = Some(at);
        if at <= now && self.pending.is_empty() {
            self.shown = value;
            return;
        }
        match self.pending.back_mut() {
            // Several changes visible at the same instant are one change to NVML.
            Some(last) if last.0 == at => last.1 = value,
            _ => self.pending.push_back((at, value)),
        }
    }

    /// The usage NVML reports at `now`.
    fn at(&self, now: Instant) -> u64 {
        self.pending
            .iter()
            .take_while(|(at, _)| *at <= now)
            .last()
            .map_or(self.shown, |(_, v)| *v)
    }
}

#[derive(Debug)]
struct Process {
    host_pid: u32,
    ns_pid: u32,
    contexts: HashMap<u64, Context>,
    /// Device allocations and VMM physical handles: id -> (device, bytes).
    allocations: HashMap<u64, (u32, u64)>,
    /// Bytes in use per device, context footprints included: the truth, which
    /// device totals, cuMemGetInfo and OOM checks use.
    used: Vec<u64>,
    /// Per device, what NVML's per-process list shows of `used` (it lags).
    nvml_used: Vec<NvmlMem>,
    /// Set when the client went away: it still counts until then (teardown).
    gone_at: Option<Instant>,
}

impl Process {
    /// Sets the usage on a device: exact at once, and for NVML from `visible_at`.
    fn set_used(&mut self, device: u32, value: u64, visible_at: Instant, now: Instant) {
        self.used[device as usize] = value;
        self.nvml_used[device as usize].record(value, visible_at, now);
    }

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
    /// Draws of `nvml_mem_lag`: a stream of its own, so the other seeded draws (context
    /// lags, faults) are the same whatever this lag is.
    mem_rng: Rng,
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
            mem_rng: Rng::new(cfg.seed ^ 0x6d65_6d5f_6c61_6721),
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
                nvml_used: (0..self.cfg.devices).map(|_| NvmlMem::default()).collect(),
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

    /// When a memory change made at `now` becomes visible to NVML's per-process list
    /// (before the ordering rule of `NvmlMem::record`).
    fn mem_visible_at(&mut self, now: Instant) -> Instant {
        let (u1, u2) = (self.mem_rng.unit(), self.mem_rng.unit());
        now + self.cfg.nvml_mem_lag.sample(u1, u2)
    }

    /// Charges `bytes` to a process on a device if the device has room. NVML's
    /// per-process figure follows from `visible_at` (None: after a fresh mem lag).
    fn charge(
        &mut self,
        conn: u64,
        device: u32,
        bytes: u64,
        visible_at: Option<Instant>,
        now: Instant,
    ) -> Result<(), SimError> {
        self.check_device(device)?;
        self.purge(now);
        let used = self.device_used(device, now);
        if used.checked_add(bytes).is_none_or(|t| t > self.cfg.memory) {
            return Err(SimError::OutOfMemory);
        }
        let at = visible_at.unwrap_or_else(|| self.mem_visible_at(now));
        let p = self.proc_mut(conn)?;
        let value = p.used[device as usize] + bytes;
        p.set_used(device, value, at, now);
        let pk = &mut self.peak[device as usize];
        *pk = (*pk).max(used + bytes);
        Ok(())
    }

    /// Takes `bytes` back from a process on a device; NVML follows after a mem lag.
    fn uncharge(&mut self, conn: u64, device: u32, bytes: u64, now: Instant) {
        let at = self.mem_visible_at(now);
        if let Some(p) = self.procs.get_mut(&conn) {
            let value = p.used[device as usize].saturating_sub(bytes);
            p.set_used(device, value, at, now);
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Creates a context whose creation began at `started` and ends at `now`: NVML
    /// shows it `nvml_lag` after `started`, which can be before creation finishes (as
    /// on the 580 driver, where it shows about 30 ms into a 130 ms creation) or long
    /// after (older drivers).
    ///
    /// The context's own footprint shows in NVML's per-process memory together with
    /// the context (not after a further `nvml_mem_lag`), or, if earlier changes on the
    /// device become visible later than that, right after them: a process is never
    /// listed with its footprint missing unless earlier changes are still pending.
    pub fn create_context(
        &mut self,
        conn: u64,
        device: u32,
        started: Instant,
        now: Instant,
    ) -> Result<u64, SimError> {
        self.check_device(device)?;
        if self.rng.chance(self.cfg.ctx_refuse_rate) {
            return Err(SimError::Refused);
        }
        let (u1, u2) = (self.rng.unit(), self.rng.unit());
        let visible_at = started + self.cfg.nvml_lag.sample(u1, u2);
        let footprint = self.cfg.ctx_memory;
        self.charge(conn, device, footprint, Some(visible_at), now)?;
        let id = self.fresh_id();
        self.proc_mut(conn)?
            .contexts
            .insert(id, Context { device, visible_at });
        Ok(id)
    }

    /// Destroys a context: its footprint leaves the device at once, and NVML's
    /// per-process figure after a mem lag.
    pub fn destroy_context(&mut self, conn: u64, ctx: u64, now: Instant) -> Result<(), SimError> {
        let footprint = self.cfg.ctx_memory;
        let p = self.proc_mut(conn)?;
        let c = p.contexts.remove(&ctx).ok_or(SimError::InvalidValue)?;
        self.uncharge(conn, c.device, footprint, now);
        Ok(())
    }

    /// A device allocation; returns its device address.
    pub fn alloc(
        &mut self,
        conn: u64,
        device: u32,
        bytes: u64,
        now: Instant,
    ) -> Result<u64, SimError> {
        self.allocate(conn, device, bytes, now, |sim| {
            let addr = sim.next_addr[device as usize];
            sim.next_addr[device as usize] = addr + bytes.div_ceil(512) * 512;
            addr
        })
    }

    /// A VMM physical allocation (cuMemCreate); returns its handle.
    pub fn mem_create(
        &mut self,
        conn: u64,
        device: u32,
        bytes: u64,
        now: Instant,
    ) -> Result<u64, SimError> {
        self.allocate(conn, device, bytes, now, |sim| sim.fresh_id() << 8)
    }

    /// Charges `bytes` (none is invalid) on `device` to `conn`, then records them
    /// under the id that `id` picks: a device address or a VMM handle.
    fn allocate(
        &mut self,
        conn: u64,
        device: u32,
        bytes: u64,
        now: Instant,
        id: impl FnOnce(&mut Self) -> u64,
    ) -> Result<u64, SimError> {
        if bytes == 0 {
            return Err(SimError::InvalidValue);
        }
        self.charge(conn, device, bytes, None, now)?;
        let id = id(self);
        self.proc_mut(conn)?.allocations.insert(id, (device, bytes));
        Ok(id)
    }

    /// Frees a device address or a VMM handle; returns the bytes freed.
    pub fn free(&mut self, conn: u64, id: u64, now: Instant) -> Result<u64, SimError> {
        let p = self.proc_mut(conn)?;
        let (device, bytes) = p.allocations.remove(&id).ok_or(SimError::InvalidValue)?;
        self.uncharge(conn, device, bytes, now);
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
    /// whose visibility lag has passed, as (pid, used bytes), where used bytes is the
    /// part of the process's memory history on the device visible at `now`.
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
                (pid, p.nvml_used[device as usize].at(now))
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
            nvml_mem_lag: Lag::Fixed(Duration::ZERO),
            ..SimConfig::default()
        })
    }

    /// What NVML lists on `device` at `at`: (pid, bytes) per process.
    fn listed(s: &Sim, device: u32, at: Instant) -> Vec<(u32, u64)> {
        s.nvml_processes(device, at).unwrap()
    }

    #[test]
    fn contexts_become_visible_after_the_lag_and_vanish_with_the_process() {
        let mut s = sim(100);
        let t0 = Instant::now();
        s.connect(1, 4242, 7);
        s.create_context(1, 0, t0, t0).unwrap();
        assert!(listed(&s, 0, t0 + Duration::from_millis(99)).is_empty());
        assert_eq!(
            listed(&s, 0, t0 + Duration::from_millis(100)),
            vec![(4242, 100 << 20)]
        );
        assert!(listed(&s, 1, t0 + Duration::from_secs(1)).is_empty());
        s.cfg.pid_mode = PidMode::Namespace;
        assert_eq!(listed(&s, 0, t0 + Duration::from_secs(1))[0].0, 7);
        s.disconnect(1, t0);
        assert!(listed(&s, 0, t0 + Duration::from_secs(1)).is_empty());
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
        let c = s.create_context(1, 0, now, now).unwrap();
        let a = s.alloc(1, 0, 600 << 20, now).unwrap();
        assert_eq!(s.alloc(2, 0, 400 << 20, now), Err(SimError::OutOfMemory));
        let b = s.alloc(2, 0, 300 << 20, now).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.mem_info(0, now).unwrap(), (24 << 20, 1 << 30));
        assert_eq!(
            s.free(2, a, now),
            Err(SimError::InvalidValue),
            "not its allocation"
        );
        assert_eq!(s.free(1, a, now), Ok(600 << 20));
        assert_eq!(
            s.free(1, a, now),
            Err(SimError::InvalidValue),
            "double free"
        );
        s.destroy_context(1, c, now).unwrap();
        assert_eq!(s.alloc(1, 5, 1, now), Err(SimError::InvalidDevice));
        assert_eq!(s.alloc(1, 0, 0, now), Err(SimError::InvalidValue));
        s.disconnect(2, now);
        assert_eq!(s.stats(None).used, 0);
        let h = s.mem_create(1, 1, 1 << 20, now).unwrap();
        assert_eq!(s.device_used(1, now), 1 << 20);
        s.free(1, h, now).unwrap();
        assert_eq!(s.stats(None).used, 0);
    }

    #[test]
    fn a_dead_process_lingers_for_the_teardown_time() {
        let mut s = sim(0);
        s.cfg.teardown_time = Duration::from_millis(100);
        let t0 = Instant::now();
        s.connect(1, 42, 42);
        s.create_context(1, 0, t0, t0).unwrap();
        s.disconnect(1, t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(listed(&s, 0, at(99)).len(), 1);
        assert_eq!(s.device_used(0, at(99)), 100 << 20);
        assert!(listed(&s, 0, at(100)).is_empty());
        assert_eq!(s.mem_info(0, at(100)).unwrap().0, 1 << 30);
        s.purge(at(100));
        assert_eq!(s.stats(None).used, 0);
        assert_eq!(s.stats(None).processes, 0);
    }

    const MIB: u64 = 1 << 20;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn fixed(n: u64) -> Lag {
        Lag::Fixed(Duration::from_millis(n))
    }

    /// What NVML reports for pid `pid` on device 0, if listed.
    fn shown(s: &Sim, pid: u32, at: Instant) -> Option<u64> {
        listed(s, 0, at)
            .into_iter()
            .find(|p| p.0 == pid)
            .map(|p| p.1)
    }

    #[test]
    fn nvml_process_memory_lags_in_order_while_device_totals_are_exact() {
        let mut s = sim(0);
        let t0 = Instant::now();
        s.connect(1, 10, 10);
        s.create_context(1, 0, t0, t0).unwrap();
        let fp = 100 * MIB;
        assert_eq!(
            shown(&s, 10, t0),
            Some(fp),
            "the footprint shows with the context"
        );

        s.cfg.nvml_mem_lag = fixed(50);
        let a = s.alloc(1, 0, 2 * MIB, ms(t0, 10)).unwrap(); // visible at 60
        s.cfg.nvml_mem_lag = fixed(10);
        s.alloc(1, 0, 4 * MIB, ms(t0, 20)).unwrap(); // 30, but not before the one at 60
                                                     // Device figures are exact at once.
        assert_eq!(s.device_used(0, ms(t0, 20)), fp + 6 * MIB);
        assert_eq!(
            s.mem_info(0, ms(t0, 20)).unwrap().0,
            (1 << 30) - fp - 6 * MIB
        );
        assert_eq!(s.stats(None).peak, fp + 6 * MIB);
        assert_eq!(shown(&s, 10, ms(t0, 29)), Some(fp));
        assert_eq!(
            shown(&s, 10, ms(t0, 30)),
            Some(fp),
            "a later change never shows before an earlier one"
        );
        assert_eq!(shown(&s, 10, ms(t0, 59)), Some(fp));
        assert_eq!(shown(&s, 10, ms(t0, 60)), Some(fp + 6 * MIB));

        s.alloc(1, 0, 8 * MIB, ms(t0, 70)).unwrap(); // 80
        assert_eq!(shown(&s, 10, ms(t0, 79)), Some(fp + 6 * MIB));
        assert_eq!(shown(&s, 10, ms(t0, 80)), Some(fp + 14 * MIB));

        assert_eq!(s.free(1, a, ms(t0, 100)), Ok(2 * MIB)); // 110
        assert_eq!(s.device_used(0, ms(t0, 100)), fp + 12 * MIB);
        assert_eq!(shown(&s, 10, ms(t0, 109)), Some(fp + 14 * MIB));
        assert_eq!(
            shown(&s, 10, ms(t0, 110)),
            Some(fp + 12 * MIB),
            "a free moves it by exactly its size"
        );
    }

    #[test]
    fn nvml_shows_a_growing_prefix_of_the_memory_history() {
        let mut s = sim(0);
        s.cfg.memory = 1 << 40;
        s.cfg.nvml_mem_lag = Lag::Uniform(Duration::from_millis(5), Duration::from_millis(30));
        let t0 = Instant::now();
        s.connect(1, 10, 10);
        s.create_context(1, 0, t0, t0).unwrap();
        // The history of the true usage: (time of change, usage after it).
        let mut history = vec![(t0, 100 * MIB)];
        let mut live = Vec::new();
        let mut r = Rng::new(99);
        let mut t = t0;
        // NVML is sampled every 0.7 ms between the changes (time only moves forward):
        // it must show a prefix of the history that never shrinks. The earliest
        // matching change is taken, so a repeated value cannot push the search past
        // the true prefix.
        let mut prefix = 0;
        let mut q = t0;
        let mut max_pending = 0;
        let mut check_until = |s: &Sim, history: &[(Instant, u64)], end: Instant| {
            while q < end {
                let v = shown(s, 10, q).unwrap();
                let i = (prefix..history.len())
                    .take_while(|i| history[*i].0 <= q)
                    .find(|i| history[*i].1 == v)
                    .unwrap_or_else(|| panic!("{v} at {q:?} is not a prefix of the history"));
                // A change becomes visible no sooner than the smallest lag after it.
                assert!(i == 0 || history[i].0 + Duration::from_millis(5) <= q);
                prefix = i;
                q += Duration::from_micros(700);
            }
        };
        for _ in 0..2000 {
            t += Duration::from_micros(r.next_u64() % 4000);
            check_until(&s, &history, t);
            if live.is_empty() || r.chance(0.6) {
                let k = 1 + r.next_u64() % 16;
                live.push((s.alloc(1, 0, k * 2 * MIB, t).unwrap(), k));
            } else {
                let (id, k) = live.swap_remove((r.next_u64() as usize) % live.len());
                assert_eq!(s.free(1, id, t), Ok(k * 2 * MIB));
            }
            history.push((t, s.device_used(0, t)));
            max_pending = max_pending.max(s.procs[&1].nvml_used[0].pending.len());
        }
        check_until(&s, &history, t + Duration::from_millis(40));
        // About 15 changes fall in one 30 ms lag; without collapsing it would be 2000.
        assert!(max_pending <= 60, "{max_pending} pending changes kept");
        assert_eq!(
            shown(&s, 10, t + Duration::from_millis(30)),
            Some(s.device_used(0, t)),
            "everything shows within the largest lag"
        );
    }

    #[test]
    fn a_context_footprint_shows_with_the_context_and_later_changes_wait_for_it() {
        let mut s = sim(100);
        s.cfg.nvml_mem_lag = fixed(10);
        let t0 = Instant::now();
        s.connect(1, 10, 10);
        let c = s.create_context(1, 0, t0, ms(t0, 20)).unwrap(); // listed at 100
        s.alloc(1, 0, 2 * MIB, ms(t0, 30)).unwrap(); // 40, held back to 100
        assert_eq!(s.device_used(0, ms(t0, 30)), 102 * MIB);
        assert_eq!(shown(&s, 10, ms(t0, 99)), None);
        assert_eq!(shown(&s, 10, ms(t0, 100)), Some(102 * MIB));
        s.destroy_context(1, c, ms(t0, 200)).unwrap();
        assert_eq!(s.device_used(0, ms(t0, 200)), 2 * MIB);
        let c2 = s.create_context(1, 0, ms(t0, 200), ms(t0, 200)).unwrap(); // listed at 300
                                                                            // The first context's footprint leaves at 210; the second's arrives at 300.
        assert_eq!(shown(&s, 10, ms(t0, 300)), Some(102 * MIB));
        s.destroy_context(1, c2, ms(t0, 400)).unwrap();
        assert_eq!(shown(&s, 10, ms(t0, 405)), None, "no context, not listed");
    }

    #[test]
    fn a_zero_mem_lag_is_instant_and_death_removes_pending_changes() {
        let mut s = sim(0);
        let t0 = Instant::now();
        s.connect(1, 10, 10);
        s.connect(2, 20, 20);
        s.create_context(1, 0, t0, t0).unwrap();
        s.create_context(2, 0, t0, t0).unwrap();
        s.alloc(1, 0, 2 * MIB, t0).unwrap();
        assert_eq!(shown(&s, 10, t0), Some(102 * MIB));
        assert!(s.procs[&1].nvml_used[0].pending.is_empty());

        s.cfg.nvml_mem_lag = fixed(50);
        s.alloc(2, 0, 4 * MIB, t0).unwrap();
        s.disconnect(2, ms(t0, 1));
        assert_eq!(
            shown(&s, 20, ms(t0, 60)),
            None,
            "gone at once, pending or not"
        );
        assert_eq!(s.device_used(0, ms(t0, 1)), 102 * MIB);

        s.cfg.teardown_time = Duration::from_millis(100);
        s.alloc(1, 0, 4 * MIB, ms(t0, 10)).unwrap(); // 60
        s.disconnect(1, ms(t0, 20)); // gone at 120
        assert_eq!(shown(&s, 10, ms(t0, 59)), Some(102 * MIB));
        assert_eq!(
            shown(&s, 10, ms(t0, 60)),
            Some(106 * MIB),
            "lingers while torn down"
        );
        assert_eq!(shown(&s, 10, ms(t0, 120)), None);
        s.purge(ms(t0, 120));
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

//! Per-process start-up: attach the region (CAS-elected initializer or fast path),
//! claim a slot, and detect the host PID under the detection lock. Runs once per
//! process (and again in a forked child), from the first successful `cuInit`. The
//! driver calls go through the registered [`crate::driver::Driver`].

use crate::config::{Config, DetectMode};
use crate::detect::{self, Detection, Policy, Probe};
use crate::driver::{Context, Driver, Nvml};
use crate::log::{vlog, DEBUG, ERROR, INFO, WARN};
use std::collections::BTreeSet;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vigil_region::{
    DetectOutcome, InitParams, LockId, Region, RegionError, ReleaseOutcome, SlotHandle,
};

/// Vigil's hold on this process: the region (whose open file description carries our
/// slot's liveness token, so it must live as long as the process) and our slot.
pub struct Process {
    region: Region,
    slot: SlotHandle,
    pid: u32,
    /// What we would write into a new region, kept for re-attaching after damage.
    params: InitParams,
    /// The region's damage was logged (once per damaged region).
    damage_logged: bool,
    /// The last failed re-attach was logged (once per damaged region).
    reattach_logged: bool,
    /// When we last tried to re-attach (attempts are spaced by REATTACH_EVERY).
    last_attempt: Option<Instant>,
}

/// Damage to the region, as this process saw it. Counted here because a damaged
/// region cannot hold counts; reported in the log at exit (and re-attachments are
/// also counted in the region re-attached to, `DamageReattachments`).
pub struct DamageCounts {
    /// Regions found damaged under this process.
    pub detected: std::sync::atomic::AtomicU64,
    /// Successful re-attachments to the file's current region.
    pub reattached: std::sync::atomic::AtomicU64,
    /// Allocations refused because the region was damaged or recovering (closed policy).
    pub refused: std::sync::atomic::AtomicU64,
    /// Allocations let through unchecked for the same reasons (open policy).
    pub passed: std::sync::atomic::AtomicU64,
}

pub static DAMAGE: DamageCounts = DamageCounts {
    detected: std::sync::atomic::AtomicU64::new(0),
    reattached: std::sync::atomic::AtomicU64::new(0),
    refused: std::sync::atomic::AtomicU64::new(0),
    passed: std::sync::atomic::AtomicU64::new(0),
};

/// Attempts to re-attach to a damaged region's file are at least this far apart: a
/// file left as garbage fails every time, and each attempt opens and reads it.
const REATTACH_EVERY: Duration = Duration::from_millis(20);

enum State {
    /// Boxed: the region handle is large, and `Failed` is common.
    Ready(Box<Process>),
    /// Vigil could not start in this process; the workload runs without it.
    Failed(u32),
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Initializes Vigil for this process if not done yet. Never fails: problems are
/// logged and the process continues without Vigil.
pub fn ensure() {
    let pid = std::process::id();
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let next = match g.take() {
        Some(State::Ready(p)) if p.pid == pid => State::Ready(p),
        Some(State::Failed(f)) if f == pid => State::Failed(f),
        Some(State::Ready(mut p)) => {
            // A forked child: it must not keep its parent's identity.
            vlog!(
                INFO,
                "forked from pid {} (slot {}): taking a slot of our own",
                p.pid,
                p.slot.index
            );
            crate::mem::forget_contexts();
            match p.region.reattach_after_fork() {
                Ok(()) => start(Some(p.region)),
                Err(e) => {
                    vlog!(ERROR, "after fork: {e}; continuing without Vigil");
                    State::Failed(pid)
                }
            }
        }
        _ if crate::config().secure => {
            vlog!(
                INFO,
                "setuid/setgid program (AT_SECURE): Vigil stays out of the way"
            );
            State::Failed(pid)
        }
        _ => start(None),
    };
    *g = Some(next);
}

/// Runs `f` with this process's region and slot, starting Vigil first if no hook has
/// yet. `None` when Vigil is not running in this process (the caller passes through).
pub fn with_process<T>(f: impl FnOnce(&Region, SlotHandle) -> T) -> Option<T> {
    let pid = std::process::id();
    for attempt in 0..2 {
        {
            let g = STATE.lock().unwrap_or_else(|p| p.into_inner());
            match &*g {
                Some(State::Ready(p)) if p.pid == pid => return Some(f(&p.region, p.slot)),
                Some(State::Failed(f)) if *f == pid => return None,
                _ if attempt == 1 => return None,
                _ => {}
            }
        }
        ensure();
    }
    None
}

/// Runs a region operation like [`with_process`]; if it finds the region damaged
/// (truncated, overwritten or zero-filled under us), logs that once, re-attaches to
/// the file's current region (re-charging what this process holds) and runs it again
/// there. `Some(Err(Damaged))` when re-attaching is not possible (yet): the caller
/// applies the limit policy.
pub fn with_region<T>(
    f: impl Fn(&Region, SlotHandle) -> Result<T, RegionError>,
) -> Option<Result<T, RegionError>> {
    let r = with_process(&f)?;
    if matches!(r, Err(RegionError::Damaged { .. })) && repair() {
        return with_process(&f);
    }
    Some(r)
}

/// After an operation found the region damaged: logs it (once per damaged region)
/// and tries to re-attach. True if the region in use now is sound.
fn repair() -> bool {
    let pid = std::process::id();
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(State::Ready(p)) = &mut *g else {
        return false;
    };
    if p.pid != pid {
        return false;
    }
    if note_damage(p).is_none() {
        return true;
    }
    if p.last_attempt.is_some_and(|t| t.elapsed() < REATTACH_EVERY) {
        return false;
    }
    p.last_attempt = Some(Instant::now());
    match p.region.reattach_after_damage(&p.params) {
        Ok((fresh, slot)) => {
            let held: u64 = p.region.holdings().iter().sum();
            let fresh_region = fresh.attached_nonce() != p.region.attached_nonce();
            let old = std::mem::replace(&mut p.region, fresh);
            // No thread is inside the old handle (they all go through STATE).
            drop(old);
            p.slot = slot;
            p.damage_logged = false;
            p.reattach_logged = false;
            p.last_attempt = None;
            DAMAGE.reattached.fetch_add(1, Relaxed);
            vlog!(
                WARN,
                "re-attached to {} ({}, slot {}); re-charged the {held} bytes this process holds",
                p.region.path().display(),
                if fresh_region {
                    "a region initialized after the damage"
                } else {
                    "the same region, whose slots were lost: it waits for the others to re-attach"
                },
                slot.index
            );
            true
        }
        Err(e) => {
            if !p.reattach_logged {
                p.reattach_logged = true;
                vlog!(
                    WARN,
                    "cannot re-attach yet ({e}); {} until it can",
                    damaged_consequence()
                );
            }
            false
        }
    }
}

/// Logs the region's damage the first time it is seen, and counts it. The reason, if
/// the region is damaged.
fn note_damage(p: &mut Process) -> Option<&'static str> {
    let what = p.region.damage()?;
    if !p.damage_logged {
        p.damage_logged = true;
        DAMAGE.detected.fetch_add(1, Relaxed);
        vlog!(
            ERROR,
            "region damaged: {} changed under this process ({what}); another process of the container truncated or overwrote it. Nothing is written to it any more; re-attaching to the file's current region, and {} meanwhile",
            p.region.path().display(),
            damaged_consequence()
        );
    }
    Some(what)
}

fn damaged_consequence() -> &'static str {
    match crate::config().limit_policy {
        crate::config::LimitPolicy::Closed => "allocations are refused (VIGIL_LIMIT_POLICY=closed)",
        crate::config::LimitPolicy::Open => {
            "allocations pass through unchecked (VIGIL_LIMIT_POLICY=open)"
        }
    }
}

/// (limit, used) of CUDA device `dev` for reporting. Works in processes that never
/// started CUDA (an NVML-only monitor): they read the region, or failing that the
/// environment's limit with nothing used.
pub fn usage(dev: usize) -> Option<(u64, u64)> {
    use vigil_region::RegionRead;
    let pid = std::process::id();
    {
        let g = STATE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(State::Ready(p)) = &*g {
            if p.pid == pid {
                return p.region.device_usage(dev);
            }
        }
    }
    static READER: Mutex<Option<vigil_region::RegionReader>> = Mutex::new(None);
    let mut r = READER.lock().unwrap_or_else(|p| p.into_inner());
    if r.is_none() {
        *r = vigil_region::RegionReader::open(&crate::config().region_path).ok();
    }
    if let Some(u) = r.as_ref().and_then(|r| r.device_usage(dev)) {
        return Some(u);
    }
    if crate::config().secure {
        return None;
    }
    let p = crate::limits::from_lookup(dev + 1, |k| std::env::var(k).ok());
    Some((p.limits[dev], 0))
}

/// Releases our slot at normal exit, crediting what we still hold: the driver frees
/// it all as the process ends, and the region should say so without waiting for a
/// reaper.
extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let pid = std::process::id();
        let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(State::Ready(mut p)) = g.take() {
            if p.pid == pid {
                // A process that has not touched the region since it was damaged
                // learns it here, so that every one of them says so.
                let _ = p.region.check_integrity(p.slot);
                note_damage(&mut p);
                if let Err(e) = p.region.release_slot(p.slot) {
                    vlog!(DEBUG, "at exit: {e}");
                }
                report_damage();
            }
            *g = Some(State::Failed(pid));
            // The Region stays mapped (leaked) for any hook still running on another
            // thread; the process is ending.
            std::mem::forget(p);
        }
    });
}

/// The damage this process saw, in the log (at exit).
fn report_damage() {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    if n(&DAMAGE.detected) == 0 {
        return;
    }
    vlog!(
        WARN,
        "since the region was damaged: {} damaged region(s) seen, {} re-attachment(s), {} allocation(s) refused and {} passed through unchecked",
        n(&DAMAGE.detected),
        n(&DAMAGE.reattached),
        n(&DAMAGE.refused),
        n(&DAMAGE.passed)
    );
}

fn start(existing: Option<Region>) -> State {
    let pid = std::process::id();
    let cfg = crate::config();
    crate::log::config_warnings(cfg);
    let Some(driver) = crate::driver::get() else {
        vlog!(ERROR, "no CUDA driver registered; continuing without Vigil");
        return State::Failed(pid);
    };
    let params = init_params(driver);
    // Before the region is mapped: a process of the container that truncates the
    // file under us must not kill us with SIGBUS (see vigil_region::sigbus).
    vigil_region::install_sigbus_guard();
    let region = match existing {
        Some(r) => r,
        None => match Region::open(&cfg.region_path, &params) {
            Ok((r, rep)) => {
                vlog!(
                    INFO,
                    "region {}: {} in {} us",
                    cfg.region_path.display(),
                    match rep.path {
                        vigil_region::InitPath::Initializer =>
                            "initialized it (the one initializer)",
                        vigil_region::InitPath::Recovered => "recovered it from a dead initializer",
                        vigil_region::InitPath::FastPath => "fast path",
                    },
                    rep.duration.as_micros()
                );
                r
            }
            Err(e) => {
                vlog!(
                    ERROR,
                    "{e}; continuing without Vigil (no limits, no telemetry)"
                );
                return State::Failed(pid);
            }
        },
    };
    check_limits(&region, &params.device_limits);
    let slot = match region.claim_slot() {
        Ok(s) => s,
        Err(e) => {
            vlog!(ERROR, "{e}; continuing without Vigil");
            return State::Failed(pid);
        }
    };
    let reaped = region.reap_dead_slots(slot);
    if reaped > 0 {
        vlog!(INFO, "reclaimed {reaped} slot(s) of dead processes");
    }
    vlog!(DEBUG, "slot {} generation {}", slot.index, slot.generation);
    for (setting, _) in &cfg.unenforced {
        region.count(Some(slot.index), setting.counter(), 1);
    }
    detect_host_pid(driver, &region, slot, cfg);
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no arguments.
        if unsafe { libc::atexit(at_exit) } != 0 {
            vlog!(
                WARN,
                "atexit failed: the slot is reclaimed by the next process instead"
            );
        }
    });
    State::Ready(Box::new(Process {
        region,
        slot,
        pid,
        params,
        damage_logged: false,
        reattach_logged: false,
        last_attempt: None,
    }))
}

/// What this process would write into a new region: its devices' limits.
fn init_params(driver: &dyn Driver) -> InitParams {
    let cfg = crate::config();
    let parsed = crate::limits::from_lookup(driver.device_count(), |k| std::env::var(k).ok());
    let consequence = match cfg.limit_policy {
        crate::config::LimitPolicy::Closed => {
            "VIGIL_LIMIT_POLICY=closed: every allocation on the devices it governs is refused"
        }
        crate::config::LimitPolicy::Open => {
            "that setting is ignored (VIGIL_LIMIT_POLICY=open: no limit from it)"
        }
    };
    for e in &parsed.errors {
        vlog!(ERROR, "{e}; {consequence}");
    }
    crate::mem::set_own_limits(&parsed);
    InitParams {
        device_limits: parsed.limits,
        identity: vigil_region::RegionIdentity::from_env(),
        file_mode: cfg.region_mode,
        ..InitParams::default()
    }
}

/// The first process's limits are the region's; a later process whose environment
/// says otherwise is told so.
fn check_limits(region: &Region, ours: &[u64]) {
    let theirs = region.device_limits();
    if ours != theirs.as_slice() {
        vlog!(
            WARN,
            "CUDA_DEVICE_MEMORY_LIMIT here gives {ours:?} but the region {} already has {theirs:?}; the region wins",
            region.path().display()
        );
    } else if theirs.iter().any(|l| *l > 0) {
        vlog!(INFO, "device memory limits (bytes): {theirs:?}");
    }
}

/// Live inputs for `detect`.
struct Live<'a> {
    nvml: &'a dyn Nvml,
    region: &'a Region,
    slot: SlotHandle,
    start: Instant,
    ctx: &'a dyn Context,
    /// Markers held, newest last: (device pointer, bytes).
    markers: Vec<(u64, u64)>,
    rng: u64,
}

impl Probe for Live<'_> {
    fn nvml_procs(&mut self) -> Result<Vec<(u32, u64)>, String> {
        self.nvml.procs()
    }
    fn claimed(&mut self) -> BTreeSet<u32> {
        self.region
            .claimed_host_pids(Some(self.slot.index))
            .into_iter()
            .collect()
    }
    fn namespace_pids_seen(&mut self) -> bool {
        self.region.namespace_pids_seen()
    }
    fn mark(&mut self, bytes: u64) -> Result<(), String> {
        // Charged first, like any allocation: the limit covers detection too.
        if !crate::mem::reserve_marker(self.region, self.slot, 0, bytes)? {
            return Err(format!("{bytes} bytes refused by the memory limit"));
        }
        let r = self.ctx.alloc(bytes);
        match r {
            Ok(p) => {
                self.markers.push((p, bytes));
                Ok(())
            }
            Err(e) => {
                let _ = self.region.credit(self.slot, 0, bytes);
                Err(e)
            }
        }
    }
    fn unmark(&mut self) {
        let Some((p, bytes)) = self.markers.pop() else {
            return;
        };
        if self.ctx.free(p) {
            let _ = self.region.credit(self.slot, 0, bytes);
        } else {
            // Still on the device: it stays charged (the slot's release credits it).
            vlog!(
                WARN,
                "freeing a {bytes}-byte detection marker failed; it stays charged until exit"
            );
        }
    }
    fn random(&mut self) -> u64 {
        // xorshift64*: sizes need to differ between processes, not be secret.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fault(&mut self, point: &'static str) {
        vigil_region::fault::point(point);
    }
    fn in_initial_pid_namespace(&mut self) -> bool {
        vigil_region::ProcessIdentity::current().pidns_inode
            == vigil_region::procfs::PROC_PID_INIT_INO
    }
    fn elapsed(&mut self) -> Duration {
        self.start.elapsed()
    }
    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A seed that differs between processes started at the same instant in different
/// containers (which can share namespace PID and slot index): std's per-process
/// random hash keys, mixed with the slot.
fn seed(slot: SlotHandle) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    (h.finish() ^ ((slot.index as u64) << 48) ^ slot.generation as u64).max(1)
}

/// Serializes detection node-wide through `VIGIL_NODE_LOCK_DIR`, when set.
fn node_lock(driver: &dyn Driver, cfg: &Config) -> Option<std::fs::File> {
    let dir = cfg.node_lock_dir.as_ref()?;
    let path = dir.join("vigil-detect.lock");
    let f = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            vlog!(WARN, "VIGIL_NODE_LOCK_DIR: cannot open {}: {e}; detection is serialized per container only", path.display());
            return None;
        }
    };
    let started = Instant::now();
    let deadline = started + cfg.deadline;
    while !driver.try_flock(&f) {
        if Instant::now() >= deadline {
            vlog!(
                WARN,
                "node lock {} still held after {:?}; detecting without it",
                path.display(),
                cfg.deadline
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if started.elapsed() >= Duration::from_millis(1) {
        vlog!(
            INFO,
            "waited {:.1} ms for the node lock {}",
            started.elapsed().as_secs_f64() * 1e3,
            path.display()
        );
    }
    Some(f)
}

fn detect_host_pid(driver: &dyn Driver, region: &Region, slot: SlotHandle, cfg: &Config) {
    if cfg.detect_mode == DetectMode::Parallel {
        if cfg.node_lock_dir.is_some() {
            vlog!(
                INFO,
                "VIGIL_NODE_LOCK_DIR is only used with VIGIL_DETECT_MODE=serial; parallel detection needs no node lock"
            );
        }
        crate::testpoint::hold_region_lock(region, slot);
        detect(driver, region, slot, cfg, &|| true);
        return;
    }
    let guard = match region.lock(LockId::Detect, slot) {
        Ok(g) => g,
        Err(e) => {
            vlog!(ERROR, "detection lock: {e}");
            return;
        }
    };
    let o = guard.outcome();
    if let Some((reason, victim)) = o.forced {
        vlog!(
            WARN,
            "took the detection lock from slot {victim} ({}) after {} ms",
            reason.name(),
            o.wait_ns / 1_000_000
        );
    } else if o.wait_ns > 0 {
        vlog!(
            INFO,
            "waited {:.1} ms for the detection lock ({} retries)",
            o.wait_ns as f64 / 1e6,
            o.retries
        );
    }
    let node = node_lock(driver, cfg);
    crate::testpoint::hold_detect();
    detect(driver, region, slot, cfg, &|| guard.is_current());
    drop(node);
    if guard.release() == ReleaseOutcome::Fenced {
        vlog!(
            WARN,
            "our detection lock had been taken over (fenced release)"
        );
    }
}

/// Creates our primary context and learns the host PID, in either mode; records the
/// outcome and charges the context. `still_ours` says whether a serial detector
/// still holds its lock (one evicted must not publish).
fn detect(
    driver: &dyn Driver,
    region: &Region,
    slot: SlotHandle,
    cfg: &Config,
    still_ours: &dyn Fn() -> bool,
) {
    let me = std::process::id();
    let device = cfg.physical_device(0);
    let nvml = driver.nvml(device);
    let before = nvml.as_ref().map_err(Clone::clone).and_then(|n| n.procs());
    // A region's first processes: nobody has measured a context yet. Under a limit,
    // in parallel mode, they create their contexts one at a time until one has (a
    // single context creation, once in the region's life), so that no context is
    // left uncharged while the others fill the limit. Serial mode holds the
    // detection lock already; without a limit there is nothing to overrun.
    let limited = region.device_limits().first().is_some_and(|l| *l > 0);
    let mut first_wave = None;
    if cfg.detect_mode == DetectMode::Parallel && limited && region.ctx_footprint() == 0 {
        first_wave = region.lock(LockId::Detect, slot).ok();
    }
    // Charge what the last context measured before ours exists, so that processes
    // already running can never fill the limit while our context is being born.
    // Bounded: the field is in a file any process of the container can write.
    let estimate = region.ctx_footprint().min(MAX_CTX_FOOTPRINT);
    if estimate > 0 {
        if let Some(g) = first_wave.take() {
            g.release();
        }
    }
    let estimate = match region.charge(slot, 0, estimate) {
        Ok(()) => estimate,
        Err(e) => {
            vlog!(DEBUG, "context footprint not charged: {e}");
            0
        }
    };
    vigil_region::fault::point("detect.before_ctx");
    let device_before = nvml.as_ref().ok().and_then(|n| n.device_used());
    let start = Instant::now();
    let ctx_ok = driver.retain_primary_context();
    let ctx_ns = start.elapsed().as_nanos() as u64;
    // A region that has no estimate yet (its first processes) charges the context
    // as soon as it exists, so that nobody fills the limit around uncharged contexts
    // while detection runs (see `provisional_footprint`; an over-charge, corrected
    // when detection measures ours, beats an uncounted context).
    let estimate = if estimate == 0 && ctx_ok.is_ok() {
        provisional_footprint(nvml.as_ref().ok().map(|n| &**n), device_before)
            .map(|b| b.min(MAX_CTX_FOOTPRINT))
            .filter(|b| *b > 0 && region.charge(slot, 0, *b).is_ok())
            .unwrap_or(0)
    } else {
        estimate
    };
    if let Some(g) = first_wave.take() {
        // What the others waiting charge before creating theirs; detection corrects it.
        if estimate > 0 {
            region.set_ctx_footprint(estimate);
        }
        g.release();
    }
    vigil_region::fault::point("detect.after_ctx");
    let failed = |outcome| Detection {
        outcome,
        host_pid: None,
        polls: 0,
        candidates: Vec::new(),
        foreign: Vec::new(),
        footprint: None,
        note: None,
    };
    let det = match (&nvml, &before, ctx_ok) {
        (_, _, Err(e)) => {
            vlog!(WARN, "host PID detection skipped: {e}");
            failed(DetectOutcome::Timeout)
        }
        (Ok(n), Ok(b), Ok(ctx)) => {
            let (n, ctx) = (&**n, &*ctx);
            let policy = Policy {
                poll_start: cfg.poll_start,
                poll_max: cfg.poll_max,
                deadline: cfg.deadline,
            };
            let mut live = Live {
                nvml: n,
                region,
                slot,
                start,
                ctx,
                markers: Vec::new(),
                rng: seed(slot),
            };
            let d = match cfg.detect_mode {
                DetectMode::Parallel => {
                    let sig = detect::Signature {
                        steps: cfg.detect_steps,
                        max_pages: 16,
                    };
                    detect::run_signature(&policy, &sig, b, me, &mut live)
                }
                DetectMode::Serial => detect::run_serial(&policy, b, me, &mut live),
            };
            while !live.markers.is_empty() {
                live.unmark();
            }
            d
        }
        (Err(e), _, _) | (_, Err(e), _) => {
            vlog!(WARN, "host PID detection: NVML unusable: {e}");
            failed(DetectOutcome::NvmlError)
        }
    };
    let latency_ns = start.elapsed().as_nanos() as u64;
    let det = if still_ours() {
        det
    } else {
        vlog!(
            WARN,
            "evicted from the detection lock while detecting; not publishing a PID"
        );
        Detection {
            outcome: DetectOutcome::Ambiguous,
            host_pid: None,
            ..det
        }
    };
    region.record_detection(
        slot,
        det.outcome,
        det.host_pid,
        latency_ns,
        det.polls,
        ctx_ns,
    );
    charge_context(
        region,
        slot,
        nvml.as_ref().ok().map(|n| &**n),
        &det,
        me,
        estimate,
    );
    let ms = latency_ns as f64 / 1e6;
    if !det.foreign.is_empty() {
        vlog!(DEBUG, "ruled out PIDs {:?}: their memory did not move with our markers (other processes starting at the same time)", det.foreign);
    }
    if let Some(why) = &det.note {
        vlog!(WARN, "host PID detection: {why}");
    }
    match det.outcome {
        DetectOutcome::Found => vlog!(
            INFO,
            "host PID {} found after {} polls in {ms:.1} ms (context creation {:.1} ms)",
            det.host_pid.unwrap_or(0),
            det.polls,
            ctx_ns as f64 / 1e6
        ),
        DetectOutcome::SameNamespace => vlog!(INFO, "the driver reports namespace PIDs: our PID {me} is what NVML shows"),
        DetectOutcome::Ambiguous => vlog!(
            WARN,
            "host PID ambiguous after {} polls in {ms:.1} ms: no single NVML entry followed our markers (candidates {:?}); continuing with PID {me}",
            det.polls,
            det.candidates
        ),
        DetectOutcome::Timeout => vlog!(WARN, "host PID not found within {:?}; continuing with PID {me}", cfg.deadline),
        DetectOutcome::NvmlError => vlog!(WARN, "host PID detection failed on NVML errors; continuing with PID {me}"),
    }
}

/// A first charge for our new context when the region has no estimate yet: what the
/// whole device gained while ours was born, but never more than the smallest process
/// NVML lists (a context like ours, plus whatever it allocated): on a node where other
/// containers start at the same moment, the device's gain counts their contexts too.
fn provisional_footprint(nvml: Option<&dyn Nvml>, device_before: Option<u64>) -> Option<u64> {
    let nvml = nvml?;
    let listed_min = nvml.procs().ok().and_then(|ps| {
        ps.into_iter()
            .map(|(_, u)| u)
            .filter(|u| *u != detect::NOT_AVAILABLE && *u > 0)
            .min()
    });
    let delta = nvml
        .device_used()
        .zip(device_before)
        .map(|(a, b)| a.saturating_sub(b))
        .filter(|d| *d > 0);
    match (delta, listed_min) {
        (Some(d), Some(l)) => Some(d.min(l)),
        (d, l) => d.or(l),
    }
}

/// No primary context takes more than this (an H100's is 518 MiB).
const MAX_CTX_FOOTPRINT: u64 = 8 << 30;

/// Replaces the estimated context charge with what NVML says our context takes:
/// whatever detection's outcome, the context is charged. Found: the base of our own
/// entry; same namespace: our entry now; otherwise the smallest base seen on the
/// entries of processes like ours (same driver, same device), unless an estimate
/// already stands.
fn charge_context(
    region: &Region,
    slot: SlotHandle,
    nvml: Option<&dyn Nvml>,
    det: &Detection,
    me: u32,
    estimate: u64,
) {
    let own = |pid: u32| {
        nvml.and_then(|n| n.procs().ok())
            .and_then(|ps| ps.into_iter().find(|p| p.0 == pid))
            .map(|p| p.1)
            .filter(|u| *u != detect::NOT_AVAILABLE)
    };
    let (used, measured) = match det.outcome {
        DetectOutcome::Found => (det.footprint.or_else(|| det.host_pid.and_then(own)), true),
        // Markers taken before our own PID showed up may still be on our entry: then
        // the footprint comes from entries like ours, and is not published.
        DetectOutcome::SameNamespace => match det.footprint {
            Some(f) => (Some(f), false),
            None => (own(me), true),
        },
        // No measure of our own: what entries like ours take, never more than the
        // estimate already charged (a provisional one, taken while other processes
        // were also starting, can be several contexts).
        _ => match (det.footprint, estimate) {
            (Some(f), 0) => (Some(f), false),
            (Some(f), e) => (Some(f.min(e)), false),
            (None, _) => (None, false),
        },
    };
    let Some(used) = used.map(|u| u.min(MAX_CTX_FOOTPRINT)) else {
        if estimate == 0 {
            vlog!(
                WARN,
                "primary context not charged: its footprint is unknown (no host PID, no estimate)"
            );
        }
        return;
    };
    let r = if used >= estimate {
        region.charge(slot, 0, used - estimate)
    } else {
        region.credit(slot, 0, estimate - used).map(|_| ())
    };
    match r {
        Ok(()) => {
            if measured {
                region.set_ctx_footprint(used);
                crate::mem::note_context_footprint(used);
            }
            vlog!(DEBUG, "primary context footprint: {used} bytes (charged)");
        }
        Err(e) => vlog!(WARN, "context footprint: {e}"),
    }
}

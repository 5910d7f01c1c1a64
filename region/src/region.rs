//! Opening, validating and initializing a region; the writer and read-only handles.

use crate::counters::{Counter, HistogramId, HistogramSnapshot};
use crate::error::RegionError;
use crate::layout::*;
use crate::ring::{self, Event, Payload, NO_SLOT};
use crate::slot::SlotHandle;
use crate::sys::{self, monotonic_ns, realtime_ns, Mapping};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::*};
use std::time::{Duration, Instant};

/// What the first process writes into a new region. Later processes' values are
/// ignored: the region wins (they can compare with [`Region::device_limits`]).
#[derive(Debug, Clone)]
pub struct InitParams {
    /// Per-device memory limits in bytes; 0 = unlimited. Its length is the device count.
    pub device_limits: Vec<u64>,
    /// Lease of the region lock (see `lock`).
    pub region_lock_lease: Duration,
    /// Lease of the detection lock; must exceed the detection deadline.
    pub detect_lock_lease: Duration,
    /// How long to wait for another process's initialization before giving up.
    pub init_timeout: Duration,
    /// Written into the header for readers' labels; empty strings mean unknown.
    pub identity: RegionIdentity,
    /// Permissions of a region file this process creates (set exactly, whatever the
    /// umask). HAMi's 0666 by default: every process of the container, whatever its
    /// UID, must be able to join, or it runs without limits.
    pub file_mode: u32,
}

/// The region's owner as Kubernetes names it. Empty = unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionIdentity {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl RegionIdentity {
    /// From the downward-API variables `POD_NAMESPACE`, `POD_NAME`, `CONTAINER_NAME`.
    pub fn from_env() -> RegionIdentity {
        let var = |k| std::env::var(k).unwrap_or_default();
        RegionIdentity {
            namespace: var("POD_NAMESPACE"),
            pod: var("POD_NAME"),
            container: var("CONTAINER_NAME"),
        }
    }
}

fn store_str(dst: &[std::sync::atomic::AtomicU8; IDENTITY_FIELD_LEN], s: &str) {
    let mut n = s.len().min(IDENTITY_FIELD_LEN);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    for (i, d) in dst.iter().enumerate() {
        d.store(if i < n { s.as_bytes()[i] } else { 0 }, Relaxed);
    }
}

/// Reads a NUL-padded field; anything that is not clean UTF-8 text yields "" (the
/// reader must never turn garbage into a label value).
fn load_str(src: &[std::sync::atomic::AtomicU8; IDENTITY_FIELD_LEN]) -> String {
    let bytes: Vec<u8> = src
        .iter()
        .map(|b| b.load(Relaxed))
        .take_while(|&b| b != 0)
        .collect();
    match String::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s,
        _ => String::new(),
    }
}

impl Default for InitParams {
    fn default() -> Self {
        InitParams {
            device_limits: Vec::new(),
            region_lock_lease: Duration::from_secs(5),
            detect_lock_lease: Duration::from_secs(30),
            init_timeout: Duration::from_secs(10),
            identity: RegionIdentity::default(),
            file_mode: 0o666,
        }
    }
}

crate::wire_enum! {
    /// How this process got a usable region.
    pub enum InitPath: u8 {
        /// Won the CAS and initialized a new region.
        Initializer = 0 => "initializer",
        /// Found it READY (or waited for it): no lock taken.
        FastPath = 1 => "fast_path",
        /// Found it stuck in INITIALIZING with a dead initializer, and re-initialized it.
        Recovered = 2 => "recovered",
    }
}

#[derive(Debug, Clone, Copy)]
pub struct InitReport {
    pub path: InitPath,
    pub duration: Duration,
}

/// A writer's handle on a region: a read-write mapping plus the open file description
/// whose byte locks are this process's liveness tokens.
pub struct Region {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    map: Mapping,
    /// Slots this process holds, so we never "reclaim" our own (our own OFD locks
    /// never conflict with us) and threads never claim the same one.
    pub(crate) held: Box<[AtomicU64; MAX_SLOTS / 64]>,
    /// Serializes this process's threads around the region lock (see `mem`).
    pub(crate) mem_local: std::sync::Mutex<()>,
    opened_pid: u32,
    fork_gen: Option<u64>,
    /// Our entry in the SIGBUS guard (`install_sigbus_guard`), if it had room.
    guard: Option<usize>,
    /// What this process attached to, to tell damage from the protocol's own writes.
    pub(crate) attached: Attached,
    /// Why the region was found damaged (an index into `DAMAGE`; 0 = not damaged).
    /// Latched: once set, nothing is written to the region through this handle again.
    damage: AtomicU8,
    /// What our slot holds on each device, as this process charged it: our own copy,
    /// which survives the region's damage and is re-charged in the region we
    /// re-attach to (see `Region::reattach_after_damage`).
    pub(crate) own: [AtomicU64; MAX_DEVICES],
}

/// The region as this process attached to it. Nothing a Vigil writer does after
/// initialization changes these, so a difference means the file was damaged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attached {
    pub(crate) nonce: u64,
    pub(crate) device_count: u32,
    /// The limits in the region when we attached.
    pub(crate) limits: [u64; MAX_DEVICES],
    /// The limits this process enforces: the region's, or stricter ones it knew from
    /// a region it had to leave (see `reattach_after_damage`); 0 = none.
    pub(crate) caps: [u64; MAX_DEVICES],
}

impl Attached {
    const NONE: Attached = Attached {
        nonce: 0,
        device_count: 0,
        limits: [0; MAX_DEVICES],
        caps: [0; MAX_DEVICES],
    };

    fn read(l: &RegionLayout) -> Attached {
        let h = &l.header;
        let mut limits = [0; MAX_DEVICES];
        for (v, d) in limits.iter_mut().zip(&l.devices) {
            *v = d.limit.load(Relaxed);
        }
        Attached {
            nonce: h.init_nonce.load(Relaxed),
            device_count: h.device_count.load(Relaxed),
            limits,
            caps: limits,
        }
    }
}

/// What the integrity check found, by index (0: nothing).
const DAMAGE: [&str; 9] = [
    "",
    "the file shrank under the mapping: an access faulted (SIGBUS caught)",
    "its magic is gone (overwritten or zero-filled)",
    "its layout version changed",
    "its state is no longer READY",
    "it was re-initialized (init nonce changed)",
    "its device count changed",
    "a device limit changed",
    "this process's slot was wiped",
];
const DAMAGE_SIGBUS: u8 = 1;
pub(crate) const DAMAGE_LIMIT: u8 = 7;
const DAMAGE_SLOT: u8 = 8;

impl Drop for Region {
    fn drop(&mut self) {
        // Before the mapping goes: the guard must never touch an address that is no
        // longer ours.
        if let Some(g) = self.guard.take() {
            sys::sigbus::unregister(g);
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RegionError + 'a {
    move |source| RegionError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Reinterprets a mapping of at least REGION_SIZE bytes as the layout.
fn layout_of(map: &Mapping) -> &RegionLayout {
    // SAFETY: every mapping passed here is REGION_SIZE bytes long (checked by the
    // callers before mapping) and page-aligned, which satisfies RegionLayout's 64-byte
    // alignment. RegionLayout consists only of atomics, valid for any bit pattern and
    // sound to share across threads and processes. The reference borrows `map`, so it
    // cannot outlive the mapping.
    unsafe { &*(map.as_ptr() as *const RegionLayout) }
}

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
    let sc = h.slot_count.load(Relaxed);
    if sc as usize != MAX_SLOTS {
        return Err(corrupt(
            "header.slot_count",
            sc as u64,
            "does not match layout",
        ));
    }
    let rc = h.ring_capacity.load(Relaxed);
    if rc as usize != RING_CAPACITY {
        return Err(corrupt(
            "header.ring_capacity",
            rc as u64,
            "does not match layout",
        ));
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

fn file_len(file: &File, path: &Path) -> Result<u64, RegionError> {
    Ok(file.metadata().map_err(io_err(path, "stat"))?.len())
}

/// Polls `f` with a short backoff until it returns Some, or the deadline passes.
fn wait_until<T>(
    deadline: Instant,
    mut f: impl FnMut() -> Result<Option<T>, RegionError>,
) -> Result<Option<T>, RegionError> {
    let mut pause = Duration::from_micros(20);
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

impl Region {
    /// Opens the region at `path`, creating and initializing it if needed.
    ///
    /// Exactly one process initializes a new region: it holds the init token (an OFD
    /// lock, released by the kernel if it dies) and CASes the state UNINIT ->
    /// INITIALIZING -> READY. Everyone who finds READY takes the fast path with no lock.
    /// A region left in INITIALIZING by a dead initializer is re-initialized by
    /// whoever gets the token next.
    pub fn open(
        path: impl AsRef<Path>,
        params: &InitParams,
    ) -> Result<(Region, InitReport), RegionError> {
        let path = path.as_ref();
        let start = Instant::now();
        if params.device_limits.len() > MAX_DEVICES {
            return Err(RegionError::InvalidParam {
                path: path.to_path_buf(),
                what: "device_limits",
                why: format!(
                    "{} devices, at most {MAX_DEVICES} supported",
                    params.device_limits.len()
                ),
            });
        }
        for (what, d) in [
            ("region_lock_lease", params.region_lock_lease),
            ("detect_lock_lease", params.detect_lock_lease),
        ] {
            if d.is_zero() {
                return Err(RegionError::InvalidParam {
                    path: path.to_path_buf(),
                    what,
                    why: "must be greater than zero".into(),
                });
            }
        }
        let file = open_region_file(path, params.file_mode)?;
        let deadline = start + params.init_timeout;

        let mut len = file_len(&file, path)?;
        if len < REGION_SIZE as u64 {
            // Grow a new (empty or all-zero) file under the init token, so nobody maps
            // it while it is short. Never touch a short file with data in it.
            let got = wait_until(deadline, || {
                sys::ofd_try_lock(&file, INIT_TOKEN_OFFSET)
                    .map_err(io_err(path, "lock init token"))
                    .map(|ok| ok.then_some(()))
            })?;
            if got.is_none() {
                return Err(RegionError::InitTimeout {
                    path: path.to_path_buf(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            let res = grow_if_blank(&file, path);
            let _ = sys::ofd_unlock(&file, INIT_TOKEN_OFFSET);
            res?;
        }
        // Every page of the mapping must be the file's own before anyone touches it:
        // a hole on a full filesystem faults with SIGBUS. Idempotent for a region
        // whose blocks are allocated already (a region created by an older version, or
        // on a filesystem filled since, may still have holes).
        reserve_blocks(&file, path)?;
        len = len.max(file_len(&file, path)?);
        let map = Mapping::new(&file, REGION_SIZE, true).map_err(io_err(path, "mmap"))?;
        let guard = sys::sigbus::register(map.as_ptr() as usize, REGION_SIZE, true);
        let mut region = Region {
            path: path.to_path_buf(),
            file,
            map,
            held: Box::new([const { AtomicU64::new(0) }; MAX_SLOTS / 64]),
            mem_local: std::sync::Mutex::new(()),
            opened_pid: sys::getpid(),
            fork_gen: sys::fork_generation(),
            guard,
            attached: Attached::NONE,
            damage: AtomicU8::new(0),
            own: [const { AtomicU64::new(0) }; MAX_DEVICES],
        };
        let init_path = region.initialize(params, deadline, len)?;
        region.attached = Attached::read(region.layout());
        if region.is_poisoned() {
            // Truncated while we initialized or validated: what we read is zeros.
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                len: file_len(&region.file, path).unwrap_or(0),
                expected: REGION_SIZE as u64,
            });
        }
        let duration = start.elapsed();
        let c = match init_path {
            InitPath::Initializer | InitPath::Recovered => Counter::ProcessInitsInitializer,
            InitPath::FastPath => Counter::ProcessInitsFastPath,
        };
        region.count(None, c, 1);
        region.observe(HistogramId::InitDuration, duration.as_nanos() as u64);
        region.emit(&Event::from_payload(
            NO_SLOT,
            Payload::Init {
                path: Some(init_path),
                duration_ns: duration.as_nanos() as u64,
            },
        ));
        Ok((
            region,
            InitReport {
                path: init_path,
                duration,
            },
        ))
    }

    fn initialize(
        &self,
        params: &InitParams,
        deadline: Instant,
        len: u64,
    ) -> Result<InitPath, RegionError> {
        let l = self.layout();
        if l.header.state.load(Acquire) == STATE_READY {
            validate(l, &self.path, len)?;
            return Ok(InitPath::FastPath);
        }
        let path = &self.path;
        let outcome = wait_until(deadline, || {
            if l.header.state.load(Acquire) == STATE_READY {
                return Ok(Some(InitPath::FastPath));
            }
            if !sys::ofd_try_lock(&self.file, INIT_TOKEN_OFFSET)
                .map_err(io_err(path, "lock init token"))?
            {
                return Ok(None);
            }
            let r = self.initialize_holding_token(params);
            let _ = sys::ofd_unlock(&self.file, INIT_TOKEN_OFFSET);
            r.map(Some)
        })?;
        match outcome {
            Some(p) => {
                validate(l, path, len)?;
                Ok(p)
            }
            None => Err(RegionError::InitTimeout {
                path: path.clone(),
                waited_ms: params.init_timeout.as_millis() as u64,
            }),
        }
    }

    /// Called with the init token held: nobody else can be initializing right now.
    fn initialize_holding_token(&self, params: &InitParams) -> Result<InitPath, RegionError> {
        let l = self.layout();
        let h = &l.header;
        let magic = h.magic.load(Relaxed);
        if magic != 0 && magic != MAGIC {
            return Err(RegionError::WrongMagic {
                path: self.path.clone(),
                found: magic,
            });
        }
        let path = match h.state.load(Acquire) {
            STATE_READY => return Ok(InitPath::FastPath),
            STATE_UNINIT => {
                if h.state
                    .compare_exchange(STATE_UNINIT, STATE_INITIALIZING, AcqRel, Acquire)
                    .is_err()
                {
                    return Ok(InitPath::FastPath);
                }
                InitPath::Initializer
            }
            STATE_INITIALIZING => {
                // Its initializer held the token until READY; we hold it now, so the
                // initializer died half-way. Nobody can have used the region yet.
                zero_all(l);
                h.state.store(STATE_INITIALIZING, Relaxed);
                InitPath::Recovered
            }
            other => {
                return Err(RegionError::Corrupt {
                    path: self.path.clone(),
                    field: "header.state",
                    value: other as u64,
                    why: "not a known state",
                })
            }
        };
        h.magic.store(MAGIC, Relaxed);
        crate::fault::point("region.init.mid");
        h.version.store(LAYOUT_VERSION, Relaxed);
        h.region_size.store(REGION_SIZE as u64, Relaxed);
        h.init_pid.store(sys::getpid(), Relaxed);
        h.init_count.fetch_add(1, Relaxed);
        h.init_nonce.store(
            realtime_ns() ^ (sys::getpid() as u64) << 32 ^ monotonic_ns().rotate_left(17),
            Relaxed,
        );
        h.created_realtime_ns.store(realtime_ns(), Relaxed);
        h.created_monotonic_ns.store(monotonic_ns(), Relaxed);
        h.device_count
            .store(params.device_limits.len() as u32, Relaxed);
        h.slot_count.store(MAX_SLOTS as u32, Relaxed);
        h.ring_capacity.store(RING_CAPACITY as u32, Relaxed);
        for (d, &lim) in l.devices.iter().zip(params.device_limits.iter()) {
            d.limit.store(lim, Relaxed);
        }
        store_str(&l.identity.namespace, &params.identity.namespace);
        store_str(&l.identity.pod, &params.identity.pod);
        store_str(&l.identity.container, &params.identity.container);
        l.locks[0]
            .lease_ns
            .store(params.region_lock_lease.as_nanos().max(1) as u64, Relaxed);
        l.locks[1]
            .lease_ns
            .store(params.detect_lock_lease.as_nanos().max(1) as u64, Relaxed);
        // A new region normally has no process yet. A slot token held by another
        // open file description means processes that used this file before it was
        // damaged (truncated, zero-filled) are alive, with memory these fresh totals
        // do not show: the region recovers until they re-attach.
        let orphans = sys::ofd_lock_in(&self.file, slot_token_offset(0), MAX_SLOTS as u64)
            .map_or(true, |l| l.is_some());
        h.flags
            .store(if orphans { FLAG_RECOVERING } else { 0 }, Relaxed);
        l.counters[Counter::RegionInitializations as usize].fetch_add(1, Relaxed);
        if path == InitPath::Recovered {
            l.counters[Counter::RegionRecoveries as usize].fetch_add(1, Relaxed);
        }
        h.state.store(STATE_READY, Release);
        Ok(path)
    }

    pub(crate) fn layout(&self) -> &RegionLayout {
        layout_of(&self.map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once an access to this mapping faulted (the file shrank under it) and the
    /// SIGBUS guard put zeros in its place: nothing read from it since is the file's.
    pub fn is_poisoned(&self) -> bool {
        self.guard.is_some_and(sys::sigbus::poisoned)
    }

    /// The check every accounting call makes under the region lock, cheap enough for
    /// the allocation path (a few loads of lines the call touches anyway): the mapping
    /// was never poisoned, the header still has the magic and the init nonce this
    /// process attached to (zero-filling, overwriting or re-initializing the file
    /// changes one of them), and slot `me` is still ours (a truncation that spared the
    /// header lost the slots). 0 if so, else an index in DAMAGE.
    #[inline(always)]
    pub(crate) fn find_damage_fast(&self, me: SlotHandle) -> u8 {
        let l = self.layout();
        let h = &l.header;
        if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else if h.magic.load(Acquire) != MAGIC {
            2
        } else if h.init_nonce.load(Relaxed) != self.attached.nonce {
            5
        } else {
            match l.slots.get(me.index as usize) {
                Some(s)
                    if s.state.load(Relaxed) == SLOT_ACTIVE
                        && s.generation.load(Relaxed) == me.generation =>
                {
                    0
                }
                _ => DAMAGE_SLOT,
            }
        }
    }

    /// [`find_damage_fast`](Self::find_damage_fast), plus the header fields only a
    /// deliberate forgery changes on their own (layout version, state, device count;
    /// none of them is read on the accounting path).
    fn find_damage(&self, me: SlotHandle) -> u8 {
        let h = &self.layout().header;
        match self.find_damage_fast(me) {
            0 if h.version.load(Relaxed) != LAYOUT_VERSION => 3,
            0 if h.state.load(Relaxed) != STATE_READY => 4,
            0 if h.device_count.load(Relaxed) != self.attached.device_count => 6,
            d => d,
        }
    }

    /// After a reservation charged: was the region damaged meanwhile (someone
    /// zero-filling the file right now)? Then the grant was checked against garbage.
    #[inline(always)]
    pub(crate) fn damaged_since(&self, dev: usize) -> u8 {
        let l = self.layout();
        if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else if l.header.magic.load(Acquire) != MAGIC {
            2
        } else if l.header.init_nonce.load(Relaxed) != self.attached.nonce {
            5
        } else if l.devices[dev].limit.load(Relaxed) != self.attached.limits[dev] {
            DAMAGE_LIMIT
        } else {
            0
        }
    }

    /// Latches damage `what` (the first reason wins) and returns it as an error.
    #[cold]
    #[inline(never)]
    pub(crate) fn damaged(&self, what: u8) -> RegionError {
        // A check that read zeros because its own load faulted says so.
        let what = if self.is_poisoned() {
            DAMAGE_SIGBUS
        } else {
            what
        };
        let _ = self.damage.compare_exchange(0, what, AcqRel, Acquire);
        let first = self.damage.load(Acquire);
        RegionError::Damaged {
            path: self.path.clone(),
            what: DAMAGE[(first as usize).min(DAMAGE.len() - 1)],
        }
    }

    /// Checks that the region is still the one this process attached to, with slot
    /// `me` ours (see [`find_damage`](Self::find_damage)); once it was found damaged it
    /// stays damaged for this handle. Every accounting call checks it: a damaged
    /// region is never written again through this handle.
    #[inline]
    pub fn check_integrity(&self, me: SlotHandle) -> Result<(), RegionError> {
        match self.damage.load(Relaxed) {
            0 => match self.find_damage(me) {
                0 => Ok(()),
                d => Err(self.damaged(d)),
            },
            d => Err(self.damaged(d)),
        }
    }

    /// The accounting path's check (see [`find_damage_fast`](Self::find_damage_fast)).
    #[inline(always)]
    pub(crate) fn check_fast(&self, me: SlotHandle) -> Result<(), RegionError> {
        match (self.damage.load(Relaxed), self.find_damage_fast(me)) {
            (0, 0) => Ok(()),
            (0, d) | (d, _) => Err(self.damaged(d)),
        }
    }

    /// Only whether damage was already found: one load, for paths that then check
    /// properly under the region lock.
    #[inline]
    pub(crate) fn check_latched(&self) -> Result<(), RegionError> {
        match self.damage.load(Relaxed) {
            0 => Ok(()),
            d => Err(self.damaged(d)),
        }
    }

    /// Why the region was found damaged, if it was (by any check so far).
    pub fn damage(&self) -> Option<&'static str> {
        match self.damage.load(Acquire) {
            0 => None,
            d => Some(DAMAGE[(d as usize).min(DAMAGE.len() - 1)]),
        }
    }

    /// The init nonce of the region this handle attached to.
    pub fn attached_nonce(&self) -> u64 {
        self.attached.nonce
    }

    /// The limits this process enforces, per device of the region: the region's as
    /// it attached, or stricter ones set with [`keep_limits`](Self::keep_limits).
    pub fn enforced_limits(&self) -> Vec<u64> {
        let n = (self.attached.device_count as usize).min(MAX_DEVICES);
        self.attached.caps[..n].to_vec()
    }

    /// Keeps enforcing limits this process knew from a region it had to leave, where
    /// they are stricter than this region's (0 = none): a region re-initialized after
    /// damage by a process with another (or no) limit must not lift ours.
    pub fn keep_limits(&mut self, known: &[u64]) {
        for (cap, &k) in self.attached.caps.iter_mut().zip(known) {
            *cap = match (*cap, k) {
                (c, 0) => c,
                (0, k) => k,
                (c, k) => c.min(k),
            };
        }
    }

    /// What this process charged to its slot and has not credited, per device: its
    /// own copy, readable after the region was damaged.
    pub fn holdings(&self) -> [u64; MAX_DEVICES] {
        let mut h = [0; MAX_DEVICES];
        for (v, o) in h.iter_mut().zip(&self.own) {
            *v = o.load(Acquire);
        }
        h
    }

    /// True while the region waits for processes that used it before it was damaged
    /// to re-attach (see `FLAG_RECOVERING`).
    pub fn is_recovering(&self) -> bool {
        self.layout().header.flags.load(Acquire) & FLAG_RECOVERING != 0
    }

    /// Marks the region as recovering: called by a process that found the region it
    /// used damaged and re-attached to one that was not re-initialized (the header
    /// survived, the slots did not), so the others' memory is missing from it.
    pub fn mark_recovering(&self) {
        self.layout().header.flags.fetch_or(FLAG_RECOVERING, AcqRel);
    }

    /// Processes that hold a slot token (so they are alive and were given a slot in
    /// this file) whose slot is not active here: they used the file before it was
    /// damaged and have not re-attached. At most `MAX_SLOTS`; an error counts as one.
    pub(crate) fn orphans(&self) -> usize {
        let l = self.layout();
        let base = slot_token_offset(0);
        let mut todo = vec![(0u64, MAX_SLOTS as u64)];
        let mut n = 0;
        // A probe reports one conflicting lock anywhere in the range: search both
        // sides of each one found. Costs about two calls per lock held.
        while let Some((from, to)) = todo.pop() {
            if from >= to {
                continue;
            }
            let (start, len) = match sys::ofd_lock_in(&self.file, base + from, to - from) {
                Ok(None) => continue,
                Ok(Some(found)) => found,
                Err(_) => return n + 1,
            };
            let a = start.saturating_sub(base).clamp(from, to);
            if a >= to {
                continue;
            }
            let b = if len == 0 {
                to
            } else {
                (start + len).saturating_sub(base).clamp(a, to)
            };
            let b = b.max(a + 1).min(to);
            n += (a..b)
                .filter(|&i| l.slots[i as usize].state.load(Acquire) != SLOT_ACTIVE)
                .count();
            todo.push((from, a));
            todo.push((b, to));
        }
        n
    }

    /// After this handle found its region damaged (see
    /// [`check_integrity`](Self::check_integrity)): opens the file's current region
    /// afresh (initializing it if the damage left it empty or zeroed), claims a slot
    /// in it, keeps enforcing this handle's limits where they are stricter, and
    /// re-charges what this process holds ([`holdings`](Self::holdings)), so that the
    /// others see it. A region that was not re-initialized (its header survived the
    /// damage, its slots did not) is marked recovering: the memory of the processes
    /// that have not re-attached yet is missing from it. On success this handle's
    /// slot tokens are released; use the new handle from then on.
    pub fn reattach_after_damage(
        &self,
        params: &InitParams,
    ) -> Result<(Region, SlotHandle), RegionError> {
        let (mut fresh, _) = Region::open(&self.path, params)?;
        fresh.keep_limits(&self.attached.caps);
        let slot = fresh.claim_slot()?;
        if fresh.attached.nonce == self.attached.nonce {
            fresh.mark_recovering();
        }
        let devices = (fresh.attached.device_count as usize).min(MAX_DEVICES);
        for (dev, &bytes) in self.holdings().iter().enumerate().take(devices) {
            fresh.charge(slot, dev, bytes)?;
        }
        fresh.count(Some(slot.index), Counter::DamageReattachments, 1);
        // Our old slot's token, held until now so that the claim above could not
        // take our own old index: the region waits for it no longer. Released
        // through the description, so forked children sharing it do not keep it.
        self.drop_tokens();
        Ok((fresh, slot))
    }

    /// True in a child forked after this handle was opened: the child must call
    /// [`Region::reattach_after_fork`] before touching slots or locks.
    pub fn is_forked_copy(&self) -> bool {
        match (self.fork_gen, sys::fork_generation()) {
            (Some(then), Some(now)) => then != now,
            _ => self.opened_pid != sys::getpid(),
        }
    }

    /// In a forked child: drops the parent's open file description (and with it any
    /// claim on the parent's liveness tokens) and opens a fresh one, so the child
    /// gets its own identity. The mapping is replaced too: a mapping holds a reference
    /// to the description it was made from, so the inherited one alone would keep the
    /// parent's tokens held after the parent died.
    pub fn reattach_after_fork(&mut self) -> Result<(), RegionError> {
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let fresh = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&proc_path)
            .map_err(io_err(&self.path, "reopen after fork"))?;
        let map = Mapping::new(&fresh, REGION_SIZE, true)
            .map_err(io_err(&self.path, "mmap after fork"))?;
        if let Some(g) = self.guard.take() {
            sys::sigbus::unregister(g);
        }
        self.map = map;
        self.guard = sys::sigbus::register(self.map.as_ptr() as usize, REGION_SIZE, true);
        self.file = fresh;
        for w in self.held.iter() {
            w.store(0, Relaxed);
        }
        // The child holds none of its parent's memory, and sees the file afresh.
        for o in &self.own {
            o.store(0, Relaxed);
        }
        self.damage.store(0, Relaxed);
        self.opened_pid = sys::getpid();
        self.fork_gen = sys::fork_generation();
        // Another parent thread may have held it at the fork; the child has no such thread.
        self.mem_local = std::sync::Mutex::new(());
        Ok(())
    }

    /// Adds `n` to a region-wide counter, and to `slot`'s share if given.
    pub fn count(&self, slot: Option<u16>, c: Counter, n: u64) {
        let l = self.layout();
        l.counters[c as usize].fetch_add(n, Relaxed);
        if let Some(s) = slot.and_then(|s| l.slots.get(s as usize)) {
            s.counters[c as usize].fetch_add(n, Relaxed);
        }
    }

    pub fn observe(&self, h: HistogramId, value: u64) {
        self.layout().histograms[h as usize].observe(value, h.unit());
    }

    /// Appends an event to the ring. Never blocks; see `ring`.
    pub fn emit(&self, ev: &Event) -> bool {
        ring::write(self.layout(), ev)
    }

    /// Device limits as recorded in the region (the first process's view).
    pub fn device_limits(&self) -> Vec<u64> {
        let l = self.layout();
        let n = (l.header.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
        l.devices[..n]
            .iter()
            .map(|d| d.limit.load(Relaxed))
            .collect()
    }

    /// A consistent-enough copy for tools and tests (same as the reader's).
    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.layout(), &self.file)
    }
}

/// Opens (or creates, with exactly `mode`) the region file for writing. The path is
/// usually in a directory others can write (/tmp, a shared volume): never follow a
/// symlink, never open anything but a regular file with one name (a hard link to some
/// other file would make us write into it).
fn open_region_file(path: &Path, mode: u32) -> Result<File, RegionError> {
    let flags = libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let created = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(flags)
        .open(path);
    let file = match created {
        Ok(f) => {
            // The umask must not decide who can join (0644 would lock out other UIDs
            // of the container, which would then run without limits).
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(io_err(path, "chmod"))?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(io_err(path, "open"))?,
        Err(e) => return Err(io_err(path, "create")(e)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(RegionError::NotRegularFile {
            path: path.to_path_buf(),
            what: format!(
                "not a regular file with a single name (links: {})",
                meta.nlink()
            ),
        });
    }
    Ok(file)
}

/// Extends an empty or all-zero file to the layout size; refuses a short file with data.
fn grow_if_blank(file: &File, path: &Path) -> Result<(), RegionError> {
    let len = file_len(file, path)?;
    if len >= REGION_SIZE as u64 {
        return Ok(());
    }
    let mut buf = Vec::with_capacity(len as usize);
    (&*file)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "read"))?;
    if buf.iter().any(|&b| b != 0) {
        return Err(RegionError::Truncated {
            path: path.to_path_buf(),
            len,
            expected: REGION_SIZE as u64,
        });
    }
    reserve_blocks(file, path)
}

/// Grows the file to the layout size with every block allocated (see
/// `sys::allocate`). On a filesystem without `fallocate` it is grown sparse, as before.
fn reserve_blocks(file: &File, path: &Path) -> Result<(), RegionError> {
    match sys::allocate(file, REGION_SIZE as u64) {
        Ok(true) => Ok(()),
        Ok(false) => {
            if file_len(file, path)? < REGION_SIZE as u64 {
                file.set_len(REGION_SIZE as u64)
                    .map_err(io_err(path, "grow"))?;
            }
            Ok(())
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            Err(RegionError::NoSpace {
                path: path.to_path_buf(),
                needed: REGION_SIZE as u64,
            })
        }
        Err(e) => Err(io_err(path, "allocate the file's blocks (fallocate)")(e)),
    }
}

fn zero_all(l: &RegionLayout) {
    let h = &l.header;
    for a in [
        &h.magic,
        &h.region_size,
        &h.init_nonce,
        &h.created_realtime_ns,
        &h.created_monotonic_ns,
        &h.ctx_footprint,
    ] {
        a.store(0, Relaxed);
    }
    h.slot_high_water.store(0, Relaxed);
    for f in [
        &l.identity.namespace,
        &l.identity.pod,
        &l.identity.container,
        &l.identity._reserved,
    ] {
        f.iter().for_each(|b| b.store(0, Relaxed));
    }
    for d in &l.devices {
        for a in [&d.limit, &d.used, &d.denials, &d.peak] {
            a.store(0, Relaxed);
        }
    }
    l.counters.iter().for_each(|c| c.store(0, Relaxed));
    for hist in &l.histograms {
        hist.buckets.iter().for_each(|b| b.store(0, Relaxed));
        hist.count.store(0, Relaxed);
        hist.sum.store(0, Relaxed);
    }
    for lock in &l.locks {
        lock.word.store(0, Relaxed);
        lock.waiters.store(0, Relaxed);
    }
    l.ring.head.store(0, Relaxed);
    for s in &l.slots {
        s.state.store(SLOT_FREE, Relaxed);
        s.host_pid.store(0, Relaxed);
        s.pidns_inode.store(0, Relaxed);
        s.start_time_ticks.store(0, Relaxed);
        s.mem_used.iter().for_each(|m| m.store(0, Relaxed));
        s.counters.iter().for_each(|c| c.store(0, Relaxed));
    }
    for e in &l.events {
        e.seq.store(0, Relaxed);
    }
}

/// How many leading slots can be in use (the high-water mark, clamped).
pub(crate) fn slots_in_use(l: &RegionLayout) -> usize {
    (l.header.slot_high_water.load(Acquire) as usize).min(MAX_SLOTS)
}

mod sealed {
    /// Lets the shared read methods reach the mapping without exposing it: a caller
    /// holding `&RegionLayout` of a read-only mapping could try to store into it.
    pub trait Mapped {
        fn mapped_layout(&self) -> &crate::layout::RegionLayout;
    }
}

impl sealed::Mapped for Region {
    fn mapped_layout(&self) -> &RegionLayout {
        self.layout()
    }
}

impl sealed::Mapped for RegionReader {
    fn mapped_layout(&self) -> &RegionLayout {
        self.layout()
    }
}

/// Reading the event ring, from either handle.
pub trait RegionRead: sealed::Mapped {
    /// A consumer starting at the oldest event still in the ring.
    fn ring_consumer(&self) -> crate::ring::RingConsumer {
        crate::ring::RingConsumer::new(self.mapped_layout())
    }

    /// A consumer that sees only events written from now on.
    fn ring_consumer_from_now(&self) -> crate::ring::RingConsumer {
        crate::ring::RingConsumer::from_now(self.mapped_layout())
    }

    /// (limit, used) of device `dev`, without a full snapshot; `None` if the region
    /// has no such device.
    fn device_usage(&self, dev: usize) -> Option<(u64, u64)> {
        let l = self.mapped_layout();
        let n = (l.header.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
        (dev < n).then(|| {
            let d = &l.devices[dev];
            (d.limit.load(Relaxed), d.used.load(Acquire))
        })
    }

    /// Events ever started in the ring (its head position).
    fn ring_head(&self) -> u64 {
        self.mapped_layout().ring.head.load(Acquire)
    }

    /// Delivers up to `max` events to `f` and accounts for every position passed.
    fn drain(
        &self,
        consumer: &mut crate::ring::RingConsumer,
        max: usize,
        f: impl FnMut(Event),
    ) -> crate::ring::DrainStats {
        consumer.drain(self.mapped_layout(), max, f)
    }
}

impl RegionRead for Region {}
impl RegionRead for RegionReader {}

/// A read-only handle for the exporter: `PROT_READ` mapping, every field validated,
/// and no way to write. It holds no tokens and takes no locks.
pub struct RegionReader {
    path: PathBuf,
    map: Mapping,
    _file: File,
    /// Our entry in the SIGBUS guard, if it had room.
    guard: Option<usize>,
}

impl Drop for RegionReader {
    fn drop(&mut self) {
        // Before the mapping goes: the guard must never touch an address that is no
        // longer ours.
        if let Some(g) = self.guard {
            sys::sigbus::unregister(g);
        }
    }
}

/// Makes a region file truncated (or unbacked on a full filesystem) under a mapping
/// harmless to the process: the mapping reads as zeros from then on, and
/// [`RegionReader::is_poisoned`] / [`Region::is_poisoned`] say so (a writer's
/// accounting calls then fail with [`RegionError::Damaged`]), instead of the process
/// dying of SIGBUS. Call once, before mapping: the exporter and tools at start, the
/// interposer just before it opens its region. Other SIGBUS faults go to the handler
/// installed before (or the default action); a handler the application installs
/// *after* this one replaces it.
pub fn install_sigbus_guard() {
    sys::sigbus::install();
}

impl RegionReader {
    pub fn open(path: impl AsRef<Path>) -> Result<RegionReader, RegionError> {
        let path = path.as_ref();
        // Never follow a symlink, never block on a FIFO: the path is in a directory
        // tenants can write.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(io_err(path, "open read-only"))?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if !meta.file_type().is_file() {
            return Err(RegionError::NotRegularFile {
                path: path.to_path_buf(),
                what: "not a regular file".into(),
            });
        }
        let len = meta.len();
        if len < std::mem::size_of::<Header>() as u64 {
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        // Check the header by plain reads before mapping the whole layout, so a short
        // file with a valid-looking header is reported, not mapped past its end.
        let mut head = [0u8; 16];
        (&file)
            .read_exact(&mut head)
            .map_err(io_err(path, "read header"))?;
        let magic = u64::from_le_bytes(head[0..8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        if magic != MAGIC {
            return Err(RegionError::WrongMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        if version != LAYOUT_VERSION {
            return Err(RegionError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: LAYOUT_VERSION,
            });
        }
        if len < REGION_SIZE as u64 {
            return Err(RegionError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        let map =
            Mapping::new(&file, REGION_SIZE, false).map_err(io_err(path, "mmap read-only"))?;
        let guard = sys::sigbus::register(map.as_ptr() as usize, REGION_SIZE, false);
        let reader = RegionReader {
            path: path.to_path_buf(),
            map,
            _file: file,
            guard,
        };
        validate(reader.layout(), path, len)?;
        reader.check_poison()?;
        Ok(reader)
    }

    /// True once a read of this mapping faulted because the file was truncated (with
    /// the SIGBUS guard installed): everything read since may be zeros. Drop it.
    pub fn is_poisoned(&self) -> bool {
        self.guard.is_some_and(sys::sigbus::poisoned)
    }

    fn check_poison(&self) -> Result<(), RegionError> {
        if self.is_poisoned() {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                len: file_len(&self._file, &self.path).unwrap_or(0),
                expected: REGION_SIZE as u64,
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-checks the header (it may have been re-created or damaged since open).
    pub fn revalidate(&self) -> Result<(), RegionError> {
        self.check_poison()?;
        // The length first: reading a header past a new end of file would fault.
        let len = file_len(&self._file, &self.path)?;
        if len < REGION_SIZE as u64 {
            return Err(RegionError::Truncated {
                path: self.path.clone(),
                len,
                expected: REGION_SIZE as u64,
            });
        }
        validate(self.layout(), &self.path, len)?;
        self.check_poison()
    }

    pub(crate) fn layout(&self) -> &RegionLayout {
        layout_of(&self.map)
    }

    pub fn snapshot(&self) -> Snapshot {
        snapshot(self.layout(), &self._file)
    }
}

/// One live process slot, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub index: u16,
    pub generation: u32,
    /// The owner's PID in its own namespace.
    pub pid: u32,
    /// Inode of the owner's PID namespace; 0 = unknown.
    pub pidns_inode: u64,
    /// The owner's start time, clock ticks after boot; 0 = unknown.
    pub start_time_ticks: u64,
    /// Host PID as recorded by detection; 0 = none. Tenant-written: check it against
    /// the kernel with [`SlotInfo::identity`] before trusting it.
    pub host_pid: u32,
    pub detect_outcome: u32,
    pub mem_used: Vec<u64>,
    /// Its liveness token is held: the owner is running (or is this process).
    pub alive: bool,
    /// HAMi-core settings the owner started with that Vigil does not enforce.
    pub unenforced: Vec<crate::counters::UnenforcedSetting>,
}

impl SlotInfo {
    /// The owner as the kernel knows it (see `procfs`).
    pub fn identity(&self) -> crate::procfs::ProcessIdentity {
        crate::procfs::ProcessIdentity {
            pid: self.pid,
            pidns_inode: self.pidns_inode,
            start_time_ticks: self.start_time_ticks,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub limit: u64,
    pub used: u64,
    pub denials: u64,
    pub peak: u64,
}

/// A plain copy of everything a reader exports. Values are clamped to the layout's
/// bounds, so garbage in the region yields garbage numbers, never a crash.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub identity: RegionIdentity,
    pub init_count: u32,
    pub init_nonce: u64,
    pub created_realtime_ns: u64,
    pub devices: Vec<DeviceInfo>,
    pub counters: Vec<u64>,
    pub histograms: Vec<HistogramSnapshot>,
    /// Slots marked active, each with its owner's liveness.
    pub slots: Vec<SlotInfo>,
    /// Per lock (indexed by `LockId`).
    pub locks: Vec<LockInfo>,
    pub ring_head: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// Slot index of the owner, if held.
    pub owner: Option<u16>,
    pub epoch: u32,
    /// Processes asleep on the lock (may over-count waiters that were killed asleep).
    pub waiters: u32,
    pub lease_ns: u64,
}

impl Snapshot {
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c as usize).copied().unwrap_or(0)
    }
    pub fn histogram(&self, h: HistogramId) -> &HistogramSnapshot {
        &self.histograms[h as usize]
    }
}

fn snapshot(l: &RegionLayout, file: &File) -> Snapshot {
    let h = &l.header;
    let dc = (h.device_count.load(Relaxed) as usize).min(MAX_DEVICES);
    let devices = l.devices[..dc]
        .iter()
        .map(|d| DeviceInfo {
            limit: d.limit.load(Relaxed),
            used: d.used.load(Relaxed),
            denials: d.denials.load(Relaxed),
            peak: d.peak.load(Relaxed),
        })
        .collect();
    let histograms = [
        HistogramId::LockWaitRegion,
        HistogramId::LockWaitDetect,
        HistogramId::DetectionLatency,
        HistogramId::DetectionPolls,
        HistogramId::InitDuration,
    ]
    .into_iter()
    .map(|id| {
        let src = &l.histograms[id as usize];
        HistogramSnapshot {
            unit: id.unit(),
            buckets: src.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: src.count.load(Relaxed),
            sum: src.sum.load(Relaxed),
        }
    })
    .collect();
    let slots = l.slots[..slots_in_use(l)]
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state.load(Acquire) == SLOT_ACTIVE)
        .map(|(i, s)| {
            // The order matters (see `Region::try_claim` and `record_detection`):
            // generation, then the owner's identity, then the outcome, then the host
            // PID. An identity seen is never paired with an earlier owner's outcome,
            // and an outcome seen comes with the host PID recorded before it.
            let generation = s.generation.load(Acquire);
            let pid = s.pid.load(Acquire);
            let pidns_inode = s.pidns_inode.load(Acquire);
            let start_time_ticks = s.start_time_ticks.load(Acquire);
            let detect_outcome = s.detect_outcome.load(Acquire);
            let host_pid = s.host_pid.load(Acquire);
            SlotInfo {
                index: i as u16,
                generation,
                pid,
                pidns_inode,
                start_time_ticks,
                host_pid,
                detect_outcome,
                mem_used: s.mem_used[..dc].iter().map(|m| m.load(Relaxed)).collect(),
                alive: sys::ofd_is_locked(file, slot_token_offset(i)).unwrap_or(true),
                unenforced: crate::counters::UnenforcedSetting::ALL
                    .into_iter()
                    .filter(|u| s.counters[u.counter() as usize].load(Relaxed) > 0)
                    .collect(),
            }
        })
        .collect();
    Snapshot {
        identity: RegionIdentity {
            namespace: load_str(&l.identity.namespace),
            pod: load_str(&l.identity.pod),
            container: load_str(&l.identity.container),
        },
        init_count: h.init_count.load(Relaxed),
        init_nonce: h.init_nonce.load(Relaxed),
        created_realtime_ns: h.created_realtime_ns.load(Relaxed),
        devices,
        counters: l.counters.iter().map(|c| c.load(Relaxed)).collect(),
        histograms,
        slots,
        locks: l
            .locks
            .iter()
            .map(|st| {
                let w = st.word.load(Acquire);
                LockInfo {
                    // A forged word can name any of 65535 owners; only real slots count.
                    owner: crate::lock::owner_of(w)
                        .map(|(o, _)| o)
                        .filter(|o| (*o as usize) < MAX_SLOTS),
                    epoch: crate::lock::epoch_of(w),
                    waiters: st.waiters.load(Relaxed),
                    lease_ns: st.lease_ns.load(Relaxed),
                }
            })
            .collect(),
        ring_head: l.ring.head.load(Acquire),
    }
}

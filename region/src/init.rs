//! How a process gets a usable region: the parameters the first process writes, the
//! open protocol (create the file, initialize it exactly once, or take the fast path
//! to a READY region), and the recovery of a region whose initializer died half-way.

use crate::counters::{Counter, HistogramId};
use crate::error::{io_err, RegionError};
use crate::file::{file_len, grow_if_blank, open_region_file, reserve_blocks};
use crate::layout::*;
use crate::region::Region;
use crate::ring::{Event, Payload, NO_SLOT};
use crate::snapshot::RegionIdentity;
use crate::sys::{self, monotonic_ns, realtime_ns};
use crate::validate::validate;
use std::path::Path;
use std::sync::atomic::Ordering::*;
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

fn store_str(dst: &[std::sync::atomic::AtomicU8; IDENTITY_FIELD_LEN], s: &str) {
    let mut n = s.len().min(IDENTITY_FIELD_LEN);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    for (i, d) in dst.iter().enumerate() {
        d.store(if i < n { s.as_bytes()[i] } else { 0 }, Relaxed);
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

/// How [`Region::open`] went, for the caller's logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct InitReport {
    /// How this process got the region.
    pub path: InitPath,
    /// Time the whole open took (waiting for another initializer included).
    pub duration: Duration,
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
        let mut region = Region::map(path, file)?;
        let init_path = region.initialize(params, deadline, len)?;
        region.record_attached();
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

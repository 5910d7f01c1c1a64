//! `vigil-region`: inspect a Vigil region, follow its events, and drive it from real
//! processes (the `exercise` commands are what the crash tests and benchmarks run).

use clap::{Parser, Subcommand, ValueEnum};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use vigil_region::{
    monotonic_ns, Counter, DetectOutcome, Event, EventKind, ForceReason, InitParams, LockId,
    Payload, Region, RegionRead, RegionReader, ReleaseOutcome, SlotHandle, Snapshot,
};

#[derive(Parser)]
#[command(
    name = "vigil-region",
    version,
    about = "Inspect and exercise Vigil shared regions"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a region's header, devices, counters and live slots (read-only).
    Inspect { path: PathBuf },
    /// Print the events in a region's ring (read-only).
    Events {
        path: PathBuf,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (JSON Lines): each event, then
        /// {"lost":{"overwritten":N,"torn":N,"abandoned":N}}.
        #[arg(long)]
        json: bool,
    },
    /// Create (or open) a region with the given parameters and print how it went.
    Create {
        path: PathBuf,
        #[command(flatten)]
        init: InitArgs,
    },
    /// Drive a region from this process; used by the crash tests and benchmarks.
    #[command(subcommand)]
    Exercise(Exercise),
    /// List the crash-test fault points (armed with VIGIL_FAULT in fault-injection
    /// builds): one per line as NAME<TAB>MODES<TAB>MEANING, or JSON with --json.
    FaultPoints {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Clone)]
struct InitArgs {
    /// Device memory limit in bytes, one per device (repeat for more devices).
    #[arg(long = "device-limit")]
    device_limits: Vec<u64>,
    /// Region lock lease in milliseconds.
    #[arg(long, default_value_t = 5000)]
    region_lease_ms: u64,
    /// Detection lock lease in milliseconds.
    #[arg(long, default_value_t = 30000)]
    detect_lease_ms: u64,
}

impl InitArgs {
    fn params(&self) -> InitParams {
        InitParams {
            device_limits: self.device_limits.clone(),
            region_lock_lease: Duration::from_millis(self.region_lease_ms),
            detect_lock_lease: Duration::from_millis(self.detect_lease_ms),
            identity: vigil_region::RegionIdentity::from_env(),
            ..InitParams::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LockArg {
    Region,
    Detect,
}

impl From<LockArg> for LockId {
    fn from(l: LockArg) -> LockId {
        match l {
            LockArg::Region => LockId::Region,
            LockArg::Detect => LockId::Detect,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OutcomeArg {
    Found,
    SameNamespace,
    Ambiguous,
    Timeout,
    NvmlError,
}

impl From<OutcomeArg> for DetectOutcome {
    fn from(o: OutcomeArg) -> DetectOutcome {
        match o {
            OutcomeArg::Found => DetectOutcome::Found,
            OutcomeArg::SameNamespace => DetectOutcome::SameNamespace,
            OutcomeArg::Ambiguous => DetectOutcome::Ambiguous,
            OutcomeArg::Timeout => DetectOutcome::Timeout,
            OutcomeArg::NvmlError => DetectOutcome::NvmlError,
        }
    }
}

#[derive(Subcommand)]
enum Exercise {
    /// Attach (initializing if first) and print the init path.
    Attach {
        path: PathBuf,
        /// Busy-wait until CLOCK_MONOTONIC reaches this many ns (a start barrier).
        #[arg(long)]
        start_at_ns: Option<u64>,
        #[command(flatten)]
        init: InitArgs,
    },
    /// Claim a slot, take a lock, hold it, release it; print each step.
    Hold {
        path: PathBuf,
        #[arg(long, value_enum, default_value = "region")]
        lock: LockArg,
        /// How long to hold the lock (0 = until killed).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[command(flatten)]
        init: InitArgs,
    },
    /// Claim a slot, optionally record a host-PID detection in it, print both, and wait
    /// to be killed (no lock taken). Prints "slot index=I generation=G pid=P
    /// pidns_inode=N start_time_ticks=T", then "detected outcome=O host_pid=H".
    Claim {
        path: PathBuf,
        /// Record a detection with this outcome (as the interposer would).
        #[arg(long, value_enum)]
        detect: Option<OutcomeArg>,
        /// The host PID to record with it (default: none, except that `same-namespace`
        /// records this process's own PID, as the interposer does).
        #[arg(long, conflicts_with = "host_pid_from_stdin")]
        host_pid: Option<u32>,
        /// Read the host PID to record from a line on stdin, after printing the slot
        /// (a test learns the process's host PID only once it runs).
        #[arg(long)]
        host_pid_from_stdin: bool,
        /// Initial device limits etc. if this process creates the region.
        #[command(flatten)]
        init: InitArgs,
    },
    /// Take the lock N times and do a non-atomic read-modify-write of a counter in
    /// `--data` inside, with an overlap canary. Exits 3 on a detected overlap.
    LockLoop {
        path: PathBuf,
        /// Shared data file: [canary u64][counter u64][log u64 ...].
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        iterations: u64,
        /// This worker's id (recorded in the log).
        #[arg(long)]
        id: u32,
        /// Extra time spent inside each critical section, in microseconds.
        #[arg(long, default_value_t = 0)]
        hold_us: u64,
        #[command(flatten)]
        init: InitArgs,
    },
    /// Claim a slot, fork, and have the child claim its own; both then wait to be
    /// killed. With --no-reattach the child keeps the parent's open file description
    /// (what a naive interposer would do), to show why reattaching matters.
    Fork {
        path: PathBuf,
        #[arg(long)]
        no_reattach: bool,
    },
    /// Take and release the region lock in a tight loop for a while (benchmarks).
    Contend {
        path: PathBuf,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Reserve and credit random amounts on device 0 in a loop, keeping a local list of
    /// what it holds (as the interposer does). Prints one line per granted reservation
    /// with the device total after it, then a summary; with --hold, waits to be killed.
    Mem {
        path: PathBuf,
        #[arg(long)]
        iterations: u64,
        /// Largest single reservation, in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        max_bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        start_at_ns: Option<u64>,
        #[arg(long)]
        hold: bool,
        #[command(flatten)]
        init: InitArgs,
    },
    /// Write N marker events (a = id, b = sequence number).
    Ring {
        path: PathBuf,
        #[arg(long)]
        events: u64,
        #[arg(long)]
        id: u32,
        #[arg(long)]
        start_at_ns: Option<u64>,
    },
}

fn main() -> ExitCode {
    // SAFETY: restoring the default SIGPIPE disposition before any thread exists, so
    // `vigil-region inspect | head` ends quietly instead of panicking on EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    vigil_region::install_sigbus_guard();
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil-region: {e}");
            ExitCode::from(2)
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::FaultPoints { json } => {
            let points = vigil_region::fault::POINTS;
            if json {
                // Hand-written JSON: the names and texts are ours, plain ASCII.
                let rows: Vec<String> = points
                    .iter()
                    .map(|p| {
                        format!(
                            "{{\"name\":\"{}\",\"means\":\"{}\",\"modes\":[{}]}}",
                            p.name,
                            p.means,
                            p.modes
                                .iter()
                                .map(|m| format!("\"{m}\""))
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .collect();
                println!("[{}]", rows.join(","));
            } else {
                for p in points {
                    println!("{}\t{}\t{}", p.name, p.modes.join(","), p.means);
                }
            }
        }
        Cmd::Inspect { path } => {
            let r = RegionReader::open(&path)?;
            print_snapshot(&path, &r.snapshot());
        }
        Cmd::Events { path, follow, json } => {
            let r = RegionReader::open(&path)?;
            let mut c = r.ring_consumer();
            // A position still being written is either a live writer (wait) or one
            // that died mid-write: the consumer decides after its abandon time, so a
            // one-shot read waits that long at most a few times.
            let mut tries = 0;
            loop {
                let st = r.drain(&mut c, usize::MAX, |e| {
                    println!(
                        "{}",
                        if json {
                            json_event(&e)
                        } else {
                            format_event(&e)
                        }
                    )
                });
                if follow {
                    std::thread::sleep(Duration::from_millis(100));
                } else if st.waiting && tries < 5 {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(110));
                } else {
                    break;
                }
            }
            let lost = c.lost();
            if json {
                println!(
                    "{{\"lost\":{{\"overwritten\":{},\"torn\":{},\"abandoned\":{}}}}}",
                    lost.overwritten, lost.torn, lost.abandoned
                );
            } else {
                println!(
                    "# lost: overwritten={} torn={} abandoned={}",
                    lost.overwritten, lost.torn, lost.abandoned
                );
            }
        }
        Cmd::Create { path, init } => {
            let (r, rep) = Region::open(&path, &init.params())?;
            println!(
                "init path={} duration_ns={} limits={:?}",
                rep.path.name(),
                rep.duration.as_nanos(),
                r.device_limits()
            );
        }
        Cmd::Exercise(e) => return exercise(e),
    }
    Ok(ExitCode::SUCCESS)
}

fn spin_until(t: Option<u64>) {
    if let Some(t) = t {
        while monotonic_ns() < t {
            std::hint::spin_loop();
        }
    }
}

/// Opens the region as `init` says and claims a slot, printing `slot index= pid=`.
fn attach_and_claim(path: &Path, init: &InitArgs) -> Result<(Region, SlotHandle)> {
    let (r, _) = Region::open(path, &init.params())?;
    let me = r.claim_slot()?;
    println!("slot index={} pid={}", me.index, std::process::id());
    Ok((r, me))
}

fn exercise(e: Exercise) -> Result<ExitCode> {
    match e {
        Exercise::Attach {
            path,
            start_at_ns,
            init,
        } => {
            spin_until(start_at_ns);
            let (_r, rep) = Region::open(&path, &init.params())?;
            println!(
                "init path={} duration_ns={} pid={}",
                rep.path.name(),
                rep.duration.as_nanos(),
                std::process::id()
            );
        }
        Exercise::Hold {
            path,
            lock,
            hold_ms,
            init,
        } => {
            let (r, me) = attach_and_claim(&path, &init)?;
            let g = r.lock(lock.into(), me)?;
            let o = g.outcome();
            println!(
                "locked ts_ns={} wait_ns={} retries={} forced={} victim={} epoch={}",
                monotonic_ns(),
                o.wait_ns,
                o.retries,
                o.forced.map(|(r, _)| r.name()).unwrap_or("none"),
                o.forced.map(|(_, v)| v as i64).unwrap_or(-1),
                o.epoch
            );
            let start = monotonic_ns();
            let mut disturbed = 0u64;
            while hold_ms == 0 || monotonic_ns() - start < hold_ms * 1_000_000 {
                std::thread::sleep(Duration::from_millis(1));
                if !g.is_current() {
                    disturbed += 1;
                }
            }
            let out = g.release();
            r.release_slot(me)?;
            println!(
                "released outcome={} disturbed_ms={disturbed}",
                match out {
                    ReleaseOutcome::Released => "released",
                    ReleaseOutcome::Fenced => "fenced",
                }
            );
        }
        Exercise::Claim {
            path,
            detect,
            host_pid,
            host_pid_from_stdin,
            init,
        } => {
            let (r, _) = Region::open(&path, &init.params())?;
            let me = r.claim_slot()?;
            let s = r.snapshot();
            let info = s
                .slots
                .iter()
                .find(|x| x.index == me.index)
                .ok_or("the claimed slot is not in the snapshot")?;
            println!(
                "slot index={} generation={} pid={} pidns_inode={} start_time_ticks={}",
                me.index, me.generation, info.pid, info.pidns_inode, info.start_time_ticks
            );
            let host_pid = if host_pid_from_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                Some(line.trim().parse::<u32>()?)
            } else {
                host_pid
            };
            if let Some(o) = detect {
                let outcome = DetectOutcome::from(o);
                let host_pid = match outcome {
                    DetectOutcome::SameNamespace => host_pid.or(Some(std::process::id())),
                    _ => host_pid,
                };
                r.record_detection(me, outcome, host_pid, 1_000_000, 1, 500_000);
                println!(
                    "detected outcome={} host_pid={}",
                    outcome.name(),
                    host_pid.unwrap_or(0)
                );
            }
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Exercise::LockLoop {
            path,
            data,
            iterations,
            id,
            hold_us,
            init,
        } => return lock_loop(&path, &data, iterations, id, hold_us, &init),
        Exercise::Fork { path, no_reattach } => {
            let (mut r, _) = Region::open(&path, &InitParams::default())?;
            let me = r.claim_slot()?;
            println!("parent slot={} pid={}", me.index, std::process::id());
            if fork()? == 0 {
                if no_reattach {
                    println!("child slot=none pid={}", std::process::id());
                } else {
                    r.reattach_after_fork()?;
                    let mine = r.claim_slot()?;
                    println!("child slot={} pid={}", mine.index, std::process::id());
                }
            }
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Exercise::Contend { path, duration_ms } => {
            let (r, _) = Region::open(&path, &InitParams::default())?;
            let me = r.claim_slot()?;
            println!("slot index={}", me.index);
            let end = monotonic_ns() + duration_ms * 1_000_000;
            let mut n = 0u64;
            while monotonic_ns() < end {
                for _ in 0..64 {
                    drop(r.lock(LockId::Region, me)?);
                }
                n += 64;
            }
            println!("done acquisitions={n}");
        }
        Exercise::Mem {
            path,
            iterations,
            max_bytes,
            seed,
            start_at_ns,
            hold,
            init,
        } => {
            let (r, me) = attach_and_claim(&path, &init)?;
            spin_until(start_at_ns);
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut held, mut granted, mut denied) = (Vec::new(), 0u64, 0u64);
            for _ in 0..iterations {
                if !held.is_empty() && next() % 3 == 0 {
                    let b = held.swap_remove((next() % held.len() as u64) as usize);
                    r.credit(me, 0, b)?;
                    continue;
                }
                let b = 1 + next() % max_bytes;
                match r.reserve(me, 0, b)? {
                    vigil_region::Reservation::Granted => {
                        granted += 1;
                        held.push(b);
                        let (limit, used) =
                            vigil_region::RegionRead::device_usage(&r, 0).unwrap_or((0, 0));
                        if limit > 0 && used > limit {
                            println!("overrun used={used} limit={limit}");
                            return Ok(ExitCode::from(3));
                        }
                    }
                    vigil_region::Reservation::Denied { .. } => denied += 1,
                }
            }
            let mine: u64 = held.iter().sum();
            println!(
                "done granted={granted} denied={denied} holding={mine} slot_usage={}",
                r.slot_usage(me, 0)
            );
            if hold {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            for b in held {
                r.credit(me, 0, b)?;
            }
            r.release_slot(me)?;
        }
        Exercise::Ring {
            path,
            events,
            id,
            start_at_ns,
        } => {
            let (r, _) = Region::open(&path, &InitParams::default())?;
            spin_until(start_at_ns);
            for seq in 0..events {
                r.emit(&Event::new(EventKind::Marker, 0, id, id as u64, seq, 0));
            }
            println!("wrote events={events}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// fork(2). Only called from this single-threaded tool.
fn fork() -> std::io::Result<i32> {
    // SAFETY: the process is single-threaded here (no runtime threads are started by
    // this tool), so the child may keep running arbitrary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

fn read_u64(f: &File, off: u64) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off)?;
    Ok(u64::from_le_bytes(b))
}

fn write_u64(f: &File, off: u64, v: u64) -> std::io::Result<()> {
    f.write_all_at(&v.to_le_bytes(), off)
}

/// The mutual-exclusion workload. The counter update is a plain read then write, so
/// two processes inside at once lose updates; the canary catches them in the act.
fn lock_loop(
    path: &Path,
    data: &Path,
    iterations: u64,
    id: u32,
    hold_us: u64,
    init: &InitArgs,
) -> Result<ExitCode> {
    let (r, _) = Region::open(path, &init.params())?;
    let me = r.claim_slot()?;
    let f = OpenOptions::new().read(true).write(true).open(data)?;
    println!("slot index={} pid={}", me.index, std::process::id());
    let mut overlaps = 0u64;
    for seq in 0..iterations {
        let g = r.lock(LockId::Region, me)?;
        let canary = read_u64(&f, 0)?;
        let expected_leftover = match g.outcome().forced {
            Some((ForceReason::OwnerDead, victim)) => victim as u64 + 1,
            _ => 0,
        };
        if canary != 0 && canary != expected_leftover {
            overlaps += 1;
            eprintln!(
                "overlap: canary {canary} found by slot {} (seq {seq})",
                me.index
            );
        }
        write_u64(&f, 0, me.index as u64 + 1)?;
        let n = read_u64(&f, 8)?;
        if hold_us > 0 {
            let t = monotonic_ns();
            while monotonic_ns() - t < hold_us * 1000 {
                std::hint::spin_loop();
            }
        }
        write_u64(&f, 16 + 8 * n, (id as u64) << 32 | (seq + 1))?;
        write_u64(&f, 8, n + 1)?;
        if read_u64(&f, 0)? != me.index as u64 + 1 {
            overlaps += 1;
            eprintln!(
                "overlap: canary changed under slot {} (seq {seq})",
                me.index
            );
        }
        write_u64(&f, 0, 0)?;
        drop(g);
    }
    println!("done iterations={iterations} overlaps={overlaps}");
    Ok(if overlaps == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// A field of an event, for the text and JSON forms alike.
enum Val {
    Num(u64),
    Name(&'static str),
}

/// Every field of an event, in print order, decoded once through [`Event::payload`].
fn event_fields(e: &Event) -> Vec<(&'static str, Val)> {
    use Val::{Name, Num};
    fn name<T>(v: Option<T>, f: fn(T) -> &'static str) -> Val {
        Name(v.map_or("?", f))
    }
    let mut v = vec![
        ("ts_ns", Num(e.ts_ns)),
        ("kind", Name(e.kind.name())),
        ("slot", Num(u64::from(e.slot))),
    ];
    v.extend(match e.payload() {
        Payload::Init { path, duration_ns } => vec![
            ("path", name(path, vigil_region::InitPath::name)),
            ("duration_ns", Num(duration_ns)),
        ],
        Payload::LockWait {
            lock,
            wait_ns,
            retries,
        } => vec![
            ("lock", name(lock, LockId::name)),
            ("wait_ns", Num(wait_ns)),
            ("retries", Num(retries)),
        ],
        Payload::ForcePost {
            lock,
            reason,
            victim_slot,
            victim_generation,
            held_ns,
        } => vec![
            ("lock", name(lock, LockId::name)),
            ("reason", name(reason, ForceReason::name)),
            ("victim_slot", Num(victim_slot)),
            ("victim_gen", Num(victim_generation)),
            ("held_ns", Num(held_ns)),
        ],
        Payload::FencedRelease { lock } => vec![("lock", name(lock, LockId::name))],
        Payload::Detection {
            outcome,
            latency_ns,
            polls,
            host_pid,
            ..
        } => vec![
            ("outcome", name(outcome, DetectOutcome::name)),
            ("latency_ns", Num(latency_ns)),
            ("polls", Num(polls)),
            ("host_pid", Num(host_pid)),
        ],
        Payload::SlotReclaimed { victim_slot, bytes } => {
            vec![("victim_slot", Num(victim_slot)), ("bytes", Num(bytes))]
        }
        Payload::AllocationDenied {
            device,
            requested,
            used,
            limit,
        } => vec![
            ("device", Num(u64::from(device))),
            ("requested", Num(requested)),
            ("used", Num(used)),
            ("limit", Num(limit)),
        ],
        Payload::Marker { arg, a, b, c, d } => vec![
            ("arg", Num(u64::from(arg))),
            ("a", Num(a)),
            ("b", Num(b)),
            ("c", Num(c)),
            ("d", Num(d)),
        ],
    });
    v
}

/// Every field of an event, a number rendered by `num`, a name by `name`.
fn rendered_fields(
    e: &Event,
    num: impl Fn(&str, u64) -> String,
    name: impl Fn(&str, &str) -> String,
) -> Vec<String> {
    event_fields(e)
        .into_iter()
        .map(|(k, v)| match v {
            Val::Num(n) => num(k, n),
            Val::Name(s) => name(k, s),
        })
        .collect()
}

/// One event as `key=value` pairs.
fn format_event(e: &Event) -> String {
    rendered_fields(e, |k, n| format!("{k}={n}"), |k, s| format!("{k}={s}")).join(" ")
}

/// One event as a JSON object (names are our own ASCII labels: nothing to escape).
fn json_event(e: &Event) -> String {
    let fields = rendered_fields(
        e,
        |k, n| format!("\"{k}\":{n}"),
        |k, s| format!("\"{k}\":\"{s}\""),
    );
    format!("{{{}}}", fields.join(","))
}

fn print_snapshot(path: &Path, s: &Snapshot) {
    println!("region {}", path.display());
    println!(
        "  initializations={} nonce={:#x} created_realtime_ns={}",
        s.init_count, s.init_nonce, s.created_realtime_ns
    );
    for (i, d) in s.devices.iter().enumerate() {
        println!(
            "  device {i}: limit={} used={} peak={} denials={}",
            d.limit, d.used, d.peak, d.denials
        );
    }
    println!("  counters:");
    for c in Counter::ALL {
        println!("    {c:?}={}", s.counter(c));
    }
    for (id, l) in LockId::ALL.iter().zip(&s.locks) {
        println!(
            "  lock {}: owner={} epoch={} waiters={} lease_ms={}",
            id.name(),
            l.owner
                .map(|o| o.to_string())
                .unwrap_or_else(|| "none".into()),
            l.epoch,
            l.waiters,
            l.lease_ns / 1_000_000
        );
    }
    println!("  ring: events_written={}", s.ring_head);
    println!(
        "  active slots: {} ({} alive)",
        s.slots.len(),
        s.slots.iter().filter(|s| s.alive).count()
    );
    for sl in &s.slots {
        println!(
            "    slot {} gen={} pid={} pidns_inode={} start_time_ticks={} host_pid={} detect={} mem={:?} alive={}",
            sl.index,
            sl.generation,
            sl.pid,
            sl.pidns_inode,
            sl.start_time_ticks,
            sl.host_pid,
            sl.detect_outcome,
            sl.mem_used,
            sl.alive
        );
    }
}

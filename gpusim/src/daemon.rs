//! The daemon: one thread per client connection over a Unix socket. A client's host
//! PID comes from SO_PEERCRED, which the kernel reports in the daemon's PID namespace
//! (the host's), exactly how the real driver sees container processes.

use crate::state::{PidMode, Sim, SimConfig, SimError};
use crate::sys::peer_pid;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Daemon {
    sim: Arc<Mutex<Sim>>,
    listener: UnixListener,
}

impl Daemon {
    /// Binds the socket (replacing a stale one) and makes it connectable by every
    /// user, as the device nodes of a real GPU are.
    pub fn bind(cfg: SimConfig, socket: &Path) -> std::io::Result<Daemon> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if socket.exists() {
            match UnixStream::connect(socket) {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!(
                            "{}: another vigil-gpusim is already listening",
                            socket.display()
                        ),
                    ))
                }
                Err(_) => std::fs::remove_file(socket)?,
            }
        }
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
        Ok(Daemon {
            sim: Arc::new(Mutex::new(Sim::new(cfg))),
            listener,
        })
    }

    pub fn run(self) -> std::io::Result<()> {
        let next = Arc::new(AtomicU64::new(1));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vigil-gpusim: accept: {e}");
                    continue;
                }
            };
            let sim = self.sim.clone();
            let id = next.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || serve(sim, id, stream));
        }
        Ok(())
    }
}

fn lock(sim: &Mutex<Sim>) -> std::sync::MutexGuard<'_, Sim> {
    // A panicking connection thread must not take the whole GPU down with it.
    sim.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(sim: Arc<Mutex<Sim>>, conn: u64, stream: UnixStream) {
    let host_pid = peer_pid(&stream).unwrap_or(0);
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = writer;
    let reader = BufReader::new(stream);
    let mut registered = false;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let reply = handle(&sim, conn, host_pid, &mut registered, &line);
        if writer.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
    // Exit or SIGKILL: the kernel closed the socket; free everything the client held.
    lock(&sim).disconnect(conn, Instant::now());
}

fn reply(r: Result<String, SimError>) -> String {
    match r {
        Ok(v) if v.is_empty() => "ok\n".to_string(),
        Ok(v) => format!("ok {v}\n"),
        Err(e) => format!("err {}\n", e.code()),
    }
}

fn handle(sim: &Mutex<Sim>, conn: u64, host_pid: u32, registered: &mut bool, line: &str) -> String {
    let mut it = line.split_whitespace();
    let op = it.next().unwrap_or("");
    // A malformed argument fails the request; dropping it would shift the others.
    let args: Option<Vec<u64>> = it.map(|a| a.parse().ok()).collect();
    let args = args.unwrap_or_default();
    let arg = |i: usize| args.get(i).copied().ok_or(SimError::InvalidValue);
    if op == "hello" {
        let mut s = lock(sim);
        s.connect(conn, host_pid, arg(0).unwrap_or(0) as u32);
        *registered = true;
        let c = &s.cfg;
        return reply(Ok(format!(
            "{host_pid} {} {} {}",
            c.devices, c.cuda_version, c.driver_version
        )));
    }
    if !*registered {
        return reply(Err(SimError::InvalidValue));
    }
    let r = match op {
        "dev" => {
            let s = lock(sim);
            let d = arg(0);
            d.and_then(|d| {
                s.mem_info(d as u32, Instant::now())?;
                Ok(format!(
                    "{} {} {}",
                    s.cfg.memory,
                    Sim::uuid_string(d as u32),
                    s.cfg.device_name
                ))
            })
        }
        "ctx_create" => {
            // Creating a context takes time on a real GPU; wait outside the lock. NVML's
            // lag counts from the start of creation.
            let started = Instant::now();
            let delay = lock(sim).cfg.ctx_create_time;
            std::thread::sleep(delay);
            arg(0).and_then(|d| {
                lock(sim)
                    .create_context(conn, d as u32, started, Instant::now())
                    .map(|c| c.to_string())
            })
        }
        "ctx_destroy" => arg(0).and_then(|c| {
            lock(sim)
                .destroy_context(conn, c, Instant::now())
                .map(|_| String::new())
        }),
        "alloc" => arg(0).and_then(|d| {
            let n = arg(1)?;
            lock(sim)
                .alloc(conn, d as u32, n, Instant::now())
                .map(|a| a.to_string())
        }),
        "mem_create" => arg(0).and_then(|d| {
            let n = arg(1)?;
            lock(sim)
                .mem_create(conn, d as u32, n, Instant::now())
                .map(|a| a.to_string())
        }),
        "free" => arg(0).and_then(|a| {
            lock(sim)
                .free(conn, a, Instant::now())
                .map(|n| n.to_string())
        }),
        "meminfo" => arg(0).and_then(|d| {
            lock(sim)
                .mem_info(d as u32, Instant::now())
                .map(|(f, t)| format!("{f} {t}"))
        }),
        "nvml_meminfo" | "nvml_procs" => nvml(sim, op, arg(0), host_pid),
        "stats" => {
            let st = lock(sim).stats(Some(conn));
            Ok(format!(
                "processes={} contexts={} allocations={} used={} peak={}",
                st.processes, st.contexts, st.allocations, st.used, st.peak
            ))
        }
        _ => Err(SimError::InvalidValue),
    };
    reply(r)
}

/// NVML queries, with the configured faults: a hang, then maybe an error.
fn nvml(
    sim: &Mutex<Sim>,
    op: &str,
    dev: Result<u64, SimError>,
    caller: u32,
) -> Result<String, SimError> {
    let dev = dev? as u32;
    let (hang, fail) = {
        let mut s = lock(sim);
        let (hang, hang_rate, err_rate) =
            (s.cfg.nvml_hang, s.cfg.nvml_hang_rate, s.cfg.nvml_error_rate);
        let hang = if !hang.is_zero() && s.rng().chance(hang_rate) {
            hang
        } else {
            Default::default()
        };
        (hang, s.rng().chance(err_rate))
    };
    std::thread::sleep(hang);
    if fail {
        return Err(SimError::NvmlUnknown);
    }
    let s = lock(sim);
    if op == "nvml_meminfo" {
        let (free, total) = s.mem_info(dev, Instant::now())?;
        return Ok(format!("{total} {free} {}", total - free));
    }
    let mut procs = s.nvml_processes(dev, Instant::now())?;
    if s.cfg.pid_mode == PidMode::Caller {
        procs = in_callers_namespace(caller, procs);
    }
    let mut out = procs.len().to_string();
    for (pid, used) in procs {
        out.push_str(&format!(" {pid}:{used}"));
    }
    Ok(out)
}

/// Translates host PIDs into the caller's PID namespace, dropping processes it cannot
/// see (the 580 driver's behaviour).
fn in_callers_namespace(caller: u32, procs: Vec<(u32, u64)>) -> Vec<(u32, u64)> {
    let me = crate::sys::pid_view(std::process::id());
    let Some((caller_view, me)) = crate::sys::pid_view(caller).zip(me) else {
        return Vec::new();
    };
    procs
        .into_iter()
        .filter_map(|(pid, used)| {
            let target = crate::sys::pid_view(pid)?;
            crate::sys::translate_pid(&caller_view, &target, pid, &me.ns).map(|p| (p, used))
        })
        .collect()
}

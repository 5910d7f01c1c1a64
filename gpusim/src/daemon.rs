//! The daemon: one thread per client connection over a Unix socket. A client's host
//! PID comes from SO_PEERCRED, which the kernel reports in the daemon's PID namespace
//! (the host's), exactly how the real driver sees container processes.

use crate::protocol::{encode_reply, Reply, Request};
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

fn handle(sim: &Mutex<Sim>, conn: u64, host_pid: u32, registered: &mut bool, line: &str) -> String {
    // A malformed request fails; dropping an argument would shift the others.
    let r = match Request::decode(line) {
        Ok(req) => answer(sim, conn, host_pid, registered, req),
        Err(_) => Err(SimError::InvalidValue),
    };
    encode_reply(&r)
}

fn answer(
    sim: &Mutex<Sim>,
    conn: u64,
    host_pid: u32,
    registered: &mut bool,
    req: Request,
) -> Result<Reply, SimError> {
    if !*registered && !matches!(req, Request::Hello { .. }) {
        return Err(SimError::InvalidValue);
    }
    match req {
        Request::Hello { ns_pid } => {
            let mut s = lock(sim);
            s.connect(conn, host_pid, ns_pid);
            *registered = true;
            let c = &s.cfg;
            Ok(Reply::Hello {
                host_pid,
                devices: c.devices,
                cuda_version: c.cuda_version,
                driver_version: c.driver_version.clone(),
            })
        }
        Request::Dev { device } => {
            let s = lock(sim);
            s.mem_info(device, Instant::now())?;
            Ok(Reply::Device {
                memory: s.cfg.memory,
                uuid: Sim::uuid_string(device),
                name: s.cfg.device_name.clone(),
            })
        }
        Request::CtxCreate { device } => {
            // Creating a context takes time on a real GPU; wait outside the lock. NVML's
            // lag counts from the start of creation.
            let started = Instant::now();
            let delay = lock(sim).cfg.ctx_create_time;
            std::thread::sleep(delay);
            lock(sim)
                .create_context(conn, device, started, Instant::now())
                .map(Reply::Context)
        }
        Request::CtxDestroy { ctx } => lock(sim)
            .destroy_context(conn, ctx, Instant::now())
            .map(|_| Reply::Destroyed),
        Request::Alloc { device, bytes } => lock(sim)
            .alloc(conn, device, bytes, Instant::now())
            .map(Reply::Allocated),
        Request::MemCreate { device, bytes } => lock(sim)
            .mem_create(conn, device, bytes, Instant::now())
            .map(Reply::MemHandle),
        Request::Free { id } => lock(sim).free(conn, id, Instant::now()).map(Reply::Freed),
        Request::MemInfo { device } => lock(sim)
            .mem_info(device, Instant::now())
            .map(|(free, total)| Reply::MemInfo { free, total }),
        Request::NvmlMemInfo { device } => nvml(sim, device, host_pid, false),
        Request::NvmlProcs { device } => nvml(sim, device, host_pid, true),
        Request::Stats => Ok(Reply::Stats(lock(sim).stats(Some(conn)))),
    }
}

/// NVML queries (the memory info, or the process list if `procs`), with the
/// configured faults: a hang, then maybe an error.
fn nvml(sim: &Mutex<Sim>, dev: u32, caller: u32, procs: bool) -> Result<Reply, SimError> {
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
    if !procs {
        let (free, total) = s.mem_info(dev, Instant::now())?;
        return Ok(Reply::NvmlMemInfo {
            total,
            free,
            used: total - free,
        });
    }
    let mut procs = s.nvml_processes(dev, Instant::now())?;
    if s.cfg.pid_mode == PidMode::Caller {
        procs = in_callers_namespace(caller, procs);
    }
    Ok(Reply::NvmlProcs(procs))
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

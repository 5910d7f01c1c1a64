//! Per-process client state: the daemon connection (re-made after fork), the
//! contexts and allocations this process knows about, and each thread's context stack.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, OnceLock};
use vigil_gpusim::protocol::{socket_path, CallError, Conn, Reply, Request};
use vigil_gpusim::state::SimError;

/// Device memory contents are kept in chunks of this size, created on first write,
/// so copies round-trip at any allocation size while untouched memory costs nothing.
pub const CHUNK: u64 = 64 << 10;

#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub total: u64,
    pub uuid: String,
    pub name: String,
}

pub struct Alloc {
    pub size: u64,
    /// Written chunks, by index; missing chunks read as zeros.
    pub chunks: HashMap<u64, Vec<u8>>,
}

#[derive(Default)]
pub struct State {
    pub pid: u32,
    pub cuda_init: bool,
    pub nvml_refs: u32,
    pub devices: Vec<DeviceInfo>,
    pub cuda_version: u32,
    pub driver_version: String,
    /// Context handle -> device.
    pub contexts: HashMap<u64, u32>,
    /// Per device: (primary context, retain count).
    pub primary: HashMap<u32, (u64, u32)>,
    pub allocs: BTreeMap<u64, Alloc>,
    /// VMM physical handles.
    pub vmm: HashMap<u64, u64>,
    pub next_va: u64,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static CONN: Mutex<Option<(u32, Conn)>> = Mutex::new(None);

thread_local! {
    static CTX_STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn log_level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("VIGIL_GPUSIM_LOG").as_deref() {
        Ok("off") => 0,
        Ok("debug") => 3,
        Ok("info") => 2,
        _ => 1,
    })
}

pub fn log_warn(msg: &str) {
    if log_level() >= 1 {
        eprintln!("[vigil-gpusim driver pid {}] {msg}", std::process::id());
    }
}

pub fn log_debug(msg: &str) {
    if log_level() >= 3 {
        eprintln!("[vigil-gpusim driver pid {}] {msg}", std::process::id());
    }
}

/// The process state, reset if we are a forked child (a child gets a fresh driver).
pub fn state() -> MutexGuard<'static, Option<State>> {
    let mut g = lock(&STATE);
    let pid = std::process::id();
    if g.as_ref().is_some_and(|s| s.pid != pid) {
        *g = None;
        CTX_STACK.with(|s| s.borrow_mut().clear());
    }
    g
}

/// Sends a request on this process's connection, connecting (or reconnecting after a
/// fork) first.
pub fn call(req: Request) -> Result<Reply, CallError> {
    let pid = std::process::id();
    let mut g = lock(&CONN);
    if g.as_ref().is_none_or(|(p, _)| *p != pid) {
        *g = None;
        let c = Conn::connect(&socket_path(), pid)?;
        *g = Some((pid, c));
    }
    let (_, c) = g
        .as_mut()
        .ok_or_else(|| CallError::Io("no connection".into()))?;
    let r = c.call(&req);
    if matches!(r, Err(CallError::Io(_))) {
        *g = None;
    }
    r
}

/// Connects and loads the device list, once per process.
pub fn ensure_loaded() -> Result<(), CallError> {
    if state().is_some() {
        return Ok(());
    }
    let pid = std::process::id();
    let hello = {
        let mut g = lock(&CONN);
        if g.as_ref().is_none_or(|(p, _)| *p != pid) {
            *g = Some((pid, Conn::connect(&socket_path(), pid)?));
        }
        let c = &g
            .as_ref()
            .ok_or_else(|| CallError::Io("no connection".into()))?
            .1;
        (c.devices, c.cuda_version, c.driver_version.clone())
    };
    let mut devices = Vec::new();
    for d in 0..hello.0 {
        let Reply::Device { memory, uuid, name } = call(Request::Dev { device: d })? else {
            return Err(unexpected("dev"));
        };
        devices.push(DeviceInfo {
            total: memory,
            uuid,
            name,
        });
    }
    let mut g = state();
    if g.is_none() {
        *g = Some(State {
            pid,
            devices,
            cuda_version: hello.1,
            driver_version: hello.2,
            next_va: 0x6000_0000_0000,
            ..State::default()
        });
    }
    Ok(())
}

/// The error for a reply of the wrong kind (which `Conn::call` never returns).
pub fn unexpected(op: &str) -> CallError {
    CallError::Io(format!("{op}: unexpected reply"))
}

pub fn current_ctx() -> Option<u64> {
    CTX_STACK.with(|s| s.borrow().last().copied())
}

pub fn set_current(ctx: Option<u64>) {
    CTX_STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.pop();
        if let Some(c) = ctx {
            s.push(c);
        }
    });
}

pub fn push_ctx(ctx: u64) {
    CTX_STACK.with(|s| s.borrow_mut().push(ctx));
}

pub fn pop_ctx() -> Option<u64> {
    CTX_STACK.with(|s| s.borrow_mut().pop())
}

/// Removes a destroyed context from this thread's stack.
pub fn forget_ctx(ctx: u64) {
    CTX_STACK.with(|s| s.borrow_mut().retain(|c| *c != ctx));
}

/// Maps a daemon error to its API's code.
pub fn sim_error(e: &CallError, oom: u32, invalid: u32, device: u32, io: u32) -> u32 {
    match e {
        CallError::Sim(SimError::OutOfMemory) => oom,
        CallError::Sim(SimError::InvalidDevice) => device,
        CallError::Sim(SimError::InvalidValue) => invalid,
        CallError::Sim(_) => io,
        CallError::Io(msg) => {
            log_warn(msg);
            io
        }
    }
}

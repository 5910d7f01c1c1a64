//! `vigil-workload`: a CUDA driver API workload for tests and demos. It loads
//! `libcuda.so.1` with dlopen and resolves every entry point through
//! `cuGetProcAddress_v2` (as the CUDA 12/13 runtime and cuda-python do) or with plain
//! dlsym, then creates a context, allocates, optionally checks a copy round-trip,
//! holds, frees and exits the way it is told to.
//!
//! It prints one `key=value` line per step, so tests can follow it:
//! `released` (with --wait-for), `ctx`, `alloc`, `ready`, `freed`, and `error` on a
//! failed call (exit status 3). The `ctx` line's `ts_ns` is CLOCK_MONOTONIC right
//! after `cuInit` (which runs the interposer's start-up and host-PID detection) and the
//! first use of the primary context returned: the moment this workload is running.

use clap::{Parser, ValueEnum};
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::process::ExitCode;
use std::time::Duration;
use vigil_gpusim::sys::monotonic_ns;
use vigil_units::{parse_duration, parse_size};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Api {
    /// cuGetProcAddress_v2, as the CUDA runtime does.
    Procaddress,
    /// dlsym on the dlopened library.
    Dlsym,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Exit {
    /// Free everything, release the context, exit 0.
    Normal,
    /// abort() while holding memory.
    Abort,
    /// Print `ready` and wait to be killed.
    Wait,
}

#[derive(Parser)]
#[command(
    name = "vigil-workload",
    version,
    about = "CUDA driver API test workload"
)]
struct Cli {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: c_int,
    /// Allocate this much (bytes or 64MiB, 1g, ...); repeat for several allocations.
    #[arg(long = "alloc", default_values_t = vec!["64MiB".to_string()])]
    allocs: Vec<String>,
    /// Allocate through cuMemCreate (VMM) instead of cuMemAlloc_v2.
    #[arg(long)]
    vmm: bool,
    /// How entry points are resolved.
    #[arg(long, value_enum, default_value = "procaddress")]
    api: Api,
    /// CUDA version passed to cuGetProcAddress.
    #[arg(long, default_value_t = 12060)]
    cuda_version: c_int,
    /// How long to hold the memory before freeing (e.g. 500ms).
    #[arg(long, default_value = "0")]
    hold: String,
    /// How to end.
    #[arg(long, value_enum, default_value = "normal")]
    exit: Exit,
    /// Write a pattern to the first allocation and read it back.
    #[arg(long)]
    verify: bool,
    /// Busy-wait until CLOCK_MONOTONIC reaches this many ns before starting.
    #[arg(long)]
    start_at_ns: Option<u64>,
    /// Before cuInit, wait until this path exists (polled every 1 ms; an error naming
    /// the path after 60 s). A test harness spawns many workloads, then creates the
    /// file to release them all at once.
    #[arg(long, value_name = "PATH")]
    wait_for: Option<std::path::PathBuf>,
    /// Call cuInit from this many threads at once (thread-safety checks).
    #[arg(long, default_value_t = 1)]
    init_threads: usize,
    /// With --init-threads: each extra thread, as soon as its cuInit returns, takes
    /// the primary context and allocates and frees this much, 16 times (a workload
    /// allocating while the interposer is still starting up).
    #[arg(long)]
    init_threads_alloc: Option<String>,
    /// After init, fork a child that allocates on its own and exits; wait for it.
    #[arg(long)]
    fork: bool,
    /// Time this many cuGetProcAddress_v2 lookups and print ns per call, then exit.
    #[arg(long)]
    bench_getproc: Option<u64>,
    /// Instead of --alloc: allocate and free random sizes through every allocation
    /// path. `fill` runs until --refusals allocations were refused; `churn` runs for
    /// --duration, never holding more than --cap, so any refusal is a false one.
    #[arg(long, value_enum)]
    stress: Option<Stress>,
    /// Largest single allocation in --stress (sizes are uniform from 1 MiB to this).
    #[arg(long, default_value = "64MiB")]
    max_chunk: String,
    /// --stress fill: stop after this many refusals.
    #[arg(long, default_value_t = 3)]
    refusals: u64,
    /// --stress churn: the most this process holds at once.
    #[arg(long, default_value = "256MiB")]
    cap: String,
    /// --stress churn: how long to run.
    #[arg(long, default_value = "1s")]
    duration: String,
    /// Seed for --stress.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Stress {
    Fill,
    Churn,
}

type Res = u32;

/// The entry points this workload uses, resolved once.
struct Cuda {
    _lib: Library,
    getproc: Option<GetProc>,
    init: unsafe extern "C" fn(c_uint) -> Res,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> Res,
    retain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> Res,
    release: unsafe extern "C" fn(c_int) -> Res,
    set_current: unsafe extern "C" fn(*mut c_void) -> Res,
    mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> Res,
    mem_free: unsafe extern "C" fn(u64) -> Res,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> Res,
    htod: unsafe extern "C" fn(u64, *const c_void, usize) -> Res,
    dtoh: unsafe extern "C" fn(*mut c_void, u64, usize) -> Res,
    mem_create: unsafe extern "C" fn(*mut u64, usize, *const c_void, u64) -> Res,
    mem_release: unsafe extern "C" fn(u64) -> Res,
    pitch: unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> Res,
    managed: unsafe extern "C" fn(*mut u64, usize, c_uint) -> Res,
    alloc_async: unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> Res,
    from_pool: unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> Res,
    free_async: unsafe extern "C" fn(u64, *mut c_void) -> Res,
    total_mem: unsafe extern "C" fn(*mut usize, c_int) -> Res,
}

type GetProc = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> Res;

impl Cuda {
    fn load(api: Api, version: c_int) -> Result<Cuda, String> {
        // SAFETY: loading the CUDA driver library runs its initializers, which is what
        // every CUDA program does.
        let lib = unsafe { Library::new("libcuda.so.1") }
            .map_err(|e| format!("dlopen libcuda.so.1: {e}"))?;
        let getproc: Option<GetProc> = match api {
            // SAFETY: the symbol has this signature in the CUDA 12+ driver API.
            Api::Procaddress => Some(
                *unsafe { lib.get::<GetProc>(b"cuGetProcAddress_v2\0") }
                    .map_err(|e| format!("dlsym cuGetProcAddress_v2: {e}"))?,
            ),
            Api::Dlsym => None,
        };
        let resolve = |base: &str, exported: &str| -> Result<*mut c_void, String> {
            match getproc {
                Some(gp) => {
                    let name = CString::new(base).map_err(|e| e.to_string())?;
                    let mut p: *mut c_void = std::ptr::null_mut();
                    let mut status: c_int = -1;
                    // SAFETY: valid C string and out-pointers; gp is cuGetProcAddress_v2.
                    let r = unsafe { gp(name.as_ptr(), &mut p, version, 0, &mut status) };
                    if r != 0 || p.is_null() {
                        return Err(format!(
                            "cuGetProcAddress({base}) = {r}, symbolStatus {status}"
                        ));
                    }
                    Ok(p)
                }
                None => {
                    let name = CString::new(exported).map_err(|e| e.to_string())?;
                    // SAFETY: looking up a data-less symbol address; not called here.
                    let s = unsafe { lib.get::<*mut c_void>(name.as_bytes_with_nul()) }
                        .map_err(|e| format!("dlsym {exported}: {e}"))?;
                    Ok(*s)
                }
            }
        };
        macro_rules! f {
            ($base:literal, $exp:literal) => {{
                let p = resolve($base, $exp)?;
                // SAFETY: the driver returned this entry point for this name; its C
                // signature is the field's type per the CUDA driver API.
                unsafe { std::mem::transmute_copy(&p) }
            }};
        }
        Ok(Cuda {
            getproc,
            init: f!("cuInit", "cuInit"),
            device_get: f!("cuDeviceGet", "cuDeviceGet"),
            retain: f!("cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain"),
            release: f!("cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2"),
            set_current: f!("cuCtxSetCurrent", "cuCtxSetCurrent"),
            mem_alloc: f!("cuMemAlloc", "cuMemAlloc_v2"),
            mem_free: f!("cuMemFree", "cuMemFree_v2"),
            mem_get_info: f!("cuMemGetInfo", "cuMemGetInfo_v2"),
            htod: f!("cuMemcpyHtoD", "cuMemcpyHtoD_v2"),
            dtoh: f!("cuMemcpyDtoH", "cuMemcpyDtoH_v2"),
            mem_create: f!("cuMemCreate", "cuMemCreate"),
            mem_release: f!("cuMemRelease", "cuMemRelease"),
            pitch: f!("cuMemAllocPitch", "cuMemAllocPitch_v2"),
            managed: f!("cuMemAllocManaged", "cuMemAllocManaged"),
            alloc_async: f!("cuMemAllocAsync", "cuMemAllocAsync"),
            from_pool: f!("cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync"),
            free_async: f!("cuMemFreeAsync", "cuMemFreeAsync"),
            total_mem: f!("cuDeviceTotalMem", "cuDeviceTotalMem_v2"),
            _lib: lib,
        })
    }
}

/// Forks a child that initializes CUDA itself, allocates 1 MiB and exits; waits for it.
fn fork_child(cu: &Cuda, device: c_int) -> Result<(), String> {
    // SAFETY: the child only makes CUDA calls and exits; it does not rely on other
    // threads' state (the workload has no other threads running at this point).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("call=fork code=-1".into());
    }
    if pid == 0 {
        let mut dev: c_int = 0;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        let mut p = 0u64;
        // SAFETY: as in `run`.
        let ok = unsafe {
            (cu.init)(0) == 0
                && (cu.device_get)(&mut dev, device) == 0
                && (cu.retain)(&mut ctx, dev) == 0
                && (cu.set_current)(ctx) == 0
                && (cu.mem_alloc)(&mut p, 1 << 20) == 0
        };
        println!("child pid={} ok={ok}", std::process::id());
        // SAFETY: leave the child without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child we forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if status != 0 {
        return Err(format!("call=fork-child code={status}"));
    }
    println!("forked child={pid} ok");
    Ok(())
}

/// Times `n` lookups of "cuMemAlloc" through cuGetProcAddress_v2.
fn bench_getproc(cu: &Cuda, n: u64, version: c_int) -> Result<(), String> {
    let gp = cu
        .getproc
        .ok_or("--bench-getproc needs --api procaddress")?;
    let name = c"cuMemAlloc";
    let mut p: *mut c_void = std::ptr::null_mut();
    let mut st: c_int = 0;
    let t = monotonic_ns();
    for _ in 0..n {
        // SAFETY: valid name and out-pointers.
        unsafe { gp(name.as_ptr(), &mut p, version, 0, &mut st) };
    }
    let ns = (monotonic_ns() - t) as f64 / n as f64;
    println!("bench getproc calls={n} ns_per_call={ns:.1}");
    Ok(())
}

/// How long --wait-for waits for its file before giving up.
const WAIT_FOR_LIMIT: Duration = Duration::from_secs(60);

/// Waits until `path` exists, polling every 1 ms; prints `released` with the time.
fn wait_for(path: &std::path::Path) -> Result<(), String> {
    let t0 = monotonic_ns();
    let limit = WAIT_FOR_LIMIT.as_nanos() as u64;
    loop {
        // symlink_metadata: the path's own existence, whatever it is or points to.
        if std::fs::symlink_metadata(path).is_ok() {
            break;
        }
        if monotonic_ns() - t0 >= limit {
            return Err(format!(
                "call=wait-for code=timeout: {} did not appear within {} s",
                path.display(),
                WAIT_FOR_LIMIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = monotonic_ns();
    println!(
        "released pid={} ts_ns={t} waited_ns={}",
        std::process::id(),
        t - t0
    );
    Ok(())
}

/// Fails with the call's name and code.
fn check(call: &str, r: Res) -> Result<(), String> {
    if r == 0 {
        Ok(())
    } else {
        Err(format!("call={call} code={r}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            eprintln!("vigil-workload: {e}");
            ExitCode::from(3)
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let sizes: Vec<u64> = cli
        .allocs
        .iter()
        .map(|s| parse_size("--alloc", s).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let hold = parse_duration("--hold", &cli.hold).map_err(|e| e.to_string())?;
    if let Some(t) = cli.start_at_ns {
        while monotonic_ns() < t {
            std::hint::spin_loop();
        }
    }
    let cu = Cuda::load(cli.api, cli.cuda_version)?;
    if let Some(n) = cli.bench_getproc {
        return bench_getproc(&cu, n, cli.cuda_version);
    }
    if let Some(path) = &cli.wait_for {
        wait_for(path)?;
    }
    let init = cu.init;
    let thread_alloc = cli
        .init_threads_alloc
        .as_deref()
        .map(|s| parse_size("--init-threads-alloc", s).map_err(|e| e.to_string()))
        .transpose()?;
    let (device_get, retain, set_current) = (cu.device_get, cu.retain, cu.set_current);
    let (mem_alloc, mem_free, device) = (cu.mem_alloc, cu.mem_free, cli.device);
    let init_start = monotonic_ns();
    let threads: Vec<_> = (0..cli.init_threads.saturating_sub(1))
        .map(|_| {
            // SAFETY: cuInit, and after it the context and allocation calls, are
            // thread-safe by the CUDA contract; every out-pointer is a local.
            std::thread::spawn(move || unsafe {
                let r = init(0);
                let Some(bytes) = thread_alloc.filter(|_| r == 0) else {
                    return r;
                };
                let (mut dev, mut ctx, mut p) = (0, std::ptr::null_mut(), 0u64);
                for call in [
                    device_get(&mut dev, device),
                    retain(&mut ctx, dev),
                    set_current(ctx),
                ] {
                    if call != 0 {
                        return call;
                    }
                }
                for _ in 0..16 {
                    let r = mem_alloc(&mut p, bytes as usize);
                    if r != 0 {
                        return r;
                    }
                    mem_free(p);
                }
                0
            })
        })
        .collect();
    let mut dev: c_int = 0;
    let mut ctx: *mut c_void = std::ptr::null_mut();
    // SAFETY: for every call below, entry points resolved above, called with valid
    // out-pointers and arguments per the CUDA driver API.
    unsafe {
        check("cuInit", (cu.init)(0))?;
        for t in threads {
            check(
                "cuInit (thread)",
                t.join().map_err(|_| "init thread panicked")?,
            )?;
        }
        check("cuDeviceGet", (cu.device_get)(&mut dev, cli.device))?;
        let t0 = monotonic_ns();
        check("cuDevicePrimaryCtxRetain", (cu.retain)(&mut ctx, dev))?;
        let t1 = monotonic_ns();
        check("cuCtxSetCurrent", (cu.set_current)(ctx))?;
        println!(
            "ctx pid={} device={dev} ts_ns={t1} create_ns={} init_ns={}",
            std::process::id(),
            t1 - t0,
            t1 - init_start
        );
    }
    if let Some(mode) = cli.stress {
        stress(&cu, cli, mode, dev)?;
        // SAFETY: releasing the primary context we retained.
        unsafe { check("cuDevicePrimaryCtxRelease", (cu.release)(dev))? };
        println!("freed");
        return Ok(());
    }
    let mut ptrs = Vec::new();
    for &size in &sizes {
        let mut p = 0u64;
        // SAFETY: as above; the allocation property struct for cuMemCreate is laid out
        // as CUmemAllocationProp (type pinned, location device `dev`).
        unsafe {
            if cli.vmm {
                let mut prop = [0u8; 32];
                prop[0..4].copy_from_slice(&1u32.to_le_bytes()); // CU_MEM_ALLOCATION_TYPE_PINNED
                prop[8..12].copy_from_slice(&1u32.to_le_bytes()); // CU_MEM_LOCATION_TYPE_DEVICE
                prop[12..16].copy_from_slice(&dev.to_le_bytes());
                check(
                    "cuMemCreate",
                    (cu.mem_create)(&mut p, size as usize, prop.as_ptr().cast(), 0),
                )?;
            } else {
                check("cuMemAlloc", (cu.mem_alloc)(&mut p, size as usize))?;
            }
        }
        println!("alloc bytes={size} ptr={p:#x}");
        ptrs.push(p);
    }
    if cli.verify && !cli.vmm {
        let (&p, &size) = ptrs
            .first()
            .zip(sizes.first())
            .ok_or("--verify needs an allocation")?;
        let n = size.min(1 << 20) as usize;
        let pattern: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        let mut back = vec![0u8; n];
        // SAFETY: both host buffers are n bytes long; p points to at least n bytes.
        unsafe {
            check("cuMemcpyHtoD", (cu.htod)(p, pattern.as_ptr().cast(), n))?;
            check("cuMemcpyDtoH", (cu.dtoh)(back.as_mut_ptr().cast(), p, n))?;
        }
        if back != pattern {
            return Err("call=verify code=mismatch".into());
        }
        println!("verified bytes={n}");
    }
    if cli.fork {
        fork_child(&cu, cli.device)?;
    }
    let (mut free, mut total, mut device_total) = (0usize, 0usize, 0usize);
    // SAFETY: valid out-pointers.
    unsafe {
        check("cuMemGetInfo", (cu.mem_get_info)(&mut free, &mut total))?;
        check("cuDeviceTotalMem", (cu.total_mem)(&mut device_total, dev))?;
    }
    println!(
        "ready pid={} free={free} total={total} device_total={device_total} ts_ns={}",
        std::process::id(),
        monotonic_ns()
    );
    match cli.exit {
        Exit::Wait => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Exit::Abort => {
            std::thread::sleep(hold);
            std::process::abort()
        }
        Exit::Normal => {}
    }
    std::thread::sleep(hold);
    for p in ptrs {
        // SAFETY: freeing what we allocated, once.
        unsafe {
            if cli.vmm {
                check("cuMemRelease", (cu.mem_release)(p))?;
            } else {
                check("cuMemFree", (cu.mem_free)(p))?;
            }
        }
    }
    // SAFETY: releasing the primary context we retained.
    unsafe { check("cuDevicePrimaryCtxRelease", (cu.release)(dev))? };
    println!("freed");
    Ok(())
}

/// One allocation made by --stress, and how to free it.
#[derive(Clone, Copy)]
enum Held {
    Ptr(u64, u64),
    Async(u64, u64),
    Vmm(u64, u64),
}

impl Held {
    fn bytes(self) -> u64 {
        match self {
            Held::Ptr(_, b) | Held::Async(_, b) | Held::Vmm(_, b) => b,
        }
    }
}

/// Allocates `size` bytes through path `which` (0..6); the bytes the driver charged.
fn alloc_via(cu: &Cuda, which: u64, size: u64, dev: c_int) -> (Res, Option<Held>) {
    let mut p = 0u64;
    let n = size as usize;
    // SAFETY: for every call, entry points resolved in `Cuda::load`, valid out-pointers;
    // a null stream is the legacy default stream and a null pool the simulator's
    // default pool; the property struct is laid out as CUmemAllocationProp.
    unsafe {
        match which {
            0 => {
                let r = (cu.mem_alloc)(&mut p, n);
                (r, (r == 0).then_some(Held::Ptr(p, size)))
            }
            1 => {
                let mut pitch = 0usize;
                let width = (n / 64).max(1);
                let r = (cu.pitch)(&mut p, &mut pitch, width, 64, 4);
                (r, (r == 0).then_some(Held::Ptr(p, pitch as u64 * 64)))
            }
            2 => {
                let r = (cu.managed)(&mut p, n, 1);
                (r, (r == 0).then_some(Held::Ptr(p, size)))
            }
            3 => {
                let r = (cu.alloc_async)(&mut p, n, std::ptr::null_mut());
                (r, (r == 0).then_some(Held::Async(p, size)))
            }
            4 => {
                let r = (cu.from_pool)(&mut p, n, std::ptr::null_mut(), std::ptr::null_mut());
                (r, (r == 0).then_some(Held::Async(p, size)))
            }
            _ => {
                let mut prop = [0u8; 32];
                prop[0..4].copy_from_slice(&1u32.to_le_bytes());
                prop[8..12].copy_from_slice(&1u32.to_le_bytes());
                prop[12..16].copy_from_slice(&dev.to_le_bytes());
                let r = (cu.mem_create)(&mut p, n, prop.as_ptr().cast(), 0);
                (r, (r == 0).then_some(Held::Vmm(p, size)))
            }
        }
    }
}

fn free_held(cu: &Cuda, h: Held) -> Result<(), String> {
    // SAFETY: freeing an allocation this process made, once, the matching way.
    unsafe {
        match h {
            Held::Ptr(p, _) => check("cuMemFree", (cu.mem_free)(p)),
            Held::Async(p, _) => check("cuMemFreeAsync", (cu.free_async)(p, std::ptr::null_mut())),
            Held::Vmm(p, _) => check("cuMemRelease", (cu.mem_release)(p)),
        }
    }
}

const CUDA_ERROR_OUT_OF_MEMORY: Res = 2;

fn stress(cu: &Cuda, cli: &Cli, mode: Stress, dev: c_int) -> Result<(), String> {
    let max = parse_size("--max-chunk", &cli.max_chunk).map_err(|e| e.to_string())?;
    let cap = parse_size("--cap", &cli.cap).map_err(|e| e.to_string())?;
    let duration = parse_duration("--duration", &cli.duration).map_err(|e| e.to_string())?;
    let min = (1u64 << 20).min(max);
    let mut rng = cli.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let end = monotonic_ns() + duration.as_nanos() as u64;
    let (mut held, mut granted, mut denied) = (Vec::<Held>::new(), 0u64, 0u64);
    let mut holding = 0u64;
    loop {
        match mode {
            Stress::Fill if denied >= cli.refusals => break,
            Stress::Churn if monotonic_ns() >= end => break,
            _ => {}
        }
        if !held.is_empty() && next() % 4 == 0 {
            let h = held.swap_remove((next() % held.len() as u64) as usize);
            holding -= h.bytes();
            free_held(cu, h)?;
            continue;
        }
        let size = min + next() % (max - min + 1);
        // Pitched allocations are padded; leave room for it under the cap.
        if mode == Stress::Churn && holding + size + (64 << 10) > cap {
            if let Some(h) = held.pop() {
                holding -= h.bytes();
                free_held(cu, h)?;
            }
            continue;
        }
        match alloc_via(cu, next() % 6, size, dev) {
            (0, Some(h)) => {
                granted += 1;
                holding += h.bytes();
                held.push(h);
            }
            (CUDA_ERROR_OUT_OF_MEMORY, _) => {
                denied += 1;
                if mode == Stress::Churn {
                    println!("refused bytes={size} holding={holding}");
                }
            }
            (r, _) => return Err(format!("call=stress-alloc code={r}")),
        }
    }
    println!(
        "stress granted={granted} denied={denied} holding={holding} ts_ns={}",
        monotonic_ns()
    );
    if cli.exit == Exit::Wait {
        println!("ready pid={} holding={holding}", std::process::id());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    for h in held {
        free_held(cu, h)?;
    }
    Ok(())
}

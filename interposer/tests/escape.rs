//! Ways around the memory limit through the dynamic linker, against the simulator with
//! real processes under a real LD_PRELOAD: a library dlopened with RTLD_DEEPBIND, a
//! private copy of the driver, dlmopen; and what the limit variables mean when they
//! are 0 or name a device that does not exist.
//!
//! The C fixtures (tests/fixtures/) are compiled here with `cc` (set CC to use another
//! compiler), against the simulator's stand-in libcuda.so.1.

mod common;
use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// What the fixtures try to take: twice the limit.
const TRIED: u64 = 2 * GIB;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn cc(args: &[&OsStr]) {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&compiler)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{compiler}: {e}. These tests compile C fixtures: install a C compiler \
                 (apt-get install gcc) or set CC"
            )
        });
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compiled fixtures, in the simulator's directory.
struct Fixtures {
    main: PathBuf,
    deepbind: PathBuf,
    runpath: PathBuf,
    dep: PathBuf,
}

fn build(sim: &Sim) -> Fixtures {
    let d = sim.dir.path();
    let lib = d.join("lib");
    let bin = d.join("fixtures");
    std::fs::create_dir_all(bin.join("dep")).unwrap();
    let inc = fixture("");
    let f = Fixtures {
        main: bin.join("escape_main"),
        deepbind: bin.join("libvigil_deepbind.so"),
        runpath: bin.join("libvigil_runpath.so"),
        dep: bin.join("dep/libvigil_dep.so"),
    };
    let o = OsStr::new;
    let link_cuda = [
        "-L".as_ref(),
        lib.as_os_str(),
        o("-l:libcuda.so.1"),
        o("-ldl"),
    ];
    let mut args = vec![
        o("-O1"),
        o("-I"),
        inc.as_os_str(),
        o("-o"),
        f.main.as_os_str(),
    ];
    let src = fixture("escape_main.c");
    args.push(src.as_os_str());
    args.extend(link_cuda);
    cc(&args);
    let src = fixture("deepbind_lib.c");
    let mut args = vec![o("-O1"), o("-shared"), o("-fPIC"), o("-I"), inc.as_os_str()];
    args.extend([o("-o"), f.deepbind.as_os_str(), src.as_os_str()]);
    args.extend(link_cuda);
    cc(&args);
    shared_lib(&f.dep, "dep_lib.c", &[]);
    // RUNPATH (not RPATH): what current toolchains write for -rpath.
    shared_lib(
        &f.runpath,
        "runpath_lib.c",
        &["-Wl,--enable-new-dtags,-rpath,$ORIGIN/dep", "-ldl"],
    );
    f
}

/// Compiles the fixture `src` into the shared library `out`, with `extra` flags.
fn shared_lib(out: &Path, src: &str, extra: &[&str]) {
    let src = fixture(src);
    let mut args = vec![
        OsStr::new("-shared"),
        OsStr::new("-fPIC"),
        OsStr::new("-o"),
        out.as_os_str(),
        src.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    cc(&args);
}

/// `prog` with the environment the simulator's workloads get (LD_PRELOAD included
/// when `preload`).
fn command(sim: &Sim, prog: &Path, args: &[&str], env: &[(&str, &str)], preload: bool) -> Command {
    let template = sim.workload(&[], env, preload);
    let mut c = Command::new(prog);
    c.args(args);
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The `key=N` a fixture printed.
fn printed(out: &Output, key: &str) -> u64 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {s}"))
}

/// The simulator's peak usage so far, across devices.
fn sim_peak(sim: &Sim) -> u64 {
    sim_stats(sim).1
}

const LIMIT: [(&str, &str); 1] = [("CUDA_DEVICE_MEMORY_LIMIT", "1g")];

#[test]
fn a_deepbind_library_linked_against_the_driver_is_limited_on_every_path() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let lib = f.deepbind.to_str().unwrap();
    every_path_is_limited(
        &sim,
        &f,
        &["deepbind", lib],
        &[
            "linked",
            "dlsym-default",
            "dlsym-next",
            "dlsym-self",
            "proc-address",
        ],
        |err| err.contains("RTLD_DEEPBIND") && err.contains("libvigil_deepbind.so"),
        "the dropped flag is logged with the library's name",
    );
}

/// Runs `main` as `[--init-first] <args> <path>` for every path, with Vigil started
/// first and not: no run may escape the 1 GiB limit, and every run's stderr must be
/// `logged` (said in `what` when not).
fn every_path_is_limited(
    sim: &Sim,
    f: &Fixtures,
    args: &[&str],
    paths: &[&str],
    logged: impl Fn(&str) -> bool,
    what: &str,
) {
    let (mut escapes, mut unlogged) = (Vec::new(), Vec::new());
    for first in [false, true] {
        for path in paths {
            let mut all = args.to_vec();
            all.push(path);
            if first {
                all.insert(0, "--init-first");
            }
            let out = run_ok(command(sim, &f.main, &all, &LIMIT, true));
            check(
                sim,
                &mut escapes,
                &out,
                &format!("{path} (Vigil started first: {first})"),
            );
            let err = stderr(&out);
            if !logged(&err) {
                unlogged.push(err);
            }
        }
    }
    assert!(escapes.is_empty(), "{}", escapes.join("\n"));
    assert!(unlogged.is_empty(), "{what}:\n{}", unlogged.join("\n"));
}

/// Records an escape: more granted than the limit, or the device itself past it.
fn check(sim: &Sim, escapes: &mut Vec<String>, out: &Output, what: &str) {
    let granted = printed(out, "granted");
    let peak = sim_peak(sim);
    if granted >= GIB || peak > GIB {
        escapes.push(format!(
            "{what}: {} MiB granted under a 1 GiB limit (device peak {} MiB)",
            granted / MIB,
            peak / MIB
        ));
    } else {
        assert!(granted >= GIB / 2, "{what}: only {granted} bytes granted");
    }
}

#[test]
fn without_a_limit_deepbind_is_left_alone() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let lib = f.deepbind.to_str().unwrap();
    let out = run_ok(command(
        &sim,
        &f.main,
        &["deepbind", lib, "linked"],
        &[],
        true,
    ));
    assert_eq!(printed(&out, "granted"), TRIED);
    let err = stderr(&out);
    assert!(!err.contains("RTLD_DEEPBIND"), "{err}");
}

#[test]
fn a_private_copy_of_the_driver_is_answered_by_the_interposed_one() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let x = sim.dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    let copy = x.join("libcuda-copy.so");
    std::fs::copy(sim.dir.path().join("lib/libcuda.so.1"), &copy).unwrap();
    let copy = copy.to_str().unwrap();
    every_path_is_limited(
        &sim,
        &f,
        &["copy", copy],
        &["dlsym", "proc-address"],
        |err| err.contains("libcuda-copy.so") && err.contains("second copy"),
        "the redirection is logged with the copy's path",
    );
}

#[test]
fn dlopen_under_vigil_keeps_the_callers_runpath_and_origin() {
    // Vigil's dlopen must not become "the caller" glibc sees: a library's bare-name
    // dlopen searches *its* RUNPATH, and $ORIGIN is *its* directory.
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    assert!(f.dep.exists());
    let lib = f.runpath.to_str().unwrap();
    for how in ["plain", "origin"] {
        for flags in ["now", "deepbind"] {
            for preload in [false, true] {
                let args = ["runpath", lib, how, flags];
                let out = run_ok(command(&sim, &f.main, &args, &LIMIT, preload));
                assert_eq!(
                    printed(&out, "loaded"),
                    42,
                    "{how} {flags} (preloaded: {preload}):\n{}",
                    stderr(&out)
                );
            }
        }
    }
    // The check has teeth: an interposed dlopen that calls the real one as an
    // ordinary function loses the library's RUNPATH.
    let naive = sim.dir.path().join("fixtures/libnaive_dlopen.so");
    shared_lib(&naive, "naive_dlopen.c", &["-ldl"]);
    let mut c = command(&sim, &f.main, &["runpath", lib, "plain", "now"], &[], false);
    c.env("LD_PRELOAD", &naive);
    assert_eq!(printed(&run_ok(c), "loaded"), 0);
}

#[test]
fn rtld_next_from_a_library_after_vigil_finds_the_next_definition() {
    // An interposer preloaded after libvigil.so wraps puts and finds libc's with
    // dlsym(RTLD_NEXT): glibc must see it, not Vigil's dlsym, as the caller.
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let wrap = sim.dir.path().join("fixtures/libnext_puts.so");
    shared_lib(&wrap, "next_puts.c", &["-ldl"]);
    let mut c = command(&sim, &f.main, &["hello"], &LIMIT, true);
    let preload = format!("{} {}", artifact("libvigil.so").display(), wrap.display());
    c.env("LD_PRELOAD", preload);
    let out = c.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[wrapped] hello\n",
        "{:?}\n{}",
        out.status,
        stderr(&out)
    );
}

#[test]
fn dlmopen_into_a_new_namespace_is_said_to_be_uncounted() {
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let lib = f.dep.to_str().unwrap();
    let out = run_ok(command(&sim, &f.main, &["dlmopen", lib], &LIMIT, true));
    let err = stderr(&out);
    says(&err, &["dlmopen", "libvigil_dep.so", "namespace"]);
}

#[test]
fn a_zero_limit_and_a_limit_for_a_missing_device_are_explained_at_start() {
    // Two simulated devices (the default).
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "0"),
        ("CUDA_DEVICE_MEMORY_LIMIT_5", "1g"),
    ];
    let out = sim.run(&["--alloc", "1GiB", "--alloc", "1GiB"], &env);
    let err = stderr(&out);
    let zero = err
        .lines()
        .find(|l| l.contains("CUDA_DEVICE_MEMORY_LIMIT=\"0\""))
        .unwrap_or_else(|| panic!("nothing says what 0 means:\n{err}"));
    says(zero, &["WARN", "no limit", "HAMi-core"]);
    let past = err
        .lines()
        .find(|l| l.contains("CUDA_DEVICE_MEMORY_LIMIT_5"))
        .unwrap_or_else(|| panic!("nothing says device 5 does not exist:\n{err}"));
    says(past, &["WARN", "2 CUDA devices"]);
}

#[test]
fn a_panic_in_the_dlopen_hook_passes_the_call_through() {
    // The forced panic (a fault-injection build) hits every hook; the library still
    // loads and runs, with its flags untouched, and the log says why.
    let sim = Sim::start(&["--ctx-memory", "2MiB"]);
    let f = build(&sim);
    let lib = f.deepbind.to_str().unwrap();
    let env = [LIMIT[0], ("VIGIL_FAULT", "hook.panic")];
    let out = run_ok(command(
        &sim,
        &f.main,
        &["deepbind", lib, "linked"],
        &env,
        true,
    ));
    let err = stderr(&out);
    assert_eq!(printed(&out, "granted"), TRIED, "{err}");
    assert!(
        err.contains("dlopen: internal error (panic caught)"),
        "{err}"
    );
}

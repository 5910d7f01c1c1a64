//! `vigil-gpusim`: the simulated GPU daemon. Every flag can also be set through the
//! environment variable named in `--help`; flags win.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vigil_gpusim::config::{parse_rate, Lag};
use vigil_gpusim::daemon::Daemon;
use vigil_gpusim::protocol::{Conn, Request, DEFAULT_SOCKET};
use vigil_gpusim::state::{PidMode, SimConfig};
use vigil_units::{parse_duration, parse_size, ParseError};

#[derive(Parser)]
#[command(
    name = "vigil-gpusim",
    version,
    // A later flag wins, so a test can override a helper's defaults.
    args_override_self = true,
    about = "Simulated GPU driver daemon: serves libcuda.so.1/libnvidia-ml.so.1 stand-ins over a Unix socket"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the running daemon's totals: processes, contexts, allocations, bytes used.
    Stats,
    /// Create DIR/libcuda.so.1 and DIR/libnvidia-ml.so.1 as links to the driver
    /// library (found next to this binary unless --driver is given).
    InstallLibs {
        dir: PathBuf,
        #[arg(long)]
        driver: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Unix socket to listen on (clients use the same variable to find it).
    #[arg(long, env = "VIGIL_GPUSIM_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Number of simulated devices (1-16).
    #[arg(long, env = "VIGIL_GPUSIM_DEVICES", default_value = "2")]
    devices: String,
    /// Memory per device (bytes, or with k/m/g/t suffix, e.g. 16GiB).
    #[arg(long, env = "VIGIL_GPUSIM_MEMORY", default_value = "16GiB")]
    memory: String,
    /// Device name reported by cuDeviceGetName and nvmlDeviceGetName.
    #[arg(
        long,
        env = "VIGIL_GPUSIM_DEVICE_NAME",
        default_value = "Vigil Simulated GPU"
    )]
    device_name: String,
    /// Delay from the start of a context's creation until it shows up in NVML's
    /// process list: DURATION, fixed:DURATION, uniform:MIN..MAX, exp:MEAN or
    /// lognormal:MEDIAN,SIGMA.
    #[arg(
        long,
        env = "VIGIL_GPUSIM_NVML_LAG",
        default_value = "uniform:20ms..200ms"
    )]
    nvml_lag: String,
    /// Delay from a change of a process's device memory (alloc, free, context
    /// creation or destruction) until NVML's per-process usedGpuMemory shows it; same
    /// grammar as --nvml-lag, 0 for instant. Changes show in order. Device totals
    /// (cuMemGetInfo, nvmlDeviceGetMemoryInfo) never lag. The default is an estimate,
    /// not yet measured on a real GPU.
    #[arg(
        long,
        env = "VIGIL_GPUSIM_NVML_MEM_LAG",
        default_value = "uniform:5ms..30ms"
    )]
    nvml_mem_lag: String,
    /// Time to create a context (primary or not). Measured on an H100: ~130 ms.
    #[arg(long, env = "VIGIL_GPUSIM_CTX_CREATE_TIME", default_value = "130ms")]
    ctx_create_time: String,
    /// Device memory a context itself takes. Measured on an H100: 518 MiB.
    #[arg(long, env = "VIGIL_GPUSIM_CTX_MEMORY", default_value = "518MiB")]
    ctx_memory: String,
    /// How long a dead process's contexts and memory stay visible after it dies.
    /// Measured on an H100: ~100 ms.
    #[arg(long, env = "VIGIL_GPUSIM_TEARDOWN_TIME", default_value = "0")]
    teardown_time: String,
    /// Which PID NVML reports: host (to everyone), namespace (the process's own, as
    /// 535 open and 560 do), or caller (translated into the asking process's PID
    /// namespace, as 580 does).
    #[arg(long, env = "VIGIL_GPUSIM_PID_MODE", default_value = "host")]
    pid_mode: String,
    /// Probability that an NVML query fails with NVML_ERROR_UNKNOWN.
    #[arg(long, env = "VIGIL_GPUSIM_NVML_ERROR_RATE", default_value = "0")]
    nvml_error_rate: String,
    /// How long an NVML query hangs (0 = never).
    #[arg(long, env = "VIGIL_GPUSIM_NVML_HANG", default_value = "0")]
    nvml_hang: String,
    /// Probability that an NVML query hangs, when --nvml-hang is set.
    #[arg(long, env = "VIGIL_GPUSIM_NVML_HANG_RATE", default_value = "1")]
    nvml_hang_rate: String,
    /// Probability that a context creation is refused (CUDA_ERROR_UNKNOWN).
    #[arg(long, env = "VIGIL_GPUSIM_CTX_REFUSE_RATE", default_value = "0")]
    ctx_refuse_rate: String,
    /// Seed for the lag and fault draws, for reproducible runs.
    #[arg(long, env = "VIGIL_GPUSIM_SEED", default_value = "24301")]
    seed: String,
    /// Driver version string reported by NVML.
    #[arg(long, env = "VIGIL_GPUSIM_DRIVER_VERSION", default_value = "560.35.03")]
    driver_version: String,
    /// CUDA driver API version reported by cuDriverGetVersion (e.g. 12060).
    #[arg(long, env = "VIGIL_GPUSIM_CUDA_VERSION", default_value = "12060")]
    cuda_version: String,
}

fn parse_int<T: std::str::FromStr>(
    setting: &str,
    v: &str,
    expected: &'static str,
) -> Result<T, ParseError> {
    v.trim().parse().map_err(|_| ParseError {
        setting: setting.into(),
        value: v.into(),
        expected,
    })
}

impl ServeArgs {
    fn config(&self) -> Result<SimConfig, ParseError> {
        let devices: u32 = parse_int(
            "--devices/VIGIL_GPUSIM_DEVICES",
            &self.devices,
            "a device count from 1 to 16",
        )?;
        if !(1..=16).contains(&devices) {
            return Err(ParseError {
                setting: "--devices/VIGIL_GPUSIM_DEVICES".into(),
                value: self.devices.clone(),
                expected: "a device count from 1 to 16",
            });
        }
        let pid_mode = match self.pid_mode.as_str() {
            "host" => PidMode::Host,
            "namespace" => PidMode::Namespace,
            "caller" => PidMode::Caller,
            _ => {
                return Err(ParseError {
                    setting: "--pid-mode/VIGIL_GPUSIM_PID_MODE".into(),
                    value: self.pid_mode.clone(),
                    expected: "host, namespace or caller",
                })
            }
        };
        let memory = parse_size("--memory/VIGIL_GPUSIM_MEMORY", &self.memory)?;
        if memory == 0 {
            return Err(ParseError {
                setting: "--memory/VIGIL_GPUSIM_MEMORY".into(),
                value: self.memory.clone(),
                expected: "a non-zero size",
            });
        }
        if self.driver_version.split_whitespace().count() != 1 {
            return Err(ParseError {
                setting: "--driver-version/VIGIL_GPUSIM_DRIVER_VERSION".into(),
                value: self.driver_version.clone(),
                expected: "a version without spaces",
            });
        }
        Ok(SimConfig {
            devices,
            memory,
            device_name: self.device_name.clone(),
            nvml_lag: Lag::parse("--nvml-lag/VIGIL_GPUSIM_NVML_LAG", &self.nvml_lag)?,
            nvml_mem_lag: Lag::parse(
                "--nvml-mem-lag/VIGIL_GPUSIM_NVML_MEM_LAG",
                &self.nvml_mem_lag,
            )?,
            ctx_create_time: parse_duration(
                "--ctx-create-time/VIGIL_GPUSIM_CTX_CREATE_TIME",
                &self.ctx_create_time,
            )?,
            ctx_memory: parse_size("--ctx-memory/VIGIL_GPUSIM_CTX_MEMORY", &self.ctx_memory)?,
            teardown_time: parse_duration(
                "--teardown-time/VIGIL_GPUSIM_TEARDOWN_TIME",
                &self.teardown_time,
            )?,
            pid_mode,
            nvml_error_rate: parse_rate(
                "--nvml-error-rate/VIGIL_GPUSIM_NVML_ERROR_RATE",
                &self.nvml_error_rate,
            )?,
            nvml_hang: parse_duration("--nvml-hang/VIGIL_GPUSIM_NVML_HANG", &self.nvml_hang)?,
            nvml_hang_rate: parse_rate(
                "--nvml-hang-rate/VIGIL_GPUSIM_NVML_HANG_RATE",
                &self.nvml_hang_rate,
            )?,
            ctx_refuse_rate: parse_rate(
                "--ctx-refuse-rate/VIGIL_GPUSIM_CTX_REFUSE_RATE",
                &self.ctx_refuse_rate,
            )?,
            seed: parse_int(
                "--seed/VIGIL_GPUSIM_SEED",
                &self.seed,
                "an unsigned integer",
            )?,
            driver_version: self.driver_version.clone(),
            cuda_version: parse_int(
                "--cuda-version/VIGIL_GPUSIM_CUDA_VERSION",
                &self.cuda_version,
                "a version number such as 12060",
            )?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Stats) => stats(&cli.serve.socket),
        Some(Cmd::InstallLibs { dir, driver }) => install_libs(&dir, driver),
        None => serve(&cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-gpusim: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &ServeArgs) -> Result<(), String> {
    let cfg = args.config().map_err(|e| e.to_string())?;
    let daemon = Daemon::bind(cfg.clone(), &args.socket)
        .map_err(|e| format!("{}: {e}", args.socket.display()))?;
    println!(
        "listening socket={} devices={} memory={} pid_mode={:?} nvml_lag={:?} nvml_mem_lag={:?}",
        args.socket.display(),
        cfg.devices,
        cfg.memory,
        cfg.pid_mode,
        cfg.nvml_lag,
        cfg.nvml_mem_lag
    );
    daemon.run().map_err(|e| e.to_string())
}

fn stats(socket: &std::path::Path) -> Result<(), String> {
    let mut c = Conn::connect(socket, std::process::id()).map_err(|e| format!("{e:?}"))?;
    let st = c.call(&Request::Stats).map_err(|e| format!("{e:?}"))?;
    println!("{}", st.encode_values());
    Ok(())
}

fn install_libs(dir: &std::path::Path, driver: Option<PathBuf>) -> Result<(), String> {
    let driver = match driver {
        Some(d) => d,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("libvigil_gpusim_driver.so"),
    };
    if !driver.exists() {
        return Err(format!(
            "{}: driver library not found (build it with `cargo build -p vigil-gpusim-driver`)",
            driver.display()
        ));
    }
    let driver = driver
        .canonicalize()
        .map_err(|e| format!("{}: {e}", driver.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for name in [
        "libcuda.so.1",
        "libcuda.so",
        "libnvidia-ml.so.1",
        "libnvidia-ml.so",
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&driver, &link)
            .map_err(|e| format!("{}: {e}", link.display()))?;
    }
    println!("installed {} -> {}", dir.display(), driver.display());
    Ok(())
}

// Keep clap's `Cli` usable in `--help` tests.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}

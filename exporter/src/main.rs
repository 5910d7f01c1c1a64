//! `vigil-exporter`: serves Vigil region metrics to Prometheus (see README.md).

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use vigil_exporter::http::{parse_listen_address, serve, Metrics, ServeOptions, WebConfig};
use vigil_exporter::labels::LabelPolicy;
use vigil_exporter::regions::{Limits, RegionSet};
use vigil_exporter::util::parse_duration;

#[derive(Parser)]
#[command(
    name = "vigil-exporter",
    version,
    about = "Prometheus exporter for Vigil shared regions (exact counters, histograms, lost events; OTLP start-up traces)",
    after_help = "Every flag can also be set from the environment: --web.listen-address as VIGIL_EXPORTER_WEB_LISTEN_ADDRESS, and so on (upper case, dots and dashes as underscores); a flag on the command line wins. A switch takes true or false. --region from the environment is one path.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// A region file to watch (repeatable). Its `region` label is the path as given.
    #[arg(long = "region", value_name = "PATH")]
    regions: Vec<PathBuf>,
    /// A directory of regions, rescanned: DIR/*.cache or HAMi's
    /// DIR/<pod-uid>_<container>/*.cache (regular, non-hidden files named *.cache one
    /// or two levels down; symlinks are never followed).
    #[arg(long = "regions-dir", value_name = "DIR")]
    regions_dir: Option<PathBuf>,
    /// At most this many regions are watched in all; the rest are counted as
    /// region errors (reason="limit_exceeded").
    #[arg(long = "regions.max", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_regions: u32,
    /// At most this many regions are watched per directory (HAMi has one per container).
    #[arg(long = "regions.max-per-dir", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_per_dir: u32,
    /// Take namespace/pod/container labels from the identity block inside each region.
    /// Any process that can write a region can forge it: only for trusted workloads.
    #[arg(long = "labels.from-region-identity")]
    labels_from_identity: bool,
    /// A fixed `namespace` label for every region (the sidecar passes its own
    /// downward-API POD_NAMESPACE). Never set it on a node-wide exporter.
    #[arg(long = "labels.namespace", value_name = "NS")]
    label_namespace: Option<String>,
    /// A fixed `pod` label for every region (the sidecar passes its own POD_NAME).
    #[arg(long = "labels.pod", value_name = "POD")]
    label_pod: Option<String>,
    /// A fixed `container` label for every region (the sidecar's workload container).
    #[arg(long = "labels.container", value_name = "NAME")]
    label_container: Option<String>,
    /// How often --regions-dir is rescanned for new and deleted files.
    #[arg(long = "regions-dir.scan-interval", default_value = "1s", value_parser = parse_duration)]
    scan_interval: Duration,
    /// How often each region's event ring is drained (and its slots' liveness probed,
    /// at most every 250 ms; scrapes use that probe while it is under a second old).
    #[arg(long = "drain.interval", default_value = "100ms", value_parser = parse_duration)]
    drain_interval: Duration,
    /// Address to listen on: HOST:PORT, or :PORT for every interface.
    #[arg(long = "web.listen-address", default_value = vigil_exporter::DEFAULT_LISTEN)]
    listen_address: String,
    /// At most this many client connections at once (fewer if the descriptor limit
    /// leaves less room). At the cap, the connection idle longest (1 s at least) is
    /// closed for a new one; if none is, the new one gets a 503.
    #[arg(long = "web.max-connections", default_value_t = vigil_exporter::http::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// A reply the client has not taken within this long after it stopped reading is
    /// abandoned and the connection closed.
    #[arg(long = "web.write-timeout", default_value = "10s", value_parser = parse_duration)]
    write_timeout: Duration,
    /// TLS and basic authentication, in the Prometheus exporter toolkit's web
    /// configuration format (tls_server_config, basic_auth_users); see the README.
    #[arg(long = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
    /// Path under which metrics are served.
    #[arg(long = "web.telemetry-path", default_value = "/metrics")]
    telemetry_path: String,
    /// Map each region only while reading it, instead of keeping it mapped: RSS no
    /// longer counts the regions' touched pages (shared page cache), but every read
    /// pays the mapping and its page faults.
    #[arg(long = "regions.map-per-read")]
    map_per_read: bool,
    /// The /proc to find the slots' processes in, to check their recorded host PIDs
    /// (vigil_host_pid_checks_total). Node-wide: the host's, i.e. run with hostPID.
    #[arg(long = "proc.path", value_name = "DIR", default_value = vigil_exporter::regions::DEFAULT_PROC_PATH)]
    proc_path: PathBuf,
    /// At most one /proc scan per this interval (only when new slots await a check).
    #[arg(long = "proc.scan-interval", default_value = "10s", value_parser = parse_duration)]
    proc_scan_interval: Duration,
    /// NVML (the driver's view: device UUID and model, physical memory, and each
    /// region's processes' usage to compute accounting drift). auto: used if the
    /// library loads, otherwise its series are left out; off: never loaded.
    #[arg(long = "nvml", value_enum, default_value = "auto")]
    nvml: vigil_exporter::nvml::Mode,
    /// The NVML library to load.
    #[arg(
        long = "nvml.library",
        value_name = "PATH",
        default_value = "libnvidia-ml.so.1"
    )]
    nvml_library: std::ffi::OsString,
    /// How often NVML is read (in the background; scrapes serve the latest reading).
    #[arg(long = "nvml.interval", default_value = "5s", value_parser = parse_duration)]
    nvml_interval: Duration,
    /// Log line format: logfmt (key=value pairs) or json (one object a line).
    #[arg(long = "log.format", value_enum, default_value = "logfmt")]
    log_format: vigil_exporter::logfmt::LogFormat,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long = "log.level", default_value = "info",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces): export one
    /// trace per process start-up, built from ring events.
    #[arg(long = "otlp-endpoint", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a region's state for an operator (read-only): header, limits, live
    /// slots with host PIDs and usage, lock owners and epochs, counters, ring.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The /proc to resolve each live slot's host PID in.
        #[arg(long = "proc.path", value_name = "DIR", default_value = vigil_exporter::regions::DEFAULT_PROC_PATH)]
        proc_path: PathBuf,
    },
    /// Print a bcrypt hash of the password read from standard input, for
    /// basic_auth_users in --web.config.file.
    HashPassword {
        /// bcrypt cost (4 to 31; each step doubles the time a check takes).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
        cost: u32,
    },
}

/// The variable a flag can also come from: `VIGIL_EXPORTER_` and the flag's long name
/// in upper case, dots and dashes as underscores (`--web.listen-address` from
/// `VIGIL_EXPORTER_WEB_LISTEN_ADDRESS`).
fn env_name(long: &str) -> String {
    format!(
        "VIGIL_EXPORTER_{}",
        long.to_uppercase().replace(['.', '-'], "_")
    )
}

/// The command line's definition, every top-level flag also from its [`env_name`]
/// (the subcommands' flags only from the command line).
fn command() -> clap::Command {
    Cli::command().mut_args(|a| match a.get_long() {
        Some("help" | "version") => a,
        // Leaked once, at start-up: clap keeps the names for the whole run.
        Some(long) => {
            let name: &'static str = Box::leak(env_name(long).into_boxed_str());
            a.env(name)
        }
        None => a,
    })
}

fn parse_cli() -> Cli {
    let mut matches = command().get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse_cli();
    if let Some(Cmd::HashPassword { cost }) = &cli.cmd {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("vigil-exporter hash-password: cannot read standard input: {e}");
            return ExitCode::from(2);
        }
        let password = line.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            eprintln!("vigil-exporter hash-password: no password on standard input");
            return ExitCode::from(2);
        }
        return match bcrypt::hash(password, *cost) {
            Ok(h) => {
                println!("{h}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vigil-exporter hash-password: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Cmd::Inspect {
        path,
        json,
        proc_path,
    }) = &cli.cmd
    {
        return match vigil_exporter::inspect::run(path, *json, proc_path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vigil-exporter inspect: {e}");
                ExitCode::from(2)
            }
        };
    }
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("warn,vigil_exporter={}", cli.log_level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter);
    match cli.log_format {
        vigil_exporter::logfmt::LogFormat::Logfmt => {
            fmt.event_format(vigil_exporter::logfmt::Logfmt).init()
        }
        vigil_exporter::logfmt::LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("vigil-exporter: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    if cli.regions.is_empty() && cli.regions_dir.is_none() {
        return Err("nothing to watch: give --region PATH and/or --regions-dir DIR".into());
    }
    if let Some(d) = &cli.regions_dir {
        if !d.is_dir() {
            return Err(format!("--regions-dir {}: not a directory", d.display()));
        }
    }
    if !cli.telemetry_path.starts_with('/') || cli.telemetry_path == "/" {
        return Err(format!(
            "--web.telemetry-path {:?}: must start with / and not be / itself",
            cli.telemetry_path
        ));
    }
    let addr = parse_listen_address(&cli.listen_address)?;
    if !vigil_exporter::util::keep_scrape_buffers_on_heap() {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) not taken: scrape buffers stay mmapped");
    }
    // Every watched region and every client connection is a descriptor: use all the
    // hard limit allows (containers often start with a soft limit of 1024).
    match vigil_exporter::util::raise_nofile_limit() {
        Ok((old, new)) if new > old => {
            info!("RLIMIT_NOFILE: soft limit raised from {old} to the hard limit {new}")
        }
        Ok((_, cur)) => info!("RLIMIT_NOFILE: soft limit {cur} (the hard limit)"),
        Err(e) => warn!("RLIMIT_NOFILE: cannot raise the soft limit: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .max_blocking_threads(8)
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let otlp = match &cli.otlp_endpoint {
        Some(url) => Some(vigil_exporter::otlp::OtlpSink::new(url)?),
        None => None,
    };
    let sink = otlp
        .clone()
        .map(|s| s as Arc<dyn vigil_exporter::trace::TraceSink>);
    // Before any region is mapped: a region file truncated under us must not kill
    // the exporter (SIGBUS); the read is reported instead (RegionReader::is_poisoned).
    vigil_region::install_sigbus_guard();
    let policy = LabelPolicy {
        from_region_identity: cli.labels_from_identity,
        namespace: cli.label_namespace.clone(),
        pod: cli.label_pod.clone(),
        container: cli.label_container.clone(),
    };
    let set = Arc::new(
        RegionSet::new(cli.regions.clone(), cli.regions_dir.clone(), sink)
            .with_keep_mapped(!cli.map_per_read)
            .with_label_policy(policy)
            .with_limits(Limits {
                max_regions: cli.max_regions as usize,
                max_per_dir: cli.max_per_dir as usize,
            })
            .with_host_pid_checks(cli.proc_path.clone(), cli.proc_scan_interval)
            .with_nvml(vigil_exporter::nvml::NvmlSource::new(
                cli.nvml,
                cli.nvml_library.clone(),
                cli.nvml_interval,
            )),
    );
    set.rescan();
    // Starts the NVML thread now, so the first scrape already has a reading.
    let _ = set.nvml_state();

    // The background task: drains rings and rescans, on a thread of its own because
    // it maps files and makes syscalls (it is never on an async worker).
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let bg = {
        let set = set.clone();
        let (drain_every, scan_every) = (cli.drain_interval, cli.scan_interval);
        std::thread::Builder::new()
            .name("vigil-drain".into())
            .spawn(move || {
                let mut last_scan = Instant::now();
                loop {
                    // Per-region panics are caught inside; this catches the rest, so
                    // the thread that drains and discovers for every tenant never dies.
                    let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        set.drain_all();
                        if last_scan.elapsed() >= scan_every {
                            set.rescan();
                            last_scan = Instant::now();
                        }
                    }));
                    if pass.is_err() {
                        error!("drain/rescan pass panicked; continuing");
                    }
                    match stop_rx.recv_timeout(drain_every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                set.drain_all();
                set.flush_traces();
            })
            .map_err(|e| format!("cannot start the drain thread: {e}"))?
    };

    let metrics = Arc::new(Metrics::new(set.clone()));
    let security = match &cli.web_config_file {
        Some(p) => Arc::new(vigil_exporter::webconfig::load(p)?),
        None => Default::default(),
    };
    if security.tls.is_some() || security.requires_auth() {
        info!(
            "--web.config.file: {}{}",
            if security.tls.is_some() {
                "TLS"
            } else {
                "plain HTTP"
            },
            if security.requires_auth() {
                ", basic authentication required"
            } else {
                ""
            }
        );
    }
    let web_tls = security.tls.is_some();
    let web = WebConfig {
        telemetry_path: cli.telemetry_path.clone(),
        security,
    };
    let served = rt.block_on(async {
        // Watch the signals before anyone can learn we listen: a SIGTERM that arrives
        // right after start-up must shut down gracefully, not kill.
        let stop = shutdown_signal();
        let listener = vigil_exporter::http::listen(addr)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| format!("--web.listen-address {}: cannot listen: {e}", addr))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        info!(
            "listening on {}://{local}{} ({} regions watched)",
            if web_tls { "https" } else { "http" },
            cli.telemetry_path,
            set.tracked().len()
        );
        let opts = ServeOptions {
            max_connections: cli.max_connections as usize,
            write_timeout: cli.write_timeout,
        };
        info!(
            "at most {} client connections at once (--web.max-connections {}, {} descriptors); write timeout {:?}",
            vigil_exporter::http::connection_cap(
                opts.max_connections,
                vigil_exporter::http::nofile_limit(),
                set.tracked_count()
            ),
            opts.max_connections,
            vigil_exporter::http::nofile_limit(),
            opts.write_timeout
        );
        serve(listener, metrics, web, opts, stop).await;
        Ok::<(), String>(())
    });
    let _ = stop_tx.send(());
    let _ = bg.join();
    if let Some(o) = otlp {
        o.shutdown();
    }
    info!("stopped");
    served
}

/// Registers SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            },
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot watch SIGTERM/SIGINT: {e}");
                std::future::pending::<()>().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_its_variable() {
        assert_eq!(
            env_name("web.listen-address"),
            "VIGIL_EXPORTER_WEB_LISTEN_ADDRESS"
        );
        assert_eq!(
            env_name("regions.max-per-dir"),
            "VIGIL_EXPORTER_REGIONS_MAX_PER_DIR"
        );
        let cmd = command();
        let mut flags = 0;
        for a in cmd.get_arguments() {
            if let Some(long) = a.get_long() {
                let env = a.get_env().and_then(|e| e.to_str());
                assert_eq!(env, Some(env_name(long).as_str()), "--{long}");
                flags += 1;
            }
        }
        assert_eq!(flags, 24, "every flag of the exporter");
    }
}

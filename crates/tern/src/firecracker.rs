//! `tern firecracker`, and tern started as `firecracker` (a link named so): Firecracker's
//! command line in front of `tern run`, with Firecracker's API served at the socket's root
//! (`vmm::api::firecracker`) beside tern's own.
//!
//! Flags taken as Firecracker takes them: `--api-sock`, `--config-file` (its JSON: the VM
//! boots at once), `--id`, `--no-api` (with `--config-file`), `--no-seccomp`, `--version`,
//! `--log-path`, `--level`, `--show-level`, `--show-log-origin`, `--metrics-path`, `--http-api-max-payload-size`
//! (tern's limit stays 64 KiB, which every body fits), and the jailer's `--start-time-us`,
//! `--start-time-cpu-us` and `--parent-cpu-time-us` (Firecracker only reports them in its
//! boot-time metrics, which tern does not write). Refused by name: `--boot-timer`,
//! `--seccomp-filter` (tern's filters are its own), `--mmds-size-limit` (no MMDS),
//! and `--describe-snapshot`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use api::firecracker::{FullConfig, FIRECRACKER_VERSION};
use clap::Parser;

use crate::{RunArgs, EXIT_USAGE, EXIT_VMM_ERROR};

/// What `tern run` gets from the Firecracker side.
pub(crate) struct Mode {
    /// The instance id.
    pub id: String,
    /// The VM's configuration, from `--config-file`.
    pub config: Option<FullConfig>,
    /// Where `FlushMetrics` writes.
    pub metrics: Option<Arc<std::fs::File>>,
}

/// Firecracker's command line.
#[derive(Parser)]
#[command(
    name = "firecracker",
    disable_version_flag = true,
    about = "tern with Firecracker's command line and API"
)]
pub(crate) struct Args {
    /// The API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// A Firecracker JSON configuration: the VM boots at once.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// The instance's id (GET /).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// No API socket (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Print the Firecracker API version tern speaks, and tern's own.
    #[arg(long)]
    version: bool,
    /// No system-call filters.
    #[arg(long)]
    no_seccomp: bool,
    /// Where log lines go (a file or a FIFO with its reader).
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Each log line names its level (tern's always do).
    #[arg(long)]
    show_level: bool,
    /// Each log line names its source file and line.
    #[arg(long)]
    show_log_origin: bool,
    /// Where FlushMetrics writes its JSON line (a file or a FIFO with its reader).
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Accepted (the jailer's start time, for Firecracker's boot-time metrics).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Accepted, as --start-time-us.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Accepted, as --start-time-us.
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Accepted: tern takes bodies up to 64 KiB whatever is given.
    #[arg(long, value_name = "BYTES")]
    http_api_max_payload_size: Option<usize>,
    /// Refused: tern has no boot timer device.
    #[arg(long)]
    boot_timer: bool,
    /// Refused: tern's system-call filters are its own.
    #[arg(long, value_name = "PATH")]
    seccomp_filter: Option<PathBuf>,
    /// Refused: tern has no MMDS.
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Refused: tern's snapshots are directories (`tern` tells their version in state.json).
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<PathBuf>,
}

/// Whether tern was started through a link named `firecracker`.
pub(crate) fn invoked_as_firecracker() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "firecracker"))
        .unwrap_or(false)
}

/// tern started as `firecracker`.
pub(crate) fn main_from_argv(start: Instant) -> ExitCode {
    main(Box::new(Args::parse()), start)
}

/// `RunArgs` as `tern run ARGV` would have them.
fn run_args(argv: &[&str]) -> Result<RunArgs, clap::Error> {
    #[derive(Parser)]
    struct RunOnly {
        #[command(flatten)]
        run: RunArgs,
    }
    let mut full = vec!["tern"];
    full.extend_from_slice(argv);
    RunOnly::try_parse_from(full).map(|r| r.run)
}

pub(crate) fn main(args: Box<Args>, start: Instant) -> ExitCode {
    if args.version {
        println!("Firecracker v{FIRECRACKER_VERSION}");
        println!(
            "(tern {}, speaking Firecracker's API)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let refused = [
        (args.boot_timer, "--boot-timer: tern has no boot timer device"),
        (
            args.seccomp_filter.is_some(),
            "--seccomp-filter: tern's system-call filters are its own (--no-seccomp turns them off)",
        ),
        (args.mmds_size_limit.is_some(), "--mmds-size-limit: tern has no MMDS"),
        (
            args.describe_snapshot.is_some(),
            "--describe-snapshot: tern's snapshots are directories; their state.json names the format",
        ),
    ];
    if let Some((_, why)) = refused.iter().find(|(on, _)| *on) {
        eprintln!("tern firecracker: {why}");
        return ExitCode::from(EXIT_USAGE);
    }
    if args.no_api && args.config_file.is_none() {
        eprintln!("tern firecracker: --no-api needs --config-file (nothing could start the VM)");
        return ExitCode::from(EXIT_USAGE);
    }
    match setup(&args) {
        Ok((config, metrics)) => {
            let mut argv = Vec::new();
            let sock = args.api_sock.to_string_lossy().into_owned();
            if !args.no_api {
                argv.extend(["--api-socket", sock.as_str()]);
            }
            if args.no_seccomp {
                argv.extend(["--seccomp", "off"]);
            }
            let run = match run_args(&argv) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("tern firecracker: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            // SIGTERM stops at once, vCPU threads are `fc_vcpu N`.
            vmm::personality::set_firecracker();
            // Firecracker does not speak systemd's notification protocol, and a tern started by
            // a service manager's child (a container shim) must not answer for that service.
            std::env::remove_var("NOTIFY_SOCKET");
            let mode = Mode {
                id: args.id.clone(),
                config,
                metrics,
            };
            crate::run(Box::new(run), start, Some(mode))
        }
        Err(e) => {
            eprintln!("tern firecracker: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

type Setup = (Option<FullConfig>, Option<Arc<std::fs::File>>);

/// The logger, the metrics file and the configuration file, as the flags and the file say.
fn setup(args: &Args) -> Result<Setup, String> {
    use vmm::api::firecracker::{open_sink, redirect_log, LOG_FILTER};
    let config: Option<FullConfig> = match &args.config_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Some(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let mut logger = config
        .as_ref()
        .and_then(|c| c.logger.clone())
        .unwrap_or_default();
    if args.log_path.is_some() {
        logger.log_path = args.log_path.clone();
    }
    if args.level.is_some() {
        logger.level = args.level.clone();
    }
    if let Some(level) = logger.filter()? {
        if let Some(set) = LOG_FILTER.get() {
            set(level)?;
        }
    }
    if args.show_level {
        logger.show_level = Some(true);
    }
    if args.show_log_origin {
        logger.show_log_origin = Some(true);
    }
    vmm::api::firecracker::set_log_style(&logger);
    if let Some(p) = &logger.log_path {
        redirect_log(p)?;
    }
    let metrics_path = args.metrics_path.clone().or_else(|| {
        config
            .as_ref()
            .and_then(|c| c.metrics.as_ref().map(|m| m.metrics_path.clone()))
    });
    let metrics = match metrics_path {
        Some(p) => Some(Arc::new(open_sink(&p, true)?)),
        None => None,
    };
    Ok((config, metrics))
}

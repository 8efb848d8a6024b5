//! `tern`: a KVM virtual machine monitor.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    BootProtocol, CharBackend, Decompress, DiskConfig, MemSize, NetConfig, OnReboot, Transport,
};
use vmm::{VmConfig, VmExit};

/// Exit status when the guest crashed (triple fault, KVM internal error, kernel panic).
const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status for VMM errors (bad config, missing files, KVM failures).
const EXIT_VMM_ERROR: u8 = 1;

#[derive(Parser)]
#[command(name = "tern", version, about = "tern: a KVM virtual machine monitor")]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter; also TERN_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest powers off.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML, or JSON when it starts with '{'); flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: a bzImage or an ELF vmlinux (PVH entry when the ELF has a PVH note).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=1 i8042.…].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-254) [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory, e.g. 512M, 2G (a plain number means MiB) [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// Serial console: stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "BACKEND")]
    serial: Option<CharBackend>,
    /// Kernel entry: auto (PVH when available), pvh or linux [default: auto].
    #[arg(long, value_name = "PROTOCOL")]
    boot_protocol: Option<BootProtocol>,
    /// Where a bzImage is decompressed: host (tern, then direct 64-bit entry) or guest
    /// [default: host].
    #[arg(long, value_name = "WHERE")]
    decompress: Option<Decompress>,
    /// What a guest reboot does: exit (status 0) or restart [default: exit].
    #[arg(long, value_name = "ACTION")]
    on_reboot: Option<OnReboot>,
    /// virtio transport: pci (virtio-pci with MSI-X) or mmio (virtio-mmio v2) [default: pci].
    #[arg(long, value_name = "TRANSPORT")]
    transport: Option<Transport>,
    /// Add a virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-console (the guest's hvc0): stdio, file:PATH or none.
    #[arg(long, value_name = "BACKEND")]
    console: Option<CharBackend>,
    /// Add a virtio-blk disk (repeatable; the first is vda):
    /// path=IMG[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=none|writeback][,queues=N]
    /// [,iops=N][,bw=BYTES/s][,io=auto|io_uring|sync].
    #[arg(long, value_name = "SPEC")]
    disk: Vec<DiskConfig>,
    /// Add a virtio-net interface on a TAP device (repeatable; the first is eth0):
    /// tap=NAME|auto[,mac=52:54:00:12:34:56][,queues=N][,mtu=N][,offload=on|off]
    /// [,rx_bw=BYTES/s][,tx_bw=BYTES/s][,rx_ops=N][,tx_ops=N].
    #[arg(long, value_name = "SPEC")]
    net: Vec<NetConfig>,
    /// Seconds the guest gets to power off after SIGTERM presses its ACPI power button
    /// [default: 20].
    #[arg(long, value_name = "SECS")]
    shutdown_timeout: Option<u64>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
                VmConfig::from_file_text(&p.display().to_string(), &text)?
            }
            None => VmConfig::default(),
        };
        if let Some(v) = self.kernel {
            c.kernel = Some(v);
        }
        if let Some(v) = self.initrd {
            c.initrd = Some(v);
        }
        if let Some(v) = self.cmdline {
            c.cmdline = Some(v);
        }
        if let Some(v) = self.cpus {
            c.cpus = v;
        }
        if let Some(v) = self.memory {
            c.memory = v;
        }
        if let Some(v) = self.serial {
            c.serial = v;
        }
        if let Some(v) = self.boot_protocol {
            c.boot_protocol = v;
        }
        if let Some(v) = self.decompress {
            c.decompress = v;
        }
        if let Some(v) = self.on_reboot {
            c.on_reboot = v;
        }
        if let Some(v) = self.transport {
            c.transport = v;
        }
        if self.rng {
            c.rng = true;
        }
        if let Some(v) = self.console {
            c.console = Some(v);
        }
        if !self.disk.is_empty() {
            c.disks = self.disk;
        }
        if !self.net.is_empty() {
            c.nets = self.net;
        }
        if let Some(v) = self.shutdown_timeout {
            c.shutdown_timeout = v;
        }
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(level: Option<&str>) {
    let filter = level
        .map(str::to_string)
        .or_else(|| std::env::var("TERN_LOG").ok())
        .unwrap_or_else(|| "warn".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    match cli.cmd {
        Command::Run(args) => {
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tern: {e}");
                    return ExitCode::from(EXIT_VMM_ERROR);
                }
            };
            match vmm::run(&config, start) {
                Ok(exit) => exit_code(&exit),
                Err(e) => {
                    eprintln!("tern: {e}");
                    ExitCode::from(EXIT_VMM_ERROR)
                }
            }
        }
    }
}

fn exit_code(exit: &VmExit) -> ExitCode {
    match exit {
        VmExit::PowerOff => ExitCode::SUCCESS,
        VmExit::Reset => {
            tracing::info!("guest rebooted");
            ExitCode::SUCCESS
        }
        VmExit::DebugExit(s) => ExitCode::from(*s),
        VmExit::Signal(s) => {
            eprintln!("tern: stopped by signal {s}");
            ExitCode::SUCCESS
        }
        VmExit::UserQuit => ExitCode::SUCCESS,
        VmExit::ShutdownTimeout(secs) => {
            eprintln!(
                "tern: the guest did not power off within {secs} s of the power button; stopped it"
            );
            ExitCode::SUCCESS
        }
        VmExit::GuestPanic => {
            eprintln!("tern: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::TripleFault { vcpu, regs } => {
            eprintln!("tern: guest triple fault on vCPU {vcpu}: {regs}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::InternalError {
            vcpu,
            suberror,
            regs,
        } => {
            eprintln!("tern: KVM internal error (suberror {suberror}) on vCPU {vcpu}: {regs}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::Error(e) => {
            eprintln!("tern: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

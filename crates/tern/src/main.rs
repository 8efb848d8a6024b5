//! `tern`: a KVM virtual machine monitor.

mod balloon;
mod devices;
mod firecracker;
mod jail;
mod migrate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use vmm::config::{
    BootProtocol, CharBackend, Decompress, DiskConfig, MemSize, NetConfig, OnReboot, Transport,
};
use vmm::systemd::{ERR, NOTICE, WARNING};
use vmm::{VmConfig, VmExit};

/// Exit status when the guest crashed (triple fault, KVM internal error, kernel panic).
const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status for VMM errors (bad config, missing files, KVM failures).
pub(crate) const EXIT_VMM_ERROR: u8 = 1;
/// Exit status for command-line misuse (as clap's own errors).
pub(crate) const EXIT_USAGE: u8 = 2;

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
    Run(Box<RunArgs>),
    /// Show a running VM's state, configuration and size.
    Info(ClientArgs),
    /// Stop every vCPU of a running VM.
    Pause(ClientArgs),
    /// Continue a paused VM.
    Resume(ClientArgs),
    /// Press the VM's ACPI power button (--force: stop it at once).
    Shutdown {
        #[command(flatten)]
        client: ClientArgs,
        /// Stop the VM without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Reset the VM (as a guest reboot: tern exits or restarts it, per --on-reboot).
    Reboot(ClientArgs),
    /// Show exit counts per vCPU and I/O counters per device.
    Counters(ClientArgs),
    /// Snapshots of a running tern's VM.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Run `tern run ARGS…` confined: chroot, namespaces, cgroups, an unprivileged user.
    Jail(Box<jail::JailArgs>),
    /// Move the running VM to another tern (`tern run --incoming URL`) while it runs, and
    /// follow the migration to its end; or show or cancel one.
    Migrate(Box<migrate::MigrateArgs>),
    /// Set the size of a running VM's memory balloon (the guest gives that much memory back
    /// to the host), or show it and the guest's memory statistics.
    Balloon(balloon::BalloonArgs),
    /// Change a running VM's number of vCPUs (CPU hotplug, up to its --max-cpus) or its
    /// memory (virtio-mem, up to its --max-memory).
    Resize {
        #[command(flatten)]
        client: ClientArgs,
        /// The number of vCPUs the guest should have.
        #[arg(long, value_name = "N", required_unless_present = "memory")]
        cpus: Option<u32>,
        /// The memory the guest should have in all, e.g. 2G (from --memory up to
        /// --max-memory, in steps of 2M).
        #[arg(long, value_name = "SIZE")]
        memory: Option<MemSize>,
    },
    /// Run as Firecracker does, with its flags and its API (what `firecracker`, a link to
    /// tern, runs): see `tern firecracker --help`.
    Firecracker(Box<firecracker::Args>),
    /// List a running VM's disks, plug one in or out, or change one (rate limits, size).
    #[command(subcommand)]
    Disk(devices::DiskCmd),
    /// List a running VM's network interfaces, plug one in or out, or change one (rate
    /// limits).
    #[command(subcommand)]
    Net(devices::NetCmd),
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Write a snapshot of the paused VM to a new directory (`tern run --restore DIR` brings
    /// it back).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// The snapshot directory to create.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Write only the memory written since the previous snapshot of this VM (or since it
        /// was restored); needs `tern run --track-dirty-pages`. Restoring it reads the
        /// earlier snapshot too, which must stay where it is.
        #[arg(long)]
        diff: bool,
    },
}

#[derive(Args)]
struct ClientArgs {
    /// The running tern's API socket (`tern run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the server's JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
pub(crate) struct RunArgs {
    /// Serve the control API (HTTP/1.1 REST) on this Unix socket. Without --kernel (or a
    /// config file), tern starts empty and waits for PUT /v1/vm and PUT /v1/vm/boot.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Register the VM with systemd-machined under this name when tern starts, so that
    /// `machinectl list` shows it (the unit tern runs in is the machine's); where machined
    /// does not run, tern says so and runs the VM anyway.
    #[arg(long, value_name = "NAME", value_parser = machine_name)]
    machine_name: Option<String>,
    /// Bring back the VM saved in this snapshot directory instead of booting one.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Wait for a VM migrating in from another tern (`tern migrate --to URL` there) on
    /// tcp:HOST:PORT or unix:PATH, instead of booting one; --disk-remap, --tap-remap,
    /// --serial and --console change the host side on the way in.
    #[arg(long, value_name = "URL", conflicts_with = "restore")]
    incoming: Option<api::migrate::MigrationUrl>,
    /// With --restore: stay paused (resume through the API).
    #[arg(long)]
    paused: bool,
    /// With --restore: lazy maps the memory file copy-on-write, so pages load on first touch
    /// (restore time independent of the guest's size; the memory checksum is not checked);
    /// eager reads the file and checks its checksum [default: lazy].
    #[arg(long, value_name = "MODE", value_parser = ["eager", "lazy"])]
    restore_mode: Option<String>,
    /// With --restore: open disk image NEW where the snapshot names OLD (repeatable). Clones
    /// restored from one snapshot each need their own copy or overlay of every writable disk.
    #[arg(long, value_name = "OLD=NEW")]
    disk_remap: Vec<String>,
    /// With --restore: use TAP NEW where the snapshot names OLD (repeatable); the guest keeps
    /// its MAC address.
    #[arg(long, value_name = "OLD=NEW")]
    tap_remap: Vec<String>,
    /// With --restore or --incoming: the VM's vsock on this host socket instead of the one
    /// the snapshot or the source names (clones side by side, and a VM migrating between two
    /// terns on one host, each need their own).
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// With --incoming: let the migrating VM use files the source names (kernel, initrd,
    /// disks, serial and console files) inside DIR (repeatable). Any other file it names is
    /// refused unless --disk-remap, --serial or --console names one here instead.
    #[arg(long, value_name = "DIR")]
    accept_dir: Vec<PathBuf>,
    /// With --incoming: let the migrating VM use the TAP the source names if it is NAME, or
    /// starts with PREFIX (repeatable); any other TAP needs --tap-remap.
    #[arg(long, value_name = "NAME|PREFIX*")]
    accept_tap: Vec<String>,
    /// Config file (TOML, or JSON when it starts with '{'); flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: a bzImage or an ELF vmlinux (PVH entry when the ELF has a PVH note).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Boot through firmware from the VM's disks instead of a kernel: bios (SeaBIOS), uefi
    /// (OVMF) or the path of a firmware image.
    #[arg(long, value_name = "bios|uefi|PATH")]
    firmware: Option<api::firmware::Firmware>,
    /// With --firmware uefi: the file keeping this VM's UEFI variables across boots (created
    /// from OVMF's template when missing).
    #[arg(long, value_name = "PATH")]
    uefi_vars: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=1 i8042.…].
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Number of vCPUs (1-254) [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Most vCPUs the VM may grow to while it runs (`tern resize --cpus`), up to 254
    /// [default: --cpus, no CPU hotplug].
    #[arg(long, value_name = "N")]
    max_cpus: Option<u32>,
    /// Guest memory, e.g. 512M, 2G (a plain number means MiB) [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// Most memory the VM may grow to while it runs (`tern resize --memory`): a virtio-mem
    /// device of the difference, a multiple of 128M; the guest's kernel needs its virtio_mem
    /// driver [default: --memory, no memory hotplug].
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<MemSize>,
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
    /// [default: 20; 0: SIGTERM stops the VM at once].
    #[arg(long, value_name = "SECS")]
    shutdown_timeout: Option<u64>,
    /// Track the memory the guest and its devices write, so `tern snapshot create --diff`
    /// can write only what changed since the previous snapshot.
    #[arg(long)]
    track_dirty_pages: bool,
    /// Back guest memory with a shared memory file, so that `tern migrate --local` can hand
    /// it to a new tern (a live upgrade) instead of copying it.
    #[arg(long)]
    memory_shared: bool,
    /// A memory balloon (virtio-balloon), sized at run time with `tern balloon --size`:
    /// [deflate_on_oom=on][,free_page_reporting=on][,stats_s=N].
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<api::balloon::BalloonConfig>,
    /// A virtio-vsock device: cid=N (the guest's CID, 3 or more),socket=PATH (the Unix socket
    /// host programs connect to with `CONNECT <port>\n`; guest connections to host port P reach
    /// PATH_P).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<api::config::VsockConfig>,
    /// System-call filters on every thread of tern, each allowing what its role needs: on (a
    /// call outside the list ends tern with a line naming the thread and call), log (the
    /// kernel logs such calls and lets them through) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: sandbox::seccomp::Mode,
    /// Landlock: once set up, tern reaches only the files its configuration names (kernel,
    /// initrd, disks and their backing files, serial and console files, a snapshot it restores),
    /// /dev/kvm, /dev/net/tun and the --allow-path directories; anything else (a snapshot
    /// written elsewhere, a disk sent through the API) is refused as outside the sandbox.
    #[arg(long)]
    landlock: bool,
    /// With --landlock: a directory tern may also use, read-write, or read-only with :ro
    /// (repeatable), e.g. where snapshots go.
    #[arg(long, value_name = "DIR[:ro]")]
    allow_path: Vec<String>,
    /// An open cgroup thread list (v1 tasks, v2 cgroup.threads) each vCPU thread writes its id
    /// to (repeatable); tern jail --vcpu-cgroup passes it.
    #[arg(long, value_name = "FD")]
    vcpu_cgroup_fd: Vec<i32>,
}

impl RunArgs {
    /// Whether any of the VM's own settings were given (a kernel, a config file, a VM flag),
    /// besides the host side (`--serial`, `--console`), which a restored or migrating VM may
    /// take here.
    fn vm_settings_given(&self) -> bool {
        let others = RunArgs {
            serial: None,
            console: None,
            ..self.clone()
        };
        others.kernel.is_some() || others.config.is_some() || others.vm_flags_given()
    }

    /// Whether the VM is to be configured through the API (no kernel, no config file).
    fn api_only(&self) -> bool {
        self.api_socket.is_some()
            && self.kernel.is_none()
            && self.firmware.is_none()
            && self.config.is_none()
    }

    /// Whether any VM setting was given on the command line.
    fn vm_flags_given(&self) -> bool {
        self.initrd.is_some()
            || self.firmware.is_some()
            || self.uefi_vars.is_some()
            || self.cmdline.is_some()
            || self.cpus.is_some()
            || self.max_cpus.is_some()
            || self.max_memory.is_some()
            || self.memory.is_some()
            || self.serial.is_some()
            || self.boot_protocol.is_some()
            || self.decompress.is_some()
            || self.on_reboot.is_some()
            || self.transport.is_some()
            || self.rng
            || self.console.is_some()
            || !self.disk.is_empty()
            || !self.net.is_empty()
            || self.shutdown_timeout.is_some()
            || self.track_dirty_pages
            || self.memory_shared
            || self.balloon.is_some()
            || self.vsock.is_some()
    }

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
        if let Some(v) = self.firmware {
            c.firmware = Some(v);
        }
        if let Some(v) = self.uefi_vars {
            c.uefi_vars = Some(v);
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
        if let Some(v) = self.max_cpus {
            c.max_cpus = Some(v);
        }
        if let Some(v) = self.memory {
            c.memory = v;
        }
        if let Some(v) = self.max_memory {
            c.max_memory = Some(v);
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
        if self.track_dirty_pages {
            c.track_dirty_pages = true;
        }
        if self.memory_shared {
            c.memory_shared = true;
        }
        if let Some(b) = self.balloon {
            c.balloon = Some(b);
        }
        if let Some(v) = self.vsock {
            c.vsock = Some(v);
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
    // Colours only for a person at a terminal: not in files, FIFOs or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let plain = tracing_subscriber::fmt::format()
        .without_time()
        .with_target(false)
        .with_ansi(ansi);
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .event_format(Line { plain })
        // The Firecracker dialect's `PUT /logger` changes the level while tern runs.
        .with_filter_reloading();
    let handle = fmt.reload_handle();
    let _ = vmm::api::firecracker::LOG_FILTER.set(Box::new(move |f: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }));
    fmt.init();
}

/// How tern writes a log line: tracing's own line (level, message, fields) unless the journal
/// reads it or a Firecracker logger asked for another shape. For the journal, the line starts
/// with its syslog priority (`<3>`…`<7>`), which the journal keeps as the line's own, and has
/// no level word (the journal adds the time); a Firecracker logger may leave the level out
/// (`show_level: false`) and name each line's source file and line (`show_log_origin`).
struct Line {
    plain: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Line
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        use tracing_subscriber::fmt::FormatFields;
        use vmm::api::firecracker::{HIDE_LEVEL, SHOW_ORIGIN};
        use vmm::systemd::{prefix, DEBUG, ERR, INFO, WARNING};
        let (origin, hide_level) = (SHOW_ORIGIN.load(Relaxed), HIDE_LEVEL.load(Relaxed));
        let journal = vmm::systemd::stderr_is_journal();
        if !journal && !origin && !hide_level {
            return self.plain.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        if journal {
            let priority = match *meta.level() {
                tracing::Level::ERROR => ERR,
                tracing::Level::WARN => WARNING,
                tracing::Level::INFO => INFO,
                _ => DEBUG,
            };
            write!(writer, "{}", prefix(priority))?;
        } else if !hide_level {
            write!(writer, "{:>5} ", meta.level())?;
        }
        if let (true, Some(file), Some(line)) = (origin, meta.file(), meta.line()) {
            write!(writer, "{file}:{line}: ")?;
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Closes the Landlock sandbox around what `config` names (or, for a VM still to be configured
/// through the API, only around /dev/kvm, /dev/net/tun and the allowed directories), the
/// snapshot being restored (and those it is a diff over), and the `--allow-path` directories. Files the serial port or
/// console will append to are made now, empty, as making files is not allowed later.
fn landlock_sandbox(
    config: Option<&VmConfig>,
    snapshot_dirs: &[std::path::PathBuf],
    allow_path: &[String],
    api_configured: bool,
) -> anyhow::Result<()> {
    use sandbox::landlock::{restrict, Allowed, Outcome};
    let mut allowed = vec![Allowed::write(vmm::confinement::KVM)];
    if api_configured {
        allowed.push(Allowed::write(vmm::confinement::TUN));
    }
    if let Some(c) = config {
        for p in [Some(&c.serial), c.console.as_ref()].into_iter().flatten() {
            if let CharBackend::File(p) = p {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?;
            }
        }
        allowed.extend(vmm::confinement::config_paths(c).map_err(|e| anyhow::anyhow!(e))?);
    }
    allowed.extend(snapshot_dirs.iter().map(Allowed::read));
    for a in allow_path {
        let (dir, write) = match a.strip_suffix(":ro") {
            Some(d) => (d, false),
            None => (a.as_str(), true),
        };
        let meta =
            std::fs::metadata(dir).map_err(|e| anyhow::anyhow!("--allow-path {dir}: {e}"))?;
        if !meta.is_dir() {
            anyhow::bail!("--allow-path {dir}: not a directory");
        }
        allowed.push(Allowed {
            path: dir.into(),
            write,
        });
    }
    match restrict(&allowed).map_err(|e| anyhow::anyhow!("{e}"))? {
        Outcome::Enforced => {}
        Outcome::Partial => tracing::warn!(
            "--landlock: this kernel's Landlock is older than tern's; some file rights are not \
             restricted"
        ),
        Outcome::Unavailable => tracing::warn!(
            "--landlock: this kernel has no Landlock (or it is off); tern runs without it"
        ),
    }
    Ok(())
}

/// Where seccomp violation lines are also appended: `TERN_SECCOMP_REPORT`, when set (the test
/// suite counts them there). Opened before any sandbox closes.
fn seccomp_report() -> anyhow::Result<Option<std::fs::File>> {
    match std::env::var_os("TERN_SECCOMP_REPORT") {
        Some(p) if !p.is_empty() => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("cannot open TERN_SECCOMP_REPORT {}: {e}", p.display())),
        _ => Ok(None),
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    if firecracker::invoked_as_firecracker() {
        init_logging(None);
        return firecracker::main_from_argv(start);
    }
    let cli = Cli::parse();
    // Building the parser of every subcommand takes about 140 KiB of heap, free once parsing
    // is done; handing its pages back now keeps them out of the VMM's peak memory.
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe { libc::malloc_trim(0) };
    init_logging(cli.log_level.as_deref());
    if !matches!(
        cli.cmd,
        Command::Run(_) | Command::Jail(_) | Command::Firecracker(_)
    ) {
        // A client whose output goes to a pipe closed early (`tern info | head -1`) ends
        // quietly, as other Unix tools do, instead of failing to print. The VMM itself keeps
        // SIGPIPE ignored: a peer closing a socket must not end it.
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.cmd {
        Command::Run(args) => run(args, start, None),
        Command::Firecracker(args) => firecracker::main(args, start),
        Command::Jail(args) => jail::main(*args),
        Command::Migrate(args) => migrate::main(*args),
        Command::Balloon(args) => balloon::main(args),
        Command::Disk(cmd) => devices::disk(cmd),
        Command::Net(cmd) => devices::net(cmd),
        Command::Resize {
            client: c,
            cpus,
            memory,
        } => {
            let body = serde_json::to_string(&api::resize::ResizeRequest { cpus, memory })
                .unwrap_or_default();
            let mut what: Vec<String> = cpus.iter().map(|n| format!("{n} vCPUs")).collect();
            what.extend(memory.map(|m| format!("{} MiB of memory", m.0 >> 20)));
            client_with(&c, "PUT", "/v1/vm/resize", Some(&body), move |_| {
                Ok(format!(
                    "asked for {} (the guest adds or removes them; tern info shows them)",
                    what.join(" and ")
                ))
            })
        }
        Command::Info(c) => client(&c, "GET", "/v1/vm", show_info),
        Command::Pause(c) => client(&c, "PUT", "/v1/vm/pause", |_| Ok("paused".into())),
        Command::Resume(c) => client(&c, "PUT", "/v1/vm/resume", |_| Ok("resumed".into())),
        Command::Shutdown { client: c, force } => {
            let path = if force {
                "/v1/vm/shutdown?force=true"
            } else {
                "/v1/vm/shutdown"
            };
            let done = if force {
                "stopping the VM"
            } else {
                "pressed the power button"
            };
            client(&c, "PUT", path, move |_| Ok(done.into()))
        }
        Command::Reboot(c) => client(
            &c,
            "PUT",
            "/v1/vm/reboot",
            |_| Ok("resetting the VM".into()),
        ),
        Command::Counters(c) => client(&c, "GET", "/v1/vm/counters", show_counters),
        Command::Snapshot(SnapshotCmd::Create {
            client: c,
            dir,
            diff,
        }) => {
            // The server resolves relative paths from its own directory: send ours.
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let body = serde_json::json!({ "dir": dir, "diff": diff }).to_string();
            let shown = format!("snapshot written to {}", dir.display());
            client_with(&c, "PUT", "/v1/vm/snapshot", Some(&body), move |_| {
                Ok(shown.clone())
            })
        }
    }
}

/// Runs one API call and prints its outcome: `show` of the answer's body (or the body itself
/// with --json) on success, the server's error message otherwise.
fn client(
    args: &ClientArgs,
    method: &str,
    path: &str,
    show: impl Fn(&str) -> Result<String, String>,
) -> ExitCode {
    client_with(args, method, path, None, show)
}

/// [`client`] with a JSON request body.
fn client_with(
    args: &ClientArgs,
    method: &str,
    path: &str,
    request: Option<&str>,
    show: impl Fn(&str) -> Result<String, String>,
) -> ExitCode {
    let (status, body) = match api::client::call(&args.api_socket, method, path, request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "tern: cannot reach the API socket {}: {e}",
                args.api_socket.display()
            );
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    if !(200..300).contains(&status) {
        let msg = api::client::error_message(&body);
        eprintln!("tern: {msg} (HTTP {status})");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    if args.json {
        println!("{}", if body.is_empty() { "{}" } else { body.trim() });
        return ExitCode::SUCCESS;
    }
    match show(&body) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "tern: {method} {path}: unexpected answer ({e}): {}",
                body.trim()
            );
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn show_info(body: &str) -> Result<String, String> {
    let v: api::VmInfo = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut s = format!("state: {}", v.state);
    if let Some(n) = v.vcpus {
        s.push_str(&format!("\nvcpus: {n}"));
        match (v.vcpus_requested, v.vcpus_max) {
            (Some(r), Some(m)) if m > n || r != n => {
                s.push_str(&format!(" (asked for {r}, at most {m})"))
            }
            _ => {}
        }
    }
    if let Some(m) = v.memory_bytes {
        s.push_str(&format!("\nmemory: {} MiB", m >> 20));
        match (v.memory_requested_bytes, v.memory_max_bytes) {
            (Some(r), Some(x)) if x > m || r != m => s.push_str(&format!(
                " (asked for {} MiB, at most {} MiB)",
                r >> 20,
                x >> 20
            )),
            _ => {}
        }
    }
    if let Some(u) = v.uptime_ms {
        s.push_str(&format!("\nuptime: {}.{:03} s", u / 1000, u % 1000));
    }
    if let Some(k) = v.config.as_ref().and_then(|c| c.kernel.as_ref()) {
        s.push_str(&format!("\nkernel: {}", k.display()));
    }
    if let Some(g) = &v.generation_id {
        s.push_str(&format!("\ngeneration id: {g}"));
    }
    if let Some(t) = v.taps.filter(|t| !t.is_empty()) {
        s.push_str(&format!("\ntaps: {}", t.join(", ")));
    }
    Ok(s)
}

/// The counters, device fields by name (any device type a newer tern reports included).
fn show_counters(body: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut lines = Vec::new();
    for c in v["vcpus"].as_array().into_iter().flatten() {
        lines.push(format!(
            "vcpu{}: pio {} mmio {} other {} cpu {:.3} s",
            c["vcpu"],
            c["pio_exits"],
            c["mmio_exits"],
            c["other_exits"],
            c["cpu_time_ns"].as_u64().unwrap_or(0) as f64 / 1e9
        ));
    }
    for d in v["devices"].as_array().into_iter().flatten() {
        let fields: Vec<String> = d
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !matches!(k.as_str(), "type" | "id" | "path" | "tap"))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let what = d["path"].as_str().or(d["tap"].as_str()).unwrap_or("");
        let name = match d["id"].as_str() {
            Some(id) => format!("{id} ({what})"),
            None => what.to_string(),
        };
        lines.push(format!(
            "{} {name}: {}",
            d["type"].as_str().unwrap_or("?"),
            fields.join(" ")
        ));
    }
    let p = &v["process"];
    if let Some(peak) = p["peak_resident_bytes"].as_u64() {
        let mib = |b: u64| b as f64 / 1048576.0;
        let now = p["resident_bytes"]
            .as_u64()
            .map_or("?".to_string(), |b| format!("{:.1}", mib(b)));
        lines.push(format!(
            "tern: resident {now} MiB (peak {:.1} MiB) cpu {:.3} s",
            mib(peak),
            p["cpu_time_ns"].as_u64().unwrap_or(0) as f64 / 1e9
        ));
    }
    Ok(lines.join("\n"))
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
            vmm::report!(NOTICE, "tern: stopped by signal {s}");
            ExitCode::SUCCESS
        }
        VmExit::UserQuit => ExitCode::SUCCESS,
        VmExit::Migrated { url, downtime_us } => {
            vmm::report!(
                NOTICE,
                "tern: the VM migrated to {url} (downtime {:.1} ms) and runs there",
                *downtime_us as f64 / 1e3
            );
            ExitCode::SUCCESS
        }
        VmExit::ApiStop => {
            vmm::report!(NOTICE, "tern: stopped through the API");
            ExitCode::SUCCESS
        }
        VmExit::ShutdownTimeout(secs) => {
            vmm::report!(
                WARNING,
                "tern: the guest did not power off within {secs} s of the power button; stopped it"
            );
            ExitCode::SUCCESS
        }
        VmExit::GuestPanic => {
            vmm::report!(ERR, "tern: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::TripleFault { vcpu, regs } => {
            vmm::report!(ERR, "tern: guest triple fault on vCPU {vcpu}: {regs}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::InternalError {
            vcpu,
            suberror,
            regs,
        } => {
            vmm::report!(
                ERR,
                "tern: KVM internal error (suberror {suberror}) on vCPU {vcpu}: {regs}"
            );
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::Error(e) => {
            vmm::report!(ERR, "tern: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

/// `--machine-name`: a name systemd-machined takes.
fn machine_name(s: &str) -> Result<String, String> {
    if vmm::machined::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(vmm::machined::NAME_RULE.into())
    }
}

/// `tern run`: builds and runs the VM (or waits for one through the API), confined as the
/// flags say. `fc` serves Firecracker's API too, and may bring the VM's configuration (a
/// Firecracker `--config-file`).
pub(crate) fn run(args: Box<RunArgs>, start: Instant, fc: Option<firecracker::Mode>) -> ExitCode {
    // SIGINT/SIGTERM belong to the VMM's signalfd; blocked before any thread starts (or
    // the API socket appears), so a signal never finds them at their default action.
    if let Err(e) = vmm::signals::block_stop_signals_in_this_thread() {
        vmm::report!(ERR, "tern: cannot block SIGINT/SIGTERM: {e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    // systemd's notification socket is connected before any thread starts or sandbox
    // closes.
    if let Err(e) = vmm::systemd::init() {
        vmm::report!(ERR, "tern: {e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    // machined files the VM under tern's process, before any sandbox closes.
    if let Some(name) = &args.machine_name {
        match vmm::machined::register(name) {
            Ok(path) => tracing::info!("registered with systemd-machined as {name} ({path})"),
            Err(e) => vmm::report!(
                WARNING,
                "tern: the VM is not registered with systemd-machined: {e}"
            ),
        }
    }
    let (seccomp, landlock, allow_path, api_socket) = (
        args.seccomp,
        args.landlock,
        args.allow_path.clone(),
        args.api_socket.clone(),
    );
    if !landlock && !allow_path.is_empty() {
        vmm::report!(ERR, "tern: --allow-path goes with --landlock");
        return ExitCode::from(EXIT_USAGE);
    }
    // What a migrating VM may use here, it may reach under Landlock too.
    let mut allow_path = allow_path;
    allow_path.extend(
        args.accept_dir
            .iter()
            .map(|d| d.to_string_lossy().into_owned()),
    );
    let report = match seccomp_report() {
        Ok(r) => r,
        Err(e) => {
            vmm::report!(ERR, "tern: {e}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    if let Err(e) = vmm::vcpu_cgroups::set(&args.vcpu_cgroup_fd) {
        vmm::report!(ERR, "tern: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let incoming = match &args.incoming {
        Some(url) => {
            if args.vm_settings_given() {
                vmm::report!(
                    ERR,
                    "tern: --incoming takes the VM's settings from its source; only \
                     --serial, --console, --disk-remap, --tap-remap, --vsock-socket, \
                     --accept-dir, --accept-tap and --api-socket may be given with it"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            let opts = match restore_options(std::path::Path::new(""), &args) {
                Ok(o) => api::migrate::ReceiveOptions {
                    url: url.clone(),
                    disk_remap: o.disk_remap,
                    tap_remap: o.tap_remap,
                    serial: o.serial,
                    console: o.console,
                    vsock_socket: o.vsock_socket,
                    accept_dirs: args.accept_dir.clone(),
                    accept_taps: args.accept_tap.clone(),
                },
                Err(e) => {
                    vmm::report!(ERR, "tern: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            // Listening starts before the sandbox closes.
            match vmm::migration::Listener::bind(url) {
                Ok(listener) => Some(vmm::migration::receive::Incoming { listener, opts }),
                Err(e) => {
                    vmm::report!(ERR, "tern: {e}");
                    return ExitCode::from(EXIT_VMM_ERROR);
                }
            }
        }
        None => {
            if !args.accept_dir.is_empty() || !args.accept_tap.is_empty() {
                vmm::report!(
                    ERR,
                    "tern: --accept-dir and --accept-tap go with --incoming URL"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            None
        }
    };
    let restore = match &args.restore {
        Some(dir) => {
            // Where the serial port and console write, and which disks and TAPs it
            // uses, are the host's business; the rest of the VM comes from the
            // snapshot.
            if args.vm_settings_given() {
                vmm::report!(
                    ERR,
                    "tern: --restore takes the VM's settings from the snapshot; only \
                     --serial, --console, --disk-remap, --tap-remap, --vsock-socket, \
                     --restore-mode and --paused may be given with it"
                );
                return ExitCode::from(EXIT_VMM_ERROR);
            }
            match restore_options(dir, &args).and_then(|o| vmm::snapshot::open(&o)) {
                Ok(r) => Some(r),
                Err(e) => {
                    vmm::report!(ERR, "tern: {e}");
                    return ExitCode::from(EXIT_VMM_ERROR);
                }
            }
        }
        None => {
            if args.paused
                || args.restore_mode.is_some()
                || (incoming.is_none()
                    && (!args.disk_remap.is_empty()
                        || !args.tap_remap.is_empty()
                        || args.vsock_socket.is_some()))
            {
                vmm::report!(
                    ERR,
                    "tern: --paused, --restore-mode, --disk-remap, --tap-remap and \
                     --vsock-socket go with --restore DIR (or --incoming)"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            None
        }
    };
    let fc_config = fc.as_ref().and_then(|f| f.config.as_ref());
    let config = if let Some(r) = &restore {
        Some(r.snapshot.config.clone())
    } else if incoming.is_some() {
        None
    } else if let Some(c) = fc_config {
        match c.vm_config() {
            Ok(c) => Some(c),
            Err(e) => {
                vmm::report!(ERR, "tern: the Firecracker configuration: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        }
    } else if args.api_only() {
        if args.vm_flags_given() {
            vmm::report!(
                ERR,
                "tern: VM settings on the command line need --kernel (or --config); with \
                 --api-socket alone, send the whole configuration with PUT /v1/vm"
            );
            return ExitCode::from(EXIT_VMM_ERROR);
        }
        None
    } else {
        match args.into_config() {
            Ok(c) => Some(c),
            Err(e) => {
                vmm::report!(ERR, "tern: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        }
    };
    // The API socket is made before the sandbox closes (making files is not allowed
    // after), and served after it (every thread starts confined).
    let socket = match &api_socket {
        Some(p) => match vmm::api::ApiServer::bind(p) {
            Ok(s) => Some(s),
            Err(e) => {
                vmm::report!(ERR, "tern: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        },
        None => None,
    };
    if landlock {
        let dirs = match restore.as_ref().map(|r| r.snapshot.chain_dirs(&r.dir)) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                vmm::report!(ERR, "tern: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
            None => Vec::new(),
        };
        if let Err(e) = landlock_sandbox(
            config.as_ref(),
            &dirs,
            &allow_path,
            (api_socket.is_some() || incoming.is_some()) && config.is_none(),
        ) {
            vmm::report!(ERR, "tern: {e}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    }
    if let Err(e) = sandbox::seccomp::install(seccomp, report) {
        vmm::report!(ERR, "tern: seccomp: {e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    let instance = fc.map(|f| vmm::api::firecracker::Instance {
        id: f.id,
        started: f.config.is_some(),
        config: f.config.unwrap_or_default(),
        metrics: f.metrics,
    });
    let api = match socket.map(|s| vmm::api::ApiServer::serve_with(s, instance)) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            vmm::report!(ERR, "tern: {e}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
        None => None,
    };
    match vmm::run(config, api, restore, incoming, start) {
        Ok(exit) => {
            vmm::systemd::stopping(&format!("tern is stopping: {exit}"));
            exit_code(&exit)
        }
        Err(e) => {
            vmm::systemd::stopping(&format!("tern is stopping: {e}"));
            vmm::report!(ERR, "tern: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

/// The restore options `tern run --restore DIR` flags ask for.
fn restore_options(
    dir: &std::path::Path,
    args: &RunArgs,
) -> Result<api::restore::RestoreOptions, String> {
    fn pairs(flag: &str, v: &[String]) -> Result<Vec<(String, String)>, String> {
        v.iter()
            .map(|p| match p.split_once('=') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.into(), b.into())),
                _ => Err(format!("invalid {flag} '{p}': expected OLD=NEW")),
            })
            .collect()
    }
    Ok(api::restore::RestoreOptions {
        dir: dir.to_path_buf(),
        mode: match args.restore_mode.as_deref() {
            Some("eager") => api::restore::RestoreMode::Eager,
            _ => api::restore::RestoreMode::Lazy,
        },
        paused: args.paused,
        disk_remap: pairs("--disk-remap", &args.disk_remap)?
            .into_iter()
            .map(|(a, b)| (a.into(), b.into()))
            .collect(),
        tap_remap: pairs("--tap-remap", &args.tap_remap)?.into_iter().collect(),
        serial: args.serial.clone(),
        console: args.console.clone(),
        vsock_socket: args.vsock_socket.clone(),
    })
}

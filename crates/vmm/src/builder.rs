//! Building a VM from a validated [`VmConfig`]: the KVM VM, guest memory and its slots, the
//! kernel and boot tables (unless the VM is restored), the legacy platform, the virtio devices
//! on their transport, the vCPUs, and the components in their walk order.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use lifecycle::threads::{spawn, Role};

use arch::layout::*;
use arch::GuestMemoryMmap;

use crate::components::{Components, Phase};
use crate::config::{BootProtocol, Decompress, Transport, VmConfig};
use crate::control::VmControl;
use crate::device_manager::DeviceManager;
use crate::error::{kvm_err, VmmError};
use crate::memory::GuestRam;
use crate::platform::Platform;
use crate::snapshot::kvm::KvmVm;
use crate::vcpus::{BootCpu, Vcpus};
use crate::vm::Vm;

/// A KVM VM with what every tern VM has whatever its configuration: TSS and identity map
/// addresses. An API-only tern makes one while it waits, so a boot or restore request does not
/// pay for it.
///
/// The shell has no irqchip or PIT yet: [`build_on`] registers guest memory before making them.
/// On this project's hosts, making them leaves KVM a grace period of about 7.5 ms to finish,
/// which the next change of memory slots waits out, while the same registration made first
/// takes 0.05 ms (docs/benchmarks.md, "Where the start's time went"). A shell made ahead with
/// them had a restore request that came soon after tern's start wait that period out.
pub struct VmShell {
    kvm: Kvm,
    vm: Arc<VmFd>,
}

impl VmShell {
    /// Opens `/dev/kvm`, checks what tern needs and creates the VM.
    pub fn create() -> Result<VmShell, VmmError> {
        let kvm = Kvm::new().map_err(|e| {
            VmmError::Kvm(format!(
                "{e} (is the kvm module loaded, and may this user open /dev/kvm?)"
            ))
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::UserMemory, "user memory"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Pit2, "PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::Kvm(format!("KVM lacks {name} support")));
            }
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set identity map address"))?;
        Ok(VmShell { kvm, vm })
    }
}

/// The in-kernel PIT. Port 0x61 stays with tern ([`crate::platform`]), which reads timer 2's
/// output from KVM's PIT state: a guest polling it then leaves to user space on every read, as
/// under QEMU (in the nested rig, a guest spinning on an in-kernel port 0x61 with interrupts
/// off froze the emulated L1).
fn create_pit(vm: &VmFd) -> Result<(), VmmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))
}

/// The kernel a configuration boots.
fn kernel_path(config: &VmConfig) -> Result<&std::path::Path, VmmError> {
    Ok(config
        .kernel
        .as_deref()
        .ok_or(crate::config::ConfigError::Missing(
            "kernel (--kernel PATH)",
        ))?)
}

/// The kernel to boot: a regular file is opened, not read (the loader reads what it needs, an
/// ELF's segments straight into guest memory); anything else (a pipe such as `--kernel
/// <(zcat vmlinux.gz)`, a character device) is read whole, as it cannot be read at offsets.
enum Kernel {
    File(File),
    Bytes(Vec<u8>),
}

impl Kernel {
    fn open(path: &std::path::Path) -> Result<Kernel, VmmError> {
        let file_err = |err| VmmError::File {
            what: "kernel",
            path: path.display().to_string(),
            err,
        };
        let meta = std::fs::metadata(path).map_err(file_err)?;
        if meta.is_file() {
            File::open(path).map(Kernel::File).map_err(file_err)
        } else {
            // A directory fails here with "Is a directory", as it always did.
            std::fs::read(path).map(Kernel::Bytes).map_err(file_err)
        }
    }

    fn image(&mut self) -> arch::boot::KernelImage<'_> {
        match self {
            Kernel::File(f) => arch::boot::KernelImage::File(f),
            Kernel::Bytes(b) => arch::boot::KernelImage::Bytes(b),
        }
    }
}

/// Writes the ACPI tables, the kernel, initrd, command line, boot structures and MP table
/// into guest memory.
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    acpi_platform: &arch::acpi::AcpiPlatform,
    mut kernel: Kernel,
    mut initrd: Option<(File, u64)>,
    linux: bool,
) -> Result<arch::boot::BootInfo, VmmError> {
    let mem_size = config.memory.0;
    let kernel_path = kernel_path(config)?;
    let protocol = match config.boot_protocol {
        BootProtocol::Auto => arch::boot::BootProtocol::Auto,
        BootProtocol::Pvh => arch::boot::BootProtocol::Pvh,
        BootProtocol::Linux => arch::boot::BootProtocol::Linux,
    };
    let bzimage_entry = match config.decompress {
        Decompress::Host => arch::boot::BzImageEntry::Host,
        Decompress::Guest => arch::boot::BzImageEntry::Guest,
    };
    let rsdp =
        arch::acpi::setup_acpi(mem, acpi_platform).map_err(|e| VmmError::Setup(e.to_string()))?;
    crate::vmgenid::write_new(mem).map_err(VmmError::Setup)?;
    let boot = arch::boot::load_kernel(
        mem,
        arch::boot::KernelSpec {
            kernel: kernel.image(),
            initrd: initrd.as_mut().map(|(f, l)| (f, *l)),
            cmdline: &config.effective_cmdline(),
            mem_size,
            protocol,
            bzimage_entry,
            rsdp: Some(rsdp),
        },
    )
    .map_err(|err| VmmError::Boot {
        path: kernel_path.display().to_string(),
        err,
    })?;
    drop(kernel);
    if linux {
        if let Some(why) = crate::host::emulation_backed_kvm() {
            crate::report!(
                    crate::systemd::WARNING,
                    "tern: warning: /dev/kvm on this host is emulation-backed ({why}): guest kernel-mode code is emulated instruction by instruction, so a stock Linux kernel will not boot in reasonable time here; use a host with VT-x/AMD-V (or tern's nested test rig, see README)"
                );
        }
    }
    tracing::info!("kernel loaded: {}; entry {:#x}", boot.how, boot.entry);
    arch::mptable::setup_mptable(mem, config.cpus).map_err(|e| VmmError::Setup(e.to_string()))?;

    Ok(boot)
}

/// Where a VM's memory and state come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A fresh boot: the kernel is loaded.
    Boot,
    /// A snapshot, restored afterwards.
    Snapshot,
    /// A migration: memory and state arrive afterwards, and the disks are locked only at the
    /// switch-over (the source holds them until then).
    Migration,
}

/// Builds the VM `config` describes. For a restore or a migration (`origin`), guest memory and
/// vCPU state come afterwards, so the kernel, initrd and boot tables are not loaded (the files
/// need not exist any more). `shell` is a KVM VM made ahead, if any.
pub fn build(
    config: &VmConfig,
    start: Instant,
    origin: Origin,
    shell: Option<VmShell>,
) -> Result<Vm, VmmError> {
    build_on(config, start, origin, shell, None)
}

/// [`build`], on the shared guest memory `memory` a local migration handed over (when given).
pub fn build_on(
    config: &VmConfig,
    start: Instant,
    origin: Origin,
    shell: Option<VmShell>,
    memory: Option<File>,
) -> Result<Vm, VmmError> {
    let restoring = origin != Origin::Boot;
    let firmware = crate::firmware::read(config)?;
    let mut kernel = if restoring || firmware.is_some() {
        None
    } else {
        let kernel_path = kernel_path(config)?;
        Some(Kernel::open(kernel_path)?)
    };
    let initrd = match &config.initrd {
        Some(_) if restoring => None,
        Some(p) => {
            let file_err = |err| VmmError::File {
                what: "initrd",
                path: p.display().to_string(),
                err,
            };
            let f = File::open(p).map_err(file_err)?;
            let len = f.metadata().map_err(file_err)?.len();
            Some((f, len))
        }
        None => None,
    };
    let linux = kernel.as_mut().is_some_and(|k| k.image().is_linux());
    let shell = match shell {
        Some(s) => s,
        None => VmShell::create()?,
    };
    let VmShell { kvm, vm } = shell;
    let rom = firmware
        .as_ref()
        .map(|f| crate::firmware::map_rom(&vm, f))
        .transpose()?;
    let max_vcpus = kvm.get_max_vcpus();
    if config.cpus as usize > max_vcpus {
        return Err(VmmError::Kvm(format!(
            "{} vCPUs requested but this host's KVM allows at most {max_vcpus}",
            config.cpus
        )));
    }
    let (mem, backing) = if config.memory_shared || memory.is_some() {
        let (m, f) = crate::memory::allocate_shared(&crate::memory::layout(config), memory)?;
        (m, Some(f))
    } else {
        (
            crate::memory::allocate(&crate::memory::layout(config))?,
            None,
        )
    };
    // Guest memory is registered (0.45 ms per GiB here), then the irqchip and PIT are made
    // (see `VmShell`; the PIT also starts a kernel thread), on a thread of their own while
    // this one opens the devices. The devices wait for the irqchip only when they attach
    // their interrupts; the thread is joined before the VM can run.
    let slots = crate::memory::slots(&mem, config.track_dirty_pages);
    let vm_for_slots = vm.clone();
    let (irqchip_made, irqchip) = std::sync::mpsc::sync_channel::<()>(1);
    let register_memory = spawn(
        Role::Vmm,
        "tern-memslots",
        move || -> Result<(), VmmError> {
            // SAFETY: each slot is a live mapping owned by `mem`, which `build` keeps until this
            // thread is joined, and which the returned `Vm` then keeps for as long as the VM fd
            // exists.
            unsafe { crate::memory::register(&vm_for_slots, slots) }?;
            vm_for_slots
                .create_irq_chip()
                .map_err(kvm_err("create in-kernel irqchip"))?;
            // The devices may attach their interrupts from here on (a build that failed early
            // no longer listens).
            let _ = irqchip_made.send(());
            create_pit(&vm_for_slots)
        },
    )
    .map_err(|e| VmmError::Setup(format!("cannot start a thread: {e}")))?;
    // `mem` (and so the mapping) stays alive here until the thread is joined, whether or not
    // the rest of the build succeeds; clones share the same mapping.
    let parts = Parts {
        kvm,
        vm,
        mem: mem.clone(),
        backing,
        kernel,
        initrd,
        linux,
        firmware: firmware.map(|f| (f, !restoring)),
        rom,
        irqchip,
    };
    let result = build_rest(config, start, parts, origin != Origin::Migration);
    let registered = register_memory
        .join()
        .unwrap_or_else(|_| Err(VmmError::Setup("guest memory registration panicked".into())));
    drop(mem);
    // A failed registration or irqchip is the cause when both failed (the build then only
    // saw the irqchip missing).
    registered?;
    let vm = result?;
    if config.track_dirty_pages {
        vm.ram.start_dirty_log(true)?;
    }
    Ok(vm)
}

/// What [`build`] hands on to [`build_rest`].
struct Parts {
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    backing: Option<File>,
    kernel: Option<Kernel>,
    initrd: Option<(File, u64)>,
    linux: bool,
    /// The firmware image, and whether this is a fresh boot (its top is then copied below 1
    /// MiB).
    firmware: Option<(crate::firmware::FirmwareImage, bool)>,
    rom: Option<crate::firmware::FirmwareRom>,
    /// Says when the in-kernel irqchip exists (closed if it could not be made).
    irqchip: std::sync::mpsc::Receiver<()>,
}

fn build_rest(
    config: &VmConfig,
    start: Instant,
    p: Parts,
    lock_disks: bool,
) -> Result<Vm, VmmError> {
    let Parts {
        kvm,
        vm,
        mem,
        backing,
        kernel,
        initrd,
        linux,
        firmware,
        rom,
        irqchip,
    } = p;
    // Private memory gets huge pages under the kernel a boot loads (see
    // `memory::advise_loaded`).
    let private = backing.is_none();
    // Guest memory as its owner keeps it, and as the devices share it.
    let ram = Arc::new(GuestRam::new(mem.clone(), vm.clone(), backing));
    let virtio = crate::virtio_devices::create(config, lock_disks, &ram)?;
    let ctl = Arc::new(VmControl::new()?);
    let mut dm = DeviceManager::default();
    irqchip
        .recv()
        .map_err(|_| VmmError::Setup("the in-kernel irqchip was not made".into()))?;
    let Platform {
        serial,
        power_button,
        vmgenid_evt,
        panic_seen,
    } = Platform::create(config, &vm, &ctl, start, &mut dm)?;
    let cpu_hotplug = crate::cpu_hotplug::attach(config, &vm, &ctl, &mut dm)?;
    let ids: Vec<(String, String)> = crate::virtio_devices::device_ids(config)
        .into_iter()
        .zip(crate::virtio_devices::device_names(config))
        .collect();
    let mut pci_bus = None;
    let mut pci_hotplug = None;
    let mut pci = None;
    match config.transport {
        Transport::Mmio => {
            crate::virtio_devices::attach_mmio(&vm, ram.shared(), &mut dm, virtio.devices, &ids)?
        }
        Transport::Pci => {
            let routing = Arc::new(crate::interrupts::GsiRouting::new(vm.clone()));
            pci_bus = Some(crate::virtio_pci::attach_pci(
                &vm,
                ram.shared(),
                &routing,
                &mut dm,
                virtio.devices,
                &ids,
                &config.pci_slots,
                crate::virtio_pci::PciLayout {
                    mmio32: arch::layout::pci_mmio32(config.firmware.is_some()),
                    mmio64: crate::firmware::is_uefi(config)
                        .then(|| arch::layout::uefi_pci_mmio64(crate::host::phys_bits())),
                    pc_identity: crate::firmware::is_uefi(config)
                        .then(|| crate::firmware::pm1_base(config) as u16),
                },
            )?);
            pci_hotplug = Some(crate::pci_hotplug::attach(&vm, &mut dm)?);
            pci = Some(arch::acpi::PciAcpi {
                ecam_base: PCI_ECAM_START,
                last_bus: (PCI_ECAM_BUSES - 1) as u8,
            });
        }
    }

    let acpi = arch::acpi::AcpiPlatform {
        num_cpus: config.cpus as u8,
        max_cpus: config.effective_max_cpus() as u8,
        pci,
        devices: dm.dsdt(),
        legacy_pm: firmware
            .is_some()
            .then(|| crate::firmware::pm1_base(config)),
    };
    // A firmware reads the tables and the memory map through fw_cfg, and starts the vCPUs
    // from their reset state.
    if let Some((mut image, fresh)) = firmware {
        let slots = pci_bus.as_ref().map(|b| b.slots()).unwrap_or_default();
        crate::firmware::attach(config, &mem, &acpi, &slots, &mut dm)?;
        crate::firmware::attach_flash(&vm, &mut image, &mut dm)?;
        if fresh {
            // OVMF runs from its flash; SeaBIOS also from a copy below 1 MiB.
            if !crate::firmware::is_uefi(config) {
                crate::firmware::copy_legacy_alias(&mem, &image)?;
            }
            tracing::info!("firmware {} mapped", image.path.display());
            if let Some(why) = crate::host::emulation_backed_kvm() {
                crate::report!(
                    crate::systemd::WARNING,
                    "tern: warning: /dev/kvm on this host is emulation-backed ({why}): guest kernel-mode code (firmware, bootloader and OS kernel) is emulated instruction by instruction, so an operating system will not boot in reasonable time here; use a host with VT-x/AMD-V (or tern's nested test rig, see README)"
                );
            }
        }
    }
    // A restored VM gets its memory (ACPI tables included) and registers from the snapshot.
    let boot = match kernel {
        Some(k) => Some(load_guest(config, &mem, &acpi, k, initrd, linux)?),
        None => None,
    };
    if let (Some(boot), true) = (&boot, private) {
        let loaded: Vec<(u64, u64)> =
            std::iter::once((boot.kernel.0, boot.kernel.1.saturating_sub(boot.kernel.0)))
                .chain(boot.initrd)
                .collect();
        crate::memory::advise_loaded(&mem, &loaded);
    }
    let (pio, mmio) = dm.buses();
    let vcpus = Vcpus::create(
        &kvm,
        &vm,
        config.cpus as u8,
        config.effective_max_cpus() as u8,
        boot.as_ref().map(|boot| BootCpu { mem: &mem, boot }),
        (&pio, &mmio),
        &ctl,
    )?;

    // The walk order: the KVM VM's irqchip before the vCPUs' LAPICs, the vCPUs before the
    // devices (see `components`), and the devices in the order they were described.
    let mut components = Components::default();
    components.register(
        "kvm-vm",
        "the KVM VM (irqchip, PIT, clock)",
        Phase::Platform,
        Arc::new(Mutex::new(KvmVm(vm.clone()))),
    );
    vcpus.register(&mut components);
    dm.register(&mut components);

    Ok(Vm {
        ram,
        balloon: virtio.balloon,
        mem_hotplug: virtio.mem,
        cpu_hotplug,
        ctl,
        vcpus,
        components: Arc::new(components),
        devices: dm,
        devs: Mutex::new(virtio.set),
        migration: Mutex::new(None),
        migration_status: Arc::default(),
        serial,
        power_button,
        vmgenid_evt,
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
        panic_seen,
        console_input: virtio.console_input,
        console_output: virtio.console_output,
        pci: pci_bus,
        pci_hotplug,
        started: Instant::now(),
        last_snapshot: Mutex::new(None),
        firmware_rom: rom,
    })
}

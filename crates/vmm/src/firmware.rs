//! Firmware boots (`--firmware`): the firmware image mapped read-only below 4 GiB (and its top
//! copied below 1 MiB), the fw_cfg device that tells the firmware the memory map, the ACPI
//! tables, the vCPU count and the boot order, and the debug port where SeaBIOS logs — which is
//! how tern notices "No bootable device." and stops with one line instead of a guest that
//! retries for ever.
//!
//! UEFI (`--firmware uefi`) is OVMF as a PC runs it: its code read-only below 4 GiB, its
//! variable store right below the code in a flash ([`devices::flash`]) backed by the VM's
//! variable file (`--uefi-vars`) or a private copy of OVMF's template, and the PC chipset
//! identity OVMF recognises (an i440FX host bridge and the PIIX4's power-management block at
//! [`arch::layout::UEFI_ACPI_PM1_BASE`]).
//!
//! The vCPUs start in their reset state (real mode at 0xffff_fff0); tern loads no kernel and
//! writes no boot tables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::firmware::Firmware;
use devices::flash::{FlashMemory, Pflash};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use arch::GuestMemoryMmap;
use devices::fw_cfg::{FwCfg, FwCfgItems, FW_CFG_PORT, FW_CFG_PORT_LEN};
use devices::legacy::{FirmwareLog, FIRMWARE_LOG_PORT};

use crate::config::VmConfig;
use crate::control::{VmControl, VmExit};
use crate::device_manager::DeviceManager;
use crate::error::{kvm_err, setup, VmmError};

/// KVM memory slot of the firmware image (RAM takes slots from 0, one per region).
const ROM_SLOT: u32 = 100;
/// KVM memory slot of the UEFI variable flash, while the guest may read it directly.
const FLASH_SLOT: u32 = 101;
/// What a firmware prints on its console (COM1) when it has tried every boot device: SeaBIOS,
/// OVMF's boot manager, and OVMF's built-in shell, which it starts when no disk booted.
pub const NO_BOOT_DEVICE: &[&str] = &[
    "No bootable device",
    "No bootable option or device was found",
    "UEFI Interactive Shell",
];

/// Whether `config` boots through UEFI.
pub fn is_uefi(config: &VmConfig) -> bool {
    config.firmware == Some(Firmware::Uefi)
}

/// Where a firmware VM's ACPI PM1 blocks and PM timer are.
pub fn pm1_base(config: &VmConfig) -> u64 {
    if is_uefi(config) {
        arch::layout::UEFI_ACPI_PM1_BASE
    } else {
        arch::layout::ACPI_PM1_BASE
    }
}

/// Ends the VM with one line when the firmware says it found nothing to boot, instead of
/// letting it retry for ever.
pub fn no_boot_device(ctl: &Arc<VmControl>) -> Box<dyn FnMut() + Send> {
    let c = ctl.clone();
    Box::new(move || {
        c.request_exit(VmExit::Error(
            "the firmware found no bootable device: no disk of this VM has a bootloader it can start"
                .into(),
        ))
    })
}

/// A firmware image as read and checked, and where it came from.
pub struct FirmwareImage {
    /// The file.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// UEFI: the variable store, until [`attach_flash`] hands it to the flash device.
    pub vars: Option<FlashMemory>,
}

/// Reads and checks the image of `config`'s firmware, if it has one.
pub fn read(config: &VmConfig) -> Result<Option<FirmwareImage>, VmmError> {
    let Some(fw) = &config.firmware else {
        return Ok(None);
    };
    let path = fw.image().map_err(VmmError::Setup)?;
    let bytes = std::fs::read(&path).map_err(|err| VmmError::File {
        what: "firmware",
        path: path.display().to_string(),
        err,
    })?;
    arch::firmware::check_image(&bytes)
        .map_err(|e| VmmError::Setup(format!("firmware {}: {e}", path.display())))?;
    let vars = match fw {
        Firmware::Uefi => Some(read_vars(config, bytes.len() as u64)?),
        _ => None,
    };
    Ok(Some(FirmwareImage { path, bytes, vars }))
}

/// The UEFI variable store: the VM's variable file (made from OVMF's template if missing), or
/// a private copy of the template.
fn read_vars(config: &VmConfig, code_len: u64) -> Result<FlashMemory, VmmError> {
    let (_, template_path) = api::firmware::uefi_files().map_err(VmmError::Setup)?;
    let template = std::fs::read(&template_path).map_err(|err| VmmError::File {
        what: "UEFI variable template",
        path: template_path.display().to_string(),
        err,
    })?;
    arch::firmware::vars_base(code_len, template.len() as u64).map_err(|e| {
        setup(format!(
            "UEFI variable template {}: {e}",
            template_path.display()
        ))
    })?;
    let Some(path) = &config.uefi_vars else {
        return process_vars(&template)
            .and_then(FlashMemory::shared)
            .map_err(|e| setup(format!("cannot map the UEFI variables: {e}")));
    };
    let file_err = |err| VmmError::File {
        what: "UEFI variable file",
        path: path.display().to_string(),
        err,
    };
    create_vars_file(path, &template).map_err(file_err)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(file_err)?;
    let len = file.metadata().map_err(file_err)?.len();
    if len != template.len() as u64 {
        return Err(setup(format!(
            "UEFI variable file {}: {len} bytes, but OVMF's variable store ({}) is {} bytes",
            path.display(),
            template_path.display(),
            template.len()
        )));
    }
    FlashMemory::shared(file).map_err(file_err)
}

/// Without a variable file, the variables live as long as this tern process: a guest reset
/// that rebuilds the VM (`--on-reboot restart`) finds them as they were, as a PC's flash keeps
/// its contents across resets. OVMF relies on that: on its first boot with a fresh store it
/// records its memory settings and resets once. An anonymous file (memfd), made from the
/// template the first time.
fn process_vars(template: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    static VARS: Mutex<Option<std::fs::File>> = Mutex::new(None);
    let mut vars = VARS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = vars
        .as_ref()
        .filter(|f| f.metadata().is_ok_and(|m| m.len() == template.len() as u64))
    {
        return f.try_clone();
    }
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"tern-uefi-vars".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(template)?;
    *vars = Some(f.try_clone()?);
    Ok(f)
}

/// Makes `path` a copy of `template` (mode 0600) unless it exists: written beside it under
/// another name, then linked into place, so that a VM never sees a half-written file and an
/// existing file is never replaced. An existing empty file (what `tern jail` makes for a file
/// the VM creates, or `touch`) is filled in place.
fn create_vars_file(path: &std::path::Path, template: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => {
            let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.write_all(template)?;
            return f.sync_all();
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tern-new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(template)?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Maps the UEFI variable store of `image` below its code, for the guest to read directly,
/// and puts the flash device that takes its writes on the MMIO bus (as device `uefi-vars`,
/// whose saved state holds the variables).
pub fn attach_flash(
    vm: &Arc<VmFd>,
    image: &mut FirmwareImage,
    dm: &mut DeviceManager,
) -> Result<(), VmmError> {
    let Some(vars) = image.vars.take() else {
        return Ok(());
    };
    let len = vars.len() as u64;
    let base = arch::firmware::vars_base(image.bytes.len() as u64, len)
        .map_err(|e| setup(format!("UEFI variables: {e}")))?;
    let region = kvm_userspace_memory_region {
        slot: FLASH_SLOT,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: base,
        memory_size: len,
        userspace_addr: vars.host_address(),
    };
    // SAFETY: the mapping lives in the flash device, which the VM keeps as long as its fd.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("map the UEFI variables"))?;
    let v = vm.clone();
    let set_direct = Box::new(move |direct: bool| {
        let r = kvm_userspace_memory_region {
            memory_size: if direct { len } else { 0 },
            ..region
        };
        // SAFETY: as above; a size of 0 removes the slot.
        if let Err(e) = unsafe { v.set_user_memory_region(r) } {
            tracing::error!("cannot switch the UEFI variable flash (direct reads {direct}): {e}");
        }
    });
    let flash = Arc::new(Mutex::new(Pflash::new(vars, set_direct)));
    dm.add_mmio("uefi-vars", flash.clone(), base, len)?;
    dm.describe("uefi-vars", "the UEFI variable flash")
        .component = Some(flash);
    Ok(())
}

/// The firmware image mapped into the guest, read-only: kept as long as the VM.
pub struct FirmwareRom {
    mem: FlashMemory,
}

// SAFETY: nothing uses the mapping through a shared reference (only the guest reads it, and
// the drop of the last owner unmaps it).
unsafe impl Sync for FirmwareRom {}

/// Maps `image` so that it ends at 4 GiB, as a read-only KVM slot (guest writes to it exit and
/// are dropped, as a ROM's are).
pub fn map_rom(vm: &VmFd, image: &FirmwareImage) -> Result<FirmwareRom, VmmError> {
    let len = image.bytes.len();
    let mem = FlashMemory::copy_of(&image.bytes)
        .map_err(|e| setup(format!("cannot map the firmware ({len} bytes): {e}")))?;
    // SAFETY: the mapping `mem` owns, `len` bytes; dropping write access changes no contents.
    unsafe {
        libc::mprotect(
            mem.host_address() as *mut libc::c_void,
            len,
            libc::PROT_READ,
        )
    };
    let rom = FirmwareRom { mem };
    let region = kvm_userspace_memory_region {
        slot: ROM_SLOT,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: arch::firmware::rom_base(len as u64),
        memory_size: len as u64,
        userspace_addr: rom.mem.host_address(),
    };
    // SAFETY: the mapping lives in `rom`, which the VM keeps for as long as the VM fd.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("map the firmware"))?;
    Ok(rom)
}

/// Copies the top of the image below 1 MiB, where the firmware's real-mode code runs.
pub fn copy_legacy_alias(mem: &GuestMemoryMmap, image: &FirmwareImage) -> Result<(), VmmError> {
    let (at, bytes) = arch::firmware::legacy_alias(&image.bytes);
    mem.write_slice(bytes, GuestAddress(at))
        .map_err(|e| setup(format!("cannot copy the firmware below 1 MiB: {e}")))
}

/// The boot order SeaBIOS reads (`bootorder`): the disks in the order the configuration gives
/// them, by the PCI slot each has (`slots`: device id → slot), then `HALT`: nothing else (no
/// floppy, no option ROM) is tried.
pub fn bootorder(config: &VmConfig, slots: &BTreeMap<String, u8>) -> Vec<u8> {
    let mut out = String::new();
    for id in config.disk_ids() {
        if let Some(slot) = slots.get(&id) {
            out.push_str(&format!("/pci@i0cf8/scsi@{slot:x}/disk@0,0\n"));
        }
    }
    out.push_str("HALT\n");
    out.into_bytes()
}

/// Adds the fw_cfg device and the firmware's debug port to `dm`. `acpi` is what the tables
/// describe; `slots` the PCI slot of each device (empty with virtio-mmio).
pub fn attach(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    acpi: &arch::acpi::AcpiPlatform,
    slots: &BTreeMap<String, u8>,
    dm: &mut DeviceManager,
) -> Result<(), VmmError> {
    let cpus = config.cpus as u16;
    let mut items = FwCfgItems::new(cpus, config.effective_max_cpus() as u16);
    let tables = arch::acpi_loader::firmware_acpi(acpi).map_err(|e| setup(e.to_string()))?;
    let mut files = vec![
        (
            arch::firmware::E820_FILE,
            arch::firmware::e820_file(config.memory.0),
        ),
        (arch::acpi_loader::TABLES_FILE, tables.tables),
        (arch::acpi_loader::RSDP_FILE, tables.rsdp),
        (arch::acpi_loader::LOADER_FILE, tables.loader),
        ("bootorder", bootorder(config, slots)),
        // SeaBIOS would move 64-bit BARs above 4 GiB when the VM has RAM there; tern's BAR
        // window is below 4 GiB ([`arch::layout::pci_mmio32`]).
        ("opt/org.seabios/pci64", b"0".to_vec()),
        // OVMF likewise, where it honours it; Debian's OVMF ignores it and puts a 64-bit aperture
        // at the top of the address space, which UEFI VMs route
        // ([`arch::layout::uefi_pci_mmio64`]).
        ("opt/ovmf/X-PciMmio64Mb", b"0".to_vec()),
    ];
    // 64-bit BARs go above the hotpluggable memory, not into it.
    if let Some((at, len)) = arch::memory::hotplug_region(config.memory.0, config.hotplug_memory())
    {
        files.push(("etc/reserved-memory-end", (at + len).to_le_bytes().to_vec()));
    }
    for (name, data) in files {
        items
            .add_file(name, data)
            .map_err(|e| setup(e.to_string()))?;
    }
    dm.add_pio(
        "fw-cfg",
        Arc::new(Mutex::new(FwCfg::new(items, mem.clone()))),
        FW_CFG_PORT,
        FW_CFG_PORT_LEN,
    )?;
    // The firmware's own log, when tern's `firmware` log target shows it.
    let announce = tracing::enabled!(target: "firmware", tracing::Level::INFO);
    let log = FirmwareLog::new(
        announce,
        Box::new(|line: &str| tracing::info!(target: "firmware", "{line}")),
    );
    dm.add_pio(
        "firmware-log",
        Arc::new(Mutex::new(log)),
        FIRMWARE_LOG_PORT,
        1,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_order_follows_the_disks() {
        let mut c = VmConfig {
            firmware: Some(Firmware::Bios),
            ..VmConfig::default()
        };
        for p in ["/a.img", "/b.img"] {
            c.disks.push(format!("path={p}").parse().unwrap());
        }
        let ids = c.disk_ids();
        let slots: BTreeMap<String, u8> = [(ids[0].clone(), 0x1d), (ids[1].clone(), 2)].into();
        assert_eq!(
            String::from_utf8(bootorder(&c, &slots)).unwrap(),
            "/pci@i0cf8/scsi@1d/disk@0,0\n/pci@i0cf8/scsi@2/disk@0,0\nHALT\n"
        );
    }
}

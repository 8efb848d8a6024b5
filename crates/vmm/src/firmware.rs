//! Firmware boots (`--firmware`): the firmware image mapped read-only below 4 GiB (and its top
//! copied below 1 MiB), the fw_cfg device that tells the firmware the memory map, the ACPI
//! tables, the vCPU count and the boot order, and the debug port where SeaBIOS logs — which is
//! how tern notices "No bootable device." and stops with one line instead of a guest that
//! retries for ever.
//!
//! The vCPUs start in their reset state (real mode at 0xffff_fff0); tern loads no kernel and
//! writes no boot tables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
/// What SeaBIOS prints on its console (COM1) when it has tried every boot device.
pub const NO_BOOT_DEVICE: &str = "No bootable device";

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
    Ok(Some(FirmwareImage { path, bytes }))
}

/// The firmware image mapped into the guest, read-only: kept as long as the VM.
pub struct FirmwareRom {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only unmapped on drop; nothing else touches the pointer.
unsafe impl Send for FirmwareRom {}
// SAFETY: as above: shared references never use the pointer.
unsafe impl Sync for FirmwareRom {}

impl Drop for FirmwareRom {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping `map_rom` made and nothing else unmaps it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Maps `image` so that it ends at 4 GiB, as a read-only KVM slot (guest writes to it exit and
/// are dropped, as a ROM's are).
pub fn map_rom(vm: &VmFd, image: &FirmwareImage) -> Result<FirmwareRom, VmmError> {
    let len = image.bytes.len();
    // SAFETY: a fresh private anonymous mapping; the result is checked.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(setup(format!(
            "cannot map the firmware ({len} bytes): {}",
            std::io::Error::last_os_error()
        )));
    }
    let rom = FirmwareRom { addr, len };
    // SAFETY: the mapping is `len` bytes long and writable; the image is `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(image.bytes.as_ptr(), addr.cast::<u8>(), len) };
    // SAFETY: the same mapping; dropping write access changes no contents.
    unsafe { libc::mprotect(addr, len, libc::PROT_READ) };
    let region = kvm_userspace_memory_region {
        slot: ROM_SLOT,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: arch::firmware::rom_base(len as u64),
        memory_size: len as u64,
        userspace_addr: addr as u64,
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
            firmware: Some(api::firmware::Firmware::Bios),
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

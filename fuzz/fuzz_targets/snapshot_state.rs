//! `state.json` restore: the bytes, given a valid checksum when they parse as a snapshot at
//! all (so the checks past it are reached), read as `tern --restore` reads them (format 3, or
//! format 2 turned into sections), then the checks a restore makes before any KVM call: the
//! config's validation, each vCPU's CPU features, and every section put into a fresh component
//! of its kind: the UART, the RTC, the PCI root complex, and virtio transports (virtio-mmio
//! and virtio-pci, each device type).
#![no_main]
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use devices::serial::{SerialDevice, SerialOut};
use devices::EventFdTrigger;
use libfuzzer_sys::fuzz_target;
use lifecycle::Component;
use tern_fuzz::{some_device, vm_mem, NoMsi};
use virtio::transport::mmio::MmioTransport;
use virtio::transport::pci::VirtioPciDevice;
use virtio::transport::PauseDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tern_fuzz::scratch_dir("snapshot"));
    let signed = vmm::snapshot::fuzzing::sign(data);
    std::fs::write(dir.join("state.json"), signed.as_deref().unwrap_or(data)).unwrap();
    let snap = match vmm::snapshot::read(dir) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                signed.is_none() || !e.contains("checksum"),
                "a snapshot with a valid checksum was refused: {e}"
            );
            return;
        }
    };
    let _ = snap.config.validate();
    let _ = (snap.parent(), snap.state_fnv());
    let irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut serial = SerialDevice::new(irq, SerialOut::new(None, Arc::new(AtomicBool::new(false))));
    let mut virtio_sections = 0;
    for section in snap.sections() {
        match section.id.as_str() {
            "com1" => {
                let _ = serial.restore(section);
            }
            "rtc" => {
                let _ = devices::rtc::Rtc::new().restore(section);
            }
            "pci-root" => {
                let windows = devices::pci::PciWindows {
                    mmio32: 0xc000_0000..0xe000_0000,
                    mmio64: None,
                    io: None,
                };
                let root = devices::pci::PciRoot::new(&windows).unwrap();
                let _ = devices::pci::PciConfigIo::new(Arc::new(std::sync::Mutex::new(root)))
                    .restore(section);
            }
            "kvm-vm" => {
                let _ = section.parse::<vmm::snapshot::VmState>(&[1]);
            }
            id if id.starts_with("vcpu") => {
                if let Ok(v) = section.parse::<vmm::snapshot::VcpuState>(&[1]) {
                    let _ = vmm::snapshot::check_cpu_features(v.cpuid(), v.cpuid());
                }
            }
            _ if virtio_sections < 4 => {
                virtio_sections += 1;
                for which in 0..3 {
                    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
                    let mut t = MmioTransport::new(vm_mem(), some_device(which), irq).unwrap();
                    if t.restore(section).is_ok() {
                        assert!(
                            t.pause_device(deadline()),
                            "a restored device did not pause"
                        );
                        let _ = t.save("fuzz");
                    }
                    let mut p = VirtioPciDevice::new(vm_mem(), some_device(which), Arc::new(NoMsi))
                        .unwrap();
                    if p.restore(section).is_ok() {
                        assert!(
                            p.pause_device(deadline()),
                            "a restored device did not pause"
                        );
                        let _ = p.save("fuzz");
                    }
                }
            }
            _ => {}
        }
    }
});

fn deadline() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(5)
}

//! Creating the VM's virtio devices from its config and attaching them through the chosen
//! transport: their register windows on the MMIO bus, queue notifications as KVM ioeventfds
//! (the vCPU thread never runs device code) and interrupts as irqfds.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use arch::acpi::VirtioMmioAcpi;
use arch::layout::{VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use arch::GuestMemoryMmap;
use devices::Bus;
use virtio::devices::{Console, ConsoleInput, Rng};
use virtio::transport::mmio::MmioTransport;
use virtio::VirtioDevice;

use crate::config::{CharBackend, VmConfig};
use crate::vm::VmmError;

/// The virtio devices a config asks for, not yet attached.
pub struct VirtioDevices {
    /// The devices, in attach order.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Where the virtio-console takes its input, when it reads stdin.
    pub console_input: Option<ConsoleInput>,
}

fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}

/// Creates the devices `config` asks for.
pub fn create(config: &VmConfig) -> Result<VirtioDevices, VmmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut console_input = None;
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(backend) = &config.console {
        let sink: Option<Box<dyn std::io::Write + Send>> = match backend {
            CharBackend::Stdio => Some(Box::new(std::io::stdout())),
            CharBackend::File(p) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|err| VmmError::File {
                        what: "console output file",
                        path: p.display().to_string(),
                        err,
                    })?,
            )),
            CharBackend::None => None,
        };
        let console = Console::new(sink).map_err(|e| setup(format!("virtio-console: {e}")))?;
        if *backend == CharBackend::Stdio {
            console_input = Some(console.input_handle());
        }
        devices.push(Box::new(console));
    }
    if devices.len() as u64 > VIRTIO_MMIO_MAX {
        return Err(setup(format!(
            "at most {VIRTIO_MMIO_MAX} virtio devices are supported"
        )));
    }
    Ok(VirtioDevices {
        devices,
        console_input,
    })
}

/// Where the `i`-th virtio-mmio device lives.
pub fn mmio_slot(i: usize) -> VirtioMmioAcpi {
    VirtioMmioAcpi {
        base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_MMIO_FIRST_GSI + i as u32,
    }
}

/// Attaches each device through virtio-mmio at [`mmio_slot`]`(i)`.
pub fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<(), VmmError> {
    for (i, dev) in devices.into_iter().enumerate() {
        let slot = mmio_slot(i);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, slot.gsi)
            .map_err(|e| setup(format!("virtio-mmio irqfd on GSI {}: {e}", slot.gsi)))?;
        let transport = MmioTransport::new(mem.clone(), dev, irq)
            .map_err(|e| setup(format!("virtio-mmio: {e}")))?;
        for (offset, queue, evt) in transport.queue_notify_eventfds() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(slot.base + offset), queue)
                .map_err(|e| setup(format!("virtio-mmio ioeventfd: {e}")))?;
        }
        bus.insert(Arc::new(Mutex::new(transport)), slot.base, slot.size)
            .map_err(setup)?;
    }
    Ok(())
}

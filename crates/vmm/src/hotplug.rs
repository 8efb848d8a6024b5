//! Disks and interfaces plugged in and out while the guest runs: `PUT /v1/vm/disks`,
//! `PUT /v1/vm/nets` (plugged in at once, the guest told through ACPI, see
//! [`crate::pci_hotplug`]) and `DELETE /v1/vm/disks/{id}`, `DELETE /v1/vm/nets/{id}` (the
//! guest is asked to let go; the device is taken out when it ejects it, which
//! [`Vm::finish_unplugs`] carries out on the VMM's loop). PCI transport only.
//!
//! A plugged device becomes part of the VM as if it had been there from the start: its
//! configuration joins the VM's (with its id and PCI slot), so `GET /v1/vm` shows it and a
//! snapshot or a migration rebuilds it where the guest knows it; its state is a component.

use crate::api::Reply;
use crate::config::{DiskConfig, NetConfig, VmConfig};
use crate::sync::lock;
use crate::vm::Vm;

pub use ::api::devices::{DeviceKind as Kind, PluggedDevice};

/// The id a new device gets: its own (checked), or `{prefix}{n}` for the lowest `n` free.
fn new_id(given: Option<&str>, prefix: &str, config: &VmConfig) -> Result<String, Reply> {
    let Some(id) = given else {
        return Ok(config.free_device_id(prefix));
    };
    crate::config::check_device_id(id).map_err(|e| Reply::error(400, e.to_string()))?;
    if config
        .disk_ids()
        .iter()
        .chain(&config.net_ids())
        .any(|t| t == id)
    {
        return Err(Reply::error(
            400,
            format!("invalid device id '{id}': the VM has a device with that id"),
        ));
    }
    Ok(id.to_string())
}

impl Vm {
    fn hotplug_parts(
        &self,
        what: &str,
    ) -> Result<(&crate::virtio_pci::PciBus, &crate::pci_hotplug::PciHotplug), Reply> {
        match (&self.pci, &self.pci_hotplug) {
            (Some(b), Some(h)) => Ok((b, h)),
            _ => Err(Reply::error(
                400,
                format!("cannot {what}: device hotplug needs the PCI transport (--transport pci)"),
            )),
        }
    }

    /// `PUT /v1/vm/disks`.
    pub(crate) fn add_disk(&self, d: &DiskConfig, config: &mut VmConfig) -> Reply {
        let (bus, hp) = match self.hotplug_parts("add a disk") {
            Ok(p) => p,
            Err(r) => return r,
        };
        let id = match new_id(d.id.as_deref(), "disk", config) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let mut d = d.clone();
        d.id = Some(id.clone());
        if let Err(e) = d.validate() {
            return Reply::error(400, e.to_string());
        }
        if d.format.is_none() {
            d.probed_format = block::probe_format(&d.path).ok().map(|f| match f {
                block::ImageFormat::Raw => crate::config::DiskFormat::Raw,
                block::ImageFormat::Qcow2 => crate::config::DiskFormat::Qcow2,
            });
        }
        let serial: String = format!("tern-{id}").chars().take(20).collect();
        let opened = match crate::virtio_devices::open_disk(&serial, &d, true) {
            Ok(o) => o,
            Err(e) => return Reply::error(400, format!("cannot add disk {id}: {e}")),
        };
        let name = format!("virtio-blk {id} ({})", d.path.display());
        let blk = lock(&self.devs).add_disk(&id, &d, opened);
        let slot = match self.plug(bus, &id, &name, Box::new(blk)) {
            Ok(s) => s,
            Err(r) => return r,
        };
        config.disks.push(d);
        self.announce_plugged(hp, &id, slot, config)
    }

    /// `PUT /v1/vm/nets`.
    pub(crate) fn add_net(&self, n: &NetConfig, config: &mut VmConfig) -> Reply {
        let (bus, hp) = match self.hotplug_parts("add an interface") {
            Ok(p) => p,
            Err(r) => return r,
        };
        let id = match new_id(n.id.as_deref(), "net", config) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let mut n = n.clone();
        n.id = Some(id.clone());
        if let Err(e) = n.validate() {
            return Reply::error(400, e.to_string());
        }
        let net = match crate::virtio_devices::open_net(config.nets.len(), &n) {
            Ok(net) => net,
            Err(e) => return Reply::error(400, format!("cannot add interface {id}: {e}")),
        };
        let name = format!("virtio-net {id} (TAP {})", net.tap_name());
        let net = lock(&self.devs).add_net(&id, net);
        let slot = match self.plug(bus, &id, &name, Box::new(net)) {
            Ok(s) => s,
            Err(r) => return r,
        };
        config.nets.push(n);
        self.announce_plugged(hp, &id, slot, config)
    }

    /// Plugs `dev` in as `id` and makes it a component; on failure nothing is left of it.
    fn plug(
        &self,
        bus: &crate::virtio_pci::PciBus,
        id: &str,
        name: &str,
        dev: Box<dyn virtio::VirtioDevice>,
    ) -> Result<u8, Reply> {
        let plugged = match bus.plug(id, dev, None) {
            Ok(p) => p,
            Err(e) => {
                lock(&self.devs).remove(id);
                return Err(Reply::error(500, format!("cannot plug {id} in: {e}")));
            }
        };
        if let Err(e) = self.components.add(id, name, plugged.dev.clone()) {
            bus.unplug(id);
            lock(&self.devs).remove(id);
            return Err(Reply::error(409, format!("cannot plug {id} in: {e}")));
        }
        Ok(plugged.slot)
    }

    fn announce_plugged(
        &self,
        hp: &crate::pci_hotplug::PciHotplug,
        id: &str,
        slot: u8,
        config: &mut VmConfig,
    ) -> Reply {
        config.pci_slots.insert(id.to_string(), slot);
        if let Err(e) = hp.added(slot) {
            tracing::warn!("{id} is plugged in at slot {slot}, but {e}");
        }
        tracing::info!("{id} plugged in at PCI slot {slot}");
        Reply::ok(&PluggedDevice {
            id: id.to_string(),
            bdf: format!("0000:00:{slot:02x}.0"),
        })
    }

    /// `DELETE /v1/vm/disks/{id}` and `DELETE /v1/vm/nets/{id}`: 202, the device goes when
    /// the guest ejects it.
    pub(crate) fn remove_device(&self, kind: Kind, id: &str, config: &VmConfig) -> Reply {
        let (bus, hp) = match self.hotplug_parts(&format!("remove {} {id}", kind.noun())) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let ids = match kind {
            Kind::Disk => config.disk_ids(),
            Kind::Net => config.net_ids(),
        };
        let slot = ids
            .iter()
            .any(|i| i == id)
            .then(|| bus.slot_of(id))
            .flatten();
        let Some(slot) = slot else {
            return crate::device_updates::unknown(kind.noun(), id, ids.iter().map(String::as_str));
        };
        if !hp.removing(slot) {
            if let Err(e) = hp.remove(slot) {
                return Reply::error(500, format!("cannot remove {id}: {e}"));
            }
            tracing::info!("{id} (PCI slot {slot}): the guest is asked to let go of it");
        }
        Reply::accepted()
    }

    /// Takes out the devices the guest ejected: off the bus, out of the components, the
    /// device set and the configuration. A disk's image is closed (and unlocked) once its
    /// last request is done. Slots of other devices (which tern cannot describe away in the
    /// configuration) stay plugged in.
    pub(crate) fn finish_unplugs(&self, config: &mut VmConfig) {
        let (Some(bus), Some(hp)) = (&self.pci, &self.pci_hotplug) else {
            return;
        };
        for slot in hp.take_ejected() {
            let Some(id) = bus.id_at(slot) else {
                continue;
            };
            let is_disk = config
                .disks
                .iter()
                .any(|d| d.id.as_deref() == Some(id.as_str()));
            let is_net = config
                .nets
                .iter()
                .any(|n| n.id.as_deref() == Some(id.as_str()));
            if !is_disk && !is_net {
                tracing::warn!("the guest ejected {id} (PCI slot {slot}); it stays plugged in");
                continue;
            }
            self.components.remove(&id);
            lock(&self.devs).remove(&id);
            bus.unplug(&id);
            config
                .disks
                .retain(|d| d.id.as_deref() != Some(id.as_str()));
            config.nets.retain(|n| n.id.as_deref() != Some(id.as_str()));
            config.pci_slots.remove(&id);
            tracing::info!("{id} unplugged from PCI slot {slot}: the guest ejected it");
        }
    }
}

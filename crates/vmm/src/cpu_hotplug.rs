//! ACPI CPU hotplug: vCPUs added and removed while the guest runs, as Cloud Hypervisor and
//! QEMU do it for unmodified Linux.
//!
//! - **What the guest sees.** The MADT lists every possible vCPU (`max_cpus`), those not
//!   plugged in at boot as "online capable". The DSDT has a processor device per vCPU
//!   (`\_SB_.CPUS.Cnnn`, `ACPI0007`) whose `_STA` reads the controller below, whose `_MAT` is
//!   its local APIC entry and whose `_EJ0` ejects it; and a generic event device
//!   (`\_SB_.GED2`, GSI [`ACPI_CPU_HOTPLUG_GSI`]) whose `_EVT` scans the controller and
//!   notifies each vCPU being added (device check) or removed (eject request).
//! - **The controller**, 12 ports at [`CPU_HOTPLUG_PORT`]: a 32-bit selector at +0, and at +4
//!   the selected vCPU's flags: bit 0 present (read only), bit 1 being inserted, bit 2 being
//!   removed (writing 1 clears either), bit 3 eject (writing 1 ejects it). tern's own layout.
//! - **Adding** plugs the vCPU in (its thread runs `KVM_RUN` again, where it waits for the
//!   guest's INIT and SIPI), marks it present and being inserted and raises the GED; the
//!   guest's kernel then onlines it. **Removing** marks vCPUs being removed and raises the GED;
//!   the guest's kernel offlines each and calls `_EJ0`, and only then is the vCPU pulled out
//!   (parked at its next exit from `KVM_RUN`: KVM cannot destroy a vCPU, and a later add
//!   reuses it). vCPU 0 stays.
//! - The present, inserting and removing flags are the controller's state in snapshots and
//!   migrations.

use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml, AmlSink};
use lifecycle::{Component, Section};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::control::VmControl;
use crate::sync::lock;

/// First port of the controller.
pub const CPU_HOTPLUG_PORT: u64 = 0x0cd8;
/// Its length in ports.
pub const CPU_HOTPLUG_LEN: u64 = 12;
/// The GSI of `\_SB_.GED2`.
pub const ACPI_CPU_HOTPLUG_GSI: u32 = 6;

const PRESENT: u8 = 1;
const INSERTING: u8 = 2;
const REMOVING: u8 = 4;
const EJECT: u8 = 8;

/// Each vCPU's flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    flags: Vec<u8>,
    /// The number of vCPUs last asked for.
    requested: u32,
}

struct Inner {
    state: State,
    selected: u32,
}

/// The controller: the guest's view of which vCPUs are present, and the VMM's hand on them.
pub struct CpuHotplug {
    inner: Mutex<Inner>,
    ctl: Arc<VmControl>,
    /// Raises `\_SB_.GED2`.
    irq: EventFd,
}

impl CpuHotplug {
    /// A controller for `max` vCPUs, the first `count` present; `irq` raises the GED.
    pub fn new(count: u8, max: u8, ctl: Arc<VmControl>, irq: EventFd) -> Self {
        let flags = (0..max)
            .map(|i| if i < count { PRESENT } else { 0 })
            .collect();
        CpuHotplug {
            inner: Mutex::new(Inner {
                state: State {
                    flags,
                    requested: count.into(),
                },
                selected: 0,
            }),
            ctl,
            irq,
        }
    }

    /// (present, last asked for, most) vCPUs.
    pub fn counts(&self) -> (u32, u32, u32) {
        let g = lock(&self.inner);
        let present = g.state.flags.iter().filter(|f| *f & PRESENT != 0).count() as u32;
        (present, g.state.requested, g.state.flags.len() as u32)
    }

    /// Whether `n` vCPUs may be asked for: 1 up to `max_cpus`; the error starts with
    /// "invalid".
    pub fn check(&self, n: u32) -> Result<(), String> {
        let max = lock(&self.inner).state.flags.len() as u32;
        if n == 0 || n > max {
            return Err(format!(
                "invalid cpus {n}: must be between 1 and the VM's max_cpus ({max})"
            ));
        }
        Ok(())
    }

    /// Asks for `n` vCPUs (see [`check`](Self::check)): adds the missing ones at once (the
    /// guest onlines them), or asks the guest to remove the highest ones (it offlines and
    /// ejects them).
    pub fn resize(&self, n: u32) -> Result<(), String> {
        self.check(n)?;
        let mut g = lock(&self.inner);
        g.state.requested = n;
        let mut changed = false;
        for (i, f) in g.state.flags.iter_mut().enumerate() {
            let want = (i as u32) < n;
            if want && *f & PRESENT == 0 {
                self.ctl.set_plugged(i as u8, true);
                *f = PRESENT | INSERTING;
                changed = true;
            } else if want && *f & REMOVING != 0 {
                // Asked to stay after all.
                *f &= !REMOVING;
            } else if !want && *f & PRESENT != 0 && *f & REMOVING == 0 {
                *f |= REMOVING;
                *f &= !INSERTING;
                changed = true;
            }
        }
        drop(g);
        if changed {
            self.irq
                .write(1)
                .map_err(|e| format!("cannot signal the guest: {e}"))?;
        }
        Ok(())
    }

    fn eject(&self, g: &mut Inner, id: u32) {
        // vCPU 0 stays (the guest cannot offline it anyway).
        if id == 0 {
            return;
        }
        let Some(f) = g.state.flags.get_mut(id as usize) else {
            return;
        };
        if *f & PRESENT == 0 {
            return;
        }
        *f = 0;
        tracing::info!("vCPU {id} ejected by the guest");
        // It parks at its next exit from KVM_RUN; until then it sits there halted, as the
        // guest left it after offlining it (a pause, a snapshot or the VM's end kicks it out).
        self.ctl.set_plugged(id as u8, false);
    }
}

/// Gives a VM whose `max_cpus` exceeds `cpus` its controller: on the port bus, in the DSDT,
/// its GED as an irqfd, and its state as component `cpu-hotplug`. None for a VM without CPU
/// hotplug.
pub fn attach(
    config: &crate::VmConfig,
    vm: &kvm_ioctls::VmFd,
    ctl: &Arc<VmControl>,
    dm: &mut crate::device_manager::DeviceManager,
) -> Result<Option<Arc<CpuHotplug>>, crate::error::VmmError> {
    let (count, max) = (config.cpus as u8, config.effective_max_cpus() as u8);
    if max <= count {
        return Ok(None);
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| crate::error::setup(format!("eventfd: {e}")))?;
    vm.register_irqfd(&irq, ACPI_CPU_HOTPLUG_GSI)
        .map_err(crate::error::kvm_err("register CPU hotplug irqfd"))?;
    let hp = Arc::new(CpuHotplug::new(count, max, ctl.clone(), irq));
    let ports = Arc::new(Mutex::new(Ports(hp.clone())));
    let e = dm.describe("cpu-hotplug", "the CPU hotplug controller");
    e.component = Some(ports.clone());
    e.acpi = Some(Box::new(CpuHotplugAcpi { max }));
    dm.add_pio("cpu-hotplug", ports, CPU_HOTPLUG_PORT, CPU_HOTPLUG_LEN)?;
    Ok(Some(hp))
}

/// The controller's registers on the port bus.
pub struct Ports(pub Arc<CpuHotplug>);

impl devices::BusDevice for Ports {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let g = lock(&self.0.inner);
        let mut regs = [0u8; CPU_HOTPLUG_LEN as usize];
        regs[0..4].copy_from_slice(&g.selected.to_le_bytes());
        regs[4] = g.state.flags.get(g.selected as usize).copied().unwrap_or(0)
            & (PRESENT | INSERTING | REMOVING);
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut g = lock(&self.0.inner);
        match offset {
            0 => {
                let mut b = g.selected.to_le_bytes();
                for (i, v) in data.iter().take(4).enumerate() {
                    b[i] = *v;
                }
                g.selected = u32::from_le_bytes(b);
            }
            4 => {
                let Some(&v) = data.first() else { return };
                let id = g.selected;
                if let Some(f) = g.state.flags.get_mut(id as usize) {
                    *f &= !(v & (INSERTING | REMOVING));
                }
                if v & EJECT != 0 {
                    self.0.eject(&mut g, id);
                }
            }
            _ => {}
        }
    }
}

impl Component for Ports {
    fn save(&mut self, id: &str) -> Result<Option<Section>, String> {
        let g = lock(&self.0.inner);
        Section::new(id, 1, &g.state).map(Some)
    }

    fn restore(&mut self, section: &Section) -> Result<(), String> {
        let s: State = section.parse(&[1])?;
        let mut g = lock(&self.0.inner);
        if s.flags.len() != g.state.flags.len() {
            return Err(format!(
                "the snapshot has {} possible vCPUs; this VM {}",
                s.flags.len(),
                g.state.flags.len()
            ));
        }
        if s.flags.first().is_some_and(|f| f & PRESENT == 0)
            || s.flags
                .iter()
                .any(|f| f & !(PRESENT | INSERTING | REMOVING) != 0)
            || s.requested == 0
            || s.requested as usize > s.flags.len()
        {
            return Err("the CPU hotplug state is malformed".into());
        }
        for (i, f) in s.flags.iter().enumerate() {
            self.0.ctl.set_plugged(i as u8, f & PRESENT != 0);
        }
        g.state = s;
        Ok(())
    }
}

/// The DSDT's description: the processor devices, the scan and the GED.
pub struct CpuHotplugAcpi {
    /// Possible vCPUs.
    pub max: u8,
}

impl Aml for CpuHotplugAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let region = aml::OpRegion::new(
            "PRST".into(),
            aml::OpRegionSpace::SystemIO,
            &(CPU_HOTPLUG_PORT as usize),
            &(CPU_HOTPLUG_LEN as usize),
        );
        let fields = aml::Field::new(
            "PRST".into(),
            aml::FieldAccessType::Byte,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::WriteAsZeroes,
            vec![
                aml::FieldEntry::Named(*b"CSEL", 32),
                aml::FieldEntry::Named(*b"CPEN", 1),
                aml::FieldEntry::Named(*b"CINS", 1),
                aml::FieldEntry::Named(*b"CRMV", 1),
                aml::FieldEntry::Named(*b"CEJ0", 1),
            ],
        );
        let mutex = aml::Mutex::new("CLCK".into(), 0);
        let (csel, cpen, cins, crmv, cej0): (
            aml::Path,
            aml::Path,
            aml::Path,
            aml::Path,
            aml::Path,
        ) = (
            "CSEL".into(),
            "CPEN".into(),
            "CINS".into(),
            "CRMV".into(),
            "CEJ0".into(),
        );

        // CSTA(id): 0xF when present, 0 otherwise.
        let acquire = aml::Acquire::new("CLCK".into(), 0xffff);
        let release = aml::Release::new("CLCK".into());
        let sel_arg = aml::Store::new(&csel, &aml::Arg(0));
        let zero_l0 = aml::Store::new(&aml::Local(0), &aml::ZERO);
        let f_l0 = aml::Store::new(&aml::Local(0), &0xfu8);
        let present = aml::Equal::new(&cpen, &aml::ONE);
        let if_present = aml::If::new(&present, vec![&f_l0]);
        let ret_l0 = aml::Return::new(&aml::Local(0));
        let csta = aml::Method::new(
            "CSTA".into(),
            1,
            true,
            vec![&acquire, &sel_arg, &zero_l0, &if_present, &release, &ret_l0],
        );
        // CEJT(id): eject it.
        let eject = aml::Store::new(&cej0, &aml::ONE);
        let cej = aml::Method::new(
            "CEJT".into(),
            1,
            true,
            vec![&acquire, &sel_arg, &eject, &release],
        );
        // CSCN: for each vCPU being inserted or removed, clear the flag and notify it.
        let ids: Vec<u32> = (0..u32::from(self.max)).collect();
        let names: Vec<aml::Path> = ids.iter().map(|i| cpu_name(*i).as_str().into()).collect();
        let sels: Vec<aml::Store> = ids.iter().map(|i| aml::Store::new(&csel, i)).collect();
        let inserting = aml::Equal::new(&cins, &aml::ONE);
        let removing = aml::Equal::new(&crmv, &aml::ONE);
        let clear_ins = aml::Store::new(&cins, &aml::ONE);
        let clear_rmv = aml::Store::new(&crmv, &aml::ONE);
        let check: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &1u8)).collect();
        let ejects: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &3u8)).collect();
        let ifs_ins: Vec<aml::If> = check
            .iter()
            .map(|n| aml::If::new(&inserting, vec![n, &clear_ins]))
            .collect();
        let ifs_rmv: Vec<aml::If> = ejects
            .iter()
            .map(|n| aml::If::new(&removing, vec![n, &clear_rmv]))
            .collect();
        let mut body: Vec<&dyn Aml> = vec![&acquire];
        for i in 0..ids.len() {
            body.push(&sels[i]);
            body.push(&ifs_ins[i]);
            body.push(&ifs_rmv[i]);
        }
        body.push(&release);
        let cscn = aml::Method::new("CSCN".into(), 0, true, body);

        // The processor devices.
        let cpus: Vec<CpuDevice> = ids.iter().map(|&id| CpuDevice { id }).collect();
        let hid = aml::Name::new("_HID".into(), &"ACPI0010");
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
        let mut children: Vec<&dyn Aml> =
            vec![&hid, &cid, &region, &fields, &mutex, &csta, &cej, &cscn];
        for c in &cpus {
            children.push(c);
        }
        aml::Device::new("_SB_.CPUS".into(), children).to_aml_bytes(sink);

        // GED2: a hotplug event scans.
        let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let ged_uid = aml::Name::new("_UID".into(), &2u8);
        let irq = aml::Interrupt::new(true, true, false, false, ACPI_CPU_HOTPLUG_GSI);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
        let scan = aml::MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
        let evt = aml::Method::new("_EVT".into(), 1, true, vec![&scan]);
        aml::Device::new("_SB_.GED2".into(), vec![&ged_hid, &ged_uid, &crs, &evt])
            .to_aml_bytes(sink);
    }
}

fn cpu_name(id: u32) -> String {
    format!("C{id:03X}")
}

/// One processor device: `_STA` from the controller, `_MAT` its local APIC entry (enabled:
/// `_STA` says whether it is there), `_EJ0` ejects it.
struct CpuDevice {
    id: u32,
}

impl Aml for CpuDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let id = self.id;
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &id);
        let sta_call = aml::MethodCall::new("CSTA".into(), vec![&id]);
        let sta_ret = aml::Return::new(&sta_call);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_ret]);
        let mat_buf = aml::BufferData::new(vec![0, 8, id as u8, id as u8, 1, 0, 0, 0]);
        let mat = aml::Name::new("_MAT".into(), &mat_buf);
        let ej_call = aml::MethodCall::new("CEJT".into(), vec![&id]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&ej_call]);
        aml::Device::new(
            cpu_name(id).as_str().into(),
            vec![&hid, &uid, &sta, &mat, &ej0],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;

    fn ctl() -> Arc<VmControl> {
        Arc::new(VmControl::new().unwrap())
    }

    fn flags(p: &mut Ports, id: u32) -> u8 {
        p.write(0, &id.to_le_bytes());
        let mut b = [0u8];
        p.read(4, &mut b);
        b[0]
    }

    #[test]
    fn adding_and_removing_vcpus_through_the_controller() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctl = ctl();
        let hp = Arc::new(CpuHotplug::new(1, 4, ctl.clone(), irq.try_clone().unwrap()));
        let mut p = Ports(hp.clone());
        assert_eq!(hp.counts(), (1, 1, 4));
        assert_eq!(flags(&mut p, 0), PRESENT);
        assert_eq!(flags(&mut p, 1), 0);
        // Bad sizes.
        for n in [0, 5] {
            let e = hp.resize(n).unwrap_err();
            assert!(e.contains("between 1 and the VM's max_cpus (4)"), "{e}");
        }
        assert!(irq.read().is_err(), "no event for a refused resize");
        // Up to 3: two inserted, the GED raised.
        hp.resize(3).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(hp.counts(), (3, 3, 4));
        assert_eq!(flags(&mut p, 2), PRESENT | INSERTING);
        p.write(4, &[INSERTING]); // the guest's scan clears it
        assert_eq!(flags(&mut p, 2), PRESENT);
        // Down to 1: vCPUs 1 and 2 asked to go; they stay until ejected.
        hp.resize(1).unwrap();
        assert_eq!(flags(&mut p, 1), PRESENT | REMOVING);
        assert_eq!(hp.counts().0, 3);
        flags(&mut p, 2);
        p.write(4, &[REMOVING]);
        p.write(4, &[EJECT]);
        assert_eq!(flags(&mut p, 2), 0);
        assert_eq!(ctl.unplugged(), vec![2]);
        assert_eq!(hp.counts(), (2, 1, 4));
        // vCPU 0 cannot be ejected; an index past the end is ignored.
        flags(&mut p, 0);
        p.write(4, &[EJECT]);
        flags(&mut p, 99);
        p.write(4, &[EJECT | INSERTING]);
        assert_eq!(flags(&mut p, 0), PRESENT);
        assert_eq!(hp.counts().0, 2);
    }

    #[test]
    fn its_state_survives_a_snapshot_and_bad_state_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hp = Arc::new(CpuHotplug::new(1, 4, ctl(), irq.try_clone().unwrap()));
        hp.resize(3).unwrap();
        let section = Ports(hp.clone()).save("cpu-hotplug").unwrap().unwrap();
        let other = Arc::new(CpuHotplug::new(1, 4, ctl(), irq.try_clone().unwrap()));
        Ports(other.clone()).restore(&section).unwrap();
        assert_eq!(other.counts(), (3, 3, 4));
        let small = Arc::new(CpuHotplug::new(1, 2, ctl(), irq));
        let e = Ports(small).restore(&section).unwrap_err();
        assert!(e.contains("possible vCPUs"), "{e}");
    }

    #[test]
    fn the_dsdt_part_names_every_vcpu_and_the_scan() {
        let mut v = Vec::new();
        CpuHotplugAcpi { max: 3 }.to_aml_bytes(&mut v);
        for name in [
            "CPUS", "C000", "C002", "CSCN", "CSTA", "CEJ0", "CEJT", "GED2", "_EJ0", "_MAT",
        ] {
            assert!(
                v.windows(4).any(|w| w == name.as_bytes()),
                "{name} missing from the AML"
            );
        }
        assert!(!v.windows(4).any(|w| w == b"C003"));
    }
}

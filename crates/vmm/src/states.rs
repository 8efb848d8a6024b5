//! Which request fits which state of the VM: one table for the VM's whole life, consulted by
//! the loop that serves the API before boot and by the one that serves it while the VM runs.
//! A request that does not fit gets its 409 here; the loops only carry out those that do.

use ::api::VmState;

use crate::api::{Action, Reply};

/// Ok when `action` fits a VM in `state`; the answer to give otherwise.
pub fn check(state: VmState, action: &Action) -> Result<(), Reply> {
    use VmState::*;
    let booted = matches!(state, Running | Paused);
    let refuse = |what: &str| Err(Reply::conflict(what, state));
    match action {
        Action::Info | Action::OnVmm(_) => Ok(()),
        Action::Configure(_) if booted => refuse("configure"),
        Action::Configure(_) => Ok(()),
        Action::Boot if booted => refuse("boot"),
        Action::Boot if state == Created => Err(Reply::error(
            409,
            "cannot boot: the VM is not configured (PUT /v1/vm first)",
        )),
        Action::Boot => Ok(()),
        Action::Restore(_) if booted => Err(Reply::error(
            409,
            "cannot restore: a VM exists already (restore into a tern started with only --api-socket)",
        )),
        Action::Restore(_) => Ok(()),
        Action::Pause if state == Paused => Err(Reply::conflict("pause", "paused already")),
        Action::Pause if state == Running => Ok(()),
        Action::Pause => refuse("pause"),
        Action::Resume if state == Paused => Ok(()),
        Action::Resume => refuse("resume"),
        Action::Shutdown { force: false } if state == Paused => Err(Reply::error(
            409,
            "cannot press the power button of a paused VM: resume it first, or use ?force=true",
        )),
        Action::Shutdown { .. } => Ok(()),
        Action::Reboot if booted => Ok(()),
        Action::Reboot => refuse("reboot"),
        Action::Counters if booted => Ok(()),
        Action::Counters => refuse("read counters"),
        Action::Snapshot { .. } if state == Paused => Ok(()),
        Action::Snapshot { .. } if state == Running => {
            Err(Reply::conflict("snapshot", "running (pause it first)"))
        }
        Action::Snapshot { .. } => refuse("snapshot"),
        Action::MigrateSend(_) if booted => Ok(()),
        Action::MigrateSend(_) => refuse("migrate"),
        Action::MigrateStatus => Ok(()),
        Action::MigrateCancel if booted => Ok(()),
        Action::MigrateCancel => Err(Reply::error(409, "no migration is in progress")),
        Action::MigrateReceive(_) if booted => Err(Reply::error(
            409,
            "cannot receive a migration: a VM exists already (receive into a tern started with only --api-socket)",
        )),
        Action::MigrateReceive(_) => Ok(()),
        Action::BalloonInfo | Action::BalloonSet(_) if booted => Ok(()),
        Action::BalloonInfo | Action::BalloonSet(_) => refuse("use the balloon"),
        Action::Resize(_) if booted => Ok(()),
        Action::Resize(_) => refuse("resize"),
        Action::AddDisk(_) | Action::AddNet(_) if state == Paused => Err(Reply::error(
            409,
            "cannot plug a device into a paused VM: resume it first",
        )),
        Action::DiskUpdate { .. }
        | Action::NetUpdate { .. }
        | Action::AddDisk(_)
        | Action::AddNet(_)
        | Action::RemoveDevice { .. }
            if booted =>
        {
            Ok(())
        }
        Action::DiskUpdate { .. }
        | Action::NetUpdate { .. }
        | Action::AddDisk(_)
        | Action::AddNet(_)
        | Action::RemoveDevice { .. } => Err(Reply::error(
            409,
            format!(
                "cannot change a device: the VM is {state} (before boot, change its configuration with PUT /v1/vm)"
            ),
        )),
    }
}

/// The answer to a request [`check`] let through that a loop still does not carry out (it
/// cannot happen: every loop handles what the table lets through for its states).
pub fn not_handled(state: VmState) -> Reply {
    Reply::error(
        500,
        format!("tern cannot serve this request while the VM is {state}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: VmState, a: Action) -> u16 {
        match check(state, &a) {
            Ok(()) => 0,
            Err(r) => r.status,
        }
    }

    #[test]
    fn the_table() {
        use VmState::*;
        let snap = || Action::Snapshot {
            dir: "/s".into(),
            diff: false,
        };
        let url = || "unix:/m".parse::<::api::migrate::MigrationUrl>().unwrap();
        let send = move || Action::MigrateSend(Box::new(::api::migrate::SendOptions::to(url())));
        let receive = move || {
            Action::MigrateReceive(Box::new(::api::migrate::ReceiveOptions {
                url: url(),
                disk_remap: Default::default(),
                tap_remap: Default::default(),
                serial: None,
                console: None,
                vsock_socket: None,
                accept_dirs: Vec::new(),
                accept_taps: Vec::new(),
            }))
        };
        // created, configured, running, paused
        type Row = (Box<dyn Fn() -> Action>, [u16; 4]);
        let rows: Vec<Row> = vec![
            (Box::new(|| Action::Info), [0, 0, 0, 0]),
            (Box::new(|| Action::Boot), [409, 0, 409, 409]),
            (Box::new(|| Action::Pause), [409, 409, 0, 409]),
            (Box::new(|| Action::Resume), [409, 409, 409, 0]),
            (
                Box::new(|| Action::Shutdown { force: false }),
                [0, 0, 0, 409],
            ),
            (Box::new(|| Action::Shutdown { force: true }), [0, 0, 0, 0]),
            (Box::new(|| Action::Reboot), [409, 409, 0, 0]),
            (Box::new(|| Action::Counters), [409, 409, 0, 0]),
            (Box::new(snap), [409, 409, 409, 0]),
            (Box::new(send), [409, 409, 0, 0]),
            (Box::new(|| Action::MigrateStatus), [0, 0, 0, 0]),
            (Box::new(|| Action::MigrateCancel), [409, 409, 0, 0]),
            (Box::new(receive), [0, 0, 409, 409]),
            (Box::new(|| Action::BalloonInfo), [409, 409, 0, 0]),
            (
                Box::new(|| Action::Resize(Default::default())),
                [409, 409, 0, 0],
            ),
            (
                Box::new(|| Action::DiskUpdate {
                    id: "disk0".into(),
                    update: Default::default(),
                }),
                [409, 409, 0, 0],
            ),
            (
                Box::new(|| Action::NetUpdate {
                    id: "net0".into(),
                    update: Default::default(),
                }),
                [409, 409, 0, 0],
            ),
            (
                Box::new(|| Action::AddDisk(Box::new("path=/d.img".parse().unwrap()))),
                [409, 409, 0, 409],
            ),
            (
                Box::new(|| Action::AddNet(Box::new("tap=auto".parse().unwrap()))),
                [409, 409, 0, 409],
            ),
            (
                Box::new(|| Action::RemoveDevice {
                    kind: ::api::devices::DeviceKind::Disk,
                    id: "disk0".into(),
                }),
                [409, 409, 0, 0],
            ),
        ];
        for (action, want) in rows {
            for (state, want) in [Created, Configured, Running, Paused].into_iter().zip(want) {
                assert_eq!(status(state, action()), want, "{:?} in {state:?}", action());
            }
        }
        let e = check(Paused, &Action::Pause).unwrap_err();
        assert_eq!(e.status, 409);
    }
}

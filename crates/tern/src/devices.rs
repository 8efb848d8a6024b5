//! `tern disk` and `tern net`: plug a running VM's disks and interfaces in and out
//! (`PUT /v1/vm/disks`, `DELETE /v1/vm/disks/{id}`, the same under `nets`), change them by id
//! (`PATCH /v1/vm/disks/{id}`, `PATCH /v1/vm/nets/{id}`), and list them.

use std::process::ExitCode;

use clap::{Args, Subcommand};

/// `tern disk` subcommands.
#[derive(Subcommand)]
pub enum DiskCmd {
    /// Plug a disk into the running VM (PCI hotplug): the guest sees it at once.
    Add(Add),
    /// Unplug a disk: the guest is asked to let go of it, and it goes once the guest has.
    Remove(Remove),
    /// List the VM's disks: id, image, limits.
    List(crate::ClientArgs),
    /// Change a disk while the guest runs: its rate limits (iops=N, bw=RATE; 0 lifts a
    /// limit), its size (size=SIZE: at least its size now; a host block device must have
    /// been grown on the host first) or the image behind it (path=PATH). The guest sees a
    /// new size at once.
    Update(Update),
}

/// `tern net` subcommands.
#[derive(Subcommand)]
pub enum NetCmd {
    /// Plug an interface into the running VM (PCI hotplug).
    Add(Add),
    /// Unplug an interface: the guest is asked to let go of it, and it goes once the guest
    /// has.
    Remove(Remove),
    /// List the VM's interfaces: id, TAP, limits.
    List(crate::ClientArgs),
    /// Change an interface's rate limits while the guest runs (rx_bw=RATE, tx_bw=RATE,
    /// rx_ops=N, tx_ops=N; 0 lifts a limit).
    Update(Update),
}

/// `tern disk|net add` arguments.
#[derive(Args)]
pub struct Add {
    #[command(flatten)]
    client: crate::ClientArgs,
    /// The device, as `tern run --disk` or `--net` takes it (id=ID names it; one is made up
    /// otherwise).
    #[arg(value_name = "SPEC")]
    spec: String,
}

/// `tern disk|net remove` arguments.
#[derive(Args)]
pub struct Remove {
    #[command(flatten)]
    client: crate::ClientArgs,
    /// The device's id.
    id: String,
}

/// Sends the new device `encode` makes a JSON body of.
fn add(
    a: Add,
    route: &str,
    encode: impl Fn(&str) -> Result<String, api::config::ConfigError>,
) -> ExitCode {
    let body = match encode(&a.spec) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    crate::client_with(&a.client, "PUT", route, Some(&body), |b| {
        let v: serde_json::Value = serde_json::from_str(b).map_err(|e| e.to_string())?;
        Ok(format!(
            "{} plugged in at PCI {}",
            v["id"].as_str().unwrap_or("?"),
            v["bdf"].as_str().unwrap_or("?")
        ))
    })
}

fn remove(r: Remove, kind: &str, route: &str) -> ExitCode {
    let path = format!("{route}/{}", r.id);
    let done = format!(
        "asked the guest to let go of {kind} {}; it is unplugged once the guest has",
        r.id
    );
    crate::client_with(&r.client, "DELETE", &path, None, move |_| Ok(done.clone()))
}

/// `tern disk|net update` arguments.
#[derive(Args)]
pub struct Update {
    #[command(flatten)]
    client: crate::ClientArgs,
    /// The device's id (`tern disk list`, `tern net list`).
    id: String,
    /// What changes, as KEY=VALUE (several, or one comma-separated list).
    #[arg(required = true, value_name = "KEY=VALUE")]
    changes: Vec<String>,
}

/// Sends the changes `encode` makes a JSON body of.
fn patch(
    u: Update,
    kind: &str,
    route: &str,
    encode: impl Fn(&str) -> Result<String, api::config::ConfigError>,
) -> ExitCode {
    let body = match encode(&u.changes.join(",")) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    let path = format!("{route}/{}", u.id);
    let done = format!("{kind} {} changed", u.id);
    crate::client_with(&u.client, "PATCH", &path, Some(&body), move |_| {
        Ok(done.clone())
    })
}

/// `tern disk`.
pub fn disk(cmd: DiskCmd) -> ExitCode {
    match cmd {
        DiskCmd::List(c) => crate::client(&c, "GET", "/v1/vm", list_disks),
        DiskCmd::Add(a) => add(a, "/v1/vm/disks", |s| {
            let d: api::config::DiskConfig = s.parse()?;
            Ok(serde_json::to_string(&d).unwrap_or_default())
        }),
        DiskCmd::Remove(r) => remove(r, "disk", "/v1/vm/disks"),
        DiskCmd::Update(u) => patch(u, "disk", "/v1/vm/disks", |s| {
            let d: api::devices::DiskUpdate = s.parse()?;
            Ok(serde_json::to_string(&d).unwrap_or_default())
        }),
    }
}

/// `tern net`.
pub fn net(cmd: NetCmd) -> ExitCode {
    match cmd {
        NetCmd::List(c) => crate::client(&c, "GET", "/v1/vm", list_nets),
        NetCmd::Add(a) => add(a, "/v1/vm/nets", |s| {
            let n: api::config::NetConfig = s.parse()?;
            Ok(serde_json::to_string(&n).unwrap_or_default())
        }),
        NetCmd::Remove(r) => remove(r, "interface", "/v1/vm/nets"),
        NetCmd::Update(u) => patch(u, "interface", "/v1/vm/nets", |s| {
            let n: api::devices::NetUpdate = s.parse()?;
            Ok(serde_json::to_string(&n).unwrap_or_default())
        }),
    }
}

fn config(body: &str) -> Result<api::VmConfig, String> {
    let v: api::VmInfo = serde_json::from_str(body).map_err(|e| e.to_string())?;
    v.config
        .ok_or_else(|| "the VM has no configuration yet".to_string())
}

fn limit(v: u64, unit: &str) -> String {
    if v == 0 {
        "-".into()
    } else {
        format!("{v}{unit}")
    }
}

fn list_disks(body: &str) -> Result<String, String> {
    let c = config(body)?;
    let mut lines = vec!["ID\tIMAGE\tIOPS\tBW".to_string()];
    for (d, id) in c.disks.iter().zip(c.disk_ids()) {
        lines.push(format!(
            "{id}\t{}{}\t{}\t{}",
            d.path.display(),
            if d.readonly { " (read-only)" } else { "" },
            limit(d.iops, ""),
            limit(d.bw, "B/s")
        ));
    }
    Ok(lines.join("\n"))
}

fn list_nets(body: &str) -> Result<String, String> {
    let c = config(body)?;
    // The TAPs as opened (`auto` ones have their names now), in the same order.
    let taps = serde_json::from_str::<api::VmInfo>(body)
        .ok()
        .and_then(|v| v.taps)
        .filter(|t| t.len() == c.nets.len());
    let mut lines = vec!["ID\tTAP\tRX_BW\tTX_BW\tRX_OPS\tTX_OPS".to_string()];
    for (i, (n, id)) in c.nets.iter().zip(c.net_ids()).enumerate() {
        let tap = taps.as_ref().map_or(n.tap.as_str(), |t| t[i].as_str());
        lines.push(format!(
            "{id}\t{tap}\t{}\t{}\t{}\t{}",
            limit(n.rx_bw, "B/s"),
            limit(n.tx_bw, "B/s"),
            limit(n.rx_ops, ""),
            limit(n.tx_ops, "")
        ));
    }
    Ok(lines.join("\n"))
}

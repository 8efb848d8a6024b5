//! `tern disk` and `tern net`: change a running VM's disks and interfaces by id
//! (`PATCH /v1/vm/disks/{id}`, `PATCH /v1/vm/nets/{id}`), and list them.

use std::process::ExitCode;

use clap::{Args, Subcommand};

/// `tern disk` subcommands.
#[derive(Subcommand)]
pub enum DiskCmd {
    /// List the VM's disks: id, image, limits.
    List(crate::ClientArgs),
    /// Change a disk while the guest runs: its rate limits (iops=N, bw=RATE; 0 lifts a
    /// limit) or its size (size=SIZE: at least its size now; a host block device must have
    /// been grown on the host first). The guest sees a new size at once.
    Update(Update),
}

/// `tern net` subcommands.
#[derive(Subcommand)]
pub enum NetCmd {
    /// List the VM's interfaces: id, TAP, limits.
    List(crate::ClientArgs),
    /// Change an interface's rate limits while the guest runs (rx_bw=RATE, tx_bw=RATE,
    /// rx_ops=N, tx_ops=N; 0 lifts a limit).
    Update(Update),
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
    let mut lines = vec!["ID\tTAP\tRX_BW\tTX_BW\tRX_OPS\tTX_OPS".to_string()];
    for (n, id) in c.nets.iter().zip(c.net_ids()) {
        lines.push(format!(
            "{id}\t{}\t{}\t{}\t{}\t{}",
            n.tap,
            limit(n.rx_bw, "B/s"),
            limit(n.tx_bw, "B/s"),
            limit(n.rx_ops, ""),
            limit(n.tx_ops, "")
        ));
    }
    Ok(lines.join("\n"))
}

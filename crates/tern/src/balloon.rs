//! `tern balloon`: set a running VM's balloon size, or show it with the guest's memory
//! statistics (`PUT` and `GET /v1/vm/balloon`).

use std::process::ExitCode;

use clap::Args;

/// `tern balloon` flags.
#[derive(Args)]
pub struct BalloonArgs {
    #[command(flatten)]
    client: crate::ClientArgs,
    /// Ask the guest for this much memory back (512M, 1G, ...; 0 gives it all back). Without
    /// it, show the balloon.
    #[arg(long, value_name = "SIZE")]
    size: Option<api::config::MemSize>,
    /// Show the guest's memory statistics too (the VM needs --balloon stats_s=N).
    #[arg(long)]
    stats: bool,
}

pub fn main(a: BalloonArgs) -> ExitCode {
    match a.size {
        Some(size) => {
            let body = serde_json::json!({ "size": size }).to_string();
            crate::client_with(&a.client, "PUT", "/v1/vm/balloon", Some(&body), move |_| {
                Ok(format!(
                    "balloon target: {} MiB (the guest gives it back as it can)",
                    size.0 >> 20
                ))
            })
        }
        None => {
            let stats = a.stats;
            crate::client(&a.client, "GET", "/v1/vm/balloon", move |b| show(b, stats))
        }
    }
}

fn show(body: &str, stats: bool) -> Result<String, String> {
    let b: api::balloon::BalloonInfo = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mib = |v: u64| v >> 20;
    let mut s = format!(
        "balloon: {} MiB of {} MiB target, guest memory {} MiB\n\
         freed: {} MiB inflated, {} MiB reported free; {} MiB deflated",
        mib(b.actual_bytes),
        mib(b.target_bytes),
        mib(b.guest_memory_bytes),
        mib(b.inflated_bytes),
        mib(b.reported_bytes),
        mib(b.deflated_bytes),
    );
    let on = |v: bool| if v { "on" } else { "off" };
    s.push_str(&format!(
        "\ndriver: deflate_on_oom {}, free_page_reporting {}, stats {}",
        on(b.driver.deflate_on_oom),
        on(b.driver.free_page_reporting),
        on(b.driver.stats)
    ));
    if stats {
        match &b.stats {
            Some(st) => {
                s.push_str(&format!("\nstatistics ({} ms old):", st.age_ms));
                for (k, v) in &st.values {
                    let bytes = k.ends_with("memory") || k == "disk_caches";
                    if bytes {
                        s.push_str(&format!("\n  {k}: {} MiB", mib(*v)));
                    } else {
                        s.push_str(&format!("\n  {k}: {v}"));
                    }
                }
            }
            None if b.config.stats_s == 0 => {
                s.push_str("\nstatistics: off (start the VM with --balloon stats_s=N)")
            }
            None => s.push_str("\nstatistics: none from the guest yet"),
        }
    }
    Ok(s)
}

//! `tern migrate`: starts a live migration through a running tern's API and follows it to the
//! end (a progress bar on a terminal), or cancels one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::client::Client;
use api::migrate::{MigrationState, MigrationStatus, MigrationUrl, OnTimeout, SendOptions};
use clap::Args;

use crate::{EXIT_USAGE, EXIT_VMM_ERROR};

#[derive(Args)]
pub struct MigrateArgs {
    /// The running tern's API socket (`tern run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// The destination: a tern started with `tern run --incoming URL` (tcp:HOST:PORT or
    /// unix:PATH).
    #[arg(long, value_name = "URL")]
    to: Option<MigrationUrl>,
    /// The longest the VM may stand still at the switch-over, in ms [default: 300].
    #[arg(long, value_name = "MS")]
    downtime_ms: Option<u64>,
    /// Seconds the migration may take to converge [default: 3600].
    #[arg(long, value_name = "SECS")]
    timeout_s: Option<u64>,
    /// At the timeout: cancel (the VM keeps running here) or force (stop it and send the
    /// rest, however long it takes) [default: cancel].
    #[arg(long, value_name = "WHAT")]
    on_timeout: Option<OnTimeout>,
    /// Bytes per second the stream may use, e.g. 100M (default: no limit).
    #[arg(long, value_name = "RATE", value_parser = api::migrate::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Slow down the vCPUs of a guest that writes memory faster than it can be sent.
    #[arg(long)]
    auto_converge: bool,
    /// A live upgrade on this host: hand guest memory (`tern run --memory-shared`) to the new
    /// tern over the unix: socket instead of copying it.
    #[arg(long)]
    local: bool,
    /// Start it and return at once (follow it with `tern migrate --status`).
    #[arg(long)]
    detach: bool,
    /// Show the current or last migration's status.
    #[arg(long, conflicts_with_all = ["to", "cancel"])]
    status: bool,
    /// Cancel the migration in progress (the VM keeps running here).
    #[arg(long, conflicts_with = "to")]
    cancel: bool,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: MigrateArgs) -> ExitCode {
    let client = Client::new(&a.api_socket).with_timeout(Some(Duration::from_secs(30)));
    let fail = |e: String| {
        eprintln!("tern: {e}");
        ExitCode::from(EXIT_VMM_ERROR)
    };
    if a.cancel {
        return match client.send("DELETE", "/v1/vm/migrate", None) {
            Ok(_) => {
                println!("migration cancelled; the VM keeps running here");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        };
    }
    if a.status {
        return match client.get::<MigrationStatus>("/v1/vm/migrate") {
            Ok(s) => {
                show(&s, a.json);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.to_string()),
        };
    }
    let Some(to) = a.to.clone() else {
        eprintln!("tern: migrate needs --to URL (or --status, or --cancel)");
        return ExitCode::from(EXIT_USAGE);
    };
    let mut opts = SendOptions::to(to);
    if let Some(v) = a.downtime_ms {
        opts.downtime_ms = v;
    }
    if let Some(v) = a.timeout_s {
        opts.timeout_s = v;
    }
    if let Some(v) = a.on_timeout {
        opts.on_timeout = v;
    }
    if let Some(v) = a.max_bandwidth {
        opts.max_bandwidth = v;
    }
    opts.auto_converge = a.auto_converge;
    opts.local = a.local;
    if let Err(e) = opts.validate() {
        eprintln!("tern: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let body = match serde_json::to_string(&opts) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = client.send("PUT", "/v1/vm/migrate/send", Some(&body)) {
        return fail(e.to_string());
    }
    if a.detach {
        println!("migration to {} started", opts.url);
        return ExitCode::SUCCESS;
    }
    follow(&client, &opts, a.json)
}

/// Polls the status until the migration ends; prints the outcome.
fn follow(client: &Client, opts: &SendOptions, json: bool) -> ExitCode {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let mut last: Option<MigrationStatus> = None;
    let t0 = Instant::now();
    loop {
        match client.get::<MigrationStatus>("/v1/vm/migrate") {
            Ok(s) => {
                if let Some(b) = &bar {
                    b.set_length(s.memory_bytes.max(1));
                    b.set_position(s.bytes_sent.min(s.memory_bytes));
                    b.set_message(format!(
                        "{} round {} ({} MiB dirty)",
                        s.state,
                        s.iteration,
                        s.bytes_remaining >> 20
                    ));
                }
                if s.state.finished() {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    show(&s, json);
                    return if s.state == MigrationState::Completed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_VMM_ERROR)
                    };
                }
                last = Some(s);
            }
            Err(e) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                // The source exits once the destination runs the VM; a socket gone during
                // the hand-over means just that, unless the source died.
                let state = last.as_ref().map(|s| s.state);
                if state == Some(MigrationState::Completing) {
                    eprintln!(
                        "tern: the source tern exited during the switch-over to {} ({e}); the \
                         destination's log says whether it runs the VM",
                        opts.url
                    );
                } else {
                    eprintln!("tern: lost the source tern's API: {e}");
                }
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        }
        if t0.elapsed() > Duration::from_secs(opts.timeout_s + 600) {
            eprintln!("tern: the migration did not end within its timeout");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn show(s: &MigrationStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    match s.state {
        MigrationState::Completed => println!(
            "migrated to {}: downtime {:.1} ms, total {:.2} s, {:.1} MiB sent in {} rounds ({} zero pages skipped)",
            s.url.as_deref().unwrap_or("?"),
            s.downtime_ms.unwrap_or(0.0),
            s.total_ms as f64 / 1e3,
            mib(s.bytes_sent),
            s.iteration,
            s.zero_pages
        ),
        MigrationState::Failed | MigrationState::Cancelled => eprintln!(
            "tern: migration {}: {}",
            s.state,
            s.error.as_deref().unwrap_or("no reason given")
        ),
        _ => println!(
            "migration {} to {}: round {}, {:.1} MiB sent, {:.1} MiB dirty, {:.1} MiB/s, expected downtime {:.1} ms, {:.2} s",
            s.state,
            s.url.as_deref().unwrap_or("?"),
            s.iteration,
            mib(s.bytes_sent),
            mib(s.bytes_remaining),
            mib(s.bandwidth),
            s.expected_downtime_ms,
            s.total_ms as f64 / 1e3
        ),
    }
}

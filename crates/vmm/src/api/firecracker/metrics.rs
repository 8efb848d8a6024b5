//! Firecracker's metrics from tern's counters: one JSON line per flush (`FlushMetrics`, and
//! every [`METRICS_PERIOD`](super::METRICS_PERIOD)) holding what changed since the line
//! before, as Firecracker writes them.

use ::api::{Counters, DeviceCounters, VmState};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::{done, fault, info, FcState};
use crate::api::routes::answer;
use crate::api::Action;

/// Firecracker's metrics from tern's counters: totals per device kind (`block`, `net`), each
/// device on its own (`block_ID`, `net_ID`) and the vCPUs' exits (`vcpu`).
pub fn firecracker_metrics(c: &Counters) -> Map<String, Value> {
    let mut out = Map::new();
    let mut add = |group: &str, key: &str, v: u64| {
        let g = out
            .entry(group.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(g) = g {
            let e = g.entry(key.to_string()).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + v);
        }
    };
    for v in &c.vcpus {
        add("vcpu", "exit_io", v.pio_exits);
        add("vcpu", "exit_mmio", v.mmio_exits);
        add("vcpu", "exit_other", v.other_exits);
    }
    for d in &c.devices {
        match d {
            DeviceCounters::Block {
                id,
                read_ops,
                read_bytes,
                write_ops,
                write_bytes,
                flush_ops,
                errors,
                throttled,
                ..
            } => {
                let per = format!("block_{}", id.as_deref().unwrap_or("?"));
                for g in ["block", per.as_str()] {
                    add(g, "read_count", *read_ops);
                    add(g, "read_bytes", *read_bytes);
                    add(g, "write_count", *write_ops);
                    add(g, "write_bytes", *write_bytes);
                    add(g, "flush_count", *flush_ops);
                    add(g, "invalid_reqs_count", *errors);
                    add(g, "rate_limiter_throttled_events", *throttled);
                }
            }
            DeviceCounters::Net {
                id,
                rx_frames,
                rx_bytes,
                rx_dropped,
                tx_frames,
                tx_bytes,
                tx_dropped,
                throttled,
                ..
            } => {
                let per = format!("net_{}", id.as_deref().unwrap_or("?"));
                for g in ["net", per.as_str()] {
                    add(g, "rx_packets_count", *rx_frames);
                    add(g, "rx_bytes_count", *rx_bytes);
                    add(g, "rx_fails", *rx_dropped);
                    add(g, "tx_packets_count", *tx_frames);
                    add(g, "tx_bytes_count", *tx_bytes);
                    add(g, "tx_fails", *tx_dropped);
                    add(g, "rx_rate_limiter_throttled", *throttled);
                }
            }
            DeviceCounters::Other => {}
        }
    }
    out
}

/// `now` less `last`, key by key (Firecracker writes what changed since its last flush).
fn difference(now: &Map<String, Value>, last: &Map<String, Value>) -> Map<String, Value> {
    now.iter()
        .map(|(k, v)| {
            let v = match (v, last.get(k)) {
                (Value::Object(n), Some(Value::Object(l))) => Value::Object(difference(n, l)),
                (Value::Object(n), _) => Value::Object(difference(n, &Map::new())),
                (n, l) => json!(n
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(l.and_then(Value::as_u64).unwrap_or(0))),
            };
            (k.clone(), v)
        })
        .collect()
}

pub(super) async fn flush_metrics(st: &FcState) -> Response {
    // One flush at a time: each line is the difference from the one before.
    let _one = st.flush.lock().await;
    let Some(file) = st.lock().instance.metrics.clone() else {
        return fault(400, "no metrics file: PUT /metrics first");
    };
    let counters = match info(st).await {
        Ok(i) if matches!(i.state, VmState::Running | VmState::Paused) => {
            let r = answer(&st.s, Action::Counters).await;
            r.body
                .and_then(|b| serde_json::from_value::<Counters>(b).ok())
                .unwrap_or_default()
        }
        Ok(_) => Counters::default(),
        Err(r) => return r.into_response(),
    };
    let now = firecracker_metrics(&counters);
    let mut line = {
        let mut fc = st.lock();
        let d = difference(&now, &fc.last);
        fc.last = now;
        d
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    line.insert("utc_timestamp_ms".into(), json!(ms));
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    match std::io::Write::write_all(&mut &*file, text.as_bytes()) {
        Ok(()) => done(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => fault(
            500,
            "the metrics FIFO is full (its reader does not keep up): this line was dropped",
        ),
        Err(e) => fault(500, format!("cannot write the metrics: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_differences_since_the_last_flush() {
        let c = |n: u64| Counters {
            vcpus: vec![::api::VcpuCounters {
                vcpu: 0,
                pio_exits: n,
                mmio_exits: 1,
                other_exits: 0,
                cpu_time_ns: 0,
            }],
            devices: vec![],
            process: ::api::ProcessCounters::default(),
        };
        let first = firecracker_metrics(&c(10));
        assert_eq!(difference(&first, &Map::new())["vcpu"]["exit_io"], 10);
        let second = firecracker_metrics(&c(25));
        let d = difference(&second, &first);
        assert_eq!(d["vcpu"]["exit_io"], 15);
        assert_eq!(d["vcpu"]["exit_mmio"], 0);
    }
}

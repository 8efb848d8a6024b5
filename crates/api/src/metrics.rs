//! `GET /metrics`: what `GET /v1/vm` and `GET /v1/vm/counters` say, in Prometheus' text
//! exposition format (version 0.0.4), so that a Prometheus server, or anything that scrapes
//! its format, reads a VM's exits, vCPU time, memory and device I/O without a translator.
//!
//! Every family has a `# HELP` and a `# TYPE` line. Names start with `tern_`; counters end in
//! `_total`. Labels name the vCPU (`vcpu`), the exit kind (`kind`), a disk (`id`, `path`) or an
//! interface (`id`, `tap`). A VM that is not booted has only `tern_build_info` and
//! `tern_vm_state`.
//!
//! The format is small and fixed, and no crate of the allowed set writes it; it is written
//! here by hand, with the format's escaping of label values and help text.

use std::fmt::Write;

use crate::responses::{Counters, DeviceCounters, VmInfo, VmState};

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family being written: its samples follow its `# HELP` and `# TYPE` lines.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    /// One sample with `labels` (name, value) pairs.
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Starts family `name` of `kind` (`counter` or `gauge`) with its help text.
fn family<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(
        out,
        "# HELP {name} {}",
        help.replace('\\', r"\\").replace('\n', r"\n")
    );
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out, name }
}

/// A label value as the format writes it: `\`, `"` and newlines escaped.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
}

/// A duration in nanoseconds as seconds.
fn seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// The exposition of `info` and, for a booted VM, its `counters`.
pub fn render(info: &VmInfo, counters: Option<&Counters>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "tern_build_info",
        "gauge",
        "tern's version (always 1).",
    )
    .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1);
    let mut f = family(
        &mut out,
        "tern_vm_state",
        "gauge",
        "1 for the state the VM is in (created, configured, running, paused), 0 for the others.",
    );
    for s in [
        VmState::Created,
        VmState::Configured,
        VmState::Running,
        VmState::Paused,
    ] {
        f.sample(&[("state", s.as_str())], u8::from(s == info.state));
    }
    let gauges: [(&'static str, &str, Option<u64>); 5] = [
        (
            "tern_vm_vcpus",
            "vCPUs the guest has now.",
            info.vcpus.map(u64::from),
        ),
        (
            "tern_vm_vcpus_max",
            "Most vCPUs the VM may have.",
            info.vcpus_max.map(u64::from),
        ),
        (
            "tern_vm_memory_bytes",
            "Guest RAM the guest has now, in bytes (boot memory and plugged-in memory).",
            info.memory_bytes,
        ),
        (
            "tern_vm_memory_requested_bytes",
            "Guest RAM last asked for, in bytes.",
            info.memory_requested_bytes,
        ),
        (
            "tern_vm_memory_max_bytes",
            "Most guest RAM the VM may have, in bytes.",
            info.memory_max_bytes,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            family(&mut out, name, "gauge", help).sample(&[], v);
        }
    }
    if let Some(ms) = info.uptime_ms {
        family(
            &mut out,
            "tern_vm_uptime_seconds",
            "gauge",
            "Seconds since the VM was built (booted or restored).",
        )
        .sample(&[], seconds(ms.saturating_mul(1_000_000)));
    }
    let Some(c) = counters else {
        return out;
    };
    render_vcpus(&mut out, c);
    render_devices(&mut out, c);
    render_process(&mut out, c);
    out
}

fn render_process(out: &mut String, c: &Counters) {
    let p = &c.process;
    if let Some(b) = p.resident_bytes {
        family(
            out,
            "tern_process_resident_memory_bytes",
            "gauge",
            "tern's resident memory, the guest RAM it touched included, in bytes.",
        )
        .sample(&[], b);
    }
    family(
        out,
        "tern_process_resident_memory_max_bytes",
        "gauge",
        "The most resident memory tern has had, in bytes.",
    )
    .sample(&[], p.peak_resident_bytes);
    family(
        out,
        "tern_process_cpu_seconds_total",
        "counter",
        "CPU time all of tern's threads used (user and system, vCPUs included), in seconds.",
    )
    .sample(&[], seconds(p.cpu_time_ns));
}

fn render_vcpus(out: &mut String, c: &Counters) {
    if c.vcpus.is_empty() {
        return;
    }
    let mut f = family(
        out,
        "tern_vcpu_exits_total",
        "counter",
        "Exits of a vCPU to tern, by kind (pio: port I/O, mmio: memory-mapped I/O, other).",
    );
    for v in &c.vcpus {
        let id = v.vcpu.to_string();
        for (kind, n) in [
            ("pio", v.pio_exits),
            ("mmio", v.mmio_exits),
            ("other", v.other_exits),
        ] {
            f.sample(&[("vcpu", &id), ("kind", kind)], n);
        }
    }
    let mut f = family(
        out,
        "tern_vcpu_cpu_seconds_total",
        "counter",
        "CPU time a vCPU's thread used (in the guest and in tern), in seconds.",
    );
    for v in &c.vcpus {
        f.sample(&[("vcpu", &v.vcpu.to_string())], seconds(v.cpu_time_ns));
    }
}

/// A disk's counter: (name, help, value).
type Row = (
    &'static str,
    &'static str,
    fn(&DeviceCounters) -> Option<u64>,
);

const DISK_ROWS: &[Row] = &[
    (
        "tern_disk_read_ops_total",
        "Read requests a disk completed.",
        |d| match d {
            DeviceCounters::Block { read_ops, .. } => Some(*read_ops),
            _ => None,
        },
    ),
    (
        "tern_disk_read_bytes_total",
        "Bytes a disk read.",
        |d| match d {
            DeviceCounters::Block { read_bytes, .. } => Some(*read_bytes),
            _ => None,
        },
    ),
    (
        "tern_disk_write_ops_total",
        "Write requests a disk completed.",
        |d| match d {
            DeviceCounters::Block { write_ops, .. } => Some(*write_ops),
            _ => None,
        },
    ),
    (
        "tern_disk_write_bytes_total",
        "Bytes a disk wrote.",
        |d| match d {
            DeviceCounters::Block { write_bytes, .. } => Some(*write_bytes),
            _ => None,
        },
    ),
    (
        "tern_disk_flush_ops_total",
        "Flushes a disk completed.",
        |d| match d {
            DeviceCounters::Block { flush_ops, .. } => Some(*flush_ops),
            _ => None,
        },
    ),
    (
        "tern_disk_discard_ops_total",
        "Discard and write-zeroes requests a disk completed.",
        |d| match d {
            DeviceCounters::Block { discard_ops, .. } => Some(*discard_ops),
            _ => None,
        },
    ),
    (
        "tern_disk_errors_total",
        "Requests a disk answered with an error status.",
        |d| match d {
            DeviceCounters::Block { errors, .. } => Some(*errors),
            _ => None,
        },
    ),
    (
        "tern_disk_throttled_total",
        "Times a disk's queue waited for its rate limiter.",
        |d| match d {
            DeviceCounters::Block { throttled, .. } => Some(*throttled),
            _ => None,
        },
    ),
];

const NET_ROWS: &[Row] = &[
    (
        "tern_net_rx_frames_total",
        "Frames an interface delivered to the guest.",
        |d| match d {
            DeviceCounters::Net { rx_frames, .. } => Some(*rx_frames),
            _ => None,
        },
    ),
    (
        "tern_net_rx_bytes_total",
        "Bytes an interface delivered to the guest (without the virtio-net header).",
        |d| match d {
            DeviceCounters::Net { rx_bytes, .. } => Some(*rx_bytes),
            _ => None,
        },
    ),
    (
        "tern_net_rx_dropped_total",
        "Frames from the TAP that could not be delivered to the guest.",
        |d| match d {
            DeviceCounters::Net { rx_dropped, .. } => Some(*rx_dropped),
            _ => None,
        },
    ),
    (
        "tern_net_tx_frames_total",
        "Frames an interface sent to its TAP.",
        |d| match d {
            DeviceCounters::Net { tx_frames, .. } => Some(*tx_frames),
            _ => None,
        },
    ),
    (
        "tern_net_tx_bytes_total",
        "Bytes an interface sent to its TAP (without the virtio-net header).",
        |d| match d {
            DeviceCounters::Net { tx_bytes, .. } => Some(*tx_bytes),
            _ => None,
        },
    ),
    (
        "tern_net_tx_dropped_total",
        "Guest frames dropped: malformed, oversized, refused by the host, or link down.",
        |d| match d {
            DeviceCounters::Net { tx_dropped, .. } => Some(*tx_dropped),
            _ => None,
        },
    ),
    (
        "tern_net_link_down_total",
        "Times an interface's TAP went away.",
        |d| match d {
            DeviceCounters::Net { link_down, .. } => Some(*link_down),
            _ => None,
        },
    ),
    (
        "tern_net_throttled_total",
        "Times an interface's queue waited for a rate limiter.",
        |d| match d {
            DeviceCounters::Net { throttled, .. } => Some(*throttled),
            _ => None,
        },
    ),
];

fn render_devices(out: &mut String, c: &Counters) {
    for (rows, kind) in [(DISK_ROWS, "disk"), (NET_ROWS, "net")] {
        let devices: Vec<_> = c
            .devices
            .iter()
            .filter(|d| match d {
                DeviceCounters::Block { .. } => kind == "disk",
                DeviceCounters::Net { .. } => kind == "net",
                DeviceCounters::Other => false,
            })
            .collect();
        if devices.is_empty() {
            continue;
        }
        for (name, help, value) in rows {
            let mut f = family(out, name, "counter", help);
            for (i, d) in devices.iter().enumerate() {
                let (id, where_, host) = match d {
                    DeviceCounters::Block { id, path, .. } => (id, "path", path),
                    DeviceCounters::Net { id, tap, .. } => (id, "tap", tap),
                    DeviceCounters::Other => continue,
                };
                // A device without an id (none is, once the VM runs) is named by its place.
                let id = id.clone().unwrap_or_else(|| format!("{kind}{i}"));
                if let Some(v) = value(d) {
                    f.sample(&[("id", &id), (where_, host)], v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responses::VcpuCounters;

    #[test]
    fn a_vm_not_booted_has_its_state_only() {
        let text = render(&VmInfo::new(VmState::Created, None), None);
        assert!(
            text.contains("tern_vm_state{state=\"created\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_vm_state{state=\"running\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("tern_vcpu"), "{text}");
        assert!(!text.contains("tern_vm_memory"), "{text}");
    }

    #[test]
    fn every_family_has_help_and_type_and_labels_are_escaped() {
        let mut info = VmInfo::new(VmState::Running, None);
        info.vcpus = Some(2);
        info.memory_bytes = Some(64 << 20);
        info.uptime_ms = Some(1500);
        let c = Counters {
            vcpus: vec![VcpuCounters {
                vcpu: 1,
                pio_exits: 4,
                mmio_exits: 5,
                other_exits: 6,
                cpu_time_ns: 2_000_000_001,
            }],
            devices: vec![
                DeviceCounters::Block {
                    id: Some("disk0".into()),
                    path: "/a \"b\"\\c\nd".into(),
                    read_ops: 7,
                    read_bytes: 4096,
                    write_ops: 0,
                    write_bytes: 0,
                    flush_ops: 0,
                    discard_ops: 0,
                    errors: 0,
                    throttled: 0,
                },
                DeviceCounters::Other,
            ],
            process: crate::ProcessCounters {
                resident_bytes: Some(8 << 20),
                peak_resident_bytes: 9 << 20,
                cpu_time_ns: 1_500_000_000,
            },
        };
        let text = render(&info, Some(&c));
        assert!(
            text.contains(
                "tern_process_resident_memory_bytes 8388608
"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tern_process_cpu_seconds_total 1.500000000
"
            ),
            "{text}"
        );
        assert!(
            text.contains("tern_vm_uptime_seconds 1.500000000\n"),
            "{text}"
        );
        assert!(text.contains("tern_vm_memory_bytes 67108864\n"), "{text}");
        assert!(
            text.contains("tern_vcpu_exits_total{vcpu=\"1\",kind=\"mmio\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_vcpu_cpu_seconds_total{vcpu=\"1\"} 2.000000001\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "tern_disk_read_bytes_total{id=\"disk0\",path=\"/a \\\"b\\\"\\\\c\\nd\"} 4096\n"
            ),
            "{text}"
        );
        assert!(!text.contains("tern_net_"), "{text}");
        // Every sample's family was introduced by its HELP and TYPE lines, once.
        let mut seen = std::collections::BTreeSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} twice");
                current = name;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(rest.starts_with(&format!("{current} ")), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
    }
}

//! The bodies of the API's answers: `GET /v1/vm` ([`VmInfo`]), `GET /v1/vm/counters`
//! ([`Counters`]) and every error ([`ErrorBody`]).
//!
//! The VMM builds these and the server sends them; clients read them back. Fields a state does
//! not have are left out of the JSON rather than sent as `null` (`vcpus` before boot, say).
//! Reading is lenient: fields a newer tern adds are ignored.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// tern runs with only an API socket: no configuration yet.
    Created,
    /// A configuration was accepted (`PUT /v1/vm`); the VM is not booted.
    Configured,
    /// The VM runs.
    Running,
    /// Every vCPU and device queue is stopped (`PUT /v1/vm/pause`).
    Paused,
}

impl VmState {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Configured => "configured",
            VmState::Running => "running",
            VmState::Paused => "paused",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of `GET /v1/vm`. Before boot only `state` and `config` are sent; a booted VM
/// (running or paused) has every field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Where the VM is.
    pub state: VmState,
    /// The configuration: `null` until one is given.
    pub config: Option<VmConfig>,
    /// Number of vCPUs the guest has now (present; with CPU hotplug, those added and not yet
    /// removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// The number of vCPUs last asked for (`PUT /v1/vm/resize`); the guest may still be adding
    /// or removing some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus_requested: Option<u32>,
    /// Most vCPUs the VM may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus_max: Option<u32>,
    /// Guest RAM in bytes the guest has now: its boot memory and the hotplugged memory its
    /// driver plugged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Guest RAM in bytes last asked for (`PUT /v1/vm/resize`); the guest may still be
    /// plugging or unplugging memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_requested_bytes: Option<u64>,
    /// Most guest RAM in bytes the VM may have (`max_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_bytes: Option<u64>,
    /// Milliseconds since the VM was built (boot or restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// The VM generation ID: 32 hex digits, bytes in guest-memory order; new at boot and
    /// after every restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// The TAPs of the VM's network interfaces, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taps: Option<Vec<String>>,
}

impl VmInfo {
    /// What is known of a VM in `state` with `config` before boot: no booted VM's fields.
    pub fn new(state: VmState, config: Option<VmConfig>) -> Self {
        VmInfo {
            state,
            config,
            vcpus: None,
            vcpus_requested: None,
            vcpus_max: None,
            memory_bytes: None,
            memory_requested_bytes: None,
            memory_max_bytes: None,
            uptime_ms: None,
            generation_id: None,
            taps: None,
        }
    }
}

/// The body of `GET /v1/vm/counters`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// One entry per vCPU, in order.
    pub vcpus: Vec<VcpuCounters>,
    /// The disks, then the network interfaces, in configuration order.
    pub devices: Vec<DeviceCounters>,
    /// tern's own process.
    #[serde(default)]
    pub process: ProcessCounters,
}

/// tern's process: its memory (the guest's RAM that was touched included) and CPU time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCounters {
    /// Resident memory now, in bytes (absent where `/proc` cannot be read, as under
    /// `--landlock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// The most resident memory it has had, in bytes.
    pub peak_resident_bytes: u64,
    /// CPU time all its threads used (user and system), in nanoseconds.
    pub cpu_time_ns: u64,
}

/// One vCPU's exits to the VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// The vCPU's index.
    pub vcpu: u32,
    /// Port I/O exits.
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Every other exit.
    pub other_exits: u64,
    /// CPU time the vCPU's thread used, in nanoseconds (in the guest and in tern, since the
    /// thread started: a restored or migrated VM counts from then).
    #[serde(default)]
    pub cpu_time_ns: u64,
}

/// One device's I/O counters, tagged by `"type"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceCounters {
    /// A virtio-blk disk.
    Block {
        /// The disk's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The image, as configured.
        path: String,
        /// Read requests completed.
        read_ops: u64,
        /// Bytes read.
        read_bytes: u64,
        /// Write requests completed.
        write_ops: u64,
        /// Bytes written.
        write_bytes: u64,
        /// Flushes completed.
        flush_ops: u64,
        /// Discard and write-zeroes requests completed.
        discard_ops: u64,
        /// Requests answered with an error status.
        errors: u64,
        /// Times a queue waited for the rate limiter.
        throttled: u64,
    },
    /// A virtio-net interface.
    Net {
        /// The interface's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The TAP.
        tap: String,
        /// Frames delivered to the guest.
        rx_frames: u64,
        /// Bytes delivered to the guest (without the vnet header).
        rx_bytes: u64,
        /// Frames from the TAP that could not be delivered.
        rx_dropped: u64,
        /// Frames sent to the TAP.
        tx_frames: u64,
        /// Bytes sent to the TAP (without the vnet header).
        tx_bytes: u64,
        /// Guest frames dropped: malformed, oversized, refused by the host, or link down.
        tx_dropped: u64,
        /// Times the TAP went away.
        link_down: u64,
        /// Times a queue waited for a rate limiter.
        throttled: u64,
    },
    /// A device type this client does not know (sent by a newer tern); never sent by this
    /// one.
    #[serde(other)]
    Other,
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemSize;
    use serde_json::Value;

    /// `value` as the server sends it: through a `serde_json::Value`, whose objects list
    /// their keys in order.
    fn as_served(value: &impl Serialize) -> String {
        serde_json::to_value(value).unwrap().to_string()
    }

    fn booted() -> VmInfo {
        let config = VmConfig {
            kernel: Some("/k".into()),
            cpus: 2,
            memory: MemSize(256 << 20),
            ..VmConfig::default()
        };
        VmInfo {
            vcpus: Some(2),
            memory_bytes: Some(256 << 20),
            uptime_ms: Some(1234),
            generation_id: Some("00112233445566778899aabbccddeeff".into()),
            taps: Some(vec!["tap0".into()]),
            ..VmInfo::new(VmState::Paused, Some(config))
        }
    }

    #[test]
    fn info_before_boot_has_state_and_config_only() {
        let created = VmInfo::new(VmState::Created, None);
        assert_eq!(
            serde_json::to_string(&created).unwrap(),
            r#"{"state":"created","config":null}"#
        );
        assert_eq!(as_served(&created), r#"{"config":null,"state":"created"}"#);
        let configured = VmInfo::new(VmState::Configured, Some(VmConfig::default()));
        let v: Value = serde_json::to_value(&configured).unwrap();
        assert_eq!(v["state"], "configured");
        assert_eq!(v["config"]["cpus"], 1);
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn info_of_a_booted_vm() {
        let info = booted();
        let config = serde_json::to_string(info.config.as_ref().unwrap()).unwrap();
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            format!(
                r#"{{"state":"paused","config":{config},"vcpus":2,"memory_bytes":268435456,"uptime_ms":1234,"generation_id":"00112233445566778899aabbccddeeff","taps":["tap0"]}}"#
            )
        );
        // What the server sends: as before these types existed, with the disk's id added.
        let config = as_served(info.config.as_ref().unwrap());
        assert_eq!(
            as_served(&info),
            format!(
                r#"{{"config":{config},"generation_id":"00112233445566778899aabbccddeeff","memory_bytes":268435456,"state":"paused","taps":["tap0"],"uptime_ms":1234,"vcpus":2}}"#
            )
        );
        // A VM without network interfaces still lists its (no) TAPs.
        let no_taps = VmInfo {
            taps: Some(Vec::new()),
            ..booted()
        };
        assert!(as_served(&no_taps).contains(r#""taps":[]"#));
        let back: VmInfo = serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn states_are_lowercase() {
        for (s, name) in [
            (VmState::Created, "created"),
            (VmState::Configured, "configured"),
            (VmState::Running, "running"),
            (VmState::Paused, "paused"),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{name}\""));
            assert_eq!(s.to_string(), name);
            assert_eq!(
                serde_json::from_str::<VmState>(&format!("\"{name}\"")).unwrap(),
                s
            );
        }
    }

    fn counters() -> Counters {
        Counters {
            vcpus: vec![VcpuCounters {
                vcpu: 0,
                pio_exits: 1,
                mmio_exits: 2,
                other_exits: 3,
                cpu_time_ns: 7,
            }],
            devices: vec![
                DeviceCounters::Block {
                    id: Some("disk0".into()),
                    path: "/d.img".into(),
                    read_ops: 1,
                    read_bytes: 512,
                    write_ops: 2,
                    write_bytes: 1024,
                    flush_ops: 3,
                    discard_ops: 4,
                    errors: 5,
                    throttled: 6,
                },
                DeviceCounters::Net {
                    id: None,
                    tap: "tap0".into(),
                    rx_frames: 1,
                    rx_bytes: 60,
                    rx_dropped: 2,
                    tx_frames: 3,
                    tx_bytes: 180,
                    tx_dropped: 4,
                    link_down: 5,
                    throttled: 6,
                },
            ],
            process: ProcessCounters {
                resident_bytes: Some(4096),
                peak_resident_bytes: 8192,
                cpu_time_ns: 9,
            },
        }
    }

    #[test]
    fn counters_shape() {
        let c = counters();
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            concat!(
                r#"{"vcpus":[{"vcpu":0,"pio_exits":1,"mmio_exits":2,"other_exits":3,"cpu_time_ns":7}],"#,
                r#""devices":["#,
                r#"{"type":"block","id":"disk0","path":"/d.img","read_ops":1,"read_bytes":512,"#,
                r#""write_ops":2,"#,
                r#""write_bytes":1024,"flush_ops":3,"discard_ops":4,"errors":5,"throttled":6},"#,
                r#"{"type":"net","tap":"tap0","rx_frames":1,"rx_bytes":60,"rx_dropped":2,"#,
                r#""tx_frames":3,"tx_bytes":180,"tx_dropped":4,"link_down":5,"throttled":6}],"#,
                r#""process":{"resident_bytes":4096,"peak_resident_bytes":8192,"cpu_time_ns":9}}"#
            )
        );
        // What the server sends: as before these types existed, with the disk's id added.
        assert_eq!(
            as_served(&c),
            concat!(
                r#"{"devices":["#,
                r#"{"discard_ops":4,"errors":5,"flush_ops":3,"id":"disk0","path":"/d.img","#,
                r#""read_bytes":512,"#,
                r#""read_ops":1,"throttled":6,"type":"block","write_bytes":1024,"write_ops":2},"#,
                r#"{"link_down":5,"rx_bytes":60,"rx_dropped":2,"rx_frames":1,"tap":"tap0","#,
                r#""throttled":6,"tx_bytes":180,"tx_dropped":4,"tx_frames":3,"type":"net"}],"#,
                r#""process":{"cpu_time_ns":9,"peak_resident_bytes":8192,"resident_bytes":4096},"#,
                r#""vcpus":[{"cpu_time_ns":7,"mmio_exits":2,"other_exits":3,"pio_exits":1,"vcpu":0}]}"#
            )
        );
        let back: Counters = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            serde_json::to_string(&Counters::default()).unwrap(),
            r#"{"vcpus":[],"devices":[],"process":{"peak_resident_bytes":0,"cpu_time_ns":0}}"#
        );
    }

    #[test]
    fn clients_read_what_a_newer_tern_adds() {
        let c: Counters = serde_json::from_str(
            r#"{"vcpus":[{"vcpu":0,"pio_exits":1,"mmio_exits":2,"other_exits":3,"hlt":9}],
                "devices":[{"type":"fs","tag":"share"}],"since_ms":5}"#,
        )
        .unwrap();
        assert_eq!(c.devices, vec![DeviceCounters::Other]);
        let i: VmInfo =
            serde_json::from_str(r#"{"state":"created","config":null,"owner":"x"}"#).unwrap();
        assert_eq!(i, VmInfo::new(VmState::Created, None));
    }

    #[test]
    fn error_shape() {
        let e = ErrorBody {
            error: "cannot pause: the VM is created".into(),
        };
        let text = r#"{"error":"cannot pause: the VM is created"}"#;
        assert_eq!(serde_json::to_string(&e).unwrap(), text);
        assert_eq!(as_served(&e), text);
        assert_eq!(serde_json::from_str::<ErrorBody>(text).unwrap(), e);
    }
}

//! The memory balloon: how a VM gets one (`--balloon`, [`BalloonConfig`]), the body of
//! `PUT /v1/vm/balloon` ([`BalloonRequest`]) and the answer of `GET /v1/vm/balloon`
//! ([`BalloonInfo`], with the guest's [`BalloonStats`]).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::MemSize;

/// A virtio-balloon device and what it offers the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The guest's driver deflates the balloon when the guest runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// The guest reports memory it freed, and the host frees it too.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Seconds between requests for the guest's memory statistics; 0: no statistics.
    #[serde(default)]
    pub stats_s: u32,
    /// The balloon's size when the VM starts (the guest's driver inflates it to that as it
    /// comes up); none: empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<MemSize>,
}

/// Longest statistics interval accepted: one day.
pub const MAX_STATS_S: u32 = 24 * 60 * 60;

impl FromStr for BalloonConfig {
    type Err = String;

    /// Parses `[deflate_on_oom=on|off][,free_page_reporting=on|off][,stats_s=N][,size=SIZE]`
    /// (empty: all off, an empty balloon).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = BalloonConfig::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(format!(
                    "invalid balloon setting '{item}': expected key=value"
                ));
            };
            let on_off = |v: &str| match v {
                "on" | "true" => Ok(true),
                "off" | "false" => Ok(false),
                _ => Err(format!("invalid balloon {k} '{v}': expected on or off")),
            };
            match k {
                "deflate_on_oom" => c.deflate_on_oom = on_off(v)?,
                "free_page_reporting" => c.free_page_reporting = on_off(v)?,
                "stats_s" => {
                    c.stats_s = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_STATS_S)
                        .ok_or_else(|| {
                            format!("invalid balloon stats_s '{v}': expected 0 to {MAX_STATS_S}")
                        })?
                }
                "size" => {
                    c.size = Some(
                        v.parse()
                            .map_err(|e| format!("invalid balloon size '{v}': {e}"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "invalid balloon setting '{item}': expected deflate_on_oom, \
                         free_page_reporting, stats_s or size"
                    ))
                }
            }
        }
        Ok(c)
    }
}

/// The body of `PUT /v1/vm/balloon`: how much memory the balloon should take from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonRequest {
    /// The balloon's target size (a multiple of 4 KiB is used, rounded down).
    pub size: MemSize,
}

/// The answer of `GET /v1/vm/balloon`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The size asked for, in bytes.
    pub target_bytes: u64,
    /// The size the guest's driver says it reached, in bytes.
    pub actual_bytes: u64,
    /// The guest's memory, in bytes.
    pub guest_memory_bytes: u64,
    /// What the device offers.
    pub config: BalloonConfig,
    /// Whether the guest's driver accepted deflate-on-OOM, free page reporting, statistics.
    pub driver: BalloonDriver,
    /// Memory freed on the host because the guest put it in the balloon, in total (bytes).
    pub inflated_bytes: u64,
    /// Memory the guest took back from the balloon, in total (bytes).
    pub deflated_bytes: u64,
    /// Memory freed on the host because the guest reported it free, in total (bytes).
    pub reported_bytes: u64,
    /// Page numbers outside guest memory the guest sent (ignored).
    pub invalid_pages: u64,
    /// The guest's last statistics, when it sent any.
    pub stats: Option<BalloonStats>,
}

/// What the guest's balloon driver accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonDriver {
    /// Deflate on OOM.
    pub deflate_on_oom: bool,
    /// Free page reporting.
    pub free_page_reporting: bool,
    /// The statistics queue.
    pub stats: bool,
}

/// The guest's memory statistics as its balloon driver last reported them (bytes, or counts
/// for faults and events); a figure the driver did not send is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Milliseconds since they arrived.
    pub age_ms: u64,
    /// Each figure by name (`free_memory`, `total_memory`, `available_memory`, `disk_caches`,
    /// `swap_in`, `swap_out`, `major_faults`, `minor_faults`, `oom_kills`, ...).
    pub values: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_settings_parse_and_bad_ones_are_named() {
        assert_eq!("".parse::<BalloonConfig>(), Ok(BalloonConfig::default()));
        let c: BalloonConfig = "deflate_on_oom=on,free_page_reporting=on,stats_s=2"
            .parse()
            .unwrap();
        assert!(c.deflate_on_oom && c.free_page_reporting && c.stats_s == 2);
        assert_eq!(c.size, None);
        let c: BalloonConfig = "size=1G".parse().unwrap();
        assert_eq!(c.size, Some(MemSize(1 << 30)));
        for (bad, why) in [
            ("stats_s=-1", "stats_s"),
            ("stats_s=100000", "stats_s"),
            ("deflate_on_oom=maybe", "expected on or off"),
            ("size=lots", "invalid balloon size 'lots'"),
            ("colour=red", "expected deflate_on_oom"),
            ("on", "expected key=value"),
        ] {
            let e = bad.parse::<BalloonConfig>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let r: BalloonRequest = serde_json::from_str(r#"{"size":"256M"}"#).unwrap();
        assert_eq!(r.size.0, 256 << 20);
        assert!(serde_json::from_str::<BalloonRequest>(r#"{"size":"x"}"#).is_err());
        assert!(serde_json::from_str::<BalloonRequest>(r#"{"size":"1G","x":1}"#).is_err());
    }
}

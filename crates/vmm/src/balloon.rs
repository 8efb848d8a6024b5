//! The balloon as the API shows and drives it: `GET /v1/vm/balloon` and `PUT /v1/vm/balloon`
//! on the device's handle (`virtio::devices::balloon`).

use ::api::balloon::{BalloonDriver, BalloonInfo, BalloonRequest, BalloonStats};
use virtio::devices::balloon::{F_DEFLATE_ON_OOM, F_PAGE_REPORTING, F_STATS_VQ, PAGE, STAT_NAMES};
use virtio::devices::BalloonHandle;

use crate::api::Reply;
use crate::VmConfig;

/// The answer for a VM without a balloon.
pub fn none() -> Reply {
    Reply::error(
        400,
        "the VM has no balloon (start it with --balloon, or \"balloon\": {} in its configuration)",
    )
}

/// The balloon's state as `GET /v1/vm/balloon` shows it.
pub fn info(b: &BalloonHandle, config: &VmConfig) -> BalloonInfo {
    let st = b.status();
    let acked = |bit: u32| st.features & (1 << bit) != 0;
    BalloonInfo {
        target_bytes: u64::from(st.target_pages) * PAGE,
        actual_bytes: u64::from(st.actual_pages) * PAGE,
        guest_memory_bytes: config.memory.0,
        config: config.balloon.unwrap_or_default(),
        driver: BalloonDriver {
            deflate_on_oom: acked(F_DEFLATE_ON_OOM),
            free_page_reporting: acked(F_PAGE_REPORTING),
            stats: acked(F_STATS_VQ),
        },
        inflated_bytes: st.inflated_pages * PAGE,
        deflated_bytes: st.deflated_pages * PAGE,
        reported_bytes: st.reported_bytes,
        invalid_pages: st.invalid_pages,
        stats: st.stats.map(|s| BalloonStats {
            age_ms: s.at.elapsed().as_millis() as u64,
            values: s
                .values
                .iter()
                .map(|&(tag, v)| {
                    let name = STAT_NAMES
                        .get(usize::from(tag))
                        .map_or_else(|| format!("tag_{tag}"), |n| n.to_string());
                    (name, v)
                })
                .collect(),
        }),
    }
}

/// Sets the balloon's target (`PUT /v1/vm/balloon`).
pub fn set(b: &BalloonHandle, r: &BalloonRequest) -> Reply {
    let pages = r.size.0 / PAGE;
    let Ok(pages) = u32::try_from(pages) else {
        return Reply::error(400, format!("invalid balloon size {}: too large", r.size));
    };
    match b.set_target(pages) {
        Ok(()) => {
            tracing::info!("balloon: target {} MiB", r.size.0 >> 20);
            Reply::done()
        }
        Err(e) if e.contains("larger than") => {
            Reply::error(400, format!("invalid balloon size: {e}"))
        }
        Err(e) => Reply::error(500, format!("cannot resize the balloon: {e}")),
    }
}

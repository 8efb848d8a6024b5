//! The Firecracker dialect's balloon routes on tern's virtio-balloon: `PUT /balloon` before
//! the start (its `amount_mib` is the size the VM starts with), `PATCH /balloon` after it,
//! `GET /balloon` and `GET /balloon/statistics` from `GET /v1/vm/balloon`. The statistics
//! interval is fixed when the VM is built: `PATCH /balloon/statistics` is refused.

use ::api::balloon::{BalloonInfo, BalloonRequest};
use ::api::config::MemSize;
use ::api::firecracker::{Balloon, BalloonStatsUpdate, BalloonUpdate};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{body, done, fault, pre_boot, relay, FcState, Refused};
use crate::api::routes::answer;
use crate::api::{Action, Reply};

const NONE: &str = "No balloon device configured.";

/// Sets the running VM's balloon to `mib` MiB.
pub(super) async fn set(st: &FcState, mib: u32) -> Reply {
    let req = BalloonRequest {
        size: MemSize(u64::from(mib) << 20),
    };
    answer(&st.s, Action::BalloonSet(req)).await
}

/// The running VM's balloon, as `GET /v1/vm/balloon` tells it.
async fn info(st: &FcState) -> Result<BalloonInfo, Refused> {
    let r = answer(&st.s, Action::BalloonInfo).await;
    match (r.status, r.body) {
        (200, Some(b)) => {
            serde_json::from_value(b).map_err(|e| Refused(500, format!("balloon: {e}")))
        }
        (404, _) => Err(Refused(400, NONE.into())),
        (s, b) => Err(Refused(
            if s >= 500 { 500 } else { 400 },
            b.and_then(|b| b["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| "cannot read the balloon".into()),
        )),
    }
}

pub(super) async fn balloon_put(State(st): State<FcState>, b: Bytes) -> Response {
    let b = match body::<Balloon>(&b) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    if let Err(e) = b.config() {
        return fault(400, e);
    }
    fc.instance.config.balloon = Some(b);
    done()
}

pub(super) async fn balloon_patch(State(st): State<FcState>, b: Bytes) -> Response {
    let u = match body::<BalloonUpdate>(&b) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    {
        let mut fc = st.lock();
        if !fc.instance.started {
            return match fc.instance.config.balloon.as_mut() {
                Some(b) => {
                    b.amount_mib = u.amount_mib;
                    done()
                }
                None => fault(400, NONE),
            };
        }
    }
    relay(set(&st, u.amount_mib).await)
}

pub(super) async fn balloon_get(State(st): State<FcState>) -> Response {
    let configured = {
        let fc = st.lock();
        if !fc.instance.started {
            return match &fc.instance.config.balloon {
                Some(b) => Json(b.clone()).into_response(),
                None => fault(400, NONE),
            };
        }
        fc.instance.config.balloon.clone()
    };
    match info(&st).await {
        Ok(i) => Json(Balloon {
            amount_mib: (i.target_bytes >> 20) as u32,
            deflate_on_oom: i.config.deflate_on_oom,
            stats_polling_interval_s: i.config.stats_s,
            free_page_reporting: Some(i.config.free_page_reporting),
            free_page_hinting: configured.and_then(|b| b.free_page_hinting),
        })
        .into_response(),
        Err(r) => r.into_response(),
    }
}

pub(super) async fn balloon_stats(State(st): State<FcState>) -> Response {
    if !st.lock().instance.started {
        return fault(400, "the balloon's statistics exist once the VM runs");
    }
    let i = match info(&st).await {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    if i.config.stats_s == 0 {
        return fault(400, "Statistics are not enabled.");
    }
    let mut out = Map::new();
    out.insert("target_pages".into(), json!(i.target_bytes >> 12));
    out.insert("actual_pages".into(), json!(i.actual_bytes >> 12));
    out.insert("target_mib".into(), json!(i.target_bytes >> 20));
    out.insert("actual_mib".into(), json!(i.actual_bytes >> 20));
    for (k, v) in i.stats.map(|s| s.values).unwrap_or_default() {
        // Firecracker's name for the one figure tern names otherwise.
        let k = if k == "oom_kills" {
            "oom_kill".into()
        } else {
            k
        };
        out.insert(k, json!(v));
    }
    Json(Value::Object(out)).into_response()
}

pub(super) async fn balloon_stats_patch(b: Bytes) -> Response {
    match body::<BalloonStatsUpdate>(&b) {
        Ok(_) => fault(
            400,
            "tern fixes the statistics interval when the VM is built: give stats_polling_interval_s in PUT /balloon",
        ),
        Err(r) => r.into_response(),
    }
}

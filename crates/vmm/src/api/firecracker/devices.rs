//! The Firecracker dialect's drives, network interfaces and entropy device: kept in the
//! instance's configuration before the start, then drives and interfaces changed on the
//! running VM through tern's own `PATCH` actions (rate limits bucket by bucket, another file
//! behind a drive).

use ::api::firecracker::*;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};

use super::{body, done, fault, pre_boot, relay, FcState, Refused};
use crate::api::routes::answer;
use crate::api::Action;

/// The id in the URL, which must be the body's.
fn same_id(url: Result<UrlPath<String>, PathRejection>, body_id: &str) -> Result<String, Refused> {
    match url {
        Ok(UrlPath(id)) if id == body_id => Ok(id),
        Ok(UrlPath(id)) => Err(Refused(
            400,
            format!("the id in the path ({id}) is not the body's ({body_id})"),
        )),
        Err(e) => Err(Refused(400, e.body_text())),
    }
}

pub(super) async fn drive_put(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let d = match body::<Drive>(&b) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = same_id(url, &d.drive_id) {
        return r.into_response();
    }
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    match fc.instance.config.put_drive(d) {
        Ok(()) => done(),
        Err(e) => fault(400, e),
    }
}

pub(super) async fn drive_patch(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let p = match body::<DrivePatch>(&b) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let id = match same_id(url, &p.drive_id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    {
        let mut fc = st.lock();
        if !fc.instance.started {
            let Some(d) = fc
                .instance
                .config
                .drives
                .iter_mut()
                .find(|d| d.drive_id == id)
            else {
                return fault(400, format!("no drive {id}"));
            };
            let mut new = d.clone();
            if let Some(path) = &p.path_on_host {
                new.path_on_host = Some(path.clone());
            }
            if let Some(r) = &p.rate_limiter {
                new.rate_limiter = Some(d.rate_limiter.clone().unwrap_or_default().merged(r));
            }
            if let Err(e) = disk_config(&new) {
                return fault(400, e);
            }
            *d = new;
            return done();
        }
    }
    // Only the buckets given change.
    let (bw, iops) = match p.rate_limiter.as_ref().map(RateLimiter::given_rates) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return fault(400, e),
        None => (None, None),
    };
    if bw.is_none() && iops.is_none() && p.path_on_host.is_none() {
        return done();
    }
    // A new file behind the drive (Kata's and firecracker-containerd's placeholder drives).
    let update = ::api::devices::DiskUpdate {
        iops,
        bw,
        size: None,
        path: p.path_on_host.clone(),
    };
    let r = answer(
        &st.s,
        Action::DiskUpdate {
            id: id.clone(),
            update,
        },
    )
    .await;
    if (200..300).contains(&r.status) {
        // `GET /vm/config` shows the drive as it is now.
        let mut fc = st.lock();
        if let Some(d) = fc
            .instance
            .config
            .drives
            .iter_mut()
            .find(|d| d.drive_id == id)
        {
            if let Some(path) = &p.path_on_host {
                d.path_on_host = Some(path.clone());
            }
            if let Some(r) = &p.rate_limiter {
                d.rate_limiter = Some(d.rate_limiter.clone().unwrap_or_default().merged(r));
            }
        }
    }
    relay(r)
}

pub(super) async fn net_put(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let n = match body::<NetworkInterface>(&b) {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = same_id(url, &n.iface_id) {
        return r.into_response();
    }
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    match fc.instance.config.put_net(n) {
        Ok(()) => done(),
        Err(e) => fault(400, e),
    }
}

pub(super) async fn net_patch(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let p = match body::<NetworkInterfacePatch>(&b) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let id = match same_id(url, &p.iface_id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    {
        let mut fc = st.lock();
        if !fc.instance.started {
            let Some(n) = fc
                .instance
                .config
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == id)
            else {
                return fault(400, format!("no network interface {id}"));
            };
            let mut new = n.clone();
            let merge = |old: &Option<RateLimiter>, patch: &Option<RateLimiter>| match patch {
                Some(p) => Some(old.clone().unwrap_or_default().merged(p)),
                None => old.clone(),
            };
            new.rx_rate_limiter = merge(&n.rx_rate_limiter, &p.rx_rate_limiter);
            new.tx_rate_limiter = merge(&n.tx_rate_limiter, &p.tx_rate_limiter);
            if let Err(e) = net_config(&new) {
                return fault(400, e);
            }
            *n = new;
            return done();
        }
    }
    // Only the buckets given change.
    let rates = |r: &Option<RateLimiter>| match r {
        Some(r) => r.given_rates(),
        None => Ok((None, None)),
    };
    let ((rx_bw, rx_ops), (tx_bw, tx_ops)) =
        match (rates(&p.rx_rate_limiter), rates(&p.tx_rate_limiter)) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) => return fault(400, e),
        };
    let update = ::api::devices::NetUpdate {
        rx_bw,
        rx_ops,
        tx_bw,
        tx_ops,
    };
    relay(answer(&st.s, Action::NetUpdate { id, update }).await)
}

/// `PUT /entropy`: tern's virtio-rng, before the start.
pub(super) async fn entropy(State(st): State<FcState>, b: Bytes) -> Response {
    let e = match body::<Entropy>(&b) {
        Ok(e) => e,
        Err(r) => return r.into_response(),
    };
    if let Err(m) = e.check() {
        return fault(400, m);
    }
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    fc.instance.config.entropy = Some(e);
    done()
}

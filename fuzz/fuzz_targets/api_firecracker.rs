//! Firecracker-dialect API requests (`tern firecracker`): a method, one of the dialect's routes
//! (its `{id}` filled in) or any path, and a body, through the router as the server runs it
//! with a fresh instance and no VMM behind it: every body parser and the checks of what tern
//! cannot honour.
#![no_main]
use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::runtime;
use tower_service::Service;

/// Answered 200 without a VMM: what the instance keeps itself.
const LOCAL: &[&str] = &["/version", "/machine-config", "/vm/config"];

fuzz_target!(|data: &[u8]| {
    let [sel, pick, rest @ ..] = data else {
        return;
    };
    let (sel, pick) = (*sel, usize::from(*pick));
    const METHODS: [&str; 4] = ["GET", "PUT", "PATCH", "DELETE"];
    let routes = vmm::api::firecracker::ROUTES;
    let (path, body) = if sel & 0x80 != 0 {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (
                String::from_utf8_lossy(&rest[..i]).into_owned(),
                &rest[i + 1..],
            ),
            None => return,
        }
    } else {
        let (_, p) = routes[pick % routes.len()];
        let id = ["rootfs", "eth0", "..", "%7Bid%7D"][usize::from(sel & 0x03)];
        (p.replace("{id}", id), rest)
    };
    let method = METHODS[(pick / routes.len() + usize::from(sel >> 4)) % 4];
    let Ok(req) = Request::builder()
        .method(method)
        .uri(&path)
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let mut router = vmm::api::fuzzing::firecracker_router();
    runtime().block_on(async {
        let resp = router.call(req).await.unwrap();
        let status = resp.status().as_u16();
        assert!(
            status != 200
                || (method == "GET"
                    && (LOCAL.contains(&path.as_str()) || path.starts_with("/ping"))),
            "{method} {path} answered 200 with no VMM"
        );
        let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
    });
});

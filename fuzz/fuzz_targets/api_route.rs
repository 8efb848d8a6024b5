//! API requests: a method, a route (one of the served ones, its `{id}` filled in, or any
//! path), a query and a body
//! through the API's router as the server runs it: each route's body and query parsing, and
//! the answers to what does not fit.
#![no_main]
use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::runtime;
use tower_service::Service;

fuzz_target!(|data: &[u8]| {
    let [sel, pick, rest @ ..] = data else {
        return;
    };
    let (sel, pick) = (*sel, usize::from(*pick));
    const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];
    // Route and query are the text before the first newline, when `sel` says so.
    let (path, body) = if sel & 0x80 != 0 {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (
                String::from_utf8_lossy(&rest[..i]).into_owned(),
                &rest[i + 1..],
            ),
            None => return,
        }
    } else {
        let routes = vmm::api::ROUTES;
        let (_, p) = routes[pick % routes.len()];
        let q = if sel & 0x10 != 0 { "?force=true" } else { "" };
        // A device route names a device.
        let id = ["disk0", "net0", "nope", "..", "%7Bid%7D"][usize::from(sel & 0x07) % 5];
        (format!("{}{q}", p.replace("{id}", id)), rest)
    };
    let method = METHODS[(pick / vmm::api::ROUTES.len() + usize::from(sel >> 5)) % 5];
    let mut req = Request::builder().method(method).uri(&path);
    if sel & 0x08 == 0 {
        req = req.header("content-type", "application/json");
    }
    let Ok(req) = req.body(Body::from(body.to_vec())) else {
        return;
    };
    let mut router = vmm::api::fuzzing::router();
    runtime().block_on(async {
        let resp = router.call(req).await.unwrap();
        let status = resp.status().as_u16();
        assert!(
            status != 200 || path.starts_with("/ping"),
            "{method} {path} answered 200 with no VMM"
        );
        let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await;
    });
});

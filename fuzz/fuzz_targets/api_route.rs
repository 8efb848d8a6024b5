//! API requests: a method, a route (one of the served ones, or any path), a query and a body
//! through the API's router as the server runs it: each route's body and query parsing, and
//! the answers to what does not fit.
#![no_main]
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tower_service::Service;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
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
        let (_, p) = routes[usize::from(sel & 0x0f) % routes.len()];
        let q = if sel & 0x10 != 0 { "?force=true" } else { "" };
        (format!("{p}{q}"), rest)
    };
    let method = ["GET", "PUT", "POST", "DELETE", "PATCH"][usize::from((sel >> 5) & 3) % 5];
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

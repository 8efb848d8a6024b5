//! A minimal client for tern's control API (HTTP/1.1 on its Unix socket, one request per
//! connection), shared by the benchmarks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One HTTP/1.1 request on its own connection: the status and the body.
pub fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("cannot connect to {}", sock.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp) {
        if resp.is_empty() {
            return Err(e).with_context(|| format!("{method} {path}"));
        }
    }
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed response to {method} {path}: {text:?}"))?;
    Ok((status, rest.trim().to_string()))
}

/// A request whose status must be one of `ok`; returns it.
pub fn expect(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    ok: &[u16],
    timeout: Duration,
) -> Result<u16> {
    let (st, text) = http(sock, method, path, body, timeout)?;
    if !ok.contains(&st) {
        bail!("tern: {method} {path}: HTTP {st}: {text}");
    }
    Ok(st)
}

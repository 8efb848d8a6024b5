//! The one client of tern's control API: HTTP/1.1 on the API's Unix socket, blocking, one
//! request per connection (`Connection: close`). The CLI's `tern info` and friends, the
//! benchmarks in xtask and the tests all use it.
//!
//! An answer is read until it is complete: as long as its `Content-Length` says, to the last
//! chunk of a chunked body, or to the end of the connection when it has neither. Chunk sizes
//! count bytes, so the body is decoded as bytes and only then read as text (a chunk may end
//! inside a character). A server that answers before reading the whole request (413 for a body
//! over the limit, say) may reset the connection after its answer: a complete answer counts,
//! the reset does not. Every read and write waits at most the client's timeout.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::responses::{Counters, ErrorBody, VmInfo};

/// How long [`call`] and a new [`Client`] wait for each read and write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One request on its own connection to the API socket `socket`, with the default timeout:
/// the answer's status and body (as text; bytes that are not UTF-8 are replaced).
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    Client::new(socket).call(method, path, body)
}

/// A failed request, naming the method and the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer: the socket could not be reached, or the answer was cut short or malformed.
    #[error("{method} {path}: {err} (API socket {})", socket.display())]
    Io {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The API socket.
        socket: PathBuf,
        /// What went wrong.
        err: io::Error,
    },
    /// An answer with a status the caller did not expect; `message` is the server's error
    /// message, or the body when it has none.
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The answer's status.
        status: u16,
        /// What the server said.
        message: String,
    },
    /// A successful answer whose body is not what the route answers.
    #[error("{method} {path}: unexpected answer ({why}): {body}")]
    Body {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// Why it does not parse.
        why: String,
        /// The body.
        body: String,
    },
}

impl Error {
    /// The answer's status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The error message in an error answer's body ([`ErrorBody`]), or the body itself when it is
/// not one.
pub fn error_message(body: &str) -> String {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) if body.trim().is_empty() => "(no body)".into(),
        Err(_) => body.trim().to_string(),
    }
}

/// A client of one tern's API socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the API socket `socket`, waiting [`DEFAULT_TIMEOUT`] for each read and write.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }

    /// The same client waiting at most `timeout` for each read and write (`None`: for ever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        // A zero timeout is refused by the socket; it would mean "do not wait at all".
        self.timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request with an optional JSON body: the answer's status and body, whatever the
    /// status.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, String)> {
        let (status, body) = self.exchange(method, path, body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// One request that must be answered with one of the statuses `ok`: the status and the
    /// body.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        ok: &[u16],
    ) -> Result<(u16, String), Error> {
        self.checked(method, path, body, |s| ok.contains(&s))
    }

    /// One request that must succeed (any 2xx status): the body.
    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, Error> {
        self.checked(method, path, body, |s| (200..300).contains(&s))
            .map(|(_, text)| text)
    }

    /// One request whose status must be `ok`.
    fn checked(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        ok: impl Fn(u16) -> bool,
    ) -> Result<(u16, String), Error> {
        let (status, text) = self.call(method, path, body).map_err(|err| Error::Io {
            method: method.into(),
            path: path.into(),
            socket: self.socket.clone(),
            err,
        })?;
        if !ok(status) {
            return Err(Error::Status {
                method: method.into(),
                path: path.into(),
                status,
                message: error_message(&text),
            });
        }
        Ok((status, text))
    }

    /// `GET path`, which must answer 200 with a `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let (_, text) = self.expect("GET", path, None, &[200])?;
        serde_json::from_str(&text).map_err(|e| Error::Body {
            method: "GET".into(),
            path: path.into(),
            why: e.to_string(),
            body: text.trim().to_string(),
        })
    }

    /// `GET /v1/vm`: the VM's state and configuration.
    pub fn info(&self) -> Result<VmInfo, Error> {
        self.get("/v1/vm")
    }

    /// `GET /v1/vm/counters`: the vCPUs' exits and the devices' I/O counters.
    pub fn counters(&self) -> Result<Counters, Error> {
        self.get("/v1/vm/counters")
    }

    /// Sends the request and reads the answer: its status and raw body.
    fn exchange(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, Vec<u8>)> {
        let request = request(method, path, body)?;
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(self.timeout)?;
        s.set_write_timeout(self.timeout)?;
        // A server may answer and close before it has read the whole request: its answer is
        // still there to be read.
        let written = match s.write_all(&request) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Some(e)
            }
            Err(e) => return Err(self.timed_out(e, "take the request")),
            Ok(()) => None,
        };
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            let (n, err) = match s.read(&mut buf) {
                Ok(n) => (n, None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => (0, Some(e)),
            };
            answer.extend_from_slice(&buf[..n]);
            if answer.is_empty() && err.is_none() && n == 0 {
                // Closed without a word (a tern that exits on the request, say).
                return Err(written.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without an answer",
                    )
                }));
            }
            // The end of the connection ends a body that has no length; a reset after the
            // answer is such an end too.
            let at_end = match &err {
                None => n == 0,
                Some(e) => e.kind() == io::ErrorKind::ConnectionReset && !answer.is_empty(),
            };
            match parse(&answer, at_end) {
                Parsed::Complete(status, body) => return Ok((status, body)),
                Parsed::Malformed(why) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed HTTP answer: {why}"),
                    ))
                }
                Parsed::Partial => {}
            }
            if let Some(e) = err {
                // Nothing came back: the write's failure says more than the read's.
                return Err(match written {
                    Some(w) if answer.is_empty() => w,
                    _ => self.timed_out(e, "answer"),
                });
            }
            if at_end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended before the answer was complete",
                ));
            }
        }
    }

    /// A socket timeout (which Linux reports as EAGAIN) said as one: the server did not
    /// `what` in time.
    fn timed_out(&self, e: io::Error, what: &str) -> io::Error {
        match (e.kind(), self.timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the server did not {what} within {t:?}"),
            ),
            _ => e,
        }
    }
}

/// The request's bytes. A method or path that would break the request line is refused.
fn request(method: &str, path: &str, body: Option<&str>) -> io::Result<Vec<u8>> {
    let token_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
    let path_ok = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if !token_ok || !path_ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a request line: {method:?} {path:?}"),
        ));
    }
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    let mut req = req.into_bytes();
    req.extend_from_slice(body.as_bytes());
    Ok(req)
}

/// Where reading an answer stands.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More is to come.
    Partial,
    /// The status and the (decoded) body.
    Complete(u16, Vec<u8>),
    /// Not an HTTP/1 answer, or one cut short.
    Malformed(&'static str),
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads the answer in `buf`; `at_end` when no more will come.
fn parse(buf: &[u8], at_end: bool) -> Parsed {
    let Some(split) = find(buf, b"\r\n\r\n") else {
        return if at_end {
            Parsed::Malformed("it ends inside its head")
        } else {
            Parsed::Partial
        };
    };
    let head = String::from_utf8_lossy(&buf[..split]);
    let rest = &buf[split + 4..];
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next().unwrap_or("").splitn(3, ' ');
    if !status_line.next().unwrap_or("").starts_with("HTTP/1.") {
        return Parsed::Malformed("no HTTP/1 status line");
    }
    let status = match status_line.next().map(str::parse::<u16>) {
        Some(Ok(s)) if (100..600).contains(&s) => s,
        _ => return Parsed::Malformed("no status code"),
    };
    // An interim answer (100 Continue) comes before the real one.
    if status < 200 {
        return parse(rest, at_end);
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Malformed("a header line without a colon");
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = Some(n),
                Err(_) => return Parsed::Malformed("a bad Content-Length"),
            }
        }
    }
    if status == 204 || status == 304 {
        return Parsed::Complete(status, Vec::new());
    }
    if chunked {
        return match dechunk(rest) {
            Chunks::Done(body) => Parsed::Complete(status, body),
            Chunks::Partial if at_end => Parsed::Malformed("it ends inside its chunked body"),
            Chunks::Partial => Parsed::Partial,
            Chunks::Bad => Parsed::Malformed("a bad chunk"),
        };
    }
    match length {
        Some(n) if rest.len() >= n => Parsed::Complete(status, rest[..n].to_vec()),
        Some(_) if at_end => Parsed::Malformed("it ends before its Content-Length"),
        Some(_) => Parsed::Partial,
        None if at_end => Parsed::Complete(status, rest.to_vec()),
        None => Parsed::Partial,
    }
}

/// Where decoding a chunked body stands.
#[derive(Debug, PartialEq, Eq)]
enum Chunks {
    /// The last chunk came: the body.
    Done(Vec<u8>),
    /// More is to come.
    Partial,
    /// Not a chunked body.
    Bad,
}

/// Decodes a chunked body: sizes count bytes; chunk extensions and trailers are skipped.
fn dechunk(mut s: &[u8]) -> Chunks {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(s, b"\r\n") else {
            return Chunks::Partial;
        };
        // Chunk extensions (";name=value") follow the size.
        let size = s[..eol].split(|&b| b == b';').next().unwrap_or(&[]);
        let size = std::str::from_utf8(size).unwrap_or("").trim();
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Chunks::Bad;
        }
        let Ok(n) = usize::from_str_radix(size, 16) else {
            return Chunks::Bad;
        };
        let rest = &s[eol + 2..];
        if n == 0 {
            return Chunks::Done(out);
        }
        // The chunk's data, then CRLF.
        match rest.get(n..) {
            Some(after) if after.len() >= 2 => {
                if !after.starts_with(b"\r\n") {
                    return Chunks::Bad;
                }
                out.extend_from_slice(&rest[..n]);
                s = &after[2..];
            }
            _ => return Chunks::Partial,
        }
    }
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// The chunked-body decoder: the body, once its last chunk came.
    pub fn dechunk(s: &[u8]) -> Option<Vec<u8>> {
        match super::dechunk(s) {
            super::Chunks::Done(b) => Some(b),
            _ => None,
        }
    }

    /// A whole answer as the client reads it, the connection ended after `s`: the status and
    /// the body.
    pub fn answer(s: &[u8]) -> Option<(u16, Vec<u8>)> {
        match super::parse(s, true) {
            super::Parsed::Complete(status, body) => Some((status, body)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responses::{DeviceCounters, VmState};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory with a socket path in it, removed when dropped.
    struct Sock(PathBuf);

    impl Sock {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tern-api-client-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Sock(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.join("api.sock")
        }
    }

    impl Drop for Sock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves one connection on a fresh socket: reads the request head (and as much of the
    /// body as `read_body` says), writes `wire` in the pieces given, then closes. Returns the
    /// socket and the server thread, which yields the request it read.
    fn serve(pieces: Vec<Vec<u8>>, read_body: bool) -> (Sock, std::thread::JoinHandle<Vec<u8>>) {
        let sock = Sock::new();
        let l = UnixListener::bind(sock.path()).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = c.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
                let Some(end) = find(&req, b"\r\n\r\n") else {
                    assert!(n > 0, "the client closed before its request was whole");
                    continue;
                };
                let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if !read_body || req.len() >= end + 4 + len {
                    break;
                }
            }
            for p in pieces {
                // The client goes once the answer is complete (before a chunked body's
                // trailers, say).
                if c.write_all(&p).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            req
        });
        (sock, t)
    }

    fn one(wire: &str) -> Vec<Vec<u8>> {
        vec![wire.as_bytes().to_vec()]
    }

    #[test]
    fn a_plain_answer() {
        let body = r#"{"state":"created","config":null}"#;
        let wire = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (sock, server) = serve(one(&wire), true);
        let (status, text) = call(&sock.path(), "GET", "/v1/vm", None).unwrap();
        assert_eq!((status, text.as_str()), (200, body));
        let req = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(req.starts_with("GET /v1/vm HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
        assert!(req.contains("\r\nContent-Length: 0\r\n"), "{req}");
        assert!(!req.contains("Content-Type"), "{req}");
    }

    #[test]
    fn a_request_body_is_sent_as_json() {
        let wire = "HTTP/1.1 204 No Content\r\n\r\n";
        let (sock, server) = serve(one(wire), true);
        let body = r#"{"dir":"/s"}"#;
        let r = call(&sock.path(), "PUT", "/v1/vm/snapshot", Some(body)).unwrap();
        assert_eq!(r, (204, String::new()));
        let req = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(
            req.contains("\r\nContent-Type: application/json\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nContent-Length: 12\r\n"), "{req}");
        assert!(req.ends_with(&format!("\r\n\r\n{body}")), "{req}");
    }

    /// Chunk sizes count bytes: a chunk may end inside a character, and the answer may arrive
    /// in pieces that split anything.
    #[test]
    fn a_chunked_answer_whose_chunks_split_characters() {
        let text = "{\"error\":\"snapshot é€😀 refused\"}";
        let b = text.as_bytes();
        // Inside '€' (bytes 22..25).
        let cut = 23;
        assert!(!text.is_char_boundary(cut));
        let mut wire = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        wire.extend_from_slice(format!("{cut:x};ext=1\r\n").as_bytes());
        wire.extend_from_slice(&b[..cut]);
        wire.extend_from_slice(format!("\r\n{:X}\r\n", b.len() - cut).as_bytes());
        wire.extend_from_slice(&b[cut..]);
        wire.extend_from_slice(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
        let pieces: Vec<Vec<u8>> = wire.chunks(7).map(<[u8]>::to_vec).collect();
        let (sock, server) = serve(pieces, true);
        let (status, body) = call(&sock.path(), "GET", "/v1/vm", None).unwrap();
        server.join().unwrap();
        assert_eq!(status, 400);
        assert_eq!(body, text);
    }

    /// A server that answers before reading the body, then closes with the body unread
    /// (which resets the connection).
    #[test]
    fn a_complete_answer_before_a_reset_counts() {
        let answer = r#"{"error":"too large"}"#;
        let wire = format!(
            "HTTP/1.1 413 Payload Too Large\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        let (sock, server) = serve(one(&wire), false);
        let big = format!(r#"{{"cmdline":"{}"}}"#, "a".repeat(1 << 20));
        let (status, body) = call(&sock.path(), "PUT", "/v1/vm", Some(&big)).unwrap();
        server.join().unwrap();
        assert_eq!((status, body.as_str()), (413, answer));
    }

    #[test]
    fn an_answer_cut_short_is_an_error() {
        for wire in [
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
            "HTTP/1.1 200 OK\r\ncontent-le",
            "",
        ] {
            let (sock, server) = serve(one(wire), true);
            let e = call(&sock.path(), "GET", "/v1/vm", None).unwrap_err();
            server.join().unwrap();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{wire:?}: {e}"
            );
        }
    }

    #[test]
    fn an_answer_without_a_length_ends_with_the_connection() {
        let (sock, server) = serve(one("HTTP/1.0 200 OK\r\n\r\nhello"), true);
        let r = call(&sock.path(), "GET", "/ping", None).unwrap();
        server.join().unwrap();
        assert_eq!(r, (200, "hello".into()));
    }

    #[test]
    fn a_silent_server_times_out() {
        let sock = Sock::new();
        let l = UnixListener::bind(sock.path()).unwrap();
        let c = Client::new(sock.path()).with_timeout(Some(Duration::from_millis(100)));
        let e = c.call("GET", "/v1/vm", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("100ms"), "{e}");
        drop(l);
    }

    #[test]
    fn a_bad_request_line_is_refused_before_sending() {
        let sock = Sock::new();
        for (m, p) in [
            ("GET", "/v1/vm HTTP/1.0\r\nX: y"),
            ("GET", "v1/vm"),
            ("G T", "/"),
        ] {
            let e = call(&sock.path(), m, p, None).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{m:?} {p:?}");
        }
    }

    #[test]
    fn typed_answers() {
        let info = r#"{"config":null,"state":"configured"}"#;
        let wire = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{info}",
            info.len()
        );
        let (sock, server) = serve(one(&wire), true);
        let i = Client::new(sock.path()).info().unwrap();
        server.join().unwrap();
        assert_eq!(i.state, VmState::Configured);

        let counters = r#"{"devices":[{"discard_ops":0,"errors":0,"flush_ops":1,"path":"/d","read_bytes":512,"read_ops":1,"throttled":0,"type":"block","write_bytes":0,"write_ops":0}],"vcpus":[{"mmio_exits":2,"other_exits":3,"pio_exits":1,"vcpu":0}]}"#;
        let wire = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{counters}\r\n0\r\n\r\n",
            counters.len()
        );
        let (sock, server) = serve(one(&wire), true);
        let c = Client::new(sock.path()).counters().unwrap();
        server.join().unwrap();
        assert_eq!(c.vcpus[0].pio_exits, 1);
        assert!(matches!(
            &c.devices[0],
            DeviceCounters::Block {
                read_bytes: 512,
                ..
            }
        ));
    }

    #[test]
    fn failures_name_the_request_and_the_status() {
        let err = r#"{"error":"cannot pause: the VM is created"}"#;
        let wire = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n\r\n{err}",
            err.len()
        );
        let (sock, server) = serve(one(&wire), true);
        let e = Client::new(sock.path())
            .send("PUT", "/v1/vm/pause", None)
            .unwrap_err();
        server.join().unwrap();
        assert_eq!(e.status(), Some(409));
        assert_eq!(
            e.to_string(),
            "PUT /v1/vm/pause: HTTP 409: cannot pause: the VM is created"
        );

        let wire = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        let (sock, server) = serve(one(wire), true);
        let e = Client::new(sock.path()).info().unwrap_err();
        server.join().unwrap();
        assert!(
            e.to_string().starts_with("GET /v1/vm: unexpected answer ("),
            "{e}"
        );

        let sock = Sock::new();
        let e = Client::new(sock.path()).info().unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with("GET /v1/vm: "), "{shown}");
        assert!(
            shown.contains(&sock.path().display().to_string()),
            "{shown}"
        );
        assert_eq!(e.status(), None);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(r#"{"error":"no such route"}"#),
            "no such route"
        );
        assert_eq!(error_message(" oops \n"), "oops");
        assert_eq!(error_message(""), "(no body)");
    }

    #[test]
    fn answers_on_bytes() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            Chunks::Done(b"hello world".to_vec())
        );
        assert_eq!(dechunk(b"5\r\nhel"), Chunks::Partial);
        assert_eq!(dechunk(b"5\r\nhello"), Chunks::Partial);
        assert_eq!(dechunk(b"5\r\nhello!!"), Chunks::Bad);
        // Sizes past the data, garbage and overflowing sizes end nothing early and do not
        // panic.
        for (bad, want) in [
            (&b"ffff\r\nabc"[..], Chunks::Partial),
            (b"ffffffffffffffff\r\nabc", Chunks::Partial),
            (b"zz\r\nabc\r\n", Chunks::Bad),
            (b"+5\r\nhello\r\n0\r\n\r\n", Chunks::Bad),
            (b"ffffffffffffffffffff\r\nabc", Chunks::Bad),
            (b"\r\n", Chunks::Bad),
            (b"", Chunks::Partial),
        ] {
            assert_eq!(dechunk(bad), want, "{bad:?}");
        }
        assert_eq!(
            parse(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                false
            ),
            Parsed::Complete(204, Vec::new())
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing",
                false
            ),
            Parsed::Complete(200, b"{}".to_vec())
        );
        for bad in [
            &b"SSH-2.0-x\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        ] {
            assert!(matches!(parse(bad, true), Parsed::Malformed(_)), "{bad:?}");
        }
    }
}

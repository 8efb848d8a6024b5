//! Registration with systemd-machined, so that `machinectl list` shows tern's VMs as it shows
//! libvirt's and systemd-nspawn's: `tern run --machine-name NAME` calls machined's
//! `RegisterMachine(NAME, id, "tern", "vm", tern's pid, "")` on the system bus when tern
//! starts, before any thread starts or sandbox closes. machined then files the VM under the
//! unit tern runs in (`tern@vm1.service`) and forgets it when tern exits; nothing else is
//! said on the bus, and the connection is closed at once.
//!
//! The bus is the one `DBUS_SYSTEM_BUS_ADDRESS` names (`unix:path=…` or `unix:abstract=…`),
//! else `/run/dbus/system_bus_socket`. A host without machined (or without a bus) cannot
//! register the VM: [`register`] says why, and tern runs the VM anyway.
//!
//! Hand-written rather than taken from a D-Bus crate: tern makes one method call, once, at
//! start. zbus would bring its own executor and some forty crates into every tern process
//! for it, and the `dbus` crate a C library (libdbus). What this needs of the D-Bus
//! specification is small: the `EXTERNAL` authentication, the message header, and the
//! marshalling of strings, byte arrays and 32-bit integers — written below and checked
//! against the real systemd-machined by the `systemd_machine` integration test (the shipped
//! unit in a booted Debian container), and for machined's refusals on a real `dbus-daemon` by
//! the `machined` test; the reply parser ([`parse_reply`]) has a fuzz target.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The system bus' socket when `DBUS_SYSTEM_BUS_ADDRESS` names none.
pub const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// How long the bus and machined get to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message read from the bus (machined's answers are a few hundred bytes).
const MAX_MESSAGE: usize = 1 << 20;

const METHOD_CALL: u8 = 1;
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;

// Header field codes.
const PATH: u8 = 1;
const INTERFACE: u8 = 2;
const MEMBER: u8 = 3;
const ERROR_NAME: u8 = 4;
const REPLY_SERIAL: u8 = 5;
const DESTINATION: u8 = 6;
const SIGNATURE: u8 = 8;

/// What a machine name may be, for messages.
pub const NAME_RULE: &str =
    "1 to 64 letters, digits, '-' and '.', in labels that neither start nor end with '-' or '.'";

/// Whether `name` is a machine name machined takes, by systemd's rule for host names: 1 to 64
/// letters, digits, `-` and `.`, in labels separated by single dots; no label starts or ends
/// with `-`, and the name neither starts nor ends with a dot.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Registers this process as the VM `name` with systemd-machined; the machine's object path
/// on success, or why not.
pub fn register(name: &str) -> Result<String, String> {
    if !valid_name(name) {
        return Err(format!("invalid machine name '{name}': {NAME_RULE}"));
    }
    let addr = std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok();
    let mut bus = connect(addr.as_deref())?;
    let mut body = Writer::default();
    body.string(name);
    // No id of its own: machined keeps the machine without one.
    body.bytes(&[]);
    body.string("tern");
    body.string("vm");
    body.u32(std::process::id());
    body.string("");
    let hello = method_call(
        1,
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "Hello",
        "org.freedesktop.DBus",
        "",
        &[],
    );
    let call = method_call(
        2,
        "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager",
        "RegisterMachine",
        "org.freedesktop.machine1",
        "sayssus",
        &body.buf,
    );
    bus.get_mut()
        .write_all(&[hello, call].concat())
        .map_err(|e| format!("the system bus: {e}"))?;
    // The Hello's answer and the NameAcquired signal come first; machined's answer is the
    // one for serial 2, within TIMEOUT in all.
    let deadline = std::time::Instant::now() + TIMEOUT;
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = bus.get_ref().set_read_timeout(Some(left));
        let msg = read_message(&mut bus)?;
        if let Some((2, reply)) = parse_reply(&msg)? {
            return reply;
        }
    }
    Err(format!(
        "no answer from systemd-machined within {} s",
        TIMEOUT.as_secs()
    ))
}

/// Connects to the bus at `address` (a D-Bus address list; `None`: the system bus) and
/// authenticates as this process' user.
fn connect(address: Option<&str>) -> Result<BufReader<UnixStream>, String> {
    let path = match address {
        None => std::path::PathBuf::from(SYSTEM_BUS),
        Some(a) => unix_path(a).ok_or_else(|| {
            format!("DBUS_SYSTEM_BUS_ADDRESS '{a}' names no unix:path= or unix:abstract= socket")
        })?,
    };
    let shown = path.display().to_string().replace('\0', "@");
    let stream = if let Some(name) = path.to_str().and_then(|p| p.strip_prefix('\0')) {
        abstract_connect(name)
    } else {
        UnixStream::connect(&path)
    }
    .map_err(|e| format!("no system bus at {shown}: {e}"))?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut bus = BufReader::new(stream);
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let hex: String = uid
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    let auth = format!("\0AUTH EXTERNAL {hex}\r\n");
    bus.get_mut()
        .write_all(auth.as_bytes())
        .map_err(|e| format!("the system bus at {shown}: {e}"))?;
    let mut line = String::new();
    bus.by_ref()
        .take(512)
        .read_line(&mut line)
        .map_err(|e| format!("the system bus at {shown}: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!(
            "the system bus at {shown} refused tern's credentials: {}",
            line.trim_end()
        ));
    }
    bus.get_mut()
        .write_all(b"BEGIN\r\n")
        .map_err(|e| format!("the system bus at {shown}: {e}"))?;
    Ok(bus)
}

/// Connects to `name` in the abstract socket namespace.
fn abstract_connect(name: &str) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixStream::connect_addr(&addr)
}

/// The first Unix socket a D-Bus address list names: a path, or an abstract name after a
/// NUL. Values are %-escaped.
fn unix_path(list: &str) -> Option<std::path::PathBuf> {
    list.split(';').find_map(|addr| {
        let params = addr.strip_prefix("unix:")?;
        params.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let v = unescape(v)?;
            match k {
                "path" => Some(std::path::PathBuf::from(v)),
                "abstract" => Some(std::path::PathBuf::from(format!("\0{v}"))),
                _ => None,
            }
        })
    })
}

fn unescape(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One message from the bus, whole.
pub fn read_message(bus: &mut impl Read) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "no answer from the system bus within {} s",
            TIMEOUT.as_secs()
        ),
        _ => format!("the system bus: {e}"),
    };
    let mut msg = vec![0u8; 16];
    bus.read_exact(&mut msg).map_err(err)?;
    let little = match msg[0] {
        b'l' => true,
        b'B' => false,
        e => {
            return Err(format!(
                "the system bus sent a message of endianness {e:#x}"
            ))
        }
    };
    let word = |at: usize| {
        let w: [u8; 4] = msg[at..at + 4].try_into().unwrap_or_default();
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let (body, fields) = (word(4) as usize, word(12) as usize);
    let total = (16 + fields).next_multiple_of(8) + body;
    if body > MAX_MESSAGE || fields > MAX_MESSAGE {
        return Err(format!(
            "the system bus sent a message of {total} bytes, more than tern reads"
        ));
    }
    msg.resize(total, 0);
    bus.read_exact(&mut msg[16..]).map_err(err)?;
    Ok(msg)
}

/// An answer from the bus: the serial of the call it answers, and the object path returned or
/// why the call failed.
pub type Reply = (u32, Result<String, String>);

/// A method return or error in `msg`. `None` for other messages (signals).
pub fn parse_reply(msg: &[u8]) -> Result<Option<Reply>, String> {
    let bad = |what: &str| format!("the system bus sent a malformed message ({what})");
    let mut r = Reader::new(msg).ok_or_else(|| bad("header"))?;
    let kind = *msg.get(1).ok_or_else(|| bad("header"))?;
    r.pos = 12;
    let fields_len = r.u32().ok_or_else(|| bad("header"))? as usize;
    let fields_end = r
        .pos
        .checked_add(fields_len)
        .filter(|&e| e <= msg.len())
        .ok_or_else(|| bad("header fields"))?;
    let (mut reply_serial, mut error_name, mut signature) = (None, None, String::new());
    while r.pos < fields_end {
        r.align(8);
        let code = r.u8().ok_or_else(|| bad("header field"))?;
        let sig = r.signature().ok_or_else(|| bad("header field"))?;
        match sig.as_str() {
            "u" => {
                let v = r.u32().ok_or_else(|| bad("header field"))?;
                if code == REPLY_SERIAL {
                    reply_serial = Some(v);
                }
            }
            "s" | "o" => {
                let v = r.string().ok_or_else(|| bad("header field"))?;
                if code == ERROR_NAME {
                    error_name = Some(v);
                }
            }
            "g" => {
                let v = r.signature().ok_or_else(|| bad("header field"))?;
                if code == SIGNATURE {
                    signature = v;
                }
            }
            _ => return Err(bad("header field type")),
        }
    }
    if r.pos != fields_end {
        return Err(bad("header fields"));
    }
    r.pos = fields_end;
    r.align(8);
    if r.pos > msg.len() {
        return Err(bad("body"));
    }
    // The first string of the body: the returned path, or the error's message.
    let first = if signature.starts_with(['s', 'o']) {
        r.string().ok_or_else(|| bad("body"))?
    } else {
        String::new()
    };
    Ok(match (kind, reply_serial) {
        (METHOD_RETURN, Some(s)) => Some((s, Ok(first))),
        (ERROR, Some(s)) => {
            let name = error_name.unwrap_or_default();
            Some((
                s,
                Err(match name.as_str() {
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                        "systemd-machined does not run on this host".to_string()
                    }
                    _ => format!("systemd-machined refused: {name}: {first}"),
                }),
            ))
        }
        _ => None,
    })
}

/// A method call message (little-endian).
fn method_call(
    serial: u32,
    path: &str,
    interface: &str,
    member: &str,
    destination: &str,
    signature: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut m = Writer::default();
    m.buf.extend_from_slice(&[b'l', METHOD_CALL, 0, 1]);
    m.u32(body.len() as u32);
    m.u32(serial);
    let len_at = m.buf.len();
    m.u32(0);
    let start = len_at + 4;
    for (code, kind, value) in [
        (PATH, "o", path),
        (INTERFACE, "s", interface),
        (MEMBER, "s", member),
        (DESTINATION, "s", destination),
        (SIGNATURE, "g", signature),
    ] {
        if value.is_empty() {
            continue;
        }
        m.align(8);
        m.buf.push(code);
        m.signature(kind);
        if kind == "g" {
            m.signature(value);
        } else {
            m.string(value);
        }
    }
    let fields = (m.buf.len() - start) as u32;
    m.buf[len_at..len_at + 4].copy_from_slice(&fields.to_le_bytes());
    m.align(8);
    m.buf.extend_from_slice(body);
    m.buf
}

/// D-Bus marshalling, little-endian, aligned from the start of the buffer (a message, or a
/// body: bodies start 8-aligned).
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn align(&mut self, n: usize) {
        while !self.buf.len().is_multiple_of(n) {
            self.buf.push(0);
        }
    }

    fn u32(&mut self, v: u32) {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn signature(&mut self, s: &str) {
        self.buf.push(s.len() as u8);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
}

/// Reads what [`Writer`] writes, in the message's byte order; `None` past the end.
struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
    little: bool,
}

impl<'a> Reader<'a> {
    fn new(msg: &'a [u8]) -> Option<Reader<'a>> {
        let little = match *msg.first()? {
            b'l' => true,
            b'B' => false,
            _ => return None,
        };
        Some(Reader {
            msg,
            pos: 0,
            little,
        })
    }

    fn align(&mut self, n: usize) {
        self.pos = self.pos.next_multiple_of(n);
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.msg.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.align(4);
        let w: [u8; 4] = self.take(4)?.try_into().ok()?;
        Some(if self.little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        })
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let s = String::from_utf8(self.take(n)?.to_vec()).ok()?;
        (self.u8()? == 0).then_some(s)
    }

    fn signature(&mut self) -> Option<String> {
        let n = usize::from(self.u8()?);
        let s = String::from_utf8(self.take(n)?.to_vec()).ok()?;
        (self.u8()? == 0).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_follow_machined() {
        for good in ["vm1", "tern-vm-1.a", "a.b.c", "x--y", &"a".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "-vm",
            ".vm",
            "vm-",
            "vm.",
            "a..b",
            "a-.b",
            "a.-b",
            "vm_1",
            "vm 1",
            "vm/1",
            "vm\n",
            &"a".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn bus_addresses_name_a_socket() {
        assert_eq!(
            unix_path("unix:path=/run/dbus/system_bus_socket").unwrap(),
            std::path::PathBuf::from("/run/dbus/system_bus_socket")
        );
        assert_eq!(
            unix_path("tcp:host=x,port=1;unix:abstract=/tmp/dbus-%41b,guid=00").unwrap(),
            std::path::PathBuf::from("\0/tmp/dbus-Ab")
        );
        assert!(unix_path("tcp:host=x,port=1").is_none());
        assert!(unix_path("unix:path=%zz").is_none());
    }

    /// A reply as a bus writes it: the method call writer's layout with another type.
    fn reply(kind: u8, serial: u32, fields: &[(u8, &str, &str)], body: &[u8]) -> Vec<u8> {
        let mut m = Writer::default();
        m.buf.extend_from_slice(&[b'l', kind, 0, 1]);
        m.u32(body.len() as u32);
        m.u32(7);
        let len_at = m.buf.len();
        m.u32(0);
        m.align(8);
        m.buf.push(REPLY_SERIAL);
        m.signature("u");
        m.u32(serial);
        for (code, kind, value) in fields {
            m.align(8);
            m.buf.push(*code);
            m.signature(kind);
            if *kind == "g" {
                m.signature(value);
            } else {
                m.string(value);
            }
        }
        let n = (m.buf.len() - len_at - 4) as u32;
        m.buf[len_at..len_at + 4].copy_from_slice(&n.to_le_bytes());
        m.align(8);
        m.buf.extend_from_slice(body);
        m.buf
    }

    #[test]
    fn replies_are_read_and_bad_ones_refused() {
        let mut body = Writer::default();
        body.string("/org/freedesktop/machine1/machine/vm1");
        let ok = reply(METHOD_RETURN, 2, &[(SIGNATURE, "g", "o")], &body.buf);
        assert_eq!(
            parse_reply(&ok).unwrap(),
            Some((2, Ok("/org/freedesktop/machine1/machine/vm1".to_string())))
        );
        let mut body = Writer::default();
        body.string("Machine 'vm1' already exists");
        let err = reply(
            ERROR,
            2,
            &[
                (ERROR_NAME, "s", "org.freedesktop.machine1.MachineExists"),
                (SIGNATURE, "g", "s"),
            ],
            &body.buf,
        );
        let (_, e) = parse_reply(&err).unwrap().unwrap();
        assert!(e
            .unwrap_err()
            .contains("MachineExists: Machine 'vm1' already exists"));
        let unknown = reply(
            ERROR,
            2,
            &[(ERROR_NAME, "s", "org.freedesktop.DBus.Error.ServiceUnknown")],
            &[],
        );
        let (_, e) = parse_reply(&unknown).unwrap().unwrap();
        assert_eq!(e.unwrap_err(), "systemd-machined does not run on this host");
        // Cut anywhere, or with a field length past the end: an error, never a panic.
        for n in 0..ok.len() {
            let _ = parse_reply(&ok[..n]);
        }
        let mut long = ok.clone();
        long[12] = 0xff;
        assert!(parse_reply(&long).is_err());
    }

    #[test]
    fn a_method_call_is_laid_out_as_the_specification_says() {
        let m = method_call(
            1,
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "Hello",
            "org.freedesktop.DBus",
            "",
            &[],
        );
        assert_eq!(&m[..4], &[b'l', METHOD_CALL, 0, 1]);
        assert_eq!(m.len() % 8, 0);
        let fields = u32::from_le_bytes(m[12..16].try_into().unwrap()) as usize;
        assert_eq!((16 + fields).next_multiple_of(8), m.len());
        // The first field: PATH, signature "o", the path.
        assert_eq!(&m[16..20], &[PATH, 1, b'o', 0]);
        assert_eq!(u32::from_le_bytes(m[20..24].try_into().unwrap()), 21);
        assert_eq!(&m[24..45], b"/org/freedesktop/DBus");
    }
}

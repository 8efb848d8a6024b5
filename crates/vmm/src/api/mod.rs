//! The control API: HTTP/1.1 REST with JSON bodies on a Unix socket (`--api-socket PATH`).
//!
//! axum serves it on a tokio runtime of its own thread. A request becomes an [`Action`] sent to
//! the VMM's event loop over a channel, with an eventfd to wake that loop; the loop answers
//! through a oneshot channel. vCPU threads never see the API.
//!
//! URL space (versioned under `/v1`, resources under `/v1/vm`): `GET /ping`, `GET /metrics`
//! (Prometheus' text format, unversioned where scrapers look for it), `GET|PUT /v1/vm`,
//! `PUT /v1/vm/{boot,pause,resume,shutdown,reboot}`, `GET /v1/vm/counters`,
//! `PUT /v1/vm/snapshot`, `PUT /v1/vm/restore`, and live migration: `PUT /v1/vm/migrate/send`
//! (202; it runs in the background), `GET /v1/vm/migrate` (its status), `DELETE /v1/vm/migrate`
//! (cancel) and `PUT /v1/vm/migrate/receive` (an empty tern waits for one); the balloon
//! (`GET|PUT /v1/vm/balloon`) and resizing (`PUT /v1/vm/resize`: vCPUs and memory), and
//! changes to a running VM's disks and interfaces (`PATCH /v1/vm/disks/{id}`,
//! `PATCH /v1/vm/nets/{id}`: rate limits, a disk's size) and device hotplug
//! (`PUT /v1/vm/disks`, `PUT /v1/vm/nets`, `DELETE /v1/vm/disks/{id}`,
//! `DELETE /v1/vm/nets/{id}`). The OpenAPI document
//! `docs/api/openapi.json` describes every route; a test checks it against [`ROUTES`].
//!
//! The bodies are the `api` crate's types: [`VmConfig`] for `PUT /v1/vm`, its
//! `RestoreOptions` for `PUT /v1/vm/restore`, its `VmInfo`, `Counters` and `ErrorBody` in the
//! answers. The client (`tern info` and friends, the benchmarks, the tests) is `api::client`;
//! this module is only the server.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use ::api::ErrorBody;
use axum::Router;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod firecracker;
mod routes;

use crate::VmConfig;
use routes::router;

/// Every route the server answers: (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/ping"),
    ("GET", "/metrics"),
    ("GET", "/v1/vm"),
    ("PUT", "/v1/vm"),
    ("PUT", "/v1/vm/boot"),
    ("PUT", "/v1/vm/pause"),
    ("PUT", "/v1/vm/resume"),
    ("PUT", "/v1/vm/shutdown"),
    ("PUT", "/v1/vm/reboot"),
    ("GET", "/v1/vm/counters"),
    ("PUT", "/v1/vm/snapshot"),
    ("PUT", "/v1/vm/restore"),
    ("GET", "/v1/vm/migrate"),
    ("DELETE", "/v1/vm/migrate"),
    ("PUT", "/v1/vm/migrate/send"),
    ("PUT", "/v1/vm/migrate/receive"),
    ("GET", "/v1/vm/balloon"),
    ("PUT", "/v1/vm/balloon"),
    ("PUT", "/v1/vm/resize"),
    ("PUT", "/v1/vm/disks"),
    ("PATCH", "/v1/vm/disks/{id}"),
    ("DELETE", "/v1/vm/disks/{id}"),
    ("PUT", "/v1/vm/nets"),
    ("PATCH", "/v1/vm/nets/{id}"),
    ("DELETE", "/v1/vm/nets/{id}"),
];

/// Largest request body accepted (a VM config is well under it).
pub const MAX_BODY: usize = 64 << 10;

/// What a request asks the VMM to do.
#[derive(Debug)]
pub enum Action {
    /// Describe the VM.
    Info,
    /// Set the configuration (before boot).
    Configure(Box<VmConfig>),
    /// Boot the configured VM.
    Boot,
    /// Stop every vCPU and device queue.
    Pause,
    /// Continue a paused VM.
    Resume,
    /// Press the ACPI power button, or stop the VM at once when `force`.
    Shutdown {
        /// Stop without asking the guest.
        force: bool,
    },
    /// Reset the VM (what a guest reboot does: exit or restart, per `on_reboot`).
    Reboot,
    /// Exit and I/O counters.
    Counters,
    /// Write a snapshot of the paused VM to a new directory.
    Snapshot {
        /// Where.
        dir: std::path::PathBuf,
        /// Only the memory written since the previous snapshot.
        diff: bool,
    },
    /// Bring back a snapshot (tern must be empty: no VM booted).
    Restore(Box<crate::snapshot::RestoreOptions>),
    /// Start migrating the VM to another tern (answered at once; it runs in the background).
    MigrateSend(Box<::api::migrate::SendOptions>),
    /// The last outgoing migration's status.
    MigrateStatus,
    /// Cancel the outgoing migration.
    MigrateCancel,
    /// Wait for a migrating VM (tern must be empty: no VM booted).
    MigrateReceive(Box<::api::migrate::ReceiveOptions>),
    /// The balloon's size, figures and the guest's statistics.
    BalloonInfo,
    /// Set the balloon's target size.
    BalloonSet(::api::balloon::BalloonRequest),
    /// Change the number of vCPUs.
    Resize(::api::resize::ResizeRequest),
    /// Change a disk's rate limits or size.
    DiskUpdate {
        /// The disk's id.
        id: String,
        /// What changes.
        update: ::api::devices::DiskUpdate,
    },
    /// Plug a disk in while the guest runs.
    AddDisk(Box<crate::config::DiskConfig>),
    /// Plug an interface in while the guest runs.
    AddNet(Box<crate::config::NetConfig>),
    /// Ask the guest to let go of a disk or an interface, which is then unplugged.
    RemoveDevice {
        /// `disk` or `net`.
        kind: ::api::devices::DeviceKind,
        /// Its id.
        id: String,
    },
    /// Work the API thread's sandbox does not allow (opening and linking files), run on the
    /// VMM's thread in any state: the Firecracker dialect's logger, metrics and snapshot
    /// files.
    OnVmm(VmmTask),
    /// Change an interface's rate limits.
    NetUpdate {
        /// The interface's id.
        id: String,
        /// What changes.
        update: ::api::devices::NetUpdate,
    },
}

/// A piece of work for the VMM's thread, run once (see [`Action::OnVmm`]).
pub struct VmmTask(std::sync::Mutex<Option<Box<dyn FnOnce() -> Reply + Send>>>);

impl VmmTask {
    /// A task doing `f`.
    pub fn new(f: impl FnOnce() -> Reply + Send + 'static) -> Self {
        VmmTask(std::sync::Mutex::new(Some(Box::new(f))))
    }

    /// Runs it (the first time; later calls answer 500).
    pub fn run(&self) -> Reply {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match f {
            Some(f) => f(),
            None => Reply::error(500, "the task ran already"),
        }
    }
}

impl std::fmt::Debug for VmmTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmmTask")
    }
}

/// The VMM's answer.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The body (one of the `api` crate's answer types), serialized to JSON, if any.
    pub body: Option<Value>,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: &impl Serialize) -> Self {
        match serde_json::to_value(body) {
            Ok(v) => Reply {
                status: 200,
                body: Some(v),
            },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// 204.
    pub fn done() -> Self {
        Reply {
            status: 204,
            body: None,
        }
    }

    /// 202: started, finishes later.
    pub fn accepted() -> Self {
        Reply {
            status: 202,
            body: None,
        }
    }

    /// An error with its message, as an [`ErrorBody`].
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        let body = ErrorBody { error: msg.into() };
        Reply {
            status,
            body: serde_json::to_value(body).ok(),
        }
    }

    /// 409: the request does not fit the VM's state.
    pub fn conflict(action: &str, state: impl std::fmt::Display) -> Self {
        Self::error(409, format!("cannot {action}: the VM is {state}"))
    }
}

/// A request waiting for the VMM's answer.
pub struct Request {
    /// What to do.
    pub action: Action,
    reply: oneshot::Sender<Reply>,
}

impl Request {
    /// Answers the request.
    pub fn reply(self, r: Reply) {
        // The client may have gone away; nothing to do then.
        let _ = self.reply.send(r);
    }
}

/// The running server: its socket, and the requests it queues for the VMM.
pub struct ApiServer {
    path: PathBuf,
    rx: mpsc::Receiver<Request>,
    evt: EventFd,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Shared {
    tx: mpsc::Sender<Request>,
    evt: std::sync::Arc<EventFd>,
}

/// An API socket made but not served yet (see [`ApiServer::bind`]).
pub struct BoundSocket {
    path: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl ApiServer {
    /// Starts serving on `path`.
    pub fn start(path: &Path) -> Result<Self, String> {
        Self::serve(Self::bind(path)?)
    }

    /// Makes the socket at `path` (replacing a stale one) without serving it yet: a sandbox
    /// that forbids making files can close in between.
    pub fn bind(path: &Path) -> Result<BoundSocket, String> {
        Ok(BoundSocket {
            path: path.to_path_buf(),
            listener: crate::unix_socket::listen(path, "API socket")?,
        })
    }

    /// Serves a socket [`bind`](Self::bind) made, on the API thread.
    pub fn serve(socket: BoundSocket) -> Result<Self, String> {
        Self::serve_with(socket, None)
    }

    /// [`serve`](Self::serve), with Firecracker's API at the socket's root too when
    /// `firecracker` is given (see [`firecracker`]).
    pub fn serve_with(
        socket: BoundSocket,
        firecracker: Option<firecracker::Instance>,
    ) -> Result<Self, String> {
        let BoundSocket { path, listener } = socket;
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let shared = Shared {
            tx,
            evt: std::sync::Arc::new(evt.try_clone().map_err(|e| format!("eventfd: {e}"))?),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the API runtime: {e}"))?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread =
            lifecycle::threads::spawn(lifecycle::threads::Role::Api, "tern-api", move || {
                // SIGINT/SIGTERM belong to the VMM's signalfd, whichever thread started first.
                if let Err(e) = crate::signals::block_stop_signals_in_this_thread() {
                    tracing::warn!("API thread: cannot block SIGINT/SIGTERM: {e}");
                }
                runtime.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("API socket: {e}");
                            return;
                        }
                    };
                    // On stop, answers in flight are still written out before the thread ends.
                    let serve = axum::serve(listener, router(shared, firecracker))
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        });
                    if let Err(e) = serve.await {
                        tracing::error!("API server stopped: {e}");
                    }
                })
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(ApiServer {
            path,
            rx,
            evt,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Signalled when requests are queued.
    pub fn event_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// The queued requests.
    pub fn take(&self) -> Vec<Request> {
        let _ = self.evt.read();
        self.rx.try_iter().collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Let the last answers (say, to the shutdown request that ended the VM) reach their
        // clients; idle keep-alive connections are not waited for beyond a second.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The API's router, as the server runs it, with no VMM behind it: a request that gets
    /// past its route's body and query parsing is answered 503.
    pub fn router() -> Router {
        super::router(no_vmm(), None)
    }

    /// The router with Firecracker's dialect too (a fresh, unstarted instance), with no VMM
    /// behind it.
    pub fn firecracker_router() -> Router {
        super::router(no_vmm(), Some(super::firecracker::Instance::default()))
    }

    /// A request channel whose VMM is gone.
    fn no_vmm() -> Shared {
        let (tx, _) = mpsc::channel();
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        Shared {
            tx,
            evt: std::sync::Arc::new(evt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document and the router describe the same routes.
    #[test]
    fn openapi_document_matches_the_routes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.json");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (p, item) in doc["paths"].as_object().unwrap() {
            for m in item.as_object().unwrap().keys() {
                documented.push((m.to_uppercase(), p.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }
}

//! The control-plane HTTP server: `GET /metrics` (Prometheus text), `GET /status` (the
//! JSON `kvplane status` reads) and `GET /healthz`, served by hyper on a current-thread
//! tokio runtime on its own thread. It only reads counters and takes the block manager's
//! lock briefly for `stats()`; it is never on the data path.
//!
//! Two listeners, both optional: the control Unix socket (default, next to the engine
//! socket), where the kernel names the caller (SO_PEERCRED) and each uid sees what
//! [`AccessPolicy`] allows; and a loopback TCP port for Prometheus, which has no caller
//! identity and so serves `/healthz` and daemon-wide aggregate `/metrics` only unless
//! `control.tcp_tenant_data` is set. Every request must name a loopback Host (DNS
//! rebinding), and connections are bounded in number, in head size and in time: an idle
//! or slow client is closed after 2 s, and when the table is full the oldest connection
//! that has not sent a request yet makes room, so idle connections cannot starve
//! `/healthz`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use super::access::{AccessPolicy, Caller, View, host_is_loopback};
use super::listen::bind_control_socket;
use super::metrics::{self, Link, Scrape, SessionCounters};
use crate::config::Config;
use crate::device::DaemonDevice;
use crate::session::DaemonShared;
use crate::session::socket::{SocketFile, SocketPathError};
use crate::tier::PerTier;
use kvplane_router::nats::NatsPublisherStats;

/// The `[control]` table and the control socket's default path live with the config
/// (below the control plane); re-exported here under their old names.
pub use crate::config::{ControlConfig, default_socket_path};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("control.metrics_addr `{addr}`: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] SocketPathError),
    #[error("starting the control-plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Most connections open at once on each listener; past it, the oldest one that has not
/// sent its request yet is closed to make room.
const MAX_CONNECTIONS: usize = 256;
/// Largest request head accepted (request line + headers); hyper's smallest buffer.
const MAX_HEAD_BYTES: usize = 8 << 10;
/// A client gets this long from connecting to the end of its request head. Control
/// clients send a few hundred bytes at once, so this only ever closes idle or slow ones.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer than this (a client that does not read its response).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections the kernel queues for `accept` (std's default of 128 overflows under a
/// burst of connects, and a dropped SYN costs the next client a 1 s retransmit).
const TCP_BACKLOG: u32 = 1024;
/// Throughput in `/status` is averaged over at most this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// One sample of the link byte counters, for throughput.
type Sample = (Instant, [u64; Link::ALL.len()]);

struct State {
    shared: Arc<DaemonShared>,
    policy: AccessPolicy,
    /// The control socket, named in the TCP listener's 403s.
    socket_path: Option<PathBuf>,
    started: Instant,
    /// The data-plane device and the GPUs seen, read once at start (NVML can take a
    /// while).
    device: DeviceStatus,
    samples: Mutex<VecDeque<Sample>>,
    /// The NATS publisher's and the router links' counters.
    events: EventLinks,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The control listeners, bound (before privileges are dropped: the socket's group needs
/// CAP_CHOWN, its directory may be root's) but not served yet.
pub struct BoundControl {
    runtime: tokio::runtime::Runtime,
    listeners: Vec<Listener>,
    addr: Option<SocketAddr>,
    /// The control socket file bound (removed at stop only while it is still ours).
    socket: Option<SocketFile>,
    policy: AccessPolicy,
}

impl std::fmt::Debug for BoundControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundControl")
            .field("addr", &self.addr)
            .field("socket", &self.socket)
            .finish()
    }
}

impl BoundControl {
    /// Binds the configured listeners. Each one that fails is returned in the error list
    /// and left out; `Ok(None)` when none is configured or none bound.
    pub fn bind(config: &Config) -> (Option<BoundControl>, Vec<AdminError>) {
        let c = &config.control;
        let socket = c.resolved_socket_path(&config.serve.socket_path);
        if c.metrics_addr.is_empty() && socket.is_none() {
            return (None, Vec::new());
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(r) => r,
            Err(e) => return (None, vec![AdminError::Runtime(e)]),
        };
        let mut errors = Vec::new();
        let mut listeners = Vec::new();
        let (mut addr, mut socket_file) = (None, None);
        {
            // Registering the listeners with the runtime's reactor needs its context.
            let _enter = runtime.enter();
            if !c.metrics_addr.is_empty() {
                match bind_tcp(&c.metrics_addr) {
                    Ok((l, a)) => {
                        listeners.push(Listener::Tcp(l));
                        addr = Some(a);
                    }
                    Err(e) => errors.push(e),
                }
            }
            if let Some(path) = socket {
                let bound = bind_control_socket(&path, c.socket_mode, c.socket_gid)
                    .map_err(AdminError::from)
                    .and_then(|(l, real)| {
                        l.set_nonblocking(true)
                            .and_then(|()| UnixListener::from_std(l))
                            .map(|l| (l, real))
                            .map_err(|source| AdminError::Bind {
                                addr: path.display().to_string(),
                                source,
                            })
                    });
                match bound {
                    Ok((l, file)) => {
                        listeners.push(Listener::Unix(l));
                        socket_file = Some(file);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        if listeners.is_empty() {
            return (None, errors);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let start_uid = unsafe { libc::geteuid() };
        let bound = BoundControl {
            runtime,
            listeners,
            addr,
            socket: socket_file,
            policy: AccessPolicy::new(config, start_uid),
        };
        (Some(bound), errors)
    }

    /// Serves the bound listeners on a new thread.
    pub fn start(
        self,
        shared: Arc<DaemonShared>,
        device: &DaemonDevice,
        events: EventLinks,
    ) -> Result<ControlServer, AdminError> {
        let BoundControl {
            runtime,
            listeners,
            addr,
            socket,
            policy,
        } = self;
        let socket_path = socket.as_ref().map(|s| s.path().to_path_buf());
        let state = Arc::new(State {
            shared,
            policy,
            socket_path: socket_path.clone(),
            started: Instant::now(),
            device: DeviceStatus::of(device),
            samples: Mutex::new(VecDeque::new()),
            events,
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kvp-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for l in listeners {
                        tokio::spawn(accept_loop(l, Arc::clone(&state)));
                    }
                    tokio::select! {
                        _ = sampler(Arc::clone(&state)) => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime here ends every connection task.
            })
            .map_err(AdminError::Runtime)?;
        if let Some(addr) = addr {
            tracing::info!(addr = %addr, "control server listening: GET /healthz, aggregate /metrics");
        }
        if let Some(p) = &socket_path {
            tracing::info!(path = %p.display(), "control socket listening: GET /status, /metrics, /healthz per caller uid");
        }
        Ok(ControlServer {
            addr,
            socket,
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

fn bind_tcp(addr_text: &str) -> Result<(TcpListener, SocketAddr), AdminError> {
    let bind_err = |source| AdminError::Bind {
        addr: addr_text.to_string(),
        source,
    };
    let addr: SocketAddr = addr_text.parse().map_err(|e| {
        bind_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{e}"),
        ))
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    let listener = socket.listen(TCP_BACKLOG).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

/// The running control server. `stop` (or drop) ends it, joins its thread and removes
/// the control socket file.
pub struct ControlServer {
    addr: Option<SocketAddr>,
    socket: Option<SocketFile>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addr", &self.addr)
            .field("socket", &self.socket)
            .finish()
    }
}

impl ControlServer {
    /// The TCP listener's address, when there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(SocketFile::path)
    }

    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(socket) = self.socket.take() {
            // Only the inode bound, relative to the checked directory. After a uid switch
            // the directory may not be writable any more; the next start replaces the
            // stale file.
            let _ = socket.remove();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds the control listeners of `config` (call before dropping privileges). A listener
/// that fails (port taken, e.g. by a second daemon; an unsafe socket directory) is logged
/// and left out, and the daemon runs on: the data plane matters more than its dashboard.
pub fn bind_for(config: &Config) -> Option<BoundControl> {
    let (bound, errors) = BoundControl::bind(config);
    for e in &errors {
        tracing::error!(error = %e, "control listener not started");
    }
    bound
}

/// What the event stream shows in `/metrics`: the NATS publisher's counters, and each
/// router link's.
#[derive(Debug, Default)]
pub struct EventLinks {
    pub nats: Option<Arc<NatsPublisherStats>>,
    pub routers: Vec<(std::net::SocketAddr, Arc<kvplane_router::events::LinkStats>)>,
}

/// Starts the control server for a running daemon on the listeners [`bind_for`] bound;
/// it reports `device`, the one the daemon's data plane runs on.
pub fn start_for(
    daemon: &crate::session::Daemon,
    bound: Option<BoundControl>,
    device: &DaemonDevice,
    events: EventLinks,
) -> Option<ControlServer> {
    let shared = Arc::clone(daemon.shared());
    match bound?.start(shared, device, events) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::error!(error = %e, "control server not started: no /metrics or /status");
            None
        }
    }
}

/// Graceful stop (SIGTERM): end the sessions (each finishes the batch it is executing;
/// engines then see their session DEAD and the socket closed), flush the NVMe files,
/// then stop the control server (so `/status` answers until the data plane is quiet).
pub fn shutdown(daemon: crate::session::Daemon, control: Option<ControlServer>) {
    let nvme_paths = daemon.shared().config.tiers.nvme.paths.clone();
    let blocks = daemon.shared().dataplane.blocks().cloned();
    let t0 = Instant::now();
    daemon.shutdown();
    let sessions_s = t0.elapsed().as_secs_f64();
    // Through the tier's own descriptors: reopening the paths after the privilege drop
    // could fail (0600 files) or follow a link planted since start-up.
    let failures = blocks.map(|b| b.flush_nvme()).unwrap_or_default();
    for (path, e) in &failures {
        tracing::error!(path = %path.display(), error = %e, "NVMe flush (fsync) failed");
    }
    tracing::info!(
        sessions_s,
        nvme_files = nvme_paths.len(),
        nvme_flush_failures = failures.len(),
        "sessions ended, NVMe flushed"
    );
    if let Some(c) = control {
        c.stop();
    }
}

/// The GPUs NVML lists, or why there is no list (no driver: NVML's library is part of it).
fn gpu_topology() -> Result<Vec<GpuStatus>, String> {
    if !kvplane_cuda::cuda::driver_present() {
        return Err("no NVIDIA driver (libcuda.so could not be loaded)".into());
    }
    match kvplane_cuda::cuda::topology() {
        Ok(gpus) => Ok(gpus
            .into_iter()
            .map(|g| GpuStatus {
                index: g.index,
                name: g.name,
                uuid: g.uuid,
                memory_total_bytes: g.memory_total_bytes,
                pci_bus_id: g.pci_bus_id,
                pcie_link_gen: g.pcie_link_gen,
                pcie_link_width: g.pcie_link_width,
                nvlink_peers: g.nvlink_peers,
            })
            .collect()),
        Err(e) => Err(format!("NVML could not list the GPUs: {e}")),
    }
}

fn link_counters(state: &State) -> [u64; Link::ALL.len()] {
    let m = &state.shared.dataplane.counters.metrics;
    Link::ALL.map(|l| m.link_bytes(l))
}

/// Samples the link counters once a second so `/status` can show recent throughput.
async fn sampler(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let sample = (now, link_counters(&state));
        let mut s = state.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back(sample);
        while s.front().is_some_and(|f| now - f.0 > RATE_WINDOW) {
            s.pop_front();
        }
    }
}

/// A connection being served: whether its request head has arrived, and its task.
struct Live {
    busy: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    /// With the peer's uid, from the kernel (SO_PEERCRED), not from anything it sends.
    Unix(tokio::net::UnixStream, u32),
}

async fn accept_loop(listener: Listener, state: Arc<State>) {
    let mut live: VecDeque<Live> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
            Listener::Unix(l) => l.accept().await.and_then(|(s, _)| {
                let uid = s.peer_cred()?.uid();
                Ok(Accepted::Unix(s, uid))
            }),
        };
        let accepted = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        live.retain(|c| !c.task.is_finished());
        if live.len() >= MAX_CONNECTIONS {
            // Make room by closing the oldest connection still waiting for its request
            // (idle or slow); if every one is mid-request, the new one is refused.
            match live.iter().position(|c| !c.busy.load(Ordering::Relaxed)) {
                Some(i) => {
                    if let Some(old) = live.remove(i) {
                        old.task.abort();
                    }
                }
                None => continue,
            }
        }
        let busy = Arc::new(AtomicBool::new(false));
        let (st, b) = (Arc::clone(&state), Arc::clone(&busy));
        let task = match accepted {
            Accepted::Tcp(s) => tokio::spawn(serve_connection(s, Caller::Tcp, st, b)),
            Accepted::Unix(s, uid) => {
                tokio::spawn(serve_connection(s, Caller::Unix { uid }, st, b))
            }
        };
        live.push_back(Live {
            busy,
            task: task.abort_handle(),
        });
    }
}

async fn serve_connection<S>(stream: S, caller: Caller, state: Arc<State>, busy: Arc<AtomicBool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        busy.store(true, Ordering::Relaxed);
        let response = respond(&req, caller, &state);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "control connection"),
        Err(_) => tracing::debug!("control connection closed at its deadline"),
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `{"error": reason}` with `status`.
fn error(status: StatusCode, reason: impl std::fmt::Display) -> Reply {
    let body = serde_json::json!({ "error": reason.to_string() }).to_string();
    reply(status, "application/json", body)
}

fn json(value: &impl Serialize) -> Reply {
    match serde_json::to_string(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
    }
}

const ROUTES: &str = "GET /metrics, /status or /healthz";

fn respond(req: &Request<Incoming>, caller: Caller, state: &State) -> Reply {
    // DNS rebinding: a page from evil.example, re-resolved to 127.0.0.1, still sends
    // `Host: evil.example`. Only loopback names are answered.
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("<not ASCII>"));
    match host {
        None => return error(StatusCode::BAD_REQUEST, "a Host header is required"),
        Some(h) if !host_is_loopback(h) => {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host `{}` is not served here: use localhost, 127.0.0.1 or [::1]",
                    h.escape_debug()
                ),
            );
        }
        Some(_) => {}
    }
    if let Some(a) = req.uri().authority()
        && !host_is_loopback(a.as_str())
    {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "authority `{}` is not served here",
                a.as_str().escape_debug()
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method `{}` not allowed: {ROUTES}",
                req.method().as_str().escape_debug()
            ),
        );
    }
    // The control server takes no request bodies.
    if !req.body().is_end_stream() {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted",
        );
    }
    let path = req.uri().path();
    if path == "/healthz" {
        return reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into());
    }
    if path != "/metrics" && path != "/status" {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such path `{}`: {ROUTES}", path.escape_debug()),
        );
    }
    let view = match state.policy.view(caller) {
        Ok(v) => v,
        Err(reason) => return error(StatusCode::FORBIDDEN, reason),
    };
    match (path, &view) {
        ("/metrics", _) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(state, &view),
        ),
        ("/status", View::Aggregate) => error(
            StatusCode::FORBIDDEN,
            format!(
                "/status names tenants' sessions and activity: it is served on the control \
                 socket{} (`kvplane status --socket PATH`), per caller uid; \
                 control.tcp_tenant_data = true serves it here too",
                state
                    .socket_path
                    .as_ref()
                    .map_or(String::new(), |p| format!(" {}", p.display()))
            ),
        ),
        _ => json(&status_report(state, &view)),
    }
}

fn session_counters(state: &State) -> SessionCounters {
    let c = &state.shared.dataplane.counters;
    SessionCounters {
        sessions_active: c.sessions_active.load(Ordering::Relaxed),
        sessions_total: c.sessions_total.load(Ordering::Relaxed),
        sessions_reclaimed: c.sessions_reclaimed.load(Ordering::Relaxed),
        protocol_violations: c.protocol_violations.load(Ordering::Relaxed),
        engine_memory_faults: c.engine_memory_faults.load(Ordering::Relaxed),
        sessions_panicked: c.sessions_panicked.load(Ordering::Relaxed),
        dataplane_thread_panics: c.dataplane_thread_panics.load(Ordering::Relaxed),
        engine_mapped_bytes: state.shared.dataplane.mapped.total_bytes(),
        engine_mappings: state.shared.dataplane.mapped.mappings(),
        ops_completed: c.ops_completed.load(Ordering::Relaxed),
        ops_failed: c.ops_failed.load(Ordering::Relaxed),
    }
}

fn render_metrics(state: &State, view: &View) -> String {
    let dp = &state.shared.dataplane;
    let stats = dp.blocks().map(|b| b.stats());
    let counters = session_counters(state);
    let mut sessions = state.shared.sessions();
    sessions.retain(|s| view.sees_session(s));
    let names = dp.namespace_names();
    metrics::render(&Scrape {
        blocks: stats.as_ref(),
        metrics: &dp.counters.metrics,
        counters: &counters,
        sessions: &sessions,
        namespace_names: &names,
        uptime_s: state.started.elapsed().as_secs_f64(),
        device: &state.device,
        nats: state.events.nats.as_deref(),
        routers: &state.events.routers,
        view,
    })
}

/// `GET /status`: what `kvplane status` shows. Field names are part of the CLI's `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// "host" or "cuda": the backend the data plane runs on (as `device.backend`).
    pub backend: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub socket_path: String,
    pub block_bytes: u64,
    pub blocks: u64,
    pub tiers: Vec<TierStatus>,
    pub lookup_hits: u64,
    pub lookup_misses: u64,
    /// Hits / (hits + misses) over all engine lookups, in blocks; null before any lookup.
    pub hit_rate: Option<f64>,
    pub links: Vec<LinkStatus>,
    /// Seconds the per-link rates are averaged over (up to 10).
    pub rate_window_s: f64,
    pub ops_completed: u64,
    pub ops_failed: u64,
    pub ops_in_flight: u64,
    /// Block leases (pins) held by live sessions; a dead engine's are released.
    #[serde(default)]
    pub leases_held: u64,
    /// Sessions whose engine died (their leases released, their session reclaimed).
    #[serde(default)]
    pub sessions_reclaimed: u64,
    pub op_latency: Vec<OpLatency>,
    pub nvme: NvmeStatus,
    pub sessions: Vec<SessionStatus>,
    pub namespaces: Vec<NamespaceStatus>,
    /// The data-plane device: the backend in use, the one configured, why they differ.
    pub device: DeviceStatus,
}

/// `/status` `device`: which backend the data plane runs on and why, and the GPUs seen.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// "host" or "cuda": what the data plane runs on (what STATS reports as 0 or 1).
    pub backend: String,
    /// `[device] backend`: "auto", "cuda" or "host".
    pub choice: String,
    /// `[device] ordinal`: the CUDA device asked for.
    pub ordinal: u32,
    /// Why `auto` runs on the host backend, e.g. "no NVIDIA driver: libcuda.so could not
    /// be loaded ..."; null when the backend is the one asked for.
    pub fallback_reason: Option<String>,
    /// The device's own line: GPU name, compute capability and memory, or the host
    /// backend's.
    pub describe: String,
    /// GPUs NVML lists on this machine (used by the daemon or not).
    pub gpus: Vec<GpuStatus>,
    /// Why `gpus` is empty, e.g. "no NVIDIA driver (...)".
    pub gpu_note: Option<String>,
    /// How blocks travel between the NVMe tier and G1 (through the pinned host tier;
    /// whether cuFile would be available here).
    #[serde(default)]
    pub nvme_g1_path: String,
}

impl DeviceStatus {
    fn of(d: &DaemonDevice) -> DeviceStatus {
        let (gpus, gpu_note) = match gpu_topology() {
            Ok(g) if g.is_empty() => (g, Some("NVML lists no GPUs".to_string())),
            Ok(g) => (g, None),
            Err(reason) => (Vec::new(), Some(reason)),
        };
        DeviceStatus {
            backend: d.backend().as_str().into(),
            choice: d.choice.as_str().into(),
            ordinal: d.ordinal,
            fallback_reason: d.fallback_reason.clone(),
            describe: d.device.describe(),
            gpus,
            gpu_note,
            nvme_g1_path: d.nvme_g1_path.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TierStatus {
    pub tier: String,
    pub backing: String,
    pub capacity_blocks: u64,
    pub used_blocks: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Lookup hits served from this tier (its fastest copy), in blocks.
    pub lookup_hits: u64,
    /// This tier's share of all blocks asked for by lookups; null before any lookup.
    pub hit_rate: Option<f64>,
    pub removed: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    pub link: String,
    pub bytes_total: u64,
    pub bytes_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpLatency {
    pub op: String,
    pub count: u64,
    /// Upper bound of the histogram bucket holding the quantile (null: above 2.5 s).
    pub p50_le_us: Option<u64>,
    pub p99_le_us: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NvmeStatus {
    pub engine: String,
    pub registered_buffers: bool,
    pub write_errors: u64,
    pub read_errors: u64,
    pub corrupt_dropped: u64,
    pub restored_at_start: u64,
    /// Slots the start-up scan found torn or corrupt (dropped, never served).
    #[serde(default)]
    pub scan_corrupt: u64,
    /// Older copies of a key the start-up scan found next to a newer one (freed).
    #[serde(default)]
    pub scan_duplicates: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub session_id: u64,
    pub pid: i32,
    pub uid: u32,
    pub namespaces: Vec<String>,
    pub queue_pairs: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NamespaceStatus {
    pub namespace: String,
    pub lookup_hits: u64,
    pub lookup_misses: u64,
    pub hit_rate: Option<f64>,
    /// Namespaces with a quota: blocks held per tier (HBM, host, NVMe).
    #[serde(default)]
    pub used_blocks: Option<PerTier<u32>>,
    /// Namespaces with a quota: the limit per tier (HBM, host, NVMe; null = none).
    #[serde(default)]
    pub quota_blocks: Option<PerTier<Option<u32>>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    /// `GPU-...` (NVML), as engines name the GPU of a device memory region.
    #[serde(default)]
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub pci_bus_id: String,
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    pub nvlink_peers: Vec<String>,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// The report `view` may see: its namespaces and sessions; daemon-wide totals.
fn status_report(state: &State, view: &View) -> StatusReport {
    let dp = &state.shared.dataplane;
    let m = &dp.counters.metrics;
    let stats = dp.blocks().map(|b| b.stats());
    let lookups = m.lookups();
    let names = dp.namespace_names();
    let mut tier_hits = PerTier::<u64>::default();
    let mut misses = 0;
    let mut namespaces = Vec::new();
    for (ns, l) in &lookups {
        for (t, h) in l.hits.iter() {
            tier_hits[t] += h;
        }
        misses += l.misses;
        let hits: u64 = l.hits.values().sum();
        namespaces.push(NamespaceStatus {
            namespace: names
                .get(ns)
                .cloned()
                .unwrap_or_else(|| format!("0x{ns:08x}")),
            lookup_hits: hits,
            lookup_misses: l.misses,
            hit_rate: ratio(hits, hits + l.misses),
            used_blocks: None,
            quota_blocks: None,
        });
    }
    // Quota'd namespaces: usage and limits, whether or not they have looked anything up.
    for q in stats.iter().flat_map(|s| &s.namespaces) {
        // `namespaces` was filled in `lookups` order, so a position in one is one in the other.
        let i = match lookups.keys().position(|&ns| ns == q.namespace) {
            Some(i) => i,
            None => {
                namespaces.push(NamespaceStatus {
                    namespace: q.name.clone(),
                    lookup_hits: 0,
                    lookup_misses: 0,
                    hit_rate: None,
                    used_blocks: None,
                    quota_blocks: None,
                });
                namespaces.len() - 1
            }
        };
        namespaces[i].used_blocks = Some(q.used_slots);
        namespaces[i].quota_blocks = Some(q.max_slots);
    }
    let hits: u64 = tier_hits.values().sum();
    let asked = hits + misses;
    let block_bytes = stats.as_ref().map_or(0, |s| s.block_bytes as u64);
    let tiers = stats
        .as_ref()
        .map(|s| {
            s.tiers
                .iter()
                .map(|t| TierStatus {
                    tier: t.tier.name().into(),
                    backing: t.backing.clone(),
                    capacity_blocks: t.capacity_slots as u64,
                    used_blocks: t.used_slots as u64,
                    capacity_bytes: t.capacity_slots as u64 * block_bytes,
                    used_bytes: t.used_slots as u64 * block_bytes,
                    lookup_hits: tier_hits[t.tier],
                    hit_rate: ratio(tier_hits[t.tier], asked),
                    removed: t.removed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    let now = (Instant::now(), link_counters(state));
    let oldest = state
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .front()
        .copied();
    let (window_s, base) = match oldest {
        Some((t, v)) if now.0 > t => ((now.0 - t).as_secs_f64(), v),
        _ => (0.0, now.1),
    };
    let links = Link::ALL
        .iter()
        .map(|&l| {
            let i = l as usize;
            LinkStatus {
                link: l.name().into(),
                bytes_total: now.1[i],
                bytes_per_s: if window_s > 0.0 {
                    now.1[i].saturating_sub(base[i]) as f64 / window_s
                } else {
                    0.0
                },
            }
        })
        .collect();
    let op_latency = kvplane_ffi::Opcode::ALL
        .iter()
        .filter_map(|&op| {
            let h = m.op_latency(op);
            let count = h.count();
            (count > 0).then(|| OpLatency {
                op: format!("{op:?}").to_lowercase(),
                count,
                p50_le_us: h.quantile_bound_us(0.5).filter(|&b| b != u64::MAX),
                p99_le_us: h.quantile_bound_us(0.99).filter(|&b| b != u64::MAX),
            })
        })
        .collect();
    let counters = session_counters(state);
    let nvme = stats
        .as_ref()
        .map(|s| NvmeStatus {
            engine: s.nvme_engine.clone(),
            registered_buffers: s.nvme_registered_buffers,
            write_errors: s.nvme_write_errors,
            read_errors: s.nvme_read_errors,
            corrupt_dropped: s.nvme_corrupt_dropped,
            restored_at_start: s.nvme_scan_valid,
            scan_corrupt: s.nvme_scan_corrupt,
            scan_duplicates: s.nvme_scan_duplicates,
        })
        .unwrap_or_default();
    StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        backend: state.device.backend.clone(),
        pid: std::process::id(),
        uptime_s: state.started.elapsed().as_secs_f64(),
        socket_path: state.shared.config.serve.socket_path.display().to_string(),
        block_bytes,
        blocks: stats.as_ref().map_or(0, |s| s.blocks as u64),
        tiers,
        lookup_hits: hits,
        lookup_misses: misses,
        hit_rate: ratio(hits, asked),
        links,
        rate_window_s: window_s,
        ops_completed: counters.ops_completed,
        ops_failed: counters.ops_failed,
        ops_in_flight: m.in_flight.load(Ordering::Relaxed),
        leases_held: dp.counters.leases_held.load(Ordering::Relaxed),
        sessions_reclaimed: counters.sessions_reclaimed,
        op_latency,
        nvme,
        sessions: state
            .shared
            .sessions()
            .into_iter()
            .filter(|s| view.sees_session(s))
            .map(|s| SessionStatus {
                session_id: s.session_id,
                pid: s.pid,
                uid: s.uid,
                namespaces: s.namespaces,
                queue_pairs: s.queue_pairs,
            })
            .collect(),
        namespaces: namespaces
            .into_iter()
            .filter(|n| view.sees_namespace(&n.namespace))
            .collect(),
        device: DeviceStatus {
            nvme_g1_path: match state.shared.dataplane.blocks() {
                Some(b) => b.stores().nvme_g1_now(),
                None => state.device.nvme_g1_path.clone(),
            },
            ..state.device.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_must_be_loopback_ip_port() {
        let ok = |a: &str| {
            ControlConfig {
                metrics_addr: a.into(),
                ..ControlConfig::default()
            }
            .validate()
        };
        assert!(ok("127.0.0.1:9464").is_ok());
        assert!(ok("[::1]:9464").is_ok());
        assert!(ok("").is_ok());
        for bad in ["0.0.0.0:9464", "10.1.2.3:80", "localhost:9464", "127.0.0.1"] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("control.metrics_addr"), "{bad}: {e}");
        }
    }

    #[test]
    fn control_socket_defaults_next_to_the_engine_socket() {
        let c = ControlConfig::default();
        assert_eq!(
            c.resolved_socket_path(Path::new("/run/kvplane/kvplane.sock")),
            Some(PathBuf::from("/run/kvplane/kvplane.control.sock"))
        );
        let off = ControlConfig {
            socket_path: Some(PathBuf::new()),
            ..ControlConfig::default()
        };
        assert_eq!(off.resolved_socket_path(Path::new("/x.sock")), None);
        let relative = ControlConfig {
            socket_path: Some("c.sock".into()),
            ..ControlConfig::default()
        };
        assert!(relative.validate().is_err());
        let setuid = ControlConfig {
            socket_mode: 0o4660,
            ..ControlConfig::default()
        };
        assert!(setuid.validate().is_err());
    }
}

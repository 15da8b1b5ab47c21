//! The control-plane HTTP server: `GET /metrics` (Prometheus text), `GET /status` (the
//! JSON `kvplane status` reads) and `GET /healthz`, on a loopback TCP port, served by a
//! current-thread tokio runtime on its own thread. It only reads
//! counters and takes the block manager's lock briefly for `stats()`; it is never on the
//! data path. Requests are bounded (head size, time, connections) and bad ones get a 4xx
//! with a reason.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use kvplane_router::http::{self, Head, Response};

use super::metrics::{self, Link, Scrape, SessionCounters};
use crate::block::Tier;
use crate::config::ConfigError;
use crate::session::DaemonShared;

/// `[control]`: the control-plane (metrics and status) listener.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Loopback address for `/metrics` and `/status`; empty disables the server.
    pub metrics_addr: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            metrics_addr: "127.0.0.1:9464".into(),
        }
    }
}

impl ControlConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.metrics_addr.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr =
            self.metrics_addr
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                    key: "control.metrics_addr".into(),
                    reason: format!("`{}` is not an IP:port address ({e})", self.metrics_addr),
                })?;
        // Metrics and status carry namespace names and pids: never on a public interface.
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "control.metrics_addr".into(),
                reason: format!(
                    "{} is not a loopback address (use 127.0.0.1; put a proxy in front for remote scrapes)",
                    addr.ip()
                ),
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("control.metrics_addr `{addr}`: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the control-plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Most simultaneous control connections; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// Largest request head accepted (request line + headers).
const MAX_HEAD_BYTES: usize = 8 << 10;
/// A client gets this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Throughput in `/status` is averaged over at most this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// One sample of the link byte counters, for throughput.
type Sample = (Instant, [u64; 5]);

struct State {
    shared: Arc<DaemonShared>,
    started: Instant,
    /// GPU topology read once at start (NVML can take a while), or why there is none.
    gpus: Result<Vec<GpuStatus>, String>,
    samples: Mutex<VecDeque<Sample>>,
}

/// The running control server. `stop` (or drop) ends it and joins its thread.
pub struct ControlServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ControlServer {
    /// Binds `config.metrics_addr` and serves it on a new thread. `Ok(None)` when the
    /// server is disabled (empty address).
    pub fn start(
        config: &ControlConfig,
        shared: Arc<DaemonShared>,
    ) -> Result<Option<ControlServer>, AdminError> {
        if config.metrics_addr.is_empty() {
            return Ok(None);
        }
        let bind_err = |source| AdminError::Bind {
            addr: config.metrics_addr.clone(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(&config.metrics_addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = std_listener.local_addr().map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(AdminError::Runtime)?;
        let state = Arc::new(State {
            shared,
            started: Instant::now(),
            gpus: gpu_topology(),
            samples: Mutex::new(VecDeque::new()),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kvp-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "control listener");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, Arc::clone(&state)) => {}
                        _ = sampler(Arc::clone(&state)) => {}
                        _ = rx => {}
                    }
                });
            })
            .map_err(AdminError::Runtime)?;
        tracing::info!(addr = %addr, "control server listening: GET /metrics, /status");
        Ok(Some(ControlServer {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts the control server for a running daemon. A bind failure (port taken, e.g. by a
/// second daemon on the node) is logged and the daemon runs on without metrics: the data
/// plane matters more than its dashboard.
pub fn start_for(daemon: &crate::session::Daemon) -> Option<ControlServer> {
    let shared = Arc::clone(daemon.shared());
    let config = shared.config.control.clone();
    match ControlServer::start(&config, shared) {
        Ok(server) => server,
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

fn gpu_topology() -> Result<Vec<GpuStatus>, String> {
    match kvplane_cuda::cuda::topology() {
        Ok(gpus) => Ok(gpus
            .into_iter()
            .map(|g| GpuStatus {
                index: g.index,
                name: g.name,
                memory_total_bytes: g.memory_total_bytes,
                pci_bus_id: g.pci_bus_id,
                pcie_link_gen: g.pcie_link_gen,
                pcie_link_width: g.pcie_link_width,
                nvlink_peers: g.nvlink_peers,
            })
            .collect()),
        Err(e) => Err(format!("no NVIDIA driver: host backend ({e})")),
    }
}

fn link_counters(state: &State) -> [u64; 5] {
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

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, &state).await {
                tracing::debug!(%peer, error = %e, "control connection");
            }
        });
    }
}

async fn serve_connection(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, http::read_head(&mut stream, MAX_HEAD_BYTES));
    let (response, head_only) = match head.await {
        Err(_) => (
            Response::error(408, "request head not received within 5 s"),
            false,
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(resp))) => (resp, false),
        // The control server takes no request bodies.
        Ok(Ok(Ok(head)))
            if head.transfer_encoding || head.content_length.is_some_and(|n| n != 0) =>
        {
            (
                Response::error(413, "request bodies are not accepted"),
                false,
            )
        }
        Ok(Ok(Ok(head))) => (route(&head, state), head.method == "HEAD"),
    };
    http::write_response(&mut stream, &response, head_only).await
}

fn route(head: &Head, state: &State) -> Response {
    if head.method != "GET" && head.method != "HEAD" {
        return Response::error(
            405,
            format!(
                "method `{}` not allowed: GET /metrics, /status or /healthz",
                head.method.escape_debug()
            ),
        );
    }
    match head.path.as_str() {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: render_metrics(state),
        },
        "/status" => Response::json(200, &status_report(state)),
        "/healthz" => Response::text(200, "ok\n"),
        other => Response::error(
            404,
            format!(
                "no such path `{}`: GET /metrics, /status or /healthz",
                other.escape_debug()
            ),
        ),
    }
}

fn session_counters(state: &State) -> SessionCounters {
    let c = &state.shared.dataplane.counters;
    SessionCounters {
        sessions_active: c.sessions_active.load(Ordering::Relaxed),
        sessions_total: c.sessions_total.load(Ordering::Relaxed),
        sessions_reclaimed: c.sessions_reclaimed.load(Ordering::Relaxed),
        protocol_violations: c.protocol_violations.load(Ordering::Relaxed),
        ops_completed: c.ops_completed.load(Ordering::Relaxed),
        ops_failed: c.ops_failed.load(Ordering::Relaxed),
    }
}

fn backend_name(state: &State) -> &'static str {
    match &state.gpus {
        Ok(g) if !g.is_empty() => "cuda",
        _ => "host",
    }
}

fn render_metrics(state: &State) -> String {
    let dp = &state.shared.dataplane;
    let stats = dp.blocks().map(|b| b.stats());
    let counters = session_counters(state);
    let sessions = state.shared.sessions();
    let names = dp.namespace_names();
    metrics::render(&Scrape {
        blocks: stats.as_ref(),
        metrics: &dp.counters.metrics,
        counters: &counters,
        sessions: &sessions,
        namespace_names: &names,
        uptime_s: state.started.elapsed().as_secs_f64(),
        backend: backend_name(state),
    })
}

/// `GET /status`: what `kvplane status` shows. Field names are part of the CLI's `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// "host" or "cuda".
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
    pub gpus: Vec<GpuStatus>,
    /// Why there are no GPUs, e.g. "no NVIDIA driver: host backend (...)".
    pub gpu_note: Option<String>,
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
    pub used_blocks: Option<[u32; 3]>,
    /// Namespaces with a quota: the limit per tier (HBM, host, NVMe; null = none).
    #[serde(default)]
    pub quota_blocks: Option<[Option<u32>; 3]>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub pci_bus_id: String,
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    pub nvlink_peers: Vec<String>,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

fn status_report(state: &State) -> StatusReport {
    let dp = &state.shared.dataplane;
    let m = &dp.counters.metrics;
    let stats = dp.blocks().map(|b| b.stats());
    let lookups = m.lookups();
    let names = dp.namespace_names();
    let mut tier_hits = [0u64; 3];
    let mut misses = 0;
    let mut namespaces = Vec::new();
    for (ns, l) in &lookups {
        for (t, h) in tier_hits.iter_mut().zip(l.hits) {
            *t += h;
        }
        misses += l.misses;
        let hits: u64 = l.hits.iter().sum();
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
    let hits: u64 = tier_hits.iter().sum();
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
                    lookup_hits: if t.tier == Tier::None {
                        0
                    } else {
                        tier_hits[t.tier.index()]
                    },
                    hit_rate: ratio(
                        if t.tier == Tier::None {
                            0
                        } else {
                            tier_hits[t.tier.index()]
                        },
                        asked,
                    ),
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
    let (gpus, gpu_note) = match &state.gpus {
        Ok(g) if !g.is_empty() => (g.clone(), None),
        Ok(_) => (
            Vec::new(),
            Some("NVML reports no GPUs: host backend".to_string()),
        ),
        Err(reason) => (Vec::new(), Some(reason.clone())),
    };
    StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        backend: backend_name(state).into(),
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
            .map(|s| SessionStatus {
                session_id: s.session_id,
                pid: s.pid,
                uid: s.uid,
                namespaces: s.namespaces,
                queue_pairs: s.queue_pairs,
            })
            .collect(),
        namespaces,
        gpus,
        gpu_note,
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
}

//! The router service: the KV event listener and the HTTP API.
//!
//! HTTP is a deliberately small HTTP/1.1 server over tokio (one request per connection,
//! `Connection: close`): request line and headers capped at 16 KiB, bodies only with
//! `Content-Length` and capped at `max_body_bytes`, a read timeout, and every malformed
//! request answered with a 4xx and a reason. The API has four routes and no streaming,
//! so this avoids a web framework's compile cost and dependency tree on the control plane.
//!
//! - `POST /route`: `{"namespace", "token_ids" | "block_hashes", "block_size"?, "salt"?,
//!   "lora_name"?}` -> the chosen worker and every candidate's score.
//! - `GET /workers`: known workers, connection state, sequence numbers, load.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: `ok`.

use crate::events::{
    AbortOnDrop, Frame, KvEvent, MAX_FRAME_BYTES, SnapshotBlock, Source, WorkerSeq, WorkerSnapshot,
    read_frame_body, read_frame_len, read_frame_rest, write_frame,
};
use crate::hash;
use crate::http::{self, Response};
use crate::index::{Index, IndexConfig};
use crate::route::{RouteConfig, Router, WorkerLoad};
use crate::vllm::{self, IndexOp, VllmTranslator};
use crate::{Tier, WorkerId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// `kvplane router` configuration (TOML file and flags).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where daemons (and vLLM feed forwarders) connect.
    pub events_addr: SocketAddr,
    /// HTTP API.
    pub http_addr: SocketAddr,
    /// A disconnected worker stays routable this long, then its blocks are dropped.
    pub grace_ms: u64,
    /// Block size for `token_ids` queries that do not name one.
    pub block_size: u32,
    pub max_nodes_per_namespace: usize,
    /// Blocks per namespace in the index (a node may hold a long run of them).
    pub max_blocks_per_namespace: usize,
    /// Namespaces in the index at once; stores into another are refused and counted.
    pub max_namespaces: usize,
    pub max_body_bytes: usize,
    pub http_timeout_ms: u64,
    /// Concurrent HTTP connections; beyond it new ones get 503 at once.
    pub max_http_connections: usize,
    /// Concurrent event connections; beyond it new ones are closed at once (each may
    /// hold a frame of up to `MAX_FRAME_BYTES` being read).
    pub max_event_connections: usize,
    /// An event connection that has not sent its Hello by then (its TLS handshake
    /// included) is closed.
    pub hello_timeout_ms: u64,
    /// Event connections still proving themselves (TLS handshake, Hello), in all and from
    /// one IP address; past either, a new one is closed at once and counted with the
    /// refused. A flood of peers that prove nothing keeps these places, not every one.
    pub max_pending_event_connections: usize,
    pub max_pending_event_connections_per_ip: usize,
    /// Workers one event connection's snapshot may list (a daemon hosts one per engine);
    /// a snapshot listing more ends the connection.
    pub max_workers_per_connection: usize,
    /// Memory the event connections' frames may take at once, read and decoded, all
    /// connections together (a frame of n bytes is charged `n x` its decoding's
    /// expansion, and waits for room; one larger than all of it runs alone).
    pub max_frame_memory_bytes: usize,
    /// Seed of the tie-breaking RNG.
    pub seed: u64,
    pub route: RouteConfig,
    /// Read KV events from this NATS JetStream stream (in addition to the TCP listener).
    pub nats: Option<crate::nats::RouterNatsConfig>,
    /// `[events_tls]`: mutual TLS on the event port (`ca_file` signs the peers' client
    /// certificates; `cert_file` and `key_file` are the router's). Unset: plain TCP.
    pub events_tls: crate::tls::EventsTls,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            events_addr: SocketAddr::from(([127, 0, 0, 1], 7470)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7471)),
            grace_ms: 10_000,
            block_size: 16,
            max_nodes_per_namespace: 1 << 20,
            max_blocks_per_namespace: 1 << 22,
            max_namespaces: 4096,
            max_body_bytes: 4 << 20,
            http_timeout_ms: 10_000,
            max_http_connections: 256,
            max_event_connections: 4096,
            hello_timeout_ms: 5_000,
            max_pending_event_connections: 256,
            max_pending_event_connections_per_ip: 32,
            max_workers_per_connection: 1024,
            max_frame_memory_bytes: 1 << 30,
            seed: 0x006b_7670_6c61_6e65,
            route: RouteConfig::default(),
            nats: None,
            events_tls: crate::tls::EventsTls::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    /// Event connections closed at once: `max_event_connections` were open, or
    /// `max_pending_event_connections` (in all or from the peer's address) were pending.
    pub connections_refused: AtomicU64,
    /// Event connections whose TLS handshake failed or did not finish by the Hello's
    /// deadline (no certificate, another CA's, not TLS at all).
    pub tls_refused: AtomicU64,
    /// Workers announced by a TLS connection whose certificate does not name them
    /// (`bind_worker_ids`): ignored.
    pub workers_not_in_certificate: AtomicU64,
    /// Frames naming a worker another live connection (or NATS) announced: ignored.
    pub frames_foreign_worker: AtomicU64,
    pub frames: AtomicU64,
    pub bad_frames: AtomicU64,
    pub events_applied: AtomicU64,
    pub events_stale: AtomicU64,
    pub seq_gaps: AtomicU64,
    pub resyncs_requested: AtomicU64,
    pub snapshots: AtomicU64,
    pub workers_dropped: AtomicU64,
    pub vllm_batches: AtomicU64,
    pub vllm_events: AtomicU64,
    pub vllm_seq_gaps: AtomicU64,
    pub route_requests: AtomicU64,
    pub route_bad_requests: AtomicU64,
    pub route_no_workers: AtomicU64,
    pub route_latency_ns_total: AtomicU64,
    pub http_requests: AtomicU64,
    pub nats_messages: AtomicU64,
    pub nats_bad_messages: AtomicU64,
    /// Stream sequence numbers this replica never saw (aged out or purged).
    pub nats_history_gaps: AtomicU64,
    /// A worker's event ids skipped a number within one publisher epoch.
    pub nats_event_gaps: AtomicU64,
    pub nats_snapshots_written: AtomicU64,
    pub nats_snapshots_restored: AtomicU64,
    /// kvplane publishers' heartbeats received.
    pub nats_heartbeats: AtomicU64,
}

/// What the router knows about one worker.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerInfo {
    pub worker: WorkerId,
    pub node: String,
    pub source: &'static str,
    pub connected: bool,
    /// Milliseconds since the connection dropped (while in its grace period).
    pub disconnected_for_ms: Option<u64>,
    pub last_seq: u64,
    pub awaiting_snapshot: bool,
    pub active_requests: u32,
    pub decode_blocks: u64,
    /// Boot epoch of the worker's NATS publisher (0 for other sources).
    pub epoch: u64,
    /// Milliseconds since this kvplane NATS publisher's heartbeat was due and did not come
    /// (the worker is left out of routing meanwhile; its blocks stay indexed, so every
    /// replica's index stays a function of the stream). `None`: on time, or not a kvplane
    /// NATS publisher.
    #[serde(default)]
    pub silent_for_ms: Option<u64>,
    /// The NATS publisher's heartbeat period (0: it sends none and is never left out).
    pub heartbeat_period_ms: u64,
    /// The period its beats state (a router that restored an older snapshot learns it).
    #[serde(skip)]
    beat_period_ms: u64,
    #[serde(skip)]
    conn: u64,
    /// The sequence number the snapshot its connection is sending brings it to (between
    /// `SnapshotBegin` and `SnapshotEnd`).
    #[serde(skip)]
    snapshot_seq: Option<u64>,
    /// The client certificate of the TLS connection that announced it
    /// ([`RouterState::register`]).
    #[serde(skip)]
    owner: Option<CertId>,
    #[serde(skip)]
    disconnected_at_ms: Option<u64>,
    /// [`LiveClock`] reading at the worker's last heartbeat of its current epoch (or when
    /// this router first learned of it, or of that epoch).
    #[serde(skip)]
    heartbeat_at: Option<u64>,
}

/// The router's heartbeat time: milliseconds during which its own heartbeat subscription
/// was up, so silence while the router itself is cut off never counts against a worker,
/// and a worker already silent stays so across the router's reconnects.
#[derive(Debug, Default)]
struct LiveClock {
    /// Up-time accumulated before the current stretch.
    base_ms: u64,
    /// Start of the current up stretch (`now_ms`), if up.
    up_since_ms: Option<u64>,
    /// Clock reading when this router last heard a router probe (its own or a replica's).
    last_probe: Option<u64>,
    /// The link generation whose events count (see [`RouterState::nats_new_link`]).
    generation: u64,
}

impl LiveClock {
    fn read(&self, now_ms: u64) -> u64 {
        self.base_ms + self.up_since_ms.map_or(0, |t| now_ms.saturating_sub(t))
    }
}

/// Shared router state.
#[derive(Debug)]
pub struct RouterState {
    pub index: Arc<Index>,
    pub router: Router,
    pub metrics: Metrics,
    pub config: ServiceConfig,
    workers: Mutex<HashMap<WorkerId, WorkerInfo>>,
    conns: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// The client certificate of each TLS event connection.
    identities: Mutex<HashMap<u64, Peer>>,
    /// Event connections before their Hello, per peer address ([`PendingPlace`]).
    pending: Mutex<HashMap<std::net::IpAddr, usize>>,
    next_conn: AtomicU64,
    /// Connections refused a worker id another live connection held.
    refused_claimants: Mutex<std::collections::HashSet<u64>>,
    /// Per kvplane event connection: rung to make it send a Resync.
    resync_bells: Mutex<HashMap<u64, Arc<tokio::sync::Notify>>>,
    /// `max_frame_memory_bytes` in MiB permits ([`RouterState::read_frame`]), of
    /// `frame_memory_mib` in all.
    frame_memory: tokio::sync::Semaphore,
    frame_memory_mib: usize,
    start: Instant,
    /// Stream sequence of the last NATS message applied.
    pub nats_seq: AtomicU64,
    /// Heartbeat time (see [`LiveClock`]).
    live: Mutex<LiveClock>,
}

enum Seq {
    Apply,
    Ignore,
    Gap,
}

/// Whose a worker id is, as a frame of one connection finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// This connection's (or nobody's yet).
    Owned,
    /// Another live event connection's.
    Foreign,
    /// Its connection is gone (or only NATS announced it): a snapshot takes it.
    Free,
}

impl Claim {
    /// [`Claim::of`] for connection `conn` holding client certificate `identity`: over
    /// TLS a disconnected worker's id stays its certificate's until its grace period
    /// ends, so another certificate holder cannot take it over (nor drop it) meanwhile.
    fn of_peer(entry: Option<&WorkerInfo>, conn: u64, identity: Option<CertId>) -> Claim {
        match Claim::of(entry, conn) {
            Claim::Free
                if entry.is_some_and(|e| {
                    e.conn != NATS_CONN && e.owner.is_some() && e.owner != identity
                }) =>
            {
                Claim::Foreign
            }
            claim => claim,
        }
    }

    /// Whose `entry` is, to connection `conn` (`NATS_CONN` for the stream).
    fn of(entry: Option<&WorkerInfo>, conn: u64) -> Claim {
        match entry {
            None => Claim::Owned,
            Some(e) if e.conn == conn => Claim::Owned,
            Some(e) if e.connected && e.source != "nats" => Claim::Foreign,
            Some(_) => Claim::Free,
        }
    }
}

/// A place among the event connections before their Hello; given back when dropped.
struct PendingPlace {
    state: Arc<RouterState>,
    ip: std::net::IpAddr,
}

impl PendingPlace {
    /// A place for a connection from `ip`, unless `max_pending_event_connections` are
    /// pending in all or `..._per_ip` from `ip`.
    fn take(state: &Arc<RouterState>, ip: std::net::IpAddr) -> Option<PendingPlace> {
        let mut pending = lock(&state.pending);
        let all: usize = pending.values().sum();
        let mine = pending.get(&ip).copied().unwrap_or(0);
        if all >= state.config.max_pending_event_connections
            || mine >= state.config.max_pending_event_connections_per_ip
        {
            return None;
        }
        *pending.entry(ip).or_insert(0) += 1;
        Some(PendingPlace {
            state: state.clone(),
            ip,
        })
    }
}

impl Drop for PendingPlace {
    fn drop(&mut self) {
        let mut pending = lock(&self.state.pending);
        if let Some(n) = pending.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.ip);
            }
        }
    }
}

/// A client certificate: the BLAKE3 hash of its DER bytes.
type CertId = [u8; 32];

/// A TLS event connection's client certificate, verified by the handshake.
#[derive(Debug)]
struct Peer {
    id: CertId,
    /// Its certificate chain as sent, its own first.
    chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
}

/// The connection id of workers the NATS stream announced (event connections count
/// from 1).
const NATS_CONN: u64 = 0;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RouterState {
    pub fn new(config: ServiceConfig) -> Self {
        let frame_memory_mib = (config.max_frame_memory_bytes >> 20).clamp(1, u32::MAX as usize);
        let index = Arc::new(Index::new(IndexConfig {
            max_nodes_per_namespace: config.max_nodes_per_namespace,
            max_blocks_per_namespace: config.max_blocks_per_namespace,
            max_namespaces: config.max_namespaces,
        }));
        RouterState {
            router: Router::new(index.clone(), config.route.clone(), config.seed),
            index,
            metrics: Metrics::default(),
            config,
            workers: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            identities: Mutex::default(),
            pending: Mutex::default(),
            next_conn: AtomicU64::new(1),
            refused_claimants: Mutex::default(),
            resync_bells: Mutex::default(),
            frame_memory: tokio::sync::Semaphore::new(frame_memory_mib),
            frame_memory_mib,
            start: Instant::now(),
            nats_seq: AtomicU64::new(0),
            live: Mutex::new(LiveClock::default()),
        }
    }

    /// Reads one frame of at most `max_bytes` once the frames in flight leave room for
    /// it in `max_frame_memory_bytes`, charged `expansion` times its size (what decoding
    /// it may take); the permit is held while the caller decodes and applies it. Frames
    /// under 64 KiB are not charged. `Ok(None)` on a clean end of stream.
    async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
        max_bytes: usize,
        expansion: usize,
    ) -> Result<Option<(Vec<u8>, Option<tokio::sync::SemaphorePermit<'_>>)>, ConnError> {
        let Some(len) = read_frame_len(r, max_bytes).await? else {
            return Ok(None);
        };
        let permit = if len < 64 << 10 {
            None
        } else {
            let mib = (len.saturating_mul(expansion) >> 20).max(1);
            let want = u32::try_from(mib.min(self.frame_memory_mib)).unwrap_or(u32::MAX);
            // Bounded: frames that cannot get room soon end their connection (the
            // publisher reconnects and snapshots) rather than queue behind a peer that
            // holds the budget.
            let wait = Duration::from_millis(FRAME_MEMORY_WAIT_MS);
            match tokio::time::timeout(wait, self.frame_memory.acquire_many(want)).await {
                // Never closed: the semaphore lives as long as the state.
                Ok(p) => p.ok(),
                Err(_) => return Err(ConnError::FrameMemory { len }),
            }
        };
        // A peer must send the body at a minimum rate while it holds the budget's room:
        // one trickling a large frame would otherwise hold it for good.
        let deadline = Duration::from_millis(FRAME_MEMORY_WAIT_MS)
            + Duration::from_secs((len / MIN_FRAME_BYTES_PER_SEC) as u64);
        let body = tokio::time::timeout(deadline, read_frame_rest(r, len))
            .await
            .map_err(|_| ConnError::SlowFrame { len })??;
        Ok(Some((body, permit)))
    }

    /// MiB of the frame memory budget free now (tests, introspection).
    pub fn frame_memory_free_mib(&self) -> usize {
        self.frame_memory.available_permits()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, LiveClock> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (heartbeat clock now, clock when this router last heard a router probe).
    fn live_now(&self) -> (u64, Option<u64>) {
        let now = self.now_ms();
        let l = self.live();
        (l.read(now), l.last_probe)
    }

    /// How long `w`'s heartbeat is overdue, if it is: only NATS publishers that announce a
    /// period are judged, against `max(heartbeat_timeout_ms, 3 periods)` of this router's
    /// heartbeat time. A router that has not heard a probe for half the configured
    /// timeout (two probes missed) judges no one: its subscription, not the workers, may
    /// be what is broken, and it stops judging before any live worker could be overdue.
    fn heartbeat_overdue(&self, w: &WorkerInfo, (clock, probe): (u64, Option<u64>)) -> Option<u64> {
        let cfg_timeout = self.config.nats.as_ref()?.heartbeat_timeout_ms;
        let period = w.heartbeat_period_ms.max(w.beat_period_ms);
        if cfg_timeout == 0 || period == 0 || w.source != "nats" {
            return None;
        }
        let timeout = cfg_timeout.max(period.saturating_mul(3));
        if clock.saturating_sub(probe?) > cfg_timeout / 2 {
            return None;
        }
        let silent = clock.saturating_sub(w.heartbeat_at.unwrap_or(clock));
        (silent > timeout).then_some(silent)
    }

    /// A new NATS client: its generation, the only one whose link events count from now
    /// on; the link is down until it says otherwise.
    pub fn nats_new_link(&self) -> u64 {
        let now = self.now_ms();
        let mut l = self.live();
        if let Some(t) = l.up_since_ms.take() {
            l.base_ms += now.saturating_sub(t);
        }
        l.generation += 1;
        l.generation
    }

    /// The heartbeat subscription of link generation `link_gen` is up (true) or cut off
    /// (false); events of any other generation are ignored.
    pub fn nats_link(&self, link_gen: u64, up: bool) {
        let now = self.now_ms();
        let mut l = self.live();
        if link_gen != l.generation {
            return;
        }
        match (up, l.up_since_ms) {
            (true, None) => l.up_since_ms = Some(now),
            (false, Some(t)) => {
                l.base_ms += now.saturating_sub(t);
                l.up_since_ms = None;
            }
            _ => {}
        }
    }

    /// This router heard a router probe: its heartbeat subscription works.
    pub fn nats_probe(&self) {
        let now = self.now_ms();
        let mut l = self.live();
        let c = l.read(now);
        l.last_probe = Some(c);
    }

    /// A kvplane publisher's heartbeat. Proof of life for its worker when it comes from
    /// the epoch the router knows or a later one (a restarted daemon whose snapshot is
    /// not read yet is alive; an older epoch's beat is a stale message).
    pub fn nats_heartbeat(&self, worker: WorkerId, epoch: u64, period_ms: u64) {
        let (clock, _) = self.live_now();
        if let Some(e) = self.workers().get_mut(&worker)
            && epoch >= e.epoch
        {
            e.heartbeat_at = Some(clock);
            e.beat_period_ms = period_ms;
        }
        self.metrics.nats_heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, WorkerInfo>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Workers currently routable (connected, or disconnected within the grace period).
    pub fn worker_list(&self) -> Vec<WorkerInfo> {
        let now = self.now_ms();
        let live = self.live_now();
        let mut v: Vec<WorkerInfo> = self
            .workers()
            .values()
            .map(|w| {
                let mut w = w.clone();
                w.disconnected_for_ms = w.disconnected_at_ms.map(|t| now.saturating_sub(t));
                w.silent_for_ms = self.heartbeat_overdue(&w, live);
                w
            })
            .collect();
        v.sort_by_key(|w| w.worker);
        v
    }

    /// Takes `worker` for connection `conn`; false (and nothing changes) when another
    /// live event connection announced it: a worker id belongs to one connection while
    /// that connection lives, so another cannot rewrite, silence or wipe its blocks. A
    /// disconnected worker's id is free to take again (its daemon reconnecting), and so is
    /// one only NATS announced (a daemon's own TCP link takes precedence over the stream).
    /// A refused connection is asked for a snapshot again when some connection closes
    /// (the owner may have been its own earlier connection, not yet seen closed).
    fn register(&self, worker: WorkerId, node: &str, source: &'static str, conn: u64) -> bool {
        let identity = self.identity(conn);
        // Counted; logged at powers of two (a peer may repeat a refused claim forever).
        let refuse = |counter: &AtomicU64, why: &str| {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(worker, conn, refused = n, "{why}; ignored");
            }
            false
        };
        if self.config.events_tls.bind_worker_ids && !self.certificate_names(conn, worker) {
            let name = crate::tls::worker_dns_name(worker);
            return refuse(
                &self.metrics.workers_not_in_certificate,
                &format!("worker not named in the connection's certificate (as {name})"),
            );
        }
        let mut workers = self.workers();
        if Claim::of_peer(workers.get(&worker), conn, identity) == Claim::Foreign {
            lock(&self.refused_claimants).insert(conn);
            return refuse(
                &self.metrics.frames_foreign_worker,
                "worker announced by another live connection (or, over TLS, another \
                 certificate's in its grace period)",
            );
        }
        let e = workers.entry(worker).or_insert_with(|| WorkerInfo {
            worker,
            node: node.to_owned(),
            source,
            connected: true,
            disconnected_for_ms: None,
            last_seq: 0,
            awaiting_snapshot: true,
            active_requests: 0,
            decode_blocks: 0,
            epoch: 0,
            conn,
            snapshot_seq: None,
            owner: None,
            disconnected_at_ms: None,
            silent_for_ms: None,
            heartbeat_period_ms: 0,
            beat_period_ms: 0,
            heartbeat_at: None,
        });
        e.node = node.to_owned();
        e.source = source;
        if e.conn != conn {
            // Another connection's snapshot in progress is not this one's to end.
            e.snapshot_seq = None;
        }
        e.conn = conn;
        e.owner = identity;
        e.connected = true;
        e.disconnected_at_ms = None;
        true
    }

    /// Whether connection `conn` announced `worker` (its events and loads are applied).
    fn owns(&self, worker: WorkerId, conn: u64) -> Claim {
        let (claim, known) = {
            let workers = self.workers();
            let entry = workers.get(&worker);
            (Claim::of(entry, conn), entry.is_some())
        };
        // A worker this connection's certificate does not name is never its: its events
        // must not ask for a snapshot that would be refused again, every second.
        let claim = if claim == Claim::Owned
            && !known
            && self.config.events_tls.bind_worker_ids
            && !self.certificate_names(conn, worker)
        {
            Claim::Foreign
        } else {
            claim
        };
        if claim != Claim::Owned {
            self.metrics
                .frames_foreign_worker
                .fetch_add(1, Ordering::Relaxed);
        }
        claim
    }

    /// Replaces the node's state with a snapshot in one frame (protocol 1): the same as
    /// its begin, blocks and end in frames of their own.
    pub fn apply_snapshot(
        &self,
        node: &str,
        conn: u64,
        workers: &[WorkerSnapshot],
    ) -> Result<(), TooManyWorkers> {
        let seqs: Vec<WorkerSeq> = workers
            .iter()
            .map(|w| WorkerSeq {
                worker: w.state.worker,
                seq: w.seq,
            })
            .collect();
        self.begin_snapshot(node, conn, &seqs)?;
        for ws in workers {
            for ns in &ws.state.namespaces {
                self.snapshot_blocks(conn, ws.state.worker, &ns.namespace, &ns.blocks);
            }
        }
        self.end_snapshot(conn);
        Ok(())
    }

    /// Starts a snapshot of connection `conn`: listed workers lose every block (their
    /// blocks arrive with [`RouterState::snapshot_blocks`]) and ignore events until
    /// [`RouterState::end_snapshot`]; workers this node announced before but no longer
    /// lists are dropped.
    /// More workers than `max_workers_per_connection` refuse the whole snapshot.
    pub fn begin_snapshot(
        &self,
        node: &str,
        conn: u64,
        workers: &[WorkerSeq],
    ) -> Result<(), TooManyWorkers> {
        if workers.len() > self.config.max_workers_per_connection {
            return Err(TooManyWorkers(workers.len()));
        }
        let listed: std::collections::HashSet<WorkerId> =
            workers.iter().map(|w| w.worker).collect();
        let identity = self.identity(conn);
        let gone: Vec<WorkerId> = {
            let mut table = self.workers();
            let gone: Vec<WorkerId> = table
                .values()
                .filter(|w| {
                    // Another live connection's workers are not this node's to drop,
                    // whatever node name it gives, nor (over TLS) another certificate's
                    // in their grace period.
                    w.node == node
                        && w.source == "kvplane"
                        && Claim::of_peer(Some(w), conn, identity) != Claim::Foreign
                        && !listed.contains(&w.worker)
                })
                .map(|w| w.worker)
                .collect();
            for w in &gone {
                table.remove(w);
            }
            gone
        };
        for w in gone {
            self.index.remove_worker(w, None);
        }
        for ws in workers {
            let known = self.workers().contains_key(&ws.worker);
            if !self.register(ws.worker, node, "kvplane", conn) {
                continue;
            }
            // (A scan of every namespace: only for a worker the index may hold.)
            if known {
                self.index.remove_worker(ws.worker, None);
            }
            if let Some(e) = self.workers().get_mut(&ws.worker) {
                e.awaiting_snapshot = true;
                e.snapshot_seq = Some(ws.seq);
            }
        }
        Ok(())
    }

    /// Whether TLS connection `conn`'s client certificate names `worker`
    /// (`bind_worker_ids`); a connection without one names none.
    fn certificate_names(&self, conn: u64, worker: WorkerId) -> bool {
        lock(&self.identities).get(&conn).is_some_and(|p| {
            p.chain
                .first()
                .is_some_and(|c| crate::tls::certificate_names_worker(c, worker))
        })
    }

    /// The client certificate of TLS connection `conn`.
    fn identity(&self, conn: u64) -> Option<CertId> {
        lock(&self.identities).get(&conn).map(|p| p.id)
    }

    /// Blocks of `worker` in `namespace`, part of the snapshot connection `conn` began;
    /// ignored (and counted as foreign) for a worker that snapshot does not cover.
    pub fn snapshot_blocks(
        &self,
        conn: u64,
        worker: WorkerId,
        namespace: &str,
        blocks: &[SnapshotBlock],
    ) {
        let covered = self
            .workers()
            .get(&worker)
            .is_some_and(|e| e.conn == conn && e.snapshot_seq.is_some());
        if !covered {
            self.metrics
                .frames_foreign_worker
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        for run in crate::events::chain_runs(blocks, usize::MAX) {
            let first = blocks[run.start];
            let hashes: Vec<u64> = blocks[run].iter().map(|b| b.hash).collect();
            for tier in Tier::ALL {
                if first.tiers & tier.bit() != 0 {
                    self.index
                        .store(namespace, worker, tier, first.parent, &hashes);
                }
            }
        }
    }

    /// Ends connection `conn`'s snapshot: its workers are current to their sequence
    /// numbers and take events again.
    pub fn end_snapshot(&self, conn: u64) {
        let mut ended = false;
        for e in self.workers().values_mut() {
            if e.conn != conn {
                continue;
            }
            if let Some(seq) = e.snapshot_seq.take() {
                e.last_seq = seq;
                e.awaiting_snapshot = false;
                ended = true;
            }
        }
        if ended {
            self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn check_seq(&self, worker: WorkerId, seq: u64) -> Seq {
        let mut workers = self.workers();
        let Some(e) = workers.get_mut(&worker) else {
            return Seq::Gap; // events before any snapshot of this worker
        };
        if e.awaiting_snapshot || seq <= e.last_seq {
            return Seq::Ignore;
        }
        if seq != e.last_seq + 1 {
            e.awaiting_snapshot = true;
            return Seq::Gap;
        }
        e.last_seq = seq;
        Seq::Apply
    }

    /// Applies one event of connection `conn`; returns false when a resync is needed.
    /// An event for a worker another live connection announced is ignored; one for a
    /// worker whose connection is gone asks this one for a snapshot, which takes it.
    pub fn apply_event(&self, conn: u64, worker: WorkerId, seq: u64, event: &KvEvent) -> bool {
        match self.owns(worker, conn) {
            Claim::Owned => {}
            Claim::Foreign => return true,
            Claim::Free => return false,
        }
        match self.check_seq(worker, seq) {
            Seq::Ignore => {
                self.metrics.events_stale.fetch_add(1, Ordering::Relaxed);
                true
            }
            Seq::Gap => {
                self.metrics.seq_gaps.fetch_add(1, Ordering::Relaxed);
                false
            }
            Seq::Apply => {
                self.apply_kv_event(worker, event);
                true
            }
        }
    }

    fn apply_kv_event(&self, worker: WorkerId, event: &KvEvent) {
        match event {
            KvEvent::Stored {
                namespace,
                parent,
                hashes,
                tier,
            } => {
                self.index.store(namespace, worker, *tier, *parent, hashes);
            }
            KvEvent::Removed {
                namespace,
                hashes,
                tier,
            } => {
                self.index.remove(namespace, worker, *tier, hashes);
            }
            KvEvent::Cleared { namespace } => {
                self.index.remove_worker(worker, namespace.as_deref());
            }
        }
        self.metrics.events_applied.fetch_add(1, Ordering::Relaxed);
    }

    fn set_load(&self, worker: WorkerId, active_requests: u32, decode_blocks: u64) {
        if let Some(e) = self.workers().get_mut(&worker) {
            e.active_requests = active_requests;
            e.decode_blocks = decode_blocks;
        }
    }

    fn connection_closed(&self, conn: u64) {
        let now = self.now_ms();
        for e in self.workers().values_mut() {
            if e.conn == conn && e.connected {
                e.connected = false;
                e.disconnected_at_ms = Some(now);
            }
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn);
        lock(&self.resync_bells).remove(&conn);
        lock(&self.identities).remove(&conn);
        self.ring_refused_claimants();
    }

    /// Connections refused a worker may now take it (its connection closed, or its grace
    /// period ended): each is asked for a snapshot.
    fn ring_refused_claimants(&self) {
        let refused: Vec<u64> = lock(&self.refused_claimants).drain().collect();
        let bells = lock(&self.resync_bells);
        for c in refused {
            if let Some(bell) = bells.get(&c) {
                bell.notify_one();
            }
        }
    }

    /// Drops workers whose grace period ended. Returns how many.
    pub fn reap(&self) -> usize {
        let now = self.now_ms();
        let grace = self.config.grace_ms;
        let expired: Vec<WorkerId> = {
            let mut workers = self.workers();
            let ids: Vec<WorkerId> = workers
                .values()
                .filter(|w| {
                    w.disconnected_at_ms
                        .is_some_and(|t| now.saturating_sub(t) >= grace)
                })
                .map(|w| w.worker)
                .collect();
            for id in &ids {
                workers.remove(id);
            }
            ids
        };
        for &w in &expired {
            self.index.remove_worker(w, None);
            tracing::info!(worker = w, "worker dropped after its grace period");
        }
        self.metrics
            .workers_dropped
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        if !expired.is_empty() {
            self.ring_refused_claimants();
        }
        expired.len()
    }

    /// Applies one message of the NATS stream (in stream order).
    pub fn apply_nats(&self, meta: &crate::nats::MessageMeta, ev: &crate::dynamo::RouterEvent) {
        let worker = ev.worker_id;
        let id = ev.event.event_id;
        let (clock, _) = self.live_now();
        {
            let mut workers = self.workers();
            if Claim::of(workers.get(&worker), NATS_CONN) == Claim::Foreign {
                // A live event connection's worker: the stream does not rewrite it.
                self.metrics
                    .frames_foreign_worker
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            let e = workers.entry(worker).or_insert_with(|| WorkerInfo {
                worker,
                node: meta
                    .node
                    .clone()
                    .unwrap_or_else(|| format!("nats-{worker:x}")),
                source: "nats",
                connected: true,
                disconnected_for_ms: None,
                last_seq: 0,
                // A kvplane publisher's state starts with its snapshot; a Dynamo
                // publisher has none to wait for.
                awaiting_snapshot: meta.epoch != 0 && !meta.snapshot,
                active_requests: 0,
                decode_blocks: 0,
                epoch: meta.epoch,
                conn: NATS_CONN,
                snapshot_seq: None,
                owner: None,
                disconnected_at_ms: None,
                silent_for_ms: None,
                heartbeat_period_ms: meta.heartbeat_ms,
                beat_period_ms: 0,
                heartbeat_at: Some(clock),
            });
            e.heartbeat_period_ms = meta.heartbeat_ms;
            if meta.epoch != e.epoch {
                // A new publisher instance: its silence counts from here, and only the
                // period it announces (or its own beats) say whether it beats at all.
                e.heartbeat_at = Some(clock);
                e.beat_period_ms = 0;
            }
            if meta.epoch != 0 && meta.epoch == e.epoch && e.last_seq != 0 && id <= e.last_seq {
                // A kvplane publisher's message this replica applied already (a
                // redelivery past the duplicate window, a replayed message): applied again
                // it could undo a later change (a block stored, removed, then stored again
                // by the replay). Its ids only grow within an epoch; a restart is a new
                // epoch. (Dynamo's publishers have no epoch: their ids restart with them.)
                self.metrics.events_stale.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if meta.snapshot {
                e.epoch = meta.epoch;
                e.awaiting_snapshot = false;
            } else if meta.epoch != e.epoch {
                // Events of a publisher epoch whose snapshot this replica never saw.
                e.epoch = meta.epoch;
                e.awaiting_snapshot = true;
                self.metrics.nats_event_gaps.fetch_add(1, Ordering::Relaxed);
            } else if e.last_seq != 0 && id != e.last_seq.wrapping_add(1) {
                e.awaiting_snapshot |= meta.epoch != 0;
                self.metrics.nats_event_gaps.fetch_add(1, Ordering::Relaxed);
            }
            e.last_seq = id;
            if let Some(node) = &meta.node {
                e.node.clone_from(node);
            }
        }
        let ns = meta.namespace.as_deref().unwrap_or("default");
        crate::nats::apply_to_index(&self.index, ns, ev);
        if meta.snapshot {
            self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.events_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// After a hole in the stream history every NATS worker's state is suspect.
    pub fn mark_all_nats_workers_stale(&self) {
        for e in self.workers().values_mut() {
            if e.source == "nats" {
                e.awaiting_snapshot = true;
            }
        }
    }

    /// This replica's NATS-fed state as of stream sequence `seq`.
    pub fn nats_snapshot(&self, stream: String, seq: u64) -> crate::nats::RouterSnapshot {
        let workers: Vec<crate::nats::SnapshotWorker> = self
            .workers()
            .values()
            .filter(|w| w.source == "nats")
            .map(|w| crate::nats::SnapshotWorker {
                worker: w.worker,
                node: w.node.clone(),
                epoch: w.epoch,
                last_event_id: w.last_seq,
                awaiting_snapshot: w.awaiting_snapshot,
                heartbeat_ms: w.heartbeat_period_ms,
            })
            .collect();
        let ids: std::collections::HashSet<WorkerId> = workers.iter().map(|w| w.worker).collect();
        let index = self
            .index
            .dump()
            .into_iter()
            .map(|(ns, nodes)| {
                let nodes = nodes
                    .into_iter()
                    .filter_map(|mut n| {
                        n.holders.retain(|(w, _)| ids.contains(w));
                        (!n.holders.is_empty()).then_some(n)
                    })
                    .collect();
                (ns, nodes)
            })
            .collect();
        crate::nats::RouterSnapshot {
            stream,
            stream_seq: seq,
            workers,
            index,
        }
    }

    /// Loads a snapshot written by any replica (before reading the stream after it).
    pub fn restore_nats_snapshot(&self, snap: &crate::nats::RouterSnapshot) {
        let (clock, _) = self.live_now();
        self.index.restore(&snap.index);
        let mut workers = self.workers();
        for w in &snap.workers {
            workers.insert(
                w.worker,
                WorkerInfo {
                    worker: w.worker,
                    node: w.node.clone(),
                    source: "nats",
                    connected: true,
                    disconnected_for_ms: None,
                    last_seq: w.last_event_id,
                    awaiting_snapshot: w.awaiting_snapshot,
                    active_requests: 0,
                    decode_blocks: 0,
                    epoch: w.epoch,
                    conn: 0,
                    snapshot_seq: None,
                    owner: None,
                    disconnected_at_ms: None,
                    silent_for_ms: None,
                    heartbeat_period_ms: w.heartbeat_ms,
                    beat_period_ms: 0,
                    heartbeat_at: Some(clock),
                },
            );
        }
    }

    /// Closes every event connection (operator action; tests use it to force a resync).
    pub fn disconnect_all(&self) {
        for (_, h) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            h.abort();
        }
    }

    /// Candidate workers with their load: every known worker but those whose NATS
    /// heartbeat is overdue.
    pub fn candidates(&self) -> Vec<WorkerLoad> {
        let live = self.live_now();
        let mut v: Vec<WorkerLoad> = self
            .workers()
            .values()
            .filter(|w| self.heartbeat_overdue(w, live).is_none())
            .map(|w| WorkerLoad {
                worker: w.worker,
                active_requests: w.active_requests,
                decode_blocks: w.decode_blocks,
            })
            .collect();
        v.sort_by_key(|w| w.worker);
        v
    }

    /// Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP kvplane_router_{name} {help}");
            let _ = writeln!(out, "# TYPE kvplane_router_{name} counter");
            let _ = writeln!(out, "kvplane_router_{name} {v}");
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "event_connections_total",
            "Event connections accepted.",
            l(&m.connections),
        );
        counter(
            "event_connections_refused_total",
            "Event connections closed at once: max_event_connections open, or \
             max_pending_event_connections pending (in all or from one address).",
            l(&m.connections_refused),
        );
        counter(
            "event_connections_tls_refused_total",
            "Event connections whose TLS handshake failed or did not finish in time.",
            l(&m.tls_refused),
        );
        counter(
            "workers_not_in_certificate_total",
            "Workers announced over TLS whose certificate does not name them (ignored).",
            l(&m.workers_not_in_certificate),
        );
        counter(
            "frames_foreign_worker_total",
            "Event frames naming a worker another live connection announced (ignored).",
            l(&m.frames_foreign_worker),
        );
        counter("frames_total", "Event frames received.", l(&m.frames));
        counter(
            "bad_frames_total",
            "Undecodable event frames.",
            l(&m.bad_frames),
        );
        counter(
            "events_applied_total",
            "KV events applied to the index.",
            l(&m.events_applied),
        );
        counter(
            "events_stale_total",
            "Events ignored as already covered by a snapshot.",
            l(&m.events_stale),
        );
        counter("seq_gaps_total", "Sequence gaps detected.", l(&m.seq_gaps));
        counter(
            "resyncs_requested_total",
            "Snapshots requested after a gap.",
            l(&m.resyncs_requested),
        );
        counter("snapshots_total", "Snapshots applied.", l(&m.snapshots));
        counter(
            "workers_dropped_total",
            "Workers dropped after their grace period.",
            l(&m.workers_dropped),
        );
        counter(
            "vllm_batches_total",
            "vLLM KV event batches decoded.",
            l(&m.vllm_batches),
        );
        counter(
            "vllm_events_total",
            "vLLM KV events applied.",
            l(&m.vllm_events),
        );
        counter(
            "vllm_seq_gaps_total",
            "Gaps in vLLM feed sequence numbers.",
            l(&m.vllm_seq_gaps),
        );
        counter(
            "route_requests_total",
            "Successful route decisions.",
            l(&m.route_requests),
        );
        counter(
            "route_bad_requests_total",
            "Route requests rejected with 4xx.",
            l(&m.route_bad_requests),
        );
        counter(
            "route_no_workers_total",
            "Route requests with no worker available.",
            l(&m.route_no_workers),
        );
        counter(
            "route_latency_seconds_total",
            "Total route decision time (divide by requests).",
            0,
        );
        let s = &self.index.stats;
        counter(
            "index_evicted_nodes_total",
            "Index nodes evicted by the node cap.",
            l(&s.evicted_nodes),
        );
        counter(
            "index_evicted_blocks_total",
            "Blocks evicted by the node or block cap.",
            l(&s.evicted_blocks),
        );
        counter(
            "index_unknown_parent_total",
            "Store events whose parent was unknown.",
            l(&s.unknown_parent_events),
        );
        counter(
            "index_namespace_limit_total",
            "Store events refused: a new namespace past max_namespaces.",
            l(&s.namespace_limit_events),
        );
        for (name, help, v) in [
            (
                "nats_messages_total",
                "NATS stream messages read.",
                &m.nats_messages,
            ),
            (
                "nats_bad_messages_total",
                "Undecodable NATS messages skipped.",
                &m.nats_bad_messages,
            ),
            (
                "nats_heartbeats_total",
                "kvplane publishers' heartbeats received.",
                &m.nats_heartbeats,
            ),
            (
                "nats_history_gaps_total",
                "Stream sequences never read (aged out or purged).",
                &m.nats_history_gaps,
            ),
            (
                "nats_event_gaps_total",
                "Worker event-id gaps within a publisher epoch.",
                &m.nats_event_gaps,
            ),
            (
                "nats_snapshots_written_total",
                "Router snapshots written to the object store.",
                &m.nats_snapshots_written,
            ),
            (
                "nats_snapshots_restored_total",
                "Router snapshots restored at start.",
                &m.nats_snapshots_restored,
            ),
        ] {
            counter(name, help, l(v));
        }
        counter(
            "nats_stream_sequence",
            "Stream sequence of the last NATS message applied.",
            l(&self.nats_seq),
        );
        // The latency line above is replaced with a float value.
        out = out.replace(
            "kvplane_router_route_latency_seconds_total 0\n",
            &format!(
                "kvplane_router_route_latency_seconds_total {}\n",
                l(&m.route_latency_ns_total) as f64 * 1e-9
            ),
        );
        let workers = self.worker_list();
        let connected = workers.iter().filter(|w| w.connected).count();
        let mut gauge = |name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP kvplane_router_{name} {help}");
            let _ = writeln!(out, "# TYPE kvplane_router_{name} gauge");
            let _ = writeln!(out, "kvplane_router_{name} {v}");
        };
        gauge("index_nodes", "Radix tree nodes.", self.index.node_count());
        gauge(
            "index_blocks",
            "Distinct blocks indexed.",
            self.index.block_count(),
        );
        gauge(
            "index_namespaces",
            "Namespaces indexed.",
            self.index.namespace_count(),
        );
        gauge(
            "workers",
            "Known workers (connected or in grace).",
            workers.len(),
        );
        gauge("workers_connected", "Connected workers.", connected);
        gauge(
            "workers_silent",
            "kvplane NATS publishers whose heartbeat is overdue (left out of routing).",
            workers.iter().filter(|w| w.silent_for_ms.is_some()).count(),
        );
        gauge(
            "predictions",
            "Live predicted routing decisions.",
            self.router.predictions(),
        );
        out
    }
}

/// A running router.
pub struct RouterService {
    pub state: Arc<RouterState>,
    pub events_addr: SocketAddr,
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// The event port's TLS acceptor, replaced by [`RouterService::reload_tls`].
    tls: SharedAcceptor,
}

impl std::fmt::Debug for RouterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterService")
            .field("events_addr", &self.events_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// The event port's current TLS acceptor (`None`: plain TCP).
type SharedAcceptor = Arc<std::sync::RwLock<Option<tokio_rustls::TlsAcceptor>>>;

impl RouterService {
    /// Binds both listeners (port 0 picks a free port) and starts serving.
    pub async fn start(config: ServiceConfig) -> Result<RouterService, ServiceError> {
        // Before binding: a bad file fails the start-up with its name.
        let tls = if config.events_tls.is_empty() {
            None
        } else {
            Some(
                config
                    .events_tls
                    .acceptor(&mut crate::tls::read_file)?
                    .acceptor,
            )
        };
        let tls: SharedAcceptor = Arc::new(std::sync::RwLock::new(tls));
        let events = TcpListener::bind(config.events_addr)
            .await
            .map_err(|source| ServiceError::Bind {
                what: "event listener",
                addr: config.events_addr,
                source,
            })?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| ServiceError::Bind {
                what: "HTTP listener",
                addr: config.http_addr,
                source,
            })?;
        let events_addr = events.local_addr().unwrap_or(config.events_addr);
        let http_addr = http.local_addr().unwrap_or(config.http_addr);
        let nats = config.nats.clone();
        let state = Arc::new(RouterState::new(config));
        let mut tasks = vec![
            tokio::spawn(accept_events(events, state.clone(), tls.clone())),
            tokio::spawn(accept_http(http, state.clone())),
            tokio::spawn(reaper(state.clone())),
        ];
        if let Some(nats) = nats {
            tasks.push(tokio::spawn(crate::nats::run_consumer(state.clone(), nats)));
        }
        Ok(RouterService {
            state,
            events_addr,
            http_addr,
            tasks,
            tls,
        })
    }

    /// Reads `[events_tls]`'s files again (a renewed certificate, a new revocation list)
    /// for the connections accepted from now on, and ends each connection already up
    /// whose certificate they no longer admit (revoked, expired, another CA); returns how
    /// many. On an error the files in use stay. TLS cannot be turned on or off this way.
    pub fn reload_tls(&self) -> Result<usize, crate::tls::TlsError> {
        let config = &self.state.config.events_tls;
        if config.is_empty() {
            return Ok(0);
        }
        let server = config.acceptor(&mut crate::tls::read_file)?;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(server.acceptor.clone());
        let refused: Vec<u64> = lock(&self.state.identities)
            .iter()
            .filter(|(_, p)| !server.admits(&p.chain))
            .map(|(&conn, _)| conn)
            .collect();
        let conns = lock(&self.state.conns);
        for conn in &refused {
            if let Some(task) = conns.get(conn) {
                task.abort();
            }
        }
        Ok(refused.len())
    }

    pub fn shutdown(self) {
        self.state.disconnect_all();
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn reaper(state: Arc<RouterState>) {
    let period = Duration::from_millis((state.config.grace_ms / 4).clamp(5, 1_000));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        state.reap();
    }
}

async fn accept_events(listener: TcpListener, state: Arc<RouterState>, tls: SharedAcceptor) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!(%err, "event accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = state.conns.lock().unwrap_or_else(|e| e.into_inner()).len();
        let pending = if open >= state.config.max_event_connections {
            Err("at max_event_connections")
        } else {
            PendingPlace::take(&state, peer.ip()).ok_or("at max_pending_event_connections")
        };
        let pending = match pending {
            Ok(p) => p,
            Err(why) => {
                let refused = state
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, open, refused, "event connection refused: {why}");
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        crate::events::keep_alive(&stream);
        state.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
        let st = state.clone();
        let tls = tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let task = tokio::spawn(async move {
            // The handshake and the Hello share one deadline: a peer holds a connection
            // place at most that long before it has shown anything.
            let timeout_ms = st.config.hello_timeout_ms;
            let hello_by = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            let result = match tls {
                None => event_connection(&st, stream, conn, (hello_by, pending)).await,
                Some(tls) => match tokio::time::timeout_at(hello_by, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        // Verified by the handshake: the chain's first is the client's own.
                        let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
                        if let Some(cert) = chain.first() {
                            let peer = Peer {
                                id: *blake3::hash(cert.as_ref()).as_bytes(),
                                chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
                            };
                            lock(&st.identities).insert(conn, peer);
                        }
                        event_connection(&st, stream, conn, (hello_by, pending)).await
                    }
                    Ok(Err(err)) => Err(ConnError::Tls(err)),
                    Err(_) => Err(ConnError::Tls(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no handshake within {timeout_ms} ms"),
                    ))),
                },
            };
            match result {
                Ok(()) => {}
                Err(err @ ConnError::Tls(_)) => {
                    // Anyone can knock: warn at powers of two, count them all.
                    let n = st.metrics.tls_refused.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%err, %peer, refused = n, "event connection refused");
                    }
                }
                Err(err) => tracing::warn!(%err, %peer, "event connection ended"),
            }
        });
        let abort = task.abort_handle();
        state
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, abort);
        // An aborted task skips `connection_closed`; a watcher runs it either way.
        let st = state.clone();
        tokio::spawn(async move {
            let _ = task.await;
            st.connection_closed(conn);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Wire(#[from] crate::events::WireError),
    #[error("first frame was not Hello")]
    NoHello,
    #[error("vLLM frame shorter than its 8-byte sequence number")]
    ShortVllmFrame,
    #[error("no Hello within {0} ms")]
    HelloTimeout(u64),
    #[error("no room in the frame memory budget for a frame of {len} bytes in time")]
    FrameMemory { len: usize },
    #[error("a frame of {len} bytes arrived slower than the minimum rate")]
    SlowFrame { len: usize },
    #[error(
        "worker {0} refused: another live connection's, or not named in this connection's \
         certificate"
    )]
    ForeignWorker(WorkerId),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    TooManyWorkers(#[from] TooManyWorkers),
}

/// A snapshot listing more workers than `max_workers_per_connection`.
#[derive(Debug, thiserror::Error)]
#[error("a snapshot of {0} workers, more than max_workers_per_connection")]
pub struct TooManyWorkers(pub usize);

/// One event connection (plain TCP or TLS), from its Hello on; its pending place is
/// given back once the Hello is in.
async fn event_connection<S>(
    state: &RouterState,
    stream: S,
    conn: u64,
    (hello_by, pending): (tokio::time::Instant, PendingPlace),
) -> Result<(), ConnError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(1 << 16, r);
    // A Hello is a few dozen bytes: a peer that has not sent it soon is not a publisher.
    let timeout_ms = state.config.hello_timeout_ms;
    let hello = tokio::time::timeout_at(hello_by, read_frame_body(&mut r, 64 << 10))
        .await
        .map_err(|_| ConnError::HelloTimeout(timeout_ms))?;
    let Some(body) = hello? else {
        return Ok(());
    };
    drop(pending);
    state.metrics.frames.fetch_add(1, Ordering::Relaxed);
    let (node, source) = match Frame::decode(&body) {
        Ok(Frame::Hello { node, source, .. }) => (node, source),
        _ => {
            state.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
            return Err(ConnError::NoHello);
        }
    };
    if let Source::Vllm {
        worker,
        namespace,
        block_size,
    } = source
    {
        let bs = if block_size > 0 {
            block_size
        } else {
            state.config.block_size
        };
        return vllm_connection(state, r, &node, conn, worker, &namespace, bs).await;
    }
    // Resyncs come from this loop (a sequence gap) and from a bell (a worker this
    // connection was refused is free now): one writer for both.
    let w = Arc::new(tokio::sync::Mutex::new(w));
    let bell = Arc::new(tokio::sync::Notify::new());
    lock(&state.resync_bells).insert(conn, bell.clone());
    let ringer = {
        let w = w.clone();
        tokio::spawn(async move {
            loop {
                bell.notified().await;
                if write_frame(&mut *w.lock().await, &Frame::Resync)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let _ringer = AbortOnDrop(ringer);
    // A frame decodes to up to ~8x its bytes (a 1-byte hash becomes a u64).
    while let Some((body, _permit)) = state.read_frame(&mut r, MAX_FRAME_BYTES, 8).await? {
        state.metrics.frames.fetch_add(1, Ordering::Relaxed);
        let frame = match Frame::decode(&body) {
            Ok(f) => f,
            Err(err) => {
                // One bad frame does not poison the stream framing; skip it.
                state.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, conn, "undecodable event frame skipped");
                continue;
            }
        };
        match frame {
            Frame::Snapshot { workers } => state.apply_snapshot(&node, conn, &workers)?,
            Frame::SnapshotBegin { workers } => state.begin_snapshot(&node, conn, &workers)?,
            Frame::SnapshotBlocks {
                worker,
                namespace,
                blocks,
            } => state.snapshot_blocks(conn, worker, &namespace, &blocks),
            Frame::SnapshotEnd => state.end_snapshot(conn),
            Frame::Event { worker, seq, event } => {
                if !state.apply_event(conn, worker, seq, &event) {
                    state
                        .metrics
                        .resyncs_requested
                        .fetch_add(1, Ordering::Relaxed);
                    write_frame(&mut *w.lock().await, &Frame::Resync).await?;
                }
            }
            Frame::Load {
                worker,
                active_requests,
                decode_blocks,
            } => {
                if state.owns(worker, conn) == Claim::Owned {
                    state.set_load(worker, active_requests, decode_blocks);
                }
            }
            Frame::Hello { .. } | Frame::Resync => {}
        }
    }
    Ok(())
}

/// How long a frame waits for room in `max_frame_memory_bytes`, and the grace of its
/// body's read before the minimum rate applies.
const FRAME_MEMORY_WAIT_MS: u64 = 10_000;

/// The slowest a frame's body may arrive while it holds room in the frame budget.
const MIN_FRAME_BYTES_PER_SEC: usize = 4 << 20;

/// Largest vLLM feed frame: a batch of a few thousand events, each a few hundred bytes.
pub const MAX_VLLM_FRAME_BYTES: usize = 16 << 20;

async fn vllm_connection(
    state: &RouterState,
    mut r: BufReader<impl tokio::io::AsyncRead + Unpin>,
    node: &str,
    conn: u64,
    worker: WorkerId,
    namespace: &str,
    block_size: u32,
) -> Result<(), ConnError> {
    if !state.register(worker, node, "vllm", conn) {
        return Err(ConnError::ForeignWorker(worker));
    }
    // The feed has no snapshot: start from empty and apply from the first batch on.
    state.index.remove_worker(worker, None);
    if let Some(e) = state.workers().get_mut(&worker) {
        e.awaiting_snapshot = false;
    }
    let mut tr = VllmTranslator::new(worker, block_size, 16 << 20);
    let mut last_seq: Option<u64> = None;
    // A msgpack batch decodes into `rmpv::Value`s, up to ~48x its bytes (a 1-byte
    // integer becomes a 48-byte value), so its frames are smaller too.
    while let Some((body, _permit)) = state.read_frame(&mut r, MAX_VLLM_FRAME_BYTES, 48).await? {
        state.metrics.frames.fetch_add(1, Ordering::Relaxed);
        if body.len() < 8 {
            state.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
            return Err(ConnError::ShortVllmFrame);
        }
        let seq = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
        if last_seq.is_some_and(|l| seq != l.wrapping_add(1)) {
            // vLLM replays missed batches only over its ZMQ replay socket; count the gap.
            state.metrics.vllm_seq_gaps.fetch_add(1, Ordering::Relaxed);
        }
        last_seq = Some(seq);
        if let Some(e) = state.workers().get_mut(&worker) {
            e.last_seq = seq;
        }
        let batch = match vllm::decode_batch(&body[8..]) {
            Ok(b) => b,
            Err(err) => {
                state.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, worker, "undecodable vLLM batch skipped");
                continue;
            }
        };
        state.metrics.vllm_batches.fetch_add(1, Ordering::Relaxed);
        for ev in &batch.events {
            let Some(op) = tr.translate(ev) else { continue };
            match op {
                IndexOp::Store {
                    parent,
                    hashes,
                    tier,
                } => {
                    state.index.store(namespace, worker, tier, parent, &hashes);
                }
                IndexOp::Remove { hashes, tier } => {
                    state.index.remove(namespace, worker, tier, &hashes);
                }
                IndexOp::Clear => state.index.remove_worker(worker, Some(namespace)),
            }
            state.metrics.vllm_events.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP

const MAX_HEAD_BYTES: usize = 16 << 10;

async fn accept_http(listener: TcpListener, state: Arc<RouterState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_http_connections.max(1),
    ));
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!(%err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let resp = Response::error(503, "too many concurrent HTTP connections");
                let _ = http::write_response(&mut stream, &resp, false).await;
            });
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = Duration::from_millis(st.config.http_timeout_ms);
            let resp = match tokio::time::timeout(timeout, read_request(&mut stream, &st)).await {
                Ok(resp) => resp,
                Err(_) => Response::error(408, "request not received in time"),
            };
            let _ = http::write_response(&mut stream, &resp, false).await;
        });
    }
}

async fn read_request(stream: &mut TcpStream, state: &RouterState) -> Response {
    state.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let head = match http::read_head(stream, MAX_HEAD_BYTES).await {
        Ok(Ok(head)) => head,
        Ok(Err(resp)) => return resp,
        Err(_) => {
            return Response::error(400, "connection closed before the end of the request head");
        }
    };
    if head.transfer_encoding {
        return Response::error(
            501,
            "Transfer-Encoding is not supported; send Content-Length",
        );
    }
    let (method, path, content_length) = (
        head.method.as_str(),
        head.path.as_str(),
        head.content_length,
    );
    let body_len = content_length.unwrap_or(0);
    if body_len > state.config.max_body_bytes {
        return Response::error(
            413,
            format!(
                "body of {body_len} bytes exceeds {}",
                state.config.max_body_bytes
            ),
        );
    }
    let mut body = head.rest;
    if body.len() > body_len {
        body.truncate(body_len); // pipelined bytes beyond the body are ignored (we close)
    }
    while body.len() < body_len {
        let mut chunk = vec![0u8; (body_len - body.len()).min(64 << 10)];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Response::error(400, "body shorter than Content-Length"),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    match (method, path) {
        ("POST", "/route") => {
            if content_length.is_none() {
                return Response::error(411, "POST /route needs Content-Length");
            }
            handle_route(state, &body)
        }
        ("GET", "/workers") => Response::json(200, &state.worker_list()),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: state.render_metrics(),
        },
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        (_, "/route" | "/workers" | "/metrics" | "/healthz") => {
            Response::error(405, format!("{method} not allowed on {path}"))
        }
        _ => Response::error(404, format!("no route {path}")),
    }
}

/// `POST /route` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub token_ids: Option<Vec<u32>>,
    /// Sequence hashes (Dynamo scheme), instead of `token_ids`.
    pub block_hashes: Option<Vec<u64>>,
    pub block_size: Option<u32>,
    pub salt: Option<String>,
    pub lora_name: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Serialize)]
struct RouteResponse<'a> {
    namespace: &'a str,
    #[serde(flatten)]
    decision: crate::route::Decision,
}

fn handle_route(state: &RouterState, body: &[u8]) -> Response {
    let bad = |status, reason: String| {
        state
            .metrics
            .route_bad_requests
            .fetch_add(1, Ordering::Relaxed);
        Response::error(status, reason)
    };
    let req: RouteRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad(400, format!("invalid JSON body: {e}")),
    };
    let started = Instant::now();
    let hashes = match (&req.token_ids, &req.block_hashes) {
        (Some(tokens), None) => {
            let bs = req.block_size.unwrap_or(state.config.block_size);
            if bs == 0 || bs > 1 << 16 {
                return bad(422, format!("block_size {bs} out of range 1..=65536"));
            }
            let salt = hash::salt_hash(req.salt.as_deref(), req.lora_name.as_deref());
            hash::sequence_hashes(tokens, bs as usize, salt)
        }
        (None, Some(h)) => h.clone(),
        _ => return bad(422, "give exactly one of token_ids or block_hashes".into()),
    };
    let candidates = state.candidates();
    let Some(decision) = state
        .router
        .route(&req.namespace, &hashes, &candidates, state.now_ms())
    else {
        state
            .metrics
            .route_no_workers
            .fetch_add(1, Ordering::Relaxed);
        return Response::error(503, "no workers known to this router");
    };
    state
        .metrics
        .route_latency_ns_total
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    state.metrics.route_requests.fetch_add(1, Ordering::Relaxed);
    Response::json(
        200,
        &RouteResponse {
            namespace: &req.namespace,
            decision,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kvplane publisher's message that this replica applied already (same epoch, an
    /// id it has passed) is skipped: replayed after a later removal, a "stored" would
    /// bring the block back. Before, it was applied and moved the worker's last id back.
    /// A Dynamo publisher (no epoch) restarts its ids, so its messages are applied.
    #[test]
    fn a_replayed_nats_event_does_not_undo_a_later_one() {
        let state = RouterState::new(ServiceConfig::default());
        let meta = |epoch, snapshot| crate::nats::MessageMeta {
            epoch,
            snapshot,
            namespace: Some("ns".into()),
            ..Default::default()
        };
        let held = |worker| {
            state
                .index
                .with_tree("ns", |t| t.holds(worker, 0xA, Some(Tier::Host)))
                .unwrap_or(false)
        };
        use crate::dynamo::RouterEvent;
        for (worker, epoch) in [(7u64, 5u64), (8, 0)] {
            state.apply_nats(&meta(epoch, true), &RouterEvent::cleared(worker, 1));
            let stored = RouterEvent::stored(worker, 2, Tier::Host, None, &[0xA]);
            state.apply_nats(&meta(epoch, false), &stored);
            assert!(held(worker));
            let removed = RouterEvent::removed(worker, 3, Tier::Host, &[0xA]);
            state.apply_nats(&meta(epoch, false), &removed);
            assert!(!held(worker));
            state.apply_nats(&meta(epoch, false), &stored);
            if epoch != 0 {
                assert!(!held(worker), "the replayed store undid the removal");
                let w = state.worker_list().into_iter().find(|w| w.worker == worker);
                assert_eq!(w.unwrap().last_seq, 3, "the last id stays");
            } else {
                assert!(
                    held(worker),
                    "a Dynamo publisher's restarted ids still apply"
                );
            }
        }
        assert_eq!(state.metrics.events_stale.load(Ordering::Relaxed), 1);
    }

    /// A worker whose new epoch announces no period is never judged, even if its earlier
    /// epoch beat.
    #[test]
    fn a_new_epoch_without_a_period_is_never_left_out() {
        let state = RouterState::new(ServiceConfig {
            nats: Some(crate::nats::RouterNatsConfig {
                heartbeat_timeout_ms: 50,
                ..Default::default()
            }),
            ..ServiceConfig::default()
        });
        let link = state.nats_new_link();
        state.nats_link(link, true);
        let event = |epoch: u64, period: u64, snapshot: bool| {
            let meta = crate::nats::MessageMeta {
                epoch,
                snapshot,
                heartbeat_ms: period,
                ..Default::default()
            };
            let ev = crate::dynamo::RouterEvent {
                worker_id: 7,
                storage_tier: Default::default(),
                event: crate::dynamo::KvCacheEvent {
                    event_id: 1,
                    data: crate::dynamo::KvCacheEventData::Cleared,
                    dp_rank: 0,
                },
            };
            state.apply_nats(&meta, &ev);
        };
        event(1, 20, true);
        state.nats_heartbeat(7, 1, 20);
        std::thread::sleep(Duration::from_millis(120));
        state.nats_probe();
        assert!(
            state.candidates().is_empty(),
            "the beating epoch went silent"
        );
        // Restarted without heartbeats: announces period 0.
        event(2, 0, true);
        std::thread::sleep(Duration::from_millis(120));
        state.nats_probe();
        assert_eq!(
            state.candidates().len(),
            1,
            "a publisher without a period stays routed"
        );
    }

    /// Link events of a client left behind never move the heartbeat clock: an old
    /// client's late "up" does not start it, its late "down" does not stop the new one's.
    #[test]
    fn only_the_current_link_generation_moves_the_clock() {
        let state = RouterState::new(ServiceConfig::default());
        let old = state.nats_new_link();
        let new = state.nats_new_link();
        state.nats_link(old, true);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(state.live_now().0, 0, "a stale generation's up is ignored");
        state.nats_link(new, true);
        std::thread::sleep(Duration::from_millis(30));
        let running = state.live_now().0;
        assert!(
            running >= 20,
            "the current generation runs the clock ({running} ms)"
        );
        state.nats_link(old, false);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            state.live_now().0 >= running + 20,
            "a stale generation's down does not stop it"
        );
        state.nats_link(new, false);
        let stopped = state.live_now().0;
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(state.live_now().0, stopped, "down stops it");
        // A new client starts down.
        let newer = state.nats_new_link();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(state.live_now().0, stopped);
        state.nats_link(newer, true);
        std::thread::sleep(Duration::from_millis(30));
        assert!(state.live_now().0 >= stopped + 20);
    }
}

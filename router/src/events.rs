//! KV events from daemons to routers: types, the wire protocol and the daemon-side
//! [`Publisher`].
//!
//! Wire protocol: TCP (loopback or cluster network), each frame a 4-byte big-endian length
//! followed by a MessagePack body. MessagePack because vLLM's KV event feed already uses it
//! (one decoder dependency for both feeds) and because hash chains, the bulk of the
//! traffic, encode as compact integers (about half the bytes of JSON decimal text).
//! Bodies are [`Frame`]s encoded with named fields, so either side may add fields later.
//!
//! A connection starts with [`Frame::Hello`]. For a kvplane daemon, the daemon then sends
//! a snapshot of every worker it hosts ([`Frame::SnapshotBegin`], its blocks in
//! [`Frame::SnapshotBlocks`] of at most `snapshot_chunk_blocks` each, [`Frame::SnapshotEnd`];
//! protocol 1 sent one [`Frame::Snapshot`], which routers still take) and afterwards
//! [`Frame::Event`]s, each with a per-worker sequence number. The router answers a sequence gap with
//! [`Frame::Resync`] and ignores that worker's events until the next snapshot. Events are
//! idempotent set operations, so replaying ones already covered by a snapshot is harmless;
//! this is what lets the publisher take a snapshot without stopping the daemon.
//!
//! A `Hello` with [`Source::Vllm`] switches the connection to vLLM's feed: every later
//! frame body is the 8-byte big-endian sequence number followed by the msgpack
//! `KVEventBatch`, i.e. the second and third parts of vLLM's ZMQ PUB multipart message.
//! A ten-line ZMQ-to-TCP forwarder (or vLLM's own publisher pointed at a TCP shim) feeds
//! the router without a ZMQ dependency here; see [`crate::vllm`].

use crate::{Tier, WorkerId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Protocol version in [`Frame::Hello`]. 2: snapshots in frames of bounded size (routers
/// take version 1's one-frame snapshots too; upgrade routers before daemons).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame accepted (a version-1 snapshot of a few million blocks fits).
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// One KV cache change on one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// `hashes` (sequence hashes, each the parent of the next) now reside on `tier`;
    /// `parent` is the block before `hashes[0]` (`None` at the start of a sequence).
    Stored {
        namespace: String,
        parent: Option<u64>,
        hashes: Vec<u64>,
        tier: Tier,
    },
    /// `hashes` left `tier` (every tier when `None`).
    Removed {
        namespace: String,
        hashes: Vec<u64>,
        tier: Option<Tier>,
    },
    /// Everything in `namespace` (every namespace when `None`) left this worker.
    Cleared { namespace: Option<String> },
}

/// One block of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBlock {
    pub hash: u64,
    pub parent: Option<u64>,
    /// Bit set of [`Tier::bit`].
    pub tiers: u8,
}

/// A namespace's blocks on one worker, parents before children.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceBlocks {
    pub namespace: String,
    pub blocks: Vec<SnapshotBlock>,
}

/// What the daemon's snapshot provider returns for one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBlocks {
    pub worker: WorkerId,
    pub namespaces: Vec<NamespaceBlocks>,
}

/// A worker's full state as of event `seq` (the next event is `seq + 1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    pub seq: u64,
    pub state: WorkerBlocks,
}

/// The runs of `blocks` that go in as one store: each block the child of the one before
/// it, with the same tiers, at most `max_len` (at least 1) long. Index ranges, in order.
pub fn chain_runs(
    blocks: &[SnapshotBlock],
    max_len: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= blocks.len() {
            return None;
        }
        let mut j = i + 1;
        while j < blocks.len()
            && j - i < max_len.max(1)
            && blocks[j].parent == Some(blocks[j - 1].hash)
            && blocks[j].tiers == blocks[i].tiers
        {
            j += 1;
        }
        let run = i..j;
        i = j;
        Some(run)
    })
}

/// A worker's sequence number as of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSeq {
    pub worker: WorkerId,
    pub seq: u64,
}

/// Who is on the other end of an event connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A kvplane daemon speaking [`Frame`]s.
    Kvplane,
    /// A vLLM engine's KV event feed for one worker in one namespace.
    Vllm {
        worker: WorkerId,
        namespace: String,
        /// Block size the engine hashes with (its `block_size`), for token hashing.
        block_size: u32,
    },
}

/// A frame body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello {
        node: String,
        protocol: u32,
        source: Source,
    },
    /// Full state of the listed workers; replaces what the router knew about them
    /// (protocol 1; a daemon now sends the three frames below).
    Snapshot { workers: Vec<WorkerSnapshot> },
    /// Starts a snapshot of the listed workers: the router forgets their blocks (and the
    /// node's workers not listed), takes the [`Frame::SnapshotBlocks`] that follow and
    /// ignores their events until [`Frame::SnapshotEnd`].
    SnapshotBegin { workers: Vec<WorkerSeq> },
    /// Blocks of one worker of the snapshot begun, in one namespace, parents first.
    SnapshotBlocks {
        worker: WorkerId,
        namespace: String,
        blocks: Vec<SnapshotBlock>,
    },
    /// Ends the snapshot: its workers are current to their `seq`s.
    SnapshotEnd,
    Event {
        worker: WorkerId,
        seq: u64,
        event: KvEvent,
    },
    /// Load report: requests running and KV blocks being decoded on `worker`.
    Load {
        worker: WorkerId,
        active_requests: u32,
        decode_blocks: u64,
    },
    /// Router to daemon: send a fresh snapshot.
    Resync,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("event connection i/o ({op})")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("undecodable frame body")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("unencodable frame")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl WireError {
    /// Whether TLS ended the connection (an alert from the peer, a bad record), not TCP.
    pub fn is_tls(&self) -> bool {
        match self {
            WireError::Io { source, .. } => source
                .get_ref()
                .is_some_and(|e| e.is::<tokio_rustls::rustls::Error>()),
            _ => false,
        }
    }
}

impl Frame {
    /// Encodes with the length prefix, ready to write.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![0u8; 4];
        rmp_serde::encode::write_named(&mut out, self)?;
        let len = out.len() - 4;
        if len > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge {
                len,
                max: MAX_FRAME_BYTES,
            });
        }
        out[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(out)
    }

    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        Ok(rmp_serde::from_slice(body)?)
    }
}

/// Reads one length-prefixed frame body. `Ok(None)` on a clean end of stream.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    r: &mut R,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, WireError> {
    match read_frame_len(r, max_bytes).await? {
        Some(len) => read_frame_rest(r, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads a frame's length prefix (at most `max_bytes`). `Ok(None)` on a clean end of
/// stream. The body follows ([`read_frame_rest`]).
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max_bytes: usize,
) -> Result<Option<usize>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(source) => {
            return Err(WireError::Io {
                op: "read frame length",
                source,
            });
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max_bytes {
        return Err(WireError::TooLarge {
            len,
            max: max_bytes,
        });
    }
    Ok(Some(len))
}

/// Reads the `len` body bytes of a frame whose length [`read_frame_len`] read.
pub async fn read_frame_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Vec<u8>, WireError> {
    // Grow with the data actually received: a bogus length cannot reserve the maximum.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let got = r
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|source| WireError::Io {
            op: "read frame body",
            source,
        })?;
    if got != len {
        return Err(WireError::Io {
            op: "read frame body",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(body)
}

/// Writes one frame and flushes it (over TLS, a record may wait in the session's buffer
/// until flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let bytes = frame.encode()?;
    let io = |source| WireError::Io {
        op: "write frame",
        source,
    };
    w.write_all(&bytes).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Builds the snapshot the daemon's provider describes, as of `seqs`.
pub type SnapshotProvider = Arc<dyn Fn() -> Vec<WorkerBlocks> + Send + Sync>;

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// Every router to stream to.
    pub routers: Vec<SocketAddr>,
    /// Name of this node in the routers' `/workers`.
    pub node: String,
    /// Frames queued per router while it is slow or away. Overflow drops events and
    /// schedules a snapshot instead, so memory stays bounded and the router converges.
    pub queue_frames: usize,
    /// Bytes of frames queued per router at most (a frame may carry a chain of thousands
    /// of blocks): past it, the same as a full queue.
    pub queue_bytes: usize,
    /// A write to a router that takes longer (it stopped reading without closing) ends
    /// the connection; the next one starts with a snapshot.
    pub write_timeout_ms: u64,
    /// Snapshots sent to one router at most this often: each walks every block the daemon
    /// holds under its registry lock, and a peer that reconnects or asks for a Resync in a
    /// loop must not turn that into a stall of every session. One asked for sooner waits.
    pub min_snapshot_interval_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// The TCP connect, and the TLS handshake after it, each at most this long.
    pub connect_timeout_ms: u64,
    /// Mutual TLS to every router ([`crate::tls::EventsTls::connector`]); `None`: plain TCP.
    pub tls: Option<crate::tls::ClientTls>,
    /// Blocks per [`Frame::SnapshotBlocks`] (about 40 bytes each on the wire): a snapshot
    /// of any size goes in frames of bounded size.
    pub snapshot_chunk_blocks: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            routers: Vec::new(),
            node: "kvplane".into(),
            queue_frames: 65_536,
            queue_bytes: 64 << 20,
            write_timeout_ms: 30_000,
            min_snapshot_interval_ms: 1_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            connect_timeout_ms: 2_000,
            tls: None,
            snapshot_chunk_blocks: 65_536,
        }
    }
}

/// Per-router counters.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connects: AtomicU64,
    /// TLS failures with this router: a handshake that failed or timed out (its
    /// certificate not trusted), or a connection it ended with a TLS alert (ours refused:
    /// under TLS 1.3 that shows only after the handshake).
    pub tls_failures: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub connected: AtomicBool,
}

struct Link {
    addr: SocketAddr,
    tx: mpsc::Sender<Arc<[u8]>>,
    overflow: AtomicBool,
    /// Wakes a connected link to send a snapshot ([`Publisher::resync`]).
    resync: tokio::sync::Notify,
    /// Bytes of the frames in `tx` (against `queue_bytes`).
    queued_bytes: std::sync::atomic::AtomicUsize,
    /// When this link last took a snapshot (`min_snapshot_interval_ms`).
    last_snapshot: Mutex<Option<tokio::time::Instant>>,
    stats: Arc<LinkStats>,
}

struct Shared {
    /// Last sequence number per worker. Held while enqueuing so queue order = seq order.
    seqs: Mutex<HashMap<WorkerId, u64>>,
    links: Vec<Link>,
    config: PublisherConfig,
    provider: SnapshotProvider,
    /// Set by [`Publisher::shutdown`]; link tasks exit when it flips.
    stop: tokio::sync::watch::Sender<bool>,
}

/// The daemon's side of the event stream: streams events to every configured router,
/// resending a full snapshot on each (re)connect and on request.
///
/// Methods never block and never allocate without bound: each router has a bounded
/// queue. Call them in the same order as the registry changes they describe (e.g. while
/// holding the registry lock) so each worker's sequence matches its history.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("routers", &self.shared.config.routers)
            .finish()
    }
}

impl Publisher {
    /// Starts one connection task per router on `runtime`.
    pub fn start(
        config: PublisherConfig,
        provider: SnapshotProvider,
        runtime: &tokio::runtime::Handle,
    ) -> Publisher {
        let mut links = Vec::new();
        let mut receivers = Vec::new();
        for &addr in &config.routers {
            let (tx, rx) = mpsc::channel(config.queue_frames.max(1));
            links.push(Link {
                addr,
                tx,
                overflow: AtomicBool::new(false),
                resync: tokio::sync::Notify::new(),
                queued_bytes: std::sync::atomic::AtomicUsize::new(0),
                last_snapshot: Mutex::new(None),
                stats: Arc::default(),
            });
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            seqs: Mutex::new(HashMap::new()),
            links,
            config,
            provider,
            stop: tokio::sync::watch::Sender::new(false),
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            runtime.spawn(link_task(shared.clone(), i, rx));
        }
        Publisher { shared }
    }

    /// Stops every router connection task (the publisher methods become no-ops).
    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        for link in &self.shared.links {
            link.stats.connected.store(false, Ordering::Release);
        }
    }

    /// Sends every connected router a fresh snapshot as soon as it can, dropping the
    /// frames queued for it: for a caller that lost events before they reached the
    /// publisher (they never got a sequence number, so no router can see the gap). The
    /// caller discards what it still holds from before the loss first; what it publishes
    /// afterwards is a contiguous part of the history, which a snapshot taken later
    /// covers and replaying it after that snapshot does not undo.
    pub fn resync(&self) {
        for link in &self.shared.links {
            link.overflow.store(true, Ordering::Release);
            link.resync.notify_one();
        }
    }

    /// Every router and its link's counters, in `routers` order.
    pub fn links(&self) -> Vec<(SocketAddr, Arc<LinkStats>)> {
        self.shared
            .links
            .iter()
            .map(|l| (l.addr, l.stats.clone()))
            .collect()
    }

    /// Counters of the link to `router`.
    pub fn link_stats(&self, router: SocketAddr) -> Option<Arc<LinkStats>> {
        self.shared
            .links
            .iter()
            .find(|l| l.addr == router)
            .map(|l| l.stats.clone())
    }

    /// Publishes `blocks` (each `(hash, parent)`) stored on `tier` of `worker`.
    /// Consecutive blocks whose parent is the previous hash travel as one chain event.
    pub fn stored(
        &self,
        worker: WorkerId,
        namespace: &str,
        blocks: &[(u64, Option<u64>)],
        tier: Tier,
    ) {
        let mut start = 0;
        while start < blocks.len() {
            let mut end = start + 1;
            while end < blocks.len() && blocks[end].1 == Some(blocks[end - 1].0) {
                end += 1;
            }
            self.publish(
                worker,
                KvEvent::Stored {
                    namespace: namespace.to_owned(),
                    parent: blocks[start].1,
                    hashes: blocks[start..end].iter().map(|b| b.0).collect(),
                    tier,
                },
            );
            start = end;
        }
    }

    /// Publishes that `hashes` left `tier` of `worker` (every tier when `None`).
    pub fn removed(&self, worker: WorkerId, namespace: &str, hashes: &[u64], tier: Option<Tier>) {
        if hashes.is_empty() {
            return;
        }
        self.publish(
            worker,
            KvEvent::Removed {
                namespace: namespace.to_owned(),
                hashes: hashes.to_vec(),
                tier,
            },
        );
    }

    /// Publishes that `worker` dropped everything in `namespace` (all when `None`).
    pub fn cleared(&self, worker: WorkerId, namespace: Option<&str>) {
        self.publish(
            worker,
            KvEvent::Cleared {
                namespace: namespace.map(str::to_owned),
            },
        );
    }

    /// Publishes a load report (not sequenced: the latest one wins).
    pub fn load(&self, worker: WorkerId, active_requests: u32, decode_blocks: u64) {
        let frame = Frame::Load {
            worker,
            active_requests,
            decode_blocks,
        };
        if let Ok(bytes) = frame.encode() {
            self.shared.enqueue(bytes.into());
        }
    }

    /// Publishes one event with the worker's next sequence number; returns that number.
    pub fn publish(&self, worker: WorkerId, event: KvEvent) -> u64 {
        let mut seqs = self.shared.seqs.lock().unwrap_or_else(|e| e.into_inner());
        let seq = seqs.entry(worker).or_insert(0);
        *seq += 1;
        let seq = *seq;
        match (Frame::Event { worker, seq, event }).encode() {
            Ok(bytes) => self.shared.enqueue(bytes.into()),
            Err(err) => {
                // Only an event beyond MAX_FRAME_BYTES gets here: resync instead.
                tracing::warn!(%err, worker, "event not encodable; scheduling a snapshot");
                for link in &self.shared.links {
                    link.overflow.store(true, Ordering::Release);
                }
            }
        }
        seq
    }
}

impl Shared {
    fn enqueue(&self, bytes: Arc<[u8]>) {
        for link in &self.links {
            if !link.stats.connected.load(Ordering::Acquire) {
                // The reconnect snapshot covers it; do not fill the queue with stale frames.
                continue;
            }
            let len = bytes.len();
            let queued = link.queued_bytes.fetch_add(len, Ordering::AcqRel);
            if queued + len > self.config.queue_bytes || link.tx.try_send(bytes.clone()).is_err() {
                link.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                link.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                link.overflow.store(true, Ordering::Release);
            }
        }
    }

    /// The snapshot as of now, with each worker's sequence number: those are read *before*
    /// the provider runs, so every change the snapshot may miss has a later sequence
    /// number and is still sent.
    fn snapshot(&self) -> (Vec<WorkerSeq>, Vec<WorkerBlocks>) {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let workers = (self.provider)();
        let begin = workers
            .iter()
            .map(|w| WorkerSeq {
                worker: w.worker,
                seq: seqs.get(&w.worker).copied().unwrap_or(0),
            })
            .collect();
        (begin, workers)
    }
}

async fn link_task(shared: Arc<Shared>, index: usize, mut rx: mpsc::Receiver<Arc<[u8]>>) {
    let link = &shared.links[index];
    let cfg = &shared.config;
    let mut stop = shared.stop.subscribe();
    let mut backoff_ms = cfg.backoff_initial_ms.max(1);
    // Sleeps for the backoff unless shutdown comes first; false = stop.
    async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, ms: u64) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => !*stop.borrow(),
            _ = stop.changed() => false,
        }
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let connect = tokio::time::timeout(
            Duration::from_millis(cfg.connect_timeout_ms),
            tokio::net::TcpStream::connect(link.addr),
        )
        .await;
        let stream = match connect {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                keep_alive(&s);
                secure(cfg, link, s).await
            }
            Ok(Err(err)) => {
                tracing::debug!(%err, router = %link.addr, "router connect failed");
                None
            }
            Err(_) => None,
        };
        let Some(stream) = stream else {
            if !pause(&mut stop, backoff_ms).await {
                return;
            }
            backoff_ms = (backoff_ms * 2).min(cfg.backoff_max_ms.max(1));
            continue;
        };
        link.stats.connects.fetch_add(1, Ordering::Relaxed);
        let connected_at = tokio::time::Instant::now();
        let result = tokio::select! {
            r = run_link(&shared, link, stream, &mut rx) => r,
            _ = stop.changed() => Ok(()),
        };
        match result {
            Ok(()) => tracing::info!(router = %link.addr, "event connection closed"),
            Err(err) if err.is_tls() => {
                let n = link.stats.tls_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%err, router = %link.addr, failures = n, "router ended the connection over TLS (is this daemon's certificate one it trusts?)");
                }
            }
            Err(err) => tracing::warn!(%err, router = %link.addr, "event connection lost"),
        }
        link.stats.connected.store(false, Ordering::Release);
        backoff_ms = if connected_at.elapsed() < SHORT_CONNECTION {
            // Ended right after connecting (a certificate refused, a router going
            // down again): the next try may fare the same, so keep backing off.
            (backoff_ms * 2).min(cfg.backoff_max_ms.max(1))
        } else {
            cfg.backoff_initial_ms.max(1)
        };
        if !pause(&mut stop, backoff_ms).await {
            return;
        }
    }
}

/// A connection that ends sooner backs the next try off further instead of starting over.
const SHORT_CONNECTION: Duration = Duration::from_secs(10);

/// A connected event stream, plain or TLS.
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// `stream` as the link runs on it: itself without TLS, else after a handshake within
/// `connect_timeout_ms` (`None` when it fails: logged at powers of two, counted).
async fn secure(
    cfg: &PublisherConfig,
    link: &Link,
    stream: tokio::net::TcpStream,
) -> Option<Box<dyn Duplex>> {
    let Some(tls) = &cfg.tls else {
        return Some(Box::new(stream));
    };
    let handshake = tls
        .connector
        .connect(tls.server_name_for(link.addr), stream);
    let err = match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), handshake)
        .await
    {
        Ok(Ok(s)) => return Some(Box::new(s)),
        Ok(Err(err)) => err,
        Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"),
    };
    // A certificate problem repeats on every try: say so, without a line per retry.
    let n = link.stats.tls_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(%err, router = %link.addr, failures = n, "TLS handshake with router failed");
    }
    None
}

/// TCP keepalive on an event connection: a peer that vanished without closing (a host
/// that lost power, a cut link) is noticed within about 25 s instead of never, on both
/// ends (the router marks its workers disconnected; the daemon reconnects instead of
/// queueing for a router that will not read).
pub fn keep_alive(stream: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(%err, "TCP keepalive not set");
    }
}

async fn send_snapshot(
    shared: &Shared,
    link: &Link,
    rx: &mut mpsc::Receiver<Arc<[u8]>>,
    w: &mut (impl AsyncWrite + Unpin),
) -> Result<(), WireError> {
    let last = *link.last_snapshot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(last) = last {
        let interval = Duration::from_millis(shared.config.min_snapshot_interval_ms);
        tokio::time::sleep_until(last + interval).await;
    }
    // Stamped again once written: the interval runs from a snapshot's end, so one that
    // takes longer to write is not followed by another at once.
    *link.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(tokio::time::Instant::now());
    // Queued frames predate the sequence numbers the snapshot is taken at: drop them.
    while let Ok(frame) = rx.try_recv() {
        link.dequeued(&frame);
    }
    link.overflow.store(false, Ordering::Release);
    let (begin, workers) = shared.snapshot();
    let frame = Frame::SnapshotBegin { workers: begin }.encode()?;
    write_timed(shared, w, &frame, "write snapshot").await?;
    let chunk_blocks = shared.config.snapshot_chunk_blocks.max(1);
    for wb in &workers {
        for ns in &wb.namespaces {
            for blocks in ns.blocks.chunks(chunk_blocks) {
                let frame = Frame::SnapshotBlocks {
                    worker: wb.worker,
                    namespace: ns.namespace.clone(),
                    blocks: blocks.to_vec(),
                }
                .encode()?;
                write_timed(shared, w, &frame, "write snapshot").await?;
            }
        }
    }
    write_timed(shared, w, &Frame::SnapshotEnd.encode()?, "write snapshot").await?;
    *link.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(tokio::time::Instant::now());
    link.stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn run_link(
    shared: &Shared,
    link: &Link,
    stream: Box<dyn Duplex>,
    rx: &mut mpsc::Receiver<Arc<[u8]>>,
) -> Result<(), WireError> {
    let (mut r, w) = tokio::io::split(stream);
    let mut w = tokio::io::BufWriter::new(w);
    let hello = Frame::Hello {
        node: shared.config.node.clone(),
        protocol: PROTOCOL_VERSION,
        source: Source::Kvplane,
    }
    .encode()?;
    write_timed(shared, &mut w, &hello, "write hello").await?;
    // Sent at once: the router closes a connection without a Hello within its timeout,
    // and the snapshot may wait (`min_snapshot_interval_ms`) or take long to build.
    flush_timed(shared, &mut w).await?;
    // Only Resync frames come back, or the reason the router ended the connection (a TLS
    // alert). When the router closes, the reader ends and drops `resync_tx`, which ends
    // the loop below with the reader's error, if any.
    let (resync_tx, mut resync_rx) = mpsc::channel::<()>(1);
    let (ended_tx, mut ended_rx) = tokio::sync::oneshot::channel::<WireError>();
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            match read_frame_body(&mut r, 1 << 20).await {
                Ok(Some(body)) => {
                    if let Ok(Frame::Resync) = Frame::decode(&body) {
                        let _ = resync_tx.try_send(());
                    }
                }
                Ok(None) => return,
                Err(err) => {
                    let _ = ended_tx.send(err);
                    return;
                }
            }
        }
    }));
    let written = write_link(shared, link, rx, &mut resync_rx, &mut w).await;
    // What the reader saw explains the end better than a write into a closed socket (a
    // TLS alert, say); after a failed write, give the reader a moment to see it.
    if written.is_err() {
        match tokio::time::timeout(Duration::from_millis(100), ended_rx).await {
            Ok(Ok(err)) => Err(err),
            _ => written,
        }
    } else {
        ended_rx.try_recv().map_or(written, Err)
    }
}

/// A link's writing side: its snapshot, then queued frames and snapshots asked for, until
/// the queue or the reader ends (`Ok`) or a write fails.
async fn write_link(
    shared: &Shared,
    link: &Link,
    rx: &mut mpsc::Receiver<Arc<[u8]>>,
    resync_rx: &mut mpsc::Receiver<()>,
    w: &mut (impl AsyncWrite + Unpin),
) -> Result<(), WireError> {
    // Mark connected before the snapshot: events from now on are queued, and any of them
    // the snapshot already covers is ignored by the router (its sequence is not newer).
    link.stats.connected.store(true, Ordering::Release);
    send_snapshot(shared, link, rx, w).await?;
    flush_timed(shared, w).await?;
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else { return Ok(()) };
                link.dequeued(&frame);
                write_timed(shared, w, &frame, "write event").await?;
                link.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                // Batch whatever else is queued before flushing.
                while let Ok(frame) = rx.try_recv() {
                    link.dequeued(&frame);
                    write_timed(shared, w, &frame, "write event").await?;
                    link.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                }
                if link.overflow.load(Ordering::Acquire) {
                    send_snapshot(shared, link, rx, w).await?;
                }
                flush_timed(shared, w).await?;
            }
            msg = resync_rx.recv() => {
                if msg.is_none() {
                    return Ok(());
                }
                send_snapshot(shared, link, rx, w).await?;
                flush_timed(shared, w).await?;
            }
            // A permit left from before this connection only repeats its snapshot.
            () = link.resync.notified() => {
                send_snapshot(shared, link, rx, w).await?;
                flush_timed(shared, w).await?;
            }
        }
    }
}

/// Aborts a task when dropped (a connection's helper task ends with it).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Link {
    /// A frame left the queue.
    fn dequeued(&self, frame: &[u8]) {
        self.queued_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
    }
}

/// Runs a write to the router (`op`) unless the router takes longer than
/// `write_timeout_ms` to accept the bytes.
async fn timed(
    shared: &Shared,
    op: &'static str,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), WireError> {
    let limit = Duration::from_millis(shared.config.write_timeout_ms);
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r.map_err(|source| WireError::Io { op, source }),
        Err(_) => Err(WireError::Io {
            op,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the router did not take the bytes in time",
            ),
        }),
    }
}

/// Writes `bytes` within `write_timeout_ms`.
async fn write_timed(
    shared: &Shared,
    w: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    op: &'static str,
) -> Result<(), WireError> {
    timed(shared, op, w.write_all(bytes)).await
}

/// Flushes within `write_timeout_ms`.
async fn flush_timed(shared: &Shared, w: &mut (impl AsyncWrite + Unpin)) -> Result<(), WireError> {
    timed(shared, "flush", w.flush()).await
}

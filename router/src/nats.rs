//! KV events over NATS JetStream: the daemon-side [`NatsPublisher`] and the router-side
//! consumer ([`run_consumer`]), in Dynamo's format and naming (see [`crate::dynamo`]).
//!
//! Publisher. Changes go into a bounded queue (the caller never blocks); one task
//! publishes them in order, pipelining up to `window` un-acknowledged messages, and
//! retries from the oldest un-acknowledged one while NATS is away (each message carries a
//! `Nats-Msg-Id`, so a retry of a message the server already stored is dropped by its
//! duplicate window). When the queue overflows, queued changes are discarded and, as soon
//! as NATS accepts messages again, the worker is re-published in full: a `Cleared` event
//! marked as a snapshot, then `Stored` chains of everything it holds. The stream is
//! therefore never silently incomplete: a reader that applies it in order ends with the
//! daemon's state. A daemon also starts with such a snapshot, which is how a restarted
//! daemon (NVMe cache restored) replaces what routers knew about it.
//!
//! Consumer. Each router replica reads the whole stream with its own ordered consumer and
//! applies it in stream order, so replicas that have read the same prefix hold equal
//! indexes. Every `snapshot_interval_ms` a replica writes its index and the stream sequence
//! it covers to a JetStream object store; a new or restarted replica loads the latest
//! snapshot and reads the stream from the next sequence, without asking any daemon.

use crate::dynamo::{self, KvCacheEventData, RouterEvent};
use crate::events::SnapshotProvider;
use crate::index::DumpNode;
use crate::service::RouterState;
use crate::{Tier, WorkerId};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the KV event stream lives: shared by publishers and routers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsStreamConfig {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// Dynamo namespace of the stream name.
    pub namespace: String,
    /// Dynamo component of the stream name.
    pub component: String,
    /// Messages older than this leave the stream (Dynamo's default: one hour). Router
    /// snapshots must be written more often than this for new replicas to rebuild.
    pub max_age_s: u64,
    /// Server round trip limit for a publish acknowledgement or an API request.
    pub request_timeout_ms: u64,
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        NatsStreamConfig {
            url: "nats://127.0.0.1:4222".into(),
            namespace: "kvplane".into(),
            component: "kvplane".into(),
            max_age_s: 3600,
            request_timeout_ms: 2_000,
        }
    }
}

impl NatsStreamConfig {
    pub fn stream(&self) -> String {
        dynamo::stream_name(&self.namespace, &self.component)
    }

    /// Object store bucket of router snapshots.
    pub fn snapshot_bucket(&self) -> String {
        format!("{}-router-state", self.stream())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("router snapshot: {0}")]
    Snapshot(String),
}

/// Connects with reconnects forever; with `retry_initial` the first connection is also
/// retried in the background (a daemon starts and queues events while NATS is down).
pub async fn connect(
    cfg: &NatsStreamConfig,
    name: &str,
    retry_initial: bool,
) -> Result<async_nats::Client, NatsError> {
    connect_watching(cfg, name, retry_initial, None).await
}

/// [`connect`], bumping `reconnects` each time the connection comes back after a loss.
async fn connect_watching(
    cfg: &NatsStreamConfig,
    name: &str,
    retry_initial: bool,
    reconnects: Option<tokio::sync::watch::Sender<u64>>,
) -> Result<async_nats::Client, NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms.max(1))))
        .connection_timeout(Duration::from_millis(cfg.request_timeout_ms.max(1)))
        // Reconnect quickly: the outage is measured in the fault tests.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50u64 << attempts.min(5)).min(1_000))
        })
        .max_reconnects(None);
    if retry_initial {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(tx) = reconnects {
        opts = opts.event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                tx.send_modify(|n| *n += 1);
            }
            std::future::ready(())
        });
    }
    opts.connect(cfg.url.as_str())
        .await
        .map_err(|source| NatsError::Connect {
            url: cfg.url.clone(),
            source,
        })
}

/// Gets the stream, creating it as Dynamo's `NatsQueue` does (subjects `{stream}.*`,
/// max age) with file storage and a duplicate window for publisher retries.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
) -> Result<stream::Stream, NatsError> {
    let name = cfg.stream();
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.*")],
        max_age: Duration::from_secs(cfg.max_age_s.max(1)),
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Stream {
        stream: name,
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Publisher

/// One change of the worker's cache, queued for publication.
#[derive(Clone, Debug)]
enum Change {
    Stored {
        namespace: Arc<str>,
        tier: Tier,
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    Removed {
        namespace: Arc<str>,
        tier: Tier,
        hashes: Vec<u64>,
    },
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct NatsPublisherConfig {
    pub stream: NatsStreamConfig,
    /// Node name (header `Kvplane-Node`).
    pub node: String,
    /// The worker every event is published for.
    pub worker: WorkerId,
    /// Changes queued while NATS is slow or away; beyond it they are dropped and the
    /// worker is re-published in full once NATS is back.
    pub queue_events: usize,
    /// Messages in flight before waiting for acknowledgements.
    pub window: usize,
    /// Blocks per `Stored` message of a snapshot (keeps messages far below NATS's 1 MiB).
    pub snapshot_chunk_blocks: usize,
}

impl NatsPublisherConfig {
    pub fn new(stream: NatsStreamConfig, node: String, worker: WorkerId) -> Self {
        NatsPublisherConfig {
            stream,
            node,
            worker,
            queue_events: 65_536,
            window: 256,
            snapshot_chunk_blocks: 1_024,
        }
    }
}

/// Publisher counters (the daemon's metrics and the tests read them).
#[derive(Debug, Default)]
pub struct NatsPublisherStats {
    /// Messages acknowledged by JetStream (snapshot messages included).
    pub published: AtomicU64,
    /// Changes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Full re-publications (start-up and after each overflow).
    pub snapshots: AtomicU64,
    /// Failed publish attempts (each is retried).
    pub publish_errors: AtomicU64,
    /// Last publish attempt succeeded.
    pub healthy: AtomicBool,
}

struct PubShared {
    tx: mpsc::Sender<Change>,
    overflow: AtomicBool,
    stats: Arc<NatsPublisherStats>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The daemon's side of the NATS stream. Methods never block: call them in the order of
/// the registry changes they describe.
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<PubShared>,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish()
    }
}

impl NatsPublisher {
    /// Starts the publishing task on `runtime`. `provider` describes the worker's full
    /// state for snapshots (the same provider the TCP link uses).
    pub fn start(
        config: NatsPublisherConfig,
        provider: SnapshotProvider,
        runtime: &tokio::runtime::Handle,
    ) -> NatsPublisher {
        let (tx, rx) = mpsc::channel(config.queue_events.max(1));
        let shared = Arc::new(PubShared {
            tx,
            overflow: AtomicBool::new(false),
            stats: Arc::default(),
            stop: tokio::sync::watch::Sender::new(false),
        });
        runtime.spawn(publish_task(shared.clone(), config, provider, rx));
        NatsPublisher { shared }
    }

    pub fn stats(&self) -> Arc<NatsPublisherStats> {
        self.shared.stats.clone()
    }

    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
    }

    fn enqueue(&self, change: Change) {
        if self.shared.overflow.load(Ordering::Acquire) {
            // A snapshot is due and covers this change.
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.shared.tx.try_send(change).is_err() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.overflow.store(true, Ordering::Release);
        }
    }

    /// `blocks` (each `(hash, parent)`) now reside on `tier`; consecutive blocks of one
    /// chain travel as one event.
    pub fn stored(&self, namespace: &str, blocks: &[(u64, Option<u64>)], tier: Tier) {
        let ns: Arc<str> = namespace.into();
        let mut start = 0;
        while start < blocks.len() {
            let mut end = start + 1;
            while end < blocks.len() && blocks[end].1 == Some(blocks[end - 1].0) {
                end += 1;
            }
            self.enqueue(Change::Stored {
                namespace: ns.clone(),
                tier,
                parent: blocks[start].1,
                hashes: blocks[start..end].iter().map(|b| b.0).collect(),
            });
            start = end;
        }
    }

    /// `hashes` left `tier` (every tier when `None`: one event per tier, as Dynamo's
    /// events name one tier each).
    pub fn removed(&self, namespace: &str, hashes: &[u64], tier: Option<Tier>) {
        if hashes.is_empty() {
            return;
        }
        let ns: Arc<str> = namespace.into();
        let tiers: &[Tier] = match &tier {
            Some(t) => std::slice::from_ref(t),
            None => &Tier::ALL,
        };
        for &t in tiers {
            self.enqueue(Change::Removed {
                namespace: ns.clone(),
                tier: t,
                hashes: hashes.to_vec(),
            });
        }
    }
}

/// An encoded message waiting for its acknowledgement.
struct Outgoing {
    headers: HeaderMap,
    payload: bytes::Bytes,
}

struct Encoder {
    worker: WorkerId,
    epoch: u64,
    node: String,
    next_id: u64,
}

impl Encoder {
    fn encode(
        &mut self,
        namespace: &str,
        snapshot: bool,
        event: impl FnOnce(u64) -> RouterEvent,
    ) -> Outgoing {
        let id = self.next_id;
        self.next_id += 1;
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{:x}-{:x}-{id}", self.worker, self.epoch).as_str(),
        );
        headers.insert(dynamo::HEADER_EPOCH, self.epoch.to_string().as_str());
        headers.insert(dynamo::HEADER_NODE, self.node.as_str());
        if !namespace.is_empty() {
            headers.insert(dynamo::HEADER_NAMESPACE, namespace);
        }
        if snapshot {
            headers.insert(dynamo::HEADER_SNAPSHOT, "begin");
        }
        // Serializing plain structs of integers cannot fail.
        let payload = serde_json::to_vec(&event(id)).unwrap_or_default();
        Outgoing {
            headers,
            payload: payload.into(),
        }
    }

    fn change(&mut self, c: &Change) -> Outgoing {
        let worker = self.worker;
        match c {
            Change::Stored {
                namespace,
                tier,
                parent,
                hashes,
            } => self.encode(namespace, false, |id| {
                RouterEvent::stored(worker, id, *tier, *parent, hashes)
            }),
            Change::Removed {
                namespace,
                tier,
                hashes,
            } => self.encode(namespace, false, |id| {
                RouterEvent::removed(worker, id, *tier, hashes)
            }),
        }
    }

    /// `Cleared` (marked) + `Stored` chains of everything `provider` lists for this worker.
    fn snapshot(
        &mut self,
        provider: &SnapshotProvider,
        chunk: usize,
        out: &mut VecDeque<Outgoing>,
    ) {
        let worker = self.worker;
        out.push_back(self.encode("", true, |id| RouterEvent::cleared(worker, id)));
        for w in provider() {
            if w.worker != worker {
                continue;
            }
            for ns in &w.namespaces {
                let blocks = &ns.blocks;
                let mut i = 0;
                while i < blocks.len() {
                    let mut j = i + 1;
                    while j < blocks.len()
                        && j - i < chunk.max(1)
                        && blocks[j].parent == Some(blocks[j - 1].hash)
                        && blocks[j].tiers == blocks[i].tiers
                    {
                        j += 1;
                    }
                    let hashes: Vec<u64> = blocks[i..j].iter().map(|b| b.hash).collect();
                    for tier in Tier::ALL {
                        if blocks[i].tiers & tier.bit() != 0 {
                            let parent = blocks[i].parent;
                            out.push_back(self.encode(&ns.namespace, false, |id| {
                                RouterEvent::stored(worker, id, tier, parent, &hashes)
                            }));
                        }
                    }
                    i = j;
                }
            }
        }
    }
}

async fn publish_task(
    shared: Arc<PubShared>,
    cfg: NatsPublisherConfig,
    provider: SnapshotProvider,
    mut rx: mpsc::Receiver<Change>,
) {
    let mut stop = shared.stop.subscribe();
    let stats = shared.stats.clone();
    // Acknowledgements in flight when the connection dropped never come; a reconnect
    // retries them at once instead of after the request timeout.
    let (reconnect_tx, mut reconnected) = tokio::sync::watch::channel(0u64);
    let client = loop {
        match connect_watching(&cfg.stream, &cfg.node, true, Some(reconnect_tx.clone())).await {
            Ok(c) => break c,
            Err(err) => {
                tracing::warn!(%err, "NATS connect failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let js = jetstream::new(client);
    let subject = dynamo::publish_subject(&cfg.stream.stream());
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut enc = Encoder {
        worker: cfg.worker,
        epoch,
        node: cfg.node.clone(),
        next_id: 1,
    };
    let mut pending: VecDeque<Outgoing> = VecDeque::new();
    let mut stream_ready = false;
    let mut need_snapshot = true; // announce the worker's full state first
    let mut backoff_ms = 50u64;
    loop {
        if *stop.borrow() {
            return;
        }
        if !stream_ready {
            match ensure_stream(&js, &cfg.stream).await {
                Ok(_) => stream_ready = true,
                Err(err) => {
                    stats.healthy.store(false, Ordering::Relaxed);
                    tracing::debug!(%err, "JetStream stream not ready");
                    if !pause(&mut stop, &mut backoff_ms).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if need_snapshot || shared.overflow.load(Ordering::Acquire) {
            // Order matters: clear the flag, then drop what is queued, then read the
            // state. Changes queued after the drain are re-applied after the snapshot
            // (idempotent, in order); changes before it are in the snapshot.
            shared.overflow.store(false, Ordering::Release);
            while rx.try_recv().is_ok() {}
            pending.clear();
            enc.snapshot(&provider, cfg.snapshot_chunk_blocks, &mut pending);
            stats.snapshots.fetch_add(1, Ordering::Relaxed);
            need_snapshot = false;
        }
        if pending.is_empty() {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => pending.push_back(enc.change(&c)),
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
        while pending.len() < cfg.window.max(1) {
            match rx.try_recv() {
                Ok(c) => pending.push_back(enc.change(&c)),
                Err(_) => break,
            }
        }
        reconnected.borrow_and_update();
        let result = tokio::select! {
            r = publish_window(&js, &subject, &mut pending, cfg.window.max(1), &stats) => r,
            Ok(()) = reconnected.changed() => {
                backoff_ms = 50;
                Err("connection re-established; retrying un-acknowledged messages".into())
            }
        };
        match result {
            Ok(()) => {
                stats.healthy.store(true, Ordering::Relaxed);
                backoff_ms = 50;
            }
            Err(err) => {
                stats.healthy.store(false, Ordering::Relaxed);
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%err, pending = pending.len(), "JetStream publish failed; retrying");
                if err.contains("no stream") || err.contains("NoResponders") {
                    stream_ready = false;
                }
                if !pause(&mut stop, &mut backoff_ms).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps for the backoff (doubling it up to 1 s) unless stopped; false = stop.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, backoff_ms: &mut u64) -> bool {
    let ms = *backoff_ms;
    *backoff_ms = (*backoff_ms * 2).min(1_000);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Publishes up to `window` messages from the front of `pending`, then waits for their
/// acknowledgements in order; acknowledged ones leave `pending`. On the first failure the
/// rest stay queued (they are retried, and duplicates are dropped by the server).
async fn publish_window(
    js: &jetstream::Context,
    subject: &str,
    pending: &mut VecDeque<Outgoing>,
    window: usize,
    stats: &NatsPublisherStats,
) -> Result<(), String> {
    let n = pending.len().min(window);
    let mut acks = Vec::with_capacity(n);
    for m in pending.iter().take(n) {
        match js
            .publish_with_headers(subject.to_owned(), m.headers.clone(), m.payload.clone())
            .await
        {
            Ok(ack) => acks.push(ack),
            Err(e) => {
                acks.clear();
                return Err(format!("{:?}: {e}", e.kind()));
            }
        }
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {
                pending.pop_front();
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(format!("{:?}: {e}", e.kind())),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Router side

/// `kvplane router` settings for reading the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterNatsConfig {
    #[serde(flatten)]
    pub stream: NatsStreamConfig,
    /// How often this replica writes its index to the object store (0 = never; such a
    /// replica still rebuilds from other replicas' snapshots).
    pub snapshot_interval_ms: u64,
}

impl Default for RouterNatsConfig {
    fn default() -> Self {
        RouterNatsConfig {
            stream: NatsStreamConfig::default(),
            snapshot_interval_ms: 10_000,
        }
    }
}

/// Per-message facts from the headers.
#[derive(Clone, Debug, Default)]
pub struct MessageMeta {
    pub namespace: Option<String>,
    pub epoch: u64,
    pub snapshot: bool,
    pub node: Option<String>,
}

impl MessageMeta {
    fn from_headers(h: Option<&HeaderMap>) -> Self {
        let get = |k: &str| h.and_then(|h| h.get(k)).map(|v| v.as_str().to_owned());
        MessageMeta {
            namespace: get(dynamo::HEADER_NAMESPACE),
            epoch: get(dynamo::HEADER_EPOCH)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            snapshot: get(dynamo::HEADER_SNAPSHOT).is_some(),
            node: get(dynamo::HEADER_NODE),
        }
    }
}

/// What a router replica stores in the object store.
#[derive(Debug, Serialize, Deserialize)]
pub struct RouterSnapshot {
    pub stream: String,
    /// Stream sequence of the last message applied.
    pub stream_seq: u64,
    pub workers: Vec<SnapshotWorker>,
    pub index: Vec<(String, Vec<DumpNode>)>,
}

/// One worker's stream position in a [`RouterSnapshot`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotWorker {
    pub worker: WorkerId,
    pub node: String,
    pub epoch: u64,
    pub last_event_id: u64,
    pub awaiting_snapshot: bool,
}

const SNAPSHOT_OBJECT: &str = "radix-state";

async fn load_snapshot(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
) -> Result<Option<RouterSnapshot>, NatsError> {
    use tokio::io::AsyncReadExt;
    let Ok(store) = js.get_object_store(cfg.snapshot_bucket()).await else {
        return Ok(None);
    };
    let Ok(mut obj) = store.get(SNAPSHOT_OBJECT).await else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    obj.read_to_end(&mut bytes)
        .await
        .map_err(|e| NatsError::Snapshot(format!("read: {e}")))?;
    let snap: RouterSnapshot =
        rmp_serde::from_slice(&bytes).map_err(|e| NatsError::Snapshot(format!("decode: {e}")))?;
    if snap.stream != cfg.stream() {
        return Err(NatsError::Snapshot(format!(
            "snapshot is of stream {}, not {}",
            snap.stream,
            cfg.stream()
        )));
    }
    Ok(Some(snap))
}

async fn write_snapshot(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
    snap: &RouterSnapshot,
) -> Result<usize, NatsError> {
    let bytes =
        rmp_serde::to_vec_named(snap).map_err(|e| NatsError::Snapshot(format!("encode: {e}")))?;
    let store = match js.get_object_store(cfg.snapshot_bucket()).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(jetstream::object_store::Config {
                bucket: cfg.snapshot_bucket(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::Snapshot(format!("create bucket: {e}")))?,
    };
    store
        .put(SNAPSHOT_OBJECT, &mut bytes.as_slice())
        .await
        .map_err(|e| NatsError::Snapshot(format!("put: {e}")))?;
    Ok(bytes.len())
}

/// Reads the stream into `state` until the process ends: restores the latest router
/// snapshot first, then applies every message in stream order, reconnecting and resuming
/// after the last applied sequence whenever NATS goes away.
pub async fn run_consumer(state: Arc<RouterState>, cfg: RouterNatsConfig) {
    let m = &state.metrics;
    let mut next_seq: u64 = 0; // 0 = not started yet
    let mut backoff_ms = 50u64;
    let (_never, mut stop) = tokio::sync::watch::channel(false);
    loop {
        // A consumer does not survive a server restart; its client would notice only after
        // missed heartbeats (seconds), so a reconnect restarts reading at once instead.
        let (reconnect_tx, mut reconnected) = tokio::sync::watch::channel(0u64);
        let client = match connect_watching(
            &cfg.stream,
            "kvplane-router",
            false,
            Some(reconnect_tx),
        )
        .await
        {
            Ok(c) => c,
            Err(err) => {
                tracing::debug!(%err, "router: NATS connect failed");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        let js = jetstream::new(client);
        let stream = match ensure_stream(&js, &cfg.stream).await {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "router: stream not ready");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        if next_seq == 0 {
            next_seq = 1;
            match load_snapshot(&js, &cfg.stream).await {
                Ok(Some(snap)) => {
                    state.restore_nats_snapshot(&snap);
                    next_seq = snap.stream_seq + 1;
                    m.nats_snapshots_restored.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(seq = snap.stream_seq, "router: restored snapshot");
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(%err, "router: snapshot unusable; replaying the stream"),
            }
            state.nats_seq.store(next_seq - 1, Ordering::Relaxed);
        }
        let consumer = match stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next_seq,
                },
                ..Default::default()
            })
            .await
        {
            Ok(c) => c,
            Err(err) => {
                tracing::debug!(%err, "router: consumer not created");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "router: consumer stream failed");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        backoff_ms = 50;
        let period = Duration::from_millis(cfg.snapshot_interval_ms.max(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut snapshot_seq = 0u64;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        Some(Err(err)) => {
                            tracing::debug!(%err, "router: stream read failed; resuming");
                            break;
                        }
                        None => break,
                    };
                    let Ok(info) = msg.info() else {
                        m.nats_bad_messages.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let seq = info.stream_sequence;
                    if seq < next_seq {
                        continue; // redelivered after a resume
                    }
                    if seq > next_seq {
                        // Messages aged out or were purged before this replica read them.
                        m.nats_history_gaps.fetch_add(1, Ordering::Relaxed);
                        state.mark_all_nats_workers_stale();
                    }
                    next_seq = seq + 1;
                    m.nats_messages.fetch_add(1, Ordering::Relaxed);
                    match serde_json::from_slice::<RouterEvent>(&msg.payload) {
                        Ok(ev) => state.apply_nats(&MessageMeta::from_headers(msg.headers.as_ref()), &ev),
                        Err(err) => {
                            m.nats_bad_messages.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%err, seq, "router: undecodable KV event skipped");
                        }
                    }
                    state.nats_seq.store(seq, Ordering::Relaxed);
                }
                Ok(()) = reconnected.changed() => {
                    // 1 is this client's first connection; more is a reconnect.
                    if *reconnected.borrow_and_update() > 1 {
                        tracing::debug!("router: NATS connection came back; resuming the stream");
                        break;
                    }
                }
                _ = tick.tick(), if cfg.snapshot_interval_ms > 0 => {
                    let seq = next_seq - 1;
                    if seq > snapshot_seq {
                        let snap = state.nats_snapshot(cfg.stream.stream(), seq);
                        match write_snapshot(&js, &cfg.stream, &snap).await {
                            Ok(bytes) => {
                                snapshot_seq = seq;
                                m.nats_snapshots_written.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(seq, bytes, "router: snapshot written");
                            }
                            Err(err) => tracing::debug!(%err, "router: snapshot not written"),
                        }
                    }
                }
            }
        }
        pause(&mut stop, &mut backoff_ms).await;
    }
}

/// Applies a Dynamo event to an index of one kvplane namespace (`None`: Dynamo's own
/// publishers, which have no namespace; their events go to `default_namespace`).
pub(crate) fn apply_to_index(index: &crate::index::Index, namespace: &str, ev: &RouterEvent) {
    let worker = ev.worker_id;
    let tier = ev.storage_tier.to_tier();
    match &ev.event.data {
        KvCacheEventData::Stored(s) => {
            let hashes: Vec<u64> = s.blocks.iter().map(|b| b.block_hash).collect();
            index.store(namespace, worker, tier, s.parent_hash, &hashes);
        }
        KvCacheEventData::Removed(r) => {
            index.remove(namespace, worker, Some(tier), &r.block_hashes);
        }
        KvCacheEventData::Cleared => index.remove_worker(worker, None),
    }
}

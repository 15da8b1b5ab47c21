//! The daemon's KV event stream to routers: the block manager's stored/removed events
//! (a bounded channel, filled under the registry lock so order = history) are translated
//! to the router's wire events (namespace names, router tiers) and handed to
//! `kvplane_router::events::Publisher`, which streams them to every configured router and
//! resends a full snapshot on each (re)connect, and, with `nats_url` set, to
//! `kvplane_router::nats::NatsPublisher`, which publishes them to a NATS JetStream stream
//! in NVIDIA Dynamo's KV event format. Control plane only: a full channel drops events
//! (counted by the manager) and the next snapshot repairs the routers' view.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, RecvTimeoutError};
use kvplane_router::WorkerId;
use kvplane_router::events::{
    NamespaceBlocks, Publisher, PublisherConfig, SnapshotBlock, WorkerBlocks,
};
use kvplane_router::nats::{NatsPublisher, NatsPublisherConfig, NatsStreamConfig};
use serde::Deserialize;

use crate::block::{BlockEvent, BlockManager, Tier};
use crate::config::ConfigError;
use crate::dataplane::DataPlane;

/// `[events]`: where this daemon streams its KV events.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Routers' event listeners (`host:port`); empty disables the stream.
    pub routers: Vec<String>,
    /// The worker id this daemon's tiers appear under in the routers (0 = derived from
    /// the host name and the engine socket path).
    pub worker_id: u64,
    /// Events queued between the data plane and the publisher.
    pub queue_events: usize,
    /// NATS server(s) to publish KV events to (`nats://host:4222`); absent = no NATS.
    pub nats_url: Option<String>,
    /// Dynamo namespace and component naming the JetStream stream
    /// (`namespace-{ns}-component-{component}-kv-events`).
    pub nats_namespace: String,
    pub nats_component: String,
    /// Changes buffered while NATS is away; beyond it the daemon re-publishes its full
    /// state once NATS is back.
    pub nats_queue_events: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            routers: Vec::new(),
            worker_id: 0,
            queue_events: 65_536,
            nats_url: None,
            nats_namespace: "kvplane".into(),
            nats_component: "kvplane".into(),
            nats_queue_events: 65_536,
        }
    }
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, r) in self.routers.iter().enumerate() {
            if r.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    key: format!("events.routers[{i}]"),
                    reason: format!("`{r}` is not an address like 127.0.0.1:7070"),
                });
            }
        }
        if let Some(url) = &self.nats_url
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err(ConfigError::Invalid {
                key: "events.nats_url".into(),
                reason: format!("`{url}` is not a URL like nats://127.0.0.1:4222"),
            });
        }
        for (key, v) in [
            ("events.nats_namespace", &self.nats_namespace),
            ("events.nats_component", &self.nats_component),
        ] {
            if v.is_empty() || v.len() > 64 {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    reason: "must be 1-64 characters".into(),
                });
            }
        }
        if self.nats_queue_events == 0 || self.nats_queue_events > 1 << 24 {
            return Err(ConfigError::Invalid {
                key: "events.nats_queue_events".into(),
                reason: format!("must be in 1..=16777216, got {}", self.nats_queue_events),
            });
        }
        if self.queue_events == 0 || self.queue_events > 1 << 24 {
            return Err(ConfigError::Invalid {
                key: "events.queue_events".into(),
                reason: format!("must be in 1..=16777216, got {}", self.queue_events),
            });
        }
        Ok(())
    }

    /// Whether any event stream is configured.
    pub fn enabled(&self) -> bool {
        !self.routers.is_empty() || self.nats_url.is_some()
    }

    pub fn router_addrs(&self) -> Vec<SocketAddr> {
        self.routers.iter().filter_map(|r| r.parse().ok()).collect()
    }

    /// The configured worker id, or one derived from the host name and `socket`.
    pub fn resolve_worker_id(&self, socket: &std::path::Path) -> WorkerId {
        if self.worker_id != 0 {
            return self.worker_id;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let key = format!("{}:{}", host.trim(), socket.display());
        xxhash_rust::xxh3::xxh3_64(key.as_bytes()).max(1)
    }
}

/// The running event stream: a forwarding thread and the publisher's runtime.
pub struct EventStream {
    _runtime: tokio::runtime::Runtime,
    forwarder: Option<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub publisher: Publisher,
    pub nats: Option<NatsPublisher>,
    pub worker: WorkerId,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("worker", &self.worker)
            .finish()
    }
}

impl EventStream {
    /// Start streaming `events` (from the manager) to the configured routers.
    pub fn start(
        config: &EventsConfig,
        worker: WorkerId,
        blocks: Arc<BlockManager>,
        dataplane: Arc<DataPlane>,
        events: Receiver<BlockEvent>,
    ) -> std::io::Result<EventStream> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kvp-events")
            .enable_all()
            .build()?;
        let snap_blocks = Arc::clone(&blocks);
        let snap_names = Arc::clone(&dataplane);
        let provider: kvplane_router::events::SnapshotProvider =
            Arc::new(move || vec![snapshot(worker, &snap_blocks, &snap_names)]);
        let node = format!("kvplane-{worker:x}");
        let publisher = Publisher::start(
            PublisherConfig {
                routers: config.router_addrs(),
                node: node.clone(),
                ..PublisherConfig::default()
            },
            provider.clone(),
            runtime.handle(),
        );
        let nats = config.nats_url.as_ref().map(|url| {
            let stream = NatsStreamConfig {
                url: url.clone(),
                namespace: config.nats_namespace.clone(),
                component: config.nats_component.clone(),
                ..NatsStreamConfig::default()
            };
            let mut c = NatsPublisherConfig::new(stream, node, worker);
            c.queue_events = config.nats_queue_events;
            NatsPublisher::start(c, provider, runtime.handle())
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = publisher.clone();
        let n = nats.clone();
        let s = Arc::clone(&stop);
        let forwarder = std::thread::Builder::new()
            .name("kvp-events-fwd".into())
            .spawn(move || forward(&events, &p, n.as_ref(), worker, &dataplane, &s))?;
        Ok(EventStream {
            _runtime: runtime,
            forwarder: Some(forwarder),
            stop,
            publisher,
            nats,
            worker,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.forwarder.take() {
            let _ = t.join();
        }
        if let Some(n) = &self.nats {
            n.shutdown();
        }
    }
}

/// Everything the manager holds, grouped by namespace, parents before children.
fn snapshot(worker: WorkerId, blocks: &BlockManager, dataplane: &DataPlane) -> WorkerBlocks {
    let mut by_ns: std::collections::BTreeMap<u32, Vec<SnapshotBlock>> =
        std::collections::BTreeMap::new();
    for b in blocks.snapshot() {
        let tiers = b.tiers.iter().fold(0u8, |m, t| m | t.bit());
        if tiers != 0 {
            by_ns.entry(b.namespace).or_default().push(SnapshotBlock {
                hash: b.hash,
                parent: b.parent,
                tiers,
            });
        }
    }
    WorkerBlocks {
        worker,
        namespaces: by_ns
            .into_iter()
            .map(|(ns, blocks)| NamespaceBlocks {
                namespace: dataplane.namespace_name(ns),
                blocks: order_parents_first(blocks),
            })
            .collect(),
    }
}

/// Order blocks so each parent precedes its children (the router inserts chains).
fn order_parents_first(blocks: Vec<SnapshotBlock>) -> Vec<SnapshotBlock> {
    let present: std::collections::HashSet<u64> = blocks.iter().map(|b| b.hash).collect();
    let mut children: std::collections::HashMap<u64, Vec<usize>> = std::collections::HashMap::new();
    let mut roots = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match b.parent {
            Some(p) if present.contains(&p) => children.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let mut out = Vec::with_capacity(blocks.len());
    let mut stack: Vec<usize> = roots.into_iter().rev().collect();
    let mut visited = vec![false; blocks.len()];
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        out.push(blocks[i]);
        if let Some(c) = children.get(&blocks[i].hash) {
            stack.extend(c.iter().rev());
        }
    }
    // A parent cycle (hostile hashes) leaves blocks unvisited: append them as roots.
    for (i, b) in blocks.iter().enumerate() {
        if !visited[i] {
            out.push(SnapshotBlock { parent: None, ..*b });
        }
    }
    out
}

fn forward(
    events: &Receiver<BlockEvent>,
    publisher: &Publisher,
    nats: Option<&NatsPublisher>,
    worker: WorkerId,
    dataplane: &DataPlane,
    stop: &std::sync::atomic::AtomicBool,
) {
    // Consecutive stored events of one chain (same namespace and tier) travel as one.
    let mut run: Vec<(u64, Option<u64>)> = Vec::new();
    let mut run_key: Option<(u32, Tier)> = None;
    let flush = |run: &mut Vec<(u64, Option<u64>)>, key: &mut Option<(u32, Tier)>| {
        if let Some((ns, t)) = key.take() {
            let name = dataplane.namespace_name(ns);
            publisher.stored(worker, &name, run, t);
            if let Some(n) = nats {
                n.stored(&name, run, t);
            }
        }
        run.clear();
    };
    loop {
        match events.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(BlockEvent::Stored {
                namespace,
                hash,
                parent,
                tier,
            }) => {
                if run_key != Some((namespace, tier)) {
                    flush(&mut run, &mut run_key);
                    run_key = Some((namespace, tier));
                }
                run.push((hash, parent));
                if events.is_empty() || run.len() >= 4096 {
                    flush(&mut run, &mut run_key);
                }
            }
            Ok(BlockEvent::Removed {
                namespace,
                hash,
                tier,
                ..
            }) => {
                flush(&mut run, &mut run_key);
                let name = dataplane.namespace_name(namespace);
                publisher.removed(worker, &name, &[hash], Some(tier));
                if let Some(n) = nats {
                    n.removed(&name, &[hash], Some(tier));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                flush(&mut run, &mut run_key);
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                flush(&mut run, &mut run_key);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_cycles_do_not_hang() {
        let b = |hash, parent| SnapshotBlock {
            hash,
            parent,
            tiers: 1,
        };
        let out = order_parents_first(vec![
            b(3, Some(2)),
            b(2, Some(1)),
            b(1, None),
            b(9, Some(8)),
            b(5, Some(6)),
            b(6, Some(5)),
        ]);
        let pos = |h| out.iter().position(|x| x.hash == h).unwrap();
        assert!(pos(1) < pos(2) && pos(2) < pos(3));
        assert_eq!(out.len(), 6, "every block once, cycle included");
    }

    #[test]
    fn nats_keys_are_checked() {
        let ok = EventsConfig {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..EventsConfig::default()
        };
        assert!(ok.validate().is_ok() && ok.enabled());
        let bad = EventsConfig {
            nats_url: Some("127.0.0.1:4222".into()),
            ..EventsConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("events.nats_url")
        );
        let bad = EventsConfig {
            nats_queue_events: 0,
            ..ok.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("events.nats_queue_events")
        );
        assert!(!EventsConfig::default().enabled());
    }

    #[test]
    fn bad_router_address_names_the_key() {
        let c = EventsConfig {
            routers: vec!["nope".into()],
            ..EventsConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("events.routers[0]")
        );
    }
}

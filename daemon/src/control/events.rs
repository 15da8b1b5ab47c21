//! The daemon's KV event stream to routers: the block manager's stored/removed events
//! (a bounded channel, filled under the registry lock so order = history) are translated
//! to the router's wire events (namespace names, router tiers) and handed to
//! `kvplane_router::events::Publisher`, which streams them to every configured router and
//! resends a full snapshot on each (re)connect, and, with `nats_url` set, to
//! `kvplane_router::nats::NatsPublisher`, which publishes them to a NATS JetStream stream
//! in NVIDIA Dynamo's KV event format. Control plane only: a full channel drops events
//! (counted by the manager); the forwarder then discards what is still queued and has
//! every router sent a fresh snapshot, which repairs its view.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, RecvTimeoutError};
use kvplane_router::WorkerId;
use kvplane_router::events::{
    NamespaceBlocks, Publisher, PublisherConfig, SnapshotBlock, WorkerBlocks,
};
use kvplane_router::nats::{
    NatsPublisher, NatsPublisherConfig, NatsPublisherStats, NatsStreamConfig,
};

use crate::block::{BlockEvent, BlockManager, Tier};
use crate::dataplane::DataPlane;

/// The `[events]` table lives with the config (below the control plane).
pub use crate::config::EventsConfig;

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
    /// `tls`: [`EventsConfig::load_tls`]'s, loaded before privileges were dropped.
    pub fn start(
        config: &EventsConfig,
        tls: Option<kvplane_router::tls::ClientTls>,
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
                tls,
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
                auth: config.nats_auth.clone(),
                ..NatsStreamConfig::default()
            };
            let mut c = NatsPublisherConfig::new(stream, node, worker);
            c.queue_events = config.nats_queue_events;
            c.heartbeat_ms = config.nats_heartbeat_ms;
            NatsPublisher::start(c, provider, runtime.handle())
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = publisher.clone();
        let n = nats.clone();
        let s = Arc::clone(&stop);
        let forwarder = std::thread::Builder::new()
            .name("kvp-events-fwd".into())
            .spawn(move || {
                let sinks = Sinks {
                    publisher: &p,
                    nats: n.as_ref(),
                    worker,
                    dataplane: &dataplane,
                };
                forward(&events, &sinks, &|| blocks.events_dropped(), &s)
            })?;
        Ok(EventStream {
            _runtime: runtime,
            forwarder: Some(forwarder),
            stop,
            publisher,
            nats,
            worker,
        })
    }

    /// Each router of `events.routers` and its link's counters.
    pub fn router_links(
        &self,
    ) -> Vec<(std::net::SocketAddr, Arc<kvplane_router::events::LinkStats>)> {
        self.publisher.links()
    }

    /// The NATS publisher's counters, when publishing to NATS.
    pub fn nats_stats(&self) -> Option<Arc<NatsPublisherStats>> {
        self.nats.as_ref().map(NatsPublisher::stats)
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

/// Where the forwarder sends the events.
struct Sinks<'a> {
    publisher: &'a Publisher,
    nats: Option<&'a NatsPublisher>,
    worker: WorkerId,
    dataplane: &'a DataPlane,
}

/// Translates the manager's events for the publishers, in order. When the manager's
/// channel refused events (`dropped` moved), what is still queued is older than the loss
/// and would, published after the routers' next snapshot, undo part of it (a block stored
/// then removed, the removal lost, comes back): it is discarded and every router gets a
/// fresh snapshot, which covers it all.
fn forward(
    events: &Receiver<BlockEvent>,
    sinks: &Sinks,
    dropped: &dyn Fn() -> u64,
    stop: &std::sync::atomic::AtomicBool,
) {
    let Sinks {
        publisher,
        nats,
        worker,
        dataplane,
    } = *sinks;
    let mut dropped_seen = dropped();
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
        let event = events.recv_timeout(std::time::Duration::from_millis(100));
        let now_dropped = dropped();
        if now_dropped != dropped_seen {
            tracing::warn!(
                events = now_dropped - dropped_seen,
                "the event channel was full: events lost; resending the routers a snapshot"
            );
            dropped_seen = now_dropped;
            // Everything queued now predates the count just read, and with it the loss.
            for _ in 0..events.len() {
                let _ = events.try_recv();
            }
            run.clear();
            run_key = None;
            publisher.resync();
            if let Some(n) = nats {
                n.resync();
            }
            continue;
        }
        match event {
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

    /// The routers' TLS files are read through the daemon's no-link open: a key others
    /// can read is refused before anything is parsed.
    #[test]
    fn tls_files_are_read_like_the_nats_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, b"not PEM").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let mut c = EventsConfig {
            routers: vec!["127.0.0.1:7470".into()],
            ..EventsConfig::default()
        };
        assert!(c.load_tls().unwrap().is_none(), "no TLS, nothing read");
        c.tls.ca_file = Some(file("ca.pem", 0o644));
        c.tls.cert_file = Some(file("d.pem", 0o644));
        c.tls.key_file = Some(file("d.key", 0o640));
        c.validate().unwrap();
        let err = c.load_tls().unwrap_err();
        assert!(
            matches!(
                err,
                kvplane_router::tls::TlsError::File {
                    what: "key_file",
                    ..
                }
            ),
            "{err}"
        );
        // Readable by its owner only, the files are parsed (and these hold no certificate).
        c.tls.key_file = Some(file("d.key", 0o600));
        let err = c.load_tls().unwrap_err();
        assert!(
            matches!(
                err,
                kvplane_router::tls::TlsError::Invalid {
                    what: "ca_file",
                    ..
                }
            ),
            "{err}"
        );
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

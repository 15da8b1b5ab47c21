//! `kvplane replay --nats`: the router-only replay's KV events carried by a real NATS
//! JetStream server to router replicas.
//!
//! Starts `nats-server -js` (from `scripts/install-nats.sh`) on a private port and store,
//! gives each simulated worker the daemon's own `NatsPublisher`, starts `--replicas`
//! router replicas (`kvplane_router::nats::run_consumer`, the first writing snapshots),
//! publishes the cost policy's events, then starts one more replica after the fact (it
//! rebuilds from a snapshot plus the stream). Every replica's overlap for every trace
//! request must equal an index fed the same events in process; the server is stopped at
//! the end.

use super::CliResult;
use kvplane_router::Tier;
use kvplane_router::index::{Index, IndexConfig};
use kvplane_router::nats::{
    NatsPublisher, NatsPublisherConfig, NatsStreamConfig, RouterNatsConfig,
};
use kvplane_router::replay::{self, Policy, ReplayConfig, SimEvent, TraceRequest};
use kvplane_router::service::{RouterState, ServiceConfig};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct NatsReplayArgs {
    /// Router replicas reading the stream while it is published (one more starts after).
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// The nats-server binary (default: $KVPLANE_NATS_SERVER, then the venv of
    /// scripts/install-nats.sh).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsReplayError {
    #[error("nats-server not found at {0} (run scripts/install-nats.sh or pass --nats-server)")]
    NoServer(PathBuf),
    #[error("start nats-server {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not listen on port {0} within 10 s")]
    NotListening(u16),
    #[error("replica {replica} reached stream sequence {got} of {want} within {timeout_s} s")]
    Behind {
        replica: usize,
        got: u64,
        want: u64,
        timeout_s: u64,
    },
    #[error("replica {replica} differs from the in-process index on {mismatches} queries")]
    Mismatch { replica: usize, mismatches: usize },
    #[error("the workers' publishers did not reach JetStream within 20 s")]
    PublishersNotUp,
    #[error("the late replica did not start from a router snapshot")]
    NoSnapshot,
    #[error("tokio runtime")]
    Runtime(#[source] std::io::Error),
}

/// Kills and reaps the server when the replay ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server_path(arg: Option<&PathBuf>) -> PathBuf {
    arg.cloned()
        .or_else(|| std::env::var_os("KVPLANE_NATS_SERVER").map(PathBuf::from))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kvplane/nats/bin/nats-server")
        })
}

fn start_server(path: &PathBuf, store: &std::path::Path) -> Result<(Server, u16), NatsReplayError> {
    if !path.exists() {
        return Err(NatsReplayError::NoServer(path.clone()));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| NatsReplayError::Spawn {
            path: path.clone(),
            source,
        })?;
    let child = Command::new(path)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| NatsReplayError::Spawn {
            path: path.clone(),
            source,
        })?;
    let server = Server(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(NatsReplayError::NotListening(port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, port))
}

fn wait_seq(
    state: &RouterState,
    replica: usize,
    want: u64,
    timeout: Duration,
) -> Result<(), NatsReplayError> {
    let t0 = Instant::now();
    loop {
        let got = state.nats_seq.load(Ordering::Relaxed);
        if got >= want {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(NatsReplayError::Behind {
                replica,
                got,
                want,
                timeout_s: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

const NS: &str = "trace";

pub fn run(
    trace: &[TraceRequest],
    cfg: &ReplayConfig,
    args: &NatsReplayArgs,
    json: bool,
) -> CliResult {
    let mut events = Vec::new();
    let report = replay::replay_recording(trace, Policy::Cost, cfg, Some(&mut events));
    let store = tempfile::tempdir()?;
    let path = server_path(args.nats_server.as_ref());
    let (server, port) = start_server(&path, store.path())?;
    let stream = NatsStreamConfig {
        url: format!("nats://127.0.0.1:{port}"),
        ..NatsStreamConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(NatsReplayError::Runtime)?;
    let start_replica = |snapshot_ms: u64| {
        let state = Arc::new(RouterState::new(ServiceConfig::default()));
        rt.spawn(kvplane_router::nats::run_consumer(
            state.clone(),
            RouterNatsConfig {
                stream: stream.clone(),
                snapshot_interval_ms: snapshot_ms,
                ..RouterNatsConfig::default()
            },
        ));
        state
    };
    let mut replicas: Vec<Arc<RouterState>> = (0..args.replicas.max(1))
        .map(|i| start_replica(if i == 0 { 200 } else { 0 }))
        .collect();
    // The simulated workers start empty: their start-up snapshot is one `Cleared`.
    let empty: kvplane_router::events::SnapshotProvider = Arc::new(Vec::new);
    let publishers: Vec<NatsPublisher> = (0..cfg.workers as u64)
        .map(|w| {
            NatsPublisher::start(
                NatsPublisherConfig::new(stream.clone(), format!("sim-{w}"), w),
                empty.clone(),
                rt.handle(),
            )
        })
        .collect();
    // A publisher's first act is its start-up snapshot, which replaces whatever was queued
    // before it (a daemon's snapshot covers those changes; these workers' provider is
    // empty): start the events once every worker has announced itself.
    let t_up = Instant::now();
    while publishers
        .iter()
        .any(|p| p.stats().snapshots.load(Ordering::Relaxed) == 0)
    {
        if t_up.elapsed() > Duration::from_secs(20) {
            return Err(NatsReplayError::PublishersNotUp.into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let reference = Index::new(IndexConfig::default());
    let t0 = Instant::now();
    for ev in &events {
        match ev {
            SimEvent::Stored {
                worker,
                parent,
                hashes,
            } => {
                let blocks: Vec<(u64, Option<u64>)> = hashes
                    .iter()
                    .enumerate()
                    .map(|(i, &h)| (h, if i == 0 { *parent } else { Some(hashes[i - 1]) }))
                    .collect();
                publishers[*worker as usize].stored(NS, &blocks, Tier::Hbm);
                reference.store(NS, *worker, Tier::Hbm, *parent, hashes);
            }
            SimEvent::Removed { worker, hashes } => {
                publishers[*worker as usize].removed(NS, hashes, Some(Tier::Hbm));
                reference.remove(NS, *worker, Some(Tier::Hbm), hashes);
            }
        }
    }
    let want = (events.len() + cfg.workers) as u64;
    let timeout = Duration::from_secs(300);
    // Acknowledged by JetStream (the publishers' side of the end-to-end time).
    while publishers
        .iter()
        .map(|p| p.stats().published.load(Ordering::Relaxed))
        .sum::<u64>()
        < want
    {
        if t0.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let acked_s = t0.elapsed().as_secs_f64();

    for (i, r) in replicas.iter().enumerate() {
        wait_seq(r, i, want, timeout)?;
    }
    let live_s = t0.elapsed().as_secs_f64();
    let dropped: u64 = publishers
        .iter()
        .map(|p| p.stats().dropped.load(Ordering::Relaxed))
        .sum();
    // A replica started now knows nothing but the stream and the first one's snapshots.
    while replicas[0]
        .metrics
        .nats_snapshots_written
        .load(Ordering::Relaxed)
        == 0
        || t0.elapsed().as_secs_f64() < live_s + 0.5
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t_late = Instant::now();
    let late = start_replica(0);
    wait_seq(&late, replicas.len(), want, timeout)?;
    let late_s = t_late.elapsed().as_secs_f64();
    if late.metrics.nats_snapshots_restored.load(Ordering::Relaxed) != 1 {
        return Err(NatsReplayError::NoSnapshot.into());
    }
    replicas.push(late);
    for p in &publishers {
        p.shutdown();
    }
    let mut queries = 0usize;
    for (i, r) in replicas.iter().enumerate() {
        let mut mismatches = 0;
        for req in trace {
            let mut a: Vec<(u64, u32)> = reference
                .find_matches(NS, &req.hash_ids)
                .iter()
                .map(|o| (o.worker, o.blocks))
                .collect();
            let mut b: Vec<(u64, u32)> = r
                .index
                .find_matches(NS, &req.hash_ids)
                .iter()
                .map(|o| (o.worker, o.blocks))
                .collect();
            a.sort_unstable();
            b.sort_unstable();
            mismatches += usize::from(a != b);
            queries += 1;
        }
        if mismatches > 0 {
            return Err(NatsReplayError::Mismatch {
                replica: i,
                mismatches,
            }
            .into());
        }
    }
    drop(server);
    let out = serde_json::json!({
        "policy": "cost",
        "workers": cfg.workers,
        "requests": trace.len(),
        "block_hit_rate": report.block_hit_rate,
        "stream_messages": want,
        "publisher_drops": dropped,
        "replicas": replicas.len(),
        "publish_acked_s": acked_s,
        "publish_to_all_replicas_applied_s": live_s,
        "events_per_s": want as f64 / live_s,
        "late_replica_rebuild_s": late_s,
        "queries_compared": queries,
        "mismatches": 0,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "NATS JetStream replay: {} events from {} workers, {} replicas: all applied in {:.2} s \
             ({:.0} events/s); a replica started afterwards rebuilt from snapshot + stream in \
             {:.2} s; {} queries, every replica equal to the in-process index (publisher drops: {})",
            want,
            cfg.workers,
            replicas.len(),
            live_s,
            want as f64 / live_s,
            late_s,
            queries,
            dropped
        );
    }
    Ok(())
}

//! `nats-fanin`: one router replica applying KV events from 1,000 simulated workers over a
//! real NATS JetStream server (`nats-server` from `scripts/install-nats.sh`).
//!
//! Events: the Mooncake trace routed by the cost policy over `--workers` simulated LRU
//! workers (`kvplane_router::replay`), repeated `--rounds` times in fresh id spaces, each
//! encoded as the daemon publishes it (Dynamo `RouterEvent` JSON + kvplane headers), one
//! snapshot-begin `Cleared` per worker first.
//!
//! Phases, all in one run on the same stream:
//! 1. publish every event (pipelined acks, `--window`): NATS ingest rate;
//! 2. ceiling: a bare ordered consumer reads every message and discards it;
//! 3. the router: `kvplane_router::nats::run_consumer` applies the stream into a
//!    `RouterState` from sequence 1 while another thread runs lookups of trace requests
//!    against its index; events/s = messages / time to reach the last sequence.
//!
//! Prints events/s (and its ratio to the ceiling), lookup p50/p99 during apply, process
//! RSS before and after the router's index was built, index nodes and blocks. `--json`
//! prints one JSON object.

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;
use kvplane_router::dynamo::{self, RouterEvent};
use kvplane_router::nats::{NatsStreamConfig, RouterNatsConfig};
use kvplane_router::replay::{self, Policy, ReplayConfig, SimEvent};
use kvplane_router::service::{RouterState, ServiceConfig};
use kvplane_router::{Tier, WorkerId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    json: bool,
    trace: PathBuf,
    workers: usize,
    rounds: u64,
    window: usize,
    nats_server: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        trace: default_trace(),
        workers: 1_000,
        rounds: 4,
        window: 1_024,
        nats_server: std::env::var_os("KVPLANE_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/kvplane/nats/bin/nats-server")
            }),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |v: String, name: &str| v.parse::<u64>().map_err(|e| format!("{name}: {e}"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--trace" => a.trace = PathBuf::from(val("--trace")?),
            "--nats-server" => a.nats_server = PathBuf::from(val("--nats-server")?),
            "--workers" => a.workers = num(val("--workers")?, "--workers")? as usize,
            "--rounds" => a.rounds = num(val("--rounds")?, "--rounds")?,
            "--window" => a.window = num(val("--window")?, "--window")? as usize,
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other}; see the file's doc comment"
                ));
            }
        }
    }
    if a.workers == 0 || a.rounds == 0 || a.window == 0 {
        return Err("--workers, --rounds and --window must be at least 1".into());
    }
    if !a.nats_server.exists() {
        return Err(format!(
            "nats-server not found at {} (run scripts/install-nats.sh or pass --nats-server)",
            a.nats_server.display()
        ));
    }
    Ok(a)
}

fn default_trace() -> PathBuf {
    let rel = Path::new("data/traces/mooncake/synthetic_trace.jsonl");
    if rel.exists() {
        return rel.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[i] as f64 / 1_000.0
}

const NS: &str = "trace";

struct Msg {
    headers: HeaderMap,
    payload: bytes::Bytes,
}

fn message(worker: WorkerId, ev: &RouterEvent, snapshot: bool) -> Msg {
    let mut headers = HeaderMap::new();
    headers.insert(dynamo::HEADER_EPOCH, "1");
    headers.insert(dynamo::HEADER_NAMESPACE, NS);
    headers.insert(dynamo::HEADER_NODE, format!("sim-{worker}").as_str());
    if snapshot {
        headers.insert(dynamo::HEADER_SNAPSHOT, "begin");
    }
    Msg {
        headers,
        payload: serde_json::to_vec(ev).expect("encode").into(),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nats-fanin: {e}");
            std::process::exit(2);
        }
    };
    let trace = match replay::load_trace(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nats-fanin: {e}");
            std::process::exit(1);
        }
    };
    let cfg = ReplayConfig {
        workers: args.workers,
        ..ReplayConfig::default()
    };
    let mut base = Vec::new();
    replay::replay_recording(&trace, Policy::Cost, &cfg, Some(&mut base));
    let mut ids: HashMap<WorkerId, u64> = HashMap::new();
    let mut msgs = Vec::new();
    for w in 0..args.workers as u64 {
        ids.insert(w, 1);
        msgs.push(message(w, &RouterEvent::cleared(w, 1), true));
    }
    let mut blocks = 0usize;
    for round in 0..args.rounds {
        let shift = |h: u64| h + (round << 32);
        for ev in &base {
            let (worker, rev) = match ev {
                SimEvent::Stored {
                    worker,
                    parent,
                    hashes,
                } => {
                    let id = ids.entry(*worker).or_insert(0);
                    *id += 1;
                    blocks += hashes.len();
                    let hashes: Vec<u64> = hashes.iter().map(|&h| shift(h)).collect();
                    (
                        *worker,
                        RouterEvent::stored(*worker, *id, Tier::Hbm, parent.map(shift), &hashes),
                    )
                }
                SimEvent::Removed { worker, hashes } => {
                    let id = ids.entry(*worker).or_insert(0);
                    *id += 1;
                    blocks += hashes.len();
                    let hashes: Vec<u64> = hashes.iter().map(|&h| shift(h)).collect();
                    (
                        *worker,
                        RouterEvent::removed(*worker, *id, Tier::Hbm, &hashes),
                    )
                }
            };
            msgs.push(message(worker, &rev, false));
        }
    }
    let n = msgs.len();
    let payload_bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();

    // A real server with its store on disk, on a free port.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut server = Command::new(&args.nats_server)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream_cfg = NatsStreamConfig {
        url: format!("nats://127.0.0.1:{port}"),
        ..NatsStreamConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // 1. Publish.
    let (publish_s, last_seq) = rt.block_on(async {
        let client = kvplane_router::nats::connect(&stream_cfg, "nats-fanin", false)
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let mut stream = kvplane_router::nats::ensure_stream(&js, &stream_cfg)
            .await
            .expect("stream");
        let subject = dynamo::publish_subject(&stream_cfg.stream());
        let t = Instant::now();
        for chunk in msgs.chunks(args.window) {
            let mut acks = Vec::with_capacity(chunk.len());
            for m in chunk {
                acks.push(
                    js.publish_with_headers(subject.clone(), m.headers.clone(), m.payload.clone())
                        .await
                        .expect("publish"),
                );
            }
            for a in acks {
                a.await.expect("ack");
            }
        }
        let s = t.elapsed().as_secs_f64();
        let last = stream.info().await.expect("info").state.last_sequence;
        (s, last)
    });
    assert_eq!(last_seq as usize, n, "every event is in the stream");

    // 2. Ceiling: read and discard.
    let ceiling_s = rt.block_on(async {
        let client = kvplane_router::nats::connect(&stream_cfg, "nats-fanin-ceiling", false)
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let stream = kvplane_router::nats::ensure_stream(&js, &stream_cfg)
            .await
            .expect("stream");
        let t = Instant::now();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("consumer");
        let mut m = consumer.messages().await.expect("messages");
        let mut bytes = 0usize;
        while let Some(msg) = m.next().await {
            let msg = msg.expect("message");
            bytes += msg.payload.len();
            if msg.info().expect("info").stream_sequence >= last_seq {
                break;
            }
        }
        assert_eq!(bytes, payload_bytes);
        t.elapsed().as_secs_f64()
    });

    // 3. The router replica, with lookups running alongside.
    let rss_before_kib = rss_kib();
    let state = Arc::new(RouterState::new(ServiceConfig {
        nats: None,
        ..ServiceConfig::default()
    }));
    let done = Arc::new(AtomicBool::new(false));
    let lookups = {
        let (state, done) = (state.clone(), done.clone());
        let queries: Vec<Vec<u64>> = (0..args.rounds)
            .flat_map(|round| {
                trace
                    .iter()
                    .map(move |r| r.hash_ids.iter().map(|&h| h + (round << 32)).collect())
            })
            .collect();
        std::thread::spawn(move || {
            let mut ns = Vec::new();
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                let q = &queries[i % queries.len()];
                let t = Instant::now();
                std::hint::black_box(state.index.find_matches(NS, q));
                ns.push(t.elapsed().as_nanos() as u64);
                i += 1;
            }
            ns
        })
    };
    let t = Instant::now();
    let consumer = rt.spawn(kvplane_router::nats::run_consumer(
        state.clone(),
        RouterNatsConfig {
            stream: stream_cfg.clone(),
            snapshot_interval_ms: 0,
            ..RouterNatsConfig::default()
        },
    ));
    while state.nats_seq.load(Ordering::Relaxed) < last_seq {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "router did not catch up"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let apply_s = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    consumer.abort();
    let mut lat = lookups.join().expect("lookup thread");
    lat.sort_unstable();
    let rss_after_kib = rss_kib();
    let _ = server.kill();
    let _ = server.wait();
    let m = &state.metrics;
    assert_eq!(m.nats_bad_messages.load(Ordering::Relaxed), 0);
    assert_eq!(m.nats_event_gaps.load(Ordering::Relaxed), 0);

    let events_per_s = n as f64 / apply_s;
    let ceiling_per_s = n as f64 / ceiling_s;
    let out = serde_json::json!({
        "trace": args.trace.display().to_string(),
        "workers": args.workers,
        "rounds": args.rounds,
        "events": n,
        "event_blocks": blocks,
        "payload_bytes": payload_bytes,
        "publish_events_per_s": n as f64 / publish_s,
        "ceiling_consume_events_per_s": ceiling_per_s,
        "router_events_per_s": events_per_s,
        "router_ratio_to_ceiling": events_per_s / ceiling_per_s,
        "router_blocks_per_s": blocks as f64 / apply_s,
        "lookups_during_apply": lat.len(),
        "lookup_p50_us": percentile_us(&lat, 0.50),
        "lookup_p99_us": percentile_us(&lat, 0.99),
        "rss_before_router_mib": rss_before_kib as f64 / 1024.0,
        "rss_after_router_mib": rss_after_kib as f64 / 1024.0,
        "index_nodes": state.index.node_count(),
        "index_blocks": state.index.block_count(),
        "workers_known": state.worker_list().len(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{n} events ({blocks} blocks) from {} workers over NATS JetStream\n\
             publish (NATS ingest): {:.0} events/s\n\
             ceiling (bare consumer): {ceiling_per_s:.0} events/s\n\
             router replica: {events_per_s:.0} events/s = {:.2} of the ceiling\n\
             lookups during apply: {} (p50 {:.2} us, p99 {:.2} us)\n\
             RSS {:.1} -> {:.1} MiB; index {} nodes, {} blocks",
            args.workers,
            n as f64 / publish_s,
            events_per_s / ceiling_per_s,
            lat.len(),
            percentile_us(&lat, 0.50),
            percentile_us(&lat, 0.99),
            rss_before_kib as f64 / 1024.0,
            rss_after_kib as f64 / 1024.0,
            state.index.node_count(),
            state.index.block_count(),
        );
    }
}

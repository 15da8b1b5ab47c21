//! `router-vs-dynamo`: kvplane's router index against NVIDIA Dynamo's
//! (`dynamo-kv-router` 1.6.1, `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>`), fed the
//! same precomputed event stream and queried with the same queries, in the same run.
//!
//! Events: the stored/removed stream that 8 simulated LRU workers produce while the cost
//! router replays the Mooncake trace (see `kvplane_router::replay`), repeated `--rounds`
//! times with the block ids shifted per round: disjoint prefix spaces on the same 8
//! workers, like several tenants, so the index grows `rounds` times the trace's size.
//! Both indexes receive identical events; all conversion happens before timing.
//! - kvplane: `Index::store/remove` on the calling thread.
//! - Dynamo: `ThreadPoolIndexer::enqueue_event` for every event, then `flush()` (its
//!   worker threads apply them). One configuration per `--dynamo-threads` entry (default
//!   `1,2`): with one pool thread Dynamo's producer and its one worker share this 2-core
//!   machine without the pool threads also competing with each other; with 2 the pool
//!   takes both cores besides the producer. Each row is its own ratio.
//!
//! Queries: every trace request's block ids (in every round's id space) against the final
//! state, `--passes` times,
//! timed one by one, alternating the two indexes so host noise hits both alike. Dynamo's
//! lookup is `backend().find_matches(seq, false)`, which is what its async `find_matches`
//! runs inline. Answers are compared for every query (per-worker overlap) against every
//! Dynamo configuration's final tree; any query whose answers differ fails the run (exit
//! status 1, after the figures are printed), since a speed ratio between two indexes that
//! disagree means nothing.

use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, SyncIndexer, ThreadPoolIndexer};
use kvplane_router::Tier;
use kvplane_router::index::{Index, IndexConfig};
use kvplane_router::replay::{self, Policy, ReplayConfig, SimEvent};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    json: bool,
    trace: PathBuf,
    rounds: u64,
    passes: usize,
    reps: usize,
    dynamo_threads: Vec<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        trace: default_trace(),
        rounds: 16,
        passes: 2,
        reps: 7,
        dynamo_threads: vec![1, 2],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--trace" => a.trace = PathBuf::from(val("--trace")?),
            "--rounds" => {
                a.rounds = val("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--passes" => {
                a.passes = val("--passes")?
                    .parse()
                    .map_err(|e| format!("--passes: {e}"))?
            }
            "--dynamo-threads" => {
                a.dynamo_threads = val("--dynamo-threads")?
                    .split(',')
                    .map(|t| t.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--dynamo-threads (comma-separated counts): {e}"))?
            }
            "--reps" => a.reps = val("--reps")?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--bench" => {} // passed by `cargo bench`
            other => {
                return Err(format!(
                    "unknown argument {other}; see the file's doc comment"
                ));
            }
        }
    }
    if a.rounds == 0
        || a.passes == 0
        || a.reps == 0
        || a.dynamo_threads.is_empty()
        || a.dynamo_threads.contains(&0)
    {
        return Err("--rounds, --passes, --reps and --dynamo-threads must be at least 1".into());
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

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[i] as f64 / 1_000.0
}

fn to_dynamo(ev: &SimEvent, ids: &mut HashMap<u64, u64>) -> RouterEvent {
    let (worker, data) = match ev {
        SimEvent::Stored {
            worker,
            parent,
            hashes,
        } => (
            *worker,
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(ExternalSequenceBlockHash),
                start_position: None,
                blocks: hashes
                    .iter()
                    .map(|&h| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(h),
                        // Trace ids are already prefix-chained: the id serves as both.
                        tokens_hash: LocalBlockHash(h),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        ),
        SimEvent::Removed { worker, hashes } => (
            *worker,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: hashes
                    .iter()
                    .map(|&h| ExternalSequenceBlockHash(h))
                    .collect(),
            }),
        ),
    };
    let id = ids.entry(worker).or_insert(0);
    *id += 1;
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: *id,
            data,
            dp_rank: 0,
        },
    )
}

/// Shifts block ids into round `round`'s id space (trace ids are below 2^32).
fn shift(h: u64, round: u64) -> u64 {
    h + (round << 32)
}

fn shifted(ev: &SimEvent, round: u64) -> SimEvent {
    match ev {
        SimEvent::Stored {
            worker,
            parent,
            hashes,
        } => SimEvent::Stored {
            worker: *worker,
            parent: parent.map(|p| shift(p, round)),
            hashes: hashes.iter().map(|&h| shift(h, round)).collect(),
        },
        SimEvent::Removed { worker, hashes } => SimEvent::Removed {
            worker: *worker,
            hashes: hashes.iter().map(|&h| shift(h, round)).collect(),
        },
    }
}

fn apply_ours(index: &Index, events: &[SimEvent]) {
    for ev in events {
        match ev {
            SimEvent::Stored {
                worker,
                parent,
                hashes,
            } => {
                index.store("trace", *worker, Tier::Hbm, *parent, hashes);
            }
            SimEvent::Removed { worker, hashes } => {
                index.remove("trace", *worker, None, hashes);
            }
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("router-vs-dynamo: {e}");
            std::process::exit(2);
        }
    };
    let trace = match replay::load_trace(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("router-vs-dynamo: {e}");
            std::process::exit(1);
        }
    };
    let cfg = ReplayConfig::default();
    let workers = cfg.workers as u64;
    let mut base = Vec::new();
    replay::replay_recording(&trace, Policy::Cost, &cfg, Some(&mut base));

    // Precompute both event streams.
    let mut ours: Vec<SimEvent> = Vec::new();
    let mut theirs: Vec<RouterEvent> = Vec::new();
    let mut ids = HashMap::new();
    for round in 0..args.rounds {
        for ev in &base {
            let ev = shifted(ev, round);
            theirs.push(to_dynamo(&ev, &mut ids));
            ours.push(ev);
        }
    }
    let n_events = ours.len();
    let n_blocks: usize = base
        .iter()
        .map(|e| match e {
            SimEvent::Stored { hashes, .. } | SimEvent::Removed { hashes, .. } => hashes.len(),
        })
        .sum::<usize>()
        * args.rounds as usize;

    // Each repetition builds every index from empty; the median time counts. The order
    // rotates between repetitions so no index always runs first (or last, on a warm cache).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let configs = &args.dynamo_threads;
    let mut ours_times = Vec::new();
    let mut theirs_times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut kept_index = None;
    let mut kept_dynamo: Vec<Option<ThreadPoolIndexer<ConcurrentRadixTreeCompressed>>> =
        configs.iter().map(|_| None).collect();
    for rep in 0..args.reps {
        // Slot 0 is kvplane, slot c + 1 Dynamo configuration c.
        let slots = configs.len() + 1;
        for k in 0..slots {
            let slot = (rep + k) % slots;
            if slot == 0 {
                let index = Index::new(IndexConfig::default());
                let t0 = Instant::now();
                apply_ours(&index, &ours);
                ours_times.push(t0.elapsed().as_secs_f64());
                kept_index = Some(index);
            } else {
                let c = slot - 1;
                let events = theirs.clone();
                let dynamo =
                    ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), configs[c], 512);
                let t0 = Instant::now();
                for ev in events {
                    dynamo
                        .enqueue_event(ev)
                        .expect("dynamo indexer accepts events");
                }
                rt.block_on(dynamo.flush());
                theirs_times[c].push(t0.elapsed().as_secs_f64());
                kept_dynamo[c] = Some(dynamo);
            }
        }
    }
    let Some(index) = kept_index else {
        unreachable!("reps >= 1")
    };
    let dynamos: Vec<_> = kept_dynamo
        .into_iter()
        .map(|d| d.expect("reps >= 1"))
        .collect();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ours_s = median(&mut ours_times);
    let theirs_s: Vec<f64> = theirs_times.iter_mut().map(median).collect();

    // Lookups, alternating kvplane and each configuration, with a correctness comparison.
    let queries: Vec<(Vec<u64>, Vec<LocalBlockHash>)> = (0..args.rounds)
        .flat_map(|round| {
            trace.iter().map(move |r| {
                let q: Vec<u64> = r.hash_ids.iter().map(|&h| shift(h, round)).collect();
                let dq = q.iter().map(|&h| LocalBlockHash(h)).collect();
                (q, dq)
            })
        })
        .collect();
    let backends: Vec<_> = dynamos.iter().map(|d| d.backend()).collect();
    let mut ours_ns = Vec::with_capacity(queries.len() * args.passes);
    let mut theirs_ns: Vec<Vec<u64>> = configs
        .iter()
        .map(|_| Vec::with_capacity(queries.len() * args.passes))
        .collect();
    let mut mismatches = vec![0usize; configs.len()];
    let mut first_mismatch: Vec<Option<String>> = vec![None; configs.len()];
    let mut matched_blocks = 0u64;
    for pass in 0..args.passes {
        for (qi, (q, dq)) in queries.iter().enumerate() {
            let t = Instant::now();
            let a = index.find_matches("trace", q);
            ours_ns.push(t.elapsed().as_nanos() as u64);
            let mut mine: Vec<(u64, u32)> = a.iter().map(|o| (o.worker, o.blocks)).collect();
            mine.sort_unstable();
            if pass == 0 {
                matched_blocks += mine.iter().map(|m| u64::from(m.1)).sum::<u64>();
            }
            for (c, backend) in backends.iter().enumerate() {
                let t = Instant::now();
                let b = backend.find_matches(dq, false);
                theirs_ns[c].push(t.elapsed().as_nanos() as u64);
                if pass == 0 {
                    let mut other: Vec<(u64, u32)> = b
                        .scores
                        .iter()
                        .filter(|(_, s)| **s > 0)
                        .map(|(w, s)| (w.worker_id, *s))
                        .collect();
                    other.sort_unstable();
                    if mine != other {
                        mismatches[c] += 1;
                        first_mismatch[c].get_or_insert_with(|| {
                            format!(
                                "query {qi} ({} blocks): kvplane (worker, blocks) {mine:?}, Dynamo {other:?}",
                                q.len()
                            )
                        });
                    }
                }
            }
        }
    }
    ours_ns.sort_unstable();
    let events_per_s = n_events as f64 / ours_s;
    let lookup_p50_us = percentile_us(&ours_ns, 0.50);
    let lookup_p99_us = percentile_us(&ours_ns, 0.99);
    let rows: Vec<serde_json::Value> = configs
        .iter()
        .enumerate()
        .map(|(c, &threads)| {
            theirs_ns[c].sort_unstable();
            let ev = n_events as f64 / theirs_s[c];
            let p50 = percentile_us(&theirs_ns[c], 0.50);
            let p99 = percentile_us(&theirs_ns[c], 0.99);
            serde_json::json!({
                "dynamo_threads": threads,
                "dynamo_events_per_s": ev,
                "events_ratio": events_per_s / ev,
                "dynamo_lookup_p50_us": p50,
                "dynamo_lookup_p99_us": p99,
                "lookup_p50_ratio": p50 / lookup_p50_us,
                "lookup_p99_ratio": p99 / lookup_p99_us,
                "answers_differ": mismatches[c],
                "first_difference": first_mismatch[c],
            })
        })
        .collect();
    let differ: usize = mismatches.iter().sum();
    let out = serde_json::json!({
        "trace": args.trace.display().to_string(),
        "events": n_events,
        "event_blocks": n_blocks,
        "workers": workers,
        "rounds": args.rounds,
        "queries": queries.len(),
        "passes": args.passes,
        "reps": args.reps,
        "events_per_s": events_per_s,
        "lookup_p50_us": lookup_p50_us,
        "lookup_p99_us": lookup_p99_us,
        "index_nodes": index.node_count(),
        "index_blocks": index.block_count(),
        "matched_blocks": matched_blocks,
        "dynamo": rows,
        "answers_differ": differ,
        "passed": differ == 0,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{n_events} events ({n_blocks} blocks) on {workers} workers, {} queries x {} passes; kvplane on 1 thread",
            queries.len(),
            args.passes
        );
        println!(
            "{:<22} {:>12} {:>8} {:>10} {:>10} {:>8} {:>8}",
            "", "events/s", "ratio", "p50 us", "p99 us", "ratio", "differ"
        );
        println!(
            "{:<22} {:>12.0} {:>8} {:>10.2} {:>10.2} {:>8} {:>8}",
            "kvplane (1 thread)", events_per_s, "", lookup_p50_us, lookup_p99_us, "", ""
        );
        for r in &rows {
            println!(
                "{:<22} {:>12.0} {:>8.2} {:>10.2} {:>10.2} {:>8.2} {:>8}",
                format!("Dynamo, {} pool thr", r["dynamo_threads"]),
                r["dynamo_events_per_s"].as_f64().unwrap_or(0.0),
                r["events_ratio"].as_f64().unwrap_or(0.0),
                r["dynamo_lookup_p50_us"].as_f64().unwrap_or(0.0),
                r["dynamo_lookup_p99_us"].as_f64().unwrap_or(0.0),
                r["lookup_p99_ratio"].as_f64().unwrap_or(0.0),
                r["answers_differ"]
            );
        }
        println!("ratios: kvplane events/s over Dynamo's; Dynamo lookup p99 over kvplane's");
    }
    if differ > 0 {
        for (c, m) in first_mismatch.iter().enumerate() {
            if let Some(m) = m {
                eprintln!(
                    "router-vs-dynamo: Dynamo with {} pool thread(s): {} of {} queries answered differently; first: {m}",
                    configs[c],
                    mismatches[c],
                    queries.len()
                );
            }
        }
        eprintln!(
            "router-vs-dynamo: FAILED: the two indexes disagree, so their timings do not compare"
        );
        std::process::exit(1);
    }
}

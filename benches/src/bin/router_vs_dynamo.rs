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
//!   worker threads apply them; `--dynamo-threads`, default 2 = this machine's cores).
//!
//! Queries: every trace request's block ids (in every round's id space) against the final
//! state, `--passes` times,
//! timed one by one, alternating the two indexes so host noise hits both alike. Dynamo's
//! lookup is `backend().find_matches(seq, false)`, which is what its async `find_matches`
//! runs inline. Both answers are compared for every query (per-worker overlap).

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
    dynamo_threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        trace: default_trace(),
        rounds: 16,
        passes: 2,
        reps: 7,
        dynamo_threads: 2,
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
                    .parse()
                    .map_err(|e| format!("--dynamo-threads: {e}"))?
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
    if a.rounds == 0 || a.passes == 0 || a.reps == 0 || a.dynamo_threads == 0 {
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

    // Each repetition builds both indexes from empty; the median time counts. Between
    // repetitions the two alternate who goes first so neither always gets a warm cache.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut ours_times = Vec::new();
    let mut theirs_times = Vec::new();
    let mut kept = None;
    for rep in 0..args.reps {
        let theirs_events = theirs.clone();
        let dynamo = ThreadPoolIndexer::new(
            ConcurrentRadixTreeCompressed::new(),
            args.dynamo_threads,
            512,
        );
        let run_ours = || {
            let index = Index::new(IndexConfig::default());
            let t0 = Instant::now();
            apply_ours(&index, &ours);
            (t0.elapsed().as_secs_f64(), index)
        };
        let run_theirs = |events: Vec<RouterEvent>| {
            let t0 = Instant::now();
            for ev in events {
                dynamo
                    .enqueue_event(ev)
                    .expect("dynamo indexer accepts events");
            }
            rt.block_on(dynamo.flush());
            t0.elapsed().as_secs_f64()
        };
        let (ours_s, index, theirs_s) = if rep % 2 == 0 {
            let (o, i) = run_ours();
            (o, i, run_theirs(theirs_events))
        } else {
            let t = run_theirs(theirs_events);
            let (o, i) = run_ours();
            (o, i, t)
        };
        ours_times.push(ours_s);
        theirs_times.push(theirs_s);
        kept = Some((index, dynamo));
    }
    let Some((index, dynamo)) = kept else {
        unreachable!("reps >= 1")
    };
    ours_times.sort_by(f64::total_cmp);
    theirs_times.sort_by(f64::total_cmp);
    let ours_s = ours_times[ours_times.len() / 2];
    let theirs_s = theirs_times[theirs_times.len() / 2];

    // Lookups, alternating, with a correctness comparison.
    let queries: Vec<(Vec<u64>, Vec<LocalBlockHash>)> = (0..args.rounds)
        .flat_map(|round| {
            trace.iter().map(move |r| {
                let q: Vec<u64> = r.hash_ids.iter().map(|&h| shift(h, round)).collect();
                let dq = q.iter().map(|&h| LocalBlockHash(h)).collect();
                (q, dq)
            })
        })
        .collect();
    let backend = dynamo.backend();
    let mut ours_ns = Vec::with_capacity(queries.len() * args.passes);
    let mut theirs_ns = Vec::with_capacity(queries.len() * args.passes);
    let mut mismatches = 0usize;
    let mut matched_blocks = 0u64;
    for pass in 0..args.passes {
        for (q, dq) in &queries {
            let t = Instant::now();
            let a = index.find_matches("trace", q);
            ours_ns.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let b = backend.find_matches(dq, false);
            theirs_ns.push(t.elapsed().as_nanos() as u64);
            if pass == 0 {
                let mut mine: Vec<(u64, u32)> = a.iter().map(|o| (o.worker, o.blocks)).collect();
                let mut other: Vec<(u64, u32)> = b
                    .scores
                    .iter()
                    .filter(|(_, s)| **s > 0)
                    .map(|(w, s)| (w.worker_id, *s))
                    .collect();
                mine.sort_unstable();
                other.sort_unstable();
                matched_blocks += mine.iter().map(|m| u64::from(m.1)).sum::<u64>();
                if mine != other {
                    mismatches += 1;
                }
            }
        }
    }
    ours_ns.sort_unstable();
    theirs_ns.sort_unstable();
    let events_per_s = n_events as f64 / ours_s;
    let dynamo_events_per_s = n_events as f64 / theirs_s;
    let lookup_p50_us = percentile_us(&ours_ns, 0.50);
    let lookup_p99_us = percentile_us(&ours_ns, 0.99);
    let dynamo_lookup_p50_us = percentile_us(&theirs_ns, 0.50);
    let dynamo_lookup_p99_us = percentile_us(&theirs_ns, 0.99);
    let out = serde_json::json!({
        "trace": args.trace.display().to_string(),
        "events": n_events,
        "event_blocks": n_blocks,
        "workers": workers,
        "rounds": args.rounds,
        "queries": ours_ns.len(),
        "dynamo_threads": args.dynamo_threads,
        "reps": args.reps,
        "events_per_s": events_per_s,
        "dynamo_events_per_s": dynamo_events_per_s,
        "events_ratio": events_per_s / dynamo_events_per_s,
        "lookup_p50_us": lookup_p50_us,
        "lookup_p99_us": lookup_p99_us,
        "dynamo_lookup_p50_us": dynamo_lookup_p50_us,
        "dynamo_lookup_p99_us": dynamo_lookup_p99_us,
        "lookup_p50_ratio": dynamo_lookup_p50_us / lookup_p50_us,
        "lookup_p99_ratio": dynamo_lookup_p99_us / lookup_p99_us,
        "index_nodes": index.node_count(),
        "index_blocks": index.block_count(),
        "answers_differ": mismatches,
        "matched_blocks": matched_blocks,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{n_events} events ({n_blocks} blocks) on {} workers, {} lookups; Dynamo with {} threads",
            workers,
            ours_ns.len(),
            args.dynamo_threads
        );
        println!(
            "{:<22} {:>14} {:>14} {:>8}",
            "", "kvplane", "dynamo", "ratio"
        );
        println!(
            "{:<22} {:>14.0} {:>14.0} {:>8.2}",
            "events/s",
            events_per_s,
            dynamo_events_per_s,
            events_per_s / dynamo_events_per_s
        );
        println!(
            "{:<22} {:>14.2} {:>14.2} {:>8.2}",
            "lookup p50 (us)",
            lookup_p50_us,
            dynamo_lookup_p50_us,
            dynamo_lookup_p50_us / lookup_p50_us
        );
        println!(
            "{:<22} {:>14.2} {:>14.2} {:>8.2}",
            "lookup p99 (us)",
            lookup_p99_us,
            dynamo_lookup_p99_us,
            dynamo_lookup_p99_us / lookup_p99_us
        );
        println!("queries whose per-worker overlap differs between the two: {mismatches}");
    }
}

//! Router-only trace replay: Mooncake-format requests routed to simulated workers.
//!
//! Trace format (JSONL): `{"timestamp": ms, "input_length": tokens, "output_length":
//! tokens, "hash_ids": [..]}`, one block id per 512 input tokens; ids are already chained
//! (two requests share a KV prefix of k blocks iff their first k ids agree), so they are
//! used directly as sequence hashes.
//!
//! Simulated worker model (documented so the numbers can be interpreted):
//! - Cache: each worker holds at most `capacity_blocks` blocks with LRU eviction; blocks
//!   touched by one request share a timestamp and deeper blocks go first, so a prefix
//!   always outlives its suffixes. A request's hit is the leading run of its blocks the
//!   chosen worker holds; afterwards the worker holds all of its blocks. Every insertion
//!   and eviction is applied to the router's index as a stored/removed event at once.
//! - Time: a request's uncached blocks are prefilled in FIFO order per worker at
//!   `prefill_ms_per_block`; decoding then takes `output_length * decode_ms_per_token`
//!   and runs concurrently with other requests. A request is active from arrival to the
//!   end of its decode. Loads seen by the `cost` policy: active requests and the KV blocks
//!   of active requests (decode load), plus the not yet prefilled blocks already queued
//!   on the worker (reported as active prefill, like Dynamo's scheduler does).
//!
//! Policies: `round_robin`; `overlap` (most cached leading blocks, random ties; every
//! request of this trace family shares a first block, so this piles onto few workers);
//! `cost` ([`crate::route::Router`] with its default weights; its prediction TTL is set
//! to 0 here because the simulated events reach the index before the next request).

use crate::index::{Index, IndexConfig};
use crate::route::{RouteConfig, Router, WorkerLoad};
use crate::{Tier, WorkerId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Tokens per `hash_ids` entry in Mooncake traces.
pub const TRACE_BLOCK_TOKENS: u64 = 512;
const NAMESPACE: &str = "trace";

#[derive(Clone, Debug, Deserialize)]
pub struct TraceRequest {
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("open trace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read trace {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {path} line {line}: not a Mooncake request")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("trace {path} has no requests")]
    Empty { path: PathBuf },
}

/// Reads a Mooncake JSONL trace (blank lines skipped).
pub fn load_trace(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let file = std::fs::File::open(path).map_err(|source| TraceError::Open {
        path: path.into(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| TraceError::Read {
            path: path.into(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|source| TraceError::Parse {
                path: path.into(),
                line: i + 1,
                source,
            })?,
        );
    }
    if out.is_empty() {
        return Err(TraceError::Empty { path: path.into() });
    }
    Ok(out)
}

/// Hit rate of one infinite shared cache: the ceiling any placement can reach.
pub fn infinite_cache_hit_rate(trace: &[TraceRequest]) -> f64 {
    let mut seen = HashSet::new();
    let (mut hits, mut total) = (0u64, 0u64);
    for r in trace {
        total += r.hash_ids.len() as u64;
        hits += r.hash_ids.iter().take_while(|h| seen.contains(*h)).count() as u64;
        seen.extend(r.hash_ids.iter().copied());
    }
    hits as f64 / total.max(1) as f64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    RoundRobin,
    Overlap,
    Cost,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::RoundRobin, Policy::Overlap, Policy::Cost];

    pub const fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::Overlap => "overlap",
            Policy::Cost => "cost",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplayConfig {
    pub workers: usize,
    pub capacity_blocks: usize,
    pub prefill_ms_per_block: f64,
    pub decode_ms_per_token: f64,
    pub seed: u64,
    pub route: RouteConfig,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            workers: 8,
            capacity_blocks: 4_096,
            prefill_ms_per_block: 25.0,
            decode_ms_per_token: 20.0,
            seed: 1,
            route: RouteConfig {
                prediction_ttl_ms: 0,
                ..RouteConfig::default()
            },
        }
    }
}

/// Results of one policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    pub requests: usize,
    pub blocks: u64,
    pub block_hit_rate: f64,
    /// Max over workers of prefill blocks computed, divided by the mean.
    pub imbalance: f64,
    pub route_p50_us: f64,
    pub route_p99_us: f64,
    pub prefill_blocks_per_worker: Vec<u64>,
    pub evicted_blocks: u64,
}

struct SimWorker {
    /// hash -> (tick, depth) currently cached.
    cache: HashMap<u64, (u64, u32)>,
    /// Eviction order: oldest tick first, deeper first within a tick.
    order: BTreeMap<(u64, std::cmp::Reverse<u32>), u64>,
    prefill_free_at_ms: f64,
    /// (end_ms, kv blocks) of requests in flight.
    active: Vec<(f64, u64)>,
    prefill_blocks: u64,
    evicted: u64,
}

impl SimWorker {
    fn new() -> Self {
        SimWorker {
            cache: HashMap::new(),
            order: BTreeMap::new(),
            prefill_free_at_ms: 0.0,
            active: Vec::new(),
            prefill_blocks: 0,
            evicted: 0,
        }
    }

    fn load(&mut self, id: WorkerId, now_ms: f64, prefill_ms_per_block: f64) -> WorkerLoad {
        self.active.retain(|&(end, _)| end > now_ms);
        let queued = ((self.prefill_free_at_ms - now_ms).max(0.0) / prefill_ms_per_block) as u64;
        WorkerLoad {
            worker: id,
            active_requests: self.active.len() as u32,
            decode_blocks: self.active.iter().map(|a| a.1).sum::<u64>() + queued,
        }
    }

    /// Caches `hashes` (a chain), evicting LRU leaves; mirrors changes into the index and
    /// into `log` when recording.
    fn admit(
        &mut self,
        id: WorkerId,
        hashes: &[u64],
        tick: u64,
        capacity: usize,
        index: &Index,
        log: &mut Option<&mut Vec<SimEvent>>,
    ) {
        let mut first_new = None;
        for (depth, &h) in hashes.iter().enumerate() {
            let depth = depth as u32;
            if let Some(old) = self.cache.insert(h, (tick, depth)) {
                self.order.remove(&(old.0, std::cmp::Reverse(old.1)));
            } else if first_new.is_none() {
                first_new = Some(depth as usize);
            }
            self.order.insert((tick, std::cmp::Reverse(depth)), h);
        }
        if let Some(k) = first_new {
            let parent = k.checked_sub(1).map(|p| hashes[p]);
            index.store(NAMESPACE, id, Tier::Hbm, parent, &hashes[k..]);
            if let Some(log) = log {
                log.push(SimEvent::Stored {
                    worker: id,
                    parent,
                    hashes: hashes[k..].to_vec(),
                });
            }
        }
        let mut evicted = Vec::new();
        while self.cache.len() > capacity {
            let Some((_, h)) = self.order.pop_first() else {
                break;
            };
            self.cache.remove(&h);
            evicted.push(h);
        }
        if !evicted.is_empty() {
            self.evicted += evicted.len() as u64;
            index.remove(NAMESPACE, id, None, &evicted);
            if let Some(log) = log {
                log.push(SimEvent::Removed {
                    worker: id,
                    hashes: evicted,
                });
            }
        }
    }
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[i] as f64 / 1_000.0
}

/// A KV event the simulated workers produced (for benchmarks that replay the stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    Stored {
        worker: WorkerId,
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    Removed {
        worker: WorkerId,
        hashes: Vec<u64>,
    },
}

/// Replays `trace` under one policy.
pub fn replay(trace: &[TraceRequest], policy: Policy, cfg: &ReplayConfig) -> PolicyReport {
    replay_recording(trace, policy, cfg, None)
}

/// Like [`replay`], appending every stored/removed event to `log` in order.
pub fn replay_recording(
    trace: &[TraceRequest],
    policy: Policy,
    cfg: &ReplayConfig,
    mut log: Option<&mut Vec<SimEvent>>,
) -> PolicyReport {
    // The global node cap is generous: the simulated caches bound the index already.
    let index = std::sync::Arc::new(Index::new(IndexConfig::default()));
    let router = Router::new(index.clone(), cfg.route.clone(), cfg.seed);
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let n = cfg.workers.max(1);
    let mut workers: Vec<SimWorker> = (0..n).map(|_| SimWorker::new()).collect();
    let mut latencies = Vec::with_capacity(trace.len());
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, req) in trace.iter().enumerate() {
        let now = req.timestamp as f64;
        let hashes = &req.hash_ids;
        let loads: Vec<WorkerLoad> = workers
            .iter_mut()
            .enumerate()
            .map(|(w, sw)| sw.load(w as WorkerId, now, cfg.prefill_ms_per_block))
            .collect();
        let started = Instant::now();
        let chosen = match policy {
            Policy::RoundRobin => i % n,
            Policy::Overlap => {
                let overlaps = index.find_matches(NAMESPACE, hashes);
                let best = overlaps.iter().map(|o| o.blocks).max().unwrap_or(0);
                let mut ties: Vec<usize> = if best == 0 {
                    (0..n).collect()
                } else {
                    overlaps
                        .iter()
                        .filter(|o| o.blocks == best)
                        .map(|o| o.worker as usize)
                        .collect()
                };
                ties.sort_unstable();
                ties[rng.random_range(0..ties.len())]
            }
            Policy::Cost => router
                .route(NAMESPACE, hashes, &loads, req.timestamp)
                .map_or(0, |d| d.worker as usize),
        };
        latencies.push(started.elapsed().as_nanos() as u64);
        let w = &mut workers[chosen];
        let hit = hashes
            .iter()
            .take_while(|h| w.cache.contains_key(h))
            .count() as u64;
        hits += hit;
        total += hashes.len() as u64;
        let uncached = hashes.len() as u64 - hit;
        w.prefill_blocks += uncached;
        let start = w.prefill_free_at_ms.max(now);
        let prefill_end = start + uncached as f64 * cfg.prefill_ms_per_block;
        w.prefill_free_at_ms = prefill_end;
        let kv_blocks = (req.input_length + req.output_length).div_ceil(TRACE_BLOCK_TOKENS);
        w.active.push((
            prefill_end + req.output_length as f64 * cfg.decode_ms_per_token,
            kv_blocks,
        ));
        w.admit(
            chosen as WorkerId,
            hashes,
            i as u64 + 1,
            cfg.capacity_blocks,
            &index,
            &mut log,
        );
    }
    latencies.sort_unstable();
    let per_worker: Vec<u64> = workers.iter().map(|w| w.prefill_blocks).collect();
    let mean = per_worker.iter().sum::<u64>() as f64 / n as f64;
    let max = per_worker.iter().copied().max().unwrap_or(0) as f64;
    PolicyReport {
        requests: trace.len(),
        blocks: total,
        block_hit_rate: hits as f64 / total.max(1) as f64,
        imbalance: if mean > 0.0 { max / mean } else { 1.0 },
        route_p50_us: percentile_us(&latencies, 0.50),
        route_p99_us: percentile_us(&latencies, 0.99),
        prefill_blocks_per_worker: per_worker,
        evicted_blocks: workers.iter().map(|w| w.evicted).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(t: u64, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            timestamp: t,
            input_length: ids.len() as u64 * 512,
            output_length: 10,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn overlap_routing_hits_and_round_robin_misses() {
        // Two prefixes alternating: a prefix-aware policy hits, round robin on 2 workers
        // puts each prefix on both workers once before hitting.
        let trace: Vec<TraceRequest> = (0..20)
            .map(|i| {
                if i % 2 == 0 {
                    req(i * 1000, &[1, 2, 3, 4])
                } else {
                    req(i * 1000, &[10, 11, 12, 13])
                }
            })
            .collect();
        let cfg = ReplayConfig {
            workers: 4,
            ..Default::default()
        };
        let ov = replay(&trace, Policy::Overlap, &cfg);
        assert!((ov.block_hit_rate - 0.9).abs() < 1e-9, "{ov:?}");
        let cost = replay(&trace, Policy::Cost, &cfg);
        assert!(cost.block_hit_rate >= 0.8, "{cost:?}");
        assert!((infinite_cache_hit_rate(&trace) - 0.9).abs() < 1e-9);
        let rr = replay(&trace, Policy::RoundRobin, &cfg);
        assert!(rr.block_hit_rate < ov.block_hit_rate);
    }

    #[test]
    fn capacity_is_enforced_and_index_follows() {
        let trace: Vec<TraceRequest> = (0..10)
            .map(|i| req(i, &[i * 100, i * 100 + 1, i * 100 + 2]))
            .collect();
        let cfg = ReplayConfig {
            workers: 1,
            capacity_blocks: 5,
            ..Default::default()
        };
        let r = replay(&trace, Policy::Overlap, &cfg);
        assert_eq!(r.evicted_blocks, 30 - 5);
        assert_eq!(r.block_hit_rate, 0.0);
    }
}

//! KV-aware worker selection.
//!
//! For a query of `n` blocks, each candidate worker gets
//!
//! ```text
//! cost = prefill_weight * (n - credit + pending_prefill_blocks)
//!      + decode_weight  * decode_blocks
//!      + active_weight  * active_requests
//! credit = sum over tiers of tier_credit[tier] * blocks of the query's prefix cached there
//! ```
//!
//! so a prefix in HBM saves more than the same prefix on host or NVMe (it still has to be
//! loaded). The lowest cost wins, ties broken at random; with `temperature > 0` the choice
//! is sampled with probability proportional to `exp(-(cost - min_cost) / temperature)`.
//!
//! The router remembers its own recent decisions for `prediction_ttl_ms` as predicted
//! blocks (credited like HBM) and predicted load (their uncached blocks as pending
//! prefill and one active request each): the KV events of a just-routed request arrive
//! only after its prefill, and without this a burst sharing one new prefix would see
//! every worker at zero overlap and equal load.
//!
//! A caller that sees requests through their life (the trace replay; a frontend) can
//! instead tell the router when each routed request finishes its prefill and when it
//! ends ([`Router::route_request`], [`Router::prefill_done`], [`Router::finished`]), the
//! way Dynamo's KV router tracks active sequences. The load of a worker is then exact,
//! not a guess that expires:
//!
//! ```text
//! cost = prefill_weight * (n - credit + prefill blocks of its requests still in prefill)
//!      + decode_weight  * (distinct blocks of its active requests
//!                          + the query's blocks not among them)
//!      + active_weight  * active requests
//! ```
//!
//! The decode term counts the blocks the worker would hold with this request, so a worker
//! already running requests on the same prefix is cheaper (they share those blocks).

use crate::index::{Index, Overlap};
use crate::{Tier, WorkerId};
use kvplane_ffi::PerTier;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Weights of the cost function (from the router config).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub prefill_weight: f64,
    pub decode_weight: f64,
    pub active_weight: f64,
    /// Fraction of a block's prefill saved when it is cached on hbm, host, nvme.
    pub tier_credit: PerTier<f64>,
    /// 0 picks the minimum; above 0 samples a softmax over negative costs.
    pub temperature: f64,
    pub prediction_ttl_ms: u64,
    /// Cap on remembered decisions (memory bound under a request flood).
    pub max_predictions: usize,
    /// Cap on the block hashes those decisions keep, all together (one request may name
    /// millions; every route compares against them under the router's lock).
    pub max_predicted_blocks: usize,
    /// Cap on tracked requests ([`Router::route_request`]); the oldest is dropped beyond.
    pub max_tracked_requests: usize,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            prefill_weight: 1.0,
            decode_weight: 1.0,
            active_weight: 1.0,
            tier_credit: PerTier([1.0, 0.8, 0.5]),
            temperature: 0.0,
            prediction_ttl_ms: 2_000,
            max_predictions: 8_192,
            max_predicted_blocks: 1 << 20,
            max_tracked_requests: 65_536,
        }
    }
}

/// A candidate worker and its current load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLoad {
    pub worker: WorkerId,
    pub active_requests: u32,
    pub decode_blocks: u64,
}

/// Why a worker scored what it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Score {
    pub worker: WorkerId,
    pub cached_blocks: u32,
    pub cached_hbm: u32,
    pub cached_host: u32,
    pub cached_nvme: u32,
    pub predicted_blocks: u32,
    pub prefill_blocks: f64,
    pub pending_prefill_blocks: u64,
    pub decode_blocks: u64,
    pub active_requests: u32,
    pub cost: f64,
    pub probability: f64,
}

/// A routing answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decision {
    pub worker: WorkerId,
    pub total_blocks: usize,
    /// Every candidate, lowest cost first.
    pub scores: Vec<Score>,
}

#[derive(Debug)]
struct Prediction {
    expires_ms: u64,
    worker: WorkerId,
    namespace: String,
    hashes: Vec<u64>,
    prefill_blocks: u64,
}

/// A routed request the caller reports on (Dynamo's active sequence).
#[derive(Debug)]
struct Tracked {
    worker: WorkerId,
    hashes: Vec<u64>,
    /// Uncached blocks on its worker, until its prefill is done.
    prefill_blocks: u64,
}

/// The tracked load of one worker.
#[derive(Debug, Default)]
struct WorkerActive {
    /// Distinct blocks of its active requests, with how many requests hold each.
    blocks: HashMap<u64, u32>,
    prefill_blocks: u64,
    requests: u32,
}

impl State {
    /// Forgets the oldest prediction.
    fn pop_prediction(&mut self) {
        if let Some(p) = self.predictions.pop_front() {
            self.predicted_blocks -= p.hashes.len();
        }
    }
}

#[derive(Debug)]
struct State {
    predictions: VecDeque<Prediction>,
    /// Hashes the predictions hold, all together (`max_predicted_blocks`).
    predicted_blocks: usize,
    rng: SmallRng,
    tracked: HashMap<u64, Tracked>,
    /// Tracked request ids, oldest first (may hold ids already finished).
    tracked_order: VecDeque<u64>,
    active: HashMap<WorkerId, WorkerActive>,
}

impl State {
    fn untrack(&mut self, id: u64) {
        let Some(t) = self.tracked.remove(&id) else {
            return;
        };
        if let Some(w) = self.active.get_mut(&t.worker) {
            w.prefill_blocks -= t.prefill_blocks;
            w.requests -= 1;
            for h in &t.hashes {
                if let Some(c) = w.blocks.get_mut(h) {
                    *c -= 1;
                    if *c == 0 {
                        w.blocks.remove(h);
                    }
                }
            }
        }
    }
}

/// The routing policy over a shared [`Index`].
#[derive(Debug)]
pub struct Router {
    pub index: Arc<Index>,
    pub config: RouteConfig,
    state: Mutex<State>,
}

impl Router {
    pub fn new(index: Arc<Index>, config: RouteConfig, seed: u64) -> Self {
        Router {
            index,
            config,
            state: Mutex::new(State {
                predictions: VecDeque::new(),
                predicted_blocks: 0,
                rng: SmallRng::seed_from_u64(seed),
                tracked: HashMap::new(),
                tracked_order: VecDeque::new(),
                active: HashMap::new(),
            }),
        }
    }

    /// Live predictions (for metrics).
    pub fn predictions(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .predictions
            .len()
    }

    /// Scores every candidate for the query `hashes` in `namespace`, picks one, and
    /// remembers the decision. `None` when there are no candidates.
    pub fn route(
        &self,
        namespace: &str,
        hashes: &[u64],
        candidates: &[WorkerLoad],
        now_ms: u64,
    ) -> Option<Decision> {
        self.route_inner(None, namespace, hashes, candidates, now_ms)
    }

    /// Routes request `id` and tracks it until [`Router::finished`]: the load of each
    /// worker is its tracked requests (their prefill until [`Router::prefill_done`], their
    /// distinct blocks until they finish), not `candidates`' reported load nor predictions.
    pub fn route_request(
        &self,
        id: u64,
        namespace: &str,
        hashes: &[u64],
        candidates: &[WorkerLoad],
        now_ms: u64,
    ) -> Option<Decision> {
        self.route_inner(Some(id), namespace, hashes, candidates, now_ms)
    }

    /// Request `id` computed its prompt (its first token is out).
    pub fn prefill_done(&self, id: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        if let Some(t) = st.tracked.get_mut(&id) {
            if let Some(w) = st.active.get_mut(&t.worker) {
                w.prefill_blocks -= t.prefill_blocks;
            }
            t.prefill_blocks = 0;
        }
    }

    /// Request `id` ended: its blocks and load leave its worker.
    pub fn finished(&self, id: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.untrack(id);
    }

    /// Requests tracked now.
    pub fn tracked_requests(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tracked
            .len()
    }

    fn route_inner(
        &self,
        track: Option<u64>,
        namespace: &str,
        hashes: &[u64],
        candidates: &[WorkerLoad],
        now_ms: u64,
    ) -> Option<Decision> {
        if candidates.is_empty() {
            return None;
        }
        let overlaps = self.index.find_matches(namespace, hashes);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st
            .predictions
            .front()
            .is_some_and(|p| p.expires_ms <= now_ms)
        {
            st.pop_prediction();
        }
        let cfg = &self.config;
        let n = hashes.len();
        let mut scores: Vec<Score> = candidates
            .iter()
            .map(|c| {
                let o = overlaps
                    .iter()
                    .find(|o| o.worker == c.worker)
                    .cloned()
                    .unwrap_or(Overlap {
                        worker: c.worker,
                        ..Default::default()
                    });
                if track.is_some() {
                    return Self::tracked_score(cfg, &st.active, c.worker, &o, hashes);
                }
                let (mut predicted, mut pending, mut active_pred) = (0u32, 0u64, 0u32);
                for p in st.predictions.iter().filter(|p| p.worker == c.worker) {
                    pending += p.prefill_blocks;
                    active_pred += 1;
                    if p.namespace == namespace {
                        let m = p
                            .hashes
                            .iter()
                            .zip(hashes)
                            .take_while(|(a, b)| a == b)
                            .count() as u32;
                        predicted = predicted.max(m);
                    }
                }
                let mut credit: f64 = Tier::ALL
                    .iter()
                    .map(|&t| cfg.tier_credit[t] * f64::from(o.by_tier[t]))
                    .sum();
                if predicted > o.blocks {
                    credit += cfg.tier_credit[Tier::Hbm] * f64::from(predicted - o.blocks);
                }
                let prefill = (n as f64 - credit).max(0.0);
                let active = c.active_requests + active_pred;
                let cost = cfg.prefill_weight * (prefill + pending as f64)
                    + cfg.decode_weight * c.decode_blocks as f64
                    + cfg.active_weight * f64::from(active);
                Score {
                    worker: c.worker,
                    cached_blocks: o.blocks,
                    cached_hbm: o.by_tier[Tier::Hbm],
                    cached_host: o.by_tier[Tier::Host],
                    cached_nvme: o.by_tier[Tier::Nvme],
                    predicted_blocks: predicted,
                    prefill_blocks: prefill,
                    pending_prefill_blocks: pending,
                    decode_blocks: c.decode_blocks,
                    active_requests: active,
                    cost,
                    probability: 0.0,
                }
            })
            .collect();
        scores.sort_by(|a, b| a.cost.total_cmp(&b.cost).then(a.worker.cmp(&b.worker)));
        let min = scores[0].cost;
        let pick = if cfg.temperature > 0.0 {
            let weights: Vec<f64> = scores
                .iter()
                .map(|s| (-(s.cost - min) / cfg.temperature).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            for (s, w) in scores.iter_mut().zip(&weights) {
                s.probability = w / total;
            }
            let mut x = st.rng.random::<f64>() * total;
            let mut pick = scores.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if x < *w {
                    pick = i;
                    break;
                }
                x -= w;
            }
            pick
        } else {
            let ties = scores
                .iter()
                .take_while(|s| s.cost - min <= 1e-9 * min.abs().max(1.0))
                .count();
            for s in scores.iter_mut().take(ties) {
                s.probability = 1.0 / ties as f64;
            }
            st.rng.random_range(0..ties)
        };
        let chosen = &scores[pick];
        let worker = chosen.worker;
        let uncached = n.saturating_sub(chosen.cached_blocks.max(chosen.predicted_blocks) as usize);
        if let Some(id) = track {
            let st = &mut *st;
            // A reused id replaces its earlier request.
            st.untrack(id);
            while st.tracked.len() >= cfg.max_tracked_requests.max(1) {
                match st.tracked_order.pop_front() {
                    Some(old) => st.untrack(old),
                    None => break,
                }
            }
            let w = st.active.entry(worker).or_default();
            w.prefill_blocks += uncached as u64;
            w.requests += 1;
            for &h in hashes {
                *w.blocks.entry(h).or_insert(0) += 1;
            }
            st.tracked.insert(
                id,
                Tracked {
                    worker,
                    hashes: hashes.to_vec(),
                    prefill_blocks: uncached as u64,
                },
            );
            st.tracked_order.push_back(id);
            if st.tracked_order.len() > 2 * cfg.max_tracked_requests.max(1) {
                // Drop ids already finished so the order queue stays bounded.
                let tracked = &st.tracked;
                st.tracked_order.retain(|i| tracked.contains_key(i));
            }
        } else if cfg.prediction_ttl_ms > 0 && n > 0 {
            // A prediction's credit is the prefix a later request shares with it: one
            // past the cap keeps its leading blocks.
            let kept = n.min(cfg.max_predicted_blocks.max(1));
            while st.predictions.len() >= cfg.max_predictions.max(1)
                || st.predicted_blocks + kept > cfg.max_predicted_blocks.max(1)
            {
                st.pop_prediction();
            }
            st.predicted_blocks += kept;
            st.predictions.push_back(Prediction {
                expires_ms: now_ms + cfg.prediction_ttl_ms,
                worker,
                namespace: namespace.to_owned(),
                hashes: hashes[..kept].to_vec(),
                prefill_blocks: uncached as u64,
            });
        }
        Some(Decision {
            worker,
            total_blocks: n,
            scores,
        })
    }

    /// A candidate's score from the tracked requests (see the module comment).
    fn tracked_score(
        cfg: &RouteConfig,
        active: &HashMap<WorkerId, WorkerActive>,
        worker: WorkerId,
        o: &Overlap,
        hashes: &[u64],
    ) -> Score {
        let n = hashes.len();
        let credit: f64 = Tier::ALL
            .iter()
            .map(|&t| cfg.tier_credit[t] * f64::from(o.by_tier[t]))
            .sum();
        let prefill = (n as f64 - credit).max(0.0);
        let (pending, held, new, requests) = match active.get(&worker) {
            Some(w) => (
                w.prefill_blocks,
                w.blocks.len() as u64,
                hashes.iter().filter(|h| !w.blocks.contains_key(h)).count() as u64,
                w.requests,
            ),
            None => (0, 0, n as u64, 0),
        };
        let decode = held + new;
        let cost = cfg.prefill_weight * (prefill + pending as f64)
            + cfg.decode_weight * decode as f64
            + cfg.active_weight * f64::from(requests);
        Score {
            worker,
            cached_blocks: o.blocks,
            cached_hbm: o.by_tier[Tier::Hbm],
            cached_host: o.by_tier[Tier::Host],
            cached_nvme: o.by_tier[Tier::Nvme],
            predicted_blocks: 0,
            prefill_blocks: prefill,
            pending_prefill_blocks: pending,
            decode_blocks: decode,
            active_requests: requests,
            cost,
            probability: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexConfig;

    fn loads(n: u64) -> Vec<WorkerLoad> {
        (0..n)
            .map(|worker| WorkerLoad {
                worker,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn prefers_cached_and_faster_tier() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let q: Vec<u64> = (1..=10).collect();
        index.store("ns", 1, Tier::Nvme, None, &q);
        index.store("ns", 2, Tier::Hbm, None, &q[..8]);
        let r = Router::new(index, RouteConfig::default(), 1);
        let d = r.route("ns", &q, &loads(3), 0).unwrap();
        // worker 2: 10 - 8 = 2 prefill; worker 1: 10 - 5 = 5; worker 0: 10.
        assert_eq!(d.worker, 2);
        assert_eq!(d.scores.len(), 3);
        assert_eq!(d.scores[0].cached_hbm, 8);
        assert_eq!(d.scores[1].worker, 1);
        assert_eq!(d.scores[1].cached_nvme, 10);
    }

    #[test]
    fn load_outweighs_small_overlap() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let q: Vec<u64> = (1..=10).collect();
        index.store("ns", 0, Tier::Hbm, None, &q[..2]);
        let r = Router::new(index, RouteConfig::default(), 1);
        let mut l = loads(2);
        l[0].decode_blocks = 50;
        assert_eq!(r.route("ns", &q, &l, 0).unwrap().worker, 1);
    }

    #[test]
    fn burst_of_one_new_prefix_spreads() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let r = Router::new(index, RouteConfig::default(), 7);
        let q: Vec<u64> = (100..132).collect();
        let mut seen = std::collections::HashSet::new();
        for i in 0..8 {
            seen.insert(r.route("ns", &q, &loads(8), i).unwrap().worker);
        }
        assert_eq!(seen.len(), 8, "8 identical requests should use 8 workers");
        // After the TTL the predictions are gone.
        let d = r.route("ns", &q, &loads(8), 10_000).unwrap();
        assert!(d.scores.iter().all(|s| s.predicted_blocks == 0));
    }

    #[test]
    fn tracked_requests_carry_load_until_they_finish() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let r = Router::new(index.clone(), RouteConfig::default(), 5);
        let q: Vec<u64> = (1..=10).collect();
        // Two requests of one new prefix: the second goes elsewhere while the first is
        // in prefill (its 10 blocks are pending there).
        let a = r.route_request(1, "ns", &q, &loads(2), 0).unwrap().worker;
        let b = r.route_request(2, "ns", &q, &loads(2), 0).unwrap();
        assert_ne!(a, b.worker);
        let on_a = b.scores.iter().find(|s| s.worker == a).unwrap();
        assert_eq!(on_a.pending_prefill_blocks, 10);
        // A's prompt is computed and cached there: a third request sharing it goes to A
        // (no prefill; its blocks are already held by the running request).
        r.prefill_done(1);
        r.prefill_done(2);
        index.store("ns", a, Tier::Hbm, None, &q);
        let c = r.route_request(3, "ns", &q, &loads(2), 0).unwrap();
        assert_eq!(c.worker, a);
        let s = c.scores.iter().find(|s| s.worker == a).unwrap();
        assert_eq!((s.pending_prefill_blocks, s.decode_blocks), (0, 10));
        assert_eq!(s.active_requests, 1);
        assert_eq!(r.tracked_requests(), 3);
        for id in 1..=3 {
            r.finished(id);
        }
        assert_eq!(r.tracked_requests(), 0);
        let d = r.route_request(4, "ns", &q, &loads(2), 0).unwrap();
        assert!(d.scores.iter().all(|s| s.active_requests == 0));
        // Finishing an unknown or finished id is harmless.
        r.finished(99);
        r.finished(1);
    }

    #[test]
    fn tracking_is_bounded() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let cfg = RouteConfig {
            max_tracked_requests: 4,
            ..Default::default()
        };
        let r = Router::new(index, cfg, 1);
        for id in 0..100u64 {
            r.route_request(id, "ns", &[id, id + 1000], &loads(3), 0);
            if id % 3 == 0 {
                r.finished(id);
            }
        }
        assert!(r.tracked_requests() <= 4);
        let st = r.state.lock().unwrap();
        assert!(st.tracked_order.len() <= 8);
        let held: usize = st.active.values().map(|w| w.blocks.len()).sum();
        assert_eq!(held, 2 * st.tracked.len());
    }

    /// The predictions keep at most `max_predicted_blocks` hashes together, however long
    /// the requests: the oldest go first, and one longer than the cap keeps its prefix.
    #[test]
    fn predictions_are_bounded_in_blocks() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let cfg = RouteConfig {
            max_predicted_blocks: 100,
            ..Default::default()
        };
        let r = Router::new(index, cfg, 1);
        let long: Vec<u64> = (0..1_000).collect();
        for i in 0..20u64 {
            let hashes: Vec<u64> = (0..30).map(|h| h + i * 1_000).collect();
            r.route("ns", &hashes, &loads(2), 0).unwrap();
        }
        r.route("ns", &long, &loads(2), 0).unwrap();
        let st = r.state.lock().unwrap();
        let held: usize = st.predictions.iter().map(|p| p.hashes.len()).sum();
        assert_eq!(held, st.predicted_blocks);
        assert!(held <= 100, "{held} hashes kept");
        assert_eq!(st.predictions.back().unwrap().hashes, long[..100]);
    }

    #[test]
    fn temperature_gives_probabilities() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let cfg = RouteConfig {
            temperature: 2.0,
            prediction_ttl_ms: 0,
            ..Default::default()
        };
        let r = Router::new(index, cfg, 3);
        let d = r.route("ns", &[1, 2, 3], &loads(4), 0).unwrap();
        let total: f64 = d.scores.iter().map(|s| s.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}

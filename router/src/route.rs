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

use crate::index::{Index, Overlap};
use crate::{Tier, WorkerId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Weights of the cost function (from the router config).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    pub prefill_weight: f64,
    pub decode_weight: f64,
    pub active_weight: f64,
    /// Fraction of a block's prefill saved when it is cached on hbm, host, nvme.
    pub tier_credit: [f64; 3],
    /// 0 picks the minimum; above 0 samples a softmax over negative costs.
    pub temperature: f64,
    pub prediction_ttl_ms: u64,
    /// Cap on remembered decisions (memory bound under a request flood).
    pub max_predictions: usize,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            prefill_weight: 1.0,
            decode_weight: 1.0,
            active_weight: 1.0,
            tier_credit: [1.0, 0.8, 0.5],
            temperature: 0.0,
            prediction_ttl_ms: 2_000,
            max_predictions: 8_192,
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

#[derive(Debug)]
struct State {
    predictions: VecDeque<Prediction>,
    rng: SmallRng,
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
                rng: SmallRng::seed_from_u64(seed),
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
            st.predictions.pop_front();
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
                    .map(|&t| cfg.tier_credit[t as usize] * f64::from(o.by_tier[t as usize]))
                    .sum();
                if predicted > o.blocks {
                    credit += cfg.tier_credit[Tier::Hbm as usize] * f64::from(predicted - o.blocks);
                }
                let prefill = (n as f64 - credit).max(0.0);
                let active = c.active_requests + active_pred;
                let cost = cfg.prefill_weight * (prefill + pending as f64)
                    + cfg.decode_weight * c.decode_blocks as f64
                    + cfg.active_weight * f64::from(active);
                Score {
                    worker: c.worker,
                    cached_blocks: o.blocks,
                    cached_hbm: o.by_tier[0],
                    cached_host: o.by_tier[1],
                    cached_nvme: o.by_tier[2],
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
        if cfg.prediction_ttl_ms > 0 && n > 0 {
            if st.predictions.len() >= cfg.max_predictions.max(1) {
                st.predictions.pop_front();
            }
            st.predictions.push_back(Prediction {
                expires_ms: now_ms + cfg.prediction_ttl_ms,
                worker,
                namespace: namespace.to_owned(),
                hashes: hashes.to_vec(),
                prefill_blocks: uncached as u64,
            });
        }
        Some(Decision {
            worker,
            total_blocks: n,
            scores,
        })
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

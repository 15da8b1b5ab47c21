//! Index invariants under seeded random event streams, checked against a plain set model.

use kvplane_router::Tier;
use kvplane_router::index::Tree;
use proptest::prelude::*;
use std::collections::HashMap;

const WORKERS: u64 = 4;
const CHAINS: usize = 6;

/// Chains sharing prefixes: chain c copies a random prefix of an earlier chain and then
/// continues with fresh ids, like prompts sharing a system prompt.
fn chains(shares: &[(usize, usize)], len: usize) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut next_id = 1u64;
    for (c, &(from, share)) in shares.iter().enumerate().take(CHAINS) {
        let mut chain = Vec::with_capacity(len);
        if c > 0 {
            let from = from % c;
            chain.extend_from_slice(&out[from][..share.min(len)]);
        }
        while chain.len() < len {
            chain.push(next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            next_id += 1;
        }
        out.push(chain);
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Store {
        worker: u64,
        chain: usize,
        len: usize,
        tier: u8,
    },
    Remove {
        worker: u64,
        chain: usize,
        start: usize,
        len: usize,
        tier: Option<u8>,
        reverse: bool,
    },
    RemoveWorker {
        worker: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..WORKERS, 0..CHAINS, 1..12usize, 0..3u8)
            .prop_map(|(worker, chain, len, tier)| Op::Store { worker, chain, len, tier }),
        3 => (0..WORKERS, 0..CHAINS, 0..12usize, 1..6usize, proptest::option::of(0..3u8), any::<bool>())
            .prop_map(|(worker, chain, start, len, tier, reverse)| Op::Remove { worker, chain, start, len, tier, reverse }),
        1 => (0..WORKERS).prop_map(|worker| Op::RemoveWorker { worker }),
    ]
}

fn tier(t: u8) -> Tier {
    Tier::ALL[t as usize]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn index_matches_model(
        shares in proptest::collection::vec((0..CHAINS, 0..12usize), CHAINS),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let chains = chains(&shares, 12);
        let mut tree = Tree::new();
        // (worker, hash) -> tier mask
        let mut model: HashMap<(u64, u64), u8> = HashMap::new();
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Store { worker, chain, len, tier: t } => {
                    tree.store(worker, tier(t), None, &chains[chain][..len], step as u64);
                    for &h in &chains[chain][..len] {
                        *model.entry((worker, h)).or_default() |= tier(t).bit();
                    }
                }
                Op::Remove { worker, chain, start, len, tier: t, reverse } => {
                    let end = (start + len).min(12);
                    let mut hashes = chains[chain][start..end].to_vec();
                    if reverse {
                        // Leaf-first eviction order.
                        hashes.reverse();
                    }
                    tree.remove(worker, t.map(tier), &hashes);
                    let mask = t.map_or(0b111, |t| tier(t).bit());
                    for &h in &hashes {
                        if let Some(m) = model.get_mut(&(worker, h)) {
                            *m &= !mask;
                            if *m == 0 {
                                model.remove(&(worker, h));
                            }
                        }
                    }
                }
                Op::RemoveWorker { worker } => {
                    tree.remove_worker(worker);
                    model.retain(|&(w, _), _| w != worker);
                }
            }
            prop_assert_eq!(tree.check_invariants(), Ok(()), "after step {} {:?}", step, op);
        }
        // Every stored block findable, every removed one gone, with the right tiers.
        for chain in &chains {
            for &h in chain {
                for w in 0..WORKERS {
                    let mask = model.get(&(w, h)).copied().unwrap_or(0);
                    for t in Tier::ALL {
                        prop_assert_eq!(tree.holds(w, h, Some(t)), mask & t.bit() != 0);
                    }
                }
            }
            // Leading overlap per worker equals the model's.
            let found = tree.find_matches(chain, 0);
            for w in 0..WORKERS {
                let lead = chain.iter().take_while(|&&h| model.contains_key(&(w, h))).count() as u32;
                let got = found.iter().find(|o| o.worker == w).map_or(0, |o| o.blocks);
                prop_assert_eq!(got, lead, "worker {}", w);
            }
        }
        // Memory returns to baseline after removing everything.
        for w in 0..WORKERS {
            for chain in &chains {
                tree.remove(w, None, chain);
            }
        }
        prop_assert_eq!(tree.check_invariants(), Ok(()));
        prop_assert_eq!(tree.node_count(), 0);
        prop_assert_eq!(tree.block_count(), 0);
    }
}

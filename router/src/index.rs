//! Compressed radix tree of chained block hashes, one tree per namespace, recording which
//! workers (and on which tiers) hold each block.
//!
//! A node is a run of consecutive blocks of one chain that all have the same holder set;
//! a chain splits into children where holder sets or continuations differ. Because a
//! sequence hash identifies its whole prefix, a side table `hash -> (node, offset)` lets
//! events that name a block by hash alone (removals, vLLM's feed) find it in O(1).
//!
//! Memory stays bounded under prefix churn: removing a worker's last claim on a leaf frees
//! the node, and a node whose only child has the same holders absorbs it again, so storing
//! and then removing everything returns the tree to its empty root. A configured node cap
//! evicts the least recently used leaves (counted in [`IndexStats::evicted_nodes`]).
//!
//! Concurrency: each namespace's tree sits behind its own `RwLock`. Every write applies one
//! event (O(blocks in the event), no I/O, no allocation beyond the new nodes) so writer
//! critical sections are microseconds and lookups, which take the read lock, never wait
//! behind a long write; lookups in different namespaces never contend at all. This is
//! simpler than an epoch-snapshot design and measured faster than Dynamo's threaded index
//! on the trace (see `benches/src/bin/router_vs_dynamo.rs`).

use crate::{Tier, WorkerId};
use kvplane_ffi::PerTier;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

type NodeId = u32;
const ROOT: NodeId = 0;
const TIER_MASK_ALL: u8 = 0b111;

pub type HashMapU64<V> = HashMap<u64, V, crate::hash::BuildKeyHasher>;

/// A node's children keyed by first hash: a short vector for the common 0-2 children,
/// a hash map once a node fans out (the root of a busy namespace has thousands).
#[derive(Debug)]
enum Children {
    Small(Vec<(u64, NodeId)>),
    Map(HashMapU64<NodeId>),
}

const CHILDREN_SMALL_MAX: usize = 16;

impl Default for Children {
    fn default() -> Self {
        Children::Small(Vec::new())
    }
}

impl Children {
    fn single(first: u64, id: NodeId) -> Self {
        Children::Small(vec![(first, id)])
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        match self {
            Children::Small(v) => v.len(),
            Children::Map(m) => m.len(),
        }
    }

    fn get(&self, first: u64) -> Option<NodeId> {
        match self {
            Children::Small(v) => v.iter().find(|(h, _)| *h == first).map(|&(_, c)| c),
            Children::Map(m) => m.get(&first).copied(),
        }
    }

    /// The child when there is exactly one.
    fn only(&self) -> Option<NodeId> {
        match self {
            Children::Small(v) if v.len() == 1 => Some(v[0].1),
            Children::Map(m) if m.len() == 1 => m.values().next().copied(),
            _ => None,
        }
    }

    fn insert(&mut self, first: u64, id: NodeId) {
        match self {
            Children::Small(v) => {
                if let Some(e) = v.iter_mut().find(|(h, _)| *h == first) {
                    e.1 = id;
                } else if v.len() < CHILDREN_SMALL_MAX {
                    v.push((first, id));
                } else {
                    let mut m: HashMapU64<NodeId> = v.drain(..).collect();
                    m.insert(first, id);
                    *self = Children::Map(m);
                }
            }
            Children::Map(m) => {
                m.insert(first, id);
            }
        }
    }

    fn remove(&mut self, first: u64) {
        match self {
            Children::Small(v) => v.retain(|&(h, _)| h != first),
            Children::Map(m) => {
                m.remove(&first);
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (u64, NodeId)> + '_> {
        match self {
            Children::Small(v) => Box::new(v.iter().copied()),
            Children::Map(m) => Box::new(m.iter().map(|(&h, &c)| (h, c))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    worker: WorkerId,
    /// Bit set of [`Tier::bit`]: a daemon may hold a block on several tiers at once.
    tiers: u8,
}

#[derive(Debug)]
struct Node {
    hashes: Vec<u64>,
    parent: NodeId,
    /// Keyed by the child's first hash.
    children: Children,
    /// Sorted by worker.
    holders: Vec<Holder>,
    last_use: AtomicU64,
    alive: bool,
}

impl Node {
    fn new(parent: NodeId, hashes: Vec<u64>, holders: Vec<Holder>, last_use: u64) -> Self {
        Node {
            hashes,
            parent,
            children: Children::default(),
            holders,
            last_use: AtomicU64::new(last_use),
            alive: true,
        }
    }

    fn holder(&self, worker: WorkerId) -> Option<&Holder> {
        self.holders
            .binary_search_by_key(&worker, |h| h.worker)
            .ok()
            .map(|i| &self.holders[i])
    }

    fn child(&self, first: u64) -> Option<NodeId> {
        self.children.get(first)
    }
}

/// One node of [`Tree::dump`]: a chain, the block before it, and who holds it on which
/// tiers (bit set of [`Tier::bit`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpNode {
    pub parent: Option<u64>,
    pub hashes: Vec<u64>,
    pub holders: Vec<(WorkerId, u8)>,
}

/// One worker's cached prefix of a query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    pub worker: WorkerId,
    /// Leading query blocks this worker holds (on any tier).
    pub blocks: u32,
    /// The same blocks counted by the fastest tier the worker holds each on.
    pub by_tier: PerTier<u32>,
}

/// Result of applying a store event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    Applied,
    /// A new namespace past `max_namespaces`: nothing stored.
    NamespaceLimit,
    /// The event's parent hash is unknown (never stored or already removed): the blocks
    /// after it cannot be placed and were skipped.
    UnknownParent,
}

/// One namespace's tree. Not thread-safe by itself; [`Index`] wraps it in a lock.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    lookup: HashMapU64<(NodeId, u32)>,
    live_nodes: usize,
    /// Taken out of the index (it was empty): a writer that got it just before retries
    /// with the namespace's current tree.
    retired: bool,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        Tree {
            nodes: vec![Node::new(ROOT, Vec::new(), Vec::new(), 0)],
            free: Vec::new(),
            lookup: HashMapU64::default(),
            live_nodes: 0,
            retired: false,
        }
    }

    /// Nodes other than the root (the memory measure; 0 when empty).
    pub fn node_count(&self) -> usize {
        self.live_nodes
    }

    /// Distinct blocks indexed.
    pub fn block_count(&self) -> usize {
        self.lookup.len()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.lookup.contains_key(&hash)
    }

    /// Whether `worker` holds `hash` (on any tier of `tier`, or any tier when `None`).
    pub fn holds(&self, worker: WorkerId, hash: u64, tier: Option<Tier>) -> bool {
        let mask = tier.map_or(TIER_MASK_ALL, Tier::bit);
        self.lookup.get(&hash).is_some_and(|&(n, _)| {
            self.nodes[n as usize]
                .holder(worker)
                .is_some_and(|h| h.tiers & mask != 0)
        })
    }

    fn alloc(&mut self, node: Node) -> NodeId {
        self.live_nodes += 1;
        if let Some(id) = self.free.pop() {
            self.nodes[id as usize] = node;
            id
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as NodeId
        }
    }

    fn release(&mut self, id: NodeId) {
        let node = &mut self.nodes[id as usize];
        node.alive = false;
        node.hashes = Vec::new();
        node.children = Children::default();
        node.holders = Vec::new();
        self.live_nodes -= 1;
        self.free.push(id);
    }

    /// Splits `n` so it keeps `hashes[..k]`; returns the new node with `hashes[k..]`.
    fn split(&mut self, n: NodeId, k: usize) -> NodeId {
        let node = &mut self.nodes[n as usize];
        debug_assert!(k > 0 && k < node.hashes.len());
        let tail = node.hashes.split_off(k);
        let children = std::mem::take(&mut node.children);
        let holders = node.holders.clone();
        let last_use = node.last_use.load(Ordering::Relaxed);
        let first = tail[0];
        let m = self.alloc(Node::new(n, tail, holders, last_use));
        for (_, c) in children.iter() {
            self.nodes[c as usize].parent = m;
        }
        self.nodes[m as usize].children = children;
        self.nodes[n as usize].children = Children::single(first, m);
        for (i, &h) in self.nodes[m as usize].hashes.iter().enumerate() {
            self.lookup.insert(h, (m, i as u32));
        }
        m
    }

    /// Absorbs `n`'s only child when both have the same holders. Returns true if merged.
    fn try_merge_with_child(&mut self, n: NodeId) -> bool {
        if n == ROOT {
            return false;
        }
        let node = &self.nodes[n as usize];
        let Some(c) = node.children.only() else {
            return false;
        };
        if self.nodes[c as usize].holders != node.holders {
            return false;
        }
        let child_hashes = std::mem::take(&mut self.nodes[c as usize].hashes);
        let grandchildren = std::mem::take(&mut self.nodes[c as usize].children);
        let offset = self.nodes[n as usize].hashes.len();
        for (i, &h) in child_hashes.iter().enumerate() {
            self.lookup.insert(h, (n, (offset + i) as u32));
        }
        for (_, g) in grandchildren.iter() {
            self.nodes[g as usize].parent = n;
        }
        let child_use = self.nodes[c as usize].last_use.load(Ordering::Relaxed);
        let node = &mut self.nodes[n as usize];
        node.hashes.extend_from_slice(&child_hashes);
        node.children = grandchildren;
        node.last_use.fetch_max(child_use, Ordering::Relaxed);
        self.release(c);
        true
    }

    /// Merges `n` with its parent and its child where holders agree.
    /// Returns the node that now holds `n`'s blocks.
    fn normalize(&mut self, n: NodeId) -> NodeId {
        let p = self.nodes[n as usize].parent;
        let cur = if p != ROOT && self.try_merge_with_child(p) {
            p
        } else {
            n
        };
        while self.try_merge_with_child(cur) {}
        cur
    }

    /// Removes a leaf node and its hashes.
    fn delete_leaf(&mut self, n: NodeId) -> NodeId {
        debug_assert!(self.nodes[n as usize].children.is_empty());
        let p = self.nodes[n as usize].parent;
        let first = self.nodes[n as usize].hashes[0];
        for h in std::mem::take(&mut self.nodes[n as usize].hashes) {
            self.lookup.remove(&h);
        }
        self.nodes[p as usize].children.remove(first);
        self.release(n);
        p
    }

    /// After holders of `n` shrank: frees empty leaves upwards, then re-merges. Returns
    /// the node it stopped at (alive, or ROOT).
    fn cleanup_up(&mut self, mut n: NodeId) -> NodeId {
        while n != ROOT && self.nodes[n as usize].alive {
            let node = &self.nodes[n as usize];
            if node.holders.is_empty() && node.children.is_empty() {
                n = self.delete_leaf(n);
                continue;
            }
            // Merging may turn `n` (or its parent, which absorbed it) into an empty leaf.
            let cur = self.normalize(n);
            let node = &self.nodes[cur as usize];
            if node.holders.is_empty() && node.children.is_empty() {
                n = cur;
                continue;
            }
            return cur;
        }
        n
    }

    /// Isolates blocks `[k, k + run)` of node `n` into their own node and returns it.
    fn isolate(&mut self, n: NodeId, k: usize, run: usize) -> NodeId {
        let target = if k > 0 { self.split(n, k) } else { n };
        if run < self.nodes[target as usize].hashes.len() {
            self.split(target, run);
        }
        target
    }

    /// Length of the run of `hashes` that continues node `n` from offset `k`.
    fn run_len(&self, n: NodeId, k: usize, hashes: &[u64]) -> usize {
        let node_hashes = &self.nodes[n as usize].hashes[k..];
        node_hashes
            .iter()
            .zip(hashes)
            .take_while(|(a, b)| a == b)
            .count()
            .max(1)
    }

    /// `worker` stored the chain `hashes` (each the parent of the next) after `parent`.
    pub fn store(
        &mut self,
        worker: WorkerId,
        tier: Tier,
        parent: Option<u64>,
        hashes: &[u64],
        now: u64,
    ) -> StoreOutcome {
        let bit = tier.bit();
        let mut prev = parent;
        let mut i = 0;
        while i < hashes.len() {
            if let Some(&(n, k)) = self.lookup.get(&hashes[i]) {
                let k = k as usize;
                let run = self.run_len(n, k, &hashes[i..]);
                let has = self.nodes[n as usize]
                    .holder(worker)
                    .is_some_and(|h| h.tiers & bit != 0);
                let node = if has {
                    n
                } else {
                    let target = self.isolate(n, k, run);
                    let holders = &mut self.nodes[target as usize].holders;
                    match holders.binary_search_by_key(&worker, |h| h.worker) {
                        Ok(j) => holders[j].tiers |= bit,
                        Err(j) => holders.insert(j, Holder { worker, tiers: bit }),
                    }
                    self.normalize(target);
                    target
                };
                if self.nodes[node as usize].alive {
                    self.nodes[node as usize]
                        .last_use
                        .fetch_max(now, Ordering::Relaxed);
                }
                prev = Some(hashes[i + run - 1]);
                i += run;
                continue;
            }
            // New blocks: attach after `prev`, which must end its node.
            let attach = match prev {
                None => ROOT,
                Some(p) => match self.lookup.get(&p) {
                    None => return StoreOutcome::UnknownParent,
                    Some(&(pn, pk)) => {
                        if (pk as usize) + 1 < self.nodes[pn as usize].hashes.len() {
                            self.split(pn, pk as usize + 1);
                        }
                        pn
                    }
                },
            };
            let only_me = [Holder { worker, tiers: bit }];
            let a = &self.nodes[attach as usize];
            let node = if attach != ROOT && a.children.is_empty() && a.holders == only_me {
                attach
            } else {
                let id = self.alloc(Node::new(attach, Vec::new(), only_me.to_vec(), now));
                self.nodes[attach as usize].children.insert(hashes[i], id);
                id
            };
            while i < hashes.len() {
                let h = hashes[i];
                let off = self.nodes[node as usize].hashes.len() as u32;
                match self.lookup.entry(h) {
                    std::collections::hash_map::Entry::Occupied(_) => break,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((node, off));
                    }
                }
                self.nodes[node as usize].hashes.push(h);
                i += 1;
            }
            self.nodes[node as usize]
                .last_use
                .fetch_max(now, Ordering::Relaxed);
            prev = self.nodes[node as usize].hashes.last().copied();
        }
        StoreOutcome::Applied
    }

    /// `worker` dropped `hashes` from `tier` (from every tier when `None`).
    /// Returns how many blocks changed.
    pub fn remove(&mut self, worker: WorkerId, tier: Option<Tier>, hashes: &[u64]) -> usize {
        let mask = tier.map_or(TIER_MASK_ALL, Tier::bit);
        let mut changed = 0;
        let mut i = 0;
        while i < hashes.len() {
            let Some(&(n, k)) = self.lookup.get(&hashes[i]) else {
                i += 1;
                continue;
            };
            let k = k as usize;
            let fwd = self.run_len(n, k, &hashes[i..]);
            // Evictions usually list a chain deepest block first: take backward runs too
            // (removal is a set operation, so order within the event does not matter).
            let (k, run) = if fwd == 1 {
                let node_hashes = &self.nodes[n as usize].hashes;
                let mut back = 1;
                while i + back < hashes.len()
                    && back <= k
                    && node_hashes[k - back] == hashes[i + back]
                {
                    back += 1;
                }
                (k + 1 - back, back)
            } else {
                (k, fwd)
            };
            i += run;
            let held = self.nodes[n as usize]
                .holder(worker)
                .is_some_and(|h| h.tiers & mask != 0);
            if !held {
                continue;
            }
            let target = self.isolate(n, k, run);
            let holders = &mut self.nodes[target as usize].holders;
            if let Ok(j) = holders.binary_search_by_key(&worker, |h| h.worker) {
                holders[j].tiers &= !mask;
                if holders[j].tiers == 0 {
                    holders.remove(j);
                }
            }
            changed += run;
            let _ = self.cleanup_up(target);
        }
        changed
    }

    /// Drops every block `worker` holds in this tree. Returns the nodes it was removed from.
    pub fn remove_worker(&mut self, worker: WorkerId) -> usize {
        let mut affected = Vec::new();
        for (id, node) in self.nodes.iter_mut().enumerate().skip(1) {
            if !node.alive {
                continue;
            }
            if let Ok(j) = node.holders.binary_search_by_key(&worker, |h| h.worker) {
                node.holders.remove(j);
                affected.push(id as NodeId);
            }
        }
        for &n in &affected {
            // Freed ids are not reused until the next allocation, so `alive` is reliable.
            if self.nodes[n as usize].alive {
                let _ = self.cleanup_up(n);
            }
        }
        affected.len()
    }

    /// Every node, parents before children: what a router snapshot stores. Storing each
    /// node's chain for each holder and tier rebuilds an equal tree.
    pub fn dump(&self) -> Vec<DumpNode> {
        let mut out = Vec::with_capacity(self.live_nodes);
        let mut stack: Vec<NodeId> = self.nodes[ROOT as usize]
            .children
            .iter()
            .map(|(_, c)| c)
            .collect();
        while let Some(id) = stack.pop() {
            let node = &self.nodes[id as usize];
            let parent = match node.parent {
                ROOT => None,
                p => self.nodes[p as usize].hashes.last().copied(),
            };
            out.push(DumpNode {
                parent,
                hashes: node.hashes.clone(),
                holders: node.holders.iter().map(|h| (h.worker, h.tiers)).collect(),
            });
            stack.extend(node.children.iter().map(|(_, c)| c));
        }
        out
    }

    /// Per-worker leading overlap of the query chain, fastest tier per block.
    pub fn find_matches(&self, hashes: &[u64], now: u64) -> Vec<Overlap> {
        let mut active: Vec<Overlap> = Vec::new();
        let mut done: Vec<Overlap> = Vec::new();
        let mut pos = 0;
        let mut cur = ROOT;
        let mut first = true;
        while pos < hashes.len() {
            let Some(next) = self.nodes[cur as usize].child(hashes[pos]) else {
                break;
            };
            let node = &self.nodes[next as usize];
            node.last_use.fetch_max(now, Ordering::Relaxed);
            let m = node
                .hashes
                .iter()
                .zip(&hashes[pos..])
                .take_while(|(a, b)| a == b)
                .count() as u32;
            if first {
                first = false;
                active = node
                    .holders
                    .iter()
                    .map(|h| {
                        let mut by_tier = PerTier::default();
                        by_tier[Tier::ALL[h.tiers.trailing_zeros() as usize]] = m;
                        Overlap {
                            worker: h.worker,
                            blocks: m,
                            by_tier,
                        }
                    })
                    .collect();
            } else {
                // Both sorted by worker: merge walk.
                let mut hi = 0;
                active.retain_mut(|o| {
                    while hi < node.holders.len() && node.holders[hi].worker < o.worker {
                        hi += 1;
                    }
                    if hi < node.holders.len() && node.holders[hi].worker == o.worker {
                        o.blocks += m;
                        o.by_tier[Tier::ALL[node.holders[hi].tiers.trailing_zeros() as usize]] += m;
                        true
                    } else {
                        done.push(o.clone());
                        false
                    }
                });
            }
            if active.is_empty() || (m as usize) < node.hashes.len() {
                break;
            }
            pos += m as usize;
            cur = next;
        }
        done.extend(active);
        done.retain(|o| o.blocks > 0);
        done
    }

    /// Evicts least recently used leaves until at most `target_nodes` nodes holding at
    /// most `target_blocks` blocks remain.
    /// Returns (nodes evicted, blocks evicted). One scan finds the leaves; a node that an
    /// eviction leaves childless joins them in the heap (rescanning every node for each
    /// eviction made a tree that is one long path cost nodes x evictions, under the
    /// namespace's write lock).
    pub fn evict_to(&mut self, target_nodes: usize, target_blocks: usize) -> (usize, usize) {
        use std::cmp::Reverse;
        let (mut nodes, mut blocks) = (0, 0);
        let leaf = |t: &Tree, i: NodeId| {
            i != ROOT && t.nodes[i as usize].alive && t.nodes[i as usize].children.is_empty()
        };
        let used = |t: &Tree, i: NodeId| t.nodes[i as usize].last_use.load(Ordering::Relaxed);
        let mut heap: std::collections::BinaryHeap<Reverse<(u64, NodeId)>> = (1..self.nodes.len())
            .map(|i| i as NodeId)
            .filter(|&i| leaf(self, i))
            .map(|i| Reverse((used(self, i), i)))
            .collect();
        while self.live_nodes > target_nodes || self.block_count() > target_blocks {
            let Some(Reverse((_, n))) = heap.pop() else {
                break;
            };
            // Merged away or given a child since it was pushed.
            if !leaf(self, n) {
                continue;
            }
            blocks += self.nodes[n as usize].hashes.len();
            let before = self.live_nodes;
            let p = self.delete_leaf(n);
            let rest = if p != ROOT && self.nodes[p as usize].alive {
                self.cleanup_up(p)
            } else {
                p
            };
            if leaf(self, rest) {
                heap.push(Reverse((used(self, rest), rest)));
            }
            nodes += before - self.live_nodes;
        }
        (nodes, blocks)
    }

    /// Checks every structural invariant; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut live = 0;
        for (id, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            let id = id as NodeId;
            for (first, c) in node.children.iter() {
                let child = &self.nodes[c as usize];
                if !child.alive || child.parent != id || child.hashes.first() != Some(&first) {
                    return Err(format!("bad child link {id} -> {c}"));
                }
            }
            if id == ROOT {
                continue;
            }
            live += 1;
            if node.hashes.is_empty() {
                return Err(format!("node {id} has no hashes"));
            }
            if node.holders.is_empty() && node.children.is_empty() {
                return Err(format!("node {id} is an empty leaf"));
            }
            if let Some(only) = node.children.only()
                && self.nodes[only as usize].holders == node.holders
            {
                return Err(format!("node {id} should have merged with its child"));
            }
            if !node.holders.windows(2).all(|w| w[0].worker < w[1].worker) {
                return Err(format!("node {id} holders unsorted"));
            }
            for (i, h) in node.hashes.iter().enumerate() {
                if self.lookup.get(h) != Some(&(id, i as u32)) {
                    return Err(format!("lookup entry for {h:#x} wrong"));
                }
            }
        }
        if live != self.live_nodes {
            return Err(format!("live count {} != {live}", self.live_nodes));
        }
        let in_nodes: usize = self
            .nodes
            .iter()
            .skip(1)
            .filter(|n| n.alive)
            .map(|n| n.hashes.len())
            .sum();
        if in_nodes != self.lookup.len() {
            return Err(format!(
                "lookup has {} entries, nodes {in_nodes}",
                self.lookup.len()
            ));
        }
        Ok(())
    }
}

/// Index limits.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Node cap per namespace; beyond it the coldest leaves are evicted (to 90 % of it,
    /// so the O(nodes) scan is amortised over many inserts).
    pub max_nodes_per_namespace: usize,
    /// Block cap per namespace, evicted the same way (a node holds a run of any length:
    /// one event of millions of blocks is one node).
    pub max_blocks_per_namespace: usize,
    /// Namespaces at once; a store into another is refused (counted). A namespace whose
    /// last block is removed is forgotten.
    pub max_namespaces: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            max_nodes_per_namespace: 1 << 20,
            max_blocks_per_namespace: 1 << 22,
            max_namespaces: 4096,
        }
    }
}

/// Counters exported in `/metrics`.
#[derive(Debug, Default)]
pub struct IndexStats {
    pub evicted_nodes: AtomicU64,
    pub evicted_blocks: AtomicU64,
    pub unknown_parent_events: AtomicU64,
    /// Stores refused: a new namespace past `max_namespaces`.
    pub namespace_limit_events: AtomicU64,
}

/// The concurrent index: a tree per namespace.
#[derive(Debug, Default)]
pub struct Index {
    config: IndexConfig,
    trees: RwLock<HashMap<String, Arc<RwLock<Tree>>>>,
    pub stats: IndexStats,
    clock: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-applied event visible to the
    // process beyond one tree; keep serving rather than cascading the panic.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Index {
    pub fn new(config: IndexConfig) -> Self {
        Index {
            config,
            ..Default::default()
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn tree(&self, namespace: &str) -> Option<Arc<RwLock<Tree>>> {
        read(&self.trees).get(namespace).cloned()
    }

    /// The namespace's tree, made if it has none and `max_namespaces` leaves room.
    fn tree_or_create(&self, namespace: &str) -> Option<Arc<RwLock<Tree>>> {
        if let Some(t) = self.tree(namespace) {
            return Some(t);
        }
        let mut trees = write(&self.trees);
        if !trees.contains_key(namespace) && trees.len() >= self.config.max_namespaces.max(1) {
            return None;
        }
        Some(trees.entry(namespace.to_owned()).or_default().clone())
    }

    /// Forgets `tree` (the namespace's current one) if it holds nothing.
    fn retire_if_empty(&self, namespace: &str, tree: &Arc<RwLock<Tree>>) {
        if read(tree).node_count() != 0 {
            return;
        }
        // Map, then tree: the order every path that holds both takes. The tree only if
        // it is free now: waiting for its writer while holding the map would stall every
        // namespace's lookups (a writer busy with it is about to use it anyway).
        let mut trees = write(&self.trees);
        let Ok(mut t) = tree.try_write() else {
            return;
        };
        if t.node_count() == 0
            && !t.retired
            && trees
                .get(namespace)
                .is_some_and(|cur| Arc::ptr_eq(cur, tree))
        {
            t.retired = true;
            trees.remove(namespace);
        }
    }

    pub fn store(
        &self,
        namespace: &str,
        worker: WorkerId,
        tier: Tier,
        parent: Option<u64>,
        hashes: &[u64],
    ) -> StoreOutcome {
        let now = self.tick();
        let Some(tree) = self.tree_or_create(namespace) else {
            self.stats
                .namespace_limit_events
                .fetch_add(1, Ordering::Relaxed);
            return StoreOutcome::NamespaceLimit;
        };
        let mut t = write(&tree);
        if t.retired {
            // Emptied and forgotten since we looked it up: the namespace's next tree.
            drop(t);
            return self.store(namespace, worker, tier, parent, hashes);
        }
        let out = t.store(worker, tier, parent, hashes, now);
        if out == StoreOutcome::UnknownParent {
            self.stats
                .unknown_parent_events
                .fetch_add(1, Ordering::Relaxed);
        }
        let cap = self.config.max_nodes_per_namespace.max(1);
        let block_cap = self.config.max_blocks_per_namespace.max(1);
        if t.node_count() > cap || t.block_count() > block_cap {
            let (n, b) = t.evict_to(cap - cap / 10, block_cap - block_cap / 10);
            self.stats
                .evicted_nodes
                .fetch_add(n as u64, Ordering::Relaxed);
            self.stats
                .evicted_blocks
                .fetch_add(b as u64, Ordering::Relaxed);
        }
        // A store that left nothing (an unknown parent, or evicted whole) must not keep
        // the namespace's place.
        let empty = t.node_count() == 0;
        drop(t);
        if empty {
            self.retire_if_empty(namespace, &tree);
        }
        out
    }

    pub fn remove(
        &self,
        namespace: &str,
        worker: WorkerId,
        tier: Option<Tier>,
        hashes: &[u64],
    ) -> usize {
        let Some(tree) = self.tree(namespace) else {
            return 0;
        };
        let n = write(&tree).remove(worker, tier, hashes);
        self.retire_if_empty(namespace, &tree);
        n
    }

    /// Drops `worker`'s blocks in one namespace, or everywhere with `None`.
    pub fn remove_worker(&self, worker: WorkerId, namespace: Option<&str>) {
        let trees: Vec<(String, Arc<RwLock<Tree>>)> = match namespace {
            Some(ns) => self
                .tree(ns)
                .map(|t| (ns.to_owned(), t))
                .into_iter()
                .collect(),
            None => read(&self.trees)
                .iter()
                .map(|(ns, t)| (ns.clone(), t.clone()))
                .collect(),
        };
        for (ns, tree) in trees {
            write(&tree).remove_worker(worker);
            self.retire_if_empty(&ns, &tree);
        }
    }

    pub fn find_matches(&self, namespace: &str, hashes: &[u64]) -> Vec<Overlap> {
        let now = self.clock.load(Ordering::Relaxed);
        match self.tree(namespace) {
            Some(tree) => read(&tree).find_matches(hashes, now),
            None => Vec::new(),
        }
    }

    /// Total nodes over all namespaces (0 when empty).
    pub fn node_count(&self) -> usize {
        read(&self.trees)
            .values()
            .map(|t| read(t).node_count())
            .sum()
    }

    pub fn block_count(&self) -> usize {
        read(&self.trees)
            .values()
            .map(|t| read(t).block_count())
            .sum()
    }

    pub fn namespace_count(&self) -> usize {
        read(&self.trees).len()
    }

    /// Every namespace's [`Tree::dump`].
    pub fn dump(&self) -> Vec<(String, Vec<DumpNode>)> {
        let trees: Vec<(String, Arc<RwLock<Tree>>)> = read(&self.trees)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        trees
            .into_iter()
            .map(|(ns, t)| (ns, read(&t).dump()))
            .collect()
    }

    /// Stores what [`Index::dump`] returned.
    pub fn restore(&self, dump: &[(String, Vec<DumpNode>)]) {
        for (ns, nodes) in dump {
            for n in nodes {
                for &(worker, tiers) in &n.holders {
                    for tier in Tier::ALL {
                        if tiers & tier.bit() != 0 {
                            self.store(ns, worker, tier, n.parent, &n.hashes);
                        }
                    }
                }
            }
        }
    }

    /// Runs `f` on one namespace's tree under its read lock (tests, introspection).
    pub fn with_tree<R>(&self, namespace: &str, f: impl FnOnce(&Tree) -> R) -> Option<R> {
        self.tree(namespace).map(|t| f(&read(&t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace that is one long chain of single-block nodes (tiers alternating, so
    /// none merge) has one leaf at a time: eviction used to rescan every node for each
    /// node it evicted (seconds here, under the namespace's write lock). With the heap it
    /// is linear, and the tree stays consistent.
    #[test]
    fn evicting_a_long_single_path_is_linear() {
        let n = 40_000u64;
        let mut t = Tree::default();
        let mut parent = None;
        for h in 1..=n {
            let tier = if h % 2 == 0 { Tier::Hbm } else { Tier::Host };
            assert_eq!(t.store(1, tier, parent, &[h], h), StoreOutcome::Applied);
            parent = Some(h);
        }
        assert_eq!(t.node_count(), n as usize);
        let t0 = std::time::Instant::now();
        let (nodes, blocks) = t.evict_to(n as usize / 2, usize::MAX);
        let took = t0.elapsed();
        assert_eq!((nodes, blocks), (n as usize / 2, n as usize / 2));
        assert_eq!(t.node_count(), n as usize / 2);
        t.check_invariants().unwrap();
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    }

    fn chain(start: u64, n: u64) -> Vec<u64> {
        (start..start + n).collect()
    }

    #[test]
    fn dump_and_restore_rebuild_equal_answers() {
        let a = Index::new(IndexConfig::default());
        let base = chain(100, 12);
        a.store("x", 1, Tier::Hbm, None, &base);
        a.store("x", 2, Tier::Host, None, &base[..5]);
        a.store("x", 2, Tier::Nvme, None, &base[..8]);
        a.store("x", 3, Tier::Host, Some(base[3]), &chain(500, 4));
        a.remove("x", 1, Some(Tier::Hbm), &base[9..]);
        a.store("y", 1, Tier::Nvme, None, &chain(900, 3));
        let b = Index::new(IndexConfig::default());
        b.restore(&a.dump());
        let mut queries = vec![base.clone(), chain(900, 3)];
        queries.push(base[..4].iter().copied().chain(500..504).collect());
        for ns in ["x", "y"] {
            for q in &queries {
                let key = |i: &Index| {
                    let mut v: Vec<(u64, u32, PerTier<u32>)> = i
                        .find_matches(ns, q)
                        .iter()
                        .map(|o| (o.worker, o.blocks, o.by_tier))
                        .collect();
                    v.sort_unstable();
                    v
                };
                assert_eq!(key(&a), key(&b), "{ns} {q:?}");
            }
        }
        assert_eq!(a.block_count(), b.block_count());
        assert_eq!(a.node_count(), b.node_count());
    }

    #[test]
    fn store_lookup_split_merge() {
        let mut t = Tree::new();
        let a = chain(100, 10);
        t.store(1, Tier::Hbm, None, &a, 1);
        assert_eq!(t.node_count(), 1);
        // Worker 2 holds the first 4 blocks on host.
        t.store(2, Tier::Host, None, &a[..4], 2);
        assert_eq!(t.node_count(), 2);
        t.check_invariants().unwrap();
        let m = t.find_matches(&a, 3);
        let w1 = m.iter().find(|o| o.worker == 1).unwrap();
        let w2 = m.iter().find(|o| o.worker == 2).unwrap();
        assert_eq!((w1.blocks, w1.by_tier), (10, PerTier([10, 0, 0])));
        assert_eq!((w2.blocks, w2.by_tier), (4, PerTier([0, 4, 0])));
        // Branch off block 5 for worker 1.
        t.store(1, Tier::Hbm, Some(a[5]), &chain(500, 3), 4);
        t.check_invariants().unwrap();
        let mut q = a[..6].to_vec();
        q.extend(chain(500, 3));
        let m = t.find_matches(&q, 5);
        assert_eq!(m.iter().find(|o| o.worker == 1).unwrap().blocks, 9);
        // Worker 2 drops its blocks: the tree merges back.
        assert_eq!(t.remove(2, None, &a[..4]), 4);
        t.check_invariants().unwrap();
        assert_eq!(t.node_count(), 3);
        t.remove_worker(1);
        t.check_invariants().unwrap();
        assert_eq!(t.node_count(), 0);
        assert_eq!(t.block_count(), 0);
    }

    #[test]
    fn wide_fan_out_uses_a_map_and_returns_to_empty() {
        let mut t = Tree::new();
        for i in 0..100u64 {
            t.store(i % 3, Tier::Hbm, None, &chain(i * 1000, 3), i);
        }
        t.store(9, Tier::Hbm, None, &[7_000_000], 200);
        for i in 0..40u64 {
            t.store(
                9,
                Tier::Hbm,
                Some(7_000_000),
                &chain(8_000_000 + i * 10, 2),
                201,
            );
        }
        t.check_invariants().unwrap();
        for i in 0..100u64 {
            let m = t.find_matches(&chain(i * 1000, 3), 300);
            assert_eq!(m.len(), 1);
            assert_eq!((m[0].worker, m[0].blocks), (i % 3, 3));
        }
        let mut q = vec![7_000_000];
        q.extend(chain(8_000_000 + 390, 2));
        assert_eq!(t.find_matches(&q, 300)[0].blocks, 3);
        for i in (0..100u64).rev() {
            t.remove(i % 3, None, &chain(i * 1000, 3));
        }
        t.remove_worker(9);
        t.check_invariants().unwrap();
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn lookups_run_while_a_writer_applies_events() {
        let idx = Arc::new(Index::new(IndexConfig::default()));
        let stable = chain(1, 20);
        idx.store("ns", 0, Tier::Hbm, None, &stable);
        let writer = {
            let idx = idx.clone();
            let anchor = stable[9];
            std::thread::spawn(move || {
                for round in 0..200u64 {
                    let c = chain(10_000 + round * 100, 30);
                    idx.store("ns", 1 + round % 4, Tier::Host, Some(anchor), &c);
                    idx.remove("ns", 1 + round % 4, None, &c[15..]);
                }
            })
        };
        let mut lookups = 0;
        while !writer.is_finished() || lookups < 1_000 {
            // The stable prefix is always fully visible, whatever the writer is doing.
            let m = idx.find_matches("ns", &stable);
            assert!(m.iter().any(|o| o.worker == 0 && o.blocks == 20));
            lookups += 1;
        }
        writer.join().unwrap();
        idx.with_tree("ns", |t| t.check_invariants().unwrap());
        // 200 chains of 15 remaining blocks, all under stable[9].
        assert_eq!(idx.block_count(), 20 + 200 * 15);
    }

    #[test]
    fn tiers_are_a_set() {
        let mut t = Tree::new();
        let a = chain(1, 3);
        t.store(7, Tier::Nvme, None, &a, 1);
        t.store(7, Tier::Hbm, None, &a, 2);
        assert_eq!(t.find_matches(&a, 3)[0].by_tier, PerTier([3, 0, 0]));
        t.remove(7, Some(Tier::Hbm), &a);
        assert_eq!(t.find_matches(&a, 4)[0].by_tier, PerTier([0, 0, 3]));
        assert!(t.holds(7, a[0], Some(Tier::Nvme)));
        t.remove(7, Some(Tier::Nvme), &a);
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn unknown_parent_is_reported() {
        let mut t = Tree::new();
        assert_eq!(
            t.store(1, Tier::Hbm, Some(42), &[1, 2], 1),
            StoreOutcome::UnknownParent
        );
        assert_eq!(t.node_count(), 0);
    }

    /// A namespace's blocks are capped, not only its nodes: one event of many blocks is
    /// one node. Namespaces are capped too, and one whose last block goes is forgotten,
    /// which frees its place.
    #[test]
    fn blocks_and_namespaces_are_capped_and_empty_namespaces_forgotten() {
        let idx = Index::new(IndexConfig {
            max_blocks_per_namespace: 1_000,
            max_namespaces: 2,
            ..IndexConfig::default()
        });
        for i in 0..10u64 {
            idx.store("a", 1, Tier::Hbm, None, &chain(i * 10_000, 500));
        }
        assert!(idx.block_count() <= 1_000, "{}", idx.block_count());
        assert_eq!(
            idx.store("b", 1, Tier::Hbm, None, &[1]),
            StoreOutcome::Applied
        );
        assert_eq!(
            idx.store("c", 1, Tier::Hbm, None, &[1]),
            StoreOutcome::NamespaceLimit
        );
        assert_eq!(idx.stats.namespace_limit_events.load(Ordering::Relaxed), 1);
        assert_eq!(idx.remove("b", 1, None, &[1]), 1);
        assert_eq!(
            idx.namespace_count(),
            1,
            "the emptied namespace is forgotten"
        );
        assert_eq!(
            idx.store("c", 1, Tier::Hbm, None, &[1]),
            StoreOutcome::Applied
        );
        idx.remove_worker(1, None);
        assert_eq!(idx.namespace_count(), 0);
        assert_eq!(
            idx.store("b", 1, Tier::Hbm, None, &[1]),
            StoreOutcome::Applied
        );
    }

    #[test]
    fn cap_evicts_coldest() {
        let idx = Index::new(IndexConfig {
            max_nodes_per_namespace: 10,
            ..IndexConfig::default()
        });
        for i in 0..20u64 {
            idx.store("ns", i, Tier::Hbm, None, &chain(i * 1000, 4));
        }
        assert!(idx.node_count() <= 10);
        assert!(idx.stats.evicted_nodes.load(Ordering::Relaxed) >= 10);
        // The most recent chain survives.
        assert_eq!(idx.find_matches("ns", &chain(19_000, 4))[0].blocks, 4);
        assert!(idx.find_matches("ns", &chain(0, 4)).is_empty());
        idx.with_tree("ns", |t| t.check_invariants().unwrap());
    }
}

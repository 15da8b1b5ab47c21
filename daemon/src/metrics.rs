//! What the data plane records (relaxed atomics, one uncontended mutex for the
//! per-namespace lookup table): a sink the data plane owns (`DataPlane::metrics`) and
//! writes to, a few atomic adds per operation. It sits below the data plane and the
//! control plane: `control::metrics` only reads it to render `GET /metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvplane_ffi::Opcode;

use crate::block::{LoadReport, SaveReport, Tier};
use crate::tier::PerTier;

/// Upper bounds of the latency buckets, in microseconds (Prometheus `le`, shown in seconds).
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000,
];

/// A fixed-bucket latency histogram: lock-free to record, cumulative when rendered.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (non-cumulative) counts; the last entry is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            elapsed.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Cumulative bucket counts (one per bound, then +Inf), the sum in seconds, the count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.count.load(Ordering::Relaxed),
        )
    }

    /// The bucket bound (in microseconds) below which `q` of the samples fall; `None`
    /// when empty, `u64::MAX` when the quantile is in the +Inf bucket.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        let (cumulative, _, count) = self.snapshot();
        if count == 0 {
            return None;
        }
        let target = ((count as f64) * q).ceil().max(1.0) as u64;
        let i = cumulative.iter().position(|&c| c >= target)?;
        Some(LATENCY_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX))
    }
}

/// The links bytes move over, as `link` label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    EngineToHost = 0,
    HostToEngine = 1,
    HostToNvme = 2,
    NvmeToHost = 3,
    /// Loads served from the G1 arena (host memory standing in for HBM on the host backend).
    G1ToEngine = 4,
    /// Saves kept on the GPU (`KVP_SQE_F_KEEP_ON_GPU`): the engine's pages into G1.
    EngineToG1 = 5,
    /// G1 blocks with no other copy, copied down to the host tier to make room in G1.
    G1ToHost = 6,
    /// Blocks a load read from NVMe straight into G1 (`tiers.nvme.direct_to_g1`).
    NvmeToG1 = 7,
    /// G1 blocks with no other copy written straight from G1 to NVMe to make room in G1
    /// when the host tier had none for them (`tiers.nvme.direct_to_g1`).
    G1ToNvme = 8,
}

impl Link {
    pub const ALL: [Link; 9] = [
        Link::EngineToHost,
        Link::HostToEngine,
        Link::HostToNvme,
        Link::NvmeToHost,
        Link::G1ToEngine,
        Link::EngineToG1,
        Link::G1ToHost,
        Link::NvmeToG1,
        Link::G1ToNvme,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Link::EngineToHost => "engine_to_host",
            Link::HostToEngine => "host_to_engine",
            Link::HostToNvme => "host_to_nvme",
            Link::NvmeToHost => "nvme_to_host",
            Link::G1ToEngine => "g1_to_engine",
            Link::EngineToG1 => "engine_to_g1",
            Link::G1ToHost => "g1_to_host",
            Link::NvmeToG1 => "nvme_to_g1",
            Link::G1ToNvme => "g1_to_nvme",
        }
    }
}

/// Lookup outcomes of one namespace, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamespaceLookups {
    /// Leading blocks found, by the fastest tier holding each (hbm, host, nvme).
    pub hits: PerTier<u64>,
    /// Blocks asked for past the found prefix.
    pub misses: u64,
}

/// What the data plane records per operation. Lives in `DataPlane::counters`.
#[derive(Debug, Default)]
pub struct DataPlaneMetrics {
    /// Per opcode, in `Opcode::ALL` order.
    op_latency: [LatencyHistogram; Opcode::ALL.len()],
    /// Operations being executed right now (the data plane's queue depth).
    pub in_flight: AtomicU64,
    link_bytes: [AtomicU64; Link::ALL.len()],
    lookups: Mutex<BTreeMap<u32, NamespaceLookups>>,
}

fn opcode_index(op: Opcode) -> usize {
    Opcode::ALL.iter().position(|&o| o == op).unwrap_or(0)
}

pub(crate) fn opcode_name(op: Opcode) -> &'static str {
    match op {
        Opcode::Nop => "nop",
        Opcode::Stats => "stats",
        Opcode::AttachLayout => "attach_layout",
        Opcode::Lookup => "lookup",
        Opcode::Save => "save",
        Opcode::Load => "load",
        Opcode::Pin => "pin",
        Opcode::Unpin => "unpin",
        Opcode::Drop => "drop",
        Opcode::ClearNamespace => "clear_namespace",
        Opcode::RegisterEvents => "register_events",
    }
}

/// Decrements the in-flight gauge however the operation ends.
pub struct InFlight<'a>(&'a DataPlaneMetrics);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DataPlaneMetrics {
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Keeps an operation counted in flight past its `begin` guard: its copy is on the
    /// device. Paired with [`Self::release_in_flight`] when it completes.
    pub fn hold_in_flight(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn release_in_flight(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn record_op(&self, op: Opcode, elapsed: Duration) {
        self.op_latency[opcode_index(op)].record(elapsed);
    }

    pub fn op_latency(&self, op: Opcode) -> &LatencyHistogram {
        &self.op_latency[opcode_index(op)]
    }

    pub fn add_link_bytes(&self, link: Link, bytes: u64) {
        if bytes > 0 {
            self.link_bytes[link as usize].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn link_bytes(&self, link: Link) -> u64 {
        self.link_bytes[link as usize].load(Ordering::Relaxed)
    }

    /// A lookup of `asked` blocks in namespace `ns` found the leading `tiers[..hits]`.
    pub fn record_lookup(&self, ns: u32, tiers: &[Option<Tier>], hits: usize, asked: usize) {
        let mut map = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(ns).or_default();
        for t in tiers[..hits.min(tiers.len())].iter().flatten() {
            entry.hits[*t] += 1;
        }
        entry.misses += asked.saturating_sub(hits) as u64;
    }

    pub fn lookups(&self) -> BTreeMap<u32, NamespaceLookups> {
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bytes a save moved: engine -> host for stored blocks, then what making room
    /// moved ([`Self::record_room`]).
    pub fn record_save(&self, r: &SaveReport, block_bytes: usize) {
        self.add_link_bytes(Link::EngineToHost, r.bytes);
        self.add_link_bytes(Link::EngineToG1, (r.hbm_stored * block_bytes) as u64);
        self.record_room(r, block_bytes);
    }

    /// Bytes moved between tiers by an operation (a save, a load making room for what it
    /// stages): host -> NVMe for blocks written through or demoted, G1 -> host for G1
    /// blocks copied down, G1 -> NVMe for those written straight from G1.
    pub fn record_room(&self, r: &SaveReport, block_bytes: usize) {
        let b = block_bytes as u64;
        let from_g1 = r.g1_written_to_nvme as u64;
        self.add_link_bytes(Link::HostToNvme, (r.nvme_written as u64 - from_g1) * b);
        self.add_link_bytes(Link::G1ToNvme, from_g1 * b);
        self.add_link_bytes(Link::G1ToHost, r.g1_copied_down as u64 * b);
    }

    /// Bytes a load moved: NVMe -> host (or straight into G1) for staged blocks, then
    /// each block to the engine, and what making room for them moved.
    pub fn record_load(&self, r: &LoadReport, block_bytes: usize) {
        let b = block_bytes as u64;
        let count = |tier: Tier| r.tiers.iter().filter(|&&t| t == tier).count() as u64;
        let (g1, host, nvme) = (count(Tier::Hbm), count(Tier::Host), count(Tier::Nvme));
        let into_g1 = r.staged_to_g1 as u64;
        self.add_link_bytes(Link::NvmeToG1, into_g1 * b);
        self.add_link_bytes(Link::NvmeToHost, (nvme - into_g1) * b);
        self.add_link_bytes(Link::G1ToEngine, (g1 + into_g1) * b);
        self.add_link_bytes(Link::HostToEngine, (host + nvme - into_g1) * b);
        self.record_room(&r.room, block_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What making room moved is counted on its own links, for saves and for loads (a
    /// load staging NVMe blocks makes room too): host -> NVMe apart from the blocks
    /// written straight from G1.
    #[test]
    fn room_making_bytes_go_to_their_links_for_saves_and_loads() {
        let m = DataPlaneMetrics::default();
        let room = || SaveReport {
            nvme_written: 3,
            g1_written_to_nvme: 1,
            g1_copied_down: 2,
            ..SaveReport::default()
        };
        m.record_save(&room(), 10);
        let load = LoadReport {
            room: room(),
            ..LoadReport::default()
        };
        m.record_load(&load, 10);
        assert_eq!(m.link_bytes(Link::HostToNvme), 2 * 20);
        assert_eq!(m.link_bytes(Link::G1ToNvme), 2 * 10);
        assert_eq!(m.link_bytes(Link::G1ToHost), 2 * 20);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_bound_the_samples() {
        let h = LatencyHistogram::default();
        for us in [1, 7, 7, 30, 900, 3_000_000] {
            h.record(Duration::from_micros(us));
        }
        let (cum, sum_s, count) = h.snapshot();
        assert_eq!(count, 6);
        assert_eq!(cum.len(), LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(cum[0], 1); // <= 5 us
        assert_eq!(cum[1], 3); // <= 10 us
        assert_eq!(cum[3], 4); // <= 50 us
        assert_eq!(*cum.last().unwrap(), 6);
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        assert!((sum_s - 3.000_945).abs() < 1e-6, "{sum_s}");
        assert_eq!(h.quantile_bound_us(0.5), Some(10));
        assert_eq!(h.quantile_bound_us(1.0), Some(u64::MAX));
    }
}

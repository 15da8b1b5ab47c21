//! The engine-sim control channel: JSON lines on the engine's stdin (driver to engine) and
//! stdout (engine to driver). One message per line; the driver waits for `Ready` after
//! start, `Advanced` after each `Advance` and `Finished` after `Finish`, so at most one
//! batch of messages is in flight per engine and both sides' buffers stay bounded.

use serde::{Deserialize, Serialize};

/// Driver to engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A request arriving at `arrival_ms` (virtual time, after the speed factor).
    Request {
        id: u64,
        arrival_ms: f64,
        input_tokens: u64,
        output_tokens: u64,
        /// Mooncake trace block ids (512 tokens each); the engine derives page hashes.
        hash_ids: Vec<u64>,
    },
    /// Run passes until the engine's clock reaches `until_ms` (a pass that starts before
    /// it may end after it), then answer `Advanced`.
    Advance { until_ms: f64 },
    /// Run until every request is done, answer `Finished` and exit.
    Finish,
}

/// Per-request accounting, sent when it completes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub id: u64,
    pub arrival_ms: f64,
    pub first_token_ms: f64,
    pub done_ms: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens found in the engine's own pool.
    pub cached_engine: u64,
    /// Prompt tokens loaded from the daemon's host tier.
    pub cached_host: u64,
    /// Prompt tokens loaded from the daemon's NVMe tier (staged through host).
    pub cached_nvme: u64,
    /// Prompt tokens computed (prefill).
    pub computed: u64,
    pub preemptions: u32,
    /// Of `first_token_ms - arrival_ms`, the time passes were held up by transfers with
    /// the daemon (LOOKUP round trips, LOAD bytes over the link, NVMe staging, saves of
    /// evicted pages) while this request waited for its first token.
    #[serde(default)]
    pub transfer_ms: f64,
}

/// Engine-wide counters at the end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    pub worker: u64,
    pub passes: u64,
    pub busy_ms: f64,
    pub preemptions: u64,
    pub pool_evictions: u64,
    pub lookups: u64,
    pub lookup_hit_blocks: u64,
    pub loads: u64,
    pub loaded_blocks: u64,
    pub loaded_bytes: u64,
    pub load_transfer_us: u64,
    pub saves: u64,
    pub saved_blocks: u64,
    pub saved_bytes: u64,
    pub save_transfer_us: u64,
    /// Pages whose content after a LOAD differed from what their hash dictates.
    pub content_mismatches: u64,
    /// Ring operations that failed (status other than OK), by the engine's count.
    pub ring_errors: u64,
    /// Wall-clock microseconds spent in ring round trips.
    pub ring_wall_us: u64,
    /// Virtual-clock charges (declared model geometry over the link model), ms:
    /// LOOKUP round trips, LOAD bytes over the link, waiting for the link behind saves,
    /// NVMe -> host staging, eager saves (link occupied, no pass held up) and saves of
    /// evicted pages (the pass that needs the page waits).
    #[serde(default)]
    pub charged_lookup_ms: f64,
    #[serde(default)]
    pub charged_load_ms: f64,
    #[serde(default)]
    pub charged_link_wait_ms: f64,
    #[serde(default)]
    pub charged_nvme_ms: f64,
    #[serde(default)]
    pub charged_save_ms: f64,
    #[serde(default)]
    pub charged_evict_save_ms: f64,
    /// Declared bytes loaded and saved (pages x the declared page size).
    #[serde(default)]
    pub charged_load_bytes: u64,
    #[serde(default)]
    pub charged_save_bytes: u64,
    /// Sum over passes of the time they were held up by transfers.
    #[serde(default)]
    pub stall_ms: f64,
}

/// Engine to driver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Attached (or running without a daemon) and ready for commands.
    Ready {
        worker: u64,
        pages: u32,
        block_bytes: u64,
        daemon: bool,
    },
    /// Pages newly cached in the engine pool (a chain: each the parent of the next).
    Stored {
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    /// Pages evicted from the engine pool.
    Removed {
        hashes: Vec<u64>,
    },
    /// Pages the daemon now holds (host tier) after a SAVE, a chain.
    Offloaded {
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    /// A request's first token is out (its prompt is computed or loaded).
    FirstToken {
        id: u64,
    },
    Done(Done),
    /// Answer to `Advance`: the engine clock and its load.
    Advanced {
        now_ms: f64,
        running: u32,
        waiting: u32,
        active_pages: u32,
    },
    Finished(EngineStats),
    /// A fatal engine error; the engine exits after it.
    Error {
        message: String,
    },
}

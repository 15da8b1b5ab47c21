//! The simulated engine: scheduler (continuous batching with chunked prefill), prefix
//! caching over [`KvPool`], the daemon link over the shared-memory rings, and the virtual
//! clock driven by [`Command::Advance`].
//!
//! A pass (one forward step of the batch):
//! 1. every running sequence past its prefill decodes one token (a new page when it
//!    crosses a page boundary; when the pool is dry the most recently admitted sequence
//!    is preempted, LIFO, and recomputes later);
//! 2. sequences in prefill take the next chunk of their uncached prompt from the token
//!    budget (`max_batched_tokens`, 8192 as in vLLM and Dynamo's mocker);
//! 3. waiting sequences are admitted in FIFO order while budget, the running cap and pool
//!    pages (above a 1 % watermark) last. Admission matches the prompt's pages against the
//!    pool, then asks the daemon for the rest (LOOKUP) and LOADs the hit prefix into fresh
//!    pages, verifying every loaded page; at least one prompt token is always computed.
//!
//! The pass lasts `prefill_ms(tokens computed) + decode_ms(occupancy)` (decode only when
//! some sequence decodes) plus the transfer time the daemon reported for its LOADs. Pages
//! whose prompt tokens are all computed are written (deterministic content), registered in
//! the prefix cache and, with eager offload, SAVEd to the daemon. Pages evicted from the
//! pool are SAVEd before they are overwritten.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, PerTier, Pod, Status, Tier, kvp_block_op, kvp_cqe, kvp_kv_layout};
use kvplane_shm::{AttachOptions, QueuePair, Session, ShmError, client};
use serde::{Deserialize, Serialize};

use super::cost::{LinkClock, TransferCost};
use super::pages::{KvGeometry, page_hashes};
use super::pool::{Evicted, KvPool, PoolError};
use super::proto::{Command, Done, EngineStats, Event};
use super::timing::Timing;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("attaching to the daemon at {socket}")]
    Attach {
        socket: String,
        #[source]
        source: ShmError,
    },
    #[error("ring operation {op}")]
    Ring {
        op: &'static str,
        #[source]
        source: ShmError,
    },
    #[error("daemon answered {op} with {status} (detail {detail}){hint}")]
    Refused {
        op: &'static str,
        status: &'static str,
        detail: u32,
        hint: &'static str,
    },
    #[error("writing events to the driver")]
    Output(#[source] std::io::Error),
    #[error("request {id}: prompt of {pages} pages does not fit a pool of {pool} pages")]
    TooLong { id: u64, pages: u64, pool: u32 },
}

/// When pages are offered to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    /// As soon as their prefill completes (Dynamo KVBM's offload), and again on eviction.
    Eager,
    /// Only when evicted from the engine pool.
    Evict,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub worker: u64,
    pub geometry: KvGeometry,
    pub timing: Timing,
    pub max_batched_tokens: u64,
    pub max_running: usize,
    /// Fraction of the pool kept free when admitting.
    pub watermark: f64,
    pub offload: Offload,
    pub namespace: String,
    /// What the virtual clock charges for transfers with the daemon.
    pub cost: TransferCost,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            worker: 0,
            geometry: KvGeometry::default(),
            timing: Timing::default(),
            max_batched_tokens: 8192,
            max_running: 256,
            watermark: 0.01,
            offload: Offload::Eager,
            namespace: "replay".into(),
            cost: TransferCost::default(),
        }
    }
}

const RING_TIMEOUT: Duration = Duration::from_secs(30);

fn status_name(raw: i32) -> &'static str {
    Status::from_raw(raw).map_or("an unknown status", |s| s.name())
}

/// The engine's session with its daemon: one queue pair, synchronous calls.
pub struct DaemonLink {
    qp: QueuePair,
    _session: Session,
    next_user_data: u64,
    max_ops: usize,
    ops: Vec<kvp_block_op>,
    /// Bytes of one page as the daemon stores it (the real, small page).
    block_bytes: u64,
}

impl std::fmt::Debug for DaemonLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonLink")
            .field("session", &self._session)
            .finish()
    }
}

/// What a LOAD did.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub loaded: usize,
    /// Tier each loaded block came from (`Tier::Host` or `Tier::Nvme`).
    pub tiers: Vec<u8>,
    pub bytes: u64,
    pub transfer_us: u64,
}

impl DaemonLink {
    /// Attaches with the pool as the session's KV buffer and binds its layout.
    pub fn attach(socket: &Path, namespace: &str, pool: &KvPool) -> Result<Self, EngineError> {
        let mut o = AttachOptions::new(socket);
        o.namespaces = vec![namespace.to_owned()];
        o.arena_bytes = 1 << 20;
        o.host_kv_buffer(pool.share_fd()?, pool.geometry().pool_bytes());
        let mut session = Session::attach(o).map_err(|source| EngineError::Attach {
            socket: socket.display().to_string(),
            source,
        })?;
        let qp = session
            .take_queue_pairs()
            .map_err(|source| EngineError::Ring {
                op: "take queue pairs",
                source,
            })?
            .remove(0);
        let max_ops = (qp.arena_bytes() as usize / std::mem::size_of::<kvp_block_op>())
            .min(kvplane_ffi::MAX_BLOCKS_PER_OP as usize);
        let mut link = DaemonLink {
            qp,
            _session: session,
            next_user_data: 1,
            max_ops,
            ops: Vec::new(),
            block_bytes: pool.geometry().block_bytes().max(1),
        };
        let layout = pool.geometry().layout();
        link.qp
            .write_arena(0, kvplane_ffi::as_bytes(&layout))
            .map_err(|source| EngineError::Ring {
                op: "write layout",
                source,
            })?;
        let mut s = client::sqe(Opcode::AttachLayout, 0);
        s.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
        s.count = 1;
        let c = link.call("ATTACH_LAYOUT", s, &mut 0)?;
        if c.status != Status::Ok.raw() {
            return Err(EngineError::Refused {
                op: "ATTACH_LAYOUT",
                status: status_name(c.status),
                detail: c.detail,
                hint: if c.status == Status::BadArg.raw() {
                    ": is the daemon's blocks.block_bytes the page size?"
                } else if c.status == Status::Unsupported.raw() {
                    ": this daemon build does not serve block operations yet"
                } else {
                    ""
                },
            });
        }
        Ok(link)
    }

    fn call(
        &mut self,
        op: &'static str,
        mut sqe: kvplane_ffi::kvp_sqe,
        wall_us: &mut u64,
    ) -> Result<kvp_cqe, EngineError> {
        sqe.user_data = self.next_user_data;
        self.next_user_data += 1;
        let t0 = Instant::now();
        let c = self
            .qp
            .call(sqe, RING_TIMEOUT)
            .map_err(|source| EngineError::Ring { op, source })?;
        *wall_us += t0.elapsed().as_micros() as u64;
        Ok(c)
    }

    /// Runs one block operation over `items` (at most `max_ops`), returning the completion
    /// and the ops as the daemon left them (per-op tier and status).
    fn block_op(
        &mut self,
        op: &'static str,
        opcode: Opcode,
        flags: u16,
        items: &[kvp_block_op],
        wall_us: &mut u64,
    ) -> Result<kvp_cqe, EngineError> {
        debug_assert!(!items.is_empty() && items.len() <= self.max_ops);
        self.qp
            .write_block_ops(0, items)
            .map_err(|source| EngineError::Ring { op, source })?;
        let mut s = client::sqe(opcode, 0);
        s.flags = flags;
        s.count = items.len() as u32;
        s.arg_len = std::mem::size_of_val(items) as u32;
        let c = self.call(op, s, wall_us)?;
        self.ops.clear();
        self.ops.resize(items.len(), Pod::zeroed());
        self.qp
            .read_block_ops(0, &mut self.ops)
            .map_err(|source| EngineError::Ring { op, source })?;
        Ok(c)
    }

    fn fatal(op: &'static str, c: &kvp_cqe) -> EngineError {
        EngineError::Refused {
            op,
            status: status_name(c.status),
            detail: c.detail,
            hint: if c.status == Status::Unsupported.raw() {
                ": this daemon build does not serve block operations yet"
            } else {
                ""
            },
        }
    }

    /// Whether a completion is OK; a misconfiguration is an error, anything else (a full or
    /// busy daemon) is counted as a ring error and ends the batch.
    fn accepted(
        op: &'static str,
        c: &kvp_cqe,
        stats: &mut EngineStats,
    ) -> Result<bool, EngineError> {
        if c.status == Status::Ok.raw() {
            return Ok(true);
        }
        if Self::is_fatal(c.status) {
            return Err(Self::fatal(op, c));
        }
        stats.ring_errors += 1;
        Ok(false)
    }

    /// Errors that mean "misconfigured", as opposed to a full or busy daemon.
    fn is_fatal(status: i32) -> bool {
        [
            Status::Unsupported,
            Status::NoLayout,
            Status::BadArg,
            Status::BadRange,
            Status::BadFlags,
            Status::BadOpcode,
            Status::Namespace,
        ]
        .iter()
        .any(|s| s.raw() == status)
    }

    /// Leading blocks of the chain `hashes` (whose first block's parent is `parent`) the
    /// daemon holds.
    pub fn lookup(
        &mut self,
        hashes: &[u64],
        parent: u64,
        stats: &mut EngineStats,
    ) -> Result<usize, EngineError> {
        let mut found = 0;
        let mut prev = parent;
        for chunk in hashes.chunks(self.max_ops) {
            let items: Vec<kvp_block_op> = chunk
                .iter()
                .map(|&h| {
                    let o = kvp_block_op::new(h, prev, 0);
                    prev = h;
                    o
                })
                .collect();
            stats.lookups += 1;
            let c = self.block_op("LOOKUP", Opcode::Lookup, 0, &items, &mut stats.ring_wall_us)?;
            if !Self::accepted("LOOKUP", &c, stats)? {
                break;
            }
            let hit = (c.blocks as usize).min(chunk.len());
            found += hit;
            if hit < chunk.len() {
                break;
            }
        }
        stats.lookup_hit_blocks += found as u64;
        Ok(found)
    }

    /// Loads the leading present blocks of `items` (hash, parent, destination page).
    pub fn load(
        &mut self,
        items: &[(u64, u64, u32)],
        stats: &mut EngineStats,
    ) -> Result<LoadResult, EngineError> {
        let mut r = LoadResult::default();
        for chunk in items.chunks(self.max_ops) {
            let ops: Vec<kvp_block_op> = chunk
                .iter()
                .map(|&(h, p, page)| kvp_block_op::new(h, p, page))
                .collect();
            stats.loads += 1;
            let c = self.block_op(
                "LOAD",
                Opcode::Load,
                kvplane_ffi::SQE_F_PREFIX_ONLY,
                &ops,
                &mut stats.ring_wall_us,
            )?;
            if !Self::accepted("LOAD", &c, stats)? {
                break;
            }
            let n = (c.blocks as usize).min(chunk.len());
            r.loaded += n;
            r.bytes += c.bytes;
            r.transfer_us += u64::from(c.detail);
            r.tiers.extend(self.ops[..n].iter().map(|o| o.tier));
            if n < chunk.len() {
                break;
            }
        }
        stats.loaded_blocks += r.loaded as u64;
        stats.loaded_bytes += r.bytes;
        stats.load_transfer_us += r.transfer_us;
        Ok(r)
    }

    /// Saves `items` (hash, parent, source page); returns how many leading items the
    /// daemon now holds (stored or already present) and how many of them it copied (a
    /// block it already held moves no bytes).
    pub fn save(
        &mut self,
        items: &[(u64, u64, u32)],
        stats: &mut EngineStats,
    ) -> Result<(usize, u64), EngineError> {
        let mut saved = 0;
        let mut copied = 0;
        for chunk in items.chunks(self.max_ops) {
            let ops: Vec<kvp_block_op> = chunk
                .iter()
                .map(|&(h, p, page)| kvp_block_op::new(h, p, page))
                .collect();
            stats.saves += 1;
            let c = self.block_op("SAVE", Opcode::Save, 0, &ops, &mut stats.ring_wall_us)?;
            if !Self::accepted("SAVE", &c, stats)? {
                break;
            }
            let n = (c.blocks as usize).min(chunk.len());
            saved += n;
            copied += c.bytes / self.block_bytes;
            stats.saved_bytes += c.bytes;
            stats.save_transfer_us += u64::from(c.detail);
            if n < chunk.len() {
                break;
            }
        }
        stats.saved_blocks += saved as u64;
        Ok((saved, copied))
    }
}

/// A sequence (request) inside the engine.
#[derive(Debug)]
struct Seq {
    id: u64,
    arrival_ms: f64,
    input: u64,
    output: u64,
    hashes: Vec<u64>,
    /// Prompt pages (in order), then decode pages.
    pages: Vec<u32>,
    /// Leading prompt pages whose block is in the pool's prefix cache (or offered to it).
    registered: usize,
    /// Prompt tokens whose KV exists (cached + computed so far).
    prefilled: u64,
    generated: u64,
    cached: PerTier<u64>,
    first_token_ms: f64,
    preemptions: u32,
    /// Transfer stalls of the passes it waited through before its first token.
    transfer_ms: f64,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.prefilled >= self.input
    }
}

/// The engine: pool, scheduler, optional daemon link, virtual clock.
pub struct Engine<W: Write> {
    cfg: EngineConfig,
    pool: KvPool,
    link: Option<DaemonLink>,
    out: W,
    now_ms: f64,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pending_evicted: Vec<Evicted>,
    stats: EngineStats,
    /// The engine's link to its daemon on the virtual clock (saves and loads share it).
    link_clock: LinkClock,
    /// Real-time mode: the clock is wall time since this instant, passes are slept.
    epoch: Option<Instant>,
}

impl<W: Write> std::fmt::Debug for Engine<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("worker", &self.cfg.worker)
            .field("now_ms", &self.now_ms)
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl<W: Write> Engine<W> {
    /// A new engine; attaches to the daemon at `socket` when given.
    pub fn new(cfg: EngineConfig, socket: Option<&Path>, out: W) -> Result<Self, EngineError> {
        let pool = KvPool::new(cfg.geometry)?;
        let link = match socket {
            Some(s) => Some(DaemonLink::attach(s, &cfg.namespace, &pool)?),
            None => None,
        };
        let stats = EngineStats {
            worker: cfg.worker,
            ..EngineStats::default()
        };
        Ok(Engine {
            cfg,
            pool,
            link,
            out,
            now_ms: 0.0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending_evicted: Vec::new(),
            stats,
            link_clock: LinkClock::default(),
            epoch: None,
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn now_ms(&self) -> f64 {
        self.now_ms
    }

    fn emit(&mut self, ev: &Event) -> Result<(), EngineError> {
        serde_json::to_writer(&mut self.out, ev)
            .map_err(|e| EngineError::Output(std::io::Error::other(e)))?;
        self.out.write_all(b"\n").map_err(EngineError::Output)
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.out.flush().map_err(EngineError::Output)
    }

    /// Serves one command; returns false after `Finish`.
    pub fn handle(&mut self, cmd: Command) -> Result<bool, EngineError> {
        match cmd {
            Command::Request {
                id,
                arrival_ms,
                input_tokens,
                output_tokens,
                hash_ids,
            } => {
                // In real time a request arrives when it is received.
                let arrival_ms = self.wall_ms().unwrap_or(arrival_ms);
                let hashes = page_hashes(&hash_ids, input_tokens, self.cfg.geometry.page_tokens);
                let pt = u64::from(self.cfg.geometry.page_tokens);
                let pages = input_tokens.max(1).div_ceil(pt) + 1;
                if pages > u64::from(self.pool.num_pages()) {
                    return Err(EngineError::TooLong {
                        id,
                        pages,
                        pool: self.pool.num_pages(),
                    });
                }
                self.waiting.push_back(Seq {
                    id,
                    arrival_ms,
                    input: input_tokens.max(1),
                    output: output_tokens.max(1),
                    hashes,
                    pages: Vec::new(),
                    registered: 0,
                    prefilled: 0,
                    generated: 0,
                    cached: PerTier::default(),
                    first_token_ms: 0.0,
                    preemptions: 0,
                    transfer_ms: 0.0,
                });
                self.now_ms = self.now_ms.max(arrival_ms);
                Ok(true)
            }
            Command::Advance { until_ms } => {
                // In real time passes run on their own schedule; report the state now.
                while self.epoch.is_none() && self.now_ms < until_ms {
                    if !self.step()? {
                        self.now_ms = until_ms;
                    }
                }
                let ev = Event::Advanced {
                    now_ms: self.now_ms,
                    running: self.running.len() as u32,
                    waiting: self.waiting.len() as u32,
                    active_pages: self.pool.active_pages(),
                };
                self.emit(&ev)?;
                self.flush()?;
                Ok(true)
            }
            Command::Finish => {
                while self.step()? {}
                let ev = Event::Finished(self.stats.clone());
                self.emit(&ev)?;
                self.flush()?;
                Ok(false)
            }
        }
    }

    /// Wall-clock ms since the epoch in real-time mode.
    fn wall_ms(&self) -> Option<f64> {
        self.epoch.map(|e| e.elapsed().as_secs_f64() * 1000.0)
    }

    /// Announces readiness (after attach).
    pub fn ready(&mut self) -> Result<(), EngineError> {
        let ev = Event::Ready {
            worker: self.cfg.worker,
            pages: self.pool.num_pages(),
            block_bytes: self.cfg.geometry.block_bytes(),
            daemon: self.link.is_some(),
        };
        self.emit(&ev)?;
        self.flush()
    }

    /// A page for new content (evictions are queued for saving).
    fn alloc_page(&mut self) -> Option<u32> {
        let (page, ev) = self.pool.alloc()?;
        if let Some(ev) = ev {
            self.stats.pool_evictions += 1;
            self.pending_evicted.push(ev);
        }
        Some(page)
    }

    /// Saves queued evicted pages to the daemon and reports their removal; must run before
    /// any of those pages is overwritten, so the pass waits for the copy: `cursor` (the
    /// pass's transfer time line) moves past it on the link.
    fn flush_evicted(&mut self, cursor: &mut f64) -> Result<(), EngineError> {
        if self.pending_evicted.is_empty() {
            return Ok(());
        }
        let evicted = std::mem::take(&mut self.pending_evicted);
        if let Some(link) = self.link.as_mut() {
            let items: Vec<(u64, u64, u32)> =
                evicted.iter().map(|e| (e.hash, e.parent, e.page)).collect();
            let (saved, copied) = link.save(&items, &mut self.stats)?;
            if copied > 0 {
                let c = &self.cfg.cost;
                let ms = c.ms(copied, c.save_gbps);
                let before = *cursor;
                *cursor = self.link_clock.occupy(*cursor, ms);
                self.stats.charged_evict_save_ms += ms;
                self.stats.charged_link_wait_ms += *cursor - before - ms;
                self.stats.charged_save_bytes += copied * c.page_bytes;
            }
            for e in &evicted[..saved] {
                let ev = Event::Offloaded {
                    parent: (e.parent != 0).then_some(e.parent),
                    hashes: vec![e.hash],
                };
                self.emit(&ev)?;
            }
        }
        let ev = Event::Removed {
            hashes: evicted.iter().map(|e| e.hash).collect(),
        };
        self.emit(&ev)
    }

    fn release_pages(&mut self, pages: &[u32]) {
        // Deepest first: they become the older LRU entries and are evicted first.
        for &p in pages.iter().rev() {
            self.pool.release(p);
        }
    }

    fn preempt(&mut self, idx: usize) {
        let mut s = self.running.remove(idx);
        let pages = std::mem::take(&mut s.pages);
        self.release_pages(&pages);
        s.registered = 0;
        s.prefilled = 0;
        s.generated = 0;
        s.cached = PerTier::default();
        s.preemptions += 1;
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Admission of the waiting head; false when it does not fit now. Its LOOKUP, the
    /// saves of pages it evicts and its LOAD advance `cursor`, the pass's transfer time
    /// line (the pass starts computing when they are done).
    fn admit(&mut self, cursor: &mut f64) -> Result<bool, EngineError> {
        let Some(s) = self.waiting.front() else {
            return Ok(false);
        };
        let pt = u64::from(self.cfg.geometry.page_tokens);
        let n = s.hashes.len();
        // At least one prompt token is computed (the last page is recomputed when the
        // whole prompt is cached), so the first token has a forward pass to come from.
        let max_cached = (((s.input - 1) / pt) as usize).min(n);
        let local = self.pool.match_prefix(&s.hashes).min(max_cached);
        let prompt_pages = s.input.div_ceil(pt) as usize;
        let new_pages = (prompt_pages - local) as u32;
        let idle_hits = self.pool.idle_among(&s.hashes[..local]);
        let available = self.pool.available() - idle_hits;
        let watermark = (f64::from(self.pool.num_pages()) * self.cfg.watermark).ceil() as u32;
        let fits = if self.running.is_empty() {
            new_pages <= available
        } else {
            new_pages + watermark <= available
        };
        if !fits {
            return Ok(false);
        }
        let mut s = self.waiting.pop_front().expect("front exists");
        let mut remote = 0;
        if local < max_cached
            && let Some(link) = self.link.as_mut()
        {
            let parent = if local > 0 { s.hashes[local - 1] } else { 0 };
            let wall0 = self.stats.ring_wall_us;
            remote = link
                .lookup(&s.hashes[local..max_cached], parent, &mut self.stats)?
                .min(max_cached - local);
            if self.cfg.cost.charge_lookups {
                // The round trip as measured here (engine -> daemon -> engine).
                let ms = (self.stats.ring_wall_us - wall0) as f64 / 1000.0;
                *cursor += ms;
                self.stats.charged_lookup_ms += ms;
            }
        }
        for &h in &s.hashes[..local] {
            let page = self.pool.acquire_cached(h).expect("matched above");
            s.pages.push(page);
        }
        for _ in 0..new_pages {
            let page = self.alloc_page().expect("availability checked");
            s.pages.push(page);
        }
        self.flush_evicted(cursor)?;
        let mut loaded = 0;
        if remote > 0 {
            let mut items = Vec::with_capacity(remote);
            for j in local..local + remote {
                let page = s.pages[j];
                // A load that copies nothing must not pass verification by luck.
                self.pool.poison(page)?;
                items.push((s.hashes[j], if j > 0 { s.hashes[j - 1] } else { 0 }, page));
            }
            let link = self.link.as_mut().expect("remote hits need a link");
            let r = link.load(&items, &mut self.stats)?;
            // Charge the declared bytes: NVMe pages are staged to host first, then every
            // page crosses the link (after the saves already on it).
            let c = &self.cfg.cost;
            let nvme_pages = r
                .tiers
                .iter()
                .filter(|&&t| u32::from(t) == Tier::Nvme.raw())
                .count() as u64;
            let pages = r.tiers.len() as u64;
            if pages > 0 {
                let nvme_ms = c.ms(nvme_pages, c.nvme_read_gbps);
                let link_ms = c.ms(pages, c.load_gbps);
                *cursor += nvme_ms;
                let before = *cursor;
                *cursor = self.link_clock.occupy(*cursor, link_ms);
                self.stats.charged_nvme_ms += nvme_ms;
                self.stats.charged_load_ms += link_ms;
                self.stats.charged_link_wait_ms += *cursor - before - link_ms;
                self.stats.charged_load_bytes += pages * c.page_bytes;
            }
            for (k, &tier) in r.tiers.iter().enumerate() {
                let j = local + k;
                if !self.pool.verify(s.pages[j], s.hashes[j])? {
                    self.stats.content_mismatches += 1;
                    break;
                }
                let t = if u32::from(tier) == Tier::Nvme.raw() {
                    Tier::Nvme
                } else {
                    Tier::Host
                };
                s.cached[t] += pt;
                loaded += 1;
            }
        }
        s.cached[Tier::Hbm] = local as u64 * pt;
        s.prefilled = (local + loaded) as u64 * pt;
        s.registered = local;
        // Loaded pages join the prefix cache now (they hold verified content).
        self.register_range(&mut s, local + loaded, false)?;
        self.running.push(s);
        Ok(true)
    }

    /// Registers prompt pages `s.registered..upto` in the prefix cache, reports them, and
    /// (when `offload` and eager) saves them to the daemon.
    fn register_range(
        &mut self,
        s: &mut Seq,
        upto: usize,
        offload: bool,
    ) -> Result<(), EngineError> {
        let from = s.registered;
        if upto <= from {
            return Ok(());
        }
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for j in from..upto {
            let parent = if j > 0 { s.hashes[j - 1] } else { 0 };
            if self.pool.register(s.pages[j], s.hashes[j], parent) {
                match runs.last_mut() {
                    Some((_, end)) if *end == j => *end = j + 1,
                    _ => runs.push((j, j + 1)),
                }
            }
        }
        s.registered = upto;
        for &(a, b) in &runs {
            let ev = Event::Stored {
                parent: (a > 0).then(|| s.hashes[a - 1]),
                hashes: s.hashes[a..b].to_vec(),
            };
            self.emit(&ev)?;
        }
        if offload
            && self.cfg.offload == Offload::Eager
            && let Some(link) = self.link.as_mut()
        {
            let items: Vec<(u64, u64, u32)> = (from..upto)
                .map(|j| {
                    let parent = if j > 0 { s.hashes[j - 1] } else { 0 };
                    (s.hashes[j], parent, s.pages[j])
                })
                .collect();
            let (saved, copied) = link.save(&items, &mut self.stats)?;
            if copied > 0 {
                // Offload after the pass: the link is busy, no pass waits for it.
                let c = &self.cfg.cost;
                let ms = c.ms(copied, c.save_gbps);
                self.link_clock.occupy(self.now_ms, ms);
                self.stats.charged_save_ms += ms;
                self.stats.charged_save_bytes += copied * c.page_bytes;
            }
            if saved > 0 {
                let ev = Event::Offloaded {
                    parent: (from > 0).then(|| s.hashes[from - 1]),
                    hashes: s.hashes[from..from + saved].to_vec(),
                };
                self.emit(&ev)?;
            }
        }
        Ok(())
    }

    /// One pass. False when there is nothing to do.
    fn step(&mut self) -> Result<bool, EngineError> {
        if self.running.is_empty() && self.waiting.is_empty() {
            return Ok(false);
        }
        if let Some(wall) = self.wall_ms() {
            self.now_ms = self.now_ms.max(wall);
        }
        let pt = u64::from(self.cfg.geometry.page_tokens);
        let mut budget = self.cfg.max_batched_tokens;
        // The pass computes once its transfers (charged on the virtual clock) are done.
        let pass_start = self.now_ms;
        let mut cursor = pass_start;
        // 1. Decode: one token per sequence past its prefill.
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].decoding() {
                i += 1;
                continue;
            }
            let mut alive = true;
            loop {
                let s = &self.running[i];
                let need = (s.input + s.generated + 1).div_ceil(pt) as usize;
                if s.pages.len() >= need {
                    break;
                }
                match self.alloc_page() {
                    Some(p) => self.running[i].pages.push(p),
                    None => {
                        let victim = self.running.len() - 1;
                        self.preempt(victim);
                        if victim == i {
                            alive = false;
                            break;
                        }
                    }
                }
            }
            if !alive {
                break;
            }
            budget = budget.saturating_sub(1);
            i += 1;
        }
        self.flush_evicted(&mut cursor)?;
        // 2. Continue prefills, then 3. admit while budget, seats and pages last.
        let mut chunks: Vec<(u64, u64)> = Vec::new(); // (seq id, tokens)
        for s in &self.running {
            if budget == 0 {
                break;
            }
            if !s.decoding() {
                let c = (s.input - s.prefilled).min(budget);
                budget -= c;
                chunks.push((s.id, c));
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            if !self.admit(&mut cursor)? {
                break;
            }
            let s = self.running.last().expect("just admitted");
            let c = (s.input - s.prefilled).min(budget);
            budget -= c;
            chunks.push((s.id, c));
        }
        let decoders = self.running.iter().filter(|s| s.decoding()).count();
        let prefill_tokens: u64 = chunks.iter().map(|c| c.1).sum();
        if decoders == 0 && prefill_tokens == 0 {
            // Waiting requests that cannot be admitted while nothing runs would wait
            // forever; admission always admits into an empty engine, so this is idle.
            return Ok(false);
        }
        let occupancy = f64::from(self.pool.active_pages()) / f64::from(self.pool.num_pages());
        let stall = cursor - pass_start;
        let mut dur = self.cfg.timing.prefill_ms(prefill_tokens) + stall;
        if decoders > 0 {
            dur += self.cfg.timing.decode_ms(occupancy);
        }
        self.now_ms += dur;
        self.stats.passes += 1;
        self.stats.busy_ms += dur;
        self.stats.stall_ms += stall;
        if stall > 0.0 {
            // Every request still waiting for its first token waited through it.
            for s in self.waiting.iter_mut() {
                s.transfer_ms += stall;
            }
            for s in self.running.iter_mut().filter(|s| s.generated == 0) {
                s.transfer_ms += stall;
            }
        }
        let now = self.now_ms;
        // Pass end: decoders emit a token, prefills advance (and may emit their first).
        let mut done_idx = Vec::new();
        let mut first_tokens = Vec::new();
        let mut running = std::mem::take(&mut self.running);
        for (idx, s) in running.iter_mut().enumerate() {
            if let Some(&(_, c)) = chunks.iter().find(|c| c.0 == s.id) {
                s.prefilled += c;
                let full = ((s.prefilled / pt) as usize).min(s.hashes.len());
                for j in s.registered..full {
                    self.pool.fill(s.pages[j], s.hashes[j])?;
                }
                self.register_range(s, full, true)?;
                if s.decoding() {
                    s.generated = 1;
                    s.first_token_ms = now;
                    first_tokens.push(s.id);
                    if s.generated >= s.output {
                        done_idx.push(idx);
                    }
                }
            } else if s.decoding() {
                s.generated += 1;
                if s.generated >= s.output {
                    done_idx.push(idx);
                }
            }
        }
        for id in first_tokens {
            self.emit(&Event::FirstToken { id })?;
        }
        for &idx in done_idx.iter().rev() {
            let s = running.remove(idx);
            self.release_pages(&s.pages);
            let cached = s.cached.values().sum::<u64>();
            let done = Done {
                id: s.id,
                arrival_ms: s.arrival_ms,
                first_token_ms: s.first_token_ms,
                done_ms: now,
                input_tokens: s.input,
                output_tokens: s.output,
                cached_engine: s.cached[Tier::Hbm],
                cached_host: s.cached[Tier::Host],
                cached_nvme: s.cached[Tier::Nvme],
                computed: s.input - cached,
                preemptions: s.preemptions,
                transfer_ms: s.transfer_ms,
            };
            self.emit(&Event::Done(done))?;
        }
        self.running = running;
        Ok(true)
    }
}

/// Reads commands as JSON lines from `input` until `Finish` or end of input.
pub fn serve<R: std::io::BufRead, W: Write>(
    engine: &mut Engine<W>,
    input: R,
) -> Result<(), EngineError> {
    engine.ready()?;
    for line in input.lines() {
        let line = line.map_err(EngineError::Output)?;
        if line.trim().is_empty() {
            continue;
        }
        let cmd: Command = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                let ev = Event::Error {
                    message: format!("bad command line: {e}"),
                };
                engine.emit(&ev)?;
                engine.flush()?;
                continue;
            }
        };
        if !engine.handle(cmd)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Real-time mode: the engine's clock is the wall clock and every pass is slept for its
/// modelled duration, while commands (read by another thread into `rx`) keep being
/// served: requests arrive when received, `Advance` is answered at once with the current
/// state, `Finish` drains the work and ends.
pub fn serve_real_time<W: Write>(
    engine: &mut Engine<W>,
    rx: std::sync::mpsc::Receiver<Result<Command, String>>,
) -> Result<(), EngineError> {
    use std::sync::mpsc::RecvTimeoutError;
    engine.epoch = Some(Instant::now());
    engine.ready()?;
    let mut finishing = false;
    // Serves one message; true when it was `Finish`.
    fn handle<W: Write>(
        engine: &mut Engine<W>,
        msg: Result<Command, String>,
    ) -> Result<bool, EngineError> {
        match msg {
            Ok(Command::Finish) => Ok(true),
            Ok(cmd) => engine.handle(cmd).map(|_| false),
            Err(message) => {
                engine.emit(&Event::Error { message })?;
                engine.flush().map(|_| false)
            }
        }
    }
    loop {
        while let Ok(msg) = rx.try_recv() {
            finishing |= handle(engine, msg)?;
        }
        let had_work = engine.step()?;
        engine.flush()?;
        if had_work {
            // Sleep until the pass ends, serving commands meanwhile.
            loop {
                let wall = engine.wall_ms().unwrap_or(engine.now_ms);
                if wall >= engine.now_ms {
                    break;
                }
                let left = Duration::from_secs_f64((engine.now_ms - wall) / 1000.0);
                match rx.recv_timeout(left) {
                    Ok(msg) => finishing |= handle(engine, msg)?,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            continue;
        }
        if finishing {
            let ev = Event::Finished(engine.stats.clone());
            engine.emit(&ev)?;
            return engine.flush();
        }
        match rx.recv() {
            Ok(msg) => finishing |= handle(engine, msg)?,
            Err(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(buf: &[u8]) -> Vec<Event> {
        buf.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    fn engine(pages: u32) -> Engine<Vec<u8>> {
        let cfg = EngineConfig {
            geometry: KvGeometry {
                num_pages: pages,
                ..KvGeometry::default()
            },
            ..EngineConfig::default()
        };
        Engine::new(cfg, None, Vec::new()).unwrap()
    }

    fn req(id: u64, t: f64, input: u64, output: u64, ids: &[u64]) -> Command {
        Command::Request {
            id,
            arrival_ms: t,
            input_tokens: input,
            output_tokens: output,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn timing_and_prefix_cache_in_one_engine() {
        let mut e = engine(1024);
        // 1000 tokens, 4 output tokens: prefill 1000 tokens in one pass (first token),
        // then 3 decode passes.
        e.handle(req(1, 0.0, 1000, 4, &[1, 2])).unwrap();
        e.handle(Command::Finish).unwrap();
        let evs = events(&e.out);
        let d = evs
            .iter()
            .find_map(|ev| match ev {
                Event::Done(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        let t = Timing::default();
        assert!((d.first_token_ms - t.prefill_ms(1000)).abs() < 1e-9);
        assert_eq!(d.computed, 1000);
        assert_eq!(d.cached_engine, 0);
        assert!(d.done_ms > d.first_token_ms + 3.0 * 5.0);
        // Stored events cover the 15 full pages (1000 / 64).
        let stored: usize = evs
            .iter()
            .map(|ev| match ev {
                Event::Stored { hashes, .. } => hashes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(stored, 15);
        // The same prompt again: 15 pages hit locally, 40 tokens computed.
        let mut e2 = e;
        e2.out.clear();
        e2.handle(req(2, 1000.0, 1000, 2, &[1, 2])).unwrap();
        e2.handle(Command::Finish).unwrap();
        let d2 = events(&e2.out)
            .into_iter()
            .find_map(|ev| match ev {
                Event::Done(d) => Some(d),
                _ => None,
            })
            .unwrap();
        assert_eq!(d2.cached_engine, 15 * 64);
        assert_eq!(d2.computed, 1000 - 15 * 64);
        assert!((d2.first_token_ms - 1000.0 - t.prefill_ms(40)).abs() < 1e-9);
    }

    #[test]
    fn fully_cached_prompt_recomputes_its_last_page() {
        let mut e = engine(256);
        e.handle(req(1, 0.0, 1024, 1, &[5, 6])).unwrap();
        e.handle(req(2, 0.0, 1024, 1, &[5, 6])).unwrap();
        e.handle(Command::Finish).unwrap();
        let done: Vec<Done> = events(&e.out)
            .into_iter()
            .filter_map(|ev| match ev {
                Event::Done(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(done.len(), 2);
        for d in &done {
            assert_eq!(d.cached_engine + d.computed, 1024);
        }
        // Both were admitted in the same pass, before either's pages were cached; after
        // that a third sees 15 of 16 pages.
        let mut e = e;
        e.out.clear();
        e.handle(req(3, 10_000.0, 1024, 1, &[5, 6])).unwrap();
        e.handle(Command::Finish).unwrap();
        let d = events(&e.out)
            .into_iter()
            .find_map(|ev| match ev {
                Event::Done(d) => Some(d),
                _ => None,
            })
            .unwrap();
        assert_eq!(d.cached_engine, 15 * 64);
        assert_eq!(d.computed, 64);
    }

    #[test]
    fn small_pool_preempts_and_everything_finishes() {
        // 40 pages; four requests of 8 pages prompt + 200 output tokens (4 more pages)
        // each cannot all run to completion at once: preemption must kick in, and every
        // request still finishes exactly once with consistent accounting.
        let mut e = engine(40);
        for id in 0..4 {
            e.handle(req(id, 0.0, 512, 200, &[100 + id])).unwrap();
        }
        e.handle(Command::Finish).unwrap();
        let evs = events(&e.out);
        let mut ids: Vec<u64> = evs
            .iter()
            .filter_map(|ev| match ev {
                Event::Done(d) => {
                    assert_eq!(d.cached_engine + d.computed, 512);
                    Some(d.id)
                }
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert!(e.stats().preemptions > 0, "40 pages cannot hold 4 x 12");
        assert_eq!(e.pool.active_pages(), 0);
    }

    #[test]
    fn real_time_mode_sleeps_through_passes() {
        let mut e = engine(256);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(Ok(req(1, 0.0, 1000, 3, &[1, 2]))).unwrap();
        tx.send(Ok(Command::Finish)).unwrap();
        let t0 = Instant::now();
        serve_real_time(&mut e, rx).unwrap();
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let evs = events(&e.out);
        assert!(matches!(evs[0], Event::Ready { .. }));
        assert!(matches!(evs.last(), Some(Event::Finished(_))));
        let d = evs
            .iter()
            .find_map(|ev| match ev {
                Event::Done(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        // One prefill pass and two decode passes, each slept in full.
        let t = Timing::default();
        let model = t.prefill_ms(1000) + 2.0 * t.decode_ms(0.0);
        assert!(d.done_ms - d.arrival_ms >= model - 1e-6);
        assert!(wall_ms >= model, "wall {wall_ms} ms < modelled {model} ms");
        assert_eq!(d.computed, 1000);
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let mut e = engine(1024);
        // 20,000 tokens: 3 passes of at most 8192 tokens before the first token.
        e.handle(req(1, 0.0, 20_000, 1, &(0..40).collect::<Vec<_>>()))
            .unwrap();
        e.handle(Command::Finish).unwrap();
        let t = Timing::default();
        let expect = 2.0 * t.prefill_ms(8192) + t.prefill_ms(20_000 - 2 * 8192);
        let d = events(&e.out)
            .into_iter()
            .find_map(|ev| match ev {
                Event::Done(d) => Some(d),
                _ => None,
            })
            .unwrap();
        assert!((d.first_token_ms - expect).abs() < 1e-6);
        assert_eq!(e.stats().passes, 3);
    }
}

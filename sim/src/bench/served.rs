//! The engine's path into a real daemon, for the host-path benchmarks (`bench host`, the
//! host paths of `bench transfer`): a `kvplane serve` child process and engine sessions
//! attached to it over the shared-memory rings, each with its paged KV pool in a sealed
//! memfd registered with the session and described by a vLLM-style layout.
//!
//! A SAVE or LOAD timed here is the whole path an engine pays for: writing the block ops
//! into the argument arena, the submission ring, the daemon's validation of the entry and
//! its arguments, the registry (reservation, commit), the paged gather (SAVE) or scatter
//! (LOAD) between the engine's pages and the daemon's host-tier slots, and the completion
//! ring, timed from submission to the completion as the engine sees it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvplane_cuda::engine::{EngineAlloc, EngineGpu};
use kvplane_ffi::{self as ffi, Opcode, Pod, Status, kvp_block_op, kvp_cqe, kvp_kv_layout};
use kvplane_shm::{AttachOptions, QueuePair, Segment, Session, ShmError, client, sys};
use std::sync::Arc;

use super::serve_child::{ServeChild, ServeChildError};
use kvplane_daemon::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServedError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeChildError),
    #[error("engine geometry: {0}")]
    Geometry(String),
    #[error("engine session: {what}: {source}")]
    Shm {
        what: &'static str,
        #[source]
        source: ShmError,
    },
    #[error("{op} completed with {status} ({blocks} of {want} blocks, detail {detail})")]
    Op {
        op: &'static str,
        status: &'static str,
        blocks: u32,
        want: usize,
        detail: u32,
    },
    #[error("page {page}: {what}")]
    Content { page: u32, what: String },
    #[error("engine GPU: {0}")]
    Gpu(#[source] kvplane_cuda::DeviceError),
}

fn shm(what: &'static str) -> impl FnOnce(ShmError) -> ServedError {
    move |source| ServedError::Shm { what, source }
}

/// One engine page's shape in a vLLM-style per-layer layout: each layer has one tensor
/// `[2, pages, page_tokens, kv_heads, head_dim]`, the layers' tensors back to back in one
/// buffer, so a page is `2 * layers` separate runs of `page_tokens * kv_heads * head_bytes`
/// bytes that the daemon gathers into (or scatters from) one contiguous block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineGeometry {
    pub layers: u32,
    pub page_tokens: u32,
    pub kv_heads: u32,
    /// head_dim * dtype bytes.
    pub head_bytes: u32,
}

impl EngineGeometry {
    /// A 70B-class model (Llama-3.1-70B: 80 layers, 8 KV heads, head_dim 128, bf16) in
    /// vLLM's 16-token pages: 32 KiB runs, 5 MiB blocks.
    pub const LLAMA_70B_VLLM_16: EngineGeometry = EngineGeometry {
        layers: 80,
        page_tokens: 16,
        kv_heads: 8,
        head_bytes: 256,
    };

    /// The geometry `bench transfer` uses for a block of `block_bytes`: 8 KV heads of
    /// head_dim 128 in bf16 (2 KiB per token per layer and plane), as many layers as
    /// divide the block, up to 64, and the page tokens that make up the rest. 4 KiB is
    /// one token of one layer; 2 MiB is 64 layers of 8-token pages.
    pub fn for_block_bytes(block_bytes: u64) -> Result<EngineGeometry, ServedError> {
        const TOKEN_BYTES: u64 = 2 * 8 * 256;
        if block_bytes == 0 || block_bytes % TOKEN_BYTES != 0 {
            return Err(ServedError::Geometry(format!(
                "block of {block_bytes} bytes is not a whole number of 4 KiB (K and V of one token of one layer)"
            )));
        }
        let rows = block_bytes / TOKEN_BYTES;
        let layers = (1..=rows.min(64))
            .rev()
            .find(|d| rows % d == 0)
            .unwrap_or(1);
        let page_tokens = u32::try_from(rows / layers)
            .map_err(|_| ServedError::Geometry(format!("block of {block_bytes} bytes")))?;
        Ok(EngineGeometry {
            layers: layers as u32,
            page_tokens,
            kv_heads: 8,
            head_bytes: 256,
        })
    }

    /// Bytes of one (layer, plane) run of a page.
    pub fn run_bytes(&self) -> u64 {
        u64::from(self.page_tokens) * u64::from(self.kv_heads) * u64::from(self.head_bytes)
    }

    /// Bytes of one page, all layers and planes: the daemon's block size.
    pub fn block_bytes(&self) -> u64 {
        self.run_bytes() * 2 * u64::from(self.layers)
    }

    pub fn validate(&self) -> Result<(), ServedError> {
        if self.layers == 0 || self.layers as usize > ffi::MAX_LAYERS {
            return Err(ServedError::Geometry(format!(
                "layers must be in 1..={}, got {}",
                ffi::MAX_LAYERS,
                self.layers
            )));
        }
        if self.page_tokens == 0 || self.kv_heads == 0 || self.head_bytes == 0 {
            return Err(ServedError::Geometry(
                "page tokens, KV heads and head bytes must be at least 1".into(),
            ));
        }
        if self.head_bytes % 8 != 0 {
            return Err(ServedError::Geometry(format!(
                "head bytes must be a multiple of 8, got {}",
                self.head_bytes
            )));
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "vLLM per-layer [2, pages, {t}, {h}, {d}] x {l} layers (bf16, head_dim {d}): \
             {r} KiB runs, {b} KiB blocks",
            t = self.page_tokens,
            h = self.kv_heads,
            d = self.head_bytes / 2,
            l = self.layers,
            r = self.run_bytes() / 1024,
            b = self.block_bytes() / 1024
        )
    }

    /// Offset of (layer, plane, page) in a pool of `pages` pages.
    pub fn run_offset(&self, pages: u64, layer: u32, plane: u32, page: u32) -> u64 {
        ((u64::from(layer) * 2 + u64::from(plane)) * pages + u64::from(page)) * self.run_bytes()
    }

    /// The layout of a pool of `pages` pages.
    pub fn layout(&self, pages: u64) -> kvp_kv_layout {
        let mut l = kvp_kv_layout::zeroed();
        l.num_layers = self.layers;
        l.kv_planes = 2;
        l.page_tokens = self.page_tokens;
        l.kv_heads = self.kv_heads;
        l.head_bytes = self.head_bytes;
        l.dtype_bytes = 2;
        l.num_pages = pages;
        l.page_stride_bytes = self.run_bytes();
        l.token_stride_bytes = u64::from(self.kv_heads) * u64::from(self.head_bytes);
        l.head_stride_bytes = u64::from(self.head_bytes);
        l.buffer_bytes = pages * self.block_bytes();
        for layer in 0..self.layers {
            for plane in 0..2 {
                l.plane_offset[plane as usize][layer as usize] =
                    self.run_offset(pages, layer, plane, 0);
            }
        }
        l
    }
}

/// What the daemon child is given.
#[derive(Clone, Debug)]
pub struct ServedOptions {
    /// The `kvplane` binary to run `serve` from.
    pub exe: PathBuf,
    /// Where the daemon's socket, config and log go (a fresh subdirectory, removed after).
    pub dir: PathBuf,
    pub block_bytes: u64,
    /// Host tier (G2) size in blocks.
    pub host_blocks: u64,
    /// mlock the host pool, as production does.
    pub lock: bool,
    /// Engine sessions that will attach.
    pub sessions: u32,
    /// The daemon's `[device] backend` (the host-path benches: host) and CUDA device.
    pub backend: kvplane_daemon::config::BackendSetting,
    pub gpu_ordinal: u32,
    /// G1 size in blocks (0: no G1).
    pub hbm_blocks: u64,
}

/// Where an engine session's KV pool lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMemory {
    /// A sealed memfd, the layers' tensors back to back.
    Host,
    /// One `cuMemAlloc` per layer on GPU `ordinal`, registered by CUDA IPC handle.
    GpuIpc { ordinal: usize },
    /// One VMM allocation per layer, registered by file descriptor.
    GpuVmm { ordinal: usize },
}

/// A running `kvplane serve` with a host tier, G1 when asked, no NVMe, in its own directory.
pub struct ServedDaemon {
    child: ServeChild,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// The namespace every bench session binds.
const NAMESPACE: &str = "bench/served";

impl ServedDaemon {
    pub fn start(o: &ServedOptions) -> Result<ServedDaemon, ServedError> {
        std::fs::create_dir_all(&o.dir).map_err(|source| ServedError::Io {
            op: "creating",
            path: o.dir.clone(),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix("kvplane-served-")
            .tempdir_in(&o.dir)
            .map_err(|source| ServedError::Io {
                op: "creating a directory in",
                path: o.dir.clone(),
                source,
            })?;
        let socket = dir.path().join("kvplane.sock");
        let mut config = Config::default();
        config.serve.socket_path = socket.clone();
        config.serve.max_sessions = o.sessions + 4;
        config.blocks.block_bytes = o.block_bytes as usize;
        config.tiers.hbm.capacity_bytes = o.hbm_blocks * o.block_bytes;
        // Host slots are NVMe-slot sized (block + its 4 KiB header), so a demotion
        // writes one slot as is.
        config.tiers.host.capacity_bytes =
            o.host_blocks * kvplane_daemon::tier::nvme::slot_bytes(o.block_bytes as usize) as u64;
        config.tiers.host.lock = o.lock;
        config.tiers.host.touch_threads = 0;
        config.control.metrics_addr = String::new();
        // The host-path benches pin the host backend, GPU or not ("host backend" in their
        // labels); `bench offload` asks for the GPU its engine's pool is on.
        config.device.backend = o.backend;
        config.device.ordinal = o.gpu_ordinal;
        let child = ServeChild::start(
            &o.exe,
            &dir.path().join("kvplane.toml"),
            &dir.path().join("daemon.log"),
            &config,
            &socket,
            Duration::from_secs(120),
        )?;
        Ok(ServedDaemon {
            child,
            socket,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// The daemon's "host pool ready" log line, as `key=value` pairs (pages, locked,
    /// touch_s_per_gib): what the pool's start-up cost.
    pub fn host_pool_log(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.child.log).unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.contains("host pool ready")) else {
            return Vec::new();
        };
        // Values may hold spaces (`pages=4 KiB`): a word without `=` continues the value.
        let mut out: Vec<(String, String)> = Vec::new();
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some((k, v)) => out.push((k.to_owned(), v.trim_matches('"').to_owned())),
                None => {
                    if let Some((_, v)) = out.last_mut() {
                        v.push(' ');
                        v.push_str(word);
                    }
                }
            }
        }
        out
    }

    /// Attaches an engine session whose KV pool of `pages` pages of `geometry` is a sealed
    /// memfd registered with the session, and binds its layout.
    pub fn attach(
        &self,
        geometry: EngineGeometry,
        pages: u32,
    ) -> Result<EngineSession, ServedError> {
        self.attach_pool(geometry, pages, PoolMemory::Host)
    }

    /// [`ServedDaemon::attach`] with the pool in `memory` (GPU pools: one allocation per
    /// layer, as vLLM's per-layer tensors, each a region of the session).
    pub fn attach_pool(
        &self,
        geometry: EngineGeometry,
        pages: u32,
        memory: PoolMemory,
    ) -> Result<EngineSession, ServedError> {
        geometry.validate()?;
        let pages64 = u64::from(pages.max(1));
        let bytes = pages64 * geometry.block_bytes();
        let mut o = AttachOptions::new(&self.socket);
        o.namespaces = vec![NAMESPACE.to_owned()];
        o.arena_bytes = 1 << 20;
        let mut layout = geometry.layout(pages64);
        let pool = match memory {
            PoolMemory::Host => {
                let fd =
                    sys::memfd_create_sealed("kvplane-bench-engine-kv", bytes).map_err(|e| {
                        ServedError::Shm {
                            what: "engine KV memfd",
                            source: ShmError::io("memfd_create", e),
                        }
                    })?;
                let kv = Segment::map_fd(
                    fd.try_clone().map_err(|e| ServedError::Shm {
                        what: "engine KV memfd",
                        source: ShmError::io("dup", e),
                    })?,
                    bytes,
                )
                .map_err(shm("map the engine KV memfd"))?;
                o.host_kv_buffer(fd, bytes);
                EnginePool::Memfd(kv)
            }
            PoolMemory::GpuIpc { ordinal } | PoolMemory::GpuVmm { ordinal } => {
                let gpu = EngineGpu::open(ordinal).map_err(ServedError::Gpu)?;
                let layer_bytes = 2 * pages64 * geometry.run_bytes();
                let mut allocs = Vec::with_capacity(geometry.layers as usize);
                for layer in 0..geometry.layers {
                    let a = match memory {
                        PoolMemory::GpuVmm { .. } => gpu.alloc_vmm(layer_bytes as usize),
                        _ => gpu.alloc(layer_bytes as usize),
                    }
                    .map_err(ServedError::Gpu)?;
                    let (desc, fd) = a.region(0, layer_bytes).map_err(ServedError::Gpu)?;
                    o.kv_regions
                        .push(kvplane_shm::handshake::EngineRegion { desc, fd });
                    for plane in 0..2u32 {
                        layout.plane_region[plane as usize][layer as usize] = layer as u16;
                        layout.plane_offset[plane as usize][layer as usize] =
                            u64::from(plane) * pages64 * geometry.run_bytes();
                    }
                    allocs.push(a);
                }
                EnginePool::Gpu { allocs, gpu }
            }
        };
        let mut session = Session::attach(o).map_err(shm("attach"))?;
        let qp = session
            .take_queue_pairs()
            .map_err(shm("take queue pairs"))?
            .remove(0);
        let max_ops = (qp.arena_bytes() as usize / std::mem::size_of::<kvp_block_op>())
            .min(ffi::MAX_BLOCKS_PER_OP as usize);
        let mut s = EngineSession {
            _session: session,
            qp,
            pool,
            geometry,
            pages: pages64,
            next_user_data: 1,
            max_ops,
            scratch: vec![0; geometry.run_bytes() as usize],
            check: vec![0; geometry.run_bytes() as usize],
        };
        s.qp.write_arena(0, ffi::as_bytes(&layout))
            .map_err(shm("write the layout"))?;
        let mut sqe = client::sqe(Opcode::AttachLayout, 0);
        sqe.arg_len = std::mem::size_of::<kvp_kv_layout>() as u32;
        sqe.count = 1;
        let c = s.qp.call(sqe, RING_TIMEOUT).map_err(shm("ATTACH_LAYOUT"))?;
        if c.status != Status::Ok.raw() {
            return Err(op_error("ATTACH_LAYOUT", &c, 1));
        }
        Ok(s)
    }
}

const RING_TIMEOUT: Duration = Duration::from_secs(60);

fn op_error(op: &'static str, c: &kvp_cqe, want: usize) -> ServedError {
    ServedError::Op {
        op,
        status: kvplane_daemon::dataplane::status_name(c.status),
        blocks: c.blocks,
        want,
        detail: c.detail,
    }
}

/// An engine session's KV pool.
pub enum EnginePool {
    /// A sealed memfd mapped here, the layers' tensors back to back.
    Memfd(Segment),
    /// One GPU allocation per layer (`[2, pages, ...]`).
    Gpu {
        allocs: Vec<EngineAlloc>,
        gpu: Arc<EngineGpu>,
    },
}

/// One engine session: its KV pool and one queue pair.
pub struct EngineSession {
    // Field order is drop order: the session (and the daemon's imports) before the pool.
    _session: Session,
    qp: QueuePair,
    pool: EnginePool,
    geometry: EngineGeometry,
    pages: u64,
    next_user_data: u64,
    max_ops: usize,
    scratch: Vec<u8>,
    check: Vec<u8>,
}

/// A completed block operation as the engine saw it.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub cqe: kvp_cqe,
    /// From the start of the submission (block ops into the arena, the entry onto the
    /// ring) to the completion read off the completion ring.
    pub seconds: f64,
}

impl EngineSession {
    pub fn geometry(&self) -> EngineGeometry {
        self.geometry
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Most block ops one call may carry (the argument arena's size).
    pub fn max_ops(&self) -> usize {
        self.max_ops
    }

    /// Runs one SAVE / LOAD / DROP of `ops` and waits for its completion.
    pub fn op(
        &mut self,
        opcode: Opcode,
        flags: u16,
        ops: &[kvp_block_op],
    ) -> Result<Timed, ServedError> {
        assert!(ops.len() <= self.max_ops, "more ops than the arena holds");
        let mut sqe = client::sqe(opcode, self.next_user_data);
        self.next_user_data += 1;
        sqe.flags = flags;
        sqe.count = ops.len() as u32;
        sqe.arg_len = std::mem::size_of_val(ops) as u32;
        let t0 = Instant::now();
        self.qp
            .write_block_ops(0, ops)
            .map_err(shm("write block ops"))?;
        let cqe = self.qp.call(sqe, RING_TIMEOUT).map_err(shm("call"))?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(Timed { cqe, seconds })
    }

    /// `op`, failing unless the completion is OK for every block.
    pub fn op_all(
        &mut self,
        name: &'static str,
        opcode: Opcode,
        ops: &[kvp_block_op],
    ) -> Result<Timed, ServedError> {
        let t = self.op(opcode, 0, ops)?;
        if t.cqe.status != Status::Ok.raw() || t.cqe.blocks as usize != ops.len() {
            return Err(op_error(name, &t.cqe, ops.len()));
        }
        Ok(t)
    }

    /// The pool, for ceilings measured on the same memory.
    pub fn pool(&self) -> &EnginePool {
        &self.pool
    }

    /// (allocation, offset) of run (layer, plane) of `page`: the memfd holds every layer
    /// (allocation 0); a GPU pool has one allocation per layer.
    pub fn run_at(&self, layer: u32, plane: u32, page: u32) -> (usize, u64) {
        match self.pool {
            EnginePool::Memfd(_) => (0, self.geometry.run_offset(self.pages, layer, plane, page)),
            EnginePool::Gpu { .. } => (
                layer as usize,
                (u64::from(plane) * self.pages + u64::from(page)) * self.geometry.run_bytes(),
            ),
        }
    }

    fn write_run(&self, layer: u32, plane: u32, page: u32, data: &[u8]) -> Result<(), ServedError> {
        let (alloc, off) = self.run_at(layer, plane, page);
        match &self.pool {
            EnginePool::Memfd(kv) => kv.write_bytes(off, data).map_err(shm("write a page")),
            EnginePool::Gpu { allocs, .. } => allocs[alloc]
                .write(off as usize, data)
                .map_err(ServedError::Gpu),
        }
    }

    fn read_run(
        &self,
        layer: u32,
        plane: u32,
        page: u32,
        out: &mut [u8],
    ) -> Result<(), ServedError> {
        let (alloc, off) = self.run_at(layer, plane, page);
        match &self.pool {
            EnginePool::Memfd(kv) => kv.read_bytes(off, out).map_err(shm("read a page")),
            EnginePool::Gpu { allocs, .. } => allocs[alloc]
                .read(off as usize, out)
                .map_err(ServedError::Gpu),
        }
    }

    fn runs(&self) -> impl Iterator<Item = (u32, u32)> + use<> {
        let layers = self.geometry.layers;
        (0..layers).flat_map(|l| [(l, 0), (l, 1)])
    }

    /// Writes `page`'s content, derived from `seed` (every run different), as an engine's
    /// forward pass would.
    pub fn fill_page(&mut self, page: u32, seed: u64) -> Result<(), ServedError> {
        for (i, (l, p)) in self.runs().enumerate() {
            pattern(seed, i as u64, &mut self.scratch);
            self.write_run(l, p, page, &self.scratch)?;
        }
        Ok(())
    }

    /// Overwrites `page` with a constant, so a load that writes nothing cannot pass.
    pub fn poison_page(&mut self, page: u32) -> Result<(), ServedError> {
        self.scratch.fill(0xA5);
        for (l, p) in self.runs() {
            self.write_run(l, p, page, &self.scratch)?;
        }
        Ok(())
    }

    /// Checks every byte of `page` against the content `fill_page(_, seed)` wrote.
    pub fn check_page(&mut self, page: u32, seed: u64) -> Result<(), ServedError> {
        for (i, (l, p)) in self.runs().enumerate() {
            pattern(seed, i as u64, &mut self.scratch);
            let mut check = std::mem::take(&mut self.check);
            let read = self.read_run(l, p, page, &mut check);
            self.check = check;
            read?;
            if let Some(at) = self
                .check
                .iter()
                .zip(&self.scratch)
                .position(|(a, b)| a != b)
            {
                return Err(ServedError::Content {
                    page,
                    what: format!(
                        "layer {l} plane {p} differs at byte {at} from what was saved (seed {seed:#x})"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Deterministic bytes of run `run` of the page seeded by `seed`.
fn pattern(seed: u64, run: u64, out: &mut [u8]) {
    let key = kvplane_kernels::checksum::mix64(seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&kvplane_kernels::checksum::mix64(key ^ i as u64).to_le_bytes());
    }
}

/// Chained block ops: `hashes[i]` into page `first_page + i`, each block's parent the one
/// before it (the first's `parent`, 0 at the root).
pub fn chain_ops(hashes: &[u64], parent: u64, first_page: u32) -> Vec<kvp_block_op> {
    let mut prev = parent;
    hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let o = kvp_block_op::new(h, prev, first_page + i as u32);
            prev = h;
            o
        })
        .collect()
}

/// A page-aligned private buffer for memcpy ceilings, touched once.
pub struct CeilingBuffer {
    buf: Vec<u64>,
}

impl CeilingBuffer {
    pub fn new(bytes: usize, seed: u64) -> CeilingBuffer {
        let mut buf = vec![0u64; bytes.div_ceil(8)];
        for (i, w) in buf.iter_mut().enumerate() {
            *w = kvplane_kernels::checksum::mix64(seed ^ i as u64);
        }
        CeilingBuffer { buf }
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 slice viewed as bytes: same memory, alignment 1 <= 8.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast(), self.buf.len() * 8) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast(), self.buf.len() * 8) }
    }
}

/// Seconds of one single-threaded memcpy of `bytes` from `src` to `dst`, in
/// `block_bytes` pieces as the blocks are laid out.
pub fn memcpy_seconds(
    src: &CeilingBuffer,
    dst: &mut CeilingBuffer,
    bytes: usize,
    block_bytes: usize,
) -> f64 {
    let t0 = Instant::now();
    for (d, s) in dst.bytes_mut()[..bytes]
        .chunks_mut(block_bytes)
        .zip(src.bytes()[..bytes].chunks(block_bytes))
    {
        d.copy_from_slice(s);
    }
    std::hint::black_box(dst.bytes());
    t0.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seventy_b_vllm_pages_are_five_mib_blocks_of_32_kib_runs() {
        let g = EngineGeometry::LLAMA_70B_VLLM_16;
        assert_eq!(g.run_bytes(), 32 << 10);
        assert_eq!(g.block_bytes(), 5 << 20);
        let l = g.layout(4);
        // Layer 1 plane 0 starts after layer 0's K and V page arrays.
        assert_eq!(l.plane_offset[0][1], 2 * 4 * (32 << 10));
        assert_eq!(l.plane_offset[1][0], 4 * (32 << 10));
        assert_eq!(
            g.run_offset(4, 79, 1, 3) + g.run_bytes(),
            l.buffer_bytes,
            "the last run of the last page ends the buffer"
        );
    }

    #[test]
    fn sweep_geometry_covers_4_kib_to_64_mib() {
        for (kib, layers, tokens) in [
            (4u64, 1, 1),
            (16, 4, 1),
            (256, 64, 1),
            (2048, 64, 8),
            (65536, 64, 256),
            (12, 3, 1),
        ] {
            let g = EngineGeometry::for_block_bytes(kib << 10).unwrap();
            assert_eq!((g.layers, g.page_tokens), (layers, tokens), "{kib} KiB");
            assert_eq!(g.block_bytes(), kib << 10);
            g.validate().unwrap();
        }
        assert!(EngineGeometry::for_block_bytes(6 << 10).is_err());
    }

    #[test]
    fn pattern_differs_per_run_and_seed() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        pattern(1, 0, &mut a);
        pattern(1, 1, &mut b);
        assert_ne!(a, b);
        pattern(2, 0, &mut b);
        assert_ne!(a, b);
        pattern(1, 0, &mut b);
        assert_eq!(a, b);
    }
}

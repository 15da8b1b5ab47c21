//! The GPU check for performance engineers (`scripts/gpu-check.sh`, or
//! `cargo run --release -p kvplane-cuda --example gpu_check`): on a real device it runs
//! the batched-copy kernel against the copy-engine path (one cudaMemcpyAsync per block)
//! on random data, verifies both with the checksum kernel against the host's
//! `checksum64`, checks gather/scatter against the CPU build of the same kernels and the
//! slot MAC kernels against the `blake3` crate, and
//! prints GB/s with the percentage of a bulk device-to-device copy of the same bytes
//! measured in the same run, for block sizes from 8 KiB to 4 MiB and batches from 1 to
//! 4096. These are device-to-device figures (the G1 tier's copies); the offload path to
//! and from pinned host memory is [`crate::offload`].
//!
//! Everything here goes through the [`Device`] trait, so the same code runs on the host
//! backend; the tests do that with small sizes (the CPU-side logic: planning, data,
//! verification, timing, the table). Host-backend numbers are not GPU numbers and the
//! report says which backend produced them.

use crate::device::{Device, DeviceBuffer, DeviceError, StreamId};
use kvplane_ffi::{kvp_copy_desc, kvp_kv_layout};
use kvplane_kernels::{EngineKv, HostLaunch, PagedLayout, checksum64};
use serde::Serialize;
use std::ptr::NonNull;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub block_sizes: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    /// Cases moving more than this per launch are skipped (and listed as skipped).
    pub max_batch_bytes: usize,
    /// Timed repetitions per measurement.
    pub iters: u32,
    /// Where the file check puts its scratch file (opened O_DIRECT, unlinked at once):
    /// a directory on the NVMe tier's file system shows what cuFile does there. `None`:
    /// the check is not run (it says so).
    pub file_dir: Option<std::path::PathBuf>,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            // 8 KiB .. 4 MiB, powers of two.
            block_sizes: (13..=22).map(|s| 1usize << s).collect(),
            batch_sizes: vec![1, 4, 16, 64, 256, 1024, 4096],
            max_batch_bytes: 2 << 30,
            iters: 10,
            file_dir: Some(std::env::temp_dir()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Case {
    pub block_bytes: usize,
    pub batch: usize,
}

/// The cases to run, in table order, and those skipped for the memory budget.
pub fn plan(cfg: &CheckConfig) -> (Vec<Case>, Vec<Case>) {
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for &block_bytes in &cfg.block_sizes {
        for &batch in &cfg.batch_sizes {
            let case = Case { block_bytes, batch };
            match block_bytes.checked_mul(batch) {
                Some(total) if total <= cfg.max_batch_bytes && total > 0 => run.push(case),
                _ => skipped.push(case),
            }
        }
    }
    (run, skipped)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub case: Case,
    pub kernel_gbps: f64,
    pub copy_engine_gbps: f64,
    pub d2d_gbps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub backend: &'static str,
    pub device: String,
    pub rows: Vec<Row>,
    pub skipped: Vec<Case>,
    /// Layouts whose device gather and scatter matched the CPU build byte for byte.
    pub paged_layouts_verified: u32,
    /// Layouts whose slot-addressed gather and scatter (non-contiguous, out-of-order,
    /// unaligned offsets) matched the contiguous kernels on the same device.
    pub slot_layouts_verified: u32,
    /// The slot MAC kernels (keyed BLAKE3) against the `blake3` crate.
    pub mac: MacCheck,
    /// Device memory to a file and back (`Device::write_file` / `read_file`: cuFile on
    /// the cuda backend), the NVMe <-> G1 path.
    pub file: FileCheck,
}

/// Device memory written to an O_DIRECT file and read back into other device memory,
/// compared byte for byte, and the rates each way (each call synchronous, one block at a
/// time, as the daemon moves them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileCheck {
    /// The directory of the scratch file.
    pub dir: String,
    /// Why the check did not run (no O_DIRECT there, cuFile cannot open or register the
    /// file); `None` when it ran.
    pub not_run: Option<String>,
    /// Transfers compared byte for byte (odd offsets and lengths, then the timed blocks).
    pub transfers_verified: u32,
    pub timed_block_bytes: usize,
    pub timed_blocks: usize,
    pub write_gbps: f64,
    pub read_gbps: f64,
}

impl FileCheck {
    fn not_run(dir: &str, why: &str) -> Self {
        Self {
            dir: dir.into(),
            not_run: Some(why.into()),
            transfers_verified: 0,
            timed_block_bytes: 0,
            timed_blocks: 0,
            write_gbps: 0.0,
            read_gbps: 0.0,
        }
    }
}

/// The device MAC of blocks in device memory, equal to the CPU's, and its rate next to
/// the CPU's (one core, the crate's SIMD code) in the same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MacCheck {
    /// Blocks whose device MAC equalled `blake3::keyed_hash` (odd sizes included).
    pub blocks_verified: u32,
    /// Bytes per timed pass: `timed_blocks` blocks of `timed_block_bytes`.
    pub timed_block_bytes: usize,
    pub timed_blocks: usize,
    /// Device MAC rate (each `Device::mac` call includes its table upload, the launches
    /// and the read back of the results).
    pub device_gbps: f64,
    /// `blake3::keyed_hash` of the same blocks on one CPU core.
    pub cpu_gbps: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "{what}: block {index} of case {block_bytes} B x {batch}: checksum {got:#x}, want {want:#x}"
    )]
    Mismatch {
        what: &'static str,
        block_bytes: usize,
        batch: usize,
        index: usize,
        got: u64,
        want: u64,
    },
    #[error(
        "file: {len_bytes} B at file offset {file_offset}: read back differs from what was written"
    )]
    FileMismatch { file_offset: u64, len_bytes: usize },
    #[error("mac: block {index} of {block_bytes} B: device MAC differs from keyed BLAKE3")]
    MacMismatch { index: usize, block_bytes: usize },
    #[error("paged {what} differs from the CPU build for layout {layout}")]
    PagedMismatch {
        what: &'static str,
        layout: &'static str,
    },
    #[error("{what} differs from the contiguous kernel for layout {layout}")]
    SlotMismatch {
        what: &'static str,
        layout: &'static str,
    },
    #[error("layout {layout}: {source}")]
    Layout {
        layout: &'static str,
        source: kvplane_kernels::LayoutError,
    },
    #[error("CPU reference for {layout}: {source}")]
    Reference {
        layout: &'static str,
        source: kvplane_kernels::KernelError,
    },
}

/// Compares per-block checksums; the first difference is the error.
pub fn verify(what: &'static str, case: Case, got: &[u64], want: &[u64]) -> Result<(), CheckError> {
    for (index, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            return Err(CheckError::Mismatch {
                what,
                block_bytes: case.block_bytes,
                batch: case.batch,
                index,
                got: *g,
                want: *w,
            });
        }
    }
    assert_eq!(got.len(), want.len(), "one checksum per block");
    Ok(())
}

pub(crate) fn fill_random(buf: &mut [u8], mut x: u64) {
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

pub(crate) fn gbps(bytes: usize, iters: u32, secs: f64) -> f64 {
    bytes as f64 * f64::from(iters) / secs.max(1e-9) / 1e9
}

pub(crate) fn timed(
    dev: &dyn Device,
    stream: StreamId,
    iters: u32,
    mut f: impl FnMut() -> Result<(), DeviceError>,
) -> Result<f64, DeviceError> {
    f()?; // warm-up
    dev.sync_stream(stream)?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.sync_stream(stream)?;
    Ok(t.elapsed().as_secs_f64())
}

/// An O_DIRECT scratch file in `dir`, 0600, unlinked at once (nothing is left behind).
fn scratch_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("kvplane-gpu-check-{}.bin", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// Device memory to an O_DIRECT file in `dir` and back into another buffer: odd offsets
/// and lengths first, then 16 blocks of 2 MiB each way, timed, every transfer compared
/// byte for byte. It says it did not run, and why, where the file cannot be opened
/// O_DIRECT or cuFile cannot open or register it; any other failure is the check's.
fn check_file(
    dev: &dyn Device,
    stream: StreamId,
    dir: &std::path::Path,
    iters: u32,
) -> Result<FileCheck, CheckError> {
    use std::os::fd::AsFd;
    const TIMED_BLOCK: usize = 2 << 20;
    const TIMED_BLOCKS: usize = 16;
    let mut report = FileCheck {
        timed_block_bytes: TIMED_BLOCK,
        timed_blocks: TIMED_BLOCKS,
        not_run: None,
        ..FileCheck::not_run(&dir.display().to_string(), "")
    };
    let file = match scratch_file(dir) {
        Ok(f) => f,
        Err(e) => {
            report.not_run = Some(format!("cannot open an O_DIRECT file there: {e}"));
            return Ok(report);
        }
    };
    let fd = file.as_fd();
    let total = TIMED_BLOCK * TIMED_BLOCKS;
    let mut host = vec![0u8; total];
    fill_random(&mut host, 0x6669_6c65);
    let src = dev.alloc(total)?;
    let dst = match dev.alloc(total) {
        Ok(b) => b,
        Err(e) => {
            dev.free(src)?;
            return Err(e.into());
        }
    };
    let result = (|| -> Result<(), CheckError> {
        dev.copy_to_device(stream, &host, src.whole())?;
        let mut back = vec![0u8; total];
        // Compares `len` bytes read back into dst at `at` with the source at `at`.
        let mut same = |at: usize, len: usize, file_offset: u64| -> Result<(), CheckError> {
            dev.copy_to_host(stream, dst.range(at, len), &mut back[..len])?;
            match back[..len] == host[at..at + len] {
                true => Ok(()),
                false => Err(CheckError::FileMismatch {
                    file_offset,
                    len_bytes: len,
                }),
            }
        };
        // (file offset, length, buffer offset): unaligned everywhere, and a block with a
        // ragged tail.
        for (file_offset, len, at) in [
            (3 * 4096 + 7u64, 5000usize, 3usize),
            (0, TIMED_BLOCK + 123, 4096),
        ] {
            dev.write_file(stream, src.range(at, len), fd, file_offset)?;
            dev.read_file(stream, dst.range(at, len), fd, file_offset)?;
            same(at, len, file_offset)?;
            report.transfers_verified += 1;
        }
        let block = |i: usize| (i * TIMED_BLOCK, (i * TIMED_BLOCK) as u64);
        let write_s = timed(dev, stream, iters, || {
            (0..TIMED_BLOCKS).try_for_each(|i| {
                let (at, file_offset) = block(i);
                dev.write_file(stream, src.range(at, TIMED_BLOCK), fd, file_offset)
            })
        })?;
        let read_s = timed(dev, stream, iters, || {
            (0..TIMED_BLOCKS).try_for_each(|i| {
                let (at, file_offset) = block(i);
                dev.read_file(stream, dst.range(at, TIMED_BLOCK), fd, file_offset)
            })
        })?;
        for i in 0..TIMED_BLOCKS {
            let (at, file_offset) = block(i);
            same(at, TIMED_BLOCK, file_offset)?;
            report.transfers_verified += 1;
        }
        report.write_gbps = gbps(total, iters, write_s);
        report.read_gbps = gbps(total, iters, read_s);
        Ok(())
    })();
    dev.free(src)?;
    dev.free(dst)?;
    match result {
        // cuFile is not there, or refuses this file system: say so, as the daemon's
        // start-up does (`tiers.nvme.direct_to_g1 = auto` then stages through the host).
        Err(CheckError::Device(DeviceError::Driver { op, detail }))
            if op == "cuFileDriverOpen" || op == "cuFileHandleRegister" =>
        {
            report.not_run = Some(format!("{op}: {detail}"));
            report.transfers_verified = 0;
            Ok(report)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(report),
    }
}

/// Device MACs of blocks of several sizes (1 KiB boundaries, odd lengths, 2 MiB) against
/// the `blake3` crate, then the rate of `Device::mac` over 16 blocks of 2 MiB next to
/// the CPU's on the same bytes.
fn check_mac(dev: &dyn Device, stream: StreamId, iters: u32) -> Result<MacCheck, CheckError> {
    const TIMED_BLOCK: usize = 2 << 20;
    const TIMED_BLOCKS: usize = 16;
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5c);
    let sizes = [
        0usize,
        1,
        1023,
        1024,
        1025,
        3 * 1024 + 5,
        64 << 10,
        TIMED_BLOCK,
    ];
    let total = TIMED_BLOCK * TIMED_BLOCKS;
    let mut host = vec![0u8; total];
    fill_random(&mut host, 0x6d61_6321);
    let buf = dev.alloc(total)?;
    let result = (|| {
        dev.copy_to_device(stream, &host, buf.whole())?;
        // Odd sizes at odd offsets, each its own tree shape.
        let mut at = 0u64;
        let descs: Vec<kvp_copy_desc> = sizes
            .iter()
            .map(|&bytes| {
                let d = kvp_copy_desc {
                    src_offset: at + 3,
                    dst_offset: 0,
                    bytes: bytes as u64,
                };
                at += bytes as u64 + 4096;
                d
            })
            .collect();
        let macs = dev.mac(stream, buf, &descs, &key)?;
        for (index, (d, mac)) in descs.iter().zip(&macs).enumerate() {
            let r = d.src_offset as usize..(d.src_offset + d.bytes) as usize;
            if *mac != *blake3::keyed_hash(&key, &host[r]).as_bytes() {
                return Err(CheckError::MacMismatch {
                    index,
                    block_bytes: d.bytes as usize,
                });
            }
        }
        let timed_descs: Vec<kvp_copy_desc> = (0..TIMED_BLOCKS)
            .map(|i| kvp_copy_desc {
                src_offset: (i * TIMED_BLOCK) as u64,
                dst_offset: 0,
                bytes: TIMED_BLOCK as u64,
            })
            .collect();
        let mut timed_macs = Vec::new();
        let device_s = timed(dev, stream, iters, || {
            timed_macs = dev.mac(stream, buf, &timed_descs, &key)?;
            Ok(())
        })?;
        let t = Instant::now();
        let mut cpu_macs = Vec::new();
        for _ in 0..iters {
            cpu_macs = host
                .chunks_exact(TIMED_BLOCK)
                .map(|b| *blake3::keyed_hash(&key, b).as_bytes())
                .collect();
        }
        let cpu_s = t.elapsed().as_secs_f64();
        if let Some(index) = (0..TIMED_BLOCKS).find(|&i| timed_macs[i] != cpu_macs[i]) {
            return Err(CheckError::MacMismatch {
                index,
                block_bytes: TIMED_BLOCK,
            });
        }
        Ok(MacCheck {
            blocks_verified: (descs.len() + TIMED_BLOCKS) as u32,
            timed_block_bytes: TIMED_BLOCK,
            timed_blocks: TIMED_BLOCKS,
            device_gbps: gbps(total, iters, device_s),
            cpu_gbps: gbps(total, iters, cpu_s),
        })
    })();
    dev.free(buf)?;
    result
}

fn run_case(dev: &dyn Device, stream: StreamId, case: Case, iters: u32) -> Result<Row, CheckError> {
    let total = case.block_bytes * case.batch;
    let mut host = vec![0u8; total];
    fill_random(&mut host, 0x9e37_79b9 ^ total as u64 ^ case.batch as u64);
    let src = dev.alloc(total)?;
    let dst = dev.alloc(total)?;
    let result = (|| {
        dev.copy_to_device(stream, &host, src.whole())?;
        // Blocks land in reverse order, so a kernel ignoring descriptors fails the check.
        let descs: Vec<kvp_copy_desc> = (0..case.batch)
            .map(|i| kvp_copy_desc {
                src_offset: (i * case.block_bytes) as u64,
                dst_offset: ((case.batch - 1 - i) * case.block_bytes) as u64,
                bytes: case.block_bytes as u64,
            })
            .collect();
        let want: Vec<u64> = (0..case.batch)
            .rev()
            .map(|i| checksum64(&host[i * case.block_bytes..(i + 1) * case.block_bytes]))
            .collect();
        let dst_blocks: Vec<kvp_copy_desc> = (0..case.batch)
            .map(|i| kvp_copy_desc {
                src_offset: (i * case.block_bytes) as u64,
                dst_offset: 0,
                bytes: case.block_bytes as u64,
            })
            .collect();

        let kernel_s = timed(dev, stream, iters, || {
            dev.copy_batch(stream, src, dst, &descs)
        })?;
        verify(
            "copy kernel",
            case,
            &dev.checksum(stream, dst, &dst_blocks)?,
            &want,
        )?;

        let engine_s = timed(dev, stream, iters, || {
            for d in &descs {
                dev.copy_device(
                    stream,
                    src.range(d.src_offset as usize, case.block_bytes),
                    dst.range(d.dst_offset as usize, case.block_bytes),
                )?;
            }
            Ok(())
        })?;
        verify(
            "copy engine",
            case,
            &dev.checksum(stream, dst, &dst_blocks)?,
            &want,
        )?;

        let d2d_s = timed(dev, stream, iters, || {
            dev.copy_device(stream, src.whole(), dst.whole())
        })?;
        Ok(Row {
            case,
            kernel_gbps: gbps(total, iters, kernel_s),
            copy_engine_gbps: gbps(total, iters, engine_s),
            d2d_gbps: gbps(total, iters, d2d_s),
        })
    })();
    dev.free(src)?;
    dev.free(dst)?;
    result
}

/// Engine layouts for the paged check: (name, layout). Small pools, odd shapes included.
fn check_layouts() -> Vec<(&'static str, kvp_kv_layout)> {
    let base = || {
        // SAFETY: plain old data; all-zero is valid.
        let l: kvp_kv_layout = unsafe { std::mem::zeroed() };
        l
    };
    let mut out = Vec::new();
    // vLLM [2, pages, tokens, heads, dim] per layer, bf16, 16-token pages.
    let mut l = base();
    (
        l.num_layers,
        l.kv_planes,
        l.page_tokens,
        l.kv_heads,
        l.head_bytes,
        l.dtype_bytes,
    ) = (4, 2, 16, 8, 256, 2);
    l.num_pages = 24;
    l.head_stride_bytes = 256;
    l.token_stride_bytes = 8 * 256;
    l.page_stride_bytes = 16 * 8 * 256;
    let plane = l.num_pages * l.page_stride_bytes;
    for layer in 0..4 {
        l.plane_offset[0][layer] = 2 * layer as u64 * plane;
        l.plane_offset[1][layer] = (2 * layer as u64 + 1) * plane;
    }
    l.buffer_bytes = 8 * plane;
    out.push(("vllm", l));
    // TRT-LLM head-major pool [pages, layers, 2, heads, tokens, dim], fp8, odd dims, and
    // a 3-byte misaligned start.
    let mut l = base();
    (
        l.num_layers,
        l.kv_planes,
        l.page_tokens,
        l.kv_heads,
        l.head_bytes,
        l.dtype_bytes,
    ) = (3, 2, 5, 3, 72, 1);
    l.num_pages = 10;
    l.token_stride_bytes = 72;
    l.head_stride_bytes = 5 * 72;
    let plane = 3 * l.head_stride_bytes;
    l.page_stride_bytes = 3 * 2 * plane;
    for layer in 0..3 {
        l.plane_offset[0][layer] = 3 + 2 * layer as u64 * plane;
        l.plane_offset[1][layer] = 3 + (2 * layer as u64 + 1) * plane;
    }
    l.buffer_bytes = 3 + l.num_pages * l.page_stride_bytes;
    out.push(("trtllm-fp8-odd", l));
    // MLA [pages, tokens, latent] per layer, one plane, 576 bf16 latent.
    let mut l = base();
    (
        l.num_layers,
        l.kv_planes,
        l.page_tokens,
        l.kv_heads,
        l.head_bytes,
        l.dtype_bytes,
    ) = (2, 1, 64, 1, 1152, 2);
    l.num_pages = 6;
    l.head_stride_bytes = 1152;
    l.token_stride_bytes = 1152;
    l.page_stride_bytes = 64 * 1152;
    for layer in 0..2 {
        l.plane_offset[0][layer] = layer as u64 * 6 * l.page_stride_bytes;
    }
    l.buffer_bytes = 2 * 6 * l.page_stride_bytes;
    out.push(("mla", l));
    out
}

/// Gather and scatter on the device equal the CPU build of the same kernels.
fn check_paged(dev: &dyn Device, stream: StreamId) -> Result<u32, CheckError> {
    let mut verified = 0;
    for (name, raw) in check_layouts() {
        let layout = PagedLayout::new(&raw).map_err(|source| CheckError::Layout {
            layout: name,
            source,
        })?;
        let bb = layout.info().block_bytes as usize;
        let mut engine_host = vec![0u8; raw.buffer_bytes as usize];
        fill_random(&mut engine_host, raw.buffer_bytes);
        let pages: Vec<u32> = (0..raw.num_pages as u32).rev().step_by(2).collect();
        // CPU reference: the host build gathers from a copy of the engine buffer.
        let mut want = vec![0u8; pages.len() * bb];
        let mut ref_engine = engine_host.clone();
        // SAFETY: ref_engine lives to the end of this iteration, accessed only via `kv`.
        let kv = unsafe {
            EngineKv::new(
                NonNull::new(ref_engine.as_mut_ptr()).expect("non-null"),
                ref_engine.len(),
            )
        };
        let reference = |source| CheckError::Reference {
            layout: name,
            source,
        };
        kvplane_kernels::gather(&kv, &layout, &pages, &mut want, HostLaunch::default())
            .map_err(reference)?;

        let engine = dev.alloc(engine_host.len())?;
        let blocks = dev.alloc(want.len())?;
        let lid = dev.upload_layout(&layout)?;
        let outcome = (|| {
            dev.copy_to_device(stream, &engine_host, engine.whole())?;
            dev.gather(stream, engine, lid, &pages, blocks.whole())?;
            let mut got = vec![0u8; want.len()];
            dev.copy_to_host(stream, blocks.whole(), &mut got)?;
            if got != want {
                return Err(CheckError::PagedMismatch {
                    what: "gather",
                    layout: name,
                });
            }
            // Scatter fresh blocks back; compare the whole engine buffer with the CPU's.
            let mut fresh = vec![0u8; want.len()];
            fill_random(&mut fresh, 77);
            dev.copy_to_device(stream, &fresh, blocks.whole())?;
            dev.scatter(stream, engine, lid, &pages, blocks.whole())?;
            kvplane_kernels::scatter(&kv, &layout, &pages, &fresh, HostLaunch::default())
                .map_err(reference)?;
            let mut got_engine = vec![0u8; engine_host.len()];
            dev.copy_to_host(stream, engine.whole(), &mut got_engine)?;
            if got_engine != ref_engine {
                return Err(CheckError::PagedMismatch {
                    what: "scatter",
                    layout: name,
                });
            }
            Ok(())
        })();
        free_all(dev, &[engine, blocks])?;
        dev.free_layout(lid)?;
        outcome?;
        verified += 1;
    }
    Ok(verified)
}

/// Slot offsets for `n` blocks of `bb` bytes: every other slot of stride `bb + 40`, in
/// reversed and rotated order, from byte 3 (so blocks start unaligned, out of order, with
/// gaps). Returns the offsets and the buffer length they need.
fn slot_offsets(n: usize, bb: usize) -> (Vec<u64>, usize) {
    let stride = (bb + 40) as u64;
    let n64 = n as u64;
    let offsets = (0..n64)
        .map(|i| 3 + ((n64 - 1 - i + n64 / 2 + 1) % n64) * 2 * stride)
        .collect();
    (offsets, 3 + 2 * n * stride as usize)
}

/// `gather_to_slots` and `scatter_from_slots` on the device equal the contiguous
/// `gather` and `scatter` of the same pages on the same device: each slot holds the block
/// the contiguous launch put at its index, bytes between slots are untouched, and a
/// scatter from slots leaves the engine buffer as a contiguous scatter of the same blocks.
fn check_slots(dev: &dyn Device, stream: StreamId) -> Result<u32, CheckError> {
    const POISON: u8 = 0xA5;
    let mut verified = 0;
    for (name, raw) in check_layouts() {
        let layout = PagedLayout::new(&raw).map_err(|source| CheckError::Layout {
            layout: name,
            source,
        })?;
        let bb = layout.info().block_bytes as usize;
        let mut engine_host = vec![0u8; raw.buffer_bytes as usize];
        fill_random(&mut engine_host, raw.buffer_bytes ^ 0x510f);
        let pages: Vec<u32> = (0..raw.num_pages as u32).step_by(2).rev().collect();
        let (offsets, slots_len) = slot_offsets(pages.len(), bb);
        let engine = dev.alloc(engine_host.len())?;
        let contiguous = dev.alloc(pages.len() * bb)?;
        let slots = dev.alloc(slots_len)?;
        let lid = dev.upload_layout(&layout)?;
        let outcome = (|| {
            let mismatch = |what| CheckError::SlotMismatch { what, layout: name };
            dev.copy_to_device(stream, &engine_host, engine.whole())?;
            dev.copy_to_device(stream, &vec![POISON; slots_len], slots.whole())?;
            dev.gather(stream, engine, lid, &pages, contiguous.whole())?;
            dev.gather_to_slots(stream, engine, lid, &pages, slots, &offsets)?;
            let mut want = vec![0u8; pages.len() * bb];
            dev.copy_to_host(stream, contiguous.whole(), &mut want)?;
            let mut got = vec![0u8; slots_len];
            dev.copy_to_host(stream, slots.whole(), &mut got)?;
            let mut expect = vec![POISON; slots_len];
            for (i, o) in offsets.iter().map(|o| *o as usize).enumerate() {
                expect[o..o + bb].copy_from_slice(&want[i * bb..(i + 1) * bb]);
            }
            if got != expect {
                return Err(mismatch("gather_to_slots"));
            }
            // Fresh blocks in the slots; the same blocks contiguous for the reference.
            let mut fresh = vec![0u8; slots_len];
            fill_random(&mut fresh, 0x5107);
            let mut packed = vec![0u8; pages.len() * bb];
            for (i, o) in offsets.iter().map(|o| *o as usize).enumerate() {
                packed[i * bb..(i + 1) * bb].copy_from_slice(&fresh[o..o + bb]);
            }
            dev.copy_to_device(stream, &fresh, slots.whole())?;
            dev.scatter_from_slots(stream, engine, lid, &pages, slots, &offsets)?;
            let mut got_engine = vec![0u8; engine_host.len()];
            dev.copy_to_host(stream, engine.whole(), &mut got_engine)?;
            dev.copy_to_device(stream, &engine_host, engine.whole())?;
            dev.copy_to_device(stream, &packed, contiguous.whole())?;
            dev.scatter(stream, engine, lid, &pages, contiguous.whole())?;
            let mut want_engine = vec![0u8; engine_host.len()];
            dev.copy_to_host(stream, engine.whole(), &mut want_engine)?;
            if got_engine != want_engine || got_engine == engine_host {
                return Err(mismatch("scatter_from_slots"));
            }
            Ok(())
        })();
        free_all(dev, &[engine, contiguous, slots])?;
        dev.free_layout(lid)?;
        outcome?;
        verified += 1;
    }
    Ok(verified)
}

fn free_all(dev: &dyn Device, bufs: &[DeviceBuffer]) -> Result<(), DeviceError> {
    for b in bufs {
        dev.free(*b)?;
    }
    Ok(())
}

/// Runs the whole check on `dev`.
pub fn run(dev: &dyn Device, cfg: &CheckConfig) -> Result<Report, CheckError> {
    let stream = dev.create_stream()?;
    let paged_layouts_verified = check_paged(dev, stream)?;
    let slot_layouts_verified = check_slots(dev, stream)?;
    let mac = check_mac(dev, stream, cfg.iters.max(1))?;
    let file = match &cfg.file_dir {
        Some(dir) => check_file(dev, stream, dir, cfg.iters.max(1))?,
        None => FileCheck::not_run("", "not asked for (--no-file)"),
    };
    let (cases, skipped) = plan(cfg);
    let mut rows = Vec::new();
    for case in cases {
        rows.push(run_case(dev, stream, case, cfg.iters)?);
    }
    Ok(Report {
        backend: dev.backend().as_str(),
        device: dev.describe(),
        rows,
        skipped,
        paged_layouts_verified,
        slot_layouts_verified,
        mac,
        file,
    })
}

pub(crate) fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn pct(x: f64, of: f64) -> f64 {
    if of > 0.0 { 100.0 * x / of } else { 0.0 }
}

/// The report as a Markdown table.
pub fn format_report(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("backend: {} ({})\n", r.backend, r.device));
    s.push_str(&format!(
        "gather/scatter equal to the CPU build on {} layouts; every copy verified by checksum\n",
        r.paged_layouts_verified
    ));
    s.push_str(&format!(
        "gather_to_slots/scatter_from_slots (out-of-order, unaligned slots) equal to the contiguous kernels on {} layouts\n\n",
        r.slot_layouts_verified
    ));
    s.push_str(&format!(
        "slot MAC (keyed BLAKE3) on the device equal to the CPU's on {} blocks; {} x {}: device {:.1} GB/s, one CPU core {:.1} GB/s\n\n",
        r.mac.blocks_verified,
        r.mac.timed_blocks,
        size_label(r.mac.timed_block_bytes),
        r.mac.device_gbps,
        r.mac.cpu_gbps,
    ));
    match &r.file.not_run {
        None => s.push_str(&format!(
            "device memory <-> O_DIRECT file in {} (write_file/read_file): {} transfers equal byte for byte; {} x {}: write {:.2} GB/s, read {:.2} GB/s\n\n",
            r.file.dir,
            r.file.transfers_verified,
            r.file.timed_blocks,
            size_label(r.file.timed_block_bytes),
            r.file.write_gbps,
            r.file.read_gbps,
        )),
        Some(why) => s.push_str(&format!(
            "device memory <-> file in {}: NOT RUN ({why})\n\n",
            r.file.dir
        )),
    }
    s.push_str("device to device (G1 copies): batched-copy kernel and one cuMemcpyAsync per block vs one bulk copy\n\n");
    s.push_str("| block | batch | kernel GB/s | % d2d | copy engine GB/s | % d2d | d2d GB/s |\n");
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1} |\n",
            size_label(row.case.block_bytes),
            row.case.batch,
            row.kernel_gbps,
            pct(row.kernel_gbps, row.d2d_gbps),
            row.copy_engine_gbps,
            pct(row.copy_engine_gbps, row.d2d_gbps),
            row.d2d_gbps,
        ));
    }
    if !r.skipped.is_empty() {
        let list: Vec<String> = r
            .skipped
            .iter()
            .map(|c| format!("{} x {}", size_label(c.block_bytes), c.batch))
            .collect();
        s.push_str(&format!(
            "\nskipped (over the per-case memory budget): {}\n",
            list.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostDevice;

    #[test]
    fn default_plan_covers_8k_to_4m_and_1_to_4096() {
        let cfg = CheckConfig::default();
        let (run, skipped) = plan(&cfg);
        assert_eq!(
            run[0],
            Case {
                block_bytes: 8 << 10,
                batch: 1
            }
        );
        assert_eq!(cfg.block_sizes.last(), Some(&(4 << 20)));
        assert_eq!(cfg.batch_sizes.last(), Some(&4096));
        assert_eq!(run.len() + skipped.len(), 10 * 7);
        // 4 MiB x 4096 = 16 GiB is over the 2 GiB budget; 512 KiB x 4096 = 2 GiB is in.
        assert!(skipped.contains(&Case {
            block_bytes: 4 << 20,
            batch: 4096
        }));
        assert!(run.contains(&Case {
            block_bytes: 512 << 10,
            batch: 4096
        }));
        assert!(
            run.iter()
                .all(|c| c.block_bytes * c.batch <= cfg.max_batch_bytes)
        );
    }

    #[test]
    fn whole_check_runs_on_the_host_backend() {
        let dev = HostDevice::new();
        // Beside the test binary: on the disk under target/, where O_DIRECT works (a
        // tmpfs /tmp refuses it).
        let file_dir = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let cfg = CheckConfig {
            block_sizes: vec![8 << 10, 24 << 10],
            batch_sizes: vec![1, 3, 64],
            max_batch_bytes: 2 << 20,
            iters: 2,
            file_dir: Some(file_dir),
        };
        let report = run(&dev, &cfg).expect("check");
        assert_eq!(report.backend, "host");
        assert_eq!(report.paged_layouts_verified, 3);
        assert_eq!(report.slot_layouts_verified, 3);
        assert_eq!(report.mac.blocks_verified, 8 + 16);
        assert!(report.mac.device_gbps > 0.0 && report.mac.cpu_gbps > 0.0);
        assert_eq!(report.file.not_run, None, "{:?}", report.file);
        assert_eq!(report.file.transfers_verified, 2 + 16);
        assert!(report.file.write_gbps > 0.0 && report.file.read_gbps > 0.0);
        assert_eq!(report.rows.len(), 6);
        assert!(report.skipped.is_empty());
        for row in &report.rows {
            for v in [row.kernel_gbps, row.copy_engine_gbps, row.d2d_gbps] {
                assert!(v.is_finite() && v > 0.0, "{row:?}");
            }
        }
        let table = format_report(&report);
        assert!(table.contains("backend: host"));
        assert!(table.contains("equal to the CPU's on 24 blocks"), "{table}");
        assert!(
            table.contains("18 transfers equal byte for byte"),
            "{table}"
        );
        assert!(table.contains("| 24 KiB | 64 |"), "{table}");
        assert_eq!(table.lines().filter(|l| l.starts_with("| ")).count(), 1 + 6);
    }

    #[test]
    fn verify_names_the_first_bad_block() {
        let case = Case {
            block_bytes: 8192,
            batch: 3,
        };
        verify("x", case, &[1, 2, 3], &[1, 2, 3]).expect("equal");
        match verify("copy kernel", case, &[1, 9, 3], &[1, 2, 3]) {
            Err(CheckError::Mismatch {
                index: 1,
                got: 9,
                want: 2,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(size_label(8 << 10), "8 KiB");
        assert_eq!(size_label(4 << 20), "4 MiB");
        assert_eq!(size_label(1000), "1000 B");
    }

    #[test]
    fn check_slot_offsets_are_disjoint_out_of_order_and_unaligned() {
        for (n, bb) in [(1usize, 64usize), (3, 100), (5, 72), (12, 4096)] {
            let (offsets, len) = slot_offsets(n, bb);
            let mut sorted = offsets.clone();
            sorted.sort_unstable();
            assert!(sorted.windows(2).all(|w| w[1] - w[0] >= bb as u64 + 40));
            // Even block sizes: every block starts at an odd address offset.
            assert!(
                offsets
                    .iter()
                    .all(|o| o % 2 == 1 && *o as usize + bb <= len)
            );
            if n > 2 {
                assert_ne!(offsets, sorted, "out of order");
            }
        }
    }
}

//! Launch shapes for the GPU (the cuda backend uses these; the tests run the host build
//! of the kernels with exactly these shapes, thread by thread, so the GPU work split is
//! checked on the CPU too).

use crate::layout::LayoutInfo;
use kvplane_ffi::kvp_copy_desc;

/// Grid and block dimensions of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLaunch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Threads per block for every kernel: 8 warps.
pub const THREADS_PER_BLOCK: u32 = 256;
/// CUDA's limit on gridDim.y (and z).
pub const MAX_GRID_Y: u32 = 65_535;
/// Cap on gridDim.x: plenty to fill any current GPU; kernels stride beyond it.
pub const MAX_GRID_X: u32 = 4096;

fn clamp_u32(v: u64, lo: u32, hi: u32) -> u32 {
    v.clamp(u64::from(lo), u64::from(hi)) as u32
}

/// Paged gather/scatter: lanes per run sized to the run (32..=256 lanes of 16 bytes),
/// the rest of the block's threads take further runs; blockIdx.y walks (page, layer,
/// plane) triples.
pub fn paged(info: &LayoutInfo, layers_planes: u32, batch_pages: u32) -> GpuLaunch {
    let vectors = info.run_bytes.div_ceil(16);
    let lanes = clamp_u32(vectors.next_power_of_two(), 32, THREADS_PER_BLOCK);
    let groups_per_block = THREADS_PER_BLOCK / lanes;
    let runs_per_lp = info.runs_per_block / u64::from(layers_planes.max(1));
    let grid_x = clamp_u32(
        runs_per_lp.div_ceil(u64::from(groups_per_block)),
        1,
        MAX_GRID_X,
    );
    let plane_pages = u64::from(batch_pages) * u64::from(layers_planes);
    GpuLaunch {
        grid: (grid_x, clamp_u32(plane_pages, 1, MAX_GRID_Y), 1),
        block: (lanes, groups_per_block, 1),
    }
}

/// Batched copy: one row of blocks per descriptor, each descriptor cut into up to
/// `grid_x` chunks of at least 64 KiB, 256 lanes per chunk.
pub fn copy(descs: &[kvp_copy_desc]) -> GpuLaunch {
    let max_bytes = descs.iter().map(|d| d.bytes).max().unwrap_or(0);
    GpuLaunch {
        grid: (
            clamp_u32(max_bytes.div_ceil(64 << 10), 1, 256),
            clamp_u32(descs.len() as u64, 1, MAX_GRID_Y),
            1,
        ),
        block: (THREADS_PER_BLOCK, 1, 1),
    }
}

/// Checksum partial sums: about 16 words per thread, up to 1024 blocks per descriptor.
pub fn checksum(descs: &[kvp_copy_desc]) -> GpuLaunch {
    let max_words = descs.iter().map(|d| d.bytes.div_ceil(8)).max().unwrap_or(0);
    GpuLaunch {
        grid: (
            clamp_u32(
                max_words.div_ceil(16 * u64::from(THREADS_PER_BLOCK)),
                1,
                1024,
            ),
            clamp_u32(descs.len() as u64, 1, MAX_GRID_Y),
            1,
        ),
        block: (THREADS_PER_BLOCK, 1, 1),
    }
}

/// Checksum finalisation: one thread per descriptor.
pub fn checksum_finalize(num_descs: usize) -> GpuLaunch {
    GpuLaunch {
        grid: (
            clamp_u32(
                (num_descs as u64).div_ceil(u64::from(THREADS_PER_BLOCK)),
                1,
                MAX_GRID_X,
            ),
            1,
            1,
        ),
        block: (THREADS_PER_BLOCK, 1, 1),
    }
}

/// Largest chunk count (1 KiB BLAKE3 chunks, at least one) of the descriptors.
fn max_mac_chunks(descs: &[kvp_copy_desc]) -> u64 {
    descs
        .iter()
        .map(|d| d.bytes.div_ceil(1024).max(1))
        .max()
        .unwrap_or(1)
}

/// MAC chunk hashing: one thread per 1 KiB chunk (a 2 MiB block is 2048 threads), up
/// to 1024 blocks per descriptor.
pub fn mac_chunks(descs: &[kvp_copy_desc]) -> GpuLaunch {
    GpuLaunch {
        grid: (
            clamp_u32(
                max_mac_chunks(descs).div_ceil(u64::from(THREADS_PER_BLOCK)),
                1,
                1024,
            ),
            clamp_u32(descs.len() as u64, 1, MAX_GRID_Y),
            1,
        ),
        block: (THREADS_PER_BLOCK, 1, 1),
    }
}

/// One level of MAC parent merges: one thread per pair of the level's nodes.
pub fn mac_parents(descs: &[kvp_copy_desc], level: u32) -> GpuLaunch {
    let pairs = max_mac_chunks(descs)
        .checked_shr(level + 1)
        .unwrap_or(0)
        .max(1);
    GpuLaunch {
        grid: (
            clamp_u32(pairs.div_ceil(u64::from(THREADS_PER_BLOCK)), 1, 1024),
            clamp_u32(descs.len() as u64, 1, MAX_GRID_Y),
            1,
        ),
        block: (THREADS_PER_BLOCK, 1, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(run_bytes: u64, runs_per_block: u64) -> LayoutInfo {
        LayoutInfo {
            block_bytes: run_bytes * runs_per_block,
            layer_plane_bytes: 0,
            run_bytes,
            runs_per_block,
            span_bytes: 0,
            plane_span_bytes: 0,
        }
    }

    #[test]
    fn paged_shapes_fit_cuda_limits() {
        // vLLM 70B page: 160 (layer, plane) runs of 32 KiB.
        let l = paged(&info(32 << 10, 160), 160, 64);
        assert_eq!(l.block, (256, 1, 1));
        assert_eq!(l.grid, (1, 64 * 160, 1));
        // TRT-LLM head-major: 256-byte runs, 16 tokens * 8 heads per (layer, plane).
        let l = paged(&info(256, 160 * 128), 160, 4);
        assert_eq!(l.block, (32, 8, 1));
        assert_eq!(l.grid, (16, 640, 1));
        // Huge batches stay within gridDim.y; tiny runs still use a full warp.
        let l = paged(&info(3, 10), 2, 100_000);
        assert_eq!(l.grid.1, MAX_GRID_Y);
        assert_eq!(l.block.0, 32);
        for l in [
            paged(&info(1 << 20, 2), 2, 1),
            copy(&[]),
            checksum(&[]),
            checksum_finalize(0),
        ] {
            assert!(l.block.0 * l.block.1 * l.block.2 <= 1024);
            assert!(l.grid.0 >= 1 && l.grid.1 >= 1 && l.grid.1 <= MAX_GRID_Y);
        }
    }

    #[test]
    fn copy_and_checksum_scale_with_the_largest_descriptor() {
        let d = |bytes| kvp_copy_desc {
            src_offset: 0,
            dst_offset: 0,
            bytes,
        };
        assert_eq!(copy(&[d(8 << 10)]).grid, (1, 1, 1));
        assert_eq!(copy(&[d(4 << 20), d(1)]).grid, (64, 2, 1));
        assert_eq!(checksum(&[d(4 << 20)]).grid, (128, 1, 1));
        assert_eq!(checksum_finalize(1000).grid, (4, 1, 1));
    }
}

//! Page geometry, the engine's KV layout as the daemon sees it, block hashes of trace
//! requests, and the deterministic page contents checked on every load.

use kvplane_ffi::{Pod, kvp_kv_layout};
use kvplane_router::hash::{XXH3_SEED, sequence_hash};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Tokens per `hash_ids` entry of a Mooncake trace.
pub const TRACE_BLOCK_TOKENS: u64 = 512;

/// Shape of one engine page (= one daemon block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGeometry {
    pub layers: u32,
    /// 2 (K and V).
    pub planes: u32,
    pub page_tokens: u32,
    pub kv_heads: u32,
    pub head_bytes: u32,
    pub num_pages: u32,
}

impl Default for KvGeometry {
    fn default() -> Self {
        KvGeometry {
            layers: 2,
            planes: 2,
            page_tokens: 64,
            kv_heads: 1,
            head_bytes: 16,
            num_pages: 16_384,
        }
    }
}

impl KvGeometry {
    /// Bytes of one (layer, plane) slice of a page.
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.page_tokens) * u64::from(self.kv_heads) * u64::from(self.head_bytes)
    }

    /// Bytes of one page (all layers and planes) = the daemon's block size.
    pub fn block_bytes(&self) -> u64 {
        self.chunk_bytes() * u64::from(self.layers) * u64::from(self.planes)
    }

    /// Bytes of the whole pool.
    pub fn pool_bytes(&self) -> u64 {
        self.block_bytes() * u64::from(self.num_pages)
    }

    /// Offset of (layer, plane, page) in the pool: one page array per layer and plane,
    /// as vLLM allocates `[2, pages, tokens, heads, dim]` per layer.
    pub fn chunk_offset(&self, layer: u32, plane: u32, page: u32) -> u64 {
        let region = u64::from(layer * self.planes + plane);
        (region * u64::from(self.num_pages) + u64::from(page)) * self.chunk_bytes()
    }

    /// The `kvp_kv_layout` describing this pool to the daemon.
    pub fn layout(&self) -> kvp_kv_layout {
        let mut l: kvp_kv_layout = Pod::zeroed();
        l.num_layers = self.layers;
        l.kv_planes = self.planes;
        l.page_tokens = self.page_tokens;
        l.kv_heads = self.kv_heads;
        l.head_bytes = self.head_bytes;
        l.dtype_bytes = 2;
        l.num_pages = u64::from(self.num_pages);
        l.page_stride_bytes = self.chunk_bytes();
        l.token_stride_bytes = u64::from(self.kv_heads) * u64::from(self.head_bytes);
        l.head_stride_bytes = u64::from(self.head_bytes);
        l.buffer_bytes = self.pool_bytes();
        for layer in 0..self.layers {
            for plane in 0..self.planes {
                l.plane_offset[plane as usize][layer as usize] = self.chunk_offset(layer, plane, 0);
            }
        }
        l
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.layers == 0 || self.layers as usize > kvplane_ffi::MAX_LAYERS {
            return Err(format!("layers must be in 1..=256, got {}", self.layers));
        }
        if self.planes != 2 {
            return Err(format!("planes must be 2 (K and V), got {}", self.planes));
        }
        if self.page_tokens == 0 || self.kv_heads == 0 || self.head_bytes == 0 {
            return Err("page_tokens, kv_heads and head_bytes must be at least 1".into());
        }
        if self.head_bytes % 8 != 0 {
            return Err(format!(
                "head_bytes must be a multiple of 8 (content is written in u64 words), got {}",
                self.head_bytes
            ));
        }
        if self.num_pages < 2 {
            return Err(format!(
                "num_pages must be at least 2, got {}",
                self.num_pages
            ));
        }
        Ok(())
    }
}

/// Chained sequence hashes of the full pages of a trace request: page `i` lies in trace
/// block `i / (512 / page_tokens)`; its local hash mixes that block's id with the page's
/// index inside the block, and the chain is Dynamo's `sequence_hash`. A trailing partial
/// page is not hashed (it is always computed), as in vLLM and Dynamo.
pub fn page_hashes(hash_ids: &[u64], input_tokens: u64, page_tokens: u32) -> Vec<u64> {
    let pt = u64::from(page_tokens.max(1));
    let pages = (input_tokens / pt).min(hash_ids.len() as u64 * TRACE_BLOCK_TOKENS / pt);
    let mut out = Vec::with_capacity(pages as usize);
    let mut parent = None;
    for i in 0..pages {
        let first_token = i * pt;
        let block = (first_token / TRACE_BLOCK_TOKENS) as usize;
        let within = first_token % TRACE_BLOCK_TOKENS;
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&hash_ids[block].to_le_bytes());
        buf[8..].copy_from_slice(&within.to_le_bytes());
        let local = xxh3_64_with_seed(&buf, XXH3_SEED);
        let h = sequence_hash(parent, local);
        out.push(h);
        parent = Some(h);
    }
    out
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The packed block (`[layers][planes][tokens][heads][head_bytes]`) of the page with
/// sequence hash `hash`: a pseudo-random stream seeded by the hash, so any misplaced,
/// stale or torn page is detected by comparison.
pub fn fill_block(hash: u64, out: &mut [u8]) {
    let mut state = hash ^ 0x6b76_706c_616e_6521;
    for word in out.chunks_mut(8) {
        let v = splitmix64(&mut state).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_defaults_and_layout() {
        let g = KvGeometry::default();
        g.validate().unwrap();
        assert_eq!(g.block_bytes(), 4096);
        assert_eq!(g.pool_bytes(), 64 << 20);
        let l = g.layout();
        // Region (layer 1, plane 0) starts after the two page arrays of layer 0.
        assert_eq!(l.plane_offset[0][1], 2 * 16_384 * 1024);
        assert_eq!(l.plane_offset[1][0], 16_384 * 1024);
        // The last byte of the last page of the last region is the end of the buffer.
        let last = g.chunk_offset(1, 1, g.num_pages - 1) + g.chunk_bytes();
        assert_eq!(last, l.buffer_bytes);
    }

    #[test]
    fn page_hashes_follow_shared_trace_prefixes() {
        // 1100 tokens, 3 trace blocks: 17 full pages of 64 (the 18th is partial).
        let a = page_hashes(&[7, 8, 9], 1100, 64);
        assert_eq!(a.len(), 17);
        let b = page_hashes(&[7, 8, 10], 1100, 64);
        // Same first two trace blocks = same first 16 pages; block 3 differs.
        assert_eq!(a[..16], b[..16]);
        assert_ne!(a[16], b[16]);
        // Different first block: nothing shared, even for later identical ids.
        let c = page_hashes(&[6, 8, 9], 1100, 64);
        assert!(a.iter().zip(&c).all(|(x, y)| x != y));
        // All distinct within a request.
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
    }

    #[test]
    fn content_is_deterministic_and_hash_specific() {
        let mut x = vec![0u8; 4096];
        let mut y = vec![0u8; 4096];
        fill_block(42, &mut x);
        fill_block(42, &mut y);
        assert_eq!(x, y);
        fill_block(43, &mut y);
        assert_ne!(x, y);
        assert!(x.iter().any(|&b| b != 0));
    }
}

//! NVIDIA Dynamo's chained block hash, so kvplane block keys and events interoperate with
//! Dynamo's KV router unchanged.
//!
//! - `salt_hash` starts at 1337; a LoRA name adds `xxh3_64(lora_name, seed = 0)`, a salt
//!   adds `xxh3_64(salt, seed = 1)` (wrapping additions).
//! - `block_hash[i] = xxh3_64(tokens of block i as little-endian u32, seed = salt_hash)`.
//! - `sequence_hash[0] = block_hash[0]`,
//!   `sequence_hash[i] = xxh3_64(le(sequence_hash[i-1]) || le(block_hash[i]), seed = 1337)`.
//!
//! A trailing partial block is not hashed. `tests/hash_vectors.rs` checks every vector
//! computed by Dynamo's own crate (`dynamo-kv-hashing` 1.6.1).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Chained sequence hash of a block: identifies the block *and its whole prefix*.
pub type SequenceHash = u64;
/// Hash of one block's tokens alone (no prefix).
pub type LocalBlockHash = u64;

/// Dynamo's base seed, used for the salt start value and for chaining.
pub const XXH3_SEED: u64 = 1337;

/// The namespace salt: 1337, plus the LoRA name hash, plus the salt string hash.
pub fn salt_hash(salt: Option<&str>, lora_name: Option<&str>) -> u64 {
    let mut h = XXH3_SEED;
    if let Some(lora) = lora_name {
        h = h.wrapping_add(xxh3_64_with_seed(lora.as_bytes(), 0));
    }
    if let Some(salt) = salt {
        h = h.wrapping_add(xxh3_64_with_seed(salt.as_bytes(), 1));
    }
    h
}

/// Hash of one full block of token ids (u32 little-endian bytes) seeded by `salt_hash`.
pub fn block_hash(tokens: &[u32], salt_hash: u64) -> LocalBlockHash {
    // Stack buffer for the common block sizes; no allocation on the hot path.
    let mut stack = [0u8; 4 * 512];
    let bytes_len = tokens.len() * 4;
    if bytes_len <= stack.len() {
        for (dst, t) in stack.chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&stack[..bytes_len], salt_hash)
    } else {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, salt_hash)
    }
}

/// Chains a block onto its parent's sequence hash (`None` for the first block).
pub fn sequence_hash(parent: Option<SequenceHash>, block: LocalBlockHash) -> SequenceHash {
    match parent {
        None => block,
        Some(parent) => {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&parent.to_le_bytes());
            buf[8..].copy_from_slice(&block.to_le_bytes());
            xxh3_64_with_seed(&buf, XXH3_SEED)
        }
    }
}

/// Local block hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[u32], block_size: usize, salt_hash: u64) -> Vec<LocalBlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    tokens
        .chunks_exact(block_size)
        .map(|b| block_hash(b, salt_hash))
        .collect()
}

/// Chains local block hashes into sequence hashes.
pub fn chain(block_hashes: &[LocalBlockHash]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(block_hashes.len());
    let mut parent = None;
    for &b in block_hashes {
        let s = sequence_hash(parent, b);
        out.push(s);
        parent = Some(s);
    }
    out
}

/// Sequence hashes of every full block of `tokens` (a trailing partial block is skipped).
pub fn sequence_hashes(tokens: &[u32], block_size: usize, salt_hash: u64) -> Vec<SequenceHash> {
    chain(&block_hashes(tokens, block_size, salt_hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_block_is_not_hashed() {
        let tokens: Vec<u32> = (0..15).collect();
        assert!(sequence_hashes(&tokens, 16, salt_hash(None, None)).is_empty());
        assert!(sequence_hashes(&tokens, 0, 1337).is_empty());
    }

    #[test]
    fn chain_depends_on_prefix() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 99;
        let ha = sequence_hashes(&a, 16, 1337);
        let hb = sequence_hashes(&b, 16, 1337);
        // Same second block tokens, different prefix: different sequence hash.
        assert_ne!(ha[1], hb[1]);
        assert_eq!(block_hash(&a[16..], 1337), block_hash(&b[16..], 1337));
    }
}

/// The hasher of maps keyed by block hashes (the router's index, the daemon's registry).
/// The keys are xxh3 hashes already: one folded multiply spreads them over both the high
/// bits (hashbrown's tag) and the low bits (its bucket index), and copes with test keys
/// like 0, 1, 2. They come from engines, though, not from our own hashing, so a
/// per-process random seed goes into the multiply (as foldhash does): hashes an engine
/// chose offline to share buckets would otherwise make every probe walk a long chain
/// (the registry's under the lock every session takes).
#[derive(Clone, Copy, Debug)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let m = u128::from(self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (m as u64) ^ ((m >> 64) as u64)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        // Multiplied in, not only xored: (namespace, hash) keys whose xor agreed would
        // share a hash whatever the seed.
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0xA076_1D64_78BD_642F);
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Builds [`KeyHasher`]s seeded with the process's random seed (one per process, so every
/// map of it agrees).
#[derive(Clone, Copy, Debug)]
pub struct BuildKeyHasher {
    seed: u64,
}

impl BuildKeyHasher {
    /// A fixed seed: tests, and what an attacker would target with seed 0.
    pub fn with_seed(seed: u64) -> Self {
        BuildKeyHasher { seed }
    }
}

impl Default for BuildKeyHasher {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // std's RandomState is keyed from the OS's random source.
        let seed = *SEED.get_or_init(|| {
            std::hash::BuildHasher::hash_one(
                &std::hash::RandomState::new(),
                0x6b76_706c_616e_6500u64,
            )
        });
        BuildKeyHasher { seed }
    }
}

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.seed)
    }
}

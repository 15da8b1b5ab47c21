//! The block checksum, "kvp checksum v1". One definition used by the NVMe slot headers
//! (daemon) and the checksum kernel (`checksum.cu`), so a transfer can be verified on
//! either side.
//!
//! Data is read as little-endian u64 words; a tail of fewer than 8 bytes is zero-extended
//! into one last word. Word i contributes `mix64(word_i ^ (i * GOLDEN))`; the contributions
//! are summed with wrapping addition (order-free, so a GPU reduces it in parallel) and the
//! result is `mix64(sum ^ len_bytes)`. Position-dependent, so a swapped or torn 8-byte word
//! changes it; not cryptographic.

/// Odd constant from the golden ratio, as in splitmix64.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a cheap bijective 64-bit mixer.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Checksum of `data` (see the module docs).
pub fn checksum64(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(8);
    let mut index = 0u64;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        sum = sum.wrapping_add(mix64(word ^ index.wrapping_mul(GOLDEN)));
        index += 1;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        let word = u64::from_le_bytes(last);
        sum = sum.wrapping_add(mix64(word ^ index.wrapping_mul(GOLDEN)));
    }
    mix64(sum ^ data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_position_and_content_changes() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let base = checksum64(&data);
        let mut flipped = data.clone();
        flipped[1234] ^= 1;
        assert_ne!(base, checksum64(&flipped));
        let mut swapped = data.clone();
        swapped.swap(0, 8);
        if data[0] != data[8] {
            assert_ne!(base, checksum64(&swapped));
        }
        // Length is part of it: trailing zeros are not free.
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(base, checksum64(&longer));
        assert_ne!(checksum64(&[]), checksum64(&[0]));
    }

    #[test]
    fn fixed_values() {
        // Pinned so the .cu kernel and any reimplementation can be checked against it.
        assert_eq!(checksum64(&[]), mix64(0));
        let words: Vec<u8> = [1u64, 2].iter().flat_map(|w| w.to_le_bytes()).collect();
        let expect = mix64(mix64(1).wrapping_add(mix64(2 ^ GOLDEN)) ^ 16);
        assert_eq!(checksum64(&words), expect);
    }
}

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

/// Checksum of `data` (see the module docs). Runs on the widest vector unit the CPU has
/// (AVX-512, AVX2, else scalar): every slot write and staging read pays it, and the scalar
/// loop ran at under half the disk's write rate on the development VM.
pub fn checksum64(data: &[u8]) -> u64 {
    mix64(word_sum(data, 0) ^ data.len() as u64)
}

/// The scalar definition, kept as the reference the vector paths are tested against.
pub fn checksum64_scalar(data: &[u8]) -> u64 {
    mix64(word_sum_from(data, 0, 0, 0) ^ data.len() as u64)
}

/// [`checksum64`] computed piece by piece, so a caller can run another pass (the slot
/// MAC) over each piece while it is still in cache: every piece but the last must be a
/// whole number of words (8 bytes). Equal to `checksum64` of the pieces joined.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checksum64 {
    sum: u64,
    len_bytes: u64,
}

impl Checksum64 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece.
    ///
    /// # Panics
    /// If an earlier piece ended inside a word.
    pub fn update(&mut self, piece: &[u8]) {
        assert!(
            self.len_bytes % 8 == 0,
            "only the last piece may end inside a word"
        );
        self.sum = self.sum.wrapping_add(word_sum(piece, self.len_bytes / 8));
        self.len_bytes += piece.len() as u64;
    }

    pub fn finish(&self) -> u64 {
        mix64(self.sum ^ self.len_bytes)
    }
}

/// Wrapping sum of the word contributions of `data`, its first word being word
/// `first_word` of the whole.
fn word_sum(data: &[u8], first_word: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            return unsafe { x86::word_sum_avx512(data, first_word) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { x86::word_sum_avx2(data, first_word) };
        }
    }
    word_sum_lanes::<4>(data, first_word)
}

/// Sums the contributions of the words of `data` from byte `done` on (a multiple of 8),
/// one word at a time, onto `sum` (`data` starting at word `first_word`); a short tail
/// is zero-extended into a last word.
#[inline(always)]
fn word_sum_from(data: &[u8], done: usize, mut sum: u64, first_word: u64) -> u64 {
    let mut index = first_word.wrapping_add((done / 8) as u64);
    let mut chunks = data[done..].chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        sum = sum.wrapping_add(mix64(word ^ index.wrapping_mul(GOLDEN)));
        index = index.wrapping_add(1);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        let word = u64::from_le_bytes(last);
        sum = sum.wrapping_add(mix64(word ^ index.wrapping_mul(GOLDEN)));
    }
    sum
}

/// The same sum with `L` independent lanes: lane j takes words j, j + L, ... (the sum is
/// order-free), written so that the compiler maps the lanes onto vector registers (the
/// 64-bit multiplies are one instruction with AVX-512DQ, emulated with 32-bit ones on
/// AVX2). Words past the last full group of `L` go through [`word_sum_from`].
#[inline(always)]
fn word_sum_lanes<const L: usize>(data: &[u8], first_word: u64) -> u64 {
    let mut acc = [0u64; L];
    // Lane j's next `index * GOLDEN`, advanced by L * GOLDEN per group (wrapping, so equal
    // to the product).
    let mut golden = [0u64; L];
    for (j, g) in golden.iter_mut().enumerate() {
        *g = first_word.wrapping_add(j as u64).wrapping_mul(GOLDEN);
    }
    let step = (L as u64).wrapping_mul(GOLDEN);
    let mut groups = data.chunks_exact(8 * L);
    for group in &mut groups {
        for j in 0..L {
            let word = u64::from_le_bytes(group[8 * j..8 * j + 8].try_into().expect("8 bytes"));
            acc[j] = acc[j].wrapping_add(mix64(word ^ golden[j]));
            golden[j] = golden[j].wrapping_add(step);
        }
    }
    let sum = acc.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    word_sum_from(data, data.len() - groups.remainder().len(), sum, first_word)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn word_sum_avx512(data: &[u8], first_word: u64) -> u64 {
        // 4 registers of 8 lanes: enough independent multiplies to cover their latency.
        super::word_sum_lanes::<32>(data, first_word)
    }

    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_set_epi64x,
        _mm256_set1_epi64x, _mm256_setzero_si256, _mm256_slli_epi64, _mm256_srli_epi64,
        _mm256_storeu_si256, _mm256_xor_si256,
    };

    /// Words per iteration: 4 vectors of 4, independent accumulators so the multiplies of
    /// one vector overlap the others'.
    const GROUP_WORDS: usize = 16;

    /// `x * c` (wrapping) per 64-bit lane; AVX2 multiplies 32 x 32 -> 64 only:
    /// lo(x)lo(c) + (hi(x)lo(c) + lo(x)hi(c)) << 32. `c_lo` holds c, `c_hi` c >> 32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul64(x: __m256i, c_lo: __m256i, c_hi: __m256i) -> __m256i {
        let low = _mm256_mul_epu32(x, c_lo);
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), c_lo),
            _mm256_mul_epu32(x, c_hi),
        );
        _mm256_add_epi64(low, _mm256_slli_epi64::<32>(cross))
    }

    /// Explicit AVX2: lane k of vector v takes words 16i + 4v + k, loaded 32 bytes at a
    /// time (the compiler's own vectorisation of the portable loop gathered each vector
    /// from four groups with scalar loads and spilled its accumulators: 8.5 GB/s on the
    /// development VM's AVX2 core).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn word_sum_avx2(data: &[u8], first_word: u64) -> u64 {
        use super::{GOLDEN, word_sum_from};
        let m1 = 0xBF58_476D_1CE4_E5B9u64;
        let m2 = 0x94D0_49BB_1331_11EBu64;
        let (m1_lo, m1_hi) = (
            _mm256_set1_epi64x(m1 as i64),
            _mm256_set1_epi64x((m1 >> 32) as i64),
        );
        let (m2_lo, m2_hi) = (
            _mm256_set1_epi64x(m2 as i64),
            _mm256_set1_epi64x((m2 >> 32) as i64),
        );
        let g = |w: u64| w.wrapping_mul(GOLDEN) as i64;
        let mut golden: [__m256i; 4] = std::array::from_fn(|v| {
            let w = first_word.wrapping_add(4 * v as u64);
            _mm256_set_epi64x(
                g(w.wrapping_add(3)),
                g(w.wrapping_add(2)),
                g(w.wrapping_add(1)),
                g(w),
            )
        });
        let step = _mm256_set1_epi64x(g(GROUP_WORDS as u64));
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut groups = data.chunks_exact(8 * GROUP_WORDS);
        for group in &mut groups {
            for v in 0..4 {
                // SAFETY: the group holds 128 bytes; vector v reads [32v, 32v + 32).
                let w = unsafe { _mm256_loadu_si256(group.as_ptr().add(32 * v) as *const __m256i) };
                let mut x = _mm256_xor_si256(w, golden[v]);
                x = _mm256_xor_si256(x, _mm256_srli_epi64::<30>(x));
                x = mul64(x, m1_lo, m1_hi);
                x = _mm256_xor_si256(x, _mm256_srli_epi64::<27>(x));
                x = mul64(x, m2_lo, m2_hi);
                x = _mm256_xor_si256(x, _mm256_srli_epi64::<31>(x));
                acc[v] = _mm256_add_epi64(acc[v], x);
                golden[v] = _mm256_add_epi64(golden[v], step);
            }
        }
        let mut lanes = [0u64; 4];
        let mut sum = 0u64;
        for a in acc {
            // SAFETY: `lanes` is 32 writable bytes.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, a) };
            sum = lanes.iter().fold(sum, |s, &l| s.wrapping_add(l));
        }
        word_sum_from(data, data.len() - groups.remainder().len(), sum, first_word)
    }
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

    #[test]
    fn vector_paths_equal_the_scalar_definition() {
        // Each path this CPU can run, on every length around the lane groups (32 words =
        // 256 bytes on AVX-512) and every start alignment, plus a whole 2 MiB block.
        type WordSum = fn(&[u8], u64) -> u64;
        let mut paths: Vec<(&str, WordSum)> =
            vec![("portable", word_sum_lanes::<4>), ("dispatched", word_sum)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 is present (checked just above).
                paths.push(("avx2", |d, w| unsafe { x86::word_sum_avx2(d, w) }));
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                // SAFETY: AVX-512F and DQ are present (checked just above).
                paths.push(("avx512", |d, w| unsafe { x86::word_sum_avx512(d, w) }));
            }
        }
        eprintln!(
            "checksum paths checked: {:?}",
            paths.iter().map(|p| p.0).collect::<Vec<_>>()
        );
        let data: Vec<u8> = (0..(2usize << 20) + 64)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect();
        for (name, sum) in &paths {
            for start in 0..8 {
                for len in (0..600).chain([4095, 4096, 4097, 65_536 + 5]) {
                    let d = &data[start..start + len];
                    // From the first word, and as a later piece of a whole.
                    for first_word in [0, 1, 7, 12_345, u64::MAX - 3, u64::MAX - 1] {
                        assert_eq!(
                            sum(d, first_word),
                            word_sum_from(d, 0, 0, first_word),
                            "{name}: start {start} len {len} first word {first_word}"
                        );
                    }
                }
            }
            let block = &data[..2 << 20];
            assert_eq!(
                sum(block, 0),
                word_sum_from(block, 0, 0, 0),
                "{name}: 2 MiB"
            );
        }
        assert_eq!(checksum64(&data), checksum64_scalar(&data));
    }

    /// Piece by piece equals the whole, for any cut into whole words plus a last piece of
    /// any length; a piece after one that ended inside a word is refused.
    #[test]
    fn pieces_sum_to_the_whole() {
        let data: Vec<u8> = (0..(1usize << 20) + 13)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
            .collect();
        for piece_bytes in [8usize, 64, 4096, 65_536, 99_992] {
            for len in [0usize, 7, 8, 4096, 65_536 + 5, data.len()] {
                let whole = &data[..len];
                let mut c = Checksum64::new();
                for piece in whole.chunks(piece_bytes) {
                    c.update(piece);
                }
                assert_eq!(
                    c.finish(),
                    checksum64(whole),
                    "pieces of {piece_bytes} over {len} bytes"
                );
            }
        }
        let mut c = Checksum64::new();
        c.update(&data[..5]);
        let refused = std::panic::catch_unwind(move || c.update(&data[5..9]));
        assert!(refused.is_err(), "a piece after one ending mid-word");
    }
}

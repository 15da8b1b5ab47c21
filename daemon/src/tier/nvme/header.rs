//! The self-describing NVMe slot header (first 4 KiB of each slot, little-endian):
//!
//! | off | field           | type |
//! |-----|-----------------|------|
//! | 0   | magic "KVPSLOT1"| u64  |
//! | 8   | version (1)     | u32  |
//! | 12  | flags (bit 0: has parent) | u32 |
//! | 16  | namespace       | u32  |
//! | 20  | reserved (0)    | u32  |
//! | 24  | hash            | u64  |
//! | 32  | parent hash     | u64  |
//! | 40  | length (data bytes) | u64 |
//! | 48  | generation      | u64  |
//! | 56  | data checksum (kvp checksum v1 of `length` data bytes) | u64 |
//! | 64  | header checksum (kvp checksum v1 of bytes 0..64) | u64 |
//!
//! The rest of the page is zero. A slot is served only if the header checksum, the magic,
//! the version, the key and generation the registry expects, and the data checksum all hold.

use kvplane_kernels::checksum64;

pub const MAGIC: u64 = u64::from_le_bytes(*b"KVPSLOT1");
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 72;
const FLAG_HAS_PARENT: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    pub namespace: u32,
    pub hash: u64,
    pub parent: Option<u64>,
    pub length: u64,
    pub generation: u64,
    pub data_checksum: u64,
}

/// Why a header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("empty slot (no magic)")]
    Empty,
    #[error("bad magic {0:#018x}")]
    Magic(u64),
    #[error("unsupported slot version {0}")]
    Version(u32),
    #[error("header checksum mismatch (torn or corrupt header)")]
    Checksum,
    #[error("length {0} larger than the slot")]
    Length(u64),
    #[error("{0} bytes is shorter than a slot header ({HEADER_LEN})")]
    Short(usize),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl SlotHeader {
    /// Writes the header into `page` (at least `HEADER_LEN` bytes); the rest of the first
    /// 4 KiB is left as is by the caller (zeroed once per slot).
    pub fn encode(&self, page: &mut [u8]) {
        let b = &mut page[..HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.parent.is_some() {
            FLAG_HAS_PARENT
        } else {
            0
        };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.namespace.to_le_bytes());
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        b[24..32].copy_from_slice(&self.hash.to_le_bytes());
        b[32..40].copy_from_slice(&self.parent.unwrap_or(0).to_le_bytes());
        b[40..48].copy_from_slice(&self.length.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_checksum.to_le_bytes());
        let sum = checksum64(&b[..64]);
        b[64..72].copy_from_slice(&sum.to_le_bytes());
    }

    pub fn decode(page: &[u8], max_length: usize) -> Result<SlotHeader, HeaderError> {
        // A short read is an error, not a panic (found by the slot_header fuzz target).
        let b = page
            .get(..HEADER_LEN)
            .ok_or(HeaderError::Short(page.len()))?;
        let magic = u64_at(b, 0);
        if magic == 0 && b.iter().all(|&x| x == 0) {
            return Err(HeaderError::Empty);
        }
        if checksum64(&b[..64]) != u64_at(b, 64) {
            return Err(HeaderError::Checksum);
        }
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let length = u64_at(b, 40);
        if length > max_length as u64 {
            return Err(HeaderError::Length(length));
        }
        let flags = u32_at(b, 12);
        Ok(SlotHeader {
            namespace: u32_at(b, 16),
            hash: u64_at(b, 24),
            parent: (flags & FLAG_HAS_PARENT != 0).then(|| u64_at(b, 32)),
            length,
            generation: u64_at(b, 48),
            data_checksum: u64_at(b, 56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detection() {
        let h = SlotHeader {
            namespace: 7,
            hash: 0xdead_beef,
            parent: Some(42),
            length: 4096,
            generation: 9,
            data_checksum: 1234,
        };
        let mut page = vec![0u8; 4096];
        assert_eq!(SlotHeader::decode(&page, 8192), Err(HeaderError::Empty));
        h.encode(&mut page);
        assert_eq!(SlotHeader::decode(&page, 8192), Ok(h));
        assert_eq!(
            SlotHeader::decode(&page, 100),
            Err(HeaderError::Length(4096))
        );
        for i in 0..HEADER_LEN {
            let mut bad = page.clone();
            bad[i] ^= 0x10;
            assert!(
                SlotHeader::decode(&bad, 8192).is_err(),
                "flip at {i} undetected"
            );
        }
        // A torn header: only the first half written over an empty page.
        let mut torn = vec![0u8; 4096];
        torn[..36].copy_from_slice(&page[..36]);
        assert_eq!(SlotHeader::decode(&torn, 8192), Err(HeaderError::Checksum));
        let root = SlotHeader { parent: None, ..h };
        root.encode(&mut page);
        assert_eq!(SlotHeader::decode(&page, 8192).unwrap().parent, None);
    }
}

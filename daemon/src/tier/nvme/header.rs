//! The self-describing NVMe slot header (first 4 KiB of each slot, little-endian), format
//! version 2:
//!
//! | off | field           | type |
//! |-----|-----------------|------|
//! | 0   | magic "KVPSLOT1"| u64  |
//! | 8   | version (2)     | u32  |
//! | 12  | flags (bit 0: has parent) | u32 |
//! | 16  | namespace       | u32  |
//! | 20  | reserved (0)    | u32  |
//! | 24  | hash            | u64  |
//! | 32  | parent hash     | u64  |
//! | 40  | length (data bytes) | u64 |
//! | 48  | generation      | u64  |
//! | 56  | data checksum (kvp checksum v1 of `length` data bytes) | u64 |
//! | 64  | data MAC (keyed BLAKE3 of the `length` data bytes) | [u8; 32] |
//! | 96  | header checksum (kvp checksum v1 of bytes 0..96) | u64 |
//! | 104 | header MAC (keyed BLAKE3 of bytes 0..104) | [u8; 32] |
//!
//! The rest of the page is zero. A slot is served only if the header checksum, the magic,
//! the version, the header MAC, the key and generation the registry expects, the data
//! checksum and the data MAC all hold.
//!
//! Why MACs as well as checksums: anyone who can write the file can recompute a checksum
//! (and the kvp checksum is a sum of invertible word mixes, so a rewritten block can even
//! be made to keep its old one). The MACs need the daemon's key ([`super::key`]): the header
//! MAC binds namespace, hash, generation and the data MAC, so a slot cannot be moved to
//! another tenant or key, and the data MAC binds every byte of the block. The checksums
//! stay: they tell a torn or failing disk apart from tampering in the logs.
//!
//! Version 1 headers (no MACs) are reported as [`HeaderError::Version`] and never indexed:
//! nothing says who wrote them.

use kvplane_kernels::checksum64;

use super::key::{MAC_BYTES, SlotKey};

pub const MAGIC: u64 = u64::from_le_bytes(*b"KVPSLOT1");
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 136;
/// Bytes covered by the header checksum, then by the header MAC.
const CHECKSUMMED: usize = 96;
const AUTHENTICATED: usize = 104;
const FLAG_HAS_PARENT: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    pub namespace: u32,
    pub hash: u64,
    pub parent: Option<u64>,
    pub length: u64,
    pub generation: u64,
    pub data_checksum: u64,
    /// Keyed MAC of the block's bytes ([`SlotKey::data_mac`]).
    pub data_mac: [u8; MAC_BYTES],
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
    #[error(
        "header MAC mismatch (written without this daemon's key: tampered, or another \
         daemon's slot)"
    )]
    Mac,
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
    pub fn encode(&self, page: &mut [u8], key: &SlotKey) {
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
        b[64..96].copy_from_slice(&self.data_mac);
        let sum = checksum64(&b[..CHECKSUMMED]);
        b[CHECKSUMMED..AUTHENTICATED].copy_from_slice(&sum.to_le_bytes());
        let mac = key.header_mac(&b[..AUTHENTICATED]);
        b[AUTHENTICATED..HEADER_LEN].copy_from_slice(&mac);
    }

    /// Reads and authenticates a header. The format version is read before the checksum
    /// (older formats put it elsewhere), so an old slot is reported as such.
    pub fn decode(
        page: &[u8],
        max_length: usize,
        key: &SlotKey,
    ) -> Result<SlotHeader, HeaderError> {
        // A short read is an error, not a panic (found by the slot_header fuzz target).
        let b = page
            .get(..HEADER_LEN)
            .ok_or(HeaderError::Short(page.len()))?;
        let magic = u64_at(b, 0);
        if magic == 0 && b.iter().all(|&x| x == 0) {
            return Err(HeaderError::Empty);
        }
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        if checksum64(&b[..CHECKSUMMED]) != u64_at(b, CHECKSUMMED) {
            return Err(HeaderError::Checksum);
        }
        let mac = key.header_mac(&b[..AUTHENTICATED]);
        if !SlotKey::mac_eq(&mac, &b[AUTHENTICATED..HEADER_LEN]) {
            return Err(HeaderError::Mac);
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
            data_mac: b[64..96].try_into().expect("32 bytes"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SlotKey {
        SlotKey::from_material(&[b; 32])
    }

    #[test]
    fn round_trip_and_detection() {
        let k = key(1);
        let h = SlotHeader {
            namespace: 7,
            hash: 0xdead_beef,
            parent: Some(42),
            length: 4096,
            generation: 9,
            data_checksum: 1234,
            data_mac: [5; 32],
        };
        let mut page = vec![0u8; 4096];
        assert_eq!(SlotHeader::decode(&page, 8192, &k), Err(HeaderError::Empty));
        h.encode(&mut page, &k);
        assert_eq!(SlotHeader::decode(&page, 8192, &k), Ok(h));
        assert_eq!(
            SlotHeader::decode(&page, 100, &k),
            Err(HeaderError::Length(4096))
        );
        for i in 0..HEADER_LEN {
            let mut bad = page.clone();
            bad[i] ^= 0x10;
            assert!(
                SlotHeader::decode(&bad, 8192, &k).is_err(),
                "flip at {i} undetected"
            );
        }
        // A torn header: only the first part written over an empty page.
        let mut torn = vec![0u8; 4096];
        torn[..36].copy_from_slice(&page[..36]);
        assert_eq!(
            SlotHeader::decode(&torn, 8192, &k),
            Err(HeaderError::Checksum)
        );
        let root = SlotHeader { parent: None, ..h };
        root.encode(&mut page, &k);
        assert_eq!(SlotHeader::decode(&page, 8192, &k).unwrap().parent, None);
    }

    #[test]
    fn forged_headers_fail_the_mac() {
        let k = key(1);
        let h = SlotHeader {
            namespace: 7,
            hash: 1,
            parent: None,
            length: 4096,
            generation: 9,
            data_checksum: 1234,
            data_mac: [5; 32],
        };
        // Written with another key (another daemon, or a guess): refused.
        let mut page = vec![0u8; 4096];
        h.encode(&mut page, &key(2));
        assert_eq!(SlotHeader::decode(&page, 8192, &k), Err(HeaderError::Mac));
        // An attacker edits the namespace and data checksum and recomputes the header
        // checksum (all public) but cannot recompute the MAC.
        h.encode(&mut page, &k);
        page[16..20].copy_from_slice(&8u32.to_le_bytes());
        page[56..64].copy_from_slice(&999u64.to_le_bytes());
        let sum = checksum64(&page[..CHECKSUMMED]);
        page[CHECKSUMMED..AUTHENTICATED].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(SlotHeader::decode(&page, 8192, &k), Err(HeaderError::Mac));
    }

    #[test]
    fn version_1_headers_are_reported_as_old() {
        // A version 1 header as the previous format wrote it (checksum at 64, no MAC).
        let mut page = vec![0u8; 4096];
        page[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        page[8..12].copy_from_slice(&1u32.to_le_bytes());
        page[16..20].copy_from_slice(&3u32.to_le_bytes());
        page[40..48].copy_from_slice(&4096u64.to_le_bytes());
        let sum = checksum64(&page[..64]);
        page[64..72].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            SlotHeader::decode(&page, 8192, &key(1)),
            Err(HeaderError::Version(1))
        );
    }
}

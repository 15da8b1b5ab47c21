//! Session segments: geometry, creation (daemon side) and mapping (engine side).
//!
//! The daemon computes a [`Geometry`] from the engine's request, creates a sealed memfd of
//! that size, writes the header, and keeps the geometry privately: it never reads the
//! header's geometry fields back, since the engine can scribble on them.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use kvplane_ffi::{self as ffi, Pod, kvp_segment_header};

use crate::error::{Result, ShmError};
use crate::sys;

/// Largest arena one session may ask for.
pub const MAX_ARENA_BYTES: u64 = 1 << 30;
/// Smallest arena slice per queue pair: one full batch of block ops must fit somewhere.
pub const MIN_ARENA_BYTES_PER_QP: u64 = 4096;
const PAGE: u64 = 4096;

const fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Where one queue pair's rings and arena slice live (byte offsets in the segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpGeometry {
    pub sq_offset: u64,
    pub cq_offset: u64,
    pub arena_offset: u64,
    pub arena_bytes: u64,
    pub sq_entries: u32,
    pub cq_entries: u32,
}

/// The full layout of a session segment. Computed, validated, then trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub queue_pairs: Vec<QpGeometry>,
    pub arena_offset: u64,
    pub arena_bytes: u64,
    pub segment_bytes: u64,
}

fn check_entries(field: &'static str, entries: u32) -> Result<()> {
    if !entries.is_power_of_two()
        || !(ffi::MIN_RING_ENTRIES..=ffi::MAX_RING_ENTRIES).contains(&entries)
    {
        return Err(ShmError::Geometry {
            field,
            value: entries as u64,
            reason: "must be a power of two in 8..=65536",
        });
    }
    Ok(())
}

impl Geometry {
    pub fn new(
        num_queue_pairs: u32,
        sq_entries: u32,
        cq_entries: u32,
        arena_bytes: u64,
    ) -> Result<Self> {
        if num_queue_pairs == 0 || num_queue_pairs as usize > ffi::MAX_QUEUE_PAIRS {
            return Err(ShmError::Geometry {
                field: "num_queue_pairs",
                value: num_queue_pairs as u64,
                reason: "must be in 1..=16",
            });
        }
        check_entries("sq_entries", sq_entries)?;
        check_entries("cq_entries", cq_entries)?;
        if arena_bytes > MAX_ARENA_BYTES
            || arena_bytes < MIN_ARENA_BYTES_PER_QP * num_queue_pairs as u64
        {
            return Err(ShmError::Geometry {
                field: "arena_bytes",
                value: arena_bytes,
                reason: "must be at least 4096 per queue pair and at most 1 GiB",
            });
        }
        let ring_bytes = |entries: u32, entry: usize| {
            align_up(
                ffi::RING_HEADER_BYTES as u64 + entries as u64 * entry as u64,
                64,
            )
        };
        let sqe = std::mem::size_of::<ffi::kvp_sqe>();
        let cqe = std::mem::size_of::<ffi::kvp_cqe>();
        let mut offset = ffi::HEADER_BYTES as u64;
        let mut rings = Vec::with_capacity(num_queue_pairs as usize);
        for _ in 0..num_queue_pairs {
            let sq_offset = offset;
            offset += ring_bytes(sq_entries, sqe);
            let cq_offset = offset;
            offset += ring_bytes(cq_entries, cqe);
            rings.push((sq_offset, cq_offset));
        }
        let arena_offset = align_up(offset, PAGE);
        // Slices are cache-line aligned so two engine threads never share a line.
        let slice = (arena_bytes / num_queue_pairs as u64) / 64 * 64;
        let queue_pairs = rings
            .into_iter()
            .enumerate()
            .map(|(i, (sq_offset, cq_offset))| QpGeometry {
                sq_offset,
                cq_offset,
                arena_offset: arena_offset + i as u64 * slice,
                arena_bytes: slice,
                sq_entries,
                cq_entries,
            })
            .collect();
        let segment_bytes = align_up(arena_offset + arena_bytes, PAGE);
        Ok(Geometry {
            queue_pairs,
            arena_offset,
            arena_bytes,
            segment_bytes,
        })
    }

    /// Rebuild the geometry an engine finds in a header written by the daemon, checking
    /// that every range lies inside the mapping (the engine trusts the daemon, but a bad
    /// header must still be an error, not a SIGSEGV).
    pub fn from_header(h: &kvp_segment_header, mapped_bytes: u64) -> Result<Self> {
        let bad = |reason: &str| ShmError::BadSegment {
            session_id: h.session_id,
            reason: reason.to_string(),
        };
        if h.magic != ffi::MAGIC {
            return Err(bad("bad magic"));
        }
        if h.abi_version != ffi::ABI_VERSION {
            return Err(bad("ABI version mismatch"));
        }
        if h.num_queue_pairs == 0 || h.num_queue_pairs as usize > ffi::MAX_QUEUE_PAIRS {
            return Err(bad("queue pair count out of range"));
        }
        let q0 = h.queue_pairs[0];
        let expect = Geometry::new(
            h.num_queue_pairs,
            q0.sq_entries,
            q0.cq_entries,
            h.arena_bytes,
        )?;
        if expect.segment_bytes != h.segment_bytes || expect.segment_bytes > mapped_bytes {
            return Err(bad("segment size does not match the geometry"));
        }
        for (i, q) in expect.queue_pairs.iter().enumerate() {
            let d = h.queue_pairs[i];
            if d.sq_offset != q.sq_offset
                || d.cq_offset != q.cq_offset
                || d.arena_offset != q.arena_offset
                || d.arena_bytes != q.arena_bytes
                || d.sq_entries != q.sq_entries
                || d.cq_entries != q.cq_entries
            {
                return Err(bad("queue pair descriptor does not match the geometry"));
            }
        }
        Ok(expect)
    }
}

/// A mapped session segment. Shared memory: every access goes through raw pointers or
/// atomics; nothing hands out `&`/`&mut` to bytes a peer may change.
#[derive(Debug)]
pub struct Segment {
    _map: memmap2::MmapRaw,
    file: File,
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: the segment is plain shared memory accessed only through atomics and
// volatile/raw copies; the mapping lives as long as the Segment.
unsafe impl Send for Segment {}
// SAFETY: as above; concurrent access from several threads is the design (one thread per
// queue pair), with the SPSC protocol deciding who writes what.
unsafe impl Sync for Segment {}

impl Segment {
    /// Daemon side: a new sealed memfd of `geometry.segment_bytes`, header written.
    pub fn create(
        geometry: &Geometry,
        session_id: u64,
        engine_pid: i32,
        num_namespaces: u32,
    ) -> Result<Self> {
        let fd = sys::memfd_create_sealed(
            &format!("kvplane-session-{session_id}"),
            geometry.segment_bytes,
        )
        .map_err(|e| ShmError::io("memfd_create", e))?;
        let seg = Self::map_fd(fd, geometry.segment_bytes)?;
        let mut h: kvp_segment_header = Pod::zeroed();
        h.magic = ffi::MAGIC;
        h.abi_version = ffi::ABI_VERSION;
        h.header_bytes = ffi::HEADER_BYTES as u32;
        h.session_id = session_id;
        h.segment_bytes = geometry.segment_bytes;
        h.daemon_pid = sys::getpid();
        h.engine_pid = engine_pid;
        h.num_queue_pairs = geometry.queue_pairs.len() as u32;
        h.num_namespaces = num_namespaces;
        h.arena_offset = geometry.arena_offset;
        h.arena_bytes = geometry.arena_bytes;
        h.state = ffi::SessionState::Init.raw();
        for (i, q) in geometry.queue_pairs.iter().enumerate() {
            let d = &mut h.queue_pairs[i];
            d.sq_offset = q.sq_offset;
            d.cq_offset = q.cq_offset;
            d.arena_offset = q.arena_offset;
            d.arena_bytes = q.arena_bytes;
            d.sq_entries = q.sq_entries;
            d.cq_entries = q.cq_entries;
        }
        seg.write_pod(0, &h)?;
        // Informational ring headers (entries, entry size) for debuggers and C clients.
        use crate::ring::ring_offsets::{ENTRIES, ENTRY_BYTES};
        let sqe_bytes = std::mem::size_of::<ffi::kvp_sqe>() as u32;
        let cqe_bytes = std::mem::size_of::<ffi::kvp_cqe>() as u32;
        for q in &geometry.queue_pairs {
            seg.write_pod(q.sq_offset + ENTRIES, &q.sq_entries)?;
            seg.write_pod(q.sq_offset + ENTRY_BYTES, &sqe_bytes)?;
            seg.write_pod(q.cq_offset + ENTRIES, &q.cq_entries)?;
            seg.write_pod(q.cq_offset + ENTRY_BYTES, &cqe_bytes)?;
        }
        Ok(seg)
    }

    /// Engine side: map a segment fd received from the daemon and check its header.
    pub fn open(fd: OwnedFd, expected_bytes: u64) -> Result<(Self, Geometry)> {
        let size = sys::fd_size(fd.as_raw_fd()).map_err(|e| ShmError::io("fstat segment", e))?;
        if size != expected_bytes || size < ffi::HEADER_BYTES as u64 {
            return Err(ShmError::BadSegment {
                session_id: 0,
                reason: format!("segment fd is {size} bytes, expected {expected_bytes}"),
            });
        }
        let seg = Self::map_fd(fd, size)?;
        let header: kvp_segment_header = seg.read_pod(0)?;
        let geometry = Geometry::from_header(&header, size)?;
        Ok((seg, geometry))
    }

    /// Map any shared memfd (also used for an engine's KV buffer on the host backend).
    pub fn map_fd(fd: OwnedFd, bytes: u64) -> Result<Self> {
        let file = File::from(fd);
        let map = memmap2::MmapOptions::new()
            .len(bytes as usize)
            .map_raw(&file)
            .map_err(|e| ShmError::io("mmap segment", e))?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(ShmError::Geometry {
            field: "segment_bytes",
            value: bytes,
            reason: "mapping returned null",
        })?;
        Ok(Segment {
            _map: map,
            file,
            base,
            len: bytes,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) || offset % align != 0 {
            return Err(ShmError::BadSegment {
                session_id: 0,
                reason: format!(
                    "access [{offset}, +{len}) outside a {} byte segment or misaligned",
                    self.len
                ),
            });
        }
        Ok(())
    }

    /// Copy a plain-old-data value out of the segment.
    pub fn read_pod<T: Pod>(&self, offset: u64) -> Result<T> {
        self.check(offset, std::mem::size_of::<T>() as u64, 1)?;
        // SAFETY: range checked to lie inside the live mapping; read_unaligned copes with
        // any alignment; T is Pod so every bit pattern a peer wrote is a valid T. The peer
        // may be writing concurrently: we get some bytes, validated by the caller.
        Ok(
            unsafe {
                std::ptr::read_unaligned(self.base.as_ptr().add(offset as usize).cast::<T>())
            },
        )
    }

    /// Copy a plain-old-data value into the segment.
    pub fn write_pod<T: Pod>(&self, offset: u64, value: &T) -> Result<()> {
        self.write_bytes(offset, ffi::as_bytes(value))
    }

    /// Copy bytes out of the segment into private memory.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len() as u64, 1)?;
        // SAFETY: source range checked inside the mapping; destination is our own buffer;
        // they cannot overlap (out is private memory).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copy private bytes into the segment.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64, 1)?;
        // SAFETY: destination range checked inside the mapping (MAP_SHARED, writable);
        // source is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(offset as usize),
                data.len(),
            )
        };
        Ok(())
    }

    /// An atomic u32 at `offset` (4-byte aligned, inside the mapping).
    pub fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32> {
        self.check(offset, 4, 4)?;
        // SAFETY: in bounds and aligned (checked); the mapping outlives the returned
        // reference (tied to &self); shared memory is only accessed atomically at this word.
        Ok(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset as usize).cast()) })
    }

    /// An atomic u64 at `offset` (8-byte aligned, inside the mapping).
    pub fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64> {
        self.check(offset, 8, 8)?;
        // SAFETY: as for atomic_u32.
        Ok(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset as usize).cast()) })
    }

    /// Raw pointer to `offset` after a bounds check of `len` bytes: for the ring code,
    /// which does its own volatile accesses within the checked range.
    pub fn ptr_checked(&self, offset: u64, len: u64, align: u64) -> Result<*mut u8> {
        self.check(offset, len, align)?;
        // SAFETY: offset is within the mapping (checked above).
        Ok(unsafe { self.base.as_ptr().add(offset as usize) })
    }
}

/// Offsets of header fields, for atomics.
pub mod header_offsets {
    use core::mem::offset_of;
    use kvplane_ffi::{kvp_index_line, kvp_segment_header};
    pub const DAEMON_HEARTBEAT: u64 = offset_of!(kvp_segment_header, daemon_heartbeat) as u64;
    pub const ENGINE_HEARTBEAT: u64 = offset_of!(kvp_segment_header, engine_heartbeat) as u64;
    pub const STATE: u64 = offset_of!(kvp_segment_header, state) as u64;
    pub const SQ_DOORBELL_WORD: u64 = offset_of!(kvp_segment_header, sq_doorbell) as u64
        + offset_of!(kvp_index_line, value) as u64;
    pub const SQ_DOORBELL_SLEEPING: u64 =
        offset_of!(kvp_segment_header, sq_doorbell) as u64 + offset_of!(kvp_index_line, aux) as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rejects_bad_values_with_the_field_name() {
        for (qps, sq, cq, arena, field) in [
            (0, 64, 64, 65536, "num_queue_pairs"),
            (17, 64, 64, 1 << 20, "num_queue_pairs"),
            (1, 63, 64, 65536, "sq_entries"),
            (1, 64, 4, 65536, "cq_entries"),
            (1, 64, 1 << 17, 65536, "cq_entries"),
            (4, 64, 64, 4096, "arena_bytes"),
            (1, 64, 64, (1 << 30) + 1, "arena_bytes"),
        ] {
            match Geometry::new(qps, sq, cq, arena) {
                Err(ShmError::Geometry { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{qps} {sq} {cq} {arena}: expected a {field} error, got {other:?}"),
            }
        }
    }

    #[test]
    fn geometry_is_disjoint_and_aligned() {
        let g = Geometry::new(3, 256, 512, 3 * 65536 + 100).unwrap();
        let mut ranges = vec![(0u64, ffi::HEADER_BYTES as u64)];
        for q in &g.queue_pairs {
            assert_eq!(q.sq_offset % 64, 0);
            assert_eq!(q.cq_offset % 64, 0);
            assert_eq!(q.arena_offset % 64, 0);
            ranges.push((q.sq_offset, 256 + 256 * 64));
            ranges.push((q.cq_offset, 256 + 512 * 32));
            ranges.push((q.arena_offset, q.arena_bytes));
        }
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {w:?}");
        }
        let last = ranges.last().unwrap();
        assert!(last.0 + last.1 <= g.segment_bytes);
        assert_eq!(g.segment_bytes % 4096, 0);
    }

    #[test]
    fn create_then_open_round_trips_and_tampering_is_caught() {
        let g = Geometry::new(2, 64, 64, 65536).unwrap();
        let seg = Segment::create(&g, 7, 1234, 1).unwrap();
        let fd = seg.file().try_clone().unwrap();
        let (seg2, g2) = Segment::open(fd.into(), g.segment_bytes).unwrap();
        assert_eq!(g, g2);
        let h: kvp_segment_header = seg2.read_pod(0).unwrap();
        assert_eq!(h.session_id, 7);
        // The memfd is sealed: nobody can shrink it under a mapping.
        assert!(seg.file().set_len(4096).is_err());
        // A tampered descriptor is refused on open.
        seg.write_pod(
            std::mem::offset_of!(kvp_segment_header, queue_pairs) as u64,
            &0u64,
        )
        .unwrap();
        let fd = seg.file().try_clone().unwrap();
        assert!(matches!(
            Segment::open(fd.into(), g.segment_bytes),
            Err(ShmError::BadSegment { .. })
        ));
        // Out-of-range accesses are errors.
        assert!(seg.read_pod::<u64>(g.segment_bytes - 4).is_err());
        assert!(seg.atomic_u32(2).is_err());
    }
}

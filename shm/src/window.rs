//! A host window: an engine's host memfds mapped one after another into one reserved
//! range of the daemon's address space, so one kernel launch addresses all of a session's
//! host regions from one base (the layout's plane offsets are resolved against it).
//!
//! The whole range is reserved first (no access, no memory), then each memfd is mapped
//! over its part with `MAP_FIXED`, which only ever replaces our own reservation. Each part
//! starts at a multiple of its file's page size (2 MiB or 1 GiB for hugetlbfs), as mmap
//! requires. The range is unmapped as a whole on drop.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::{Result, ShmError};
use crate::sys;

/// Several memfds in one contiguous mapping.
#[derive(Debug)]
pub struct HostWindow {
    /// The reservation: what drop unmaps.
    reserved: NonNull<u8>,
    reserved_bytes: usize,
    /// The first part's address (the reservation rounded up to the largest page size).
    base: NonNull<u8>,
    len_bytes: usize,
    part_offsets: Vec<u64>,
}

// SAFETY: the window is plain shared memory; the raw pointers name a mapping this value
// owns, valid from any thread until drop.
unsafe impl Send for HostWindow {}
// SAFETY: as above; access to the bytes is the users' business (EngineKv's contract).
unsafe impl Sync for HostWindow {}

fn round_up(x: usize, to: usize) -> Option<usize> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

impl HostWindow {
    /// Maps `parts` (a memfd and its size in bytes each) read/write and shared, in order,
    /// into one window. An empty list is an error.
    pub fn map(parts: &[(BorrowedFd<'_>, u64)]) -> Result<Self> {
        let too_big = |what: &'static str, value: u64| ShmError::Geometry {
            field: what,
            value,
            reason: "host window larger than the address space",
        };
        if parts.is_empty() {
            return Err(ShmError::Geometry {
                field: "kv_regions",
                value: 0,
                reason: "a host window needs at least one memfd",
            });
        }
        // Where each part goes, relative to an aligned base.
        let mut part_offsets = Vec::with_capacity(parts.len());
        let mut lens = Vec::with_capacity(parts.len());
        let mut cursor = 0usize;
        let mut max_align = sys::page_bytes();
        for (fd, bytes) in parts {
            let align = sys::file_page_bytes(fd.as_raw_fd())
                .map_err(|e| ShmError::io("fstatfs host region", e))?;
            let bytes_usize = usize::try_from(*bytes).map_err(|_| too_big("len_bytes", *bytes))?;
            let len = round_up(bytes_usize.max(1), align).ok_or(too_big("len_bytes", *bytes))?;
            let at = round_up(cursor, align).ok_or(too_big("window", cursor as u64))?;
            part_offsets.push(at as u64);
            lens.push(len);
            cursor = at.checked_add(len).ok_or(too_big("window", at as u64))?;
            max_align = max_align.max(align);
        }
        let len_bytes = cursor;
        let reserved_bytes = len_bytes
            .checked_add(max_align)
            .ok_or(too_big("window", len_bytes as u64))?;
        let reserved = sys::reserve_address_space(reserved_bytes)
            .map_err(|e| ShmError::io("reserve host window", e))?;
        let skip = (max_align - (reserved.as_ptr() as usize % max_align)) % max_align;
        // SAFETY: skip < max_align and the reservation is len_bytes + max_align long.
        let base = unsafe { reserved.add(skip) };
        let window = HostWindow {
            reserved,
            reserved_bytes,
            base,
            len_bytes,
            part_offsets,
        };
        for (i, (fd, _)) in parts.iter().enumerate() {
            let off = window.part_offsets[i] as usize;
            // SAFETY: [base + off, base + off + lens[i]) lies inside the reservation this
            // window owns (offsets computed above, each part before the next), so the fixed
            // mapping replaces only our own reserved, unused pages. On failure `window`
            // is dropped, unmapping the whole reservation.
            unsafe { sys::map_shared_fixed(window.base.add(off), lens[i], fd.as_raw_fd()) }
                .map_err(|e| ShmError::io("mmap host region into its window", e))?;
        }
        Ok(window)
    }

    /// The first byte of the window.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Bytes from the base to the end of the last part.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Where part `i` starts, in bytes from the base.
    pub fn part_offsets(&self) -> &[u64] {
        &self.part_offsets
    }
}

impl Drop for HostWindow {
    fn drop(&mut self) {
        // SAFETY: the reservation (and every part mapped over it) is this value's alone;
        // users hold the window while they use its memory.
        unsafe { sys::unmap(self.reserved, self.reserved_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfds_land_at_their_offsets_and_share_their_bytes() {
        let a = sys::memfd_create_sealed("a", 5000).unwrap();
        let b = sys::memfd_create_sealed("b", 4096).unwrap();
        let w = HostWindow::map(&[(a.as_fd(), 5000), (b.as_fd(), 4096)]).unwrap();
        let page = sys::page_bytes() as u64;
        assert_eq!(w.part_offsets(), &[0, page.max(8192)]);
        assert_eq!(w.base().as_ptr() as usize % sys::page_bytes(), 0);
        // Writes through the window reach the files, and the other way round.
        let off_b = w.part_offsets()[1] as usize;
        // SAFETY: both offsets are inside the window's mapped parts.
        unsafe {
            w.base().as_ptr().add(4999).write(0xab);
            w.base().as_ptr().add(off_b + 7).write(0xcd);
        }
        let file_a = std::fs::File::from(a.try_clone().unwrap());
        let file_b = std::fs::File::from(b.try_clone().unwrap());
        use std::os::unix::fs::FileExt;
        let mut byte = [0u8];
        file_a.read_exact_at(&mut byte, 4999).unwrap();
        assert_eq!(byte[0], 0xab);
        file_b.read_exact_at(&mut byte, 7).unwrap();
        assert_eq!(byte[0], 0xcd);
        file_b.write_all_at(&[0x42], 100).unwrap();
        // SAFETY: inside part b.
        assert_eq!(unsafe { w.base().as_ptr().add(off_b + 100).read() }, 0x42);
        assert!(HostWindow::map(&[]).is_err());
    }
    // hugetlb parts (aligned to their huge page) are exercised through the daemon by
    // tests/tests/engine_memory.rs, which reserves the hugepages they need.
}

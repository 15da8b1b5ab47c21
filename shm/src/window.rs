//! A host window: an engine's host memfds mapped one after another into one reserved
//! range of the daemon's address space, so one kernel launch addresses all of a session's
//! host regions from one base (the layout's plane offsets are resolved against it).
//!
//! The whole range is reserved first (no access, no memory), then each memfd is mapped
//! over its part with `MAP_FIXED`, which only ever replaces our own reservation. Each part
//! starts at a multiple of its file's page size (2 MiB or 1 GiB for hugetlbfs), as mmap
//! requires. What the alignment left of the reservation before the first part and after
//! the last is unmapped at once, so the window holds one mapping per part and one per gap
//! between parts ([`HostWindow::mappings`], which the daemon charges before mapping: every
//! mapping counts against the kernel's `vm.max_map_count`). The range is unmapped as a
//! whole on drop.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::{Result, ShmError};
use crate::sys;

/// Several memfds in one contiguous mapping.
#[derive(Debug)]
pub struct HostWindow {
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

/// Where each part of a window goes.
struct Layout {
    /// Each part's offset from the window's base, and its mapped length.
    parts: Vec<(u64, usize)>,
    len_bytes: usize,
    max_align: usize,
    /// What to reserve: the window and room to align its base to `max_align`.
    reserved_bytes: usize,
}

impl Layout {
    fn new(parts: &[(BorrowedFd<'_>, u64)]) -> Result<Self> {
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
        let mut placed = Vec::with_capacity(parts.len());
        let mut cursor = 0usize;
        let mut max_align = sys::page_bytes();
        for (fd, bytes) in parts {
            let align = sys::file_page_bytes(fd.as_raw_fd())
                .map_err(|e| ShmError::io("fstatfs host region", e))?;
            let bytes_usize = usize::try_from(*bytes).map_err(|_| too_big("len_bytes", *bytes))?;
            let len = round_up(bytes_usize.max(1), align).ok_or(too_big("len_bytes", *bytes))?;
            let at = round_up(cursor, align).ok_or(too_big("window", cursor as u64))?;
            placed.push((at as u64, len));
            cursor = at.checked_add(len).ok_or(too_big("window", at as u64))?;
            max_align = max_align.max(align);
        }
        Ok(Layout {
            parts: placed,
            len_bytes: cursor,
            max_align,
            reserved_bytes: cursor
                .checked_add(max_align)
                .ok_or(too_big("window", cursor as u64))?,
        })
    }

    /// Mappings the window holds: each part, and each gap alignment leaves before one.
    fn mappings(&self) -> u32 {
        let mut end = 0u64;
        let mut n = 0u32;
        for &(at, len) in &self.parts {
            n = n.saturating_add(if at > end { 2 } else { 1 });
            end = at + len as u64;
        }
        n
    }
}

impl HostWindow {
    /// How many mappings [`HostWindow::map`] of `parts` makes (at most: the kernel may
    /// merge neighbours), without mapping anything; none for no parts.
    pub fn mappings(parts: &[(BorrowedFd<'_>, u64)]) -> Result<u32> {
        if parts.is_empty() {
            return Ok(0);
        }
        Ok(Layout::new(parts)?.mappings())
    }

    /// Maps `parts` (a memfd and its size in bytes each) read/write and shared, in order,
    /// into one window. An empty list is an error.
    pub fn map(parts: &[(BorrowedFd<'_>, u64)]) -> Result<Self> {
        let layout = Layout::new(parts)?;
        let reserved_bytes = layout.reserved_bytes;
        let reserved = sys::reserve_address_space(reserved_bytes)
            .map_err(|e| ShmError::io("reserve host window", e))?;
        let skip =
            (layout.max_align - (reserved.as_ptr() as usize % layout.max_align)) % layout.max_align;
        // SAFETY: skip < max_align and the reservation is len_bytes + max_align long.
        let base = unsafe { reserved.add(skip) };
        // SAFETY: [reserved, base) and [base + len_bytes, reserved + reserved_bytes) are
        // this reservation's own unused ends (skip + len_bytes <= reserved_bytes); the
        // window keeps [base, base + len_bytes).
        unsafe {
            if skip > 0 {
                sys::unmap(reserved, skip);
            }
            let tail = reserved_bytes - skip - layout.len_bytes;
            if tail > 0 {
                sys::unmap(base.add(layout.len_bytes), tail);
            }
        }
        let window = HostWindow {
            base,
            len_bytes: layout.len_bytes,
            part_offsets: layout.parts.iter().map(|&(at, _)| at).collect(),
        };
        for (&(off, len), (fd, _)) in layout.parts.iter().zip(parts) {
            // SAFETY: [base + off, base + off + len) lies inside the window's reservation
            // (offsets computed above, each part before the next), so the fixed mapping
            // replaces only our own reserved, unused pages. On failure `window` is
            // dropped, unmapping the whole range.
            unsafe { sys::map_shared_fixed(window.base.add(off as usize), len, fd.as_raw_fd()) }
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
        // SAFETY: the range (every part and gap of it) is this value's alone; users hold
        // the window while they use its memory.
        unsafe { sys::unmap(self.base, self.len_bytes) };
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
    /// The window holds the mappings it says it will, which is what the daemon charges
    /// against vm.max_map_count: one per part here (no gaps between 4 KiB-page files).
    #[test]
    fn a_window_holds_the_mappings_it_counts() {
        let fds: Vec<_> = (0..5)
            .map(|i| sys::memfd_create_sealed("part", 4096 * (i + 1)).unwrap())
            .collect();
        let parts: Vec<_> = fds
            .iter()
            .enumerate()
            .map(|(i, f)| (f.as_fd(), 4096 * (i as u64 + 1)))
            .collect();
        assert_eq!(HostWindow::mappings(&parts).unwrap(), 5);
        let w = HostWindow::map(&parts).unwrap();
        let (lo, hi) = (
            w.base().as_ptr() as u64,
            w.base().as_ptr() as u64 + w.len_bytes() as u64,
        );
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let inside = maps
            .lines()
            .filter_map(|l| {
                let (range, _) = l.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .filter(|&(a, b)| a < hi && b > lo)
            .collect::<Vec<_>>();
        assert_eq!(inside.len(), 5, "{inside:x?}");
        assert!(
            inside.iter().all(|&(a, b)| a >= lo && b <= hi),
            "{inside:x?}"
        );
        // The reservation's unused tail went at once (it would be a sixth mapping).
        let tail = format!("{hi:x}-");
        assert!(
            !maps
                .lines()
                .any(|l| l.starts_with(&tail) && l.contains(" ---p ")),
            "the reservation's tail is still mapped:\n{maps}"
        );
    }

    /// A part aligned past the end of the one before (a hugetlb file after a small one)
    /// leaves a gap of reservation between them: a mapping too.
    #[test]
    fn gaps_between_parts_are_mappings() {
        let mib2 = 2u64 << 20;
        let layout = Layout {
            parts: vec![
                (0, 4096),
                (mib2, mib2 as usize),
                (2 * mib2, 4096),
                (4 * mib2, 4096),
            ],
            len_bytes: 4 * mib2 as usize + 4096,
            max_align: mib2 as usize,
            reserved_bytes: 5 * mib2 as usize + 4096,
        };
        assert_eq!(layout.mappings(), 4 + 2);
    }

    // hugetlb parts (aligned to their huge page) are exercised through the daemon by
    // tests/tests/engine_memory.rs, which reserves the hugepages they need.
}

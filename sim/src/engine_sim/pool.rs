//! The engine's paged KV pool ("HBM"): pages in a sealed memfd shared with the daemon,
//! a prefix cache of full pages keyed by sequence hash, and an LRU of idle cached pages.
//!
//! A page is free (no content), in use (referenced by running sequences), or idle and
//! cached (content kept for a later prefix hit, evictable). Sequences release their pages
//! deepest first, so within one release the deeper pages are evicted before their
//! prefixes, and a prefix outlives its suffixes.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;

use kvplane_shm::{Segment, ShmError, sys};

use super::pages::{KvGeometry, fill_block};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("KV pool geometry: {0}")]
    Geometry(String),
    #[error("creating the KV pool memfd of {bytes} bytes")]
    Memfd {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("KV pool page {page}: {source}")]
    Access {
        page: u32,
        #[source]
        source: ShmError,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct PageMeta {
    /// Sequence hash when the page holds a registered full block.
    hash: Option<u64>,
    /// Parent sequence hash of that block (0 at the root).
    parent: u64,
    refs: u32,
    /// LRU key while idle and cached.
    tick: u64,
}

/// A block evicted from the pool to make room (its content is still in the page until the
/// caller overwrites it, so it can be saved to the daemon first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    pub hash: u64,
    /// Parent sequence hash (0 at the root).
    pub parent: u64,
    pub page: u32,
}

pub struct KvPool {
    geom: KvGeometry,
    seg: Segment,
    fd: OwnedFd,
    pages: Vec<PageMeta>,
    cached: HashMap<u64, u32>,
    /// Idle cached pages by LRU tick.
    lru: BTreeMap<u64, u32>,
    free: Vec<u32>,
    tick: u64,
    scratch: Vec<u8>,
    check: Vec<u8>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("geometry", &self.geom)
            .field("free", &self.free.len())
            .field("idle_cached", &self.lru.len())
            .finish()
    }
}

impl KvPool {
    pub fn new(geom: KvGeometry) -> Result<KvPool, PoolError> {
        geom.validate().map_err(PoolError::Geometry)?;
        let bytes = geom.pool_bytes();
        let fd = sys::memfd_create_sealed("kvplane-engine-sim-kv", bytes)
            .map_err(|source| PoolError::Memfd { bytes, source })?;
        let map_fd = fd
            .try_clone()
            .map_err(|source| PoolError::Memfd { bytes, source })?;
        let seg = Segment::map_fd(map_fd, bytes)
            .map_err(|source| PoolError::Access { page: 0, source })?;
        let n = geom.num_pages;
        Ok(KvPool {
            geom,
            seg,
            fd,
            pages: vec![PageMeta::default(); n as usize],
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            // Pop from the end: low pages first.
            free: (0..n).rev().collect(),
            tick: 0,
            scratch: vec![0; geom.block_bytes() as usize],
            check: vec![0; geom.chunk_bytes() as usize],
        })
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geom
    }

    /// A duplicate of the memfd, to register with the daemon session.
    pub fn share_fd(&self) -> Result<OwnedFd, PoolError> {
        self.fd.try_clone().map_err(|source| PoolError::Memfd {
            bytes: self.geom.pool_bytes(),
            source,
        })
    }

    pub fn num_pages(&self) -> u32 {
        self.geom.num_pages
    }

    /// Pages referenced by running sequences.
    pub fn active_pages(&self) -> u32 {
        self.geom.num_pages - self.free.len() as u32 - self.lru.len() as u32
    }

    /// Pages an allocation can get (free, or idle and evictable).
    pub fn available(&self) -> u32 {
        (self.free.len() + self.lru.len()) as u32
    }

    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Leading `hashes` cached in the pool.
    pub fn match_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Of the leading `n` cached `hashes`, how many are idle (acquiring them takes them
    /// out of the evictable set).
    pub fn idle_among(&self, hashes: &[u64]) -> u32 {
        hashes
            .iter()
            .filter_map(|h| self.cached.get(h))
            .filter(|&&p| self.pages[p as usize].refs == 0)
            .count() as u32
    }

    /// Takes a reference on the cached page holding `hash`.
    pub fn acquire_cached(&mut self, hash: u64) -> Option<u32> {
        let page = *self.cached.get(&hash)?;
        let meta = &mut self.pages[page as usize];
        if meta.refs == 0 {
            self.lru.remove(&meta.tick);
        }
        meta.refs += 1;
        Some(page)
    }

    /// A page for new content, evicting the least recently used idle cached page when no
    /// page is free (returned so the caller can save it before overwriting it).
    pub fn alloc(&mut self) -> Option<(u32, Option<Evicted>)> {
        if let Some(page) = self.free.pop() {
            self.pages[page as usize] = PageMeta {
                refs: 1,
                ..PageMeta::default()
            };
            return Some((page, None));
        }
        let (_, page) = self.lru.pop_first()?;
        let meta = &mut self.pages[page as usize];
        let hash = meta.hash.take().expect("idle LRU pages are cached");
        let parent = meta.parent;
        self.cached.remove(&hash);
        *meta = PageMeta {
            refs: 1,
            ..PageMeta::default()
        };
        Some((page, Some(Evicted { hash, parent, page })))
    }

    /// Registers `page` (in use, content written) as holding `hash`. False when another
    /// page already holds it (two sequences computed the same block): this page then
    /// stays unregistered and is freed on release.
    pub fn register(&mut self, page: u32, hash: u64, parent: u64) -> bool {
        if self.cached.contains_key(&hash) {
            return false;
        }
        self.cached.insert(hash, page);
        let meta = &mut self.pages[page as usize];
        meta.hash = Some(hash);
        meta.parent = parent;
        true
    }

    /// Drops one reference; an unreferenced page becomes idle-cached or free.
    pub fn release(&mut self, page: u32) {
        let meta = &mut self.pages[page as usize];
        debug_assert!(meta.refs > 0, "page {page} released twice");
        meta.refs = meta.refs.saturating_sub(1);
        if meta.refs > 0 {
            return;
        }
        if meta.hash.is_some() {
            self.tick += 1;
            meta.tick = self.tick;
            self.lru.insert(self.tick, page);
        } else {
            self.free.push(page);
        }
    }

    /// Writes the deterministic content of `hash` into `page`.
    pub fn fill(&mut self, page: u32, hash: u64) -> Result<(), PoolError> {
        fill_block(hash, &mut self.scratch);
        let chunk = self.geom.chunk_bytes() as usize;
        for layer in 0..self.geom.layers {
            for plane in 0..self.geom.planes {
                let i = (layer * self.geom.planes + plane) as usize;
                let off = self.geom.chunk_offset(layer, plane, page);
                self.seg
                    .write_bytes(off, &self.scratch[i * chunk..(i + 1) * chunk])
                    .map_err(|source| PoolError::Access { page, source })?;
            }
        }
        Ok(())
    }

    /// Does `page` hold exactly the content of `hash`?
    pub fn verify(&mut self, page: u32, hash: u64) -> Result<bool, PoolError> {
        fill_block(hash, &mut self.scratch);
        let chunk = self.geom.chunk_bytes() as usize;
        for layer in 0..self.geom.layers {
            for plane in 0..self.geom.planes {
                let i = (layer * self.geom.planes + plane) as usize;
                let off = self.geom.chunk_offset(layer, plane, page);
                self.seg
                    .read_bytes(off, &mut self.check)
                    .map_err(|source| PoolError::Access { page, source })?;
                if self.check[..] != self.scratch[i * chunk..(i + 1) * chunk] {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Scribbles over `page` (so a load that copies nothing is caught by `verify`).
    pub fn poison(&mut self, page: u32) -> Result<(), PoolError> {
        let zero = vec![0xA5u8; self.geom.chunk_bytes() as usize];
        for layer in 0..self.geom.layers {
            for plane in 0..self.geom.planes {
                let off = self.geom.chunk_offset(layer, plane, page);
                self.seg
                    .write_bytes(off, &zero)
                    .map_err(|source| PoolError::Access { page, source })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> KvPool {
        KvPool::new(KvGeometry {
            num_pages: 4,
            ..KvGeometry::default()
        })
        .unwrap()
    }

    #[test]
    fn prefix_cache_lru_and_eviction_order() {
        let mut p = small();
        // A sequence of 3 pages, registered, then released deepest first.
        let pages: Vec<u32> = (0..3).map(|_| p.alloc().unwrap().0).collect();
        for (i, &pg) in pages.iter().enumerate() {
            p.fill(pg, 100 + i as u64).unwrap();
            assert!(p.register(pg, 100 + i as u64, 0));
        }
        assert_eq!(p.active_pages(), 3);
        for &pg in pages.iter().rev() {
            p.release(pg);
        }
        assert_eq!(p.active_pages(), 0);
        assert_eq!(p.match_prefix(&[100, 101, 102, 7]), 3);
        // One free page, then evictions take the deepest block first.
        assert!(p.alloc().unwrap().1.is_none());
        let (_, ev) = p.alloc().unwrap();
        assert_eq!(ev.unwrap().hash, 102);
        assert_eq!(ev.unwrap().parent, 0);
        assert_eq!(p.match_prefix(&[100, 101, 102]), 2);
        // A cached page in use is not evictable.
        let pg = p.acquire_cached(100).unwrap();
        assert!(p.verify(pg, 100).unwrap());
        assert!(!p.verify(pg, 101).unwrap());
        let (_, ev) = p.alloc().unwrap();
        assert_eq!(ev.unwrap().hash, 101);
        assert!(p.alloc().is_none(), "everything is in use");
        // Duplicate registration is refused.
        assert!(!p.register(pages[1], 100, 0));
    }

    #[test]
    fn poison_breaks_verification() {
        let mut p = small();
        let (pg, _) = p.alloc().unwrap();
        p.fill(pg, 5).unwrap();
        assert!(p.verify(pg, 5).unwrap());
        p.poison(pg).unwrap();
        assert!(!p.verify(pg, 5).unwrap());
    }
}

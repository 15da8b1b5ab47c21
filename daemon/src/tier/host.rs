//! G2: the pinned host pool. One mapping made at start-up (2 MiB hugepages when enough are
//! reserved, plain pages otherwise), bound to a NUMA node when the machine has several,
//! first-touched by several threads (timed), locked in memory and carved into slots of
//! `SLOT_HEADER_BYTES + block data`. The header page in front of each block lets the NVMe
//! tier write header and block with one O_DIRECT write straight from the pool.
//!
//! Ownership: the pool hands out raw slot addresses; the registry guarantees that a slot
//! has one writer (a reserved, unpublished slot) or only readers (a published slot held
//! busy), which is what the `unsafe` accessors require.

use std::path::Path;
use std::time::Instant;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// `[tiers.host]`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Bytes of the pinned pool (rounded down to whole slots).
    pub capacity_bytes: u64,
    /// mlock the pool. `false` only for unprivileged tests: an unlocked pool can be paged out.
    pub lock: bool,
    /// `auto` (hugepages when enough 2 MiB pages are free), `always` (fail otherwise), `never`.
    pub hugepages: HugepageMode,
    /// NUMA node to bind the pool to; when unset, the node of `cpus[0]` (if any).
    pub numa_node: Option<u32>,
    /// CPUs the data plane runs on (used to pick the NUMA node).
    pub cpus: Vec<u32>,
    /// Threads touching the pool at start-up (0 = all available CPUs).
    pub touch_threads: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HugepageMode {
    #[default]
    Auto,
    Always,
    Never,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            capacity_bytes: 1 << 30,
            lock: true,
            hugepages: HugepageMode::Auto,
            numa_node: None,
            cpus: Vec::new(),
            touch_threads: 0,
        }
    }
}

impl HostConfig {
    pub fn validate(&self, key: &str, block_bytes: usize) -> Result<(), ConfigError> {
        let slot = super::SLOT_HEADER_BYTES + super::round_up(block_bytes, super::DIRECT_ALIGN);
        if self.capacity_bytes < slot as u64 {
            return Err(invalid(
                &format!("{key}.capacity_bytes"),
                format!(
                    "must hold at least one slot of {slot} bytes (block + 4 KiB header), got {}",
                    self.capacity_bytes
                ),
            ));
        }
        if self.capacity_bytes / slot as u64 > u32::MAX as u64 - 1 {
            return Err(invalid(
                &format!("{key}.capacity_bytes"),
                "too many slots (more than 2^32 - 2)",
            ));
        }
        if self.touch_threads > 1024 {
            return Err(invalid(
                &format!("{key}.touch_threads"),
                format!("must be in 0..=1024, got {}", self.touch_threads),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("mmap of {bytes} bytes for the host pool ({what}): {source}")]
    Map {
        bytes: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mlock of the {bytes}-byte host pool failed: RLIMIT_MEMLOCK is soft {soft} / hard {hard} bytes \
         and could not be raised ({source}); run privileged (CAP_IPC_LOCK or CAP_SYS_RESOURCE), raise the \
         limit (ulimit -l, systemd LimitMEMLOCK=), or set tiers.host.lock = false for tests"
    )]
    Lock {
        bytes: usize,
        soft: String,
        hard: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hugepages requested (tiers.host.hugepages = \"always\") but {reason}")]
    Hugepages { reason: String },
    #[error("binding the host pool to NUMA node {node} (mbind): {source}")]
    Numa {
        node: u32,
        #[source]
        source: std::io::Error,
    },
}

/// How the pool was set up, for logs and stats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostPoolReport {
    pub bytes: usize,
    pub slot_bytes: usize,
    pub slot_count: u32,
    /// "2 MiB hugepages" or "4 KiB pages (<why>)".
    pub pages: String,
    pub hugepages: bool,
    pub locked: bool,
    /// e.g. "single NUMA node: no binding" or "bound to node 1".
    pub numa: String,
    pub touch_threads: usize,
    pub touch_seconds: f64,
    pub touch_seconds_per_gib: f64,
}

pub struct HostPool {
    base: *mut u8,
    len: usize,
    slot_bytes: usize,
    slot_count: u32,
    report: HostPoolReport,
    /// The pool as the device sees it, once registered (`register_with`).
    device_view: Option<DeviceView>,
}

/// The pool registered with a device, in regions of whole slots.
struct DeviceView {
    device: std::sync::Arc<dyn kvplane_cuda::Device>,
    /// (buffer, first slot, slots) per region.
    regions: Vec<(kvplane_cuda::DeviceBuffer, u32, u32)>,
    block_bytes: usize,
}

/// CUDA registers host memory in chunks of at most 64 GiB.
const MAX_REGISTRATION_BYTES: usize = 64 << 30;

// SAFETY: the pool is a fixed mapping owned by this value; the pointer is only turned into
// slices through the `unsafe` accessors whose callers follow the registry's one-writer rule.
unsafe impl Send for HostPool {}
// SAFETY: as above; `&HostPool` gives no safe access to the bytes.
unsafe impl Sync for HostPool {}

const HUGEPAGE_BYTES: usize = 2 << 20;

fn free_hugepages() -> Option<usize> {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// NUMA nodes listed by sysfs (`node0`, `node1`, ...).
pub fn numa_nodes() -> Vec<u32> {
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("node"))
                .and_then(|s| s.parse().ok())
            {
                nodes.push(n);
            }
        }
    }
    nodes.sort_unstable();
    nodes
}

/// NUMA node of a CPU (the `nodeN` link in its sysfs directory).
pub fn cpu_node(cpu: u32) -> Option<u32> {
    let dir = format!("/sys/devices/system/cpu/cpu{cpu}");
    std::fs::read_dir(Path::new(&dir))
        .ok()?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|s| s.strip_prefix("node"))
                .and_then(|s| s.parse().ok())
        })
}

fn rlimit_memlock() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    (lim.rlim_cur, lim.rlim_max)
}

fn fmt_limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Raises RLIMIT_MEMLOCK so `extra` more bytes can be locked (needs CAP_SYS_RESOURCE to go
/// above the hard limit). Best effort: root with CAP_IPC_LOCK locks regardless.
pub fn raise_memlock(extra: u64) {
    let (soft, hard) = rlimit_memlock();
    if soft == libc::RLIM_INFINITY {
        return;
    }
    let want = soft.saturating_add(extra);
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: hard.max(want),
    };
    // SAFETY: setrlimit reads the struct; failure (EPERM) is fine, mlock reports it.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } != 0 && hard > soft {
        let new = libc::rlimit {
            rlim_cur: hard.min(want),
            rlim_max: hard,
        };
        // SAFETY: as above, within the hard limit.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) };
    }
}

impl HostPool {
    /// Maps, binds, touches and locks a pool of `capacity_bytes / slot_bytes` slots.
    pub fn new(config: &HostConfig, slot_bytes: usize) -> Result<HostPool, HostError> {
        assert!(
            slot_bytes > 0 && slot_bytes % super::DIRECT_ALIGN == 0,
            "slot_bytes must be 4 KiB aligned"
        );
        let slot_count = (config.capacity_bytes / slot_bytes as u64) as u32;
        let data_len = slot_count as usize * slot_bytes;
        let huge_len = super::round_up(data_len, HUGEPAGE_BYTES);
        let need_pages = huge_len / HUGEPAGE_BYTES;

        let free = free_hugepages();
        let (want_huge, why_not) = match config.hugepages {
            HugepageMode::Never => (false, "hugepages = never".to_string()),
            _ => match free {
                Some(f) if f >= need_pages => (true, String::new()),
                Some(f) => (
                    false,
                    format!("{f} free 2 MiB hugepages, {need_pages} needed"),
                ),
                None => (false, "no 2 MiB hugepage pool on this kernel".to_string()),
            },
        };
        if config.hugepages == HugepageMode::Always && !want_huge {
            return Err(HostError::Hugepages { reason: why_not });
        }

        let mut hugepages = false;
        let pages;
        let mut base = std::ptr::null_mut();
        let mut len = data_len.max(super::DIRECT_ALIGN);
        if want_huge {
            // SAFETY: anonymous private mapping, no fd; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    huge_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                base = p as *mut u8;
                len = huge_len;
                hugepages = true;
                pages = "2 MiB hugepages".into();
            } else if config.hugepages == HugepageMode::Always {
                return Err(HostError::Map {
                    bytes: huge_len,
                    what: "MAP_HUGETLB",
                    source: std::io::Error::last_os_error(),
                });
            } else {
                pages = format!(
                    "4 KiB pages (MAP_HUGETLB failed: {})",
                    std::io::Error::last_os_error()
                );
            }
        } else {
            pages = format!("4 KiB pages ({why_not})");
        }
        if base.is_null() {
            // SAFETY: anonymous private mapping; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(HostError::Map {
                    bytes: len,
                    what: "anonymous",
                    source: std::io::Error::last_os_error(),
                });
            }
            base = p as *mut u8;
        }
        // From here on `pool` owns the mapping (Drop unmaps on any error below).
        let mut pool = HostPool {
            base,
            len,
            slot_bytes,
            slot_count,
            device_view: None,
            report: HostPoolReport {
                bytes: data_len,
                slot_bytes,
                slot_count,
                pages,
                hugepages,
                locked: false,
                numa: String::new(),
                touch_threads: 0,
                touch_seconds: 0.0,
                touch_seconds_per_gib: 0.0,
            },
        };

        // NUMA: bind before first touch so pages are allocated on the right node.
        let nodes = numa_nodes();
        let target = config
            .numa_node
            .or_else(|| config.cpus.first().and_then(|&c| cpu_node(c)));
        pool.report.numa = if nodes.len() <= 1 {
            format!(
                "single NUMA node ({}): no binding needed",
                nodes.first().copied().unwrap_or(0)
            )
        } else if let Some(node) = target {
            pool.mbind(node)?;
            format!("bound to NUMA node {node} of {}", nodes.len())
        } else {
            format!(
                "{} NUMA nodes, none configured (tiers.host.numa_node / cpus): not bound",
                nodes.len()
            )
        };

        // First touch with several threads: the kernel zeroes pages on first fault, which is
        // what makes a large pool slow to start.
        let threads = if config.touch_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            config.touch_threads
        };
        let step = if hugepages { HUGEPAGE_BYTES } else { 4096 };
        let started = Instant::now();
        let chunk = super::round_up(len.div_ceil(threads), step);
        let base_addr = pool.base as usize;
        std::thread::scope(|s| {
            for t in 0..threads {
                let start = t * chunk;
                let end = ((t + 1) * chunk).min(len);
                if start >= end {
                    continue;
                }
                s.spawn(move || {
                    let mut off = start;
                    while off < end {
                        // SAFETY: off < len, inside the mapping; threads touch disjoint ranges
                        // and nobody else has the pool yet.
                        unsafe { std::ptr::write_volatile((base_addr + off) as *mut u8, 0) };
                        off += step;
                    }
                });
            }
        });
        let secs = started.elapsed().as_secs_f64();
        pool.report.touch_threads = threads;
        pool.report.touch_seconds = secs;
        pool.report.touch_seconds_per_gib = secs / (len as f64 / (1u64 << 30) as f64);

        if config.lock {
            raise_memlock(len as u64);
            // SAFETY: locking our own mapping.
            if unsafe { libc::mlock(pool.base as *const libc::c_void, len) } != 0 {
                let source = std::io::Error::last_os_error();
                let (soft, hard) = rlimit_memlock();
                return Err(HostError::Lock {
                    bytes: len,
                    soft: fmt_limit(soft),
                    hard: fmt_limit(hard),
                    source,
                });
            }
            pool.report.locked = true;
        }
        tracing::info!(
            bytes = data_len,
            slots = slot_count,
            pages = %pool.report.pages,
            locked = pool.report.locked,
            numa = %pool.report.numa,
            touch_s_per_gib = pool.report.touch_seconds_per_gib,
            "host pool ready"
        );
        Ok(pool)
    }

    fn mbind(&self, node: u32) -> Result<(), HostError> {
        const MPOL_BIND: libc::c_long = 2;
        const MPOL_MF_MOVE: libc::c_long = 1 << 1;
        if node >= 1024 {
            return Err(HostError::Numa {
                node,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut mask = [0u64; 16];
        mask[node as usize / 64] |= 1 << (node % 64);
        // SAFETY: mbind on our own mapping with a node mask of 1024 bits we own.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.base as libc::c_long,
                self.len as libc::c_long,
                MPOL_BIND,
                mask.as_ptr() as libc::c_long,
                1024 as libc::c_long,
                MPOL_MF_MOVE,
            )
        };
        if rc != 0 {
            return Err(HostError::Numa {
                node,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn report(&self) -> &HostPoolReport {
        &self.report
    }
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }
    /// Bytes per slot, header page included.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    pub fn data_bytes(&self) -> usize {
        self.slot_bytes - super::SLOT_HEADER_BYTES
    }

    /// Start of a slot (its header page). Panics on a foreign slot number.
    pub fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(
            slot < self.slot_count,
            "host slot {slot} out of range ({})",
            self.slot_count
        );
        self.base.wrapping_add(slot as usize * self.slot_bytes)
    }

    /// The block bytes of a slot.
    ///
    /// # Safety
    /// No one writes the slot for the life of the slice (the registry holds it busy).
    pub unsafe fn data(&self, slot: u32) -> &[u8] {
        let p = self.slot_ptr(slot).wrapping_add(super::SLOT_HEADER_BYTES);
        // SAFETY: in bounds of the mapping (slot checked); no writer per the contract.
        unsafe { std::slice::from_raw_parts(p, self.data_bytes()) }
    }

    /// The block bytes of a slot, writable.
    ///
    /// # Safety
    /// The caller is the slot's only user for the life of the slice (a reserved slot).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn data_mut(&self, slot: u32) -> &mut [u8] {
        let p = self.slot_ptr(slot).wrapping_add(super::SLOT_HEADER_BYTES);
        // SAFETY: in bounds; exclusive per the contract.
        unsafe { std::slice::from_raw_parts_mut(p, self.data_bytes()) }
    }

    /// The header page of a slot, writable (NVMe writes).
    ///
    /// # Safety
    /// The caller is the only user of this slot's header page for the life of the slice
    /// (the registry lets one NVMe write per block run at a time). Readers of the block
    /// bytes ([`HostPool::data`]) do not overlap it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn header_mut(&self, slot: u32) -> &mut [u8] {
        // SAFETY: in bounds; exclusive per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), super::SLOT_HEADER_BYTES) }
    }

    /// Header page + block bytes of a slot, writable (NVMe staging).
    ///
    /// # Safety
    /// As for [`HostPool::data_mut`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn full_mut(&self, slot: u32) -> &mut [u8] {
        // SAFETY: in bounds; exclusive per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_bytes) }
    }

    /// The pool as regions of at most `max_region_bytes`, each a whole number of slots
    /// (io_uring registers buffers of at most 1 GiB each; CUDA host registration uses 64 GiB).
    pub fn regions(&self, max_region_bytes: usize) -> Vec<(*mut u8, usize)> {
        let per = (max_region_bytes / self.slot_bytes).max(1);
        let mut out = Vec::new();
        let mut slot = 0usize;
        while slot < self.slot_count as usize {
            let n = per.min(self.slot_count as usize - slot);
            out.push((
                self.base.wrapping_add(slot * self.slot_bytes),
                n * self.slot_bytes,
            ));
            slot += n;
        }
        out
    }
}

impl HostPool {
    /// Registers the pool with `device` (on CUDA: page-locked and mapped, so the kernels
    /// and copy engines reach its slots directly) for blocks of `block_bytes`; from then
    /// on it is a [`kvplane_cuda::SlotStore`]. Unregistered when the pool is dropped.
    pub fn register_with(
        &mut self,
        device: std::sync::Arc<dyn kvplane_cuda::Device>,
        block_bytes: usize,
    ) -> Result<(), kvplane_cuda::DeviceError> {
        assert!(self.device_view.is_none(), "registered once");
        assert!(block_bytes <= self.data_bytes(), "a block fits its slot");
        let mut view = DeviceView {
            device,
            regions: Vec::new(),
            block_bytes,
        };
        let mut first = 0u32;
        for (ptr, len) in self.regions(MAX_REGISTRATION_BYTES) {
            let base = std::ptr::NonNull::new(ptr).expect("a mapping is never at address 0");
            // SAFETY: the region lies inside this pool's mapping, which stays mapped until
            // Drop unregisters it first; regions do not overlap each other or any other
            // registration (the pool is its own mapping).
            let buffer = unsafe { view.device.register_host_memory(base, len)? };
            let slots = (len / self.slot_bytes) as u32;
            view.regions.push((buffer, first, slots));
            first += slots;
        }
        self.device_view = Some(view);
        Ok(())
    }
}

impl kvplane_cuda::SlotStore for HostPool {
    fn slot_count(&self) -> u32 {
        self.slot_count
    }

    fn block_bytes(&self) -> usize {
        self.device_view
            .as_ref()
            .map_or(self.data_bytes(), |v| v.block_bytes)
    }

    /// The block bytes of a slot (after its header page), in the region holding it.
    fn slot_at(&self, slot: u32) -> Option<(kvplane_cuda::DeviceBuffer, u64)> {
        let view = self.device_view.as_ref()?;
        let &(buffer, first, _) = view
            .regions
            .iter()
            .find(|&&(_, first, n)| slot >= first && slot - first < n)?;
        let offset =
            u64::from(slot - first) * self.slot_bytes as u64 + super::SLOT_HEADER_BYTES as u64;
        Some((buffer, offset))
    }

    fn describe(&self) -> String {
        format!("pinned host pool: {}", self.report.pages)
    }

    fn is_device_memory(&self) -> bool {
        false
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        // Registrations first: the device must not reach into memory about to be unmapped.
        if let Some(view) = self.device_view.take() {
            for (buffer, _, _) in view.regions {
                if let Err(e) = view.device.free(buffer) {
                    tracing::warn!(error = %e, "unregistering the host pool from the device");
                }
            }
        }
        // SAFETY: unmapping the mapping this value owns; no slices outlive the pool (they
        // borrow it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(lock: bool) -> HostConfig {
        HostConfig {
            capacity_bytes: 4 << 20,
            lock,
            touch_threads: 2,
            ..HostConfig::default()
        }
    }

    #[test]
    fn pool_carves_slots_and_reports() {
        let pool = HostPool::new(&small(false), 8192 + 4096).unwrap();
        assert_eq!(pool.slot_count(), (4 << 20) / (12 << 10));
        let r = pool.report();
        assert!(r.touch_seconds >= 0.0 && r.touch_threads == 2);
        assert!(!r.numa.is_empty() && !r.pages.is_empty());
        // SAFETY: test owns the pool; distinct slots.
        unsafe {
            pool.data_mut(3).fill(7);
            pool.data_mut(4).fill(9);
            assert!(pool.data(3).iter().all(|&b| b == 7));
            assert!(pool.data(4).iter().all(|&b| b == 9));
        }
        let regions = pool.regions(100 * 1024);
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, pool.slot_count() as usize * pool.slot_bytes());
        assert!(regions.iter().all(|r| r.1 % pool.slot_bytes() == 0));
    }

    #[test]
    fn locked_pool_when_privileged_or_clear_error() {
        match HostPool::new(&small(true), 8192) {
            Ok(pool) => assert!(pool.report().locked),
            Err(e) => assert!(e.to_string().contains("RLIMIT_MEMLOCK"), "{e}"),
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let c = HostConfig {
            capacity_bytes: 100,
            ..HostConfig::default()
        };
        let e = c.validate("tiers.host", 1 << 20).unwrap_err();
        assert_eq!(e.key, "tiers.host.capacity_bytes");
        assert!(e.reason.contains("at least one slot"));
    }
}

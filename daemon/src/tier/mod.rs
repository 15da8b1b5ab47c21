//! Storage tiers: G1 (device arena; host memory standing in for HBM on the host backend),
//! G2 (the pinned host pool) and G3 (NVMe slots). Each tier is a fixed set of equally sized
//! block slots; the block registry (`crate::block`) decides which block owns which slot.

pub mod hbm;
pub mod host;
pub mod nvme;

use serde::Deserialize;

/// A storage tier, fastest first: the one tier type of the ABI, the daemon and the router.
pub use kvplane_ffi::{PerTier, Tier};

/// The bytes of the tiers: what the mover (`crate::dataplane::mover`) reads and writes.
/// The block manager decides which block owns which slot; it reads only geometry from
/// here (and the NVMe index once, at start-up).
pub struct Stores {
    // Field order is drop order: the NVMe engines (which registered the host pool as fixed
    // buffers) go before the pool.
    /// G3, when configured.
    pub nvme: Option<nvme::NvmeStore>,
    /// G1, when configured.
    pub hbm: Option<kvplane_cuda::SlotArena>,
    /// G2, registered with `device`.
    pub host: host::HostPool,
    /// Bytes of one block (every tier's slot payload).
    pub block_bytes: usize,
    /// The device the memory tiers are allocated on or registered with.
    pub device: std::sync::Arc<dyn kvplane_cuda::Device>,
    /// How a LOAD's blocks read from NVMe reach G1.
    pub nvme_g1: NvmeG1Path,
    /// Whether a device failure (cuFile refused, the kernels that check or seal blocks
    /// in G1 failed) turned the direct NVMe <-> G1 path off for a while: later loads
    /// stage through the host tier and G1 victims go down through it instead, so a
    /// machine whose GPUDirect Storage misbehaves keeps serving.
    pub nvme_g1_backoff: G1Backoff,
}

/// The direct NVMe <-> G1 path's back-off after device failures: off for
/// `retry_ms` after the first failure, doubling with each failure in a row (at most
/// [`G1Backoff::MAX_DOUBLINGS`] times), on again for the next operation once that has
/// passed; a success resets it.
#[derive(Debug)]
pub struct G1Backoff {
    origin: std::time::Instant,
    /// Failures in a row (0: the path is on).
    failures: std::sync::atomic::AtomicU32,
    /// Milliseconds after `origin` until which the path stays off.
    off_until_ms: std::sync::atomic::AtomicU64,
    /// The first wait, in milliseconds.
    pub retry_ms: std::sync::atomic::AtomicU64,
}

impl Default for G1Backoff {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
            failures: Default::default(),
            off_until_ms: Default::default(),
            retry_ms: std::sync::atomic::AtomicU64::new(Self::RETRY_MS),
        }
    }
}

impl G1Backoff {
    /// The first wait after a failure: a minute.
    pub const RETRY_MS: u64 = 60_000;
    /// The wait doubles at most this often (a minute becomes at most about an hour).
    pub const MAX_DOUBLINGS: u32 = 6;

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Milliseconds the path stays off for now (0: it is on).
    pub fn off_for_ms(&self) -> u64 {
        self.off_for_ms_at(self.now_ms())
    }

    fn off_for_ms_at(&self, now_ms: u64) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        match self.off_until_ms.load(Relaxed) {
            0 => 0,
            until => until.saturating_sub(now_ms),
        }
    }

    /// Ends the current wait now, as if it had passed (tests of what follows it).
    #[doc(hidden)]
    pub fn expire_for_tests(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.off_until_ms.load(Relaxed) != 0 {
            self.off_until_ms.store(1, Relaxed);
        }
    }

    /// The wait after the `failures`-th failure in a row.
    pub fn wait_ms(retry_ms: u64, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(Self::MAX_DOUBLINGS);
        retry_ms.saturating_mul(1 << doublings)
    }

    /// A device failure: turns the path off and returns for how long, unless a
    /// concurrent failure already did (then `None`: one log line per back-off).
    pub fn failed(&self) -> Option<u64> {
        self.failed_at(self.now_ms())
    }

    fn failed_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.off_for_ms_at(now_ms) > 0 {
            return None;
        }
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        let wait = Self::wait_ms(self.retry_ms.load(Relaxed), failures);
        // At least 2: 0 means "on", 1 "the wait is over".
        self.off_until_ms
            .store(now_ms.saturating_add(wait).max(2), Relaxed);
        Some(wait)
    }

    /// A direct transfer worked: the back-off is over. Whether it had failed before (to
    /// log that it works again).
    pub fn worked(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.failures.load(Relaxed) == 0 {
            return false;
        }
        self.failures.store(0, Relaxed);
        self.off_until_ms.store(0, Relaxed);
        true
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Stores {
    /// Whether blocks move straight between NVMe and G1 now: a LOAD reads NVMe blocks
    /// into G1, and G1 victims the host tier has no room for are written from G1.
    pub fn nvme_direct_to_g1(&self) -> bool {
        self.nvme_g1.direct && self.nvme_g1_backoff.off_for_ms() == 0
    }

    /// How NVMe blocks reach G1 now, for `/status`: the start-up decision, or that a
    /// device failure turned the direct path off for a while.
    pub fn nvme_g1_now(&self) -> String {
        let off_ms = self.nvme_g1_backoff.off_for_ms();
        match self.nvme_g1.direct && off_ms > 0 {
            true => format!(
                "through the pinned host tier, MACs checked on the CPU (moving blocks \
                 straight between NVMe and G1 failed on the device {} time(s) in a row; \
                 tried again in {} s; see the log)",
                self.nvme_g1_backoff.failures(),
                off_ms.div_ceil(1000)
            ),
            false => self.nvme_g1.describe.clone(),
        }
    }
}

/// How blocks read from NVMe reach G1, decided at start-up from
/// `tiers.nvme.direct_to_g1` and what the machine offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeG1Path {
    /// A LOAD stages NVMe blocks straight into G1 slots ([`kvplane_cuda::Device::read_file`]),
    /// each block's checksum and MAC computed there by the kernels before it is served,
    /// and a G1 victim the host tier has no room for is written from G1
    /// ([`kvplane_cuda::Device::write_file`]) with its checksum and MAC computed there;
    /// otherwise blocks pass through pinned host slots, checked on the CPU.
    pub direct: bool,
    /// The start-up log's, `/status`'s and `kvplane status`'s line.
    pub describe: String,
}

impl NvmeG1Path {
    /// Decides the path for a daemon on `backend` (`has_both`: it has G1 and an NVMe
    /// tier; without both nothing moves between them). `on` where it cannot be done is
    /// a configuration error.
    pub fn decide(
        choice: nvme::DirectToG1,
        backend: kvplane_cuda::BackendKind,
        has_both: bool,
    ) -> Result<NvmeG1Path, ConfigError> {
        use kvplane_cuda::BackendKind;
        use nvme::DirectToG1;
        const STAGED: &str = "through the pinned host tier, MACs checked on the CPU";
        let staged = |why: String| NvmeG1Path {
            direct: false,
            describe: format!("{STAGED} ({why})"),
        };
        let direct = |how: &str| match has_both {
            true => NvmeG1Path {
                direct: true,
                describe: format!(
                    "straight into G1 ({how}), checksums and MACs checked there by the kernels; \
                     G1 victims the host tier cannot take are written from G1 the same way"
                ),
            },
            false => NvmeG1Path {
                direct: false,
                describe: "nothing moves between NVMe and G1 (the daemon lacks one of them)".into(),
            },
        };
        let gds = || match backend {
            BackendKind::Cuda => kvplane_cuda::gds::Gds::open()
                .map(|_| ())
                .map_err(|e| e.to_string()),
            BackendKind::Host => Err("host backend".to_string()),
        };
        Ok(match (choice, backend) {
            (DirectToG1::Off, _) => staged("tiers.nvme.direct_to_g1 = off".into()),
            (DirectToG1::Auto, BackendKind::Host) => {
                staged("host backend: G1 is host memory".into())
            }
            (DirectToG1::On, BackendKind::Host) => {
                direct("host backend: G1 is host memory, read with pread")
            }
            (_, BackendKind::Cuda) => match gds() {
                Ok(()) => direct("cuFile, GPUDirect Storage"),
                Err(e) if choice == DirectToG1::Auto => {
                    staged(format!("GPUDirect Storage unavailable: {e}"))
                }
                Err(e) => {
                    return Err(invalid(
                        "tiers.nvme.direct_to_g1",
                        format!("is on, but GPUDirect Storage is unavailable: {e}"),
                    ));
                }
            },
        })
    }
}

impl Stores {
    /// A memory tier's slots as the device sees them (`None` for NVMe, or G1 when it is
    /// not configured).
    pub fn memory_tier(&self, tier: Tier) -> Option<&dyn kvplane_cuda::SlotStore> {
        match tier {
            Tier::Hbm => self.hbm.as_ref().map(|a| a as &dyn kvplane_cuda::SlotStore),
            Tier::Host => Some(&self.host),
            Tier::Nvme => None,
        }
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("block_bytes", &self.block_bytes)
            .field("hbm", &self.hbm.is_some())
            .field("nvme", &self.nvme.is_some())
            .finish()
    }
}

/// Bytes of the per-slot header page (NVMe slot header; the host pool keeps the same page in
/// front of each block so a block is written to NVMe with one contiguous O_DIRECT write).
pub const SLOT_HEADER_BYTES: usize = 4096;
/// O_DIRECT alignment used for every slot offset, length and buffer.
pub const DIRECT_ALIGN: usize = 4096;

pub fn round_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}

/// A configuration value that failed validation: names the key and the reason, e.g.
/// `tiers.nvme.queue_depth: must be a power of two in 1..=4096, got 3`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// `[tiers]`: the three tiers' configuration, embedded by the daemon config.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TiersConfig {
    pub hbm: hbm::HbmConfig,
    pub host: host::HostConfig,
    pub nvme: nvme::NvmeConfig,
}

impl TiersConfig {
    /// Checks every value; the error names the full key (`tiers.host.capacity_bytes`).
    pub fn validate(&self, block_bytes: usize) -> Result<(), ConfigError> {
        self.hbm.validate("tiers.hbm", block_bytes)?;
        self.host.validate("tiers.host", block_bytes)?;
        self.nvme.validate("tiers.nvme", block_bytes)?;
        Ok(())
    }
}

/// A fixed set of slots `0..capacity`: a LIFO free list (recently freed slots are warm in
/// cache and TLB) plus a used bitmap so a double free or a foreign slot is caught.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    free: Vec<u32>,
    used: Vec<u64>,
    capacity: u32,
}

impl SlotAllocator {
    pub fn new(capacity: u32) -> Self {
        // Hand out low slots first (pop from the end of a descending list).
        let free: Vec<u32> = (0..capacity).rev().collect();
        SlotAllocator {
            free,
            used: vec![0; (capacity as usize).div_ceil(64)],
            capacity,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn used(&self) -> u32 {
        self.capacity - self.free.len() as u32
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn alloc(&mut self) -> Option<u32> {
        let slot = self.free.pop()?;
        self.used[slot as usize / 64] |= 1 << (slot % 64);
        Some(slot)
    }

    /// Takes a specific slot (rebuilding the index after a restart). False if taken.
    pub fn claim(&mut self, slot: u32) -> bool {
        if slot >= self.capacity || self.is_used(slot) {
            return false;
        }
        if let Some(pos) = self.free.iter().position(|&s| s == slot) {
            self.free.swap_remove(pos);
        }
        self.used[slot as usize / 64] |= 1 << (slot % 64);
        true
    }

    /// Claims many slots at once (O(capacity), for start-up), keeping the free list ordered.
    pub fn claim_all(&mut self, slots: &[u32]) {
        for &slot in slots {
            if slot < self.capacity {
                self.used[slot as usize / 64] |= 1 << (slot % 64);
            }
        }
        let used = &self.used;
        self.free
            .retain(|&s| used[s as usize / 64] & (1 << (s % 64)) == 0);
    }

    /// Returns a slot. Panics on a double free or a foreign slot: that is a registry bug
    /// that would otherwise hand one slot to two blocks.
    pub fn free(&mut self, slot: u32) {
        assert!(
            self.is_used(slot),
            "slot {slot} freed twice or never allocated"
        );
        self.used[slot as usize / 64] &= !(1 << (slot % 64));
        self.free.push(slot);
    }

    pub fn is_used(&self, slot: u32) -> bool {
        slot < self.capacity && self.used[slot as usize / 64] & (1 << (slot % 64)) != 0
    }

    /// Checks that free list and bitmap agree (tests and `check_invariants`).
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.capacity as usize];
        for &slot in &self.free {
            if slot >= self.capacity {
                return Err(format!("free slot {slot} out of range"));
            }
            if seen[slot as usize] {
                return Err(format!("slot {slot} twice in free list"));
            }
            seen[slot as usize] = true;
            if self.is_used(slot) {
                return Err(format!("slot {slot} both free and used"));
            }
        }
        let used_bits: u32 = self.used.iter().map(|w| w.count_ones()).sum();
        if used_bits + self.free.len() as u32 != self.capacity {
            return Err(format!(
                "leaked slots: {} used + {} free != {}",
                used_bits,
                self.free.len(),
                self.capacity
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_round_trip_and_claims() {
        let mut a = SlotAllocator::new(130);
        let s0 = a.alloc().unwrap();
        assert_eq!(s0, 0);
        assert!(a.claim(77));
        assert!(!a.claim(77));
        a.claim_all(&[5, 6, 129]);
        assert_eq!(a.used(), 5);
        a.check().unwrap();
        a.free(77);
        assert!(!a.is_used(77));
        a.check().unwrap();
        let mut all = vec![];
        while let Some(s) = a.alloc() {
            all.push(s);
        }
        assert_eq!(a.used(), 130);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 126);
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn double_free_panics() {
        let mut a = SlotAllocator::new(4);
        let s = a.alloc().unwrap();
        a.free(s);
        a.free(s);
    }

    #[test]
    fn tiers_config_parses_and_names_bad_keys() {
        let text = r#"
            [hbm]
            capacity_bytes = 0
            [host]
            capacity_bytes = 1073741824
            lock = false
            hugepages = "never"
            cpus = [0, 1]
            [nvme]
            paths = ["/var/lib/kvplane/g3.kvp"]
            capacity_bytes = 17179869184
            engine = "io_uring"
            queue_depth = 64
            batch_size = 16
        "#;
        let c: TiersConfig = toml::from_str(text).unwrap();
        assert_eq!(c.nvme.engine, nvme::EngineKind::IoUring);
        assert_eq!(c.host.hugepages, host::HugepageMode::Never);
        c.validate(2 << 20).unwrap();
        let e = c.validate(2 << 30).unwrap_err();
        assert_eq!(e.key, "tiers.host.capacity_bytes");
        let bad = TiersConfig {
            nvme: nvme::NvmeConfig {
                checksum_threads: 0,
                ..c.nvme.clone()
            },
            ..c.clone()
        };
        assert_eq!(
            bad.validate(2 << 20).unwrap_err().key,
            "tiers.nvme.checksum_threads"
        );
        assert!(
            toml::from_str::<TiersConfig>("[host]\nlocked = true").is_err(),
            "unknown keys are errors"
        );
    }

    /// The direct path's back-off: off for the first wait after a failure, one log line
    /// per back-off (a concurrent failure adds nothing), doubling per failure in a row up
    /// to the cap, and over at the first success.
    #[test]
    fn the_direct_path_backs_off_after_device_failures_and_recovers() {
        assert_eq!(G1Backoff::wait_ms(100, 1), 100);
        assert_eq!(G1Backoff::wait_ms(100, 2), 200);
        assert_eq!(G1Backoff::wait_ms(100, 4), 800);
        assert_eq!(
            G1Backoff::wait_ms(100, 50),
            100 << G1Backoff::MAX_DOUBLINGS,
            "capped"
        );
        let b = G1Backoff::default();
        assert_eq!(b.off_for_ms(), 0);
        assert!(!b.worked(), "nothing to recover from");
        b.retry_ms.store(40, std::sync::atomic::Ordering::Relaxed);
        // Times in ms after the back-off's origin.
        assert_eq!(b.failed_at(1000), Some(40));
        assert_eq!(b.off_for_ms_at(1010), 30);
        assert_eq!(b.failed_at(1010), None, "already off: no second log line");
        assert_eq!(b.failures(), 1);
        assert_eq!(b.off_for_ms_at(1040), 0, "tried again after the wait");
        assert_eq!(b.failed_at(1050), Some(80), "failed again: twice the wait");
        assert_eq!(b.off_for_ms_at(1100), 30);
        assert_eq!(b.failures(), 2);
        assert!(b.worked(), "a success ends it");
        assert_eq!((b.off_for_ms(), b.failures()), (0, 0));
        assert_eq!(b.failed(), Some(40), "a new run of failures starts over");
    }

    #[test]
    fn the_nvme_g1_path_follows_the_choice_and_says_why() {
        use kvplane_cuda::BackendKind;
        use nvme::DirectToG1;
        let decide = |c, both| NvmeG1Path::decide(c, BackendKind::Host, both).unwrap();
        let auto = decide(DirectToG1::Auto, true);
        assert!(!auto.direct);
        assert!(auto.describe.contains("host backend"), "{}", auto.describe);
        let off = decide(DirectToG1::Off, true);
        assert!(!off.direct);
        assert!(
            off.describe.contains("direct_to_g1 = off"),
            "{}",
            off.describe
        );
        let on = decide(DirectToG1::On, true);
        assert!(on.direct);
        assert!(on.describe.contains("straight into G1"), "{}", on.describe);
        // Without both G1 and NVMe nothing moves between them.
        assert!(!decide(DirectToG1::On, false).direct);
        let t: TiersConfig = toml::from_str("[nvme]\ndirect_to_g1 = \"on\"\n").unwrap();
        assert_eq!(t.nvme.direct_to_g1, DirectToG1::On);
        assert!(toml::from_str::<TiersConfig>("[nvme]\ndirect_to_g1 = \"yes\"\n").is_err());
    }
}

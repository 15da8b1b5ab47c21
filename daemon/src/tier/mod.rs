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
    /// Set when a read into or a write from G1 failed on the device (cuFile refused, the
    /// kernels that check or seal blocks there failed): later loads stage through the
    /// host tier and G1 victims go down through it instead, so a machine whose GPUDirect
    /// Storage misbehaves keeps serving.
    pub nvme_g1_failed: std::sync::atomic::AtomicBool,
}

impl Stores {
    /// Whether blocks move straight between NVMe and G1 now: a LOAD reads NVMe blocks
    /// into G1, and G1 victims the host tier has no room for are written from G1.
    pub fn nvme_direct_to_g1(&self) -> bool {
        self.nvme_g1.direct
            && !self
                .nvme_g1_failed
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How NVMe blocks reach G1 now, for `/status`: the start-up decision, or that a
    /// device failure turned the direct path off since.
    pub fn nvme_g1_now(&self) -> String {
        match self.nvme_g1.direct && !self.nvme_direct_to_g1() {
            true => "through the pinned host tier, MACs checked on the CPU (moving blocks \
                     straight between NVMe and G1 failed on the device since start-up; see \
                     the log)"
                .into(),
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

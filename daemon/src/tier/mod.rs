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
    /// Back-offs of the direct NVMe <-> G1 path after device failures (cuFile refused,
    /// the kernels that check or seal blocks in G1 failed), one per direction
    /// ([`G1Direction`]): meanwhile loads stage through the host tier, or G1 victims go
    /// down through it, so a machine whose GPUDirect Storage misbehaves keeps serving.
    pub nvme_g1_backoff: [G1Backoff; 2],
}

/// Which way blocks move straight between NVMe and G1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum G1Direction {
    /// A LOAD reads NVMe blocks into G1 (cuFileRead).
    NvmeToG1 = 0,
    /// G1 victims the host tier has no room for are written from G1 (cuFileWrite).
    G1ToNvme = 1,
}

impl G1Direction {
    pub const ALL: [G1Direction; 2] = [G1Direction::NvmeToG1, G1Direction::G1ToNvme];

    fn what(self) -> &'static str {
        match self {
            G1Direction::NvmeToG1 => "reading NVMe blocks straight into G1",
            G1Direction::G1ToNvme => "writing G1 blocks straight to NVMe",
        }
    }
}

/// One direction's back-off after device failures: off for `retry_ms` after the first
/// failure, doubling with each failure in a row (at most [`G1Backoff::MAX_DOUBLINGS`]
/// times). Once the wait has passed one operation probes the path (others keep to the
/// host tier for up to [`G1Backoff::PROBE_MS`] while it does); a success ends the
/// back-off. Failures and successes of operations that began before the latest failure
/// are that failure's, not news: each operation carries the [`G1Backoff::epoch`] it
/// began in.
#[derive(Debug)]
pub struct G1Backoff {
    state: std::sync::Mutex<BackoffState>,
    /// The first wait, in milliseconds.
    pub retry_ms: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct BackoffState {
    /// Failures in a row (0: the path is on).
    failures: u32,
    /// Off until then (`None`: on).
    off_until: Option<std::time::Instant>,
    /// A probe of the path runs until then at the latest.
    probe_until: Option<std::time::Instant>,
    /// Bumped by each failure that starts a back-off.
    epoch: u64,
}

impl Default for G1Backoff {
    fn default() -> Self {
        Self {
            state: Default::default(),
            retry_ms: std::sync::atomic::AtomicU64::new(Self::RETRY_MS),
        }
    }
}

impl G1Backoff {
    /// The first wait after a failure: a minute.
    pub const RETRY_MS: u64 = 60_000;
    /// The wait doubles at most this often (a minute becomes at most about an hour).
    pub const MAX_DOUBLINGS: u32 = 6;
    /// How long one probe keeps the others on the host tier at most (a probe that never
    /// reaches the device, e.g. a load that got no G1 slot, lets another try after it).
    pub const PROBE_MS: u64 = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, BackoffState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The wait after the `failures`-th failure in a row.
    pub fn wait_ms(retry_ms: u64, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(Self::MAX_DOUBLINGS);
        retry_ms.saturating_mul(1 << doublings)
    }

    /// Whether an operation may move blocks this way now: the path is on, or its wait
    /// has passed and no other operation is probing it (this one then probes).
    pub fn try_now(&self) -> bool {
        self.try_at(std::time::Instant::now())
    }

    fn try_at(&self, now: std::time::Instant) -> bool {
        let mut s = self.lock();
        match (s.off_until, s.probe_until) {
            (None, _) => true,
            (Some(until), _) if now < until => false,
            (Some(_), Some(probe)) if now < probe => false,
            (Some(_), _) => {
                s.probe_until = Some(now + std::time::Duration::from_millis(Self::PROBE_MS));
                true
            }
        }
    }

    /// How long the path stays off (`None`: on, or its wait has passed). Observes only.
    pub fn off_for(&self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        self.lock()
            .off_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// The epoch an operation that is about to move blocks this way begins in.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// A device failure of an operation that began in `epoch`: turns the path off and
    /// returns for how long, unless a failure since `epoch` already did (then `None`:
    /// one back-off, and one log line, per incident).
    pub fn failed(&self, epoch: u64) -> Option<std::time::Duration> {
        self.failed_at(epoch, std::time::Instant::now())
    }

    fn failed_at(&self, epoch: u64, now: std::time::Instant) -> Option<std::time::Duration> {
        let mut s = self.lock();
        if s.epoch != epoch {
            return None;
        }
        s.epoch += 1;
        s.failures = s.failures.saturating_add(1);
        let wait = std::time::Duration::from_millis(Self::wait_ms(
            self.retry_ms.load(std::sync::atomic::Ordering::Relaxed),
            s.failures,
        ));
        s.off_until = Some(now + wait);
        s.probe_until = None;
        Some(wait)
    }

    /// An operation that began in `epoch` moved blocks this way: the back-off is over,
    /// unless a failure came since it began. Whether it ended one (to log that).
    pub fn worked(&self, epoch: u64) -> bool {
        let mut s = self.lock();
        if s.epoch != epoch || s.failures == 0 {
            return false;
        }
        *s = BackoffState {
            epoch: s.epoch,
            ..BackoffState::default()
        };
        true
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.lock().failures
    }

    /// Ends the current wait now, as if it had passed (tests of what follows it).
    #[doc(hidden)]
    pub fn expire_for_tests(&self) {
        let mut s = self.lock();
        if s.off_until.is_some() {
            s.off_until = Some(std::time::Instant::now());
            s.probe_until = None;
        }
    }
}

impl Stores {
    /// A direction's back-off.
    pub fn backoff(&self, direction: G1Direction) -> &G1Backoff {
        &self.nvme_g1_backoff[direction as usize]
    }

    /// Whether an operation may move blocks straight between NVMe and G1 this way now
    /// (the daemon does so, and no back-off keeps it from it; see [`G1Backoff::try_now`]).
    pub fn direct_now(&self, direction: G1Direction) -> bool {
        self.nvme_g1.direct && self.backoff(direction).try_now()
    }

    /// Whether the daemon moves blocks straight this way and no back-off's wait is
    /// running (observes only: no probe is claimed).
    pub fn direct_on(&self, direction: G1Direction) -> bool {
        self.nvme_g1.direct && self.backoff(direction).off_for().is_none()
    }

    /// How NVMe blocks reach G1 now, for `/status`: the start-up decision, and each
    /// direction a device failure turned off for a while.
    pub fn nvme_g1_now(&self) -> String {
        let mut now = self.nvme_g1.describe.clone();
        if !self.nvme_g1.direct {
            return now;
        }
        for d in G1Direction::ALL {
            if let Some(off) = self.backoff(d).off_for() {
                now.push_str(&format!(
                    "; {} failed on the device {} time(s) in a row: through the pinned host \
                     tier (MACs checked on the CPU) for the next {} s, then tried again; \
                     see the log",
                    d.what(),
                    self.backoff(d).failures(),
                    off.as_secs().max(1)
                ));
            }
        }
        now
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

    /// Takes specific slots (rebuilding the index after a restart): `taken[i]` says whether
    /// `slots[i]` was free (false: out of range, or taken, by an earlier one of `slots`
    /// too). One pass over the free list for all of them, keeping its order: a search of
    /// it per slot made a restart quadratic in the tier's size.
    pub fn claim_many(&mut self, slots: &[u32]) -> Vec<bool> {
        let taken = slots
            .iter()
            .map(|&slot| {
                let free = slot < self.capacity && !self.is_used(slot);
                if free {
                    self.used[slot as usize / 64] |= 1 << (slot % 64);
                }
                free
            })
            .collect();
        let used = &self.used;
        self.free
            .retain(|&s| used[s as usize / 64] & (1 << (s % 64)) == 0);
        taken
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
        assert_eq!(a.claim_many(&[77]), [true]);
        assert_eq!(
            a.claim_many(&[77, 5, 6, 129, 6, 130, 0]),
            [false, true, true, true, false, false, false],
            "taken before, free, free, free, taken by an earlier one, out of range, allocated"
        );
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

    /// The direct path's back-off: off for the first wait after a failure, one back-off
    /// per incident (failures of operations that began before it add nothing, nor do
    /// their successes end it), one probe once the wait has passed (another after the
    /// probe window), doubling per failure in a row up to the cap, over at the first
    /// success of an operation that began after the last failure.
    #[test]
    fn the_direct_path_backs_off_after_device_failures_and_recovers() {
        use std::time::{Duration, Instant};
        let ms = Duration::from_millis;
        assert_eq!(G1Backoff::wait_ms(100, 1), 100);
        assert_eq!(G1Backoff::wait_ms(100, 2), 200);
        assert_eq!(G1Backoff::wait_ms(100, 4), 800);
        assert_eq!(
            G1Backoff::wait_ms(100, u32::MAX),
            100 << G1Backoff::MAX_DOUBLINGS,
            "capped"
        );
        let b = G1Backoff::default();
        b.retry_ms.store(40, std::sync::atomic::Ordering::Relaxed);
        let t0 = Instant::now();
        assert!(b.try_at(t0) && b.off_for().is_none());
        let (early, late) = (b.epoch(), b.epoch());
        assert!(!b.worked(early), "nothing to recover from");
        assert_eq!(b.failed_at(early, t0), Some(ms(40)));
        assert_eq!(b.failed_at(late, t0 + ms(1)), None, "the same incident");
        assert!(!b.worked(late), "began before the failure: not news");
        assert_eq!(b.failures(), 1);
        assert!(!b.try_at(t0 + ms(10)), "off during the wait");
        // After the wait: one probe; the others stay on the host tier meanwhile.
        assert!(b.try_at(t0 + ms(41)));
        assert!(!b.try_at(t0 + ms(42)), "one probe at a time");
        let probe = b.epoch();
        assert!(
            b.try_at(t0 + ms(41) + ms(G1Backoff::PROBE_MS)),
            "a probe that never reported lets another try"
        );
        assert_eq!(
            b.failed_at(probe, t0 + ms(50)),
            Some(ms(80)),
            "failed again: twice the wait"
        );
        assert!(!b.try_at(t0 + ms(100)));
        assert_eq!(b.failures(), 2);
        let probe = b.epoch();
        assert!(b.try_at(t0 + ms(131)));
        assert!(b.worked(probe), "a success ends it");
        assert_eq!((b.off_for(), b.failures()), (None, 0));
        assert!(
            b.try_at(t0 + ms(132)) && b.try_at(t0 + ms(132)),
            "on for all"
        );
        assert_eq!(
            b.failed_at(b.epoch(), t0 + ms(200)),
            Some(ms(40)),
            "a new run of failures starts over"
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

//! G3: NVMe slots in preallocated files or raw block devices, read and written with O_DIRECT
//! through an [`IoEngine`] (io_uring, or pread/pwrite where io_uring is refused).
//!
//! A slot is `SLOT_HEADER_BYTES` of self-describing header ([`header::SlotHeader`]) followed
//! by the block, both 4 KiB aligned, written with one I/O from the host pool (whose slots
//! carry the same header page). On open, a scan reads every header and rebuilds the index;
//! a torn or corrupt slot is counted, tombstoned and freed, and never served.
//!
//! The tier's data are tenants' prompts and must be both secret and authentic: paths are
//! opened through [`crate::secure_open`] (no link planted by another user is followed, no
//! directory on the way can be changed by another user, files are created 0600 and an
//! existing file or device must be the daemon's or root's with no group/other access), and
//! every slot carries MACs under the daemon's key ([`key`]), so a slot rewritten by someone
//! who can write the file is refused as `Corrupt`.

pub mod engine;
pub mod header;
pub mod key;
pub mod uring;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use self::engine::{FaultInjector, FaultPlan, IoEngine, IoKind, IoOp, SyncEngine};
use self::header::{HeaderError, SlotHeader};
use self::key::{KeyError, SlotKey};
use super::{ConfigError, DIRECT_ALIGN, SLOT_HEADER_BYTES, invalid, round_up};
use crate::secure_open::{self, Kind, OpenSpec, PathError};

/// Which I/O engine the NVMe tier uses.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// io_uring, or pread/pwrite (with a warning) when the kernel refuses io_uring.
    #[default]
    Auto,
    IoUring,
    Sync,
}

/// `[tiers.nvme]`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeConfig {
    /// Files (created and preallocated) or raw block devices. Empty disables the tier.
    pub paths: Vec<PathBuf>,
    /// Bytes per file (block devices use their whole size).
    pub capacity_bytes: u64,
    pub engine: EngineKind,
    /// io_uring entries = ops in flight per thread.
    pub queue_depth: u32,
    /// Ops pushed before each submit.
    pub batch_size: u32,
    /// Open with O_DIRECT (bypass the page cache). Only tests turn this off.
    pub direct: bool,
    /// At start-up also read every block and check its data checksum (slow on big stores;
    /// otherwise data is checked on every load).
    pub verify_on_scan: bool,
    /// Threads computing slot checksums during a write batch (the calling thread plus
    /// `checksum_threads - 1` helpers for that call). Each slot costs its data checksum and
    /// its data MAC: on the development VM under other builds' load, 2.6-4.6 and 1.8-2.2
    /// GB/s per core (`kvplane bench nvme`), together below a fast disk on one core.
    pub checksum_threads: usize,
    /// The file holding the key that authenticates slots (32 random bytes, created 0600 on
    /// first start). Unset: `<first path>.key` beside the first file; must be set when the
    /// first path is a block device. Whoever can read it can forge slots: keep it on a file
    /// system only the daemon's user can write.
    pub key_path: Option<PathBuf>,
    /// How a LOAD's blocks read from NVMe reach a daemon that has G1: `auto` reads them
    /// straight into G1 (cuFile, GPUDirect Storage) where libcufile works on the cuda
    /// backend, each block's checksum and MAC checked on the GPU, else through the
    /// pinned host tier (checked on the CPU); `off` always through the host tier; `on`
    /// straight into G1 or the start-up fails. On the host backend G1 is host memory:
    /// `on` runs the same path with pread and the CPU build of the MAC kernels.
    pub direct_to_g1: DirectToG1,
}

/// `[tiers.nvme] direct_to_g1`.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DirectToG1 {
    #[default]
    Auto,
    Off,
    On,
}

impl DirectToG1 {
    /// The config file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectToG1::Auto => "auto",
            DirectToG1::Off => "off",
            DirectToG1::On => "on",
        }
    }
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            paths: Vec::new(),
            capacity_bytes: 16 << 30,
            engine: EngineKind::Auto,
            queue_depth: 64,
            batch_size: 16,
            direct: true,
            verify_on_scan: false,
            checksum_threads: 2,
            key_path: None,
            direct_to_g1: DirectToG1::Auto,
        }
    }
}

impl NvmeConfig {
    pub fn validate(&self, key: &str, block_bytes: usize) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.checksum_threads) {
            return Err(invalid(
                &format!("{key}.checksum_threads"),
                format!("must be in 1..=64, got {}", self.checksum_threads),
            ));
        }
        let qd = self.queue_depth;
        if !(1..=4096).contains(&qd) || !qd.is_power_of_two() {
            return Err(invalid(
                &format!("{key}.queue_depth"),
                format!("must be a power of two in 1..=4096, got {qd}"),
            ));
        }
        if self.batch_size == 0 || self.batch_size > qd {
            return Err(invalid(
                &format!("{key}.batch_size"),
                format!("must be in 1..=queue_depth ({qd}), got {}", self.batch_size),
            ));
        }
        let slot = slot_bytes(block_bytes);
        if !self.paths.is_empty() && self.capacity_bytes < slot as u64 {
            return Err(invalid(
                &format!("{key}.capacity_bytes"),
                format!(
                    "must hold at least one slot of {slot} bytes, got {}",
                    self.capacity_bytes
                ),
            ));
        }
        for (i, p) in self.paths.iter().enumerate() {
            if p.as_os_str().is_empty() {
                return Err(invalid(&format!("{key}.paths[{i}]"), "empty path"));
            }
        }
        if let Some(k) = &self.key_path {
            if k.as_os_str().is_empty() {
                return Err(invalid(&format!("{key}.key_path"), "empty path"));
            }
            if self.paths.contains(k) {
                return Err(invalid(
                    &format!("{key}.key_path"),
                    "is also one of the tier's paths",
                ));
            }
        }
        Ok(())
    }
}

/// Slot size for a block size: header page + block rounded up to 4 KiB.
pub fn slot_bytes(block_bytes: usize) -> usize {
    SLOT_HEADER_BYTES + round_up(block_bytes, DIRECT_ALIGN)
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error(
        "NVMe paths {path} and {other} are the same {what}: their slots would overwrite \
         each other; name it once"
    )]
    SameFile {
        path: PathBuf,
        other: PathBuf,
        what: &'static str,
    },
    #[error("opening NVMe path {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preallocating {bytes} bytes in {path} (fallocate): {source}")]
    Preallocate {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("NVMe path {path} holds no slot of {slot_bytes} bytes (size {size})")]
    TooSmall {
        path: PathBuf,
        size: u64,
        slot_bytes: usize,
    },
    #[error("creating the NVMe I/O engine ({kind}): {source}")]
    Engine {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("NVMe {op} of slot {slot} ({path} at offset {offset}): {source}")]
    Io {
        op: &'static str,
        slot: u32,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("NVMe slot {slot} is corrupt: {reason}")]
    Corrupt { slot: u32, reason: String },
    /// Reading a slot straight into G1, or checking it there, failed on the device.
    #[error("NVMe slot {slot} into G1: {source}")]
    Device {
        slot: u32,
        #[source]
        source: kvplane_cuda::DeviceError,
    },
    /// A path refused before anything was written to it (link, owner, mode, directory).
    #[error("NVMe tier: {0}")]
    Path(PathError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "tiers.nvme.key_path must be set: the first NVMe path {path} is a block device, and a \
         key file beside it (in /dev) would not survive a reboot"
    )]
    KeyPathRequired { path: PathBuf },
}

impl NvmeError {
    /// True for disk-full errors (ENOSPC/EDQUOT), which the manager answers by evicting.
    pub fn is_no_space(&self) -> bool {
        matches!(self, NvmeError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// A valid slot found by the start-up scan.
#[derive(Clone, Copy, Debug)]
pub struct ScannedSlot {
    pub slot: u32,
    pub header: SlotHeader,
}

#[derive(Debug, Default)]
pub struct ScanReport {
    pub valid: Vec<ScannedSlot>,
    pub empty: u64,
    /// Torn/corrupt slots found (and tombstoned), including slots whose MAC does not verify.
    pub corrupt: u64,
    /// Slots in an older header format (version 1, no MAC): not indexed, tombstoned.
    pub old_format: u64,
    /// Older copies of a key also stored in a newer slot (freed).
    pub duplicates: u64,
    pub seconds: f64,
}

type EngineFactory = Box<dyn Fn() -> Result<Box<dyn IoEngine>, NvmeError> + Send + Sync>;

pub struct NvmeStore {
    paths: Vec<PathBuf>,
    _files: Vec<File>,
    /// First global slot of each file (plus the total at the end).
    file_first_slot: Vec<u32>,
    slot_bytes: usize,
    block_bytes: usize,
    engines: Mutex<Vec<Box<dyn IoEngine>>>,
    factory: EngineFactory,
    generation: AtomicU64,
    engine_name: String,
    registered_buffers: bool,
    checksum_threads: usize,
    key: SlotKey,
}

/// A 4 KiB aligned heap buffer for scans and tombstones.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}
impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("layout");
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuf { ptr, layout }
    }
    fn slice(&self) -> &[u8] {
        // SAFETY: allocated with this size; &self borrows it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A block's data checksum and MAC (under `key`) in one pass: each 64 KiB piece is
/// checksummed, then MACed while it is still in cache (`kvplane bench nvme` reports its
/// rate on one core as `sums_gbps`, beside the two passes alone: 2.47-2.85 GB/s against
/// 2.3-2.6 for both one after the other on the development VM, 2026-12-06). What every
/// slot write computes and every load from NVMe verifies on the CPU.
pub fn data_sums(key: &SlotKey, data: &[u8]) -> (u64, [u8; key::MAC_BYTES]) {
    const PIECE_BYTES: usize = 64 << 10;
    let mut checksum = kvplane_kernels::Checksum64::new();
    let mut mac = key.data_hasher();
    for piece in data.chunks(PIECE_BYTES) {
        checksum.update(piece);
        mac.update(piece);
    }
    (checksum.finish(), *mac.finalize().as_bytes())
}

/// What a tier path is, whatever name reached it: (device, inode) of a file, the device
/// number of a block device.
type FileIdentity = (bool, u64, u64);

/// Opens one tier path: a new file is created 0600; an existing file or device must be owned
/// by root or the daemon's user, with no group/other access (see [`crate::secure_open`]).
/// The checks are made on the descriptor that is then used, before anything is written.
fn open_path(
    path: &Path,
    capacity: u64,
    direct: bool,
    slot_bytes: usize,
) -> Result<(File, u32, bool, FileIdentity), NvmeError> {
    let mut flags = libc::O_RDWR | libc::O_CREAT;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let spec = OpenSpec {
        flags,
        create_mode: 0o600,
        kinds: &[Kind::Regular, Kind::BlockDevice],
        forbidden_mode: 0o077,
        // udev's stable names (/dev/disk/by-id, /dev/kvplane/...) are root's links.
        follow_final_link: true,
    };
    let opened = secure_open::open(path, &spec).map_err(NvmeError::Path)?;
    let is_dev = opened.is_block_device();
    let identity = if is_dev {
        (true, opened.stat.st_rdev, 0)
    } else {
        (false, opened.stat.st_dev, opened.stat.st_ino)
    };
    let file = opened.file;
    let size = if is_dev {
        let mut bytes: u64 = 0;
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: BLKGETSIZE64 writes a u64 into `bytes`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
        if rc != 0 {
            return Err(NvmeError::Open {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        bytes
    } else {
        let len = opened.stat.st_size as u64;
        if len < capacity {
            // SAFETY: fallocate on our fd; mode 0 allocates and extends.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, capacity as libc::off_t) };
            if rc != 0 {
                let source = std::io::Error::last_os_error();
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    file.set_len(capacity)
                        .map_err(|source| NvmeError::Preallocate {
                            path: path.to_path_buf(),
                            bytes: capacity,
                            source,
                        })?;
                } else {
                    return Err(NvmeError::Preallocate {
                        path: path.to_path_buf(),
                        bytes: capacity,
                        source,
                    });
                }
            }
        }
        capacity
    };
    let slots = size / slot_bytes as u64;
    if slots == 0 {
        return Err(NvmeError::TooSmall {
            path: path.to_path_buf(),
            size,
            slot_bytes,
        });
    }
    Ok((
        file,
        slots.min(u32::MAX as u64 / 2) as u32,
        is_dev,
        identity,
    ))
}

/// The key file a config names: `key_path`, else `<first path>.key`.
pub fn key_path(config: &NvmeConfig) -> Option<PathBuf> {
    config.key_path.clone().or_else(|| {
        config.paths.first().map(|p| {
            let mut name = p.clone().into_os_string();
            name.push(".key");
            PathBuf::from(name)
        })
    })
}

impl NvmeStore {
    /// Opens (creating and preallocating files as needed) and scans the store.
    /// `regions` is the host pool to register as fixed buffers; `faults` wraps every engine
    /// in a [`FaultInjector`] (tests).
    pub fn open(
        config: &NvmeConfig,
        block_bytes: usize,
        regions: Vec<(*mut u8, usize)>,
        faults: Option<Arc<FaultPlan>>,
    ) -> Result<(NvmeStore, ScanReport), NvmeError> {
        let slot_bytes = slot_bytes(block_bytes);
        let mut files = Vec::new();
        let mut first = vec![0u32];
        let mut first_is_dev = false;
        let mut identities: Vec<FileIdentity> = Vec::new();
        for (i, path) in config.paths.iter().enumerate() {
            let (file, slots, is_dev, identity) =
                open_path(path, config.capacity_bytes, config.direct, slot_bytes)?;
            // Two spellings, or a root's link, can name one file: compared as opened.
            if let Some(k) = identities.iter().position(|&x| x == identity) {
                return Err(NvmeError::SameFile {
                    path: path.clone(),
                    other: config.paths[k].clone(),
                    what: if is_dev { "block device" } else { "file" },
                });
            }
            identities.push(identity);
            first_is_dev |= i == 0 && is_dev;
            files.push(file);
            first.push(first.last().copied().unwrap_or(0).saturating_add(slots));
        }
        if config.key_path.is_none() && first_is_dev {
            return Err(NvmeError::KeyPathRequired {
                path: config.paths[0].clone(),
            });
        }
        // Loaded here, at start-up, while the daemon may still read root's files; privileges
        // are dropped later (cli/serve.rs).
        let key = match key_path(config) {
            Some(path) => {
                let (key, created) = SlotKey::load_or_create(&path)?;
                if created {
                    tracing::info!(path = %path.display(), "created the NVMe slot key (0600)");
                }
                key
            }
            // No paths: a store without slots never reads or writes a header.
            None => SlotKey::from_material(&[0; key::KEY_BYTES]),
        };
        let fds: Arc<Vec<RawFd>> = Arc::new(files.iter().map(|f| f.as_raw_fd()).collect());
        let regions: Vec<(usize, usize)> =
            regions.into_iter().map(|(p, l)| (p as usize, l)).collect();
        let (qd, batch) = (config.queue_depth, config.batch_size);
        let kind = config.engine;
        let make_base = {
            let fds = fds.clone();
            move || -> Result<Box<dyn IoEngine>, NvmeError> {
                let regions: Vec<(*mut u8, usize)> =
                    regions.iter().map(|&(p, l)| (p as *mut u8, l)).collect();
                match kind {
                    EngineKind::Sync => Ok(Box::new(SyncEngine::new(fds.clone()))),
                    EngineKind::IoUring => uring::UringEngine::new(&fds, &regions, qd, batch)
                        .map(|e| Box::new(e) as Box<dyn IoEngine>)
                        .map_err(|source| NvmeError::Engine {
                            kind: "io_uring",
                            source,
                        }),
                    EngineKind::Auto => match uring::UringEngine::new(&fds, &regions, qd, batch) {
                        Ok(e) => Ok(Box::new(e)),
                        Err(e) => {
                            tracing::warn!("io_uring refused ({e}): NVMe tier uses pread/pwrite");
                            Ok(Box::new(SyncEngine::new(fds.clone())))
                        }
                    },
                }
            }
        };
        let factory: EngineFactory = match faults {
            None => Box::new(make_base),
            Some(plan) => Box::new(move || {
                Ok(Box::new(FaultInjector::new(make_base()?, plan.clone())) as Box<dyn IoEngine>)
            }),
        };
        let first_engine = factory()?;
        let engine_name = first_engine.name();
        let registered_buffers = first_engine.registered_buffers();
        let store = NvmeStore {
            paths: config.paths.clone(),
            _files: files,
            file_first_slot: first,
            slot_bytes,
            block_bytes,
            engines: Mutex::new(vec![first_engine]),
            factory,
            generation: AtomicU64::new(1),
            engine_name,
            registered_buffers,
            checksum_threads: config.checksum_threads.max(1),
            key,
        };
        let report = store.scan(config.verify_on_scan)?;
        Ok((store, report))
    }

    pub fn slot_count(&self) -> u32 {
        *self.file_first_slot.last().unwrap_or(&0)
    }
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    pub fn engine_name(&self) -> &str {
        &self.engine_name
    }
    pub fn registered_buffers(&self) -> bool {
        self.registered_buffers
    }

    /// A fresh generation for a slot write (newer wins when a key appears twice).
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    fn locate(&self, slot: u32) -> (u32, u64) {
        let file = self.file_first_slot.partition_point(|&f| f <= slot) - 1;
        let local = slot - self.file_first_slot[file];
        (file as u32, local as u64 * self.slot_bytes as u64)
    }

    /// Runs ops with a per-thread engine (taken from the pool, created on first use).
    fn run(
        &self,
        ops: &mut [IoOp],
        before: &mut dyn FnMut(usize),
        after: &mut dyn FnMut(usize, &IoOp),
    ) -> Result<(), NvmeError> {
        let engine = self.engines.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut engine = match engine {
            Some(e) => e,
            None => (self.factory)()?,
        };
        // SAFETY: callers of the pub fns below guarantee buffer validity and exclusivity.
        let r = unsafe { engine.run_with(ops, before, after) };
        match r {
            Ok(()) => {
                self.engines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(engine);
                Ok(())
            }
            // A broken ring is dropped; the next call makes a new one.
            Err(source) => Err(NvmeError::Engine {
                kind: "run",
                source,
            }),
        }
    }

    fn io_error(&self, op: &'static str, slot: u32, errno: i32) -> NvmeError {
        self.io_failure(op, slot, std::io::Error::from_raw_os_error(errno))
    }

    /// An I/O error of `op` on `slot`, naming its file and offset.
    pub fn io_failure(&self, op: &'static str, slot: u32, source: std::io::Error) -> NvmeError {
        let (file, offset) = self.locate(slot);
        NvmeError::Io {
            op,
            slot,
            path: self.paths[file as usize].clone(),
            offset,
            source,
        }
    }

    /// Writes header + block for each `(slot, buf)`; `buf` is a host-pool slot of
    /// `slot_bytes` whose header page `prepare(i)` fills (see [`NvmeStore::encode_header`]).
    /// Headers are prepared by the calling thread right before each submission (so the
    /// checksum overlaps the writes in flight) and, with `checksum_threads` > 1, also by
    /// helper threads working ahead on the same list (blocks are independent). One result
    /// per item.
    ///
    /// # Safety
    /// Every `buf` is valid for `slot_bytes` and not used by anyone else until this returns;
    /// `prepare(i)` touches only item i's buffer.
    pub unsafe fn write_slots_with(
        &self,
        items: &[(u32, *mut u8)],
        prepare: &(dyn Fn(usize) + Sync),
        results: &mut Vec<Result<(), NvmeError>>,
    ) {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let n = items.len();
        let helpers = self
            .checksum_threads
            .saturating_sub(1)
            .min(n.saturating_sub(1));
        let next = AtomicUsize::new(0);
        let ready: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let done = AtomicBool::new(false);
        // Set by a helper whose `prepare` panicked: the item it held never becomes ready.
        let helper_panicked = AtomicBool::new(false);
        struct Poison<'a>(&'a AtomicBool);
        impl Drop for Poison<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::Release);
                }
            }
        }
        // Claims the next unprepared item, prepares it and marks it ready.
        let work = || -> bool {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= n {
                return false;
            }
            prepare(k);
            ready[k].store(true, Ordering::Release);
            true
        };
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|| {
                    let _poison = Poison(&helper_panicked);
                    // Not a busy wait: each `work()` prepares one item; stops when none is left.
                    loop {
                        if done.load(Ordering::Relaxed) || !work() {
                            break;
                        }
                    }
                });
            }
            let mut before = |i: usize| {
                // Help until item i is ready (it is claimed by us or a helper).
                while !ready[i].load(Ordering::Acquire) {
                    if !work() {
                        // Every item is claimed; one a helper dropped in a panic is never
                        // ready: fail this call (the engine waits for the writes in
                        // flight as it unwinds) instead of spinning for good.
                        assert!(
                            !helper_panicked.load(Ordering::Acquire),
                            "a checksum helper thread panicked preparing slot header {i}"
                        );
                        std::hint::spin_loop();
                    }
                }
            };
            self.io(
                IoKind::Write,
                items,
                self.slot_bytes,
                &mut before,
                &mut |_| {},
                results,
            );
            done.store(true, Ordering::Relaxed);
        });
    }

    /// [`NvmeStore::write_slots_with`] with header pages already filled.
    ///
    /// # Safety
    /// As for [`NvmeStore::write_slots_with`].
    pub unsafe fn write_slots(
        &self,
        items: &[(u32, *mut u8)],
        results: &mut Vec<Result<(), NvmeError>>,
    ) {
        self.io(
            IoKind::Write,
            items,
            self.slot_bytes,
            &mut |_| {},
            &mut |_| {},
            results,
        )
    }

    /// Reads whole slots into host-pool buffers; `done(i)` runs as soon as item i has been
    /// read in full (e.g. to verify it while other reads are in flight).
    ///
    /// # Safety
    /// Every `buf` is valid for `slot_bytes` and used by no one else until this returns.
    pub unsafe fn read_slots_with(
        &self,
        items: &[(u32, *mut u8)],
        done: &mut dyn FnMut(usize),
        results: &mut Vec<Result<(), NvmeError>>,
    ) {
        self.io(
            IoKind::Read,
            items,
            self.slot_bytes,
            &mut |_| {},
            done,
            results,
        )
    }

    /// Reads whole slots into host-pool buffers.
    ///
    /// # Safety
    /// As for [`NvmeStore::read_slots_with`].
    pub unsafe fn read_slots(
        &self,
        items: &[(u32, *mut u8)],
        results: &mut Vec<Result<(), NvmeError>>,
    ) {
        self.io(
            IoKind::Read,
            items,
            self.slot_bytes,
            &mut |_| {},
            &mut |_| {},
            results,
        )
    }

    fn io(
        &self,
        kind: IoKind,
        items: &[(u32, *mut u8)],
        len: usize,
        before: &mut dyn FnMut(usize),
        done: &mut dyn FnMut(usize),
        results: &mut Vec<Result<(), NvmeError>>,
    ) {
        results.clear();
        let mut ops: Vec<IoOp> = items
            .iter()
            .map(|&(slot, buf)| {
                let (file, offset) = self.locate(slot);
                IoOp::new(kind, file, offset, buf, len as u32)
            })
            .collect();
        let name = if kind == IoKind::Read {
            "read"
        } else {
            "write"
        };
        let mut after = |i: usize, op: &IoOp| {
            if op.outcome().is_ok() {
                done(i);
            }
        };
        match self.run(&mut ops, before, &mut after) {
            Ok(()) => {
                for (op, &(slot, _)) in ops.iter().zip(items) {
                    results.push(op.outcome().map_err(|e| self.io_error(name, slot, e)));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &(slot, _) in items {
                    results.push(Err(NvmeError::Io {
                        op: name,
                        slot,
                        path: self.paths[self.locate(slot).0 as usize].clone(),
                        offset: self.locate(slot).1,
                        source: std::io::Error::other(msg.clone()),
                    }));
                }
            }
        }
        if kind == IoKind::Write && len == self.slot_bytes {
            // A failed slot write may still have put its header page on disk (a short or
            // torn write: the header goes first), and a restart's header scan would index
            // that slot. The caller still holds the slot, so erase the header now.
            let failed: Vec<u32> = items
                .iter()
                .zip(results.iter())
                .filter(|(_, r)| r.is_err())
                .map(|(&(slot, _), _)| slot)
                .collect();
            self.erase_headers(&failed, true);
        }
    }

    /// Fills a slot's header page for `header`; the length, data checksum and data MAC come
    /// from `data` (the block bytes that follow the page in the host slot).
    pub fn encode_header(
        &self,
        page: &mut [u8],
        data: &[u8],
        mut header: SlotHeader,
    ) -> SlotHeader {
        let data = &data[..self.block_bytes];
        header.length = self.block_bytes as u64;
        (header.data_checksum, header.data_mac) = self.data_sums(data);
        page[..SLOT_HEADER_BYTES].fill(0);
        header.encode(page, &self.key);
        header
    }

    /// Checks a slot read into `slot_buf` against the key and generation the index expects.
    pub fn verify(
        &self,
        slot: u32,
        slot_buf: &[u8],
        namespace: u32,
        hash: u64,
        generation: u64,
    ) -> Result<SlotHeader, NvmeError> {
        let corrupt = |reason: String| NvmeError::Corrupt { slot, reason };
        let h = self.check_header(
            slot,
            &slot_buf[..SLOT_HEADER_BYTES],
            namespace,
            hash,
            generation,
        )?;
        let data = &slot_buf[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + h.length as usize];
        self.check_data(&h, data).map_err(corrupt)?;
        Ok(h)
    }

    /// Decodes a slot's header page (its MAC under the key) and checks it holds the block
    /// and generation the index expects.
    fn check_header(
        &self,
        slot: u32,
        page: &[u8],
        namespace: u32,
        hash: u64,
        generation: u64,
    ) -> Result<SlotHeader, NvmeError> {
        let corrupt = |reason: String| NvmeError::Corrupt { slot, reason };
        let h = SlotHeader::decode(page, self.slot_bytes - SLOT_HEADER_BYTES, &self.key)
            .map_err(|e| corrupt(e.to_string()))?;
        self.check_length(&h).map_err(corrupt)?;
        if h.namespace != namespace || h.hash != hash {
            return Err(corrupt(format!(
                "holds ({}, {:#x}), expected ({namespace}, {hash:#x})",
                h.namespace, h.hash
            )));
        }
        if h.generation != generation {
            return Err(corrupt(format!(
                "generation {} expected {generation} (stale slot)",
                h.generation
            )));
        }
        Ok(h)
    }

    /// Every slot this daemon writes holds exactly one block of `blocks.block_bytes`. A
    /// header of another length was written under another block size (the same file and
    /// key after `block_bytes` changed, which moves every slot boundary): its data MAC
    /// covers only its own length, so serving it as a block of ours would hand out the
    /// bytes after it (the next old slot's, any namespace's) unchecked.
    fn check_length(&self, h: &SlotHeader) -> Result<(), String> {
        if h.length == self.block_bytes as u64 {
            return Ok(());
        }
        Err(format!(
            "length {} is not one block ({}): written under another block size",
            h.length, self.block_bytes
        ))
    }

    /// Reads the header pages of `slots` (`(slot, namespace, hash, generation)`, one I/O
    /// batch through the tier's engine) and checks each against what the index expects;
    /// a header must describe exactly one block (it is read into a G1 slot of that
    /// size). The data is not read: [`Self::data_at`] says where it lies, and
    /// [`Self::check_sums`] checks its checksum and MAC computed elsewhere (on the GPU).
    pub fn read_headers(
        &self,
        slots: &[(u32, u32, u64, u64)],
    ) -> Vec<Result<SlotHeader, NvmeError>> {
        if slots.is_empty() {
            return Vec::new();
        }
        let mut results = Vec::with_capacity(slots.len());
        let pages = AlignedBuf::new(slots.len() * SLOT_HEADER_BYTES);
        let items: Vec<(u32, *mut u8)> = slots
            .iter()
            .enumerate()
            // SAFETY: page i lies inside the buffer of slots.len() pages.
            .map(|(i, s)| (s.0, unsafe { pages.ptr.add(i * SLOT_HEADER_BYTES) }))
            .collect();
        self.io(
            IoKind::Read,
            &items,
            SLOT_HEADER_BYTES,
            &mut |_| {},
            &mut |_| {},
            &mut results,
        );
        let bytes = pages.slice();
        slots
            .iter()
            .zip(results)
            .enumerate()
            .map(|(i, (&(slot, namespace, hash, generation), io))| {
                io?;
                let page = &bytes[i * SLOT_HEADER_BYTES..(i + 1) * SLOT_HEADER_BYTES];
                self.check_header(slot, page, namespace, hash, generation)
            })
            .collect()
    }

    /// Writes the header pages of slots whose data was written elsewhere (from G1, with
    /// [`Self::data_at`]); each header carries the block's checksum and MAC computed
    /// where the data was (the GPU) and is sealed here (header checksum and MAC). One I/O
    /// batch; one result per item. A header that failed to write is erased, as after a
    /// failed slot write.
    pub fn write_headers(&self, items: &[(u32, SlotHeader)]) -> Vec<Result<(), NvmeError>> {
        let mut results = Vec::with_capacity(items.len());
        if items.is_empty() {
            return results;
        }
        let pages = AlignedBuf::new(items.len() * SLOT_HEADER_BYTES);
        let ios: Vec<(u32, *mut u8)> = items
            .iter()
            .enumerate()
            .map(|(i, &(slot, header))| {
                assert_eq!(header.length, self.block_bytes as u64, "one whole block");
                // SAFETY: page i lies inside the buffer of items.len() pages, zeroed, and
                // nothing else refers to it yet.
                let page = unsafe {
                    std::slice::from_raw_parts_mut(
                        pages.ptr.add(i * SLOT_HEADER_BYTES),
                        SLOT_HEADER_BYTES,
                    )
                };
                header.encode(page, &self.key);
                (slot, page.as_mut_ptr())
            })
            .collect();
        self.io(
            IoKind::Write,
            &ios,
            SLOT_HEADER_BYTES,
            &mut |_| {},
            &mut |_| {},
            &mut results,
        );
        let failed: Vec<u32> = items
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(&(slot, _), _)| slot)
            .collect();
        self.erase_headers(&failed, true);
        results
    }

    /// Zeroes the header pages of slots about to be written apart from their headers
    /// (data from G1, then [`Self::write_headers`]): a crash between the two then leaves
    /// no header rather than the previous block's over new data. One result per slot: a
    /// slot whose header could not be zeroed must not be written.
    pub fn clear_headers(&self, slots: &[u32]) -> Vec<Result<(), NvmeError>> {
        let mut results = Vec::with_capacity(slots.len());
        if slots.is_empty() {
            return results;
        }
        let zeros = AlignedBuf::new(SLOT_HEADER_BYTES);
        let items: Vec<(u32, *mut u8)> = slots.iter().map(|&s| (s, zeros.ptr)).collect();
        self.io(
            IoKind::Write,
            &items,
            SLOT_HEADER_BYTES,
            &mut |_| {},
            &mut |_| {},
            &mut results,
        );
        results
    }

    /// Where a slot's block data lies: the tier file's descriptor and the byte offset.
    pub fn data_at(&self, slot: u32) -> (std::os::fd::BorrowedFd<'_>, u64) {
        use std::os::fd::AsFd;
        let (file, offset) = self.locate(slot);
        (
            self._files[file as usize].as_fd(),
            offset + SLOT_HEADER_BYTES as u64,
        )
    }

    /// The key of the slot data MAC, for MAC kernels that check blocks where they landed
    /// (the GPU's own memory, never memory an engine shares).
    pub(crate) fn data_mac_key(&self) -> &[u8; key::MAC_BYTES] {
        self.key.data_key()
    }

    /// Checks a block's checksum and MAC, computed wherever it landed, against its
    /// header (from [`Self::read_headers`]).
    pub fn check_sums(
        &self,
        slot: u32,
        h: &SlotHeader,
        checksum: u64,
        mac: &[u8; key::MAC_BYTES],
    ) -> Result<(), NvmeError> {
        self.compare_sums(h, checksum, mac)
            .map_err(|reason| NvmeError::Corrupt { slot, reason })
    }

    /// The data checksum (torn or failing disk), then the data MAC (tampering: a rewrite
    /// can keep the checksum, not the MAC).
    fn check_data(&self, h: &SlotHeader, data: &[u8]) -> Result<(), String> {
        let (checksum, mac) = self.data_sums(data);
        self.compare_sums(h, checksum, &mac)
    }

    fn data_sums(&self, data: &[u8]) -> (u64, [u8; key::MAC_BYTES]) {
        data_sums(&self.key, data)
    }

    fn compare_sums(
        &self,
        h: &SlotHeader,
        sum: u64,
        mac: &[u8; key::MAC_BYTES],
    ) -> Result<(), String> {
        if sum != h.data_checksum {
            return Err(format!(
                "data checksum {sum:#018x} != header {:#018x} (torn or corrupt block)",
                h.data_checksum
            ));
        }
        if !SlotKey::mac_eq(mac, &h.data_mac) {
            return Err(
                "data MAC mismatch (block rewritten without this daemon's key: tampered)".into(),
            );
        }
        Ok(())
    }

    /// fsyncs every file or device of the tier (data and metadata: fallocated extents
    /// written with O_DIRECT become durable on ext4/xfs only after a journal commit) through
    /// the descriptors opened at start-up, before exit. The paths are not opened again:
    /// after dropping privileges the daemon may not be able to. One entry per failure.
    pub fn sync_all(&self) -> Vec<(PathBuf, std::io::Error)> {
        self.paths
            .iter()
            .zip(&self._files)
            .filter_map(|(p, f)| f.sync_all().err().map(|e| (p.clone(), e)))
            .collect()
    }

    /// Overwrites a slot's header with zeros so a dropped block does not come back after a
    /// restart. Best effort: a failure is logged (the slot is reused and overwritten anyway).
    pub fn tombstone(&self, slots: &[u32]) {
        self.erase_headers(slots, false);
    }

    /// Zeroes the header pages of `slots`. With `after_failed_write`, a failure is logged at
    /// debug level only: the slot's own write just failed, most often without putting
    /// anything on disk (a full file system cannot take the erasure either), and a header
    /// that did land is still caught by its data checksum on load.
    fn erase_headers(&self, slots: &[u32], after_failed_write: bool) {
        for (s, result) in slots.iter().zip(self.clear_headers(slots)) {
            if let Err(e) = result {
                if after_failed_write {
                    tracing::debug!(slot = s, "erasing the header of a failed write: {e}");
                } else {
                    tracing::warn!(slot = s, "tombstoning NVMe slot: {e}");
                }
            }
        }
    }

    /// Reads every slot header (and with `verify_data` every block) and returns the valid
    /// slots, newest generation per key; corrupt slots are tombstoned.
    fn scan(&self, verify_data: bool) -> Result<ScanReport, NvmeError> {
        let started = std::time::Instant::now();
        let total = self.slot_count();
        let read_len = if verify_data {
            self.slot_bytes
        } else {
            SLOT_HEADER_BYTES
        };
        // 64 slots a batch, but no more than 64 MiB of buffer unless one slot is larger
        // (then one slot a batch): with 1 GiB blocks, 64 whole slots (verify_data) were
        // 64 GiB at start-up.
        let batch = (64u32).min(((64usize << 20) / read_len).max(1) as u32);
        let buf = AlignedBuf::new(read_len * batch as usize);
        let mut report = ScanReport::default();
        let mut corrupt = Vec::new();
        let mut results = Vec::new();
        let mut slot = 0;
        while slot < total {
            let n = batch.min(total - slot);
            let items: Vec<(u32, *mut u8)> = (0..n)
                .map(|i| (slot + i, buf.ptr.wrapping_add(i as usize * read_len)))
                .collect();
            self.io(
                IoKind::Read,
                &items,
                read_len,
                &mut |_| {},
                &mut |_| {},
                &mut results,
            );
            for (i, r) in results.iter().enumerate() {
                let s = slot + i as u32;
                if let Err(e) = r {
                    // An unreadable slot is treated as corrupt: never served.
                    tracing::warn!("scan: {e}");
                    report.corrupt += 1;
                    corrupt.push(s);
                    continue;
                }
                let page = &buf.slice()[i * read_len..(i + 1) * read_len];
                match SlotHeader::decode(page, self.slot_bytes - SLOT_HEADER_BYTES, &self.key) {
                    Err(HeaderError::Empty) => report.empty += 1,
                    Err(HeaderError::Version(v)) if v < header::VERSION => {
                        // Unauthenticated: nothing says who wrote it. Summarised below.
                        report.old_format += 1;
                        corrupt.push(s);
                    }
                    Err(e) => {
                        // A lost key makes every slot fail: name the first few only.
                        if report.corrupt < 16 {
                            tracing::warn!(slot = s, "scan: corrupt NVMe slot dropped: {e}");
                        }
                        report.corrupt += 1;
                        corrupt.push(s);
                    }
                    Ok(h) => {
                        if let Err(e) = self.check_length(&h) {
                            if report.corrupt < 16 {
                                tracing::warn!(slot = s, "scan: NVMe slot dropped: {e}");
                            }
                            report.corrupt += 1;
                            corrupt.push(s);
                            continue;
                        }
                        if verify_data {
                            let data =
                                &page[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + h.length as usize];
                            if let Err(e) = self.check_data(&h, data) {
                                tracing::warn!(slot = s, "scan: NVMe slot dropped: {e}");
                                report.corrupt += 1;
                                corrupt.push(s);
                                continue;
                            }
                        }
                        report.valid.push(ScannedSlot { slot: s, header: h });
                    }
                }
            }
            slot += n;
        }
        // Newest generation wins per key (a crash between writing a new copy and freeing
        // the old one leaves two).
        report.valid.sort_unstable_by_key(|v| {
            (
                v.header.namespace,
                v.header.hash,
                std::cmp::Reverse(v.header.generation),
            )
        });
        let mut kept: Vec<ScannedSlot> = Vec::with_capacity(report.valid.len());
        for v in report.valid.drain(..) {
            if kept.last().is_some_and(|k| {
                k.header.namespace == v.header.namespace && k.header.hash == v.header.hash
            }) {
                report.duplicates += 1;
                corrupt.push(v.slot);
            } else {
                kept.push(v);
            }
        }
        report.valid = kept;
        let max_gen = report
            .valid
            .iter()
            .map(|v| v.header.generation)
            .max()
            .unwrap_or(0);
        self.generation.store(max_gen + 1, Ordering::Relaxed);
        if report.old_format > 0 {
            tracing::warn!(
                slots = report.old_format,
                "scan: NVMe slots in the old header format (version 1, no MAC) are not \
                 trusted: not indexed, erased"
            );
        }
        if report.corrupt > 16 {
            tracing::warn!(
                slots = report.corrupt,
                "scan: NVMe slots dropped as corrupt (a new or replaced key file drops all)"
            );
        }
        self.tombstone(&corrupt);
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

#[cfg(test)]
pub(crate) mod tests;

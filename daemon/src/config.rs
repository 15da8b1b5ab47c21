//! The daemon's configuration: a TOML file, overridable by flags. Unknown keys and bad
//! values are errors that name the key and the reason.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod control;
mod device;
mod events;
pub use control::{ControlConfig, default_socket_path};
pub use device::{BackendSetting, DeviceConfig, MAX_DEVICE_ORDINAL};
pub use events::EventsConfig;

/// A config file larger than this is refused (the default with comments is ~10 KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file refused: {0}")]
    Path(crate::secure_open::PathError),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("writing the config as TOML: {0}")]
    Serialize(#[source] toml::ser::Error),
}

impl From<crate::tier::ConfigError> for ConfigError {
    fn from(e: crate::tier::ConfigError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            reason: e.reason,
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// `[serve]`: the engine-facing socket and session limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Unix socket engines connect to.
    pub socket_path: PathBuf,
    /// Permission bits of the socket file (access is also checked per uid, SO_PEERCRED).
    pub socket_mode: u32,
    /// Sessions served at once; further attaches are refused with a reason.
    pub max_sessions: u32,
    /// Sessions one uid may hold at once (unset: up to `max_sessions`). On a node shared
    /// by tenants, set it below `max_sessions` so no tenant can lock the others out.
    pub max_sessions_per_uid: Option<u32>,
    /// Queue pairs one uid's sessions may hold together (unset: no limit of its own).
    pub max_queue_pairs_per_uid: Option<u32>,
    /// Group of the socket directory and socket file (unset: the daemon's gid). Engines
    /// of other uids connect through this group (see `socket_mode`).
    pub socket_group: Option<u32>,
    /// Milliseconds a connection has to deliver its whole attach request.
    pub handshake_timeout_ms: u64,
    /// Threads that admit complete attach requests (the socket I/O of every handshake
    /// runs on one poll loop; these only check limits and build segments).
    pub handshake_workers: u32,
    /// Connections in the handshake at once, all uids together; more are refused.
    pub max_pending_handshakes: u32,
    /// Connections one uid may have in the handshake at once; more are refused.
    pub max_pending_handshakes_per_uid: u32,
    /// KV regions that attaches in progress may hold at once, all uids together: each
    /// costs 128 bytes and may carry a descriptor, held from when it is read until the
    /// attach is answered. A request whose regions do not fit yet is not read further
    /// (its bytes and descriptors wait in the socket, charged to the engine) until they
    /// do or its `handshake_timeout_ms` passes; one announcing more than the limit is
    /// refused at once. Keep it well under the daemon's descriptor limit.
    pub max_handshake_regions: u32,
    /// The same, for one uid's attaches in progress.
    pub max_handshake_regions_per_uid: u32,
    /// Largest argument arena one session may ask for.
    pub max_arena_bytes: u64,
    /// Most queue pairs per session (at most 16, the ABI's limit).
    pub max_queue_pairs: u32,
    /// How long a data-plane thread spins on an idle session before sleeping.
    pub spin_us: u64,
    /// How long a SAVE waits for the engine's IPC event it names before it is refused
    /// (BUSY); nothing is held meanwhile.
    pub engine_event_timeout_ms: u64,
    /// After set-up (pool locked, NVMe opened, sockets bound), give up every capability
    /// and set no_new_privs and non-dumpable (see `crate::privileges`).
    pub drop_privileges: bool,
    /// Switch to this uid/gid after set-up (needs root or CAP_SETUID/CAP_SETGID).
    pub run_as_uid: Option<u32>,
    pub run_as_gid: Option<u32>,
    /// Bytes of engine KV buffers the daemon maps at once, across all sessions (a
    /// buffer's full memfd size counts, sparse or not). Unset: the machine's physical
    /// memory. An attach past it is refused.
    pub max_mapped_bytes: Option<u64>,
    /// Mappings the daemon holds for engines' KV memory at once, all sessions together:
    /// each host memfd region, and each gap page alignment leaves between two (one
    /// session's regions are mapped back to back). The kernel caps a process's mappings
    /// at `vm.max_map_count` (65,530 by default): past that cap every mmap fails, the
    /// daemon's own allocations included. An attach past it is refused. Unset: half of
    /// `vm.max_map_count` as read at start-up; a daemon set above that half does not
    /// start.
    pub max_engine_mappings: Option<u32>,
    /// The same, for the sessions of one uid together, so that no tenant takes every
    /// mapping. Unset: half of `max_engine_mappings` (resolved).
    pub max_engine_mappings_per_uid: Option<u32>,
    /// Accept hugetlb (`MFD_HUGETLB`) KV buffers. Their pages can vanish under the daemon
    /// (punched out while the hugepage pool is empty); the copies survive that (the
    /// session ends), but the default refuses such buffers at attach.
    pub allow_hugetlb_kv_buffers: bool,
    /// Data-plane threads polling every session's queue pairs (each serves up to
    /// `MAX_SESSIONS_PER_THREAD` sessions). 0: half the CPUs this process may use (at
    /// least 1, at most 8).
    pub dataplane_threads: u32,
    /// CPUs to pin the data-plane threads to (thread i on `dataplane_cpus[i % len]`).
    /// Empty: not pinned.
    pub dataplane_cpus: Vec<usize>,
    /// Threads running operations that may wait on NVMe (SAVE, LOAD with an NVMe tier) or
    /// walk a whole namespace (CLEAR_NAMESPACE), so that neither a slow disk nor a large
    /// namespace ever holds up a thread that polls rings.
    pub io_threads: u32,
    /// Operations queued for the I/O threads at once; when full, the sessions with such an
    /// operation wait (the others keep being served).
    pub io_queue: u32,
}

/// The machine's physical memory, in bytes: the default limit of mapped engine memory
/// (an engine's KV buffer is memory it must back; more than the machine has is sparse).
pub fn physical_memory_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page_size <= 0 {
        return u64::MAX; // unknown: the namespaces' limits still apply
    }
    (pages as u64).saturating_mul(page_size as u64)
}

/// `serve.max_engine_mappings` and its per-uid share, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingLimits {
    pub total: u32,
    pub per_uid: u32,
}

/// The kernel's default `vm.max_map_count`.
pub const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;

/// `vm.max_map_count`: how many mappings this process may hold (the kernel's default when
/// it cannot be read).
pub fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_MAP_COUNT)
}

impl ServeConfig {
    /// `dataplane_threads`, resolved.
    pub fn dataplane_threads_resolved(&self) -> usize {
        match self.dataplane_threads {
            0 => (kvplane_shm::sys::cpus_allowed() / 2).clamp(1, 8),
            n => n as usize,
        }
    }

    /// `max_mapped_bytes`, resolved.
    pub fn mapped_bytes_limit(&self) -> u64 {
        self.max_mapped_bytes.unwrap_or_else(physical_memory_bytes)
    }

    /// `max_engine_mappings` and `max_engine_mappings_per_uid`, resolved against a
    /// `vm.max_map_count`: the total at most half of it, so that the daemon's own
    /// mappings (threads, libraries, heap, tiers, io_uring rings, session segments: at
    /// most `max_sessions`, 4,096; and what GPU imports map, which is not counted) have
    /// the other half; one uid's share at most the total.
    pub fn engine_mapping_limits(&self, max_map_count: u64) -> Result<MappingLimits, ConfigError> {
        let half = u32::try_from(max_map_count / 2).unwrap_or(u32::MAX);
        let total = match self.max_engine_mappings {
            None => half,
            Some(n) if n <= half => n,
            Some(n) => {
                return Err(invalid(
                    "serve.max_engine_mappings",
                    format!(
                        "{n} is over half of vm.max_map_count ({max_map_count}): past that the daemon's own mmaps fail; raise vm.max_map_count or lower this"
                    ),
                ));
            }
        };
        let per_uid = match self.max_engine_mappings_per_uid {
            None => (total / 2).max(1),
            Some(n) if n <= total => n,
            Some(n) => {
                return Err(invalid(
                    "serve.max_engine_mappings_per_uid",
                    format!("{n} is over serve.max_engine_mappings ({total})"),
                ));
            }
        };
        Ok(MappingLimits { total, per_uid })
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            socket_path: PathBuf::from("/run/kvplane/kvplane.sock"),
            socket_mode: 0o660,
            max_sessions: 64,
            max_sessions_per_uid: None,
            max_queue_pairs_per_uid: None,
            socket_group: None,
            handshake_timeout_ms: 5000,
            handshake_workers: 2,
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_uid: 64,
            max_handshake_regions: 16_384,
            max_handshake_regions_per_uid: 8_192,
            max_arena_bytes: 256 << 20,
            max_queue_pairs: 16,
            spin_us: 50,
            engine_event_timeout_ms: 10_000,
            drop_privileges: true,
            run_as_uid: None,
            run_as_gid: None,
            max_mapped_bytes: None,
            max_engine_mappings: None,
            max_engine_mappings_per_uid: None,
            allow_hugetlb_kv_buffers: false,
            dataplane_threads: 0,
            dataplane_cpus: Vec::new(),
            io_threads: 2,
            io_queue: 64,
        }
    }
}

/// `[[namespaces]]`: which uids may attach to a namespace, and how much of each tier it
/// may hold (unset: no limit beyond the tier's size; 0: none of that tier).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    pub uids: Vec<u32>,
    #[serde(default)]
    pub max_hbm_bytes: Option<u64>,
    #[serde(default)]
    pub max_host_bytes: Option<u64>,
    #[serde(default)]
    pub max_nvme_bytes: Option<u64>,
    /// Bytes of engine KV buffers the daemon maps at once for sessions bound to this
    /// namespace (unset: only `serve.max_mapped_bytes` applies).
    #[serde(default)]
    pub max_mapped_bytes: Option<u64>,

    /// Sessions attached to this namespace at once (unset: no limit of its own).
    #[serde(default)]
    pub max_sessions: Option<u32>,
    /// Queue pairs of the sessions attached to this namespace, together.
    #[serde(default)]
    pub max_queue_pairs: Option<u32>,
}

impl NamespaceConfig {
    /// A namespace `uids` may use, with no limits of its own.
    pub fn new(name: impl Into<String>, uids: Vec<u32>) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            uids,
            max_hbm_bytes: None,
            max_host_bytes: None,
            max_nvme_bytes: None,
            max_mapped_bytes: None,
            max_sessions: None,
            max_queue_pairs: None,
        }
    }

    /// Per-tier limits (HBM, host, NVMe) in bytes.
    pub fn max_bytes(&self) -> crate::tier::PerTier<Option<u64>> {
        crate::tier::PerTier([self.max_hbm_bytes, self.max_host_bytes, self.max_nvme_bytes])
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub serve: ServeConfig,
    /// `[blocks]`: block size and placement policy.
    pub blocks: crate::block::BlockConfig,
    /// `[tiers.hbm]`, `[tiers.host]`, `[tiers.nvme]`.
    pub tiers: crate::tier::TiersConfig,
    /// When empty, any namespace may be used, but only by the daemon's own uid.
    pub namespaces: Vec<NamespaceConfig>,
    /// `[control]`: the metrics/status listener.
    pub control: ControlConfig,
    /// `[events]`: KV events streamed to routers.
    pub events: EventsConfig,
    /// `[device]`: the device backend the data plane runs on.
    pub device: DeviceConfig,
}

impl Config {
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the config file. The daemon reads it as root and trusts it (paths, uids): it
    /// is opened through [`crate::secure_open`] (no link another user planted, no
    /// directory on the way another user can change) and must be a regular file owned by
    /// root or the daemon's user that group and other cannot write.
    /// The config as a TOML file `kvplane serve --config` reads back to an equal `Config`.
    /// Tests and tools build a `Config` in Rust and write this instead of TOML by hand,
    /// so a renamed or retyped key is a compile error there, not a refused file.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(ConfigError::Serialize)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = crate::secure_open::read_regular(path, 0o022, MAX_CONFIG_BYTES)
            .map_err(ConfigError::Path)?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.serve;
        if s.socket_path.as_os_str().is_empty() {
            return Err(invalid("serve.socket_path", "must not be empty"));
        }
        // sun_path is 108 bytes including the NUL.
        if s.socket_path.as_os_str().len() > 107 {
            return Err(invalid(
                "serve.socket_path",
                format!(
                    "{} bytes; a Unix socket path is at most 107",
                    s.socket_path.as_os_str().len()
                ),
            ));
        }
        if s.socket_mode > 0o777 {
            return Err(invalid(
                "serve.socket_mode",
                format!(
                    "{:#o} is not a permission mode (at most 0o777)",
                    s.socket_mode
                ),
            ));
        }
        if s.max_sessions == 0 || s.max_sessions > 4096 {
            return Err(invalid(
                "serve.max_sessions",
                format!("must be in 1..=4096, got {}", s.max_sessions),
            ));
        }
        if let Some(n) = s.max_sessions_per_uid
            && (n == 0 || n > s.max_sessions)
        {
            return Err(invalid(
                "serve.max_sessions_per_uid",
                format!("must be in 1..=max_sessions ({}), got {n}", s.max_sessions),
            ));
        }
        if s.max_queue_pairs_per_uid == Some(0) {
            return Err(invalid(
                "serve.max_queue_pairs_per_uid",
                "must be at least 1 (leave it unset for no limit)",
            ));
        }
        if !(100..=60_000).contains(&s.handshake_timeout_ms) {
            return Err(invalid(
                "serve.handshake_timeout_ms",
                format!("must be in 100..=60000, got {}", s.handshake_timeout_ms),
            ));
        }
        if s.handshake_workers == 0 || s.handshake_workers > 16 {
            return Err(invalid(
                "serve.handshake_workers",
                format!("must be in 1..=16, got {}", s.handshake_workers),
            ));
        }
        if s.max_pending_handshakes == 0 || s.max_pending_handshakes > 16_384 {
            return Err(invalid(
                "serve.max_pending_handshakes",
                format!("must be in 1..=16384, got {}", s.max_pending_handshakes),
            ));
        }
        if s.max_engine_mappings == Some(0) {
            return Err(invalid(
                "serve.max_engine_mappings",
                "must be at least 1 (unset: half of vm.max_map_count)".to_string(),
            ));
        }
        if s.max_engine_mappings_per_uid == Some(0) {
            return Err(invalid(
                "serve.max_engine_mappings_per_uid",
                "must be at least 1 (unset: half of serve.max_engine_mappings)".to_string(),
            ));
        }
        if s.max_handshake_regions == 0 || s.max_handshake_regions > 1 << 20 {
            return Err(invalid(
                "serve.max_handshake_regions",
                format!("must be in 1..=1048576, got {}", s.max_handshake_regions),
            ));
        }
        if s.max_handshake_regions_per_uid == 0
            || s.max_handshake_regions_per_uid > s.max_handshake_regions
        {
            return Err(invalid(
                "serve.max_handshake_regions_per_uid",
                format!(
                    "must be in 1..=max_handshake_regions ({}), got {}",
                    s.max_handshake_regions, s.max_handshake_regions_per_uid
                ),
            ));
        }
        if s.max_pending_handshakes_per_uid == 0
            || s.max_pending_handshakes_per_uid > s.max_pending_handshakes
        {
            return Err(invalid(
                "serve.max_pending_handshakes_per_uid",
                format!(
                    "must be in 1..=max_pending_handshakes ({}), got {}",
                    s.max_pending_handshakes, s.max_pending_handshakes_per_uid
                ),
            ));
        }
        if s.max_queue_pairs == 0 || s.max_queue_pairs as usize > kvplane_ffi::MAX_QUEUE_PAIRS {
            return Err(invalid(
                "serve.max_queue_pairs",
                format!("must be in 1..=16, got {}", s.max_queue_pairs),
            ));
        }
        if s.max_arena_bytes < 4096 || s.max_arena_bytes > kvplane_shm::segment::MAX_ARENA_BYTES {
            return Err(invalid(
                "serve.max_arena_bytes",
                format!("must be in 4096..=1073741824, got {}", s.max_arena_bytes),
            ));
        }
        if s.spin_us > 10_000 {
            return Err(invalid(
                "serve.spin_us",
                format!("at most 10000 (10 ms), got {}", s.spin_us),
            ));
        }
        if !(1..=600_000).contains(&s.engine_event_timeout_ms) {
            return Err(invalid(
                "serve.engine_event_timeout_ms",
                format!(
                    "must be in 1..=600000 (10 min), got {}",
                    s.engine_event_timeout_ms
                ),
            ));
        }
        if s.dataplane_threads > 64 {
            return Err(invalid(
                "serve.dataplane_threads",
                format!(
                    "must be in 0..=64 (0: automatic), got {}",
                    s.dataplane_threads
                ),
            ));
        }
        if let Some(&cpu) = s
            .dataplane_cpus
            .iter()
            .find(|&&c| c >= libc::CPU_SETSIZE as usize)
        {
            return Err(invalid(
                "serve.dataplane_cpus",
                format!("CPU {cpu} is not below {}", libc::CPU_SETSIZE),
            ));
        }
        if s.io_threads == 0 || s.io_threads > 64 {
            return Err(invalid(
                "serve.io_threads",
                format!("must be in 1..=64, got {}", s.io_threads),
            ));
        }
        if s.io_queue == 0 || s.io_queue > 4096 {
            return Err(invalid(
                "serve.io_queue",
                format!("must be in 1..=4096, got {}", s.io_queue),
            ));
        }
        self.blocks.validate("blocks")?;
        self.tiers.validate(self.blocks.block_bytes)?;
        self.control.validate()?;
        self.events.validate()?;
        self.device.validate()?;
        let mut seen = std::collections::HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let key = format!("namespaces[{i}].name");
            if !kvplane_shm::handshake::valid_namespace_name(&ns.name) {
                return Err(invalid(
                    key,
                    format!("`{}` must be 1..=63 bytes of [A-Za-z0-9-_.:/@]", ns.name),
                ));
            }
            if !seen.insert(ns.name.as_str()) {
                return Err(invalid(key, format!("`{}` appears twice", ns.name)));
            }
            if ns.max_sessions == Some(0) {
                return Err(invalid(
                    format!("namespaces[{i}].max_sessions"),
                    "must be at least 1 (remove the namespace to keep everyone out)",
                ));
            }
            if ns.max_queue_pairs == Some(0) {
                return Err(invalid(
                    format!("namespaces[{i}].max_queue_pairs"),
                    "must be at least 1",
                ));
            }
            for (tier, &bytes) in ns.max_bytes().iter() {
                match bytes {
                    Some(b) if b != 0 && b < self.blocks.block_bytes as u64 => {
                        return Err(invalid(
                            format!("namespaces[{i}].max_{tier}_bytes"),
                            format!(
                                "{b} is less than one block ({} bytes); use 0 to keep the \
                                 namespace out of this tier",
                                self.blocks.block_bytes
                            ),
                        ));
                    }
                    _ => {}
                }
            }
        }
        if (s.run_as_uid.is_some() || s.run_as_gid.is_some()) && !s.drop_privileges {
            return Err(invalid(
                "serve.run_as_uid",
                "switching uid/gid is part of dropping privileges: set drop_privileges = true",
            ));
        }
        if s.run_as_uid == Some(0) || s.run_as_gid == Some(0) {
            return Err(invalid(
                "serve.run_as_uid",
                "0 (root) is not a privilege drop; leave it unset to keep the current uid",
            ));
        }
        // (uid_t)-1 and (gid_t)-1 mean "leave unchanged" to setresuid/setresgid: taken as
        // an id, the daemon would silently keep root's.
        for (key, id) in [
            ("serve.run_as_uid", s.run_as_uid),
            ("serve.run_as_gid", s.run_as_gid),
        ] {
            if id == Some(u32::MAX) {
                return Err(invalid(
                    key,
                    "4294967295 is (uid_t)-1, which the kernel reads as \"leave unchanged\"",
                ));
            }
        }
        if self
            .control
            .socket_path
            .as_ref()
            .is_some_and(|p| *p == s.socket_path)
        {
            return Err(invalid(
                "control.socket_path",
                "is serve.socket_path, the engines' socket: give the control socket its own path",
            ));
        }
        Ok(())
    }

    /// May `uid` use namespace `name`?
    pub fn namespace_allowed(&self, name: &str, uid: u32, daemon_uid: u32) -> bool {
        if self.namespaces.is_empty() {
            return uid == daemon_uid;
        }
        self.namespaces
            .iter()
            .any(|ns| ns.name == name && ns.uids.contains(&uid))
    }

    /// May `uid` attach at all (is any namespace open to it)? Checked when a connection is
    /// accepted, before its request is read, so a uid with no namespace holds nothing.
    pub fn uid_may_attach(&self, uid: u32, daemon_uid: u32) -> bool {
        if self.namespaces.is_empty() {
            return uid == daemon_uid;
        }
        self.namespaces.iter().any(|ns| ns.uids.contains(&uid))
    }

    /// The documented default configuration, as TOML. Values come from the `Default`
    /// impls, so this text cannot drift from what the daemon uses (a test parses it back).
    pub fn default_toml() -> String {
        let d = Config::default();
        let s = &d.serve;
        let b = &d.blocks;
        let h = &d.tiers.host;
        let n = &d.tiers.nvme;
        format!(
            r#"# kvplane daemon configuration. Every key is shown with its default.

[serve]
# Unix socket engines connect to.
socket_path = "{socket}"
# Permission bits of the socket file; each attach is also checked per uid (SO_PEERCRED).
socket_mode = 0o{mode:o}
# Sessions served at once; further attaches are refused with a reason.
max_sessions = {max_sessions}
# Sessions, and queue pairs of its sessions together, one uid may hold (unset: no limit
# of their own). On a node shared by tenants set max_sessions_per_uid below max_sessions.
# max_sessions_per_uid = 16
# max_queue_pairs_per_uid = 64
# Group of the socket directory (created 0750 when missing) and the socket file; engines
# of other uids connect through it. Unset: the daemon's gid.
# socket_group = 990
# The attach handshake: milliseconds a connection has to send its request, threads that
# admit complete requests, and connections waiting in the handshake at once, in all and
# per uid (more are refused at once).
handshake_timeout_ms = {hs_timeout}
handshake_workers = {hs_workers}
max_pending_handshakes = {hs_pending}
max_pending_handshakes_per_uid = {hs_pending_uid}
# KV regions that attaches in progress may hold at once, in all and per uid (each may
# carry a descriptor): a request whose regions do not fit waits, unread, until they do or
# its handshake times out; one announcing more is refused.
max_handshake_regions = {hs_regions}
max_handshake_regions_per_uid = {hs_regions_uid}
# Largest argument arena one session may ask for, in bytes.
max_arena_bytes = {max_arena}
# Most queue pairs per session (1..=16).
max_queue_pairs = {max_qp}
# Microseconds a data-plane thread spins on an idle session before sleeping on its futex.
spin_us = {spin}
# Milliseconds a SAVE waits for the engine's CUDA IPC event it names (the KV written)
# before it is refused with BUSY; nothing is held while it waits.
engine_event_timeout_ms = {engine_event_ms}
# After set-up (pool locked, NVMe opened, sockets bound): drop every capability, set
# no_new_privs, and make the process non-dumpable (KV blocks are user prompts).
drop_privileges = {drop}
# Then also switch to this uid and gid (needs root or CAP_SETUID/CAP_SETGID). The socket
# directory is then created owned by this uid, so the daemon can remove its socket at a
# clean shutdown.
# run_as_uid = 990
# run_as_gid = 990
# Bytes of engine KV buffers mapped at once, all sessions together (a buffer's full memfd
# size counts, sparse or not); an attach past it is refused. Unset: physical memory.
# max_mapped_bytes = 1099511627776
# Mappings of engines' host memfd KV regions held at once, all sessions together (past
# vm.max_map_count every mmap of the daemon fails). Unset: half of vm.max_map_count.
# max_engine_mappings = 16384
# The same for one uid's sessions together. Unset: half of max_engine_mappings.
# max_engine_mappings_per_uid = 8192
# Accept hugetlb KV buffers (their pages can vanish; a fault then ends that session).
allow_hugetlb_kv_buffers = {hugetlb}
# Data-plane threads polling all sessions' queue pairs, each serving up to 127 sessions
# (an attach beyond that is refused). 0: half the CPUs (at least 1, at most 8).
dataplane_threads = {dp_threads}
# CPUs to pin them to (thread i on dataplane_cpus[i % len]); empty: not pinned.
dataplane_cpus = []
# Threads running the operations that may wait on NVMe (SAVE and LOAD with an NVMe tier)
# or walk a namespace (CLEAR_NAMESPACE), and how many such operations may wait for them
# (then their sessions wait, no one else).
io_threads = {io_threads}
io_queue = {io_queue}

[blocks]
# Bytes of one block: all layers of one engine page (layers * planes * tokens * heads *
# head bytes). An engine's KV layout must describe exactly this size.
block_bytes = {block_bytes}
# NVMe admission: times a block must be seen again after its first save before an
# eviction from the host tier writes it to NVMe (0 admits everything).
nvme_admit_min_hits = {admit}
# Write every save through to NVMe before it completes.
write_through = {write_through}
# Distinct blocks one session may hold pinned at once (a PIN past it: NO_SPACE).
max_pinned_blocks_per_session = {max_pins}

[tiers.hbm]
# G1 arena bytes (on the host backend, host memory standing in for HBM). 0 disables G1.
capacity_bytes = {hbm}

[tiers.host]
# Pinned host pool bytes (G2), carved into block slots at start-up.
capacity_bytes = {host}
# mlock the pool (needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK).
lock = {lock}
# "auto" (2 MiB hugepages when enough are reserved), "always" or "never".
hugepages = "auto"
# NUMA node for the pool; unset = the node of cpus[0], if any.
# numa_node = 0
# CPUs the data plane runs on.
cpus = []
# Threads touching the pool at start-up (0 = all CPUs).
touch_threads = {touch}

[tiers.nvme]
# Files (preallocated) or raw block devices; empty disables the NVMe tier.
paths = []
# Bytes per file.
capacity_bytes = {nvme_cap}
# "auto" (io_uring, else pread/pwrite), "io_uring" or "sync".
engine = "auto"
# I/O operations in flight per thread, and pushed per submit.
queue_depth = {qd}
batch_size = {batch}
# O_DIRECT (bypass the page cache).
direct = {direct}
# Read and checksum every stored block at start-up (otherwise on every load).
verify_on_scan = {verify}
# File with the key that authenticates NVMe slots (created 0600 on first start; losing it
# empties the NVMe cache). Unset: "<first path>.key"; required for block devices.
# key_path = "/var/lib/kvplane/slot.key"
# How blocks move between NVMe and G1: "auto" (straight, with cuFile, where GPUDirect
# Storage works: a LOAD reads NVMe blocks into G1, checksums and MACs checked on the GPU,
# and a G1 victim the host tier has no room for is written from G1, its checksum and MAC
# computed there; else through the pinned host tier), "off" (always through the host
# tier) or "on" (straight, or the start-up fails).
direct_to_g1 = "{direct_to_g1}"

[control]
# Loopback TCP port for Prometheus: GET /metrics (daemon-wide aggregates: no namespace,
# session, pid or uid) and /healthz. Empty disables it. Only loopback addresses.
metrics_addr = "{metrics_addr}"
# The control socket: GET /status (`kvplane status`), /metrics, /healthz, shown per
# caller uid (SO_PEERCRED): root, the daemon's uid and admin_uids see everything; a uid
# of a [[namespaces]] entry sees its own namespaces and sessions; anyone else gets 403.
# Unset: next to serve.socket_path (kvplane.sock -> kvplane.control.sock). "" disables.
# socket_path = "/run/kvplane/kvplane.control.sock"
socket_mode = 0o{control_mode:o}
# Group of the control socket file (members may connect; uids still decide what they see).
# socket_gid = 990
admin_uids = []
# Serve /status and per-namespace /metrics over TCP too: every local user (and any local
# browser page) then reads every tenant's sessions and activity. Single-tenant nodes only.
tcp_tenant_data = {tcp_tenant_data}

[events]
# Routers' event listeners ("host:port") this daemon streams its KV events to, with a
# full snapshot on every (re)connect. Empty: no stream.
routers = []
# Worker id this daemon's tiers appear under (0 = derived from host name and socket path).
worker_id = 0
# Events queued between the data plane and the publisher (overflow: dropped, counted,
# and every router sent a fresh snapshot).
queue_events = {queue_events}
# A NATS JetStream server (cluster: comma-separated URLs) to publish KV events to, in
# Dynamo's format, with the stream named after namespace and component; changes buffered
# while NATS is away (beyond it: the full state is re-published). Unset: no NATS.
# nats_url = "nats://nats.example:4222"
# nats_namespace = "kvplane"
# nats_component = "kvplane"
# nats_queue_events = 65536
# Heartbeat period on NATS (0: none): routers leave a worker they have not heard from for
# their heartbeat_timeout_ms (default 5000) out of routing until it beats again.
# nats_heartbeat_ms = 1000
# Credentials and TLS for NATS, as files the daemon reads at start-up, before it drops
# privileges (only root's or the daemon's links are followed; a token, password or key
# file readable by group or others is refused). One of a token, a user and password
# file, a user nkey seed file or a credentials (.creds: JWT and seed) file; the CA that
# signed the server's certificate (else the system's roots); a client
# certificate and key for servers that verify clients; tls_required refuses a plain
# connection (a tls:// URL implies it). /metrics: kvplane_nats_*.
# [events.nats_auth]
# token_file = "/etc/kvplane/nats.token"
# user = "kvplane"
# password_file = "/etc/kvplane/nats.password"
# nkey_seed_file = "/etc/kvplane/nats-user.nk"
# credentials_file = "/etc/kvplane/nats.creds"
# tls_ca_file = "/etc/kvplane/nats-ca.pem"
# tls_cert_file = "/etc/kvplane/nats-client.pem"
# tls_key_file = "/etc/kvplane/nats-client.key"
# tls_required = true
# Mutual TLS to the routers' event port (the routers' [events_tls]): the CA that signs
# their certificates, this daemon's certificate and key (read at start-up like the NATS
# files), and the name their certificates carry (unset: each router's IP address). Unset:
# plain TCP, and anyone who reaches a router's event port can steer its routing.
# [events.tls]
# ca_file = "/etc/kvplane/router-ca.pem"
# cert_file = "/etc/kvplane/daemon.pem"
# key_file = "/etc/kvplane/daemon.key"
# server_name = "router.example"

[device]
# The device the data plane runs on: "auto" (the CUDA device below when an NVIDIA driver
# and that GPU are present, else the host backend; the log and /status say why),
# "cuda" (refuse to start without it) or "host" (host memory and the CPU build of the
# kernels).
backend = "{device_backend}"
# The CUDA device (driver ordinal) the daemon uses.
ordinal = {device_ordinal}
# Testing: the host backend reports each copy done only this many microseconds after
# launching it (as a GPU completes asynchronously), to exercise the data plane's
# completion polling without one. 0: at once. Ignored by the cuda backend.
host_completion_delay_us = {device_host_delay_us}

# Namespaces (tenant + model + LoRA) and the uids that may use each. With none listed,
# any namespace may be used, but only by the daemon's own uid.
# Each may be limited per tier, in bytes (unset: up to the tier's size; 0: kept out of
# that tier). A namespace at its limit evicts its own least valuable blocks, never a
# neighbour's.
# [[namespaces]]
# name = "tenant-a/llama-70b"
# uids = [1000]
# max_host_bytes = 17179869184
# max_nvme_bytes = 274877906944
# Bytes of engine KV buffers mapped at once for this namespace's sessions.
# max_mapped_bytes = 68719476736

# Sessions attached to the namespace at once, and their queue pairs together.
# max_sessions = 8
# max_queue_pairs = 32
"#,
            socket = s.socket_path.display(),
            mode = s.socket_mode,
            max_sessions = s.max_sessions,
            hs_timeout = s.handshake_timeout_ms,
            hs_workers = s.handshake_workers,
            hs_pending = s.max_pending_handshakes,
            hs_pending_uid = s.max_pending_handshakes_per_uid,
            hs_regions = s.max_handshake_regions,
            hs_regions_uid = s.max_handshake_regions_per_uid,
            max_arena = s.max_arena_bytes,
            max_qp = s.max_queue_pairs,
            spin = s.spin_us,
            engine_event_ms = s.engine_event_timeout_ms,
            drop = s.drop_privileges,
            hugetlb = s.allow_hugetlb_kv_buffers,
            dp_threads = s.dataplane_threads,
            io_threads = s.io_threads,
            io_queue = s.io_queue,
            block_bytes = b.block_bytes,
            admit = b.nvme_admit_min_hits,
            write_through = b.write_through,
            max_pins = b.max_pinned_blocks_per_session,
            hbm = d.tiers.hbm.capacity_bytes,
            host = h.capacity_bytes,
            lock = h.lock,
            touch = h.touch_threads,
            nvme_cap = n.capacity_bytes,
            qd = n.queue_depth,
            batch = n.batch_size,
            direct = n.direct,
            verify = n.verify_on_scan,
            direct_to_g1 = n.direct_to_g1.as_str(),
            metrics_addr = d.control.metrics_addr,
            control_mode = d.control.socket_mode,
            tcp_tenant_data = d.control.tcp_tenant_data,
            queue_events = d.events.queue_events,
            device_backend = d.device.backend.as_str(),
            device_ordinal = d.device.ordinal,
            device_host_delay_us = d.device.host_completion_delay_us,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn default_toml_parses_to_the_default() {
        assert_eq!(parse(&Config::default_toml()).unwrap(), Config::default());
    }

    #[test]
    fn serialised_configs_parse_back_equal() {
        let default = Config::default();
        let text = default.to_toml().unwrap();
        assert_eq!(parse(&text).unwrap(), default, "{text}");

        // Every table, and every optional key set, to values other than the defaults.
        let mut full = Config {
            serve: ServeConfig {
                socket_path: "/run/kvp-test/engines.sock".into(),
                socket_mode: 0o600,
                max_sessions: 12,
                max_sessions_per_uid: Some(3),
                max_queue_pairs_per_uid: Some(7),
                socket_group: Some(44),
                handshake_timeout_ms: 1500,
                handshake_workers: 3,
                max_pending_handshakes: 100,
                max_pending_handshakes_per_uid: 10,
                max_handshake_regions: 2000,
                max_handshake_regions_per_uid: 300,
                max_arena_bytes: 1 << 20,
                max_queue_pairs: 4,
                spin_us: 7,
                engine_event_timeout_ms: 2500,
                drop_privileges: true,
                run_as_uid: Some(65534),
                run_as_gid: Some(65534),
                max_mapped_bytes: Some(1 << 34),
                max_engine_mappings: Some(1000),
                max_engine_mappings_per_uid: Some(400),
                allow_hugetlb_kv_buffers: true,
                dataplane_threads: 2,
                dataplane_cpus: vec![1, 0],
                io_threads: 3,
                io_queue: 16,
            },
            ..Config::default()
        };
        full.blocks.block_bytes = 128 << 10;
        full.blocks.write_through = !full.blocks.write_through;
        full.blocks.nvme_admit_min_hits += 1;
        full.blocks.max_pinned_blocks_per_session = 7;
        full.tiers.hbm.capacity_bytes = 1 << 30;
        full.tiers.host.capacity_bytes = 64 << 20;
        full.tiers.host.lock = false;
        full.tiers.host.hugepages = crate::tier::host::HugepageMode::Never;
        full.tiers.host.touch_threads = 1;
        full.tiers.host.numa_node = Some(0);
        full.tiers.host.cpus = vec![0, 1];
        full.tiers.nvme.paths = vec!["/var/lib/kvp-test/a".into(), "/var/lib/kvp-test/b".into()];
        full.tiers.nvme.capacity_bytes = 1 << 30;
        full.tiers.nvme.engine = crate::tier::nvme::EngineKind::Sync;
        full.tiers.nvme.verify_on_scan = !full.tiers.nvme.verify_on_scan;
        full.tiers.nvme.queue_depth = 8;
        full.tiers.nvme.batch_size = 4;
        full.tiers.nvme.direct = false;
        full.tiers.nvme.checksum_threads = 1;
        full.tiers.nvme.key_path = Some("/var/lib/kvp-test/slot.key".into());
        full.tiers.nvme.direct_to_g1 = crate::tier::nvme::DirectToG1::Off;
        full.namespaces = vec![
            NamespaceConfig {
                name: "tenant-a/llama-70b".into(),
                uids: vec![1000, 1001],
                max_hbm_bytes: Some(1 << 29),
                max_host_bytes: Some(0),
                max_nvme_bytes: Some(1 << 30),
                max_mapped_bytes: Some(1 << 31),
                max_sessions: Some(2),
                max_queue_pairs: Some(4),
            },
            NamespaceConfig::new("tenant-b", vec![2000]),
        ];
        full.control = ControlConfig {
            metrics_addr: String::new(),
            socket_path: Some("/run/kvp-test/control.sock".into()),
            socket_mode: 0o640,
            socket_gid: Some(45),
            admin_uids: vec![1, 2],
            tcp_tenant_data: true,
        };
        full.events = EventsConfig {
            routers: vec!["127.0.0.1:7070".into(), "[::1]:7071".into()],
            worker_id: 42,
            queue_events: 1024,
            nats_url: Some("nats://127.0.0.1:4222".into()),
            nats_namespace: "ns".into(),
            nats_component: "comp".into(),
            nats_queue_events: 2048,
            nats_heartbeat_ms: 250,
            nats_auth: Default::default(),
            tls: kvplane_router::tls::EventsTls {
                ca_file: Some("/etc/kvplane/router-ca.pem".into()),
                cert_file: Some("/etc/kvplane/daemon.pem".into()),
                key_file: Some("/etc/kvplane/daemon.key".into()),
                server_name: Some("router.example".into()),
                crl_file: None,
                bind_worker_ids: false,
            },
        };
        let auth = &mut full.events.nats_auth;
        auth.token_file = Some("/etc/kvplane/nats.token".into());
        auth.tls_ca_file = Some("/etc/kvplane/nats-ca.pem".into());
        auth.tls_cert_file = Some("/etc/kvplane/nats.pem".into());
        auth.tls_key_file = Some("/etc/kvplane/nats.key".into());
        auth.tls_required = true;
        full.device = DeviceConfig {
            backend: BackendSetting::Cuda,
            ordinal: 3,
            host_completion_delay_us: 250,
        };
        full.validate().unwrap();
        let text = full.to_toml().unwrap();
        assert_eq!(parse(&text).unwrap(), full, "{text}");
        // An unset optional key is left out, not written as some stand-in value.
        assert!(!default.to_toml().unwrap().contains("run_as_uid"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[serve]\nmax_sessions = 0", "serve.max_sessions"),
            ("[serve]\nmax_queue_pairs = 17", "serve.max_queue_pairs"),
            ("[serve]\nspin_us = 99999", "serve.spin_us"),
            (
                "[serve]\nmax_engine_mappings = 0",
                "serve.max_engine_mappings",
            ),
            (
                "[serve]\nmax_engine_mappings_per_uid = 0",
                "serve.max_engine_mappings_per_uid",
            ),
            (
                "[serve]\nengine_event_timeout_ms = 0",
                "serve.engine_event_timeout_ms",
            ),
            ("[serve]\ndataplane_threads = 65", "serve.dataplane_threads"),
            (
                "[serve]\ndataplane_cpus = [0, 5000]",
                "serve.dataplane_cpus",
            ),
            ("[serve]\nio_threads = 0", "serve.io_threads"),
            ("[serve]\nio_queue = 0", "serve.io_queue"),
            ("[serve]\nmax_arena_bytes = 10", "serve.max_arena_bytes"),
            ("[serve]\nsocket_mode = 0o1777", "serve.socket_mode"),
            (
                "[control]\nmetrics_addr = \"0.0.0.0:9464\"",
                "control.metrics_addr",
            ),
            (
                "[[namespaces]]\nname = \"a b\"\nuids = [1]",
                "namespaces[0].name",
            ),
            (
                "[[namespaces]]\nname = \"a\"\nuids = [1]\n[[namespaces]]\nname = \"a\"\nuids = [2]",
                "namespaces[1].name",
            ),
            (
                "[[namespaces]]\nname = \"a\"\nuids = [1]\nmax_host_bytes = 5",
                "namespaces[0].max_host_bytes",
            ),
            ("[serve]\nrun_as_uid = 0", "serve.run_as_uid"),
            (
                "[serve]\nmax_sessions = 4\nmax_sessions_per_uid = 5",
                "serve.max_sessions_per_uid",
            ),
            (
                "[serve]\nhandshake_timeout_ms = 5",
                "serve.handshake_timeout_ms",
            ),
            ("[serve]\nhandshake_workers = 0", "serve.handshake_workers"),
            (
                "[serve]\nmax_pending_handshakes = 4\nmax_pending_handshakes_per_uid = 8",
                "serve.max_pending_handshakes_per_uid",
            ),
            (
                "[[namespaces]]\nname = \"a\"\nuids = [1]\nmax_sessions = 0",
                "namespaces[0].max_sessions",
            ),
            (
                "[serve]\ndrop_privileges = false\nrun_as_uid = 5",
                "serve.run_as_uid",
            ),
            ("[device]\nbackend = \"gpu\"", "device.backend"),
            ("[device]\nbackend = \"CUDA\"", "device.backend"),
            ("[device]\nbackend = 1", "backend"),
            ("[device]\nordinal = 256", "device.ordinal"),
            (
                "[device]\nhost_completion_delay_us = 10000001",
                "device.host_completion_delay_us",
            ),
            ("[device]\nordinal = -1", "ordinal"),
            ("[device]\ngpu = 0", "gpu"),
            (
                "[events]\nrouters = [\"127.0.0.1:7470\"]\n[events.tls]\nca_file = \"/k/ca.pem\"",
                "events.tls.cert_file",
            ),
            (
                "[events]\nrouters = [\"127.0.0.1:7470\"]\n[events.tls]\nca_file = \"/a\"\n\
                 cert_file = \"/b\"\nkey_file = \"/c\"\nserver_name = \"no such name!\"",
                "events.tls.server_name",
            ),
            (
                "[events]\nrouters = [\"127.0.0.1:7470\", \"127.0.0.1:7470\"]",
                "events.routers[1]",
            ),
            (
                "[events.tls]\nca_file = \"/a\"\ncert_file = \"/b\"\nkey_file = \"/c\"",
                "`events.tls`: set without events.routers",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let err = parse("[serve]\nbogus = 1").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse("[serve]\nmax_sessions = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_sessions"), "{err}");
    }

    /// (uid_t)-1 as a run-as id keeps root's (setresuid/setresgid read it as "unchanged"),
    /// and a control socket at the engines' socket path fails later with a misleading
    /// "in use": both are refused when the config is read, naming the key.
    #[test]
    fn run_as_minus_one_and_a_shared_socket_path_are_refused() {
        for key in ["run_as_uid", "run_as_gid"] {
            let err = parse(&format!(
                "[serve]\ndrop_privileges = true\n{key} = 4294967295"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("serve.{key}")) && err.contains("unchanged"),
                "{err}"
            );
        }
        assert!(parse("[serve]\ndrop_privileges = true\nrun_as_gid = 4294967294").is_ok());
        let err = parse(
            "[serve]\nsocket_path = \"/run/k/k.sock\"\n[control]\nsocket_path = \"/run/k/k.sock\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("control.socket_path"), "{err}");
    }

    #[test]
    fn device_backend_takes_each_value_and_defaults_to_auto() {
        let d = parse("").unwrap().device;
        assert_eq!((d.backend, d.ordinal), (BackendSetting::Auto, 0));
        for (text, backend) in [
            ("auto", BackendSetting::Auto),
            ("cuda", BackendSetting::Cuda),
            ("host", BackendSetting::Host),
        ] {
            let c = parse(&format!("[device]\nbackend = \"{text}\"\nordinal = 2")).unwrap();
            assert_eq!((c.device.backend, c.device.ordinal), (backend, 2), "{text}");
            assert_eq!(backend.as_str(), text);
            // Written back as the same word, read back equal.
            let toml = c.to_toml().unwrap();
            assert!(toml.contains(&format!("backend = \"{text}\"")), "{toml}");
            assert_eq!(parse(&toml).unwrap(), c);
        }
        let err = parse("[device]\nbackend = \"gpu\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device.backend") && err.contains("\"gpu\"") && err.contains("\"host\""),
            "{err}"
        );
        // The ordinal's upper bound is accepted, one past it is not.
        let max = MAX_DEVICE_ORDINAL;
        assert_eq!(
            parse(&format!("[device]\nordinal = {max}"))
                .unwrap()
                .device
                .ordinal,
            max
        );
        assert!(parse(&format!("[device]\nordinal = {}", max + 1)).is_err());
    }

    #[test]
    fn namespace_access() {
        let c = parse("[[namespaces]]\nname = \"a\"\nuids = [7]").unwrap();
        assert!(c.namespace_allowed("a", 7, 0));
        assert!(!c.namespace_allowed("a", 8, 0));
        assert!(!c.namespace_allowed("b", 7, 0));
        let open = Config::default();
        assert!(open.namespace_allowed("anything", 5, 5));
        assert!(!open.namespace_allowed("anything", 6, 5));
        assert!(c.uid_may_attach(7, 0) && !c.uid_may_attach(8, 0));
        assert!(open.uid_may_attach(5, 5) && !open.uid_may_attach(6, 5));
    }

    /// Issue 17, finding 4: the config file is read as root without following a link
    /// another user planted, and only if no other user can write it.
    #[test]
    fn config_file_others_can_change_is_refused() {
        use crate::secure_open::PathError;
        use crate::secure_open::tests::{
            OTHER_UID, chmod, chown, other_user_symlink, require_root, sticky_dir,
        };
        require_root();
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let path = dir.path().join("kvplane.toml");
        std::fs::write(&path, "[serve]\nmax_sessions = 7\n").unwrap();
        chmod(&path, 0o644);
        assert_eq!(Config::load(&path).unwrap().serve.max_sessions, 7);
        chmod(&path, 0o664);
        let e = Config::load(&path).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Path(PathError::Mode { mode: 0o664, .. })),
            "{e}"
        );
        chmod(&path, 0o644);
        chown(&path, OTHER_UID);
        let e = Config::load(&path).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Path(PathError::Owner { .. })),
            "{e}"
        );
        chown(&path, 0);
        // A link another user planted in a shared directory (to a file that would pass).
        let shared = sticky_dir(dir.path(), "shared");
        let link = shared.join("kvplane.toml");
        other_user_symlink(&path, &link);
        let e = Config::load(&link).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Path(PathError::UntrustedSymlink { .. })),
            "{e}"
        );
    }

    #[test]
    fn the_session_mapping_cap_keeps_half_the_kernels_mappings_for_the_daemon() {
        let mut s = ServeConfig::default();
        let limits = |total, per_uid| MappingLimits { total, per_uid };
        assert_eq!(
            s.engine_mapping_limits(65_530).unwrap(),
            limits(32_765, 16_382)
        );
        s.max_engine_mappings = Some(32_765);
        assert_eq!(
            s.engine_mapping_limits(65_530).unwrap(),
            limits(32_765, 16_382)
        );
        s.max_engine_mappings = Some(32_766);
        let e = s.engine_mapping_limits(65_530).unwrap_err().to_string();
        assert!(
            e.contains("serve.max_engine_mappings") && e.contains("vm.max_map_count"),
            "{e}"
        );
        assert_eq!(
            s.engine_mapping_limits(1 << 40).unwrap(),
            limits(32_766, 16_383)
        );
        s.max_engine_mappings_per_uid = Some(32_766);
        assert_eq!(
            s.engine_mapping_limits(1 << 40).unwrap(),
            limits(32_766, 32_766)
        );
        s.max_engine_mappings_per_uid = Some(32_767);
        let e = s.engine_mapping_limits(1 << 40).unwrap_err().to_string();
        assert!(e.contains("serve.max_engine_mappings_per_uid"), "{e}");
    }
}

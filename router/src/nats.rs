//! KV events over NATS JetStream: the daemon-side [`NatsPublisher`] and the router-side
//! consumer ([`run_consumer`]), in Dynamo's format and naming (see [`crate::dynamo`]).
//!
//! Publisher. Changes go into a bounded queue (the caller never blocks); one task
//! publishes them in order, pipelining up to `window` un-acknowledged messages, and
//! retries from the oldest un-acknowledged one while NATS is away (each message carries a
//! `Nats-Msg-Id`, so a retry of a message the server already stored is dropped by its
//! duplicate window). When the queue overflows, queued changes are discarded and, as soon
//! as NATS accepts messages again, the worker is re-published in full: a `Cleared` event
//! marked as a snapshot, then `Stored` chains of everything it holds. The stream is
//! therefore never silently incomplete: a reader that applies it in order ends with the
//! daemon's state. A daemon also starts with such a snapshot, which is how a restarted
//! daemon (NVMe cache restored) replaces what routers knew about it.
//!
//! Consumer. Each router replica reads the whole stream with its own ordered consumer and
//! applies it in stream order, so replicas that have read the same prefix hold equal
//! indexes. Every `snapshot_interval_ms` a replica writes its index and the stream sequence
//! it covers to a JetStream object store; a new or restarted replica loads the latest
//! snapshot and reads the stream from the next sequence, without asking any daemon.

use crate::dynamo::{self, KvCacheEventData, RouterEvent};
use crate::events::SnapshotProvider;
use crate::index::DumpNode;
use crate::service::RouterState;
use crate::{Tier, WorkerId};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use zeroize::Zeroize;

/// Where the KV event stream lives: shared by publishers and routers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsStreamConfig {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// Dynamo namespace of the stream name.
    pub namespace: String,
    /// Dynamo component of the stream name.
    pub component: String,
    /// Messages older than this leave the stream (Dynamo's default: one hour). Router
    /// snapshots must be written more often than this for new replicas to rebuild.
    pub max_age_s: u64,
    /// Server round trip limit for a publish acknowledgement or an API request.
    pub request_timeout_ms: u64,
    /// How this client proves itself to the server and checks the server's certificate.
    pub auth: NatsAuth,
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        NatsStreamConfig {
            url: "nats://127.0.0.1:4222".into(),
            namespace: "kvplane".into(),
            component: "kvplane".into(),
            max_age_s: 3600,
            request_timeout_ms: 2_000,
            auth: NatsAuth::default(),
        }
    }
}

impl NatsStreamConfig {
    pub fn stream(&self) -> String {
        dynamo::stream_name(&self.namespace, &self.component)
    }

    /// Object store bucket of router snapshots.
    pub fn snapshot_bucket(&self) -> String {
        format!("{}-router-state", self.stream())
    }

    /// Subject of `worker`'s heartbeats: core NATS, outside the stream (`{stream}.*`), so
    /// liveness never enters the event history.
    pub fn heartbeat_subject(&self, worker: WorkerId) -> String {
        format!("{}-heartbeat.{worker}", self.stream())
    }

    /// Where routers publish the probe that tells them their subscription works.
    pub fn heartbeat_probe_subject(&self) -> String {
        format!("{}-heartbeat.{PROBE_TOKEN}", self.stream())
    }

    /// What routers subscribe to for every worker's heartbeats.
    pub fn heartbeat_wildcard(&self) -> String {
        format!("{}-heartbeat.*", self.stream())
    }
}

/// NATS credentials and TLS settings: file paths in the configuration, read by
/// [`NatsAuth::load`] (the daemon loads them before it drops privileges, through its
/// no-link open; a router that did not load them reads them at each connection, so a
/// rotated token or certificate is picked up on reconnect, refusing a secret others can
/// read, as [`crate::tls::read_file`] does). No secret is ever written in
/// the configuration itself, and `Debug` never shows one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// File holding the server's authorization token (`nats-server --auth`).
    pub token_file: Option<PathBuf>,
    /// User name; with `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// File holding a user nkey seed (`SU...`; the server lists its public key).
    pub nkey_seed_file: Option<PathBuf>,
    /// A NATS credentials file (`.creds`: user JWT and nkey seed; decentralized auth).
    pub credentials_file: Option<PathBuf>,
    /// PEM certificates of the CAs that sign the server's certificate (instead of the
    /// system's roots). Setting it, a client certificate or `tls_required` uses TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its private key, for servers that verify clients
    /// (`verify: true`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a server that does not upgrade the connection to TLS (`tls://` URLs imply it).
    pub tls_required: bool,
    #[serde(skip)]
    loaded: Option<Arc<LoadedAuth>>,
}

/// Settings compare by what they name, never by the secrets read.
impl PartialEq for NatsAuth {
    fn eq(&self, other: &Self) -> bool {
        fn names(a: &NatsAuth) -> ([&Option<PathBuf>; 7], &Option<String>, bool) {
            (
                [
                    &a.token_file,
                    &a.password_file,
                    &a.nkey_seed_file,
                    &a.credentials_file,
                    &a.tls_ca_file,
                    &a.tls_cert_file,
                    &a.tls_key_file,
                ],
                &a.user,
                a.tls_required,
            )
        }
        names(self) == names(other)
    }
}

impl Eq for NatsAuth {}

/// What a file of [`NatsAuth`] holds, for the reader's checks: a secret must be readable
/// by its owner only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFile {
    Secret,
    Public,
}

impl AuthFile {
    /// Mode bits such a file must not have: a secret readable (or writable) by group or
    /// others; a certificate others could rewrite (to plant their own CA).
    pub fn forbidden_mode(self) -> u32 {
        match self {
            AuthFile::Secret => 0o077,
            AuthFile::Public => 0o022,
        }
    }
}

/// The contents of [`NatsAuth`]'s files, checked.
#[derive(Default)]
struct LoadedAuth {
    token: Option<String>,
    password: Option<String>,
    nkey_seed: Option<String>,
    credentials: Option<String>,
    /// PEM, each parsed once at load.
    tls_ca: Option<Vec<u8>>,
    tls_cert: Option<Vec<u8>>,
    tls_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for LoadedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadedAuth(<redacted>)")
    }
}

impl Drop for LoadedAuth {
    fn drop(&mut self) {
        // Best effort: the copies async-nats and rustls keep are out of reach.
        self.token.zeroize();
        self.password.zeroize();
        self.nkey_seed.zeroize();
        self.credentials.zeroize();
        self.tls_key.zeroize();
    }
}

/// Wipes `bytes` (a secret file's contents) and drops them.
fn wipe(mut bytes: Vec<u8>) {
    bytes.zeroize();
}

impl NatsAuth {
    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.token_file.is_none()
            && self.user.is_none()
            && self.password_file.is_none()
            && self.nkey_seed_file.is_none()
            && self.credentials_file.is_none()
            && !self.uses_tls_files()
            && !self.tls_required
    }

    fn uses_tls_files(&self) -> bool {
        self.tls_ca_file.is_some() || self.tls_cert_file.is_some() || self.tls_key_file.is_some()
    }

    /// The settings that go together: at most one of a token, a user and password, an
    /// nkey seed or a credentials file; a client certificate with its key.
    pub fn validate(&self) -> Result<(), NatsError> {
        let bad = |what: &'static str, reason: &str| {
            Err(NatsError::Auth {
                what,
                reason: reason.into(),
            })
        };
        let methods = [
            ("token_file", self.token_file.is_some()),
            ("user", self.user.is_some() || self.password_file.is_some()),
            ("nkey_seed_file", self.nkey_seed_file.is_some()),
            ("credentials_file", self.credentials_file.is_some()),
        ];
        let mut set = methods.iter().filter(|(_, on)| *on).map(|(name, _)| *name);
        if let (Some(first), Some(second)) = (set.next(), set.next()) {
            return Err(NatsError::Auth {
                what: second,
                reason: format!(
                    "set together with {first}: set one of token_file, user and \
                     password_file, nkey_seed_file or credentials_file"
                ),
            });
        }
        if self.user.is_some() != self.password_file.is_some() {
            return bad("user", "user and password_file go together");
        }
        if let Some(u) = &self.user
            && (u.is_empty() || u.len() > 256 || u.chars().any(|c| c.is_control()))
        {
            return bad(
                "user",
                "must be 1-256 characters, none of them control characters",
            );
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad(
                "tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            );
        }
        Ok(())
    }

    /// Reads and checks every configured file with `read` (the daemon's reader refuses
    /// links and a secret that others may read); the result connects without touching
    /// the files again.
    pub fn load(
        &self,
        read: &mut dyn FnMut(&Path, AuthFile) -> std::io::Result<Vec<u8>>,
    ) -> Result<NatsAuth, NatsError> {
        self.validate()?;
        let mut file = |what: &'static str, path: &Option<PathBuf>, kind| {
            path.as_deref()
                .map(|p| {
                    read(p, kind).map_err(|source| NatsError::AuthFile {
                        what,
                        path: p.to_path_buf(),
                        source,
                    })
                })
                .transpose()
        };
        // Text of a secret file; the bytes are wiped whatever happens to them.
        let text = |what: &'static str, bytes: Option<Vec<u8>>| -> Result<_, NatsError> {
            let Some(bytes) = bytes else { return Ok(None) };
            String::from_utf8(bytes).map(Some).map_err(|e| {
                wipe(e.into_bytes());
                NatsError::Auth {
                    what,
                    reason: "not UTF-8".into(),
                }
            })
        };
        let line = |what: &'static str, bytes: Option<Vec<u8>>| -> Result<_, NatsError> {
            let Some(text) = text(what, bytes)? else {
                return Ok(None);
            };
            // One trailing newline is how such files are written; nothing else may surround it.
            let trimmed = text.strip_suffix('\n').unwrap_or(&text);
            let out = (!trimmed.is_empty() && !trimmed.chars().any(|c| c.is_control() || c == ' '))
                .then(|| trimmed.to_owned());
            wipe(text.into_bytes());
            out.map(Some).ok_or(NatsError::Auth {
                what,
                reason: "must be one line of printable characters without spaces".into(),
            })
        };
        // Filled one field at a time: on an error, what was read so far is wiped by
        // LoadedAuth's Drop.
        let mut loaded = LoadedAuth::default();
        loaded.token = line(
            "token_file",
            file("token_file", &self.token_file, AuthFile::Secret)?,
        )?;
        loaded.password = line(
            "password_file",
            file("password_file", &self.password_file, AuthFile::Secret)?,
        )?;
        loaded.nkey_seed = line(
            "nkey_seed_file",
            file("nkey_seed_file", &self.nkey_seed_file, AuthFile::Secret)?,
        )?;
        loaded.credentials = text(
            "credentials_file",
            file("credentials_file", &self.credentials_file, AuthFile::Secret)?,
        )?;
        loaded.tls_ca = file("tls_ca_file", &self.tls_ca_file, AuthFile::Public)?;
        loaded.tls_cert = file("tls_cert_file", &self.tls_cert_file, AuthFile::Public)?;
        loaded.tls_key = file("tls_key_file", &self.tls_key_file, AuthFile::Secret)?;
        // Parse now, so a bad file fails at start-up with its name, not at each reconnect.
        tls_config(&loaded)?;
        if let Some(seed) = &loaded.nkey_seed {
            match nkeys::KeyPair::from_seed(seed) {
                Ok(kp) if kp.key_pair_type() == nkeys::KeyPairType::User => {}
                Ok(_) => {
                    return Err(NatsError::Auth {
                        what: "nkey_seed_file",
                        reason: "not a user seed (SU...)".into(),
                    });
                }
                Err(e) => {
                    return Err(NatsError::Auth {
                        what: "nkey_seed_file",
                        reason: e.to_string(),
                    });
                }
            }
        }
        if let Some(creds) = &loaded.credentials {
            credentials_options(async_nats::ConnectOptions::new(), creds)?;
        }
        Ok(NatsAuth {
            loaded: Some(Arc::new(loaded)),
            ..self.clone()
        })
    }

    /// `opts` with these credentials and TLS settings.
    fn apply(
        &self,
        mut opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, NatsError> {
        let loaded = match &self.loaded {
            Some(l) => Arc::clone(l),
            None if self.is_empty() => return Ok(opts),
            // A router reads its files at each connection.
            None => match self.load(&mut crate::tls::read_file)?.loaded {
                Some(l) => l,
                None => return Ok(opts),
            },
        };
        if let Some(t) = &loaded.token {
            opts = opts.token(t.clone());
        }
        if let (Some(u), Some(p)) = (&self.user, &loaded.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(seed) = &loaded.nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(creds) = &loaded.credentials {
            opts = credentials_options(opts, creds)?;
        }
        if let Some(config) = tls_config(&loaded)? {
            opts = opts.tls_client_config(config).require_tls(true);
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }
}

/// `opts` signing the server's nonce with a credentials file's key and presenting its JWT.
fn credentials_options(
    opts: async_nats::ConnectOptions,
    creds: &str,
) -> Result<async_nats::ConnectOptions, NatsError> {
    opts.credentials(creds).map_err(|e| NatsError::Auth {
        what: "credentials_file",
        reason: e.to_string(),
    })
}

/// A TLS client configuration from the loaded CA and client certificate, or `None`
/// when neither is set (async-nats then uses the system's roots if TLS is needed).
fn tls_config(loaded: &LoadedAuth) -> Result<Option<async_nats::rustls::ClientConfig>, NatsError> {
    use async_nats::rustls::{self, RootCertStore, pki_types};
    use pki_types::pem::PemObject;
    use pki_types::{CertificateDer, PrivateKeyDer};
    if loaded.tls_ca.is_none() && loaded.tls_cert.is_none() {
        return Ok(None);
    }
    let bad = |what: &'static str, e: &dyn std::fmt::Display| NatsError::Auth {
        what,
        reason: e.to_string(),
    };
    let certs =
        |what: &'static str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, NatsError> {
            crate::tls::pem_certs(pem).map_err(|e| bad(what, &e))
        };
    let mut roots = RootCertStore::empty();
    match &loaded.tls_ca {
        Some(pem) => {
            for c in certs("tls_ca_file", pem)? {
                roots.add(c).map_err(|e| bad("tls_ca_file", &e))?;
            }
        }
        // A client certificate without a CA file: the server is checked against the
        // system's roots, as async-nats does.
        None => {
            let native = rustls_native_certs::load_native_certs().map_err(|e| {
                bad(
                    "tls_ca_file",
                    &format!("unset, and the system's roots: {e}"),
                )
            })?;
            roots.add_parsable_certificates(native);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .with_root_certificates(roots);
    let config = match (&loaded.tls_cert, &loaded.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = certs("tls_cert_file", cert)?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("tls_key_file", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("tls_cert_file", &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(config))
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS auth {what}: {reason}")]
    Auth { what: &'static str, reason: String },
    #[error("NATS auth {what}: {}: {source}", path.display())]
    AuthFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("router snapshot: {0}")]
    Snapshot(String),
}

/// Checks a NATS URL (or comma-separated list): `nats://` or `tls://`, and no user or
/// password in it (they would be logged and shown with the URL: use [`NatsAuth`]'s
/// files). The reason is for the caller's error.
pub fn check_url(url: &str) -> Result<(), String> {
    for one in url.split(',').map(str::trim) {
        let Some(rest) = one
            .strip_prefix("nats://")
            .or_else(|| one.strip_prefix("tls://"))
        else {
            return Err("not a URL like nats://127.0.0.1:4222 (or tls://...)".into());
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        if authority.is_empty() {
            return Err("a URL without a host".into());
        }
        if authority.contains('@') {
            return Err(
                "credentials in the URL are refused (they would be logged): use the auth \
                 files (token_file, user and password_file, ...)"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Connects with reconnects forever; with `retry_initial` the first connection is also
/// retried in the background (a daemon starts and queues events while NATS is down).
pub async fn connect(
    cfg: &NatsStreamConfig,
    name: &str,
    retry_initial: bool,
) -> Result<async_nats::Client, NatsError> {
    connect_watching(cfg, name, retry_initial, None, None).await
}

/// Told whether the connection is up, at each change (connection events).
pub type LinkHook = Arc<dyn Fn(bool) + Send + Sync>;

/// [`connect`], bumping `reconnects` each time the connection comes back after a loss and
/// telling `link` when it goes down or comes back.
async fn connect_watching(
    cfg: &NatsStreamConfig,
    name: &str,
    retry_initial: bool,
    reconnects: Option<tokio::sync::watch::Sender<u64>>,
    link: Option<LinkHook>,
) -> Result<async_nats::Client, NatsError> {
    let opts = async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms.max(1))))
        .connection_timeout(Duration::from_millis(cfg.request_timeout_ms.max(1)))
        // Reconnect quickly: the outage is measured in the fault tests.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50u64 << attempts.min(5)).min(1_000))
        })
        .max_reconnects(None);
    let mut opts = cfg.auth.apply(opts)?;
    if retry_initial {
        opts = opts.retry_on_initial_connect();
    }
    // A refused connection (wrong credentials, an unverifiable certificate, no server) is
    // retried every second at most: say so in the log at the 1st, 2nd, 4th, 8th ... failure
    // in a row, not at each.
    let failures = AtomicU64::new(0);
    let url = cfg.url.clone();
    opts = opts.event_callback(move |event| {
        match &event {
            async_nats::Event::Connected => {
                failures.store(0, Ordering::Relaxed);
                if let Some(tx) = &reconnects {
                    tx.send_modify(|n| *n += 1);
                }
                if let Some(l) = &link {
                    l(true);
                }
            }
            async_nats::Event::Disconnected | async_nats::Event::Closed => {
                if let Some(l) = &link {
                    l(false);
                }
            }
            async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_) => {
                let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(%url, failures = n, error = %event, "NATS connection failing");
                }
            }
            _ => {}
        }
        std::future::ready(())
    });
    opts.connect(cfg.url.as_str())
        .await
        .map_err(|source| NatsError::Connect {
            url: cfg.url.clone(),
            source,
        })
}

/// Gets the stream, creating it as Dynamo's `NatsQueue` does (subjects `{stream}.*`,
/// max age) with file storage and a duplicate window for publisher retries.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
) -> Result<stream::Stream, NatsError> {
    let name = cfg.stream();
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.*")],
        max_age: Duration::from_secs(cfg.max_age_s.max(1)),
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Stream {
        stream: name,
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Publisher

/// One change of the worker's cache, queued for publication.
#[derive(Clone, Debug)]
enum Change {
    Stored {
        namespace: Arc<str>,
        tier: Tier,
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    Removed {
        namespace: Arc<str>,
        tier: Tier,
        hashes: Vec<u64>,
    },
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct NatsPublisherConfig {
    pub stream: NatsStreamConfig,
    /// Node name (header `Kvplane-Node`).
    pub node: String,
    /// The worker every event is published for.
    pub worker: WorkerId,
    /// Changes queued while NATS is slow or away; beyond it they are dropped and the
    /// worker is re-published in full once NATS is back.
    pub queue_events: usize,
    /// Messages in flight before waiting for acknowledgements.
    pub window: usize,
    /// Blocks per `Stored` message of a snapshot (keeps messages far below NATS's 1 MiB).
    pub snapshot_chunk_blocks: usize,
    /// Heartbeat period (0: none): routers leave a kvplane publisher out of routing when
    /// they have not heard it for their `heartbeat_timeout_ms`.
    pub heartbeat_ms: u64,
}

impl NatsPublisherConfig {
    pub fn new(stream: NatsStreamConfig, node: String, worker: WorkerId) -> Self {
        NatsPublisherConfig {
            stream,
            node,
            worker,
            queue_events: 65_536,
            window: 256,
            snapshot_chunk_blocks: 1_024,
            heartbeat_ms: 1_000,
        }
    }
}

/// Publisher counters (the daemon's metrics and the tests read them).
#[derive(Debug, Default)]
pub struct NatsPublisherStats {
    /// Messages acknowledged by JetStream (snapshot messages included).
    pub published: AtomicU64,
    /// Changes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Full re-publications (start-up and after each overflow).
    pub snapshots: AtomicU64,
    /// Failed publish attempts (each is retried).
    pub publish_errors: AtomicU64,
    /// Last publish attempt succeeded.
    pub healthy: AtomicBool,
    /// The connection to NATS is up.
    pub connected: AtomicBool,
}

struct PubShared {
    tx: mpsc::Sender<Change>,
    overflow: AtomicBool,
    /// Wakes the publishing task to act on `overflow` ([`NatsPublisher::resync`]).
    nudge: tokio::sync::Notify,
    stats: Arc<NatsPublisherStats>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The daemon's side of the NATS stream. Methods never block: call them in the order of
/// the registry changes they describe.
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<PubShared>,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish()
    }
}

impl NatsPublisher {
    /// Starts the publishing task on `runtime`. `provider` describes the worker's full
    /// state for snapshots (the same provider the TCP link uses).
    pub fn start(
        config: NatsPublisherConfig,
        provider: SnapshotProvider,
        runtime: &tokio::runtime::Handle,
    ) -> NatsPublisher {
        let (tx, rx) = mpsc::channel(config.queue_events.max(1));
        let shared = Arc::new(PubShared {
            tx,
            overflow: AtomicBool::new(false),
            nudge: tokio::sync::Notify::new(),
            stats: Arc::default(),
            stop: tokio::sync::watch::Sender::new(false),
        });
        runtime.spawn(publish_task(shared.clone(), config, provider, rx));
        NatsPublisher { shared }
    }

    pub fn stats(&self) -> Arc<NatsPublisherStats> {
        self.shared.stats.clone()
    }

    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
    }

    /// Re-publishes the worker's full state as soon as it can, discarding the changes
    /// queued: for a caller that lost changes before they reached the publisher (see
    /// `events::Publisher::resync`).
    pub fn resync(&self) {
        self.shared.overflow.store(true, Ordering::Release);
        self.shared.nudge.notify_one();
    }

    fn enqueue(&self, change: Change) {
        if self.shared.overflow.load(Ordering::Acquire) {
            // A snapshot is due and covers this change.
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.shared.tx.try_send(change).is_err() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.overflow.store(true, Ordering::Release);
        }
    }

    /// `blocks` (each `(hash, parent)`) now reside on `tier`; consecutive blocks of one
    /// chain travel as one event.
    pub fn stored(&self, namespace: &str, blocks: &[(u64, Option<u64>)], tier: Tier) {
        let ns: Arc<str> = namespace.into();
        let mut start = 0;
        while start < blocks.len() {
            let mut end = start + 1;
            while end < blocks.len() && blocks[end].1 == Some(blocks[end - 1].0) {
                end += 1;
            }
            self.enqueue(Change::Stored {
                namespace: ns.clone(),
                tier,
                parent: blocks[start].1,
                hashes: blocks[start..end].iter().map(|b| b.0).collect(),
            });
            start = end;
        }
    }

    /// `hashes` left `tier` (every tier when `None`: one event per tier, as Dynamo's
    /// events name one tier each).
    pub fn removed(&self, namespace: &str, hashes: &[u64], tier: Option<Tier>) {
        if hashes.is_empty() {
            return;
        }
        let ns: Arc<str> = namespace.into();
        let tiers: &[Tier] = match &tier {
            Some(t) => std::slice::from_ref(t),
            None => &Tier::ALL,
        };
        for &t in tiers {
            self.enqueue(Change::Removed {
                namespace: ns.clone(),
                tier: t,
                hashes: hashes.to_vec(),
            });
        }
    }
}

/// An encoded message waiting for its acknowledgement.
struct Outgoing {
    headers: HeaderMap,
    payload: bytes::Bytes,
}

struct Encoder {
    worker: WorkerId,
    epoch: u64,
    node: String,
    next_id: u64,
    /// The publisher's heartbeat period, announced in every message.
    heartbeat_ms: u64,
}

impl Encoder {
    fn encode(
        &mut self,
        namespace: &str,
        snapshot: bool,
        event: impl FnOnce(u64) -> RouterEvent,
    ) -> Outgoing {
        let id = self.next_id;
        self.next_id += 1;
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{:x}-{:x}-{id}", self.worker, self.epoch).as_str(),
        );
        headers.insert(dynamo::HEADER_EPOCH, self.epoch.to_string().as_str());
        headers.insert(dynamo::HEADER_NODE, self.node.as_str());
        if self.heartbeat_ms > 0 {
            headers.insert(
                dynamo::HEADER_HEARTBEAT_MS,
                self.heartbeat_ms.to_string().as_str(),
            );
        }
        if !namespace.is_empty() {
            headers.insert(dynamo::HEADER_NAMESPACE, namespace);
        }
        if snapshot {
            headers.insert(dynamo::HEADER_SNAPSHOT, "begin");
        }
        // Serializing plain structs of integers cannot fail.
        let payload = serde_json::to_vec(&event(id)).unwrap_or_default();
        Outgoing {
            headers,
            payload: payload.into(),
        }
    }

    fn change(&mut self, c: &Change) -> Outgoing {
        let worker = self.worker;
        match c {
            Change::Stored {
                namespace,
                tier,
                parent,
                hashes,
            } => self.encode(namespace, false, |id| {
                RouterEvent::stored(worker, id, *tier, *parent, hashes)
            }),
            Change::Removed {
                namespace,
                tier,
                hashes,
            } => self.encode(namespace, false, |id| {
                RouterEvent::removed(worker, id, *tier, hashes)
            }),
        }
    }

    /// `Cleared` (marked) + `Stored` chains of everything `provider` lists for this worker.
    fn snapshot(
        &mut self,
        provider: &SnapshotProvider,
        chunk: usize,
        out: &mut VecDeque<Outgoing>,
    ) {
        let worker = self.worker;
        out.push_back(self.encode("", true, |id| RouterEvent::cleared(worker, id)));
        for w in provider() {
            if w.worker != worker {
                continue;
            }
            for ns in &w.namespaces {
                let blocks = &ns.blocks;
                for run in crate::events::chain_runs(blocks, chunk) {
                    let first = blocks[run.start];
                    let hashes: Vec<u64> = blocks[run].iter().map(|b| b.hash).collect();
                    for tier in Tier::ALL {
                        if first.tiers & tier.bit() != 0 {
                            let parent = first.parent;
                            out.push_back(self.encode(&ns.namespace, false, |id| {
                                RouterEvent::stored(worker, id, tier, parent, &hashes)
                            }));
                        }
                    }
                }
            }
        }
    }
}

async fn publish_task(
    shared: Arc<PubShared>,
    cfg: NatsPublisherConfig,
    provider: SnapshotProvider,
    mut rx: mpsc::Receiver<Change>,
) {
    let mut stop = shared.stop.subscribe();
    let stats = shared.stats.clone();
    // Acknowledgements in flight when the connection dropped never come; a reconnect
    // retries them at once instead of after the request timeout.
    let (reconnect_tx, mut reconnected) = tokio::sync::watch::channel(0u64);
    let client = loop {
        let connected = stats.clone();
        let link: LinkHook = Arc::new(move |up| connected.connected.store(up, Ordering::Relaxed));
        let watch = Some(reconnect_tx.clone());
        match connect_watching(&cfg.stream, &cfg.node, true, watch, Some(link)).await {
            Ok(c) => break c,
            Err(err) => {
                tracing::warn!(%err, "NATS connect failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    if cfg.heartbeat_ms > 0 {
        let beat = Heartbeat {
            worker: cfg.worker,
            epoch,
            period_ms: cfg.heartbeat_ms,
        };
        tokio::spawn(heartbeat_task(
            client.clone(),
            cfg.stream.heartbeat_subject(cfg.worker),
            serde_json::to_vec(&beat).map_or_else(|_| bytes::Bytes::new(), bytes::Bytes::from),
            Duration::from_millis(cfg.heartbeat_ms),
            shared.stop.subscribe(),
        ));
    }
    let js = jetstream::new(client);
    let subject = dynamo::publish_subject(&cfg.stream.stream());
    let mut enc = Encoder {
        worker: cfg.worker,
        epoch,
        node: cfg.node.clone(),
        next_id: 1,
        heartbeat_ms: cfg.heartbeat_ms,
    };
    let mut pending: VecDeque<Outgoing> = VecDeque::new();
    let mut stream_ready = false;
    let mut need_snapshot = true; // announce the worker's full state first
    let mut backoff_ms = 50u64;
    loop {
        if *stop.borrow() {
            return;
        }
        if !stream_ready {
            match ensure_stream(&js, &cfg.stream).await {
                Ok(_) => stream_ready = true,
                Err(err) => {
                    stats.healthy.store(false, Ordering::Relaxed);
                    tracing::debug!(%err, "JetStream stream not ready");
                    if !pause(&mut stop, &mut backoff_ms).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if need_snapshot || shared.overflow.load(Ordering::Acquire) {
            // Order matters: clear the flag, then drop what is queued, then read the
            // state. Changes queued after the drain are re-applied after the snapshot
            // (idempotent, in order); changes before it are in the snapshot.
            shared.overflow.store(false, Ordering::Release);
            while rx.try_recv().is_ok() {}
            pending.clear();
            enc.snapshot(&provider, cfg.snapshot_chunk_blocks, &mut pending);
            stats.snapshots.fetch_add(1, Ordering::Relaxed);
            need_snapshot = false;
        }
        if pending.is_empty() {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => pending.push_back(enc.change(&c)),
                    None => return,
                },
                _ = stop.changed() => return,
                // A resync: the loop's top takes the snapshot.
                () = shared.nudge.notified() => continue,
            }
        }
        while pending.len() < cfg.window.max(1) {
            match rx.try_recv() {
                Ok(c) => pending.push_back(enc.change(&c)),
                Err(_) => break,
            }
        }
        reconnected.borrow_and_update();
        let result = tokio::select! {
            r = publish_window(&js, &subject, &mut pending, cfg.window.max(1), &stats) => r,
            Ok(()) = reconnected.changed() => {
                backoff_ms = 50;
                Err("connection re-established; retrying un-acknowledged messages".into())
            }
        };
        match result {
            Ok(()) => {
                stats.healthy.store(true, Ordering::Relaxed);
                backoff_ms = 50;
            }
            Err(err) => {
                stats.healthy.store(false, Ordering::Relaxed);
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%err, pending = pending.len(), "JetStream publish failed; retrying");
                if err.contains("no stream") || err.contains("NoResponders") {
                    stream_ready = false;
                }
                if !pause(&mut stop, &mut backoff_ms).await {
                    return;
                }
            }
        }
    }
}

/// A kvplane publisher's heartbeat message.
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    worker: WorkerId,
    epoch: u64,
    /// The beat period (routers that restored an older snapshot learn it here).
    #[serde(default)]
    period_ms: u64,
}

/// The last token of a router's probe subject (`{stream}-heartbeat.router`): a router
/// that hears its probes knows its heartbeat subscription works.
const PROBE_TOKEN: &str = "router";

/// Publishes `payload` on `subject` every `period` while connected, until stopped (or
/// `stop`'s sender is gone). A beat
/// due while NATS is away is skipped, not queued: a late heartbeat says nothing.
async fn heartbeat_task(
    client: async_nats::Client,
    subject: String,
    payload: bytes::Bytes,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if client.connection_state() == async_nats::connection::State::Connected {
                    let publish = client.publish(subject.clone(), payload.clone());
                    let _ = tokio::time::timeout(period, publish).await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Reads one client's heartbeat subscription into the router's state until dropped.
struct HeartbeatReader {
    task: tokio::task::JoinHandle<()>,
    /// Dropped with the reader: ends the probe task.
    _probe_stop: tokio::sync::watch::Sender<bool>,
    state: Arc<RouterState>,
    link_gen: u64,
}

impl HeartbeatReader {
    /// Reads `sub` for the link generation `link_gen`, and publishes this router's probe
    /// every `probe` on `client` (`None`: liveness is off, no probe).
    fn start(
        state: Arc<RouterState>,
        link_gen: u64,
        client: async_nats::Client,
        mut sub: async_nats::Subscriber,
        probe_subject: String,
        probe: Option<Duration>,
    ) -> HeartbeatReader {
        // The link state comes from the client's events alone (in order, under this
        // generation): its state field is updated after the event is sent, so reading it
        // here could undo a newer event.
        let (probe_stop, stopped) = tokio::sync::watch::channel(false);
        if let Some(period) = probe {
            // The probe is a heartbeat of the router's own, on its probe subject.
            tokio::spawn(heartbeat_task(
                client,
                probe_subject,
                bytes::Bytes::new(),
                period,
                stopped,
            ));
        }
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                read_beat(&st, &msg);
            }
        });
        HeartbeatReader {
            task,
            _probe_stop: probe_stop,
            state,
            link_gen,
        }
    }
}

/// One message of the heartbeat subscription: a router's probe or a worker's beat. The
/// subject names the worker; a beat that names another is refused, so per-subject
/// permissions decide who may vouch for whom.
fn read_beat(state: &RouterState, msg: &async_nats::Message) {
    let token = msg.subject.as_str().rsplit('.').next().unwrap_or("");
    if token == PROBE_TOKEN {
        state.nats_probe();
        return;
    }
    let from: Option<WorkerId> = token.parse().ok();
    match serde_json::from_slice::<Heartbeat>(&msg.payload) {
        Ok(h) if from == Some(h.worker) => state.nats_heartbeat(h.worker, h.epoch, h.period_ms),
        _ => {
            state
                .metrics
                .nats_bad_messages
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for HeartbeatReader {
    fn drop(&mut self) {
        self.task.abort();
        self.state.nats_link(self.link_gen, false);
    }
}

/// Sleeps for the backoff (doubling it up to 1 s) unless stopped; false = stop.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, backoff_ms: &mut u64) -> bool {
    let ms = *backoff_ms;
    *backoff_ms = (*backoff_ms * 2).min(1_000);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// Publishes up to `window` messages from the front of `pending`, then waits for their
/// acknowledgements in order; acknowledged ones leave `pending`. On the first failure the
/// rest stay queued (they are retried, and duplicates are dropped by the server).
async fn publish_window(
    js: &jetstream::Context,
    subject: &str,
    pending: &mut VecDeque<Outgoing>,
    window: usize,
    stats: &NatsPublisherStats,
) -> Result<(), String> {
    let n = pending.len().min(window);
    let mut acks = Vec::with_capacity(n);
    for m in pending.iter().take(n) {
        match js
            .publish_with_headers(subject.to_owned(), m.headers.clone(), m.payload.clone())
            .await
        {
            Ok(ack) => acks.push(ack),
            Err(e) => {
                acks.clear();
                return Err(format!("{:?}: {e}", e.kind()));
            }
        }
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {
                pending.pop_front();
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(format!("{:?}: {e}", e.kind())),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Router side

/// `kvplane router` settings for reading the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterNatsConfig {
    #[serde(flatten)]
    pub stream: NatsStreamConfig,
    /// How often this replica writes its index to the object store (0 = never; such a
    /// replica still rebuilds from other replicas' snapshots).
    pub snapshot_interval_ms: u64,
    /// A kvplane publisher not heard from for this long is left out of routing until its
    /// heartbeat comes back (0: never; Dynamo publishers send none and are never left out).
    pub heartbeat_timeout_ms: u64,
}

impl Default for RouterNatsConfig {
    fn default() -> Self {
        RouterNatsConfig {
            stream: NatsStreamConfig::default(),
            snapshot_interval_ms: 10_000,
            heartbeat_timeout_ms: 5_000,
        }
    }
}

/// Per-message facts from the headers.
#[derive(Clone, Debug, Default)]
pub struct MessageMeta {
    pub namespace: Option<String>,
    pub epoch: u64,
    pub snapshot: bool,
    pub node: Option<String>,
    /// The publisher's heartbeat period (0: it sends none).
    pub heartbeat_ms: u64,
}

impl MessageMeta {
    fn from_headers(h: Option<&HeaderMap>) -> Self {
        let get = |k: &str| h.and_then(|h| h.get(k)).map(|v| v.as_str().to_owned());
        MessageMeta {
            namespace: get(dynamo::HEADER_NAMESPACE),
            epoch: get(dynamo::HEADER_EPOCH)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            snapshot: get(dynamo::HEADER_SNAPSHOT).is_some(),
            node: get(dynamo::HEADER_NODE),
            heartbeat_ms: get(dynamo::HEADER_HEARTBEAT_MS)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// What a router replica stores in the object store.
#[derive(Debug, Serialize, Deserialize)]
pub struct RouterSnapshot {
    pub stream: String,
    /// Stream sequence of the last message applied.
    pub stream_seq: u64,
    pub workers: Vec<SnapshotWorker>,
    pub index: Vec<(String, Vec<DumpNode>)>,
}

/// One worker's stream position in a [`RouterSnapshot`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotWorker {
    pub worker: WorkerId,
    pub node: String,
    pub epoch: u64,
    pub last_event_id: u64,
    pub awaiting_snapshot: bool,
    /// The publisher's heartbeat period (absent in older snapshots: none).
    #[serde(default)]
    pub heartbeat_ms: u64,
}

const SNAPSHOT_OBJECT: &str = "radix-state";

async fn load_snapshot(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
) -> Result<Option<RouterSnapshot>, NatsError> {
    use tokio::io::AsyncReadExt;
    let Ok(store) = js.get_object_store(cfg.snapshot_bucket()).await else {
        return Ok(None);
    };
    let Ok(mut obj) = store.get(SNAPSHOT_OBJECT).await else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    obj.read_to_end(&mut bytes)
        .await
        .map_err(|e| NatsError::Snapshot(format!("read: {e}")))?;
    let snap: RouterSnapshot =
        rmp_serde::from_slice(&bytes).map_err(|e| NatsError::Snapshot(format!("decode: {e}")))?;
    if snap.stream != cfg.stream() {
        return Err(NatsError::Snapshot(format!(
            "snapshot is of stream {}, not {}",
            snap.stream,
            cfg.stream()
        )));
    }
    Ok(Some(snap))
}

async fn write_snapshot(
    js: &jetstream::Context,
    cfg: &NatsStreamConfig,
    snap: &RouterSnapshot,
) -> Result<usize, NatsError> {
    let bytes =
        rmp_serde::to_vec_named(snap).map_err(|e| NatsError::Snapshot(format!("encode: {e}")))?;
    let store = match js.get_object_store(cfg.snapshot_bucket()).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(jetstream::object_store::Config {
                bucket: cfg.snapshot_bucket(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::Snapshot(format!("create bucket: {e}")))?,
    };
    store
        .put(SNAPSHOT_OBJECT, &mut bytes.as_slice())
        .await
        .map_err(|e| NatsError::Snapshot(format!("put: {e}")))?;
    Ok(bytes.len())
}

/// Reads the stream into `state` until the process ends: restores the latest router
/// snapshot first, then applies every message in stream order, reconnecting and resuming
/// after the last applied sequence whenever NATS goes away.
pub async fn run_consumer(state: Arc<RouterState>, cfg: RouterNatsConfig) {
    let m = &state.metrics;
    let mut next_seq: u64 = 0; // 0 = not started yet
    let mut backoff_ms = 50u64;
    let mut connect_failures = 0u64;
    let (_never, mut stop) = tokio::sync::watch::channel(false);
    loop {
        // A consumer does not survive a server restart; its client would notice only after
        // missed heartbeats (seconds), so a reconnect restarts reading at once instead.
        let (reconnect_tx, mut reconnected) = tokio::sync::watch::channel(0u64);
        // Events of a client left behind (async-nats keeps reconnecting a dropped one) must
        // not move the clock: each client reports under a generation of its own.
        let link_gen = state.nats_new_link();
        let link_state = state.clone();
        let link: LinkHook = Arc::new(move |up| link_state.nats_link(link_gen, up));
        let client = match connect_watching(
            &cfg.stream,
            "kvplane-router",
            false,
            Some(reconnect_tx),
            Some(link),
        )
        .await
        {
            Ok(c) => c,
            Err(err) => {
                connect_failures += 1;
                if connect_failures.is_power_of_two() {
                    tracing::warn!(%err, failures = connect_failures, "router: NATS connect failed");
                }
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        connect_failures = 0;
        // Heartbeats on a task of their own: a slow snapshot write never delays them. The
        // guard stops it (and this router's liveness clock) when this client is left.
        let probe = (cfg.heartbeat_timeout_ms > 0)
            .then(|| Duration::from_millis((cfg.heartbeat_timeout_ms / 4).clamp(50, 1_000)));
        let _heartbeats = match client.subscribe(cfg.stream.heartbeat_wildcard()).await {
            Ok(sub) => HeartbeatReader::start(
                state.clone(),
                link_gen,
                client.clone(),
                sub,
                cfg.stream.heartbeat_probe_subject(),
                probe,
            ),
            Err(err) => {
                tracing::warn!(%err, "router: heartbeat subscription failed");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        let js = jetstream::new(client);
        let stream = match ensure_stream(&js, &cfg.stream).await {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "router: stream not ready");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        if next_seq == 0 {
            next_seq = 1;
            match load_snapshot(&js, &cfg.stream).await {
                Ok(Some(snap)) => {
                    state.restore_nats_snapshot(&snap);
                    next_seq = snap.stream_seq + 1;
                    m.nats_snapshots_restored.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(seq = snap.stream_seq, "router: restored snapshot");
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(%err, "router: snapshot unusable; replaying the stream"),
            }
            state.nats_seq.store(next_seq - 1, Ordering::Relaxed);
        }
        let consumer = match stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next_seq,
                },
                ..Default::default()
            })
            .await
        {
            Ok(c) => c,
            Err(err) => {
                tracing::debug!(%err, "router: consumer not created");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "router: consumer stream failed");
                pause(&mut stop, &mut backoff_ms).await;
                continue;
            }
        };
        backoff_ms = 50;
        let period = Duration::from_millis(cfg.snapshot_interval_ms.max(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut snapshot_seq = 0u64;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let msg = match msg {
                        Some(Ok(msg)) => msg,
                        Some(Err(err)) => {
                            tracing::debug!(%err, "router: stream read failed; resuming");
                            break;
                        }
                        None => break,
                    };
                    let Ok(info) = msg.info() else {
                        m.nats_bad_messages.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let seq = info.stream_sequence;
                    if seq < next_seq {
                        continue; // redelivered after a resume
                    }
                    if seq > next_seq {
                        // Messages aged out or were purged before this replica read them.
                        m.nats_history_gaps.fetch_add(1, Ordering::Relaxed);
                        state.mark_all_nats_workers_stale();
                    }
                    next_seq = seq + 1;
                    m.nats_messages.fetch_add(1, Ordering::Relaxed);
                    match serde_json::from_slice::<RouterEvent>(&msg.payload) {
                        Ok(ev) => state.apply_nats(&MessageMeta::from_headers(msg.headers.as_ref()), &ev),
                        Err(err) => {
                            m.nats_bad_messages.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%err, seq, "router: undecodable KV event skipped");
                        }
                    }
                    state.nats_seq.store(seq, Ordering::Relaxed);
                }
                Ok(()) = reconnected.changed() => {
                    // 1 is this client's first connection; more is a reconnect.
                    if *reconnected.borrow_and_update() > 1 {
                        tracing::debug!("router: NATS connection came back; resuming the stream");
                        break;
                    }
                }
                _ = tick.tick(), if cfg.snapshot_interval_ms > 0 => {
                    let seq = next_seq - 1;
                    if seq > snapshot_seq {
                        let snap = state.nats_snapshot(cfg.stream.stream(), seq);
                        match write_snapshot(&js, &cfg.stream, &snap).await {
                            Ok(bytes) => {
                                snapshot_seq = seq;
                                m.nats_snapshots_written.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(seq, bytes, "router: snapshot written");
                            }
                            Err(err) => tracing::debug!(%err, "router: snapshot not written"),
                        }
                    }
                }
            }
        }
        pause(&mut stop, &mut backoff_ms).await;
    }
}

/// Applies a Dynamo event to an index of one kvplane namespace (`None`: Dynamo's own
/// publishers, which have no namespace; their events go to `default_namespace`).
pub(crate) fn apply_to_index(index: &crate::index::Index, namespace: &str, ev: &RouterEvent) {
    let worker = ev.worker_id;
    let tier = ev.storage_tier.to_tier();
    match &ev.event.data {
        KvCacheEventData::Stored(s) => {
            let hashes: Vec<u64> = s.blocks.iter().map(|b| b.block_hash).collect();
            index.store(namespace, worker, tier, s.parent_hash, &hashes);
        }
        KvCacheEventData::Removed(r) => {
            index.remove(namespace, worker, Some(tier), &r.block_hashes);
        }
        KvCacheEventData::Cleared => index.remove_worker(worker, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A reader over in-memory files, recording what each was read as.
    fn files(entries: &[(&str, &str)]) -> HashMap<PathBuf, Vec<u8>> {
        entries
            .iter()
            .map(|(p, c)| (PathBuf::from(p), c.as_bytes().to_vec()))
            .collect()
    }

    fn load(auth: &NatsAuth, fs: &HashMap<PathBuf, Vec<u8>>) -> Result<NatsAuth, NatsError> {
        let mut kinds = Vec::new();
        let r = auth.load(&mut |p, kind| {
            kinds.push((p.to_path_buf(), kind));
            fs.get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        });
        // Tokens, passwords and keys are read as secrets, certificates as public files.
        for (p, kind) in kinds {
            let secret = p.to_string_lossy().contains("secret");
            assert_eq!(
                kind == AuthFile::Secret,
                secret,
                "{} read as {kind:?}",
                p.display()
            );
        }
        r
    }

    fn what(r: Result<NatsAuth, NatsError>) -> &'static str {
        match r {
            Err(NatsError::Auth { what, .. } | NatsError::AuthFile { what, .. }) => what,
            other => panic!("expected an auth error, got {other:?}"),
        }
    }

    #[test]
    fn token_is_one_line_and_never_shown() {
        let fs = files(&[
            ("/k/secret-token", "t0k3n-Value\n"),
            ("/k/secret-spaced", "two words\n"),
            ("/k/secret-lines", "a\nb\n"),
            ("/k/secret-empty", "\n"),
        ]);
        let auth = NatsAuth {
            token_file: Some("/k/secret-token".into()),
            ..NatsAuth::default()
        };
        let loaded = load(&auth, &fs).unwrap();
        let l = loaded.loaded.as_ref().unwrap();
        assert_eq!(
            l.token.as_deref(),
            Some("t0k3n-Value"),
            "one trailing newline dropped"
        );
        let shown = format!(
            "{loaded:?} {:?}",
            NatsStreamConfig {
                auth: loaded.clone(),
                ..NatsStreamConfig::default()
            }
        );
        assert!(!shown.contains("t0k3n"), "Debug shows no secret: {shown}");
        for bad in ["/k/secret-spaced", "/k/secret-lines", "/k/secret-empty"] {
            let a = NatsAuth {
                token_file: Some(bad.into()),
                ..NatsAuth::default()
            };
            assert_eq!(what(load(&a, &fs)), "token_file", "{bad}");
        }
        let missing = NatsAuth {
            token_file: Some("/k/secret-none".into()),
            ..NatsAuth::default()
        };
        match load(&missing, &fs) {
            Err(e @ NatsError::AuthFile { what, .. }) => {
                assert_eq!(what, "token_file");
                // The reader's error stays a source (kind and all), and the message names
                // the file.
                let source = std::error::Error::source(&e).expect("a source");
                let io = source
                    .downcast_ref::<std::io::Error>()
                    .expect("an io::Error");
                assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
                assert!(e.to_string().contains("/k/secret-none"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn settings_that_go_together() {
        let both = NatsAuth {
            token_file: Some("/k/secret-t".into()),
            user: Some("u".into()),
            password_file: Some("/k/secret-p".into()),
            ..NatsAuth::default()
        };
        // The error names the second of the two methods set, and the first in its reason.
        match both.validate() {
            Err(NatsError::Auth { what, reason }) => {
                assert_eq!(what, "user");
                assert!(reason.contains("token_file"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let user_only = NatsAuth {
            user: Some("u".into()),
            ..NatsAuth::default()
        };
        assert_eq!(
            what(user_only.validate().map(|()| NatsAuth::default())),
            "user"
        );
        let cert_only = NatsAuth {
            tls_cert_file: Some("/k/c.pem".into()),
            ..NatsAuth::default()
        };
        assert_eq!(
            what(cert_only.validate().map(|()| NatsAuth::default())),
            "tls_cert_file"
        );
        let fs = files(&[("/k/secret-p", "pw\n")]);
        let ok = NatsAuth {
            user: Some("svc".into()),
            password_file: Some("/k/secret-p".into()),
            ..NatsAuth::default()
        };
        let loaded = load(&ok, &fs).unwrap();
        assert_eq!(
            loaded.loaded.as_ref().unwrap().password.as_deref(),
            Some("pw")
        );
        assert!(NatsAuth::default().is_empty());
        assert!(!ok.is_empty());
    }

    #[test]
    fn a_bad_certificate_fails_at_load_naming_its_file() {
        let fs = files(&[
            ("/k/ca.pem", "not a certificate\n"),
            (
                "/k/broken.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
        ]);
        for f in ["/k/ca.pem", "/k/broken.pem"] {
            let a = NatsAuth {
                tls_ca_file: Some(f.into()),
                ..NatsAuth::default()
            };
            assert_eq!(what(load(&a, &fs)), "tls_ca_file", "{f}");
        }
    }

    #[test]
    fn nkey_seeds_and_credentials_files_are_checked_at_load() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER \
             JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY \
             SEED------\n"
        );
        let seed_line = format!("{seed}\n");
        let account_line = format!("{account_seed}\n");
        let fs = files(&[
            ("/k/secret-seed", &seed_line),
            ("/k/secret-account-seed", &account_line),
            ("/k/secret-creds", &creds),
            ("/k/secret-not-creds", "just text\n"),
        ]);
        let with = |seed: Option<&str>, creds: Option<&str>| NatsAuth {
            nkey_seed_file: seed.map(PathBuf::from),
            credentials_file: creds.map(PathBuf::from),
            ..NatsAuth::default()
        };
        let loaded = load(&with(Some("/k/secret-seed"), None), &fs).unwrap();
        assert_eq!(
            loaded.loaded.as_ref().unwrap().nkey_seed.as_deref(),
            Some(seed.as_str())
        );
        assert!(
            !format!("{loaded:?}").contains(&seed[4..]),
            "Debug shows no seed"
        );
        assert_eq!(
            what(load(&with(Some("/k/secret-account-seed"), None), &fs)),
            "nkey_seed_file",
            "an account seed is not a user's"
        );
        assert!(load(&with(None, Some("/k/secret-creds")), &fs).is_ok());
        assert_eq!(
            what(load(&with(None, Some("/k/secret-not-creds")), &fs)),
            "credentials_file"
        );
        let two = with(Some("/k/secret-seed"), Some("/k/secret-creds"));
        assert!(two.validate().is_err(), "one auth method at a time");
    }

    #[test]
    fn urls_with_credentials_are_refused() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("nats://a:4222, tls://b:4222").is_ok());
        for bad in [
            "nats://user:pass@host:4222",
            "nats://a:4222,nats://token@b:4222",
            "http://host:4222",
            "nats://",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url("nats://u:p@h").unwrap_err().contains("refused"));
    }

    /// The router's `[nats.auth]` table parses into the stream's settings (the router
    /// reads `[nats]` flattened).
    #[test]
    fn router_config_takes_an_auth_table() {
        let cfg: RouterNatsConfig = toml::from_str(
            "url = \"tls://n:4222\"\n[auth]\ntoken_file = \"/k/t\"\ntls_ca_file = \"/k/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(cfg.stream.url, "tls://n:4222");
        assert_eq!(
            cfg.stream.auth.token_file.as_deref(),
            Some(Path::new("/k/t"))
        );
        assert_eq!(
            cfg.stream.auth.tls_ca_file.as_deref(),
            Some(Path::new("/k/ca.pem"))
        );
        assert!(
            toml::from_str::<RouterNatsConfig>("[auth]\ntoken = \"inline\"\n").is_err(),
            "a secret written in the config itself is refused"
        );
    }
}

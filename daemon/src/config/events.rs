//! `[events]`: where the daemon streams its KV events. Here, below the control plane, so
//! the config depends on nothing that depends on it (`control::events` runs the stream).

use std::net::SocketAddr;

use kvplane_router::WorkerId;
use kvplane_router::nats::{AuthFile, NatsAuth, NatsError};
use kvplane_router::tls::{ClientTls, EventsTls, MAX_AUTH_FILE_BYTES, Side, TlsError};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[events]`: where this daemon streams its KV events.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Routers' event listeners (`host:port`); empty disables the stream.
    pub routers: Vec<String>,
    /// The worker id this daemon's tiers appear under in the routers (0 = derived from
    /// the host name and the engine socket path).
    pub worker_id: u64,
    /// Events queued between the data plane and the publisher.
    pub queue_events: usize,
    /// NATS server(s) to publish KV events to (`nats://host:4222`); absent = no NATS.
    pub nats_url: Option<String>,
    /// Dynamo namespace and component naming the JetStream stream
    /// (`namespace-{ns}-component-{component}-kv-events`).
    pub nats_namespace: String,
    pub nats_component: String,
    /// Changes buffered while NATS is away; beyond it the daemon re-publishes its full
    /// state once NATS is back.
    pub nats_queue_events: usize,
    /// Heartbeat period on NATS (0: none); routers leave this worker out of routing when
    /// they miss its heartbeats (their `heartbeat_timeout_ms`, default 5 s).
    pub nats_heartbeat_ms: u64,
    /// `[events.nats_auth]`: credentials and TLS for NATS, as files (`token_file`, or
    /// `user` and `password_file`; `tls_ca_file`, `tls_cert_file` and `tls_key_file`,
    /// `tls_required`). Read at start-up, before privileges are dropped, without following
    /// another user's links; a token, password or key file must be readable by its owner
    /// only.
    pub nats_auth: NatsAuth,
    /// `[events.tls]`: mutual TLS to the routers (`ca_file` signs the routers'
    /// certificates; `cert_file` and `key_file` are this daemon's; `server_name` the
    /// name the routers' certificates carry, else each router's IP). Read at start-up
    /// like `nats_auth`. Unset: plain TCP.
    pub tls: EventsTls,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            routers: Vec::new(),
            worker_id: 0,
            queue_events: 65_536,
            nats_url: None,
            nats_namespace: "kvplane".into(),
            nats_component: "kvplane".into(),
            nats_queue_events: 65_536,
            nats_heartbeat_ms: 1_000,
            nats_auth: NatsAuth::default(),
            tls: EventsTls::default(),
        }
    }
}

/// An auth or TLS file, through the daemon's no-link open: a secret must be the daemon's
/// or root's and unreadable by others, a certificate unwritable by others.
fn read_auth_file(path: &std::path::Path, kind: AuthFile) -> std::io::Result<Vec<u8>> {
    crate::secure_open::read_regular(path, kind.forbidden_mode(), MAX_AUTH_FILE_BYTES)
        .map_err(std::io::Error::other)
}

/// A `[events.tls]` setting's error, keyed like the others.
fn tls_config_error(e: &TlsError) -> ConfigError {
    match e {
        TlsError::Invalid { what, reason } => ConfigError::Invalid {
            key: format!("events.tls.{what}"),
            reason: reason.clone(),
        },
        TlsError::File { what, .. } => ConfigError::Invalid {
            key: format!("events.tls.{what}"),
            reason: e.to_string(),
        },
    }
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routers.iter().enumerate() {
            let Ok(addr) = r.parse::<SocketAddr>() else {
                return Err(ConfigError::Invalid {
                    key: format!("events.routers[{i}]"),
                    reason: format!("`{r}` is not an address like 127.0.0.1:7070"),
                });
            };
            if !seen.insert(addr) {
                return Err(ConfigError::Invalid {
                    key: format!("events.routers[{i}]"),
                    reason: format!("`{r}` is listed twice"),
                });
            }
        }
        if let Some(url) = &self.nats_url {
            kvplane_router::nats::check_url(url).map_err(|reason| ConfigError::Invalid {
                key: "events.nats_url".into(),
                reason,
            })?;
        }
        for (key, v) in [
            ("events.nats_namespace", &self.nats_namespace),
            ("events.nats_component", &self.nats_component),
        ] {
            if v.is_empty() || v.len() > 64 {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    reason: "must be 1-64 characters".into(),
                });
            }
        }
        if self.nats_queue_events == 0 || self.nats_queue_events > 1 << 24 {
            return Err(ConfigError::Invalid {
                key: "events.nats_queue_events".into(),
                reason: format!("must be in 1..=16777216, got {}", self.nats_queue_events),
            });
        }
        self.nats_auth.validate().map_err(|e| match e {
            NatsError::Auth { what, reason } => ConfigError::Invalid {
                key: format!("events.nats_auth.{what}"),
                reason,
            },
            other => ConfigError::Invalid {
                key: "events.nats_auth".into(),
                reason: other.to_string(),
            },
        })?;
        if !self.nats_auth.is_empty() && self.nats_url.is_none() {
            return Err(ConfigError::Invalid {
                key: "events.nats_auth".into(),
                reason: "set without events.nats_url".into(),
            });
        }
        self.tls
            .validate(Side::Daemon)
            .map_err(|e| tls_config_error(&e))?;
        if !self.tls.is_empty() && self.routers.is_empty() {
            return Err(ConfigError::Invalid {
                key: "events.tls".into(),
                reason: "set without events.routers".into(),
            });
        }
        if self.nats_heartbeat_ms != 0 && !(10..=60_000).contains(&self.nats_heartbeat_ms) {
            return Err(ConfigError::Invalid {
                key: "events.nats_heartbeat_ms".into(),
                reason: format!("must be 0 or 10..=60000, got {}", self.nats_heartbeat_ms),
            });
        }
        if self.queue_events == 0 || self.queue_events > 1 << 24 {
            return Err(ConfigError::Invalid {
                key: "events.queue_events".into(),
                reason: format!("must be in 1..=16777216, got {}", self.queue_events),
            });
        }
        Ok(())
    }

    /// `nats_auth` with its files read (as root, before privileges are dropped): secrets
    /// must be the daemon's or root's and unreadable by others, certificates unwritable by
    /// others.
    pub fn load_nats_auth(&mut self) -> Result<(), NatsError> {
        if self.nats_url.is_none() || self.nats_auth.is_empty() {
            return Ok(());
        }
        self.nats_auth = self.nats_auth.load(&mut read_auth_file)?;
        Ok(())
    }

    /// The routers' TLS connector from `tls`'s files, read like `nats_auth`'s (as root,
    /// before privileges are dropped); `None` without TLS.
    pub fn load_tls(&self) -> Result<Option<ClientTls>, TlsError> {
        if self.tls.is_empty() {
            return Ok(None);
        }
        self.tls.connector(&mut read_auth_file).map(Some)
    }

    /// Whether any event stream is configured.
    pub fn enabled(&self) -> bool {
        !self.routers.is_empty() || self.nats_url.is_some()
    }

    pub fn router_addrs(&self) -> Vec<SocketAddr> {
        self.routers.iter().filter_map(|r| r.parse().ok()).collect()
    }

    /// The configured worker id, or one derived from the host name and `socket`.
    pub fn resolve_worker_id(&self, socket: &std::path::Path) -> WorkerId {
        if self.worker_id != 0 {
            return self.worker_id;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let key = format!("{}:{}", host.trim(), socket.display());
        xxhash_rust::xxh3::xxh3_64(key.as_bytes()).max(1)
    }
}

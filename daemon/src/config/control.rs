//! `[control]`: the control-plane listeners' configuration. Here, below the control
//! plane, so the config depends on nothing that depends on it (`control::admin` serves it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[control]`: the control-plane (metrics and status) listeners.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Loopback address for Prometheus scrapes of `/metrics` (aggregates only, unless
    /// `tcp_tenant_data`) and `/healthz`; empty disables the TCP listener.
    pub metrics_addr: String,
    /// The control Unix socket (`/status`, `/metrics`, `/healthz`, shown per caller uid).
    /// Unset: next to the engine socket (`kvplane.sock` -> `kvplane.control.sock`);
    /// empty: no control socket.
    pub socket_path: Option<PathBuf>,
    /// Permission bits of the control socket file.
    pub socket_mode: u32,
    /// Group of the control socket file (with `socket_mode = 0o660`, the group whose
    /// members may connect; what each sees still depends on its uid).
    pub socket_gid: Option<u32>,
    /// uids shown everything on the control socket, besides root and the daemon's own uid.
    pub admin_uids: Vec<u32>,
    /// Serve `/status` and per-namespace `/metrics` series over TCP too. Any local user
    /// (and any local browser page that passes the Host check) can then read every
    /// tenant's sessions and activity: only for single-tenant nodes.
    pub tcp_tenant_data: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            metrics_addr: "127.0.0.1:9464".into(),
            socket_path: None,
            socket_mode: 0o660,
            socket_gid: None,
            admin_uids: Vec::new(),
            tcp_tenant_data: false,
        }
    }
}

impl ControlConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.socket_mode & !0o777 != 0 {
            return Err(ConfigError::Invalid {
                key: "control.socket_mode".into(),
                reason: format!(
                    "0o{:o} has bits beyond 0o777 (setuid, setgid, sticky)",
                    self.socket_mode
                ),
            });
        }
        if let Some(p) = &self.socket_path
            && !p.as_os_str().is_empty()
            && !p.is_absolute()
        {
            return Err(ConfigError::Invalid {
                key: "control.socket_path".into(),
                reason: format!("`{}` is not an absolute path", p.display()),
            });
        }
        if self.metrics_addr.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr =
            self.metrics_addr
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                    key: "control.metrics_addr".into(),
                    reason: format!("`{}` is not an IP:port address ({e})", self.metrics_addr),
                })?;
        // Metrics carry daemon-wide activity: never on a public interface.
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "control.metrics_addr".into(),
                reason: format!(
                    "{} is not a loopback address (use 127.0.0.1; put a proxy in front for remote scrapes)",
                    addr.ip()
                ),
            });
        }
        Ok(())
    }

    /// The control socket for a daemon whose engine socket is `engine_socket`, or `None`
    /// when disabled.
    pub fn resolved_socket_path(&self, engine_socket: &Path) -> Option<PathBuf> {
        match &self.socket_path {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => Some(default_socket_path(engine_socket)),
        }
    }
}

/// `kvplane.sock` -> `kvplane.control.sock`, in the same directory.
pub fn default_socket_path(engine_socket: &Path) -> PathBuf {
    engine_socket.with_extension("control.sock")
}

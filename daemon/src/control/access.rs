//! Who may see what on the control server. `/status` and the per-namespace `/metrics`
//! series name tenants' namespaces, their engines' pids and uids and their activity, so
//! they are served by caller identity: on the control Unix socket the kernel tells us the
//! peer's uid (SO_PEERCRED); over loopback TCP there is no identity, so only aggregates
//! (unless the operator opts in). The Host header is checked on both, so a page in a local
//! browser cannot reach the server through DNS rebinding.

use std::collections::{BTreeMap, BTreeSet};

use crate::session::SessionSummary;

/// How a request arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Loopback TCP: any local user (or a local browser); no identity.
    Tcp,
    /// The control socket; `uid` from SO_PEERCRED.
    Unix { uid: u32 },
}

/// What a caller is shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// Everything: the operator.
    All,
    /// A tenant: its own namespaces and its own uid's sessions, plus daemon-wide aggregates.
    Tenant {
        uid: u32,
        namespaces: BTreeSet<String>,
    },
    /// Daemon-wide aggregates only: no namespace names, sessions, pids or uids.
    Aggregate,
}

impl View {
    /// May this view show series and entries of namespace `name`? (Unnamed namespaces,
    /// shown as their hex id, only to the operator.)
    pub fn sees_namespace(&self, name: &str) -> bool {
        match self {
            View::All => true,
            View::Tenant { namespaces, .. } => namespaces.contains(name),
            View::Aggregate => false,
        }
    }

    pub fn sees_session(&self, s: &SessionSummary) -> bool {
        match self {
            View::All => true,
            View::Tenant { uid, .. } => s.uid == *uid,
            View::Aggregate => false,
        }
    }
}

/// Who the control server trusts, fixed at start-up.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    /// See everything: root, the uid that started the daemon, `serve.run_as_uid` and
    /// `control.admin_uids`.
    admins: BTreeSet<u32>,
    /// uid -> the configured namespaces it may use (`[[namespaces]] uids`).
    tenants: BTreeMap<u32, BTreeSet<String>>,
    /// `control.tcp_tenant_data`: serve everything over loopback TCP too.
    tcp_sees_all: bool,
}

impl AccessPolicy {
    /// `start_uid`: the daemon's effective uid before any privilege drop.
    pub fn new(config: &crate::config::Config, start_uid: u32) -> AccessPolicy {
        let mut admins: BTreeSet<u32> = config.control.admin_uids.iter().copied().collect();
        admins.insert(0);
        admins.insert(start_uid);
        admins.extend(config.serve.run_as_uid);
        let mut tenants: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for ns in &config.namespaces {
            for &uid in &ns.uids {
                tenants.entry(uid).or_default().insert(ns.name.clone());
            }
        }
        AccessPolicy {
            admins,
            tenants,
            tcp_sees_all: config.control.tcp_tenant_data,
        }
    }

    /// The caller's view, or why it gets none (403).
    pub fn view(&self, caller: Caller) -> Result<View, String> {
        match caller {
            Caller::Tcp if self.tcp_sees_all => Ok(View::All),
            Caller::Tcp => Ok(View::Aggregate),
            Caller::Unix { uid } if self.admins.contains(&uid) => Ok(View::All),
            Caller::Unix { uid } => match self.tenants.get(&uid) {
                Some(namespaces) => Ok(View::Tenant {
                    uid,
                    namespaces: namespaces.clone(),
                }),
                None => Err(format!(
                    "uid {uid} is neither an operator (control.admin_uids) nor a tenant \
                     (a uid of some [[namespaces]] entry)"
                )),
            },
        }
    }
}

/// Is `host` (a Host header value) a loopback name: `localhost`, `127.0.0.1` or `[::1]`,
/// with an optional port? Anything else is what a DNS-rebinding page sends (its own name).
pub fn host_is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // "[::1]" or "[::1]:port"
        Some(rest) => match rest.split_once(']') {
            Some((ip, port))
                if port.is_empty() || port.strip_prefix(':').is_some_and(valid_port) =>
            {
                return ip == "::1";
            }
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1"
}

/// Digits forming a u16.
fn valid_port(port: &str) -> bool {
    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in [
            "localhost",
            "LocalHost:9464",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:9464",
        ] {
            assert!(host_is_loopback(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "127.0.0.2",
            "[::2]:80",
            "[::1]x",
            "[::1]9464",
            "localhost:",
            "localhost:99999",
            "localhost:80:80",
            "",
            "0.0.0.0",
        ] {
            assert!(!host_is_loopback(bad), "{bad}");
        }
    }

    #[test]
    fn views_follow_peer_uid_and_config() {
        let mut config = crate::config::Config::default();
        config.control.admin_uids = vec![500];
        config.namespaces = vec![
            crate::config::NamespaceConfig {
                name: "a".into(),
                uids: vec![1000, 1001],
                max_hbm_bytes: None,
                max_host_bytes: None,
                max_nvme_bytes: None,
                max_mapped_bytes: None,
                max_sessions: None,
                max_queue_pairs: None,
            },
            crate::config::NamespaceConfig {
                name: "b".into(),
                uids: vec![1001],
                max_hbm_bytes: None,
                max_host_bytes: None,
                max_nvme_bytes: None,
                max_mapped_bytes: None,
                max_sessions: None,
                max_queue_pairs: None,
            },
        ];
        let p = AccessPolicy::new(&config, 990);
        for admin in [0, 990, 500] {
            assert_eq!(p.view(Caller::Unix { uid: admin }), Ok(View::All));
        }
        let v = p.view(Caller::Unix { uid: 1000 }).unwrap();
        assert!(v.sees_namespace("a") && !v.sees_namespace("b"));
        let s = |uid| SessionSummary {
            session_id: 1,
            pid: 1,
            uid,
            namespaces: vec!["a".into()],
            queue_pairs: 1,
        };
        assert!(v.sees_session(&s(1000)) && !v.sees_session(&s(1001)));
        let v = p.view(Caller::Unix { uid: 1001 }).unwrap();
        assert!(v.sees_namespace("a") && v.sees_namespace("b"));
        assert!(p.view(Caller::Unix { uid: 4242 }).is_err());
        assert_eq!(p.view(Caller::Tcp), Ok(View::Aggregate));
        assert!(!View::Aggregate.sees_namespace("a"));
        config.control.tcp_tenant_data = true;
        assert_eq!(
            AccessPolicy::new(&config, 990).view(Caller::Tcp),
            Ok(View::All)
        );
    }
}

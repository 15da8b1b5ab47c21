//! Mutual TLS on the router's event port (rustls with ring, PEM files).
//!
//! Without it, any peer that reaches the port can announce worker ids, take a
//! disconnected worker's id in its grace period and fill the index with blocks no worker
//! holds, steering requests. With it, the router presents `cert_file` and accepts only
//! peers whose client certificate chains to its `ca_file`; a daemon presents its own and
//! accepts only a router whose certificate chains to the daemon's `ca_file` and names
//! `server_name` (default: the router address's IP). Files are read at start-up (the
//! router's again on SIGHUP, `RouterService::reload_tls`).
//! Both ends speak TLS 1.3 only, without session resumption (a resumed session would skip
//! the check of a certificate that has since expired or been revoked; these connections
//! live for hours, so a full handshake each time costs nothing).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::{self, RootCertStore, pki_types};
use zeroize::Zeroize;

use crate::nats::AuthFile;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// `[events_tls]` of the router, `[events.tls]` of a daemon: PEM files. All three files,
/// or none (plain TCP).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsTls {
    /// CA certificates that sign the other side's certificate: for the router, the
    /// daemons' (and feed forwarders') client certificates; for a daemon, the router's.
    pub ca_file: Option<PathBuf>,
    /// This side's certificate chain, and its private key (readable by its owner only).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// A daemon's only: the name the router's certificate must carry (a DNS name or an
    /// IP address). Unset: the IP address of each router in `routers`.
    pub server_name: Option<String>,
    /// The router's only: a worker id a connection announces must be named in its client
    /// certificate, as the DNS name [`worker_dns_name`] (`worker-<id in hex>.workers.kvplane`;
    /// `*.workers.kvplane` names them all). Without it, any certificate of the CA may announce
    /// any new worker id.
    pub bind_worker_ids: bool,
    /// The router's only: PEM certificate revocation lists of `ca_file`'s CAs; a client
    /// certificate its issuer's list names is refused (intermediates are not checked; a
    /// certificate whose issuer has no list here passes).
    pub crl_file: Option<PathBuf>,
}

/// Which end of the event connection a configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Router,
    Daemon,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("events TLS {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("events TLS {what}: {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(what: &'static str, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        what,
        reason: reason.to_string(),
    }
}

/// The router's side, loaded: the acceptor, and its client verifier to check the
/// certificates of connections already up against files read again.
#[derive(Clone)]
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl ServerTls {
    /// Whether a client's certificate chain (its own first) passes this configuration
    /// now: its CA, its issuer's revocation list, its validity period.
    pub fn admits(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(end_entity, intermediates, pki_types::UnixTime::now())
            .is_ok()
    }
}

/// A daemon's side, loaded: what each connection to a router needs.
#[derive(Clone)]
pub struct ClientTls {
    pub connector: tokio_rustls::TlsConnector,
    /// `None`: each router's IP address.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The name the certificate of the router at `addr` must carry.
    pub fn server_name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

impl EventsTls {
    /// Whether TLS is off (no file set).
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none()
            && self.cert_file.is_none()
            && self.key_file.is_none()
            && self.server_name.is_none()
            && self.crl_file.is_none()
            && !self.bind_worker_ids
    }

    /// All three files together; `server_name` a valid name, and a daemon's only.
    pub fn validate(&self, side: Side) -> Result<(), TlsError> {
        if self.is_empty() {
            return Ok(());
        }
        for (what, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if path.is_none() {
                return Err(invalid(
                    what,
                    "unset: ca_file, cert_file and key_file go together (TLS on the event \
                     port is mutual)",
                ));
            }
        }
        if self.server_name.is_some() && side == Side::Router {
            return Err(invalid(
                "server_name",
                "a daemon's setting (the name it expects in the router's certificate)",
            ));
        }
        if self.bind_worker_ids && side == Side::Daemon {
            return Err(invalid(
                "bind_worker_ids",
                "a router's setting (it checks the names in daemons' certificates)",
            ));
        }
        if self.crl_file.is_some() && side == Side::Daemon {
            return Err(invalid(
                "crl_file",
                "a router's setting (it revokes daemons' client certificates)",
            ));
        }
        self.server_name()?;
        Ok(())
    }

    /// `server_name`, parsed.
    fn server_name(&self) -> Result<Option<ServerName<'static>>, TlsError> {
        let Some(name) = &self.server_name else {
            return Ok(None);
        };
        ServerName::try_from(name.clone())
            .map(Some)
            .map_err(|e| invalid("server_name", format!("`{name}`: {e}")))
    }

    /// The three files' contents, read with `read` (a daemon's reader refuses links and a
    /// key others may read; [`read_file`] for the router).
    fn read(
        &self,
        read: &mut dyn FnMut(&Path, AuthFile) -> std::io::Result<Vec<u8>>,
    ) -> Result<Pem, TlsError> {
        let mut file = |what: &'static str, path: &Option<PathBuf>, kind| {
            let path = path.as_deref().ok_or_else(|| invalid(what, "unset"))?;
            read(path, kind).map_err(|source| TlsError::File {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let crl = self
            .crl_file
            .is_some()
            .then(|| file("crl_file", &self.crl_file, AuthFile::Public))
            .transpose()?;
        Ok(Pem {
            ca: file("ca_file", &self.ca_file, AuthFile::Public)?,
            cert: file("cert_file", &self.cert_file, AuthFile::Public)?,
            key: file("key_file", &self.key_file, AuthFile::Secret)?,
            crl,
        })
    }

    /// The router's acceptor: client certificates required, chained to `ca_file`.
    pub fn acceptor(
        &self,
        read: &mut dyn FnMut(&Path, AuthFile) -> std::io::Result<Vec<u8>>,
    ) -> Result<ServerTls, TlsError> {
        self.validate(Side::Router)?;
        let pem = self.read(read)?;
        let provider = provider();
        let roots = Arc::new(pem.roots()?);
        let mut verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        if let Some(crl) = &pem.crl {
            let crls = pki_types::CertificateRevocationListDer::pem_slice_iter(crl)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("crl_file", e))?;
            if crls.is_empty() {
                return Err(invalid("crl_file", "no PEM revocation list in it"));
            }
            // The client's own certificate is checked against the lists of its issuer;
            // one whose issuer has no list here passes (as with no `crl_file`). A list
            // past its next update still applies (a new one is read on SIGHUP).
            verifier = verifier
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let verifier = verifier.build().map_err(|e| invalid("ca_file", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("protocol versions", e))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(pem.chain()?, pem.key()?)
            .map_err(|e| invalid("cert_file", e))?;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            verifier,
        })
    }

    /// A daemon's connector: the router's certificate chained to `ca_file`, this side's
    /// certificate presented.
    pub fn connector(
        &self,
        read: &mut dyn FnMut(&Path, AuthFile) -> std::io::Result<Vec<u8>>,
    ) -> Result<ClientTls, TlsError> {
        self.validate(Side::Daemon)?;
        let pem = self.read(read)?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("protocol versions", e))?
            .with_root_certificates(pem.roots()?)
            .with_client_auth_cert(pem.chain()?, pem.key()?)
            .map_err(|e| invalid("cert_file", e))?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: self.server_name()?,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Files read for one configuration; the key is wiped when dropped.
struct Pem {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Option<Vec<u8>>,
}

impl Drop for Pem {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl Pem {
    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in pem_certs(&self.ca).map_err(|e| invalid("ca_file", e))? {
            roots.add(c).map_err(|e| invalid("ca_file", e))?;
        }
        Ok(roots)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        pem_certs(&self.cert).map_err(|e| invalid("cert_file", e))
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| invalid("key_file", e))
    }
}

/// The DNS name a client certificate carries to announce `worker` under
/// `bind_worker_ids`.
pub fn worker_dns_name(worker: crate::WorkerId) -> String {
    format!("worker-{worker:x}.workers.kvplane")
}

/// Whether the client certificate `der` (verified by the handshake) names `worker`.
pub fn certificate_names_worker(der: &CertificateDer<'_>, worker: crate::WorkerId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(worker_dns_name(worker)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Every certificate of a PEM file; at least one.
pub(crate) fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// Auth and TLS files larger than this are refused (a certificate chain is a few KiB).
pub const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

/// The router's reader, with the daemon's rules short of its link checks: a regular file
/// (a FIFO fails at once, never blocks) of at most [`MAX_AUTH_FILE_BYTES`], owned by this
/// process's user or root, without [`AuthFile::forbidden_mode`]'s bits (a key others can
/// read, a CA file others can rewrite). Links are followed (secret volumes are links).
pub fn read_file(path: &Path, kind: AuthFile) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let refuse = |why: String| Err(std::io::Error::other(why));
    if !meta.is_file() {
        return refuse("not a regular file".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return refuse(format!(
            "owned by uid {}, neither this process's ({euid}) nor root",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & kind.forbidden_mode() != 0 {
        return refuse(match kind {
            AuthFile::Secret => format!("mode {mode:o}: readable by group or others (chmod 600)"),
            AuthFile::Public => format!("mode {mode:o}: writable by group or others"),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_AUTH_FILE_BYTES) as usize);
    file.take(MAX_AUTH_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_AUTH_FILE_BYTES {
        return refuse(format!("larger than {MAX_AUTH_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> EventsTls {
        EventsTls {
            ca_file: Some("/k/ca.pem".into()),
            cert_file: Some("/k/c.pem".into()),
            key_file: Some("/k/c.key".into()),
            server_name: None,
            crl_file: None,
            bind_worker_ids: false,
        }
    }

    fn what(r: Result<(), TlsError>) -> &'static str {
        match r {
            Err(TlsError::Invalid { what, .. }) => what,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn the_three_files_go_together() {
        assert!(EventsTls::default().validate(Side::Router).is_ok());
        assert!(all().validate(Side::Router).is_ok());
        let mut t = all();
        t.key_file = None;
        assert_eq!(what(t.validate(Side::Daemon)), "key_file");
        let t = EventsTls {
            server_name: Some("router.example".into()),
            ..EventsTls::default()
        };
        assert_eq!(what(t.validate(Side::Daemon)), "ca_file");
    }

    #[test]
    fn server_name_is_a_daemons_and_must_be_a_name() {
        let mut t = all();
        t.server_name = Some("router.example".into());
        assert!(t.validate(Side::Daemon).is_ok());
        assert_eq!(what(t.validate(Side::Router)), "server_name");
        t.server_name = Some("not a name!".into());
        assert_eq!(what(t.validate(Side::Daemon)), "server_name");
        t.server_name = Some("10.0.0.7".into());
        assert!(t.validate(Side::Daemon).is_ok());
        let mut t = all();
        t.crl_file = Some("/k/crl.pem".into());
        assert!(t.validate(Side::Router).is_ok());
        assert_eq!(what(t.validate(Side::Daemon)), "crl_file");
        let t = EventsTls {
            bind_worker_ids: true,
            ..EventsTls::default()
        };
        assert_eq!(what(t.validate(Side::Router)), "ca_file", "needs the files");
        let t = EventsTls {
            bind_worker_ids: true,
            ..all()
        };
        assert!(t.validate(Side::Router).is_ok());
        assert_eq!(what(t.validate(Side::Daemon)), "bind_worker_ids");
    }

    #[test]
    fn a_missing_file_is_named() {
        let Err(err) = all().acceptor(&mut |_, _| Err(std::io::ErrorKind::NotFound.into())) else {
            panic!("an acceptor without its files");
        };
        assert!(
            matches!(
                err,
                TlsError::File {
                    what: "ca_file",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        let err = all()
            .connector(&mut |_, _| Ok(b"not PEM".to_vec()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Invalid {
                    what: "ca_file",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_routers_reader_refuses_a_key_others_can_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, b"secret").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_file(&key, AuthFile::Secret).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // A certificate may be read by anyone.
        assert_eq!(read_file(&key, AuthFile::Public).unwrap(), b"secret");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_file(&key, AuthFile::Secret).unwrap(), b"secret");
        assert!(
            read_file(dir.path(), AuthFile::Public).is_err(),
            "a directory"
        );
        // A CA file others could rewrite.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o646)).unwrap();
        let err = read_file(&key, AuthFile::Public).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        // A FIFO fails at once instead of waiting for a writer.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_file(&fifo, AuthFile::Public).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}

//! Mutual TLS on the router's event port, over real TCP on 127.0.0.1: a daemon with a
//! certificate of the router's CA streams; a plain peer, a peer without a certificate,
//! one of another CA, and a daemon facing a router it does not trust never get a worker
//! into the index; a peer that never handshakes is closed by the Hello's deadline.

use kvplane_router::Tier;
use kvplane_router::events::{
    Frame, NamespaceBlocks, PROTOCOL_VERSION, Publisher, PublisherConfig, SnapshotBlock, Source,
    WorkerBlocks, WorkerSeq, WorkerSnapshot, write_frame,
};
use kvplane_router::service::{RouterService, RouterState, ServiceConfig, ServiceError};
use kvplane_router::tls::{EventsTls, TlsError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A CA and what it signs, as PEM files in a directory of the test.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("kvplane test CA {name}"));
        let cert = p.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// Writes `{name}.pem` and `{name}.key` (0600) for a leaf with these names, and
    /// `{name}-ca.pem` holding `trusts`' certificate; returns the configuration naming them.
    fn issue(&self, dir: &Path, name: &str, sans: &[&str], trusts: &Ca) -> EventsTls {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        self.issue_numbered(dir, name, sans, trusts, serial)
    }

    /// [`Ca::issue`] with this serial number (for a revocation list to name).
    fn issue_numbered(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        trusts: &Ca,
        serial: u64,
    ) -> EventsTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.serial_number = Some(serial.into());
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&ca_file, trusts.cert.pem()).unwrap();
        EventsTls {
            ca_file: Some(ca_file),
            cert_file: Some(cert_file),
            key_file: Some(key_file),
            server_name: None,
            crl_file: None,
            bind_worker_ids: false,
        }
    }
}

impl Ca {
    /// `crl.pem` in `dir`: this CA's revocation list naming `serials`.
    fn revoke(&self, dir: &Path, serials: &[u64]) -> std::path::PathBuf {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2126, 1, 1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| rcgen::RevokedCertParams {
                    serial_number: s.into(),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap();
        let path = dir.join("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}

fn config(tls: EventsTls, hello_timeout_ms: u64) -> ServiceConfig {
    ServiceConfig {
        events_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        hello_timeout_ms,
        events_tls: tls,
        ..ServiceConfig::default()
    }
}

fn publisher(router: std::net::SocketAddr, tls: &EventsTls, worker: u64) -> Publisher {
    publisher_holding(router, tls, worker, 7)
}

/// A daemon whose `worker` holds the one block `hash` in namespace "ns".
fn publisher_holding(
    router: std::net::SocketAddr,
    tls: &EventsTls,
    worker: u64,
    hash: u64,
) -> Publisher {
    let tls = tls
        .connector(&mut kvplane_router::tls::read_file)
        .expect("the daemon's TLS files load");
    Publisher::start(
        PublisherConfig {
            routers: vec![router],
            node: format!("node-{worker}"),
            backoff_initial_ms: 10,
            backoff_max_ms: 50,
            tls: Some(tls),
            ..PublisherConfig::default()
        },
        Arc::new(move || {
            vec![WorkerBlocks {
                worker,
                namespaces: vec![NamespaceBlocks {
                    namespace: "ns".into(),
                    blocks: vec![SnapshotBlock {
                        hash,
                        parent: None,
                        tiers: Tier::Hbm.bit(),
                    }],
                }],
            }]
        }),
        &tokio::runtime::Handle::current(),
    )
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn holds(state: &RouterState, worker: u64) -> bool {
    state
        .index
        .with_tree("ns", |t| t.holds(worker, 7, None))
        .unwrap_or(false)
}

fn refused(state: &RouterState) -> u64 {
    state.metrics.tls_refused.load(Ordering::Relaxed)
}

/// The frames a daemon would send, in plain TCP or on `stream`.
async fn hello_and_snapshot(stream: &mut (impl tokio::io::AsyncWrite + Unpin), worker: u64) {
    let frames = [
        Frame::Hello {
            node: "intruder".into(),
            protocol: PROTOCOL_VERSION,
            source: Source::Kvplane,
        },
        Frame::Snapshot {
            workers: vec![WorkerSnapshot {
                seq: 0,
                state: WorkerBlocks {
                    worker,
                    namespaces: vec![NamespaceBlocks {
                        namespace: "ns".into(),
                        blocks: vec![SnapshotBlock {
                            hash: 7,
                            parent: None,
                            tiers: Tier::Hbm.bit(),
                        }],
                    }],
                },
            }],
        },
    ];
    for f in &frames {
        // The router may already have closed: what counts is what it took in.
        if write_frame(stream, f).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_of_the_routers_ca_streams_and_no_one_else_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let other = Ca::new("b");
    let router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let daemon_tls = ca.issue(dir.path(), "daemon", &["daemon-1"], &ca);
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    let state = svc.state.clone();

    // A daemon with a certificate of the router's CA: its snapshot lands, and events after it.
    let good = publisher(svc.events_addr, &daemon_tls, 1);
    eventually("the TLS daemon's snapshot applied", || holds(&state, 1)).await;
    good.stored(1, "ns", &[(8, Some(7))], Tier::Hbm);
    eventually("an event over TLS applied", || {
        state
            .index
            .with_tree("ns", |t| t.holds(1, 8, None))
            .unwrap_or(false)
    })
    .await;
    assert_eq!(refused(&state), 0);

    // Plain TCP: the daemon's frames in the clear are not a TLS handshake.
    let mut plain = TcpStream::connect(svc.events_addr).await.unwrap();
    hello_and_snapshot(&mut plain, 2).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .expect("the router closes a plain peer at once");
    // Whatever comes back is a TLS alert, never a frame of the protocol.
    assert!(
        n.is_err() || n.as_ref().is_ok_and(|&n| n == 0 || buf[0] == 0x15),
        "{n:?} {buf:?}"
    );
    eventually("the plain peer counted", || refused(&state) >= 1).await;

    // TLS without a client certificate.
    let no_cert = {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots
            .add(ca.cert.der().clone())
            .expect("the CA's certificate");
        tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    };
    let tcp = TcpStream::connect(svc.events_addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // TLS 1.3 ends the client's side of the handshake before the server checks it: the
    // refusal shows on the first read.
    if let Ok(mut s) = tokio_rustls::TlsConnector::from(Arc::new(no_cert))
        .connect(name, tcp)
        .await
    {
        hello_and_snapshot(&mut s, 3).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    }
    eventually("the peer without a certificate counted", || {
        refused(&state) >= 2
    })
    .await;

    // A client certificate of another CA (trusting the router's, so only ours fails).
    let intruder_tls = other.issue(dir.path(), "intruder", &["daemon-1"], &ca);
    let intruder = publisher(svc.events_addr, &intruder_tls, 4);
    eventually("the other CA's peer refused again and again", || {
        refused(&state) >= 5
    })
    .await;
    // And the refused daemon knows why (under TLS 1.3 its handshake completes first; the
    // router's alert ends the connection).
    let link = intruder.link_stats(svc.events_addr).unwrap();
    eventually("the refused daemon counted the router's alerts", || {
        link.tls_failures.load(Ordering::Relaxed) >= 2
    })
    .await;

    // None of them is a worker, nor in the index; the real daemon still is.
    let workers: Vec<u64> = state.worker_list().iter().map(|w| w.worker).collect();
    assert_eq!(workers, vec![1], "only the TLS daemon's worker");
    for w in [2, 3, 4] {
        assert!(!holds(&state, w), "worker {w} got into the index");
    }
    assert!(holds(&state, 1));
    let text = state.render_metrics();
    assert!(
        text.lines()
            .any(|l| l.starts_with("kvplane_router_event_connections_tls_refused_total ")),
        "{text}"
    );
    intruder.shutdown();
    good.shutdown();
    svc.shutdown();
}

/// A daemon with `tls` never gets a connection to `svc` up: each handshake fails on its
/// side, and the router never sees its snapshot.
async fn daemon_refuses(svc: &RouterService, tls: &EventsTls, what: &str) {
    let p = publisher(svc.events_addr, tls, 1);
    let link = p.link_stats(svc.events_addr).unwrap();
    eventually(&format!("the daemon refused {what}"), || {
        link.tls_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(link.connects.load(Ordering::Relaxed), 0, "{what}");
    assert!(!holds(&svc.state, 1), "a snapshot went past {what}");
    p.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_does_not_stream_to_a_router_it_does_not_trust() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let other = Ca::new("b");
    // The router's certificate is another CA's; it would accept the daemon's.
    let router_tls = other.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let daemon_tls = ca.issue(dir.path(), "daemon", &["daemon-1"], &ca);
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    daemon_refuses(&svc, &daemon_tls, "a router certificate of another CA").await;
    svc.shutdown();

    // The router's certificate of the right CA, but for another name than the daemon
    // expects.
    let router_tls = ca.issue(dir.path(), "router2", &["127.0.0.1"], &ca);
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    let named = EventsTls {
        server_name: Some("router.example".into()),
        ..daemon_tls.clone()
    };
    daemon_refuses(&svc, &named, "a router certificate for another name").await;
    let state = svc.state.clone();
    // The same files with the default name (the router's IP) connect.
    let p = publisher(svc.events_addr, &daemon_tls, 1);
    eventually("the daemon streams under the right name", || {
        holds(&state, 1)
    })
    .await;
    p.shutdown();
    svc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_handshakes_is_closed_by_the_hello_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let svc = RouterService::start(config(router_tls, 300)).await.unwrap();
    let state = svc.state.clone();
    let mut silent = TcpStream::connect(svc.events_addr).await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed by the deadline, not left open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed before the deadline: {waited:?}"
    );
    eventually("counted", || refused(&state) == 1).await;
    svc.shutdown();
}

/// Over TLS a disconnected worker's id stays its certificate's for the grace period:
/// another certificate of the same CA cannot take it over meanwhile (it used to be free
/// to any connection), the same certificate takes it back at once, and once the grace
/// period ends the other may have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_workers_id_stays_its_certificates_for_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let first = ca.issue(dir.path(), "first", &["daemon-1"], &ca);
    let second = ca.issue(dir.path(), "second", &["daemon-2"], &ca);
    let svc = RouterService::start(ServiceConfig {
        grace_ms: 5_000,
        ..config(router_tls, 5_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    let holds_hash = |h| {
        state
            .index
            .with_tree("ns", |t| t.holds(1, h, None))
            .unwrap_or(false)
    };
    let connected = || {
        state
            .worker_list()
            .iter()
            .any(|w| w.worker == 1 && w.connected)
    };
    let owner = publisher_holding(svc.events_addr, &first, 1, 7);
    eventually("the first daemon's worker 1", || holds_hash(7)).await;
    owner.shutdown();
    eventually("worker 1 disconnected", || !connected()).await;

    // Another certificate claims worker 1 during the grace period: refused.
    let other = publisher_holding(svc.events_addr, &second, 1, 8);
    let foreign = || state.metrics.frames_foreign_worker.load(Ordering::Relaxed);
    eventually("the other certificate's claim refused", || foreign() >= 1).await;
    assert!(
        holds_hash(7) && !holds_hash(8),
        "taken over in its grace period"
    );
    other.shutdown();

    // Nor can it drop the worker first: a snapshot under the owner's node name that
    // leaves worker 1 out (which drops a node's disconnected workers), then one that
    // lists it.
    let tls = second
        .connector(&mut kvplane_router::tls::read_file)
        .unwrap();
    let tcp = TcpStream::connect(svc.events_addr).await.unwrap();
    let mut s = tls
        .connector
        .connect(tls.server_name_for(svc.events_addr), tcp)
        .await
        .unwrap();
    let refused_before = foreign();
    let begin = |workers| Frame::SnapshotBegin { workers };
    for f in [
        Frame::Hello {
            node: "node-1".into(),
            protocol: PROTOCOL_VERSION,
            source: Source::Kvplane,
        },
        begin(vec![]),
        Frame::SnapshotEnd,
        begin(vec![WorkerSeq { worker: 1, seq: 0 }]),
        Frame::SnapshotBlocks {
            worker: 1,
            namespace: "ns".into(),
            blocks: vec![SnapshotBlock {
                hash: 8,
                parent: None,
                tiers: Tier::Hbm.bit(),
            }],
        },
        Frame::SnapshotEnd,
    ] {
        write_frame(&mut s, &f).await.unwrap();
    }
    eventually("the claim under the owner's node name refused", || {
        foreign() > refused_before
    })
    .await;
    assert!(
        holds_hash(7) && !holds_hash(8),
        "dropped and taken in its grace period"
    );
    drop(s);

    // The same certificate, a new connection: worker 1 is its again at once (not after
    // its grace period: nothing was reaped).
    let back = publisher_holding(svc.events_addr, &first, 1, 9);
    eventually("the owner's reconnect takes it back", || holds_hash(9)).await;
    assert_eq!(state.metrics.workers_dropped.load(Ordering::Relaxed), 0);
    back.shutdown();
    eventually("worker 1 disconnected again", || !connected()).await;
    let t0 = Instant::now();

    // Once the grace period ends, the other certificate may have it.
    let other = publisher_holding(svc.events_addr, &second, 1, 8);
    eventually("the other certificate's after the grace period", || {
        holds_hash(8)
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(4_500),
        "{:?}",
        t0.elapsed()
    );
    other.shutdown();
    svc.shutdown();
}

/// The handshake and the Hello share one deadline: a peer that takes most of it to start
/// its handshake gets only the rest for its Hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_and_the_hello_share_one_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let daemon_tls = ca.issue(dir.path(), "daemon", &["daemon-1"], &ca);
    let svc = RouterService::start(config(router_tls, 2_000))
        .await
        .unwrap();
    let tls = daemon_tls
        .connector(&mut kvplane_router::tls::read_file)
        .unwrap();
    let t0 = Instant::now();
    let tcp = TcpStream::connect(svc.events_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut s = tls
        .connector
        .connect(tls.server_name_for(svc.events_addr), tcp)
        .await
        .expect("a handshake within the deadline succeeds");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed at the deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let waited = t0.elapsed();
    // At 2 s from the connection, not 2 s after the handshake (3.2 s).
    assert!(
        waited >= Duration::from_millis(1_900) && waited < Duration::from_millis(2_800),
        "{waited:?}"
    );
    svc.shutdown();
}

/// A connection whose TLS handshake fails gives its pending place back: with one place
/// per address, plain peers refused one after another leave room for the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_gives_its_pending_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let daemon_tls = ca.issue(dir.path(), "daemon", &["daemon-1"], &ca);
    let svc = RouterService::start(ServiceConfig {
        max_pending_event_connections_per_ip: 1,
        ..config(router_tls, 5_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    for n in 1..=3 {
        let mut plain = TcpStream::connect(svc.events_addr).await.unwrap();
        hello_and_snapshot(&mut plain, 2).await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await;
        eventually("the plain peer refused by the handshake", || {
            refused(&state) >= n
        })
        .await;
    }
    let p = publisher(svc.events_addr, &daemon_tls, 1);
    eventually("the daemon in the place they left", || holds(&state, 1)).await;
    assert_eq!(
        state.metrics.connections_refused.load(Ordering::Relaxed),
        0,
        "no place was left taken"
    );
    p.shutdown();
    svc.shutdown();
}

/// A client certificate on the router's revocation list is refused; another of the same
/// CA is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let mut router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let revoked = ca.issue_numbered(dir.path(), "revoked", &["daemon-1"], &ca, 77);
    let good = ca.issue_numbered(dir.path(), "good", &["daemon-2"], &ca, 78);
    router_tls.crl_file = Some(ca.revoke(dir.path(), &[77]));
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    let state = svc.state.clone();
    let bad = publisher(svc.events_addr, &revoked, 1);
    eventually("the revoked certificate refused", || refused(&state) >= 2).await;
    let ok = publisher(svc.events_addr, &good, 2);
    eventually("the other certificate streams", || holds(&state, 2)).await;
    assert!(!holds(&state, 1), "a revoked daemon's snapshot landed");
    bad.shutdown();
    ok.shutdown();
    svc.shutdown();
}

/// `reload_tls` (the router's SIGHUP) reads the files again: a certificate taken off the
/// revocation list gets in without a restart, one revoked while connected is cut off,
/// and a broken file on reload leaves the files in use in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_files_reload_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let mut router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    let revoked = ca.issue_numbered(dir.path(), "revoked", &["daemon-1"], &ca, 77);
    let good = ca.issue_numbered(dir.path(), "good", &["daemon-2"], &ca, 78);
    let crl = ca.revoke(dir.path(), &[77]);
    router_tls.crl_file = Some(crl.clone());
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    let state = svc.state.clone();
    let p = publisher(svc.events_addr, &revoked, 1);
    eventually("refused while revoked", || refused(&state) >= 2).await;
    assert!(!holds(&state, 1));
    // A broken revocation list: the reload fails and the one in use stays.
    std::fs::write(&crl, b"not a CRL").unwrap();
    assert!(svc.reload_tls().is_err());
    let before = refused(&state);
    eventually("still refused", || refused(&state) >= before + 2).await;
    let ok = publisher(svc.events_addr, &good, 2);
    eventually("others still get in", || holds(&state, 2)).await;
    // Taken off the list and reloaded: it gets in.
    ca.revoke(dir.path(), &[]);
    assert_eq!(svc.reload_tls().unwrap(), 0, "no connection up was refused");
    eventually("in after the reload", || holds(&state, 1)).await;
    // The other revoked while connected: the reload ends its connection, and it stays out.
    ca.revoke(dir.path(), &[78]);
    assert_eq!(svc.reload_tls().unwrap(), 1, "the revoked connection ended");
    let connected = |w: u64| {
        state
            .worker_list()
            .iter()
            .any(|x| x.worker == w && x.connected)
    };
    eventually("the revoked daemon disconnected", || !connected(2)).await;
    let before = refused(&state);
    eventually("its reconnects refused", || refused(&state) >= before + 2).await;
    assert!(!connected(2) && connected(1));
    p.shutdown();
    ok.shutdown();
    svc.shutdown();
}

/// With `bind_worker_ids`, a connection announces only the workers its certificate
/// names (`worker-<hex>.workers.kvplane`, or all under `*.workers.kvplane`); others are ignored and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_worker_ids_must_be_named_in_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let mut router_tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    router_tls.bind_worker_ids = true;
    // Worker 42 = 0x2a: named in hex, so a decimal name would not match.
    let named_cert = ca.issue(dir.path(), "named", &["worker-2a.workers.kvplane"], &ca);
    let decimal = ca.issue(dir.path(), "decimal", &["worker-42.workers.kvplane"], &ca);
    let all = ca.issue(dir.path(), "all", &["*.workers.kvplane"], &ca);
    let svc = RouterService::start(config(router_tls, 5_000))
        .await
        .unwrap();
    let state = svc.state.clone();
    let not_named = || {
        state
            .metrics
            .workers_not_in_certificate
            .load(Ordering::Relaxed)
    };
    let named = publisher(svc.events_addr, &named_cert, 42);
    eventually("the named worker", || holds(&state, 42)).await;
    named.shutdown();
    eventually("its connection gone", || {
        state.worker_list().iter().all(|w| !w.connected)
    })
    .await;
    // The same id under a decimal name is not named (and the worker is not its to take).
    let wrong = publisher(svc.events_addr, &decimal, 42);
    eventually("a decimal name refused", || not_named() >= 1).await;
    wrong.shutdown();
    // Another worker, refused, keeps publishing events: they are ignored, and do not ask
    // for snapshot after snapshot (each refused again).
    let other = publisher(svc.events_addr, &named_cert, 2);
    let link = other.link_stats(svc.events_addr).unwrap();
    eventually("connected", || link.connects.load(Ordering::Relaxed) >= 1).await;
    for i in 0..30u64 {
        other.stored(2, "ns", &[(100 + i, None)], Tier::Hbm);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!holds(&state, 2));
    assert!(state.worker_list().iter().all(|w| w.worker != 2));
    assert_eq!(
        state.metrics.resyncs_requested.load(Ordering::Relaxed),
        0,
        "events of a refused worker asked for snapshots"
    );
    assert!(
        link.snapshots_sent.load(Ordering::Relaxed) <= 1,
        "snapshots were sent again for a refused worker"
    );
    let wildcard = publisher(svc.events_addr, &all, 7);
    eventually("every worker under *.workers.kvplane", || holds(&state, 7)).await;
    assert!(
        state
            .render_metrics()
            .contains("kvplane_router_workers_not_in_certificate_total")
    );
    other.shutdown();
    wildcard.shutdown();
    svc.shutdown();
}

#[tokio::test]
async fn bad_files_stop_the_router_at_start_up_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("a");
    let tls = ca.issue(dir.path(), "router", &["127.0.0.1"], &ca);
    // A key others can read.
    let key = tls.key_file.clone().unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    match RouterService::start(config(tls.clone(), 5_000)).await {
        Err(ServiceError::Tls(TlsError::File {
            what: "key_file", ..
        })) => {}
        Err(other) => panic!("expected the key file named, got {other}"),
        Ok(_) => panic!("started with a key others can read"),
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Only two of the three files.
    let partial = EventsTls {
        ca_file: None,
        ..tls.clone()
    };
    match RouterService::start(config(partial, 5_000)).await {
        Err(ServiceError::Tls(TlsError::Invalid {
            what: "ca_file", ..
        })) => {}
        Err(other) => panic!("expected ca_file named, got {other}"),
        Ok(_) => panic!("started with TLS half set"),
    }
    // A certificate file that holds a key.
    let swapped = EventsTls {
        cert_file: tls.key_file.clone(),
        ..tls
    };
    match RouterService::start(config(swapped, 5_000)).await {
        Err(ServiceError::Tls(TlsError::Invalid {
            what: "cert_file", ..
        })) => {}
        Err(other) => panic!("expected cert_file named, got {other}"),
        Ok(_) => panic!("started with a key as its certificate"),
    }
}

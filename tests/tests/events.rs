//! `kvplane serve` streams its KV events to a real `kvplane router`: saved blocks become
//! routable to the daemon's worker, drops remove them, and a router restarted later
//! converges from the daemon's snapshot.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvplane_ffi::Opcode;
use kvplane_tests::{
    DaemonProc, NamespaceConfig, TestEngine, chain_ops, kvplane_bin, small_config, temp_dir,
    with_nvme,
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct RouterProc(Child);
impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_router(events: u16, http: u16) -> RouterProc {
    start_router_with(events, http, &[])
}

fn start_router_with(events: u16, http: u16, extra_args: &[&str]) -> RouterProc {
    let child = Command::new(kvplane_bin())
        .args([
            "router",
            "--events-addr",
            &format!("127.0.0.1:{events}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "router did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    RouterProc(child)
}

/// POST /route with block hashes; returns the daemon worker's cached block count.
fn cached_on(http: u16, worker: u64, hashes: &[u64]) -> u64 {
    let body = serde_json::json!({"namespace": "ev", "block_hashes": hashes}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    write!(s, "POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let json = &resp[resp.find("\r\n\r\n").expect("HTTP response") + 4..];
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(_) => return 0, // e.g. no workers yet
    };
    v["scores"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["worker"] == worker)
        .map_or(0, |s| s["cached_blocks"].as_u64().unwrap_or(0))
}

fn wait_for(http: u16, worker: u64, hashes: &[u64], want: u64) {
    let t0 = Instant::now();
    loop {
        let got = cached_on(http, worker, hashes);
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "router shows {got} cached blocks, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn daemon_events_reach_the_router_and_a_restarted_router_converges() {
    let dir = temp_dir("events");
    let (ev, http) = (free_port(), free_port());
    let config = small_config(dir.path(), |c| {
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 42;
    });
    let router = start_router(ev, http);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
    let hashes: Vec<u64> = (0..6).map(|i| 0xABC0 + i).collect();
    let ops = chain_ops(&hashes, 0);
    assert_eq!(e.block_op(Opcode::Save, 0, &ops).0.blocks, 6);
    wait_for(http, 42, &hashes, 6);
    // Dropping the last two leaves a 4-block prefix routable.
    assert_eq!(e.block_op(Opcode::Drop, 0, &ops[4..]).0.blocks, 2);
    wait_for(http, 42, &hashes, 4);
    // A router started from scratch learns everything from the daemon's snapshot.
    drop(router);
    let _router = start_router(ev, http);
    wait_for(http, 42, &hashes, 4);
}

/// Events the daemon's own event channel drops (a burst larger than `events.queue_events`
/// while the forwarder lags) never got a sequence number, so the router cannot see the
/// gap: the daemon resends a snapshot, and the router shows every block. It used to show
/// only the blocks whose events got through, for good.
#[test]
fn events_lost_in_the_daemons_own_queue_are_repaired_by_a_snapshot() {
    let dir = temp_dir("events-lost");
    let (ev, http) = (free_port(), free_port());
    let config = small_config(dir.path(), |c| {
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 42;
        c.events.queue_events = 1;
    });
    let _router = start_router(ev, http);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
    let hashes: Vec<u64> = (0..32).map(|i| 0xF00D_0000 + i).collect();
    let ops = chain_ops(&hashes, 0);
    // One SAVE: 32 events under one hold of the registry lock into a queue of one.
    assert_eq!(e.block_op(Opcode::Save, 0, &ops).0.blocks, 32);
    wait_for(http, 42, &hashes, 32);
    // The same after a burst of removals: the router forgets what was dropped.
    // Leaf first: the first removal queued is the last block's, so losing the
    // rest leaves the router a longer prefix than the daemon's.
    let leaf_first: Vec<_> = ops[8..].iter().rev().copied().collect();
    assert_eq!(e.block_op(Opcode::Drop, 0, &leaf_first).0.blocks, 24);
    wait_for(http, 42, &hashes, 8);
}

/// Blocks restored from NVMe after a daemon crash reach the router under their configured
/// namespace name before any engine attaches (the config's names are known at start-up).
#[test]
fn blocks_restored_from_nvme_are_published_under_their_configured_name() {
    let dir = temp_dir("events-restore");
    let (ev, http) = (free_port(), free_port());
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let config = small_config(dir.path(), |c| {
        with_nvme(c, &dir.path().join("nvme.slots"), 8 << 20);
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 42;
        c.namespaces = vec![NamespaceConfig::new("ev", vec![uid])];
    });
    let cfg = config.to_str().unwrap();
    let hashes: Vec<u64> = (0..5).map(|i| 0xD0C0 + i).collect();
    {
        let daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
        let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
        let ops = chain_ops(&hashes, 0);
        let c = e
            .block_op(Opcode::Save, kvplane_ffi::SQE_F_WRITE_THROUGH, &ops)
            .0;
        assert_eq!((c.status, c.blocks), (0, 5));
        kvplane_tests::signal(daemon.pid(), libc::SIGKILL);
    }
    let _router = start_router(ev, http);
    let _daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
    wait_for(http, 42, &hashes, 5);
}

/// The router is SIGKILLed while an engine keeps saving and dropping blocks, stays down
/// while the daemon's state moves on, and is restarted with the stream still running: once
/// the engine stops, the router's view of every chain equals what the daemon holds (the
/// reconnect snapshot repairs everything missed). Seeded: kill and restart points replay
/// with `KVPLANE_FAULT_SEED`.
#[test]
fn router_killed_mid_stream_converges_to_the_daemon_state() {
    kvplane_tests::for_each_seed(
        "router_killed_mid_stream_converges_to_the_daemon_state",
        &[0xE7E_0001, 0xE7E_0002],
        router_kill_campaign,
    );
}

fn router_kill_campaign(seed: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let mut rng = kvplane_tests::FaultRng::new(seed);
    let dir = temp_dir("events-kill");
    let (ev, http) = (free_port(), free_port());
    let config = small_config(dir.path(), |c| {
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 7;
    });
    let router = start_router(ev, http);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let chain_of = move |i: u64| -> Vec<u64> {
        (0..3)
            .map(|j| (seed << 20) ^ (i << 4) ^ j ^ 0x1_0000_0000)
            .collect()
    };
    let ops_of = |hashes: &[u64]| chain_ops(hashes, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let saved = Arc::new(AtomicU64::new(0));
    let engine_rng = Mutex::new(kvplane_tests::FaultRng::new(rng.next_u64()));
    let worker = {
        let (stop, saved, socket) = (stop.clone(), saved.clone(), daemon.socket.clone());
        std::thread::spawn(move || {
            let mut e = TestEngine::attach(&socket, "ev").unwrap();
            let mut rng = engine_rng.into_inner().unwrap();
            let mut i = 0u64;
            let mut dropped = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let hashes = chain_of(i);
                assert_eq!(e.block_op(Opcode::Save, 0, &ops_of(&hashes)).0.blocks, 3);
                if i > 0 && rng.chance(30) {
                    // Drop the tail of an earlier chain.
                    let victim = chain_of(rng.range(0, i));
                    e.block_op(Opcode::Drop, 0, &ops_of(&victim)[1..]);
                    dropped += 1;
                }
                i += 1;
                saved.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            (i, dropped)
        })
    };
    let wait_saved = |n: u64| {
        let t0 = Instant::now();
        while saved.load(Ordering::Relaxed) < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "engine stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_saved(rng.range(5, 30));
    drop(router); // SIGKILL mid-stream
    let down_ms = rng.range(100, 400);
    let before = saved.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(down_ms));
    let missed = saved.load(Ordering::Relaxed) - before;
    let _router = start_router(ev, http);
    wait_saved(saved.load(Ordering::Relaxed) + rng.range(5, 30));
    stop.store(true, Ordering::Relaxed);
    let (chains, drops) = worker.join().unwrap();
    assert!(
        missed > 0,
        "the daemon's state moved on while the router was down"
    );

    // Truth is the daemon's registry (drops and host-tier evictions included).
    let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
    let mut checked = 0;
    for i in 0..chains {
        let hashes = chain_of(i);
        let want = e.block_op(Opcode::Lookup, 0, &ops_of(&hashes)).0.blocks as u64;
        wait_for(http, 7, &hashes, want);
        checked += 1;
    }
    eprintln!(
        "fault-summary router_sigkill seed={seed:#x} kills=1 router_down_ms={down_ms} \
         chains_saved_while_down={missed} chains={chains} tail_drops={drops} \
         chains_converged={checked}"
    );
}

/// A CA's certificate and key, and the leaf certificates it signs as PEM files.
struct TestCa(rcgen::Certificate, rcgen::KeyPair);

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        TestCa(p.self_signed(&key).unwrap(), key)
    }

    /// `{name}.pem` and `{name}.key` (0600) in `dir`, for `sans`.
    fn issue(&self, dir: &std::path::Path, name: &str, sans: &[&str]) -> [std::path::PathBuf; 2] {
        use std::os::unix::fs::PermissionsExt;
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &self.0, &self.1)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        [c, k]
    }
}

/// A counter of the router's `/metrics`.
fn router_counter(http: u16, name: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{resp}"))
}

/// With `[events_tls]` on the router and `[events.tls]` on a daemon, the daemon's blocks
/// become routable over mutual TLS; a daemon streaming in plain TCP to the same router is
/// refused and its blocks never become routable.
#[test]
fn events_reach_a_tls_router_and_a_plain_daemons_do_not() {
    let dir = temp_dir("events-tls");
    let plain_dir = temp_dir("events-tls-plain");
    let (ev, http) = (free_port(), free_port());
    let ca = TestCa::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.0.pem()).unwrap();
    let [router_cert, router_key] = ca.issue(dir.path(), "router", &["127.0.0.1"]);
    let [daemon_cert, daemon_key] = ca.issue(dir.path(), "daemon", &["daemon-42"]);
    let router_toml = dir.path().join("router.toml");
    std::fs::write(
        &router_toml,
        format!(
            "[events_tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca_file.display(),
            router_cert.display(),
            router_key.display()
        ),
    )
    .unwrap();
    let _router = start_router_with(ev, http, &["--config", router_toml.to_str().unwrap()]);
    let tls_config = small_config(dir.path(), |c| {
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 42;
        c.events.tls.ca_file = Some(ca_file.clone());
        c.events.tls.cert_file = Some(daemon_cert.clone());
        c.events.tls.key_file = Some(daemon_key.clone());
    });
    let plain_config = small_config(plain_dir.path(), |c| {
        c.events.routers = vec![format!("127.0.0.1:{ev}")];
        c.events.worker_id = 43;
    });
    let daemon = DaemonProc::start(dir.path(), &["--config", tls_config.to_str().unwrap()]);
    let plain = DaemonProc::start(
        plain_dir.path(),
        &["--config", plain_config.to_str().unwrap()],
    );
    let hashes: Vec<u64> = (0..6).map(|i| 0x71_5000 + i).collect();
    let ops = chain_ops(&hashes, 0);
    let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
    assert_eq!(e.block_op(Opcode::Save, 0, &ops).0.blocks, 6);
    let mut p = TestEngine::attach(&plain.socket, "ev").unwrap();
    assert_eq!(p.block_op(Opcode::Save, 0, &ops).0.blocks, 6);
    wait_for(http, 42, &hashes, 6);
    // The plain daemon retries: refused each time, its blocks never routable.
    let refused = "kvplane_router_event_connections_tls_refused_total";
    let t0 = Instant::now();
    while router_counter(http, refused) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the plain daemon was not refused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cached_on(http, 43, &hashes), 0);
    assert_eq!(cached_on(http, 42, &hashes), 6);
}

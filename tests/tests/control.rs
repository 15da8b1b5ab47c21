//! The control server against a real `kvplane serve` (issue 17, finding 8): on the control
//! socket each caller uid sees only what it may (tenants their own namespaces and
//! sessions, unknown uids nothing), loopback TCP serves aggregates only, a Host header
//! other than a loopback name is refused (DNS rebinding), and idle or slow connections
//! neither starve `/healthz` nor stay open past the header timeout.
//!
//! Other uids are real: the clients run in forked children that switched uid, and the
//! tenants' engines are `kvplane engine-sim` processes started as those uids. That needs
//! root (as in CI); run as anyone else these tests fail, they do not pass silently.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvplane_ffi::Opcode;
use kvplane_tests::{
    DaemonProc, NamespaceConfig, TestEngine, as_user, chain_ops, control_addr, control_tcp_addr,
    http, http_get, kvplane_bin, small_config, status_json, temp_dir, with_ephemeral_metrics,
};

const TENANT_A: u32 = 4242;
const TENANT_B: u32 = 4343;
const STRANGER: u32 = 4545;
/// Group of the control socket; every test client is in it, so the file mode lets them
/// connect and what they see is decided by their uid alone.
const CONTROL_GID: u32 = 4242;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests run clients as other uids (fork + setuid), which needs root; this run is uid {euid}"
    );
}

/// Two tenants, each with its own uid (root may use both, for the test's own engines);
/// sockets reachable by other uids; the control socket 0660, group CONTROL_GID.
fn tenant_daemon(dir: &Path) -> DaemonProc {
    // Other uids must reach the sockets inside the test's private directory.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = small_config(dir, |c| {
        c.serve.socket_mode = 0o666;
        with_ephemeral_metrics(c);
        c.control.socket_mode = 0o660;
        c.control.socket_gid = Some(CONTROL_GID);
        c.namespaces = vec![
            NamespaceConfig::new("tenant-a", vec![0, TENANT_A]),
            NamespaceConfig::new("tenant-b", vec![0, TENANT_B]),
        ];
    });
    DaemonProc::start(dir, &["--config", cfg.to_str().unwrap()])
}

/// An engine process of `uid` holding a session in `namespace` until dropped (its block
/// geometry is the small config's: 4 layers x 2 x 64 tokens x 128 bytes = 64 KiB).
struct EngineAs(Child);

impl EngineAs {
    fn start(socket: &Path, uid: u32, namespace: &str) -> EngineAs {
        let child = Command::new(kvplane_bin())
            .args([
                "engine-sim",
                "--pages",
                "8",
                "--layers",
                "4",
                "--page-tokens",
            ])
            .args([
                "64",
                "--head-bytes",
                "128",
                "--namespace",
                namespace,
                "--socket",
            ])
            .arg(socket)
            .uid(uid)
            .gid(CONTROL_GID)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvplane engine-sim");
        EngineAs(child)
    }
}

impl Drop for EngineAs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the daemon (asked as root) lists a session of each uid in `uids`.
fn wait_sessions(control: &str, uids: &[u32], engines: &mut [&mut EngineAs]) {
    let t0 = Instant::now();
    loop {
        let s = status_json(control);
        let have: BTreeSet<u64> = s["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["uid"].as_u64().unwrap())
            .collect();
        if uids.iter().all(|u| have.contains(&u64::from(*u))) {
            return;
        }
        for e in engines.iter_mut() {
            if let Ok(Some(status)) = e.0.try_wait() {
                let mut err = String::new();
                let _ = e.0.stderr.take().unwrap().read_to_string(&mut err);
                panic!("engine-sim exited with {status}: {err}");
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "sessions of {uids:?} never appeared: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lookup in `namespace` from the test's own (root) engine, so the namespace has
/// per-namespace activity to show (and to hide).
fn lookup_in(socket: &Path, namespace: &str, salt: u64) -> TestEngine {
    let mut e = TestEngine::attach(socket, namespace).unwrap();
    let hashes: Vec<u64> = (0..4).map(|i| 0xC0_0000 ^ (salt << 16) ^ (i + 1)).collect();
    let (c, _) = e.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0));
    assert_eq!(c.status, 0, "{c:?}");
    e
}

fn namespaces_of(status: &serde_json::Value) -> BTreeSet<String> {
    status["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["namespace"].as_str().unwrap().to_string())
        .collect()
}

/// `/status` and `/metrics` from the control socket as `uid`: (code, body) of each.
fn status_and_metrics_as(uid: u32, control: &str) -> ((u16, String), (u16, String)) {
    let c = control.to_string();
    let out = as_user(uid, CONTROL_GID, move || {
        let s = http_get(&c, "/status");
        let m = http_get(&c, "/metrics");
        serde_json::json!([s.0, s.1, m.0, m.1]).to_string()
    });
    let v: serde_json::Value = serde_json::from_str(&out).expect("child output");
    let text = |i: usize| v[i].as_str().unwrap().to_string();
    let code = |i: usize| v[i].as_u64().unwrap() as u16;
    ((code(0), text(1)), (code(2), text(3)))
}

#[test]
fn a_tenant_uid_sees_only_its_own_namespaces_and_sessions_on_the_control_socket() {
    require_root();
    let dir = temp_dir("control-tenants");
    let daemon = tenant_daemon(dir.path());
    let control = control_addr(&daemon);
    // The socket file: the configured mode and group, owned by the daemon (root).
    let meta = std::fs::symlink_metadata(&control).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660, "control socket mode");
    assert_eq!((meta.uid(), meta.gid()), (0, CONTROL_GID));

    let _root_a = lookup_in(&daemon.socket, "tenant-a", 1);
    let _root_b = lookup_in(&daemon.socket, "tenant-b", 2);
    let mut a = EngineAs::start(&daemon.socket, TENANT_A, "tenant-a");
    let mut b = EngineAs::start(&daemon.socket, TENANT_B, "tenant-b");
    wait_sessions(&control, &[0, TENANT_A, TENANT_B], &mut [&mut a, &mut b]);

    // The operator (root) sees all four sessions and both namespaces.
    let all = status_json(&control);
    assert_eq!(all["sessions"].as_array().unwrap().len(), 4, "{all}");
    assert_eq!(
        namespaces_of(&all),
        BTreeSet::from(["tenant-a".into(), "tenant-b".into()])
    );

    // Tenant A, a real other uid: its namespace and its own session only.
    let ((code, body), (mcode, metrics)) = status_and_metrics_as(TENANT_A, &control);
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        namespaces_of(&st),
        BTreeSet::from(["tenant-a".into()]),
        "{st}"
    );
    let sessions = st["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{st}");
    assert_eq!(sessions[0]["uid"], TENANT_A);
    assert_eq!(sessions[0]["namespaces"][0], "tenant-a");
    assert!(!body.contains("tenant-b"), "{body}");
    assert!(!body.contains(&TENANT_B.to_string()), "{body}");
    assert_eq!(mcode, 200, "{metrics}");
    assert!(
        metrics.contains("kvplane_lookup_blocks_total{namespace=\"tenant-a\""),
        "{metrics}"
    );
    assert!(!metrics.contains("tenant-b"), "{metrics}");
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kvplane_session_info{"))
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(info[0].contains(&format!("uid=\"{TENANT_A}\"")), "{info:?}");
    // Daemon-wide aggregates stay visible.
    assert!(metrics.contains("\nkvplane_sessions 4\n"), "{metrics}");

    // Tenant B likewise sees only its own.
    let ((code, body), _) = status_and_metrics_as(TENANT_B, &control);
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(namespaces_of(&st), BTreeSet::from(["tenant-b".into()]));
    assert!(!body.contains("tenant-a"), "{body}");

    // `kvplane status` run by tenant A shows the same filtered view.
    let out = Command::new(kvplane_bin())
        .args(["status", "--json", "--socket", &control])
        .uid(TENANT_A)
        .gid(CONTROL_GID)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["sessions"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(namespaces_of(&st), BTreeSet::from(["tenant-a".into()]));
}

#[test]
fn an_unknown_uid_gets_403_and_tcp_serves_only_aggregates() {
    require_root();
    let dir = temp_dir("control-403");
    let daemon = tenant_daemon(dir.path());
    let control = control_addr(&daemon);
    let _root_a = lookup_in(&daemon.socket, "tenant-a", 3);

    // A uid that is neither operator nor tenant (it can connect: it is in the group).
    let ((code, body), (mcode, mbody)) = status_and_metrics_as(STRANGER, &control);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(&format!("uid {STRANGER}")), "{body}");
    assert_eq!(mcode, 403, "{mbody}");
    assert!(!mbody.contains("tenant-a"));
    let c = control.clone();
    let health = as_user(STRANGER, CONTROL_GID, move || {
        format!("{:?}", http_get(&c, "/healthz"))
    });
    assert_eq!(health, format!("{:?}", (200u16, "ok\n")));

    // Loopback TCP has no caller identity: no /status, and /metrics without any
    // namespace, session, pid or uid.
    let tcp = control_tcp_addr(&daemon);
    let (code, body) = http_get(&tcp, "/status");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("control socket"), "{body}");
    let (code, m) = http_get(&tcp, "/metrics");
    assert_eq!(code, 200);
    assert!(m.contains("kvplane_sessions 1\n"), "{m}");
    for leak in [
        "namespace=",
        "kvplane_session_info{",
        "uid=",
        "pid=",
        "tenant-a",
    ] {
        assert!(!m.contains(leak), "TCP /metrics shows `{leak}`:\n{m}");
    }
}

#[test]
fn a_host_header_other_than_loopback_is_refused() {
    let dir = temp_dir("control-host");
    let cfg = small_config(dir.path(), with_ephemeral_metrics);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let tcp = control_tcp_addr(&daemon);
    let port = tcp.rsplit(':').next().unwrap();
    let get = |endpoint: &str, host: &str| {
        http(
            endpoint,
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
    };
    // What a DNS-rebinding page sends: its own name, with or without the port.
    for evil in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        let (code, body) = get(&tcp, &evil);
        assert_eq!(code, 421, "Host {evil}: {body}");
        assert!(body.contains("not served here"), "{body}");
        assert!(!body.contains("kvplane_"), "{body}");
    }
    let (code, _) = http(&tcp, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(code, 400, "no Host header");
    for ok in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(get(&tcp, &ok).0, 200, "Host {ok}");
    }
    // The control socket checks it too.
    assert_eq!(get(&control_addr(&daemon), "evil.example").0, 421);
}

fn raise_open_files(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    assert!(
        r.rlim_max >= want,
        "the test needs {want} open files; the hard limit is {}",
        r.rlim_max
    );
    r.rlim_cur = r.rlim_cur.max(want);
    // SAFETY: setrlimit reads the struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

/// Idle connections the finding opened (a few thousand starved `/healthz`).
const IDLE_CONNECTIONS: usize = 3_000;
/// The bound this test states for `/healthz` with them all open.
const HEALTHZ_BOUND: Duration = Duration::from_secs(1);

#[test]
fn three_thousand_idle_connections_do_not_starve_healthz() {
    raise_open_files(IDLE_CONNECTIONS as u64 + 1_024);
    let dir = temp_dir("control-idle");
    let cfg = small_config(dir.path(), with_ephemeral_metrics);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let tcp = control_tcp_addr(&daemon);
    let sock: std::net::SocketAddr = tcp.parse().unwrap();
    // Connect and say nothing (every other one sends half a request head and stops).
    let t0 = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3)).unwrap_or_else(|e| {
            panic!("connection {i}: {e} (the control server stopped accepting)")
        });
        if i % 2 == 1 {
            // May fail once the server has closed it to make room: that is the point.
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n");
        }
        idle.push(s);
    }
    let open_s = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let (code, body) = http_get(&tcp, "/healthz");
    let healthz = t.elapsed();
    let daemon_fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count();
    eprintln!(
        "{IDLE_CONNECTIONS} idle connections opened in {open_s:.2} s; /healthz answered in \
         {:.1} ms; daemon holds {daemon_fds} fds",
        healthz.as_secs_f64() * 1e3
    );
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert!(
        healthz < HEALTHZ_BOUND,
        "/healthz took {healthz:?} with {IDLE_CONNECTIONS} idle connections open"
    );
    // The idle connections did not pile up in the daemon (its fds are shared with
    // engines' sessions), and engines still attach.
    assert!(daemon_fds < 1_000, "daemon holds {daemon_fds} fds");
    let mut e = TestEngine::attach(&daemon.socket, "after-flood").unwrap();
    assert_eq!(e.op(Opcode::Nop, 0, Vec::new(), 0, 0).status, 0);
    drop(idle);
}

/// Seconds until the server closes a connection that sends `trickle` one byte per 100 ms
/// (after `prefix`), or `None` if still open after 8 s.
fn closed_after(tcp: &str, prefix: &[u8], trickle: bool) -> Option<f64> {
    let mut s = TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let _ = s.write_all(prefix);
    let mut buf = [0u8; 512];
    while t0.elapsed() < Duration::from_secs(8) {
        if trickle && s.write_all(b"a").is_err() {
            return Some(t0.elapsed().as_secs_f64());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed().as_secs_f64()),
            // A response (the old server's 408) then a close: keep reading to the close.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed().as_secs_f64()),
        }
    }
    None
}

#[test]
fn slow_and_idle_clients_are_closed_after_the_header_timeout() {
    let dir = temp_dir("control-slow");
    let cfg = small_config(dir.path(), with_ephemeral_metrics);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let tcp = control_tcp_addr(&daemon);
    // The stated timeout is 2 s from connecting to the end of the request head; allow
    // 1.5 s of scheduling slack on a loaded machine.
    let slow = closed_after(
        &tcp,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
        true,
    );
    let idle = closed_after(&tcp, b"", false);
    eprintln!("slow-header client closed after {slow:?} s, idle client after {idle:?} s");
    for (what, t) in [("slow-header", slow), ("idle", idle)] {
        let t = t.unwrap_or_else(|| panic!("{what} client still open after 8 s"));
        assert!(
            (1.8..=3.5).contains(&t),
            "{what} client closed after {t:.2} s"
        );
    }
    // The server still answers a prompt client.
    assert_eq!(http_get(&tcp, "/healthz").0, 200);
}

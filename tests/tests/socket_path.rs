//! The engine socket's path against real `kvplane serve` processes (issue 17, finding 10
//! and "every path the daemon opens as root"): SIGTERM stops the daemon, with its NVMe
//! flush, whatever happened to the socket file; a link, a foreign or writable directory, or
//! a file that is not the daemon's socket at the path is refused and left alone; the socket
//! directory the daemon creates has the owner, group and mode it should, and those decide
//! who can connect.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, SQE_F_WRITE_THROUGH, Tier};
use kvplane_tests::{
    DaemonProc, NamespaceConfig, OTHER_UID, TestEngine, chain_ops, kvplane_as, require_root,
    serve_until_exit, small_config, temp_dir, with_nvme,
};

/// How long SIGTERM may take to stop the daemon (sessions end within their 100 ms sleep
/// slice; the accept loop wakes at once).
const STOP: Duration = Duration::from_secs(5);
const OK: i32 = 0;

fn nvme_config(dir: &Path) -> std::path::PathBuf {
    let nvme = dir.join("nvme.kvp");
    small_config(dir, |c| {
        with_nvme(c, &nvme, 16 << 20);
        c.control.metrics_addr = String::new();
    })
}

fn hashes() -> Vec<u64> {
    (0..8u64)
        .map(|i| 0x5EC0_0000_0000_0001 ^ (i << 20) | 1)
        .collect()
}

/// Saves 8 blocks through to NVMe and checks they were acknowledged.
fn save_blocks(socket: &Path) {
    let mut e = TestEngine::attach(socket, "tenant-a").expect("attach");
    let hs = hashes();
    for (i, &h) in hs.iter().enumerate() {
        e.fill_page(i as u32, h);
    }
    let (c, _) = e.block_op(Opcode::Save, SQE_F_WRITE_THROUGH, &chain_ops(&hs, 0));
    assert_eq!((c.status, c.blocks as usize), (OK, hs.len()), "{c:?}");
}

/// After a restart: every block loads back from NVMe, bit-identical.
fn blocks_survived(socket: &Path) {
    let mut e = TestEngine::attach(socket, "tenant-a").expect("attach after restart");
    let hs = hashes();
    let ops: Vec<(u64, u64, u32)> = hs
        .iter()
        .enumerate()
        .map(|(i, &h)| (h, 0, 16 + i as u32))
        .collect();
    for i in 0..hs.len() as u32 {
        e.poison_page(16 + i);
    }
    let (c, out) = e.block_op(Opcode::Load, 0, &ops);
    assert_eq!((c.status, c.blocks as usize), (OK, hs.len()), "{c:?}");
    for (i, &h) in hs.iter().enumerate() {
        assert_eq!(out[i].tier, Tier::Nvme.raw() as u8, "served from NVMe");
        assert!(e.read_page(16 + i as u32) == TestEngine::expected_page(h));
    }
}

/// SIGTERM, then: exited 0 within `STOP`, and the clean shutdown (sessions ended, NVMe
/// files fsync-ed without failure) is in the log.
fn stops_cleanly(daemon: &mut DaemonProc, what: &str) {
    let t0 = Instant::now();
    assert!(
        daemon.terminate(STOP),
        "{what}: SIGTERM did not stop the daemon with status 0 within {STOP:?}; log:\n{}",
        daemon.log_text()
    );
    eprintln!("{what}: stopped in {:?}", t0.elapsed());
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("sessions ended, NVMe flushed"))
        .unwrap_or_else(|| panic!("{what}: no clean NVMe flush in the log:\n{log}"));
    assert!(
        line.contains("nvme_files=1") && line.contains("nvme_flush_failures=0"),
        "{line}"
    );
}

#[test]
fn sigterm_stops_the_daemon_after_its_socket_file_is_removed() {
    let dir = temp_dir("sock-removed");
    let config = nvme_config(dir.path());
    let mut daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    save_blocks(&daemon.socket);
    // An engine stays attached through the stop.
    let _attached = TestEngine::attach(&daemon.socket, "tenant-a").unwrap();
    std::fs::remove_file(&daemon.socket).unwrap();
    stops_cleanly(&mut daemon, "socket removed");
    drop(daemon);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    blocks_survived(&daemon.socket);
}

#[test]
fn sigterm_stops_the_daemon_after_its_socket_file_is_replaced() {
    let dir = temp_dir("sock-replaced");
    let config = nvme_config(dir.path());
    let mut daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    save_blocks(&daemon.socket);
    std::fs::remove_file(&daemon.socket).unwrap();
    std::fs::write(&daemon.socket, b"someone else's file").unwrap();
    stops_cleanly(&mut daemon, "socket replaced by a file");
    assert_eq!(
        std::fs::read(&daemon.socket).unwrap(),
        b"someone else's file",
        "the daemon removed a file that was not its socket"
    );
    std::fs::remove_file(&daemon.socket).unwrap();
    drop(daemon);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    blocks_survived(&daemon.socket);
}

#[test]
fn a_second_daemon_on_the_same_path_keeps_its_socket_when_the_first_stops() {
    let dir = temp_dir("sock-second");
    let first_dir = dir.path().join("first");
    let second_dir = dir.path().join("second");
    std::fs::create_dir(&first_dir).unwrap();
    std::fs::create_dir(&second_dir).unwrap();
    let socket = dir.path().join("kvplane.sock");
    let mut first = DaemonProc::start_with_socket(&first_dir, &socket, &[]);
    std::fs::remove_file(&socket).unwrap();
    let second = DaemonProc::start_with_socket(&second_dir, &socket, &[]);
    assert!(
        first.terminate(STOP),
        "the first daemon did not stop; log:\n{}",
        first.log_text()
    );
    let report = kvplane_tests::ping_json(&second.socket, 100);
    assert_eq!(report["nops"], 100, "the second daemon's socket survived");
}

/// `kvplane serve` that must refuse to start: exits non-zero within 20 s; its log.
fn refused_to_start(dir: &Path, socket: &Path) -> String {
    let config = small_config(dir, |_| {});
    let log = dir.join("refused.log");
    let Some(status) = serve_until_exit(&config, socket, &log, Duration::from_secs(20)) else {
        panic!(
            "kvplane serve started on {}; log:\n{}",
            socket.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "started on {}:\n{text}",
        socket.display()
    );
    text
}

#[test]
fn links_foreign_and_writable_paths_are_refused_and_left_alone() {
    require_root("links_foreign_and_writable_paths_are_refused_and_left_alone");
    let dir = temp_dir("sock-paths");
    let d = dir.path();

    // The socket path is a link to a root-owned file: not followed, not removed.
    let precious = d.join("precious");
    std::fs::write(&precious, b"root's data").unwrap();
    let real = d.join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&precious, real.join("kvplane.sock")).unwrap();
    let log = refused_to_start(d, &real.join("kvplane.sock"));
    assert!(log.contains("is a symbolic link"), "{log}");
    assert!(
        std::fs::symlink_metadata(real.join("kvplane.sock"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"root's data");

    // A dangling link is refused too (bind would otherwise create its target).
    std::os::unix::fs::symlink(d.join("elsewhere.sock"), real.join("dangling.sock")).unwrap();
    let log = refused_to_start(d, &real.join("dangling.sock"));
    assert!(log.contains("is a symbolic link"), "{log}");
    assert!(!d.join("elsewhere.sock").exists());

    // The socket directory is a link to another directory.
    let target = d.join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, d.join("linkdir")).unwrap();
    let log = refused_to_start(d, &d.join("linkdir/kvplane.sock"));
    assert!(log.contains("is a symbolic link"), "{log}");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing bound through the link"
    );

    // A directory another user owns (they could swap the socket under the daemon).
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let log = refused_to_start(d, &theirs.join("kvplane.sock"));
    assert!(log.contains("owned by uid 65534"), "{log}");

    // A directory anyone may write.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = refused_to_start(d, &open.join("kvplane.sock"));
    assert!(log.contains("writable by group or others"), "{log}");

    // A file that is not a socket at the path: refused, not removed.
    std::fs::write(real.join("file.sock"), b"not a socket").unwrap();
    let log = refused_to_start(d, &real.join("file.sock"));
    assert!(log.contains("is not a socket"), "{log}");
    assert_eq!(
        std::fs::read(real.join("file.sock")).unwrap(),
        b"not a socket"
    );

    // Another user's socket at the path: refused, not removed.
    let other = std::os::unix::net::UnixListener::bind(real.join("other.sock")).unwrap();
    std::os::unix::fs::lchown(real.join("other.sock"), Some(OTHER_UID), None).unwrap();
    drop(other);
    let log = refused_to_start(d, &real.join("other.sock"));
    assert!(log.contains("owned by uid 65534"), "{log}");
    assert!(real.join("other.sock").exists());
}

#[test]
fn the_socket_directory_is_created_0750_with_the_socket_group() {
    require_root("the_socket_directory_is_created_0750_with_the_socket_group");
    let dir = temp_dir("sock-dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/kvplane.sock");
    let config = small_config(dir.path(), |c| {
        c.serve.socket_group = Some(OTHER_UID);
        c.serve.socket_mode = 0o660;
        c.namespaces = vec![NamespaceConfig::new("b", vec![OTHER_UID])];
    });
    let daemon =
        DaemonProc::start_with_socket(dir.path(), &socket, &["--config", config.to_str().unwrap()]);
    let d = std::fs::symlink_metadata(dir.path().join("run")).unwrap();
    assert!(d.is_dir());
    assert_eq!(
        (d.mode() & 0o7777, d.uid(), d.gid()),
        (0o750, 0, OTHER_UID),
        "socket directory mode/owner/group"
    );
    let s = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(
        (s.mode() & 0o7777, s.uid(), s.gid()),
        (0o660, 0, OTHER_UID),
        "socket file mode/owner/group"
    );
    // The group decides who can reach the socket: its member attaches, another uid that
    // is not in it cannot even connect.
    let out = kvplane_as(OTHER_UID, OTHER_UID)
        .args([
            "ping",
            "--json",
            "--count",
            "100",
            "--namespace",
            "b",
            "--socket",
        ])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uid 65534 (group 65534) attaches: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kvplane_as(OTHER_UID - 1, OTHER_UID - 1)
        .args(["ping", "--count", "1", "--namespace", "b", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
}

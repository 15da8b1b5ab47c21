//! `kvplane serve` streams its KV events to a real `kvplane router`: saved blocks become
//! routable to the daemon's worker, drops remove them, and a router restarted later
//! converges from the daemon's snapshot.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvplane_ffi::Opcode;
use kvplane_tests::{DaemonProc, TestEngine, kvplane_bin, small_config, temp_dir};

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
    let child = Command::new(kvplane_bin())
        .args([
            "router",
            "--events-addr",
            &format!("127.0.0.1:{events}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
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
    let config = small_config(
        dir.path(),
        &format!("[events]\nrouters = [\"127.0.0.1:{ev}\"]\nworker_id = 42\n"),
    );
    let router = start_router(ev, http);
    let daemon = DaemonProc::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut e = TestEngine::attach(&daemon.socket, "ev").unwrap();
    let hashes: Vec<u64> = (0..6).map(|i| 0xABC0 + i).collect();
    let ops: Vec<(u64, u64, u32)> = hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| (h, if i == 0 { 0 } else { hashes[i - 1] }, i as u32))
        .collect();
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

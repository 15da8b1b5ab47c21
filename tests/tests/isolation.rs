//! Isolation between tenants, with a real daemon: per-namespace quotas hold one tenant's
//! flood to its own share, so a quiet tenant's hit rate and latency stay within a stated
//! bound; and the daemon gives up its privileges once set up.

use std::path::Path;
use std::time::{Duration, Instant};

use kvplane_ffi::Opcode;
use kvplane_tests::{
    DaemonProc, NamespaceConfig, TEST_PAGES, TestEngine, chain_ops, control_addr, http_get,
    kvplane_bin, small_config, status_json, temp_dir, with_ephemeral_metrics,
};

/// The small config's block (see `TestEngine`).
const BLOCK_BYTES: u64 = 65536;
/// The flooding tenant's host quota, in blocks.
const FLOOD_QUOTA_BLOCKS: u64 = 32;
/// The quiet tenant's working set: 3 chains of 8 blocks (24 of the engine's 32 pages).
const QUIET_CHAINS: u64 = 3;
const CHAIN_BLOCKS: u64 = 8;

fn chain(salt: u64, first_page: u32) -> Vec<(u64, u64, u32)> {
    let hashes: Vec<u64> = (0..CHAIN_BLOCKS)
        .map(|i| 0xF100D ^ (salt << 24) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    chain_ops(&hashes, first_page)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn config(dir: &Path, flood_quota: bool) -> std::path::PathBuf {
    let uid = euid();
    small_config(dir, |c| {
        with_ephemeral_metrics(c);
        let mut flood = NamespaceConfig::new("flood", vec![uid]);
        if flood_quota {
            flood.max_host_bytes = Some(FLOOD_QUOTA_BLOCKS * BLOCK_BYTES);
        }
        c.namespaces = vec![NamespaceConfig::new("quiet", vec![uid]), flood];
    })
}

struct QuietReport {
    /// Blocks loaded / blocks asked for.
    hit_rate: f64,
    p50_us: f64,
    p99_us: f64,
    loads: usize,
}

/// The quiet tenant loads its chains over and over for `duration`, checking every byte
/// (pages are poisoned before each load).
fn quiet_loads(e: &mut TestEngine, originals: &[Vec<u8>], duration: Duration) -> QuietReport {
    let (mut asked, mut hit) = (0u64, 0u64);
    let mut lat_us = Vec::new();
    let t0 = Instant::now();
    let mut c = 0u64;
    while t0.elapsed() < duration {
        let first = (c % QUIET_CHAINS) as u32 * CHAIN_BLOCKS as u32;
        let ops = chain(c % QUIET_CHAINS, first);
        for &(_, _, page) in &ops {
            e.poison_page(page);
        }
        let t = Instant::now();
        let (cqe, _) = e.block_op(Opcode::Load, 0, &ops);
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        asked += CHAIN_BLOCKS;
        hit += u64::from(cqe.blocks);
        for &(_, _, page) in &ops[..cqe.blocks as usize] {
            assert!(
                e.read_page(page) == originals[page as usize],
                "quiet tenant: page {page} loaded with wrong bytes"
            );
        }
        c += 1;
    }
    lat_us.sort_by(f64::total_cmp);
    let pct = |p: f64| lat_us[((lat_us.len() - 1) as f64 * p) as usize];
    QuietReport {
        hit_rate: hit as f64 / asked as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        loads: lat_us.len(),
    }
}

/// Saves fresh chains in the flood namespace as fast as the daemon takes them, for
/// `duration`; returns (chains saved, blocks of all of them still found by LOOKUP).
fn flood(socket: &Path, duration: Duration) -> (u64, u64) {
    let mut e = TestEngine::attach(socket, "flood").unwrap();
    for p in 0..TEST_PAGES as u32 {
        e.fill_page(p, 0xBAD ^ u64::from(p));
    }
    let t0 = Instant::now();
    let mut chains = 0u64;
    while t0.elapsed() < duration {
        let (c, _) = e.block_op(Opcode::Save, 0, &chain(1_000 + chains, 0));
        assert_eq!(c.status, 0, "flood save: {c:?}");
        chains += 1;
    }
    let mut found = 0u64;
    for s in 0..chains {
        found += u64::from(e.block_op(Opcode::Lookup, 0, &chain(1_000 + s, 0)).0.blocks);
    }
    (chains, found)
}

/// The daemon's `/status`, `/metrics` and `kvplane status` table after a flood.
struct Reports {
    status: serde_json::Value,
    metrics: String,
    table: String,
}

/// Runs the quiet tenant alone, then under a flood; returns (alone, flooded, flood stats,
/// the daemon's reports after the flood).
fn quiet_vs_flood(flood_quota: bool) -> (QuietReport, QuietReport, (u64, u64), Reports) {
    let dir = temp_dir("isolation");
    let cfg = config(dir.path(), flood_quota);
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut quiet = TestEngine::attach(&daemon.socket, "quiet").unwrap();
    for c in 0..QUIET_CHAINS {
        let first = c as u32 * CHAIN_BLOCKS as u32;
        let ops = chain(c, first);
        for &(h, _, page) in &ops {
            quiet.fill_page(page, h);
        }
        let (cqe, _) = quiet.block_op(Opcode::Save, 0, &ops);
        assert_eq!(cqe.blocks as u64, CHAIN_BLOCKS, "quiet save: {cqe:?}");
    }
    let originals: Vec<Vec<u8>> = (0..TEST_PAGES as u32).map(|p| quiet.read_page(p)).collect();
    let alone = quiet_loads(&mut quiet, &originals, Duration::from_millis(1500));
    let socket = daemon.socket.clone();
    let flooder = std::thread::spawn(move || flood(&socket, Duration::from_secs(3)));
    // Let the flood fill the pool first, then measure while it goes on.
    std::thread::sleep(Duration::from_millis(500));
    let flooded = quiet_loads(&mut quiet, &originals, Duration::from_millis(2000));
    let flood_stats = flooder.join().unwrap();
    let addr = control_addr(&daemon);
    let (code, metrics) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    let out = std::process::Command::new(kvplane_bin())
        .args(["status", "--socket", &addr])
        .output()
        .expect("run kvplane status");
    assert!(out.status.success());
    let reports = Reports {
        status: status_json(&addr),
        metrics,
        table: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    (alone, flooded, flood_stats, reports)
}

/// The bound this test states: under a flood from a tenant held to its quota, the quiet
/// tenant keeps every block (hit rate 1.0, bytes verified), and its p99 load latency stays
/// within 10x its unloaded p99 plus 2 ms (the flooder shares the 2 cores; what the quota
/// guarantees is the hit rate, the latency bound guards against stalls).
#[test]
fn a_flooding_tenant_held_to_its_quota_leaves_the_quiet_tenants_hits_and_latency_in_bound() {
    let (alone, flooded, (chains, found), reports) = quiet_vs_flood(true);
    let Reports {
        status,
        metrics,
        table,
    } = reports;
    eprintln!(
        "quiet alone: hit {:.3}, p50 {:.0} us, p99 {:.0} us ({} loads); under flood: hit {:.3}, \
         p50 {:.0} us, p99 {:.0} us ({} loads); flood saved {chains} chains, {found} blocks kept",
        alone.hit_rate,
        alone.p50_us,
        alone.p99_us,
        alone.loads,
        flooded.hit_rate,
        flooded.p50_us,
        flooded.p99_us,
        flooded.loads,
    );
    assert_eq!(alone.hit_rate, 1.0);
    assert_eq!(flooded.hit_rate, 1.0, "the flood evicted the quiet tenant");
    assert!(
        flooded.p99_us <= alone.p99_us * 10.0 + 2000.0,
        "quiet p99 {:.0} us under flood vs {:.0} us alone",
        flooded.p99_us,
        alone.p99_us
    );
    // The flood really was one: it saved far more than its quota, and kept only its quota.
    assert!(
        chains * CHAIN_BLOCKS > 4 * FLOOD_QUOTA_BLOCKS,
        "flood too small: {chains} chains"
    );
    assert!(
        found <= FLOOD_QUOTA_BLOCKS,
        "flood holds {found} blocks, quota {FLOOD_QUOTA_BLOCKS}"
    );
    assert!(found > 0, "the flooder keeps a cache of its own");
    // The daemon reports the quota and what each namespace holds.
    let ns = status["namespaces"].as_array().expect("namespaces");
    let flood = ns
        .iter()
        .find(|n| n["namespace"] == "flood")
        .expect("flood");
    assert_eq!(flood["quota_blocks"][1], FLOOD_QUOTA_BLOCKS, "{flood}");
    assert!(flood["used_blocks"][1].as_u64().unwrap() <= FLOOD_QUOTA_BLOCKS);
    assert!(
        metrics.contains(&format!(
            "kvplane_namespace_quota_blocks{{namespace=\"flood\",tier=\"host\"}} {FLOOD_QUOTA_BLOCKS}\n"
        )),
        "{metrics}"
    );
    let line = table
        .lines()
        .find(|l| l.contains("namespace flood"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains(&format!("/{FLOOD_QUOTA_BLOCKS}")), "{line}");
}

/// The control: the same flood without a quota does evict the quiet tenant (so the test
/// above measures the quota, not a pool too large to fill).
#[test]
fn without_a_quota_the_same_flood_evicts_the_quiet_tenant() {
    let (alone, flooded, (chains, found), _) = quiet_vs_flood(false);
    eprintln!(
        "no quota: quiet hit alone {:.3}, under flood {:.3}; flood saved {chains} chains, \
         {found} blocks kept",
        alone.hit_rate, flooded.hit_rate
    );
    assert_eq!(alone.hit_rate, 1.0);
    assert!(
        flooded.hit_rate < 1.0,
        "expected the unlimited flood ({chains} chains, {found} kept) to evict quiet blocks"
    );
    assert!(found > FLOOD_QUOTA_BLOCKS);
}

fn proc_status(pid: u32, task: Option<&str>) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(path).unwrap_or_default()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or("")
}

/// These checks need a daemon started as root (it drops what root holds); the tests run
/// as root here and in CI, so another uid is a failure, not a pass.
fn assert_root(what: &str) {
    assert_eq!(
        euid(),
        0,
        "{what}: this test starts the daemon as root and checks what it gives up; run it as root"
    );
}

/// Every thread of the daemon holds no capability once it serves, has no_new_privs and an
/// empty bounding set (it was started as root); it still serves saves and loads.
fn assert_unprivileged(daemon: &DaemonProc) {
    assert_root("the empty capability bounding set");
    let pid = daemon.child.id();
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 1, "the daemon runs threads: {tasks:?}");
    for t in &tasks {
        let s = proc_status(pid, Some(t));
        if s.is_empty() {
            continue; // a thread that ended meanwhile
        }
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            assert_eq!(
                u64::from_str_radix(field(&s, set), 16).unwrap(),
                0,
                "thread {t}: {set} {}",
                field(&s, set)
            );
        }
        assert_eq!(field(&s, "CapBnd:"), "0000000000000000", "thread {t}");
        assert_eq!(field(&s, "NoNewPrivs:"), "1", "thread {t}");
    }
}

#[test]
fn privileges_are_dropped_after_setup_and_the_daemon_still_serves() {
    let dir = temp_dir("privs");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut e = TestEngine::attach(&daemon.socket, "tenant").unwrap();
    let ops = chain(7, 0);
    for &(h, _, p) in &ops {
        e.fill_page(p, h);
    }
    let want: Vec<Vec<u8>> = ops.iter().map(|o| e.read_page(o.2)).collect();
    assert_eq!(
        e.block_op(Opcode::Save, 0, &ops).0.blocks as u64,
        CHAIN_BLOCKS
    );
    assert_unprivileged(&daemon);
    for &(_, _, p) in &ops {
        e.poison_page(p);
    }
    assert_eq!(
        e.block_op(Opcode::Load, 0, &ops).0.blocks as u64,
        CHAIN_BLOCKS
    );
    for (i, o) in ops.iter().enumerate() {
        assert!(e.read_page(o.2) == want[i]);
    }
    // A second session attaches after the drop (socket, memfd mapping, pidfd all work).
    let mut f = TestEngine::attach(&daemon.socket, "tenant").unwrap();
    assert_eq!(
        f.block_op(Opcode::Lookup, 0, &ops).0.blocks as u64,
        CHAIN_BLOCKS
    );
}

/// Started as root with `run_as_uid`, the daemon serves as that uid (root's engines still
/// attach: the allowed uid is the one that started the daemon).
#[test]
fn run_as_uid_switches_user_after_setup() {
    assert_root("run_as_uid switches users");
    let dir = temp_dir("runas");
    let cfg = small_config(dir.path(), |c| {
        c.serve.run_as_uid = Some(65534);
        c.serve.run_as_gid = Some(65534);
    });
    let daemon = DaemonProc::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    // The engine socket is bound (and connectable) just before the switch: wait for it.
    let t0 = Instant::now();
    while !daemon.log_text().contains("privileges dropped") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no privilege drop logged:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = proc_status(daemon.child.id(), None);
    assert!(
        field(&s, "Uid:").split_whitespace().all(|u| u == "65534"),
        "{s}"
    );
    assert!(
        field(&s, "Gid:").split_whitespace().all(|g| g == "65534"),
        "{s}"
    );
    assert_eq!(field(&s, "Groups:"), "");
    assert_unprivileged(&daemon);
    let mut e = TestEngine::attach(&daemon.socket, "tenant").unwrap();
    let ops = chain(9, 0);
    assert_eq!(
        e.block_op(Opcode::Save, 0, &ops).0.blocks as u64,
        CHAIN_BLOCKS
    );
    assert_eq!(
        e.block_op(Opcode::Lookup, 0, &ops).0.blocks as u64,
        CHAIN_BLOCKS
    );
}

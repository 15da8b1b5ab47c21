//! Block operations end to end against real `kvplane serve` processes: bit-identical
//! save/load, a SIGKILLed daemon restarted from its NVMe slots, a corrupt slot reported
//! and not served, namespaces isolated, and leases of a killed engine released.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, SQE_F_PREFIX_ONLY, SQE_F_WRITE_THROUGH, Status, Tier};
use kvplane_tests::{
    DaemonProc, TestEngine, chain_ops, kvplane_bin, lib_dir, repo_root, signal, small_config,
    temp_dir, with_nvme,
};

fn chain(n: u64, salt: u64) -> Vec<u64> {
    (0..n)
        .map(|i| 0xC0FFEE ^ (salt << 32) ^ (i * 0x9E37_79B9))
        .collect()
}

#[test]
fn save_then_load_is_bit_identical_and_lookup_reports_the_prefix() {
    let dir = temp_dir("blocks");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut e = TestEngine::attach(&daemon.socket, "ns-a").unwrap();
    let hashes = chain(8, 1);
    for (i, &h) in hashes.iter().enumerate() {
        e.fill_page(i as u32, h);
    }
    let originals: Vec<Vec<u8>> = (0..8).map(|p| e.read_page(p)).collect();
    let (c, _) = e.block_op(Opcode::Save, 0, &chain_ops(&hashes, 0));
    assert_eq!(
        (c.status, c.blocks, c.bytes, u32::from(c.tier)),
        (0, 8, 8 * 65536, Tier::Host.raw()),
        "{c:?}"
    );
    // Lookup of a longer chain: the 8 leading blocks, then a miss.
    let mut longer = hashes.clone();
    longer.push(12345);
    let (c, ops) = e.block_op(Opcode::Lookup, 0, &chain_ops(&longer, 0));
    assert_eq!((c.status, c.blocks), (0, 8));
    assert!(ops[..8].iter().all(|o| o.tier == Tier::Host.raw() as u8));
    assert_eq!(ops[8].tier, Tier::NONE_RAW as u8);
    // Load into other pages (16..24), poisoned first: every byte must come back.
    for p in 16..24 {
        e.poison_page(p);
    }
    let (c, _) = e.block_op(Opcode::Load, 0, &chain_ops(&hashes, 16));
    assert_eq!((c.status, c.blocks, c.bytes), (0, 8, 8 * 65536), "{c:?}");
    for i in 0..8 {
        assert!(
            e.read_page(16 + i) == originals[i as usize],
            "page {} differs after load",
            16 + i
        );
    }
    // Missing block: NotFound with its index, or the prefix with PREFIX_ONLY.
    let (c, _) = e.block_op(Opcode::Load, 0, &chain_ops(&longer, 16));
    assert_eq!(
        (c.status, c.blocks, c.detail),
        (Status::NotFound.raw(), 8, 8)
    );
    let (c, _) = e.block_op(Opcode::Load, SQE_F_PREFIX_ONLY, &chain_ops(&longer, 16));
    assert_eq!((c.status, c.blocks), (0, 8));
    // A page id outside the pool is refused before any copy.
    let (c, _) = e.block_op(Opcode::Load, 0, &[(hashes[0], 0, 999)]);
    assert_eq!(c.status, Status::BadArg.raw());
    // Drop, then the lookup misses.
    let (c, _) = e.block_op(Opcode::Drop, 0, &chain_ops(&hashes[7..], 0));
    assert_eq!((c.status, c.blocks), (0, 1));
    let (c, _) = e.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0));
    assert_eq!(c.blocks, 7);
}

#[test]
fn save_before_layout_and_a_bad_layout_are_refused() {
    let dir = temp_dir("layout");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut e = TestEngine::attach(&daemon.socket, "ns").unwrap();
    // A layout whose block size differs from the daemon's (two layers instead of four).
    let mut bad = e.layout;
    bad.num_layers = 2;
    let c = e.op(
        Opcode::AttachLayout,
        0,
        kvplane_ffi::as_bytes(&bad).to_vec(),
        0,
        0,
    );
    assert_eq!(c.status, Status::BadArg.raw());
    // A layout reaching past the buffer.
    let mut bad = e.layout;
    bad.num_pages = 1 << 40;
    let c = e.op(
        Opcode::AttachLayout,
        0,
        kvplane_ffi::as_bytes(&bad).to_vec(),
        0,
        0,
    );
    assert_eq!(c.status, Status::BadArg.raw());
    // An engine without a KV buffer cannot save.
    let mut opts = kvplane_shm::AttachOptions::new(&daemon.socket);
    opts.namespaces = vec!["ns".into()];
    let mut s = kvplane_shm::Session::attach(opts).unwrap();
    let mut qp = s.take_queue_pairs().unwrap().remove(0);
    qp.write_arena(0, &[0u8; 24]).unwrap();
    let mut sqe = kvplane_shm::client::sqe(Opcode::Save, 1);
    sqe.count = 1;
    sqe.arg_len = 24;
    assert_eq!(
        qp.call(sqe, Duration::from_secs(5)).unwrap().status,
        Status::NoLayout.raw()
    );
}

#[test]
fn namespaces_never_see_each_others_blocks() {
    let dir = temp_dir("ns");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut a = TestEngine::attach(&daemon.socket, "tenant-a").unwrap();
    let mut b = TestEngine::attach(&daemon.socket, "tenant-b").unwrap();
    let hashes = chain(4, 2);
    for (i, &h) in hashes.iter().enumerate() {
        a.fill_page(i as u32, h);
    }
    assert_eq!(
        a.block_op(Opcode::Save, 0, &chain_ops(&hashes, 0)).0.blocks,
        4
    );
    // The same hashes (a guessed or colliding key) from another namespace: nothing.
    assert_eq!(
        b.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0))
            .0
            .blocks,
        0
    );
    let (c, _) = b.block_op(Opcode::Load, 0, &chain_ops(&hashes, 0));
    assert_eq!((c.status, c.blocks), (Status::NotFound.raw(), 0));
    assert_eq!(
        b.block_op(Opcode::Drop, 0, &chain_ops(&hashes, 0)).0.blocks,
        0
    );
    let c = b.op(Opcode::ClearNamespace, 0, Vec::new(), 0, 0);
    assert_eq!((c.status, c.blocks), (0, 0));
    assert_eq!(
        a.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0))
            .0
            .blocks,
        4,
        "a's blocks survive b's clear"
    );
}

#[test]
fn daemon_killed_after_write_through_saves_restarts_with_every_block_and_drops_a_corrupt_slot() {
    let dir = temp_dir("restart");
    let nvme = dir.path().join("nvme.slots");
    let config = small_config(dir.path(), |c| with_nvme(c, &nvme, 8 << 20));
    let cfg = config.to_str().unwrap();
    let hashes = chain(12, 3);
    let originals: Vec<Vec<u8>>;
    {
        let mut daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
        let mut e = TestEngine::attach(&daemon.socket, "durable").unwrap();
        for (i, &h) in hashes.iter().enumerate() {
            e.fill_page(i as u32, h);
        }
        originals = (0..12).map(|p| e.read_page(p)).collect();
        let (c, _) = e.block_op(Opcode::Save, SQE_F_WRITE_THROUGH, &chain_ops(&hashes, 0));
        assert_eq!(
            (c.status, c.blocks, u32::from(c.tier)),
            (0, 12, Tier::Nvme.raw()),
            "{c:?}"
        );
        signal(daemon.pid(), libc::SIGKILL);
        daemon.child.wait().unwrap();
    }
    // Corrupt one block's data on disk (flip bytes in the middle of the file's 4th slot).
    let mut disk = std::fs::read(&nvme).unwrap();
    let slot_bytes = 4096 + 65536;
    let victim = (0..disk.len() / slot_bytes)
        .find(|s| disk[s * slot_bytes..s * slot_bytes + 8] != [0u8; 8])
        .map(|s| s + 3)
        .unwrap();
    for b in &mut disk[victim * slot_bytes + 4096 + 1000..victim * slot_bytes + 4096 + 1010] {
        *b ^= 0xFF;
    }
    std::fs::write(&nvme, &disk).unwrap();

    let daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
    let mut e = TestEngine::attach(&daemon.socket, "durable").unwrap();
    let (c, _) = e.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0));
    assert_eq!(c.blocks, 12, "the index was rebuilt from the slots");
    let mut served = 0;
    let mut corrupt = 0;
    for (i, &h) in hashes.iter().enumerate() {
        e.poison_page(20);
        let (c, ops) = e.block_op(
            Opcode::Load,
            0,
            &[(h, if i == 0 { 0 } else { hashes[i - 1] }, 20)],
        );
        if c.status == 0 {
            assert_eq!(ops[0].tier, Tier::Nvme.raw() as u8);
            assert!(
                e.read_page(20) == originals[i],
                "block {i} loaded back differs"
            );
            served += 1;
        } else {
            assert_eq!(c.status, Status::Corrupt.raw(), "block {i}: {c:?}");
            corrupt += 1;
        }
    }
    assert_eq!(
        (served, corrupt),
        (11, 1),
        "every intact block served bit-identical, the corrupt one refused"
    );
    let log = daemon.log_text();
    assert!(log.contains("NVMe index rebuilt"), "{log}");
}

#[test]
fn leases_of_a_killed_engine_are_released() {
    let dir = temp_dir("lease");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut owner = TestEngine::attach(&daemon.socket, "leases").unwrap();
    let hashes = chain(3, 4);
    for (i, &h) in hashes.iter().enumerate() {
        owner.fill_page(i as u32, h);
    }
    assert_eq!(
        owner
            .block_op(Opcode::Save, 0, &chain_ops(&hashes, 0))
            .0
            .blocks,
        3
    );
    // A separate engine process (Python, through libkvplane) pins them, then is killed.
    let script = format!(
        r#"
import sys, ctypes
sys.path.insert(0, {root:?})
import kvplane
c = kvplane.Client({sock:?}, namespaces=["leases"])
q = c.queue(0)
ops = (kvplane.BlockOp * 3)(*[kvplane.BlockOp(hash=h) for h in {hashes:?}])
q.write_arena(0, bytes(ops))
q.submit([kvplane.Sqe(user_data=1, opcode=kvplane.OP_PIN, arg_len=72, count=3)])
done = q.wait()
print("pinned", done[0].status, done[0].blocks, flush=True)
sys.stdin.read()
"#,
        root = repo_root().join("ffi/python").display().to_string(),
        sock = daemon.socket.display().to_string(),
        hashes = hashes
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .env("KVPLANE_LIB", lib_dir().join("libkvplane.so"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "pinned 0 3");
    // Leased: a drop keeps them (detail = busy count).
    let (c, _) = owner.block_op(Opcode::Drop, 0, &chain_ops(&hashes, 0));
    assert_eq!((c.blocks, c.detail), (0, 3));
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let (c, _) = owner.block_op(Opcode::Drop, 0, &chain_ops(&hashes, 0));
        if c.blocks == 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "leases not released after the engine died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kvplane_bin();
}

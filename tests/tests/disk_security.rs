//! Issue 17, findings 3 and 4, against real `kvplane serve` processes: a tenant who can
//! write the NVMe tier cannot plant blocks in another tenant's namespace, and the daemon
//! refuses, and leaves alone, a file another user pointed its NVMe path at.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvplane_ffi::{Opcode, SQE_F_WRITE_THROUGH, Status, Tier};
use kvplane_tests::{
    DaemonProc, TestEngine, chain_ops, serve_until_exit, signal, small_config, temp_dir, with_nvme,
};

const SLOT_BYTES: u64 = 4096 + 65536;
const OTHER_UID: &str = "65534";

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test acts as uid {OTHER_UID} and needs root");
}

/// Runs `argv` as uid/gid 65534 with no supplementary groups (util-linux `setpriv`).
fn as_other_user(argv: &[&str]) {
    let status = Command::new("setpriv")
        .args(["--reuid", OTHER_UID, "--regid", OTHER_UID, "--clear-groups"])
        .args(argv)
        .status()
        .expect("setpriv (util-linux) runs");
    assert!(status.success(), "{argv:?} as uid {OTHER_UID}: {status}");
}

/// Recomputes a slot header's checksum after an edit, as an attacker who knows the public
/// format does: format 1 sums bytes 0..64 into 64..72, format 2 bytes 0..96 into 96..104.
/// (Handling both lets this test show the attack on the format-1 daemon too.)
fn fix_header_checksum(page: &mut [u8]) {
    let end = match u32::from_le_bytes(page[8..12].try_into().unwrap()) {
        1 => 64,
        _ => 96,
    };
    let sum = kvplane_kernels::checksum64(&page[..end]);
    page[end..end + 8].copy_from_slice(&sum.to_le_bytes());
}

/// The headers of every used slot: (slot, namespace, hash, generation).
fn slots_on_disk(file: &std::fs::File) -> Vec<(u64, u32, u64, u64)> {
    let len = file.metadata().unwrap().len();
    (0..len / SLOT_BYTES)
        .filter_map(|s| {
            let mut h = [0u8; 64];
            file.read_exact_at(&mut h, s * SLOT_BYTES).unwrap();
            (h[..8] != [0u8; 8]).then(|| {
                let ns = u32::from_le_bytes(h[16..20].try_into().unwrap());
                (s, ns, u64_at(&h, 24), u64_at(&h, 48))
            })
        })
        .collect()
}

#[test]
fn a_tenant_who_can_write_the_tier_cannot_plant_blocks_in_another_namespace() {
    let dir = temp_dir("plant");
    let nvme = dir.path().join("nvme.slots");
    let config = small_config(dir.path(), |c| with_nvme(c, &nvme, 8 << 20));
    let cfg = config.to_str().unwrap();
    let hashes: Vec<u64> = (0..6u64).map(|i| 0x5EC0_0000 + i * 7919).collect();
    let originals: Vec<Vec<u8>>;
    {
        let mut daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
        let mut victim = TestEngine::attach(&daemon.socket, "victim").unwrap();
        let mut evil = TestEngine::attach(&daemon.socket, "evil").unwrap();
        for (i, &h) in hashes.iter().enumerate() {
            victim.fill_page(i as u32, h);
            evil.fill_page(i as u32, h ^ 0xBAD);
        }
        originals = (0..6).map(|p| victim.read_page(p)).collect();
        for e in [&mut victim, &mut evil] {
            let (c, _) = e.block_op(Opcode::Save, SQE_F_WRITE_THROUGH, &chain_ops(&hashes, 0));
            assert_eq!(
                (c.status, c.blocks, u32::from(c.tier)),
                (0, 6, Tier::Nvme.raw()),
                "{c:?}"
            );
        }
        signal(daemon.pid(), libc::SIGKILL);
        daemon.child.wait().unwrap();
    }
    // The attacker (the file's group could write it before) reads the headers: the same
    // hashes twice, the victim's copies written first (lower generations).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&nvme)
        .unwrap();
    let slots = slots_on_disk(&file);
    assert_eq!(slots.len(), 12);
    let copy = |hash: u64| {
        let mut two: Vec<_> = slots.iter().filter(|s| s.2 == hash).copied().collect();
        two.sort_by_key(|s| s.3);
        (two[0], two[1]) // (victim's, evil's)
    };
    // Block 2: evil's slot relabelled as the victim's, with a newer generation so it would
    // win over the victim's own copy; the header checksum recomputed.
    let (v2, e2) = copy(hashes[2]);
    let mut page = vec![0u8; 4096];
    file.read_exact_at(&mut page, e2.0 * SLOT_BYTES).unwrap();
    page[16..20].copy_from_slice(&v2.1.to_le_bytes());
    page[48..56].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fix_header_checksum(&mut page);
    file.write_all_at(&page, e2.0 * SLOT_BYTES).unwrap();
    // Block 4: the victim's own slot given evil's block, with every checksum recomputed.
    let (v4, e4) = copy(hashes[4]);
    let mut block = vec![0u8; 65536];
    file.read_exact_at(&mut block, e4.0 * SLOT_BYTES + 4096)
        .unwrap();
    file.read_exact_at(&mut page, v4.0 * SLOT_BYTES).unwrap();
    page[56..64].copy_from_slice(&kvplane_kernels::checksum64(&block).to_le_bytes());
    fix_header_checksum(&mut page);
    file.write_all_at(&block, v4.0 * SLOT_BYTES + 4096).unwrap();
    file.write_all_at(&page, v4.0 * SLOT_BYTES).unwrap();
    drop(file);

    let daemon = DaemonProc::start(dir.path(), &["--config", cfg]);
    let mut victim = TestEngine::attach(&daemon.socket, "victim").unwrap();
    let mut served = 0;
    for (i, &h) in hashes.iter().enumerate() {
        victim.poison_page(20);
        let parent = if i == 0 { 0 } else { hashes[i - 1] };
        let (c, _) = victim.block_op(Opcode::Load, 0, &[(h, parent, 20)]);
        let page = victim.read_page(20);
        if c.status == 0 && c.blocks == 1 {
            assert!(
                page == originals[i],
                "block {i}: the victim got other bytes"
            );
            served += 1;
        } else {
            // Its only copy was refused by the scan: not found, nothing written.
            assert_eq!(i, 4, "only block 4 lost its genuine copy: {c:?}");
            assert_eq!(c.status, Status::NotFound.raw(), "{c:?}");
            assert!(page.iter().all(|&b| b == 0xEE), "block {i}: page written");
        }
    }
    assert_eq!(served, 5, "blocks 0-3 and 5 are the victim's own");
    let log = daemon.log_text();
    assert!(log.contains("header MAC mismatch"), "{log}");
    assert!(
        log.contains("corrupt=2"),
        "both forged slots refused by the scan: {log}"
    );
    assert_eq!(
        std::fs::metadata(&nvme).unwrap().permissions().mode() & 0o777,
        0o600,
        "the tier file is the daemon's alone"
    );
}

#[test]
fn serve_refuses_an_nvme_path_another_user_linked_and_leaves_the_target_alone() {
    require_root();
    let dir = temp_dir("link");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = dir.path().join("root-owned");
    std::fs::write(&victim, b"not a cache").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = shared.join("nvme.slots");
    as_other_user(&["ln", "-s", victim.to_str().unwrap(), link.to_str().unwrap()]);
    let config = small_config(dir.path(), |c| with_nvme(c, &link, 8 << 20));
    let log = dir.path().join("serve.log");
    // It must exit at start-up; a daemon that is still up has accepted the link.
    let socket = dir.path().join("kvplane.sock");
    let Some(status) = serve_until_exit(&config, &socket, &log, Duration::from_secs(20)) else {
        panic!(
            "kvplane serve started on the planted link; the target is now {} bytes",
            std::fs::metadata(&victim).unwrap().len()
        );
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&link.display().to_string()) && stderr.contains("owned by uid 65534"),
        "the error names the path and the reason: {stderr}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"not a cache");
    assert!(!Path::new(&format!("{}.key", link.display())).exists());
}

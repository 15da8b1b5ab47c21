//! Memory an engine provides cannot hurt the daemon (issue 17, findings 1, 7 and 9), on a
//! real `kvplane serve`:
//! - backing that can vanish is refused at attach (hugetlb by default, memfds that can
//!   shrink, files that are not memfds, a size other than the announced one);
//! - when it vanishes anyway (hugetlb allowed by the operator, its page punched out while
//!   the pool is empty), the copy's SIGBUS fails that op and ends that session only: the
//!   daemon lives and its other sessions keep serving;
//! - a hole punched in a plain memfd is harmless;
//! - the engine memory the daemon maps is capped (daemon-wide and per namespace): sparse
//!   memfds of tens of TiB are refused and the daemon's address space stays bounded;
//! - a layout whose pages do not fit the region it describes (num_pages = 2^64 - 1) is
//!   refused with a clear error.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use kvplane_ffi::{Opcode, Status};
use kvplane_shm::{AttachOptions, Session, ShmError, sys};
use kvplane_tests::{
    DaemonProc, NamespaceConfig, TEST_KV_BYTES, TestEngine, chain_ops, control_addr, http_get,
    proc_status_kib, small_config, temp_dir, with_ephemeral_metrics,
};

const HUGEPAGE: u64 = 2 << 20;
const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn memfd(name: &str, flags: u32, bytes: u64) -> OwnedFd {
    let file = File::from(sys::memfd_create(name, flags).expect("memfd_create"));
    file.set_len(bytes).expect("size the memfd");
    file.into()
}

/// A hugetlb memfd of one hugepage, sealed against shrinking: what today's handshake
/// accepted.
fn hugetlb_memfd() -> OwnedFd {
    let fd = memfd(
        "hugetlb-kv",
        libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING,
        TEST_KV_BYTES,
    );
    sys::seal_no_shrink(fd.as_raw_fd()).expect("seal");
    fd
}

fn punch_hole(fd: &OwnedFd, bytes: u64) {
    // SAFETY: fallocate on our own fd, no memory arguments.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            bytes as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
}

fn attach_raw(
    socket: &Path,
    namespace: &str,
    fd: OwnedFd,
    bytes: u64,
) -> Result<Session, ShmError> {
    let mut opts = AttachOptions::new(socket);
    opts.namespaces = vec![namespace.to_string()];
    opts.host_kv_buffer(fd, bytes);
    Session::attach(opts)
}

fn expect_refused(r: Result<Session, ShmError>, status: Status, says: &str) {
    match r {
        Ok(_) => panic!("attach accepted; expected a refusal saying {says:?}"),
        Err(ShmError::AttachRefused { status: s, message }) => {
            assert_eq!(s, status.raw(), "{message}");
            assert!(
                message.contains(says),
                "refusal {message:?} does not say {says:?}"
            );
        }
        Err(e) => panic!("expected a refusal saying {says:?}, got {e}"),
    }
}

/// Retries `attach` for up to 5 s: what a detached session held comes back once the
/// daemon has ended it, a moment after the engine let go.
fn attach_within_5s<T>(what: &str, mut attach: impl FnMut() -> Result<T, ShmError>) -> T {
    let t0 = Instant::now();
    loop {
        match attach() {
            Ok(attached) => return attached,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(5), "{what}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An attach in namespace "ns" with `n` host memfd regions of one page each.
fn attach_regions(socket: &Path, n: usize) -> Result<Session, ShmError> {
    let mut opts = AttachOptions::new(socket);
    opts.namespaces = vec!["ns".to_string()];
    for _ in 0..n {
        let fd = sys::memfd_create_sealed("kv-part", 4096).expect("memfd");
        opts.host_kv_buffer(fd, 4096);
    }
    Session::attach(opts)
}

/// Saves pages `0..n` of `e` under hashes from `base`, loads them back into pages
/// `n..2n`, and checks every byte.
fn save_and_verify(e: &mut TestEngine, base: u64, n: u32) {
    let hashes: Vec<u64> = (0..u64::from(n)).map(|i| base + i).collect();
    for (i, h) in hashes.iter().enumerate() {
        e.fill_page(i as u32, *h);
    }
    let (c, _) = e.block_op(Opcode::Save, 0, &chain_ops(&hashes, 0));
    assert_eq!((c.status, c.blocks), (0, n), "save {c:?}");
    let (c, _) = e.block_op(Opcode::Load, 0, &chain_ops(&hashes, n));
    assert_eq!((c.status, c.blocks), (0, n), "load {c:?}");
    for (i, h) in hashes.iter().enumerate() {
        assert!(
            e.read_page(n + i as u32) == TestEngine::expected_page(*h),
            "page {} differs after the round trip",
            n + i as u32
        );
    }
}

#[test]
fn buffers_whose_backing_can_vanish_are_refused_at_attach() {
    let dir = temp_dir("engine-mem-refuse");
    let mut daemon = DaemonProc::start(dir.path(), &[]);
    let mut good = TestEngine::attach(&daemon.socket, "ns").expect("a plain memfd attaches");
    // hugetlb: refused by default (no hugepages are needed to show it: the daemon decides
    // before mapping).
    expect_refused(
        attach_raw(&daemon.socket, "ns", hugetlb_memfd(), TEST_KV_BYTES),
        Status::BadArg,
        "hugetlb",
    );
    // A memfd that can still shrink (truncate it under the mapping: SIGBUS).
    expect_refused(
        attach_raw(
            &daemon.socket,
            "ns",
            memfd("unsealed", libc::MFD_ALLOW_SEALING, TEST_KV_BYTES),
            TEST_KV_BYTES,
        ),
        Status::BadArg,
        "F_SEAL_SHRINK",
    );
    // A file on a file system: not a memfd.
    let path = dir.path().join("kv-file");
    File::create(&path)
        .and_then(|mut f| f.write_all(&vec![0u8; TEST_KV_BYTES as usize]))
        .expect("write file");
    let file: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open")
        .into();
    expect_refused(
        attach_raw(&daemon.socket, "ns", file, TEST_KV_BYTES),
        Status::BadArg,
        "not a memfd",
    );
    // Larger than announced (the charge would not be what is mapped) and smaller.
    let big = sys::memfd_create_sealed("big", 2 * TEST_KV_BYTES).expect("memfd");
    expect_refused(
        attach_raw(&daemon.socket, "ns", big, TEST_KV_BYTES),
        Status::BadArg,
        "must equal",
    );
    let small = sys::memfd_create_sealed("small", TEST_KV_BYTES / 2).expect("memfd");
    expect_refused(
        attach_raw(&daemon.socket, "ns", small, TEST_KV_BYTES),
        Status::BadArg,
        "must equal",
    );
    save_and_verify(&mut good, 0x1000, 4);
    assert!(daemon.alive());
}

/// A hole punched in a plain (shmem) memfd after attach: the daemon's next touch gets a
/// fresh zero page, never a fault. Saves of the hole store zeroes; loads refill it.
#[test]
fn a_hole_punched_in_a_plain_memfd_is_harmless() {
    let dir = temp_dir("engine-mem-hole");
    let mut daemon = DaemonProc::start(dir.path(), &[]);
    let fd = sys::memfd_create_sealed("kv", TEST_KV_BYTES).expect("memfd");
    let keep = fd.try_clone().expect("dup");
    let mut e = TestEngine::attach_with_buffer(&daemon.socket, "ns", fd).expect("attach");
    let mut other = TestEngine::attach(&daemon.socket, "ns").expect("attach");
    save_and_verify(&mut e, 0x2000, 4);
    punch_hole(&keep, TEST_KV_BYTES);
    // The punched pages read as zeroes, to the daemon too.
    let hashes = [0x3000u64, 0x3001];
    let (c, _) = e.block_op(Opcode::Save, 0, &chain_ops(&hashes, 0));
    assert_eq!((c.status, c.blocks), (0, 2), "{c:?}");
    let (c, _) = other.block_op(Opcode::Load, 0, &chain_ops(&hashes, 10));
    assert_eq!((c.status, c.blocks), (0, 2), "{c:?}");
    assert!(other.read_page(10).iter().all(|&b| b == 0));
    // Loads into the punched buffer land.
    let (c, _) = e.block_op(Opcode::Load, 0, &chain_ops(&[0x2000, 0x2001], 20));
    assert_eq!((c.status, c.blocks), (0, 2), "{c:?}");
    assert!(e.read_page(20) == TestEngine::expected_page(0x2000));
    save_and_verify(&mut other, 0x4000, 4);
    assert!(daemon.alive());
}

/// The 2 MiB hugepage pool, grown for a test and put back afterwards. Serialised across
/// this crate's tests with a lock file (the pool is machine-wide).
struct HugepagePool {
    nr_before: u64,
    _lock: File,
}

fn read_num(name: &str) -> u64 {
    let p = format!("{HUGEPAGES_DIR}/{name}");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{p}: {e} (hugetlb support is needed)"))
        .trim()
        .parse()
        .expect("a number")
}

fn write_nr(n: u64) -> std::io::Result<()> {
    std::fs::write(format!("{HUGEPAGES_DIR}/nr_hugepages"), n.to_string())
}

impl HugepagePool {
    fn grow_by(extra: u64) -> HugepagePool {
        let lock = File::create(std::env::temp_dir().join("kvplane-tests-hugepages.lock"))
            .expect("lock file");
        // SAFETY: flock on our own fd.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let nr_before = read_num("nr_hugepages");
        write_nr(nr_before + extra).unwrap_or_else(|e| {
            panic!("reserving {extra} hugepages needs root (writing nr_hugepages: {e})")
        });
        let pool = HugepagePool {
            nr_before,
            _lock: lock,
        };
        let nr = read_num("nr_hugepages");
        assert!(
            nr >= nr_before + extra,
            "the kernel gave {} of {extra} hugepages (memory too fragmented?)",
            nr.saturating_sub(nr_before)
        );
        pool
    }

    /// Takes every hugepage nobody has reserved, so the next fault on a hugetlb page
    /// without a reservation fails. Returns the mapping holding them.
    fn exhaust(&self) -> HugeMapping {
        let mut n = read_num("free_hugepages").saturating_sub(read_num("resv_hugepages"));
        while n > 0 {
            let len = (n * HUGEPAGE) as usize;
            // SAFETY: a new private anonymous mapping; the kernel picks the address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE
                        | libc::MAP_ANONYMOUS
                        | libc::MAP_HUGETLB
                        | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                return HugeMapping { ptr: p, len };
            }
            n -= 1; // someone took one meanwhile
        }
        HugeMapping {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

impl Drop for HugepagePool {
    fn drop(&mut self) {
        let _ = write_nr(self.nr_before);
    }
}

struct HugeMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for HugeMapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in `exhaust`, used by nobody else.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// The operator allowed hugetlb KV buffers; the engine punches its page out and the pool
/// is empty: the daemon's copy takes SIGBUS. Before the guard this killed the daemon and
/// every tenant's session; now that op fails (BadArg, the block's index), that session
/// ends, and everything else goes on.
#[test]
fn a_vanished_hugetlb_page_ends_that_session_only() {
    let dir = temp_dir("engine-mem-sigbus");
    let config = small_config(dir.path(), |c| {
        c.serve.allow_hugetlb_kv_buffers = true;
        with_ephemeral_metrics(c);
    });
    let mut daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let mut bystander = TestEngine::attach(&daemon.socket, "ns").expect("attach");
    save_and_verify(&mut bystander, 0x5000, 2);

    let pool = HugepagePool::grow_by(2);
    let fd = hugetlb_memfd();
    let keep = fd.try_clone().expect("dup");
    let mut e = TestEngine::attach_with_buffer(&daemon.socket, "ns", fd)
        .expect("hugetlb buffer accepted when allowed");
    // It works while its page is there.
    save_and_verify(&mut e, 0x6000, 2);
    // Now make it vanish: punch the page out (its reservation goes with it), then take
    // every free hugepage. The engine must not touch its own mapping from here on.
    punch_hole(&keep, TEST_KV_BYTES);
    let hog = pool.exhaust();
    let hashes = [0x7000u64, 0x7001, 0x7002];
    let (c, _) = e.block_op(Opcode::Save, 0, &chain_ops(&hashes, 0));
    assert_eq!(
        c.status,
        Status::BadArg.raw(),
        "save over a vanished page: {c:?}"
    );
    assert_eq!(c.detail, 0, "the first block faulted");
    // That session is over.
    let t0 = Instant::now();
    loop {
        match e.try_block_op(
            Opcode::Lookup,
            0,
            &chain_ops(&hashes, 0),
            Duration::from_secs(2),
        ) {
            Err(ShmError::SessionDead { .. }) => break,
            other => assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the faulted session is still served: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(hog);
    drop(e);
    drop(keep);
    drop(pool);
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("engine KV buffer faulted"), "{log}");
    let (code, metrics) = http_get(&control_addr(&daemon), "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kvplane_engine_memory_faults_total 1\n"),
        "{metrics}"
    );
    // Nothing of the faulted save was stored.
    let (c, ops) = bystander.block_op(Opcode::Lookup, 0, &chain_ops(&hashes, 0));
    assert_eq!(
        c.blocks, 0,
        "a block of the faulted save was published: {ops:?}"
    );
    // The bystander, attached before, and a newcomer keep being served, byte for byte.
    save_and_verify(&mut bystander, 0x8000, 4);
    let mut newcomer = TestEngine::attach(&daemon.socket, "ns").expect("attach after the fault");
    save_and_verify(&mut newcomer, 0x9000, 4);
    let (c, _) = newcomer.block_op(Opcode::Load, 0, &chain_ops(&[0x6000, 0x6001], 8));
    assert_eq!(
        (c.status, c.blocks),
        (0, 2),
        "blocks saved before the fault: {c:?}"
    );
    assert!(newcomer.read_page(8) == TestEngine::expected_page(0x6000));
}

/// Loads fault the same way (the daemon writes into the vanished page).
#[test]
fn a_vanished_hugetlb_page_under_a_load_ends_that_session_only() {
    let dir = temp_dir("engine-mem-sigbus-load");
    let config = small_config(dir.path(), |c| c.serve.allow_hugetlb_kv_buffers = true);
    let mut daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let mut bystander = TestEngine::attach(&daemon.socket, "ns").expect("attach");
    save_and_verify(&mut bystander, 0xa000, 3);
    let pool = HugepagePool::grow_by(2);
    let fd = hugetlb_memfd();
    let keep = fd.try_clone().expect("dup");
    let mut e = TestEngine::attach_with_buffer(&daemon.socket, "ns", fd).expect("attach");
    // Fault the hugepage in first: a hole punch drops the reservation only of pages that
    // exist (an untouched page keeps it, and the daemon's touch would then succeed).
    e.fill_page(5, 1);
    punch_hole(&keep, TEST_KV_BYTES);
    let hog = pool.exhaust();
    let (c, _) = e.block_op(Opcode::Load, 0, &chain_ops(&[0xa000, 0xa001, 0xa002], 5));
    assert_eq!(
        c.status,
        Status::BadArg.raw(),
        "load into a vanished page: {c:?}"
    );
    drop(hog);
    drop(e);
    drop(keep);
    drop(pool);
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.log_text());
    save_and_verify(&mut bystander, 0xb000, 4);
}

#[test]
fn sparse_buffers_past_the_mapped_cap_are_refused_and_address_space_stays_bounded() {
    let dir = temp_dir("engine-mem-cap");
    // Default limit: the machine's physical memory.
    let config = small_config(dir.path(), with_ephemeral_metrics);
    let daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let vm_before_kib = proc_status_kib(daemon.pid(), "VmSize");
    let mut kept = Vec::new();
    for round in 0..6u64 {
        // 16 TiB, sparse: costs the engine nothing, and used to cost the daemon 16 TiB of
        // its 128 TiB address space for as long as the session lived.
        let sparse_bytes = 16u64 << 40;
        let sparse = sys::memfd_create_sealed("sparse", sparse_bytes).expect("sparse memfd");
        expect_refused(
            attach_raw(&daemon.socket, "ns", sparse, sparse_bytes),
            Status::NoSpace,
            "serve.max_mapped_bytes",
        );
        let mut e = TestEngine::attach(&daemon.socket, "ns").expect("a normal buffer attaches");
        save_and_verify(&mut e, 0x10_000 * (round + 1), 2);
        kept.push(e);
    }
    let vm_after_kib = proc_status_kib(daemon.pid(), "VmSize");
    let grown_mib = vm_after_kib.saturating_sub(vm_before_kib) / 1024;
    eprintln!(
        "daemon VmSize {vm_before_kib} KiB -> {vm_after_kib} KiB (+{grown_mib} MiB) over 6 refused 16 TiB buffers and 6 live sessions"
    );
    // Six live sessions (threads, segments, 2 MiB buffers) cost megabytes; one accepted
    // sparse buffer would add 16 TiB.
    assert!(
        grown_mib < 4096,
        "daemon address space grew by {grown_mib} MiB"
    );
    let addr = control_addr(&daemon);
    let (_, metrics) = http_get(&addr, "/metrics");
    let mapped = format!("kvplane_engine_mapped_bytes {}\n", 6 * TEST_KV_BYTES);
    assert!(metrics.contains(&mapped), "{metrics}");
    // Sessions that end give their share back (nothing stays mapped).
    kept.clear();
    let t0 = Instant::now();
    while !http_get(&addr, "/metrics")
        .1
        .contains("kvplane_engine_mapped_bytes 0\n")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "engine memory still counted as mapped after every session ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_namespace_is_held_to_its_mapped_cap() {
    let dir = temp_dir("engine-mem-ns-cap");
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let config = small_config(dir.path(), |c| {
        c.serve.max_mapped_bytes = Some(5 * TEST_KV_BYTES);
        let mut capped = NamespaceConfig::new("capped", vec![uid]);
        capped.max_mapped_bytes = Some(TEST_KV_BYTES * 3 / 2);
        c.namespaces = vec![capped, NamespaceConfig::new("open", vec![uid])];
    });
    let daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let mut first = TestEngine::attach(&daemon.socket, "capped").expect("within the cap");
    let fd = sys::memfd_create_sealed("kv", TEST_KV_BYTES).expect("memfd");
    expect_refused(
        attach_raw(&daemon.socket, "capped", fd, TEST_KV_BYTES),
        Status::NoSpace,
        "namespace `capped`",
    );
    // Other namespaces are not held to it, up to the daemon-wide total (5 buffers).
    let mut open: Vec<TestEngine> = (0..4)
        .map(|_| TestEngine::attach(&daemon.socket, "open").expect("open namespace"))
        .collect();
    let fd = sys::memfd_create_sealed("kv", TEST_KV_BYTES).expect("memfd");
    expect_refused(
        attach_raw(&daemon.socket, "open", fd, TEST_KV_BYTES),
        Status::NoSpace,
        "serve.max_mapped_bytes",
    );
    save_and_verify(&mut first, 0x20_000, 2);
    save_and_verify(&mut open[3], 0x21_000, 2);
    // The charge goes with the session: once `first` detaches, another fits.
    drop(first);
    let mut again = attach_within_5s("cap not released", || {
        TestEngine::attach(&daemon.socket, "capped")
    });
    save_and_verify(&mut again, 0x22_000, 2);
    open.clear();
}

/// Each host region is one of the daemon's mappings, and past `vm.max_map_count` every
/// mmap of the daemon fails, its allocator's included: 64 sessions of 512 small memfds
/// came within a few thousand of the kernel's default 65,530. The regions mapped at once
/// are capped; an attach past the cap is refused, the other sessions keep serving, and
/// a session that ends gives its regions back.
#[test]
fn host_regions_past_the_mapping_cap_are_refused() {
    let dir = temp_dir("engine-mem-regions");
    let config = small_config(dir.path(), |c| {
        with_ephemeral_metrics(c);
        c.serve.max_engine_mappings = Some(3);
        c.serve.max_engine_mappings_per_uid = Some(3);
    });
    let daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let regions = |n: usize| attach_regions(&daemon.socket, n);
    let mut first = TestEngine::attach(&daemon.socket, "ns").expect("one region");
    let two = regions(2).expect("three of three");
    expect_refused(regions(1), Status::NoSpace, "serve.max_engine_mappings");
    save_and_verify(&mut first, 0x30_000, 2);
    let addr = control_addr(&daemon);
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(metrics.contains("kvplane_engine_mappings 3\n"), "{metrics}");
    drop(two);
    let again = attach_within_5s("regions not given back", || regions(2));
    expect_refused(regions(1), Status::NoSpace, "serve.max_engine_mappings");
    save_and_verify(&mut first, 0x31_000, 2);
    drop(again);
}

/// One uid's sessions hold at most their share of the mappings (default: half of the
/// total), so that no tenant takes all of them: here 3 of 10, and its fourth region is
/// refused naming the share while the total has room.
#[test]
fn one_uids_host_regions_are_held_to_its_share_of_the_mappings() {
    let dir = temp_dir("engine-mem-uid-share");
    let config = small_config(dir.path(), |c| {
        c.serve.max_engine_mappings = Some(10);
        c.serve.max_engine_mappings_per_uid = Some(3);
    });
    let daemon = DaemonProc::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let regions = |n: usize| attach_regions(&daemon.socket, n);
    let first = regions(3).expect("three of this uid's three");
    expect_refused(
        regions(1),
        Status::NoSpace,
        "serve.max_engine_mappings_per_uid",
    );
    drop(first);
    attach_within_5s("the share was not given back", || regions(3));
}

/// A cap over half of vm.max_map_count would let engines' regions take the mappings the
/// daemon needs for itself: such a daemon does not start, and says why.
#[test]
fn a_mapping_cap_over_half_the_kernels_map_count_stops_the_daemon() {
    let dir = temp_dir("engine-mem-regions-cap");
    let max_map_count = kvplane_daemon::config::max_map_count();
    let over = u32::try_from(max_map_count / 2 + 1).expect("fits a u32");
    let config = small_config(dir.path(), |c| c.serve.max_engine_mappings = Some(over));
    let log = dir.path().join("serve.log");
    let mut child = std::process::Command::new(kvplane_tests::kvplane_bin())
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .stdout(std::process::Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("run kvplane serve");
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kvplane serve started with a mapping cap over half of vm.max_map_count:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).expect("read the log");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("serve.max_engine_mappings") && stderr.contains("vm.max_map_count"),
        "{stderr}"
    );
}

#[test]
fn a_layout_with_more_pages_than_its_region_is_refused() {
    let dir = temp_dir("engine-mem-layout");
    let daemon = DaemonProc::start(dir.path(), &[]);
    let mut e = TestEngine::attach(&daemon.socket, "ns").expect("attach");
    let attach_layout = |e: &mut TestEngine, l: &kvplane_ffi::kvp_kv_layout| {
        e.op(
            Opcode::AttachLayout,
            0,
            kvplane_ffi::as_bytes(l).to_vec(),
            0,
            0,
        )
    };
    // num_pages = 2^64 - 1 with a page stride of 0: every page aliases the first, so the
    // last page's end fell inside the buffer and the layout was accepted.
    let mut bad = e.layout;
    bad.num_pages = u64::MAX;
    bad.page_stride_bytes = 0;
    let c = attach_layout(&mut e, &bad);
    assert_eq!((c.status, c.detail), (Status::BadArg.raw(), 2), "{c:?}");
    // As many pages as page ids can name, still aliasing: the pages overlap.
    bad.num_pages = 1 << 32;
    let c = attach_layout(&mut e, &bad);
    assert_eq!((c.status, c.detail), (Status::BadArg.raw(), 2), "{c:?}");
    // A stride that fits, but more pages than the buffer holds.
    let mut bad = e.layout;
    bad.num_pages = u64::MAX;
    let c = attach_layout(&mut e, &bad);
    assert_eq!((c.status, c.detail), (Status::BadArg.raw(), 2), "{c:?}");
    let t0 = Instant::now();
    while !daemon.log_text().contains("num_pages 18446744073709551615") {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the refusal's reason is not in the log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The layout attached first is still the session's, and it serves.
    save_and_verify(&mut e, 0x30_000, 3);
    let (c, _) = e.block_op(
        Opcode::Save,
        0,
        &chain_ops(&[0x31_000], kvplane_tests::TEST_PAGES as u32),
    );
    assert_eq!(
        c.status,
        Status::BadArg.raw(),
        "a page past num_pages: {c:?}"
    );
}

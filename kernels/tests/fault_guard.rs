//! The fault guard of engine-buffer launches: memory whose backing is gone (here: a shared
//! mapping reaching past the end of its memfd, which faults exactly like a punched-out
//! hugetlb page) fails the launch with `EngineFault`, every time, on every launch thread;
//! a fault anywhere else still kills the process as it would without the guard.

use kvplane_ffi::kvp_kv_layout;
use kvplane_kernels::{
    EngineKv, HostLaunch, KernelError, PagedLayout, gather, gather_slots, scatter, scatter_slots,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::ptr::NonNull;

const PAGE: usize = 4096;

/// A shared mapping of `mapped` bytes over a memfd of only `backed` bytes: every access
/// past `backed` raises SIGBUS.
struct HalfBacked {
    base: NonNull<u8>,
    mapped: usize,
    _fd: OwnedFd,
}

impl HalfBacked {
    fn new(backed: usize, mapped: usize) -> Self {
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), backed as i64) }, 0);
        // SAFETY: a new shared mapping of our fd; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        HalfBacked {
            base: NonNull::new(p.cast()).expect("mmap never returns null"),
            mapped,
            _fd: fd,
        }
    }

    fn kv(&self) -> EngineKv {
        // SAFETY: the mapping lives as long as `self`, which outlives every launch here.
        unsafe { EngineKv::new(self.base, self.mapped) }
    }
}

impl Drop for HalfBacked {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

/// One plane, one layer, one token row of 4 KiB per page: page `p` is bytes
/// `[p * 4096, (p + 1) * 4096)`.
fn layout(pages: u64) -> PagedLayout {
    // SAFETY: kvp_kv_layout is plain old data; all-zero is a valid value.
    let mut l: kvp_kv_layout = unsafe { std::mem::zeroed() };
    l.num_layers = 2;
    l.kv_planes = 1;
    l.page_tokens = 1;
    l.kv_heads = 1;
    l.head_bytes = PAGE as u32 / 2;
    l.dtype_bytes = 2;
    l.num_pages = pages;
    l.head_stride_bytes = PAGE as u64 / 2;
    l.token_stride_bytes = PAGE as u64 / 2;
    l.page_stride_bytes = PAGE as u64;
    l.plane_offset[0][0] = 0;
    l.plane_offset[0][1] = PAGE as u64 / 2;
    l.buffer_bytes = pages * PAGE as u64;
    PagedLayout::new(&l).expect("valid layout")
}

fn expect_fault(r: Result<(), KernelError>, op: &str, first_bad: u64) {
    match r {
        Err(KernelError::EngineFault {
            op: o,
            signal,
            offset_bytes,
            len_bytes,
        }) => {
            assert_eq!(o, op);
            assert_eq!(signal, libc::SIGBUS);
            assert_eq!(len_bytes, 8 * PAGE);
            assert!(
                (first_bad..8 * PAGE as u64).contains(&offset_bytes),
                "fault at {offset_bytes}, bad bytes start at {first_bad}"
            );
        }
        other => panic!("{op}: expected EngineFault, got {other:?}"),
    }
}

#[test]
fn faults_in_the_engine_buffer_fail_the_launch_not_the_process() {
    // 8 pages mapped, the first 4 backed.
    let mem = HalfBacked::new(4 * PAGE, 8 * PAGE);
    let kv = mem.kv();
    let l = layout(8);
    let block = l.info().block_bytes as usize;
    assert_eq!(block, PAGE);
    for threads in [1, 2, 3] {
        let launch = HostLaunch { threads };
        let mut out = vec![0u8; 3 * block];
        // Recovered again and again: the signal is unblocked after each recovery (a
        // blocked SIGBUS would kill the process on the next fault).
        for _ in 0..3 {
            expect_fault(
                gather(&kv, &l, &[0, 5, 1], &mut out, launch),
                "gather",
                4 * PAGE as u64,
            );
            expect_fault(
                scatter(&kv, &l, &[6, 2, 7], &vec![7u8; 3 * block], launch),
                "scatter",
                4 * PAGE as u64,
            );
        }
        // Slot-addressed launches are guarded the same way.
        let mut slots = vec![0u8; 5 * block];
        for _ in 0..2 {
            expect_fault(
                gather_slots(
                    &kv,
                    &l,
                    &[1, 6],
                    &mut slots,
                    &[(4 * block) as u64, 0],
                    launch,
                ),
                "gather",
                4 * PAGE as u64,
            );
            expect_fault(
                scatter_slots(&kv, &l, &[2, 7], &slots, &[(3 * block) as u64, 1], launch),
                "scatter",
                4 * PAGE as u64,
            );
        }
        // The backed pages still work, through the same thread's guard.
        let data: Vec<u8> = (0..2 * block).map(|i| (i % 251) as u8).collect();
        scatter(&kv, &l, &[3, 1], &data, launch).expect("backed pages scatter");
        let mut back = vec![0u8; 2 * block];
        gather(&kv, &l, &[3, 1], &mut back, launch).expect("backed pages gather");
        assert_eq!(back, data);
    }
}

/// What the child process does when this test binary is re-run with it.
const CHILD_ENV: &str = "KVPLANE_GUARD_TEST_CHILD";

/// Runs this test binary's `guard_child` test with `what`, returns its wait status.
fn run_child(what: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "guard_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, what)
        .output()
        .expect("spawn child");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The body of the child processes of `faults_outside_a_guarded_launch_still_kill`.
#[test]
#[ignore = "run as a child process by faults_outside_a_guarded_launch_still_kill"]
fn guard_child() {
    let what = std::env::var(CHILD_ENV).expect("run by faults_outside_a_guarded_launch_still_kill");
    kvplane_kernels::install_fault_guard().expect("guard");
    // A launch has registered (and left) a guarded range on this thread first.
    let mem = HalfBacked::new(4 * PAGE, 8 * PAGE);
    let l = layout(8);
    let mut out = vec![0u8; PAGE];
    let _ = gather(&mem.kv(), &l, &[6], &mut out, HostLaunch::default());
    match what.as_str() {
        // The same memory touched outside a launch: not the guard's to recover.
        "sigbus" => {
            // SAFETY: deliberately reads an unbacked page of a live mapping (SIGBUS).
            let v = unsafe { std::ptr::read_volatile(mem.base.as_ptr().add(6 * PAGE)) };
            println!("read {v}");
        }
        "sigsegv" => {
            // SAFETY: deliberately reads an address nothing maps (SIGSEGV).
            let v = unsafe { std::ptr::read_volatile(16usize as *const u8) };
            println!("read {v}");
        }
        "overflow" => {
            #[allow(unconditional_recursion)] // the point: overflow the stack
            fn recurse(n: u64) -> u64 {
                let pad = [n; 512];
                std::hint::black_box(&pad);
                recurse(n + 1) + pad[3]
            }
            let t = std::thread::spawn(|| recurse(0));
            let _ = t.join();
        }
        other => panic!("unknown child action {other}"),
    }
    unreachable!("the child should have died");
}

#[test]
fn faults_outside_a_guarded_launch_still_kill() {
    use std::os::unix::process::ExitStatusExt;
    let (st, err) = run_child("sigbus");
    assert_eq!(st.signal(), Some(libc::SIGBUS), "{st:?}\n{err}");
    let (st, err) = run_child("sigsegv");
    assert_eq!(st.signal(), Some(libc::SIGSEGV), "{st:?}\n{err}");
    // Rust's own stack-overflow report still runs (the guard chains to its handler).
    let (st, err) = run_child("overflow");
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}\n{err}");
    assert!(err.contains("has overflowed its stack"), "{err}");
}

//! Thin, fenced wrappers over the Linux calls the shared-memory layer needs: memfd,
//! futex, SCM_RIGHTS, SO_PEERCRED, pidfd and poll. Every `unsafe` of this crate that is
//! not pointer arithmetic into a mapped segment lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Create an anonymous memory file of `bytes`, sealed against shrinking so a peer cannot
/// truncate it under our mapping (which would turn our reads into SIGBUS).
pub fn memfd_create_sealed(name: &str, bytes: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, libc::MFD_ALLOW_SEALING)?;
    // SAFETY: ftruncate on a valid fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    seal_no_shrink(fd.as_raw_fd())?;
    Ok(fd)
}

/// A new, empty memfd (close-on-exec) with `flags` (`MFD_ALLOW_SEALING`, `MFD_HUGETLB`...).
pub fn memfd_create(name: &str, flags: u32) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: cname is a valid NUL-terminated string; unknown flag bits fail with EINVAL.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Forbid shrinking (and further sealing changes) of a memfd.
pub fn seal_no_shrink(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl F_ADD_SEALS on an fd; fails cleanly with EINVAL/EPERM if not a memfd.
    let rc = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Seals currently set on a memfd (to check a peer's memfd cannot shrink under us).
pub fn memfd_seals(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl F_GET_SEALS on an fd; returns -1 with errno on a non-memfd.
    let rc = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// What backs a file: the file system it lives on, from `fstatfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// shmem (tmpfs), where a plain memfd lives: pages come from ordinary memory and a
    /// hole an engine punches is refilled with zeroes on the next touch, never a fault.
    Shmem,
    /// hugetlbfs (`MFD_HUGETLB`): pages come from the hugepage pool; a punched-out page
    /// touched while the pool is empty is a SIGBUS in whoever touches it.
    Hugetlb,
    /// Any other file system (a regular file, a device), by its magic number.
    Other(i64),
}

/// tmpfs/shmem, `TMPFS_MAGIC` in `<linux/magic.h>`.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// hugetlbfs, `HUGETLBFS_MAGIC` in `<linux/magic.h>`.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The file system backing `fd`.
pub fn backing(fd: RawFd) -> io::Result<Backing> {
    // SAFETY: zeroed statfs is a valid out-parameter; fstatfs fills it for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable statfs struct.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86-64, u32/i32 elsewhere
    let magic = st.f_type as i64;
    Ok(match magic {
        TMPFS_MAGIC => Backing::Shmem,
        HUGETLBFS_MAGIC => Backing::Hugetlb,
        m => Backing::Other(m),
    })
}

/// The system page size in bytes.
pub fn page_bytes() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

/// The page size mappings of `fd` must be aligned to: its file system's block size
/// (the huge page size on hugetlbfs), at least the system page.
pub fn file_page_bytes(fd: RawFd) -> io::Result<usize> {
    // SAFETY: zeroed statfs is a valid out-parameter; fstatfs fills it for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable statfs struct.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let bsize = usize::try_from(st.f_bsize).unwrap_or(0);
    Ok(if bsize.is_power_of_two() {
        bsize.max(page_bytes())
    } else {
        page_bytes()
    })
}

/// Reserves `bytes` of address space with no access and no memory behind it.
pub fn reserve_address_space(bytes: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned address 0"))
}

/// Maps `len` bytes of `fd` from offset 0, shared and read/write, at exactly `at`.
///
/// # Safety
/// `[at, at + len)` must be address space the caller owns and nothing uses (a reservation
/// of its own): `MAP_FIXED` replaces whatever is mapped there.
pub unsafe fn map_shared_fixed(at: NonNull<u8>, len: usize, fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller owns [at, at + len) per the contract.
    let p = unsafe {
        libc::mmap(
            at.as_ptr().cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmaps `[at, at + len)`.
///
/// # Safety
/// The range must be a mapping the caller owns and nothing will access again.
pub unsafe fn unmap(at: NonNull<u8>, len: usize) {
    // SAFETY: per the contract; munmap of an owned range cannot affect other memory.
    let _ = unsafe { libc::munmap(at.as_ptr().cast(), len) };
}

/// True when `fd` is a regular file (not a device, pipe, socket or directory).
pub fn is_regular_file(fd: RawFd) -> io::Result<bool> {
    // SAFETY: zeroed stat is a valid out-parameter; fstat fills it for a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat struct.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// Size of the file behind `fd`.
pub fn fd_size(fd: RawFd) -> io::Result<u64> {
    // SAFETY: zeroed stat is a valid out-parameter; fstat fills it for a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat struct.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// FUTEX_WAIT on a word that may live in shared memory (no FUTEX_PRIVATE_FLAG). Returns
/// when woken, when `*word != expected`, on a signal, or after `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: word points to a live, aligned u32 for the duration of the call; a
    // relative timeout pointer is either null or a valid timespec. Errors (EAGAIN when the
    // value changed, ETIMEDOUT, EINTR) all mean "re-check the condition", so they are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        );
    }
}

/// One word of a [`futex_waitv`]: sleep while `*word == expected`.
#[derive(Clone, Copy, Debug)]
pub struct FutexWaiter<'a> {
    pub word: &'a AtomicU32,
    pub expected: u32,
}

/// The kernel's `struct futex_waitv` (linux/futex.h).
#[repr(C)]
struct RawFutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// The most words one `futex_waitv` call takes (FUTEX_WAITV_MAX).
pub const FUTEX_WAITV_MAX: usize = 128;
const FUTEX2_SIZE_U32: u32 = 2;

/// Why [`futex_waitv`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitvWake {
    /// Woken through a word, or a word differed from its expected value, or a signal
    /// ended the sleep: re-check every condition either way.
    Woken,
    TimedOut,
}

/// FUTEX_WAITV (Linux >= 5.16) on words that may live in shared memory (no
/// FUTEX_PRIVATE_FLAG): sleeps until one of them is woken, one differs from its expected
/// value, or `timeout` passes. At most [`FUTEX_WAITV_MAX`] words. Errors: `ENOSYS` on an
/// older kernel, `EINVAL` for a bad argument.
pub fn futex_waitv<'a>(
    waiters: impl IntoIterator<Item = FutexWaiter<'a>>,
    timeout: Duration,
) -> io::Result<WaitvWake> {
    let mut raw = [const {
        RawFutexWaitv {
            val: 0,
            uaddr: 0,
            flags: 0,
            reserved: 0,
        }
    }; FUTEX_WAITV_MAX];
    let mut n = 0;
    for w in waiters {
        let Some(r) = raw.get_mut(n) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        r.val = u64::from(w.expected);
        r.uaddr = w.word.as_ptr() as u64;
        r.flags = FUTEX2_SIZE_U32;
        n += 1;
    }
    if n == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // The timeout is absolute, on the clock named by the last argument.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: now is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let nanos = now.tv_nsec as u64 + u64::from(timeout.subsec_nanos());
    let deadline = libc::timespec {
        tv_sec: now.tv_sec
            + timeout.as_secs() as libc::time_t
            + (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: raw holds n initialised entries whose words stay alive and aligned for the
    // call (borrowed for 'a, which outlives it); deadline is a valid timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            raw.as_ptr(),
            n as libc::c_uint,
            0u32,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if r >= 0 {
        return Ok(WaitvWake::Woken);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ETIMEDOUT) => Ok(WaitvWake::TimedOut),
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(WaitvWake::Woken),
        _ => Err(e),
    }
}

/// Whether this kernel has FUTEX_WAITV (a call on a word that never matches returns at
/// once when it does, ENOSYS when it does not).
pub fn futex_waitv_available() -> io::Result<()> {
    let word = AtomicU32::new(1);
    let w = FutexWaiter {
        word: &word,
        expected: 0,
    };
    futex_waitv([w], Duration::ZERO).map(|_| ())
}

/// FUTEX_WAKE all waiters on a word that may live in shared memory.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: word points to a live, aligned u32; FUTEX_WAKE does not dereference beyond it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Credentials of the process at the other end of a Unix stream (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid out-parameters of the right size for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Send `data` with up to one file descriptor attached (SCM_RIGHTS).
pub fn send_with_fd(stream: &UnixStream, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Control buffer sized for one fd, aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: zeroed msghdr is valid; fields set below point to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        assert!(space <= std::mem::size_of_val(&cmsg_buf));
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `space` bytes we own, so the first header fits;
        // CMSG_DATA points inside it with room for one RawFd (checked by CMSG_SPACE).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    let mut sent = 0usize;
    while sent < data.len() {
        msg.msg_iov = &mut iov;
        // SAFETY: msg describes live buffers; after the first partial send we resend the
        // rest without the fd (already delivered with the first byte).
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        sent += n as usize;
        iov.iov_base = data[sent..].as_ptr() as *mut libc::c_void;
        iov.iov_len = data.len() - sent;
        msg.msg_control = std::ptr::null_mut();
        msg.msg_controllen = 0;
    }
    Ok(())
}

/// Receive exactly `buf.len()` bytes and at most one file descriptor. Extra descriptors
/// a hostile peer attaches are closed, never leaked.
pub fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    let mut received: Vec<OwnedFd> = Vec::with_capacity(1);
    let mut got = 0usize;
    while got < buf.len() {
        match recv_some(stream, &mut buf[got..], &mut received, 1, false) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(received.pop())
}

/// Descriptors one `recvmsg` can carry into [`recv_some`]'s control buffer: the most the
/// kernel passes in one message (SCM_MAX_FD). Senders in this crate attach at most one
/// per message, but a smaller buffer would let the kernel release the rest itself, on
/// this thread, where a tenant's descriptor could block it (see [`TenantFd`]).
const RECV_FDS_PER_CALL: usize = 253;

/// One `recvmsg` into `buf` (non-blocking with `dont_wait`: `WouldBlock` when nothing is
/// there). Descriptors that arrive are appended to `received`, in order, while it holds
/// fewer than `max_fds`; any other goes to [`close_untrusted`] (a caller that must notice
/// surplus descriptors passes one more than it expects and checks the length). Returns
/// the bytes read (0: the peer hung up).
pub fn recv_some(
    stream: &UnixStream,
    buf: &mut [u8],
    received: &mut Vec<OwnedFd>,
    max_fds: usize,
    dont_wait: bool,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for RECV_FDS_PER_CALL descriptors in one SCM_RIGHTS message, 8-byte aligned.
    let mut cmsg_buf = [0u64; 2 + RECV_FDS_PER_CALL.div_ceil(2)];
    // SAFETY: zeroed msghdr is valid; fields set below point to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    let flags = libc::MSG_CMSG_CLOEXEC | if dont_wait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg describes live, writable buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into cmsg_buf, within
    // msg_controllen; each SCM_RIGHTS payload is an array of ints.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if received.len() < max_fds {
                        received.push(fd);
                    } else {
                        // A surplus: closed without blocking this thread on it.
                        close_untrusted(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

/// A pidfd for `pid`, so a death is noticed even if the pid is reused.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// True when `fd` is readable or hung up right now (pidfd: the process exited; socket:
/// the peer closed or sent data).
pub fn poll_ready(fd: RawFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0 (no blocking).
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && pfd.revents != 0)
}

/// True when the peer of a stream socket has hung up (EOF or error), without consuming data.
pub fn socket_hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc <= 0 {
        return false;
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
        return true;
    }
    // Readable: either data (protocol violation, treated by the caller) or EOF. Peek.
    let mut byte = 0u8;
    // SAFETY: recv into one byte we own, non-blocking peek.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Whether a process exists (kill with signal 0).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 performs only the permission/existence check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Pin the calling thread (and threads it spawns later) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it (cpu is bounds-
    // checked by the libc macro against CPU_SETSIZE).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPUs this process may run on.
pub fn cpus_allowed() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A descriptor a tenant sent (SCM_RIGHTS). Closing one can block: a TCP socket with
/// `SO_LINGER` set waits for a peer that may never read, a file on a FUSE mount flushes
/// to a server that may never answer, a Unix socket releases the descriptors queued in
/// it. So it is never closed on the thread that drops it unless it is known to close at
/// once (a memfd, or a TCP socket once its lingering is turned off); anything else goes
/// to a closer thread of its own.
#[derive(Debug)]
pub struct TenantFd(Option<OwnedFd>);

impl TenantFd {
    pub fn new(fd: OwnedFd) -> TenantFd {
        TenantFd(Some(fd))
    }
}

impl std::os::fd::AsFd for TenantFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_ref().expect("present until dropped").as_fd()
    }
}

impl AsRawFd for TenantFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_ref().expect("present until dropped").as_raw_fd()
    }
}

impl Drop for TenantFd {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            close_untrusted(fd);
        }
    }
}

/// The daemon's end of an engine's connection. What the engine sent and the daemon has
/// not read (descriptors too: a request parked for room, messages after the attach) is
/// released when it closes, so it closes like a [`TenantFd`].
#[derive(Debug)]
pub struct TenantStream(Option<UnixStream>);

impl TenantStream {
    pub fn new(stream: UnixStream) -> TenantStream {
        TenantStream(Some(stream))
    }

    /// The connection, leaving this one without it (its drop then closes nothing).
    pub fn take(&mut self) -> TenantStream {
        TenantStream(self.0.take())
    }

    /// Never closes the connection (its descriptor is leaked, counted in
    /// [`untrusted_fds_leaked`]): for a session dropped while an operation may still
    /// touch its engine's memory, so that an engine waiting for the daemon's close before
    /// it reuses that memory never does.
    pub fn keep_open(&mut self) {
        if let Some(stream) = self.0.take() {
            std::mem::forget(stream);
            CLOSER_LEAKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl std::ops::Deref for TenantStream {
    type Target = UnixStream;
    fn deref(&self) -> &UnixStream {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for TenantStream {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            close_untrusted(stream.into());
        }
    }
}

/// Descriptors queued for the closer thread at most; past that they are kept open
/// (counted in [`untrusted_fds_leaked`]) rather than closed where they would block.
const CLOSER_QUEUE: usize = 4096;
static CLOSER_BACKLOG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static CLOSER_LEAKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Descriptors waiting for the closer thread (one stuck close holds up the rest).
pub fn untrusted_fds_backlog() -> usize {
    CLOSER_BACKLOG.load(std::sync::atomic::Ordering::Relaxed)
}

/// True while the closer thread is keeping up: a caller about to take in more tenant
/// descriptors (the attach handshake) waits while it is not.
pub fn untrusted_closer_has_room() -> bool {
    untrusted_fds_backlog() < CLOSER_QUEUE / 2
}

/// Descriptors left open because the closer's queue was full.
pub fn untrusted_fds_leaked() -> u64 {
    CLOSER_LEAKED.load(std::sync::atomic::Ordering::Relaxed)
}

/// An int socket option of `fd`, or `None` (not a socket, or the option is unknown).
fn socket_option(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Whether `fd` is a TCP socket (IPv4 or IPv6).
fn is_tcp(fd: RawFd) -> bool {
    matches!(
        socket_option(fd, libc::SO_DOMAIN),
        Some(libc::AF_INET | libc::AF_INET6)
    ) && socket_option(fd, libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP)
}

/// Closes `fd` without blocking the caller (see [`TenantFd`]).
pub fn close_untrusted(fd: OwnedFd) {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::{OnceLock, mpsc};
    let raw = fd.as_raw_fd();
    // A memfd (shmem or hugetlbfs: the only files with seals) has no flush to wait for.
    if memfd_seals(raw).is_ok() {
        drop(fd);
        return;
    }
    // A TCP socket: reset instead of lingering. Any other socket goes to the closer: a
    // Unix socket's queue may hold descriptors of its own, released when it closes.
    if is_tcp(raw) {
        let off = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads a linger struct of the given size from a live value.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&off as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            drop(fd);
            return;
        }
    }
    static CLOSER: OnceLock<Option<mpsc::SyncSender<OwnedFd>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<OwnedFd>(CLOSER_QUEUE);
        std::thread::Builder::new()
            .name("kvp-fd-closer".into())
            .spawn(move || {
                for fd in rx {
                    drop(fd);
                    CLOSER_BACKLOG.fetch_sub(1, Relaxed);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(tx) = closer else {
        // No thread to close on (spawn failed at start-up): keep it rather than block.
        std::mem::forget(fd);
        CLOSER_LEAKED.fetch_add(1, Relaxed);
        return;
    };
    CLOSER_BACKLOG.fetch_add(1, Relaxed);
    if let Err(e) = tx.try_send(fd) {
        CLOSER_BACKLOG.fetch_sub(1, Relaxed);
        CLOSER_LEAKED.fetch_add(1, Relaxed);
        let fd = match e {
            mpsc::TrySendError::Full(fd) | mpsc::TrySendError::Disconnected(fd) => fd,
        };
        std::mem::forget(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    /// A TCP socket set to linger for a minute, with unsent data its peer never reads:
    /// a plain close would block for the minute; a tenant's descriptor closes at once.
    #[test]
    fn a_lingering_socket_a_tenant_sent_closes_without_blocking() {
        let (client, _server) = lingering_tcp(60);
        let t0 = Instant::now();
        drop(TenantFd::new(OwnedFd::from(client)));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "closing took {:?}",
            t0.elapsed()
        );
    }

    /// A TCP socket set to linger for `secs` with unsent data its peer never reads.
    fn lingering_tcp(secs: i32) -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while (&client).write(&chunk).is_ok() {}
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: secs,
        };
        // SAFETY: setsockopt reads a linger struct of the given size from a live value.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        client.set_nonblocking(false).unwrap();
        (client, server)
    }

    /// A Unix socket whose queue holds the only reference to a lingering TCP socket:
    /// closing it releases that one, so it is not closed in place.
    #[test]
    fn a_unix_socket_carrying_a_lingering_socket_closes_without_blocking() {
        let (tcp, _server) = lingering_tcp(10);
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_with_fd(&ours, b"x", Some(tcp.as_raw_fd())).unwrap();
        drop(tcp);
        let t0 = Instant::now();
        drop(TenantStream::new(theirs));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "closing took {:?}",
            t0.elapsed()
        );
    }

    /// Anything that is neither a memfd nor a TCP socket is closed on the closer thread,
    /// and is closed: the pipe's reader sees its end (after whatever the closer had,
    /// such as the test above's socket, lingering for up to 10 s).
    #[test]
    fn other_descriptors_are_closed_on_the_closer_thread() {
        let mut ends = [0i32; 2];
        // SAFETY: a two-int array for pipe2's out-parameter.
        let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: both ends are fresh descriptors owned by nobody else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let mut reader = std::fs::File::from(reader);
        drop(TenantFd::new(writer));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let _ = tx.send(reader.read(&mut b).map_err(|e| e.to_string()));
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the writer was closed"),
            Ok(0)
        );
        assert_eq!(untrusted_fds_leaked(), 0);
    }
}

//! The C client library, `libkvplane` (cdylib + staticlib), built from the Rust client
//! (`kvplane_shm::client`) so the ring protocol has exactly one implementation. The
//! prototypes are in `ffi/include/kvplane.h`.
//!
//! Every entry point checks its pointers for NULL, catches panics (none may cross the C
//! boundary) and reports failures as -1 plus a thread-local message.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use kvplane_ffi::{MAX_KV_REGIONS, kvp_cqe, kvp_kv_region, kvp_sqe};
use kvplane_shm::handshake::EngineRegion;
use kvplane_shm::{AttachOptions, QueuePair, Session};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl std::fmt::Display) {
    let text = CString::new(msg.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Run `f`, turning errors and panics into -1 + message.
fn guard(f: impl FnOnce() -> Result<i32, String>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(msg)) => {
            set_error(msg);
            -1
        }
        Err(_) => {
            set_error("internal panic in libkvplane");
            -1
        }
    }
}

/// One attached session.
pub struct KvpClient {
    session: Session,
    queues: Vec<Option<QueuePair>>,
}

/// One queue pair.
pub struct KvpQueue {
    qp: QueuePair,
}

/// Why `kvp_client_attach` refused its KV region arguments (before any connection).
#[derive(Debug, thiserror::Error)]
pub enum RegionArgError {
    #[error("kvp_client_attach: {count} KV regions, at most KVP_MAX_KV_REGIONS ({max})")]
    TooMany { count: u32, max: usize },
    #[error("kvp_client_attach: num_regions is {count} but {array} is NULL")]
    NullArray { count: u32, array: &'static str },
    #[error("KV region {index}: unknown kind {kind}")]
    UnknownKind { index: usize, kind: u32 },
    #[error(
        "KV region {index} ({kind}) carries no descriptor: region_fds[{index}] must be -1, not {fd}"
    )]
    UnexpectedFd {
        index: usize,
        kind: &'static str,
        fd: i32,
    },
    #[error("KV region {index} ({kind}) needs a descriptor: region_fds[{index}] is {fd}")]
    MissingFd {
        index: usize,
        kind: &'static str,
        fd: i32,
    },
    #[error("KV region {index}: dup of region_fds[{index}] = {fd}: {source}")]
    Dup {
        index: usize,
        fd: i32,
        source: std::io::Error,
    },
}

/// Pairs each region with a duplicate of its descriptor (F_DUPFD_CLOEXEC: the caller keeps
/// and closes its own). Checks what the engine side can know: the count, the kinds, and
/// that a descriptor is given exactly for the kinds that carry one; the daemon checks the
/// rest (sizes, seals, handles, the GPU).
pub fn engine_regions(
    regions: &[kvp_kv_region],
    fds: &[i32],
) -> Result<Vec<EngineRegion>, RegionArgError> {
    debug_assert_eq!(regions.len(), fds.len());
    if regions.len() > MAX_KV_REGIONS {
        return Err(RegionArgError::TooMany {
            count: regions.len() as u32,
            max: MAX_KV_REGIONS,
        });
    }
    let mut out = Vec::with_capacity(regions.len());
    for (index, (desc, &fd)) in regions.iter().zip(fds).enumerate() {
        let kind = desc.region_kind().ok_or(RegionArgError::UnknownKind {
            index,
            kind: desc.kind,
        })?;
        let owned = if kind.carries_fd() {
            if fd < 0 {
                return Err(RegionArgError::MissingFd {
                    index,
                    kind: kind.name(),
                    fd,
                });
            }
            // SAFETY: fcntl on a caller-given descriptor number touches no memory; a bad
            // number fails with EBADF, which is reported.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(RegionArgError::Dup {
                    index,
                    fd,
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: dup is a fresh descriptor owned by nobody else.
            Some(unsafe { OwnedFd::from_raw_fd(dup) })
        } else {
            if fd != -1 {
                return Err(RegionArgError::UnexpectedFd {
                    index,
                    kind: kind.name(),
                    fd,
                });
            }
            None
        };
        out.push(EngineRegion {
            desc: *desc,
            fd: owned,
        });
    }
    Ok(out)
}

/// # Safety
/// `socket_path` is a NUL-terminated string; `namespaces` points to `num_namespaces`
/// NUL-terminated strings (or is NULL when 0); `regions` and `region_fds` point to
/// `num_regions` entries each (or are NULL when 0); `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_attach(
    socket_path: *const c_char,
    num_queue_pairs: u32,
    ring_entries: u32,
    arena_bytes: u64,
    namespaces: *const *const c_char,
    num_namespaces: u32,
    regions: *const kvp_kv_region,
    region_fds: *const i32,
    num_regions: u32,
    out: *mut *mut KvpClient,
) -> i32 {
    guard(|| {
        if socket_path.is_null() || out.is_null() || (num_namespaces > 0 && namespaces.is_null()) {
            return Err("kvp_client_attach: NULL argument".into());
        }
        if num_regions as usize > MAX_KV_REGIONS {
            // Checked before the arrays are read: the count sizes the slices below.
            return Err(RegionArgError::TooMany {
                count: num_regions,
                max: MAX_KV_REGIONS,
            }
            .to_string());
        }
        let (regions, region_fds) = if num_regions == 0 {
            (&[][..], &[][..])
        } else {
            for (ptr_is_null, array) in [
                (regions.is_null(), "regions"),
                (region_fds.is_null(), "region_fds"),
            ] {
                if ptr_is_null {
                    return Err(RegionArgError::NullArray {
                        count: num_regions,
                        array,
                    }
                    .to_string());
                }
            }
            // SAFETY: both point to num_regions entries per the contract, checked non-NULL.
            unsafe {
                (
                    std::slice::from_raw_parts(regions, num_regions as usize),
                    std::slice::from_raw_parts(region_fds, num_regions as usize),
                )
            }
        };
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let path = unsafe { CStr::from_ptr(socket_path) }
            .to_str()
            .map_err(|_| "socket path is not UTF-8")?;
        let mut opts = AttachOptions::new(path);
        opts.queue_pairs = num_queue_pairs;
        opts.sq_entries = ring_entries;
        opts.cq_entries = ring_entries;
        opts.arena_bytes = arena_bytes;
        for i in 0..num_namespaces as usize {
            // SAFETY: namespaces has num_namespaces valid entries per the contract.
            let p = unsafe { *namespaces.add(i) };
            if p.is_null() {
                return Err(format!("namespace #{i} is NULL"));
            }
            // SAFETY: non-NULL, NUL-terminated per the contract.
            let name = unsafe { CStr::from_ptr(p) }
                .to_str()
                .map_err(|_| format!("namespace #{i} is not UTF-8"))?;
            opts.namespaces.push(name.to_string());
        }
        opts.kv_regions = engine_regions(regions, region_fds).map_err(|e| e.to_string())?;
        let mut session = Session::attach(opts).map_err(|e| e.to_string())?;
        let queues = session
            .take_queue_pairs()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(Some)
            .collect();
        let client = Box::new(KvpClient { session, queues });
        // SAFETY: out is non-NULL and writable per the contract.
        unsafe { *out = Box::into_raw(client) };
        Ok(0)
    })
}

/// # Safety
/// `client` is NULL or from `kvp_client_attach` and not yet detached.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_session_id(client: *const KvpClient) -> u64 {
    // SAFETY: NULL or a live client per the contract.
    unsafe { client.as_ref() }.map_or(0, |c| c.session.session_id())
}

/// # Safety
/// `client` is a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_begin_detach(client: *const KvpClient) -> i32 {
    guard(|| {
        // SAFETY: NULL or a live client per the contract.
        let c = unsafe { client.as_ref() }.ok_or("kvp_client_begin_detach: NULL client")?;
        c.session.begin_detach().map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// # Safety
/// `client` is a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_daemon_done(client: *const KvpClient) -> i32 {
    guard(|| {
        // SAFETY: NULL or a live client per the contract.
        let c = unsafe { client.as_ref() }.ok_or("kvp_client_daemon_done: NULL client")?;
        Ok(i32::from(c.session.daemon_done()))
    })
}

/// # Safety
/// `client` is NULL or from `kvp_client_attach`; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_detach(client: *mut KvpClient) {
    if !client.is_null() {
        // SAFETY: from Box::into_raw in kvp_client_attach, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(client) })));
    }
}

/// # Safety
/// `client` is a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_queue(client: *mut KvpClient, index: u32) -> *mut KvpQueue {
    let mut result: *mut KvpQueue = std::ptr::null_mut();
    guard(|| {
        // SAFETY: NULL or a live client per the contract.
        let c = unsafe { client.as_mut() }.ok_or("kvp_client_queue: NULL client")?;
        let slot = c
            .queues
            .get_mut(index as usize)
            .ok_or_else(|| format!("no queue pair {index}"))?;
        let qp = slot
            .take()
            .ok_or_else(|| format!("queue pair {index} was already taken"))?;
        result = Box::into_raw(Box::new(KvpQueue { qp }));
        Ok(0)
    });
    result
}

/// # Safety
/// `queue` is NULL or from `kvp_client_queue`; it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_free(queue: *mut KvpQueue) {
    if !queue.is_null() {
        // SAFETY: from Box::into_raw in kvp_client_queue, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(queue) })));
    }
}

/// # Safety
/// `queue` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_arena_bytes(queue: *const KvpQueue) -> u64 {
    // SAFETY: NULL or live per the contract.
    unsafe { queue.as_ref() }.map_or(0, |q| q.qp.arena_bytes())
}

/// # Safety
/// `queue` is live; `data` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_write_arena(
    queue: *mut KvpQueue,
    offset: u64,
    data: *const c_void,
    len: u64,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or live per the contract.
        let q = unsafe { queue.as_mut() }.ok_or("NULL queue")?;
        if data.is_null() && len > 0 {
            return Err("NULL data".into());
        }
        let bytes = if len == 0 {
            &[][..]
        } else {
            // SAFETY: data points to len readable bytes per the contract.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len as usize) }
        };
        q.qp.write_arena(offset, bytes).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// # Safety
/// `queue` is live; `out` points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_read_arena(
    queue: *mut KvpQueue,
    offset: u64,
    out: *mut c_void,
    len: u64,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or live per the contract.
        let q = unsafe { queue.as_ref() }.ok_or("NULL queue")?;
        if out.is_null() && len > 0 {
            return Err("NULL out".into());
        }
        let bytes = if len == 0 {
            &mut [][..]
        } else {
            // SAFETY: out points to len writable bytes per the contract.
            unsafe { std::slice::from_raw_parts_mut(out.cast::<u8>(), len as usize) }
        };
        q.qp.read_arena(offset, bytes).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// # Safety
/// `queue` is live; `sqes` points to `count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_submit(
    queue: *mut KvpQueue,
    sqes: *const kvp_sqe,
    count: u32,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or live per the contract.
        let q = unsafe { queue.as_mut() }.ok_or("NULL queue")?;
        if count == 0 {
            return Ok(0);
        }
        if sqes.is_null() {
            return Err("NULL sqes".into());
        }
        // SAFETY: sqes points to count entries per the contract.
        let s = unsafe { std::slice::from_raw_parts(sqes, count as usize) };
        q.qp.submit(s).map(|n| n as i32).map_err(|e| e.to_string())
    })
}

/// # Safety
/// `queue` is live; `out` points to `max` writable entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_poll(queue: *mut KvpQueue, out: *mut kvp_cqe, max: u32) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { wait_impl(queue, out, max, None) }
}

/// # Safety
/// `queue` is live; `out` points to `max` writable entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_queue_wait(
    queue: *mut KvpQueue,
    out: *mut kvp_cqe,
    max: u32,
    timeout_ms: u32,
) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        wait_impl(
            queue,
            out,
            max,
            Some(Duration::from_millis(timeout_ms as u64)),
        )
    }
}

/// # Safety
/// As for kvp_queue_wait.
unsafe fn wait_impl(
    queue: *mut KvpQueue,
    out: *mut kvp_cqe,
    max: u32,
    timeout: Option<Duration>,
) -> i32 {
    guard(|| {
        // SAFETY: NULL or live per the contract.
        let q = unsafe { queue.as_mut() }.ok_or("NULL queue")?;
        if max == 0 {
            return Ok(0);
        }
        if out.is_null() {
            return Err("NULL out".into());
        }
        // SAFETY: out points to max writable entries per the contract.
        let o = unsafe { std::slice::from_raw_parts_mut(out, max as usize) };
        let r = match timeout {
            None => q.qp.poll(o),
            Some(t) => q.qp.wait(o, t),
        };
        match r {
            Ok(n) => Ok(n as i32),
            Err(e @ kvplane_shm::ShmError::Timeout { .. }) => {
                set_error(e.to_string());
                Ok(kvplane_ffi::bindings::KVP_WAIT_TIMED_OUT)
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn kvp_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// # Safety
/// `name` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_abi_layout(name: *const c_char) -> i64 {
    if name.is_null() {
        return -1;
    }
    // SAFETY: non-NULL, NUL-terminated per the contract.
    let Ok(name) = unsafe { CStr::from_ptr(name) }.to_str() else {
        return -1;
    };
    abi_layout(name).map_or(-1, |v| v as i64)
}

macro_rules! layout_table {
    ($name:expr; $($ty:ident { $($field:ident),* })*) => {
        match $name {
            $(
                stringify!($ty) => Some(std::mem::size_of::<kvplane_ffi::$ty>()),
                $( concat!(stringify!($ty), ".", stringify!($field)) => Some(std::mem::offset_of!(kvplane_ffi::$ty, $field)), )*
            )*
            _ => None,
        }
    };
}

/// sizeof/offsetof for the structs other languages mirror.
pub fn abi_layout(name: &str) -> Option<usize> {
    layout_table!(name;
        kvp_sqe { user_data, opcode, flags, namespace_id, arg_offset, arg_len, count, param0, param1, reserved, seq }
        kvp_cqe { user_data, status, blocks, bytes, tier, seq, detail }
        kvp_block_op { hash, parent_hash, engine_block, tier, status, reserved }
        kvp_stats { session_id, ops_completed, ops_failed, blocks_saved, blocks_loaded, bytes_saved, bytes_loaded, sessions_active, tier_capacity_blocks, tier_used_blocks, lookup_hits, lookup_misses, backend, reserved0, reserved }
        kvp_kv_layout { num_layers, kv_planes, page_tokens, kv_heads, head_bytes, dtype_bytes, num_pages, page_stride_bytes, token_stride_bytes, head_stride_bytes, buffer_bytes, plane_offset, plane_region }
        kvp_kv_region { kind, flags, alloc_bytes, offset_bytes, len_bytes, gpu_uuid, handle, reserved }
        kvp_ipc_event { gpu_uuid, handle, reserved }
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use kvplane_ffi::RegionKind;
    use kvplane_shm::sys::memfd_create_sealed;

    use super::*;

    fn memfd() -> OwnedFd {
        memfd_create_sealed("capi-test", 4096).unwrap()
    }

    fn ipc_region() -> kvp_kv_region {
        kvp_kv_region::cuda_ipc([7; 64], [9; 16], 1 << 20, 4096, 8192)
    }

    fn inode(fd: i32) -> (u64, u64) {
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: st is writable; fstat reads only the descriptor number.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0, "fstat {fd}");
        (st.st_dev, st.st_ino)
    }

    fn last_error() -> String {
        // SAFETY: kvp_last_error returns this thread's NUL-terminated message.
        unsafe { CStr::from_ptr(kvp_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Calls the C entry point with `regions`/`fds` (as given, NULL included) and a socket
    /// nobody listens on: region errors come first, otherwise the connect fails.
    fn attach(regions: *const kvp_kv_region, fds: *const i32, n: u32) -> (i32, String) {
        let path = CString::new("/nonexistent/kvplane-capi-test.sock").unwrap();
        let mut out: *mut KvpClient = std::ptr::null_mut();
        // SAFETY: valid path and out; the arrays are the test's (or NULL, the case tested).
        let rc = unsafe {
            kvp_client_attach(
                path.as_ptr(),
                1,
                64,
                1 << 16,
                std::ptr::null(),
                0,
                regions,
                fds,
                n,
                &mut out,
            )
        };
        assert!(out.is_null());
        (rc, last_error())
    }

    #[test]
    fn each_fd_is_a_cloexec_duplicate_and_the_callers_stays_open() {
        let host = memfd();
        let regions = [ipc_region(), kvp_kv_region::host_memfd(4096)];
        let fds = [-1, host.as_raw_fd()];
        let got = engine_regions(&regions, &fds).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].desc.region_kind(), Some(RegionKind::CudaIpc));
        assert_eq!(got[0].desc.handle, [7; 64]);
        assert_eq!(got[0].desc.gpu_uuid, [9; 16]);
        assert_eq!(got[0].desc.offset_bytes, 4096);
        assert!(got[0].fd.is_none());
        let dup = got[1].fd.as_ref().unwrap().as_raw_fd();
        assert_ne!(dup, host.as_raw_fd());
        assert_eq!(inode(dup), inode(host.as_raw_fd()));
        // SAFETY: F_GETFD reads descriptor flags only.
        let flags = unsafe { libc::fcntl(dup, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        drop(got);
        // The caller's descriptor survives the library's copies being closed.
        inode(host.as_raw_fd());
    }

    #[test]
    fn a_descriptor_for_a_kind_without_one_names_the_region() {
        let host = memfd();
        let regions = [kvp_kv_region::host_memfd(4096), ipc_region()];
        let fds = [host.as_raw_fd(), host.as_raw_fd()];
        let err = engine_regions(&regions, &fds).unwrap_err();
        assert!(
            matches!(err, RegionArgError::UnexpectedFd { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("KV region 1 (CUDA IPC)"), "{err}");
    }

    #[test]
    fn a_missing_descriptor_names_the_region() {
        let regions = [
            ipc_region(),
            kvp_kv_region::cuda_vmm_fd([1; 16], 2 << 20, 0, 2 << 20),
        ];
        let err = engine_regions(&regions, &[-1, -1]).unwrap_err();
        assert!(
            matches!(err, RegionArgError::MissingFd { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("CUDA VMM fd"), "{err}");
    }

    #[test]
    fn a_closed_descriptor_and_an_unknown_kind_are_refused() {
        // Not an open descriptor (a closed one's number could be reused by a parallel test).
        let err = engine_regions(&[kvp_kv_region::host_memfd(4096)], &[i32::MAX]).unwrap_err();
        assert!(matches!(err, RegionArgError::Dup { index: 0, .. }), "{err}");
        let mut bad = ipc_region();
        bad.kind = 77;
        let err = engine_regions(&[ipc_region(), bad], &[-1, -1]).unwrap_err();
        assert!(
            matches!(err, RegionArgError::UnknownKind { index: 1, kind: 77 }),
            "{err}"
        );
    }

    #[test]
    fn the_c_entry_point_checks_arrays_and_count_before_connecting() {
        let region = ipc_region();
        let fd = -1i32;
        let (rc, msg) = attach(std::ptr::null(), &fd, 1);
        assert_eq!(rc, -1);
        assert!(msg.contains("regions is NULL"), "{msg}");
        let (rc, msg) = attach(&region, std::ptr::null(), 1);
        assert_eq!(rc, -1);
        assert!(msg.contains("region_fds is NULL"), "{msg}");
        // Too many: refused from the count alone (the arrays are never read).
        let (rc, msg) = attach(&region, &fd, MAX_KV_REGIONS as u32 + 1);
        assert_eq!(rc, -1);
        assert!(msg.contains("at most KVP_MAX_KV_REGIONS (4096)"), "{msg}");
        // NULL arrays with no regions are fine: the attach gets as far as connecting.
        let (rc, msg) = attach(std::ptr::null(), std::ptr::null(), 0);
        assert_eq!(rc, -1);
        assert!(msg.contains("connect"), "{msg}");
    }

    #[test]
    fn the_c_entry_point_leaves_the_callers_descriptors_open() {
        let host = memfd();
        let regions = [kvp_kv_region::host_memfd(4096), ipc_region()];
        let fds = [host.as_raw_fd(), -1];
        let (rc, msg) = attach(regions.as_ptr(), fds.as_ptr(), 2);
        assert_eq!(rc, -1);
        assert!(msg.contains("connect"), "validation passed, then: {msg}");
        inode(host.as_raw_fd());
        let bad = [-1, -1];
        let (rc, msg) = attach(regions.as_ptr(), bad.as_ptr(), 2);
        assert_eq!(rc, -1);
        assert!(
            msg.contains("KV region 0 (host memfd) needs a descriptor"),
            "{msg}"
        );
    }

    #[test]
    fn abi_layout_knows_the_region_and_the_layouts_region_table() {
        assert_eq!(abi_layout("kvp_kv_region"), Some(128));
        assert_eq!(
            abi_layout("kvp_kv_region.handle"),
            Some(std::mem::offset_of!(kvp_kv_region, handle))
        );
        assert_eq!(abi_layout("kvp_kv_region.gpu_uuid"), Some(32));
        assert_eq!(
            abi_layout("kvp_kv_layout.plane_region"),
            Some(std::mem::offset_of!(
                kvplane_ffi::kvp_kv_layout,
                plane_region
            ))
        );
        assert_eq!(abi_layout("kvp_kv_region.nonexistent"), None);
        assert_eq!(abi_layout("kvp_ipc_event"), Some(96));
        assert_eq!(abi_layout("kvp_ipc_event.handle"), Some(16));
    }
}

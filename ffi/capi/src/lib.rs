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

use kvplane_ffi::{kvp_cqe, kvp_sqe};
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

/// # Safety
/// `socket_path` is a NUL-terminated string; `namespaces` points to `num_namespaces`
/// NUL-terminated strings (or is NULL when 0); `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvp_client_attach(
    socket_path: *const c_char,
    num_queue_pairs: u32,
    ring_entries: u32,
    arena_bytes: u64,
    namespaces: *const *const c_char,
    num_namespaces: u32,
    kv_buffer_fd: i32,
    kv_buffer_bytes: u64,
    out: *mut *mut KvpClient,
) -> i32 {
    guard(|| {
        if socket_path.is_null() || out.is_null() || (num_namespaces > 0 && namespaces.is_null()) {
            return Err("kvp_client_attach: NULL argument".into());
        }
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
        if kv_buffer_fd >= 0 {
            // SAFETY: dup gives us our own descriptor; the caller keeps theirs.
            let dup = unsafe { libc::fcntl(kv_buffer_fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(format!(
                    "dup kv_buffer_fd {kv_buffer_fd}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: dup is a fresh descriptor owned by nobody else.
            opts.kv_buffer = Some((unsafe { OwnedFd::from_raw_fd(dup) }, kv_buffer_bytes));
        }
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
        r.map(|n| n as i32).map_err(|e| e.to_string())
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
        kvp_stats { session_id, ops_completed, ops_failed, blocks_saved, blocks_loaded, bytes_saved, bytes_loaded, sessions_active, tier_capacity_blocks, tier_used_blocks, lookup_hits, lookup_misses, backend }
        kvp_kv_layout { num_layers, kv_planes, page_tokens, kv_heads, head_bytes, dtype_bytes, num_pages, page_stride_bytes, token_stride_bytes, head_stride_bytes, buffer_bytes, plane_offset }
    )
}

//! The attach handshake over the daemon's Unix socket.
//!
//! engine -> daemon: `kvp_attach_request`, then `num_kv_regions` `kvp_kv_region`s, each
//!                   with its descriptor (SCM_RIGHTS) when its kind carries one
//! daemon -> engine: `kvp_attach_reply` (+ the session segment's memfd when status is OK)
//!
//! Descriptors are matched to the regions whose kinds carry one, in order; a descriptor
//! too many or too few refuses the attach. The handshake checks what it can without a
//! device (kinds, ranges, zero fields, memfd seals and sizes); importing device memory
//! and checking the GPU is the daemon's.
//!
//! The connection then stays open for the life of the session: its hang-up is how each
//! side learns the other died, even if a pid is reused.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kvplane_ffi::{
    self as ffi, Pod, RegionKind, kvp_attach_reply, kvp_attach_request, kvp_kv_region,
};

use crate::error::{Result, ShmError};
use crate::sys::{self, PeerCred};

/// How long the daemon waits for a connected peer to send its request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A validated attach request, as the daemon sees it.
#[derive(Debug)]
pub struct AttachRequest {
    pub peer: PeerCred,
    pub num_queue_pairs: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub arena_bytes: u64,
    pub namespaces: Vec<String>,
    /// The engine's KV memory, in the order it sent it (layouts name regions by index).
    pub kv_regions: Vec<KvRegion>,
}

/// One KV memory region as the handshake accepted it.
#[derive(Debug)]
pub struct KvRegion {
    pub kind: RegionKind,
    /// The descriptor as sent; `offset_bytes + len_bytes <= alloc_bytes` holds, the flags
    /// and reserved bytes are zero, and the uuid/handle fields are set as `kind` needs.
    pub desc: kvp_kv_region,
    /// Present exactly when `kind.carries_fd()`.
    pub fd: Option<sys::TenantFd>,
    /// Host memfds: what backs the memory (whether hugetlb is acceptable is the daemon's
    /// policy: its pages can fault when the pool runs dry).
    pub backing: Option<sys::Backing>,
}

/// Engine side: one region to register, with its descriptor when its kind carries one.
#[derive(Debug)]
pub struct EngineRegion {
    pub desc: kvp_kv_region,
    pub fd: Option<OwnedFd>,
}

impl EngineRegion {
    /// The whole of a sealed host memfd of `bytes`.
    pub fn host_memfd(fd: OwnedFd, bytes: u64) -> Self {
        EngineRegion {
            desc: kvp_kv_region::host_memfd(bytes),
            fd: Some(fd),
        }
    }
}

/// Checks a host memfd an engine sent: everything that lets its backing vanish under the
/// daemon's mapping is refused here. The seals are read first: once
/// `F_SEAL_SHRINK` is set it can never be removed, so the size read after it is final
/// (reading the size first would let the engine shrink the file, then seal it).
fn check_kv_buffer(fd: &impl AsRawFd, bytes: u64) -> std::result::Result<sys::Backing, String> {
    let raw = fd.as_raw_fd();
    let seals = sys::memfd_seals(raw).map_err(|e| {
        // Refusals travel in a 96-byte reply: reasons are short, the key words first.
        format!("KV buffer: not a memfd ({e})")
    })?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err("KV buffer memfd must carry F_SEAL_SHRINK".into());
    }
    match sys::is_regular_file(raw) {
        Ok(true) => {}
        Ok(false) => return Err("KV buffer: not a regular file".into()),
        Err(e) => return Err(format!("fstat KV buffer: {e}")),
    }
    let actual = sys::fd_size(raw).map_err(|e| format!("fstat KV buffer: {e}"))?;
    if actual != bytes {
        return Err(format!(
            "KV buffer size must equal the announced size: {actual} != {bytes}"
        ));
    }
    match sys::backing(raw).map_err(|e| format!("fstatfs KV buffer: {e}"))? {
        sys::Backing::Other(magic) => Err(format!(
            "KV buffer: not a memfd (file system {magic:#x}, not shmem or hugetlbfs)"
        )),
        b => Ok(b),
    }
}

/// The namespace-name rule, shared by the handshake and the daemon's config: 1..=63
/// bytes of `[A-Za-z0-9-_.:/@]`.
pub fn valid_namespace_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < ffi::NAMESPACE_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
}

/// Parse one fixed-size, NUL-padded namespace name.
fn parse_name(raw: &[core::ffi::c_char]) -> Option<String> {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    let s = String::from_utf8(bytes).ok()?;
    valid_namespace_name(&s).then_some(s)
}

/// Bytes of one attach request on the wire (the regions that follow it not counted).
pub const REQUEST_BYTES: usize = std::mem::size_of::<kvp_attach_request>();
/// Bytes of one region on the wire.
pub const REGION_BYTES: usize = std::mem::size_of::<kvp_kv_region>();
/// The most bytes one attach may send: the request and the most regions.
pub const MAX_ATTACH_BYTES: usize = REQUEST_BYTES + ffi::MAX_KV_REGIONS * REGION_BYTES;

/// Daemon side: read and validate the request of a freshly accepted connection, blocking
/// up to [`HANDSHAKE_TIMEOUT`] for it.
pub fn read_request(stream: &UnixStream) -> Result<AttachRequest> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ShmError::io("set_read_timeout", e))?;
    let mut reader = RequestReader::new();
    while !reader.read_more(stream, false)? {
        reader.grant();
    }
    reader.finish(stream)
}

/// An attach request read in pieces from a non-blocking socket, so one thread can wait
/// on many connections at once and a peer that sends a byte at a time holds no thread.
/// The request comes first; its `num_kv_regions` (checked against the maximum before any
/// room is made for them) says how many region messages follow. Those are read only once
/// the caller [grants](Self::grant) them (the daemon's budget of regions in attaches in
/// progress): until then their bytes and descriptors stay in the socket, charged to the
/// sender, not to the daemon.
pub struct RequestReader {
    buf: Vec<u8>,
    got: usize,
    /// Bytes expected in all: the request, then the regions once they are granted.
    want: usize,
    fds: Vec<sys::TenantFd>,
    /// What one `recvmsg` brought, before it joins `fds`.
    fresh: Vec<OwnedFd>,
    /// Regions the request announced, once it is in and before they are granted.
    awaiting: Option<usize>,
}

impl Default for RequestReader {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestReader {
    pub fn new() -> RequestReader {
        RequestReader {
            buf: vec![0u8; REQUEST_BYTES],
            got: 0,
            want: REQUEST_BYTES,
            fds: Vec::new(),
            fresh: Vec::new(),
            awaiting: None,
        }
    }

    /// The regions the request announced, while they wait for [`Self::grant`]
    /// (`read_more` reads nothing more until then).
    pub fn awaiting_grant(&self) -> Option<usize> {
        self.awaiting
    }

    /// Lets `read_more` read the announced regions (a no-op unless some are awaited).
    pub fn grant(&mut self) {
        if let Some(regions) = self.awaiting.take() {
            self.want = REQUEST_BYTES + regions * REGION_BYTES;
            self.buf.resize(self.want, 0);
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.got
    }

    /// Reads what the peer has sent: `Ok(true)` once the request and all its regions are
    /// in, `Ok(false)` when more is to come (with `dont_wait`, nothing more is there yet)
    /// or the announced regions [await a grant](Self::awaiting_grant). A hang-up before
    /// the end is an error naming how much came.
    pub fn read_more(&mut self, stream: &UnixStream, dont_wait: bool) -> Result<bool> {
        if self.awaiting.is_some() {
            return Ok(false);
        }
        while self.got < self.want {
            // Each region carries at most one descriptor, the request none: one more
            // than that is kept so a surplus is seen, the rest closed on arrival, so a
            // connection holds no more descriptors than it announced regions.
            let max_fds = (self.want - REQUEST_BYTES) / REGION_BYTES + 1;
            let got = sys::recv_some(
                stream,
                &mut self.buf[self.got..self.want],
                &mut self.fresh,
                max_fds.saturating_sub(self.fds.len()),
                dont_wait,
            );
            self.fds
                .extend(self.fresh.drain(..).map(sys::TenantFd::new));
            match got {
                Ok(0) => {
                    return Err(self.failed(
                        stream,
                        format!(
                            "reading the attach request: the peer hung up after {} of {} bytes",
                            self.got, self.want
                        ),
                    ));
                }
                Ok(n) => self.got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if dont_wait && e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(false);
                }
                Err(e) => {
                    return Err(self.failed(stream, format!("reading the attach request: {e}")));
                }
            }
        }
        if self.want > REQUEST_BYTES {
            return Ok(true);
        }
        // The request is in: the regions it announces (bounded first) wait for a grant.
        let req: kvp_attach_request = ffi::read_pod(&self.buf).expect("one whole request");
        let regions = req.num_kv_regions as usize;
        if regions > ffi::MAX_KV_REGIONS {
            return Err(self.failed(
                stream,
                format!("{regions} KV regions (at most {})", ffi::MAX_KV_REGIONS),
            ));
        }
        if regions == 0 {
            return Ok(true);
        }
        self.awaiting = Some(regions);
        Ok(false)
    }

    fn failed(&self, stream: &UnixStream, reason: String) -> ShmError {
        let peer = sys::peer_cred(stream)
            .map(|p| format!("pid {} uid {}", p.pid, p.uid))
            .unwrap_or_else(|_| "unknown peer".into());
        ShmError::Handshake { peer, reason }
    }

    /// Validates the complete request (call after `read_more` returned `Ok(true)`).
    pub fn finish(self, stream: &UnixStream) -> Result<AttachRequest> {
        let peer = sys::peer_cred(stream).map_err(|e| ShmError::io("SO_PEERCRED", e))?;
        if self.got < self.want || self.got < REQUEST_BYTES {
            return Err(ShmError::Handshake {
                peer: format!("pid {} uid {}", peer.pid, peer.uid),
                reason: format!("incomplete request: {} of {} bytes", self.got, self.want),
            });
        }
        parse_request(peer, &self.buf[..self.got], self.fds)
    }
}

/// Checks one region's fields that need no device and no descriptor.
fn check_region(r: &kvp_kv_region) -> std::result::Result<RegionKind, String> {
    let kind = r
        .region_kind()
        .ok_or_else(|| format!("unknown kind {}", r.kind))?;
    if r.flags & !ffi::REGION_F_CONTINUES != 0 || r.reserved.iter().any(|&b| b != 0) {
        return Err("unknown flags, or reserved bytes not zero".into());
    }
    if r.len_bytes == 0 {
        return Err("len_bytes is 0".into());
    }
    match r.offset_bytes.checked_add(r.len_bytes) {
        Some(end) if end <= r.alloc_bytes => {}
        _ => {
            return Err(format!(
                "offset {} + len {} past the allocation's {} bytes",
                r.offset_bytes, r.len_bytes, r.alloc_bytes
            ));
        }
    }
    let uuid_set = r.gpu_uuid.iter().any(|&b| b != 0);
    let handle_set = r.handle.iter().any(|&b| b != 0);
    match kind {
        RegionKind::HostMemfd if uuid_set || handle_set => {
            Err("host memfd with a GPU uuid or IPC handle".into())
        }
        RegionKind::CudaIpc if !uuid_set || !handle_set => {
            Err("CUDA IPC region needs gpu_uuid and handle".into())
        }
        RegionKind::CudaVmmFd if !uuid_set || handle_set => {
            Err("CUDA VMM region needs gpu_uuid and no IPC handle".into())
        }
        _ => Ok(kind),
    }
}

/// Checks a region flagged `REGION_F_CONTINUES` against the one before it (`prev`): the
/// two must be one run of memory in the engine's address space that the daemon can map
/// back to back.
fn check_continues(
    r: &kvp_kv_region,
    kind: RegionKind,
    prev: Option<&KvRegion>,
) -> std::result::Result<(), String> {
    let Some(prev) = prev else {
        return Err("the first region continues nothing".into());
    };
    if kind == RegionKind::CudaIpc {
        return Err("CUDA IPC memory cannot be mapped after another region".into());
    }
    if prev.kind != kind {
        return Err(format!("a {} after a {}", kind.name(), prev.kind.name()));
    }
    if prev.desc.gpu_uuid != r.gpu_uuid {
        return Err("another GPU".into());
    }
    if prev.desc.offset_bytes + prev.desc.len_bytes != prev.desc.alloc_bytes {
        return Err("the previous region stops before its allocation's end".into());
    }
    if r.offset_bytes != 0 {
        return Err(format!("offset {} (must be 0)", r.offset_bytes));
    }
    Ok(())
}

/// Validates a complete request from `peer`: the request, its regions, and the
/// descriptors that came with them, in order.
fn parse_request(peer: PeerCred, buf: &[u8], fds: Vec<sys::TenantFd>) -> Result<AttachRequest> {
    let who = || format!("pid {} uid {}", peer.pid, peer.uid);
    let req: kvp_attach_request = ffi::read_pod(buf).expect("buffer holds one request");
    let bad = |reason: String| ShmError::Handshake {
        peer: who(),
        reason,
    };
    if req.magic != ffi::MAGIC {
        return Err(bad(format!("bad magic {:#x}", req.magic)));
    }
    if req.abi_version != ffi::ABI_VERSION {
        return Err(bad(format!(
            "ABI version {} (daemon speaks {}): update the engine's kvplane client",
            req.abi_version,
            ffi::ABI_VERSION
        )));
    }
    if req.reserved0 != 0 || req.reserved1 != 0 {
        return Err(bad("reserved request fields must be zero".into()));
    }
    if req.num_namespaces as usize > ffi::MAX_NAMESPACES_PER_SESSION {
        return Err(bad(format!(
            "{} namespaces (at most {})",
            req.num_namespaces,
            ffi::MAX_NAMESPACES_PER_SESSION
        )));
    }
    let mut namespaces = Vec::with_capacity(req.num_namespaces as usize);
    for i in 0..req.num_namespaces as usize {
        match parse_name(&req.namespaces[i]) {
            Some(n) => namespaces.push(n),
            None => {
                return Err(bad(format!(
                    "namespace #{i} is empty, too long or has characters outside [A-Za-z0-9-_.:/@]"
                )));
            }
        }
    }
    let regions = req.num_kv_regions as usize;
    if regions > ffi::MAX_KV_REGIONS || buf.len() != REQUEST_BYTES + regions * REGION_BYTES {
        return Err(bad(format!(
            "{regions} KV regions announced, {} bytes sent",
            buf.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut kv_regions: Vec<KvRegion> = Vec::with_capacity(regions);
    let mut host_regions = 0usize;
    for i in 0..regions {
        let at = REQUEST_BYTES + i * REGION_BYTES;
        let desc: kvp_kv_region = ffi::read_pod(&buf[at..]).expect("bounds checked above");
        let kind = check_region(&desc).map_err(|e| bad(format!("KV region #{i}: {e}")))?;
        if desc.flags & ffi::REGION_F_CONTINUES != 0 {
            check_continues(&desc, kind, kv_regions.last())
                .map_err(|e| bad(format!("KV region #{i} continues #{}: {e}", i.max(1) - 1)))?;
        }
        if kind == RegionKind::HostMemfd {
            host_regions += 1;
        }
        if host_regions > ffi::MAX_HOST_KV_REGIONS {
            return Err(bad(format!(
                "KV region #{i}: more than {} host memfd regions",
                ffi::MAX_HOST_KV_REGIONS
            )));
        }
        let fd = if kind.carries_fd() {
            Some(fds.next().ok_or_else(|| {
                bad(format!(
                    "KV region #{i} ({}): no descriptor came with it",
                    kind.name()
                ))
            })?)
        } else {
            None
        };
        let backing = match (&fd, kind) {
            (Some(fd), RegionKind::HostMemfd) => Some(
                check_kv_buffer(fd, desc.alloc_bytes)
                    .map_err(|e| bad(format!("KV region #{i}: {e}")))?,
            ),
            _ => None,
        };
        kv_regions.push(KvRegion {
            kind,
            desc,
            fd,
            backing,
        });
    }
    if fds.next().is_some() {
        return Err(bad(
            "more file descriptors than KV regions that carry one".into()
        ));
    }
    Ok(AttachRequest {
        peer,
        num_queue_pairs: req.num_queue_pairs,
        sq_entries: req.sq_entries,
        cq_entries: req.cq_entries,
        arena_bytes: req.arena_bytes,
        namespaces,
        kv_regions,
    })
}

/// Daemon side: answer. With `Ok`, `segment_fd` must be the session's memfd.
pub fn send_reply(
    stream: &UnixStream,
    reply: &kvp_attach_reply,
    segment_fd: Option<&std::fs::File>,
) -> Result<()> {
    sys::send_with_fd(
        stream,
        ffi::as_bytes(reply),
        segment_fd.map(|f| f.as_raw_fd()),
    )
    .map_err(|e| ShmError::io("send attach reply", e))
}

/// A reply refusing the attach with `status` and a reason the engine will print.
pub fn refusal(status: ffi::Status, message: &str) -> kvp_attach_reply {
    let mut r: kvp_attach_reply = Pod::zeroed();
    r.magic = ffi::MAGIC;
    r.abi_version = ffi::ABI_VERSION;
    r.status = status.raw();
    r.daemon_pid = sys::getpid();
    for (dst, src) in r.message.iter_mut().zip(message.bytes().take(95)) {
        *dst = src as core::ffi::c_char;
    }
    r
}

/// Engine side: build the request for the given shape and namespaces.
pub fn build_request(
    num_queue_pairs: u32,
    sq_entries: u32,
    cq_entries: u32,
    arena_bytes: u64,
    namespaces: &[&str],
    num_kv_regions: usize,
) -> Result<kvp_attach_request> {
    if num_kv_regions > ffi::MAX_KV_REGIONS {
        return Err(ShmError::Geometry {
            field: "kv_regions",
            value: num_kv_regions as u64,
            reason: "at most KVP_MAX_KV_REGIONS (4096) KV regions per session",
        });
    }
    if namespaces.len() > ffi::MAX_NAMESPACES_PER_SESSION {
        return Err(ShmError::Geometry {
            field: "namespaces",
            value: namespaces.len() as u64,
            reason: "at most 16 namespaces per session",
        });
    }
    let mut req: kvp_attach_request = Pod::zeroed();
    req.magic = ffi::MAGIC;
    req.abi_version = ffi::ABI_VERSION;
    req.num_queue_pairs = num_queue_pairs;
    req.sq_entries = sq_entries;
    req.cq_entries = cq_entries;
    req.arena_bytes = arena_bytes;
    req.num_kv_regions = num_kv_regions as u32;
    req.num_namespaces = namespaces.len() as u32;
    for (i, ns) in namespaces.iter().enumerate() {
        if ns.is_empty() || ns.len() >= ffi::NAMESPACE_NAME_BYTES {
            return Err(ShmError::Geometry {
                field: "namespaces",
                value: ns.len() as u64,
                reason: "a namespace name is 1..=63 bytes",
            });
        }
        for (dst, src) in req.namespaces[i].iter_mut().zip(ns.bytes()) {
            *dst = src as core::ffi::c_char;
        }
    }
    Ok(req)
}

/// Engine side: send `req` and then each region, each in a message of its own with its
/// descriptor (so descriptors arrive in region order).
pub fn send_request(
    stream: &UnixStream,
    req: &kvp_attach_request,
    regions: &[EngineRegion],
) -> std::io::Result<()> {
    sys::send_with_fd(stream, ffi::as_bytes(req), None)?;
    for r in regions {
        sys::send_with_fd(
            stream,
            ffi::as_bytes(&r.desc),
            r.fd.as_ref().map(|fd| fd.as_raw_fd()),
        )?;
    }
    Ok(())
}

/// The message of a refusal, as text.
pub fn reply_message(reply: &kvp_attach_reply) -> String {
    let bytes: Vec<u8> = reply
        .message
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_request_arriving_in_pieces_is_read_without_blocking() {
        let (mut engine, daemon) = UnixStream::pair().unwrap();
        daemon.set_nonblocking(true).unwrap();
        let req = build_request(2, 64, 64, 1 << 16, &["tenant-a", "b"], 2).unwrap();
        let ipc = kvp_kv_region::cuda_ipc([7; 64], [9; 16], 1 << 20, 4096, 8192);
        let mut bytes = ffi::as_bytes(&req).to_vec();
        bytes.extend_from_slice(ffi::as_bytes(&ipc));
        let memfd = kvp_kv_region::host_memfd(4096);
        let kv = sys::memfd_create_sealed("kv", 4096).unwrap();
        let mut reader = RequestReader::new();
        assert!(
            !reader.read_more(&daemon, true).unwrap(),
            "nothing sent yet"
        );
        engine.write_all(&bytes[..7]).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        assert_eq!(reader.received(), 7);
        engine.write_all(&bytes[7..500]).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        // The request ends and the first region starts inside one piece.
        engine.write_all(&bytes[500..REQUEST_BYTES + 3]).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        // The request is in; its regions are not read until granted.
        assert_eq!(reader.received(), REQUEST_BYTES);
        assert_eq!(reader.awaiting_grant(), Some(2));
        engine.write_all(&bytes[REQUEST_BYTES + 3..]).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        assert_eq!(
            reader.received(),
            REQUEST_BYTES,
            "nothing read before the grant"
        );
        reader.grant();
        assert_eq!(reader.awaiting_grant(), None);
        assert!(
            !reader.read_more(&daemon, true).unwrap(),
            "one region to come"
        );
        // The memfd rides on its region's first byte.
        let m = ffi::as_bytes(&memfd);
        sys::send_with_fd(&engine, &m[..5], Some(kv.as_raw_fd())).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        engine.write_all(&m[5..]).unwrap();
        assert!(reader.read_more(&daemon, true).unwrap());
        let got = reader.finish(&daemon).unwrap();
        assert_eq!(got.namespaces, ["tenant-a", "b"]);
        assert_eq!((got.num_queue_pairs, got.arena_bytes), (2, 1 << 16));
        assert_eq!(got.kv_regions.len(), 2);
        assert_eq!(got.kv_regions[0].kind, RegionKind::CudaIpc);
        assert!(got.kv_regions[0].fd.is_none());
        assert_eq!(got.kv_regions[0].desc.handle, [7; 64]);
        assert_eq!(got.kv_regions[1].kind, RegionKind::HostMemfd);
        assert!(got.kv_regions[1].fd.is_some());
        assert_eq!(got.kv_regions[1].backing, Some(sys::Backing::Shmem));
    }

    /// Sends `req` and `regions` (each with the descriptor given) and parses what the
    /// daemon side makes of it.
    fn exchange(
        req: &kvp_attach_request,
        regions: &[(kvp_kv_region, Option<&OwnedFd>)],
    ) -> std::result::Result<AttachRequest, String> {
        let (engine, daemon) = UnixStream::pair().unwrap();
        // Sent from a thread of its own: many regions fill the socket before the reader
        // starts, and a refusal stops the reader before the sender is done (its sends then
        // fail once the daemon's end is closed).
        std::thread::scope(|s| {
            s.spawn(move || {
                let _ = sys::send_with_fd(&engine, ffi::as_bytes(req), None);
                for (desc, fd) in regions {
                    let fd = fd.map(|f| f.as_raw_fd());
                    if sys::send_with_fd(&engine, ffi::as_bytes(desc), fd).is_err() {
                        break;
                    }
                }
            });
            let got = read_request(&daemon).map_err(|e| e.to_string());
            drop(daemon);
            got
        })
    }

    #[test]
    fn every_bad_region_field_is_refused_naming_the_region() {
        let kv = sys::memfd_create_sealed("kv", 8192).unwrap();
        let good_ipc = kvp_kv_region::cuda_ipc([1; 64], [2; 16], 1 << 20, 0, 4096);
        let good_vmm = kvp_kv_region::cuda_vmm_fd([2; 16], 1 << 21, 0, 1 << 21);
        let req2 = build_request(1, 64, 64, 1 << 16, &["a"], 2).unwrap();
        let with = |f: fn(&mut kvp_kv_region)| {
            let mut r = good_ipc;
            f(&mut r);
            r
        };
        let cases: Vec<(kvp_kv_region, &str)> = vec![
            (with(|r| r.kind = 0), "unknown kind 0"),
            (with(|r| r.kind = 99), "unknown kind 99"),
            (with(|r| r.flags = 2), "unknown flags"),
            (with(|r| r.reserved[15] = 1), "reserved bytes not zero"),
            (
                with(|r| r.flags = ffi::REGION_F_CONTINUES),
                "CUDA IPC memory cannot be mapped after",
            ),
            (with(|r| r.len_bytes = 0), "len_bytes is 0"),
            (
                with(|r| r.offset_bytes = (1 << 20) - 100),
                "past the allocation",
            ),
            (with(|r| r.offset_bytes = u64::MAX), "past the allocation"),
            (with(|r| r.gpu_uuid = [0; 16]), "needs gpu_uuid and handle"),
            (with(|r| r.handle = [0; 64]), "needs gpu_uuid and handle"),
        ];
        for (region, want) in cases {
            let e = exchange(
                &req2,
                &[(kvp_kv_region::host_memfd(8192), Some(&kv)), (region, None)],
            )
            .unwrap_err();
            assert!(
                e.contains("KV region #1") && e.contains(want),
                "{want}: {e}"
            );
        }
        // Descriptors: missing, surplus, and on a kind that carries none.
        let e = exchange(&req2, &[(good_ipc, None), (good_vmm, None)]).unwrap_err();
        assert!(
            e.contains("KV region #1 (CUDA VMM fd): no descriptor"),
            "{e}"
        );
        let e = exchange(&req2, &[(good_ipc, Some(&kv)), (good_ipc, None)]).unwrap_err();
        assert!(e.contains("more file descriptors"), "{e}");
        let e = exchange(&req2, &[(good_vmm, Some(&kv)), (good_ipc, Some(&kv))]).unwrap_err();
        assert!(e.contains("more file descriptors"), "{e}");
        // A host memfd whose size is not alloc_bytes, and one with a GPU uuid.
        let mut wrong = kvp_kv_region::host_memfd(4096);
        let e = exchange(&req2, &[(good_ipc, None), (wrong, Some(&kv))]).unwrap_err();
        assert!(
            e.contains("KV region #1") && e.contains("8192 != 4096"),
            "{e}"
        );
        wrong = kvp_kv_region::host_memfd(8192);
        wrong.gpu_uuid[0] = 1;
        let e = exchange(&req2, &[(good_ipc, None), (wrong, Some(&kv))]).unwrap_err();
        assert!(e.contains("host memfd with a GPU uuid"), "{e}");
        // Both good: accepted, the VMM region with its descriptor.
        let ok = exchange(&req2, &[(good_ipc, None), (good_vmm, Some(&kv))]).unwrap();
        assert_eq!(ok.kv_regions[1].kind, RegionKind::CudaVmmFd);
        assert!(ok.kv_regions[1].fd.is_some());
    }

    /// VMM chunks (or host memfds) mapped back to back in the engine: a region may
    /// continue the one before it only where the two can be one run.
    #[test]
    fn a_continuing_region_must_follow_one_it_can_be_mapped_after() {
        let kv = sys::memfd_create_sealed("kv", 8192).unwrap();
        let uuid = [2; 16];
        let chunk = |offset: u64, len: u64, continues: bool| {
            let mut r = kvp_kv_region::cuda_vmm_fd(uuid, 1 << 21, offset, len);
            if continues {
                r.flags = ffi::REGION_F_CONTINUES;
            }
            r
        };
        let req2 = build_request(1, 64, 64, 1 << 16, &["a"], 2).unwrap();
        let req3 = build_request(1, 64, 64, 1 << 16, &["a"], 3).unwrap();
        // Three chunks of one run, the first used from 1 MiB on: accepted.
        let ok = exchange(
            &req3,
            &[
                (chunk(1 << 20, 1 << 20, false), Some(&kv)),
                (chunk(0, 1 << 21, true), Some(&kv)),
                (chunk(0, 4096, true), Some(&kv)),
            ],
        )
        .unwrap();
        assert_eq!(ok.kv_regions[2].desc.flags, ffi::REGION_F_CONTINUES);
        let mut other_gpu = chunk(0, 4096, true);
        other_gpu.gpu_uuid = [3; 16];
        type Regions<'a> = Vec<(kvp_kv_region, Option<&'a OwnedFd>)>;
        let cases: Vec<(Regions, &str)> = vec![
            (
                vec![
                    (chunk(0, 4096, true), Some(&kv)),
                    (chunk(0, 4096, false), Some(&kv)),
                ],
                "KV region #0 continues #0: the first region continues nothing",
            ),
            (
                vec![
                    (chunk(0, 4096, false), Some(&kv)),
                    (chunk(0, 4096, true), Some(&kv)),
                ],
                "KV region #1 continues #0: the previous region stops before its allocation's end",
            ),
            (
                vec![
                    (chunk(0, 1 << 21, false), Some(&kv)),
                    (chunk(4096, 4096, true), Some(&kv)),
                ],
                "offset 4096 (must be 0)",
            ),
            (
                vec![
                    (chunk(0, 1 << 21, false), Some(&kv)),
                    (other_gpu, Some(&kv)),
                ],
                "another GPU",
            ),
            (
                vec![
                    (kvp_kv_region::host_memfd(8192), Some(&kv)),
                    (chunk(0, 4096, true), Some(&kv)),
                ],
                "a CUDA VMM fd after a host memfd",
            ),
        ];
        for (regions, want) in cases {
            let e = exchange(&req2, &regions).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        // Host memfds continue one another too (the daemon checks they meet).
        let mut second = kvp_kv_region::host_memfd(8192);
        second.flags = ffi::REGION_F_CONTINUES;
        exchange(
            &req2,
            &[
                (kvp_kv_region::host_memfd(8192), Some(&kv)),
                (second, Some(&kv)),
            ],
        )
        .unwrap();
    }

    #[test]
    fn host_memfd_regions_are_bounded_on_their_own() {
        let kv = sys::memfd_create_sealed("kv", 4096).unwrap();
        let n = ffi::MAX_HOST_KV_REGIONS + 1;
        let req = build_request(1, 64, 64, 1 << 16, &[], n).unwrap();
        let regions: Vec<_> = (0..n)
            .map(|_| (kvp_kv_region::host_memfd(4096), Some(&kv)))
            .collect();
        let e = exchange(&req, &regions).unwrap_err();
        assert!(
            e.contains(&format!(
                "KV region #{}: more than 512 host memfd regions",
                n - 1
            )),
            "{e}"
        );
    }

    #[test]
    fn region_counts_are_bounded_before_any_room_is_made() {
        let mut req = build_request(1, 64, 64, 1 << 16, &[], 0).unwrap();
        req.num_kv_regions = u32::MAX;
        let e = exchange(&req, &[]).unwrap_err();
        assert!(e.contains("4294967295 KV regions (at most 4096)"), "{e}");
        assert!(build_request(1, 64, 64, 1 << 16, &[], ffi::MAX_KV_REGIONS + 1).is_err());
        // Announced regions that never come: the hang-up names the bytes.
        req.num_kv_regions = 3;
        let e = exchange(&req, &[]).unwrap_err();
        assert!(
            e.contains(&format!("of {} bytes", REQUEST_BYTES + 3 * REGION_BYTES)),
            "{e}"
        );
    }

    #[test]
    fn an_old_client_gets_a_version_error() {
        let mut req = build_request(1, 64, 64, 1 << 16, &[], 0).unwrap();
        req.abi_version = 1;
        let e = exchange(&req, &[]).unwrap_err();
        assert!(e.contains("ABI version 1 (daemon speaks 2)"), "{e}");
    }

    #[test]
    fn a_peer_hanging_up_mid_request_is_an_error_naming_the_bytes() {
        let (mut engine, daemon) = UnixStream::pair().unwrap();
        daemon.set_nonblocking(true).unwrap();
        engine.write_all(&[0u8; 16]).unwrap();
        drop(engine);
        let mut reader = RequestReader::new();
        let e = reader.read_more(&daemon, true).unwrap_err().to_string();
        assert!(e.contains("after 16 of"), "{e}");
    }
}

//! The attach handshake over the daemon's Unix socket.
//!
//! engine -> daemon: `kvp_attach_request` (+ optionally a memfd of its KV buffer)
//! daemon -> engine: `kvp_attach_reply` (+ the session segment's memfd when status is OK)
//!
//! The connection then stays open for the life of the session: its hang-up is how each
//! side learns the other died, even if a pid is reused.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kvplane_ffi::{self as ffi, Pod, kvp_attach_reply, kvp_attach_request};

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
    /// The engine's KV buffer (host backend), checked to be a memfd that cannot shrink,
    /// of exactly the size the request announced.
    pub kv_buffer: Option<KvBuffer>,
}

/// An engine's KV buffer as the handshake accepted it: a memfd (shmem or hugetlbfs)
/// sealed against shrinking, whose size is exactly `bytes`. Whether hugetlb backing is
/// acceptable is the daemon's policy (`Backing::Hugetlb` can fault when the pool runs dry).
#[derive(Debug)]
pub struct KvBuffer {
    pub fd: OwnedFd,
    pub bytes: u64,
    pub backing: sys::Backing,
}

/// Checks a KV buffer descriptor an engine sent: everything that lets its backing vanish
/// under the daemon's mapping is refused here. The seals are read first: once
/// `F_SEAL_SHRINK` is set it can never be removed, so the size read after it is final
/// (reading the size first would let the engine shrink the file, then seal it).
fn check_kv_buffer(fd: &OwnedFd, bytes: u64) -> std::result::Result<sys::Backing, String> {
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

/// Bytes of one attach request on the wire.
pub const REQUEST_BYTES: usize = std::mem::size_of::<kvp_attach_request>();

/// Daemon side: read and validate the request of a freshly accepted connection, blocking
/// up to [`HANDSHAKE_TIMEOUT`] for it.
pub fn read_request(stream: &UnixStream) -> Result<AttachRequest> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ShmError::io("set_read_timeout", e))?;
    let mut reader = RequestReader::new();
    while !reader.read_more(stream, false)? {}
    reader.finish(stream)
}

/// An attach request read in pieces from a non-blocking socket, so one thread can wait
/// on many connections at once and a peer that sends a byte at a time holds no thread.
pub struct RequestReader {
    buf: Box<[u8; REQUEST_BYTES]>,
    got: usize,
    fd: Option<OwnedFd>,
}

impl Default for RequestReader {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestReader {
    pub fn new() -> RequestReader {
        RequestReader {
            buf: Box::new([0u8; REQUEST_BYTES]),
            got: 0,
            fd: None,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.got
    }

    /// Reads what the peer has sent: `Ok(true)` once the whole request is in, `Ok(false)`
    /// when more is to come (with `dont_wait`, nothing more is there yet). A hang-up
    /// before the end is an error naming how much came.
    pub fn read_more(&mut self, stream: &UnixStream, dont_wait: bool) -> Result<bool> {
        while self.got < REQUEST_BYTES {
            match sys::recv_some(stream, &mut self.buf[self.got..], &mut self.fd, dont_wait) {
                Ok(0) => {
                    return Err(self.failed(
                        stream,
                        format!(
                            "reading the attach request: the peer hung up after {} of {REQUEST_BYTES} bytes",
                            self.got
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
        Ok(true)
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
        if self.got < REQUEST_BYTES {
            return Err(ShmError::Handshake {
                peer: format!("pid {} uid {}", peer.pid, peer.uid),
                reason: format!("incomplete request: {} of {REQUEST_BYTES} bytes", self.got),
            });
        }
        parse_request(peer, &self.buf, self.fd)
    }
}

/// Validates a complete request from `peer`, with the descriptor that came with it.
fn parse_request(
    peer: PeerCred,
    buf: &[u8; REQUEST_BYTES],
    fd: Option<OwnedFd>,
) -> Result<AttachRequest> {
    let who = || format!("pid {} uid {}", peer.pid, peer.uid);
    let req: kvp_attach_request = ffi::read_pod(buf).expect("buffer is exactly one request");
    let bad = |reason: String| ShmError::Handshake {
        peer: who(),
        reason,
    };
    if req.magic != ffi::MAGIC {
        return Err(bad(format!("bad magic {:#x}", req.magic)));
    }
    if req.abi_version != ffi::ABI_VERSION {
        return Err(bad(format!(
            "ABI version {} (daemon speaks {})",
            req.abi_version,
            ffi::ABI_VERSION
        )));
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
    let kv_buffer = match (fd, req.kv_buffer_bytes) {
        (None, 0) => None,
        (Some(_), 0) => return Err(bad("a file descriptor came without kv_buffer_bytes".into())),
        (Some(fd), bytes) => {
            let backing = check_kv_buffer(&fd, bytes).map_err(bad)?;
            Some(KvBuffer { fd, bytes, backing })
        }
        (None, bytes) => {
            return Err(bad(format!(
                "kv_buffer_bytes = {bytes} but no file descriptor came with it"
            )));
        }
    };
    Ok(AttachRequest {
        peer,
        num_queue_pairs: req.num_queue_pairs,
        sq_entries: req.sq_entries,
        cq_entries: req.cq_entries,
        arena_bytes: req.arena_bytes,
        namespaces,
        kv_buffer,
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
    kv_buffer_bytes: u64,
) -> Result<kvp_attach_request> {
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
    req.kv_buffer_bytes = kv_buffer_bytes;
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
        let req = build_request(2, 64, 64, 1 << 16, &["tenant-a", "b"], 4096).unwrap();
        let bytes = ffi::as_bytes(&req);
        let kv = sys::memfd_create_sealed("kv", 4096).unwrap();
        let mut reader = RequestReader::new();
        assert!(
            !reader.read_more(&daemon, true).unwrap(),
            "nothing sent yet"
        );
        // The descriptor rides on the first piece; the rest trickles in.
        sys::send_with_fd(&engine, &bytes[..7], Some(kv.as_raw_fd())).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        assert_eq!(reader.received(), 7);
        engine.write_all(&bytes[7..500]).unwrap();
        assert!(!reader.read_more(&daemon, true).unwrap());
        engine.write_all(&bytes[500..]).unwrap();
        assert!(reader.read_more(&daemon, true).unwrap());
        let got = reader.finish(&daemon).unwrap();
        assert_eq!(got.namespaces, ["tenant-a", "b"]);
        assert_eq!((got.num_queue_pairs, got.arena_bytes), (2, 1 << 16));
        assert_eq!(got.kv_buffer.map(|kv| kv.bytes), Some(4096));
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

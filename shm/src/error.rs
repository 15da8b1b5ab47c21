//! Errors of the shared-memory layer, with the context an operator needs.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid segment geometry: {field} = {value}: {reason}")]
    Geometry {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("segment of session {session_id} is invalid: {reason}")]
    BadSegment { session_id: u64, reason: String },
    #[error(
        "ring {ring} of queue pair {qp} is corrupt: head {head}, tail {tail}, capacity {capacity}"
    )]
    RingCorrupt {
        ring: &'static str,
        qp: u32,
        head: u32,
        tail: u32,
        capacity: u32,
    },
    #[error("handshake with {peer}: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("attach refused by the daemon: {status}: {message}")]
    AttachRefused { status: i32, message: String },
    #[error("the daemon ended session {session_id} ({reason})")]
    SessionDead {
        session_id: u64,
        reason: &'static str,
    },
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout { what: &'static str, timeout_ms: u64 },
    #[error(
        "arena access out of range: offset {offset} + len {len} > slice {slice_bytes} (queue pair {qp})"
    )]
    ArenaRange {
        qp: u32,
        offset: u64,
        len: u64,
        slice_bytes: u64,
    },
    #[error("submission ring of queue pair {qp} is full ({capacity} entries)")]
    Full { qp: u32, capacity: u32 },
}

impl ShmError {
    pub fn io(op: &'static str, source: io::Error) -> Self {
        ShmError::Io { op, source }
    }
}

pub type Result<T, E = ShmError> = std::result::Result<T, E>;

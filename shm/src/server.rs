//! The daemon's side of a session: reading submissions, validating every field against
//! the geometry the daemon keeps privately, and posting completions.

use std::sync::atomic::Ordering;

use kvplane_ffi::{
    self as ffi, Opcode, Pod, Status, kvp_block_op, kvp_cqe, kvp_kv_layout, kvp_sqe, kvp_stats,
};

use crate::error::Result;
use crate::ring::{Consumer, Doorbell, Producer, RingKind};
use crate::segment::{Geometry, QpGeometry, Segment, header_offsets};

/// A submission that passed validation. Offsets are absolute in the segment and lie
/// inside the queue pair's arena slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub user_data: u64,
    pub opcode: Opcode,
    pub flags: u16,
    pub namespace_id: u32,
    pub arg_offset: u64,
    pub arg_len: u32,
    pub count: u32,
    pub param0: u64,
    pub param1: u64,
}

/// Why a submission was rejected: the status for its completion, and which field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: Status,
    pub field: &'static str,
}

fn reject(status: Status, field: &'static str) -> Rejection {
    Rejection { status, field }
}

fn ipc_event_bytes() -> u64 {
    std::mem::size_of::<ffi::kvp_ipc_event>() as u64
}

/// Validate one submission entry read from shared memory.
pub fn validate_sqe(
    sqe: &kvp_sqe,
    qp: &QpGeometry,
    num_namespaces: u32,
) -> Result<Request, Rejection> {
    let opcode = Opcode::from_raw(sqe.opcode).ok_or(reject(Status::BadOpcode, "opcode"))?;
    if sqe.flags & !ffi::SQE_F_ALL != 0 {
        return Err(reject(Status::BadFlags, "flags"));
    }
    let flags_ok = match opcode {
        Opcode::Load => sqe.flags & !ffi::SQE_F_PREFIX_ONLY == 0,
        Opcode::Save => sqe.flags & ffi::SQE_F_PREFIX_ONLY == 0,
        _ => sqe.flags == 0,
    };
    if !flags_ok {
        return Err(reject(Status::BadFlags, "flags"));
    }
    if sqe.reserved != [0; 14] {
        return Err(reject(Status::BadArg, "reserved"));
    }
    let needs_namespace = !matches!(
        opcode,
        Opcode::Nop | Opcode::Stats | Opcode::AttachLayout | Opcode::RegisterEvents
    );
    if needs_namespace && sqe.namespace_id >= num_namespaces {
        return Err(reject(Status::Namespace, "namespace_id"));
    }
    // The argument must lie inside this queue pair's slice: no overflow, no escape.
    let end = sqe.arg_offset.checked_add(sqe.arg_len as u64);
    if end.is_none_or(|e| e > qp.arena_bytes) {
        return Err(reject(Status::BadRange, "arg_offset/arg_len"));
    }
    let op_bytes = std::mem::size_of::<kvp_block_op>() as u64;
    match opcode {
        Opcode::Nop | Opcode::ClearNamespace => {}
        Opcode::Stats => {
            if (sqe.arg_len as usize) < std::mem::size_of::<kvp_stats>() {
                return Err(reject(Status::BadArg, "arg_len"));
            }
        }
        Opcode::AttachLayout => {
            if sqe.arg_len as usize != std::mem::size_of::<kvp_kv_layout>() {
                return Err(reject(Status::BadArg, "arg_len"));
            }
        }
        Opcode::RegisterEvents => {
            if sqe.count as usize > ffi::MAX_IPC_EVENTS {
                return Err(reject(Status::BadArg, "count"));
            }
            if sqe.arg_len as u64 != sqe.count as u64 * ipc_event_bytes() {
                return Err(reject(Status::BadArg, "arg_len"));
            }
        }
        Opcode::Lookup
        | Opcode::Save
        | Opcode::Load
        | Opcode::Pin
        | Opcode::Unpin
        | Opcode::Drop => {
            if sqe.count == 0 || sqe.count > ffi::MAX_BLOCKS_PER_OP {
                return Err(reject(Status::BadArg, "count"));
            }
            if sqe.arg_len as u64 != sqe.count as u64 * op_bytes {
                return Err(reject(Status::BadArg, "arg_len"));
            }
            if sqe.arg_offset % 8 != 0 {
                return Err(reject(Status::BadRange, "arg_offset"));
            }
            // SAVE and LOAD name a registered IPC event (1 + its index) or none.
            if matches!(opcode, Opcode::Save | Opcode::Load)
                && sqe.param0 > ffi::MAX_IPC_EVENTS as u64
            {
                return Err(reject(Status::BadArg, "param0"));
            }
        }
    }
    Ok(Request {
        user_data: sqe.user_data,
        opcode,
        flags: sqe.flags,
        namespace_id: sqe.namespace_id,
        arg_offset: qp.arena_offset + sqe.arg_offset,
        arg_len: sqe.arg_len,
        count: sqe.count,
        param0: sqe.param0,
        param1: sqe.param1,
    })
}

/// A completion with the given status for `user_data`.
pub fn completion(user_data: u64, status: Status) -> kvp_cqe {
    let mut c: kvp_cqe = Pod::zeroed();
    c.user_data = user_data;
    c.status = status.raw();
    c
}

/// The daemon's end of one queue pair.
pub struct ServerQueuePair<'a> {
    pub index: u32,
    pub geometry: QpGeometry,
    sq: Consumer<'a, kvp_sqe>,
    cq: Producer<'a, kvp_cqe>,
}

impl<'a> ServerQueuePair<'a> {
    pub fn new(seg: &'a Segment, geometry: QpGeometry, index: u32) -> Result<Self> {
        Ok(ServerQueuePair {
            index,
            geometry,
            sq: Consumer::new(
                seg,
                geometry.sq_offset,
                geometry.sq_entries,
                index,
                RingKind::Submission,
            )?,
            cq: Producer::new(
                seg,
                geometry.cq_offset,
                geometry.cq_entries,
                index,
                RingKind::Completion,
            )?,
        })
    }

    /// Take up to `out.len()` submissions, but never more than the completion ring can
    /// take right now: an engine that stops draining completions stalls only itself, and
    /// the daemon never buffers its completions (bounded memory).
    pub fn take(&mut self, out: &mut [kvp_sqe]) -> Result<usize> {
        let room = self.cq.free_cached()? as usize;
        let n = room.min(out.len());
        if n == 0 {
            return Ok(0);
        }
        Ok(self.sq.pop_many(&mut out[..n]))
    }

    /// Post completions (room was reserved by `take`). Returns how many were posted.
    pub fn complete(&mut self, cqes: &[kvp_cqe]) -> Result<usize> {
        self.cq.push_many(cqes, None)
    }

    pub fn has_submissions(&self) -> bool {
        self.sq.has_entries()
    }

    /// Whether `take` would return something now: submissions waiting and room for their
    /// completions. An engine that stops draining its completions has submissions that
    /// cannot be taken; a thread serving many sessions must not spin on it.
    pub fn can_take(&mut self) -> Result<bool> {
        Ok(self.sq.has_entries() && self.cq.free_cached()? > 0)
    }
}

/// Shared per-session words the daemon touches.
pub struct ServerHeader<'a> {
    pub doorbell: Doorbell<'a>,
    daemon_heartbeat: &'a std::sync::atomic::AtomicU64,
    state: &'a std::sync::atomic::AtomicU32,
}

impl<'a> ServerHeader<'a> {
    pub fn new(seg: &'a Segment) -> Result<Self> {
        Ok(ServerHeader {
            doorbell: Doorbell::new(
                seg.atomic_u32(header_offsets::SQ_DOORBELL_WORD)?,
                seg.atomic_u32(header_offsets::SQ_DOORBELL_SLEEPING)?,
            ),
            daemon_heartbeat: seg.atomic_u64(header_offsets::DAEMON_HEARTBEAT)?,
            state: seg.atomic_u32(header_offsets::STATE)?,
        })
    }
    pub fn heartbeat(&self) {
        self.daemon_heartbeat.fetch_add(1, Ordering::Relaxed);
    }
    pub fn set_state(&self, state: ffi::SessionState) {
        self.state.store(state.raw(), Ordering::Release);
    }
}

/// End a session in the segment: state DEAD, and every engine thread sleeping on a
/// completion ring woken so it sees that at once rather than after its sleep slice.
pub fn mark_dead(seg: &Segment, geometry: &Geometry) -> Result<()> {
    ServerHeader::new(seg)?.set_state(ffi::SessionState::Dead);
    for q in &geometry.queue_pairs {
        crate::ring::wake_ring_waiters(seg, q.cq_offset)?;
    }
    Ok(())
}

/// All queue pairs of a session, built from the daemon's private geometry.
pub fn server_queue_pairs<'a>(
    seg: &'a Segment,
    geometry: &Geometry,
) -> Result<Vec<ServerQueuePair<'a>>> {
    geometry
        .queue_pairs
        .iter()
        .enumerate()
        .map(|(i, q)| ServerQueuePair::new(seg, *q, i as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp() -> QpGeometry {
        Geometry::new(1, 64, 64, 65536).unwrap().queue_pairs[0]
    }

    fn sqe(op: u16) -> kvp_sqe {
        let mut s: kvp_sqe = Pod::zeroed();
        s.opcode = op;
        s
    }

    #[test]
    fn validation_names_the_field() {
        let q = qp();
        assert_eq!(
            validate_sqe(&sqe(99), &q, 1).unwrap_err().status,
            Status::BadOpcode
        );
        let mut s = sqe(Opcode::Lookup.raw());
        s.count = 2;
        s.arg_len = 48;
        assert!(validate_sqe(&s, &q, 1).is_ok());
        s.namespace_id = 1;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err(),
            reject(Status::Namespace, "namespace_id")
        );
        s.namespace_id = 0;
        s.arg_offset = q.arena_bytes - 40;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err().status,
            Status::BadRange
        );
        s.arg_offset = u64::MAX - 10;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err().status,
            Status::BadRange,
            "overflow"
        );
        s.arg_offset = 0;
        s.arg_len = 47;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err(),
            reject(Status::BadArg, "arg_len")
        );
        s.arg_len = 48;
        s.flags = 0x8000;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err().status,
            Status::BadFlags
        );
        s.flags = 0;
        s.reserved[13] = 1;
        assert_eq!(
            validate_sqe(&s, &q, 1).unwrap_err(),
            reject(Status::BadArg, "reserved")
        );
        let mut st = sqe(Opcode::Stats.raw());
        st.arg_len = 8;
        assert_eq!(validate_sqe(&st, &q, 0).unwrap_err().status, Status::BadArg);
        st.arg_len = std::mem::size_of::<kvp_stats>() as u32;
        let r = validate_sqe(&st, &q, 0).unwrap();
        assert_eq!(
            r.arg_offset, q.arena_offset,
            "absolute offset inside the slice"
        );
    }

    #[test]
    fn ipc_events_are_bounded_and_named_in_range() {
        let q = qp();
        let bytes = std::mem::size_of::<ffi::kvp_ipc_event>() as u32;
        // REGISTER_EVENTS needs no namespace; count 0 (release) to the maximum.
        let mut r = sqe(Opcode::RegisterEvents.raw());
        assert!(
            validate_sqe(&r, &q, 0).is_ok(),
            "count 0 releases the events"
        );
        r.count = ffi::MAX_IPC_EVENTS as u32;
        r.arg_len = r.count * bytes;
        assert!(validate_sqe(&r, &q, 0).is_ok());
        r.count += 1;
        r.arg_len = r.count * bytes;
        assert_eq!(
            validate_sqe(&r, &q, 0).unwrap_err(),
            reject(Status::BadArg, "count")
        );
        r.count = 2;
        r.arg_len = bytes;
        assert_eq!(
            validate_sqe(&r, &q, 0).unwrap_err(),
            reject(Status::BadArg, "arg_len")
        );
        // SAVE and LOAD: param0 is 0 or 1 + an index below the maximum.
        for op in [Opcode::Save, Opcode::Load] {
            let mut s = sqe(op.raw());
            s.count = 1;
            s.arg_len = 24;
            s.param0 = ffi::MAX_IPC_EVENTS as u64;
            assert!(validate_sqe(&s, &q, 1).is_ok(), "{op:?}");
            s.param0 += 1;
            assert_eq!(
                validate_sqe(&s, &q, 1).unwrap_err(),
                reject(Status::BadArg, "param0"),
                "{op:?}"
            );
        }
        // Other block operations ignore param0 (as before events existed).
        let mut l = sqe(Opcode::Lookup.raw());
        l.count = 1;
        l.arg_len = 24;
        l.param0 = u64::MAX;
        assert!(validate_sqe(&l, &q, 1).is_ok());
    }
}

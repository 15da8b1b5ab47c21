//! The data plane: what each validated request does. Runs on the session threads, never
//! on tokio. Requests arrive already validated against the segment geometry
//! (`kvplane_shm::server::validate_sqe`); what is checked here is their meaning.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kvplane_ffi::{self as ffi, Opcode, Pod, Status, kvp_cqe, kvp_stats};
use kvplane_shm::Segment;
use kvplane_shm::server::{Request, completion};
use kvplane_shm::sys::PeerCred;

/// Global namespace id: stable across restarts (NVMe slots record it), derived from the
/// name. Collisions between two live names are refused at attach.
pub fn namespace_id(name: &str) -> u32 {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
    (h ^ (h >> 32)) as u32
}

/// Daemon-wide counters (relaxed atomics: statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct Counters {
    pub ops_completed: AtomicU64,
    pub ops_failed: AtomicU64,
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    pub sessions_reclaimed: AtomicU64,
    pub protocol_violations: AtomicU64,
}

/// What the daemon keeps about one session, private to its thread.
#[derive(Debug)]
pub struct SessionData {
    pub id: u64,
    pub peer: PeerCred,
    /// Global namespace ids, indexed by the session's namespace_id.
    pub namespaces: Vec<u32>,
    /// Host backend: the engine's KV buffer, mapped.
    pub kv_buffer: Option<Segment>,
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace `{name}` collides with `{other}` (same 32-bit id {id:#x}); rename one")]
    Collision {
        name: String,
        other: String,
        id: u32,
    },
}

#[derive(Debug, Default)]
pub struct DataPlane {
    pub counters: Counters,
    names: Mutex<HashMap<u32, String>>,
}

impl DataPlane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolve a session's namespace names to global ids.
    pub fn bind_namespaces(&self, names: &[String]) -> Result<Vec<u32>, NamespaceError> {
        let mut known = self.names.lock().expect("namespace table poisoned");
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = namespace_id(name);
            match known.get(&id) {
                Some(other) if other != name => {
                    return Err(NamespaceError::Collision {
                        name: name.clone(),
                        other: other.clone(),
                        id,
                    });
                }
                Some(_) => {}
                None => {
                    known.insert(id, name.clone());
                }
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// Serve one validated request; the returned completion carries its user_data.
    /// The caller accounts the completion with `count` (once per batch, not per op).
    pub fn handle(&self, session: &mut SessionData, seg: &Segment, req: &Request) -> kvp_cqe {
        match req.opcode {
            Opcode::Nop => completion(req.user_data, Status::Ok),
            Opcode::Stats => self.stats(session, seg, req),
            // The block operations are served once the block manager is wired in.
            _ => completion(req.user_data, Status::Unsupported),
        }
    }

    /// Account a batch of completions (including rejections made before `handle`).
    pub fn count(&self, cqes: &[kvp_cqe]) {
        let failed = cqes.iter().filter(|c| c.status != Status::Ok.raw()).count() as u64;
        let ok = cqes.len() as u64 - failed;
        if ok > 0 {
            self.counters.ops_completed.fetch_add(ok, Ordering::Relaxed);
        }
        if failed > 0 {
            self.counters
                .ops_failed
                .fetch_add(failed, Ordering::Relaxed);
        }
    }

    fn stats(&self, session: &SessionData, seg: &Segment, req: &Request) -> kvp_cqe {
        let mut st: kvp_stats = Pod::zeroed();
        st.session_id = session.id;
        st.ops_completed = self.counters.ops_completed.load(Ordering::Relaxed);
        st.ops_failed = self.counters.ops_failed.load(Ordering::Relaxed);
        st.sessions_active = self.counters.sessions_active.load(Ordering::Relaxed);
        st.backend = 0;
        match seg.write_pod(req.arg_offset, &st) {
            Ok(()) => {
                let mut c = completion(req.user_data, Status::Ok);
                c.bytes = std::mem::size_of::<kvp_stats>() as u64;
                c
            }
            // Unreachable after validation; an error status rather than a panic anyway.
            Err(_) => completion(req.user_data, Status::Internal),
        }
    }

    /// The session is gone (detached, killed or cut off): release what it held.
    pub fn session_ended(&self, session: &SessionData) {
        let _ = session;
    }
}

/// Human name of a status, for logs.
pub fn status_name(raw: i32) -> &'static str {
    ffi::Status::from_raw(raw).map_or("unknown", |s| s.name())
}

//! How much engine memory the daemon maps: every KV buffer an engine registers is mapped
//! into the daemon's address space for the life of its session, at its full size, sparse
//! or not. Without a bound, a few sessions with tens-of-TiB sparse memfds exhaust the
//! daemon's 128 TiB of address space and every later attach fails. The ledger charges each
//! buffer, before it is mapped, to the daemon-wide total and to every namespace its session
//! binds, and refuses the attach that would pass a limit; the charge is returned when the
//! mapping goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why an engine's KV buffer may not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapLimitError {
    // Short, key words first: refusals travel in a 96-byte attach reply.
    #[error(
        "KV buffer of {asked_bytes} B over serve.max_mapped_bytes {limit_bytes} B ({held_bytes} B mapped)"
    )]
    Total {
        asked_bytes: u64,
        held_bytes: u64,
        limit_bytes: u64,
    },
    #[error(
        "namespace `{namespace}` max_mapped_bytes {limit_bytes} B: KV buffer {asked_bytes} B, {held_bytes} B mapped"
    )]
    Namespace {
        namespace: String,
        asked_bytes: u64,
        held_bytes: u64,
        limit_bytes: u64,
    },
}

#[derive(Debug, Default)]
struct Held {
    total_bytes: u64,
    /// Global namespace id -> bytes mapped for sessions bound to it.
    per_namespace: HashMap<u32, u64>,
}

/// The daemon's count of mapped engine memory (one per data plane).
#[derive(Debug, Default)]
pub struct MappedLedger {
    held: Mutex<Held>,
}

/// One namespace of the attaching session, with its limit (None: only the total applies).
#[derive(Debug, Clone, Copy)]
pub struct NamespaceLimit<'a> {
    pub id: u32,
    pub name: &'a str,
    pub max_mapped_bytes: Option<u64>,
}

/// A charge against the ledger, returned when dropped (with the mapping it paid for).
#[derive(Debug)]
pub struct MappedCharge {
    ledger: Arc<MappedLedger>,
    bytes: u64,
    namespaces: Vec<u32>,
}

impl MappedLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Plain counters, never left half-updated by a panic.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Engine memory mapped now, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Charges `bytes` to the total and to each namespace, or refuses without charging
    /// anything. Check and charge happen under one lock, so concurrent attaches cannot
    /// both fit in the last free share.
    pub fn charge(
        self: &Arc<Self>,
        bytes: u64,
        total_limit_bytes: u64,
        namespaces: &[NamespaceLimit<'_>],
    ) -> Result<MappedCharge, MapLimitError> {
        let mut held = self.lock();
        if held
            .total_bytes
            .checked_add(bytes)
            .is_none_or(|t| t > total_limit_bytes)
        {
            return Err(MapLimitError::Total {
                asked_bytes: bytes,
                held_bytes: held.total_bytes,
                limit_bytes: total_limit_bytes,
            });
        }
        let mut ids: Vec<u32> = Vec::with_capacity(namespaces.len());
        for ns in namespaces {
            if ids.contains(&ns.id) {
                continue; // named twice by one session: charged once
            }
            let now = held.per_namespace.get(&ns.id).copied().unwrap_or(0);
            if let Some(limit) = ns.max_mapped_bytes
                && now.checked_add(bytes).is_none_or(|t| t > limit)
            {
                return Err(MapLimitError::Namespace {
                    namespace: ns.name.to_string(),
                    asked_bytes: bytes,
                    held_bytes: now,
                    limit_bytes: limit,
                });
            }
            ids.push(ns.id);
        }
        held.total_bytes += bytes;
        for id in &ids {
            *held.per_namespace.entry(*id).or_insert(0) += bytes;
        }
        Ok(MappedCharge {
            ledger: Arc::clone(self),
            bytes,
            namespaces: ids,
        })
    }
}

impl Drop for MappedCharge {
    fn drop(&mut self) {
        let mut held = self.ledger.lock();
        held.total_bytes -= self.bytes;
        for id in &self.namespaces {
            if let Some(n) = held.per_namespace.get_mut(id) {
                *n -= self.bytes;
                if *n == 0 {
                    held.per_namespace.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(id: u32, max: Option<u64>) -> NamespaceLimit<'static> {
        NamespaceLimit {
            id,
            name: "t",
            max_mapped_bytes: max,
        }
    }

    #[test]
    fn charges_are_bounded_and_returned() {
        let l = Arc::new(MappedLedger::default());
        let a = l.charge(60, 100, &[ns(1, Some(80))]).expect("fits");
        // The total refuses first, then the namespace.
        assert!(matches!(
            l.charge(41, 100, &[ns(2, None)]),
            Err(MapLimitError::Total { held_bytes: 60, .. })
        ));
        assert!(matches!(
            l.charge(21, 1000, &[ns(2, None), ns(1, Some(80))]),
            Err(MapLimitError::Namespace { held_bytes: 60, .. })
        ));
        // A refusal charged nothing.
        assert_eq!(l.total_bytes(), 60);
        let b = l
            .charge(20, 100, &[ns(1, Some(80)), ns(1, Some(80))])
            .expect("fits");
        assert_eq!(l.total_bytes(), 80);
        drop(a);
        assert_eq!(l.total_bytes(), 20);
        let c = l
            .charge(60, 100, &[ns(1, Some(80))])
            .expect("freed by the drop");
        drop((b, c));
        assert_eq!(l.total_bytes(), 0);
        assert!(l.lock().per_namespace.is_empty());
        // Overflow is a refusal, not a wrap.
        let _d = l.charge(10, u64::MAX, &[]).expect("fits");
        assert!(l.charge(u64::MAX, u64::MAX, &[]).is_err());
        let msg = l.charge(u64::MAX, 100, &[]).unwrap_err().to_string();
        assert!(msg.contains("serve.max_mapped_bytes"), "{msg}");
    }
}

//! How much engine memory the daemon maps: every KV buffer an engine registers is mapped
//! into the daemon's address space for the life of its session, at its full size, sparse
//! or not. Without a bound, a few sessions with tens-of-TiB sparse memfds exhaust the
//! daemon's 128 TiB of address space and every later attach fails. The ledger charges each
//! buffer, before it is mapped, to the daemon-wide total and to every namespace its session
//! binds, and refuses the attach that would pass a limit; the charge is returned when the
//! mapping goes. The mappings a session's host window costs (each host memfd region and
//! the gaps between them) are counted too: past `vm.max_map_count` every mmap of the
//! daemon fails, its own allocations included.

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
    #[error("{asked} mappings over serve.max_engine_mappings {limit} ({held} held)")]
    Mappings { asked: u32, held: u32, limit: u32 },
    #[error(
        "uid {uid}: {asked} mappings over serve.max_engine_mappings_per_uid {limit} ({held} held)"
    )]
    UidMappings {
        uid: u32,
        asked: u32,
        held: u32,
        limit: u32,
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
    mappings: u32,
    /// Global namespace id -> bytes mapped for sessions bound to it.
    per_namespace: HashMap<u32, u64>,
    /// Uid -> mappings held for its sessions.
    per_uid: HashMap<u32, u32>,
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

/// The daemon-wide limits of a charge.
#[derive(Debug, Clone, Copy)]
pub struct MapLimits {
    pub bytes: u64,
    pub mappings: u32,
    /// Mappings one uid's sessions may hold together.
    pub mappings_per_uid: u32,
}

/// A charge against the ledger, returned when dropped (with the mapping it paid for).
#[derive(Debug)]
pub struct MappedCharge {
    ledger: Arc<MappedLedger>,
    bytes: u64,
    mappings: u32,
    uid: u32,
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

    /// Mappings of engines' host windows held now.
    pub fn mappings(&self) -> u32 {
        self.lock().mappings
    }

    /// Charges `bytes` in `mappings` mappings to the totals, the mappings to `uid` and the
    /// bytes to each namespace, or refuses without charging anything. Check and charge
    /// happen under one lock, so concurrent attaches cannot both fit in the last free
    /// share.
    pub fn charge(
        self: &Arc<Self>,
        bytes: u64,
        mappings: u32,
        uid: u32,
        limits: MapLimits,
        namespaces: &[NamespaceLimit<'_>],
    ) -> Result<MappedCharge, MapLimitError> {
        // Whether `asked` more would pass `limit` (an overflow does).
        let over =
            |held: u64, asked: u64, limit: u64| held.checked_add(asked).is_none_or(|t| t > limit);
        let mut held = self.lock();
        if over(held.total_bytes, bytes, limits.bytes) {
            return Err(MapLimitError::Total {
                asked_bytes: bytes,
                held_bytes: held.total_bytes,
                limit_bytes: limits.bytes,
            });
        }
        if over(
            held.mappings.into(),
            mappings.into(),
            limits.mappings.into(),
        ) {
            return Err(MapLimitError::Mappings {
                asked: mappings,
                held: held.mappings,
                limit: limits.mappings,
            });
        }
        let uid_held = held.per_uid.get(&uid).copied().unwrap_or(0);
        if over(
            uid_held.into(),
            mappings.into(),
            limits.mappings_per_uid.into(),
        ) {
            return Err(MapLimitError::UidMappings {
                uid,
                asked: mappings,
                held: uid_held,
                limit: limits.mappings_per_uid,
            });
        }
        let mut ids: Vec<u32> = Vec::with_capacity(namespaces.len());
        for ns in namespaces {
            if ids.contains(&ns.id) {
                continue; // named twice by one session: charged once
            }
            let now = held.per_namespace.get(&ns.id).copied().unwrap_or(0);
            if let Some(limit) = ns.max_mapped_bytes
                && over(now, bytes, limit)
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
        held.mappings += mappings;
        if mappings > 0 {
            *held.per_uid.entry(uid).or_insert(0) += mappings;
        }
        for id in &ids {
            *held.per_namespace.entry(*id).or_insert(0) += bytes;
        }
        Ok(MappedCharge {
            ledger: Arc::clone(self),
            bytes,
            mappings,
            uid,
            namespaces: ids,
        })
    }
}

impl Drop for MappedCharge {
    fn drop(&mut self) {
        let mut held = self.ledger.lock();
        held.total_bytes -= self.bytes;
        held.mappings -= self.mappings;
        if let Some(n) = held.per_uid.get_mut(&self.uid) {
            *n -= self.mappings;
            if *n == 0 {
                held.per_uid.remove(&self.uid);
            }
        }
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

    fn bytes(limit: u64) -> MapLimits {
        MapLimits {
            bytes: limit,
            mappings: u32::MAX,
            mappings_per_uid: u32::MAX,
        }
    }

    #[test]
    fn charges_are_bounded_and_returned() {
        let l = Arc::new(MappedLedger::default());
        let a = l
            .charge(60, 1, 7, bytes(100), &[ns(1, Some(80))])
            .expect("fits");
        // The total refuses first, then the namespace.
        assert!(matches!(
            l.charge(41, 1, 7, bytes(100), &[ns(2, None)]),
            Err(MapLimitError::Total { held_bytes: 60, .. })
        ));
        assert!(matches!(
            l.charge(21, 1, 7, bytes(1000), &[ns(2, None), ns(1, Some(80))]),
            Err(MapLimitError::Namespace { held_bytes: 60, .. })
        ));
        // A refusal charged nothing.
        assert_eq!((l.total_bytes(), l.mappings()), (60, 1));
        let b = l
            .charge(20, 1, 7, bytes(100), &[ns(1, Some(80)), ns(1, Some(80))])
            .expect("fits");
        assert_eq!(l.total_bytes(), 80);
        drop(a);
        assert_eq!(l.total_bytes(), 20);
        let c = l
            .charge(60, 1, 7, bytes(100), &[ns(1, Some(80))])
            .expect("freed by the drop");
        drop((b, c));
        assert_eq!((l.total_bytes(), l.mappings()), (0, 0));
        assert!(l.lock().per_namespace.is_empty());
        // Overflow is a refusal, not a wrap.
        let _d = l.charge(10, 1, 7, bytes(u64::MAX), &[]).expect("fits");
        assert!(l.charge(u64::MAX, 1, 7, bytes(u64::MAX), &[]).is_err());
        let msg = l
            .charge(u64::MAX, 1, 7, bytes(100), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("serve.max_mapped_bytes"), "{msg}");
    }

    /// Each host region is a mapping of the daemon's, and past vm.max_map_count every
    /// mmap fails: regions are counted against their own limit, whatever their bytes.
    #[test]
    fn mappings_are_bounded_and_returned() {
        let l = Arc::new(MappedLedger::default());
        let limits = MapLimits {
            bytes: u64::MAX,
            mappings: 5,
            mappings_per_uid: 5,
        };
        let a = l.charge(10, 3, 7, limits, &[]).expect("fits");
        let refused = l.charge(1, 3, 7, limits, &[]).unwrap_err();
        assert_eq!(
            refused,
            MapLimitError::Mappings {
                asked: 3,
                held: 3,
                limit: 5
            }
        );
        assert!(refused.to_string().contains("serve.max_engine_mappings"));
        assert_eq!(
            (l.total_bytes(), l.mappings()),
            (10, 3),
            "a refusal charges nothing"
        );
        let b = l.charge(0, 2, 7, limits, &[]).expect("the last two fit");
        assert!(l.charge(0, u32::MAX, 7, limits, &[]).is_err(), "no wrap");
        drop(a);
        let c = l.charge(0, 3, 7, limits, &[]).expect("freed by the drop");
        drop((b, c));
        assert_eq!(l.mappings(), 0);
    }

    /// One uid's sessions hold at most their share of the mappings, whatever is left of
    /// the total; another uid still attaches.
    #[test]
    fn one_uids_mappings_are_bounded_by_its_share() {
        let l = Arc::new(MappedLedger::default());
        let limits = MapLimits {
            bytes: u64::MAX,
            mappings: 10,
            mappings_per_uid: 4,
        };
        let a = l.charge(0, 3, 1000, limits, &[]).expect("fits");
        let refused = l.charge(0, 2, 1000, limits, &[]).unwrap_err();
        assert_eq!(
            refused,
            MapLimitError::UidMappings {
                uid: 1000,
                asked: 2,
                held: 3,
                limit: 4
            }
        );
        assert!(
            refused
                .to_string()
                .contains("serve.max_engine_mappings_per_uid")
        );
        let b = l
            .charge(0, 4, 1001, limits, &[])
            .expect("another uid's share");
        let c = l
            .charge(0, 1, 1000, limits, &[])
            .expect("the first uid's last one");
        drop(a);
        let d = l
            .charge(0, 3, 1000, limits, &[])
            .expect("given back by the drop");
        drop((b, c, d));
        assert!(l.lock().per_uid.is_empty());
        // Sessions without host regions hold no share.
        let _e = l
            .charge(0, 0, 1000, limits, &[])
            .expect("nothing to charge");
        assert!(l.lock().per_uid.is_empty());
    }
}

//! Session admission: one table, one lock, one reserve-or-refuse. Every limit on who may
//! hold sessions (daemon-wide, per uid, per namespace; sessions and queue pairs) is
//! checked and counted in the same critical section, so a burst of simultaneous attaches
//! can never admit one more than a limit allows. A [`Reservation`] is taken before the
//! attach reply is sent and gives its share back when dropped, on every exit path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;

/// Why an attach was refused; each names the limit that was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("daemon serves its maximum of {max} sessions")]
    Sessions { max: u32 },
    #[error("uid {uid} holds its maximum of {max} sessions")]
    UidSessions { uid: u32, max: u32 },
    #[error("uid {uid} holds {held} queue pairs; {asked} more exceeds its maximum of {max}")]
    UidQueuePairs {
        uid: u32,
        held: u32,
        asked: u32,
        max: u32,
    },
    #[error("namespace `{namespace}` has its maximum of {max} sessions")]
    NamespaceSessions { namespace: String, max: u32 },
    #[error(
        "namespace `{namespace}` holds {held} queue pairs; {asked} more exceeds its maximum of {max}"
    )]
    NamespaceQueuePairs {
        namespace: String,
        held: u32,
        asked: u32,
        max: u32,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    sessions: u32,
    queue_pairs: u32,
}

#[derive(Debug, Default)]
struct Held {
    sessions: u32,
    per_uid: HashMap<u32, Usage>,
    per_namespace: HashMap<String, Usage>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Limit {
    sessions: Option<u32>,
    queue_pairs: Option<u32>,
}

/// The limits of a config and what live sessions hold against them.
#[derive(Debug)]
pub struct Admission {
    max_sessions: u32,
    per_uid: Limit,
    per_namespace: HashMap<String, Limit>,
    held: Mutex<Held>,
}

impl Admission {
    pub fn new(config: &Config) -> Arc<Admission> {
        let s = &config.serve;
        Arc::new(Admission {
            max_sessions: s.max_sessions,
            per_uid: Limit {
                sessions: s.max_sessions_per_uid,
                queue_pairs: s.max_queue_pairs_per_uid,
            },
            per_namespace: config
                .namespaces
                .iter()
                .map(|ns| {
                    (
                        ns.name.clone(),
                        Limit {
                            sessions: ns.max_sessions,
                            queue_pairs: ns.max_queue_pairs,
                        },
                    )
                })
                .collect(),
            held: Mutex::new(Held::default()),
        })
    }

    /// Reserves one session of `queue_pairs` for `uid` in `namespaces`, or refuses
    /// naming the first limit it would exceed. Nothing is counted on refusal.
    pub fn reserve(
        self: &Arc<Self>,
        uid: u32,
        namespaces: &[String],
        queue_pairs: u32,
    ) -> Result<Reservation, Refusal> {
        let mut namespaces = namespaces.to_vec();
        namespaces.sort();
        namespaces.dedup();
        // The table holds plain counters that no panic leaves half-updated.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.sessions >= self.max_sessions {
            return Err(Refusal::Sessions {
                max: self.max_sessions,
            });
        }
        let uid_usage = held.per_uid.get(&uid).copied().unwrap_or_default();
        if let Some(max) = self.per_uid.sessions
            && uid_usage.sessions >= max
        {
            return Err(Refusal::UidSessions { uid, max });
        }
        if let Some(max) = self.per_uid.queue_pairs
            && uid_usage.queue_pairs.saturating_add(queue_pairs) > max
        {
            return Err(Refusal::UidQueuePairs {
                uid,
                held: uid_usage.queue_pairs,
                asked: queue_pairs,
                max,
            });
        }
        for ns in &namespaces {
            let Some(limit) = self.per_namespace.get(ns) else {
                continue;
            };
            let usage = held.per_namespace.get(ns).copied().unwrap_or_default();
            if let Some(max) = limit.sessions
                && usage.sessions >= max
            {
                return Err(Refusal::NamespaceSessions {
                    namespace: ns.clone(),
                    max,
                });
            }
            if let Some(max) = limit.queue_pairs
                && usage.queue_pairs.saturating_add(queue_pairs) > max
            {
                return Err(Refusal::NamespaceQueuePairs {
                    namespace: ns.clone(),
                    held: usage.queue_pairs,
                    asked: queue_pairs,
                    max,
                });
            }
        }
        held.sessions += 1;
        add(held.per_uid.entry(uid).or_default(), queue_pairs);
        for ns in &namespaces {
            add(
                held.per_namespace.entry(ns.clone()).or_default(),
                queue_pairs,
            );
        }
        Ok(Reservation {
            admission: Arc::clone(self),
            uid,
            namespaces,
            queue_pairs,
        })
    }

    /// Sessions reserved now.
    pub fn sessions(&self) -> u32 {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).sessions
    }

    fn release(&self, r: &Reservation) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.sessions -= 1;
        // Entries that reach zero are removed, so the table holds live holders only.
        if sub(held.per_uid.get_mut(&r.uid), r.queue_pairs) {
            held.per_uid.remove(&r.uid);
        }
        for ns in &r.namespaces {
            if sub(held.per_namespace.get_mut(ns), r.queue_pairs) {
                held.per_namespace.remove(ns);
            }
        }
    }
}

fn add(u: &mut Usage, queue_pairs: u32) {
    u.sessions += 1;
    u.queue_pairs += queue_pairs;
}

/// Takes one session back; true when nothing is left.
fn sub(u: Option<&mut Usage>, queue_pairs: u32) -> bool {
    let u = u.expect("a reservation's entry lives until it is released");
    u.sessions -= 1;
    u.queue_pairs -= queue_pairs;
    u.sessions == 0
}

/// One admitted session's share of the limits, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    admission: Arc<Admission>,
    uid: u32,
    namespaces: Vec<String>,
    queue_pairs: u32,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.admission.release(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn admission(toml: &str) -> Arc<Admission> {
        Admission::new(&Config::from_toml(toml, Path::new("t.toml")).unwrap())
    }

    fn ns(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_limit_is_enforced_and_released() {
        let a = admission(
            "[serve]\nmax_sessions = 5\nmax_sessions_per_uid = 3\nmax_queue_pairs_per_uid = 4\n\
             [[namespaces]]\nname = \"a\"\nuids = [1, 2]\nmax_sessions = 2\nmax_queue_pairs = 3\n\
             [[namespaces]]\nname = \"b\"\nuids = [1, 2]\n",
        );
        let r1 = a.reserve(1, &ns(&["a"]), 2).unwrap();
        assert_eq!(
            a.reserve(2, &ns(&["a"]), 2).unwrap_err(),
            Refusal::NamespaceQueuePairs {
                namespace: "a".into(),
                held: 2,
                asked: 2,
                max: 3
            }
        );
        let r2 = a.reserve(2, &ns(&["a", "b"]), 1).unwrap();
        assert!(matches!(
            a.reserve(1, &ns(&["a"]), 1),
            Err(Refusal::NamespaceSessions { .. })
        ));
        let r3 = a.reserve(1, &ns(&["b"]), 1).unwrap();
        assert_eq!(
            a.reserve(1, &ns(&["b"]), 2).unwrap_err(),
            Refusal::UidQueuePairs {
                uid: 1,
                held: 3,
                asked: 2,
                max: 4
            }
        );
        let r4 = a.reserve(1, &ns(&["b"]), 1).unwrap();
        assert_eq!(
            a.reserve(1, &ns(&["b"]), 1).unwrap_err(),
            Refusal::UidSessions { uid: 1, max: 3 }
        );
        let r5 = a.reserve(2, &ns(&["b"]), 1).unwrap();
        assert_eq!(
            a.reserve(3, &ns(&["b"]), 1).unwrap_err(),
            Refusal::Sessions { max: 5 }
        );
        assert_eq!(a.sessions(), 5);
        drop(r1);
        // Uid 1's and namespace a's share came back with r1.
        let r6 = a.reserve(1, &ns(&["a"]), 2).unwrap();
        drop((r2, r3, r4, r5, r6));
        assert_eq!(a.sessions(), 0);
        let held = a.held.lock().unwrap();
        assert!(held.per_uid.is_empty() && held.per_namespace.is_empty());
    }

    #[test]
    fn a_namespace_listed_twice_counts_once() {
        let a = admission("[[namespaces]]\nname = \"a\"\nuids = [1]\nmax_sessions = 1\n");
        let r = a.reserve(1, &ns(&["a", "a"]), 1).unwrap();
        drop(r);
        assert_eq!(a.sessions(), 0);
        let _r = a.reserve(1, &ns(&["a"]), 1).unwrap();
    }

    #[test]
    fn racing_reservations_never_exceed_the_limit() {
        let a = admission("[serve]\nmax_sessions = 7\n");
        for _ in 0..50 {
            let barrier = std::sync::Barrier::new(16);
            let won = std::thread::scope(|s| {
                let handles: Vec<_> = (0..16u32)
                    .map(|uid| {
                        let (a, barrier) = (&a, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            a.reserve(uid, &[], 1).ok()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            assert_eq!(won.len(), 7);
            assert_eq!(a.sessions(), 7);
            drop(won);
            assert_eq!(a.sessions(), 0);
        }
    }
}

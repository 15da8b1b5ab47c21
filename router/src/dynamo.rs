//! NVIDIA Dynamo's KV event format and JetStream naming, so kvplane's daemons feed
//! Dynamo's router and kvplane's router reads Dynamo's workers.
//!
//! Matched from Dynamo's own source (`lib/llm/src/kv_router/{publisher,jetstream}.rs`,
//! `lib/runtime/src/transports/nats.rs` and the `dynamo-kv-router` crate's
//! `protocols.rs`):
//!
//! - one JetStream stream per (Dynamo namespace, component): its name is the slug of
//!   `namespace.{ns}.component.{component}.kv-events` with `.` and `_` made `-`, its
//!   subjects `{stream}.*`, messages are published on `{stream}.queue`;
//! - each message body is one `RouterEvent` as JSON (Dynamo's router decodes it with
//!   `serde_json::from_slice::<RouterEvent>`), field names and enum spellings as below.
//!
//! kvplane adds what Dynamo's event lacks as NATS headers, which Dynamo ignores: the
//! kvplane namespace of the blocks (`Kvplane-Namespace`), the publisher's boot epoch
//! (`Kvplane-Epoch`) and a snapshot marker on the `Cleared` event that begins a full
//! re-publication of a worker (`Kvplane-Snapshot`). The test
//! `tests/tests/nats.rs::dynamo_decodes_our_events` decodes the stream with the
//! `dynamo-kv-router` crate's own types and compares its indexer's answers with kvplane's.
//!
//! kvplane's block keys are Dynamo sequence hashes (see `hash`); the daemon does not see
//! tokens, so `tokens_hash` carries the sequence hash too. A Dynamo router fed by kvplane
//! therefore queries with sequence hashes (as `LocalBlockHash`), not per-block token hashes.

use crate::Tier;
use serde::{Deserialize, Serialize};

/// Dynamo's `KV_EVENT_SUBJECT`.
pub const KV_EVENT_SUBJECT: &str = "kv-events";
/// Suffix Dynamo's `NatsQueue` publishes under (`{stream}.queue`).
pub const QUEUE_SUFFIX: &str = "queue";

/// Header: the kvplane namespace (tenant + model + LoRA) of the event's blocks.
pub const HEADER_NAMESPACE: &str = "Kvplane-Namespace";
/// Header: the publisher's boot epoch; event ids restart with each epoch.
pub const HEADER_EPOCH: &str = "Kvplane-Epoch";
/// Header on the `Cleared` event that starts a worker's full re-publication.
pub const HEADER_SNAPSHOT: &str = "Kvplane-Snapshot";
/// Header: the publishing node's name (shown in the router's `/workers`).
pub const HEADER_NODE: &str = "Kvplane-Node";
/// Header: the publisher's heartbeat period in milliseconds (absent or 0: it sends none,
/// and routers never leave it out for silence).
pub const HEADER_HEARTBEAT_MS: &str = "Kvplane-Heartbeat-Ms";

/// Dynamo's `Slug::slugify(..).replace('_', '-')`: lower case, anything but
/// `[a-z0-9-]` becomes `-`.
pub fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Dynamo's JetStream stream name for the KV events of `namespace`/`component`.
pub fn stream_name(namespace: &str, component: &str) -> String {
    slug(&format!(
        "namespace.{namespace}.component.{component}.{KV_EVENT_SUBJECT}"
    ))
}

/// The subject events are published on.
pub fn publish_subject(stream: &str) -> String {
    format!("{stream}.{QUEUE_SUFFIX}")
}

/// Dynamo's `StorageTier`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    #[default]
    Device,
    HostPinned,
    Disk,
    External,
}

impl StorageTier {
    pub fn from_tier(t: Tier) -> StorageTier {
        match t {
            Tier::Hbm => StorageTier::Device,
            Tier::Host => StorageTier::HostPinned,
            Tier::Nvme => StorageTier::Disk,
        }
    }

    /// kvplane's tier for Dynamo's (`External` has no kvplane tier: counted as NVMe, the
    /// slowest credit).
    pub fn to_tier(self) -> Tier {
        match self {
            StorageTier::Device => Tier::Hbm,
            StorageTier::HostPinned => Tier::Host,
            StorageTier::Disk | StorageTier::External => Tier::Nvme,
        }
    }
}

/// Dynamo's `RouterEvent` (legacy worker-owned wire form: no `residency_domain`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: u64,
    #[serde(default)]
    pub storage_tier: StorageTier,
    pub event: KvCacheEvent,
}

/// Dynamo's `KvCacheEvent`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: u32,
}

/// Dynamo's `KvCacheEventData`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(KvCacheStoreData),
    Removed(KvCacheRemoveData),
    Cleared,
}

/// Dynamo's `KvCacheStoreData`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    pub parent_hash: Option<u64>,
    #[serde(default)]
    pub start_position: Option<u32>,
    pub blocks: Vec<KvCacheStoredBlockData>,
}

/// Dynamo's `KvCacheStoredBlockData`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    pub block_hash: u64,
    pub tokens_hash: u64,
    /// Multimodal metadata; kvplane never has any (always `null` on the wire, which
    /// Dynamo requires to be present).
    #[serde(default)]
    pub mm_extra_info: Option<serde_json::Value>,
}

/// Dynamo's `KvCacheRemoveData`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    pub block_hashes: Vec<u64>,
}

impl RouterEvent {
    pub fn stored(
        worker: u64,
        event_id: u64,
        tier: Tier,
        parent: Option<u64>,
        hashes: &[u64],
    ) -> Self {
        RouterEvent {
            worker_id: worker,
            storage_tier: StorageTier::from_tier(tier),
            event: KvCacheEvent {
                event_id,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent,
                    start_position: None,
                    blocks: hashes
                        .iter()
                        .map(|&h| KvCacheStoredBlockData {
                            block_hash: h,
                            tokens_hash: h,
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
                dp_rank: 0,
            },
        }
    }

    pub fn removed(worker: u64, event_id: u64, tier: Tier, hashes: &[u64]) -> Self {
        RouterEvent {
            worker_id: worker,
            storage_tier: StorageTier::from_tier(tier),
            event: KvCacheEvent {
                event_id,
                data: KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes.to_vec(),
                }),
                dp_rank: 0,
            },
        }
    }

    pub fn cleared(worker: u64, event_id: u64) -> Self {
        RouterEvent {
            worker_id: worker,
            storage_tier: StorageTier::Device,
            event: KvCacheEvent {
                event_id,
                data: KvCacheEventData::Cleared,
                dp_rank: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_dynamo() {
        assert_eq!(
            stream_name("dynamo", "backend"),
            "namespace-dynamo-component-backend-kv-events"
        );
        assert_eq!(
            publish_subject(&stream_name("Dyn_NS", "vllm.worker")),
            "namespace-dyn-ns-component-vllm-worker-kv-events.queue"
        );
    }

    #[test]
    fn json_shape_is_dynamos() {
        let e = RouterEvent::stored(7, 3, Tier::Host, Some(1), &[2]);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "worker_id": 7,
                "storage_tier": "host_pinned",
                "event": {"event_id": 3, "dp_rank": 0, "data": {"stored": {
                    "parent_hash": 1, "start_position": null,
                    "blocks": [{"block_hash": 2, "tokens_hash": 2, "mm_extra_info": null}]}}}
            })
        );
        let c = serde_json::to_value(RouterEvent::cleared(7, 4)).unwrap();
        assert_eq!(c["event"]["data"], "cleared");
        let r = serde_json::to_value(RouterEvent::removed(7, 5, Tier::Nvme, &[9])).unwrap();
        assert_eq!(r["storage_tier"], "disk");
        assert_eq!(r["event"]["data"]["removed"]["block_hashes"][0], 9);
    }
}

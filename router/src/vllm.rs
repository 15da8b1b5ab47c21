//! Decoder for vLLM's KV event feed (`vllm/distributed/kv_events.py`), so an engine
//! without kvplane can be routed too.
//!
//! vLLM publishes `KVEventBatch` messages with msgspec's msgpack encoder. Both encodings
//! msgspec can produce are accepted:
//! - positional arrays (`array_like=True`, vLLM's default):
//!   batch `[ts, [event, ...], data_parallel_rank?]`, event `["BlockStored", block_hashes,
//!   parent_block_hash, token_ids, block_size, lora_id, medium, ...]`;
//! - tagged maps: batch `{"ts", "events", ...}`, event `{"type": "BlockStored",
//!   "block_hashes": ..., ...}`.
//!
//! Unknown keys and extra trailing fields are ignored. Block hashes may be integers or
//! bytes (newer vLLM uses sha256 bytes); bytes are folded to 64 bits with xxh3.
//!
//! The feed normally travels over ZMQ; here the same payloads arrive over the router's
//! frame listener (see [`crate::events`]), so no ZMQ library is needed.
//!
//! [`VllmTranslator`] turns decoded events into index operations keyed by the router's
//! own Dynamo-compatible sequence hashes, computed from `token_ids`, so vLLM workers and
//! kvplane workers are matched against the same `POST /route` query. vLLM's own hashes
//! are kept only to resolve parents and removals.

use crate::hash;
use crate::index::HashMapU64;
use crate::{Tier, WorkerId};
use rmpv::Value;

/// One decoded vLLM KV event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VllmEvent {
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_id: Option<u64>,
        medium: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Option<String>,
    },
    AllBlocksCleared,
}

/// A decoded `KVEventBatch`.
#[derive(Clone, Debug, PartialEq)]
pub struct VllmBatch {
    pub ts: f64,
    pub events: Vec<VllmEvent>,
    pub data_parallel_rank: Option<i64>,
    /// Events of a kind this decoder does not know (skipped, counted).
    pub unknown_events: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum VllmDecodeError {
    #[error("not msgpack")]
    Msgpack(#[from] rmpv::decode::Error),
    #[error("bad KVEventBatch: {0}")]
    Shape(&'static str),
    #[error("bad {event} event: field {field}")]
    Field {
        event: &'static str,
        field: &'static str,
    },
}

fn block_hash(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)),
        Value::Binary(b) => Some(xxhash_rust::xxh3::xxh3_64(b)),
        _ => None,
    }
}

fn hashes(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(block_hash).collect()
}

fn opt<T>(v: Option<&Value>, f: impl Fn(&Value) -> Option<T>) -> Result<Option<T>, ()> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => f(v).map(Some).ok_or(()),
    }
}

fn map_get<'a>(m: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    m.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Field accessor over either form: positional index (after the tag) or key.
enum Fields<'a> {
    Array(&'a [Value]),
    Map(&'a [(Value, Value)]),
}

impl Fields<'_> {
    fn get(&self, pos: usize, key: &str) -> Option<&Value> {
        match self {
            Fields::Array(a) => a.get(pos + 1),
            Fields::Map(m) => map_get(m, key),
        }
    }
}

fn decode_event(v: &Value) -> Result<Option<VllmEvent>, VllmDecodeError> {
    let (tag, fields) = match v {
        Value::Array(a) => (
            a.first().and_then(Value::as_str),
            Fields::Array(a.as_slice()),
        ),
        Value::Map(m) => (
            map_get(m, "type").and_then(Value::as_str),
            Fields::Map(m.as_slice()),
        ),
        _ => return Err(VllmDecodeError::Shape("event is neither array nor map")),
    };
    let Some(tag) = tag else {
        return Err(VllmDecodeError::Shape("event without a type tag"));
    };
    let field = |event, field| VllmDecodeError::Field { event, field };
    Ok(Some(match tag {
        "BlockStored" => {
            const E: &str = "BlockStored";
            let block_hashes = fields
                .get(0, "block_hashes")
                .and_then(hashes)
                .ok_or(field(E, "block_hashes"))?;
            let parent_block_hash = opt(fields.get(1, "parent_block_hash"), block_hash)
                .map_err(|_| field(E, "parent_block_hash"))?;
            let token_ids = match fields.get(2, "token_ids") {
                None | Some(Value::Nil) => Vec::new(),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|t| t.as_u64().map(|t| t as u32)).collect())
                    .ok_or(field(E, "token_ids"))?,
            };
            let block_size = opt(fields.get(3, "block_size"), Value::as_u64)
                .map_err(|_| field(E, "block_size"))?
                .unwrap_or(0) as u32;
            let lora_id =
                opt(fields.get(4, "lora_id"), Value::as_u64).map_err(|_| field(E, "lora_id"))?;
            let medium = opt(fields.get(5, "medium"), |v| v.as_str().map(str::to_owned))
                .map_err(|_| field(E, "medium"))?;
            VllmEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
            }
        }
        "BlockRemoved" => {
            const E: &str = "BlockRemoved";
            let block_hashes = fields
                .get(0, "block_hashes")
                .and_then(hashes)
                .ok_or(field(E, "block_hashes"))?;
            let medium = opt(fields.get(1, "medium"), |v| v.as_str().map(str::to_owned))
                .map_err(|_| field(E, "medium"))?;
            VllmEvent::BlockRemoved {
                block_hashes,
                medium,
            }
        }
        "AllBlocksCleared" => VllmEvent::AllBlocksCleared,
        _ => return Ok(None),
    }))
}

/// Decodes one msgpack `KVEventBatch` payload.
pub fn decode_batch(payload: &[u8]) -> Result<VllmBatch, VllmDecodeError> {
    let mut rd = payload;
    let value = rmpv::decode::read_value(&mut rd)?;
    let (ts, events, dp) = match &value {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(m) => (
            map_get(m, "ts"),
            map_get(m, "events"),
            map_get(m, "data_parallel_rank"),
        ),
        _ => return Err(VllmDecodeError::Shape("batch is neither array nor map")),
    };
    let ts = ts.and_then(Value::as_f64).unwrap_or(0.0);
    let events = events
        .and_then(Value::as_array)
        .ok_or(VllmDecodeError::Shape("missing events list"))?;
    let data_parallel_rank = dp.and_then(Value::as_i64);
    let mut out = Vec::with_capacity(events.len());
    let mut unknown_events = 0;
    for e in events {
        match decode_event(e)? {
            Some(e) => out.push(e),
            None => unknown_events += 1,
        }
    }
    Ok(VllmBatch {
        ts,
        events: out,
        data_parallel_rank,
        unknown_events,
    })
}

/// vLLM's `medium` strings to tiers (`None` and "GPU" mean device memory).
pub fn medium_tier(medium: Option<&str>) -> Tier {
    match medium.map(str::to_ascii_uppercase).as_deref() {
        None | Some("GPU") | Some("HBM") => Tier::Hbm,
        Some("CPU") | Some("HOST") => Tier::Host,
        _ => Tier::Nvme,
    }
}

/// Index operation produced from vLLM events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexOp {
    Store {
        parent: Option<u64>,
        hashes: Vec<u64>,
        tier: Tier,
    },
    Remove {
        hashes: Vec<u64>,
        tier: Option<Tier>,
    },
    Clear,
}

/// Per-connection state mapping vLLM block hashes to router sequence hashes.
#[derive(Debug)]
pub struct VllmTranslator {
    pub worker: WorkerId,
    pub block_size: u32,
    map: HashMapU64<u64>,
    max_entries: usize,
    /// Stored events whose parent this connection never saw (skipped).
    pub unknown_parents: u64,
}

impl VllmTranslator {
    pub fn new(worker: WorkerId, block_size: u32, max_entries: usize) -> Self {
        VllmTranslator {
            worker,
            block_size,
            map: HashMapU64::default(),
            max_entries,
            unknown_parents: 0,
        }
    }

    pub fn tracked_blocks(&self) -> usize {
        self.map.len()
    }

    /// Translates one event. Block hashes are recomputed from `token_ids` when the event
    /// carries a full block of tokens per hash; otherwise vLLM's hash is used as is.
    pub fn translate(&mut self, event: &VllmEvent) -> Option<IndexOp> {
        match event {
            VllmEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
            } => {
                let parent = match parent_block_hash {
                    None => None,
                    Some(p) => match self.map.get(p) {
                        Some(&s) => Some(s),
                        None => {
                            self.unknown_parents += 1;
                            return None;
                        }
                    },
                };
                let bs = if *block_size > 0 {
                    *block_size
                } else {
                    self.block_size
                } as usize;
                let ours: Vec<u64> = if bs > 0 && token_ids.len() == bs * block_hashes.len() {
                    let lora = lora_id.map(|id| id.to_string());
                    let salt = hash::salt_hash(None, lora.as_deref());
                    let mut prev = parent;
                    token_ids
                        .chunks_exact(bs)
                        .map(|b| {
                            let s = hash::sequence_hash(prev, hash::block_hash(b, salt));
                            prev = Some(s);
                            s
                        })
                        .collect()
                } else {
                    block_hashes.clone()
                };
                if self.map.len() + ours.len() > self.max_entries {
                    // Bounded memory: forget the mapping (removals of old blocks then miss
                    // and the grace/resync path cleans up); keep the index consistent.
                    tracing::warn!(worker = self.worker, "vLLM hash map full; clearing");
                    self.map.clear();
                    return Some(IndexOp::Clear);
                }
                for (v, s) in block_hashes.iter().zip(&ours) {
                    self.map.insert(*v, *s);
                }
                Some(IndexOp::Store {
                    parent,
                    hashes: ours,
                    tier: medium_tier(medium.as_deref()),
                })
            }
            VllmEvent::BlockRemoved {
                block_hashes,
                medium,
            } => {
                let tier = medium.as_deref().map(|m| medium_tier(Some(m)));
                let hashes: Vec<u64> = block_hashes
                    .iter()
                    .filter_map(|h| {
                        // Device-tier removal ends the mapping; lower tiers may still hold it.
                        if matches!(tier, None | Some(Tier::Hbm)) {
                            self.map.remove(h)
                        } else {
                            self.map.get(h).copied()
                        }
                    })
                    .collect();
                Some(IndexOp::Remove { hashes, tier })
            }
            VllmEvent::AllBlocksCleared => {
                self.map.clear();
                Some(IndexOp::Clear)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medium_mapping() {
        assert_eq!(medium_tier(None), Tier::Hbm);
        assert_eq!(medium_tier(Some("cpu")), Tier::Host);
        assert_eq!(medium_tier(Some("DISK")), Tier::Nvme);
    }
}

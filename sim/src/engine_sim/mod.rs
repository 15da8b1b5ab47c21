//! The simulated inference engine (`kvplane engine-sim`) and what the replay driver shares
//! with it.
//!
//! An engine-sim process behaves like a paged-attention engine as far as KV memory goes:
//! - its "HBM" is a paged KV pool in a sealed memfd, registered with the daemon session as
//!   the session's KV buffer and described to the daemon with `ATTACH_LAYOUT` (per-layer,
//!   per-plane page arrays like vLLM's, so every SAVE and LOAD runs the daemon's strided
//!   gather and scatter);
//! - continuous batching with chunked prefill (a token budget per pass, a cap on running
//!   sequences, LIFO preemption when the pool runs dry), prefix caching in its own pool
//!   (full pages keyed by chained block hash, idle pages in an LRU);
//! - NVIDIA Dynamo's mock-engine timing model ([`timing`]) on a virtual clock, so a replay
//!   of a 17-minute trace runs in a few minutes while every ring operation is real;
//! - on a miss in its own pool it asks the daemon (LOOKUP, then LOAD of the hit prefix,
//!   charged at the transfer time the daemon reports); pages it evicts are SAVEd first,
//!   and with eager offload (the default, like Dynamo's KVBM) every page is offered to the
//!   daemon as soon as its prefill completes.
//!
//! Page contents are a deterministic function of the block hash ([`pages::fill_block`]);
//! every page loaded from the daemon is compared byte for byte and mismatches counted.
//!
//! Default KV geometry, chosen so 8 engines with Dynamo's 16,384 pages each fit in memory:
//! 2 layers x 2 planes (K, V) x 64 tokens x 1 head x 16 bytes = 4 KiB per page (one daemon
//! block). Timing does not depend on it: the model charges tokens, not bytes.

pub mod cost;
pub mod engine;
pub mod pages;
pub mod pool;
pub mod proto;
pub mod timing;

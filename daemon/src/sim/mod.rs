//! Simulated engine (issue 6): a paged KV pool in shared memory, continuous batching, prefix caching and the Dynamo mock-engine timing model, talking to the daemon over the rings.

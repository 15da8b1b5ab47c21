//! Block registry, leases and eviction (issue 3).

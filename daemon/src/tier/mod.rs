//! Storage tiers: pinned host pool and NVMe (issue 3).

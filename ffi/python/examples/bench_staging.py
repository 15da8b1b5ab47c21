#!/usr/bin/env python3
"""The host-memory cost of KvplaneConnector: the copy between vLLM's KV pages and the
registered staging region (one copy per block and layer), as the connector does it
(`torch.index_select(..., out=region)` to save, `index_copy_` to load), against a
ceiling measured in the same run: one contiguous copy of the same bytes.

    python3 ffi/python/examples/bench_staging.py [--json] [--layers 32 --kv-heads 8
        --head-dim 128 --block-tokens 16 --dtype bfloat16 --blocks 256]

Defaults: a Llama-3-8B-shaped block (32 layers, 8 KV heads x 128, bf16, 16-token
blocks: 2 MiB per block), in the CPU backend's per-layer layout.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvplane.vllm import StagingRegion, host_geometry  # noqa: E402


def best_s(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--blocks", type=int, default=256, help="blocks per save/load")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    pool_blocks = 2 * a.blocks
    kv = {f"layer{i}": torch.randn(pool_blocks, a.kv_heads, a.block_tokens, 2 * a.head_dim).to(dtype)
          for i in range(a.layers)}
    g = host_geometry(kv, a.block_tokens, a.kv_heads, a.head_dim)
    region = StagingRegion(g, a.blocks)
    kv_u8 = [g.block_view(t) for t in kv.values()]
    # Scattered engine pages, as a real pool has them.
    vids = torch.randperm(pool_blocks)[: a.blocks]
    nbytes = a.blocks * g.block_bytes

    def save():
        for layer, t in enumerate(kv_u8):
            torch.index_select(t, 0, vids, out=region.view[layer, : a.blocks])

    def load():
        for layer, t in enumerate(kv_u8):
            t.index_copy_(0, vids, region.view[layer, : a.blocks])

    src = torch.empty(nbytes // 8, dtype=torch.int64).fill_(1)
    dst = torch.empty(nbytes // 8, dtype=torch.int64).fill_(0)
    save()  # fault the region in before timing
    ceiling_s = best_s(lambda: dst.copy_(src), a.reps)
    save_s = best_s(save, a.reps)
    load_s = best_s(load, a.reps)
    # The copy is exact: what went out comes back.
    before = [t[vids].clone() for t in kv_u8]
    save()
    for t in kv_u8:
        t[vids] = 0
    load()
    assert all(torch.equal(b, t[vids]) for b, t in zip(before, kv_u8))
    out = {
        "block_bytes": g.block_bytes, "blocks": a.blocks, "bytes": nbytes,
        "save_gbps": nbytes / save_s / 1e9, "load_gbps": nbytes / load_s / 1e9,
        "memcpy_gbps": nbytes / ceiling_s / 1e9,
        "save_ratio": ceiling_s / save_s, "load_ratio": ceiling_s / load_s,
        "save_us_per_block": save_s / a.blocks * 1e6, "load_us_per_block": load_s / a.blocks * 1e6,
        "torch_threads": torch.get_num_threads(),
    }
    region.close()
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{a.blocks} blocks of {g.block_bytes} B: save {out['save_gbps']:.2f} GB/s "
              f"({out['save_ratio']:.2f} of memcpy), load {out['load_gbps']:.2f} GB/s "
              f"({out['load_ratio']:.2f}); memcpy {out['memcpy_gbps']:.2f} GB/s")


if __name__ == "__main__":
    main()

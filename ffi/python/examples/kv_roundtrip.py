#!/usr/bin/env python3
"""One engine's side of a KV round trip through kvplane, with its KV pool registered in
place by `kvplane.register_kv` (host memory: `kvplane.host_buffer`).

    kv_roundtrip.py SOCKET save --layout vllm   --seed 7 --blocks 8
    kv_roundtrip.py SOCKET load --layout sglang --seed 7 --blocks 8

`save` fills pages 0..blocks-1 of its pool with blocks generated from the seed and SAVEs
them; `load` (another process, any of the layouts: the daemon stores blocks in one
canonical order) zeroes its pool, LOADs the same blocks into pages in reverse order and
checks every (layer, K/V, token, head) against the seed's data. Geometry: --layers,
--tokens, --heads, --head-dim (fp16); the daemon's [blocks] block_bytes must be
layers x 2 x tokens x heads x head_dim x 2. Prints one line; exit status 0 when it held.
"""
import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kvplane  # noqa: E402

POOL_PAGES_EXTRA = 3  # pages that no block uses: the loader must not write them


class Pool:
    """A KV pool in host_buffer memory, in one of the engines' layouts; `page(l, p)` is a
    view [page, token, head, dim] of layer l's plane p, whatever the storage order."""

    def __init__(self, layout, layers, pages, tokens, heads, dim):
        self.layout, self.shape = layout, (layers, pages, tokens, heads, dim)
        per_plane = pages * tokens * heads * dim
        if layout == "sglang":
            # Separate K and V buffers; each layer's pool has a padding page, as SGLang's.
            self.bufs = [kvplane.host_buffer(layers * (per_plane + tokens * heads * dim) * 2)
                         for _ in range(2)]
            k, v = (np.frombuffer(b, dtype=np.uint16).reshape(layers, (pages + 1) * tokens, heads, dim)
                    for b in self.bufs)
            self.tensors = [(k[l], v[l]) for l in range(layers)]
            self._planes = [[x[l][:pages * tokens].reshape(pages, tokens, heads, dim) for x in (k, v)]
                            for l in range(layers)]
            self.reg = kvplane.register_kv(self.tensors, layout="sglang", page_tokens=tokens)
        else:
            self.bufs = [kvplane.host_buffer(layers * 2 * per_plane * 2 + 4096)]
            flat = np.frombuffer(self.bufs[0], dtype=np.uint16)[2048:]  # not at offset 0
            if layout == "vllm":
                self.tensors = [flat[l * 2 * per_plane:(l + 1) * 2 * per_plane].reshape(2, pages, tokens, heads, dim)
                                for l in range(layers)]
                self._planes = [[t[0], t[1]] for t in self.tensors]
            elif layout == "vllm_hnd":
                self.tensors = [flat[l * 2 * per_plane:(l + 1) * 2 * per_plane].reshape(2, pages, heads, tokens, dim)
                                for l in range(layers)]
                self._planes = [[t[p].transpose(0, 2, 1, 3) for p in range(2)] for t in self.tensors]
            else:
                raise SystemExit(f"unknown layout {layout}")
            self.reg = kvplane.register_kv(self.tensors, layout=layout)

    def page(self, layer, plane):
        return self._planes[layer][plane]

    def fill(self, value):
        for b in self.bufs:
            np.frombuffer(b, dtype=np.uint8)[:] = value


def block_data(seed, index, layers, tokens, heads, dim):
    rng = np.random.default_rng([seed, index])
    return rng.integers(0, 1 << 16, size=(layers, 2, tokens, heads, dim), dtype=np.uint16)


def call(q, sqe, arg=b""):
    if arg:
        q.write_arena(sqe.arg_offset, arg)
        sqe.arg_len = len(arg)
    if q.submit([sqe]) != 1:
        raise kvplane.KvplaneError("submission ring full")
    for c in q.wait(timeout_ms=10000):
        if c.user_data == sqe.user_data:
            return c
    raise kvplane.KvplaneError(f"no completion for op {sqe.opcode}")


def block_ops(hashes, pages):
    ops = (kvplane.BlockOp * len(hashes))()
    for i, (h, page) in enumerate(zip(hashes, pages)):
        ops[i].hash, ops[i].parent_hash, ops[i].engine_block = h, hashes[i - 1] if i else 0, page
    return bytes(ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("role", choices=["save", "load"])
    ap.add_argument("--layout", default="vllm", choices=["vllm", "vllm_hnd", "sglang"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--namespace", default="kv-roundtrip")
    a = ap.parse_args()
    n, pages = a.blocks, a.blocks + POOL_PAGES_EXTRA
    geo = (a.layers, a.tokens, a.heads, a.head_dim)
    pool = Pool(a.layout, a.layers, pages, a.tokens, a.heads, a.head_dim)
    hashes = [(a.seed << 32) | (i + 1) for i in range(n)]
    with kvplane.Client(a.socket, namespaces=[a.namespace], regions=pool.reg) as client:
        q = client.queue(0)
        c = call(q, kvplane.Sqe(user_data=1, opcode=kvplane.OP_ATTACH_LAYOUT), bytes(pool.reg.layout))
        if c.status != kvplane.OK:
            raise SystemExit(f"ATTACH_LAYOUT: {kvplane.STATUS_NAMES.get(c.status)} (field {c.detail})")
        if a.role == "save":
            pool.fill(0)
            for i in range(n):
                data = block_data(a.seed, i, *geo)
                for l in range(a.layers):
                    for p in range(2):
                        pool.page(l, p)[i] = data[l, p]
            c = call(q, kvplane.Sqe(user_data=2, opcode=kvplane.OP_SAVE, count=n),
                     block_ops(hashes, range(n)))
            ok = c.status == kvplane.OK and c.blocks == n
            print(f"save: {pool.reg.describe()}: status={kvplane.STATUS_NAMES.get(c.status)} "
                  f"blocks={c.blocks}/{n}")
        else:
            pool.fill(0xEE)
            c = call(q, kvplane.Sqe(user_data=2, opcode=kvplane.OP_LOOKUP, count=n),
                     block_ops(hashes, [0] * n))
            found = c.blocks if c.status == kvplane.OK else -1
            dest = [pages - 1 - i for i in range(n)]  # reversed: the pages are addressed
            c = call(q, kvplane.Sqe(user_data=3, opcode=kvplane.OP_LOAD, count=n),
                     block_ops(hashes, dest))
            loaded = c.blocks if c.status == kvplane.OK else -1
            bad = []
            for i in range(n):
                data = block_data(a.seed, i, *geo)
                for l in range(a.layers):
                    for p in range(2):
                        if not np.array_equal(pool.page(l, p)[dest[i]], data[l, p]):
                            bad.append((i, l, p))
            # Pages no block was loaded into keep the pattern the loader wrote.
            untouched = all(np.all(pool.page(l, p)[pg] == 0xEEEE) for pg in range(pages - n)
                            for l in range(a.layers) for p in range(2))
            ok = found == n and loaded == n and not bad and untouched
            print(f"load: {pool.reg.describe()}: lookup={found}/{n} loaded={loaded}/{n} "
                  f"mismatched={len(bad)} first={bad[:3]} untouched_pages_intact={untouched}")
        q.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

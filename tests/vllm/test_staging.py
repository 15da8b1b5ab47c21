"""The connector's staging region against a real daemon, without a vLLM engine: KV
tensors in vLLM's CPU-backend layout are saved through the region (as save_kv_layer and
wait_for_save do) and loaded into other pages of a zeroed pool; the bytes come back
exactly, so the layout the region describes to the daemon round-trips through its
canonical block order. Also the region allocator."""
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ffi" / "python"))
from daemon import ROOT, Daemon  # noqa: E402

import kvplane  # noqa: E402
from kvplane import hashing  # noqa: E402
from kvplane.vllm import BlockBatch, StagingRegion, _block_op_bytes, _Ranges, _Session, host_geometry  # noqa: E402

LAYERS, HEADS, TOKENS, DIM = 3, 2, 32, 32


def pool(fill):
    g = torch.Generator().manual_seed(fill)
    return {f"model.layers.{i}.self_attn.attn": (torch.rand(16, HEADS, TOKENS, 2 * DIM, generator=g) if fill
                                                 else torch.zeros(16, HEADS, TOKENS, 2 * DIM))
            for i in range(LAYERS)}


def test_ranges_allocate_coalesce():
    r = _Ranges(10)
    a, b, c = r.alloc(4), r.alloc(4), r.alloc(2)
    assert (a, b, c) == (0, 4, 8) and r.alloc(1) is None
    r.release(4, 4)
    assert r.alloc(5) is None
    r.release(0, 4)
    assert r.alloc(8) == 0, "released neighbours merge"


def test_save_then_load_roundtrip():
    os.environ.setdefault("KVPLANE_LIB", str(ROOT / "target" / "debug" / "libkvplane.so"))
    src, dst = pool(1), pool(0)
    g = host_geometry(src, TOKENS, HEADS, DIM)
    assert g.block_bytes == LAYERS * 2 * TOKENS * HEADS * DIM * 4
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), g.block_bytes)
        try:
            region = StagingRegion(g, 8)
            s = _Session(daemon.socket, ["test-staging"], region.fd, region.bytes)
            ud, _ = s.submit(kvplane.OP_ATTACH_LAYOUT, arg=bytes(region.layout()))
            assert s.wait_for(ud, 5000).status == kvplane.OK
            hashes = hashing.sequence_hashes(list(range(5 * TOKENS)), TOKENS, hashing.salt_hash())
            parents = [0] + hashes[:-1]
            src_ids, dst_ids = [3, 9, 4, 15, 0], [1, 2, 7, 12, 5]
            # Save: vLLM pages -> region pages 2..6 -> daemon.
            vids = torch.tensor(src_ids)
            for layer, t in enumerate(src.values()):
                torch.index_select(g.block_view(t), 0, vids, out=region.view[layer, 2:7])
            batch = BlockBatch(0, hashes, parents, src_ids)
            ud, _ = s.submit(kvplane.OP_SAVE, 0, _block_op_bytes(batch, range(2, 7)), 5)
            c = s.wait_for(ud, 5000)
            assert (c.status, c.blocks) == (kvplane.OK, 5)
            region.view.zero_()
            # Load: daemon -> region pages 0..4 -> other vLLM pages.
            ud, _ = s.submit(kvplane.OP_LOAD, 0, _block_op_bytes(batch, range(0, 5)), 5,
                             flags=kvplane.SQE_F_PREFIX_ONLY)
            c = s.wait_for(ud, 5000)
            assert (c.status, c.blocks) == (kvplane.OK, 5)
            for layer, t in enumerate(dst.values()):
                g.block_view(t).index_copy_(0, torch.tensor(dst_ids), region.view[layer, 0:5])
            for name in src:
                assert torch.equal(src[name][src_ids], dst[name][dst_ids]), name
                untouched = [i for i in range(16) if i not in dst_ids]
                assert not dst[name][untouched].any()
            # A chain the daemon does not hold: PREFIX_ONLY reports 0 blocks, nothing used.
            other = hashing.sequence_hashes(list(range(7, 7 + TOKENS)), TOKENS, hashing.salt_hash())
            miss = BlockBatch(0, other, [0], [0])
            ud, _ = s.submit(kvplane.OP_LOAD, 0, _block_op_bytes(miss, [0]), 1, flags=kvplane.SQE_F_PREFIX_ONLY)
            assert s.wait_for(ud, 5000).blocks == 0
            # A block gone between LOOKUP and LOAD (dropped here): PREFIX_ONLY completes OK
            # with the leading blocks only; the connector copies those and reports the rest.
            ud, _ = s.submit(kvplane.OP_DROP, 0, _block_op_bytes(BlockBatch(0, hashes[2:3], parents[2:3], [0]), [0]), 1)
            assert s.wait_for(ud, 5000).status == kvplane.OK
            ud, _ = s.submit(kvplane.OP_LOAD, 0, _block_op_bytes(batch, range(0, 5)), 5,
                             flags=kvplane.SQE_F_PREFIX_ONLY)
            c = s.wait_for(ud, 5000)
            assert (c.status, c.blocks) == (kvplane.OK, 2)
            s.close()
        finally:
            daemon.stop()

"""The vLLM connector's in-place path on a GPU, without vLLM: two processes with KV pools
in HBM, shaped as vLLM's FlashAttention backend shapes them ([2, pages, tokens, heads,
dim] per layer, bf16), registered in place by `kvplane.register_kv` (CUDA IPC regions;
VMM regions, one per chunk, under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) and
moved by `kvplane.pages.DirectPages`, the code the connector runs: SAVEs wait on an
interprocess event recorded on the saver's stream, the loader's stream waits on the event
the daemon records after its copy.

    KVPLANE_LIB=gpu-bin/libkvplane.so python3 direct_pages_gpu.py --socket S [--json]

runs the saver, then the loader (each a child process of this one), which compares every
byte of the pages it loaded with the saver's (regenerated from the same seed on the
GPU). Prints one JSON object; exit status 0 only if both ran and every byte matched.
Geometry: Llama-3.1-8B (32 layers, 8 KV heads of 128, 16-token pages: 2 MiB blocks).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, HEADS, DIM, TOKENS = 32, 8, 128, 16


def pool(torch, pages, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv = {}
    for i in range(LAYERS):
        t = torch.empty((2, pages, TOKENS, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
        if seed:
            t.copy_(torch.rand(t.shape, generator=g, device="cuda", dtype=torch.float32))
        else:
            t.zero_()
        kv[f"model.layers.{i}.self_attn.attn"] = t
    return kv


def role(args):
    import torch

    import kvplane
    from kvplane import hashing
    from kvplane.pages import DIRECT_ARENA_BYTES, BlockBatch, DirectPages, _Session, vllm_device_layout

    torch.cuda.set_device(0)
    kv = pool(torch, args.pages, args.seed if args.role == "save" else 0)
    stats = SimpleNamespace(saved_blocks=0, save_failed_blocks=0, save_skipped_blocks=0)
    reg = kvplane.register_kv(list(kv.values()), layout=vllm_device_layout(kv, TOKENS, HEADS, DIM))
    pages = DirectPages(reg, stats)
    s = _Session(args.socket, [args.namespace], regions=reg, arena_bytes=DIRECT_ARENA_BYTES)
    refused = pages.attach(s, 10000)
    if refused:
        raise SystemExit(f"attach: {refused}")
    hashes = hashing.sequence_hashes(list(range(args.blocks * TOKENS)), TOKENS, hashing.salt_hash())
    parents = [0] + hashes[:-1]
    src_ids = list(range(args.pages - 1, args.pages - 1 - args.blocks, -1))  # scattered, reversed
    dst_ids = list(range(0, 2 * args.blocks, 2))
    report = {"role": args.role, "blocks": args.blocks, "block_bytes": pages.block_bytes,
              "regions": reg.describe()}
    if args.role == "save":
        # No synchronisation: the SAVE's event orders the daemon's read after the fill.
        t0 = time.perf_counter()
        pages.save(s, [BlockBatch(0, hashes, parents, src_ids, "r")])
        deadline = time.monotonic() + 30
        while pages.ops and time.monotonic() < deadline:
            try:
                s.collect(1000)
            except kvplane.TimedOut:
                continue
            pages.reap(s, lambda *a: print(*a, file=sys.stderr))
        report["save_submit_to_completion_ms"] = (time.perf_counter() - t0) * 1000
        report["saved_blocks"] = stats.saved_blocks
        report["ok"] = stats.saved_blocks == args.blocks and not pages.ops
    else:
        t0 = time.perf_counter()
        results, error = pages.load(s, [BlockBatch(0, hashes, parents, dst_ids, "r")], 30000)
        report["load_submit_to_completion_ms"] = (time.perf_counter() - t0) * 1000
        torch.cuda.current_stream().synchronize()  # after the wait on the daemon's event
        report["load_ms"] = (time.perf_counter() - t0) * 1000
        (_, landed, reason), = results
        report["landed"], report["reason"] = landed, reason
        want = pool(torch, args.pages, args.seed)
        mismatched = [name for name in kv
                      if not torch.equal(kv[name][:, dst_ids], want[name][:, src_ids])]
        report["mismatched_layers"] = len(mismatched)
        report["ok"] = error is None and landed == args.blocks and not mismatched
    s.close()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--role", choices=["save", "load"])
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--pages", type=int, default=128)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--namespace", default="direct-pages-gpu")
    args = p.parse_args()
    if args.role:
        return role(args)
    out = {}
    for r in ("save", "load"):
        cmd = [sys.executable, __file__, "--socket", args.socket, "--role", r, "--blocks",
               str(args.blocks), "--pages", str(args.pages), "--seed", str(args.seed),
               "--namespace", args.namespace]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ)
        sys.stderr.write(proc.stderr)
        line = proc.stdout.strip().splitlines()[-1:] or ["{}"]
        out[r] = {"rc": proc.returncode, **json.loads(line[0])}
    out["ok"] = all(out[r]["rc"] == 0 for r in ("save", "load"))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reference (c) of the offload measurement: what a simple Python KV connector does.

For the same geometry as `gpu_check`'s offload table (vLLM's per-layer
[2, pages, tokens, kv_heads, head_dim] bf16 tensors, one allocation per layer as vLLM
makes them; Llama-3.1-8B and -70B; 16- and 64-token pages; 1-512 blocks scattered over a
pool twice the largest batch), it times per layer one `index_select` on the device plus
one copy into pinned host memory (save), and per layer one copy to the device plus one
`index_copy_` (load), each checked against the source. Prints one JSON object.

    python3 scripts/gpu/torch_offload.py [--iters 5] [--max-case-mib 4096] [--out FILE]
"""
import argparse
import json
import time

import torch

MODELS = {"llama-3.1-8b": (32, 8, 128), "llama-3.1-70b": (80, 8, 128)}


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-case-mib", type=int, default=4096)
    ap.add_argument("--batches", default="1,4,16,64,512")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda:0")
    rows, skipped = [], []
    gen = torch.Generator(device=dev).manual_seed(7)
    for model, (layers, heads, dim) in MODELS.items():
        for page_tokens in (16, 64):
            block_bytes = layers * 2 * page_tokens * heads * dim * 2
            fit = [n for n in batches if n * block_bytes <= args.max_case_mib << 20]
            skipped += [(model, page_tokens, n) for n in batches if n not in fit]
            if not fit:
                continue
            pool = 2 * max(fit)
            kv = [
                torch.randn((2, pool, page_tokens, heads, dim), device=dev,
                            dtype=torch.bfloat16, generator=gen)
                for _ in range(layers)
            ]
            for n in fit:
                perm = torch.randperm(pool, device=dev, generator=gen)
                save_idx, load_idx = perm[:n], perm[n:2 * n]
                host = torch.empty((layers, 2, n, page_tokens, heads, dim),
                                   dtype=torch.bfloat16, pin_memory=True)

                def save():
                    for layer in range(layers):
                        host[layer].copy_(kv[layer].index_select(1, save_idx), non_blocking=True)

                def load():
                    for layer in range(layers):
                        tmp = host[layer].to(dev, non_blocking=True)
                        kv[layer].index_copy_(1, load_idx, tmp)

                save_s = timed(save, args.iters)
                torch.cuda.synchronize()
                for layer in (0, layers - 1):
                    want = kv[layer].index_select(1, save_idx).cpu()
                    assert torch.equal(host[layer], want), f"save check {model} {page_tokens} {n}"
                load_s = timed(load, args.iters)
                torch.cuda.synchronize()
                for layer in (0, layers - 1):
                    got = kv[layer].index_select(1, load_idx).cpu()
                    assert torch.equal(got, host[layer]), f"load check {model} {page_tokens} {n}"
                bulk_src = kv[0].view(-1)[: min(kv[0].numel(), n * block_bytes // 2)]
                bulk_dst = torch.empty(bulk_src.numel(), dtype=torch.bfloat16, pin_memory=True)
                bulk_s = timed(lambda: bulk_dst.copy_(bulk_src, non_blocking=True), args.iters)
                nbytes = n * block_bytes
                rows.append({
                    "model": model, "page_tokens": page_tokens, "blocks": n,
                    "block_bytes": block_bytes,
                    "save_gbps": nbytes / save_s / 1e9, "load_gbps": nbytes / load_s / 1e9,
                    "save_us": save_s * 1e6, "load_us": load_s * 1e6,
                    "bulk_d2h_gbps_same_bytes_capped_at_one_layer": bulk_src.numel() * 2 / bulk_s / 1e9,
                })
                del host, bulk_dst
            del kv
            torch.cuda.empty_cache()
    report = json.dumps({
        "torch": torch.__version__, "device": torch.cuda.get_device_name(0),
        "method": "per layer: index_select + one copy to pinned host (save); "
                  "one copy to device + index_copy_ (load)",
        "rows": rows, "skipped": skipped,
    })
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()

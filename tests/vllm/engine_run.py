#!/usr/bin/env python3
"""One vLLM engine (CPU build, real model code, random weights) over a list of token-id
prompts, greedy; writes its outputs and vLLM's own metrics as JSON. Run by
test_vllm_connector.py, one process per engine.

    engine_run.py --model DIR --prompts P.json --out O.json [--socket S]
                  [--kill-daemon-pid PID] [--staging-blocks N]

--socket: use KvplaneConnector (module kvplane.vllm) against the daemon at S.
--kill-daemon-pid: SIGKILL that daemon right after the scheduler's first LOOKUP that
reported hits, so the worker's LOAD of those hits meets a dead daemon.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# One process by default: the scheduler and the worker (and so both connector roles) live
# here, which lets the kill hook and the stats below reach them. --multiprocess keeps
# vLLM's default (the engine core in a child process, as `vllm serve` runs it).
MULTIPROCESS = "--multiprocess" in sys.argv
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if MULTIPROCESS else "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ffi" / "python"))


def metric_values(llm):
    from vllm.v1.metrics.reader import Counter, Histogram

    by_source, ttft = {}, None
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name == "vllm:prompt_tokens_by_source":
            by_source[m.labels["source"]] = by_source.get(m.labels["source"], 0) + m.value
        elif isinstance(m, Histogram) and m.name == "vllm:time_to_first_token_seconds":
            ttft = {"sum_s": m.sum, "count": m.count}
        elif isinstance(m, Counter) and m.name == "vllm:prompt_tokens":
            by_source["_total"] = m.value
        elif isinstance(m, Counter) and m.name == "vllm:num_preemptions":
            by_source["_preemptions"] = by_source.get("_preemptions", 0) + m.value
    return by_source, ttft


def dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def kv_in_host_buffers():
    """vLLM's CPU build allocates its KV cache with torch.zeros (one int8 buffer, viewed
    per layer): here that buffer comes from a kvplane.host_buffer instead, which the
    daemon can map, so the connector registers vLLM's pages in place, as it does with a
    GPU build's CUDA tensors. Test scaffolding: vLLM's code is otherwise unchanged."""
    import torch

    import kvplane
    import vllm.v1.worker.gpu_model_runner as runner

    allocate, keep = runner.allocate_kv_cache, []

    def allocate_in_host_buffer(*a, **kw):
        zeros = torch.zeros

        def host_zeros(size, *za, dtype=None, device=None, **zkw):
            if dtype == torch.int8 and isinstance(size, int) and torch.device(device).type == "cpu":
                keep.append(kvplane.host_buffer(size, "vllm-kv"))  # a fresh memfd reads as zeros
                return torch.frombuffer(keep[-1], dtype=torch.int8)
            return zeros(size, *za, dtype=dtype, device=device, **zkw)

        torch.zeros = host_zeros
        try:
            return allocate(*a, **kw)
        finally:
            torch.zeros = zeros

    runner.allocate_kv_cache = allocate_in_host_buffer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--socket")
    ap.add_argument("--kill-daemon-pid", type=int)
    ap.add_argument("--staging-blocks", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--multiprocess", action="store_true", help="vLLM's default process layout")
    ap.add_argument("--in-place", action="store_true",
                    help="vLLM's KV cache in kvplane.host_buffer memory, registered in place")
    ap.add_argument("--salt", help="the connector's salt (its own namespace)")
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20,
                    help="vLLM's KV cache (small: vLLM preempts requests)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-prefix-caching", action="store_true")
    args = ap.parse_args()
    if args.in_place:
        if args.multiprocess:
            ap.error("--in-place patches the in-process engine's KV allocation")
        kv_in_host_buffers()

    t0 = time.monotonic()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if args.socket:
        kv = KVTransferConfig(
            kv_connector="KvplaneConnector",
            kv_connector_module_path="kvplane.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"socket": args.socket, "staging_blocks": args.staging_blocks,
                                       "host_buffer_in_place": args.in_place, "salt": args.salt},
        )
    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              seed=0, enforce_eager=True, block_size=args.block_size, max_model_len=args.max_model_len,
              max_num_seqs=4, gpu_memory_utilization=0.05, kv_cache_memory_bytes=args.kv_cache_bytes,
              disable_log_stats=False, kv_transfer_config=kv,
              enable_prefix_caching=not args.no_prefix_caching)
    init_s = time.monotonic() - t0

    sched_conn = worker_conn = None
    if args.kill_daemon_pid and args.multiprocess:
        ap.error("--kill-daemon-pid needs the in-process engine")
    if args.socket and not args.multiprocess:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        worker_conn = get_kv_transfer_group()
        sched_conn = llm.llm_engine.engine_core.engine_core.scheduler.connector
    killed_at = None
    if args.kill_daemon_pid:
        orig = sched_conn.get_num_new_matched_tokens

        def lookup_then_kill(request, num_computed_tokens):
            nonlocal killed_at
            result = orig(request, num_computed_tokens)
            if killed_at is None and result[0] and result[0] > 0:
                os.kill(args.kill_daemon_pid, signal.SIGKILL)
                while not dead(args.kill_daemon_pid):
                    time.sleep(0.005)
                killed_at = {"request": request.request_id, "hit_tokens": result[0]}
            return result

        sched_conn.get_num_new_matched_tokens = lookup_then_kill

    prompts = json.loads(Path(args.prompts).read_text())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    t1 = time.monotonic()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    gen_s = time.monotonic() - t1
    requests_left = None
    if sched_conn is not None:
        # generate() returns with the last outputs; requests whose blocks the connector
        # keeps (pages in place) are freed by later steps: run them, bounded.
        core = llm.llm_engine.engine_core.engine_core
        deadline = time.monotonic() + 60
        while core.scheduler.has_requests() and time.monotonic() < deadline:
            core.step()
            time.sleep(0.001)
        requests_left = len(core.scheduler.requests)
    by_source, ttft = metric_values(llm)
    result = {
        "connector": bool(args.socket),
        "outputs": [list(o.outputs[0].token_ids) for o in outs],
        "num_cached_tokens": [o.num_cached_tokens for o in outs],
        "prompt_tokens_by_source": by_source,
        "ttft": ttft,
        "init_s": init_s,
        "generate_s": gen_s,
        "killed_at": killed_at,
        "requests_left": requests_left,  # in the scheduler after draining (None: not seen)
    }
    if worker_conn is not None:
        result["worker_stats"] = worker_conn.stats.as_dict()
        result["scheduler_stats"] = sched_conn.stats.as_dict()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "outputs"}))


if __name__ == "__main__":
    main()

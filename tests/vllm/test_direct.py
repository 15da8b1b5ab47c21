"""The connector with vLLM's KV registered in place (DirectPages), against a real daemon.

On a GPU vLLM's tensors are CUDA memory registered as CUDA IPC regions; here (no GPU)
they are CPU tensors in `kvplane.host_buffer` memory, shaped as vLLM's FlashAttention
backend shapes them ([2, blocks, tokens, heads, dim] per layer), which the connector
registers in place the same way. Real KvplaneConnector objects (built from a real
VllmConfig of a tiny model) are driven through vLLM's worker-side calls with
hand-built step metadata, the interface the scheduler side fills:

- engine A saves pages in place; engine B, another session, loads them into other pages
  of its own pool, byte for byte, with no staging copy counted;
- with the daemon stopped (SIGSTOP): a LOAD that times out fails its blocks (vLLM
  recomputes them) but its finished request is not reported by get_finished, so its
  blocks are not freed under the daemon's late copy, until the daemon answers; and the
  step after a SAVE the daemon has not read waits for it before the forward pass
  (vLLM frees a preempted request's blocks without asking the connector);
- the scheduler side delays freeing exactly the requests it moved blocks for.

The CUDA-only parts (IPC regions, the interprocess events ordering the daemon's copies
against vLLM's stream) run only on a GPU: scripts/gpu-e2e.sh.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ffi" / "python"))
from daemon import ROOT, Daemon  # noqa: E402
from test_vllm_connector import BLOCK_BYTES, BLOCK_TOKENS, MODEL  # noqa: E402

import kvplane  # noqa: E402
from kvplane import hashing  # noqa: E402

LAYERS, HEADS, DIM, PAGES = MODEL["num_hidden_layers"], MODEL["num_key_value_heads"], MODEL["head_dim"], 16
OP_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def vllm_config():
    os.environ.setdefault("KVPLANE_LIB", str(ROOT / "target" / "debug" / "libkvplane.so"))
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(MODEL))
        work = Path(tmp) / "work"
        work.mkdir()
        daemon = Daemon(work, BLOCK_BYTES)
        try:
            def make(in_place=True):
                kv = KVTransferConfig(
                    kv_connector="KvplaneConnector", kv_role="kv_both",
                    kv_connector_module_path="kvplane.vllm", kv_load_failure_policy="recompute",
                    kv_connector_extra_config={"socket": str(daemon.socket), "op_timeout_ms": OP_TIMEOUT_MS,
                                               "host_buffer_in_place": in_place})
                return VllmConfig(model_config=ModelConfig(model=str(model), skip_tokenizer_init=True,
                                                           dtype="float32"),
                                  kv_transfer_config=kv, cache_config=CacheConfig(block_size=BLOCK_TOKENS))
            yield SimpleNamespace(make=make, daemon=daemon)
        finally:
            daemon.stop()


def pool(seed):
    """vLLM's FlashAttention KV shape per layer, in memory the daemon can map."""
    layers = {}
    for i in range(LAYERS):
        buf = kvplane.host_buffer(2 * PAGES * BLOCK_TOKENS * HEADS * DIM * 4)
        t = torch.frombuffer(buf, dtype=torch.float32).view(2, PAGES, BLOCK_TOKENS, HEADS, DIM)
        if seed:
            t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(seed * 100 + i)))
        layers[f"model.layers.{i}.self_attn.attn"] = t
    return layers


def worker(cfg, kv):
    from kvplane.vllm import KvplaneConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    w = KvplaneConnector(cfg.make(), KVConnectorRole.WORKER)
    w.register_kv_caches(kv)
    assert w._direct is not None, "host_buffer tensors register in place"
    assert w._session is not None, "attached"
    return w


def step(w, saves=(), loads=(), delayed=(), finished=(), preempted=()):
    """One vLLM step on the worker side, in vLLM's order; returns get_finished's sending set."""
    from kvplane.vllm import KvplaneMetadata

    meta = KvplaneMetadata(loads=list(loads), saves=list(saves), delayed=list(delayed),
                           preempted=list(preempted))
    w.handle_preemptions(meta)
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    w.wait_for_save()
    sending, recving = w.get_finished(set(finished))
    w.clear_connector_metadata()
    assert recving is None
    return sending or set()


def chain(seed, n):
    hashes = hashing.sequence_hashes([seed * 7 + i for i in range(n * BLOCK_TOKENS)], BLOCK_TOKENS,
                                     hashing.salt_hash())
    return hashes, [0] + hashes[:-1]


def batch(hashes, parents, pages, rid):
    from kvplane.vllm import BlockBatch

    return BlockBatch(0, list(hashes), list(parents), list(pages), rid)


def stopped(pid, timeout_s=5):
    """Waits until every thread of `pid` is stopped (SIGSTOP is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
        if all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    pytest.fail(f"daemon {pid} not stopped within {timeout_s} s")


@contextlib.contextmanager
def daemon_stopped(cfg, resume_after_s):
    """The daemon stopped (SIGSTOP, waited for) until the yielded timer, once started,
    resumes it after `resume_after_s`; resumed at the end in any case."""
    pid = cfg.daemon.proc.pid
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(resume_after_s, os.kill, (pid, signal.SIGCONT))
    try:
        stopped(pid)
        yield resume
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)


def wait_finished(w, rid, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rid in step(w):
            return True
        time.sleep(0.01)
    return False


def test_save_in_place_then_another_engine_loads_in_place(vllm_config):
    src, dst = pool(1), pool(0)
    a, b = worker(vllm_config, src), worker(vllm_config, dst)
    hashes, parents = chain(1, 5)
    src_ids, dst_ids = [3, 9, 4, 15, 0], [1, 2, 7, 12, 5]
    assert step(a, saves=[batch(hashes, parents, src_ids, "r1")]) == set()
    # The request finishes: vLLM names it, the scheduler's metadata says it was delayed.
    sending = step(a, delayed=["r1"], finished=["r1"])
    assert sending == {"r1"} or wait_finished(a, "r1"), "reported once the SAVE completed"
    assert a.stats.saved_blocks == 5 and a._direct.per_request == {}
    step(b, loads=[batch(hashes, parents, dst_ids, "r2")])
    assert b.stats.loaded_blocks == 5 and b.get_block_ids_with_load_errors() == set()
    for name in src:
        assert torch.equal(src[name][:, src_ids], dst[name][:, dst_ids]), name
        untouched = [i for i in range(PAGES) if i not in dst_ids]
        assert not dst[name][:, untouched].any(), f"{name}: only the loaded pages are written"
    assert a.stats.copied_bytes == 0 and b.stats.copied_bytes == 0, "nothing staged"
    # A chain the daemon does not hold: every block fails, for vLLM to recompute.
    other, other_parents = chain(2, 2)
    step(b, loads=[batch(other, other_parents, [8, 10], "r3")])
    assert b.get_block_ids_with_load_errors() == {8, 10}
    a.shutdown()
    b.shutdown()


def test_pages_are_not_reused_while_the_daemon_may_still_touch_them(vllm_config):
    src, dst = pool(3), pool(0)
    a, b = worker(vllm_config, src), worker(vllm_config, dst)
    hashes, parents = chain(3, 4)
    with daemon_stopped(vllm_config, 2.5) as resume:
        # A LOAD that times out: its blocks fail (recomputed by vLLM), the session stays,
        # and the request keeps its blocks, over several steps: the daemon may still
        # write them.
        t0 = time.monotonic()
        step(b, loads=[batch(hashes[:2], parents[:2], [4, 5], "l1")])
        assert time.monotonic() - t0 >= OP_TIMEOUT_MS / 1000 * 0.9
        assert b.get_block_ids_with_load_errors() == {4, 5}
        assert b._session is not None, "a timeout does not drop a live session"
        assert step(b, delayed=["l1"], finished=["l1"]) == set()
        for _ in range(3):
            assert step(b) == set()
        # A SAVE the daemon has not read, of a request that finishes: not reported.
        step(a, saves=[batch(hashes, parents, [0, 1, 2, 3], "s1")])
        assert step(a, delayed=["s1"], finished=["s1"]) == set()
        assert a.stats.saved_blocks == 0 and a._direct.saving() == 1
        # A request is preempted (vLLM frees its blocks at once, and this step's forward
        # pass may write them): the step waits for every op on the pages, here until the
        # daemon resumes.
        resume.start()
        t0 = time.monotonic()
        sending = step(a, preempted=["p1"])
        assert time.monotonic() - t0 >= 1.0, "the step waited for the stopped daemon"
        assert a.stats.saved_blocks == 4 and a._direct.saving() == 0
        assert sending == {"s1"}
    assert wait_finished(b, "l1"), "the late LOAD's completion releases its request"
    a.shutdown()
    b.shutdown()


def test_completions_read_while_waiting_for_a_load_are_not_lost(vllm_config):
    src = pool(4)
    a = worker(vllm_config, src)
    hashes, parents = chain(4, 3)
    with daemon_stopped(vllm_config, 0.3) as resume:
        step(a, saves=[batch(hashes[:2], parents[:2], [0, 1], "s")])
        # The LOAD's wait reads the SAVE's completion too (the daemon resumes meanwhile).
        resume.start()
        step(a, loads=[batch(hashes[2:], parents[2:], [5], "l")])
    assert a._direct.ops == {} and a.stats.saved_blocks == 2, "the SAVE's completion was used"
    t0 = time.monotonic()
    step(a, preempted=["x"])
    assert time.monotonic() - t0 < OP_TIMEOUT_MS / 1000 / 2, "nothing left to wait for"
    a.shutdown()


def test_in_place_is_off_for_kv_caches_vllm_frees_from_running_requests(vllm_config):
    from kvplane.vllm import KvplaneConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    def config(spec):
        return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])

    common = dict(block_size=BLOCK_TOKENS, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float32)
    full = KvplaneConnector(vllm_config.make(), KVConnectorRole.WORKER, config(FullAttentionSpec(**common)))
    assert full._disabled is None
    window = KvplaneConnector(vllm_config.make(), KVConnectorRole.WORKER,
                              config(SlidingWindowSpec(sliding_window=64, **common)))
    assert "SlidingWindowSpec" in (window._disabled or "")
    window.register_kv_caches(pool(0))
    assert window._direct is None and window._session is None
    staged = KvplaneConnector(vllm_config.make(in_place=False), KVConnectorRole.WORKER,
                              config(SlidingWindowSpec(sliding_window=64, **common)))
    assert staged._disabled is None, "staged saves never read vLLM's pages later"


def test_the_scheduler_delays_freeing_only_what_it_moved(vllm_config):
    from kvplane.vllm import KvplaneConnector, _ReqState
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    staged = KvplaneConnector(vllm_config.make(in_place=False), KVConnectorRole.SCHEDULER)
    assert staged._pages_in_place is False, "vLLM's CPU build, staged: nothing delayed"
    staged.shutdown()
    s = KvplaneConnector(vllm_config.make(), KVConnectorRole.SCHEDULER)
    assert s._pages_in_place is True, "the worker's choice, from the same config"
    moved = SimpleNamespace(request_id="m", all_token_ids=list(range(3 * BLOCK_TOKENS)))
    idle = SimpleNamespace(request_id="i", all_token_ids=[])
    s._reqs["m"] = _ReqState(request=moved, ns_id=0, salt=hashing.salt_hash())
    s._reqs["i"] = _ReqState(request=idle, ns_id=0, salt=0)

    def output(new=(), preempted=()):
        return SimpleNamespace(scheduled_new_reqs=list(new), preempted_req_ids=set(preempted),
                               num_scheduled_tokens={r.req_id: 3 * BLOCK_TOKENS for r in new},
                               scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                                                     resumed_req_ids=set(),
                                                                     num_computed_tokens=[]))

    meta = s.build_connector_meta(output([SimpleNamespace(req_id="m", block_ids=([5, 6, 7],),
                                                          num_computed_tokens=0)], ["x"]))
    assert [b.block_ids for b in meta.saves] == [[5, 6, 7]] and meta.preempted == ["x"]
    assert s.request_finished(moved, [5, 6, 7]) == (True, None)
    assert s.request_finished(idle, [3]) == (False, None)
    assert s.request_finished(SimpleNamespace(request_id="never-seen"), []) == (False, None)
    assert s.build_connector_meta(output()).delayed == ["m"]
    assert s.build_connector_meta(output()).delayed == [], "sent once"
    s.shutdown()


def test_device_layouts_are_recognised_or_refused_by_name():
    from kvplane.vllm import vllm_device_layout

    def kv(shape):
        return {"l0": torch.empty(shape), "l1": torch.empty(shape)}

    T, H, D = BLOCK_TOKENS, HEADS, DIM
    assert vllm_device_layout(kv((2, 9, T, H, D)), T, H, D) == "vllm"
    assert vllm_device_layout(kv((9, 2, T, H, D)), T, H, D) == "vllm_blocks_first"
    assert vllm_device_layout(kv((9, T, 576)), T, H, D) == "mla"
    with pytest.raises(ValueError, match="read alike"):
        vllm_device_layout(kv((2, 2, T, H, D)), T, H, D)
    with pytest.raises(ValueError, match="not a vLLM layout"):
        vllm_device_layout(kv((9, H, T, 2 * D)), T, H, D)
    with pytest.raises(ValueError, match="one layout must describe every layer"):
        vllm_device_layout({"l0": torch.empty(2, 9, T, H, D), "l1": torch.empty(2, 8, T, H, D)}, T, H, D)

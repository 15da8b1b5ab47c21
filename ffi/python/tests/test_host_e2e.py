"""register_kv's host path end to end against a real `kvplane serve`: one engine process
registers its KV pool (host_buffer memory) in place and SAVEs blocks; another process,
with its own pool in another layout, LOADs them into other pages and compares every
(layer, K/V, token, head) with what the first one wrote."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from daemon import Daemon  # noqa: E402  (tests/vllm/daemon.py: `kvplane serve`, host tier)

SCRIPT = ROOT / "ffi" / "python" / "examples" / "kv_roundtrip.py"
LAYERS, TOKENS, HEADS, DIM = 4, 16, 2, 64
GEOMETRY = ["--layers", str(LAYERS), "--tokens", str(TOKENS), "--heads", str(HEADS),
            "--head-dim", str(DIM)]


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, block_bytes=LAYERS * 2 * TOKENS * HEADS * DIM * 2)
    yield d
    d.stop()


def engine(daemon, role, layout, seed, blocks=8):
    run = subprocess.run([sys.executable, str(SCRIPT), str(daemon.socket), role, "--layout", layout,
                          "--seed", str(seed), "--blocks", str(blocks), *GEOMETRY],
                         capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"{role} ({layout}) failed:\n{out}\ndaemon log:\n{daemon.log.read_text()}"
    return out


@pytest.mark.parametrize("saver,loader", [("vllm", "vllm"), ("vllm", "sglang"), ("sglang", "vllm_hnd")])
def test_one_process_saves_in_place_another_loads_in_place(daemon, saver, loader):
    out = engine(daemon, "save", saver, seed=11)
    assert "blocks=8/8" in out, out
    # The saver's pool is in one buffer (1 region) or K and V buffers (2).
    assert ("in 2 host memfd region(s)" if saver == "sglang" else "in 1 host memfd region(s)") in out
    out = engine(daemon, "load", loader, seed=11)
    assert "lookup=8/8 loaded=8/8 mismatched=0" in out, out
    assert "untouched_pages_intact=True" in out, out


def test_a_load_of_blocks_never_saved_fails(daemon):
    engine(daemon, "save", "vllm", seed=3)
    run = subprocess.run([sys.executable, str(SCRIPT), str(daemon.socket), "load", "--seed", "4",
                          *GEOMETRY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "lookup=0/8" in run.stdout, run.stdout


def test_gpu_regions_reach_the_daemon_which_refuses_them_on_the_host_backend(daemon):
    """The CUDA path's descriptors travel through Client and libkvplane intact enough for
    the daemon to judge them: on the host backend it refuses the attach naming the region,
    and keeps serving."""
    from test_regions import CudaArray, FakeCuda  # the fake driver, same directory

    import kvplane
    from kvplane import regions

    base = 0x7F00_0000_0000
    fake = FakeCuda({base: (1 << 20, 0)})
    reg = kvplane.register_kv([CudaArray(base, (2, 4, TOKENS, HEADS, DIM))],
                              driver=regions.CudaDriver(fake))
    with pytest.raises(kvplane.KvplaneError, match="KV region #0: GPU memory, but the daemon runs the host backend"):
        kvplane.Client(daemon.socket, namespaces=["gpu-on-host"], regions=reg)
    out = engine(daemon, "save", "vllm", seed=21)
    assert "blocks=8/8" in out, out

"""register_kv on a real GPU: PyTorch CUDA tensors (vLLM's per-layer layout, in separate
allocations and sliced from one) become CUDA IPC regions that another process opens
(cuIpcOpenMemHandle) and reads the layout's pages from, byte for byte. Skipped, saying
why, where there is no GPU: it never passes without having run."""
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "ffi" / "python"))

import kvplane  # noqa: E402


def _why_no_gpu():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"no CUDA driver (libcuda.so.1: {e})"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU visible)"
    return None


WHY_NOT = _why_no_gpu()
needs_gpu = pytest.mark.skipif(WHY_NOT is not None, reason=f"real-GPU test did not run: {WHY_NOT}")

# The importing side: a plain driver-API process, as the daemon is.
READER = r"""
import ctypes, json, sys
req = json.loads(sys.stdin.read())
cu = ctypes.CDLL("libcuda.so.1")
def ck(rc, name):
    if rc != 0:
        raise SystemExit(f"{name} failed: CUresult {rc}")
class Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]
ck(cu.cuInit(0), "cuInit")
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
ck(cu.cuDeviceGet(ctypes.byref(dev), req["ordinal"]), "cuDeviceGet")
ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
uuid = (ctypes.c_uint8 * 16)()
ck((getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid)(ctypes.byref(uuid), dev), "cuDeviceGetUuid")
op = getattr(cu, "cuIpcOpenMemHandle_v2", None) or cu.cuIpcOpenMemHandle
op.argtypes = [ctypes.POINTER(ctypes.c_uint64), Handle, ctypes.c_uint]
cu.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
out = {"uuid": bytes(uuid).hex(), "reads": []}
for region in req["regions"]:
    base = ctypes.c_uint64()
    ck(op(ctypes.byref(base), Handle(bytes.fromhex(region["handle"])), 1), "cuIpcOpenMemHandle")
    got = []
    for off, n in region["reads"]:
        buf = ctypes.create_string_buffer(n)
        ck(cu.cuMemcpyDtoH_v2(buf, base.value + off, n), "cuMemcpyDtoH")
        got.append(buf.raw.hex())
    out["reads"].append(got)
print(json.dumps(out))
"""


def read_in_another_process(reg, ordinal, wanted):
    """`wanted`: per region, [(offset in the region, bytes)]; returns the bytes read there
    by a second process through the region's IPC handle, and that process's GPU UUID."""
    req = {"ordinal": ordinal, "regions": [
        {"handle": bytes(r.handle).hex(),
         "reads": [(r.offset_bytes + off, n) for off, n in wanted[i]]}
        for i, (r, _) in enumerate(reg.regions)]}
    run = subprocess.run([sys.executable, "-c", READER], input=json.dumps(req),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    return bytes.fromhex(out["uuid"]), [[bytes.fromhex(h) for h in got] for got in out["reads"]]


@needs_gpu
@pytest.mark.parametrize("one_allocation", [False, True])
def test_cuda_tensors_are_read_in_place_by_another_process(one_allocation):
    import torch

    # 13 MiB per layer: past the caching allocator's shared 20 MiB segments, so a fresh
    # tensor is its own cudaMalloc (a cached block may still be reused).
    layers, nb, bs, heads, dim = 3, 200, 16, 8, 128
    shape = (2, nb, bs, heads, dim)
    torch.cuda.empty_cache()
    if one_allocation:  # vLLM's v1 runner: one buffer, a view per layer
        whole = torch.randint(-30000, 30000, (layers, *shape), dtype=torch.int16, device="cuda")
        kv = [whole[l].view(torch.bfloat16) for l in range(layers)]
    else:
        kv = [torch.randint(-30000, 30000, shape, dtype=torch.int16, device="cuda").view(torch.bfloat16)
              for _ in range(layers)]
    torch.cuda.synchronize()
    reg = kvplane.register_kv(kv, layout="vllm")
    ordinal = kv[0].device.index or 0
    assert reg.device == f"cuda:{ordinal}"
    assert all(r.kind == kvplane.REGION_CUDA_IPC and fd == -1 for r, fd in reg.regions)
    if one_allocation:
        assert len(reg.regions) == 1
    lay = reg.layout
    # Pages 0 and nb-1 of each (layer, plane), one token's heads each: the layout's address.
    wanted = [[] for _ in reg.regions]
    expect = [[] for _ in reg.regions]
    for l in range(layers):
        for p in range(2):
            for b, t in ((0, 0), (nb - 1, bs - 1)):
                off = lay.plane_offset[p][l] + b * lay.page_stride_bytes + t * lay.token_stride_bytes
                n = heads * lay.head_bytes
                wanted[lay.plane_region[p][l]].append((off, n))
                expect[lay.plane_region[p][l]].append(kv[l][p, b, t].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    uuid, got = read_in_another_process(reg, ordinal, wanted)
    assert got == expect
    assert all(bytes(r.gpu_uuid) == uuid for r, _ in reg.regions)


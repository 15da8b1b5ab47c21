"""kvplane.register_kv: the CUDA path against a fake driver (allocation bases, region
dedupe, IPC handle and UUID bytes, driver errors), the stride arithmetic checked byte by
byte on host buffers for vLLM's, SGLang's and MLA's layouts, and the ctypes mirrors and
the attach call against libkvplane."""
import ctypes
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "ffi" / "python"))

import kvplane  # noqa: E402
from kvplane import regions  # noqa: E402

c_int, c_u64, c_size, c_vp, c_cp = (ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t,
                                     ctypes.c_void_p, ctypes.c_char_p)
P = ctypes.POINTER
FN = ctypes.CFUNCTYPE
ERROR_NAMES = {1: b"CUDA_ERROR_INVALID_VALUE", 201: b"CUDA_ERROR_INVALID_CONTEXT"}
MiB = 1 << 20


def fake_handle(base):
    return base.to_bytes(8, "little") + bytes([0xA5]) * 56


def fake_uuid(ordinal):
    return bytes(range(16 * ordinal, 16 * ordinal + 16))


class FakeCuda:
    """libcuda.so.1 stand-in: real ctypes function pointers (so the driver's prototypes
    and byref arguments are exercised) over a table of allocations {base: size} per GPU."""

    def __init__(self, allocs, fail=None, vmm=None):
        self.allocs = allocs  # {base: (size, ordinal)}: cudaMalloc allocations
        # {mapping base: (size, ordinal, allowed handle types)}: VMM mappings, one
        # cuMemMap each (PyTorch's expandable segments map such chunks back to back).
        self.vmm = vmm or {}
        self.fail = fail or {}  # call name -> CUresult
        self.calls = []
        self.attrs = []  # cuPointerGetAttribute's attributes, in order
        self.exported = []  # (mapping base, fd) per cuMemExportToShareableHandle
        self.released = 0
        self.ctx = 0

        def wrap(name, proto, body):
            def f(*args):
                self.calls.append(name)
                if name in self.fail:
                    return self.fail[name]
                return body(*args)
            fp = proto(f)
            setattr(self, name, fp)

        def find(ptr):
            for base, (size, ordinal) in self.allocs.items():
                if base <= ptr < base + size:
                    return base, size, ordinal
            return None

        def find_vmm(ptr):
            for base, (size, ordinal, allowed) in self.vmm.items():
                if base <= ptr < base + size:
                    return base, size, ordinal, allowed
            return None

        def range_(pbase, psize, ptr):
            hit = find(ptr)
            if hit is None:
                return 1
            pbase[0], psize[0] = hit[0], hit[1]
            return 0

        def attr(data, attribute, ptr):
            self.attrs.append(attribute)
            hit, vhit = find(ptr), find_vmm(ptr)
            if hit is None and vhit is None:
                return 1
            if attribute == regions.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
                ctypes.cast(data, P(c_int))[0] = hit[2] if hit else vhit[2]
            elif attribute == regions.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
                ctypes.cast(data, P(c_int))[0] = 1 if hit else 0
            elif vhit and attribute == regions.CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
                ctypes.cast(data, P(c_u64))[0] = vhit[3]
            elif vhit and attribute == regions.CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR:
                ctypes.cast(data, P(c_u64))[0] = vhit[0]
            elif vhit and attribute == regions.CU_POINTER_ATTRIBUTE_MAPPING_SIZE:
                ctypes.cast(data, P(c_u64))[0] = vhit[1]
            else:
                return 1
            return 0

        def retain(phandle, ptr):
            vhit = find_vmm(ptr or 0)
            if vhit is None:
                return 1
            phandle[0] = vhit[0]  # the handle names its mapping here
            return 0

        def export(pfd, handle, kind, flags):
            if handle not in self.vmm or kind != 1 or flags != 0 or not self.vmm[handle][2] & 1:
                return 1
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            self.exported.append((handle, fd))
            ctypes.cast(pfd, P(c_int))[0] = fd
            return 0

        def release(handle):
            self.released += 1
            return 0

        def ipc(phandle, base):
            if base not in self.allocs:
                return 1  # the real call wants the base, not an interior pointer
            ctypes.memmove(phandle, fake_handle(base), 64)
            return 0

        def uuid(puuid, dev):
            ctypes.memmove(puuid, fake_uuid(dev), 16)
            return 0

        def err_name(rc, out):
            if rc not in ERROR_NAMES:
                return 1
            out[0] = ERROR_NAMES[rc]
            return 0

        def ctx_get(pctx):
            pctx[0] = self.ctx
            return 0

        def primary_retain(pctx, dev):
            pctx[0] = 0x1000 + dev
            return 0

        def ctx_set(ctx):
            self.ctx = ctx
            return 0

        def dev_get(pdev, ordinal):
            pdev[0] = ordinal
            return 0

        wrap("cuInit", FN(c_int, ctypes.c_uint), lambda flags: 0)
        wrap("cuGetErrorName", FN(c_int, c_int, P(c_cp)), err_name)
        wrap("cuCtxGetCurrent", FN(c_int, P(c_vp)), ctx_get)
        wrap("cuDeviceGet", FN(c_int, P(c_int), c_int), dev_get)
        wrap("cuDevicePrimaryCtxRetain", FN(c_int, P(c_vp), c_int), primary_retain)
        wrap("cuCtxSetCurrent", FN(c_int, c_vp), ctx_set)
        wrap("cuPointerGetAttribute", FN(c_int, c_vp, c_int, c_u64), attr)
        wrap("cuMemGetAddressRange_v2", FN(c_int, P(c_u64), P(c_size), c_u64), range_)
        wrap("cuIpcGetMemHandle", FN(c_int, P(ctypes.c_uint8 * 64), c_u64), ipc)
        wrap("cuDeviceGetUuid_v2", FN(c_int, P(ctypes.c_uint8 * 16), c_int), uuid)
        wrap("cuMemRetainAllocationHandle", FN(c_int, P(c_u64), c_vp), retain)
        wrap("cuMemExportToShareableHandle", FN(c_int, c_vp, c_u64, c_int, c_u64), export)
        wrap("cuMemRelease", FN(c_int, c_u64), release)


class CudaArray:
    """What CuPy or Numba hand out: only __cuda_array_interface__."""

    def __init__(self, ptr, shape, typestr="<f2", strides=None):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": typestr, "strides": strides, "version": 3}


def region_tuple(r):
    return (r.kind, r.alloc_bytes, r.offset_bytes, r.len_bytes, bytes(r.handle), bytes(r.gpu_uuid))


# ------------------------------------------------------------------------ CUDA, fake driver

def test_vllm_layers_in_one_allocation_share_one_ipc_region():
    nb, bs, heads, dim, layers = 8, 16, 2, 64, 4
    layer_bytes = 2 * nb * bs * heads * dim * 2
    base = 0x7F00_0000_0000
    fake = FakeCuda({base: (64 * MiB, 0)})
    start = base + 0x200  # a tensor need not start at its allocation's base
    kv = [CudaArray(start + l * layer_bytes, (2, nb, bs, heads, dim)) for l in range(layers)]
    reg = kvplane.register_kv(kv, layout="vllm", driver=regions.CudaDriver(fake))

    assert len(reg.regions) == 1
    region, fd = reg.regions[0]
    assert fd == -1
    assert region_tuple(region) == (kvplane.REGION_CUDA_IPC, 64 * MiB, 0x200, layers * layer_bytes,
                                    fake_handle(base), fake_uuid(0))
    assert reg.device == "cuda:0"
    lay = reg.layout
    assert (lay.num_layers, lay.kv_planes, lay.num_pages, lay.page_tokens) == (layers, 2, nb, bs)
    assert (lay.kv_heads, lay.head_bytes, lay.dtype_bytes) == (heads, dim * 2, 2)
    assert lay.page_stride_bytes == bs * heads * dim * 2
    assert lay.token_stride_bytes == heads * dim * 2
    assert lay.head_stride_bytes == dim * 2
    for l in range(layers):
        assert lay.plane_region[0][l] == lay.plane_region[1][l] == 0
        assert lay.plane_offset[0][l] == l * layer_bytes
        assert lay.plane_offset[1][l] == l * layer_bytes + nb * bs * heads * dim * 2
    # No context was current: the device's primary one was made current, once.
    assert fake.calls.count("cuDevicePrimaryCtxRetain") == 1
    assert fake.ctx == 0x1000
    assert fake.calls.count("cuIpcGetMemHandle") == 1


def test_sglang_k_and_v_tensors_dedupe_by_allocation():
    tokens, heads, dim, page = 65, 4, 32, 16  # SGLang pads a page; 4 whole pages
    tbytes = tokens * heads * dim * 2
    x, y, z = 0x7A00_0000_0000, 0x7B00_0000_0000, 0x7C00_0000_0000
    fake = FakeCuda({x: (32 * MiB, 1), y: (2 * MiB, 1), z: (2 * MiB, 1)})

    def t(ptr):
        return kvplane.KvTensor(ptr, (tokens, heads, dim), 2, "cuda:1")

    # layer 0: K, V in x; layer 1: K in y, V in z; layer 2: K, V in x again, further on.
    kv = [(t(x + 4096), t(x + 4096 + tbytes)), (t(y + 512), t(z)),
          (t(x + 8 * MiB), t(x + 8 * MiB + tbytes))]
    reg = kvplane.register_kv(kv, layout="sglang", page_tokens=page, driver=regions.CudaDriver(fake))

    got = [region_tuple(r) for r, _ in reg.regions]
    used = (tokens // page) * page * heads * dim * 2  # the padding token is not in a page
    assert got == [
        (kvplane.REGION_CUDA_IPC, 32 * MiB, 4096, 8 * MiB + tbytes + used - 4096, fake_handle(x), fake_uuid(1)),
        (kvplane.REGION_CUDA_IPC, 2 * MiB, 512, used, fake_handle(y), fake_uuid(1)),
        (kvplane.REGION_CUDA_IPC, 2 * MiB, 0, used, fake_handle(z), fake_uuid(1)),
    ]
    lay = reg.layout
    assert [list(lay.plane_region[p][:3]) for p in range(2)] == [[0, 1, 0], [0, 2, 0]]
    assert [list(lay.plane_offset[p][:3]) for p in range(2)] == [
        [0, 0, 8 * MiB - 4096], [tbytes, 0, 8 * MiB - 4096 + tbytes]]
    assert (lay.num_pages, lay.page_tokens, lay.kv_planes) == (4, page, 2)
    assert lay.page_stride_bytes == page * heads * dim * 2
    assert lay.token_stride_bytes == heads * dim * 2
    assert fake.calls.count("cuIpcGetMemHandle") == 3  # one per allocation, not per tensor
    # The ordinal came from the description: the driver was not asked for it.
    assert regions.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL not in fake.attrs


def test_expandable_segments_chunks_become_continuing_vmm_regions():
    """PyTorch's expandable segments: VMM memory mapped 2 MiB (here) at a time, one
    mapping after another; tensors span mappings. Each mapping a tensor touches is one
    VMM region with its exported descriptor, flagged as continuing the one before where
    they meet; a cudaMalloc tensor alongside keeps its IPC region."""
    nb, bs, heads, dim = 64, 16, 4, 128
    plane = nb * bs * heads * dim * 2  # 8 MiB / 8 = 1 MiB
    assert plane == MiB
    layer_bytes = 2 * plane
    seg = 0x7D00_0000_0000
    chunk = 2 * MiB
    # A run of 4 chunks, a gap, then 1 more: the third layer starts after the gap.
    vmm = {seg + i * chunk: (chunk, 0, 1) for i in range(4)}
    far = seg + 64 * MiB
    vmm[far] = (chunk, 0, 1)
    legacy = 0x7F00_0000_0000
    fake = FakeCuda({legacy: (4 * MiB, 0)}, vmm=vmm)
    start = seg + chunk // 2  # the first layer starts mid-chunk
    kv = [CudaArray(start, (2, nb, bs, heads, dim)),
          CudaArray(start + layer_bytes + 3 * MiB // 2, (2, nb, bs, heads, dim)),
          CudaArray(far, (2, nb, bs, heads, dim)),
          CudaArray(legacy, (2, nb, bs, heads, dim))]
    reg = kvplane.register_kv(kv, layout="vllm", driver=regions.CudaDriver(fake))
    # The cudaMalloc tensor's IPC region comes first; the VMM regions follow.
    ipc, ipc_fd = reg.regions.pop(0)
    assert (ipc.kind, ipc_fd, ipc.len_bytes) == (kvplane.REGION_CUDA_IPC, -1, layer_bytes)

    # Layer 0: [1 MiB, 3 MiB) of the run; layer 1: [4.5 MiB, 6.5 MiB): chunks 0-3 all
    # touched; layer 2 in the far mapping.
    kinds = [(r.kind, r.flags, r.alloc_bytes, r.offset_bytes, r.len_bytes) for r, _ in reg.regions]
    V, C = kvplane.REGION_CUDA_VMM_FD, kvplane.REGION_F_CONTINUES
    assert kinds == [(V, 0, chunk, 0, chunk), (V, C, chunk, 0, chunk), (V, C, chunk, 0, chunk),
                     (V, C, chunk, 0, chunk), (V, 0, chunk, 0, chunk)]
    assert all(bytes(r.gpu_uuid) == fake_uuid(0) for r, _ in reg.regions)
    # Each region carries the descriptor exported for its mapping, in order.
    assert [fd for _, fd in reg.regions] == [fd for _, fd in fake.exported]
    assert [m for m, _ in fake.exported] == sorted(vmm)
    assert fake.released == len(vmm), "every retained handle released"
    lay = reg.layout
    # K of layer 0 at 1 MiB (chunk 0), its V at 2 MiB (chunk 1); layer 1's K at 4.5 MiB
    # (chunk 2), its V at 5.5 MiB, in chunk 2 and on into chunk 3; layer 2 in the far one.
    assert [list(lay.plane_region[p][:4]) for p in range(2)] == [[1, 3, 5, 0], [2, 3, 5, 0]]
    assert [list(lay.plane_offset[p][:4]) for p in range(2)] == [
        [MiB, MiB // 2, 0, 0], [0, 3 * MiB // 2, MiB, MiB]]
    # The descriptors are this registration's: closed when it goes.
    fds = [fd for _, fd in reg.regions]
    del reg
    import gc
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_vmm_memory_that_cannot_be_exported_says_how_to_allocate_it():
    seg = 0x7D00_0000_0000
    fake = FakeCuda({}, vmm={seg: (2 * MiB, 0, 0)})  # no POSIX descriptor allowed
    with pytest.raises(kvplane.KvplaneError, match="cannot be exported as a POSIX descriptor"):
        kvplane.register_kv([CudaArray(seg, (1, 4, 16))], layout="mla",
                            driver=regions.CudaDriver(fake))


@pytest.mark.parametrize("call,code,name", [
    ("cuIpcGetMemHandle", 201, "CUDA_ERROR_INVALID_CONTEXT"),
    ("cuMemGetAddressRange_v2", 1, "CUDA_ERROR_INVALID_VALUE"),
    ("cuDeviceGetUuid_v2", 1, "CUDA_ERROR_INVALID_VALUE"),
    ("cuPointerGetAttribute", 1, "CUDA_ERROR_INVALID_VALUE"),
    ("cuInit", 100, "CUresult"),
])
def test_a_driver_error_names_the_call(call, code, name):
    base = 0x7F00_0000_0000
    fake = FakeCuda({base: (MiB, 0)}, fail={call: code})
    with pytest.raises(regions.CudaError) as e:
        kvplane.register_kv([CudaArray(base, (1, 4, 16))], layout="mla",
                            driver=regions.CudaDriver(fake))
    assert e.value.call == call and e.value.code == code
    assert f"{call} failed: {name} ({code})" in str(e.value)


def test_cuda_misuse_is_refused_with_the_layer_named():
    a, b = 0x7F00_0000_0000, 0x7E00_0000_0000
    fake = FakeCuda({a: (MiB, 0), b: (MiB, 1)})
    drv = regions.CudaDriver(fake)
    shape = (2, 4, 16, 2, 64)
    nbytes = 2 * 4 * 16 * 2 * 64 * 2
    with pytest.raises(kvplane.KvplaneError, match="layer 1 plane 0 is on GPU 1"):
        kvplane.register_kv([CudaArray(a, shape), CudaArray(b, shape)], driver=drv)
    with pytest.raises(kvplane.KvplaneError, match=r"layer 0 plane 1: .* not inside its allocation"):
        kvplane.register_kv([CudaArray(a + MiB - nbytes + 64, shape)], driver=drv)
    with pytest.raises(kvplane.KvplaneError, match="layer 1 plane 0: page_tokens is 8, layer 0 plane 0 has 16"):
        kvplane.register_kv([CudaArray(a, shape), CudaArray(a + nbytes, (2, 4, 8, 2, 64))], driver=drv)
    host = kvplane.host_buffer(nbytes)
    arr = np.frombuffer(host, dtype=np.float16).reshape(shape)
    with pytest.raises(kvplane.KvplaneError, match="layer 1 plane 0 is on cpu"):
        kvplane.register_kv([CudaArray(a, shape), arr], driver=drv)


# ------------------------------------------------------------------ strides, byte by byte

def check_addresses(reg, bufs, planes_of_layer):
    """Every (layer, plane, page, token, head) of the layout names the bytes the tensor
    has there. `planes_of_layer(l)` -> per plane an array indexed [page, token, head, dim]."""
    lay = reg.layout
    assert len(reg.regions) == len(bufs)
    for (region, fd), buf in zip(reg.regions, bufs):
        assert region.kind == kvplane.REGION_HOST_MEMFD
        assert (region.alloc_bytes, region.offset_bytes, region.len_bytes) == (buf.nbytes, 0, buf.nbytes)
        assert fd == buf.fd
    mem = [np.frombuffer(b, dtype=np.uint8) for b in bufs]
    checked = 0
    for l in range(lay.num_layers):
        for p, plane in enumerate(planes_of_layer(l)):
            m = mem[lay.plane_region[p][l]]
            for b in range(lay.num_pages):
                for t in range(lay.page_tokens):
                    for h in range(lay.kv_heads):
                        off = (lay.plane_offset[p][l] + b * lay.page_stride_bytes
                               + t * lay.token_stride_bytes + h * lay.head_stride_bytes)
                        want = np.ascontiguousarray(plane[b, t, h]).view(np.uint8)
                        assert lay.head_bytes == want.size
                        assert np.array_equal(m[off:off + lay.head_bytes], want), (l, p, b, t, h)
                        checked += 1
    assert checked == lay.num_layers * lay.kv_planes * lay.num_pages * lay.page_tokens * lay.kv_heads


def filled(buf, dtype=np.float16):
    a = np.frombuffer(buf, dtype=np.uint8)
    a[:] = np.random.default_rng(len(a)).integers(0, 256, len(a), dtype=np.uint8)
    return np.frombuffer(buf, dtype=dtype)


def test_vllm_layouts_address_every_head_in_place():
    layers, nb, bs, heads, dim = 3, 5, 4, 2, 8
    per = 2 * nb * bs * heads * dim
    buf = kvplane.host_buffer(layers * per * 2 + 4096)
    flat = filled(buf)
    at = 2048 // 2  # not at the buffer's start: offsets are relative to the region

    def layer(l, shape):
        return flat[at + l * per: at + (l + 1) * per].reshape(shape)

    # [2, blocks, tokens, heads, dim]
    kv = [layer(l, (2, nb, bs, heads, dim)) for l in range(layers)]
    check_addresses(kvplane.register_kv(kv, layout="vllm"), [buf], lambda l: [kv[l][0], kv[l][1]])
    # [blocks, 2, tokens, heads, dim]
    kv = [layer(l, (nb, 2, bs, heads, dim)) for l in range(layers)]
    check_addresses(kvplane.register_kv(kv, layout="vllm_blocks_first"), [buf],
                    lambda l: [kv[l][:, 0], kv[l][:, 1]])
    # HND storage [2, blocks, heads, tokens, dim], named as such...
    kv = [layer(l, (2, nb, heads, bs, dim)) for l in range(layers)]
    check_addresses(kvplane.register_kv(kv, layout="vllm_hnd"), [buf],
                    lambda l: [kv[l][p].transpose(0, 2, 1, 3) for p in range(2)])
    # ...or seen through an NHD view: the strides say how it is stored.
    nhd = [k.transpose(0, 1, 3, 2, 4) for k in kv]
    reg = kvplane.register_kv(nhd, layout="vllm")
    assert reg.layout.head_stride_bytes == bs * dim * 2
    check_addresses(reg, [buf], lambda l: [nhd[l][0], nhd[l][1]])


def test_sglang_pairs_in_two_buffers_and_mla():
    layers, tokens, heads, dim, page = 2, 33, 3, 4, 8
    kbuf = kvplane.host_buffer(layers * tokens * heads * dim * 2)
    vbuf = kvplane.host_buffer(layers * tokens * heads * dim * 2)
    k = filled(kbuf).reshape(layers, tokens, heads, dim)
    v = filled(vbuf).reshape(layers, tokens, heads, dim)
    reg = kvplane.register_kv([(k[l], v[l]) for l in range(layers)], layout="sglang", page_tokens=page)
    assert reg.layout.num_pages == tokens // page
    check_addresses(reg, [kbuf, vbuf], lambda l: [
        x[l][:tokens // page * page].reshape(tokens // page, page, heads, dim) for x in (k, v)])
    assert [reg.layout.plane_region[p][l] for p in range(2) for l in range(layers)] == [0, 0, 1, 1]

    nb, bs, latent = 6, 4, 12
    mbuf = kvplane.host_buffer(layers * nb * bs * latent * 4)
    m = np.frombuffer(mbuf, dtype=np.float32)
    filled(mbuf)
    mla = [m[l * nb * bs * latent:(l + 1) * nb * bs * latent].reshape(nb, bs, latent) for l in range(layers)]
    reg = kvplane.register_kv(mla, layout="mla")
    assert (reg.layout.kv_planes, reg.layout.kv_heads, reg.layout.dtype_bytes) == (1, 1, 4)
    check_addresses(reg, [mbuf], lambda l: [mla[l][:, :, None, :]])


def test_torch_tensors_on_a_host_buffer_register_in_place():
    # The README's test command runs these with scripts/install-vllm.sh's venv, which has
    # torch: without it this test fails rather than pass unrun.
    import torch
    layers, nb, bs, heads, dim = 2, 3, 4, 2, 8
    per = 2 * nb * bs * heads * dim
    buf = kvplane.host_buffer(layers * per * 2)
    filled(buf)
    flat = torch.frombuffer(buf, dtype=torch.bfloat16)
    kv = [flat[l * per:(l + 1) * per].view(2, nb, bs, heads, dim) for l in range(layers)]
    reg = kvplane.register_kv(kv, layout="vllm")
    views = [k.view(torch.int16).numpy() for k in kv]
    check_addresses(reg, [buf], lambda l: [views[l][0], views[l][1]])


def test_cpu_tensors_outside_a_host_buffer_say_how_to_allocate():
    with pytest.raises(kvplane.KvplaneError, match=r"kvplane\.host_buffer\(nbytes\)"):
        kvplane.register_kv([np.zeros((2, 2, 4, 1, 8), dtype=np.float16)])
    buf = kvplane.host_buffer(4096)
    a = np.frombuffer(buf, dtype=np.float16)
    with pytest.raises(kvplane.KvplaneError, match="head's elements must be contiguous"):
        kvplane.register_kv([a[:64 * 2:2].reshape(1, 2, 4, 1, 8)], layout=("page", "plane", "token", "head", "dim"))
    with pytest.raises(kvplane.KvplaneError, match="needs page_tokens"):
        kvplane.register_kv([(a[:64].reshape(16, 1, 4), a[64:128].reshape(16, 1, 4))], layout="sglang")


def test_raw_pointer_descriptions():
    buf = kvplane.host_buffer(8192)
    arr = filled(buf)
    raw = (buf.address + 1024, 2 * 2 * 4 * 2 * 8 * 2, "cpu")
    reg = kvplane.register_kv([raw], layout="vllm", shape=(2, 2, 4, 2, 8), itemsize=2)
    a = arr[512:512 + 256].reshape(2, 2, 4, 2, 8)
    check_addresses(reg, [buf], lambda l: [a[0], a[1]])
    with pytest.raises(kvplane.KvplaneError, match="is 512"):
        kvplane.register_kv([(buf.address, 100, "cpu")], shape=(2, 2, 4, 2, 8), itemsize=2)


# ------------------------------------------------------------------ mirrors and attach

def lib():
    try:
        return kvplane.load()
    except (kvplane.KvplaneError, OSError) as e:
        pytest.fail(f"libkvplane: {e} (cargo build -p kvplane-capi)")


def test_check_abi_covers_regions_and_plane_region(monkeypatch):
    l = lib()
    kvplane.check_abi(l)
    assert l.kvp_abi_layout(b"kvp_kv_region") == ctypes.sizeof(kvplane.KvRegion) == 128
    assert l.kvp_abi_layout(b"kvp_kv_layout.plane_region") == kvplane.KvLayout.plane_region.offset
    assert l.kvp_abi_layout(b"kvp_kv_region.handle") == kvplane.KvRegion.handle.offset

    class Drifted(ctypes.Structure):  # gpu_uuid and handle swapped
        _fields_ = [(n, t) for n, t in kvplane.KvRegion._fields_[:5]] + [
            ("handle", ctypes.c_uint8 * 64), ("gpu_uuid", ctypes.c_uint8 * 16),
            ("reserved", ctypes.c_uint8 * 16)]

    monkeypatch.setitem(kvplane._MIRRORS, "kvp_kv_region", Drifted)
    with pytest.raises(kvplane.KvplaneError, match="kvp_kv_region.handle: offset 32 here, 48 in the library"):
        kvplane.check_abi(l)


def test_client_hands_regions_and_fds_to_the_library(tmp_path):
    l = lib()
    sock = tmp_path / "nobody.sock"
    buf = kvplane.host_buffer(4096)
    # A host region without its descriptor: the library names the region.
    with pytest.raises(kvplane.KvplaneError, match=r"KV region 1 \(host memfd\) needs a descriptor"):
        kvplane.Client(sock, lib=l, regions=[(kvplane.KvRegion.cuda_ipc(bytes(64), bytes(16), 1, 0, 1), -1),
                                             (kvplane.KvRegion.host_memfd(4096), -1)])
    # Well-formed: the attach gets as far as connecting (nobody listens).
    with pytest.raises(kvplane.KvplaneError, match="connect"):
        kvplane.Client(sock, lib=l, regions=[(kvplane.KvRegion.host_memfd(4096), buf.fd)])


def test_sqe_flags_match_the_header():
    import re
    header = (ROOT / "ffi" / "include" / "kvplane.h").read_text()
    flags = {m.group(1): 1 << int(m.group(2))
             for m in re.finditer(r"#define KVP_SQE_F_(\w+) \(1u << (\d+)\)", header)}
    assert set(flags) >= {"PREFIX_ONLY", "WRITE_THROUGH", "HIGH_PRIORITY", "KEEP_ON_GPU"}
    for name, value in flags.items():
        assert getattr(kvplane, "SQE_F_" + name) == value, name


def test_opcodes_match_the_header():
    import re
    header = (ROOT / "ffi" / "include" / "kvplane.h").read_text()
    ops = {m.group(1): int(m.group(2))
           for m in re.finditer(r"KVP_OP_(\w+) = (\d+),", header)}
    assert "REGISTER_EVENTS" in ops
    for name, value in ops.items():
        assert getattr(kvplane, "OP_" + name) == value, name

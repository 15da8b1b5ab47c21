"""Registering an engine's KV memory with kvplane, in place: `register_kv`, `host_buffer`.

A session's KV memory is a list of regions sent at attach (`kvp_kv_region`: a host
memfd, or a CUDA allocation named by its IPC handle), and the ATTACH_LAYOUT op says where
every layer's K and V planes lie in them (`kvp_kv_layout`: `plane_region[p][l]`,
`plane_offset[p][l]`, and page/token/head strides shared by all planes). `register_kv`
builds both from the engine's own per-layer tensors, so the daemon reads and writes the
engine's pages where they are, with no copy:

    reg = kvplane.register_kv(kv_caches, layout="vllm")       # one tensor per layer
    client = kvplane.Client(socket, namespaces=["ns"], regions=reg)
    q = client.queue(0)
    q.write_arena(0, bytes(reg.layout))
    q.submit([kvplane.Sqe(user_data=1, opcode=kvplane.OP_ATTACH_LAYOUT, arg_offset=0,
                          arg_len=ctypes.sizeof(kvplane.KvLayout))])
    # ... SAVE/LOAD name engine pages (block indices) of that layout.

Keep `reg` (it holds the tensors) and the tensors' memory alive as long as the session.

`tensors`: one entry per layer: a tensor holding the layer's planes, or a `(K, V)` pair
of tensors (SGLang keeps separate K and V buffers per layer).

`layout`: what each dimension of a layer's tensor is, outermost first, by name, or a
tuple of the names "plane" (K/V), "page" (block), "token", "head" and "dim" (the head's
elements, which must be contiguous):

    "vllm"               [2, num_blocks, block_size, kv_heads, head_dim]   (vLLM, FlashAttention)
    "vllm_blocks_first"  [num_blocks, 2, block_size, kv_heads, head_dim]
    "vllm_hnd"           [2, num_blocks, kv_heads, block_size, head_dim]
    "sglang"             (K, V) per layer, each [num_tokens, kv_heads, head_dim];
                         pages are `page_tokens` consecutive tokens (pass page_tokens=)
    "mla"                [num_blocks, block_size, latent_dim]: one plane, one "head"

Only the names are assumed: every byte stride comes from the tensor, so a permuted view
(an HND-stored cache viewed as NHD, vLLM's CPU layout) is described as it is stored. All
planes of all layers must share their page, token and head strides (one descriptor
covers them: the daemon's kernels read it); where they differ the error names the layer,
the plane and the field.

A tensor may be a `torch.Tensor` (CPU or CUDA; torch is not imported), any object with
`__cuda_array_interface__` (CuPy, Numba) or `__array_interface__` (numpy), a raw
`KvTensor(ptr, shape, itemsize, device, strides_bytes=None)`, or a raw
`(ptr, nbytes, device)` triple together with `register_kv(..., shape=, itemsize=)`
(a C-contiguous tensor of that shape).

Where the memory must be:

- CUDA: any `cudaMalloc` allocation (PyTorch's caching allocator makes those). Each
  tensor's allocation is found with `cuMemGetAddressRange`; tensors in one allocation
  share one `KVP_REGION_CUDA_IPC` region, covering the bytes they use, named by
  `cuIpcGetMemHandle` of the allocation's base and the GPU's UUID. VMM memory
  (`cuMemCreate`: PyTorch's `expandable_segments:True`, which maps 20 MiB chunks one
  after another) has no legacy IPC handle: each mapping a tensor touches is exported as
  a POSIX descriptor (`cuMemRetainAllocationHandle`, `cuMemExportToShareableHandle`)
  and becomes a `KVP_REGION_CUDA_VMM_FD` region, and a mapping that follows another
  in the address space is flagged `REGION_F_CONTINUES`, so the daemon maps the run back
  to back and a tensor may span chunks. The allocation must allow POSIX descriptors
  (PyTorch's expandable segments do); the error says so when it does not. The driver
  (libcuda.so.1) is reached through ctypes by one `CudaDriver` (tests pass their own).
- CPU: memory the daemon can map, which ordinary process memory is not: a
  `kvplane.host_buffer(nbytes)`, a sealed memfd mapped here, which `torch.frombuffer`
  and `numpy.frombuffer` wrap (`torch.frombuffer(buf, dtype=torch.bfloat16).view(...)`).
  Each buffer holding KV becomes one `KVP_REGION_HOST_MEMFD` region (all of it).
"""

import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass, field

from . import (
    CUDA_IPC_HANDLE_BYTES, GPU_UUID_BYTES, MAX_KV_REGIONS, MAX_LAYERS, REGION_KIND_NAMES,
    KvLayout, KvplaneError, KvRegion, sealed_memfd,
)

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES = 14
CU_POINTER_ATTRIBUTE_MAPPING_SIZE = 18
CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR = 19
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1

LAYOUTS = {
    "vllm": ("plane", "page", "token", "head", "dim"),
    "vllm_blocks_first": ("page", "plane", "token", "head", "dim"),
    "vllm_hnd": ("plane", "page", "head", "token", "dim"),
    "sglang": ("token", "head", "dim"),
    "mla": ("page", "token", "dim"),
}
_DIM_NAMES = {"plane", "page", "token", "head", "dim"}


# --------------------------------------------------------------------------- host memory

# Live host buffers by id, to find which one holds a CPU tensor (weak: a buffer goes when
# the last tensor viewing it does).
_HOST_BUFFERS = weakref.WeakValueDictionary()


class HostBuffer(mmap.mmap):
    """A sealed memfd (F_SEAL_SHRINK) of `nbytes`, mapped shared here: host memory the
    daemon can map too. It is an `mmap`, so `torch.frombuffer(buf, dtype=...)` and
    `numpy.frombuffer(buf, dtype=...)` view it without a copy. `fd` is the memfd (closed
    by `close()` or when the buffer is collected), `address` where it is mapped."""

    def __new__(cls, nbytes, name="kvplane-kv"):
        if nbytes <= 0:
            raise ValueError(f"host_buffer: nbytes must be > 0, not {nbytes}")
        fd = sealed_memfd(name, nbytes)
        try:
            self = super().__new__(cls, fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.nbytes = fd, nbytes
        probe = ctypes.c_char.from_buffer(self)
        self.address = ctypes.addressof(probe)
        del probe  # releases the buffer export, or close() would refuse
        _HOST_BUFFERS[id(self)] = self
        return self

    def close(self):
        """Unmap (refused with BufferError while a tensor still views it) and close the fd."""
        super().close()
        self._close_fd()

    def _close_fd(self):
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self._close_fd()

    def __repr__(self):
        return f"HostBuffer(nbytes={self.nbytes}, fd={self.fd}, address={self.address:#x})"


def host_buffer(nbytes, name="kvplane-kv"):
    """Host memory for a KV cache that `register_kv` can register: see `HostBuffer`."""
    return HostBuffer(nbytes, name)


def host_buffer_holding(start, end):
    """The live host_buffer holding [start, end), or None."""
    for buf in list(_HOST_BUFFERS.values()):
        if not buf.closed and buf.address <= start and end <= buf.address + buf.nbytes:
            return buf
    return None


# --------------------------------------------------------------------------- CUDA driver

class CudaError(KvplaneError):
    """A CUDA driver call failed; `call` names it, `code` is its CUresult."""

    def __init__(self, call, code, name, what=""):
        self.call, self.code = call, code
        super().__init__(f"{call} failed: {name} ({code}){': ' + what if what else ''}")


CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_IpcHandle = ctypes.c_uint8 * CUDA_IPC_HANDLE_BYTES
_Uuid = ctypes.c_uint8 * GPU_UUID_BYTES
_P = ctypes.POINTER
_PROTOTYPES = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorName": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuCtxGetCurrent": [_P(ctypes.c_void_p)],
    "cuDeviceGet": [_P(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [_P(ctypes.c_void_p), ctypes.c_int],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuPointerGetAttribute": [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64],
    "cuMemGetAddressRange_v2": [_P(ctypes.c_uint64), _P(ctypes.c_size_t), ctypes.c_uint64],
    "cuIpcGetMemHandle": [_P(_IpcHandle), ctypes.c_uint64],
    "cuDeviceGetUuid_v2": [_P(_Uuid), ctypes.c_int],
    "cuDeviceGetUuid": [_P(_Uuid), ctypes.c_int],
    "cuMemRetainAllocationHandle": [_P(ctypes.c_uint64), ctypes.c_void_p],
    "cuMemExportToShareableHandle": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                     ctypes.c_uint64],
    "cuMemRelease": [ctypes.c_uint64],
}
# Hints for the failures an engine can cause.
_HINTS = {
    "cuIpcGetMemHandle": "only cudaMalloc allocations have a legacy IPC handle (VMM memory, "
                         "such as PyTorch's expandable segments, needs a driver that reports "
                         "CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: CUDA 11.3 or later)",
    "cuMemGetAddressRange_v2": "the pointer is not device memory of this process",
    "cuMemExportToShareableHandle": "the VMM allocation was made without POSIX descriptor "
                                    "export (cuMemCreate requestedHandleTypes)",
}


class CudaDriver:
    """The CUDA driver API calls `register_kv` needs, over libcuda.so.1 (or `lib`, any
    object with those functions as ctypes function pointers). Every return code is
    checked; a failure raises CudaError naming the call."""

    def __init__(self, lib=None):
        if lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise KvplaneError(f"CUDA tensors need the CUDA driver: libcuda.so.1: {e}") from e
        self._fn = {}
        for name, argtypes in _PROTOTYPES.items():
            try:
                f = getattr(lib, name)
            except AttributeError:
                continue  # cuDeviceGetUuid_v2 is CUDA >= 11.4; the rest are checked on use
            f.argtypes, f.restype = argtypes, ctypes.c_int
            self._fn[name] = f
        self._call("cuInit", 0)

    def _call(self, name, *args, what=""):
        f = self._fn.get(name)
        if f is None:
            raise KvplaneError(f"the CUDA driver has no {name}")
        rc = f(*args)
        if rc != 0:
            text = ctypes.c_char_p()
            got = self._fn.get("cuGetErrorName")
            err = (text.value.decode() if got is not None and got(rc, ctypes.byref(text)) == 0
                   and text.value else "CUresult")
            hint = _HINTS.get(name, "")
            raise CudaError(name, rc, err, "; ".join(x for x in (what, hint) if x))
        return rc

    def device_of(self, ptr):
        """The ordinal of the GPU holding device pointer `ptr`."""
        ordinal = ctypes.c_int(-1)
        self._call("cuPointerGetAttribute", ctypes.byref(ordinal),
                   CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr, what=f"pointer {ptr:#x}")
        return ordinal.value

    def _device(self, ordinal):
        dev = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(dev), ordinal, what=f"device {ordinal}")
        return dev.value

    def ensure_context(self, ordinal):
        """Allocation queries need a current context: a thread that has none (a process
        that allocated through another thread or library) gets the device's primary
        context, the one PyTorch and the runtime API allocate in."""
        ctx = ctypes.c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(ctx))
        if ctx.value:
            return
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), self._device(ordinal))
        self._call("cuCtxSetCurrent", ctx)

    def address_range(self, ptr):
        """(base, bytes) of the allocation holding device pointer `ptr`."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), ptr,
                   what=f"pointer {ptr:#x}")
        return base.value, size.value

    def ipc_handle(self, base):
        """The 64-byte legacy IPC handle of the allocation whose base is `base`."""
        handle = _IpcHandle()
        self._call("cuIpcGetMemHandle", ctypes.byref(handle), base, what=f"allocation {base:#x}")
        return bytes(handle)

    def _attr(self, attribute, ptr, ctype):
        out = ctype()
        self._call("cuPointerGetAttribute", ctypes.byref(out), attribute, ptr,
                   what=f"pointer {ptr:#x}")
        return out.value

    def legacy_ipc_capable(self, ptr):
        """Whether `ptr`'s allocation has a legacy IPC handle (cudaMalloc), not VMM
        memory. A driver that cannot tell (older than CUDA 11.x) is taken to mean yes."""
        try:
            return bool(self._attr(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr,
                                   ctypes.c_int))
        except CudaError:
            return True

    def vmm_mapping(self, ptr):
        """(base, bytes) of the VMM mapping (one cuMemMap) holding `ptr`, refusing one
        whose allocation cannot be exported as a POSIX descriptor."""
        allowed = self._attr(CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, ptr, ctypes.c_uint64)
        if not allowed & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR:
            raise KvplaneError(
                f"pointer {ptr:#x}: VMM memory that cannot be exported as a POSIX descriptor "
                f"(allowed handle types {allowed:#x}); allocate it with "
                "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (PyTorch's expandable segments do)")
        base = self._attr(CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR, ptr, ctypes.c_uint64)
        size = self._attr(CU_POINTER_ATTRIBUTE_MAPPING_SIZE, ptr, ctypes.c_uint64)
        if not (base <= ptr < base + size):
            raise KvplaneError(f"pointer {ptr:#x}: the driver puts it outside its own mapping "
                               f"[{base:#x}, +{size})")
        return base, size

    def export_fd(self, base):
        """A new POSIX descriptor for the VMM allocation mapped at `base` (the caller
        closes it)."""
        handle = ctypes.c_uint64()
        self._call("cuMemRetainAllocationHandle", ctypes.byref(handle), ctypes.c_void_p(base),
                   what=f"mapping {base:#x}")
        fd = ctypes.c_int(-1)
        try:
            self._call("cuMemExportToShareableHandle", ctypes.byref(fd), handle.value,
                       CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0, what=f"mapping {base:#x}")
        finally:
            try:
                self._call("cuMemRelease", handle.value)
            except CudaError:
                if fd.value >= 0:
                    os.close(fd.value)
                raise
        return fd.value

    def uuid(self, ordinal):
        """The 16-byte UUID of GPU `ordinal` (what nvidia-smi shows as GPU-...)."""
        out = _Uuid()
        name = "cuDeviceGetUuid_v2" if "cuDeviceGetUuid_v2" in self._fn else "cuDeviceGetUuid"
        self._call(name, ctypes.byref(out), self._device(ordinal), what=f"device {ordinal}")
        return bytes(out)


# --------------------------------------------------------------------------- tensors

@dataclass
class KvTensor:
    """A raw tensor description: `ptr` to its first element, `shape`, `itemsize` bytes per
    element, `device` ("cpu", "cuda" or "cuda:N"), `strides_bytes` (None: C-contiguous)."""

    ptr: int
    shape: tuple
    itemsize: int
    device: str = "cpu"
    strides_bytes: tuple = None
    owner: object = None  # kept alive with the registration

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        if self.strides_bytes is None:
            self.strides_bytes = _contiguous_strides(self.shape, self.itemsize)
        self.strides_bytes = tuple(int(s) for s in self.strides_bytes)
        if len(self.strides_bytes) != len(self.shape):
            raise KvplaneError(f"shape {self.shape} and strides {self.strides_bytes} differ in rank")

    @property
    def is_cuda(self):
        return self.device.startswith("cuda")

    @property
    def ordinal(self):
        """The CUDA device ordinal if the description says it, else None."""
        _, _, idx = self.device.partition(":")
        return int(idx) if idx else None


def _contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _itemsize(typestr):
    # "<f2", "|u1", "<V2" (bfloat16 as void): the size follows the kind letter.
    try:
        return int(typestr[2:])
    except ValueError:
        raise KvplaneError(f"unsupported array typestr {typestr!r}") from None


def _from_interface(obj, iface, device):
    ptr = iface["data"][0]
    size = _itemsize(iface["typestr"])
    strides = iface.get("strides")
    return KvTensor(ptr, tuple(iface["shape"]), size, device, strides, owner=obj)


def as_kv_tensor(obj, shape=None, itemsize=None):
    """A KvTensor for a torch tensor, an array-interface object, a KvTensor, or a raw
    (ptr, nbytes, device) triple (with `shape` and `itemsize`)."""
    if isinstance(obj, KvTensor):
        return obj
    # torch first: its CUDA tensors' __cuda_array_interface__ refuses bfloat16.
    if all(hasattr(obj, a) for a in ("data_ptr", "element_size", "stride", "device")):
        size = obj.element_size()
        dev = obj.device
        device = dev.type if dev.index is None else f"{dev.type}:{dev.index}"
        if dev.type not in ("cpu", "cuda"):
            raise KvplaneError(f"tensors on {device} cannot be registered (cpu or cuda only)")
        return KvTensor(obj.data_ptr(), tuple(obj.shape), size, device,
                        tuple(s * size for s in obj.stride()), owner=obj)
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_interface(obj, obj.__cuda_array_interface__, "cuda")
    if hasattr(obj, "__array_interface__"):
        return _from_interface(obj, obj.__array_interface__, "cpu")
    if isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[0], int):
        ptr, nbytes, device = obj
        if shape is None or itemsize is None:
            raise KvplaneError("a raw (ptr, nbytes, device) tensor needs register_kv(shape=, itemsize=)")
        t = KvTensor(ptr, tuple(shape), itemsize, str(device))
        want = itemsize
        for n in t.shape:
            want *= n
        if want != nbytes:
            raise KvplaneError(f"raw tensor at {ptr:#x}: {nbytes} bytes, but shape {t.shape} x "
                               f"{itemsize} bytes is {want}")
        return t
    raise KvplaneError(f"cannot register a {type(obj).__name__}: pass a torch tensor, an object "
                       "with __cuda_array_interface__ / __array_interface__, a KvTensor or a raw "
                       "(ptr, nbytes, device) with shape= and itemsize=")


# --------------------------------------------------------------------------- registration

@dataclass
class KvRegistration:
    """What `register_kv` built: `regions`, (KvRegion, fd) pairs for `Client(regions=)`
    (fd -1 for CUDA IPC), and `layout`, the ATTACH_LAYOUT argument, whose plane (p, l) is
    at `layout.plane_offset[p][l]` in region `layout.plane_region[p][l]`."""

    regions: list
    layout: KvLayout
    device: str
    keepalive: list = field(default_factory=list, repr=False)

    def describe(self):
        """One line for a log: how many regions of which kinds, on which device."""
        kinds = {}
        for r, _ in self.regions:
            name = REGION_KIND_NAMES.get(r.kind, str(r.kind))
            kinds[name] = kinds.get(name, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        lay = self.layout
        return (f"{lay.num_layers} layers x {lay.kv_planes} planes x {lay.num_pages} pages of "
                f"{lay.page_tokens} tokens in {parts} region(s) on {self.device}")


_GEOMETRY_FIELDS = ("num_pages", "page_tokens", "kv_heads", "head_bytes", "dtype_bytes",
                    "page_stride_bytes", "token_stride_bytes", "head_stride_bytes")


def _plane_geometry(t, dims, page_tokens, where):
    """The layout fields of one plane of `t` (a KvTensor whose dims are `dims`, "plane"
    excluded), and its extent in bytes from the plane's first byte."""
    size = dict(zip(dims, (t.shape[i] for i in range(len(dims)))))
    stride = dict(zip(dims, (t.strides_bytes[i] for i in range(len(dims)))))
    for name in dims:
        if stride[name] < 0:
            raise KvplaneError(f"{where}: negative stride of dimension {name!r}")
        if size[name] == 0:
            raise KvplaneError(f"{where}: dimension {name!r} is empty")
    if size["dim"] > 1 and stride["dim"] != t.itemsize:
        raise KvplaneError(f"{where}: a head's elements must be contiguous (stride of 'dim' is "
                           f"{stride['dim']} bytes, element {t.itemsize})")
    g = {"dtype_bytes": t.itemsize, "head_bytes": size["dim"] * t.itemsize}
    if "head" in dims:
        g["kv_heads"], g["head_stride_bytes"] = size["head"], stride["head"]
    else:
        g["kv_heads"], g["head_stride_bytes"] = 1, g["head_bytes"]
    if "page" in dims:
        g["num_pages"], g["page_stride_bytes"] = size["page"], stride["page"]
        g["page_tokens"], g["token_stride_bytes"] = size["token"], stride["token"]
        if page_tokens is not None and page_tokens != size["token"]:
            raise KvplaneError(f"{where}: page_tokens={page_tokens} but the tensor's pages hold "
                               f"{size['token']} tokens")
    else:
        # A token-major pool (SGLang): a page is page_tokens consecutive tokens; tokens
        # past the last whole page are not addressable by page.
        if not page_tokens:
            raise KvplaneError(f"{where}: layout without a 'page' dimension needs page_tokens=")
        g["page_tokens"], g["token_stride_bytes"] = page_tokens, stride["token"]
        g["num_pages"] = size["token"] // page_tokens
        g["page_stride_bytes"] = page_tokens * stride["token"]
        if g["num_pages"] == 0:
            raise KvplaneError(f"{where}: {size['token']} tokens is not one page of {page_tokens}")
    extent = ((g["num_pages"] - 1) * g["page_stride_bytes"]
              + (g["page_tokens"] - 1) * g["token_stride_bytes"]
              + (g["kv_heads"] - 1) * g["head_stride_bytes"] + g["head_bytes"])
    return g, extent


def _planes(entry, dims, shape, itemsize):
    """[(plane index, KvTensor, plane base pointer)] of one layer's entry."""
    raw = isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], int)
    if isinstance(entry, (tuple, list)) and not raw:
        if "plane" in dims:
            raise KvplaneError("a layer given as separate K and V tensors needs a layout "
                               "without a 'plane' dimension (e.g. \"sglang\")")
        tensors = [as_kv_tensor(x, shape, itemsize) for x in entry]
        if len(tensors) not in (1, 2):
            raise KvplaneError(f"a layer has 1 or 2 planes, not {len(tensors)}")
        return [(p, t, t.ptr) for p, t in enumerate(tensors)]
    t = as_kv_tensor(entry, shape, itemsize)
    if len(t.shape) != len(dims):
        raise KvplaneError(f"tensor of shape {t.shape} does not match layout {dims}")
    if "plane" not in dims:
        return [(0, t, t.ptr)]
    axis = dims.index("plane")
    n = t.shape[axis]
    if n not in (1, 2):
        raise KvplaneError(f"the 'plane' dimension has {n} entries (1 or 2)")
    inner = KvTensor(t.ptr, t.shape[:axis] + t.shape[axis + 1:], t.itemsize, t.device,
                     t.strides_bytes[:axis] + t.strides_bytes[axis + 1:], owner=t.owner)
    return [(p, inner, t.ptr + p * t.strides_bytes[axis]) for p in range(n)]


def register_kv(tensors, layout="vllm", page_tokens=None, driver=None, shape=None, itemsize=None):
    """Describe per-layer KV tensors, in place, as KV regions and a kvp_kv_layout (see the
    module docstring). `driver`: the CudaDriver to use for CUDA tensors (default: one
    over libcuda.so.1, made when the first CUDA tensor is seen)."""
    dims = LAYOUTS.get(layout, layout) if isinstance(layout, str) else tuple(layout)
    if isinstance(layout, str) and layout not in LAYOUTS:
        raise KvplaneError(f"unknown layout {layout!r}: one of {sorted(LAYOUTS)} or a tuple of "
                           f"dimension names {sorted(_DIM_NAMES)}")
    if set(dims) - _DIM_NAMES or len(set(dims)) != len(dims) or not {"token", "dim"} <= set(dims):
        raise KvplaneError(f"layout {dims}: distinct names from {sorted(_DIM_NAMES)}, with "
                           "'token' and 'dim'")
    layers = list(tensors)
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise KvplaneError(f"{len(layers)} layers: 1..{MAX_LAYERS}")
    inner_dims = tuple(d for d in dims if d != "plane")

    geometry, kv_planes, device = None, None, None
    planes = []  # (layer, plane, base pointer, extent, KvTensor)
    for li, entry in enumerate(layers):
        got = _planes(entry, dims, shape, itemsize)
        if kv_planes is None:
            kv_planes = len(got)
        elif len(got) != kv_planes:
            raise KvplaneError(f"layer {li} has {len(got)} planes, layer 0 has {kv_planes}")
        for p, t, base in got:
            where = f"layer {li} plane {p}"
            if len(t.shape) != len(inner_dims):
                raise KvplaneError(f"{where}: tensor of shape {t.shape} does not match {inner_dims}")
            g, extent = _plane_geometry(t, inner_dims, page_tokens, where)
            if geometry is None:
                geometry = g
            for name in _GEOMETRY_FIELDS:
                if g[name] != geometry[name]:
                    raise KvplaneError(f"{where}: {name} is {g[name]}, layer 0 plane 0 has "
                                       f"{geometry[name]}: one layout must describe every plane")
            kind = "cuda" if t.is_cuda else "cpu"
            if device is None:
                device = kind
            elif kind != device:
                raise KvplaneError(f"{where} is on {kind}, layer 0 plane 0 on {device}: "
                                   "all KV tensors must be on one device")
            planes.append((li, p, base, extent, t))

    if device == "cuda":
        regions, origin_of = _cuda_regions(planes, driver or CudaDriver())
        device = regions[0][2]
    else:
        regions, origin_of = _host_regions(planes)
    if len(regions) > MAX_KV_REGIONS:
        raise KvplaneError(f"{len(regions)} KV regions, at most {MAX_KV_REGIONS}")

    lay = KvLayout()
    lay.num_layers, lay.kv_planes = len(layers), kv_planes
    for name in _GEOMETRY_FIELDS:
        setattr(lay, name, geometry[name])
    # Ignored by the daemon (it knows each region's size); the largest region, for tools.
    lay.buffer_bytes = max(r[0].len_bytes for r in regions)
    for li, p, base, _, _ in planes:
        index, origin = origin_of[(li, p)]
        lay.plane_region[p][li] = index
        lay.plane_offset[p][li] = base - origin
    keep = [t.owner for *_, t in planes] + [holder for *_, holder in regions]
    return KvRegistration([(r, f) for r, f, _, _ in regions], lay, device,
                          [k for k in keep if k is not None])


def _host_regions(planes):
    """One HOST_MEMFD region per host_buffer holding planes (all of the buffer):
    [(region, fd, device, buffer)] and {(layer, plane): (region index, region start)}."""
    regions, index_of, origin_of = [], {}, {}
    for li, p, base, extent, t in planes:
        buf = host_buffer_holding(base, base + extent)
        if buf is None:
            raise KvplaneError(
                f"layer {li} plane {p}: the CPU tensor at {base:#x} (+{extent} bytes) is not in "
                "memory kvplane can map; allocate the KV cache in kvplane.host_buffer(nbytes) "
                "and view it, e.g. torch.frombuffer(buf, dtype=...).view(shape)")
        if id(buf) not in index_of:
            index_of[id(buf)] = len(regions)
            regions.append((KvRegion.host_memfd(buf.nbytes), buf.fd, "cpu", buf))
        origin_of[(li, p)] = (index_of[id(buf)], buf.address)
    return regions, origin_of


class _Fd:
    """A descriptor this process exported for the daemon: closed when the registration
    holding it goes."""

    def __init__(self, fd):
        self.fd = fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def _cuda_regions(planes, driver):
    """Regions for CUDA planes: one CUDA_IPC region per cudaMalloc allocation holding
    planes (the bytes from the first plane's start to the last one's end, handle of the
    allocation's base), then one CUDA_VMM_FD region per VMM mapping planes touch, each
    continuing the one before where the two meet."""
    ordinals = set()
    for li, p, base, extent, t in planes:
        ordinal = t.ordinal if t.ordinal is not None else driver.device_of(base)
        if not ordinals:
            driver.ensure_context(ordinal)
        ordinals.add(ordinal)
        if len(ordinals) > 1:
            raise KvplaneError(f"layer {li} plane {p} is on GPU {ordinal}, others on "
                               f"{sorted(ordinals - {ordinal})}: one session's KV is on one GPU")
    (ordinal,) = ordinals
    uuid = driver.uuid(ordinal)
    is_legacy = [driver.legacy_ipc_capable(pl[2]) for pl in planes]
    legacy = [pl for pl, yes in zip(planes, is_legacy) if yes]
    vmm = [pl for pl, yes in zip(planes, is_legacy) if not yes]
    regions, origin_of = _ipc_regions(legacy, driver, uuid, ordinal)
    more, more_origin = _vmm_regions(vmm, driver, uuid, ordinal, first=len(regions))
    regions += more
    origin_of.update(more_origin)
    return regions, origin_of


def _vmm_regions(planes, driver, uuid, ordinal, first):
    """One CUDA_VMM_FD region per VMM mapping the planes touch (all of it), in address
    order, each flagged as continuing the one before when it starts where that one ends;
    region indices from `first`."""
    chunks = {}  # mapping base -> bytes
    start_of = {}  # (layer, plane) -> base of the mapping its first byte is in
    for li, p, base, extent, t in planes:
        at = base
        while at < base + extent:
            mbase, msize = driver.vmm_mapping(at)
            chunks[mbase] = msize
            start_of.setdefault((li, p), mbase)
            at = mbase + msize
    regions, index_of, prev_end = [], {}, None
    for mbase, msize in sorted(chunks.items()):
        fd = _Fd(driver.export_fd(mbase))
        region = KvRegion.cuda_vmm_fd(uuid, msize, 0, msize, continues=prev_end == mbase)
        index_of[mbase] = first + len(regions)
        regions.append((region, fd.fd, f"cuda:{ordinal}", fd))
        prev_end = mbase + msize
    origin_of = {k: (index_of[m], m) for k, m in start_of.items()}
    return regions, origin_of


def _ipc_regions(planes, driver, uuid, ordinal):
    """The CUDA_IPC regions of `_cuda_regions`."""
    allocs = {}  # base -> [size, lo, hi]
    where_of = {}
    for li, p, base, extent, t in planes:
        abase, asize = driver.address_range(base)
        if not (abase <= base and base + extent <= abase + asize):
            raise KvplaneError(f"layer {li} plane {p}: [{base:#x}, +{extent}) is not inside its "
                               f"allocation [{abase:#x}, +{asize})")
        span = allocs.setdefault(abase, [asize, base, base + extent])
        span[1], span[2] = min(span[1], base), max(span[2], base + extent)
        where_of[(li, p)] = abase
    regions, index_of = [], {}
    for abase, (asize, lo, hi) in allocs.items():
        index_of[abase] = len(regions)
        region = KvRegion.cuda_ipc(driver.ipc_handle(abase), uuid, asize, lo - abase, hi - lo)
        regions.append((region, -1, f"cuda:{ordinal}", None))
    origin_of = {k: (index_of[a], allocs[a][1]) for k, a in where_of.items()}
    return regions, origin_of

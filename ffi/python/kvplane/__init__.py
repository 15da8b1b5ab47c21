"""kvplane: Python bindings (ctypes) over libkvplane, the C client library.

The structs below mirror ffi/include/kvplane.h; `check_abi()` compares every size and
offset with what the loaded library was built with, and `Client` runs it on attach, so
a drifted mirror fails loudly instead of corrupting a ring.

KV memory (host buffers, CUDA tensors) is registered with `register_kv` and
`host_buffer`, from `kvplane.regions` (its docstring has the details).
"""

import ctypes
import ctypes.util
import os
from pathlib import Path

# Opcodes, statuses, tiers (enum values from kvplane.h).
OP_NOP, OP_STATS, OP_ATTACH_LAYOUT, OP_LOOKUP, OP_SAVE, OP_LOAD = 0, 1, 2, 3, 4, 5
OP_PIN, OP_UNPIN, OP_DROP, OP_CLEAR_NAMESPACE, OP_REGISTER_EVENTS = 6, 7, 8, 9, 10
STATUS_NAMES = {
    0: "ok", 1: "bad opcode", 2: "bad flags", 3: "bad range", 4: "bad argument",
    5: "namespace", 6: "no layout", 7: "not found", 8: "no space", 9: "I/O error",
    10: "corrupt", 11: "busy", 12: "unsupported", 13: "shutdown", 14: "internal",
}
OK, E_BAD_OPCODE = 0, 1
TIER_NONE, TIER_HBM, TIER_HOST, TIER_NVME = 0, 1, 2, 3


class Sqe(ctypes.Structure):
    _fields_ = [
        ("user_data", ctypes.c_uint64), ("opcode", ctypes.c_uint16), ("flags", ctypes.c_uint16),
        ("namespace_id", ctypes.c_uint32), ("arg_offset", ctypes.c_uint64),
        ("arg_len", ctypes.c_uint32), ("count", ctypes.c_uint32), ("param0", ctypes.c_uint64),
        ("param1", ctypes.c_uint64), ("reserved", ctypes.c_uint8 * 14), ("seq", ctypes.c_uint16),
    ]


class Cqe(ctypes.Structure):
    _fields_ = [
        ("user_data", ctypes.c_uint64), ("status", ctypes.c_int32), ("blocks", ctypes.c_uint32),
        ("bytes", ctypes.c_uint64), ("tier", ctypes.c_uint16), ("seq", ctypes.c_uint16),
        ("detail", ctypes.c_uint32),
    ]


class BlockOp(ctypes.Structure):
    _fields_ = [
        ("hash", ctypes.c_uint64), ("parent_hash", ctypes.c_uint64),
        ("engine_block", ctypes.c_uint32), ("tier", ctypes.c_uint8), ("status", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 2),
    ]


class Stats(ctypes.Structure):
    _fields_ = [
        ("session_id", ctypes.c_uint64), ("ops_completed", ctypes.c_uint64),
        ("ops_failed", ctypes.c_uint64), ("blocks_saved", ctypes.c_uint64),
        ("blocks_loaded", ctypes.c_uint64), ("bytes_saved", ctypes.c_uint64),
        ("bytes_loaded", ctypes.c_uint64), ("sessions_active", ctypes.c_uint64),
        ("tier_capacity_blocks", ctypes.c_uint64 * 4), ("tier_used_blocks", ctypes.c_uint64 * 4),
        ("lookup_hits", ctypes.c_uint64), ("lookup_misses", ctypes.c_uint64),
        ("backend", ctypes.c_uint32), ("reserved0", ctypes.c_uint32),
        ("reserved", ctypes.c_uint64 * 4),
    ]


MAX_LAYERS = 256
# kvp_sqe.flags (KVP_SQE_F_* in kvplane.h).
SQE_F_PREFIX_ONLY = 1 << 0
SQE_F_WRITE_THROUGH = 1 << 1
SQE_F_HIGH_PRIORITY = 1 << 2
# SAVE: also keep the blocks in G1 (the daemon's HBM arena on the engine's GPU).
SQE_F_KEEP_ON_GPU = 1 << 3


class KvLayout(ctypes.Structure):
    """kvp_kv_layout: a strided description of the engine's KV pages; plane (p, l) starts
    at plane_offset[p][l] in the session's KV region plane_region[p][l]."""
    _fields_ = [
        ("num_layers", ctypes.c_uint32), ("kv_planes", ctypes.c_uint32),
        ("page_tokens", ctypes.c_uint32), ("kv_heads", ctypes.c_uint32),
        ("head_bytes", ctypes.c_uint32), ("dtype_bytes", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint64), ("page_stride_bytes", ctypes.c_uint64),
        ("token_stride_bytes", ctypes.c_uint64), ("head_stride_bytes", ctypes.c_uint64),
        ("buffer_bytes", ctypes.c_uint64), ("plane_offset", (ctypes.c_uint64 * MAX_LAYERS) * 2),
        ("plane_region", (ctypes.c_uint16 * MAX_LAYERS) * 2),
    ]


# enum kvp_region_kind and the region limits.
REGION_NONE, REGION_HOST_MEMFD, REGION_CUDA_IPC, REGION_CUDA_VMM_FD = 0, 1, 2, 3
REGION_KIND_NAMES = {REGION_HOST_MEMFD: "host memfd", REGION_CUDA_IPC: "CUDA IPC",
                     REGION_CUDA_VMM_FD: "CUDA VMM fd"}
MAX_KV_REGIONS = 4096
MAX_HOST_KV_REGIONS = 512
REGION_F_CONTINUES = 1
GPU_UUID_BYTES = 16
CUDA_IPC_HANDLE_BYTES = 64


class KvRegion(ctypes.Structure):
    """kvp_kv_region: [offset_bytes, +len_bytes) of an allocation of alloc_bytes that a
    memfd (sent alongside), a CUDA IPC handle or a VMM descriptor names."""
    _fields_ = [
        ("kind", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("alloc_bytes", ctypes.c_uint64), ("offset_bytes", ctypes.c_uint64),
        ("len_bytes", ctypes.c_uint64), ("gpu_uuid", ctypes.c_uint8 * GPU_UUID_BYTES),
        ("handle", ctypes.c_uint8 * CUDA_IPC_HANDLE_BYTES), ("reserved", ctypes.c_uint8 * 16),
    ]

    @classmethod
    def host_memfd(cls, nbytes):
        """The whole of a sealed memfd of `nbytes` (its descriptor goes with it)."""
        return cls(kind=REGION_HOST_MEMFD, alloc_bytes=nbytes, offset_bytes=0, len_bytes=nbytes)

    @classmethod
    def cuda_ipc(cls, handle, gpu_uuid, alloc_bytes, offset_bytes, len_bytes):
        """[offset_bytes, +len_bytes) of the cudaMalloc allocation of alloc_bytes whose base
        the 64-byte IPC `handle` names, on the GPU `gpu_uuid` (16 bytes). No descriptor."""
        if len(handle) != CUDA_IPC_HANDLE_BYTES or len(gpu_uuid) != GPU_UUID_BYTES:
            raise ValueError(f"CUDA IPC region: handle is {len(handle)} bytes (need "
                             f"{CUDA_IPC_HANDLE_BYTES}), uuid {len(gpu_uuid)} (need {GPU_UUID_BYTES})")
        r = cls(kind=REGION_CUDA_IPC, alloc_bytes=alloc_bytes, offset_bytes=offset_bytes,
                len_bytes=len_bytes)
        ctypes.memmove(r.handle, bytes(handle), CUDA_IPC_HANDLE_BYTES)
        ctypes.memmove(r.gpu_uuid, bytes(gpu_uuid), GPU_UUID_BYTES)
        return r

    @classmethod
    def cuda_vmm_fd(cls, gpu_uuid, alloc_bytes, offset_bytes, len_bytes, continues=False):
        """[offset_bytes, +len_bytes) of a VMM allocation of alloc_bytes exported as a POSIX
        descriptor (sent alongside) on the GPU `gpu_uuid`; `continues`: its memory follows
        the previous region's (REGION_F_CONTINUES)."""
        if len(gpu_uuid) != GPU_UUID_BYTES:
            raise ValueError(f"CUDA VMM region: uuid is {len(gpu_uuid)} bytes (need {GPU_UUID_BYTES})")
        r = cls(kind=REGION_CUDA_VMM_FD, flags=REGION_F_CONTINUES if continues else 0,
                alloc_bytes=alloc_bytes, offset_bytes=offset_bytes, len_bytes=len_bytes)
        ctypes.memmove(r.gpu_uuid, bytes(gpu_uuid), GPU_UUID_BYTES)
        return r

    def carries_fd(self):
        return self.kind in (REGION_HOST_MEMFD, REGION_CUDA_VMM_FD)

    def __repr__(self):
        kind = REGION_KIND_NAMES.get(self.kind, f"kind {self.kind}")
        return (f"KvRegion({kind}, alloc_bytes={self.alloc_bytes}, "
                f"offset_bytes={self.offset_bytes}, len_bytes={self.len_bytes})")


class IpcEvent(ctypes.Structure):
    """kvp_ipc_event: one CUDA IPC event of the engine (OP_REGISTER_EVENTS takes an array),
    `cuIpcGetEventHandle` of an interprocess event (`torch.cuda.Event(interprocess=True)
    .ipc_handle()`) on the GPU `gpu_uuid`. SAVE and LOAD name one by `param0` =
    1 + its index (`EVENT_NONE`: none)."""
    _fields_ = [
        ("gpu_uuid", ctypes.c_uint8 * GPU_UUID_BYTES),
        ("handle", ctypes.c_uint8 * CUDA_IPC_HANDLE_BYTES), ("reserved", ctypes.c_uint8 * 16),
    ]

    @classmethod
    def of(cls, handle, gpu_uuid):
        if len(handle) != CUDA_IPC_HANDLE_BYTES or len(gpu_uuid) != GPU_UUID_BYTES:
            raise ValueError(f"IPC event: handle is {len(handle)} bytes (need "
                             f"{CUDA_IPC_HANDLE_BYTES}), uuid {len(gpu_uuid)} (need {GPU_UUID_BYTES})")
        e = cls()
        ctypes.memmove(e.handle, bytes(handle), CUDA_IPC_HANDLE_BYTES)
        ctypes.memmove(e.gpu_uuid, bytes(gpu_uuid), GPU_UUID_BYTES)
        return e


EVENT_NONE = 0
MAX_IPC_EVENTS = 64

_MIRRORS = {"kvp_sqe": Sqe, "kvp_cqe": Cqe, "kvp_block_op": BlockOp, "kvp_stats": Stats,
            "kvp_kv_layout": KvLayout, "kvp_kv_region": KvRegion, "kvp_ipc_event": IpcEvent}


class KvplaneError(RuntimeError):
    pass


class TimedOut(KvplaneError):
    """`Queue.wait` saw no completion in time while the daemon was alive: the operations
    may still complete, and still read or write the KV memory they name."""


WAIT_TIMED_OUT = -2  # KVP_WAIT_TIMED_OUT


def _find_library():
    env = os.environ.get("KVPLANE_LIB")
    if env:
        return env
    root = Path(__file__).resolve().parents[3]
    for profile in ("release", "debug"):
        p = root / "target" / profile / "libkvplane.so"
        if p.exists():
            return str(p)
    found = ctypes.util.find_library("kvplane")
    if found:
        return found
    raise KvplaneError("libkvplane.so not found: build it (cargo build -p kvplane-capi) or set KVPLANE_LIB")


def load(path=None):
    lib = ctypes.CDLL(path or _find_library())
    vp, u32, u64, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
    lib.kvp_client_attach.argtypes = [ctypes.c_char_p, u32, u32, u64, ctypes.POINTER(ctypes.c_char_p), u32,
                                      ctypes.POINTER(KvRegion), ctypes.POINTER(i32), u32, ctypes.POINTER(vp)]
    lib.kvp_client_attach.restype = i32
    lib.kvp_client_session_id.argtypes = [vp]
    lib.kvp_client_session_id.restype = u64
    lib.kvp_client_detach.argtypes = [vp]
    lib.kvp_client_detach.restype = None
    lib.kvp_client_begin_detach.argtypes = [vp]
    lib.kvp_client_begin_detach.restype = i32
    lib.kvp_client_daemon_done.argtypes = [vp]
    lib.kvp_client_daemon_done.restype = i32
    lib.kvp_client_queue.argtypes = [vp, u32]
    lib.kvp_client_queue.restype = vp
    lib.kvp_queue_free.argtypes = [vp]
    lib.kvp_queue_free.restype = None
    lib.kvp_queue_arena_bytes.argtypes = [vp]
    lib.kvp_queue_arena_bytes.restype = u64
    lib.kvp_queue_write_arena.argtypes = [vp, u64, vp, u64]
    lib.kvp_queue_write_arena.restype = i32
    lib.kvp_queue_read_arena.argtypes = [vp, u64, vp, u64]
    lib.kvp_queue_read_arena.restype = i32
    lib.kvp_queue_submit.argtypes = [vp, ctypes.POINTER(Sqe), u32]
    lib.kvp_queue_submit.restype = i32
    lib.kvp_queue_poll.argtypes = [vp, ctypes.POINTER(Cqe), u32]
    lib.kvp_queue_poll.restype = i32
    lib.kvp_queue_wait.argtypes = [vp, ctypes.POINTER(Cqe), u32, u32]
    lib.kvp_queue_wait.restype = i32
    lib.kvp_last_error.argtypes = []
    lib.kvp_last_error.restype = ctypes.c_char_p
    lib.kvp_abi_layout.argtypes = [ctypes.c_char_p]
    lib.kvp_abi_layout.restype = ctypes.c_int64
    return lib


def check_abi(lib):
    """Compare each mirrored struct's size and field offsets with the library's."""
    for cname, py in _MIRRORS.items():
        want = lib.kvp_abi_layout(cname.encode())
        if want != ctypes.sizeof(py):
            raise KvplaneError(f"{cname}: Python mirror is {ctypes.sizeof(py)} bytes, library says {want}")
        # The header's structs have no implicit padding (every byte is a named field), so
        # a mirror missing a trailing field that alignment padding would hide shows here.
        covered = sum(ctypes.sizeof(t) for _, t in py._fields_)
        if covered != want:
            raise KvplaneError(f"{cname}: Python mirror's fields cover {covered} of its {want} bytes")
        for field, _ in py._fields_:
            off = lib.kvp_abi_layout(f"{cname}.{field}".encode())
            if off < 0:
                raise KvplaneError(f"{cname}.{field}: the library does not know this field")
            if off != getattr(py, field).offset:
                raise KvplaneError(f"{cname}.{field}: offset {getattr(py, field).offset} here, {off} in the library")


def _check(lib, rc, what):
    if rc < 0:
        raise KvplaneError(f"{what}: {lib.kvp_last_error().decode(errors='replace')}")
    return rc


class Queue:
    """One queue pair; use from one thread at a time."""

    def __init__(self, lib, handle):
        self._lib, self._h = lib, handle

    @property
    def arena_bytes(self):
        return self._lib.kvp_queue_arena_bytes(self._h)

    def write_arena(self, offset, data):
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        _check(self._lib, self._lib.kvp_queue_write_arena(self._h, offset, buf, len(data)), "write_arena")

    def read_arena(self, offset, length):
        buf = ctypes.create_string_buffer(length)
        _check(self._lib, self._lib.kvp_queue_read_arena(self._h, offset, buf, length), "read_arena")
        return buf.raw

    def submit(self, sqes):
        """Submit a list of Sqe; returns how many the ring took."""
        arr = (Sqe * len(sqes))(*sqes)
        return _check(self._lib, self._lib.kvp_queue_submit(self._h, arr, len(sqes)), "submit")

    def wait(self, max_completions=64, timeout_ms=5000):
        """Completions, after waiting up to timeout_ms for at least one; TimedOut if none
        came and the daemon is alive, KvplaneError if the session is over."""
        out = (Cqe * max_completions)()
        rc = self._lib.kvp_queue_wait(self._h, out, max_completions, timeout_ms)
        if rc == WAIT_TIMED_OUT:
            raise TimedOut(f"wait: {self._lib.kvp_last_error().decode(errors='replace')}")
        n = _check(self._lib, rc, "wait")
        return list(out[:n])

    def poll(self, max_completions=64):
        out = (Cqe * max_completions)()
        n = _check(self._lib, self._lib.kvp_queue_poll(self._h, out, max_completions), "poll")
        return list(out[:n])

    def close(self):
        if self._h:
            self._lib.kvp_queue_free(self._h)
            self._h = None


class Client:
    """An attached session. `Client(socket, namespaces=["ns"])`, then `.queue(0)`."""

    def __init__(self, socket_path, namespaces=(), queue_pairs=1, ring_entries=256,
                 arena_bytes=1 << 20, lib=None, regions=()):
        """`regions`: the engine's KV memory, what `register_kv` returned (its `.regions`
        are sent) or a sequence of `(KvRegion, fd)` pairs, fd -1 for kinds without one
        (e.g. `(KvRegion.host_memfd(n), sealed_memfd("kv", n))`). Layouts name regions by
        their index here. The descriptors are duplicated: the caller keeps and closes its
        own."""
        self._lib = lib or load()
        check_abi(self._lib)
        pairs = list(getattr(regions, "regions", regions))
        descs = (KvRegion * max(1, len(pairs)))(*[r for r, _ in pairs])
        fds = (ctypes.c_int32 * max(1, len(pairs)))(*[fd for _, fd in pairs])
        names = (ctypes.c_char_p * max(1, len(namespaces)))(*[n.encode() for n in namespaces])
        handle = ctypes.c_void_p()
        _check(self._lib, self._lib.kvp_client_attach(
            str(socket_path).encode(), queue_pairs, ring_entries, arena_bytes, names,
            len(namespaces), descs, fds, len(pairs), ctypes.byref(handle)), "attach")
        self._h = handle
        # The daemon now maps this memory: what register_kv holds (the tensors, the host
        # buffers) stays alive with the session.
        self._kv = regions

    @property
    def session_id(self):
        return self._lib.kvp_client_session_id(self._h)

    def queue(self, index=0):
        h = self._lib.kvp_client_queue(self._h, index)
        if not h:
            raise KvplaneError(f"queue {index}: {self._lib.kvp_last_error().decode()}")
        return Queue(self._lib, h)

    def begin_detach(self):
        """End the session but keep the connection, after giving up on operations the
        daemon never answered (they may still touch the KV memory): the daemon ends the
        session once no copy of it is in flight, then closes its end (`daemon_done`).
        Close the client afterwards."""
        _check(self._lib, self._lib.kvp_client_begin_detach(self._h), "begin_detach")

    def daemon_done(self):
        """After `begin_detach`: whether the daemon has closed its end, so it touches none
        of this session's KV memory any more."""
        return _check(self._lib, self._lib.kvp_client_daemon_done(self._h), "daemon_done") == 1

    def close(self):
        if self._h:
            self._lib.kvp_client_detach(self._h)
            self._h = None
            self._kv = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sealed_memfd(name, size_bytes):
    """A memfd of `size_bytes` that cannot shrink (F_SEAL_SHRINK | F_SEAL_SEAL), as the
    daemon requires of a KV buffer it maps: a tenant that could truncate it under the
    daemon's mapping would crash the daemon with SIGBUS."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size_bytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


# After the mirrors it builds on (regions.py imports them from this package).
from .regions import (  # noqa: E402
    CudaDriver, CudaError, HostBuffer, KvRegistration, KvTensor, host_buffer, register_kv,
)

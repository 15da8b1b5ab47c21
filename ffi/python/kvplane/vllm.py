"""KvplaneConnector: vLLM's KV connector (KVConnectorBase_V1) over a kvplane daemon.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvplaneConnector",
        "kv_connector_module_path": "kvplane.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/kvplane/kvplane.sock"}}'

Scheduler side: for each new request, LOOKUP asks the daemon how many leading blocks of
the prompt it holds; they are reported to vLLM as external hits. Worker side: vLLM's KV
tensors are registered once; hit blocks are loaded into the pages vLLM allocated before
the forward pass, and new full blocks are saved after it.

Host memory (vLLM's CPU build): vLLM allocates its KV cache in ordinary process memory the
daemon cannot map, so the connector stages through one registered region, a sealed memfd
(`StagingRegion`): one copy per block and layer between vLLM's pages and the region, as
LMCache does with its CPU buffer. The daemon moves blocks between the region and its
tiers with its own gather/scatter (the region's layout is described to it with
ATTACH_LAYOUT), so its stored blocks are in the canonical order
[layers][K|V][tokens][heads][head_bytes].

GPU (and CPU tensors in `kvplane.host_buffer` memory): vLLM's own per-layer tensors are
registered in place (`kvplane.register_kv`: CUDA IPC regions, or VMM regions under
PyTorch's expandable segments; `DirectPages`), and SAVE
and LOAD name vLLM's block ids: the daemon's gather and scatter kernels read and write
vLLM's pages, with no copy here and no host synchronisation (interprocess CUDA events
order the daemon's copies against vLLM's stream). Since the daemon reads pages after the
SAVE is submitted, a finished request whose SAVE is still in flight keeps its blocks:
`request_finished` delays their release and `get_finished` reports the request once no op
touches them. `_region_for` makes the choice.

Block keys are the chained hash of `kvplane.hashing` (NVIDIA Dynamo's scheme, the same as
the router's). Namespace: model name, LoRA and salt (`namespace_name`).

Failures never give vLLM wrong KV and never stop it serving: a daemon that is absent or
dies makes lookups report no hits and saves be skipped; only the leading blocks the
daemon reported done are used (staged: copied into vLLM's pages only then), and a load
that failed is reported to vLLM (`get_block_ids_with_load_errors`), which recomputes those blocks
(`"kv_load_failure_policy": "recompute"`). Each change of state is logged once.
"""

import ctypes
import logging
import mmap
import os
import time
from dataclasses import dataclass, field

import torch
import xxhash

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvplane
from kvplane import hashing
from kvplane.pages import (  # noqa: F401 - BlockBatch, _block_op_bytes, _Session: tests import them here
    DIRECT_ARENA_BYTES, BlockBatch, DirectPages, OpTimeout, RingFull, _block_op_bytes, _Session,
    ms_until, vllm_device_layout,
)

# Under "vllm." so it goes through vLLM's own logging configuration.
logger = logging.getLogger("vllm.kvplane")

DEFAULT_STAGING_BLOCKS = 256
DEFAULT_OP_TIMEOUT_MS = 5000
DEFAULT_RECONNECT_INTERVAL_S = 5.0
_NS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")
_NS_MAX = 63  # KVP_NAMESPACE_NAME_BYTES - 1


def namespace_name(model, lora_name=None, salt=None):
    """`vllm:<model>[@<lora>][:<salt digest>]`, within the daemon's 63 allowed bytes.

    The salt enters as a digest so a secret salt does not show in the daemon's status
    page; a name that does not fit is shortened and made unique by a digest of the whole.
    """
    clean = lambda s: "".join(c if c in _NS_CHARS else "_" for c in s)  # noqa: E731
    name = "vllm:" + clean(model.rstrip("/").split("/")[-1] or model)
    if lora_name:
        name += "@" + clean(lora_name)
    if salt:
        name += ":%08x" % (xxhash.xxh3_64_intdigest(salt.encode()) & 0xFFFFFFFF)
    if len(name) > _NS_MAX:
        digest = "%016x" % xxhash.xxh3_64_intdigest(f"{model}\0{lora_name}\0{salt}".encode())
        name = name[: _NS_MAX - 17] + "-" + digest
    return name


class _Once:
    """Logs each distinct event once (a connector must not log per token)."""

    def __init__(self):
        self._seen = set()

    def __call__(self, key, level, msg, *args):
        if key not in self._seen:
            self._seen.add(key)
            logger.log(level, msg, *args)


@dataclass
class KvplaneMetadata(KVConnectorMetadata):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    # Requests whose blocks the scheduler kept at request_finished (direct pages): the
    # worker reports each in get_finished once no op of it is in flight.
    delayed: list = field(default_factory=list)
    # Requests vLLM preempted this step (their blocks are freed at once).
    preempted: list = field(default_factory=list)


class _Ranges:
    """First-fit allocator of contiguous page ranges of the staging region."""

    def __init__(self, pages):
        self.free = [(0, pages)]

    def alloc(self, n):
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                self.free[i] = (start + n, length - n)
                if self.free[i][1] == 0:
                    del self.free[i]
                return start
        return None

    def release(self, start, n):
        self.free.append((start, n))
        self.free.sort()
        merged = []
        for s, n_ in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n_)
            else:
                merged.append((s, n_))
        self.free = merged


class StagingRegion:
    """A sealed memfd registered with the daemon, laid out [layer][page][vLLM's block].

    One page holds one block: for each layer, the bytes vLLM keeps for that block in that
    layer (CPU backend: [kv_heads][K|V][tokens][head_dim]). Layer-major so that, for a
    run of pages, each layer's part is one contiguous span: the copy to or from vLLM's
    tensor is then one index_select/index_copy per layer.
    """

    def __init__(self, geometry, pages):
        self.geometry = geometry
        self.pages = pages
        g = geometry
        self.bytes = g.num_layers * pages * g.layer_block_bytes
        self.fd = kvplane.sealed_memfd("kvplane-vllm-staging", self.bytes)
        self._map = mmap.mmap(self.fd, self.bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        flat = torch.frombuffer(self._map, dtype=torch.uint8).view(g.word)
        self.view = flat.view(g.num_layers, pages, -1)
        self.ranges = _Ranges(pages)

    def layout(self):
        """kvp_kv_layout of this region (what the daemon's gather/scatter reads)."""
        g = self.geometry
        lay = kvplane.KvLayout()
        lay.num_layers, lay.kv_planes, lay.page_tokens = g.num_layers, 2, g.block_tokens
        lay.kv_heads, lay.head_bytes, lay.dtype_bytes = g.kv_heads, g.head_bytes, g.dtype_bytes
        lay.num_pages = self.pages
        lay.page_stride_bytes = g.layer_block_bytes
        lay.token_stride_bytes = g.token_stride_bytes
        lay.head_stride_bytes = g.head_stride_bytes
        lay.buffer_bytes = self.bytes
        for layer in range(g.num_layers):
            for plane in range(2):
                lay.plane_offset[plane][layer] = (layer * self.pages * g.layer_block_bytes
                                                  + plane * g.plane_stride_bytes)
        return lay

    def close(self):
        self.view = None
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor still views it; the mapping goes with the last reference
        os.close(self.fd)


@dataclass
class Geometry:
    """Where one block of one layer lives in vLLM's per-layer KV tensor."""

    num_layers: int
    block_tokens: int
    kv_heads: int
    head_bytes: int
    dtype_bytes: int
    layer_block_bytes: int
    token_stride_bytes: int
    head_stride_bytes: int
    plane_stride_bytes: int

    @property
    def block_bytes(self):
        return self.num_layers * self.layer_block_bytes

    @property
    def word(self):
        """Element type the copies move: 8-byte words where the block allows (torch's
        index_select/index_copy cost is per element)."""
        return torch.int64 if self.layer_block_bytes % 8 == 0 else torch.uint8

    def block_view(self, kv):
        """vLLM's per-layer tensor as [num_blocks, words of one block]."""
        return kv.view(kv.shape[0], -1).view(torch.uint8).view(self.word).view(kv.shape[0], -1)


def host_geometry(kv_caches, block_tokens, kv_heads, head_size):
    """Geometry of vLLM's CPU attention backend: per layer a contiguous tensor
    [num_blocks, kv_heads, block_tokens, 2 * head_size], each (block, head) holding
    block_tokens rows of K, then block_tokens rows of V (cpu_attn.py views it as
    [blocks, heads, 2 * tokens, head_size] and chunks dim 2). Anything else is refused
    by name rather than copied wrongly."""
    tensors = list(kv_caches.values())
    t = tensors[0]
    want = (t.shape[0], kv_heads, block_tokens, 2 * head_size)
    for name, x in kv_caches.items():
        if x.device.type != "cpu":
            raise ValueError(f"{name}: KV tensor on {x.device}: device regions are not built yet")
        if tuple(x.shape) != want or not x.is_contiguous() or x.dtype != t.dtype:
            raise ValueError(f"{name}: KV tensor {tuple(x.shape)} {x.dtype} contiguous="
                             f"{x.is_contiguous()}; expected the CPU backend's {want}")
    e = t.element_size()
    return Geometry(
        num_layers=len(tensors), block_tokens=block_tokens, kv_heads=kv_heads,
        head_bytes=head_size * e, dtype_bytes=e,
        layer_block_bytes=kv_heads * block_tokens * 2 * head_size * e,
        token_stride_bytes=head_size * e,
        head_stride_bytes=2 * block_tokens * head_size * e,
        plane_stride_bytes=block_tokens * head_size * e,
    )


class _Stats:
    """Counters, read by tests and logged at shutdown."""

    def __init__(self):
        self.lookups = self.lookup_hit_blocks = 0
        self.loaded_blocks = self.load_failed_blocks = 0
        self.saved_blocks = self.save_skipped_blocks = self.save_failed_blocks = 0
        self.copy_s = 0.0  # staging copies, both directions
        self.copied_bytes = 0
        self.lookup_s = self.load_wait_s = self.save_submit_s = 0.0  # time in daemon ops
        # In place: waiting before a forward pass (preemption) for ops in flight, and for
        # the daemon to end sessions given up on.
        self.save_wait_s = 0.0
        self.preempted_steps = 0  # in place: steps in which vLLM preempted a request
        self.preemption_waits = 0  # of those, the ones with ops in flight (waited for)
        self.disconnects = self.attach_failures = 0
        # In place: requests whose blocks the scheduler kept, and those the worker released.
        self.delayed_frees = self.released_frees = 0
        # In place: sessions given up with ops unanswered that the daemon ended later (their
        # requests' blocks released then).
        self.detached_late = 0

    def as_dict(self):
        return dict(self.__dict__)


@dataclass
class _ReqState:
    request: object
    ns_id: int
    salt: int
    hashes: list = field(default_factory=list)
    block_ids: list = field(default_factory=list)
    in_daemon: int = 0  # leading blocks the daemon holds (hit, loaded or saved)
    local_tokens: int = 0  # tokens vLLM had locally when the lookup was made
    load: tuple = None  # (first block, count) to load in the next step
    moved: bool = False  # a LOAD or SAVE of its blocks was scheduled


class KvplaneConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._socket = extra.get("socket") or os.environ.get("KVPLANE_SOCKET", "/run/kvplane/kvplane.sock")
        self._salt = extra.get("salt")
        self._staging_blocks = int(extra.get("staging_blocks", DEFAULT_STAGING_BLOCKS))
        self._timeout_ms = int(extra.get("op_timeout_ms", DEFAULT_OP_TIMEOUT_MS))
        self._reconnect_s = float(extra.get("reconnect_interval_s", DEFAULT_RECONNECT_INTERVAL_S))
        self._block_tokens = vllm_config.cache_config.block_size
        mc = vllm_config.model_config
        model = mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model
        self._loras = [None] + list(extra.get("lora_names", []))
        self._namespaces = [namespace_name(model, lora, self._salt) for lora in self._loras]
        if len(self._namespaces) > 16:
            raise ValueError("kvplane: at most 15 lora_names (16 namespaces per session)")
        self._once = _Once()
        self.stats = _Stats()
        self._session = None
        self._next_attach = 0.0
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            logger.warning("kvplane: kv_load_failure_policy is %r: a block that fails to load "
                           "fails its request; set \"recompute\" to recompute it instead",
                           self._kv_transfer_config.kv_load_failure_policy)
        # Scheduler side. KV on a GPU is registered in place (DirectPages): a finished
        # request's blocks are kept until the worker says the daemon is done with them.
        self._reqs = {}
        self._lookup_cache = {}
        # Both roles decide alike: GPU builds, or host_buffer KV when configured (tests).
        self._host_in_place = bool(extra.get("host_buffer_in_place", False))
        self._pages_in_place = vllm_config.device_config.device_type != "cpu" or self._host_in_place
        self._delayed = []
        # Worker side.
        self._layers = []
        self._kv_u8 = []
        self._geometry = None
        self._staging = None
        self._staging_attached = False
        self._disabled = None
        self._load_errors = set()
        self._pending_saves = []  # (batch, staging start) copied this step
        self._copied_layers = set()
        self._inflight = {}  # user data -> (staging start, pages, blocks)
        self._direct = None  # DirectPages when vLLM's KV is registered in place
        self._awaiting = set()  # delayed requests not yet reported by get_finished
        self._finishing = set()  # of those, the ones vLLM has named finished
        unsafe = _unsafe_in_place(kv_cache_config) if self._pages_in_place else None
        if unsafe:
            # vLLM frees a running request's out-of-window blocks without asking the
            # connector: a SAVE in flight could read pages already reused.
            self._disabled = (f"KV cache group of {unsafe}: vLLM frees blocks of running "
                              "requests, which in-place SAVEs may still read")
            logger.error("kvplane: %s; the connector is off for this engine", self._disabled)
        if role == KVConnectorRole.SCHEDULER:
            self._connect()

    # ------------------------------------------------------------------ sessions

    def _connect(self):
        """Attach (again) if not attached and the retry interval has passed."""
        if self._session is not None:
            return True
        if self._disabled or time.monotonic() < self._next_attach:
            return False
        self._next_attach = time.monotonic() + self._reconnect_s
        try:
            if self.role == KVConnectorRole.WORKER and self._direct is not None:
                s = _Session(self._socket, self._namespaces, regions=self._direct.reg,
                             arena_bytes=DIRECT_ARENA_BYTES)
                try:
                    refused = self._direct.attach(s, self._timeout_ms)
                except kvplane.KvplaneError:
                    s.close()
                    raise
                if refused:
                    s.close()
                    self._disabled = refused
                    logger.error("kvplane: %s; the connector is off for this engine", refused)
                    return False
            elif self.role == KVConnectorRole.WORKER:
                if not self._layers:
                    return False
                # A new region for each session: ops of a dead session can never touch
                # the pages of a live one. (One that no session saw is kept.)
                if self._staging is not None and self._staging_attached:
                    self._staging.close()
                    self._staging = None
                if self._staging is None:
                    self._staging = StagingRegion(self._geometry, self._staging_blocks)
                    self._staging_attached = False
                s = _Session(self._socket, self._namespaces, self._staging.fd, self._staging.bytes,
                             arena_bytes=_arena_bytes(self._staging_blocks))
                self._staging_attached = True  # the daemon mapped it at attach
                try:
                    ud, _ = s.submit(kvplane.OP_ATTACH_LAYOUT, arg=bytes(self._staging.layout()))
                    c = s.wait_for(ud, self._timeout_ms)
                except kvplane.KvplaneError:
                    s.close()
                    raise
                if c.status != kvplane.OK:
                    s.close()
                    self._disabled = (f"the daemon refused the KV layout "
                                      f"({kvplane.STATUS_NAMES.get(c.status, c.status)}, field {c.detail}); "
                                      f"its [blocks] block_bytes must be {self._geometry.block_bytes}")
                    logger.error("kvplane: %s; the connector is off for this engine", self._disabled)
                    return False
            else:
                s = _Session(self._socket, self._namespaces)
        except (kvplane.KvplaneError, OSError) as e:
            self.stats.attach_failures += 1
            self._once(("attach", self._socket), logging.WARNING,
                       "kvplane: %s cannot attach to %s (%s): vLLM runs without the KV cache "
                       "and retries every %.0f s", self.role.name.lower(), self._socket, e,
                       self._reconnect_s)
            return False
        self._session = s
        self._once.__init__()  # log the next failure again
        logger.info("kvplane: %s attached to %s as session %d, namespaces %s", self.role.name.lower(),
                    self._socket, s.client.session_id, self._namespaces)
        return True

    def _lost(self, err):
        """The session failed: drop it; what was in flight is lost, never used."""
        self.stats.disconnects += 1
        self._once(("lost",), logging.WARNING,
                   "kvplane: %s daemon session lost (%s): recomputing what cannot be loaded, "
                   "retrying every %.0f s", self.role.name.lower(), err, self._reconnect_s)
        if self._session is not None and self._direct is not None and self._direct.ops:
            # Ops may still touch vLLM's pages: give their completions (or the news that
            # the daemon ended the session) a bounded chance first.
            self._direct_drain()
        session, self._session = self._session, None
        if self._direct is not None:
            # Ops left (unanswered, or the session's state read DEAD before they were):
            # the session detaches, and their requests keep their blocks until the daemon
            # has closed its end (checked each step, `_reap`, and before a preemption).
            self._direct.release_all(session)
        elif session is not None:
            session.close()
        for start, pages, blocks in self._inflight.values():
            self.stats.save_failed_blocks += blocks
        self._inflight.clear()
        # The old region may still be read by a dying daemon: a new one comes with the
        # next session (see _connect); its pages are not reused.
        if self._staging is not None:
            self._staging.ranges = _Ranges(0)
        self._next_attach = time.monotonic() + self._reconnect_s

    # ------------------------------------------------------------------ scheduler side

    def _req_keys(self, request):
        lora = getattr(request, "lora_request", None)
        lora_name = lora.lora_name if lora is not None else None
        if lora_name not in self._loras:
            self._once(("lora", lora_name), logging.WARNING,
                       "kvplane: LoRA %r is not in lora_names: its requests are not cached", lora_name)
            return None
        salt = self._salt
        cache_salt = getattr(request, "cache_salt", None)
        if cache_salt:
            salt = f"{salt or ''}\0{cache_salt}"
        return self._loras.index(lora_name), hashing.salt_hash(salt, lora_name)

    def _hashes_upto(self, st, tokens, n_blocks):
        if len(st.hashes) < n_blocks:
            b = self._block_tokens
            start = len(st.hashes)
            new = hashing.block_hashes(tokens[start * b:n_blocks * b], b, st.salt)
            st.hashes.extend(hashing.chain(new, st.hashes[-1] if st.hashes else None))
        return st.hashes[:n_blocks]

    def _state(self, request):
        st = self._reqs.get(request.request_id)
        if st is None:
            keys = self._req_keys(request)
            if keys is None:
                return None
            st = _ReqState(request=request, ns_id=keys[0], salt=keys[1])
            self._reqs[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        st = self._state(request)
        if st is None:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        # vLLM must compute at least the last prompt token itself.
        max_blocks = (len(prompt) - 1) // self._block_tokens
        cached = self._lookup_cache.get(request.request_id)
        if cached is None:
            hits = 0
            if max_blocks > 0 and self._connect():
                hashes = self._hashes_upto(st, prompt, max_blocks)
                batch = BlockBatch(st.ns_id, hashes, [0] + hashes[:-1], [0] * len(hashes))
                t0 = time.perf_counter()
                try:
                    ud, _ = self._session.submit(kvplane.OP_LOOKUP, st.ns_id,
                                                 _block_op_bytes(batch, batch.block_ids), len(hashes))
                    c = self._session.wait_for(ud, self._timeout_ms)
                    self.stats.lookup_s += time.perf_counter() - t0
                    if c.status == kvplane.OK and c.blocks <= len(hashes):
                        hits = c.blocks
                    else:
                        self._once(("lookup", c.status), logging.WARNING,
                                   "kvplane: LOOKUP failed: %s", kvplane.STATUS_NAMES.get(c.status, c.status))
                except kvplane.KvplaneError as e:
                    self._lost(e)
            self.stats.lookups += 1
            self.stats.lookup_hit_blocks += hits
            st.in_daemon = hits
            cached = self._lookup_cache[request.request_id] = hits
        st.local_tokens = num_computed_tokens
        external = cached * self._block_tokens - num_computed_tokens
        return max(external, 0), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._lookup_cache.pop(request.request_id, None)
        st = self._reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0:
            return
        first = st.local_tokens // self._block_tokens
        count = num_external_tokens // self._block_tokens
        st.load = (first, count)

    def build_connector_meta(self, scheduler_output):
        meta = KvplaneMetadata()
        b = self._block_tokens
        steps = []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            steps.append((st, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            steps.append((st, cached.num_computed_tokens[i]))
        saving = set()  # (namespace, hash) saved this step: requests sharing a prefix
        for st, computed in steps:
            rid = st.request.request_id
            if st.load is not None:
                first, count = st.load
                st.load = None
                hashes = self._hashes_upto(st, st.request.all_token_ids, first + count)
                meta.loads.append(BlockBatch(
                    st.ns_id, hashes[first:first + count],
                    ([hashes[first - 1]] if first else [0]) + hashes[first:first + count - 1],
                    st.block_ids[first:first + count], rid))
                st.moved = True
            end = computed + scheduler_output.num_scheduled_tokens.get(rid, 0)
            full = min(end // b, len(st.block_ids), len(st.request.all_token_ids) // b)
            if full > st.in_daemon:
                hashes = self._hashes_upto(st, st.request.all_token_ids, full)
                first = st.in_daemon
                # Chained hashes: a block saved by another request this step has all its
                # predecessors saved too, so only a leading run can be shared.
                while first < full and (st.ns_id, hashes[first]) in saving:
                    first += 1
                saving.update((st.ns_id, h) for h in hashes[first:full])
                if first < full:
                    meta.saves.append(BlockBatch(
                        st.ns_id, hashes[first:full],
                        ([hashes[first - 1]] if first else [0]) + hashes[first:full - 1],
                        st.block_ids[first:full], rid))
                    st.moved = True
                st.in_daemon = full
        meta.delayed, self._delayed = self._delayed, []
        meta.preempted = sorted(scheduler_output.preempted_req_ids or ())
        return meta

    def request_finished(self, request, block_ids):
        st = self._reqs.pop(request.request_id, None)
        self._lookup_cache.pop(request.request_id, None)
        # Staged saves read the staging copy, never vLLM's pages later. In place, a SAVE
        # (or a LOAD given up on) may still read or write them: the worker reports the
        # request in get_finished once none is in flight, and vLLM frees its blocks then.
        delay = self._pages_in_place and not self._disabled and st is not None and st.moved
        if delay:
            self._delayed.append(request.request_id)
            self.stats.delayed_frees += 1
        return delay, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches):
        if self._disabled:
            return
        mc = self._vllm_config.model_config
        pc = self._vllm_config.parallel_config
        try:
            how = _region_for(kv_caches, self._block_tokens, mc.get_num_kv_heads(pc),
                              mc.get_head_size(), self.stats, self._host_in_place)
        except ValueError as e:
            self._disabled = str(e)
            logger.error("kvplane: %s; the connector is off for this engine", e)
            return
        self._layers = list(kv_caches)
        if isinstance(how, DirectPages):
            self._direct = how
            logger.info("kvplane: registered vLLM's KV in place: %s, %d bytes per block",
                        how.reg.describe(), how.block_bytes)
            self._connect()
            return
        self._geometry = how
        self._kv_u8 = [self._geometry.block_view(t) for t in kv_caches.values()]
        logger.info("kvplane: registered %d KV layers, %d bytes per block, staging %d blocks",
                    len(self._layers), self._geometry.block_bytes, self._staging_blocks)
        self._connect()

    def _reap(self):
        """Free the staging pages of saves the daemon completed."""
        if self._direct is not None and self._direct.detaching:
            self.stats.detached_late += self._direct.reap_detached()
        if self._direct is not None and self._session is not None:
            err = self._direct.reap(self._session, self._once)
            if err is not None:
                self._lost(err)
            return
        if self._session is None or not self._inflight:
            return
        try:
            ready = self._session.take_ready()
        except kvplane.KvplaneError as e:
            self._lost(e)
            return
        for ud, c in ready.items():
            slot = self._inflight.pop(ud, None)
            if slot is None:
                continue
            start, pages, blocks = slot
            self._staging.ranges.release(start, pages)
            if c.status == kvplane.OK:
                self.stats.saved_blocks += blocks
            else:
                self.stats.save_failed_blocks += blocks
                self._once(("save", c.status), logging.WARNING, "kvplane: SAVE failed: %s (detail %d)",
                           kvplane.STATUS_NAMES.get(c.status, c.status), c.detail)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        self._pending_saves = []
        self._copied_layers = set()
        self._awaiting.update(meta.delayed)
        if self._session is None:
            self._connect()
        self._reap()
        if self._direct is not None:
            self._direct_start(meta)
            return
        for batch in meta.loads:
            self._load(batch)
        # Reserve staging pages for this step's saves; save_kv_layer fills them.
        for batch in meta.saves:
            if self._session is None:
                self.stats.save_skipped_blocks += len(batch.hashes)
                continue
            start = self._staging.ranges.alloc(len(batch.hashes))
            if start is None:
                self.stats.save_skipped_blocks += len(batch.hashes)
                self._once(("staging-full",), logging.WARNING,
                           "kvplane: staging region full (%d blocks): saves skipped while the "
                           "daemon catches up (raise staging_blocks)", self._staging_blocks)
                continue
            self._pending_saves.append((batch, start))

    def handle_preemptions(self, kv_connector_metadata):
        """Before the forward pass: vLLM frees a preempted request's blocks without
        asking the connector, and this step may write them. With pages in place, every
        op still in flight is waited for then (held while the daemon lives), and every
        session given up on with ops unanswered until the daemon has closed it (held for
        as long as it does not: vLLM's step waits, logged each op timeout)."""
        if self._direct is None or not kv_connector_metadata.preempted:
            return
        self.stats.preempted_steps += 1
        if self._session is not None and self._direct.ops:
            self._direct_wait_ops()
        if self._direct.detaching:
            self._direct_wait_detached()

    def _direct_wait_detached(self):
        """Blocks until every session given up on with ops unanswered has been ended by
        the daemon (it closed its end): until then those ops may still touch pages that
        vLLM just freed. Logged each op timeout, like a live daemon's unanswered ops."""
        t0 = time.perf_counter()
        next_log = time.monotonic() + self._timeout_ms / 1000
        while True:
            self.stats.detached_late += self._direct.reap_detached()
            if not self._direct.detaching:
                break
            if time.monotonic() >= next_log:
                logger.warning("kvplane: a request was preempted: waiting for the daemon to "
                               "end %d session(s) given up on with ops on vLLM's pages "
                               "(%.1f s so far)", len(self._direct.detaching),
                               time.perf_counter() - t0)
                next_log = time.monotonic() + self._timeout_ms / 1000
            time.sleep(0.001)
        self.stats.save_wait_s += time.perf_counter() - t0

    def _direct_start(self, meta):
        """In place: this step's LOADs into vLLM's pages (waited for here, before the
        forward pass reads them), and its SAVEs kept for wait_for_save."""
        if meta.loads:
            if self._session is None:
                for batch in meta.loads:
                    self._fail_load(batch, 0, "no daemon session")
            else:
                t0 = time.perf_counter()
                results, error = self._direct.load(self._session, meta.loads, self._timeout_ms)
                self.stats.load_wait_s += time.perf_counter() - t0
                for batch, landed, reason in results:
                    self.stats.loaded_blocks += landed
                    if landed < len(batch.hashes):
                        self._fail_load(batch, landed, reason or "not found")
                if error is not None:
                    self._lost(error)
        self._pending_saves = list(meta.saves)
        self._reap()  # completions of other ops that the LOADs' waits read

    def _direct_wait_ops(self):
        """Blocks until no op is in flight on vLLM's pages. A live daemon that does not
        answer is waited for (logged each op timeout): the alternative, writing pages it
        may be reading, could store wrong KV under a block's hash. A session that ends
        releases the wait."""
        t0 = time.perf_counter()
        self.stats.preemption_waits += 1
        while True:
            # Completions read while waiting for others (a LOAD's wait parks them) first.
            self._reap()
            if self._session is None or not self._direct.ops:
                break
            try:
                self._session.collect(self._timeout_ms)
            except kvplane.TimedOut:
                logger.warning("kvplane: a request was preempted: waiting for the daemon to "
                               "finish %d op(s) on vLLM's pages before the forward pass "
                               "(%.1f s so far)", len(self._direct.ops), time.perf_counter() - t0)
                continue
            except kvplane.KvplaneError as e:
                self._lost(e)
                break
        self.stats.save_wait_s += time.perf_counter() - t0

    def _direct_drain(self):
        """Waits (bounded by the op timeout) for the completions of ops that may still touch
        vLLM's pages."""
        deadline = time.monotonic() + self._timeout_ms / 1000
        while True:
            if self._direct.reap(self._session, self._once) is not None:
                return  # the session is over
            if not self._direct.ops or time.monotonic() >= deadline:
                break
            try:
                self._session.collect(ms_until(deadline))
            except kvplane.TimedOut:
                break
            except kvplane.KvplaneError:
                return
        if self._direct.ops:
            logger.error("kvplane: %d op(s) on vLLM's pages unanswered after %d ms; their "
                         "requests keep their blocks until the daemon ends the session",
                         len(self._direct.ops), self._timeout_ms)

    def _load(self, batch):
        n = len(batch.hashes)
        if self._session is None:
            self._fail_load(batch, 0, "no daemon session")
            return
        done = 0
        while done < n:
            chunk = min(n - done, self._staging_blocks)
            start = self._staging.ranges.alloc(chunk)
            if start is None and self._inflight:
                # Saves hold the pages: a load is worth waiting for them (bounded).
                self._drain_saves()
                start = self._staging.ranges.alloc(chunk) if self._session is not None else None
            if start is None:
                self._fail_load(batch, done, "staging region full")
                return
            part = BlockBatch(batch.ns_id, batch.hashes[done:done + chunk],
                              batch.parents[done:done + chunk], batch.block_ids[done:done + chunk])
            t0 = time.perf_counter()
            try:
                ud, _ = self._session.submit(kvplane.OP_LOAD, batch.ns_id,
                                             _block_op_bytes(part, range(start, start + chunk)),
                                             chunk, flags=kvplane.SQE_F_PREFIX_ONLY)
                c = self._session.wait_for(ud, self._timeout_ms)
                self.stats.load_wait_s += time.perf_counter() - t0
            except kvplane.KvplaneError as e:
                self._lost(e)
                self._fail_load(batch, done, str(e))
                return
            # Only what the daemon reports done is used; the rest is recomputed.
            landed = c.blocks if c.status == kvplane.OK and c.blocks <= chunk else 0
            if landed:
                t0 = time.perf_counter()
                vids = torch.tensor(part.block_ids[:landed], dtype=torch.long)
                for layer, kv in enumerate(self._kv_u8):
                    kv.index_copy_(0, vids, self._staging.view[layer, start:start + landed])
                self.stats.copy_s += time.perf_counter() - t0
                self.stats.copied_bytes += landed * self._geometry.block_bytes
                self.stats.loaded_blocks += landed
            self._staging.ranges.release(start, chunk)
            if landed < chunk:
                reason = kvplane.STATUS_NAMES.get(c.status, c.status) if c.status else "not found"
                self._fail_load(batch, done + landed, reason)
                return
            done += chunk

    def _drain_saves(self):
        deadline = time.monotonic() + self._timeout_ms / 1000
        while self._inflight and self._session is not None:
            if time.monotonic() >= deadline:
                self._lost(kvplane.KvplaneError(f"SAVEs not completed in {self._timeout_ms} ms"))
                return
            try:
                self._session.collect(ms_until(deadline))
            except kvplane.KvplaneError as e:
                self._lost(e)
                return
            self._reap()

    def _fail_load(self, batch, first_failed, reason):
        failed = batch.block_ids[first_failed:]
        self._load_errors.update(failed)
        self.stats.load_failed_blocks += len(failed)
        self._once(("load", reason), logging.WARNING,
                   "kvplane: %d block(s) could not be loaded (%s): vLLM recomputes them", len(failed), reason)

    def wait_for_layer_load(self, layer_name):
        return  # loads complete in start_load_kv, before the forward pass

    def _copy_out(self, layer, kv_u8):
        t0 = time.perf_counter()
        for batch, start in self._pending_saves:
            n = len(batch.block_ids)
            vids = torch.tensor(batch.block_ids, dtype=torch.long)
            torch.index_select(kv_u8, 0, vids, out=self._staging.view[layer, start:start + n])
            self.stats.copied_bytes += n * self._geometry.layer_block_bytes
        self.stats.copy_s += time.perf_counter() - t0
        self._copied_layers.add(layer)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        # Layer by layer, as soon as vLLM wrote this layer's KV for the step (staging only:
        # in place, the daemon reads every layer after wait_for_save).
        if not self._pending_saves or self._direct is not None:
            return
        try:
            layer = self._layers.index(layer_name)
        except ValueError:
            return
        self._copy_out(layer, self._kv_u8[layer])

    def wait_for_save(self):
        if not self._pending_saves:
            return
        if self._direct is not None:
            batches, self._pending_saves = self._pending_saves, []
            if self._session is None:
                self.stats.save_skipped_blocks += sum(len(b.hashes) for b in batches)
                return
            t0 = time.perf_counter()
            try:
                if self._direct.save(self._session, batches):
                    self._once(("ring-full",), logging.WARNING,
                               "kvplane: submission ring full: saves skipped while the daemon catches up")
            except kvplane.KvplaneError as e:
                self._lost(e)
            self.stats.save_submit_s += time.perf_counter() - t0
            return
        for layer, kv in enumerate(self._kv_u8):
            if layer not in self._copied_layers:
                self._copy_out(layer, kv)
        # Submit and return: the daemon copies from the staging pages while vLLM runs
        # the next step; _reap frees the pages when the SAVE completes.
        pending, self._pending_saves = self._pending_saves, []
        for i, (batch, start) in enumerate(pending):
            n = len(batch.hashes)
            if self._session is None:
                self.stats.save_skipped_blocks += n
                continue
            t0 = time.perf_counter()
            try:
                ud, _ = self._session.submit(kvplane.OP_SAVE, batch.ns_id,
                                             _block_op_bytes(batch, range(start, start + n)), n)
                self.stats.save_submit_s += time.perf_counter() - t0
            except RingFull:
                self._staging.ranges.release(start, n)
                self.stats.save_skipped_blocks += n
                self._once(("ring-full",), logging.WARNING,
                           "kvplane: submission ring full: saves skipped while the daemon catches up")
                continue
            except kvplane.KvplaneError as e:
                self._lost(e)
                self.stats.save_skipped_blocks += sum(len(b.hashes) for b, _ in pending[i:])
                return
            self._inflight[ud] = (start, n, n)

    def get_finished(self, finished_req_ids):
        """Requests whose blocks the scheduler kept (request_finished said so) and that no
        op touches any more: vLLM may free their blocks now."""
        if not self._awaiting:
            return None, None
        self._reap()
        busy = self._direct.per_request if self._direct is not None else {}
        # vLLM names a finished request once; one still busy is reported in a later step.
        self._finishing |= self._awaiting & set(finished_req_ids)
        done = {r for r in self._finishing if r not in busy}
        self._finishing -= done
        self._awaiting -= done
        self.stats.released_frees += len(done)
        return (done or None), None

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self._session is not None and self._direct is not None and self._direct.ops:
            self._direct_drain()
        if self._session is not None and self._inflight:
            # Let the last saves land before detaching (bounded by the op timeout).
            deadline = time.monotonic() + self._timeout_ms / 1000
            while self._inflight and self._session is not None and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.001)
        logger.info("kvplane: %s connector stats %s", self.role.name.lower(), self.stats.as_dict())
        if self._session is not None:
            self._session.close()
            self._session = None


def _arena_bytes(staging_blocks):
    """Argument arena: SAVEs in flight name at most `staging_blocks` blocks in all (24
    bytes each); four times that keeps the arena ring from wrapping onto a live one."""
    return max(1 << 20, 4 * (staging_blocks * ctypes.sizeof(kvplane.BlockOp) + 256 * 64))


def _region_for(kv_caches, block_tokens, kv_heads, head_size, stats, host_in_place=False):
    """How vLLM's KV tensors reach the daemon: in place (DirectPages) when the daemon can
    map their memory (CUDA tensors; CPU tensors in a kvplane.host_buffer when
    `host_in_place`, the `host_buffer_in_place` option, which the scheduler sees too),
    else staged through a registered memfd (the CPU backend's Geometry). ValueError
    names what does not fit."""
    tensors = list(kv_caches.values())
    if any(t.is_cuda for t in tensors) or (host_in_place and all(_in_host_buffer(t) for t in tensors)):
        if not tensors[0].is_cuda and tensors[0].dim() == 4:
            # The CPU backend's [blocks, heads, tokens, 2 * dim] holds, per (block, head),
            # the K rows then the V rows (host_geometry): [blocks, heads, 2, tokens, dim].
            host_geometry(kv_caches, block_tokens, kv_heads, head_size)  # checks the shape
            tensors = [t.view(t.shape[0], kv_heads, 2, block_tokens, head_size) for t in tensors]
            layout = ("page", "head", "plane", "token", "dim")
        else:
            layout = vllm_device_layout(kv_caches, block_tokens, kv_heads, head_size)
        try:
            return DirectPages(kvplane.register_kv(tensors, layout=layout), stats)
        except kvplane.KvplaneError as e:
            raise ValueError(f"registering vLLM's KV tensors in place: {e}") from e
    return host_geometry(kv_caches, block_tokens, kv_heads, head_size)


def _unsafe_in_place(kv_cache_config):
    """The name of a KV cache spec whose blocks vLLM may free while a request runs
    (sliding window, chunked local attention, ...), or None: in place, only full
    attention and MLA are safe. Unknown (no config given): None."""
    if kv_cache_config is None:
        return None
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        specs = getattr(spec, "kv_cache_specs", None)
        for s in (specs.values() if isinstance(specs, dict) else [spec]):
            if type(s) not in (FullAttentionSpec, MLAAttentionSpec):
                return type(s).__name__
    return None


def _in_host_buffer(t):
    if t.is_cuda:
        return False
    storage = t.untyped_storage()
    base = storage.data_ptr()
    return kvplane.regions.host_buffer_holding(base, base + storage.nbytes()) is not None

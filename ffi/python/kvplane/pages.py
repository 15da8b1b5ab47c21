"""The parts of the vLLM connector that do not need vLLM: one daemon session used from
one thread (`_Session`), block batches, and `DirectPages`, an engine's own KV pages
registered in place and moved by the daemon's kernels. `kvplane.vllm` builds on them; a
GPU machine without vLLM exercises them directly (examples/direct_pages_gpu.py, run by
scripts/gpu-e2e.sh).
"""

import logging
import time
from dataclasses import dataclass

import kvplane

@dataclass
class BlockBatch:
    """Blocks of one request to move: chained hashes, parents and vLLM block ids."""

    ns_id: int
    hashes: list
    parents: list
    block_ids: list
    req_id: str = ""


def _block_op_bytes(batch, engine_pages):
    ops = (kvplane.BlockOp * len(batch.hashes))()
    for i, (h, p, page) in enumerate(zip(batch.hashes, batch.parents, engine_pages)):
        ops[i].hash, ops[i].parent_hash, ops[i].engine_block = h, p, page
    return bytes(ops)


class RingFull(kvplane.KvplaneError):
    """The submission ring is full: back pressure, not a failed session."""


class OpTimeout(kvplane.TimedOut):
    """No completion within the op timeout. The session may be alive and the op still
    running: with direct pages the daemon may yet read or write them."""


class _Session:
    """One daemon session and its queue pair, used from one thread."""

    def __init__(self, socket, namespaces, kv_fd=-1, kv_bytes=0, arena_bytes=1 << 20, regions=None):
        if regions is None:
            regions = [(kvplane.KvRegion.host_memfd(kv_bytes), kv_fd)] if kv_fd >= 0 else []
        self.client = kvplane.Client(socket, namespaces=namespaces, ring_entries=256,
                                     arena_bytes=arena_bytes, regions=regions)
        self.queue = self.client.queue(0)
        self._next = 1
        self._early = {}  # completions read while waiting for another
        self._arena_next = 0

    def submit(self, opcode, ns_id=0, arg=b"", count=0, flags=0, param0=0):
        """Queue one op (its argument copied into the arena) and return its user data.

        The arena is used as a ring of argument slots. The daemon takes submissions of a
        queue pair in order and copies each argument out when it takes it, so a slot can
        be reused once the bytes submitted after it exceed what may still be waiting in
        the ring; the arena is sized for that (`_arena_bytes`).
        """
        arg = bytes(arg)
        size = max(len(arg), 1)
        if self._arena_next + size > self.queue.arena_bytes:
            self._arena_next = 0
        if size > self.queue.arena_bytes:
            raise kvplane.KvplaneError(f"argument of {size} bytes exceeds the arena")
        off = self._arena_next
        self._arena_next = (off + size + 63) & ~63
        if arg:
            self.queue.write_arena(off, arg)
        ud = self._next
        self._next += 1
        sqe = kvplane.Sqe(user_data=ud, opcode=opcode, flags=flags, namespace_id=ns_id,
                          arg_offset=off, arg_len=len(arg), count=count, param0=param0)
        if self.queue.submit([sqe]) != 1:
            raise RingFull("submission ring full")
        return ud, off

    def wait_for(self, ud, timeout_ms):
        deadline = time.monotonic() + timeout_ms / 1000
        while ud not in self._early:
            try:
                if time.monotonic() >= deadline:
                    raise kvplane.TimedOut("deadline passed")
                self.collect(ms_until(deadline))
            except kvplane.TimedOut:
                self.collect()  # what came meanwhile, before giving up
                if ud not in self._early:
                    raise OpTimeout(f"no completion for op {ud} in {timeout_ms} ms") from None
        return self._early.pop(ud)

    def collect(self, timeout_ms=None):
        """Reads the completions that arrived, kept for wait_for and take_ready; with
        `timeout_ms`, waits up to that long for one (TimedOut if none came while the
        daemon lives)."""
        got = self.queue.poll() if timeout_ms is None else self.queue.wait(timeout_ms=timeout_ms)
        for c in got:
            self._early[c.user_data] = c

    def take_ready(self):
        self.collect()
        ready, self._early = self._early, {}
        return ready

    def begin_detach(self):
        """Ends the session but keeps the connection (see `kvplane.Client.begin_detach`)."""
        self.client.begin_detach()

    def daemon_done(self):
        """After `begin_detach`: the daemon ended the session and touches none of its
        memory any more. A connection that cannot be asked counts as not done."""
        try:
            return self.client.daemon_done()
        except kvplane.KvplaneError:
            return False

    def close(self):
        try:
            self.queue.close()
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a dead session must not raise
            pass


# Blocks per direct SAVE or LOAD: with 24-byte block ops, 256 submissions of this size
# fit the argument arena (DIRECT_ARENA_BYTES) with room to spare, so an argument slot is
# never reused while the daemon may not yet have copied it out.
DIRECT_OP_BLOCKS = 256
DIRECT_ARENA_BYTES = 4 << 20
# Interprocess events registered for direct pages on a GPU: SAVEs take the next of
# SAVE_EVENTS in turn (one event re-recorded every step could keep moving ahead of a
# daemon polling it), LOADs share the last.
SAVE_EVENTS = 16


def vllm_device_layout(kv_caches, block_tokens, kv_heads, head_size):
    """The `register_kv` layout of vLLM's per-layer KV tensors on a GPU attention backend:
    [2, blocks, tokens, heads, dim] (FlashAttention; a stride-permuted HND cache has the
    same logical shape), [blocks, 2, tokens, heads, dim] (FlashInfer and others), or
    [blocks, tokens, latent] (MLA). Anything else, or a shape that reads both ways, is
    refused by name (ValueError)."""
    t = next(iter(kv_caches.values()))
    shape = tuple(t.shape)
    for name, x in kv_caches.items():
        if tuple(x.shape) != shape or x.dtype != t.dtype:
            raise ValueError(f"{name}: KV tensor {tuple(x.shape)} {x.dtype}, the first layer's is "
                             f"{shape} {t.dtype}: one layout must describe every layer")
    if len(shape) == 3 and shape[1] == block_tokens:
        return "mla"
    if len(shape) == 5 and shape[2:] == (block_tokens, kv_heads, head_size):
        if shape[0] == 2 and shape[1] == 2:
            raise ValueError(f"KV tensor {shape}: two blocks, so K/V first and blocks first "
                             "read alike; give vLLM more KV cache memory")
        if shape[0] == 2:
            return "vllm"
        if shape[1] == 2:
            return "vllm_blocks_first"
    raise ValueError(f"KV tensor {shape}: not a vLLM layout the connector knows for "
                     f"{block_tokens}-token blocks of {kv_heads} heads x {head_size} "
                     "([2, blocks, tokens, heads, dim], [blocks, 2, tokens, heads, dim] or "
                     "[blocks, tokens, latent])")


class DirectPages:
    """vLLM's own KV pages registered in place (`kvplane.register_kv`): the daemon's gather
    reads them for a SAVE and its scatter writes them for a LOAD; nothing is copied here.
    Used for KV on a GPU (CUDA IPC regions) and for CPU tensors in `kvplane.host_buffer`
    memory.

    The daemon touches the pages after the call that submitted an op returns, so every op
    is tracked, by request, until its completion is read: a finished request with an op in
    flight keeps its blocks (the scheduler delays their release and `releasable` says when
    they may go). An op that times out is not given up: the daemon may still read or write
    the pages, so its request keeps its blocks until the completion arrives or the session
    ends (a daemon marks a session dead only once its copies are back).

    On a GPU nothing waits on the host: a step's SAVEs name an interprocess event recorded
    on vLLM's stream after the forward pass wrote the KV (the daemon polls it before it
    reads), and LOADs name one the daemon records after its copy, which vLLM's stream
    waits on before the forward pass reads the pages.
    """

    def __init__(self, registration, stats):
        self.reg = registration
        self.stats = stats
        lay = registration.layout
        self.block_bytes = (lay.num_layers * lay.kv_planes * lay.page_tokens * lay.kv_heads
                            * lay.head_bytes)
        self.cuda = registration.device != "cpu"
        self._events = None  # SAVE_EVENTS + 1 torch.cuda.Event(interprocess=True)
        self._next_event = 0
        self.ops = {}  # user data -> (kind, request id, blocks)
        self.per_request = {}  # request id -> ops in flight (and unanswered ones)
        self.stuck = {}  # request id -> ops of a session that could not detach, unanswered
        # Sessions that began to detach with ops unanswered, each with {request id: ops}:
        # their requests keep their blocks until the daemon has ended the session. One per
        # session given up on (each holds its socket and segment mapping meanwhile): the
        # daemon's own limits on sessions bound them.
        self.detaching = []

    def _cuda_events(self):
        if self._events is None:
            import torch.cuda

            # Created on the KV's GPU (torch makes an event on the current device).
            with torch.cuda.device(torch.device(self.reg.device)):
                self._events = [torch.cuda.Event(interprocess=True) for _ in range(SAVE_EVENTS + 1)]
                for e in self._events:
                    e.ipc_handle()
        return self._events

    def attach(self, s, timeout_ms):
        """Describe the pages, and on a GPU the events, to a new session. None, or why the
        daemon refused."""
        ud, _ = s.submit(kvplane.OP_ATTACH_LAYOUT, arg=bytes(self.reg.layout))
        c = s.wait_for(ud, timeout_ms)
        if c.status != kvplane.OK:
            return (f"the daemon refused the KV layout ({kvplane.STATUS_NAMES.get(c.status, c.status)}, "
                    f"field {c.detail}); its [blocks] block_bytes must be {self.block_bytes}")
        if self.cuda:
            uuid = bytes(self.reg.regions[0][0].gpu_uuid)
            arg = b"".join(bytes(kvplane.IpcEvent.of(e.ipc_handle(), uuid)) for e in self._cuda_events())
            ud, _ = s.submit(kvplane.OP_REGISTER_EVENTS, arg=arg, count=len(self._events))
            c = s.wait_for(ud, timeout_ms)
            if c.status != kvplane.OK:
                return (f"the daemon refused vLLM's CUDA events "
                        f"({kvplane.STATUS_NAMES.get(c.status, c.status)}, detail {c.detail})")
        return None

    def saving(self):
        """SAVEs in flight."""
        return sum(1 for kind, _, _ in self.ops.values() if kind == "save")

    def _track(self, ud, kind, req_id, blocks):
        self.ops[ud] = (kind, req_id, blocks)
        self.per_request[req_id] = self.per_request.get(req_id, 0) + 1

    def _untrack(self, ud):
        kind, req_id, blocks = self.ops.pop(ud)
        left = self.per_request[req_id] - 1
        if left:
            self.per_request[req_id] = left
        else:
            del self.per_request[req_id]
        return kind, blocks

    def save(self, s, batches):
        """Submit a step's SAVEs of vLLM's pages, after the forward pass that wrote them.
        Returns how many blocks were skipped for a full ring. A session error propagates
        after the blocks not submitted are counted skipped."""
        param0 = kvplane.EVENT_NONE
        if self.cuda and batches:
            k = self._next_event
            self._next_event = (k + 1) % SAVE_EVENTS
            self._cuda_events()[k].record()  # vLLM's current stream, after this step's writes
            param0 = 1 + k
        parts = [p for b in batches for p in _chunks(b, DIRECT_OP_BLOCKS)]
        skipped = 0
        for i, part in enumerate(parts):
            n = len(part.hashes)
            try:
                ud, _ = s.submit(kvplane.OP_SAVE, part.ns_id, _block_op_bytes(part, part.block_ids),
                                 n, param0=param0)
            except RingFull:
                skipped += n
                continue
            except kvplane.KvplaneError:
                self.stats.save_skipped_blocks += skipped + sum(len(p.hashes) for p in parts[i:])
                raise
            self._track(ud, "save", part.req_id, n)
        self.stats.save_skipped_blocks += skipped
        return skipped

    def load(self, s, batches, timeout_ms):
        """LOAD a step's hits straight into vLLM's pages, all submitted before any is
        waited for. Returns [(batch, leading blocks landed, why the rest did not)] and the
        session error that ended the wait, if one did."""
        param0 = 1 + SAVE_EVENTS if self.cuda else kvplane.EVENT_NONE
        submitted = []  # (batch, [(user data or None, part)])
        error = None
        for b in batches:
            subs = []
            for part in _chunks(b, DIRECT_OP_BLOCKS):
                ud = None
                if error is None:
                    try:
                        ud, _ = s.submit(kvplane.OP_LOAD, part.ns_id,
                                         _block_op_bytes(part, part.block_ids), len(part.hashes),
                                         flags=kvplane.SQE_F_PREFIX_ONLY, param0=param0)
                    except RingFull:
                        pass
                    except kvplane.KvplaneError as e:
                        error = e
                subs.append((ud, part))
            submitted.append((b, subs))
        deadline = time.monotonic() + timeout_ms / 1000
        results, any_copied = [], False
        for b, subs in submitted:
            landed, reason = 0, None
            for ud, part in subs:
                if ud is None:
                    reason = reason or ("submission ring full" if error is None else str(error))
                    continue
                c = None
                if error is None:
                    try:
                        c = s.wait_for(ud, ms_until(deadline))
                    except kvplane.TimedOut as e:
                        reason = reason or str(e)
                    except kvplane.KvplaneError as e:
                        error = e
                        reason = reason or str(e)
                if c is None:
                    # Still the daemon's: the request keeps the pages until it answers.
                    self._track(ud, "load", part.req_id, len(part.hashes))
                    continue
                n = len(part.hashes)
                got = c.blocks if c.status == kvplane.OK and c.blocks <= n else 0
                any_copied |= c.blocks > 0  # queued copies, used or not, precede vLLM's writes
                if reason is None:
                    landed += got
                    if got < n:
                        reason = kvplane.STATUS_NAMES.get(c.status, c.status) if c.status else "not found"
            results.append((b, landed, reason))
        if any_copied and self.cuda:
            self._wait_load_event()
        return results, error

    def _wait_load_event(self):
        """vLLM's current stream waits for the daemon's copies into its pages (the daemon
        records the LOAD event after each, in order on its stream)."""
        import torch.cuda

        torch.cuda.current_stream().wait_event(self._cuda_events()[SAVE_EVENTS])

    def reap(self, s, once):
        """Read the completions that arrived; returns the session error if reading failed."""
        if not self.ops:
            return None
        try:
            ready = s.take_ready()
        except kvplane.KvplaneError as e:
            return e
        for ud, c in ready.items():
            if ud not in self.ops:
                continue
            kind, blocks = self._untrack(ud)
            if kind != "save":
                # A LOAD given up on at its timeout. Its completion may come when the copy
                # is only queued: vLLM's stream waits for it before the pages go back.
                if c.blocks and self.cuda:
                    self._wait_load_event()
                continue
            if c.status == kvplane.OK:
                self.stats.saved_blocks += blocks
            else:
                self.stats.save_failed_blocks += blocks
                once(("save", c.status), logging.WARNING, "kvplane: SAVE failed: %s (detail %d)",
                     kvplane.STATUS_NAMES.get(c.status, c.status), c.detail)
        return None

    def release_all(self, session=None):
        """The session is over for us, its ops are forgotten. `session`: given when ops
        went unanswered while the daemon was alive, so it may still touch their pages: the
        session begins to detach, and their requests keep their blocks until the daemon
        has ended it (`reap_detached`), never reused under a late copy. Without it, the
        daemon already ended the session (or every op was answered)."""
        unanswered = {}
        for kind, req_id, blocks in self.ops.values():
            if kind == "save":
                self.stats.save_failed_blocks += blocks
            unanswered[req_id] = unanswered.get(req_id, 0) + 1
        self.ops.clear()
        if session is not None and unanswered:
            try:
                session.begin_detach()
                begun = True
            except kvplane.KvplaneError:
                begun = False  # e.g. the connection is gone already: daemon_done tells
            if session.daemon_done():
                session.close()  # the daemon closed its end: done with the pages
            elif begun:
                self.detaching.append((session, unanswered))
            else:
                # Cannot tell when the daemon is done: the requests keep their blocks.
                for req_id, n in unanswered.items():
                    self.stuck[req_id] = self.stuck.get(req_id, 0) + n
                session.close()
        elif session is not None:
            session.close()
        self._recount()

    def reap_detached(self):
        """Closes the sessions whose daemon has ended them since they began to detach, and
        releases their requests' blocks. Returns how many."""
        still = []
        for session, unanswered in self.detaching:
            if session.daemon_done():
                session.close()
            else:
                still.append((session, unanswered))
        done = len(self.detaching) - len(still)
        if done:
            self.detaching = still
            self._recount()
        return done

    def _recount(self):
        per = dict(self.stuck)
        for _, unanswered in self.detaching:
            for req_id, n in unanswered.items():
                per[req_id] = per.get(req_id, 0) + n
        for _, req_id, _ in self.ops.values():
            per[req_id] = per.get(req_id, 0) + 1
        self.per_request = per


def ms_until(deadline):
    """Milliseconds from now to a time.monotonic() deadline, at least 1."""
    return max(1, int((deadline - time.monotonic()) * 1000))


def _chunks(batch, n):
    for i in range(0, len(batch.hashes), n):
        yield BlockBatch(batch.ns_id, batch.hashes[i:i + n], batch.parents[i:i + n],
                         batch.block_ids[i:i + n], batch.req_id)

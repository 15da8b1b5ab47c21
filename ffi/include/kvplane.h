/*
 * kvplane.h: the kvplane engine ABI. The single definition of everything that lives in
 * a session's shared-memory segment or crosses the daemon/engine boundary.
 *
 * Rust types are generated from this file by bindgen (ffi/src/bindings.rs, checked in;
 * a test regenerates and compares). CUDA kernels include it for kvp_kv_layout and
 * kvp_copy_desc. Everything here is #[repr(C)]-compatible, pointer-free (offsets, not
 * addresses) and fixed-size, so a segment means the same in both processes.
 *
 * Trust: the daemon treats every byte of a segment as hostile. It keeps its own private
 * copy of the segment geometry (the kvp_queue_pair_desc values it wrote) and never
 * reads geometry back; it reads only ring indices and entries, and validates those.
 *
 * Segment layout (all offsets in bytes from the start of the segment):
 *
 *   [0, KVP_HEADER_BYTES)          struct kvp_segment_header
 *   per queue pair, in order:      submission ring (kvp_ring_header + sq_entries * kvp_sqe)
 *                                  completion ring (kvp_ring_header + cq_entries * kvp_cqe)
 *   arena                          argument arena, split into one slice per queue pair
 *
 * Rings are single-producer single-consumer. Indices are free-running uint32 counters;
 * the slot is index & (entries - 1). An entry is published by its own `seq` field, so the
 * consumer polls the entry itself (one cache line per entry crosses between the cores):
 * the entry at index i carries seq = (i / entries + 1) mod 65536, its lap counted from 1
 * (a zeroed ring reads as empty; the entry a slot held one lap earlier carries the
 * previous value; 2^32 / entries is a multiple of 65536, so this holds across the
 * index wrap too). The producer writes every other byte of the entry, then stores `seq`
 * with release; the consumer loads the `seq` of the slot at its `head` with acquire, and
 * owns the entry once it equals the value for `head`. Whatever a caller puts in `seq`
 * is overwritten by the ring code. The client library and the daemon publish a batch last
 * entry first, so a consumer polling its head sees the batch whole.
 *
 * `head` is stored by the consumer, with release, after each batch it takes; the
 * producer keeps its own copy and re-reads `head` only when that copy says the ring has
 * too little room (and checks it: tail - head <= entries), so `head` crosses about once
 * per lap on a busy ring. `tail` is stored by the
 * producer after each batch; only attach reads it (tail - head <= entries), the consumer
 * never polls it.
 *
 * A consumer that wants to sleep sets `consumer_sleeping` (seq_cst), re-checks the `seq`
 * of its next entry, then FUTEX_WAITs on the ring's `doorbell`; a producer, after
 * storing an entry's `seq`, issues a seq_cst fence and only if `consumer_sleeping` is set
 * bumps `doorbell` and FUTEX_WAKEs it. A busy consumer never enters the kernel, and
 * neither does a producer feeding it. The daemon side of a session waits on the
 * session-wide `sq_doorbell` in the header instead of one per submission ring, so one
 * daemon thread can sleep on all queue pairs of a session.
 *
 * The daemon treats a submission whose `seq` is not the expected value as not yet
 * written: it reads nothing at or after it, so a stale or forged `seq` stalls only that
 * engine's own queue pair; it never makes the daemon read outside the ring or loop.
 */
#ifndef KVPLANE_H
#define KVPLANE_H

#if defined(__CUDACC_RTC__)
/* NVRTC ships no C library headers; the fixed-width types this ABI uses (LP64). */
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------- */
/* Constants                                                                           */
/* ---------------------------------------------------------------------------------- */

/* "KVPLANE1" read as a little-endian u64. */
#define KVP_MAGIC 0x31454E414C50564BULL
/* 2: KV memory is a list of regions (host memfds, CUDA IPC and VMM allocations) sent after
 * the attach request, the layout names a region per layer and plane, and ring entries
 * carry their own sequence number (`seq`). */
#define KVP_ABI_VERSION 2u

#define KVP_CACHE_LINE 64u
#define KVP_HEADER_BYTES 4096u
#define KVP_MAX_QUEUE_PAIRS 16u
/* Ring sizes are powers of two in [KVP_MIN_RING_ENTRIES, KVP_MAX_RING_ENTRIES]. */
#define KVP_MIN_RING_ENTRIES 8u
#define KVP_MAX_RING_ENTRIES 65536u
#define KVP_MAX_LAYERS 256u
/* Upper bound on the number of blocks one submission may name. */
#define KVP_MAX_BLOCKS_PER_OP 65536u
#define KVP_MAX_NAMESPACES_PER_SESSION 16u
#define KVP_NAMESPACE_NAME_BYTES 64u
/* KV memory regions one session may register: enough for PyTorch's expandable segments
 * (VMM memory mapped 20 MiB at a time, each chunk a region: 80 GiB of KV in 4,096). */
#define KVP_MAX_KV_REGIONS 4096u
/* Of those, host memfds at most (each is one more mapping in the daemon). */
#define KVP_MAX_HOST_KV_REGIONS 512u
#define KVP_GPU_UUID_BYTES 16u
#define KVP_CUDA_IPC_HANDLE_BYTES 64u
/* IPC events one session registers (KVP_OP_REGISTER_EVENTS). */
#define KVP_MAX_IPC_EVENTS 64u

/* ---------------------------------------------------------------------------------- */
/* Opcodes, flags, status codes, tiers, states                                         */
/* ---------------------------------------------------------------------------------- */

enum kvp_opcode {
    KVP_OP_NOP = 0,             /* no-op: completes with KVP_OK; for liveness and benches */
    KVP_OP_STATS = 1,           /* writes a kvp_stats into the arena at arg_offset */
    KVP_OP_ATTACH_LAYOUT = 2,   /* arg: kvp_kv_layout; binds the engine's KV pool layout */
    KVP_OP_LOOKUP = 3,          /* arg: kvp_block_op[count]; cqe.blocks = leading hits */
    KVP_OP_SAVE = 4,            /* arg: kvp_block_op[count]; engine pages -> daemon */
    KVP_OP_LOAD = 5,            /* arg: kvp_block_op[count]; daemon -> engine pages */
    KVP_OP_PIN = 6,             /* arg: kvp_block_op[count]; take a lease on each block;
                                  * cqe.blocks = leading blocks leased (stops at the first
                                  * not stored); KVP_E_NO_SPACE (detail: the cap) when the
                                  * session holds blocks.max_pinned_blocks_per_session
                                  * distinct blocks pinned (those leased stay leased) */
    KVP_OP_UNPIN = 7,           /* arg: kvp_block_op[count]; release leases */
    KVP_OP_DROP = 8,            /* arg: kvp_block_op[count]; remove blocks */
    KVP_OP_CLEAR_NAMESPACE = 9, /* no arg; removes every block of sqe.namespace_id */
    KVP_OP_REGISTER_EVENTS = 10, /* arg: kvp_ipc_event[count] (count 0..KVP_MAX_IPC_EVENTS):
                                  * the session's CUDA IPC events, replacing those before;
                                  * SAVE and LOAD name them in param0. KVP_E_BUSY past
                                  * 256 opens in a burst, then 64 per second (detail: ms
                                  * until the call would be admitted), and (detail 0, as
                                  * ATTACH_LAYOUT) while another queue pair of the session
                                  * has an operation in flight */
    KVP_OP_COUNT = 11
};

/* kvp_sqe.flags */
#define KVP_SQE_F_NONE 0u
/* LOAD: stop at the first missing block and report the prefix (otherwise fail whole). */
#define KVP_SQE_F_PREFIX_ONLY (1u << 0)
/* SAVE: write through to NVMe now rather than by policy. */
#define KVP_SQE_F_WRITE_THROUGH (1u << 1)
/* SAVE: priority hint; blocks with it are evicted after those without. */
#define KVP_SQE_F_HIGH_PRIORITY (1u << 2)
/* SAVE: also keep the blocks in the daemon's GPU tier (G1: HBM on the engine's GPU), where
 * any engine on that GPU loads them at device bandwidth. The host copy is kept as well;
 * a G1 victim whose only copy is left in G1 is copied down to the host tier when G1
 * needs room. Without a G1 tier, the same as without the
 * flag; the completion's tier is KVP_TIER_HBM when the blocks went to G1. */
#define KVP_SQE_F_KEEP_ON_GPU (1u << 3)
#define KVP_SQE_F_ALL                                                                   \
    (KVP_SQE_F_PREFIX_ONLY | KVP_SQE_F_WRITE_THROUGH | KVP_SQE_F_HIGH_PRIORITY |        \
     KVP_SQE_F_KEEP_ON_GPU)

enum kvp_status {
    KVP_OK = 0,
    KVP_E_BAD_OPCODE = 1,    /* opcode unknown */
    KVP_E_BAD_FLAGS = 2,     /* flags outside KVP_SQE_F_ALL or not valid for the opcode */
    KVP_E_BAD_RANGE = 3,     /* arg_offset/arg_len outside this queue pair's arena slice */
    KVP_E_BAD_ARG = 4,       /* argument contents invalid (count, layout, block ids) */
    KVP_E_NAMESPACE = 5,     /* namespace_id not bound to this session */
    KVP_E_NO_LAYOUT = 6,     /* SAVE/LOAD before ATTACH_LAYOUT */
    KVP_E_NOT_FOUND = 7,     /* a named block is not present */
    KVP_E_NO_SPACE = 8,      /* tier full and nothing evictable, or quota reached */
    KVP_E_IO = 9,            /* NVMe read/write failed */
    KVP_E_CORRUPT = 10,      /* stored data failed its checksum; block dropped */
    KVP_E_BUSY = 11,         /* back pressure: retry later */
    KVP_E_UNSUPPORTED = 12,  /* valid opcode this daemon build cannot serve */
    KVP_E_SHUTDOWN = 13,     /* daemon is shutting down; operation not performed */
    KVP_E_INTERNAL = 14      /* daemon bug; the session stays usable */
};

enum kvp_tier {
    KVP_TIER_NONE = 0,
    KVP_TIER_HBM = 1,  /* G1: device memory (host memory standing in on the host backend) */
    KVP_TIER_HOST = 2, /* G2: pinned host pool */
    KVP_TIER_NVME = 3  /* G3: NVMe slots */
};

/* What a kvp_kv_region names. */
enum kvp_region_kind {
    KVP_REGION_NONE = 0,
    /* Host memory: a memfd (shmem or hugetlbfs) sealed with F_SEAL_SHRINK, sent with the
     * region's message (SCM_RIGHTS). alloc_bytes is its exact size. */
    KVP_REGION_HOST_MEMFD = 1,
    /* GPU memory: the legacy CUDA IPC handle (cudaIpcGetMemHandle / cuIpcGetMemHandle) of
     * a cudaMalloc allocation's base, as PyTorch's caching allocator hands them out;
     * alloc_bytes is the allocation's size (cuMemGetAddressRange). No descriptor. */
    KVP_REGION_CUDA_IPC = 2,
    /* GPU memory: a VMM allocation (cuMemCreate) exported as a POSIX file descriptor
     * (cuMemExportToShareableHandle), sent with the region's message like a memfd;
     * alloc_bytes is the allocation's size (a multiple of its granularity). */
    KVP_REGION_CUDA_VMM_FD = 3
};

enum kvp_session_state {
    KVP_STATE_INIT = 0,
    KVP_STATE_ACTIVE = 1,
    KVP_STATE_CLOSING = 2, /* engine asked to detach */
    KVP_STATE_DEAD = 3     /* daemon ended the session (peer died or protocol violation) */
};

/* ---------------------------------------------------------------------------------- */
/* Ring entries                                                                        */
/* ---------------------------------------------------------------------------------- */

/* SAVE and LOAD param0: 0, or 1 + the index of an event registered with
 * KVP_OP_REGISTER_EVENTS.
 * SAVE: record the event on your stream after the KV is written and submit at once (no
 * host synchronisation): the daemon reads the pages once the event has completed. It
 * polls the event and holds nothing meanwhile (it never queues its own stream behind an
 * engine's event); one not complete within 10 s fails the SAVE with KVP_E_BUSY, detail
 * KVP_DETAIL_BAD_EVENT.
 * LOAD: the daemon records the event after its copy into the engine's pages and, on a
 * daemon without an NVMe tier, completes the LOAD as soon as the copy is queued (blocks,
 * bytes, tiers as final; with an NVMe tier the completion comes when the copy has
 * landed): make your stream wait on the event before reading the pages. A copy that then
 * fails on the GPU ends the session (state DEAD). */
#define KVP_EVENT_NONE 0u
/* cqe.detail of a SAVE or LOAD refused with KVP_E_BAD_ARG because param0 names no
 * registered event. */
#define KVP_DETAIL_BAD_EVENT 0xFFFFFFFFu

/* Submission entry, written by the engine. 64 bytes. */
struct kvp_sqe {
    uint64_t user_data;    /* returned unchanged in the completion */
    uint16_t opcode;       /* enum kvp_opcode */
    uint16_t flags;        /* KVP_SQE_F_* */
    uint32_t namespace_id; /* index into the namespaces bound at attach */
    uint64_t arg_offset;   /* byte offset of the argument, relative to the QP's arena slice */
    uint32_t arg_len;      /* argument bytes */
    uint32_t count;        /* number of elements in the argument (blocks) */
    uint64_t param0;       /* opcode-specific; SAVE and LOAD: KVP_EVENT_* */
    uint64_t param1;       /* opcode-specific */
    uint8_t reserved[14];  /* must be zero */
    uint16_t seq;          /* ring protocol (see the top of this file); set by the ring code */
};

/* Completion entry, written by the daemon. 32 bytes. */
struct kvp_cqe {
    uint64_t user_data; /* from the submission */
    int32_t status;     /* enum kvp_status */
    uint32_t blocks;    /* blocks done (LOOKUP: leading blocks present) */
    uint64_t bytes;     /* bytes moved */
    uint16_t tier;      /* enum kvp_tier: slowest tier served from (LOAD), or stored to (SAVE) */
    uint16_t seq;       /* ring protocol (see the top of this file); set by the ring code */
    uint32_t detail;    /* opcode-specific: index of the failing element, or transfer us */
};

/* ---------------------------------------------------------------------------------- */
/* Rings and the segment header                                                        */
/* ---------------------------------------------------------------------------------- */

/* A uint32 alone on its cache line, so producer and consumer never false-share. */
struct kvp_index_line {
    uint32_t value;
    uint32_t aux;
    uint8_t pad[56];
};

/* Head of every ring; entries follow at offset sizeof(struct kvp_ring_header). */
struct kvp_ring_header {
    struct kvp_index_line tail;     /* written by the producer */
    struct kvp_index_line head;     /* written by the consumer */
    struct kvp_index_line doorbell; /* value: futex word; aux: consumer_sleeping */
    uint32_t entries;               /* informational copy; the daemon keeps its own */
    uint32_t entry_bytes;
    uint8_t pad[56];
};

/* Where one queue pair lives. Written once by the daemon before the engine maps. */
struct kvp_queue_pair_desc {
    uint64_t sq_offset;    /* kvp_ring_header of the submission ring */
    uint64_t cq_offset;    /* kvp_ring_header of the completion ring */
    uint64_t arena_offset; /* this QP's slice of the argument arena */
    uint64_t arena_bytes;
    uint32_t sq_entries;
    uint32_t cq_entries;
    uint8_t pad[24];
};

struct kvp_segment_header {
    uint64_t magic;       /* KVP_MAGIC */
    uint32_t abi_version; /* KVP_ABI_VERSION */
    uint32_t header_bytes;
    uint64_t session_id;
    uint64_t segment_bytes;
    int32_t daemon_pid;
    int32_t engine_pid;
    uint32_t num_queue_pairs;
    uint32_t num_namespaces;
    uint64_t arena_offset; /* whole arena */
    uint64_t arena_bytes;
    /* Cache line 1: written by the daemon only. */
    uint64_t daemon_heartbeat; /* incremented by the daemon about every 100 ms */
    uint32_t state;            /* enum kvp_session_state */
    uint8_t pad1[52];
    /* Cache line 2: written by the engine only. */
    uint64_t engine_heartbeat;
    uint8_t pad2[56];
    /* Cache line 3: the session-wide submission doorbell the daemon sleeps on. */
    struct kvp_index_line sq_doorbell; /* value: futex word; aux: daemon_sleeping */
    /* Cache lines 4..: queue pairs, 64 bytes each. */
    struct kvp_queue_pair_desc queue_pairs[KVP_MAX_QUEUE_PAIRS];
};

/* ---------------------------------------------------------------------------------- */
/* Arguments (placed in the arena)                                                     */
/* ---------------------------------------------------------------------------------- */

/* One block of a LOOKUP/SAVE/LOAD/PIN/UNPIN/DROP batch. 24 bytes. `hash` is the chained
 * sequence hash (NVIDIA Dynamo's scheme); `parent_hash` the previous block's, 0 at the root. */
struct kvp_block_op {
    uint64_t hash;
    uint64_t parent_hash;
    uint32_t engine_block; /* SAVE/LOAD: the engine page holding this block */
    uint8_t tier;          /* out: LOOKUP/LOAD: tier found in (enum kvp_tier) */
    uint8_t status;        /* out: per-block enum kvp_status (0 = ok) */
    uint8_t reserved[2];
};

/* Strided description of an engine's paged KV pool. One descriptor covers vLLM's
 * [2, blocks, tokens, heads, dim] and [blocks, 2, tokens, heads, dim] per-layer tensors,
 * SGLang's token-major pools (separate K and V tensors per layer), TRT-LLM's pool
 * ([blocks, layers, 2, heads, tokens, dim]) and MLA's [blocks, tokens, latent]
 * (kv_planes = 1, kv_heads = 1, head_bytes = latent bytes).
 *
 * Address of (layer l, plane p, page b, token t, head h), relative to the start of the
 * session's KV region plane_region[p][l]:
 *   plane_offset[p][l] + b * page_stride_bytes + t * token_stride_bytes + h * head_stride_bytes
 * and head_bytes contiguous bytes live there; every page of every (layer, plane) must lie
 * inside its region. Per-layer tensors (vLLM, SGLang) are each a region, or share one. The daemon's block is the same data packed
 * as [layers][planes][tokens][heads][head_bytes]. */
struct kvp_kv_layout {
    uint32_t num_layers;  /* 1..KVP_MAX_LAYERS */
    uint32_t kv_planes;   /* 2 (K and V) or 1 (MLA) */
    uint32_t page_tokens; /* tokens per engine page = tokens per daemon block */
    uint32_t kv_heads;
    uint32_t head_bytes;  /* bytes of one head of one token (head_dim * dtype bytes) */
    uint32_t dtype_bytes; /* 1, 2 or 4; informational (checks head_bytes) */
    uint64_t num_pages;   /* engine pages in the pool */
    uint64_t page_stride_bytes;
    uint64_t token_stride_bytes;
    uint64_t head_stride_bytes;
    /* Written by the daemon, in the copy it hands its kernels: there plane_offset is
     * resolved against one window over all of the session's regions and buffer_bytes is
     * that window's length, which every access must fit. What an engine puts here is
     * ignored (each region's length is known from the attach). */
    uint64_t buffer_bytes;
    uint64_t plane_offset[2][KVP_MAX_LAYERS]; /* offset in region plane_region[p][l] */
    uint16_t plane_region[2][KVP_MAX_LAYERS]; /* index into the session's regions */
};

/* One element of a batched copy (kernels: batched block copy). */
struct kvp_copy_desc {
    uint64_t src_offset;
    uint64_t dst_offset;
    uint64_t bytes;
};

/* Written by KVP_OP_STATS into the arena. */
struct kvp_stats {
    uint64_t session_id;
    uint64_t ops_completed;
    uint64_t ops_failed;
    uint64_t blocks_saved;
    uint64_t blocks_loaded;
    uint64_t bytes_saved;
    uint64_t bytes_loaded;
    uint64_t sessions_active;
    uint64_t tier_capacity_blocks[4]; /* indexed by enum kvp_tier */
    uint64_t tier_used_blocks[4];
    uint64_t lookup_hits;
    uint64_t lookup_misses;
    uint32_t backend; /* 0 = host (no GPU), 1 = cuda */
    uint32_t reserved0;
    uint64_t reserved[4];
};

/* ---------------------------------------------------------------------------------- */
/* Attach handshake (over the daemon's Unix socket, not in shared memory)              */
/* ---------------------------------------------------------------------------------- */

/* Engine -> daemon, first message; num_kv_regions kvp_kv_region messages follow it, each
 * with its descriptor (SCM_RIGHTS) when its kind carries one. */
struct kvp_attach_request {
    uint64_t magic;       /* KVP_MAGIC */
    uint32_t abi_version; /* KVP_ABI_VERSION */
    uint32_t num_queue_pairs;
    uint32_t sq_entries;
    uint32_t cq_entries;
    uint64_t arena_bytes; /* whole arena; split evenly across queue pairs */
    uint32_t num_kv_regions; /* 0..KVP_MAX_KV_REGIONS */
    uint32_t reserved0;      /* must be zero */
    uint32_t num_namespaces;
    uint32_t reserved1;      /* must be zero */
    char namespaces[KVP_MAX_NAMESPACES_PER_SESSION][KVP_NAMESPACE_NAME_BYTES];
};

/* One KV memory region of the attaching engine. 128 bytes. The region is
 * [offset_bytes, offset_bytes + len_bytes) of the allocation the handle or descriptor names,
 * which is alloc_bytes long. The daemon checks every field and imports every region before
 * it answers; one bad region refuses that attach only, naming the region. */
struct kvp_kv_region {
    uint32_t kind;         /* enum kvp_region_kind */
    uint32_t flags;        /* KVP_REGION_F_*; other bits zero */
    uint64_t alloc_bytes;
    uint64_t offset_bytes;
    uint64_t len_bytes;    /* > 0 */
    uint8_t gpu_uuid[KVP_GPU_UUID_BYTES]; /* CUDA kinds: the GPU's UUID (cuDeviceGetUuid); host: zero */
    uint8_t handle[KVP_CUDA_IPC_HANDLE_BYTES]; /* KVP_REGION_CUDA_IPC: the IPC handle; else zero */
    uint8_t reserved[16];  /* must be zero */
};

/* kvp_kv_region.flags. CONTINUES: this region's memory follows the previous region's in
 * the engine's address space, so a layer's plane may run from one into the next (an
 * allocator that maps memory in chunks, such as PyTorch's expandable segments: each
 * chunk is a KVP_REGION_CUDA_VMM_FD region of its own). The daemon maps it right after
 * the previous one. Only on a region after another of the same kind (host memfd or CUDA
 * VMM) and GPU, where the previous one reaches the end of its allocation and this one
 * starts at offset 0; a host memfd before it must be a whole number of pages. A layout
 * naming a region may then address up to the end of its run of continuing regions. */
#define KVP_REGION_F_CONTINUES 1u

/* One CUDA IPC event of the engine (KVP_OP_REGISTER_EVENTS): cuIpcGetEventHandle of an
 * event created with CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING on the GPU the
 * session's KV memory is on. 96 bytes. */
struct kvp_ipc_event {
    uint8_t gpu_uuid[KVP_GPU_UUID_BYTES]; /* the event's GPU (cuDeviceGetUuid) */
    uint8_t handle[KVP_CUDA_IPC_HANDLE_BYTES];
    uint8_t reserved[16]; /* must be zero */
};

/* Daemon -> engine reply; a memfd for the segment comes with it (SCM_RIGHTS) when
 * status is KVP_OK. */
struct kvp_attach_reply {
    uint64_t magic;
    uint32_t abi_version;
    int32_t status;         /* enum kvp_status */
    uint64_t session_id;
    uint64_t segment_bytes;
    int32_t daemon_pid;
    uint32_t backend;       /* 0 = host, 1 = cuda */
    char message[96];       /* human-readable reason when status != KVP_OK */
};

/* ---------------------------------------------------------------------------------- */
/* The C client library (libkvplane.so / libkvplane.a)                                 */
/* ---------------------------------------------------------------------------------- */
/* Functions return >= 0 on success and -1 on failure; kvp_last_error() then gives a
 * message for the calling thread. A kvp_client is one attached session; each of its
 * queue pairs is taken once with kvp_client_queue() and used by one thread at a time. */
#if !defined(__CUDACC_RTC__) && !defined(KVP_NO_CLIENT_API)
struct kvp_client;
struct kvp_queue;

/* Attach to the daemon at socket_path, registering num_regions KV memory regions
 * (0: none). region_fds[i] is region i's descriptor for the kinds that carry one
 * (KVP_REGION_HOST_MEMFD, KVP_REGION_CUDA_VMM_FD) and -1 otherwise; the library does not
 * close them. */
int32_t kvp_client_attach(const char *socket_path, uint32_t num_queue_pairs,
                          uint32_t ring_entries, uint64_t arena_bytes,
                          const char *const *namespaces, uint32_t num_namespaces,
                          const struct kvp_kv_region *regions, const int32_t *region_fds,
                          uint32_t num_regions, struct kvp_client **out);
uint64_t kvp_client_session_id(const struct kvp_client *client);
/* Detach: the daemon reclaims the session. Queues taken from it stay valid to free. */
void kvp_client_detach(struct kvp_client *client);
/* Detach but keep the connection, for an engine that gave up on operations the daemon
 * never answered (they may still touch its KV memory); submit nothing afterwards. The
 * daemon ends the session once no copy of it is in flight, then closes its end:
 * kvp_client_daemon_done() returns 1 from then on, 0 before. Some daemons never close it:
 * one that never answers, one whose closer thread is wedged or full, one whose data-plane
 * thread crashed with an operation of the session out. Both return -1 on error
 * (kvp_last_error()). Free the client with kvp_client_detach() afterwards. */
int32_t kvp_client_begin_detach(const struct kvp_client *client);
int32_t kvp_client_daemon_done(const struct kvp_client *client);
/* Take queue pair `index` (each once); NULL on error. */
struct kvp_queue *kvp_client_queue(struct kvp_client *client, uint32_t index);
void kvp_queue_free(struct kvp_queue *queue);
uint64_t kvp_queue_arena_bytes(const struct kvp_queue *queue);
/* Copy into / out of this queue pair's arena slice (offsets relative to the slice). */
int32_t kvp_queue_write_arena(struct kvp_queue *queue, uint64_t offset, const void *data,
                              uint64_t len);
int32_t kvp_queue_read_arena(struct kvp_queue *queue, uint64_t offset, void *out,
                             uint64_t len);
/* Submit up to `count` entries; returns how many were queued (0 when the ring is full). */
int32_t kvp_queue_submit(struct kvp_queue *queue, const struct kvp_sqe *sqes, uint32_t count);
/* Completions ready now (poll) or after waiting up to timeout_ms for at least one.
 * kvp_queue_wait returns KVP_WAIT_TIMED_OUT (negative; kvp_last_error() says so) when
 * none came in time and the daemon was still alive: the operations may still complete
 * (and read or write KV memory they name), unlike after -1, a dead or ended session. */
#define KVP_WAIT_TIMED_OUT (-2)
int32_t kvp_queue_poll(struct kvp_queue *queue, struct kvp_cqe *out, uint32_t max);
int32_t kvp_queue_wait(struct kvp_queue *queue, struct kvp_cqe *out, uint32_t max,
                       uint32_t timeout_ms);
/* Message of the last failure on this thread (valid until the next call). */
const char *kvp_last_error(void);
/* sizeof / offsetof of the header's structs as this library was built, for bindings
 * in other languages to check themselves against: name "kvp_sqe" or "kvp_sqe.count". */
int64_t kvp_abi_layout(const char *name);
#endif

/* ---------------------------------------------------------------------------------- */
/* Layout checks (C11; C++ static_assert)                                              */
/* ---------------------------------------------------------------------------------- */
#if defined(__cplusplus)
#define KVP_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define KVP_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif
#if !defined(__CUDACC_RTC__)
#include <stddef.h>
KVP_STATIC_ASSERT(sizeof(struct kvp_sqe) == 64, "sqe is 64 bytes");
KVP_STATIC_ASSERT(sizeof(struct kvp_cqe) == 32, "cqe is 32 bytes");
KVP_STATIC_ASSERT(offsetof(struct kvp_sqe, seq) == 62, "sqe seq");
KVP_STATIC_ASSERT(offsetof(struct kvp_cqe, seq) == 26, "cqe seq");
KVP_STATIC_ASSERT(sizeof(struct kvp_index_line) == KVP_CACHE_LINE, "index line");
KVP_STATIC_ASSERT(sizeof(struct kvp_ring_header) == 4 * KVP_CACHE_LINE, "ring header");
KVP_STATIC_ASSERT(offsetof(struct kvp_ring_header, head) == KVP_CACHE_LINE, "head line");
KVP_STATIC_ASSERT(offsetof(struct kvp_ring_header, doorbell) == 2 * KVP_CACHE_LINE, "bell");
KVP_STATIC_ASSERT(sizeof(struct kvp_queue_pair_desc) == 64, "qp desc");
KVP_STATIC_ASSERT(offsetof(struct kvp_segment_header, daemon_heartbeat) == 64, "line 1");
KVP_STATIC_ASSERT(offsetof(struct kvp_segment_header, engine_heartbeat) == 128, "line 2");
KVP_STATIC_ASSERT(offsetof(struct kvp_segment_header, sq_doorbell) == 192, "line 3");
KVP_STATIC_ASSERT(offsetof(struct kvp_segment_header, queue_pairs) == 256, "line 4");
KVP_STATIC_ASSERT(sizeof(struct kvp_segment_header) <= KVP_HEADER_BYTES, "header fits");
KVP_STATIC_ASSERT(sizeof(struct kvp_block_op) == 24, "block op");
KVP_STATIC_ASSERT(sizeof(struct kvp_copy_desc) == 24, "copy desc");
KVP_STATIC_ASSERT(sizeof(struct kvp_kv_layout) == 64 + 2 * 10 * KVP_MAX_LAYERS, "layout");
KVP_STATIC_ASSERT(sizeof(struct kvp_kv_region) == 128, "kv region");
KVP_STATIC_ASSERT(sizeof(struct kvp_ipc_event) == 96, "ipc event");
#endif

#ifdef __cplusplus
}
#endif

#endif /* KVPLANE_H */

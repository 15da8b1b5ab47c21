/*
 * paged.cu: gather engine KV pages into contiguous daemon blocks, and scatter back.
 *
 * The engine pool is described by struct kvp_kv_layout (ffi/include/kvplane.h); the
 * daemon block of one page is packed [layers][planes][tokens][heads][head_bytes].
 * One launch moves a whole batch: `pages[i]` is the engine page of daemon block i, which
 * lives at blocks + block_offsets[i] (a tier's slot), or at blocks + i * block_bytes when
 * block_offsets is NULL (one contiguous staging range).
 *
 * Work split, for any grid/block shape:
 *   - blockIdx.y walks the (block i, layer, plane) triples ("plane pages");
 *   - within one, groups of blockDim.x lanes (group = blockIdx.x * blockDim.y + threadIdx.y)
 *     walk the contiguous runs of the engine page, the lanes of a group striding over one
 *     run in 16-byte vectors where aligned.
 * A run is one head (head_bytes), or all heads of a token when heads are adjacent
 * (head_stride == head_bytes), or the whole plane page when tokens are adjacent too; so
 * vLLM's and SGLang's layouts move in runs of kilobytes and TRT-LLM's in head_bytes.
 *
 * The caller validates the layout (every byte any page in [0, num_pages) touches lies
 * inside the engine buffer), the page ids, and the block offsets (each block inside the
 * block buffer; gather destinations pairwise disjoint); the kernel still skips a page id
 * outside [0, num_pages), so a bad id can never turn into an out-of-bounds access.
 */
#include "kvp_compat.h"

struct kvp_runs {
    uint64_t run_bytes;    /* contiguous bytes per run */
    uint32_t head_rows;    /* runs per token: kv_heads, or 1 when heads are adjacent */
    uint32_t rows_per_lp;  /* runs per (layer, plane) of a page */
};

KVP_FN struct kvp_runs kvp_layout_runs(const struct kvp_kv_layout* layout) {
    struct kvp_runs runs;
    uint64_t heads_bytes = (uint64_t)layout->kv_heads * layout->head_bytes;
    bool heads_adjacent = layout->kv_heads == 1u || layout->head_stride_bytes == layout->head_bytes;
    bool tokens_adjacent =
        heads_adjacent && (layout->page_tokens == 1u || layout->token_stride_bytes == heads_bytes);
    if (tokens_adjacent) {
        runs.run_bytes = heads_bytes * layout->page_tokens;
        runs.head_rows = 1u;
        runs.rows_per_lp = 1u;
    } else if (heads_adjacent) {
        runs.run_bytes = heads_bytes;
        runs.head_rows = 1u;
        runs.rows_per_lp = layout->page_tokens;
    } else {
        runs.run_bytes = layout->head_bytes;
        runs.head_rows = layout->kv_heads;
        runs.rows_per_lp = layout->page_tokens * layout->kv_heads;
    }
    return runs;
}

/* to_blocks: true = gather (engine -> blocks), false = scatter (blocks -> engine). */
KVP_FN void kvp_paged_move(unsigned char* engine, unsigned char* blocks,
                           const struct kvp_kv_layout* __restrict__ layout,
                           const uint32_t* __restrict__ pages,
                           const uint64_t* __restrict__ block_offsets, uint32_t num_batch_pages,
                           bool to_blocks) {
    const struct kvp_runs runs = kvp_layout_runs(layout);
    const uint32_t layers = layout->num_layers;
    const uint32_t planes = layout->kv_planes;
    const uint32_t lp_per_page = layers * planes;
    const uint64_t block_bytes = runs.run_bytes * runs.rows_per_lp * lp_per_page;
    const uint64_t plane_pages = (uint64_t)num_batch_pages * lp_per_page;
    const uint32_t lane = threadIdx.x;
    const uint32_t lanes = blockDim.x;
    const uint32_t group = blockIdx.x * blockDim.y + threadIdx.y;
    const uint32_t groups = gridDim.x * blockDim.y;

    for (uint64_t q = blockIdx.y; q < plane_pages; q += gridDim.y) {
        const uint32_t i = (uint32_t)(q / lp_per_page);
        const uint32_t lp = (uint32_t)(q - (uint64_t)i * lp_per_page);
        const uint32_t layer = lp / planes;
        const uint32_t plane = lp - layer * planes;
        const uint64_t page = pages[i];
        if (page >= layout->num_pages) continue; /* defence in depth: callers reject these */
        unsigned char* engine_base =
            engine + layout->plane_offset[plane][layer] + page * layout->page_stride_bytes;
        const uint64_t block_at = block_offsets ? block_offsets[i] : (uint64_t)i * block_bytes;
        unsigned char* block_base =
            blocks + block_at + (uint64_t)lp * runs.rows_per_lp * runs.run_bytes;
        for (uint32_t r = group; r < runs.rows_per_lp; r += groups) {
            const uint32_t token = r / runs.head_rows;
            const uint32_t head = r - token * runs.head_rows;
            unsigned char* e = engine_base + (uint64_t)token * layout->token_stride_bytes +
                               (uint64_t)head * layout->head_stride_bytes;
            unsigned char* b = block_base + (uint64_t)r * runs.run_bytes;
            if (to_blocks) {
                kvp_copy_run(b, e, runs.run_bytes, lane, lanes);
            } else {
                kvp_copy_run(e, b, runs.run_bytes, lane, lanes);
            }
        }
    }
}

/* block_offsets: NULL = contiguous blocks (block i at i * block_bytes). */
extern "C" __global__ void kvp_paged_gather(const unsigned char* engine, unsigned char* blocks,
                                            const struct kvp_kv_layout* layout,
                                            const uint32_t* pages, const uint64_t* block_offsets,
                                            uint32_t num_batch_pages) {
    kvp_paged_move((unsigned char*)engine, blocks, layout, pages, block_offsets, num_batch_pages,
                   true);
}

extern "C" __global__ void kvp_paged_scatter(unsigned char* engine, const unsigned char* blocks,
                                             const struct kvp_kv_layout* layout,
                                             const uint32_t* pages, const uint64_t* block_offsets,
                                             uint32_t num_batch_pages) {
    kvp_paged_move(engine, (unsigned char*)blocks, layout, pages, block_offsets, num_batch_pages,
                   false);
}

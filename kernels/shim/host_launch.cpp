/*
 * host_launch.cpp: the host backend's "device". Compiles the kernel sources with the
 * system C++ compiler (build.rs, through the cc crate) and runs a launch as plain loops.
 *
 * kvp_host_launch_* run blocks [block_begin, block_end) of a grid_x * grid_y grid (linear
 * index = y * grid_x + x) with block_x * block_y threads each, thread by thread. The Rust
 * side splits a launch's blocks across OS threads (or runs a 1x1 grid on one thread,
 * where every kernel's grid-stride loop covers the whole batch in one call).
 */
#include "kvp_host_shim.h"

thread_local kvp_dim3 gridDim = {1, 1, 1};
thread_local kvp_dim3 blockDim = {1, 1, 1};
thread_local kvp_dim3 blockIdx = {0, 0, 0};
thread_local kvp_dim3 threadIdx = {0, 0, 0};

#include "paged.cu"
#include "copy.cu"
#include "checksum.cu"

/* Must match `HostGrid` in kernels/src/host.rs. */
struct kvp_host_grid {
    uint32_t grid_x, grid_y, block_x, block_y;
    uint64_t block_begin, block_end;
};

template <typename Kernel>
static void kvp_host_run(const kvp_host_grid* g, Kernel kernel) {
    gridDim = kvp_dim3{g->grid_x, g->grid_y, 1};
    blockDim = kvp_dim3{g->block_x, g->block_y, 1};
    for (uint64_t b = g->block_begin; b < g->block_end; ++b) {
        blockIdx = kvp_dim3{(unsigned int)(b % g->grid_x), (unsigned int)(b / g->grid_x), 0};
        for (unsigned int ty = 0; ty < g->block_y; ++ty) {
            for (unsigned int tx = 0; tx < g->block_x; ++tx) {
                threadIdx = kvp_dim3{tx, ty, 0};
                kernel();
            }
        }
    }
}

extern "C" {

void kvp_host_paged_gather(const kvp_host_grid* g, const unsigned char* engine,
                           unsigned char* blocks, const struct kvp_kv_layout* layout,
                           const uint32_t* pages, uint32_t num_batch_pages) {
    kvp_host_run(g, [&] { kvp_paged_gather(engine, blocks, layout, pages, num_batch_pages); });
}

void kvp_host_paged_scatter(const kvp_host_grid* g, unsigned char* engine,
                            const unsigned char* blocks, const struct kvp_kv_layout* layout,
                            const uint32_t* pages, uint32_t num_batch_pages) {
    kvp_host_run(g, [&] { kvp_paged_scatter(engine, blocks, layout, pages, num_batch_pages); });
}

void kvp_host_copy_batch(const kvp_host_grid* g, const unsigned char* src, unsigned char* dst,
                         const struct kvp_copy_desc* descs, uint32_t num_descs) {
    kvp_host_run(g, [&] { kvp_copy_batch(src, dst, descs, num_descs); });
}

void kvp_host_checksum_partial(const kvp_host_grid* g, const unsigned char* base,
                               const struct kvp_copy_desc* descs, uint32_t num_descs,
                               unsigned long long* sums) {
    kvp_host_run(g, [&] { kvp_checksum_partial(base, descs, num_descs, sums); });
}

void kvp_host_checksum_finalize(const kvp_host_grid* g, const struct kvp_copy_desc* descs,
                                uint32_t num_descs, unsigned long long* sums) {
    kvp_host_run(g, [&] { kvp_checksum_finalize(descs, num_descs, sums); });
}

} /* extern "C" */

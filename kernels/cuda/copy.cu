/*
 * copy.cu: batched block copy. One launch copies many (src_offset, dst_offset, bytes)
 * triples (struct kvp_copy_desc) between two base addresses: HBM to HBM, mapped pinned
 * host memory to HBM, or a peer GPU's memory over NVLink; the kernel does not care which.
 *
 * blockIdx.y walks the descriptors; each descriptor is cut into gridDim.x * blockDim.y
 * chunks (multiples of 16 bytes, so chunk starts keep the source/destination alignment)
 * and a group of blockDim.x lanes copies one chunk. So a batch of one large block still
 * spreads over the whole grid, and a batch of thousands of small ones runs one per row.
 * Ranges are validated by the caller; source and destination ranges must not overlap.
 */
#include "kvp_compat.h"

extern "C" __global__ void kvp_copy_batch(const unsigned char* src, unsigned char* dst,
                                          const struct kvp_copy_desc* descs, uint32_t num_descs) {
    const uint32_t lane = threadIdx.x;
    const uint32_t lanes = blockDim.x;
    const uint64_t group = (uint64_t)blockIdx.x * blockDim.y + threadIdx.y;
    const uint64_t groups = (uint64_t)gridDim.x * blockDim.y;
    for (uint64_t d = blockIdx.y; d < num_descs; d += gridDim.y) {
        const struct kvp_copy_desc desc = descs[d];
        uint64_t chunk = (desc.bytes + groups - 1) / groups;
        chunk = (chunk + 15u) & ~(uint64_t)15u;
        const uint64_t begin = group * chunk;
        if (begin >= desc.bytes) continue;
        uint64_t len = desc.bytes - begin;
        if (len > chunk) len = chunk;
        kvp_copy_run(dst + desc.dst_offset + begin, src + desc.src_offset + begin, len, lane, lanes);
    }
}

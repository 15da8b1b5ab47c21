/*
 * checksum.cu: "kvp checksum v1" (kernels/src/checksum.rs) of many blocks in one launch,
 * to verify a transfer on the device that received it.
 *
 * Word w (little-endian u64; a short tail zero-extended) contributes
 * mix64(word ^ w * GOLDEN); contributions are summed with wrapping addition, which is
 * order-free, so every thread sums a strided subset and adds it to sums[d] atomically.
 * kvp_checksum_finalize then applies mix64(sum ^ length). `sums` must be zeroed before
 * kvp_checksum_partial runs. Descriptor i covers [src_offset, src_offset + bytes) of
 * `base` (dst_offset is ignored).
 */
#include "kvp_compat.h"

KVP_FN uint64_t kvp_load_word(const unsigned char* p, uint64_t word, uint64_t bytes, bool aligned) {
    const uint64_t at = word * 8u;
    if (at + 8u <= bytes && aligned) return ((const unsigned long long*)p)[word];
    uint64_t avail = bytes - at;
    if (avail > 8u) avail = 8u;
    uint64_t value = 0;
    for (uint64_t k = 0; k < avail; ++k) value |= (uint64_t)p[at + k] << (8u * k);
    return value;
}

extern "C" __global__ void kvp_checksum_partial(const unsigned char* base,
                                                const struct kvp_copy_desc* descs,
                                                uint32_t num_descs, unsigned long long* sums) {
    const uint64_t threads_per_block = (uint64_t)blockDim.x * blockDim.y;
    const uint64_t tid = (uint64_t)blockIdx.x * threads_per_block +
                         (uint64_t)threadIdx.y * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * threads_per_block;
    for (uint64_t d = blockIdx.y; d < num_descs; d += gridDim.y) {
        const uint64_t bytes = descs[d].bytes;
        const unsigned char* p = base + descs[d].src_offset;
        const bool aligned = ((unsigned long long)p & 7u) == 0;
        const uint64_t words = (bytes + 7u) / 8u;
        uint64_t acc = 0;
        for (uint64_t w = tid; w < words; w += nthreads) {
            acc += kvp_mix64(kvp_load_word(p, w, bytes, aligned) ^ (w * KVP_CHECKSUM_GOLDEN));
        }
        if (tid < words) atomicAdd(&sums[d], (unsigned long long)acc);
    }
}

extern "C" __global__ void kvp_checksum_finalize(const struct kvp_copy_desc* descs,
                                                 uint32_t num_descs, unsigned long long* sums) {
    const uint64_t threads_per_block = (uint64_t)blockDim.x * blockDim.y;
    const uint64_t tid = ((uint64_t)blockIdx.y * gridDim.x + blockIdx.x) * threads_per_block +
                         (uint64_t)threadIdx.y * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * gridDim.y * threads_per_block;
    for (uint64_t d = tid; d < num_descs; d += nthreads) {
        sums[d] = kvp_mix64(sums[d] ^ descs[d].bytes);
    }
}

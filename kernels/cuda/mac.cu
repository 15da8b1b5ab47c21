/*
 * mac.cu: the NVMe slot data MAC (keyed BLAKE3, 32 bytes; daemon/src/tier/nvme/key.rs)
 * of many blocks in one pass, so a block that reaches device memory without the CPU
 * (GPUDirect Storage into G1) can be authenticated where it landed.
 *
 * BLAKE3 splits its input into 1 KiB chunks, hashes each chunk on its own (16 blocks of
 * 64 bytes, the chunk index as counter) and merges the chaining values pairwise up a
 * tree whose left subtrees are full. Merging each level's nodes pairwise from the left,
 * an odd last node carried up unchanged, builds exactly that tree, so:
 *
 *   kvp_mac_chunks:   one thread per chunk writes its chaining value (8 words) at
 *                     `cvs + dst_offset + 32 * chunk`;
 *   kvp_mac_parents:  launched once per level (level 0, 1, ...) while any descriptor has
 *                     two or more nodes left; the pair (2k, 2k + 1) of level L, at chunk
 *                     positions 2k * 2^L and (2k + 1) * 2^L, is merged into the first.
 *
 * Pairs of one level touch disjoint positions, so a level needs no synchronisation; the
 * launches of one stream run in order. The merge that leaves one node is the root (the
 * ROOT flag; a one-chunk input gets it on its last block instead), and its chaining
 * value is the 32-byte MAC, written to `roots + 32 * i` (packed, so the results come
 * back in one copy) as well as left at `cvs + dst_offset`. Descriptor i covers
 * [src_offset, src_offset + bytes) of `base`; dst_offset (a multiple of 32) reserves
 * 32 * max(1, ceil(bytes / 1024)) bytes of `cvs` for it. `key` is the 32-byte key as 8
 * little-endian words.
 */
#include "kvp_compat.h"

#define KVP_B3_CHUNK_BYTES 1024u
#define KVP_B3_BLOCK_BYTES 64u
#define KVP_B3_CHUNK_START 1u
#define KVP_B3_CHUNK_END 2u
#define KVP_B3_PARENT 4u
#define KVP_B3_ROOT 8u
#define KVP_B3_KEYED_HASH 16u

KVP_FN uint32_t kvp_rotr32(uint32_t x, uint32_t n) { return (x >> n) | (x << (32u - n)); }

KVP_FN void kvp_b3_g(uint32_t* v, int a, int b, int c, int d, uint32_t x, uint32_t y) {
    v[a] = v[a] + v[b] + x;
    v[d] = kvp_rotr32(v[d] ^ v[a], 16u);
    v[c] = v[c] + v[d];
    v[b] = kvp_rotr32(v[b] ^ v[c], 12u);
    v[a] = v[a] + v[b] + y;
    v[d] = kvp_rotr32(v[d] ^ v[a], 8u);
    v[c] = v[c] + v[d];
    v[b] = kvp_rotr32(v[b] ^ v[c], 7u);
}

/* BLAKE3's compression function; `out` (may be `cv`) gets the 8-word chaining value. */
KVP_FN void kvp_b3_compress(const uint32_t* cv, const uint32_t* block, uint64_t counter,
                            uint32_t block_len, uint32_t flags, uint32_t* out) {
    uint32_t v[16] = {cv[0],       cv[1],       cv[2],       cv[3],
                      cv[4],       cv[5],       cv[6],       cv[7],
                      0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                      (uint32_t)counter, (uint32_t)(counter >> 32), block_len, flags};
    uint32_t m[16];
    KVP_UNROLL
    for (int i = 0; i < 16; ++i) m[i] = block[i];
    KVP_UNROLL
    for (int round = 0; round < 7; ++round) {
        kvp_b3_g(v, 0, 4, 8, 12, m[0], m[1]);
        kvp_b3_g(v, 1, 5, 9, 13, m[2], m[3]);
        kvp_b3_g(v, 2, 6, 10, 14, m[4], m[5]);
        kvp_b3_g(v, 3, 7, 11, 15, m[6], m[7]);
        kvp_b3_g(v, 0, 5, 10, 15, m[8], m[9]);
        kvp_b3_g(v, 1, 6, 11, 12, m[10], m[11]);
        kvp_b3_g(v, 2, 7, 8, 13, m[12], m[13]);
        kvp_b3_g(v, 3, 4, 9, 14, m[14], m[15]);
        /* The message permutation [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]. */
        const uint32_t p[16] = {m[2], m[6],  m[3],  m[10], m[7],  m[0],  m[4],  m[13],
                                m[1], m[11], m[12], m[5],  m[9],  m[14], m[15], m[8]};
        KVP_UNROLL
        for (int i = 0; i < 16; ++i) m[i] = p[i];
    }
    KVP_UNROLL
    for (int i = 0; i < 8; ++i) out[i] = v[i] ^ v[i + 8];
}

/* Chunks of a descriptor of `bytes` (an empty input is one empty chunk). */
KVP_FN uint64_t kvp_b3_chunks(uint64_t bytes) {
    return bytes == 0 ? 1u : (bytes + KVP_B3_CHUNK_BYTES - 1u) / KVP_B3_CHUNK_BYTES;
}

/* Loads `len` (<= 64) bytes at `p` as 16 little-endian words, zero-padded. Word by
 * word (constant indices into `block`, so it stays in registers). */
KVP_FN void kvp_b3_load_block(const unsigned char* p, uint32_t len, uint32_t* block) {
    if (len == KVP_B3_BLOCK_BYTES && ((unsigned long long)p & 3u) == 0) {
        const uint32_t* w = (const uint32_t*)p;
        KVP_UNROLL
        for (int i = 0; i < 16; ++i) block[i] = w[i];
        return;
    }
    KVP_UNROLL
    for (int i = 0; i < 16; ++i) {
        uint32_t word = 0;
        for (uint32_t k = 0; k < 4u; ++k) {
            const uint32_t at = 4u * (uint32_t)i + k;
            if (at < len) word |= (uint32_t)p[at] << (8u * k);
        }
        block[i] = word;
    }
}

extern "C" __global__ void kvp_mac_chunks(const unsigned char* base,
                                          const struct kvp_copy_desc* descs, uint32_t num_descs,
                                          const uint32_t* key, unsigned char* cvs,
                                          unsigned char* roots) {
    const uint64_t threads_per_block = (uint64_t)blockDim.x * blockDim.y;
    const uint64_t tid = (uint64_t)blockIdx.x * threads_per_block +
                         (uint64_t)threadIdx.y * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * threads_per_block;
    for (uint64_t d = blockIdx.y; d < num_descs; d += gridDim.y) {
        const uint64_t bytes = descs[d].bytes;
        const unsigned char* p = base + descs[d].src_offset;
        const uint64_t chunks = kvp_b3_chunks(bytes);
        uint32_t* out = (uint32_t*)(cvs + descs[d].dst_offset);
        for (uint64_t c = tid; c < chunks; c += nthreads) {
            const uint64_t start = c * KVP_B3_CHUNK_BYTES;
            const uint64_t left = bytes - start;
            const uint32_t len = left < KVP_B3_CHUNK_BYTES ? (uint32_t)left : KVP_B3_CHUNK_BYTES;
            const uint32_t blocks = len == 0 ? 1u : (len + KVP_B3_BLOCK_BYTES - 1u) / KVP_B3_BLOCK_BYTES;
            uint32_t cv[8];
            KVP_UNROLL
            for (int i = 0; i < 8; ++i) cv[i] = key[i];
            for (uint32_t b = 0; b < blocks; ++b) {
                const uint32_t at = b * KVP_B3_BLOCK_BYTES;
                const uint32_t block_len = len - at < KVP_B3_BLOCK_BYTES ? len - at : KVP_B3_BLOCK_BYTES;
                uint32_t block[16];
                kvp_b3_load_block(p + start + at, block_len, block);
                uint32_t flags = KVP_B3_KEYED_HASH;
                if (b == 0) flags |= KVP_B3_CHUNK_START;
                if (b + 1u == blocks) {
                    flags |= KVP_B3_CHUNK_END;
                    if (chunks == 1u) flags |= KVP_B3_ROOT;
                }
                kvp_b3_compress(cv, block, c, block_len, flags, cv);
            }
            KVP_UNROLL
            for (int i = 0; i < 8; ++i) out[c * 8u + i] = cv[i];
            if (chunks == 1u) {
                uint32_t* root = (uint32_t*)(roots + d * 32u);
                KVP_UNROLL
                for (int i = 0; i < 8; ++i) root[i] = cv[i];
            }
        }
    }
}

extern "C" __global__ void kvp_mac_parents(const struct kvp_copy_desc* descs, uint32_t num_descs,
                                           const uint32_t* key, unsigned char* cvs,
                                           unsigned char* roots, uint32_t level) {
    const uint64_t threads_per_block = (uint64_t)blockDim.x * blockDim.y;
    const uint64_t tid = (uint64_t)blockIdx.x * threads_per_block +
                         (uint64_t)threadIdx.y * blockDim.x + threadIdx.x;
    const uint64_t nthreads = (uint64_t)gridDim.x * threads_per_block;
    for (uint64_t d = blockIdx.y; d < num_descs; d += gridDim.y) {
        const uint64_t chunks = kvp_b3_chunks(descs[d].bytes);
        if (level >= 64u) continue;
        /* Nodes left at this level: ceil(chunks / 2^level). */
        const uint64_t nodes = ((chunks - 1u) >> level) + 1u;
        if (nodes < 2u) continue;
        const uint64_t stride = (uint64_t)1u << level;
        uint32_t* cv = (uint32_t*)(cvs + descs[d].dst_offset);
        const uint32_t flags = KVP_B3_KEYED_HASH | KVP_B3_PARENT | (nodes == 2u ? KVP_B3_ROOT : 0u);
        for (uint64_t k = tid; k < nodes / 2u; k += nthreads) {
            uint32_t* left = cv + 2u * k * stride * 8u;
            const uint32_t* right = cv + (2u * k + 1u) * stride * 8u;
            uint32_t block[16];
            KVP_UNROLL
            for (int i = 0; i < 8; ++i) {
                block[i] = left[i];
                block[i + 8] = right[i];
            }
            kvp_b3_compress(key, block, 0u, KVP_B3_BLOCK_BYTES, flags, left);
            if (nodes == 2u) {
                uint32_t* root = (uint32_t*)(roots + d * 32u);
                KVP_UNROLL
                for (int i = 0; i < 8; ++i) root[i] = left[i];
            }
        }
    }
}

/*
 * kvp_compat.h: what every kvplane kernel source includes first.
 *
 * Under nvcc/NVRTC (__CUDACC__ / __CUDACC_RTC__) it adds nothing but small device
 * helpers. Under a host C++ compiler it pulls in the host shim (kernels/shim/), which
 * gives __global__, thread/block indices, uint4 and atomicAdd meaning on the CPU, so the
 * same .cu text runs as plain loops in the host backend and in the tests.
 *
 * Kernel rules that make the shim valid: no __shared__, no __syncthreads, no warp
 * intrinsics; every kernel is correct for any grid and block shape (grid-stride loops), so
 * the host may run one thread per block, in any order, on any number of OS threads.
 */
#ifndef KVP_COMPAT_H
#define KVP_COMPAT_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define KVP_DEVICE_BUILD 1
#else
#include "kvp_host_shim.h"
#endif

#include "kvplane.h"

#define KVP_FN static __device__ __forceinline__

/* Fully unroll the next loop on the GPU, so small arrays indexed by its counter stay in
 * registers (a dynamic index would put them in local memory); the host compiler decides
 * for itself. */
#ifdef KVP_DEVICE_BUILD
#define KVP_UNROLL _Pragma("unroll")
#else
#define KVP_UNROLL
#endif

/* Widest access width (16, 8, 4, 2 or 1 bytes) that divides every argument: the copy
 * loops pick it per contiguous run, so aligned runs move as 16-byte vectors and
 * unaligned ones still copy exactly. */
KVP_FN uint32_t kvp_access_width(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t bits = a | b | c;
    if ((bits & 15u) == 0) return 16u;
    if ((bits & 7u) == 0) return 8u;
    if ((bits & 3u) == 0) return 4u;
    if ((bits & 1u) == 0) return 2u;
    return 1u;
}

/* Copy `bytes` from src to dst, lanes [lane, lane + lanes, ...] of a group sharing the
 * work. The body moves in the widest access the two addresses allow; the last
 * `bytes % width` bytes go one at a time, so an odd length never narrows the body. */
KVP_FN void kvp_copy_run(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                         uint64_t bytes, uint32_t lane, uint32_t lanes) {
    uint32_t width = kvp_access_width((unsigned long long)dst, (unsigned long long)src, 0);
    uint64_t body = bytes;
    if (width == 16u) {
        uint4* d = (uint4*)dst;
        const uint4* s = (const uint4*)src;
        uint64_t n = bytes >> 4;
        for (uint64_t i = lane; i < n; i += lanes) d[i] = s[i];
        body = n << 4;
    } else if (width == 8u) {
        unsigned long long* d = (unsigned long long*)dst;
        const unsigned long long* s = (const unsigned long long*)src;
        uint64_t n = bytes >> 3;
        for (uint64_t i = lane; i < n; i += lanes) d[i] = s[i];
        body = n << 3;
    } else if (width == 4u) {
        unsigned int* d = (unsigned int*)dst;
        const unsigned int* s = (const unsigned int*)src;
        uint64_t n = bytes >> 2;
        for (uint64_t i = lane; i < n; i += lanes) d[i] = s[i];
        body = n << 2;
    } else if (width == 2u) {
        unsigned short* d = (unsigned short*)dst;
        const unsigned short* s = (const unsigned short*)src;
        uint64_t n = bytes >> 1;
        for (uint64_t i = lane; i < n; i += lanes) d[i] = s[i];
        body = n << 1;
    } else {
        body = 0;
    }
    for (uint64_t i = body + lane; i < bytes; i += lanes) dst[i] = src[i];
}

/* splitmix64's finaliser; must equal kernels/src/checksum.rs `mix64`. */
KVP_FN uint64_t kvp_mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

#define KVP_CHECKSUM_GOLDEN 0x9E3779B97F4A7C15ull

#endif /* KVP_COMPAT_H */

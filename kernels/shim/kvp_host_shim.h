/*
 * kvp_host_shim.h: CUDA's kernel-language surface for a host C++ compiler, just enough
 * for kvplane's kernels (see kernels/cuda/kvp_compat.h for the rules they follow).
 *
 * A kernel becomes a plain function. The launch loop (host_launch.cpp) sets the
 * thread-local gridDim/blockDim/blockIdx/threadIdx and calls it once per (block, thread);
 * kernels use grid-stride loops, so a 1x1 launch does all the work in one call and the
 * copy loops compile to ordinary vectorised loops.
 */
#ifndef KVP_HOST_SHIM_H
#define KVP_HOST_SHIM_H

#include <stdint.h>
#include <stddef.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct kvp_dim3 {
    unsigned int x, y, z;
};

/* 16-byte vector, 16-byte aligned like CUDA's uint4, so a copy of one is one SSE/NEON move. */
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};

extern thread_local kvp_dim3 gridDim;
extern thread_local kvp_dim3 blockDim;
extern thread_local kvp_dim3 blockIdx;
extern thread_local kvp_dim3 threadIdx;

/* Host launches may run blocks on several OS threads: atomics are real atomics. */
static inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

#endif /* KVP_HOST_SHIM_H */

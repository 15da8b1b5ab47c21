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

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

thread_local kvp_dim3 gridDim = {1, 1, 1};
thread_local kvp_dim3 blockDim = {1, 1, 1};
thread_local kvp_dim3 blockIdx = {0, 0, 0};
thread_local kvp_dim3 threadIdx = {0, 0, 0};

#include "paged.cu"
#include "copy.cu"
#include "checksum.cu"
#include "mac.cu"

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

/*
 * Fault guard for memory another process provides (an engine's KV buffer). The engine can
 * make that memory's backing vanish (a hugetlb page it punched out while the pool is
 * empty, a hardware-poisoned page, anything the attach checks missed); touching it then
 * raises SIGBUS (or SIGSEGV) in the daemon. A guarded launch registers the buffer's
 * address range and a recovery point in thread-local storage; the handler recovers only
 * when the faulting address lies inside the range registered by the faulting thread, so
 * the launch returns the signal instead of killing every tenant's daemon. Any other fault
 * goes on to the handler that was installed before (Rust's stack-overflow reporter) or
 * the default action, exactly as if this handler did not exist.
 *
 * The longjmp only unwinds the launch loops below (plain data, no destructors, no locks).
 */
struct kvp_fault_guard {
    sigjmp_buf env;
    uintptr_t lo, hi;
    volatile sig_atomic_t active;
    volatile uintptr_t fault_addr;
    volatile int fault_sig;
};

static thread_local kvp_fault_guard kvp_guard;
static struct sigaction kvp_prev_bus, kvp_prev_segv;
static pthread_once_t kvp_guard_once = PTHREAD_ONCE_INIT;
static int kvp_guard_error = 0;

static void kvp_fault_handler(int sig, siginfo_t* info, void* uctx) {
    kvp_fault_guard* g = &kvp_guard;
    uintptr_t addr = (uintptr_t)info->si_addr;
    /* si_code > 0: raised by the kernel for a faulting access (not kill/tgkill). */
    if (g->active && info->si_code > 0 && addr >= g->lo && addr < g->hi) {
        g->active = 0;
        g->fault_addr = addr;
        g->fault_sig = sig;
        siglongjmp(g->env, 1);
    }
    const struct sigaction* prev = sig == SIGBUS ? &kvp_prev_bus : &kvp_prev_segv;
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction != nullptr) {
            prev->sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* Default action: restore it; a faulting instruction then runs again and takes it,
     * a sent signal is raised again. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    if (info->si_code <= 0) {
        raise(sig);
    }
}

static void kvp_guard_install_once(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = kvp_fault_handler;
    /* SA_ONSTACK: a stack overflow must still reach Rust's handler on the alternate stack. */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &kvp_prev_bus) != 0 || sigaction(SIGSEGV, &sa, &kvp_prev_segv) != 0) {
        kvp_guard_error = errno;
    }
}

/* Runs `body` with faults at addresses in [lo, hi) turned into a return value: 0 when it
 * ran to completion, else the signal that stopped it (address in *fault_addr). */
template <typename Body>
static int kvp_guarded(uintptr_t lo, uintptr_t hi, uintptr_t* fault_addr, Body body) {
    kvp_fault_guard* g = &kvp_guard;
    /* savemask = 0: no sigprocmask call per launch; the rare recovery unblocks below. */
    if (sigsetjmp(g->env, 0) != 0) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGBUS);
        sigaddset(&set, SIGSEGV);
        pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
        *fault_addr = g->fault_addr;
        return g->fault_sig;
    }
    g->lo = lo;
    g->hi = hi;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    g->active = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    body();
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    g->active = 0;
    return 0;
}

extern "C" {

/* Installs the fault handler once per process; 0, or the errno of sigaction. */
int kvp_host_fault_guard_install(void) {
    pthread_once(&kvp_guard_once, kvp_guard_install_once);
    return kvp_guard_error;
}

/* block_offsets: NULL = contiguous blocks, as in the kernels. */
int kvp_host_paged_gather_guarded(const kvp_host_grid* g, const unsigned char* engine,
                                  uint64_t engine_bytes, unsigned char* blocks,
                                  const struct kvp_kv_layout* layout, const uint32_t* pages,
                                  const uint64_t* block_offsets, uint32_t num_batch_pages,
                                  uintptr_t* fault_addr) {
    uintptr_t lo = (uintptr_t)engine;
    return kvp_guarded(lo, lo + engine_bytes, fault_addr, [&] {
        kvp_host_run(g, [&] {
            kvp_paged_gather(engine, blocks, layout, pages, block_offsets, num_batch_pages);
        });
    });
}

int kvp_host_paged_scatter_guarded(const kvp_host_grid* g, unsigned char* engine,
                                   uint64_t engine_bytes, const unsigned char* blocks,
                                   const struct kvp_kv_layout* layout, const uint32_t* pages,
                                   const uint64_t* block_offsets, uint32_t num_batch_pages,
                                   uintptr_t* fault_addr) {
    uintptr_t lo = (uintptr_t)engine;
    return kvp_guarded(lo, lo + engine_bytes, fault_addr, [&] {
        kvp_host_run(g, [&] {
            kvp_paged_scatter(engine, blocks, layout, pages, block_offsets, num_batch_pages);
        });
    });
}

void kvp_host_paged_gather(const kvp_host_grid* g, const unsigned char* engine,
                           unsigned char* blocks, const struct kvp_kv_layout* layout,
                           const uint32_t* pages, const uint64_t* block_offsets,
                           uint32_t num_batch_pages) {
    kvp_host_run(g, [&] {
        kvp_paged_gather(engine, blocks, layout, pages, block_offsets, num_batch_pages);
    });
}

void kvp_host_paged_scatter(const kvp_host_grid* g, unsigned char* engine,
                            const unsigned char* blocks, const struct kvp_kv_layout* layout,
                            const uint32_t* pages, const uint64_t* block_offsets,
                            uint32_t num_batch_pages) {
    kvp_host_run(g, [&] {
        kvp_paged_scatter(engine, blocks, layout, pages, block_offsets, num_batch_pages);
    });
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

void kvp_host_mac_chunks(const kvp_host_grid* g, const unsigned char* base,
                         const struct kvp_copy_desc* descs, uint32_t num_descs,
                         const uint32_t* key, unsigned char* cvs, unsigned char* roots) {
    kvp_host_run(g, [&] { kvp_mac_chunks(base, descs, num_descs, key, cvs, roots); });
}

void kvp_host_mac_parents(const kvp_host_grid* g, const struct kvp_copy_desc* descs,
                          uint32_t num_descs, const uint32_t* key, unsigned char* cvs,
                          unsigned char* roots, uint32_t level) {
    kvp_host_run(g, [&] { kvp_mac_parents(descs, num_descs, key, cvs, roots, level); });
}

} /* extern "C" */

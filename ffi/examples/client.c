/* A C engine talking to kvplane through libkvplane and the ABI header alone:
 * attach registering one host KV region (a sealed memfd), submit a batch of NOPs and a
 * STATS, read the completions.
 * Build: cc -std=c11 -Iffi/include ffi/examples/client.c -Ltarget/debug -lkvplane
 * Run:   ./client /path/to/kvplane.sock                                              */
#define _GNU_SOURCE /* memfd_create */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvplane.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return 2;
    }
    const char *namespaces[] = {"c-example"};
    /* The engine's KV pool: host memory the daemon can map, so a memfd sealed against
     * shrinking (a GPU pool would be a KVP_REGION_CUDA_IPC region with no descriptor). */
    const uint64_t kv_bytes = 1 << 20;
    int kv_fd = memfd_create("c-example-kv", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (kv_fd < 0 || ftruncate(kv_fd, (off_t)kv_bytes) != 0 ||
        fcntl(kv_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        perror("KV memfd");
        return 1;
    }
    struct kvp_kv_region region;
    memset(&region, 0, sizeof region);
    region.kind = KVP_REGION_HOST_MEMFD;
    region.alloc_bytes = kv_bytes;
    region.offset_bytes = 0;
    region.len_bytes = kv_bytes;
    int32_t region_fds[1] = {kv_fd};
    struct kvp_client *client = NULL;
    if (kvp_client_attach(argv[1], 1, 64, 1 << 16, namespaces, 1, &region, region_fds, 1,
                          &client) < 0) {
        fprintf(stderr, "attach: %s\n", kvp_last_error());
        return 1;
    }
    close(kv_fd); /* the library sent its own duplicate; the daemon keeps what it mapped */
    struct kvp_queue *q = kvp_client_queue(client, 0);
    if (!q) {
        fprintf(stderr, "queue: %s\n", kvp_last_error());
        return 1;
    }
    /* A batch: 16 NOPs, one STATS, one entry with a bad opcode. */
    struct kvp_sqe sqes[18];
    memset(sqes, 0, sizeof sqes);
    for (int i = 0; i < 16; i++) {
        sqes[i].opcode = KVP_OP_NOP;
        sqes[i].user_data = 100 + i;
    }
    sqes[16].opcode = KVP_OP_STATS;
    sqes[16].user_data = 7;
    sqes[16].arg_offset = 0;
    sqes[16].arg_len = sizeof(struct kvp_stats);
    sqes[17].opcode = 4242;
    sqes[17].user_data = 9;
    int submitted = 0;
    while (submitted < 18) {
        int n = kvp_queue_submit(q, sqes + submitted, 18 - submitted);
        if (n < 0) {
            fprintf(stderr, "submit: %s\n", kvp_last_error());
            return 1;
        }
        submitted += n;
    }
    int ok = 0, bad_opcode = 0, stats_ok = 0, got = 0;
    struct kvp_cqe cqes[18];
    while (got < 18) {
        int n = kvp_queue_wait(q, cqes, 18, 5000);
        if (n < 0) {
            fprintf(stderr, "wait: %s\n", kvp_last_error());
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (cqes[i].user_data == 9 && cqes[i].status == KVP_E_BAD_OPCODE) bad_opcode++;
            if (cqes[i].user_data == 7 && cqes[i].status == KVP_OK) stats_ok++;
            if (cqes[i].user_data >= 100 && cqes[i].status == KVP_OK) ok++;
        }
        got += n;
    }
    struct kvp_stats st;
    if (kvp_queue_read_arena(q, 0, &st, sizeof st) < 0) {
        fprintf(stderr, "read arena: %s\n", kvp_last_error());
        return 1;
    }
    /* The library checks the header against itself too. */
    if (kvp_abi_layout("kvp_sqe") != (int64_t)sizeof(struct kvp_sqe) ||
        kvp_abi_layout("kvp_cqe.status") != (int64_t)offsetof(struct kvp_cqe, status) ||
        kvp_abi_layout("kvp_kv_region") != (int64_t)sizeof(struct kvp_kv_region) ||
        kvp_abi_layout("kvp_kv_region.handle") != (int64_t)offsetof(struct kvp_kv_region, handle)) {
        fprintf(stderr, "ABI layout mismatch between header and library\n");
        return 1;
    }
    printf("session %llu: nops_ok=%d stats_ok=%d bad_opcode=%d sessions_active=%llu backend=%s\n",
           (unsigned long long)kvp_client_session_id(client), ok, stats_ok, bad_opcode,
           (unsigned long long)st.sessions_active, st.backend == 1 ? "cuda" : "host");
    kvp_queue_free(q);
    kvp_client_detach(client);
    return (ok == 16 && stats_ok == 1 && bad_opcode == 1) ? 0 : 1;
}

/* A C engine talking to kvplane through libkvplane and the ABI header alone:
 * attach, submit a batch of NOPs and a STATS, read the completions.
 * Build: cc -std=c11 -Iffi/include ffi/examples/client.c -Ltarget/debug -lkvplane
 * Run:   ./client /path/to/kvplane.sock                                              */
#include <stdio.h>
#include <string.h>

#include "kvplane.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return 2;
    }
    const char *namespaces[] = {"c-example"};
    struct kvp_client *client = NULL;
    if (kvp_client_attach(argv[1], 1, 64, 1 << 16, namespaces, 1, -1, 0, &client) < 0) {
        fprintf(stderr, "attach: %s\n", kvp_last_error());
        return 1;
    }
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
        kvp_abi_layout("kvp_cqe.status") != (int64_t)offsetof(struct kvp_cqe, status)) {
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

#!/usr/bin/env python3
"""Attach to a running kvplane daemon, submit a batch (NOPs, a STATS and one bad
opcode), read the completions and print the daemon's stats.

    python3 ffi/python/examples/attach_batch.py /path/to/kvplane.sock
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kvplane  # noqa: E402


def main(socket_path):
    with kvplane.Client(socket_path, namespaces=["py-example"]) as client:
        q = client.queue(0)
        batch = [kvplane.Sqe(user_data=100 + i, opcode=kvplane.OP_NOP) for i in range(32)]
        batch.append(kvplane.Sqe(user_data=7, opcode=kvplane.OP_STATS, arg_offset=0,
                                 arg_len=kvplane.ctypes.sizeof(kvplane.Stats)))
        batch.append(kvplane.Sqe(user_data=9, opcode=999))
        sent = 0
        while sent < len(batch):
            sent += q.submit(batch[sent:])
        done = {}
        while len(done) < len(batch):
            for c in q.wait():
                done[c.user_data] = c.status
        stats = kvplane.Stats.from_buffer_copy(q.read_arena(0, kvplane.ctypes.sizeof(kvplane.Stats)))
        nops_ok = sum(1 for k, v in done.items() if k >= 100 and v == kvplane.OK)
        print(f"session {client.session_id}: nops_ok={nops_ok} stats={kvplane.STATUS_NAMES[done[7]]} "
              f"bad_opcode={kvplane.STATUS_NAMES[done[9]]} ops_completed={stats.ops_completed} "
              f"sessions_active={stats.sessions_active}")
        q.close()
        return 0 if nops_ok == 32 and done[7] == kvplane.OK and done[9] == kvplane.E_BAD_OPCODE else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))

#!/usr/bin/env python3
"""Derive a second replay trace from the bundled Mooncake trace, with other prefix sharing.

    scripts/derive-trace.py [SRC] [DST]
    (default: data/traces/mooncake/synthetic_trace.jsonl -> data/traces/derived/sessions_trace.jsonl)

Deterministic (seeded; standard library only). Keeps each request's arrival time and
output length; rewrites its prompt (hash_ids, 512 tokens each, and input_length):

- every prompt starts with one of 32 shared system prompts (4-24 blocks), picked with
  Zipf(1.1) popularity: a few are hot, most are cold;
- 55 % of requests continue a session that had a turn in the last 120 s: the prompt is
  that turn's whole prompt plus 1-6 new blocks (multi-turn chat: the shared prefix is the
  conversation so far, private to the session); a session ends at 48 blocks;
- the rest start a session: system prompt + 2-24 new blocks.

So most reuse is per-session (a long private prefix that only one worker should hold)
rather than Mooncake's few global prefixes, and prompts are shorter on average.
"""
import json
import random
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "data/traces/mooncake/synthetic_trace.jsonl"
DST = sys.argv[2] if len(sys.argv) > 2 else "data/traces/derived/sessions_trace.jsonl"
BLOCK = 512
SEED = 14
SYSTEM_PROMPTS = 32
CONTINUE_P = 0.55
SESSION_WINDOW_MS = 120_000
MAX_BLOCKS = 48

rng = random.Random(SEED)
next_id = 0


def fresh(n):
    global next_id
    ids = list(range(next_id, next_id + n))
    next_id += n
    return ids


systems = [fresh(rng.randint(4, 24)) for _ in range(SYSTEM_PROMPTS)]
zipf = [1.0 / (k + 1) ** 1.1 for k in range(SYSTEM_PROMPTS)]
sessions = []  # [last_ts, hash_ids]
out = []
with open(SRC) as f:
    for line in f:
        if not line.strip():
            continue
        r = json.loads(line)
        ts = r["timestamp"]
        live = [s for s in sessions if ts - s[0] <= SESSION_WINDOW_MS and len(s[1]) < MAX_BLOCKS]
        if live and rng.random() < CONTINUE_P:
            s = rng.choice(live)
            ids = s[1] + fresh(rng.randint(1, 6))
            ids = ids[:MAX_BLOCKS]
            s[0], s[1] = ts, ids
        else:
            sys_ids = rng.choices(systems, weights=zipf)[0]
            ids = sys_ids + fresh(rng.randint(2, 24))
            sessions.append([ts, ids])
        sessions = [s for s in sessions if ts - s[0] <= SESSION_WINDOW_MS]
        # The last block is partial: 1-512 tokens of it.
        input_length = (len(ids) - 1) * BLOCK + rng.randint(1, BLOCK)
        out.append(
            {
                "timestamp": ts,
                "input_length": input_length,
                "output_length": r["output_length"],
                "hash_ids": ids,
            }
        )

with open(DST, "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")

seen, hits, total = set(), 0, 0
for r in out:
    h = r["hash_ids"]
    total += len(h)
    k = 0
    while k < len(h) and h[k] in seen:
        k += 1
    hits += k
    seen.update(h)
mean_in = sum(r["input_length"] for r in out) / len(out)
print(
    f"{DST}: {len(out)} requests, mean input {mean_in:.0f} tokens, "
    f"infinite-cache block hit rate {hits / total:.3f} ({hits} of {total} blocks)"
)

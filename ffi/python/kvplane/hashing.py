"""Block keys: NVIDIA Dynamo's chained xxh3 sequence hash, the same as router/src/hash.rs.

The scheme (../shared/vectors/README.md): `salt_hash` starts at 1337, a LoRA name adds
`xxh3_64(lora, seed=0)`, a salt adds `xxh3_64(salt, seed=1)` (wrapping u64 additions);
`block_hash[i] = xxh3_64(block i's token ids as little-endian u32, seed=salt_hash)`;
`sequence_hash[0] = block_hash[0]`, `sequence_hash[i] = xxh3_64(le_u64(seq[i-1]) ||
le_u64(block_hash[i]), seed=1337)`. A partial last block is not hashed. Keys computed here
equal the router's and Dynamo's, so the router and the connector agree on what is cached.
"""

import struct

import xxhash

XXH3_SEED = 1337
_U64 = (1 << 64) - 1


def salt_hash(salt=None, lora_name=None):
    h = XXH3_SEED
    if lora_name is not None:
        h = (h + xxhash.xxh3_64_intdigest(lora_name.encode(), seed=0)) & _U64
    if salt is not None:
        h = (h + xxhash.xxh3_64_intdigest(salt.encode(), seed=1)) & _U64
    return h


def block_hashes(tokens, block_size, salt):
    """Hash of each full block of `tokens` (ints < 2**32), seeded by `salt` (a salt_hash)."""
    full = len(tokens) // block_size
    fmt = "<%dI" % block_size
    return [
        xxhash.xxh3_64_intdigest(struct.pack(fmt, *tokens[i * block_size:(i + 1) * block_size]), seed=salt)
        for i in range(full)
    ]


def chain(hashes, parent=None):
    """Sequence hashes of consecutive block hashes, continuing from `parent` if given."""
    out = []
    for b in hashes:
        parent = b if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, b), seed=XXH3_SEED)
        out.append(parent)
    return out


def sequence_hashes(tokens, block_size, salt):
    return chain(block_hashes(tokens, block_size, salt))

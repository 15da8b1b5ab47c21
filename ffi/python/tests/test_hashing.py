"""kvplane.hashing reproduces Dynamo's chained block hashes (the router's scheme), and the
connector's namespace names fit the daemon's rules."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "ffi" / "python"))

from kvplane import hashing  # noqa: E402

# The router's checked-in copy of ../shared/vectors/dynamo_chained_hash.json.
VECTORS = ROOT / "router" / "tests" / "data" / "dynamo_chained_hash.json"


def cases():
    if not VECTORS.exists():
        pytest.fail(f"test vectors missing: {VECTORS}")
    return json.loads(VECTORS.read_text())["cases"]


def test_matches_dynamo_vectors():
    checked = 0
    for c in cases():
        salt = hashing.salt_hash(c["salt"], c["lora_name"])
        assert salt == c["salt_hash"]
        assert hashing.block_hashes(c["tokens"], c["block_size"], salt) == c["block_hashes"]
        assert hashing.sequence_hashes(c["tokens"], c["block_size"], salt) == c["sequence_hashes"]
        checked += 1
    assert checked >= 5
    assert any(c["lora_name"] for c in cases()) and any(c["salt"] for c in cases())


def test_chain_continues_from_a_parent():
    tokens = list(range(100, 100 + 16 * 6))
    whole = hashing.sequence_hashes(tokens, 16, hashing.salt_hash())
    first = hashing.sequence_hashes(tokens[:48], 16, hashing.salt_hash())
    rest = hashing.chain(hashing.block_hashes(tokens[48:], 16, hashing.salt_hash()), first[-1])
    assert first + rest == whole


def test_namespace_names_are_valid_and_distinct():
    from kvplane.vllm import namespace_name

    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")
    names = [
        namespace_name("/models/Llama-3.1-8B-Instruct"),
        namespace_name("/models/Llama-3.1-8B-Instruct", "sql-lora"),
        namespace_name("/models/Llama-3.1-8B-Instruct", None, "tenant-a"),
        namespace_name("/models/Llama-3.1-8B-Instruct", None, "tenant-b"),
        namespace_name("org/" + "x" * 200),
        namespace_name("org/" + "x" * 200, "y"),
        namespace_name("weird name (v2)"),
    ]
    assert len(set(names)) == len(names)
    for n in names:
        assert 0 < len(n) <= 63 and set(n) <= allowed, n
    assert "tenant-a" not in names[2], "the salt enters as a digest"

"""Chained block hashes: canonical encoding, chain structure, stability across processes."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tierserve.cache.prefix_hash import SEED, hash_block, hash_blocks
from tierserve.errors import InvalidParameterError

REPO = Path(__file__).resolve().parents[1]
TOKENS = [1, 2, 3, 50000, -7, 2**40]
#: sha256 of the canonical encoding of TOKENS with no parent and no extra (pinned so that an
#: encoding change, which would split caches across versions and replicas, fails loudly).
PINNED_HEX = "452dbd86503a5b7f3ff17ee372a4aaf9ea36ca0fbb9dec5401e69bced6a5252b"


def reference_digest(parent: bytes | None, tokens: list[int]) -> bytes:
    """Independent re-derivation of the documented encoding with numpy (no extra items)."""
    seed = hashlib.sha256(b"tierserve/prefix-hash/v1").digest()
    payload = (parent or seed) + np.array([len(tokens)], dtype="<u8").tobytes() \
        + np.array(tokens, dtype="<i8").tobytes() + np.array([0], dtype="<u8").tobytes()
    return hashlib.sha256(payload).digest()


def test_digest_matches_independent_encoding_and_pinned_value():
    assert SEED == hashlib.sha256(b"tierserve/prefix-hash/v1").digest()
    digest = hash_block(None, TOKENS)
    assert digest == reference_digest(None, TOKENS)
    assert digest.hex() == PINNED_HEX
    parent = hash_block(None, [9, 9])
    assert hash_block(parent, TOKENS) == reference_digest(parent, TOKENS)


def test_chain_is_prefix_dependent_and_skips_partial_blocks():
    tokens = list(range(10))
    hs = hash_blocks(tokens, 4)
    assert len(hs) == 2  # tokens 8, 9 form a partial block
    assert hs[0] == hash_block(None, [0, 1, 2, 3])
    assert hs[1] == hash_block(hs[0], [4, 5, 6, 7])
    # same second block content after a different first block -> different hash
    other = hash_blocks([0, 1, 2, 99, 4, 5, 6, 7], 4)
    assert other[1] != hs[1]
    # a prefix of a longer sequence gets the same hashes
    assert hash_blocks(list(range(16)), 4)[:2] == hs
    assert hash_blocks([1, 2, 3], 4) == []


def test_encoding_is_unambiguous_and_extra_changes_digest():
    assert hash_block(None, [1, 2]) != hash_block(None, [1, 2, 0])
    assert hash_block(None, [1]) != hash_block(None, [1], (0,))
    assert hash_block(None, [1], ("a",)) != hash_block(None, [1], (b"a",))
    assert hash_block(None, [1], (1,)) != hash_block(None, [1], (True,))
    assert hash_block(None, [1], (("x", 1),)) == hash_block(None, [1], (("x", 1),))
    assert hash_block(None, [1], ((1,), 2)) != hash_block(None, [1], (1, (2,)))


def test_invalid_inputs_name_the_field():
    with pytest.raises(InvalidParameterError) as e:
        hash_block(b"short", [1])
    assert e.value.field == "parent"
    with pytest.raises(InvalidParameterError) as e:
        hash_block(None, [2**63])
    assert e.value.field == "token_ids"
    with pytest.raises(InvalidParameterError) as e:
        hash_block(None, [1], (1.5,))
    assert e.value.field == "extra"
    with pytest.raises(InvalidParameterError) as e:
        hash_blocks([1], 0)
    assert e.value.field == "block_size"


def test_stable_across_processes_with_different_hash_seeds():
    code = ("from tierserve.cache.prefix_hash import hash_blocks;"
            "print(','.join(h.hex() for h in hash_blocks(list(range(40)), 16, extra=('salt', 3))))")
    outs = set()
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=REPO)
        outs.add(res.stdout.strip())
    local = ",".join(h.hex() for h in hash_blocks(list(range(40)), 16, extra=("salt", 3)))
    assert outs == {local}


@pytest.mark.parametrize("module", ["tierserve/cache/prefix_hash.py", "tierserve/cache/block_pool.py",
                                    "tierserve/cache/kv_cache_manager.py", "tierserve/engine/scheduler.py",
                                    "tierserve/step/schedule.py", "tierserve/step/hooks.py",
                                    "tierserve/step/request_view.py", "tierserve/offload/dispatch_plan.py"])
def test_bookkeeping_modules_do_not_import_torch(module):
    tree = ast.parse((REPO / module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"torch", "numpy", "triton"}

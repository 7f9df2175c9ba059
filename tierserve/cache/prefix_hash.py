"""Chained block hashes that name a KV block by its whole token prefix.

A request's tokens are cut into full blocks of ``block_size`` tokens; block i
gets the digest

    h_0 = H(SEED,    tokens_0, extra)
    h_i = H(h_{i-1}, tokens_i, extra)        (i >= 1)

so equal digests mean equal token prefixes (up to SHA-256 collisions), and a
block's KV can be reused by any request that shares the prefix. ``H`` is
SHA-256 over a canonical, prefix-free byte encoding:

    parent (32 bytes: the parent digest, or SEED for the first block)
    || u64le(len(tokens)) || tokens as i64le each
    || u64le(len(extra))  || each extra item tagged and length-prefixed

``SEED`` is SHA-256 of the fixed string ``b"tierserve/prefix-hash/v1"``.
Nothing depends on Python's salted ``hash()``, so the digests are identical
across processes, machines and ``PYTHONHASHSEED`` values (the prefix-aware
router compares hashes computed by different replicas). Partial blocks are
never hashed. ``extra`` carries whatever else changes a block's KV besides its
tokens (an adapter id, a cache salt): ints (int64), str, bytes, bool, None and
nested tuples of these.

Tests (tests/test_prefix_hash.py) pin the digest of a fixed input, rebuild it
independently with numpy, and compare it across subprocesses with different
PYTHONHASHSEED values.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from tierserve.errors import InvalidParameterError

#: Digest size of every block hash (SHA-256).
HASH_BYTES = 32
#: Stand-in parent of the first block of every sequence.
SEED: bytes = hashlib.sha256(b"tierserve/prefix-hash/v1").digest()

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: tuple = ()) -> bytes:
    """Digest of one block: ``H(parent or SEED, token_ids, extra)`` (32 bytes)."""
    if parent is None:
        parent = SEED
    elif len(parent) != HASH_BYTES:
        raise InvalidParameterError("parent", f"must be a {HASH_BYTES}-byte block hash, got {len(parent)} bytes")
    n = len(token_ids)
    try:
        tokens = struct.pack(f"<Q{n}q", n, *token_ids)
    except struct.error as exc:
        raise InvalidParameterError("token_ids", f"must be int64 integers ({exc})") from None
    h = hashlib.sha256(parent)
    h.update(tokens)
    h.update(_encode_tuple(extra))
    return h.digest()


def hash_blocks(token_ids: Sequence[int], block_size: int, parent: bytes | None = None,
                extra: tuple = ()) -> list[bytes]:
    """Chained digests of every *full* block of ``token_ids`` (a trailing partial block is skipped)."""
    if block_size < 1:
        raise InvalidParameterError("block_size", f"must be >= 1, got {block_size}")
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra)
        out.append(parent)
    return out


def _encode_tuple(items: tuple) -> bytes:
    if not isinstance(items, tuple):
        raise InvalidParameterError("extra", f"must be a tuple, got {type(items).__name__}")
    parts = [struct.pack("<Q", len(items))]
    for item in items:
        parts.append(_encode_item(item))
    return b"".join(parts)


def _encode_item(item: object) -> bytes:
    if item is None:
        return b"n"
    if isinstance(item, bool):
        return b"?" + (b"\x01" if item else b"\x00")
    if isinstance(item, int):
        if not _INT64_MIN <= item <= _INT64_MAX:
            raise InvalidParameterError("extra", f"integers must fit in int64, got {item}")
        return b"i" + struct.pack("<q", item)
    if isinstance(item, str):
        data = item.encode("utf-8")
        return b"s" + struct.pack("<Q", len(data)) + data
    if isinstance(item, (bytes, bytearray)):
        return b"b" + struct.pack("<Q", len(item)) + bytes(item)
    if isinstance(item, tuple):
        return b"t" + _encode_tuple(item)
    raise InvalidParameterError(
        "extra", f"items must be int, str, bytes, bool, None or tuple, got {type(item).__name__}")

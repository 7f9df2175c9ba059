"""ChunkLayout: chunk payload bytes from and into plain and kv4 pages (no tiers, no model)."""

from __future__ import annotations

import pytest
import torch

from tierserve.cache.compress.base import build_compressor
from tierserve.cache.tiers.chunk_layout import MAX_RUNS, ChunkLayout, block_runs
from tierserve.config import KVCompressionConfig
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=64, block_size=4)


def test_plain_payload_is_the_layers_k_v_tensor():
    torch.manual_seed(0)
    caches = allocate_kv_cache(SPEC, 10)
    for c in caches:
        c.k.copy_(torch.randn_like(c.k))
        c.v.copy_(torch.randn_like(c.v))
    layout = ChunkLayout(caches, chunk_blocks=3)
    assert layout.block_bytes == SPEC.page_size_bytes  # fp32: 3 layers * 2 * 4 tokens * 2 heads * 64 * 4
    blocks = [7, 2, 5]
    ref = torch.stack([torch.stack([c.k[blocks], c.v[blocks]]) for c in caches])  # [L, 2, nb, bs, H, D]
    got = layout.gather(blocks)
    assert got.dtype == torch.uint8 and got.numel() == layout.payload_bytes == 3 * SPEC.page_size_bytes
    assert torch.equal(got.view(torch.float32).view(ref.shape), ref)


def test_kv4_payload_round_trips_packed_bytes_into_other_blocks():
    torch.manual_seed(1)
    kv4 = build_compressor(KVCompressionConfig("kv4"), SPEC)
    caches = kv4.allocate_cache(num_blocks=10)
    for c in caches:
        c.write(torch.arange(40), torch.randn(40, 2, 64), torch.randn(40, 2, 64))
    layout = ChunkLayout(caches, chunk_blocks=3)
    assert layout.block_bytes == kv4.page_size_bytes() and layout.block_bytes * 6.4 == SPEC.page_size_bytes
    src = [1, 4, 6]
    payload = layout.gather(src)
    fresh = kv4.allocate_cache(num_blocks=10)
    target = ChunkLayout(fresh, chunk_blocks=3)
    target.scatter(payload, 0, [9, 0, 3])
    target.scatter(payload, 1, [8, 2])  # a partial chunk: its blocks 1 and 2 only
    for c, f in zip(caches, fresh):
        for a, b in zip(c.parts(), f.parts()):
            assert torch.equal(b[[9, 0, 3]], a[src]) and torch.equal(b[[8, 2]], a[src[1:]])
        keys, vals = c.gather(torch.tensor([src]))  # what attention reads is equal too
        fk, fv = f.gather(torch.tensor([[9, 0, 3]]))
        assert torch.equal(keys, fk) and torch.equal(vals, fv)


def test_block_runs():
    assert block_runs([4, 5, 6, 9, 1, 2]) == [(4, 0, 3), (9, 3, 1), (1, 4, 2)]
    assert block_runs([]) == [] and block_runs([3]) == [(3, 0, 1)]


@pytest.mark.parametrize("spec", [SPEC, KVSpec(num_layers=2, num_kv_heads=1, head_dim=32, block_size=1)],
                         ids=["word-rows", "2-byte-scale-rows"])
@pytest.mark.parametrize("blocks", [[2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2], [0, 1, 8, 9, 4, 5]])
def test_scatter_by_runs_or_by_index_copies_the_same_rows(blocks, spec):
    torch.manual_seed(2)
    kv4 = build_compressor(KVCompressionConfig("kv4"), spec)
    caches = kv4.allocate_cache(num_blocks=12)
    tokens = 12 * spec.block_size
    for c in caches:
        c.write(torch.arange(tokens), torch.randn(tokens, spec.num_kv_heads, spec.head_dim),
                torch.randn(tokens, spec.num_kv_heads, spec.head_dim))
    src = [6, 0, 11, 3, 8, 1]
    payload = ChunkLayout(caches, chunk_blocks=6).gather(src)
    fresh = kv4.allocate_cache(num_blocks=12)
    ChunkLayout(fresh, chunk_blocks=6).scatter(payload, 0, blocks)
    ChunkLayout(fresh, chunk_blocks=6).scatter(payload, 5, blocks[:1])  # a partial chunk: its last block
    others = [i for i in range(12) if i not in blocks]
    for c, f, e in zip(caches, fresh, kv4.allocate_cache(num_blocks=12)):
        for a, b, empty in zip(c.parts(), f.parts(), e.parts()):
            assert torch.equal(b[blocks[1:]], a[src[1:]]) and torch.equal(b[blocks[0]], a[src[5]])
            assert torch.equal(b[others], empty[others])
    assert (len(block_runs(blocks)) <= MAX_RUNS) == (blocks != [7, 6, 5, 4, 3, 2])  # both paths ran


def test_bad_ranges_name_the_sizes():
    layout = ChunkLayout(allocate_kv_cache(SPEC, 4), chunk_blocks=2)
    with pytest.raises(ValueError, match="a chunk has 2 blocks, got 3"):
        layout.gather([0, 1, 2])
    with pytest.raises(ValueError, match=r"blocks \[1, 3\) of a 2-block chunk"):
        layout.scatter(torch.zeros(layout.payload_bytes, dtype=torch.uint8), 1, [0, 1])
    with pytest.raises(ValueError, match="payload of 5 bytes"):
        layout.scatter(torch.zeros(5, dtype=torch.uint8), 0, [0])

"""KV chunks out of and back into GPU pages (cache/tiers/chunk_layout.py on CUDA; ``cuda`` marker).

bf16 pages on the GPU, random in every slot, a pending write on the compute stream just before the gather
(the side stream must wait for it): the gathered payload is a pinned host tensor whose bytes equal the
gather of a CPU copy of the same pages (the CPU path, pinned down by tests/test_kv_tiers_chunk_layout.py);
scattered into other GPU blocks it makes those pages byte-identical to the source blocks. LMCache, the
tiers' storage, is not needed (the GPU check machine has none).
"""

from __future__ import annotations

import pytest
import torch

from tierserve.cache.tiers.chunk_layout import ChunkLayout
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec

pytestmark = pytest.mark.cuda
SPEC = KVSpec(num_layers=4, num_kv_heads=8, head_dim=64, block_size=16, dtype="bfloat16")


def test_gpu_pages_round_trip_through_pinned_host_bytes():
    g = torch.Generator().manual_seed(0)
    gpu = allocate_kv_cache(SPEC, 40, torch.device("cuda"))
    for c in gpu:
        c.k.copy_(torch.randn(c.k.shape, generator=g).bfloat16())
        c.v.copy_(torch.randn(c.v.shape, generator=g).bfloat16())
    blocks = [31, 3, 17, 8]
    big = torch.randn(4096, 4096, device="cuda")
    for c in gpu:  # queued behind a long matmul on the compute stream: the gather must see these values
        (big @ big).sum()
        c.k[blocks[0]].fill_(1.5)
    cpu = [type(c)(c.k.cpu(), c.v.cpu()) for c in gpu]
    layout = ChunkLayout(gpu, chunk_blocks=4)
    payload = layout.gather(blocks)
    assert payload.device.type == "cpu" and payload.is_pinned() and payload.dtype == torch.uint8
    assert torch.equal(payload, ChunkLayout(cpu, chunk_blocks=4).gather(blocks))
    target = [0, 1, 2, 39]
    layout.scatter(payload, 0, target)
    for c in gpu:
        assert torch.equal(c.k[target], c.k[blocks]) and torch.equal(c.v[target], c.v[blocks])
    layout.scatter(payload, 1, [5, 6])  # a partial chunk: its blocks 1 and 2
    assert all(torch.equal(c.k[[5, 6]], c.k[blocks[1:3]]) for c in gpu)

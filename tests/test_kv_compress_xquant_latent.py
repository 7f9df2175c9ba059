"""XQuant's 4-bit latent codec (cache/compress/xquant.py, Quantization): each group of g latent channels is
multiplied by the Hadamard matrix H_g, coded with kv4's asymmetric 4-bit groups (fp16 scale and min), and
multiplied by H_g again on read. Checked against a per-element reference in Python floats with H_g built
here from its definition, at kv4's bytes."""

from __future__ import annotations

import math

import torch

from tierserve.cache.compress.base import build_compressor
from tierserve.cache.compress.xquant import XQuantLayerKV
from tierserve.config import KVCompressionConfig
from tierserve.kernels.kv_pages import KVSpec


def _sylvester(n: int) -> list[list[float]]:
    h = [[1.0]]
    while len(h) < n:
        h = [r + r for r in h] + [r + [-x for x in r] for r in h]
    return [[x / math.sqrt(n) for x in r] for r in h]


def _reference(z: torch.Tensor, group: int) -> torch.Tensor:
    """Per token and group: y = z_j H, 4-bit asymmetric codes of y (fp16 scale and min), y^ H."""
    h = _sylvester(group)
    out = []
    for row in z.double().tolist():
        rec = []
        for j in range(0, len(row), group):
            y = [sum(row[j + a] * h[a][c] for a in range(group)) for c in range(group)]
            s = float(torch.tensor((max(y) - min(y)) / 15).half()) or 1.0
            m = float(torch.tensor(min(y)).half())
            yh = [m + min(max(round((v - m) / s), 0), 15) * s for v in y]
            rec += [sum(yh[a] * h[a][c] for a in range(group)) for c in range(group)]
        out.append(rec)
    return torch.tensor(out)


def test_rotated_groups_match_a_per_element_reference():
    torch.manual_seed(0)
    heads, dim, group = 2, 32, 16
    layer = XQuantLayerKV(0, 2, 4, heads, dim, group, 4, torch.float32,
                          torch.zeros(2, 4, dtype=torch.int32), "cpu")
    # latent-like rows: groups of very different scale, one outlier channel in the first
    z = torch.randn(5, heads * dim) * torch.tensor([8.0, 1.0, 3.0, 0.5]).repeat_interleave(group)
    z[:, 3] += 40.0
    slots = torch.tensor([6, 1, 2, 5, 0])
    layer._store(layer.k_latent, slots, z)
    got = layer._load(layer.k_latent, torch.tensor([[1, 0]]))[0]  # blocks 1 then 0: slots 4..7 then 0..3
    order = [slots.tolist().index(s) for s in (5, 6, 0, 1, 2)]
    ref = _reference(z, group).float()
    torch.testing.assert_close(got[[1, 2, 4, 5, 6]], ref[order], rtol=0, atol=2e-5)


def test_bytes_are_kv4s():
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=256, block_size=16)
    xq = build_compressor(KVCompressionConfig("xquant"), spec)
    kv4 = build_compressor(KVCompressionConfig("kv4"), spec)
    assert xq.page_size_bytes() == kv4.page_size_bytes() + 16 * 4  # + the int32 position per token
    layer = xq.allocate_cache(3)[1]
    assert sum(p[0, 0].numel() * p.element_size() for p in layer.parts()) == xq.token_bytes_per_layer()

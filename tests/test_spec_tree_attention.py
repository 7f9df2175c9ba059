"""Tree attention masks over paged KV (draft-tree verification) in the torch reference and the triton kernel.

A step holds a plain prefill chunk (causal, ``tree_bits`` -1), a draft tree
(root + 7 nodes, two branches of different depths) and a decode row. The
oracle is brute force: for each query row, the explicit list of visible key
slots (the context before the query block, then the row's ancestors and
itself by ``DraftTree.ancestor_bits``), one float64 softmax. The torch path must
match it to fp32 rounding, and the triton kernel (TRITON_INTERPRET=1 on CPU,
small shapes) must match the torch path within the tolerances of
tests/test_paged_attention_triton.py. A row-mask bug (a sibling or a later
node visible, or an ancestor hidden) moves the output by O(1): random keys.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from test_paged_attention_triton import Case, build, tolerance
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention.triton_backend import TritonAttention
from tierserve.kernels.paged_attention import TorchAttention

# root's children 0, 1; 0 -> 2, 3; 2 -> 4 -> 6; 1 -> 5
TREE = DraftTree((11, 12, 13, 14, 15, 16, 17), (-1, -1, 0, 0, 2, 1, 4))


def tree_case(dtype=torch.float32, hq=4, hkv=2) -> tuple[Case, list[int]]:
    n = len(TREE) + 1
    case = Case(q_lens=(5, n, 1), seq_lens=(21, 30 + n, 9), hq=hq, hkv=hkv, dim=32, block_size=8, dtype=dtype)
    bits = [-1] * 5 + TREE.ancestor_bits() + [-1]
    return case, bits


def brute_force(q, pages, meta, scale, bits) -> torch.Tensor:
    k_all = pages.k.reshape(-1, *pages.k.shape[2:]).double()
    v_all = pages.v.reshape(-1, *pages.v.shape[2:]).double()
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_all.shape[1]
    for s, seq_len in enumerate(meta.seq_lens):
        lo, hi = meta.query_start[s], meta.query_start[s + 1]
        ctx = seq_len - (hi - lo)
        table = meta.block_tables[s].tolist()
        slot = [table[j // meta.block_size] * meta.block_size + j % meta.block_size for j in range(seq_len)]
        for r in range(hi - lo):
            b = bits[lo + r]
            keys = list(range(ctx)) + [ctx + j for j in range(r + 1) if b == -1 or (b >> j) & 1]
            idx = torch.tensor([slot[j] for j in keys])
            for h in range(q.shape[1]):
                kk, vv = k_all[idx, h // group], v_all[idx, h // group]
                w = torch.softmax(scale * kk @ q[lo + r, h].double(), dim=0)
                out[lo + r, h] = w @ vv
    return out


def test_ancestor_bits_see_exactly_the_path():
    bits = TREE.ancestor_bits()
    for i in range(len(TREE)):
        visible = {j - 1 for j in range(len(TREE) + 1) if (bits[i + 1] >> j) & 1}
        assert visible == {-1, *TREE.path(i)}


def test_torch_tree_mask_equals_brute_force():
    case, bits = tree_case()
    q, k, v, pages, meta = build(case, "cpu", seed=1)
    meta = replace(meta, tree_bits=bits)
    scale = case.dim ** -0.5
    out = TorchAttention().forward(q, k, v, pages, meta, scale)
    ref = brute_force(q, pages, meta, scale, bits)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    causal = TorchAttention().forward(q, k, v, pages, replace(meta, tree_bits=None, _masks={}), scale)
    rows = slice(5, 5 + len(TREE) + 1)
    assert (causal[rows] - out[rows]).abs().max() > 0.05  # the mask matters on the tree rows only
    torch.testing.assert_close(causal[:5], out[:5])
    torch.testing.assert_close(causal[-1:], out[-1:])


@pytest.mark.parametrize("dtype,hq", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32-gqa2", "bf16"])
def test_triton_tree_mask_matches_reference(dtype, hq):
    case, bits = tree_case(dtype, hq=hq)
    q, k, v, pages, meta = build(case, "cpu", seed=2)
    tri_pages = type(pages)(pages.k.clone(), pages.v.clone())
    scale = case.dim ** -0.5
    ref = TorchAttention().forward(q, k, v, pages, replace(meta, tree_bits=bits), scale)
    out = TritonAttention().forward(q, k, v, tri_pages, replace(meta, tree_bits=bits, _masks={}), scale)
    tol = tolerance(dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(tri_pages.k, pages.k) and torch.equal(tri_pages.v, pages.v)


def test_tree_mask_with_sliding_window_is_refused():
    case, bits = tree_case()
    q, k, v, pages, meta = build(case, "cpu")
    for backend in (TorchAttention(), TritonAttention()):
        with pytest.raises(InvalidParameterError, match="sliding_window"):
            backend.forward(q, k, v, pages, replace(meta, tree_bits=bits, _masks={}), 0.1, sliding_window=8)

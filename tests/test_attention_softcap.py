"""Attention logit soft-capping (``c * tanh(s / c)`` on the scaled scores before softmax) against transformers.

The reference is transformers' Gemma-2 ``eager_attention_forward`` (the attention of a config that sets
``attn_logit_softcapping``), called on the same q, k, v with a causal mask. tierserve's torch and Triton
backends run the same tokens as one prefill through shuffled pages (GQA 4:2, head_dim 64, 20 tokens over
two 16-token blocks). float32 throughout: they agree to 1e-6, a few float32 unit roundoffs (6e-8) of
outputs of size ~1 over 20-term sums in another order (measured: torch 0, Triton 3.6e-7). Scores of random
unit-variance q, k at scale 1/8 exceed the cap 1.0 often: the capped output is far (measured 1.0, asserted
> 0.5) from the uncapped one, so a backend ignoring the cap fails.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from tierserve.kernels.attention.triton_backend import TritonAttention
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata, TorchAttention

T, HQ, HKV, D, BS = 20, 4, 2, 64, 16


class _HFModule(torch.nn.Module):
    """What eager_attention_forward reads from its module: the GQA ratio and the training flag."""

    num_key_value_groups = HQ // HKV


def _inputs():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    return q, k, v


def _transformers(q, k, v, softcap):
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    out, _ = eager_attention_forward(_HFModule().eval(), q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                     v.transpose(0, 1)[None], mask, dropout=0.0, scaling=D ** -0.5,
                                     softcap=softcap)
    return out[0]  # [T, HQ, D]


@pytest.mark.parametrize("backend", [TorchAttention, TritonAttention])
def test_softcap_matches_transformers(backend):
    q, k, v = _inputs()
    table = [3, 0]  # shuffled pages
    meta = AttentionMetadata.build([T], [T], [table], BS, "cpu")
    if backend is TritonAttention:
        from dataclasses import replace

        meta = replace(meta, backend=TritonAttention(), _masks={})
    pages = LayerKV(torch.zeros(4, BS, HKV, D), torch.zeros(4, BS, HKV, D))
    got = backend().forward(q, k, v, pages, meta, D ** -0.5, None, 1.0)
    want = _transformers(q, k, v, 1.0)
    assert (got - want).abs().max().item() <= 1e-6
    uncapped = _transformers(q, k, v, None)
    assert (want - uncapped).abs().max().item() > 0.5  # the cap changes the result

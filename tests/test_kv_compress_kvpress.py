"""Our Expected Attention scores against NVIDIA kvpress's ``ExpectedAttentionPress.score`` on SmolLM2.

kvpress 0.5.5 cannot be installed normally here: its requirements pin
``transformers<5.3`` (we run 5.23.0) and pull datasets/pandas/peft. It does
not pull a CUDA torch, so it is installed *without dependencies* into a
private folder:

    pip install --no-deps --target ~/.cache/tierserve/kvpress-0.5.5 kvpress==0.5.5

and only its press modules are loaded (a bare ``kvpress`` package object is
registered so ``kvpress/__init__.py``, which imports the pipeline and its
missing deps, is not executed). The test is skipped when neither an importable
``kvpress`` nor that folder exists.

Same inputs on both sides: layer 0 of SmolLM2 (transformers' model for
kvpress, ours for our side), hidden states = input_layernorm(embeddings) of a
real sentence, keys/values = transformers' post-RoPE K and V. Ours: buffered
inputs from position 4 on (kvpress drops the first n_sink = 4 hidden states),
our q projection, our RoPE tables averaged over the next 512 positions.
Tolerance: 1e-4 relative to the largest score (fp32 on both sides).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from tierserve.cache.compress.expected_attention import (averaged_rope_matrix, expected_attention_scores,
                                                          prerope_queries, query_statistics)
from tierserve.paths import cache_root

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be.")


def _load_press():
    if importlib.util.find_spec("kvpress") is None:
        folder = os.path.join(cache_root(), "kvpress-0.5.5")
        if not os.path.isdir(os.path.join(folder, "kvpress")):
            # the only independent oracle of Expected Attention: missing it is a failure, not a skip
            pytest.fail(f"kvpress not installed (scripts/test.sh installs it; see this module's docstring; "
                        f"looked in {folder})")
        pkg = types.ModuleType("kvpress")
        pkg.__path__ = [os.path.join(folder, "kvpress")]
        sys.modules.setdefault("kvpress", pkg)
    from kvpress.presses.expected_attention_press import ExpectedAttentionPress

    return ExpectedAttentionPress


def test_scores_match_kvpress(hf_smollm, smollm_folder):
    press_cls = _load_press()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tierserve.engine.model_source import resolve_model
    from tierserve.models.loader import load_model

    hf, tok = hf_smollm
    ours = load_model(resolve_model(smollm_folder).weights, torch.float32).model
    ids = torch.tensor([tok.encode(TEXT)])
    n = ids.shape[1]
    attn_hf = hf.model.layers[0].self_attn
    attn_hf.rotary_emb = hf.model.rotary_emb  # what kvpress's pipeline attaches
    with torch.no_grad():
        h = hf.model.layers[0].input_layernorm(hf.model.embed_tokens(ids))  # [1, n, hidden]
        cos, sin = hf.model.rotary_emb(h, torch.arange(n)[None])
        hkv, d = hf.config.num_key_value_heads, attn_hf.head_dim
        k = attn_hf.k_proj(h).view(1, n, hkv, d).transpose(1, 2)
        v = attn_hf.v_proj(h).view(1, n, hkv, d).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        ref = press_cls().score(attn_hf, h, k, v, None, {})[0]  # [Hkv, n]

        attn = ours.layers[0].self_attn
        q = prerope_queries(attn, h[0, 4:])
        ours.rope.ensure(n + 512)
        rot = averaged_rope_matrix(ours.rope.cos_table[n:n + 512], ours.rope.sin_table[n:n + 512])
        mu, cov = query_statistics(q, rot)
        got = expected_attention_scores(mu, cov, k[0].transpose(0, 1), v[0].transpose(0, 1), n_sink=4)
    assert got.shape == ref.shape
    scale = ref[:, 4:].abs().max()
    torch.testing.assert_close(got[:, 4:].float() / scale, ref[:, 4:].float() / scale, rtol=0, atol=1e-4)
    # both give the sinks a score above every other token
    assert (got[:, :4] > got[:, 4:].max()).all() and (ref[:, :4] > ref[:, 4:].max()).all()
    # and they rank the tokens the same way
    assert torch.equal(got[:, 4:].argsort(-1)[:, -5:], ref[:, 4:].argsort(-1)[:, -5:])

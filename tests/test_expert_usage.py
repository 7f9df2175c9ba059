"""Expert usage statistics (tierserve.offload.usage) and the route recorder transform (usage_hook)."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig

from model_harness import PagedRunner, build_and_save
from tierserve.errors import InvalidParameterError
from tierserve.models.loader import load_model
from tierserve.offload.usage import ExpertUsage, usage_path
from tierserve.offload.usage_hook import attach_usage_recorder, moe_blocks


def test_record_rank_save_load(tmp_path):
    u = ExpertUsage(2, 4)
    u.record(0, [3, 1, 3, 3])
    u.record_counts(1, [0, 5, 5, 1])
    assert u.counts == [[0, 1, 0, 3], [0, 5, 5, 1]]
    assert u.ranking(0) == [3, 1, 0, 2]
    assert u.ranking(1) == [1, 2, 3, 0]  # ties by ascending id
    assert u.as_metrics()[(1, 2)] == 5 and len(u.as_metrics()) == 8
    path = usage_path(str(tmp_path))
    u.save(path)
    assert ExpertUsage.load(path) == u
    with pytest.raises(InvalidParameterError, match="expert_id"):
        u.record(0, [4])
    with pytest.raises(InvalidParameterError, match="layer"):
        u.record(2, [0])
    with pytest.raises(InvalidParameterError, match="counts"):
        u.record_counts(0, [1, 2])


def test_load_rejects_bad_files(tmp_path):
    bad = ExpertUsage(1, 2).to_json()
    bad["counts"] = [[1, "x"]]
    with pytest.raises(InvalidParameterError, match="counts"):
        ExpertUsage.from_json(bad)


def test_recorder_counts_routes_and_keeps_outputs(tmp_path):
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    build_and_save(cfg, tmp_path, seed=3)
    model = load_model(str(tmp_path)).model
    tokens = list(range(3, 20))
    plain = PagedRunner(model).step(tokens)
    # independent reference: each block's routing decisions computed here from its router logits (Mixtral:
    # softmax over the gate's logits, top-2; softmax is monotone, so the 2 largest logits, in float64)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append((m, a[0]))) for b in moe_blocks(model)]
    PagedRunner(model).step(tokens)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    want_counts = []
    for block, x in seen:
        logits = x.reshape(-1, x.shape[-1]).double() @ block.gate.weight.double().t()  # [T, 4]
        ordered = torch.sort(logits, dim=-1, descending=True)
        assert bool((ordered.values[:, 1] - ordered.values[:, 2] > 1e-6).all())  # no near-tie at the cut
        chosen = ordered.indices[:, :2].reshape(-1)
        want_counts.append(torch.bincount(chosen, minlength=4).tolist())
    expected = ExpertUsage(2, 4)
    for layer, counts in enumerate(want_counts):
        expected.record_counts(layer, counts)
    assert all(min(c) < max(c) for c in want_counts)  # uneven use: a wrong expert id would show
    usage = ExpertUsage(2, 4)
    handle = attach_usage_recorder(model, usage)
    recorded = PagedRunner(model).step(tokens)
    handle.detach()
    assert torch.equal(recorded, plain)
    assert usage == expected
    assert all(usage.total(layer) == len(tokens) * 2 for layer in range(2))
    PagedRunner(model).step(tokens)  # detached: no more counting
    assert usage == expected
    with pytest.raises(InvalidParameterError, match="num_experts"):
        attach_usage_recorder(model, ExpertUsage(2, 5))

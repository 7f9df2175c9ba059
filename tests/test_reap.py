"""REAP expert pruning (tierserve.tools.reap), checks from TECHNIQUES.md."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, MixtralConfig

from model_harness import build_and_save
from tierserve.errors import InvalidParameterError
from tierserve.models.loader import load_model
from tierserve.tools.calibration import (CALIBRATION_NOVELS, HELDOUT_NOVELS, austen_token_windows,
                                       capture_mlp_inputs, forward_logits, perplexity)
from tierserve.tools.reap import ReapAccumulator, collect_saliency, prune, prune_checkpoint, select_pruned


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mixtral")
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64)
    build_and_save(cfg, path, seed=5)
    return str(path)


def test_online_saliency_equals_batch(tiny_moe):
    model = load_model(tiny_moe).model
    windows = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    online = collect_saliency(model, windows, batch_size=1)
    # batch reference: all FFN inputs at once, S_j = mean over routed (token, slot) of w * ||expert_j(x)||
    inputs = capture_mlp_inputs(model, windows, batch_size=6)
    for layer, (x, lay) in enumerate(zip(inputs, model.layers)):
        block = lay.mlp
        with torch.no_grad():
            w, ids = block.route(x)
            for j in range(8):
                tok, slot = torch.nonzero(ids == j, as_tuple=True)
                if len(tok) == 0:
                    assert online.count[layer, j] == 0 and online.mean[layer, j] == 0
                    continue
                vals = w[tok, slot].double() * block.experts[j](x[tok]).double().norm(dim=-1)
                assert online.count[layer, j] == len(tok)
                assert torch.allclose(online.mean[layer, j], vals.mean(), rtol=1e-6, atol=0)


def test_accumulator_chan_update():
    acc = ReapAccumulator(1, 1)
    data = torch.arange(1.0, 11.0)
    for chunk in (data[:3], data[3:4], data[4:]):
        acc.update(0, 0, chunk)
    assert acc.count[0, 0] == 10 and abs(float(acc.mean[0, 0]) - 5.5) < 1e-12


def test_select_pruned_rules():
    sal = [[0.5, 0.1, 0.9, 0.1]]
    freq = [[3, 9, 0, 9]]
    assert select_pruned("reap", 0.5, sal, freq) == [[1, 3]]
    assert select_pruned("frequency", 0.25, sal, freq) == [[2]]
    assert select_pruned("reap", 0.2, sal, freq) == [[]]  # floor(4 * 0.2) = 0
    rnd = select_pruned("random", 0.5, sal, freq, seed=7)
    assert rnd == select_pruned("random", 0.5, sal, freq, seed=7) and len(rnd[0]) == 2
    with pytest.raises(InvalidParameterError, match="ratio"):
        select_pruned("reap", 1.0, sal, freq)
    with pytest.raises(InvalidParameterError, match="method"):
        select_pruned("magic", 0.5, sal, freq)


def test_pruning_never_routed_experts_changes_nothing(tiny_moe, tmp_path):
    """3 tokens x top-2 reach at most 6 of 8 experts per layer: the 2 lowest-REAP experts are unrouted."""
    model = load_model(tiny_moe).model
    tokens = torch.tensor([[5, 17, 42]])
    acc = collect_saliency(model, tokens)
    record = prune(tiny_moe, str(tmp_path / "p"), "reap", 0.25, acc=acc)
    for layer, removed in enumerate(record["pruned"]):
        assert len(removed) == 2 and all(acc.count[layer, e] == 0 for e in removed)
    pruned = load_model(str(tmp_path / "p"))
    assert pruned.arch.num_experts == 6 and pruned.arch.num_experts_per_tok == 2
    torch.testing.assert_close(forward_logits(pruned.model, tokens), forward_logits(model, tokens),
                               rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "p" / "reap.json").read_text())["pruned"] == record["pruned"]


def test_top_k_larger_than_remaining_is_an_error(tiny_moe, tmp_path):
    with pytest.raises(InvalidParameterError, match="num_experts_per_tok"):
        prune_checkpoint(tiny_moe, str(tmp_path / "x"), [list(range(7)), list(range(7))])


@pytest.mark.slow
def test_real_moe_pruning_beats_random(tmp_path):
    """On the MoEfied SmolLM2 (E=8, k=4), held-out perplexity: REAP and frequency both <= random.

    TECHNIQUES.md also expects REAP <= frequency on a *trained* MoE. On this MoEfied model it does not
    hold (measured: none 245; 25%: REAP 428, frequency 296, random 860; 50%: REAP 817, frequency 720,
    random 96044): its router was fit with a near-zero temperature, so g_j is ~1/k and S_j reduces to
    the mean ||f_j||, which SmolLM2's rare massive-activation tokens (FFN outputs up to ~1.4e4)
    dominate; frequency is the better signal here. That ordering is printed, not asserted.
    """
    from tierserve.tools.moefy import ensure_moe_model

    folder = ensure_moe_model()
    tok = AutoTokenizer.from_pretrained(folder)
    calib = austen_token_windows(tok, CALIBRATION_NOVELS, 8, 256)
    heldout = austen_token_windows(tok, HELDOUT_NOVELS, 8, 256)
    acc = collect_saliency(load_model(folder).model, calib)
    table = {"none": perplexity(load_model(folder).model, heldout)}
    for ratio in (0.25, 0.5):
        for method in ("reap", "frequency", "random"):
            out = str(tmp_path / f"{method}-{ratio}")
            prune(folder, out, method, ratio, acc=acc)
            table[(method, ratio)] = perplexity(load_model(out).model, heldout)
    print(table)
    for ratio in (0.25, 0.5):
        assert table[("reap", ratio)] <= table[("random", ratio)], table
        assert table[("frequency", ratio)] <= table[("random", ratio)], table
        assert table["none"] <= min(table[(m, ratio)] for m in ("reap", "frequency", "random")), table

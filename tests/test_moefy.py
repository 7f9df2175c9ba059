"""MoEfication of SmolLM2 into a Mixtral-format MoE (tierserve.tools.moefy)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tierserve.models.loader import load_model
from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows, capture_mlp_inputs, forward_logits
from tierserve.tools.clustering import balanced_kmeans
from tierserve.tools.moefy import MoefyConfig, ensure_moe_model, moefy

TINY = dict(calib_windows=2, seq_len=64, kmeans_iters=3)


@pytest.fixture(scope="module")
def heldout(smollm_folder):
    return austen_token_windows(AutoTokenizer.from_pretrained(smollm_folder), HELDOUT_NOVELS, 2, 48)


@pytest.fixture(scope="module")
def dense_model(smollm_folder):
    return load_model(smollm_folder).model


def test_balanced_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=gen)
    truth = torch.arange(40) % 4
    feats = centers[truth] + 0.05 * torch.randn(40, 16, generator=gen)
    labels = balanced_kmeans(feats, 4, seed=0)
    assert torch.bincount(labels).tolist() == [10] * 4
    for c in range(4):  # each planted cluster maps to exactly one found cluster
        assert len(set(labels[truth == c].tolist())) == 1


def test_all_experts_zero_router_reproduces_dense(tmp_path, smollm_folder, dense_model, heldout):
    """k = E, zero router: weights 1/E, w2 scaled by E -> the dense FFN (TECHNIQUES.md check).

    Per block in float64 the MoE equals the dense FFN to 1e-12 relative. End to end in float32 the
    logits differ by ~1.3e-4 (|logits| up to ~40): SmolLM2's FFN outputs reach ~1.4e4, so summing
    8 partial matmuls instead of one moves float32 rounding by ~1 ulp of those values.
    """
    out = str(tmp_path / "exact")
    moefy(smollm_folder, out, MoefyConfig(num_experts=8, top_k=8, router="zero", **TINY))
    moe = load_model(out)
    assert moe.arch.architecture == "MixtralForCausalLM" and moe.arch.num_experts == 8
    diff = (forward_logits(moe.model, heldout) - forward_logits(dense_model, heldout)).abs().max()
    assert diff < 3e-4, float(diff)
    inputs = capture_mlp_inputs(dense_model, heldout[:1])
    for x, d_layer, m_layer in zip(inputs, dense_model.layers, moe.model.layers):
        d64, m64 = copy.deepcopy(d_layer.mlp).double(), copy.deepcopy(m_layer.mlp).double()
        with torch.no_grad():
            ref, got = d64(x.double()), m64(x.double())
        assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()

def test_moefy_is_deterministic(tmp_path, smollm_folder):
    cfg = MoefyConfig(num_experts=4, top_k=2, **TINY)
    moefy(smollm_folder, str(tmp_path / "a"), cfg)
    moefy(smollm_folder, str(tmp_path / "b"), cfg)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg_json = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg_json["num_local_experts"] == 4 and cfg_json["num_experts_per_tok"] == 2
    assert cfg_json["intermediate_size"] == 1536 // 4


@pytest.fixture(scope="module")
def moe_folder():
    return ensure_moe_model()  # E=8, k=4, built once into the user cache


def test_engine_logits_match_transformers(moe_folder, heldout):
    from transformers import MixtralForCausalLM

    ours = forward_logits(load_model(moe_folder).model, heldout)
    hf = MixtralForCausalLM.from_pretrained(moe_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(heldout).logits
    # float32 rounding: eager RMSNorm on the CPU sums its squares in another order than transformers'
    # (kernels/decoder_rows_cpu.py): 1.5e-4 measured on logits up to 38 (4e-6 of their scale); with torch's
    # form the two were equal. A wrong expert or layer is off by far more than 2e-5 of the scale.
    assert (ours - ref).abs().max() <= 2e-5 * ref.abs().max(), float((ours - ref).abs().max())


def test_router_beats_random_on_heldout_text(moe_folder, dense_model, heldout):
    """Top-1 accuracy of the fitted router vs the group with the largest output norm, on unseen novels."""
    moe = load_model(moe_folder).model
    inputs = capture_mlp_inputs(dense_model, heldout)
    gen = torch.Generator().manual_seed(0)
    fitted, rand = [], []
    for x, layer in zip(inputs, moe.layers):
        block = layer.mlp
        with torch.no_grad():
            norms = torch.stack([e(x).norm(dim=-1) for e in block.experts], dim=1)
            truth = norms.argmax(-1)
            fitted.append(float((block.gate(x).argmax(-1) == truth).float().mean()))
            random_gate = torch.randn(block.gate.weight.shape, generator=gen)
            rand.append(float(((x @ random_gate.T).argmax(-1) == truth).float().mean()))
    assert sum(fitted) / len(fitted) > 0.5
    assert sum(fitted) / len(fitted) > 2 * sum(rand) / len(rand)

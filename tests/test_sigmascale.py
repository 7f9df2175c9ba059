"""SigmaScale: exact at full rank, beats truncated SVD and the ASVD start on a real SmolLM2 FFN layer."""

from __future__ import annotations

import pytest
import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.sigmascale import rank_for, sigmascale_factorize, top_k_svd

PARAGRAPHS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.",
    "The river winds slowly through the valley, past old stone bridges and fields of wheat. In the autumn the "
    "farmers gather the harvest, and the children run along the banks collecting chestnuts before the first "
    "frost arrives.",
    "Computers store numbers in binary. A floating point number has a sign, an exponent and a mantissa; the "
    "exponent says how large the number is and the mantissa holds its significant digits.",
]
LAYER = "layers.3.mlp.down_proj"


def test_top_k_svd_matches_linalg_svd():
    g = torch.Generator().manual_seed(0)
    for shape in [(30, 50), (50, 30)]:
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, vh = top_k_svd(m, 7)
        ref = torch.linalg.svd(m, full_matrices=False)
        torch.testing.assert_close(s, ref.S, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((u * s[:7]) @ vh, (ref.U[:, :7] * ref.S[:7]) @ ref.Vh[:7], rtol=1e-9, atol=1e-9)


def test_full_rank_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    x = torch.randn(200, 80, generator=g) * torch.linspace(0.1, 3.0, 80)
    r = sigmascale_factorize(w, x, rank=48, steps=5)
    assert r.A.shape == (48, 48) and r.B.shape == (48, 80)
    assert (r.A @ r.B - w).abs().max() < 1e-4
    assert r.loss < 1e-10


@pytest.fixture(scope="module")
def ffn_layer(smollm_folder):
    """A real FFN weight of SmolLM2 and the inputs it sees on a few English paragraphs."""
    from transformers import AutoTokenizer

    from tierserve.kernels.kv_pages import allocate_kv_cache
    from tierserve.kernels.paged_attention import AttentionMetadata
    from tierserve.kernels.quant.transform import capture_activations
    from tierserve.models.context import ForwardContext
    from tierserve.models.loader import load_model

    model = load_model(smollm_folder).model
    tok = AutoTokenizer.from_pretrained(smollm_folder)

    def run(m):
        for text in PARAGRAPHS:
            ids = tok.encode(text)
            spec = m.kv_spec(16)
            nb = spec.blocks_for_tokens(len(ids))
            meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(nb))], 16)
            with torch.inference_mode():
                m(torch.tensor(ids), torch.arange(len(ids)), ForwardContext(meta, allocate_kv_cache(spec, nb)))

    x = capture_activations(model, run, [LAYER])[LAYER].clone()
    w = dict(model.named_modules())[LAYER].weight.detach().clone()
    return w, x


def test_beats_truncated_svd_and_asvd_start(ffn_layer):
    w, x = ffn_layer
    r = sigmascale_factorize(w, x, rank=64, steps=8)
    assert r.loss <= r.loss_svd and r.loss <= r.loss_start and r.loss < r.loss_start  # Adam made progress
    # independent check of the reported losses: plain truncated SVD by torch.linalg.svd
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    svd_hat = (u[:, :64] * s[:64]) @ vh[:64]
    xd = x.double()

    def rel(w_hat):
        return float(((w.double() - w_hat) @ xd.t()).pow(2).sum() / (w.double() @ xd.t()).pow(2).sum())

    assert r.loss_svd == pytest.approx(rel(svd_hat), rel=1e-6)
    assert r.loss == pytest.approx(rel((r.A @ r.B).double()), rel=1e-4)
    assert 1 < r.effective_rank <= min(w.shape)
    print(f"\nSigmaScale {LAYER} rank 64, {x.shape[0]} tokens: relative loss {r.loss:.4f} "
          f"(ASVD start {r.loss_start:.4f}, truncated SVD {r.loss_svd:.4f}), effective rank {r.effective_rank:.1f}")


def test_format_with_calibration(ffn_layer):
    w, x = ffn_layer
    fmt = get_format("sigmascale", keep_ratio=0.1, steps=2)
    k = rank_for(tuple(w.shape), None, 0.1)
    assert k == int(0.1 * 576 * 1536 / (576 + 1536))
    with pytest.raises(InvalidParameterError, match="calibration"):
        fmt.quantize(w, f"{LAYER}.weight")
    packed = fmt.quantize(w, f"{LAYER}.weight", activations=x)
    assert packed.tensors["A"].shape == (576, k) and packed.tensors["B"].shape == (k, 1536)
    assert packed.nbytes <= 0.1 * w.numel() * 4 + 4 * (576 + 1536)
    mod = QuantizedLinear(fmt, packed, None)
    torch.testing.assert_close(mod(x[:5]), x[:5] @ fmt.dequantize(packed).t(), rtol=1e-4, atol=1e-4)


def test_bad_options():
    with pytest.raises(InvalidParameterError, match="rank"):
        get_format("sigmascale")
    with pytest.raises(InvalidParameterError, match="keep_ratio"):
        get_format("sigmascale", keep_ratio=1.5)

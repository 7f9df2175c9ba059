"""OffQ's rotation and offset with quantization off (tierserve.kernels.quant.offq).

* the subspace iteration finds eigh's top eigenpair; the reflection maps the top eigenvector to e_0, is orthogonal and symmetric (dense R built here);
* on inputs with a strong outlier direction and a mean, channel 0 after the rotation carries the share
  lambda_max / trace of the energy (eigenvalues computed here) and has zero mean after the offset;
* u = e_0 (already aligned) gives the identity;
* one OffQLinear equals its linear (bias folded), with and without a bias;
* SmolLM2 with every linear rotated (calibration on Austen text) gives the original logits at fp32 tolerance;
* bad input: too few calibration rows, missing calibration, width mismatch.
"""

from __future__ import annotations

import torch
from torch import nn

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.offq import (OffQLinear, apply_householder, fit_site, householder_to_e0, offq_linear,
                                         offq_rotate_model)


def _outlier_inputs(seed: int, n: int = 400, k: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(k, generator=g)
    direction /= direction.norm()
    return torch.randn(n, k, generator=g) + (8.0 + torch.randn(n, 1, generator=g)) * direction


def test_reflection_maps_top_eigenvector_to_e0():
    x = _outlier_inputs(0).double()
    site = fit_site(x)
    k = x.shape[1]
    r = torch.eye(k, dtype=torch.float64) - 2.0 * torch.outer(site.v, site.v) / (site.v @ site.v)
    torch.testing.assert_close(r @ r.T, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(r, r.T)
    values, vectors = torch.linalg.eigh(x.T @ x / x.shape[0])
    u = vectors[:, -1]
    mapped = r @ u
    assert abs(abs(float(mapped[0])) - 1.0) < 1e-12 and float(mapped[1:].abs().max()) < 1e-12
    torch.testing.assert_close(apply_householder(x, site.v), x @ r.T)
    rotated = x @ r.T
    share = float((rotated[:, 0] ** 2).sum() / (rotated ** 2).sum())
    assert abs(share - float(values[-1] / values.sum())) < 1e-10 and abs(site.top_share - share) < 1e-10
    assert share > 0.7  # the outlier direction dominates
    assert abs(float(rotated[:, 0].mean()) - site.offset) < 1e-10
    assert abs(float((rotated[:, 0] - site.offset).mean())) < 1e-10


def test_top_eigenpair_matches_eigh():
    from tierserve.kernels.quant.offq import top_eigenpair

    x = _outlier_inputs(2, k=300).double()  # wider than EXACT_EIGH: the subspace iteration
    m = x.T @ x / x.shape[0]
    values, vectors = torch.linalg.eigh(m)
    top, u = top_eigenpair(m)
    assert abs(top - float(values[-1])) < 1e-9 * float(values[-1])
    assert abs(abs(float(u @ vectors[:, -1])) - 1.0) < 1e-12
    few = x[:10]  # fewer rows than channels: the Gram-matrix route
    values, vectors = torch.linalg.eigh(few.T @ few / 10)
    site = fit_site(few)
    r = torch.eye(300, dtype=torch.float64) - 2.0 * torch.outer(site.v, site.v) / (site.v @ site.v)
    assert abs(abs(float((r @ vectors[:, -1])[0])) - 1.0) < 1e-12
    assert abs(site.top_share - float(values[-1] / values.sum())) < 1e-10


def test_aligned_direction_is_identity():
    v = householder_to_e0(-torch.eye(5, dtype=torch.float64)[0])  # u = -e_0: sign already u_0 <= 0
    x = torch.randn(3, 5, dtype=torch.float64)
    r = torch.eye(5, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)
    assert float((r @ -torch.eye(5, dtype=torch.float64)[0] - torch.eye(5, dtype=torch.float64)[0]).abs().max()) < 1e-15
    assert torch.equal(apply_householder(x, torch.zeros(5, dtype=torch.float64)), x)


@pytest.mark.parametrize("bias", [True, False])
def test_offq_linear_equals_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10, bias=bias)
    x = _outlier_inputs(1).float()
    rotated = offq_linear(lin, fit_site(x))
    assert isinstance(rotated, OffQLinear)
    torch.testing.assert_close(rotated(x), lin(x), rtol=1e-5, atol=1e-5)


def test_smollm2_logits_unchanged_with_every_linear_rotated(smollm_folder):
    from transformers import AutoTokenizer

    from tierserve.kernels.quant.transform import DEFAULT_SKIP, linear_modules, matches
    from tierserve.models.loader import load_model
    from tierserve.tools.calibration import (HELDOUT_NOVELS, austen_token_windows, calibration_activations,
                                             forward_logits)

    model = load_model(smollm_folder).model.eval()
    tok = AutoTokenizer.from_pretrained(smollm_folder)
    names = [n for n in linear_modules(model) if not matches(n, DEFAULT_SKIP)]
    calib = calibration_activations(model, tok, names, 1, 32)
    held = austen_token_windows(tok, HELDOUT_NOVELS, 1, 32)
    want = forward_logits(model, held)
    sites = offq_rotate_model(model, calib)
    assert len(sites) == len(names) == sum(isinstance(m, OffQLinear) for m in model.modules())
    assert max(s.top_share for s in sites.values()) > 0.5  # some sites are dominated by one direction
    got = forward_logits(model, held)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bad_input():
    with pytest.raises(InvalidParameterError, match="at least 2"):
        fit_site(torch.randn(1, 8))
    with pytest.raises(InvalidParameterError, match="channels"):
        offq_linear(nn.Linear(8, 4), fit_site(torch.randn(10, 6)))
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(InvalidParameterError, match="calibration"):
        offq_rotate_model(model, {})

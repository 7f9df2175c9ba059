"""OffQ's rotation and shared offset (arXiv 2606.07116; our reading in shared TECHNIQUES.md), quantization off.

OffQ makes activations uniform enough for 4-bit per-token quantization by
moving their outlier direction into one channel and removing a shared offset
there. Per activation site (the input of one linear; the fused ``qkv_proj``
and ``gate_up_proj`` are one site each), from calibration inputs ``X [n, in]``:

1. ``M = X^T X / n``, the uncentred second moment (float64); ``u`` its top
   eigenvector, its sign chosen so that ``u_0 <= 0``: by ``eigh`` for
   matrices up to ``EXACT_EIGH`` = 256 wide, else by subspace
   iteration (``SUBSPACE`` = 8 vectors from a seeded start, ``POWER_STEPS`` =
   100 steps with QR, then Rayleigh-Ritz; converges like
   ``(lambda_9 / lambda_1)^100``; a full ``eigh`` of a 1536-wide moment takes
   tens of seconds on a loaded CPU). Any unit ``u`` still gives an exact
   rotation: the accuracy of ``u`` only affects how much energy lands in
   channel 0. With fewer calibration rows n than channels the iteration runs
   on the n x n Gram matrix ``X X^T / n`` (same nonzero eigenvalues; ``u``
   is ``X^T a`` normalised, ``a`` its top eigenvector);
2. the Householder reflection ``R = I - 2 v v^T / (v^T v)`` with ``v = u - e_0``
   (``R = I`` when ``u = e_0``): symmetric, orthogonal and ``R u = e_0``, so
   ``x' = R x`` carries the dominant direction (the share ``lambda_max /
   trace M`` of the activation energy) in channel 0. The sign choice keeps
   ``||v|| >= sqrt(2)``, away from the cancellation at ``u ~ e_0``;
3. the shared offset ``o`` = mean over the calibration tokens of ``x'_0``, and
   ``x'' = x' - o e_0``;
4. ``y = W x + b = W' x'' + (b + o W' e_0)`` with ``W' = W R`` (``R^T = R``):
   the weight is rotated once (in float64, then cast) and ``o W'[:, 0]`` is
   folded into the bias.

``OffQLinear`` computes ``inner(R x - o e_0)`` (the reflection applied in
float64 as ``x - (2 / v^T v) (x . v) v``), ``inner`` an ``nn.Linear`` holding
``W'`` and the folded bias. With quantization off a rotated model's logits
equal the original's up to fp32 rounding; the 4-bit weights and per-token
activations of OffQ build on this in the ``offq`` weight format
(offq_format.py; KV in 4 bits is the engine's kv4). Tests
(tests/test_offq_rotation.py): ``R u = e_0`` and orthogonality, channel 0's
energy share and zero mean after the offset on inputs with an outlier
direction, the identity case, SmolLM2's logits unchanged with every linear
rotated, bad calibration input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tierserve.errors import InvalidParameterError

MIN_CALIBRATION_ROWS = 2  # one row gives a rank-1 moment: any direction orthogonal to it is arbitrary
SUBSPACE = 8
POWER_STEPS = 100
EXACT_EIGH = 256  # matrices up to this size get a direct eigh (cheaper than the iteration)


@dataclass(frozen=True)
class OffQSite:
    """One site's rotation and offset: Householder vector ``v`` (float64 [in]), ``offset``, ``top_share``."""

    v: torch.Tensor
    offset: float
    top_share: float  # lambda_max / trace of the second moment: channel 0's energy share after rotation


def householder_to_e0(u: torch.Tensor) -> torch.Tensor:
    """``v`` with ``(I - 2 v v^T / v^T v) u = e_0`` for a unit ``u`` with ``u_0 <= 0`` (zero vector: identity)."""
    v = u.double().clone()
    v[0] -= 1.0
    return v


def apply_householder(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``R x`` row-wise for ``x [..., in]`` (float64 arithmetic, result in float64)."""
    x = x.double()
    vv = float(v @ v)
    if vv == 0.0:
        return x
    return x - (2.0 / vv) * (x @ v)[..., None] * v


def fit_site(activations: torch.Tensor, name: str = "activations") -> OffQSite:
    """Steps 1-3 of the module doc on calibration inputs ``[..., in]``."""
    x = activations.reshape(-1, activations.shape[-1]).double()
    if x.shape[0] < MIN_CALIBRATION_ROWS:
        raise InvalidParameterError(name, f"OffQ needs at least {MIN_CALIBRATION_ROWS} calibration rows, "
                                          f"got {x.shape[0]}")
    n = x.shape[0]
    if n < x.shape[1]:  # same nonzero spectrum, smaller matrix: u = X^T a / ||X^T a|| for a of X X^T / n
        top, a = top_eigenpair(x @ x.T / n)
        u = x.T @ a
        u = u / u.norm()
    else:
        top, u = top_eigenpair(x.T @ x / n)
    if u[0] > 0:
        u = -u
    v = householder_to_e0(u)
    trace = float((x * x).sum()) / n
    offset = float(apply_householder(x, v)[:, 0].mean())
    return OffQSite(v, offset, top / trace if trace > 0 else 0.0)


def top_eigenpair(moment: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue and its unit eigenvector of a symmetric PSD ``moment`` (subspace iteration)."""
    if moment.shape[0] <= EXACT_EIGH:
        values, vectors = torch.linalg.eigh(moment)
        return float(values[-1]), vectors[:, -1]
    k = min(SUBSPACE, moment.shape[0])
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(moment.shape[0], k, generator=g, dtype=torch.float64)).Q
    for _ in range(POWER_STEPS):
        basis = torch.linalg.qr(moment @ basis).Q
    values, vectors = torch.linalg.eigh(basis.T @ moment @ basis)
    u = basis @ vectors[:, -1]
    return float(values[-1]), u / u.norm()


class OffQLinear(nn.Module):
    """``inner(R x - offset e_0)``; ``inner`` holds ``W R`` and the bias with ``offset W R e_0`` folded in."""

    def __init__(self, inner: nn.Module, v: torch.Tensor, offset: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("v", v.double().clone())
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = apply_householder(x, self.v)
        xr[..., 0] -= self.offset
        return self.inner(xr.to(x.dtype))

    def extra_repr(self) -> str:
        return f"offset={self.offset:.6g}"


def offq_linear(linear: nn.Linear, site: OffQSite) -> OffQLinear:
    """Step 4: the OffQLinear equal to ``linear`` (rotated weight, offset folded into the bias)."""
    if site.v.shape[0] != linear.in_features:
        raise InvalidParameterError("site", f"rotation has {site.v.shape[0]} channels, the linear takes "
                                            f"{linear.in_features}")
    w = apply_householder(linear.weight.detach(), site.v)  # rows of W R (R symmetric)
    bias = site.offset * w[:, 0]
    if linear.bias is not None:
        bias = bias + linear.bias.detach().double()
    inner = nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=linear.weight.dtype,
                      device=linear.weight.device)
    with torch.no_grad():
        inner.weight.copy_(w)
        inner.bias.copy_(bias)
    return OffQLinear(inner, site.v, site.offset)


@torch.no_grad()
def offq_rotate_model(model: nn.Module, calibration: Mapping[str, torch.Tensor],
                      skip: tuple[str, ...] = ("embed_tokens", "lm_head", "logits_head")) -> dict[str, OffQSite]:
    """Swap every linear not matching ``skip`` for its OffQLinear fitted on ``calibration[name]``; the sites."""
    from tierserve.kernels.quant.transform import linear_modules, matches, swap_module

    targets = {n: m for n, m in linear_modules(model).items() if not matches(n, skip)}
    missing = [n for n in targets if n not in calibration]
    if missing:
        raise InvalidParameterError("calibration", f"no calibration inputs for {missing[:3]}")
    sites = {}
    for name, linear in targets.items():
        sites[name] = fit_site(calibration[name], f"calibration[{name!r}]")
        swap_module(model, linear, offq_linear(linear, sites[name]))
    return sites

"""SigmaScale: activation-aware low-rank factorisation with learned diagonal scalings.

Paper: arXiv 2606.07098 (SigmaScale; algorithm as summarised in TECHNIQUES.md,
details inferred). For a weight ``W [m, n]`` and rank ``k``:

    W_hat = D_r^-1 SVD_k(D_r W D_c) D_c^-1,   D_r = diag(exp(a)), D_c = diag(exp(b))

``a`` (m) and ``b`` (n) are learned with Adam (lr 0.01, 100 steps by default)
through the SVD (computed as ``eigh`` of the smaller Gram matrix, in float64)
to minimise the layer's output error on calibration activations ``X [tokens, n]``:

    L(a, b) = ||(W - W_hat) X^T||_F^2 = tr((W - W_hat) G (W - W_hat)^T),  G = X^T X.

Initialisation: ``init="asvd"`` (default) sets ``a = 0`` and ``b_j = 0.5 *
log(mean_t |X_tj|)`` (ASVD's activation scaling, alpha = 0.5); ``init="ones"``
starts from ``a = b = 0``, i.e. plain truncated SVD. The parameters with the
lowest loss seen (the start included) are kept, so the result is never worse
than its start. Steps whose gradient is not finite (near-degenerate singular
values make the SVD gradient blow up) are skipped.

Deployed as two factors ``A = D_r^-1 U_k S_k`` [m, k] and ``B = V_k^T D_c^-1``
[k, n]; ``linear(x) = (x B^T) A^T + bias`` (``k (m + n)`` weights instead of
``m n``). The rank is given directly (``rank``) or as the share of the weight's
parameters kept (``keep_ratio``: ``k = max(1, floor(keep_ratio m n / (m + n)))``,
capped at ``min(m, n)``). The report includes the effective rank
``exp(-sum p_i log p_i)``, ``p_i = sigma_i / sum sigma`` of ``D_r W D_c``.

The format declares ``needs_calibration = True`` (the hook of
``tierserve.kernels.quant.transform``): ``quantize(weight, name, activations=X)``;
without activations it raises InvalidParameterError. ``sigmascale_factorize``
is the function to call directly. Tests: on a real SmolLM2 FFN layer with real
activations the loss is <= plain truncated SVD and <= the ASVD start; at full
rank the reconstruction is exact (1e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat, register_format

ASVD_ALPHA = 0.5
INITS = ("asvd", "ones")


@dataclass
class SigmaScaleResult:
    """Factors A [m, k], B [k, n] and what the optimisation achieved (losses relative to ||W X^T||^2)."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    loss: float
    loss_start: float
    loss_svd: float
    effective_rank: float
    steps_taken: int


def activation_loss(error: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """||E X^T||_F^2 for E [m, n]; ``x_t`` is X^T [n, t] or any F with F F^T = X^T X (see ``gram_factor``)."""
    return (error @ x_t).pow(2).sum()


def gram_factor(x: torch.Tensor) -> torch.Tensor:
    """F [n, min(t, n)] with F F^T = X^T X: X^T itself when tokens <= n, else Q diag(sqrt(lambda)) of X^T X."""
    if x.shape[0] <= x.shape[1]:
        return x.t()
    evals, evecs = torch.linalg.eigh(x.t() @ x)
    return evecs * evals.clamp_min(0).sqrt()[None, :]


def asvd_log_scale(activations: torch.Tensor, alpha: float = ASVD_ALPHA) -> torch.Tensor:
    """ASVD column scaling in log form: alpha * log(mean |X_j|) (clamped away from 0)."""
    return alpha * activations.abs().mean(0).clamp_min(1e-6).log()


def effective_rank(singular_values: torch.Tensor) -> float:
    p = singular_values / singular_values.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def top_k_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k [r, k], s [min(r, c)] descending, V_k^T [k, c]) of m via ``eigh`` of its smaller Gram matrix.

    For r <= c: M M^T = U diag(s^2) U^T and V_k^T = S_k^-1 U_k^T M (else the
    transpose). ``eigh`` of a min(r, c)-square matrix and its backward are far
    cheaper on CPU than ``linalg.svd`` of the rectangle; run in float64.
    """
    if m.shape[0] > m.shape[1]:
        v, s, uh = top_k_svd(m.t(), rank)
        return uh.t(), s, v.t()
    evals, evecs = torch.linalg.eigh(m @ m.t())
    s = evals.flip(0).clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :rank]
    vh = (u.t() @ m) / s[:rank, None].clamp_min(torch.finfo(m.dtype).tiny)
    return u, s, vh


def scaled_factors(weight: torch.Tensor, log_r: torch.Tensor, log_c: torch.Tensor, rank: int):
    """(A, B, singular values) of D_r^-1 SVD_k(D_r W D_c) D_c^-1, differentiable in log_r/log_c."""
    scaled = log_r.exp()[:, None] * weight * log_c.exp()[None, :]
    u, s, vh = top_k_svd(scaled, rank)
    a = (u * s[:rank]) / log_r.exp()[:, None]
    b = vh / log_c.exp()[None, :]
    return a, b, s


def rank_for(shape: tuple[int, int], rank: int | None, keep_ratio: float | None) -> int:
    m, n = shape
    k = rank if rank is not None else max(1, math.floor(keep_ratio * m * n / (m + n)))
    return min(k, m, n)


def sigmascale_factorize(weight: torch.Tensor, activations: torch.Tensor, rank: int, steps: int = 100,
                         lr: float = 0.01, init: str = "asvd") -> SigmaScaleResult:
    """Learn D_r, D_c (see module docstring) and return the deployed factors and losses."""
    if init not in INITS:
        raise InvalidParameterError("init", f"must be one of {INITS}, got {init!r}")
    with torch.enable_grad():  # callers such as quantize_model run under no_grad
        return _factorize(weight, activations, rank, steps, lr, init)


def _factorize(weight: torch.Tensor, activations: torch.Tensor, rank: int, steps: int, lr: float,
               init: str) -> SigmaScaleResult:
    w = weight.detach().double()
    x = activations.detach().reshape(-1, w.shape[1]).double()
    x_t = gram_factor(x)
    norm = float(activation_loss(w, x_t))

    def loss_of(log_r, log_c):
        a, b, s = scaled_factors(w, log_r, log_c, rank)
        return activation_loss(w - a @ b, x_t) / norm, a, b, s

    zeros_r, zeros_c = torch.zeros(w.shape[0], dtype=w.dtype), torch.zeros(w.shape[1], dtype=w.dtype)
    with torch.no_grad():
        loss_svd = float(loss_of(zeros_r, zeros_c)[0])
    log_r = zeros_r.clone().requires_grad_(True)
    log_c = (asvd_log_scale(x) if init == "asvd" else zeros_c).clone().requires_grad_(True)
    opt = torch.optim.Adam([log_r, log_c], lr=lr)
    best = (math.inf, None, None)
    loss_start, taken = math.nan, 0
    for step in range(steps + 1):
        opt.zero_grad()
        loss, _, _, _ = loss_of(log_r, log_c)
        value = loss.item()
        if step == 0:
            loss_start = value
        if value < best[0]:
            best = (value, log_r.detach().clone(), log_c.detach().clone())
        if step == steps:
            break
        loss.backward()
        if torch.isfinite(log_r.grad).all() and torch.isfinite(log_c.grad).all():
            opt.step()
            taken += 1
    with torch.no_grad():
        loss, a, b, s = loss_of(best[1], best[2])
    return SigmaScaleResult(A=a.to(weight.dtype), B=b.to(weight.dtype), rank=rank, loss=float(loss),
                            loss_start=loss_start, loss_svd=loss_svd, effective_rank=effective_rank(s),
                            steps_taken=taken)


@register_format
class SigmaScaleFormat(WeightFormat):
    """Low-rank W ~ A B with learned row/column scalings; needs calibration activations."""

    name = "sigmascale"
    needs_calibration = True

    def __init__(self, rank: int | None = None, keep_ratio: float | None = None, steps: int = 100,
                 lr: float = 0.01, init: str = "asvd"):
        if (rank is None) == (keep_ratio is None):
            raise InvalidParameterError("rank", "sigmascale needs exactly one of rank or keep_ratio")
        if rank is not None and rank < 1:
            raise InvalidParameterError("rank", f"must be >= 1, got {rank}")
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise InvalidParameterError("keep_ratio", f"must be in (0, 1], got {keep_ratio}")
        if init not in INITS:
            raise InvalidParameterError("init", f"must be one of {INITS}, got {init!r}")
        self.rank, self.keep_ratio, self.steps, self.lr, self.init = rank, keep_ratio, steps, lr, init

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight",
                 activations: torch.Tensor | None = None) -> PackedWeight:
        self.check_shape(tensor_name, tuple(weight.shape))
        if activations is None:
            raise InvalidParameterError(tensor_name, "sigmascale needs calibration activations (activations=X)")
        if activations.shape[-1] != weight.shape[1]:
            raise InvalidParameterError(tensor_name, f"activations have {activations.shape[-1]} features, "
                                                     f"the weight has {weight.shape[1]} in-features")
        k = rank_for(tuple(weight.shape), self.rank, self.keep_ratio)
        r = sigmascale_factorize(weight, activations, k, self.steps, self.lr, self.init)
        meta = {"rank": k, "loss": r.loss, "loss_svd": r.loss_svd, "effective_rank": r.effective_rank}
        return PackedWeight(self.name, tuple(weight.shape), {"A": r.A.contiguous(), "B": r.B.contiguous()}, meta)

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        return packed.tensors["A"] @ packed.tensors["B"]

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        a, b = packed.tensors["A"].to(x.dtype), packed.tensors["B"].to(x.dtype)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, b), a, bias)

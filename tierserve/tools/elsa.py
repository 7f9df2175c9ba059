"""ELSA: pruning as constrained optimisation of the language-model loss, solved with ADMM.

Problem: minimise ``L(W)`` (next-token cross-entropy on calibration text)
subject to every pruned weight matrix lying in a sparsity set ``C`` (per row
``keep`` entries, or 2:4; tierserve/tools/sparsity.py). ADMM splits it with a
copy ``Z`` in ``C`` and a scaled dual ``U``:

    W <- a few steps on  L(W) + rho/2 sum ||W - Z + U||^2
    Z <- project_C(W + U)            (largest magnitudes kept)
    U <- U + W - Z
    rho <- min(rho * rho_growth, rho_max)

starting from ``W`` = the dense weights, ``Z = project_C(W)`` (the magnitude
mask) and ``U = 0``; or, with ``init="wanda"``, from ``W = Z`` = the Wanda-pruned
weights (the caller's ``start``: ``W * mask(|W_ij| ||X_j||)``, prune_weights.py), so the
loss descends from the better one-shot solution and the magnitude projections keep its
support unless the loss moves it. The growing penalty pulls ``W`` onto ``C`` while the
loss term moves the surviving weights (and the choice of survivors) to where
the pruned model predicts text best; the result is the final ``Z``. Only the
pruned matrices (every linear of the decoder layers) are trained; embeddings,
norms and the head stay as they are.

A W-step is proximal: an Adam step on ``L`` (beta 0.9 / 0.999, eps 1e-8),
then the exact minimiser of the penalty plus ``1/2 ||W - W_adam||^2``,
``W <- (W_adam + rho (Z - U)) / (1 + rho)``. Adam moves a weight by about
``lr`` per step, far too little to carry a pruned weight to 0 in a few
steps; the proximal half pulls ``W`` a fraction ``rho / (1 + rho)`` of the
way to ``Z - U`` every step whatever the loss's scale, so the iteration
converges in the steps a CPU allows. Adam is written out here so that ELSA-L
can keep its state in low precision: with ``low_precision`` the two Adam
moments, ``Z`` and ``U`` are stored in bf16 (2 bytes instead of 4 per weight
for each of the four), the update itself computed in fp32.

Defaults (``ElsaConfig``): 12 iterations x 4 steps, lr 2e-4, rho from 0.05
growing x1.5 (to about 4.3 at the last iteration; at most 10), batches of 4
windows. Our reading of the paper
(arXiv 2510.01650; TECHNIQUES.md): its schedule and step counts are larger
than a 2-core CPU allows; these are the CPU-sized defaults, and
benchmarks/pruning.py states what they reach.

The model is the transformers implementation of the folder's architecture
(differentiable, trained in fp32 on CPU); the pruned weights are written
into a copy of the folder that tierserve serves like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.tools.sparsity import check_sparsity, project

INITS = ("magnitude", "wanda")
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class ElsaConfig:
    sparsity: float
    pattern: str = "unstructured"
    iterations: int = 12
    steps_per_iteration: int = 4
    lr: float = 2e-4
    rho: float = 0.05
    rho_growth: float = 1.5
    rho_max: float = 10.0
    batch_size: int = 4
    low_precision: bool = False  # ELSA-L
    init: str = "magnitude"  # or "wanda": start from the Wanda solution (module doc)

    def __post_init__(self) -> None:
        check_sparsity(self.pattern, self.sparsity)
        for name in ("iterations", "steps_per_iteration", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.init not in INITS:
            raise InvalidParameterError("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("lr", "rho"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(name, f"must be > 0, got {getattr(self, name)}")
        if self.rho_growth < 1.0:
            raise InvalidParameterError("rho_growth", f"must be >= 1, got {self.rho_growth}")


@dataclass
class _State:
    """ADMM and Adam state of one pruned matrix (``dtype``: fp32, or bf16 for ELSA-L)."""

    z: torch.Tensor
    u: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch [B, L]`` (positions 0..L-2 predict 1..L-1)."""
    logits = model(input_ids=batch).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def elsa_prune(model, targets: dict[str, torch.nn.Parameter], windows: torch.Tensor, cfg: ElsaConfig,
               progress: Callable[[int, dict], None] | None = None,
               start: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Prune ``targets`` (name -> weight of ``model``) in place; returns one record per iteration.

    Every other parameter of ``model`` is frozen. ``windows [N, L]`` are the
    calibration token windows, taken ``batch_size`` at a time in order,
    cycling. ``start`` (name -> a weight in the sparsity set, e.g. the Wanda
    solution): ``W`` and ``Z`` start there instead of at the dense weights and
    their magnitude projection. After the call each target holds its final ``Z``.
    """
    if windows.shape[0] < cfg.batch_size:
        raise InvalidParameterError("calib_windows", f"ELSA needs at least batch_size = {cfg.batch_size} "
                                                     f"calibration windows, got {windows.shape[0]}")
    dtype = torch.bfloat16 if cfg.low_precision else torch.float32
    for p in model.parameters():
        p.requires_grad_(False)
    states = {}
    for name, w in targets.items():
        if start is not None:
            with torch.no_grad():
                w.copy_(start[name])
        w.requires_grad_(True)
        z = project(w.detach(), cfg.pattern, cfg.sparsity)
        states[name] = _State(z.to(dtype), torch.zeros_like(w, dtype=dtype), torch.zeros_like(w, dtype=dtype),
                              torch.zeros_like(w, dtype=dtype))
    model.train(False)
    rho, step, history = cfg.rho, 0, []
    num_batches = windows.shape[0] // cfg.batch_size
    for it in range(cfg.iterations):
        losses = []
        for _ in range(cfg.steps_per_iteration):
            start = (step % num_batches) * cfg.batch_size
            loss = lm_loss(model, windows[start:start + cfg.batch_size])
            grads = torch.autograd.grad(loss, list(targets.values()))
            step += 1
            with torch.no_grad():
                for (name, w), g in zip(targets.items(), grads):
                    st = states[name]
                    _adam(w, g, st, step, cfg.lr)
                    w.add_(st.z.float() - st.u.float() - w, alpha=rho / (1 + rho))  # proximal penalty step
            losses.append(float(loss.detach()))
        last = it == cfg.iterations - 1
        with torch.no_grad():
            gap = total = 0.0
            for name, w in targets.items():
                st = states[name]
                z = project(w + st.u.float(), cfg.pattern, cfg.sparsity)
                st.u.copy_((st.u.float() + w - z).to(dtype))
                st.z = z if last else z.to(dtype)  # the solution keeps fp32 even under ELSA-L
                gap += float((w - z).square().sum())
                total += float(w.square().sum())
        record = {"iteration": it, "loss": sum(losses) / len(losses), "rho": rho,
                  "relative_gap": (gap / total) ** 0.5 if total else 0.0}
        history.append(record)
        if progress is not None:
            progress(it, record)
        rho = min(rho * cfg.rho_growth, cfg.rho_max)
    with torch.no_grad():
        for name, w in targets.items():
            w.copy_(states[name].z)  # the last Z is the solution
            w.requires_grad_(False)
    return history


def _adam(w: torch.Tensor, g: torch.Tensor, st: _State, step: int, lr: float) -> None:
    """One Adam update of ``w`` with state ``st`` (moments kept in their dtype, arithmetic in fp32)."""
    b1, b2 = BETAS
    m = st.m.float().mul_(b1).add_(g, alpha=1 - b1)
    v = st.v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
    st.m.copy_(m)
    st.v.copy_(v)
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    w.sub_(lr * m_hat / (v_hat.sqrt() + EPS))

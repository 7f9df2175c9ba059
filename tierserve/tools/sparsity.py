"""Sparsity patterns and the one-shot pruning scores that ELSA is compared with.

A mask keeps, for a weight ``W [out, in]`` and a score ``S`` of the same
shape (larger = more important):

* ``unstructured`` at sparsity ``s``: in every row the ``keep = in - round(s in)``
  entries of largest score (per-output comparison groups, as Wanda and
  SparseGPT use; ``torch.topk``), so each row holds exactly ``in - keep``
  pruned entries;
* ``2:4``: in every group of 4 consecutive input columns of a row, the 2 of
  largest score (sparsity 0.5 by construction; ``in`` must be a multiple of 4).

Scores:

* ``magnitude``: ``|W|``;
* ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, X the layer's inputs on
  calibration text (all tokens), so a weight on a loud input channel counts more.

``project(W, pattern, sparsity)`` is the Euclidean projection onto the
pattern's set (keep the largest ``|W|``, zero the rest), the Z-step of ADMM
(tierserve/tools/elsa.py). Plain torch on CPU; tests check every mask against
brute force (tests/test_prune_weights.py).
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError

PATTERNS = ("unstructured", "2:4")


def check_sparsity(pattern: str, sparsity: float) -> None:
    if pattern not in PATTERNS:
        raise InvalidParameterError("pattern", f"must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if pattern == "2:4":
        if sparsity != 0.5:
            raise InvalidParameterError("sparsity", f"the 2:4 pattern prunes exactly 0.5, got {sparsity}")
    elif not 0.0 < sparsity < 1.0:
        raise InvalidParameterError("sparsity", f"must be in (0, 1), got {sparsity}")


def keep_per_row(in_features: int, sparsity: float) -> int:
    """Entries kept per row at ``sparsity`` (at least one)."""
    return max(1, in_features - round(sparsity * in_features))


def mask_from_scores(scores: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """bool ``[out, in]``: True where the weight is kept (module docstring)."""
    check_sparsity(pattern, sparsity)
    out, inp = scores.shape
    if pattern == "2:4":
        if inp % 4:
            raise InvalidParameterError("pattern", f"2:4 needs in_features divisible by 4, got {inp}")
        groups = scores.reshape(out, inp // 4, 4)
        idx = groups.topk(2, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(out, inp)
    idx = scores.topk(keep_per_row(inp, sparsity), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| ||X_j||``; ``input_norms [in]`` the L2 norm of each input channel over calibration tokens."""
    if input_norms.shape != (weight.shape[1],):
        raise InvalidParameterError("input_norms", f"must have shape [{weight.shape[1]}], "
                                                   f"got {list(input_norms.shape)}")
    return weight.abs() * input_norms.to(weight.dtype)[None, :]


def project(weight: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """The nearest weight (Frobenius) with the pattern's sparsity: the largest magnitudes kept."""
    return weight * mask_from_scores(weight.abs(), pattern, sparsity)

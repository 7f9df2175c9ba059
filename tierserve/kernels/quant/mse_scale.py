"""MSE search of the group scale shrink (FP-Quant / MR-GPTQ "mse" scales).

For each group with max magnitude ``amax`` try the candidate maxima
``amax * (1 - 0.8 * i / 100)`` for ``i = 0 .. 99`` (shrinks from 1 down to
0.208). Each candidate goes through the format's own scale encoding
(``encode(amax') -> (scale bytes, effective scale)``: E8M0 for MXFP4, E4M3 and
the global scale for NVFP4), the group is rounded to E2M1 with that scale
(elements beyond 6 * scale clip), and the error ``sum |w - Q(w)|^2.4`` is
measured. Each group keeps its first best candidate (ties keep the earlier,
larger one). Because ``i = 0`` is the plain scale, the searched error is never
above the unsearched error on any group (a test checks it per group).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tierserve.kernels.quant.fp4 import fake_quantize_groups

MSE_STEPS = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4

ScaleEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def group_error(groups: torch.Tensor, scale: torch.Tensor, norm: float = MSE_NORM) -> torch.Tensor:
    """Per-group ``sum |w - Q(w)|^norm`` of E2M1 rounding with effective scales ``scale [G]``."""
    deq = fake_quantize_groups(groups, scale)
    return (groups - deq).abs().pow(norm).sum(-1)


def mse_scale_search(groups: torch.Tensor, encode: ScaleEncoder, steps: int = MSE_STEPS,
                     max_shrink: float = MSE_MAX_SHRINK, norm: float = MSE_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale bytes [G], effective scale [G]) for ``groups [G, gs]`` (see module docstring)."""
    groups = groups.float()
    amax = groups.abs().amax(-1)
    best_bytes, best_scale = encode(amax)
    best_err = group_error(groups, best_scale, norm)
    for i in range(1, steps):
        cand_bytes, cand_scale = encode(amax * (1 - max_shrink * i / steps))
        err = group_error(groups, cand_scale, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bytes = torch.where(better, cand_bytes, best_bytes)
        best_scale = torch.where(better, cand_scale, best_scale)
    return best_bytes, best_scale

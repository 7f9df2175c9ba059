"""Block-diagonal Hadamard rotation of each linear's input dimension (MR-GPTQ / QuaRot style).

``H_n`` is the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``)
divided by ``sqrt(n)``: symmetric and orthogonal (``H H^T = I``), so ``H^-1 = H``.
``n`` is the quantization group size (32 for MXFP4, 16 for NVFP4) and must be a
power of two. ``R = diag(H_n, ..., H_n)`` acts on the input dimension K of a
linear ``y = x W^T + b`` (K a multiple of n):

    y = (x R) (W R)^T + b      because R R^T = I.

``W' = W R`` is fused into the weight offline (``rotate_weight``) and
``x' = x R`` is applied online (``block_hadamard``); both are the same
operation on the last dimension: reshape to [..., K/n, n] and multiply by H_n.
Rotation spreads an outlier of one input channel over the n channels of its
group, which lowers the group's max and so the FP4 (MXFP4, INT4) rounding
error; it can hurt NVFP4, whose E4M3 scales already adapt finely.

``rotate_model(model, block)`` is the fp32 transform: every ``nn.Linear`` becomes
a ``RotatedLinear`` (Hadamard on the activations, then an ``nn.Linear`` holding
``W R``), so the rotated model computes the same function (tests: logits within
1e-4 on SmolLM2 and a tiny random model). Both ``W R`` (offline) and ``x R``
(online, in ``RotatedLinear``) are computed in float64 and rounded once to the
model dtype: on SmolLM2 that takes the logit difference from ~9e-5 (fp32
rotation) to ~7e-5, the rest being fp32 matmul rounding over 30 layers. The
quantized formats (``fp4_format.py``) rotate activations in their own dtype. The tied LM head (not an
``nn.Linear``) is left as is. A later weight-quantization transform that swaps
``nn.Linear`` modules then quantizes the rotated weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tierserve.errors import InvalidParameterError


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise InvalidParameterError("block", f"the Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def check_rotatable(tensor_name: str, in_features: int, block: int) -> None:
    if in_features % block:
        raise InvalidParameterError(
            tensor_name, f"a block Hadamard of size {block} needs in-features divisible by {block}, got {in_features}")


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x R`` for the block-diagonal R of size-``block`` Hadamards on the last dimension."""
    k = x.shape[-1]
    check_rotatable("x", k, block)
    h = hadamard_matrix(block, dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def rotate_weight(weight: torch.Tensor, block: int, tensor_name: str = "weight") -> torch.Tensor:
    """``W R`` for ``W [out, in]`` (R symmetric, so this is the same op as ``block_hadamard``)."""
    check_rotatable(tensor_name, weight.shape[-1], block)
    return block_hadamard(weight, block)


def rotate_hessian(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """``R^T H R``: the Hessian ``X^T X`` of rotated inputs ``X R``."""
    return block_hadamard(block_hadamard(hessian, block).transpose(0, 1), block).transpose(0, 1)


class RotatedLinear(nn.Module):
    """``inner(x R)`` where ``inner`` holds the rotated weight ``W R`` (an nn.Linear or a quantized one)."""

    def __init__(self, inner: nn.Module, block: int):
        super().__init__()
        self.inner = inner
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(block_hadamard(x.double(), self.block).to(x.dtype))

    def extra_repr(self) -> str:
        return f"block={self.block}"


def rotate_linear(linear: nn.Linear, block: int, name: str = "weight") -> RotatedLinear:
    inner = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        inner.weight.copy_(rotate_weight(linear.weight.detach().double(), block, name))  # one rounding
        if linear.bias is not None:
            inner.bias.copy_(linear.bias)
    inner.requires_grad_(linear.weight.requires_grad)
    return RotatedLinear(inner, block)


def rotate_model(model: nn.Module, block: int) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a RotatedLinear (in place); returns how many.

    Every linear's in-features must be a multiple of ``block`` (checked for all
    linears before any swap; the error names the first offending weight).
    """
    hadamard_matrix(block)  # validates block
    targets = [(parent, name, child, f"{pname}.{name}.weight" if pname else f"{name}.weight")
               for pname, parent in model.named_modules()
               for name, child in parent._modules.items() if isinstance(child, nn.Linear)]
    for _, _, child, full in targets:
        check_rotatable(full, child.in_features, block)
    done: dict[int, RotatedLinear] = {}
    for parent, name, child, full in targets:
        if id(child) not in done:
            done[id(child)] = rotate_linear(child, block, full)
        setattr(parent, name, done[id(child)])
    return len(done)

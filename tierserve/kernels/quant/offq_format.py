"""OffQ W4A4 weight format ``offq``: rotation + shared offset (offq.py), uniform 4-bit weights, 4-bit tokens.

Per linear ``y = W x + b`` (one activation site; fused ``qkv_proj`` /
``gate_up_proj`` are one site), in this order:

1. input transform, option ``rotation``:
   * ``"offq"`` (default, needs calibration inputs ``X [n, in]``): ``offq.fit_site``
     gives the Householder vector ``v`` (``R = I - 2 v v^T / v^T v``, ``R u = e_0``
     for the top eigenvector u of ``X^T X / n``) and the shared offset ``o``
     (mean of ``(R x)_0``); online ``x'' = R x - o e_0`` (float64, then float32);
     ``W' = W R`` (float64) and ``fold = o W'[:, 0]`` is added to the output in
     float32, so with both quantizers off the linear is the original one;
   * ``"hadamard"``: the block Hadamard of ``hadamard.py``, block = the largest
     power of two dividing ``in`` (the QuaRot-style baseline), ``W' = W H``;
   * ``"none"``: ``W' = W`` (the round-to-nearest baseline).
2. weights: uniform asymmetric 4-bit, round to nearest, per output channel
   (option ``group = 0``, default) or per output channel and group of ``group``
   consecutive input columns. Per group, with lo/hi its min/max,
   ``s = bf16((hi - lo) / 15)`` (``s = 1`` if ``hi == lo``),
   ``z = bf16(lo + 8 s)``, codes ``q = clamp(round((w - z) / s) + 8, 0, 15)``,
   ``w_hat = (q - 8) s + z`` in float32. ``s`` and ``z`` are bf16 so that
   torch's int4 CPU kernel (``int4_cpu.py``: ``W = (q - 8) sz0 + sz1`` with bf16
   ``sz``) holds exactly the weights of this reference (``offq_cpu.py``).
3. activations (option ``act_quant``, default on; off = W4A16): symmetric
   4-bit per token on ``x''``: ``s_t = max_k |x''_k| / 7`` (1 for an all-zero
   token), ``q = clamp(round(x'' / s_t), -8, 7)``, ``x_hat = q s_t``.
4. ``y = x_hat W_hat^T + fold + b`` (float32 ``F.linear``: the torch reference).

KV in 4 bits is not a weight concern: the engine's ``kv4`` compressor
(``cache/compress/kv4.py``) stores K and V; ``KV_COMPRESSION = "kv4"`` is what
``tierserve quantize`` records in the checkpoint's quantization config and what
a user passes as ``--kv-compression kv4``.

Packed tensors: ``qweight`` uint8 ``[out, in / 2]`` (column 2j in the low
nibble), ``scale`` / ``zero`` bf16 ``[out, in / g]`` (g = in per channel);
with ``rotation="offq"`` also ``v`` float64 ``[in]``, ``offset`` float64
``[1]`` and ``fold`` float32 ``[out]``. ``meta``: ``rotation``, ``group``
(the effective g), ``act_quant``, ``block`` (Hadamard size, 0 otherwise), so a
loaded checkpoint keeps its mode; ``expected_tensors`` lets the checkpoint
loader refuse a tensor of another width (e.g. a rotation made for another
model) naming the tensor and the shape it must have.

Calibration: ``MIN_CALIBRATION_TOKENS`` = 64 rows per site. The offset is a
mean over n tokens with standard error ``std((R x)_0) / sqrt(n)``: from 64 on
that is at most 1/8 of the channel's spread; fewer raise InvalidParameterError
naming the count and the limit.

Tests (tests/test_offq_format.py, tests/test_offq_checkpoint.py): each linear
against a torch reference written in the test, quantization off equals the
rotated float linear, the int4 CPU path against the reference, the checkpoint
round trip through the engine, and bad input.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat, register_format
from tierserve.kernels.quant.hadamard import block_hadamard
from tierserve.kernels.quant.offq import apply_householder, fit_site

ROTATIONS = ("offq", "hadamard", "none")
MIN_CALIBRATION_TOKENS = 64
KV_COMPRESSION = "kv4"
WEIGHT_LEVELS = 15  # 4-bit asymmetric: codes 0..15
WEIGHT_OFFSET = 8  # kernel form w = (q - 8) s + z
ACT_MAX = 7  # symmetric 4-bit tokens: round(x / s) in [-7, 7] (clamped to [-8, 7])
SCALE_DTYPE = torch.bfloat16


def hadamard_block(in_features: int) -> int:
    """The largest power of two dividing ``in_features``."""
    return in_features & -in_features


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., 2n]`` (0..15) -> bytes ``[..., n]``, column 2j in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def quantize_weight_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2 on ``w [out, in]``: (codes uint8 [out, in], s bf16 [out, in/g], z bf16 [out, in/g])."""
    out, cols = w.shape
    wg = w.float().reshape(out, cols // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / WEIGHT_LEVELS).to(SCALE_DTYPE)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = (lo + WEIGHT_OFFSET * s.float()).to(SCALE_DTYPE)
    q = torch.round((wg - z.float()[..., None]) / s.float()[..., None]) + WEIGHT_OFFSET
    return q.clamp_(0, WEIGHT_LEVELS).to(torch.uint8).reshape(out, cols), s, z


def dequantize_weight_groups(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    out, cols = codes.shape
    q = codes.float().reshape(out, s.shape[1], -1) - WEIGHT_OFFSET
    return (q * s.float()[..., None] + z.float()[..., None]).reshape(out, cols)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 on float32 ``x [M, K]``: (integer-valued float32 codes [M, K], scales [M, 1])."""
    s = x.abs().amax(-1, keepdim=True) / ACT_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp_(-ACT_MAX - 1, ACT_MAX), s


@register_format
class OffQFormat(WeightFormat):
    """OffQ W4A4 (module docstring); options ``rotation``, ``group``, ``act_quant``."""

    name: ClassVar[str] = "offq"
    kv_compression: ClassVar[str] = KV_COMPRESSION
    min_calibration_tokens: ClassVar[int] = MIN_CALIBRATION_TOKENS

    def __init__(self, rotation: str = "offq", group: int = 0, act_quant: bool = True):
        if rotation not in ROTATIONS:
            raise InvalidParameterError("rotation", f"must be one of {list(ROTATIONS)}, got {rotation!r}")
        if not isinstance(group, int) or group < 0 or group % 2:
            raise InvalidParameterError("group", f"must be 0 (per output channel) or an even size >= 2, got {group!r}")
        self.rotation, self.group, self.act_quant = rotation, group, bool(act_quant)
        self.needs_calibration = rotation == "offq"  # transform.quantize_model's calibration hook

    def _group(self, cols: int) -> int:
        return self.group or cols

    def check_shape(self, tensor_name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(tensor_name, shape)
        if shape[1] % 2 or shape[1] % self._group(shape[1]):
            raise InvalidParameterError(tensor_name, f"offq needs even in-features divisible by group "
                                                     f"{self.group}, got shape {list(shape)}")

    def expected_tensors(self, shape: tuple[int, int], meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out, cols = shape
        groups = cols // int(meta.get("group") or cols)
        want = {"qweight": ((out, cols // 2), torch.uint8), "scale": ((out, groups), SCALE_DTYPE),
                "zero": ((out, groups), SCALE_DTYPE)}
        if meta.get("rotation") == "offq":
            want.update(v=((cols,), torch.float64), offset=((1,), torch.float64), fold=((out,), torch.float32))
        return want

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight",
                 activations: torch.Tensor | None = None) -> PackedWeight:
        self.check_shape(tensor_name, tuple(weight.shape))
        out, cols = weight.shape
        w = weight.detach().double()
        tensors: dict[str, torch.Tensor] = {}
        block = 0
        if self.rotation == "offq":
            x = self._calibration(activations, tensor_name, cols)
            site = fit_site(x, f"calibration[{tensor_name!r}]")
            w = apply_householder(w, site.v)  # rows of W R (R symmetric)
            tensors.update(v=site.v.double().clone(), offset=torch.tensor([site.offset], dtype=torch.float64),
                           fold=(site.offset * w[:, 0]).float())
        elif self.rotation == "hadamard":
            block = hadamard_block(cols)
            w = block_hadamard(w, block)
        group = self._group(cols)
        codes, s, z = quantize_weight_groups(w, group)
        tensors.update(qweight=pack_nibbles(codes), scale=s, zero=z)
        meta = {"rotation": self.rotation, "group": group, "act_quant": int(self.act_quant), "block": block}
        return PackedWeight(self.name, (out, cols), tensors, meta)

    def _calibration(self, activations: torch.Tensor | None, tensor_name: str, cols: int) -> torch.Tensor:
        if activations is None:
            raise InvalidParameterError("calibration", f"offq with rotation='offq' needs calibration activations "
                                                       f"for {tensor_name!r}")
        x = activations.reshape(-1, activations.shape[-1])
        if x.shape[1] != cols:
            raise InvalidParameterError(f"calibration[{tensor_name!r}]", f"inputs have {x.shape[1]} channels, "
                                                                         f"the weight takes {cols}")
        if x.shape[0] < MIN_CALIBRATION_TOKENS:
            raise InvalidParameterError(f"calibration[{tensor_name!r}]", f"offq needs at least "
                                        f"{MIN_CALIBRATION_TOKENS} calibration tokens per site, got {x.shape[0]}")
        return x

    def dequantize_rotated(self, packed: PackedWeight) -> torch.Tensor:
        """``W_hat ~ W'`` (the rotated weight) in float32."""
        t = packed.tensors
        return dequantize_weight_groups(unpack_nibbles(t["qweight"]), t["scale"], t["zero"])

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        """The approximation of the original W (rotation undone; the folded offset is not part of W)."""
        w = self.dequantize_rotated(packed).double()
        if packed.meta.get("rotation") == "offq":
            w = apply_householder(w, packed.tensors["v"])
        elif packed.meta.get("rotation") == "hadamard":
            w = block_hadamard(w, int(packed.meta["block"]))
        return w.float()

    def rotate_input(self, x2: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """Step 1 online on ``x2 [M, in]``: float32 ``x''``."""
        rotation = packed.meta.get("rotation")
        if rotation == "offq":
            xr = apply_householder(x2, packed.tensors["v"])
            xr[:, 0] -= packed.tensors["offset"][0]
            return xr.float()
        if rotation == "hadamard":
            return block_hadamard(x2.double(), int(packed.meta["block"])).float()
        return x2.float()

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        xr = self.rotate_input(x.reshape(-1, k), packed)
        if packed.meta.get("act_quant"):
            q, s = quantize_tokens(xr)
            xr = q * s
        y = torch.nn.functional.linear(xr, self.dequantize_rotated(packed))
        if "fold" in packed.tensors:
            y = y + packed.tensors["fold"]
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*lead, packed.shape[0])

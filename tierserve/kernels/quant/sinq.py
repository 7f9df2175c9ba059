"""SINQ: calibration-free dual-scale (row x column) asymmetric RTN quantization.

Paper / reference code: "SINQ: Sinkhorn-Normalized Quantization for
Calibration-Free Low-Precision LLM Weights" (huawei-csl/SINQ, PyPI ``sinq``).

Algorithm (per weight ``W [out, in]``, ``in`` a multiple of the tile width G = 64):

1. Split the columns into tiles ``M_t = W[:, t*G:(t+1)*G]`` (out x G).
2. Per tile, Sinkhorn-style normalisation in the log domain. With ``std`` the
   unbiased standard deviation, clamped to [1e-3, 1e3]:
   target = min(min_i std(row_i), min_j std(col_j)) + 1e-6.
   Log scales ``a`` (rows, out) and ``b`` (columns, G) start at 0. Each of the
   16 iterations forms ``C = M / exp(b)[cols] / exp(a)[rows]``, measures the
   imbalance ``max(all row/col stds) / min(all row/col stds)`` and remembers the
   scales with the lowest imbalance so far (ties go to the later one); then
   both scales step from the same C:
   ``a += log(clamp(std_row(C)/target, 0.7, 2))``,
   ``b += log(clamp(std_col(C)/target, 0.7, 2))``, both clipped to [-0.3, 10].
   As in the reference code, once the imbalance rises above the best seen the
   tile's scales freeze (early stop), so the kept scales are the least
   imbalanced ones visited.
3. Asymmetric min-max RTN per row of the normalised tile ``N = M / mu_col / mu_row``
   (mu = exp of the kept log scales): ``scale = max(max-min, 1e-4) / (2^bits-1)``,
   ``z = -round(min/scale)``, ``Q = clamp(round(N/scale + z), 0, 2^bits-1)``.
4. Stored: ``Q`` (bit-packed, ``8/bits`` codes per byte, lowest bits first),
   ``s_row = scale * mu_row`` and ``z`` per (row, tile), ``s_col = mu_col`` per
   input column. Dequantize ``W_hat = (Q - z) * s_row * s_col``.
5. Kurtosis gate: if the whole weight's kurtosis ``E[(w-m)^4] / E[(w-m)^2]^2``
   exceeds 5 (heavy tails), the column scales are dropped (mu = 1): plain
   asymmetric RTN per row and tile.

Defaults: tile 64, 4 bits, 16 iterations, kurtosis threshold 5. Scales and
zeros are stored as float16 (``s_row``, ``z``, ``s_col``); the codes are
computed from the float32 scales. ``in`` not a multiple of the tile raises
InvalidParameterError naming the tensor and the rule.

The triton kernel (``sinq_triton.sinq_linear``) computes ``x W_hat^T`` from the
packed codes; ``sinq_linear`` here is its torch reference (dequantize, matmul).
On CPU the engine's linear backend swaps in ``int4_cpu.int4_from_sinq`` (4-bit,
tiles 32-256: torch's int4 kernel with the column scale folded into x).
Tests: imbalance and reconstruction error below RTN on matrices with planted
outlier rows/columns, the kurtosis gate, the triton kernel against the reference
(``TRITON_INTERPRET=1``), bad shapes, and agreement with the ``sinq`` package's
``tiled_quant_rectangle`` where that package is importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat, register_format

STD_CLAMP = (1e-3, 1e3)
STEP_CLAMP = (0.7, 2.0)
LOG_SCALE_CLIP = (-0.3, 10.0)
TARGET_EPS = 1e-6
RANGE_MIN = 1e-4
KURTOSIS_THRESHOLD = 5.0
SUPPORTED_BITS = (1, 2, 4, 8)


@dataclass
class SinqTensors:
    """Unpacked SINQ result in float32: codes [out, in], s_row/z [out, tiles], s_col [in]."""

    q: torch.Tensor
    s_row: torch.Tensor
    z: torch.Tensor
    s_col: torch.Tensor
    used_sinkhorn: bool


def kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis E[(w-m)^4] / E[(w-m)^2]^2 of all entries (3 for a Gaussian)."""
    x = w.float().reshape(-1)
    xc = x - x.mean()
    var = (xc * xc).mean().clamp_min(1e-6)
    return float((xc.pow(4)).mean() / (var * var))


def imbalance(tiles: torch.Tensor) -> torch.Tensor:
    """Per tile [T, rows, cols]: max over row and column stds / min over them."""
    s_row, s_col = tiles.std(dim=2), tiles.std(dim=1)
    lo = torch.minimum(s_row.amin(1), s_col.amin(1)).clamp_min(1e-12)
    hi = torch.maximum(s_row.amax(1), s_col.amax(1))
    return hi / lo


def sinkhorn_log_scales(tiles: torch.Tensor, iterations: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-imbalanced row/column scales of each tile [T, rows, cols] -> (mu_row [T, rows], mu_col [T, cols])."""
    m = tiles.float()
    lo, hi = STD_CLAMP
    target = torch.minimum(m.std(2).clamp(lo, hi).amin(1), m.std(1).clamp(lo, hi).amin(1)) + TARGET_EPS
    log_row = torch.zeros(m.shape[0], m.shape[1])
    log_col = torch.zeros(m.shape[0], m.shape[2])
    best_imb = imbalance(m)
    best_row, best_col = log_row.clone(), log_col.clone()
    running = torch.ones(m.shape[0])
    for _ in range(iterations):
        cur = m / log_col.exp()[:, None, :] / log_row.exp()[:, :, None]
        imb = imbalance(cur)
        better = imb <= best_imb
        best_imb = torch.minimum(best_imb, imb)
        best_row = torch.where(better[:, None], log_row, best_row)
        best_col = torch.where(better[:, None], log_col, best_col)
        running = running * (imb <= best_imb).float()  # a rise freezes the tile for good
        step_row = (cur.std(2).clamp(lo, hi) / target[:, None]).clamp(*STEP_CLAMP).log()
        step_col = (cur.std(1).clamp(lo, hi) / target[:, None]).clamp(*STEP_CLAMP).log()
        log_row = (log_row + step_row * running[:, None]).clip(*LOG_SCALE_CLIP)
        log_col = (log_col + step_col * running[:, None]).clip(*LOG_SCALE_CLIP)
    return best_row.exp(), best_col.exp()


def rtn_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max RTN along the last dim: (codes, scale, zero) with x ~ (q - z) * scale."""
    qmax = 2**bits - 1
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    scale = (mx - mn).clamp(min=RANGE_MIN) / qmax
    z = -torch.round(mn / scale)
    q = torch.clamp(torch.round(x / scale + z), 0, qmax)
    return q, scale.squeeze(-1), z.squeeze(-1)


def sinq_quantize_tensors(weight: torch.Tensor, group: int = 64, bits: int = 4, iterations: int = 16,
                          kurtosis_threshold: float = KURTOSIS_THRESHOLD) -> SinqTensors:
    """SINQ (see module docstring) in float32, unpacked. ``weight.shape[1] % group == 0`` is the caller's check."""
    w = weight.detach().float()
    out, inp = w.shape
    tiles = w.reshape(out, inp // group, group).permute(1, 0, 2)  # [T, out, G]
    use_sinkhorn = kurtosis(w) <= kurtosis_threshold
    if use_sinkhorn:
        mu_row, mu_col = sinkhorn_log_scales(tiles, iterations)
    else:
        mu_row, mu_col = torch.ones(tiles.shape[:2]), torch.ones(tiles.shape[0], group)
    normed = tiles / mu_col[:, None, :] / mu_row[:, :, None]
    q, scale, z = rtn_rows(normed, bits)
    return SinqTensors(q=q.permute(1, 0, 2).reshape(out, inp), s_row=(scale * mu_row).t().contiguous(),
                       z=z.t().contiguous(), s_col=mu_col.reshape(inp), used_sinkhorn=use_sinkhorn)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, cols] in [0, 2^bits) -> uint8 [rows, cols*bits/8]; code j of a byte sits at bits j*bits."""
    per = 8 // bits
    q = q.to(torch.uint8).reshape(q.shape[0], -1, per)
    out = torch.zeros(q.shape[:2], dtype=torch.uint8)
    for j in range(per):
        out |= q[:, :, j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


def sinq_dequantize(q_packed: torch.Tensor, s_row: torch.Tensor, z: torch.Tensor, s_col: torch.Tensor,
                    bits: int, group: int) -> torch.Tensor:
    """W_hat = (Q - z) * s_row * s_col in float32."""
    q = unpack_codes(q_packed, bits).float()
    out, inp = q.shape
    q = q.reshape(out, inp // group, group)
    w = (q - z.float()[:, :, None]) * s_row.float()[:, :, None]
    return w.reshape(out, inp) * s_col.float()[None, :]


def sinq_linear(x: torch.Tensor, q_packed: torch.Tensor, s_row: torch.Tensor, z: torch.Tensor,
                s_col: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Torch reference of the triton kernel: ``x [M, in] @ W_hat^T`` in float32."""
    return x.float() @ sinq_dequantize(q_packed, s_row, z, s_col, bits, group).t()


@register_format
class SinqFormat(WeightFormat):
    """SINQ dual-scale asymmetric RTN (defaults: tile 64, 4 bits, 16 iterations)."""

    name = "sinq"

    def __init__(self, group: int = 64, bits: int = 4, iterations: int = 16):
        if bits not in SUPPORTED_BITS:
            raise InvalidParameterError("bits", f"sinq supports bits in {SUPPORTED_BITS}, got {bits}")
        if group < 2 or group % (8 // bits):
            raise InvalidParameterError("group", f"sinq tile width must be >= 2 and hold whole bytes, got {group}")
        if iterations < 0:
            raise InvalidParameterError("iterations", f"must be >= 0, got {iterations}")
        self.group, self.bits, self.iterations = group, bits, iterations

    def check_shape(self, tensor_name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(tensor_name, shape)
        if shape[1] % self.group:
            raise InvalidParameterError(
                tensor_name, f"sinq needs in-features ({shape[1]}) to be a multiple of the tile width {self.group}")

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight") -> PackedWeight:
        self.check_shape(tensor_name, tuple(weight.shape))
        t = sinq_quantize_tensors(weight, self.group, self.bits, self.iterations)
        tensors = {"qweight": pack_codes(t.q, self.bits), "s_row": t.s_row.half(), "z": t.z.half(),
                   "s_col": t.s_col.half()}
        meta = {"group": self.group, "bits": self.bits, "sinkhorn": int(t.used_sinkhorn)}
        return PackedWeight(self.name, tuple(weight.shape), tensors, meta)

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        t = packed.tensors
        return sinq_dequantize(t["qweight"], t["s_row"], t["z"], t["s_col"], int(packed.meta["bits"]),
                               int(packed.meta["group"]))

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            return super().linear(x, packed, bias)
        from tierserve.kernels.quant import sinq_triton

        t = packed.tensors
        lead = x.shape[:-1]
        y = sinq_triton.sinq_linear(x.reshape(-1, x.shape[-1]), t["qweight"], t["s_row"], t["z"], t["s_col"],
                                    int(packed.meta["bits"]), int(packed.meta["group"]))
        y = y.to(x.dtype).reshape(*lead, packed.shape[0])
        return y if bias is None else y + bias

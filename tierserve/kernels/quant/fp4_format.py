"""FP4 weight formats (MXFP4, NVFP4): the grouping, rotation, scale search, GPTQ and W4A4 they share.

A weight ``W [out, in]`` (``in`` a multiple of the group size g) is, in order:

1. rotated if ``hadamard``: ``W' = W R`` with R the block-diagonal normalised
   Hadamard of size g (``hadamard.py``); activations get ``x R`` online;
2. cut into groups of g consecutive input columns per output row;
3. given one scale per group by the subclass (``encode_scales``: MXFP4's E8M0
   power of two, NVFP4's E4M3 times a per-tensor global), optionally with the
   MSE shrink search (``mse_scale.py``);
4. rounded to E2M1 codes (``fp4.py``, nearest, ties to even), or, with
   calibration data (``quantize_calibrated``), rounded by GPTQ with those
   scales fixed (``gptq.py``, static order). Option ``gptq=True`` sets
   ``needs_calibration`` so ``transform.quantize_model`` passes each linear's
   captured inputs as ``quantize(weight, name, activations=X)``; the Hessian
   is ``2 X^T X / n`` (rotated by R when ``hadamard``). Option ``qronos=True``
   (exclusive with ``gptq``) rounds by Qronos instead (``qronos.py``): the
   calibration then passes ``PairedInputs`` (float and quantized-model inputs,
   ``tools/sequential_calibration.py``) and both moments are rotated by R.

Packed tensors: ``qs`` uint8 [out, in/2] (two codes per byte, low nibble
first), ``scales`` uint8 [out, in/g] (the scale bytes), and for NVFP4
``global_scale`` float32 [1]. ``meta``: ``group_size``, ``hadamard`` and ``act_quant`` (0/1; a loaded
checkpoint keeps its rotation and W4A4 mode through them, and
``expected_tensors`` lets the checkpoint loader check shapes and dtypes).
``dequantize`` returns the approximation of the original (un-rotated) W.

``linear``: with ``act_quant`` (W4A4) the (rotated) activations are quantized
online per row and group of g to the same format (absmax scale, E2M1 round to
nearest) before the matmul; without it (W4A16) they stay in their dtype. On
CUDA the triton kernel of ``fp4_triton.py`` runs on the packed bytes; on CPU
the torch reference (dequantize, F.linear) runs here, and the engine's linear
backend swaps in the fast CPU modules of ``fp4_cpu.py`` (``cpu_fast.py``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat
from tierserve.kernels.quant.fp4 import (ActQuant, dequantize_groups, fake_quantize_groups, fp4_linear_reference,
                                         pack_fp4, quantize_groups, unpack_fp4)
from tierserve.kernels.quant.gptq import GPTQ_BLOCK, GPTQ_DAMP, gptq_quantize, hessian_from_inputs
from tierserve.kernels.quant.hadamard import block_hadamard, rotate_hessian
from tierserve.kernels.quant.mse_scale import mse_scale_search
from tierserve.kernels.quant.qronos import paired_inputs, qronos_moments, qronos_quantize


class FP4Format(WeightFormat):
    """Shared FP4 logic; subclasses set ``name``, ``group_size`` and the scale codec."""

    group_size: ClassVar[int]

    def __init__(self, hadamard: bool = False, mse: bool = False, act_quant: bool = False, gptq: bool = False,
                 qronos: bool = False):
        self.hadamard = bool(hadamard)
        self.mse = bool(mse)
        self.act_quant = bool(act_quant)
        self.gptq = bool(gptq)
        self.qronos = bool(qronos)
        if self.gptq and self.qronos:
            raise InvalidParameterError("options", "gptq and qronos are alternative roundings; set one of them")
        self.needs_calibration = self.gptq or self.qronos  # transform.quantize_model's calibration hook
        self.paired_calibration = self.qronos  # calibration must give PairedInputs (tools/sequential_calibration)

    # -- scale codec (subclass) -------------------------------------------------
    @abstractmethod
    def global_scale(self, amax_tensor: torch.Tensor) -> torch.Tensor | None:
        """Per-tensor fp32 scale from the tensor's max magnitude (None if the format has none)."""

    @abstractmethod
    def encode_scales(self, amax: torch.Tensor, gscale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Group maxima -> (uint8 scale bytes, effective fp32 scales)."""

    @abstractmethod
    def decode_scales(self, byte: torch.Tensor, gscale: torch.Tensor | None) -> torch.Tensor:
        """uint8 scale bytes -> effective fp32 scales."""

    # -- weights ----------------------------------------------------------------
    def check_shape(self, tensor_name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(tensor_name, shape)
        if shape[1] % self.group_size:
            raise InvalidParameterError(
                tensor_name, f"{self.name} needs in-features (dim 1) divisible by the group size "
                f"{self.group_size}, got shape {list(shape)}")

    def expected_tensors(self, shape: tuple[int, int], meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Packed tensor shapes/dtypes for a weight of ``shape`` (the checkpoint loader's check)."""
        out, cols = shape
        want = {"qs": ((out, cols // 2), torch.uint8), "scales": ((out, cols // self.group_size), torch.uint8)}
        if self.global_scale(torch.ones(())) is not None:
            want["global_scale"] = ((1,), torch.float32)
        return want

    def _prepare(self, weight: torch.Tensor, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_shape(tensor_name, tuple(weight.shape))
        w = weight.detach().float()
        if self.hadamard:
            w = block_hadamard(w, self.group_size)
        return w, self.global_scale(w.abs().amax())

    def _scales(self, w: torch.Tensor, gscale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        groups = w.reshape(-1, self.group_size)
        encode = lambda amax: self.encode_scales(amax, gscale)  # noqa: E731
        return mse_scale_search(groups, encode) if self.mse else encode(groups.abs().amax(-1))

    def _pack(self, w: torch.Tensor, byte: torch.Tensor, scale: torch.Tensor,
              gscale: torch.Tensor | None) -> PackedWeight:
        out, cols = w.shape
        codes = quantize_groups(w.reshape(-1, self.group_size), scale).reshape(out, cols)
        tensors = {"qs": pack_fp4(codes), "scales": byte.reshape(out, cols // self.group_size)}
        if gscale is not None:
            tensors["global_scale"] = gscale.reshape(1).float()
        meta = {"group_size": self.group_size, "hadamard": int(self.hadamard), "act_quant": int(self.act_quant)}
        return PackedWeight(self.name, (out, cols), tensors, meta)

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight",
                 activations: torch.Tensor | None = None) -> PackedWeight:
        """RTN quantization; with ``gptq`` the calibration ``activations [tokens, in]`` drive MR-GPTQ."""
        if self.qronos:
            pair = paired_inputs(activations, tensor_name, weight.shape[1])
            hessian, cross = qronos_moments(pair)
            return self.quantize_calibrated(weight, hessian, tensor_name, cross=cross)
        if self.gptq:
            if activations is None:
                raise InvalidParameterError("calibration", f"{self.name} with gptq needs calibration activations "
                                                           f"for {tensor_name!r}")
            return self.quantize_calibrated(weight, hessian_from_inputs(activations), tensor_name)
        w, gscale = self._prepare(weight, tensor_name)
        byte, scale = self._scales(w, gscale)
        return self._pack(w, byte, scale, gscale)

    def quantize_calibrated(self, weight: torch.Tensor, hessian: torch.Tensor, tensor_name: str = "weight",
                            block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP,
                            cross: torch.Tensor | None = None) -> PackedWeight:
        """MR-GPTQ: scales fixed from the (rotated) weight, then GPTQ rounding against ``hessian [in, in]``.

        With ``cross`` (``2 X^T X~ / n``; ``hessian`` is then ``2 X~^T X~ / n``) the rounding is Qronos.
        """
        w, gscale = self._prepare(weight, tensor_name)
        if tuple(hessian.shape) != (w.shape[1], w.shape[1]):
            raise InvalidParameterError(f"{tensor_name}.hessian", f"must be [{w.shape[1]}, {w.shape[1]}], "
                                        f"got {list(hessian.shape)}")
        if cross is not None and tuple(cross.shape) != tuple(hessian.shape):
            raise InvalidParameterError(f"{tensor_name}.cross", f"must be {list(hessian.shape)}, "
                                        f"got {list(cross.shape)}")
        if self.hadamard:
            hessian = rotate_hessian(hessian.double(), self.group_size)
            cross = None if cross is None else rotate_hessian(cross.double(), self.group_size)
        byte, scale = self._scales(w, gscale)
        col_scale = scale.reshape(w.shape[0], -1)
        g = self.group_size

        def quantize_column(col: torch.Tensor, j: int) -> torch.Tensor:
            s = col_scale[:, j // g]
            return fake_quantize_groups(col[:, None], s)[:, 0]

        if cross is None:
            q = gptq_quantize(w, hessian, quantize_column, block=block, damp=damp)
        else:
            q = qronos_quantize(w, hessian, cross, quantize_column, block=block, damp=damp)
        return self._pack(q, byte, scale, gscale)

    def _gscale(self, packed: PackedWeight) -> torch.Tensor | None:
        return packed.tensors.get("global_scale")

    def dequantize_rotated(self, packed: PackedWeight) -> torch.Tensor:
        """The dequantized weight in the rotated basis (``W R`` approximated; equals W without hadamard)."""
        out, cols = packed.shape
        codes = unpack_fp4(packed.tensors["qs"]).reshape(-1, self.group_size)
        scale = self.decode_scales(packed.tensors["scales"].reshape(-1), self._gscale(packed))
        return dequantize_groups(codes, scale).reshape(out, cols)

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        w = self.dequantize_rotated(packed)
        return block_hadamard(w, self.group_size) if packed.meta.get("hadamard") else w

    # -- activations and matmul ---------------------------------------------------
    def quantize_activations(self, x: torch.Tensor) -> ActQuant:
        """Per-row, per-group FP4 quantization of ``x [M, K]`` (absmax scale, round to nearest)."""
        m, k = x.shape
        groups = x.float().reshape(m, k // self.group_size, self.group_size)
        gscale = self.global_scale(groups.abs().amax(dim=(1, 2)))
        gscale = None if gscale is None else gscale[:, None]
        _, scale = self.encode_scales(groups.abs().amax(-1), gscale)
        codes = quantize_groups(groups.reshape(-1, self.group_size), scale.reshape(-1))
        return ActQuant(pack_fp4(codes.reshape(m, k)), scale.reshape(m, -1).float(), self.group_size)

    def scale_table(self, packed: PackedWeight) -> torch.Tensor:
        """fp32 [256]: the effective scale of every scale byte (what the kernel gathers)."""
        byte = torch.arange(256, dtype=torch.int32, device=packed.tensors["scales"].device).to(torch.uint8)
        return self.decode_scales(byte, self._gscale(packed)).float()

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if packed.meta.get("hadamard"):
            x2 = block_hadamard(x2, self.group_size)
        act = self.quantize_activations(x2) if self.act_quant or packed.meta.get("act_quant") else None
        kernel = fp4_linear_reference
        if x.device.type == "cuda":
            from tierserve.kernels.quant.fp4_triton import fp4_linear_triton as kernel
        y = kernel(x2, packed.tensors["qs"], packed.tensors["scales"], self.scale_table(packed),
                   self.group_size, bias, act)
        return y.to(x.dtype).reshape(*lead, packed.shape[0])

    def quantize_linear(self, linear: torch.nn.Module, tensor_name: str = "weight",
                        inputs: torch.Tensor | None = None):
        """A QuantizedLinear for ``linear``; with calibration ``inputs [..., in]`` the weight goes through GPTQ."""
        from tierserve.kernels.quant.base import QuantizedLinear

        if inputs is None:
            packed = self.quantize(linear.weight, tensor_name)  # RTN (gptq needs inputs)
        else:
            packed = self.quantize_calibrated(linear.weight, hessian_from_inputs(inputs), tensor_name)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return QuantizedLinear(self, packed, bias)


def quantize_linear_gptq(linear: torch.nn.Module, inputs: torch.Tensor, fmt: FP4Format,
                         tensor_name: str = "weight"):
    """MR-GPTQ one linear from its calibration inputs ``[..., in]``; returns a QuantizedLinear."""
    return fmt.quantize_linear(linear, tensor_name, inputs)

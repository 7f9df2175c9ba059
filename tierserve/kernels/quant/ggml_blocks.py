"""Shared machinery of the ggml block formats (Q4_0, Q4_1, Q8_0): layout, shape rule, matmul dispatch.

Layout. A weight ``W [out, in]`` is cut along in-features into blocks of
``BLOCK = 32`` consecutive weights; each block is stored in ``type_size``
bytes exactly as ggml (and a GGUF file) stores it, so the packed weight is one
``uint8`` tensor ``blocks [out, in / 32 * type_size]`` (key ``"blocks"``) whose
row ``o`` is the ggml row ``o``. Consequences used elsewhere: a GGUF tensor's
bytes *are* the packed weight (no re-quantization), and permuting or stacking
out-feature rows (llama's q/k un-permutation, fused qkv / gate_up) permutes or
stacks whole byte rows. The fp16 block scales are the first bytes of each block
(little-endian), read with ``view(torch.float16)``.

Shape rule: in-features must be a positive multiple of 32 (else
InvalidParameterError naming the tensor).

Matmul ``y = x W^T + b`` (``GGMLBlockFormat.linear``):
- CUDA: the format's fused triton kernel (``<format>_triton.py``) reads the
  packed blocks, dequantizes tiles in registers and accumulates in fp32.
- CPU, here: the torch reference -- dequantize the whole weight to
  ``x.dtype``, then one ``F.linear`` -- which stays the oracle. It re-widens
  the layer's weight into a transient ``out x in`` float buffer every call, so
  it is dequantization-bound (Q4: 4-6x an fp32 linear's time at one row, one
  thread, SmolLM2 shapes; benchmarks/kernels.py).
- CPU, in the engine: the linear backends "auto"/"onednn" swap each
  ``QuantizedLinear`` for its fast CPU module (``cpu_fast.py``): Q4_0/Q4_1
  repacked once into torch's int4 CPU kernel (``int4_cpu.py``, bf16 compute,
  0.4-0.95x the fp32 linear's time at one row), Q8_0 as two int4 terms.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable, ClassVar

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat

BLOCK = 32
BLOCKS_KEY = "blocks"


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1] -> its fp16 (round-to-nearest-even) little-endian bytes, uint8 [..., 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian fp16 bytes -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, 32] in 0..15 -> [n, 16] bytes, byte j = q[j] | q[j + 16] << 4 (ggml order)."""
    return q[:, :16] | (q[:, 16:] << 4)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


class GGMLBlockFormat(WeightFormat):
    """A ggml block format: subclasses give ``type_size``, the block codecs and the triton matmul."""

    type_size: ClassVar[int]
    #: fp16 values heading each block (d; Q4_1: d and m), for ``ggml_planes.split_planes``
    num_meta: ClassVar[int] = 1
    ggml_type: ClassVar[str]

    def check_shape(self, tensor_name: str, shape: tuple[int, ...]) -> None:
        super().check_shape(tensor_name, shape)
        if shape[1] < BLOCK or shape[1] % BLOCK:
            raise InvalidParameterError(
                tensor_name, f"{self.name} needs in-features to be a positive multiple of {BLOCK}, "
                             f"got shape {list(shape)}")

    @staticmethod
    @abstractmethod
    def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
        """float32 [n, 32] -> uint8 [n, type_size] (the ggml block bytes)."""

    @staticmethod
    @abstractmethod
    def dequantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
        """uint8 [n, type_size] -> float32 [n, 32]."""

    @staticmethod
    @abstractmethod
    def triton_linear() -> Callable[..., torch.Tensor]:
        """The fused triton matmul ``(x, blocks, out_features, bias) -> y`` (imported lazily)."""

    @staticmethod
    @abstractmethod
    def triton_planes_linear() -> Callable[..., torch.Tensor]:
        """The same matmul over the weight split into planes, ``(x, GGMLPlanes, out_features, bias) -> y``
        (``ggml_planes``; what the CUDA linear backend keeps)."""

    def expected_tensors(self, shape: tuple[int, int], meta: dict) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        """What a packed ``shape`` weight stores: ``{"blocks": ((out, in / 32 * type_size), uint8)}``."""
        self.check_shape("weight", shape)
        return {BLOCKS_KEY: ((shape[0], shape[1] // BLOCK * self.type_size), torch.uint8)}

    def from_blocks(self, blocks: torch.Tensor, shape: tuple[int, int], tensor_name: str = "weight") -> PackedWeight:
        """Wrap ggml block bytes ``uint8 [out, in / 32 * type_size]`` (e.g. a GGUF tensor) without copying."""
        self.check_shape(tensor_name, shape)
        want = (shape[0], shape[1] // BLOCK * self.type_size)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
            raise InvalidParameterError(
                tensor_name, f"{self.name} blocks of a {list(shape)} weight must be uint8 {list(want)}, "
                             f"got {blocks.dtype} {list(blocks.shape)}")
        return PackedWeight(self.name, (int(shape[0]), int(shape[1])), {BLOCKS_KEY: blocks})

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight") -> PackedWeight:
        self.check_shape(tensor_name, tuple(weight.shape))
        out, inp = weight.shape
        blocks = self.quantize_blocks(weight.detach().float().reshape(-1, BLOCK))
        return self.from_blocks(blocks.reshape(out, -1), (out, inp), tensor_name)

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        out, inp = packed.shape
        blocks = packed.tensors[BLOCKS_KEY].reshape(-1, self.type_size)
        return self.dequantize_blocks(blocks).reshape(out, inp)

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        blocks = packed.tensors[BLOCKS_KEY]
        if blocks.device.type == "cuda":
            return self.triton_linear()(x, blocks, packed.shape[0], bias)
        return torch.nn.functional.linear(x, self.dequantize(packed).to(x.dtype), bias)

    def dequantize_rows(self, packed: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``W[rows]`` as float32 ``[len(rows), in]`` (embedding lookup) without widening the rest."""
        blocks = packed.tensors[BLOCKS_KEY].index_select(0, rows.reshape(-1))
        return self.dequantize_blocks(blocks.reshape(-1, self.type_size)).reshape(*rows.shape, packed.shape[1])

"""4-bit KV cache: per-token-group asymmetric quantization, keys after a Hadamard rotation.

Values (KIVI's per-token groups) and keys (QuaRot-style: rotated by the
orthonormal Sylvester Hadamard matrix ``H`` of size head_dim first, which
spreads the few outlier channels of RoPE'd keys over the whole head) are
quantized per token, head and group of ``g = group_size`` (default 32)
consecutive head_dim channels:

    s = fp16((max - min) / 15)   (s = 1 when max == min),   m = fp16(min)
    q = clamp(round((x - m) / s), 0, 15),   x_hat = m + q * s
    |x - x_hat| <= s/2 + |min - m| + 15 |s - (max - min)/15|   (exact-arithmetic bound the tests use)

Storage per layer (``PackedLayerKV``): ``[num_blocks, block_size, kv_heads,
head_dim / 2]`` uint8 (two codes per byte: channel 2j in the low nibble, 2j+1
in the high one) and fp16 ``scale``/``min`` of shape ``[..., head_dim / g]``,
for K and for V. Per token, layer and KV head that is ``head_dim/2 + 4 *
head_dim/g`` bytes against ``4 * head_dim`` (fp32): for head_dim 64, g 32:
40 vs 256 bytes, 6.4x smaller (3.2x against fp16). SmolLM2-135M (30 layers, 3
KV heads, block 16): 115,200 bytes per block instead of 737,280.

Why per-token for keys too (instead of KIVI's per-channel groups): a paged
cache writes one token at a time; per-channel groups along tokens need a
full-precision residual until a group fills, while per-token groups after a
rotation quantize each token as it is written. ``gather(table)``
dequantizes the gathered pages and un-rotates the keys (``k = k' H^T``, ``H``
symmetric so ``H^T = H``) in fp32 (eviction scoring reads that). Paged
attention calls ``gather_rotated(table)`` instead, which leaves the keys in
the stored basis, and rotates the queries: ``q . k = (q H) . k'`` (``H``
orthonormal), so a read costs ``n x D^2`` for n queries instead of
``L x D^2`` for L keys (a decode step: 1 query against the whole context;
Gemma-3-270m, D 256: 67 M multiply-adds per layer for 1024 cached tokens
undone); the new tokens are quantized before they are attended to, exactly
as later steps see them.
The codec and the fused gather are kernels/quant/kv4_groups.py
(``quantize_groups`` / ``dequantize_groups`` the torch reference; on the CPU
a C++ kernel gathers and dequantizes the pages in one pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.cache.compress.base import KVCompressor, register
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.hadamard import hadamard_matrix
from tierserve.kernels.quant.kv4_groups import gather_dequantized, quantize_groups


@dataclass
class PackedTensor:
    """One of K or V for one layer: codes ``[nb, bs, H, D/2]`` uint8, scale/zero ``[nb, bs, H, D/g]`` fp16."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @classmethod
    def empty(cls, num_blocks: int, block_size: int, heads: int, dim: int, group: int, device) -> "PackedTensor":
        shape = (num_blocks, block_size, heads)
        return cls(torch.zeros(*shape, dim // 2, dtype=torch.uint8, device=device),
                   torch.ones(*shape, dim // group, dtype=torch.float16, device=device),
                   torch.zeros(*shape, dim // group, dtype=torch.float16, device=device))

    def write(self, slots: torch.Tensor, x: torch.Tensor, group: int) -> None:
        codes, scale, zero = quantize_groups(x, group)
        for dst, src in ((self.codes, codes), (self.scale, scale), (self.zero, zero)):
            dst.view(-1, *dst.shape[2:]).index_copy_(0, slots, src)

    def gather(self, table: torch.Tensor, group: int) -> torch.Tensor:
        """Pages of ``table [..., nb]`` dequantized: ``[..., nb * bs, H, D]`` fp32 (one fused pass on the CPU)."""
        x = gather_dequantized(self.codes, self.scale, self.zero, table, group)
        return x.view(*table.shape[:-1], -1, *x.shape[-2:])


class PackedLayerKV:
    """One layer's 4-bit K and V pages; the ``LayerKV`` write contract plus ``gather``."""

    def __init__(self, k: PackedTensor, v: PackedTensor, group: int, rotation: torch.Tensor, dtype: torch.dtype):
        self.k_packed, self.v_packed = k, v
        self.group = group
        self.rotation = rotation
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.k_packed.codes.device

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The storage tensors, block-major, in a fixed order: K codes, scales, mins, then V's."""
        return tuple(t for x in (self.k_packed, self.v_packed) for t in (x.codes, x.scale, x.zero))

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_packed.write(slot_mapping, k.float() @ self.rotation, self.group)
        self.v_packed.write(slot_mapping, v, self.group)

    def gather(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.k_packed.gather(table, self.group) @ self.rotation.T
        vals = self.v_packed.gather(table, self.group)
        return keys.to(self.dtype), vals.to(self.dtype)

    def gather_rotated(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized pages with the keys left in the stored basis: queries times ``query_rotation``
        attend to them as the queries themselves to ``gather``'s keys."""
        keys = self.k_packed.gather(table, self.group)
        vals = self.v_packed.gather(table, self.group)
        return keys.to(self.dtype), vals.to(self.dtype)

    @property
    def query_rotation(self) -> torch.Tensor:
        return self.rotation


@register
class KV4Compressor(KVCompressor):
    name = "kv4"
    evicts = False

    def __init__(self, config, spec):
        super().__init__(config, spec)
        d, g = spec.head_dim, config.group_size
        if d % g or d & (d - 1):
            raise InvalidParameterError(
                "kv_group_size", f"kv4 needs a power-of-two head_dim divisible by the group size; "
                                 f"head_dim {d}, group size {g}")

    def token_bytes_per_layer(self) -> int:
        d, g, h = self.spec.head_dim, self.config.group_size, self.spec.num_kv_heads
        return 2 * h * (d // 2 + 2 * 2 * (d // g))

    def page_size_bytes(self) -> int:
        return self.spec.block_size * self.token_bytes_per_layer() * self.spec.num_layers

    def allocate_cache(self, num_blocks: int, device="cpu") -> list[PackedLayerKV]:
        s, g = self.spec, self.config.group_size
        rot = hadamard_matrix(s.head_dim, torch.float32, device)
        dtype = getattr(torch, s.dtype)
        return [PackedLayerKV(PackedTensor.empty(num_blocks, s.block_size, s.num_kv_heads, s.head_dim, g, device),
                              PackedTensor.empty(num_blocks, s.block_size, s.num_kv_heads, s.head_dim, g, device),
                              g, rot, dtype)
                for _ in range(s.num_layers)]

"""CPU fast path on torch's int4 CPU kernels: Q4_0, Q4_1, SINQ 4-bit (one int4 term), Q8_0 and MXFP4 (two).

torch (2.13) ships a CPU int4 weight-only matmul (the one torchao's int4
weight-only quantization uses on CPU):

- ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)``: codes
  ``q`` int32 ``[N, K]`` in 0..15 -> uint8 ``[N, K/2]`` (two codes per byte, the
  kernel's own order). This is the only weight tensor kept: ``N K / 2`` bytes.
- ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)``:
  ``y [M, N] = x [M, K] W^T`` with, for input column k in group g = k // group,

      W[n, k] = (q[n, k] - 8) * sz[g, n, 0] + sz[g, n, 1]

  ``sz`` (scales_and_zeros) is ``[K / group, N, 2]``: scale then zero, in x's
  dtype (the kernel rejects a scale dtype different from x's). ``group`` must
  be 32, 64, 128 or 256 (16 is rejected), and N a multiple of 16: other N are
  padded with zero rows (code 8, scale 0, zero 0) up to the next multiple of
  16 and the padded outputs are sliced off.

Measured here (2 cores, AVX512 with avx512_bf16; 1536x576 weight, group 32,
medians of 50): bf16 activations 0.016 ms at M=1, 0.055 ms at M=8, 0.34 ms at
M=64, against fp32 ``F.linear`` 0.048 / 0.155 / 0.74 ms. With fp32
activations the same op falls back to a scalar loop (0.65 ms at M=1, 44 ms at
M=64: slower than the reference), so **the fast path always computes in
bf16**: x is cast to bf16, the kernel accumulates in fp32 and rounds its
output to bf16 (checked: its output equals bf16(exact product) to 1e-6
relative; so the weight is dequantized in fp32 inside the kernel), and the
result is cast back to x's dtype. That bf16 rounding of x, of the
scales/zeros and of y is the only departure from the reference path (tests
bound it per output element by ``8 * 2^-8 * (|x| @ blockmax|W|^T)``, and
check model logits against the reference path).

Mapping of each format onto ``(q, scale, zero)`` (per output row n and group):

- Q4_0, ``w = (q - 8) d``: scale d, zero 0 (group 32).
- Q4_1, ``w = d q + m``: scale d, zero ``m + 8 d`` (group 32).
- SINQ (4-bit, tile 32/64/128/256), ``w = (q - z) s_row s_col[k]``: the column
  scale folds into the activation, ``x' = x * s_col`` (per call, ``M K``
  multiplies), then scale ``s_row``, zero ``(8 - z) s_row``.
- Q8_0, ``w = d q`` with q in [-128, 127]: two terms, ``q = 16 hi + lo`` with
  ``hi = floor(q / 16)`` in [-8, 7] (codes hi + 8, scale 16 d, zero 0) and
  ``lo`` in [0, 15] (codes lo, scale d, zero 8 d); ``y = mm(x, hi) + mm(x, lo)``
  summed in fp32. In bf16 both terms are exact multiples of bf16(d), so the
  weight represented is exactly ``q * bf16(d)``.
- MXFP4 (``fp4_cpu.py``): two terms sharing one scale tensor.

A module holds a list of such terms (``Int4CpuLinear``), y is their sum.

Memory (the repacked form replaces the format's tensors; only it stays
resident): per term ``N K / 2`` code bytes + ``K / group * N * 2 * 2`` bytes of
bf16 scale/zero (+ SINQ's ``K`` bf16 column scales). Bits per weight: 5.0 at
group 32 (ggml Q4_0 stores 4.5, Q4_1 5.0), 4.5 at group 64, 10 for Q8_0
(ggml: 8.5; the price of running 8-bit codes on 4-bit kernels).

Candidates for fp32 activations at batch 1 (``benchmarks/decode_int4_candidates.py``,
SmolLM2 shapes, 2 cores; gate_up 3072x576 / LM head 49152x576, 10th-percentile ms):
bf16 activations with both casts 0.031 / 0.56; the same op on fp32 activations
(no casts, exact to 3e-6) 1.26 / 132, ``quantized.int4mm_packed_weight_cpu`` on fp32
1.34 / 110 (both scalar loops); llama.cpp's scheme through ``torch._int_mm`` (Q8
activations per 32-block, exact int32 block dots on a block-diagonal [K/32, K]
activation matrix, one scale multiply per block) 0.17 / 91, with a larger error
than bf16 (1.6e-2 against 9.4e-3 at |y| ~3); ``_weight_int8pack_mm`` (per-channel
only) 0.57 / 48. So torch 2.13 offers no fp32-activation 4-bit kernel anywhere
near the bf16 one (20-200x slower), and the int8-activation scheme is 5x slower
and coarser: the bf16 kernel stays, its casts cost ~1.5 us each (two per
linear), and its rounding is bounded as above. Q8 activations (llama.cpp) round
each value to 1/254 of its block's max, coarser than bf16's 2^-9 relative.

Batch-1 fast forward: a single-term module without column scales, bias or row
padding (Q4_0, Q4_1: every SmolLM2 projection) runs ``cast, kernel, cast`` with no
per-call term list, stack or slicing; ``forward_terms`` is the general path and the
tests check the two are equal.

One row (a batch-1 decode step), float32 in: the activation goes to the kernel
through one ``copy_`` into the module's own preallocated ``[1, K]`` bf16 row (the
cast and the layout in one dispatch, no allocation) instead of ``reshape``,
``to`` and ``contiguous`` (3-5 dispatches and an allocation: on this host ~1.6 us
against ~4.5-7 us per call, ~121 calls per SmolLM2 step). The row is written and
read within one call under a non-blocking lock (any thread may use it, the async
engine steps on a pool thread; a call that finds it held, i.e. a concurrent call of
the same module, takes the general cast), outside autograd and outside
``torch.compile`` tracing (inductor fuses the casts itself). The output is cast
back to float32 once (``float()``; the kernel has no out= form and a reused output
row would alias results the caller keeps). Same values as the general path
(tests: bit-equal).

Not used: ``torch.ops.aten._dyn_quant_pack_4bit_weight`` / ``_dyn_quant_matmul_4bit``
(KleidiAI W4A8). On this x86 build the pack op returns the weight as float32
(3.66 MB for a 1536x576 weight, larger than the fp32 weight itself) and the
matmul rejected the packed tensor in our test, so it saves no memory here.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.ggml_blocks import BLOCK, BLOCKS_KEY, fp16_from_bytes, unpack_nibbles
from tierserve.kernels.quant.sinq import unpack_codes

INT4_GROUPS = (32, 64, 128, 256)
INT4_OFFSET = 8
N_MULTIPLE = 16
COMPUTE_DTYPE = torch.bfloat16


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` (0..15), per-group ``scale``/``zero`` ``[N, K/group]`` (fp32) -> (packed, sz bf16).

    The weight represented is ``(codes - 8) * scale + zero`` per group; N is
    padded to a multiple of 16 (see module docstring).
    """
    if group not in INT4_GROUPS:
        raise InvalidParameterError("group", f"torch's int4 CPU kernel takes groups {INT4_GROUPS}, got {group}")
    n, k = codes.shape
    if k % group or tuple(scale.shape) != (n, k // group) or tuple(zero.shape) != (n, k // group):
        raise InvalidParameterError("scale", f"codes {list(codes.shape)} need scale/zero [{n}, {k // group}], "
                                             f"got {list(scale.shape)} / {list(zero.shape)}")
    pad = -n % N_MULTIPLE
    codes = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, pad), value=INT4_OFFSET)
    scale = torch.nn.functional.pad(scale.float(), (0, 0, 0, pad))
    zero = torch.nn.functional.pad(zero.float(), (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return packed, sz


class Int4CpuLinear(nn.Module):
    """``y = sum_t (x * col_scale) W_t^T + b`` with each W_t in torch's int4 CPU pack (module docstring).

    ``terms`` are ``(packed, sz)`` pairs (one for Q4_0/Q4_1/SINQ, two for Q8_0 and MXFP4); a scale
    tensor shared by two terms is stored once.
    """

    def __init__(self, fmt_name: str, terms: list[tuple[torch.Tensor, torch.Tensor]], group: int,
                 shape: tuple[int, int], bias: torch.Tensor | None, col_scale: torch.Tensor | None = None):
        super().__init__()
        self.fmt_name, self.group, self.n_terms = fmt_name, group, len(terms)
        self.out_features, self.in_features = shape
        for i, (packed, sz) in enumerate(terms):
            self.register_buffer(f"packed_{i}", packed)
            self.register_buffer(f"sz_{i}", sz)
        self.register_buffer("col_scale", None if col_scale is None else col_scale.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._single = (len(terms) == 1 and col_scale is None and bias is None
                        and terms[0][1].shape[1] == self.out_features
                        and type(self).prepare_input is Int4CpuLinear.prepare_input)
        self._plain_input = type(self).prepare_input is Int4CpuLinear.prepare_input and col_scale is None
        self._new_row()

    def _new_row(self) -> None:
        """The batch-1 input row and its lock (module docstring): plain attributes, not buffers (no state_dict
        entry), made outside inference mode so that copy_ into the row is allowed everywhere."""
        with torch.inference_mode(False):
            self._row = torch.empty((1, self.in_features), dtype=COMPUTE_DTYPE)
        self._row_lock = threading.Lock()

    def __getstate__(self):
        state = super().__getstate__().copy()
        del state["_row"], state["_row_lock"]  # a lock does not pickle; a copy gets its own row
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._new_row()

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"packed_{i}"), getattr(self, f"sz_{i}")) for i in range(self.n_terms)]

    @property
    def nbytes(self) -> int:
        """Resident bytes of the weight (codes, scales/zeros, column scales; bias excluded; shared storage once)."""
        ts = [t for term in self.terms() for t in term] + ([] if self.col_scale is None else [self.col_scale])
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in ts}.values())

    def prepare_input(self, x2: torch.Tensor) -> torch.Tensor:
        """Hook for formats that transform activations first (MXFP4: rotation, W4A4); identity here."""
        return x2

    def _take_row(self, x: torch.Tensor) -> bool:
        """True (row lock held: the caller releases it) where ``x`` is a ``[1, K]`` float32 row that may go
        through the module's bf16 row (module docstring); False for other shapes and dtypes, autograd, compile
        tracing and a concurrent call."""
        if torch.compiler.is_compiling():  # first: dynamo folds it and never traces the lock
            return False
        if x.dim() != 2 or x.shape[0] != 1 or x.dtype != torch.float32 or x.requires_grad:
            return False
        return self._row_lock.acquire(blocking=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._single:  # cast, kernel, cast (module docstring: batch-1 fast forward)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            if self._take_row(x):  # one row: no reshape, no allocation on the way in
                try:
                    return mm(self._row.copy_(x), self.packed_0, self.group, self.sz_0).float()
                finally:
                    self._row_lock.release()
            y = mm(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous(), self.packed_0, self.group,
                   self.sz_0)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return self.forward_terms(x)

    def forward_terms(self, x: torch.Tensor) -> torch.Tensor:
        """The general path: column scales, several terms, padded rows, bias."""
        if self._plain_input and self._take_row(x):
            try:
                y = self._sum_terms(self._row.copy_(x))
            finally:
                self._row_lock.release()
        else:
            xb = self.prepare_input(x.reshape(-1, self.in_features)).to(COMPUTE_DTYPE)
            if self.col_scale is not None:
                xb = xb * self.col_scale
            y = self._sum_terms(xb.contiguous())
        y = y.to(x.dtype)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _sum_terms(self, xb: torch.Tensor) -> torch.Tensor:
        """``sum_t xb W_t^T`` ``[M, out_features]``: the terms in fp32 when several, padded rows cut."""
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        parts = [mm(xb, packed, self.group, sz) for packed, sz in self.terms()]
        y = parts[0]
        for part in parts[1:]:  # fp32 sum of the bf16 terms (add_ promotes the bf16 operand)
            y = y.float().add_(part)
        if y.shape[-1] != self.out_features:  # rows padded to a multiple of N_MULTIPLE
            y = y[:, :self.out_features]
        return y

    def extra_repr(self) -> str:
        return (f"format={self.fmt_name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"group={self.group}, int4pack_bf16 x{self.n_terms}")


def _ggml_blocks(packed: PackedWeight, type_size: int) -> torch.Tensor:
    out, inp = packed.shape
    return packed.tensors[BLOCKS_KEY].reshape(out, inp // BLOCK, type_size)


def int4_from_q4_0(packed: PackedWeight, bias: torch.Tensor | None = None) -> Int4CpuLinear:
    """Q4_0 blocks -> Int4CpuLinear: scale d, zero 0, group 32."""
    blocks = _ggml_blocks(packed, 18)
    d = fp16_from_bytes(blocks[..., 0:2]).squeeze(-1)
    codes = unpack_nibbles(blocks[..., 2:]).reshape(packed.shape)
    return Int4CpuLinear("q4_0", [pack_int4(codes, d, torch.zeros_like(d), BLOCK)], BLOCK, packed.shape, bias)


def int4_from_q4_1(packed: PackedWeight, bias: torch.Tensor | None = None) -> Int4CpuLinear:
    """Q4_1 blocks -> Int4CpuLinear: scale d, zero m + 8 d, group 32."""
    blocks = _ggml_blocks(packed, 20)
    d = fp16_from_bytes(blocks[..., 0:2]).squeeze(-1)
    m = fp16_from_bytes(blocks[..., 2:4]).squeeze(-1)
    codes = unpack_nibbles(blocks[..., 4:]).reshape(packed.shape)
    return Int4CpuLinear("q4_1", [pack_int4(codes, d, m + INT4_OFFSET * d, BLOCK)], BLOCK, packed.shape, bias)


def sinq_int4_supported(packed: PackedWeight) -> bool:
    return int(packed.meta["bits"]) == 4 and int(packed.meta["group"]) in INT4_GROUPS


def int4_from_sinq(packed: PackedWeight, bias: torch.Tensor | None = None) -> Int4CpuLinear:
    """SINQ 4-bit -> Int4CpuLinear: x' = x s_col, scale s_row, zero (8 - z) s_row."""
    if not sinq_int4_supported(packed):
        raise InvalidParameterError("sinq", f"the int4 CPU path needs bits=4 and a tile in {INT4_GROUPS}, "
                                            f"got {dict(packed.meta)}")
    t, group = packed.tensors, int(packed.meta["group"])
    s_row, z = t["s_row"].float(), t["z"].float()
    codes = unpack_codes(t["qweight"], 4)
    term = pack_int4(codes, s_row, (INT4_OFFSET - z) * s_row, group)
    return Int4CpuLinear("sinq", [term], group, packed.shape, bias, col_scale=t["s_col"].float())


def int4_from_q8_0(packed: PackedWeight, bias: torch.Tensor | None = None) -> Int4CpuLinear:
    """Q8_0 blocks -> two int4 terms: q = 16 hi + lo, hi in [-8, 7] (scale 16 d, zero 0), lo in [0, 15]
    (scale d, zero 8 d)."""
    blocks = _ggml_blocks(packed, 34)
    d = fp16_from_bytes(blocks[..., 0:2]).squeeze(-1)
    q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.int32).reshape(packed.shape)
    hi = torch.div(q, 16, rounding_mode="floor")
    terms = [pack_int4(hi + INT4_OFFSET, 16 * d, torch.zeros_like(d), BLOCK),
             pack_int4(q - 16 * hi, d, INT4_OFFSET * d, BLOCK)]
    return Int4CpuLinear("q8_0", terms, BLOCK, packed.shape, bias)

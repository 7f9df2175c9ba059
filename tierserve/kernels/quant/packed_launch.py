"""What every packed-weight matmul kernel shares: the inner product, the store, split-K and the launch.

``y[M, N] = x[M, K] W[N, K]^T + b`` where each format's kernel
(``<format>_triton.py``) dequantizes a ``[BLOCK_N, BLOCK_K]`` (or two
``[BLOCK_N, BLOCK_K / 2]`` nibble halves) weight tile in registers and hands
it to ``accumulate``:

* ``USE_DOT = False`` (M = 1, see ``tile_configs``): ``acc += sum_k x[k] w[n, k]``
  with fp32 multiply-adds (broadcast product and ``tl.sum``), weights never
  rounded below fp32;
* ``USE_DOT = True``: ``tl.dot`` with fp32 accumulation. ``DOT_KIND`` is 1
  (bf16) or 2 (fp16) when the activations are bf16/fp16: the dequantized tile
  is rounded to the activations' dtype, exactly as the torch reference
  ``F.linear(x, dequantize(W).to(x.dtype))`` rounds it, and the product runs
  on tensor cores; ``DOT_KIND = 0`` (fp32 activations) is an IEEE fp32 dot.
  Off CUDA (the triton interpreter, whose bf16 ``tl.dot`` returns garbage in
  triton 3.9) bf16 runs as ``DOT_KIND = 3``: inputs rounded to bf16, products
  (exact in fp32) summed by an IEEE fp32 dot -- the same rounding as on the GPU.

``store_tile``: with one K split the program adds the bias and writes y in
its dtype; with ``SPLIT_K > 1`` it writes its fp32 partial to
``partials[split, M, N]`` and ``splitk_reduce`` sums the splits in index
order (deterministic), adds the bias and casts. ``launch`` picks the tile
config (``tile_configs.choose_tiles`` with the device's multiprocessor count
unless one is given), allocates, runs the format's kernel on the grid
``(M tiles, N tiles, K splits)`` and reduces. Every format kernel takes its
own pointers first, then ``b_ptr, y_ptr, M, N, K, k_per_split`` and the
constexprs ``HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_KIND`` (``SPLIT_K`` is a
runtime argument, so one compiled kernel per M bucket serves every shape).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.tile_configs import DEFAULT_NUM_SMS, TileConfig, choose_tiles

DOT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BF16_EMULATED = 3


def dot_kind(dtype: torch.dtype, device: torch.device) -> int:
    """The ``DOT_KIND`` for activations of ``dtype`` on ``device`` (module docstring)."""
    kind = DOT_KINDS.get(dtype, 0)
    return BF16_EMULATED if kind == DOT_KINDS[torch.bfloat16] and device.type != "cuda" else kind
REDUCE_BLOCK = 1024


@triton.jit
def accumulate(acc, x, w, USE_DOT: tl.constexpr, DOT_KIND: tl.constexpr):
    """acc[BM, BN] += x[BM, BK] @ w[BN, BK]^T (see module docstring for the precisions)."""
    if USE_DOT:
        if DOT_KIND == 1:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        elif DOT_KIND == 2:
            acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
        elif DOT_KIND == 3:  # bf16 inputs, products formed in fp32 (exact): the interpreter's bf16 dot
            xr = x.to(tl.bfloat16).to(tl.float32)
            wr = w.to(tl.bfloat16).to(tl.float32)
            acc += tl.dot(xr, tl.trans(wr), input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr, SPLIT_K):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        base = y_ptr + tl.program_id(2).to(tl.int64) * M * N
        tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(partials: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``y = sum_s partials[s] (+ bias)`` summed in split order, cast to y's dtype."""
    split, m, n = partials.shape
    grid = (triton.cdiv(m * n, REDUCE_BLOCK),)
    _splitk_reduce_kernel[grid](partials, bias if bias is not None else y, y, m * n, n, SPLIT=split,
                                HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK)
    return y


@lru_cache(maxsize=16)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The device's multiprocessor count (DEFAULT_NUM_SMS off CUDA, e.g. under the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def launch(kernel: Callable, weight_args: tuple, x2: torch.Tensor, n: int, bias: torch.Tensor | None,
           out_dtype: torch.dtype, config: TileConfig | None = None, kind: int | None = None,
           **constexprs) -> torch.Tensor:
    """Run ``kernel[grid](*weight_args, b, y, M, N, K, k_per_split, ...)``; returns y ``[M, N]`` in out_dtype.

    ``weight_args`` are the format's pointers (activation pointers included);
    ``constexprs`` its own compile-time parameters; ``kind`` (DOT_KIND)
    defaults to ``dot_kind`` of the activations' dtype.
    """
    m, k = x2.shape
    cfg = config or choose_tiles(m, n, k, num_sms(x2.device))
    k_split = cfg.k_per_split(k)
    grid = cfg.grid(m, n, k)
    y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    if m == 0:
        return y
    target = y if grid[2] == 1 else torch.empty(grid[2], m, n, dtype=torch.float32, device=x2.device)
    kind = dot_kind(x2.dtype, x2.device) if kind is None else kind
    kernel[grid](*weight_args, bias if bias is not None else y, target, m, n, k, k_split,
                 HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 SPLIT_K=grid[2], USE_DOT=cfg.use_dot, DOT_KIND=kind, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, **constexprs)
    if grid[2] > 1:
        splitk_reduce(target, bias, y)
    return y

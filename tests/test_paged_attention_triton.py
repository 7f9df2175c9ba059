"""Triton paged attention (decode split-K + reduce, varlen prefill, int4 kv4 pages) against the torch reference.

The torch backend (``kernels/paged_attention.py``) is the oracle. Each case
builds random pages (every slot filled, so a masking bug reads garbage),
random non-contiguous block tables, and one step's new tokens; both backends
run ``forward`` (page write + attention) on their own copy of the pages, and
the outputs must agree within ``tolerance(dtype)``; the written pages must be
identical. On CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest);
the ``cuda`` test reruns a part of the grid plus long contexts (1k-4k
tokens, several splits, prefill chunks of 300) with compiled kernels, in a
``TRITON_INTERPRET=0 python -m pytest -m cuda`` session (conftest skips it
elsewhere).

Tolerances. Let ``u`` be the unit roundoff of the dtype (2^-24 fp32, 2^-11
fp16, 2^-8 bf16). Both sides read the same stored K/V and q, so the
differences are rounding of intermediate results: (a) the triton side
rounds the softmax weights ``p`` to the dtype before ``p V`` (relative
error <= u per weight, so <= u * max|v| on the output, a convex combination
of V rows); (b) the 16-bit reference computes scores in the dtype on its
soft-capping path (|ds| <= u |s|, which moves the output by at most
2 |ds| max|v|; |s| <= 4 here); (c) both round the output once (u/2 |o|
each); (d) int4 pages: the reference rounds un-rotated keys to the dtype
while the kernel rounds ``q H`` and the dequantized rotated keys (another
~2 u |s|). Summed, with max|v| ~ 4 for N(0, 1) values: about
(1 + 8 + 1 + 8) * 4 u ~ 72 u in the worst case; the errors have random
signs, so 16-bit dtypes use ``atol = rtol = 16 u`` (0.0625 bf16, 0.0078
fp16); the CPU grid's largest observed difference is 6 u. fp32 differs only
in summation order (dots over D and sums over L keys, each term of size
<= max|s| or max|v|): random-walk error ~ sqrt(D + L) u * 4 < 2^-16 for
L up to 4k, so ``atol = rtol = 2^-16`` (observed at most 24 u = 1.4e-6).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch

from tierserve.cache.compress.kv4 import PackedLayerKV, PackedTensor
from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention import tiles
from tierserve.kernels.attention.paged_decode_triton import paged_decode as decode_triton
from tierserve.kernels.attention.registry import ATTENTION_BACKENDS, build_attention_backend
from tierserve.kernels.attention.triton_backend import TritonAttention
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata, TorchAttention, paged_decode
from tierserve.kernels.quant.hadamard import hadamard_matrix

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tolerance(dtype: torch.dtype) -> float:
    """atol = rtol for comparing against the reference (derivation in the module docstring)."""
    return 2.0 ** -16 if dtype == torch.float32 else 16 * UNIT_ROUNDOFF[dtype]


@dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    hq: int = 2
    hkv: int = 2
    dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    window: int | None = None
    softcap: float | None = None
    kv4: bool = False


def build(case: Case, device: str, seed: int = 0):
    """(q, k, v, pages, meta): pages hold random context in every slot; tables are shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-s // case.block_size) for s in case.seq_lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(perm[at:at + n])
        at += n
    meta = AttentionMetadata.build(list(case.q_lens), list(case.seq_lens), tables, case.block_size, device)
    shape = (num_blocks, case.block_size, case.hkv, case.dim)
    t = sum(case.q_lens)
    q = torch.randn(t, case.hq, case.dim, generator=g).to(device, case.dtype)
    k = torch.randn(t, case.hkv, case.dim, generator=g).to(device, case.dtype)
    v = torch.randn(t, case.hkv, case.dim, generator=g).to(device, case.dtype)
    if not case.kv4:
        pages = LayerKV(torch.randn(shape, generator=g).to(device, case.dtype),
                        torch.randn(shape, generator=g).to(device, case.dtype))
        return q, k, v, pages, meta
    group = 32
    pages = PackedLayerKV(PackedTensor.empty(*shape, group, device), PackedTensor.empty(*shape, group, device),
                          group, hadamard_matrix(case.dim, torch.float32, device), case.dtype)
    every = torch.arange(num_blocks * case.block_size, device=device)
    pages.write(every, torch.randn(every.numel(), case.hkv, case.dim, generator=g).to(device, case.dtype),
                torch.randn(every.numel(), case.hkv, case.dim, generator=g).to(device, case.dtype))
    return q, k, v, pages, meta


def run_both(case: Case, device: str = "cpu", seed: int = 0) -> float:
    """Max |triton - reference| after asserting closeness and identical page writes."""
    q, k, v, pages, meta = build(case, device, seed)
    ref_pages, tri_pages = pages, copy.deepcopy(pages)
    scale = case.dim ** -0.5
    ref = TorchAttention().forward(q, k, v, ref_pages, meta, scale, case.window, case.softcap)
    meta_tri = replace(meta, backend=TritonAttention(), _masks={})
    out = TritonAttention().forward(q, k, v, tri_pages, meta_tri, scale, case.window, case.softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = tolerance(case.dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")
    for a, b in zip(_page_tensors(ref_pages), _page_tensors(tri_pages)):
        assert torch.equal(a, b)
    return (out.float() - ref.float()).abs().max().item()


def _page_tensors(pages) -> list[torch.Tensor]:
    if isinstance(pages, LayerKV):
        return [pages.k, pages.v]
    return [t for p in (pages.k_packed, pages.v_packed) for t in (p.codes, p.scale, p.zero)]


# head_dim x GQA ratio x block size, each with the three dtypes; ragged contexts: 1, non-multiples of
# the block size, several pages.
SHAPES = [(d, ratio, bs) for d in (64, 128) for ratio in (1, 4) for bs in (16, 32)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DECODE = dict(q_lens=(1, 1, 1), seq_lens=(1, 37, 70))
MIXED = dict(q_lens=(1, 6, 17, 1), seq_lens=(1, 40, 17, 33))  # decode, prefix hit + chunk, full prefill, decode


def _case(shape, dtype, lens, **kw) -> Case:
    d, ratio, bs = shape
    return Case(hq=2 * ratio, hkv=2, dim=d, block_size=bs, dtype=dtype, **lens, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-gqa{s[1]}-bs{s[2]}")
def test_decode_matches_reference(shape, dtype):
    run_both(_case(shape, dtype, DECODE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-gqa{s[1]}-bs{s[2]}")
def test_mixed_prefill_decode_matches_reference(shape, dtype):
    run_both(_case(shape, dtype, MIXED))


@pytest.mark.parametrize("lens", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("window,softcap", [(8, None), (None, 2.0), (21, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_and_softcap(lens, window, softcap, dtype):
    run_both(_case((64, 4, 16), dtype, lens, window=window, softcap=softcap))


@pytest.mark.parametrize("lens", [DECODE, MIXED], ids=["decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window,softcap", [(None, None), (13, 2.0)])
def test_kv4_pages_dequantized_in_kernel(lens, dtype, window, softcap):
    run_both(_case((64, 4, 16), dtype, lens, window=window, softcap=softcap, kv4=True))


def test_gqa_ratio_not_a_power_of_two():
    run_both(Case(q_lens=(1, 3), seq_lens=(19, 3), hq=6, hkv=2, dim=64))
    run_both(Case(q_lens=(1, 1), seq_lens=(19, 3), hq=6, hkv=2, dim=64))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_splits_agree(num_splits):
    """Split-K with empty splits (7 splits of a 1-token context) merges to the reference result."""
    case = Case(q_lens=(1, 1, 1), seq_lens=(1, 37, 70), hq=8, hkv=2, window=33)
    q, k, v, pages, meta = build(case, "cpu")
    pages.write(meta.slot_mapping, k, v)
    ref = paged_decode(q, pages, meta, 0.125, case.window)
    out = decode_triton(q, pages, meta, 0.125, case.window, num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=tolerance(torch.float32), rtol=tolerance(torch.float32))


def test_tiny_gemma3_same_logits_with_triton_backend(tmp_path):
    """The model path: ``meta.backend`` switches attention for a whole forward (sliding + full layers, GQA)."""
    from model_harness import build_and_save
    from transformers import Gemma3TextConfig

    from tierserve.kernels.kv_pages import allocate_kv_cache
    from tierserve.models.context import ForwardContext
    from tierserve.models.loader import load_model

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=128,
                           sliding_window=8, query_pre_attn_scalar=24, tie_word_embeddings=False,
                           layer_types=["sliding_attention", "full_attention"])
    build_and_save(cfg, str(tmp_path))
    model = load_model(str(tmp_path)).model
    tokens = [(7 * i + 3) % 384 for i in range(23)]
    steps = [(0, 9), (9, 20), (20, 21), (21, 22), (22, 23)]  # two prefill chunks, then decode steps
    table = [5, 2, 7, 0, 3, 6]
    logits = {}
    for backend in (TorchAttention(), TritonAttention()):
        kv = allocate_kv_cache(model.kv_spec(4), 8)
        outs = []
        for lo, hi in steps:
            meta = AttentionMetadata.build([hi - lo], [hi], [table[: -(-hi // 4)]], 4)
            meta = replace(meta, backend=backend)
            with torch.inference_mode():
                hidden = model(torch.tensor(tokens[lo:hi]), torch.arange(lo, hi), ForwardContext(meta, kv))
                outs.append(model.compute_logits(hidden))
        logits[backend.name] = torch.cat(outs)
    assert (logits["triton"] - logits["torch"]).abs().max().item() <= 1e-4


def test_registry_builds_by_name_and_rejects_unknown():
    assert sorted(ATTENTION_BACKENDS) == ["torch", "triton"]
    assert isinstance(build_attention_backend("triton"), TritonAttention)
    assert isinstance(build_attention_backend("torch"), TorchAttention)
    assert isinstance(AttentionMetadata.build([1], [1], [[0]], 16).backend, TorchAttention)
    with pytest.raises(InvalidParameterError) as err:
        build_attention_backend("flash")
    assert err.value.field == "attention_backend"


def test_tile_rules():
    assert [tiles.decode_splits(b, 8, 4096, 132) for b in (1, 8, 32, 128)] == [32, 5, 2, 1]
    assert [tiles.decode_splits(b, 8, 1024, 132) for b in (1, 8, 32, 128)] == [8, 5, 2, 1]
    assert tiles.decode_splits(1, 1, 100, 132) == 1 and tiles.decode_splits(1, 1, 10 ** 6, 132) == 64
    t = tiles.decode_tiles(group=4, head_dim=128, block_size=16, batch=1, kv_heads=8, max_context=4096, num_sms=132)
    assert (t.block_g, t.block_d, t.tile_n, t.num_splits, t.num_warps) == (16, 128, 64, 32, 4)
    assert tiles.decode_tiles(32, 256, 128, 1, 1, 10, 1).tile_n == 128
    assert tiles.decode_tiles(32, 256, 16, 1, 1, 10, 1).block_g == 32
    assert tiles.prefill_tiles(128, 16) == tiles.PrefillTiles(64, 64, 128, 4)
    assert tiles.prefill_tiles(256, 16) == tiles.PrefillTiles(32, 32, 256, 8)
    assert tiles.prefill_tiles(80, 128) == tiles.PrefillTiles(64, 128, 128, 4)


def cuda_grid(dtype: torch.dtype) -> list[str]:
    """Compiled kernels on CUDA in ``dtype``: one line per case (max |diff|); raises listing every failed case.

    bf16: every shape; fp32 and fp16: two shapes (each distinct shape and dtype is a compilation, which
    dominates the run); then long contexts. One test per dtype, so the check machine compiles the three
    in parallel processes (benchmarks/device_check.sh).
    """
    lines, failed = [], []
    shapes = SHAPES if dtype == torch.bfloat16 else [SHAPES[0], SHAPES[-1]]
    cases = [_case(s, dtype, lens) for s in shapes for lens in (DECODE, MIXED)]
    long = dict(q_lens=(1,) * 4, seq_lens=(1, 1000, 4097, 2500))
    long_mixed = dict(q_lens=(1, 300, 1, 77), seq_lens=(1, 2000, 4097, 77))
    for lens in (long, long_mixed):
        cases += [_case((128, 4, 16), dtype, lens), _case((64, 1, 32), dtype, lens, window=512, softcap=30.0),
                  _case((128, 8, 16), dtype, lens, kv4=True), _case((128, 4, 16), dtype, lens, kv4=True, window=700)]
    for case in cases:
        try:
            lines.append(f"{run_both(case, 'cuda'):.3g} {case}")
        except AssertionError as err:
            failed.append(f"FAILED {case}: {str(err)[-400:]}")
    if failed:
        raise AssertionError("\n".join(lines + failed))
    return lines


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_compiled_kernels_match_reference(dtype):
    print("\n".join(cuda_grid(dtype)))

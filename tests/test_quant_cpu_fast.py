"""CPU fast paths of the packed weight formats against their torch reference (the oracle).

- torch's int4 CPU kernel obeys the convention int4_cpu documents (W = (q - 8) s + z per group, scales in
  [K/group, N, 2]), checked against a float64 matmul of the same bf16 inputs.
- Every fast path (Q4_0, Q4_1, SINQ, Q8_0, MXFP4 int4-pair and LUT, NVFP4 LUT; Hadamard and W4A4 options)
  against ``QuantizedLinear``'s reference forward over M in {1, 3, 17} and several shapes (N not a multiple of
  16 included): bf16-compute paths within 4 bf16 unit roundoffs of ``|x| @ blockmax|W|^T`` per element
  (roundings of x, scale, zero and y; measured <= 0.38), float32 paths within ``2 sqrt(K)`` float32 unit
  roundoffs of ``|x| @ |W|^T`` (summation order only; measured <= 4.6). W4A4 activations are fake-quantized
  in float32 by the same function on both paths, so they enter the comparison identical (no exceptions).
- The resident bytes of each fast module are what their docstrings claim.
- ``apply_linear_backend(model, "auto")`` swaps every quantized linear of a tiny model and of SmolLM2's
  packed GGUF (Q4_1 layers, Q8_0 tied head) for its fast path; logits stay within tolerance of the
  reference path and the "torch" backend leaves the reference in place.
"""

from __future__ import annotations

import os

# the quant test modules run triton kernels interpreted; whichever module imports triton first in a pytest
# session fixes the mode, so this one (collected before them) sets it too
os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from model_harness import PagedRunner, build_and_save  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

import tierserve.kernels.quant  # noqa: E402,F401  (registers the formats)
from tierserve.kernels.cpu_linear import apply_linear_backend  # noqa: E402
from tierserve.kernels.quant.base import QuantizedLinear, get_format  # noqa: E402
from tierserve.kernels.quant.cpu_fast import CPU_FAST_PATHS, accelerate_quantized, cpu_fast_module  # noqa: E402
from tierserve.kernels.quant.dequant_cpu import ChunkedDequantLinear, Q8_0ChunkedLinear, chunk_rows  # noqa: E402
from tierserve.kernels.quant.fp4_cpu import FP4LutLinear, MXFP4Int4Linear, prepare_fp4_input  # noqa: E402
from tierserve.kernels.quant.int4_cpu import (Int4CpuLinear, int4_from_q4_0, int4_from_q4_1, int4_from_q8_0,  # noqa: E402
                                              pack_int4)
from tierserve.kernels.quant.q8_dot_cpu import available as q8_dot_available  # noqa: E402
from tierserve.kernels.quant.q8_dot_linear import Q8DotLinear  # noqa: E402
from tierserve.kernels.quant.transform import model_nbytes, quantize_model  # noqa: E402
from tierserve.models.loader import load_model  # noqa: E402

U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significant bits, round to nearest)
U_FP32 = 2.0 ** -24  # float32 unit roundoff


def _fp32_order_bound(k: int) -> float:
    """Relative deviation between two summation orders of a K-term float32 dot product, per unit of
    ``sum |x_k w_k|``: each partial-sum rounding is at most u with a random sign, so one order deviates
    like sqrt(K) u and the difference of two orders like sqrt(2 K) u; 2 sqrt(K) u leaves a margin over
    that (the worst case (K-1) u is not what these random inputs produce)."""
    return 2.0 * k ** 0.5 * U_FP32

Q8DOT = q8_dot_available()  # the integer-dot kernel built here: the default of q4_1 and q8_0
# builders of the non-default modules a case checks explicitly
EXPLICIT = {MXFP4Int4Linear: lambda fmt, q: MXFP4Int4Linear(fmt, q.packed(), q.bias),
            Int4CpuLinear: lambda fmt, q: {"q4_0": int4_from_q4_0, "q4_1": int4_from_q4_1,
                                           "q8_0": int4_from_q8_0}[fmt.name](q.packed(), q.bias)}

# (label, scheme, options, fast module class, compute: "bf16" (int4 pack), "fp32" or "q8" (int8 activations))
CASES = [
    ("q4_0", "q4_0", {}, Int4CpuLinear, "bf16"),
    ("q4_1", "q4_1", {}, Q8DotLinear if Q8DOT else Int4CpuLinear, "q8" if Q8DOT else "bf16"),
    ("q4_1 int4", "q4_1", {}, (Int4CpuLinear,), "bf16"),  # the path without the integer-dot kernel
    ("sinq g64", "sinq", {"group": 64}, Int4CpuLinear, "bf16"),
    ("sinq g32", "sinq", {"group": 32}, Int4CpuLinear, "bf16"),
    ("q8_0", "q8_0", {}, Q8DotLinear if Q8DOT else Int4CpuLinear, "q8" if Q8DOT else "bf16"),
    ("q8_0 int4", "q8_0", {}, (Int4CpuLinear,), "bf16"),
    ("mxfp4", "mxfp4", {}, FP4LutLinear, "fp32"),
    ("mxfp4 had w4a4", "mxfp4", {"hadamard": True, "act_quant": True}, FP4LutLinear, "fp32"),
    ("mxfp4 int4 pair", "mxfp4", {}, (MXFP4Int4Linear,), "bf16"),  # not the default (9 bits per weight)
    ("mxfp4 int4 pair had w4a4", "mxfp4", {"hadamard": True, "act_quant": True}, (MXFP4Int4Linear,), "bf16"),
    ("nvfp4", "nvfp4", {}, FP4LutLinear, "fp32"),
    ("nvfp4 had w4a4", "nvfp4", {"hadamard": True, "act_quant": True}, FP4LutLinear, "fp32"),
]
SHAPES = [(96, 128), (40, 64), (7, 256), (576, 192)]  # (out, in): in a multiple of every group (64)


def _block_max(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    return w.abs().reshape(n, k // group, group).amax(-1, keepdim=True).expand(n, k // group, group).reshape(n, k)


def test_int4_kernel_convention():
    """W[n, k] = (q - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]; output = bf16 of the exact product."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 48, 128, 32
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // group, generator=g) + 0.1
    zero = torch.randn(n, k // group, generator=g)
    packed, sz = pack_int4(q, scale, zero, group)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, k // 2)
    assert tuple(sz.shape) == (k // group, n, 2) and sz.dtype == torch.bfloat16
    x = torch.randn(5, k, generator=g).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz).double()
    s = sz[..., 0].double().t().repeat_interleave(group, 1)
    z = sz[..., 1].double().t().repeat_interleave(group, 1)
    exact = x.double() @ ((q.double() - 8) * s + z).t()
    assert (y - exact).abs().max().item() <= U_BF16 * exact.abs().max().item()
    assert (y - exact.bfloat16().double()).abs().max().item() <= 1e-5 * exact.abs().max().item()
    wrong = x.double() @ (q.double() * s + z).t()  # the convention without the -8 would be far off
    assert (y - wrong).abs().max().item() > 0.5 * exact.abs().max().item()


@pytest.mark.parametrize("label,scheme,opts,cls,mode", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_fast_path_matches_reference(label, scheme, opts, cls, mode, out_f, in_f):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    fmt = get_format(scheme, **opts)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column: scales differ a lot between groups
    ref_mod = QuantizedLinear(fmt, fmt.quantize(w), torch.randn(out_f, generator=g))
    if isinstance(cls, tuple):  # a module that is not the format's default, built explicitly
        cls = cls[0]
        fast = EXPLICIT[cls](fmt, ref_mod)
    else:
        fast = cpu_fast_module(ref_mod)
    assert isinstance(fast, cls)
    w_ref = fmt.dequantize(ref_mod.packed())
    for m in (1, 3, 17):
        x = torch.randn(m, in_f, generator=g)
        with torch.no_grad():
            ref, got = ref_mod(x), fast(x)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        err = (got - ref).abs()
        if mode == "q8":  # activations rounded to 8 bits per block of 32: at most dx / 2 per element; then float32
            dx = x.reshape(m, -1, 32).abs().amax(-1) / 127  # [M, K / 32]
            step = (dx / 2).repeat_interleave(32, 1)
            bound = step @ w_ref.abs().t() + _fp32_order_bound(in_f) * (x.abs() @ w_ref.abs().t()) + 1e-6
        elif mode == "bf16":  # x, scales/zeros and y rounded to bf16 (module docstrings): a few unit roundoffs
            group = opts.get("group", 32)
            a = x.abs()
            if opts.get("hadamard"):  # the rotated weight's blocks meet the rotated (W4A4: fake-quantized)
                # activations; the fake-quant runs in float32 before the bf16 cast and its values (E2M1 times a
                # power of two) are exact in bf16, so both paths multiply the same activations
                a = prepare_fp4_input(fmt, ref_mod.packed().meta, x).abs()
                w_blocks = fmt.dequantize_rotated(ref_mod.packed())
            else:
                w_blocks = w_ref
            # bf16 roundings, each at most u of |x| @ blockmax|W|: x, the group scale, the group zero (Q4_1, SINQ;
            # Q8_0's second int4 term plays that part) and y -> 4u; measured <= 0.38u (random signs cancel)
            bound = 4 * U_BF16 * (a @ _block_max(w_blocks, group).t()) + 1e-7
        else:  # float32 dequantize + matmul (Hadamard and W4A4 fake-quant by the same functions): summation order
            bound = _fp32_order_bound(in_f) * (x.abs() @ w_ref.abs().t()) + 1e-7
        assert bool((err <= bound).all()), f"{label} M={m}: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1"])
@pytest.mark.parametrize("out_f,bias", [(96, False), (40, False), (96, True)])
def test_single_term_forward_equals_general_path(scheme, out_f, bias):
    """The batch-1 fast forward (one term, no bias, no padded rows) runs the same cast, kernel, cast as the
    general term loop: bit-equal outputs; padded or biased modules take the general path."""
    g = torch.Generator().manual_seed(out_f)
    fmt = get_format(scheme)
    w = torch.randn(out_f, 128, generator=g) * 0.05
    ref_mod = QuantizedLinear(fmt, fmt.quantize(w), torch.randn(out_f, generator=g) if bias else None)
    fast = EXPLICIT[Int4CpuLinear](fmt, ref_mod)
    assert fast._single == (out_f % 16 == 0 and not bias)
    for shape in ((1, 128), (3, 128), (2, 5, 128)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            got, general, ref = fast(x), fast.forward_terms(x), ref_mod(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert torch.equal(got, general)
        # bf16 roundings of x, scale, zero and y (test_fast_path_matches_reference): 4u of |x| @ blockmax|W|
        bound = 4 * U_BF16 * (x.abs() @ _block_max(fmt.dequantize(ref_mod.packed()), 32).t()) + 1e-7
        assert bool(((got - ref).abs() <= bound).all())


@pytest.mark.parametrize("scheme", ["q4_1", "q8_0"])
def test_one_row_input_equals_cast_path(scheme):
    """A float32 row [1, K] reaches the kernel through the module's own bf16 row (one copy_ under a non-blocking
    lock, int4_cpu docstring): its output is bit-equal to the general cast (taken while the lock is held, as by a
    concurrent call), the row holds bf16(x) after a call from any thread, and a result kept by the caller is not
    changed by the next call; a deep copy gets its own row. q4_1: the single-term forward; q8_0: two terms."""
    import threading

    g = torch.Generator().manual_seed(11)
    fmt = get_format(scheme)
    fast = EXPLICIT[Int4CpuLinear](fmt, QuantizedLinear(fmt, fmt.quantize(torch.randn(96, 128, generator=g) * 0.05)))
    assert fast._single == (scheme == "q4_1")
    x1, x2 = torch.randn(1, 128, generator=g), torch.randn(1, 128, generator=g)
    with torch.inference_mode():
        y1 = fast(x1)
        assert torch.equal(fast._row, x1.bfloat16())  # the row path ran
        kept = y1.clone()
        y2 = fast(x2)
        assert torch.equal(y1, kept) and not torch.equal(y1, y2)
        assert fast._row_lock.acquire(blocking=False)  # a call in progress elsewhere: the general cast
        general = fast(x1)
        assert torch.equal(fast._row, x2.bfloat16())
        fast._row_lock.release()
        worker = threading.Thread(target=lambda: fast(x1))  # another thread (the async engine's pool) uses the row
        worker.start()
        worker.join()
        assert torch.equal(fast._row, x1.bfloat16()) and not fast._row_lock.locked()
    assert y1.dtype == torch.float32 and y1.shape == (1, 96)
    assert torch.equal(y1, general)
    twin = copy.deepcopy(fast)
    assert twin._row.data_ptr() != fast._row.data_ptr() and twin._row_lock is not fast._row_lock
    with torch.no_grad():  # x of another shape or requiring grad: the general cast, same values
        assert torch.equal(fast(x1[0])[None], y1) and torch.equal(fast(x2.clone().requires_grad_()), y2)
        assert torch.equal(twin(x1), y1)


@pytest.mark.parametrize("scheme,cls", [("q8_0", Q8_0ChunkedLinear), ("nvfp4", FP4LutLinear),
                                        ("mxfp4", FP4LutLinear)])
def test_chunked_decoding_matches_reference_across_chunks(scheme, cls):
    """The no-copy float32 paths: more rows than one chunk and a ragged last chunk, M in {1, 3, 17}."""
    g = torch.Generator().manual_seed(3)
    in_f = 128
    out_f = chunk_rows(in_f) * 2 + 5
    fmt = get_format(scheme)
    q = QuantizedLinear(fmt, fmt.quantize(torch.randn(out_f, in_f, generator=g)), torch.randn(out_f, generator=g))
    fast = cls(q.packed()) if cls is Q8_0ChunkedLinear else cls(fmt, q.packed())
    fast.bias = q.bias
    assert isinstance(fast, ChunkedDequantLinear)
    w_abs = fmt.dequantize(q.packed()).abs()
    for m in (1, 3, 17):
        x = torch.randn(m, in_f, generator=g)
        err = (fast(x) - q(x)).abs()
        assert bool((err <= _fp32_order_bound(in_f) * (x.abs() @ w_abs.t()) + 1e-7).all()), f"{scheme} M={m}"
    x3 = torch.randn(2, 3, in_f, generator=g)
    bound3 = _fp32_order_bound(in_f) * (x3.abs() @ w_abs.t()) + 1e-7
    assert bool(((fast(x3) - q(x3)).abs() <= bound3).all()), f"{scheme} [2, 3, K]"


def test_resident_bytes_of_fast_modules():
    n, k = 100, 256  # n pads to 112 in the int4 pack
    w = torch.randn(n, k)
    q41p = get_format("q4_1").quantize(w)
    int4 = int4_from_q4_1(q41p)
    assert int4.nbytes == 112 * k // 2 + (k // 32) * 112 * 2 * 2
    sinq = cpu_fast_module(QuantizedLinear(get_format("sinq"), get_format("sinq").quantize(w)))
    assert sinq.nbytes == 112 * k // 2 + (k // 64) * 112 * 4 + k * 2
    mxp = get_format("mxfp4").quantize(w)
    mx = cpu_fast_module(QuantizedLinear(get_format("mxfp4"), mxp))
    assert mx.nbytes == n * k // 2 + n * k // 32 + 256 * 2 * 4 + 256 * 4  # its own bytes + the decode tables
    mx4 = MXFP4Int4Linear(get_format("mxfp4"), mxp)
    assert mx4.nbytes == 2 * 112 * k // 2 + (k // 32) * 112 * 4
    q8p = get_format("q8_0").quantize(w)
    q8 = int4_from_q8_0(q8p)
    assert q8.nbytes == 2 * (112 * k // 2 + (k // 32) * 112 * 4)  # two int4 terms, 10 bits per weight
    for packed in (q41p, q8p):  # the integer-dot modules hold the format's own blocks (5 / 8.5 bits), no copy
        dot = Q8DotLinear(packed.format, packed)
        assert dot.nbytes == packed.nbytes and dot.blocks.data_ptr() == packed.tensors["blocks"].data_ptr()
    q8c = Q8_0ChunkedLinear(q8p)
    assert q8c.nbytes == q8p.nbytes and q8c.blocks.data_ptr() == q8p.tensors["blocks"].data_ptr()  # no copy
    nvp = get_format("nvfp4").quantize(w)
    nv = cpu_fast_module(QuantizedLinear(get_format("nvfp4"), nvp))
    assert nv.nbytes == n * k // 2 + n * k // 16 + 256 * 2 * 4 + 256 * 4


def test_formats_without_fast_path_keep_reference():
    assert "dfloat11" not in CPU_FAST_PATHS
    w = torch.randn(32, 64)
    sinq2 = get_format("sinq", bits=2)
    assert cpu_fast_module(QuantizedLinear(sinq2, sinq2.quantize(w))) is None  # int4 kernel: 4-bit only
    df = get_format("dfloat11")
    assert cpu_fast_module(QuantizedLinear(df, df.quantize(w.bfloat16()))) is None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama_fast")
    build_and_save(cfg, str(path))
    return str(path)


ENGINE_CASES = [c for c in CASES if not isinstance(c[3], tuple)]  # what apply_linear_backend picks


@pytest.mark.parametrize("label,scheme,opts,cls,mode", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_tiny_model_logits_with_linear_backend(label, scheme, opts, cls, mode, tiny_folder):
    dense = load_model(tiny_folder).model
    ref = copy.deepcopy(dense)
    quantize_model(ref, scheme, **opts)
    fast = copy.deepcopy(ref)
    apply_linear_backend(fast, "auto")
    assert not any(isinstance(m, QuantizedLinear) for m in fast.modules())
    assert sum(isinstance(m, cls) for m in fast.modules()) == 8  # 2 layers x qkv, o, gate_up, down
    kept = copy.deepcopy(ref)
    apply_linear_backend(kept, "torch")
    assert sum(isinstance(m, QuantizedLinear) for m in kept.modules()) == 8
    tokens = [3, 17, 90, 5, 44, 101, 7, 60, 12]
    with torch.no_grad():
        want, got = PagedRunner(ref).step(tokens), PagedRunner(fast).step(tokens)
        exact = PagedRunner(dense).step(tokens)
    diff = (got - want).abs().max().item() / want.abs().max().item()
    quant_err = (want - exact).abs().max().item() / want.abs().max().item()
    chosen = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    margin = (want.max(-1).values - chosen).max().item() / want.abs().max().item()
    print(f"{label}: fast vs reference {diff:.2e}, reference vs fp32 model {quant_err:.2e}, "
          f"worst reference margin of a fast top-1 {margin:.2e}")
    # bf16 paths (Int4CpuLinear): every linear deviates by at most 4u of its magnitude (four bf16 roundings,
    # test_fast_path_matches_reference); logits relative to their max measured 6.0e-3..1.34e-2 = 1.5u..3.4u
    # over the 2 layers -> bound 4u = 1.56e-2. Q8_0's own step (blockmax / 127 = 2u of blockmax) is no finer
    # than bf16, so its fast path's error is of the size of its quantization error (1.1e-2) by design.
    # float32 paths (FP4LutLinear, W4A4 included: its activations are fake-quantized in float32 by the same
    # function on both paths): summation order, 2 sqrt(K) u32 per linear with K <= 128 (1.4e-6); measured
    # 2.1e-7..4.6e-7 -> bound 2e-6. A 1e-7 upstream deviation moving an activation across an FP4 rounding edge
    # would show as a jump to the FP4 step (> 1e-2): none happens on these fixed inputs.
    # int8 activations (Q8DotLinear): dx / 2 = blockmax / 254 per element, 2u(bf16) of the block's largest
    # activation for every element (bf16 rounds each element to u of itself): measured 1.44e-2 (Q4_1) and
    # 1.51e-2 (Q8_0) = 3.7u..3.9u -> bound 6u = 2.3e-2
    bound = {"fp32": 2e-6, "bf16": 4 * U_BF16, "q8": 6 * U_BF16}[mode]
    assert diff <= bound, f"{label}: relative logit diff {diff:.3g}"
    # a fast top-1 that is not the reference's is a near-tie of the reference: within 2 * diff of its max
    assert margin <= 2 * diff, f"{label}: fast top-1 trails the reference top-1 by {margin:.3g}"


@pytest.fixture(scope="module")
def smollm_packed(smollm_gguf):
    return load_model(smollm_gguf, packed=True).model


def test_smollm_packed_gguf_uses_fast_paths(smollm_packed):
    """With the integer-dot kernel: every Q4_1 layer and the Q8_0 tied head keep the GGUF blocks (the head the
    embedding's own, no copy: no growth). Without it: Q4_1 layers -> one int4 term, the head -> two int4 terms
    (its own copy, next to the embedding's blocks, which lookups keep using)."""
    ref = smollm_packed
    fast = copy.deepcopy(ref)
    before = model_nbytes(fast)
    n = accelerate_quantized(fast)
    assert n == 30 * 4 + 1
    head = fast.logits_head
    if Q8DOT:
        assert isinstance(fast.layers[0].mlp.down_proj, Q8DotLinear)
        assert isinstance(head, Q8DotLinear) and head.kind == "Q8_0"
        assert model_nbytes(fast) == before
    else:
        assert isinstance(fast.layers[0].mlp.down_proj, Int4CpuLinear)
        assert isinstance(head, Int4CpuLinear) and head.n_terms == 2
        # the int4 pack (5.0 bits) replaces Q4_1's 5.0 bits; the head's 10-bit copy is the only growth
        assert model_nbytes(fast) == before + head.nbytes
    seq = [1, 504, 3458, 282, 4649, 314, 216, 9707, 28, 655, 1399, 314, 3632, 30]
    with torch.no_grad():
        want, got = PagedRunner(ref).step(seq), PagedRunner(fast).step(seq)
    diff = (got - want).abs().max().item()
    agree_n = int((got.argmax(-1) == want.argmax(-1)).sum())  # a count: 11 / 14 in float32 is below 11 / 14
    agree = agree_n / len(seq)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    # where the top-1 differs it must be a near-tie of the reference: its reference logit within 2 * diff
    chosen = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    margin = (want.max(-1).values - chosen).max().item()
    print(f"SmolLM2 packed GGUF, fast vs reference path: max |logit diff| {diff:.3f} "
          f"(logit range {want.abs().max().item():.1f}), KL {kl:.2e}, top-1 agreement {agree:.2f}, "
          f"worst reference margin of a fast top-1 {margin:.3f}")
    # measured: diff 0.40 of 30.9 (1.3e-2 = 3.3u bf16), KL 1.1e-3, agreement 12/14 (2 near-ties, margin 0.06).
    # Bounds: every bf16 linear deviates by at most 4u of its magnitude (test_fast_path_matches_reference) and
    # the 30 layers' deviations add with random signs in the residual stream: relative diff <= 5u = 1.95e-2
    # (1.5x the measurement). KL of a small logit perturbation d is about Var_p(d) / 2; with |d| <= 0.4 the
    # probability-weighted variance (mean over positions) measured 2.2e-3 -> KL <= 3e-3 (2.7x); at most one
    # more near-tie than measured.
    var_p = (want.softmax(-1) * (got - want - ((got - want) * want.softmax(-1)).sum(-1, keepdim=True)) ** 2)
    print(f"probability-weighted variance of the logit deviation (mean over positions): "
          f"{var_p.sum(-1).mean().item():.2e}")
    if Q8DOT:
        # int8 activations per block of 32 (llama.cpp's scheme): SmolLM2's outlier channels set a block's step
        # for its other elements, so the deviation is larger than bf16's. It is also chaotic: a float32
        # rounding anywhere upstream can move an activation across a code boundary, and the 30 layers amplify
        # it, so the kernel's own summation order shows here. Measured diff of 30.9: 1.58 (5.1%; AMD AVX2
        # host), 2.08 (6.7%; Intel host, 256-bit tiles), 2.45 (7.9%; the same host with the 512-bit Q4_1 tile
        # for batches; the two fast paths differ by 1.07 from each other); KL 7.6e-3 to 8.7e-3, probability-
        # weighted variance 1.6e-2 to 1.8e-2, agreement 11-13 of 14 (near-ties, margin <= 0.15) ->
        # bounds 12% (1.5x the largest), KL 2e-2 (2.3x), agreement >= 11 of 14
        assert diff <= 0.12 * want.abs().max().item(), diff
        assert margin <= 2 * diff and kl <= 2e-2 and agree_n >= 11, (margin, kl, agree)
    else:
        assert diff <= 5 * U_BF16 * want.abs().max().item(), diff
        assert margin <= 2 * diff and kl <= 3e-3 and agree_n >= 11, (margin, kl, agree)


def test_engine_runs_gguf_on_fast_paths(smollm_gguf, smollm_packed):
    """LLM(.gguf, quantization="auto") loads packed and the "auto" linear backend puts every quantized
    linear on its fast path; its greedy tokens equal the reference path's greedy decode of the same model."""
    from tierserve import LLM, SamplingParams

    llm = LLM(smollm_gguf, quantization="auto", num_blocks=32, max_num_seqs=1)
    model = llm.engine.model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert sum(isinstance(m, Q8DotLinear if Q8DOT else Int4CpuLinear) for m in model.modules()) == 30 * 4 + 1
    prompt = llm.tokenizer.encode("The capital of France is")
    got = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids
    with torch.no_grad():
        assert list(got) == PagedRunner(smollm_packed).greedy(prompt, 3)

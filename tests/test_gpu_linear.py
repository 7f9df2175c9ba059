"""Packed-weight triton kernels against their torch references, the tile rule, and the CUDA backend.

Tolerance (derived, not tuned). The kernels and the reference compute the same
products ``x_k w_nk`` of the same dequantized values (every format's
dequantization is exact in fp32 or rounded identically on both sides:
``(q - 8) d`` and ``q d`` have <= 19 significant bits, Q4_1's ``q d + m``
rounds once either way, FP4's ``value * scale`` is the same fp32 product);
SINQ multiplies ``x s_col`` instead of ``w s_col``, a few extra roundings per
term. When the kernel's dot runs in bf16 the inputs are rounded to bf16 exactly
as the reference here rounds them (``reference`` below). What remains is fp32
summation: any order of adding ``n`` terms errs by at most ``gamma_n ~ n u``
(u = 2^-24) times ``sum |terms|`` (Higham, Accuracy and Stability, 4.2), with
n <= K + split-K partials (<= 16) + bias, so we allow

    |y - ref| <= (K + 24) u (|x| |W|^T + |b|)  +  u_out |ref|

with ``ref`` the float64 product of the (rounded) inputs and u_out the unit
roundoff of the output dtype (2^-24 fp32, 2^-8 bf16). A single wrong code
(error ~ d |x|) breaks it by orders of magnitude. Under the interpreter,
triton 3.9 converts fp32 to bf16 by truncation (measured: up to one ulp,
2^-7 relative), so the bf16 interpreter test allows 2^-7 per rounded input
(x s_col, w) and on the output; the GPU rounds to nearest even and its tests
keep the bound above.

The interpreter tests (``TRITON_INTERPRET=1``, CPU) cover M in {1, 3, 16, 33}
over small shapes with ragged N and K (split-K and the M = 1 multiply-add path
included). The ``cuda`` tests run the compiled kernels on the Llama-3.2-1B
shapes at M = 1, 16, 128 (``TRITON_INTERPRET=0 python -m pytest -m cuda``).
"""

from __future__ import annotations

import pytest
import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.sinq import sinq_dequantize
from tierserve.kernels.quant.tile_configs import TileConfig, choose_tiles

U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BF16_ULP = 2.0 ** -7  # relative spacing of bf16 values: the interpreter's truncation error bound
FORMATS = ["q4_0", "q4_1", "q8_0", "sinq", "mxfp4", "nvfp4", "nvfp4_w4a4", "mxfp4_w4a4"]
LLAMA_1B_SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]  # (N, K): q/o, k/v, gate/up, down


def make_format(name: str, group: int):
    if name.endswith("_w4a4"):
        return get_format(name[:-5], act_quant=True)
    return get_format("sinq", group=group) if name == "sinq" else get_format(name)


def reference(q: QuantizedLinear, x2: torch.Tensor, dot_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref, |terms|) in float64 for ``q(x2)`` with the kernel's input rounding (``dot_dtype``: None = fp32)."""
    p, fmt = q.packed(), q.fmt
    w = fmt.dequantize(p).double()
    a = x2.double()
    if fmt.name == "sinq":  # the kernel scales x by s_col and rounds (x s_col) and (q - z) s_row to the dot dtype
        t = p.tensors
        w = sinq_dequantize(t["qweight"], t["s_row"], t["z"], torch.ones_like(t["s_col"]), int(p.meta["bits"]),
                            int(p.meta["group"]))
        a = (x2.float() * t["s_col"].float()).double()
        if dot_dtype is not None:
            w, a = w.to(dot_dtype), a.float().to(dot_dtype)
        w, a = w.double(), a.double()
    elif getattr(fmt, "act_quant", False):
        a = fmt.quantize_activations(x2).dequantize().double()
        if dot_dtype is not None:
            w, a = w.to(dot_dtype).double(), a.to(dot_dtype).double()
    elif dot_dtype is not None:
        w = w.to(dot_dtype).double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if q.bias is None else q.bias.double()
    return a @ w.T + b, a.abs() @ w.abs().T + b.abs()


def assert_within_bound(y: torch.Tensor, ref: torch.Tensor, absprod: torch.Tensor, k: int,
                        input_slack: float = 0.0, out_roundoff: float | None = None) -> None:
    u_out = UNIT_ROUNDOFF[y.dtype] if out_roundoff is None else out_roundoff
    tol = ((k + 24) * U32 + input_slack) * absprod + u_out * ref.abs()
    excess = (y.double() - ref).abs() - tol
    assert excess.max().item() <= 0, f"error exceeds the bound by {excess.max().item():.3g}"


def quantized(name: str, n: int, k: int, bias: bool, g: torch.Generator, device: str = "cpu") -> QuantizedLinear:
    fmt = make_format(name, group=32)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return QuantizedLinear(fmt, fmt.quantize(w), b).to(device)


# ---- the tile rule -------------------------------------------------------------------------------

def test_tile_rule_table_on_llama_1b_shapes():
    gemv = lambda split: TileConfig(1, 32, 256, split, False, 4, 2)  # noqa: E731
    small = lambda split: TileConfig(16, 32, 128, split, True, 4, 3)  # noqa: E731
    large = lambda split: TileConfig(64, 64, 64, split, True, 4, 3)  # noqa: E731
    assert choose_tiles(1, 2048, 2048) == gemv(8)     # 64 column tiles x 8 splits >= 2 x 132
    assert choose_tiles(1, 8192, 2048) == gemv(2)     # 256 tiles x 2
    assert choose_tiles(1, 512, 2048) == gemv(8)      # capped by K / BLOCK_K = 8 steps
    assert choose_tiles(1, 2048, 8192) == gemv(8)
    assert choose_tiles(3, 2048, 2048) == small(8)
    assert choose_tiles(16, 512, 2048) == small(16)   # capped by MAX_SPLIT_SMALL
    assert choose_tiles(128, 2048, 2048) == large(4)  # capped by MAX_SPLIT_LARGE
    assert choose_tiles(128, 8192, 2048) == large(2)
    assert choose_tiles(256, 8192, 2048) == large(1)  # 4 x 128 tiles already fill the GPU
    assert choose_tiles(33, 64, 224).block_m == 64 and choose_tiles(32, 64, 224).block_m == 32
    assert choose_tiles(1, 2048, 2048, num_sms=16) == gemv(1)


def test_tile_split_arithmetic_and_bad_input():
    cfg = TileConfig(16, 32, 64, 4, True, 4, 3)
    assert cfg.k_per_split(160) == 64 and cfg.grid(33, 100, 160) == (3, 4, 3)  # 3 steps: 3 splits used
    assert cfg.k_per_split(2048) == 512 and cfg.grid(16, 64, 2048) == (1, 2, 4)
    for field, args in (("m", (0, 8, 8)), ("n", (1, -1, 8)), ("k", (1, 8, 0)), ("num_sms", (1, 8, 8, 0))):
        with pytest.raises(InvalidParameterError, match=field):
            choose_tiles(*args)


# ---- kernels vs reference under the interpreter ------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
def test_kernel_matches_reference_grid(name):
    from tierserve.kernels.gpu_linear import GPU_KERNEL_PATHS

    g = torch.Generator().manual_seed(len(name))
    for n, k, bias in [(32, 32, False), (96, 160, True), (40, 576, True)]:  # ragged N/K; K=576 splits at M=1
        q = quantized(name, n, k, bias, g)
        module = GPU_KERNEL_PATHS[q.fmt.name](q)
        for m in (1, 3, 16, 33):
            x = torch.randn(m, k, generator=g)
            ref, absprod = reference(q, x, None)
            assert_within_bound(module(x), ref, absprod, k)


@pytest.mark.parametrize("name", ["q4_0", "sinq", "nvfp4_w4a4"])
def test_bf16_activations_round_like_the_reference(name):
    """bf16 x: M = 1 multiplies in fp32, M > 1 dots bf16-rounded tiles; output rounded to bf16."""
    from tierserve.kernels.gpu_linear import GPU_KERNEL_PATHS

    g = torch.Generator().manual_seed(7)
    q = quantized(name, 48, 256, True, g)
    module = GPU_KERNEL_PATHS[q.fmt.name](q)
    for m in (1, 16):
        x = torch.randn(m, 256, generator=g).bfloat16()
        y = module(x)
        assert y.dtype == torch.bfloat16
        ref, absprod = reference(q, x, None if m == 1 else torch.bfloat16)
        # the interpreter (triton 3.9) converts fp32 -> bf16 by truncation, not round-to-nearest-even:
        # one bf16 ulp (2^-7) per rounded input and on the output instead of half an ulp
        assert_within_bound(y, ref, absprod, 256, input_slack=2 * BF16_ULP, out_roundoff=BF16_ULP)


def test_explicit_configs_split_k_and_gemv():
    from tierserve.kernels.quant.q4_0_triton import q4_0_linear_triton

    g = torch.Generator().manual_seed(3)
    q = quantized("q4_0", 70, 512, True, g)
    x = torch.randn(5, 512, generator=g)
    ref, absprod = reference(q, x, None)
    for cfg in (TileConfig(8, 16, 64, 8, False, 4, 2), TileConfig(16, 32, 128, 3, True, 4, 3),
                TileConfig(32, 64, 64, 1, True, 4, 3)):
        assert_within_bound(q4_0_linear_triton(x, q.blocks, 70, q.bias, config=cfg), ref, absprod, 512)


def test_dfloat11_module_decodes_bit_identical():
    from tierserve.kernels.gpu_linear import DFloat11TritonLinear

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(64, 96, generator=g) * 0.02).bfloat16()
    fmt = get_format("dfloat11")
    module = DFloat11TritonLinear(QuantizedLinear(fmt, fmt.quantize(w), None))
    assert torch.equal(module.weight(), w)
    x = torch.randn(2, 3, 96, generator=g).bfloat16()
    assert torch.equal(module(x), torch.nn.functional.linear(x, w))


def test_backends_leave_cpu_models_alone():
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(quantized("q4_0", 32, 64, False, g))
    assert apply_linear_backend(model, "triton") == 0
    assert isinstance(model[0], QuantizedLinear)
    apply_linear_backend(model, "torch")
    assert isinstance(model[0], QuantizedLinear)


# ---- compiled kernels on the GPU ----------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_layers():
    """One quantized layer per (format, 1B shape), quantized on CPU once, moved to the GPU."""
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name in FORMATS + ["dfloat11"]:
        for n, k in LLAMA_1B_SHAPES:
            fmt = make_format(name, group=64)
            w = torch.randn(n, k, generator=g) * 0.02
            b = torch.randn(n, generator=g)
            if name == "dfloat11":  # lossless for bf16 weights; the bias is in the activations' dtype
                w, b = w.bfloat16(), b.bfloat16()
            layers[name, n, k] = (QuantizedLinear(fmt, fmt.quantize(w), b).cuda(), w)
    return layers


@pytest.mark.cuda
@pytest.mark.parametrize("name", FORMATS + ["dfloat11"])
def test_cuda_kernels_on_llama_1b_shapes(name, llama_layers):
    from tierserve.kernels.gpu_linear import GPU_KERNEL_PATHS, TritonLinear
    from tierserve.kernels.quant.packed_launch import num_sms

    g = torch.Generator().manual_seed(1)
    for n, k in LLAMA_1B_SHAPES:
        q, w = llama_layers[name, n, k]
        model = torch.nn.Sequential(q)
        assert apply_linear_backend(model, "auto") == 1  # device-driven: CUDA modules get the triton path
        assert isinstance(model[0], GPU_KERNEL_PATHS[q.fmt.name]) and isinstance(model[0], TritonLinear)
        for m in (1, 16, 128):
            x = torch.randn(m, k, generator=g).bfloat16().cuda()
            y = model(x)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            if name == "dfloat11":
                assert torch.equal(y, torch.nn.functional.linear(x, w.cuda(), q.bias))
                continue
            dot = choose_tiles(m, n, k, num_sms(x.device)).use_dot
            ref, absprod = reference(q, x, torch.bfloat16 if dot else None)
            assert_within_bound(y, ref, absprod, k)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_ggml_planes_are_the_blocks_bytes(name):
    """The planes the CUDA path keeps are the file's bytes, moved: scales (and mins) are the fp16 values that
    head each block, the codes the rest in order, and joining them gives the blocks back bit for bit."""
    from tierserve.kernels.quant.ggml_planes import join_planes, split_planes

    fmt = get_format(name)
    q = quantized(name, 24, 96, False, torch.Generator().manual_seed(3))
    planes = split_planes(q.blocks, fmt.type_size, fmt.num_meta)
    nb = 96 // 32
    blk = q.blocks.reshape(24, nb, fmt.type_size)
    assert planes.scales.dtype == torch.float16 and tuple(planes.scales.shape) == (24, nb)
    assert torch.equal(planes.scales.view(torch.uint8).reshape(24, nb, 2), blk[..., 0:2])
    if fmt.num_meta == 2:
        assert torch.equal(planes.mins.view(torch.uint8).reshape(24, nb, 2), blk[..., 2:4])
    else:
        assert planes.mins is None
    assert torch.equal(planes.codes.reshape(24, nb, -1), blk[..., 2 * fmt.num_meta:])
    assert torch.equal(join_planes(planes), q.blocks)
    assert planes.codes.numel() + 2 * planes.scales.numel() * fmt.num_meta == q.blocks.numel()  # same size

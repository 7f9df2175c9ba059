"""FP4 formats: E2M1 codec, E8M0/E4M3 scale bytes vs torch's float8 dtypes, error bounds, MSE search, kernels.

References are independent of the code under test: torch's ``float8_e8m0fnu``
and ``float8_e4m3fn`` casts for the scale bytes, a brute-force nearest over
the 16 E2M1 values for element rounding, float64 ``floor(log2(.))`` for the MX
exponent, and ``F.linear`` on dequantized weights for the matmuls. The triton
kernel runs under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tierserve.errors import InvalidParameterError  # noqa: E402
import tierserve.kernels.quant  # noqa: E402,F401  (fills the registry)
from tierserve.kernels.quant.base import WEIGHT_FORMATS, QuantizedLinear, get_format  # noqa: E402
from tierserve.kernels.quant.fp4 import (decode_e2m1, encode_e2m1, fp4_linear_reference, pack_fp4,  # noqa: E402
                                         round_e2m1, unpack_fp4)
from tierserve.kernels.quant.mse_scale import group_error, mse_scale_search  # noqa: E402
from tierserve.kernels.quant.mxfp4 import e8m0_decode, e8m0_encode, mx_scale_exponent  # noqa: E402
from tierserve.kernels.quant.nvfp4 import e4m3_decode, e4m3_encode  # noqa: E402

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _magnitudes(lo: int, hi: int, n: int = 20000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    exps = torch.randint(lo, hi, (n,), generator=g).double()
    mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    return (mant * torch.exp2(exps)).float()


# ---- scale bytes ---------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["nonclipping", "ocp"])
def test_e8m0_scale_bytes_match_torch(rule):
    tiny = torch.tensor([1e-45, 3e-45, 2.0 ** -149, 2.0 ** -140, 2.0 ** -127, 2.0 ** -126, 1.1754942e-38])
    big = torch.tensor([3.4028235e38, 2.0 ** 127, 1.7e38])
    bounds = torch.cat([torch.exp2(torch.arange(-120, 120.0)) * f for f in (0.75, 1.0, 0.7499999, 0.99999994)])
    amax = torch.cat([_magnitudes(-150, 127), tiny, big, bounds.float()])
    a64 = amax.double()
    ref_floor = torch.floor(torch.log2(a64 * 4 / 3 if rule == "nonclipping" else a64))
    ref_k = (ref_floor - 2).clamp(-127, 127)
    ref_bytes = torch.ldexp(torch.ones_like(ref_k), ref_k.long()).float().to(torch.float8_e8m0fnu).view(torch.uint8)
    ours = e8m0_encode(mx_scale_exponent(amax, rule))
    assert torch.equal(ours, ref_bytes)
    # nonclipping: amax / scale in [3, 6) wherever the exponent is not clamped
    if rule == "nonclipping":
        ratio = a64 / e8m0_decode(ours).double()
        free = (ref_floor - 2 >= -127) & (ref_floor - 2 <= 127)
        assert bool(((ratio[free] >= 3) & (ratio[free] < 6)).all())


def test_e8m0_decode_matches_torch_for_every_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = b.view(torch.float8_e8m0fnu).float()
    assert torch.allclose(e8m0_decode(b), ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(e8m0_decode(b[-1:])).all()


def test_e4m3_bytes_match_torch_cast():
    all_vals = torch.arange(127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (all_vals[:-1].double() + all_vals[1:].double()) / 2  # exact ties
    vals = torch.cat([_magnitudes(-14, 10, seed=1), all_vals, mids.float(), torch.tensor([2.0 ** -10, 2.0 ** -11,
                      3 * 2.0 ** -11, 449.0, 463.9, 464.0, 500.0, 1e6, 0.0])])
    vals = torch.cat([vals, -vals])
    assert torch.equal(e4m3_encode(vals), vals.to(torch.float8_e4m3fn).view(torch.uint8))
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.allclose(e4m3_decode(b), b.view(torch.float8_e4m3fn).float(), rtol=0, atol=0, equal_nan=True)


# ---- E2M1 elements ----------------------------------------------------------------------

def _brute_nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest of the 8 magnitudes by explicit distances; ties -> even code; > 6 -> 6; sign copied."""
    mag = v.double().abs().clamp(max=6.0)
    dist = (mag[:, None] - GRID[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    even = cand & (torch.arange(8) % 2 == 0)[None, :]
    pick = torch.where(even.any(1), even.double().argmax(1), cand.double().argmax(1))
    return torch.where(torch.signbit(v), -GRID[pick], GRID[pick]).float()


def test_e2m1_every_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(encode_e2m1(decode_e2m1(codes)), codes)
    assert decode_e2m1(codes).tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    assert pack_fp4(torch.tensor([3, 12], dtype=torch.uint8)).item() == 0xC3  # low nibble first


def test_e2m1_rounding_is_nearest_ties_to_even():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([(torch.rand(20000, generator=g) - 0.5) * 16,
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, 1e-9])])
    v = torch.cat([v, -v[-10:]])
    got = decode_e2m1(encode_e2m1(v))
    assert torch.equal(got, _brute_nearest_e2m1(v))
    assert torch.equal(round_e2m1(v), got)  # the arithmetic fast path agrees
    assert decode_e2m1(encode_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))).tolist() == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


# ---- quantize -> dequantize -------------------------------------------------------------------

def _weight(rows: int, cols: int, group: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mag = torch.exp(torch.empty(rows, cols // group).uniform_(-7, 7, generator=g))  # 1e-3 .. 1e3 per group
    return w * mag.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("name,opts", [("mxfp4", {}), ("mxfp4", {"scale_rule": "ocp"}), ("nvfp4", {})])
def test_quantize_error_within_half_step(name, opts):
    fmt = get_format(name, **opts)
    gs = fmt.group_size
    w = _weight(24, 8 * gs, gs)
    packed = fmt.quantize(w, "blk.0.w")
    deq = fmt.dequantize(packed)
    scale = fmt.decode_scales(packed.tensors["scales"].reshape(-1), packed.tensors.get("global_scale"))
    scale = scale.reshape(24, -1).repeat_interleave(gs, dim=1).double()
    r = w.double().abs() / scale
    # step of the E2M1 interval containing r: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]
    half_step = torch.where(r < 2, 0.25, torch.where(r < 4, 0.5, 1.0)) * scale
    err = (w.double() - deq.double()).abs()
    clipped = r > 6
    assert bool((err[~clipped] <= half_step[~clipped] * (1 + 1e-6)).all())
    clip_err = (w.double().abs() - 6 * scale)[clipped]
    assert bool(((err[clipped] - clip_err).abs() <= 1e-6 * w.double().abs()[clipped]).all())
    if name == "mxfp4" and not opts:
        assert not clipped.any()  # the 4/3 rule never clips
    if name == "mxfp4" and opts:
        assert clipped.any()  # the OCP rule does, on gaussian groups


def test_nvfp4_scale_bytes_are_torch_e4m3_of_amax_over_6_times_global():
    fmt = get_format("nvfp4")
    w = _weight(16, 64, 16, seed=3)
    packed = fmt.quantize(w)
    g = 448.0 * 6.0 / w.abs().amax()
    assert torch.equal(packed.tensors["global_scale"], g.reshape(1))
    amax = w.reshape(-1, 16).abs().amax(-1)
    ref = ((amax / 6) * g).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(packed.tensors["scales"].reshape(-1), ref)
    assert (ref == 0).any() and (ref < 8).any()  # the 1e-3..1e3 spread reaches E4M3 zero/subnormals


def test_mxfp4_scale_bytes_are_torch_e8m0():
    fmt = get_format("mxfp4")
    w = _weight(8, 128, 32, seed=4)
    amax = w.reshape(-1, 32).abs().amax(-1).double()
    k = (torch.floor(torch.log2(amax * 4 / 3)) - 2)
    ref = torch.exp2(k).float().to(torch.float8_e8m0fnu).view(torch.uint8)
    assert torch.equal(fmt.quantize(w).tensors["scales"].reshape(-1), ref)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_in_features_not_multiple_of_group_is_rejected(name):
    fmt = get_format(name)
    with pytest.raises(InvalidParameterError) as e:
        fmt.quantize(torch.randn(8, fmt.group_size * 3 + 8), "model.layers.0.mlp.down_proj.weight")
    assert e.value.field == "model.layers.0.mlp.down_proj.weight"
    assert f"divisible by the group size {fmt.group_size}" in str(e.value)
    with pytest.raises(InvalidParameterError):
        get_format("mxfp4", scale_rule="round")


def test_formats_registered():
    assert {"mxfp4", "nvfp4"} <= set(WEIGHT_FORMATS)


# ---- MSE scale search -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_mse_search_never_worse_on_any_group(name):
    fmt = get_format(name)
    gs = fmt.group_size
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 8 * gs, generator=g) ** 3  # heavy tails: shrinking pays off
    groups = w.reshape(-1, gs)
    gscale = fmt.global_scale(w.abs().amax())
    _, plain = fmt.encode_scales(groups.abs().amax(-1), gscale)
    _, searched = mse_scale_search(groups, lambda a: fmt.encode_scales(a, gscale))
    e_plain, e_mse = group_error(groups, plain), group_error(groups, searched)
    assert bool((e_mse <= e_plain).all())
    assert bool((e_mse < e_plain).float().mean() > 0.05)
    mse_fmt = get_format(name, mse=True)
    err = lambda f: (f.dequantize(f.quantize(w)) - w).abs().pow(2.4).sum()  # noqa: E731
    assert err(mse_fmt) < err(fmt)


# ---- matmuls --------------------------------------------------------------------------------

SHAPES = [(48, 96), (100, 160), (33, 224)]  # (N, K): K multiples of 32, not powers of two


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_quant", [False, True])
def test_triton_matches_torch_reference(name, act_quant):
    from tierserve.kernels.quant.fp4_triton import fp4_linear_triton

    fmt = get_format(name, act_quant=act_quant)
    g = torch.Generator().manual_seed(6)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g)
        packed = fmt.quantize(w)
        args = (packed.tensors["qs"], packed.tensors["scales"], fmt.scale_table(packed), fmt.group_size, bias)
        for m in (1, 5, 32):
            x = torch.randn(m, k, generator=g)
            act = fmt.quantize_activations(x) if act_quant else None
            ref = fp4_linear_reference(x, *args, act)
            tri = fp4_linear_triton(x, *args, act)
            assert torch.allclose(tri, ref, atol=1e-4, rtol=1e-4), (n, k, m, (tri - ref).abs().max())
            a = x if act is None else act.dequantize()
            assert torch.allclose(ref, torch.nn.functional.linear(a, fmt.dequantize(packed), bias),
                                  atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_activation_quantization_error_bound(name):
    fmt = get_format(name)
    x = _weight(6, 4 * fmt.group_size, fmt.group_size, seed=7)
    act = fmt.quantize_activations(x)
    scale = act.scale.repeat_interleave(fmt.group_size, dim=1)
    r = x.abs() / scale
    half = torch.where(r < 2, 0.25, torch.where(r < 4, 0.5, 1.0)) * scale
    err = (act.dequantize() - x).abs()
    ok = r <= 6
    assert bool((err[ok] <= half[ok] * (1 + 1e-6)).all())
    assert bool((err[~ok] <= (x.abs() - 6 * scale)[~ok] * (1 + 1e-6) + 1e-30).all())


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_quantized_linear_module(name, hadamard):
    fmt = get_format(name, hadamard=hadamard)
    lin = torch.nn.Linear(96, 40)
    packed = fmt.quantize(lin.weight)
    mod = QuantizedLinear(fmt, packed, lin.bias.detach())
    x = torch.randn(3, 7, 96)
    ref = torch.nn.functional.linear(x, fmt.dequantize(packed), lin.bias)
    assert torch.allclose(mod(x), ref, atol=1e-5, rtol=1e-5)
    assert packed.nbytes < lin.weight.numel()  # ~4.25-4.5 bits per weight
    rel = (mod(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_quantize_model_transform_and_checkpoint_contract(name):
    from tierserve.kernels.quant.transform import capture_activations, quantize_model

    g = torch.Generator().manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    x = torch.randn(96, 64, generator=g)  # GPTQ needs as many rows as the widest in_features
    ref = model(x)
    calib = capture_activations(model, lambda m: m(x), ["0", "2"])
    report = quantize_model(model, name, skip=(), calibration=calib, gptq=True, hadamard=True, act_quant=True)
    assert set(report.modules) == {"0", "2"} and report.packed_bytes < report.float_bytes / 6
    fmt = model[0].fmt
    for mod in (model[0], model[2]):
        packed = mod.packed()
        want = fmt.expected_tensors(packed.shape, packed.meta)
        assert {k: (tuple(t.shape), t.dtype) for k, t in packed.tensors.items()} == want
        assert packed.meta["hadamard"] == 1 and packed.meta["act_quant"] == 1
    assert (model(x) - ref).norm() < 0.3 * ref.norm()  # W4A4 with rotation + GPTQ still tracks fp32
    with pytest.raises(InvalidParameterError, match="calibration"):
        get_format(name, gptq=True).quantize(torch.randn(8, 64), "w")

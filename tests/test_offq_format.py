"""The ``offq`` weight format (OffQ W4A4: tierserve/kernels/quant/offq_format.py) and its int4 CPU path.

* each quantized linear (rotation offq / hadamard / none, per channel and group 32, W4A4 and W4A16)
  against a torch reference written here: the dense Householder matrix built from the fitted vector,
  whose first column direction is checked against eigh's top eigenvector, the offset as the mean of
  rotated channel 0, a dense Sylvester Hadamard, this file's own min/max weight quantizer and absmax
  token quantizer, and the product in float64; the weight codes are compared exactly;
* the weight rounding error bound of the module docstring;
* the int4 CPU path (offq_cpu.py) against the reference within the bf16 output rounding it documents;
* bad input: too few calibration tokens, channel mismatch, an unknown rotation, a group that does not divide.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tierserve.kernels.quant  # noqa: F401  (fills the registry)
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.offq_cpu import OffQInt4Linear, offq_cpu_module
from tierserve.kernels.quant.offq_format import MIN_CALIBRATION_TOKENS, quantize_tokens, unpack_nibbles

K, N = 128, 48
U32 = 2.0 ** -24


def _inputs(seed: int, n: int = 256) -> torch.Tensor:
    """A massive activation: one direction, mostly channel 17 (the same for every seed), of magnitude
    ~N(30, 3) on every token, plus isotropic unit noise."""
    d = torch.randn(K, generator=torch.Generator().manual_seed(0))
    d = 0.3 * d / d.norm()
    d[17] += 1.0
    d /= d.norm()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) + (30.0 + 3.0 * torch.randn(n, 1, generator=g)) * d


def _linear(seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _ref_weight_quant(w: torch.Tensor, group: int):
    """Per row and group: s = bf16((hi - lo) / 15), z = bf16(lo + 8 s), q = clamp(round((w - z) / s) + 8)."""
    rows = []
    for r in range(w.shape[0]):
        codes, deq = [], []
        for c in range(0, w.shape[1], group):
            g = w[r, c:c + group].float()
            s = ((g.max() - g.min()) / 15).to(torch.bfloat16).float()
            s = s if s > 0 else torch.tensor(1.0)
            z = (g.min() + 8 * s).to(torch.bfloat16).float()
            q = (torch.round((g - z) / s) + 8).clamp(0, 15)
            codes.append(q)
            deq.append((q - 8) * s + z)
        rows.append((torch.cat(codes), torch.cat(deq)))
    return torch.stack([c for c, _ in rows]).to(torch.uint8), torch.stack([d for _, d in rows])


def _reference(lin: nn.Linear, x: torch.Tensor, calib: torch.Tensor, rotation: str, group: int, act_quant: bool,
               packed):
    """y of the OffQ pipeline computed here (float64 product); also returns the expected weight codes."""
    w = lin.weight.detach().double()
    xd = x.double()
    fold = torch.zeros(N, dtype=torch.float64)
    if rotation == "offq":
        v = packed.tensors["v"]
        r = torch.eye(K, dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)
        values, vectors = torch.linalg.eigh(calib.double().T @ calib.double() / calib.shape[0])
        assert abs(abs(float((r @ vectors[:, -1])[0])) - 1) < 1e-9  # R maps the top eigenvector to +-e_0
        offset = float((calib.double() @ r.T)[:, 0].mean())
        assert abs(offset - float(packed.tensors["offset"][0])) < 1e-9 * max(1.0, abs(offset))
        w, xd = w @ r.T, xd @ r.T
        xd[:, 0] -= offset
        fold = offset * w[:, 0]
    elif rotation == "hadamard":
        h = _sylvester(K)  # K = 128 is a power of two: the block is the whole width
        w, xd = w @ h, xd @ h
    codes, w_hat = _ref_weight_quant(w, group or K)
    xr = xd.float()
    if act_quant:
        s = (xr.abs().amax(-1, keepdim=True) / 7)
        xr = torch.round(xr / s).clamp(-8, 7) * s
    y = xr.double() @ w_hat.double().T + fold + lin.bias.detach().double()
    return y, codes, xr, w_hat


@pytest.mark.parametrize("rotation", ["offq", "hadamard", "none"])
@pytest.mark.parametrize("group,act_quant", [(0, True), (32, True), (0, False)])
def test_offq_linear_matches_reference(rotation, group, act_quant):
    lin, calib, x = _linear(0), _inputs(1), _inputs(2, 40)
    fmt = get_format("offq", rotation=rotation, group=group, act_quant=act_quant)
    packed = fmt.quantize(lin.weight, "w", activations=calib)
    want, codes, xr, w_hat = _reference(lin, x, calib, rotation, group, act_quant, packed)
    assert torch.equal(unpack_nibbles(packed.tensors["qweight"]), codes)
    got = QuantizedLinear(fmt, packed, lin.bias.detach())(x).double()
    # the format computes the same values in float32: its product and the two additions round at most
    # K u32 |x||w| (summation, gamma_K) plus 3 u32 of the output; its x'' may differ from this float64 one by
    # an fp32 ulp before quantization, which moves a token's code only at a rounding tie (none here: codes
    # and weights are exact, so the bound holds element-wise)
    bound = (K + 3) * U32 * (xr.abs().double() @ w_hat.abs().double().T + want.abs()) + 1e-6
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() - bound).max())


def test_quantization_error_is_bounded():
    """|w - w_hat| <= s/2 + |z - (lo + 8 s)| + 15 |s - (hi - lo) / 15| per group (rounding, zero rounding, clip)."""
    lin = _linear(3)
    fmt = get_format("offq", rotation="none", group=32, act_quant=False)
    packed = fmt.quantize(lin.weight, "w")
    w = lin.weight.detach().float().reshape(N, -1, 32)
    lo, hi = w.amin(-1), w.amax(-1)
    s, z = packed.tensors["scale"].float(), packed.tensors["zero"].float()
    bound = s / 2 + (z - (lo + 8 * s)).abs() + 15 * (s - (hi - lo) / 15).abs() + 1e-7
    err = (fmt.dequantize(packed).reshape(N, -1, 32) - w).abs().amax(-1)
    assert bool((err <= bound).all())
    assert float((err / s).max()) > 0.3  # the bound is not vacuous: rounding errors reach a third of a step


def test_offq_reduces_activation_error():
    """With a massive activation, OffQ's W4A4 output error is far below plain RTN's and the Hadamard's
    (measured: mean squared error 0.0087 against 0.38 and 0.043)."""
    lin, calib, x = _linear(4), _inputs(5), _inputs(6, 128)
    exact = lin(x).detach()
    errs = {}
    for rotation in ("offq", "none", "hadamard"):
        fmt = get_format("offq", rotation=rotation, act_quant=True)
        errs[rotation] = float((QuantizedLinear(fmt, fmt.quantize(lin.weight, "w", activations=calib),
                                                lin.bias.detach())(x) - exact).pow(2).mean())
    assert errs["offq"] < 0.1 * errs["none"] and errs["offq"] < 0.5 * errs["hadamard"], errs


@pytest.mark.parametrize("group,act_quant,bias", [(0, True, True), (64, True, False), (0, False, True)])
def test_int4_cpu_path_matches_reference(group, act_quant, bias):
    lin, calib = _linear(7, bias), _inputs(8)
    fmt = get_format("offq", group=group, act_quant=act_quant)
    q = QuantizedLinear(fmt, fmt.quantize(lin.weight, "w", activations=calib), None if not bias else lin.bias.detach())
    fast = offq_cpu_module(q)
    assert isinstance(fast, OffQInt4Linear) and fast.group == (64 if group else 128)
    for m in (1, 5, 33):
        x = _inputs(9, m)
        want, got = q(x), fast(x)
        xr = fmt.rotate_input(x, q.packed())
        if act_quant:
            codes, s = quantize_tokens(xr)
            mag = s * (codes.abs() @ fmt.dequantize_rotated(q.packed()).abs().T)
            rel = 2.0 ** -9  # the kernel rounds its fp32 sum to bf16 (round to nearest: half an ulp, 2^-9)
        else:
            mag = xr.abs() @ fmt.dequantize_rotated(q.packed()).abs().T
            rel = 2.0 ** -9 + 2.0 ** -9 * (1 + 2.0 ** -9)  # x'' cast to bf16 too
        # + both sides' fp32 summation (gamma_K each) and the fold / bias additions (u32 of the output each)
        bound = (rel + 2 * K * U32) * mag + 4 * U32 * want.abs() + 1e-6
        assert bool(((got - want).abs() <= bound).all()), (m, float(((got - want).abs() - bound).max()))
        assert float((got - want).abs().max()) > 0  # bf16 output: not trivially the same path


def test_no_int4_group_falls_back_to_reference():
    lin = nn.Linear(48, 16)  # 48 columns: no int4 kernel group (32..256) divides it
    fmt = get_format("offq", rotation="none")
    assert offq_cpu_module(QuantizedLinear(fmt, fmt.quantize(lin.weight, "w"), None)) is None


def test_bad_input():
    fmt = get_format("offq")
    w = _linear(0).weight
    few = _inputs(1, MIN_CALIBRATION_TOKENS - 1)
    with pytest.raises(InvalidParameterError, match=f"at least {MIN_CALIBRATION_TOKENS} calibration tokens per "
                                                    f"site, got {MIN_CALIBRATION_TOKENS - 1}"):
        fmt.quantize(w, "w", activations=few)
    with pytest.raises(InvalidParameterError, match="inputs have 64 channels, the weight takes 128"):
        fmt.quantize(w, "w", activations=torch.randn(100, 64))
    with pytest.raises(InvalidParameterError, match="needs calibration activations"):
        fmt.quantize(w, "w")
    with pytest.raises(InvalidParameterError, match="rotation"):
        get_format("offq", rotation="givens")
    with pytest.raises(InvalidParameterError, match="divisible by group 96"):
        get_format("offq", group=96).quantize(w, "w", activations=_inputs(1))

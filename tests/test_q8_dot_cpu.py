"""The integer-dot CPU kernel (tierserve/kernels/quant/q8_dot_cpu.cpp) against float64 references.

- Random GGUF Q4_1 and Q8_0 blocks (every code value, fp16 scales and mins) times activations of 1..9 rows
  (the kernel's 4-row tiles and each remainder): equal to ``q8_dot_reference`` (the same int8 activation codes
  and integer block sums in float64) within float32 accumulation, 1e-5 of the output's scale; a wrong nibble
  order or a dropped min term is far outside.
- Against the exact product with float activations: within the activation-rounding bound
  ``sum_b (dx_b / 2) sum_{k in b} |w_k|`` (plus float32 accumulation).
- The activation codes of ``quantize_activations`` round half away from zero (``sign(v) floor(|v| + 1/2)``, as the
  C++ kernel), not to even.
- Bad shapes raise with the limit named; under ``torch.compile(fullgraph=True)`` the op is one extern call.
"""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels.quant import q8_dot_cpu as K

pytestmark = pytest.mark.skipif(not K.available(), reason="no C++ compiler for the integer-dot kernel")


def _blocks(n: int, k: int, kind: str, g: torch.Generator) -> torch.Tensor:
    nb = k // 32
    d = (torch.rand(n, nb, generator=g) * 0.02 + 1e-3).half().view(torch.uint8).reshape(n, nb, 2)
    if kind == "Q4_1":
        m = (torch.randn(n, nb, generator=g) * 0.05).half().view(torch.uint8).reshape(n, nb, 2)
        qs = torch.randint(0, 256, (n, nb, 16), generator=g).to(torch.uint8)
        return torch.cat((d, m, qs), -1).reshape(n, -1)
    qs = torch.randint(-127, 128, (n, nb, 32), generator=g).to(torch.int8).view(torch.uint8)
    return torch.cat((d, qs), -1).reshape(n, -1)


def _weight(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    q, d, m = K.dequantize_blocks(blocks, kind)
    return q.double() * d.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17, 33])
@pytest.mark.parametrize("n,k", [(80, 192), (81, 160)])  # odd N and an odd block count: the tiles' remainders
def test_kernel_equals_integer_reference(kind, rows, n, k):
    g = torch.Generator().manual_seed(rows)
    blocks = _blocks(n, k, kind, g)
    x = torch.randn(rows, k, generator=g) * 3
    x[:, 7] = 40.0  # an outlier channel: its block's step is coarse
    y = K.q8_dot_mm(x, blocks, kind)
    assert y.dtype == torch.float32 and tuple(y.shape) == (rows, n)
    ref = K.q8_dot_reference(x, blocks, kind)
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale
    exact = x.double() @ _weight(blocks, kind).t()
    xq, dx = K.quantize_activations(x)
    step = (dx.double() / 2).repeat_interleave(32, 1)  # [M, K]: the rounding of each activation element
    bound = step @ _weight(blocks, kind).abs().t() + 1e-5 * scale
    assert bool(((y.double() - exact).abs() <= bound).all())
    if kind == "Q4_1":  # the min term matters: without it the result is far off
        _, _, m = K.dequantize_blocks(blocks, kind)
        assert (y.double() - (exact - x.double() @ m.double().repeat_interleave(32, 1).t())).abs().max() > 0.1


def test_activation_codes_round_half_away_from_zero():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 0.5, -0.5, -1.5, 2.5, -0.25])  # dx = 1: codes 127, 1, -1, -2, 3, 0
    q, dx = K.quantize_activations(x)
    assert dx.tolist() == [[1.0]] and q[0, :6].tolist() == [127, 1, -1, -2, 3, 0]
    blocks = torch.zeros(1, 34, dtype=torch.uint8)
    blocks[0, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    blocks[0, 3:6] = torch.tensor([1, 1, 1], dtype=torch.int8).view(torch.uint8)  # w = 1 at 1, 2, 3
    assert K.q8_dot_mm(x, blocks, "Q8_0").item() == 1 - 1 - 2


def test_bad_shapes_name_the_limit():
    g = torch.Generator().manual_seed(0)
    blocks = _blocks(16, 64, "Q4_1", g)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        K.q8_dot_mm(torch.randn(1, 48), blocks, "Q4_1")
    with pytest.raises(RuntimeError, match="40 bytes per row expected"):
        K.q8_dot_mm(torch.randn(1, 64), blocks[:, :30], "Q4_1")


def test_compiled_graph_calls_the_op():
    g = torch.Generator().manual_seed(1)
    blocks = _blocks(64, 128, "Q4_1", g)
    x = torch.randn(2, 128, generator=g)
    fn = torch.compile(lambda a: K.q8_dot_mm(a * 2, blocks, "Q4_1").relu(), fullgraph=True)
    assert torch.equal(fn(x), K.q8_dot_mm(x * 2, blocks, "Q4_1").relu())


def test_vnni_build_follows_host_flags():
    """The VNNI flags of cpu_extension.vnni_flags() define the macros the kernel checks: a host that lists
    AVX-VNNI (or AVX512-VNNI with VL) gets vpdpbusd for Q8_0, another host the maddubs path."""
    from tierserve.kernels.cpu_extension import vnni_flags

    assert K.vnni() == (K.simd() and bool(vnni_flags()[1]))


def test_avx512_build_follows_host_flags():
    """AVX512 F and BW on the host build the 512-bit Q4_1 tile for batches (test_kernel_equals_integer_reference
    then runs it at 2-9 rows, an odd block count included); elsewhere the 256-bit tiles."""
    from tierserve.kernels.cpu_extension import AVX512_FLAGS, cpu_flags

    assert K.avx512() == (K.simd() and all(f in cpu_flags() for f in AVX512_FLAGS))


def test_amx_build_follows_host_flags():
    """AMX-TILE and AMX-INT8 on the host (with AVX512 F and BW) build the tile-unit path for 5 rows and more
    (test_kernel_equals_integer_reference then runs it at 5, 9, 17 and 33 rows: one to three tiles of 16
    activation rows, full and partial panels of 16 weight rows, an odd block count); elsewhere the vector
    tiles."""
    from tierserve.kernels.cpu_extension import AMX_FLAGS, AVX512_FLAGS, cpu_flags

    assert K.amx() == (K.simd() and all(f in cpu_flags() for f in AVX512_FLAGS + AMX_FLAGS))

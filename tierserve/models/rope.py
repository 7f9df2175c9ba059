"""Rotary position embeddings (RoPE): inverse frequencies, scaling variants, cos/sin tables.

For head dim ``D`` and base ``theta`` the default inverse frequencies are

    inv_freq_i = 1 / theta^(2i / D),   i = 0 .. D/2 - 1

and a token at position ``p`` rotates each pair ``(x_i, x_{i + D/2})`` (the
"rotate half" layout used by HF checkpoints) by angle ``p * inv_freq_i``:

    x_i'       = x_i * cos - x_{i+D/2} * sin
    x_{i+D/2}' = x_{i+D/2} * cos + x_i * sin

cos and sin are multiplied by an ``attention_scaling`` factor (1 except yarn).
A step widens cos/sin once to ``[cos, cos]`` and ``[-sin, sin]`` (``rope_tables``,
memoised on the step's ``ForwardContext``); every layer then rotates with
``apply_rope_full`` (mul, roll, mul, add: four ops instead of eight, bit-equal;
measured here at one token, 12 heads of 64: 7.7 us against 12.2 us per call).
Scaling variants (``rope_type``):

- ``default``: as above.
- ``linear`` (position interpolation): ``inv_freq / factor``.
- ``llama3`` (Llama 3.1): with ``L = original_max_position_embeddings``,
  wavelength ``w = 2 pi / inv_freq``; ``w > L / low_freq_factor`` -> ``inv_freq / factor``;
  ``w < L / high_freq_factor`` -> unchanged; in between a smooth blend with
  ``s = (L / w - low) / (high - low)``: ``(1 - s) * inv_freq / factor + s * inv_freq``.
- ``yarn`` (Peng et al. 2023, arXiv:2309.00071): extrapolated ``1/theta^(2i/D)`` and
  interpolated ``/factor`` frequencies blended by a linear ramp over the dims
  between the correction dims of ``beta_fast`` (default 32) and ``beta_slow``
  (default 1) rotations over ``L`` (floored/ceiled unless ``truncate`` is false);
  ``attention_scaling = attention_factor`` if given, else
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set, else
  ``mscale(factor) = 0.1 ln(factor) + 1`` (1 for factor <= 1).

All frequency math runs in float32 as in HF transformers (tests compare
``inv_freq`` and ``attention_scaling`` with ``transformers``' ``ROPE_INIT_FUNCTIONS``).
``RotaryEmbedding`` keeps float32 cos/sin tables of shape ``[n, D/2]`` built once up
to ``max_position_embeddings`` on first use and doubled when a step needs a later
position (``ensure(n)``, called by the model with the step's host-side max
sequence length, so no device sync); a step reads them with one index by
``positions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tierserve.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """One RoPE variant, parsed from an HF ``rope_parameters`` / ``rope_scaling`` dict."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.theta <= 0:
            raise ModelLoadError(f"rope_theta must be > 0, got {self.theta}")
        need = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("original_max_position_embeddings",)}.get(self.rope_type, ())
        for name in need:
            if getattr(self, name) is None:
                raise ModelLoadError(f"rope_type {self.rope_type!r} needs rope parameter {name!r}")

    @classmethod
    def from_hf(cls, params: dict | None, theta: float, max_position_embeddings: int) -> "RopeSpec":
        """Parse an HF dict (new ``rope_type`` or legacy ``type`` key); ``theta`` is the fallback base.

        yarn without ``original_max_position_embeddings`` uses ``max_position_embeddings``
        (as transformers does); yarn without ``factor`` uses max / original.
        """
        p = dict(params or {})
        rope_type = p.get("rope_type", p.get("type", "default")) or "default"
        if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelLoadError(f"partial_rotary_factor {p['partial_rotary_factor']} is not supported (only 1.0)")
        orig = p.get("original_max_position_embeddings")
        if rope_type == "yarn" and orig is None:
            orig = max_position_embeddings
        factor = p.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig if rope_type == "yarn" else 1.0

        def opt(key):
            return None if p.get(key) is None else float(p[key])

        return cls(rope_type=rope_type, theta=float(p.get("rope_theta", theta)), factor=float(factor),
                   low_freq_factor=opt("low_freq_factor"), high_freq_factor=opt("high_freq_factor"),
                   original_max_position_embeddings=None if orig is None else int(orig),
                   beta_fast=opt("beta_fast"), beta_slow=opt("beta_slow"), mscale=opt("mscale"),
                   mscale_all_dim=opt("mscale_all_dim"), attention_factor=opt("attention_factor"),
                   truncate=bool(p.get("truncate", True)))


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3(spec: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    old_len = spec.original_max_position_embeddings
    low, high = spec.low_freq_factor, spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / spec.factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    base, factor, orig = spec.theta, spec.factor, spec.original_max_position_embeddings
    if spec.attention_factor is not None:
        scaling = spec.attention_factor
    elif spec.mscale and spec.mscale_all_dim:
        scaling = _yarn_mscale(factor, spec.mscale) / _yarn_mscale(factor, spec.mscale_all_dim)
    else:
        scaling = _yarn_mscale(factor)
    beta_fast = spec.beta_fast or 32.0
    beta_slow = spec.beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # weight of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(scaling)


def compute_inv_freq(spec: RopeSpec, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float32, attention_scaling)`` for ``spec``."""
    if spec.rope_type == "yarn":
        return _yarn(spec, head_dim)
    inv_freq = _base_inv_freq(spec.theta, head_dim)
    if spec.rope_type == "linear":
        inv_freq = inv_freq / spec.factor
    elif spec.rope_type == "llama3":
        inv_freq = _llama3(spec, inv_freq)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Lazily built float32 cos/sin tables for one RopeSpec; see the module docstring."""

    def __init__(self, spec: RopeSpec, head_dim: int, max_position_embeddings: int):
        super().__init__()
        if head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {head_dim}")
        self.spec = spec
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_scaling = compute_inv_freq(spec, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, head_dim // 2), persistent=False)

    def ensure(self, num_positions: int) -> None:
        """Make the tables cover positions ``< num_positions`` (host int; no device sync)."""
        have = self.cos_table.shape[0]
        if num_positions <= have:
            return
        size = max(num_positions, self.max_position_embeddings, 2 * have)
        pos = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
        freqs = pos[:, None] * self.inv_freq.float()[None, :]
        self.cos_table = freqs.cos() * self.attention_scaling
        self.sin_table = freqs.sin() * self.attention_scaling

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as ``[T, 1, D/2]`` in ``dtype`` (broadcast over heads)."""
        cos = self.cos_table[positions].to(dtype)[:, None, :]
        sin = self.sin_table[positions].to(dtype)[:, None, :]
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, D]`` by cos/sin ``[T, 1, D/2]`` (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, 1, D/2]`` widened to the full head for ``apply_rope_full``: ``[cos, cos]`` and
    ``[-sin, sin]`` ``[T, 1, D]`` (built once per step, ``ForwardContext.rope_tables``)."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope_full(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in four ops instead of eight: ``x * [cos, cos] + roll(x, D/2) * [-sin, sin]``.

    ``roll`` by half the head swaps the halves, so output ``i < D/2`` is ``x_i cos_i + x_{i+D/2} (-sin_i)``
    and output ``i + D/2`` is ``x_{i+D/2} cos_i + x_i sin_i``: the same two rounded products added in the same
    order as ``apply_rope`` (``a - b`` is ``a + (-b)`` exactly), so the values are bit-equal (tests).
    """
    return x * cos_full + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed

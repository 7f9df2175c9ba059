"""The variants of benchmarks/kv_sensitivity.py as K/V round trips on plain pages.

``RoundTripKV`` stores what a compressed format would give back: its ``write`` passes K and/or V through a
codec (quantize, dequantize) before the plain page takes them, positions below ``sink`` stored as they come.
``Probe`` holds one model's per-layer projections, norm gains, query/output energies and RoPE tables and
builds the codecs named by kv_sensitivity.py's variants (kv4's per-token groups of 32 over Hadamard-rotated
keys; XQuant's latent in the SVD basis of each BASIS, with the optional in-group Hadamard and energy bit
allocation of ``allocate_bits``). The variant grammar and the measured tables are in kv_sensitivity.py.
"""

from __future__ import annotations

import torch

from tierserve.cache.compress.kv4 import dequantize_groups, quantize_groups
from tierserve.cache.compress.xquant import apply_rope, layer_ropes, projection_basis, projection_weights, unrope
from tierserve.kernels.kv_pages import LayerKV, allocate_kv_cache
from tierserve.kernels.quant.hadamard import hadamard_matrix

BLOCK, GROUP = 16, 32


class RoundTripKV(LayerKV):
    """Plain pages whose ``write`` passes K / V through a codec round trip first (slots are positions here:
    one sequence on blocks 0, 1, ...); positions < ``sink`` are stored as they come."""

    def __init__(self, k, v, layer: int, fk=None, fv=None, sink: int = 0):
        super().__init__(k, v)
        self.layer, self.fk, self.fv, self.sink = layer, fk, fv, sink

    def write(self, slot_mapping, k, v):
        keep = (slot_mapping < self.sink)[:, None, None]
        if self.fk is not None:
            k = torch.where(keep, k, self.fk(self.layer, slot_mapping, k).to(k.dtype))
        if self.fv is not None:
            v = torch.where(keep, v, self.fv(self.layer, slot_mapping, v).to(v.dtype))
        super().write(slot_mapping, k, v)


def asym_codec(z: torch.Tensor, bits: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric per-token groups (kv4's codec) with ``bits[j]`` bits in group j: fp16 scale and min."""
    t, d = z.shape
    zg = z.float().reshape(t, d // group, group)
    levels = (2.0 ** bits.float() - 1)[None, :]
    lo, hi = zg.amin(-1), zg.amax(-1)
    scale = ((hi - lo) / levels).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = lo.to(torch.float16).float()
    q = torch.minimum(torch.round((zg - zero[..., None]) / scale[..., None]).clamp(min=0), levels[..., None])
    return (zero[..., None] + q * scale[..., None]).reshape(t, d)


def allocate_bits(energy: torch.Tensor, mean_bits: int = 4, lo: int = 1, hi: int = 8) -> torch.Tensor:
    """Greedy transform-coding allocation: each bit to the group with the largest ``energy 4^-b``."""
    bits = torch.full_like(energy, lo, dtype=torch.long)
    for _ in range(mean_bits * energy.numel() - lo * energy.numel()):
        dist = torch.where(bits < hi, energy * 4.0 ** (-bits.double()), torch.full_like(energy, -1.0))
        bits[int(dist.argmax())] += 1
    return bits


class Probe:
    """The model's per-layer projections, gains and RoPE tables, and the codecs built on them."""

    def __init__(self, model):
        self.model = model
        self.ropes = layer_ropes(model, "xquant")
        hidden, dtype = model.cfg.hidden_size, getattr(model, "dtype", torch.float32)
        self.layers = []
        for layer in model.layers:
            attn = layer.self_attn
            wq, wk, wv = projection_weights(attn.qkv_proj, hidden, dtype, "cpu").split(
                [attn.q_size, attn.kv_size, attn.kv_size], dim=0)
            with torch.no_grad():
                s = layer.input_layernorm(torch.ones(1, hidden, dtype=dtype)).float()[0]
                gk, gq = torch.ones(attn.kv_size), torch.ones(attn.head_dim)
                if getattr(attn, "qk_norm", "none") == "per_head":
                    one = torch.ones(1, 1, attn.head_dim, dtype=dtype)
                    gk = attn.k_norm(one).float().reshape(-1).repeat(attn.num_kv_heads)
                    gq = attn.q_norm(one).float().reshape(-1)
                wo = projection_weights(attn.o_proj, attn.q_size, dtype, "cpu")  # [hidden, q_size]
            self.layers.append({"wk": wk, "wv": wv, "s": s, "gk": gk, "heads": attn.num_kv_heads,
                                "dim": attn.head_dim, "wk_weight": self._key_weight(attn, wq * s, gq),
                                "wv_weight": self._value_weight(attn, wo)})
        self.head_dim = model.layers[0].self_attn.head_dim
        self.hadamard = hadamard_matrix(self.head_dim)
        self._bases: dict = {}

    @staticmethod
    def _floor(w2: torch.Tensor) -> torch.Tensor:
        w = w2.sqrt()
        return (w / w.pow(2).mean().sqrt()).clamp(min=0.3)

    def _key_weight(self, attn, wq: torch.Tensor, gq: torch.Tensor) -> torch.Tensor:
        """Per key channel: the RMS of the queries that multiply it (data-free: each query head's normed row
        energies of ``W_q diag(s)`` times its q-norm gain, summed over the heads of the group, averaged over the
        RoPE pair c, c + D/2)."""
        d, heads, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
        rows = wq.pow(2).sum(1).reshape(heads, d)
        e = gq.pow(2)[None] * rows / rows.mean(1, keepdim=True)
        e = e.reshape(kv, heads // kv, d).sum(1)
        e = (e + e.roll(d // 2, dims=1)) / 2
        return self._floor(e.reshape(-1))

    def _value_weight(self, attn, wo: torch.Tensor) -> torch.Tensor:
        """Per value channel: the norm of the o_proj columns it feeds (summed over the group's heads)."""
        d, heads, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
        e = wo.pow(2).sum(0).reshape(kv, heads // kv, d).sum(1)
        return self._floor(e.reshape(-1))

    def kv4_k(self, i, pos, k):
        h = self.hadamard
        return dequantize_groups(*quantize_groups(k.float() @ h, GROUP), GROUP) @ h.T

    def kv4_v(self, i, pos, v):
        return dequantize_groups(*quantize_groups(v.float(), GROUP), GROUP)

    def basis(self, i: int, which: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, per-group bits) of layer i's K or V latent for basis ``kind`` (module doc)."""
        key = (i, which, kind)
        if key not in self._bases:
            ly = self.layers[i]
            w = ly["wk"] if which == "k" else ly["wv"]
            base = kind.split("_")[0]
            if which == "k" and base.startswith("kg"):
                w = ly["gk"][:, None] * w
            if base.startswith("kgs"):
                w = w * ly["s"][None, :]
            weight = ly[f"w{which}_weight"] if base.endswith("w") else torch.ones(w.shape[0])
            w = weight[:, None] * w
            b = projection_basis(w)
            sv = torch.linalg.svdvals(w.double().T)
            energy = sv.pow(2).reshape(-1, GROUP).mean(-1)
            bits = allocate_bits(energy) if "alloc" in kind else torch.full((energy.numel(),), 4)
            self._bases[key] = (b, bits, weight)
        return self._bases[key]

    def latent(self, z: torch.Tensor, bits: torch.Tensor, kind: str) -> torch.Tensor:
        if "rot" not in kind:
            return asym_codec(z, bits, GROUP)
        h = hadamard_matrix(GROUP)
        t, d = z.shape
        zr = (z.reshape(t, d // GROUP, GROUP) @ h).reshape(t, d)
        return (asym_codec(zr, bits, GROUP).reshape(t, d // GROUP, GROUP) @ h).reshape(t, d)

    def xq_k(self, kind: str):
        def f(i, pos, k):
            b, bits, weight = self.basis(i, "k", kind)
            cos, sin = self.ropes[i].lookup(pos, torch.float32)
            t, heads, dim = k.shape
            k_pre = unrope(k.float(), cos, sin).reshape(t, -1)
            z = self.latent((k_pre * weight) @ b.T, bits, kind)
            return apply_rope(((z @ b) / weight).reshape(t, heads, dim), cos, sin)
        return f

    def xq_v(self, kind: str):
        def f(i, pos, v):
            b, bits, weight = self.basis(i, "v", kind)
            t = v.shape[0]
            z = self.latent((v.float().reshape(t, -1) * weight) @ b.T, bits, kind)
            return ((z @ b) / weight).reshape(v.shape)
        return f

    def codecs(self, name: str):
        """(fk, fv) of a variant name without its @layers / +sink suffixes."""
        if name.startswith("kv4"):
            fk, fv = self.kv4_k, self.kv4_v
        elif name.startswith("xq_"):
            kind = name[3:].removesuffix("_k").removesuffix("_v")
            fk, fv = self.xq_k(kind), self.xq_v(kind)
        else:
            raise SystemExit(f"unknown variant {name!r}")
        if name.endswith("_k"):
            fv = None
        if name.endswith("_v"):
            fk = None
        return fk, fv

    def layer_set(self, spec: str | None) -> set[int]:
        n = len(self.model.layers)
        if spec is None:
            return set(range(n))
        if spec in ("sliding", "global"):
            return {i for i, ly in enumerate(self.model.layers)
                    if (getattr(ly.self_attn, "sliding_window", None) is not None) == (spec == "sliding")}
        a, b = (int(x) for x in spec.split("-"))
        return set(range(a, b + 1))

    def caches(self, variant: str, blocks: int) -> list:
        sink = 0
        if "+sink" in variant:
            variant, n = variant.split("+sink")
            sink = int(n)
        name, _, layers = variant.partition("@")
        fk, fv = self.codecs(name) if name != "none" else (None, None)
        chosen = self.layer_set(layers or None)
        plain = allocate_kv_cache(self.model.kv_spec(BLOCK), blocks)
        return [RoundTripKV(p.k, p.v, i, fk, fv, sink) if i in chosen else p for i, p in enumerate(plain)]

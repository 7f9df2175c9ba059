"""XQuant KV storage (arXiv 2508.10395; our reading in TECHNIQUES.md), the GQA latent form.

XQuant caches the layer input X instead of K and V and rematerialises both
when attending. For a GQA model X is wider than K and V together, so the
exact low-rank form caches the latent ``X U S`` of an offline SVD of each KV
projection. Per attention layer, with ``W_k, W_v`` the ``[d_kv, hidden]``
projections (``d_kv = kv_heads * head_dim``):

    offline:  (G_k W_k)^T = U_k S_k B_k   (SVD; B_k [d_kv, d_kv] orthogonal, singular values descending;
              G_k = diag(g_k), g_k the k norm's per-channel gain, 1 without a k norm); W_v^T = U_v S_v B_v
              (W read off the projection module itself -- its output on the identity minus its bias -- so
              packed weight formats work too)
    store:    z_k = k_pre B_k^T  (= X U_k S_k, plus the bias term b_k B_k^T where the model has one)
              z_v = v B_v^T      (= X U_v S_v + b_v B_v^T)
    read:     k = RoPE(z_k B_k, stored positions),   v = z_v B_v

``k_pre`` is the key before RoPE (after the model's q/k norm and clipping,
which are not linear in X: caching the latent of the projected key keeps
those models exact). The attention hands ``write`` post-RoPE keys; the
layer rotates them back by the step's RoPE angles (captured by a forward
pre-hook on the attention module: ``k_pre = R(-theta) k / (cos^2 + sin^2)``,
the division undoing a RoPE ``attention_scaling`` other than 1), and stores
each token's position (int32, one tensor shared by all layers) so that a
read can apply RoPE again at the stored positions (``rematerialise``, shared
with xquant_cl.py's read).

The k-norm gain (``key_gain``): a model with a q/k norm (Gemma3, Qwen3, OLMoE) stores
``k_pre = G_k W_k x / rms(W_k x)``, so the matrix its keys really come from is ``G_k W_k``, not ``W_k``;
the basis of ``W_k`` alone leaves latent channels that are neither ordered nor separated by scale once
the gains have been applied (Gemma-3-270m's k-norm gains span -2.7 .. 30, median |g| 1.9). Without a k norm G_k = I (SmolLM2, Llama: the same basis as
before). The basis is exact either way (any orthogonal B); the fold only decides which channels share a
quantization group.

Quantization (``latent_bits`` 4): each token's latent is quantized in groups
of ``g = group_size`` consecutive latent channels: each group is multiplied by
the Hadamard matrix ``H_g`` (hadamard.py; symmetric, orthogonal), coded with
kv4's asymmetric 4-bit codec (kv4.py: fp16 scale and min per group), and
multiplied by ``H_g`` again on read. Latent channels come ordered by singular
value, so a group holds channels of similar scale; the rotation inside the
group spreads a token's outlier channel over the group (kv4 rotates over
head_dim instead). Bytes per token and layer: ``2 * (d_kv / 2 + 4 * d_kv / g)``
-- kv4's for the same group -- plus 4 bytes per token for the position over
all layers. ``latent_bits`` 0 keeps the latent unquantized in the KV dtype:
lossless up to the rounding of the two rotations (logits equal plain KV
within fp32 noise; tests).

Measured (benchmarks/kv_sensitivity.py --gemma, 2 x 512 held-out tokens, KL against plain fp32 KV; the
error confined to one part): on Gemma-3-270m the basis of ``W_k`` gives KL 0.273 (kv4: 0.251), the folded
basis 0.091, folded + in-group Hadamard 0.057 (keys alone 0.035, values alone 0.023). Two variants measured
worse and were left out: bits per group allocated by singular-value energy (transform coding, 1..8 bits,
same total) -- 0.079 without the rotation but 0.081 with it, and 0.026 vs 0.023 on V alone -- and folding the
input norm's gain into both bases (0.070). In the whole-prefill benchmark (kv_formats_quality.py --gemma,
4 x 512 tokens, equal bytes) XQuant is ppl +0.14% KL 0.056 against kv4's +2.64% KL 0.290; the same run
with the parts switched off (a one-off patched run, same windows): basis of W_k without rotation (the codec
before) +5.83% KL 0.294, the fold alone -0.16% KL 0.115, the rotation alone +12.58% KL 0.269. The fold is
what fixes Gemma; the rotation halves the KL on top of it. SmolLM2 (no k norm: the rotation alone): +0.87%
KL 0.011, before +1.63% KL 0.025 (kv_formats_quality.py).

XQuant-CL (deltas to the previous layer's X) caches X itself, not this latent (the latent bases differ
per layer): xquant_cl.py.

Models (``layer_ropes``): each attention layer re-applies its own RoPE table, ``model.layer_rope(i)``
where the model has several (Gemma3: the local table on sliding-window layers, the global one on full
layers; the write side needs nothing: the attention pre-hook captures the cos/sin the layer was given),
else the one ``model.rope`` (Llama, Mistral, Qwen, OLMoE). Sliding windows need nothing either: the torch
attention keeps every page of a sequence and masks keys by position (``kpos > qpos - window``,
kernels/paged_attention.py), so a window only decides which rematerialised keys are masked. The triton
attention backend is refused (its kernels read plain or kv4 pages in place; XQuant pages are read
through ``gather``, the torch backend).
"""

from __future__ import annotations

import torch

from tierserve.cache.compress.base import KVCompressor, register
from tierserve.cache.compress import kv4 as _kv4  # module, not name: kv4 may be mid-import (base.py imports both)
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.hadamard import hadamard_matrix


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout of models/rope.py (a layer above this one; tests check the two agree)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def projection_basis(weight: torch.Tensor) -> torch.Tensor:
    """``B`` of ``weight^T = U S B`` (``weight`` ``[d_kv, hidden]``): ``[d_kv, d_kv]`` orthogonal, float32."""
    d_kv, hidden = weight.shape
    if hidden < d_kv:
        raise InvalidParameterError("kv_compression", f"xquant needs hidden size >= the KV projection's width; "
                                                      f"got {hidden} < {d_kv}")
    _, _, basis = torch.linalg.svd(weight.detach().float().T, full_matrices=False)
    return basis


def key_gain(attn, dtype: torch.dtype, device) -> torch.Tensor:
    """``[kv_size]`` per-channel gain of the attention's k norm: its output on ones (the normalisation of ones is
    1 up to its eps), per head repeated over the KV heads or over the whole projection; ones without a k norm."""
    kind = getattr(attn, "qk_norm", "none")
    if kind == "none":
        return torch.ones(attn.kv_size, device=device)
    shape = (1, attn.kv_size) if kind == "full" else (1, attn.num_kv_heads, attn.head_dim)
    with torch.no_grad():
        return attn.k_norm(torch.ones(shape, dtype=dtype, device=device)).float().reshape(-1)


def projection_weights(qkv_proj: torch.nn.Module, hidden: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The ``[out, hidden]`` float32 matrix a (possibly packed) projection applies: its output on the identity
    minus its output on zero (the bias). A packed format gives its dequantized weight as its kernel computes it;
    the basis only has to be orthogonal for the latent to be exact, and this one is close to the SVD of the
    weight the model really applies."""
    with torch.no_grad():
        eye = torch.eye(hidden, dtype=dtype, device=device)
        return (qkv_proj(eye).float() - qkv_proj(torch.zeros_like(eye[:1])).float()).T.contiguous()


def layer_ropes(model: torch.nn.Module, method: str) -> list:
    """Each attention layer's RoPE table (module doc, Models): ``model.layer_rope(i)`` or ``model.rope``."""
    layers, pick, rope = (getattr(model, a, None) for a in ("layers", "layer_rope", "rope"))
    if layers is None or (pick is None and rope is None):
        raise InvalidParameterError("kv_compression", f"{method} needs a decoder with a RoPE table per attention "
                                                      f"layer (model.layer_rope(i) or model.rope); "
                                                      f"{type(model).__name__} has neither")
    return [pick(i) if pick is not None else rope for i in range(len(layers))]


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of ``apply_rope(x, cos, sin)`` (a rotation scaled by ``cos^2 + sin^2``)."""
    return apply_rope(x, cos, -sin) / (cos * cos + sin * sin).repeat(1, 1, 2)


def rematerialise(k_pre: torch.Tensor, vals: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rope,
                  heads: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the pages ``table [..., nb]`` from their pre-RoPE keys and values (rows in table order):
    RoPE applied to the keys at the positions stored per slot (``positions [num_blocks, bs]``, the table grown to
    cover the largest), both shaped ``[..., nb * bs, heads, dim]`` in ``dtype``."""
    pos = torch.index_select(positions, 0, table.reshape(-1)).reshape(-1).long()
    rope.ensure(int(pos.max()) + 1 if pos.numel() else 1)
    cos, sin = rope.lookup(pos, torch.float32)
    keys = apply_rope(k_pre.reshape(-1, heads, dim), cos, sin)
    shape = (*table.shape[:-1], -1, heads, dim)
    return keys.reshape(shape).to(dtype), vals.reshape(shape).to(dtype)


class _StepCapture:
    """The step's positions (model pre-hook) and each layer's cos/sin (attention pre-hooks)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class XQuantLayerKV:
    """One layer's latent K and V pages (``LayerKV``'s ``write`` contract plus ``gather`` and ``parts``)."""

    def __init__(self, layer: int, num_blocks: int, block_size: int, heads: int, dim: int, group: int,
                 bits: int, dtype: torch.dtype, positions: torch.Tensor, device):
        self.layer, self.heads, self.dim, self.group, self.bits, self.dtype = layer, heads, dim, group, bits, dtype
        self.d_kv = heads * dim
        self.positions = positions  # [num_blocks, block_size] int32, shared by every layer
        if bits == 4:
            self.k_latent = _kv4.PackedTensor.empty(num_blocks, block_size, 1, self.d_kv, group, device)
            self.v_latent = _kv4.PackedTensor.empty(num_blocks, block_size, 1, self.d_kv, group, device)
            self.rotation = hadamard_matrix(group, torch.float32, device)  # inside each latent group
        else:
            self.k_latent = torch.zeros(num_blocks, block_size, self.d_kv, dtype=dtype, device=device)
            self.v_latent = torch.zeros(num_blocks, block_size, self.d_kv, dtype=dtype, device=device)
        self.basis_k = self.basis_v = None
        self.rope = None
        self.capture: _StepCapture | None = None

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def parts(self) -> tuple[torch.Tensor, ...]:
        """Storage tensors, block-major: latent K, latent V (codes, scales, mins at 4 bits), and, in layer 0
        only, the positions (one tensor serves every layer)."""
        latent = tuple(t for x in (self.k_latent, self.v_latent) for t in ((x.codes, x.scale, x.zero) if self.bits == 4 else (x,)))
        return latent + ((self.positions,) if self.layer == 0 else ())

    def _rotate(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d_kv]`` with each latent group multiplied by ``H_g`` (symmetric and orthogonal: its own
        inverse)."""
        return (z.reshape(*z.shape[:-1], -1, self.group) @ self.rotation).reshape(z.shape)

    def _store(self, dst, slots: torch.Tensor, z: torch.Tensor) -> None:
        if self.bits == 4:
            dst.write(slots, self._rotate(z)[:, None, :], self.group)
        else:
            dst.view(-1, self.d_kv).index_copy_(0, slots, z.to(self.dtype))

    def _load(self, src, table: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return self._rotate(src.gather(table, self.group)[..., 0, :])
        flat = torch.index_select(src, 0, table.reshape(-1)).float()
        return flat.view(*table.shape[:-1], -1, self.d_kv)

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.basis_k is None or self.capture is None or self.layer not in self.capture.rope:
            raise RuntimeError("xquant pages written before the compressor was bound to the model")
        cos, sin = self.capture.rope[self.layer]
        t = k.shape[0]
        k_pre = unrope(k.float(), cos.float(), sin.float()).reshape(t, self.d_kv)
        self._store(self.k_latent, slot_mapping, k_pre @ self.basis_k.T)
        self._store(self.v_latent, slot_mapping, v.float().reshape(t, self.d_kv) @ self.basis_v.T)
        self.positions.view(-1).index_copy_(0, slot_mapping, self.capture.positions.to(torch.int32))

    def gather(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages of ``table [..., nb]`` rematerialised: keys and values ``[..., nb * bs, H, D]`` in the KV dtype."""
        k_pre = self._load(self.k_latent, table) @ self.basis_k
        vals = self._load(self.v_latent, table) @ self.basis_v
        return rematerialise(k_pre, vals, self.positions, table, self.rope, self.heads, self.dim, self.dtype)


@register
class XQuantCompressor(KVCompressor):
    name = "xquant"
    evicts = False

    def __init__(self, config, spec):
        super().__init__(config, spec)
        d_kv, g = spec.num_kv_heads * spec.head_dim, config.group_size
        if config.latent_bits == 4 and d_kv % g:
            raise InvalidParameterError("kv_group_size", f"xquant needs the KV width {d_kv} "
                                                         f"(kv_heads * head_dim) divisible by the group size {g}")
        self.capture = _StepCapture()
        self._hooks: list = []

    def token_bytes_per_layer(self) -> int:
        d_kv, g = self.spec.num_kv_heads * self.spec.head_dim, self.config.group_size
        if self.config.latent_bits == 4:
            return 2 * (d_kv // 2 + 2 * 2 * (d_kv // g))
        return 2 * d_kv * torch.empty(0, dtype=getattr(torch, self.spec.dtype)).element_size()

    def page_size_bytes(self) -> int:
        s = self.spec
        return s.block_size * (self.token_bytes_per_layer() * s.num_layers + 4)

    def allocate_cache(self, num_blocks: int, device="cpu") -> list[XQuantLayerKV]:
        s = self.spec
        positions = torch.zeros(num_blocks, s.block_size, dtype=torch.int32, device=device)
        return [XQuantLayerKV(i, num_blocks, s.block_size, s.num_kv_heads, s.head_dim, self.config.group_size,
                              self.config.latent_bits, getattr(torch, s.dtype), positions, device)
                for i in range(s.num_layers)]

    def bind(self, model: torch.nn.Module, kv_caches: list) -> None:
        super().bind(model, kv_caches)
        ropes = layer_ropes(model, self.name)
        hidden, dtype = model.cfg.hidden_size, getattr(model, "dtype", torch.float32)
        for i, (layer, kv) in enumerate(zip(model.layers, kv_caches)):
            attn = layer.self_attn
            _, wk, wv = projection_weights(attn.qkv_proj, hidden, dtype, kv.device).split(
                [attn.q_size, attn.kv_size, attn.kv_size], dim=0)
            kv.basis_k = projection_basis(key_gain(attn, dtype, kv.device)[:, None] * wk).to(kv.device)
            kv.basis_v = projection_basis(wv).to(kv.device)
            kv.rope, kv.capture = ropes[i], self.capture
            self._hooks.append(attn.register_forward_pre_hook(self._capture_rope(i)))
        self._hooks.append(model.register_forward_pre_hook(self._capture_positions))

    def _capture_positions(self, module, args) -> None:
        self.capture.positions = args[1]

    def _capture_rope(self, layer: int):
        def hook(module, args) -> None:
            self.capture.rope[layer] = (args[1], args[2])
        return hook

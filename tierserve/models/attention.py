"""Self-attention layer shared by every decoder: fused QKV, optional q/k norm, RoPE, paged attention.

One ``qkv_proj`` Linear holds HF's q_proj, k_proj and v_proj stacked by rows
(``[Hq*D | Hkv*D | Hkv*D]``, biases likewise), so a layer runs two matmuls
(qkv, o). Per step, for the flattened tokens ``x [T, hidden]``:

    q, k, v = split(qkv_proj(x))
    qk_norm "full"      : q = q_norm(q), k = k_norm(k) over the whole projection (OLMoE)
    clip_qkv c          : q, k, v clamped to [-c, c] (OLMoE)
    qk_norm "per_head"  : RMSNorm over each head's D features (Qwen3, Gemma3)
    q, k = RoPE(q, k, positions)  (without q/k norm or clip: one call over q|k, adjacent in qkv_proj's output,
                                   four ops on the step's widened cos/sin tables, bit-equal; in eager on the
                                   CPU one C++ call, kernels/decoder_rows_cpu.py, bit-equal too)
    o = attn.backend.forward(q, k, v, kv_cache[layer], attn, scale, sliding_window, logit_softcap)
    return o_proj(o)

``attn.backend`` (an ``AttentionBackend`` on the step's ``AttentionMetadata``:
the torch reference by default, or the triton kernels) is the one place the
attention implementation is chosen.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.kernels import decoder_rows_cpu
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.context import ForwardContext
from tierserve.models.layers import RMSNorm, Slot, fused_slots, linear, linear_slots
from tierserve.models.rope import apply_rope, apply_rope_full

QK_NORM_KINDS = ("none", "per_head", "full")


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype, *, qkv_bias: bool,
                 o_bias: bool, qk_norm: str = "none", gemma_norm: bool = False):
        super().__init__()
        if qk_norm not in QK_NORM_KINDS:
            raise ValueError(f"qk_norm must be one of {QK_NORM_KINDS}, got {qk_norm!r}")
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = cfg.attn_scale
        self.sliding_window = cfg.window(layer_idx)
        self.softcap = cfg.attn_logit_softcapping
        self.clip = cfg.clip_qkv
        self.qk_norm = qk_norm
        self.qkv_proj = linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, dtype)
        self.o_proj = linear(self.q_size, cfg.hidden_size, o_bias, dtype)
        if qk_norm != "none":
            q_dim, k_dim = (self.head_dim, self.head_dim) if qk_norm == "per_head" else (self.q_size, self.kv_size)
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, dtype, unit_offset=gemma_norm)
            self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, dtype, unit_offset=gemma_norm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        if self.qk_norm == "none" and self.clip is None:
            q, k, v = self._qkv_rope_merged(x, cos, sin, ctx.rope_tables(cos, sin))
        else:
            q, k, v = self._qkv_rope(x, cos, sin)
        out = ctx.attn.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn, scale=self.scale,
                                       sliding_window=self.sliding_window, logit_softcap=self.softcap)
        return self.o_proj(out.reshape(t, self.q_size))

    def _qkv_rope_merged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        """q and k are adjacent in ``qkv_proj``'s output: one RoPE call over their Hq + Hkv heads (the same
        elementwise ops as two calls, so the same values; with the step's widened ``tables``,
        ``ForwardContext.rope_tables``, in four ops, bit-equal); q and k made contiguous (no copy at one token)."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].reshape(t, self.num_kv_heads, self.head_dim)
        if tables is not None and decoder_rows_cpu.applies(qkv, *tables):  # eager CPU: one C++ call, bit-equal
            return (*decoder_rows_cpu.rope_qk(qkv, *tables, self.num_heads, self.num_kv_heads), v)
        qk = qkv[:, :self.q_size + self.kv_size].reshape(t, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rope(qk, cos, sin) if tables is None else apply_rope_full(qk, *tables)
        q, k = qk[:, :self.num_heads].contiguous(), qk[:, self.num_heads:].contiguous()
        return q, k, v

    def _qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The general path: q/k norms ("full" before the head split, "per_head" after), clipping, RoPE."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def hf_slots(self, prefix: str) -> dict[str, Slot]:
        slots = fused_slots(self.qkv_proj, prefix, ["q_proj", "k_proj", "v_proj"],
                            [self.q_size, self.kv_size, self.kv_size])
        slots.update(linear_slots(self.o_proj, prefix + "o_proj"))
        if self.qk_norm != "none":
            slots.update(self.q_norm.hf_slots(prefix + "q_norm"))
            slots.update(self.k_norm.hf_slots(prefix + "k_norm"))
        return slots

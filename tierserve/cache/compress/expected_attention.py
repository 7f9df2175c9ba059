"""Expected Attention (NVIDIA kvpress ``ExpectedAttentionPress``, arXiv 2510.00636) at block granularity.

Future queries are modelled as a Gaussian per query head, estimated from a
buffer of the sequence's recent attention inputs (the post-``input_layernorm``
hidden states, captured by a forward pre-hook on every attention module; the
first ``n_sink = 4`` positions are never buffered; the buffer holds the last
``buffer_size = 256`` positions per layer):

    q_j = pre-RoPE query of hidden state j (the layer's own q projection, q-norm, clip)
    mu = mean_j q_j,   Sigma = mean_j (q_j - mu)(q_j - mu)^T        (biased, as kvpress)
    R = mean_{t = n .. n+T-1} (cos_t I + sin_t P)                   (T = n_future = 512,
        n = the next position, P = rotate-half: P x = [-x2, x1])
    mu <- R mu,   Sigma <- R Sigma R^T

For post-RoPE keys k_i (i >= n_sink), with d = head_dim:

    z_i = s mu . k_i + s^2 k_i^T Sigma k_i / 2   = log E_q[exp(s q . k_i)]
    (s: the layer's attention scale, 1/sqrt(d) unless the model sets another)
    a_i = softmax_i(z),  averaged over the query heads of each KV head,
    s_i = a_i * ||v_i||,  sinks get max(s) + 1.

Each layer uses its own RoPE table for R (``model.layer_rope(i)`` where the
model has several, Gemma3's local and global; else ``model.rope``).

Block adaptation (one block table serves all layers): token scores are
averaged over KV heads and layers (only the full-attention layers when the
model has sliding-window ones: eviction never takes a token inside a window,
eviction.py, so a candidate's future attention on a sliding layer is 0); a block's score is its tokens' mean; the
lowest blocks go (never block 0 or the current block). Compression runs
after a prefill chunk that leaves the sequence over budget, and during decode
every ``interval`` steps (default: one block, so the cache stays within
budget + one block; kvpress's DecodingPress default is 512 steps -- set
``interval`` for that) down to the budget. Tests check the closed form
against a Monte-Carlo average of exp(q.k/sqrt(d)), the averaged rotation
against explicit per-position RoPE, and (when ``kvpress`` is importable) the
scores against ``ExpectedAttentionPress.score`` on SmolLM2.
"""

from __future__ import annotations

import math

import torch

from tierserve.cache.compress.base import SeqKV, register
from tierserve.cache.compress.eviction import BlockEvictionCompressor

N_SINK = 4
N_FUTURE = 512
BUFFER_SIZE = 256


def averaged_rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[T, D/2]`` cos/sin tables (rotate-half layout) -> ``[D, D]`` mean rotation matrix R."""
    half = cos.shape[-1]
    c, s = cos.double().mean(0), sin.double().mean(0)
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    r[idx, idx] = c
    r[idx + half, idx + half] = c
    r[idx, idx + half] = -s  # x1' = x1 cos - x2 sin
    r[idx + half, idx] = s   # x2' = x2 cos + x1 sin
    return r


def query_statistics(queries: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE queries ``[N, Hq, D]`` -> rotated mean ``[Hq, D]`` and covariance ``[Hq, D, D]``."""
    q = queries.double()
    hq, d = q.shape[1], q.shape[2]
    if q.shape[0] == 0:
        return torch.zeros(hq, d, dtype=torch.float64), torch.zeros(hq, d, d, dtype=torch.float64)
    mu = q.mean(0)
    centred = q - mu
    cov = torch.einsum("nhi,nhj->hij", centred, centred) / q.shape[0]
    return mu @ rot.T, rot @ cov @ rot.T


def log_expected_scores(mu: torch.Tensor, cov: torch.Tensor, keys: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """z ``[Hq, L]`` = s mu.k + s^2 k^T Sigma k / 2 for keys ``[L, Hkv, D]`` (GQA: head h uses h // G; s: the
    attention scale, default 1/sqrt(d))."""
    hq, d = mu.shape
    hkv = keys.shape[1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    k = keys.double().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, L, D]
    lin = torch.einsum("hd,hld->hl", mu, k) * s
    quad = ((k @ cov) * k).sum(-1) * (s * s / 2)
    return lin + quad


def expected_attention_scores(mu: torch.Tensor, cov: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              n_sink: int = N_SINK, scale: float | None = None) -> torch.Tensor:
    """kvpress's per-token scores ``[Hkv, L]``: softmax of z over non-sink keys, group mean, x ||v||."""
    hkv = keys.shape[1]
    z = log_expected_scores(mu, cov, keys[n_sink:], scale)
    a = torch.softmax(z, dim=-1)
    a = a.view(hkv, -1, a.shape[-1]).mean(1)
    s = a * values[n_sink:].double().norm(dim=-1).T
    sink = (s.max() + 1) if s.numel() else torch.tensor(1.0, dtype=s.dtype)
    return torch.cat([sink.expand(hkv, min(n_sink, keys.shape[0])), s], dim=-1)


def prerope_queries(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention layer's queries before RoPE, ``[N, Hq, D]`` (mirrors Attention.forward)."""
    q = attn.qkv_proj(x)[:, : attn.q_size]
    if attn.qk_norm == "full":
        q = attn.q_norm(q)
    if attn.clip is not None:
        q = q.clamp(-attn.clip, attn.clip)
    q = q.reshape(-1, attn.num_heads, attn.head_dim)
    if attn.qk_norm == "per_head":
        q = attn.q_norm(q)
    return q


@register
class ExpectedAttentionCompressor(BlockEvictionCompressor):
    name = "expected_attention"
    trigger = "interval"
    n_sink = N_SINK
    n_future = N_FUTURE
    buffer_size = BUFFER_SIZE

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self._step_inputs: list[torch.Tensor | None] = []
        self._buffers: dict[str, tuple[torch.Tensor, list[int]]] = {}  # [layers, buf, hidden], [written]
        self._hooks = []

    def bind(self, model, kv_caches) -> None:
        super().bind(model, kv_caches)
        if not (hasattr(model, "rope") or hasattr(model, "layer_rope")) or not hasattr(model, "layers"):
            raise ValueError(f"expected_attention needs a DecoderLM-style model (rope or layer_rope, layers); "
                             f"got {type(model).__name__}")
        self._attn = [layer.self_attn for layer in model.layers]
        self._ropes = [model.layer_rope(i) if hasattr(model, "layer_rope") else model.rope
                       for i in range(len(self._attn))]
        full = [i for i, a in enumerate(self._attn) if getattr(a, "sliding_window", None) is None]
        self.scored_layers = full or list(range(len(self._attn)))
        self._step_inputs = [None] * len(self._attn)
        for i, attn in enumerate(self._attn):
            self._hooks.append(attn.register_forward_pre_hook(self._capture(i)))

    def _capture(self, layer: int):
        def hook(module, args):
            self._step_inputs[layer] = args[0]
        return hook

    def after_step(self, sched) -> None:
        """Append each scheduled sequence's attention inputs (positions >= n_sink) to its ring buffer."""
        if self._step_inputs[0] is None:
            return
        spans, rows, row = [], [], 0
        for sr in sched.scheduled:
            hi = row + sr.num_tokens
            lo = max(row + max(0, self.n_sink - sr.start), hi - self.buffer_size)
            if lo < hi:
                spans.append((sr.request_id, len(rows), len(rows) + hi - lo))
                rows.extend(range(lo, hi))
            row = hi
        if rows:  # copy only the rows that are kept: O(buffer) per step, not O(prompt x layers)
            idx = torch.tensor(rows, dtype=torch.long, device=self._step_inputs[0].device)
            x_all = torch.stack([torch.index_select(x, 0, idx) for x in self._step_inputs])
            for rid, a, b in spans:
                self._append(rid, x_all[:, a:b])
        self._step_inputs = [None] * len(self._attn)

    def _append(self, request_id: str, x: torch.Tensor) -> None:
        entry = self._buffers.get(request_id)
        if entry is None:
            buf = torch.zeros(x.shape[0], self.buffer_size, x.shape[2], dtype=x.dtype, device=x.device)
            entry = self._buffers[request_id] = (buf, [0])
        buf, written = entry
        n = x.shape[1]
        idx = (torch.arange(written[0], written[0] + n) % self.buffer_size).to(x.device)
        buf.index_copy_(1, idx, x)
        written[0] += n

    def buffered_inputs(self, request_id: str) -> torch.Tensor:
        """``[layers, N, hidden]`` buffered attention inputs (ring order does not matter: mean/cov)."""
        buf, written = self._buffers[request_id]
        return buf[:, : min(written[0], self.buffer_size)]

    def future_rotation(self, layer: int, position: int) -> torch.Tensor:
        """R of layer ``layer``'s RoPE table over positions ``position .. position + n_future - 1``."""
        rope = self._ropes[layer]
        rope.ensure(position + self.n_future)
        return averaged_rope_matrix(rope.cos_table[position: position + self.n_future],
                                    rope.sin_table[position: position + self.n_future])

    def token_scores(self, seq: SeqKV) -> torch.Tensor:
        inputs = self.buffered_inputs(seq.request_id) if seq.request_id in self._buffers else None
        total = torch.zeros(seq.num_kept, dtype=torch.float64)
        rots: dict[int, torch.Tensor] = {}  # per RoPE table
        for layer in self.scored_layers:
            attn = self._attn[layer]
            rope_id = id(self._ropes[layer])
            if rope_id not in rots:
                rots[rope_id] = self.future_rotation(layer, seq.position)
            k, v = self.gather_layer(layer, seq)
            if inputs is None:
                q = torch.zeros(0, attn.num_heads, attn.head_dim)
            else:
                q = prerope_queries(attn, inputs[layer])
            mu, cov = query_statistics(q, rots[rope_id])
            total += expected_attention_scores(mu, cov, k, v, self.n_sink, getattr(attn, "scale", None)).mean(0)
        return total / len(self.scored_layers)

    def rank_blocks(self, seq: SeqKV, candidates: list[int]) -> list[int]:
        with torch.inference_mode():
            return self.rank_by_block_score(self.token_scores(seq), candidates)

    def release(self, request_id: str) -> None:
        super().release(request_id)
        self._buffers.pop(request_id, None)

"""XQuant-CL KV storage: each layer's input X as a low-bit delta to the previous layer's (arXiv 2508.10395).

XQuant caches the attention input X instead of K and V and rematerialises
both when attending. The residual stream changes little from one layer to
the next, so once normalised the inputs of successive layers are close:
XQuant-CL stores each layer's as a low-bit delta to the previous layer's
*reconstructed* input (error feedback: layer i's delta also carries the
rounding error of layers < i, so the error never accumulates). That holds
in the second half of the depth only (Layers, below): the first half of the
layers stores XQuant's 4-bit latent (xquant.py), the second half one delta
chain. Per token and delta layer i (``i0`` the chain's first, ``i-1`` the
delta layer before i), ``x_i`` the attention's (post-norm) input ``[hidden]``:

    u_i = x_i / s_i              s_i: the layer's input norm applied to a vector of ones (its per-channel
                                 gain; channels with |s| < 1e-6 use 1), so u_i is the normalised stream h_i/rms(h_i)
    d_i = u_i - u^_{i-1}         (u^_{i0-1} = 0: layer i0 stores u_i0 itself, at 4 bits)
    store Q_b(H (w_i * d_i))     symmetric b-bit codes in groups of g consecutive channels, one fp16 scale,
                                 after a block Hadamard rotation H of size g (spreads the residual stream's
                                 massive-activation channels, as kv4 does for keys) of the delta weighted by
                                 w_i,c = |row c of [W_k; W_v] diag(s_i)| (RMS 1, floor 0.3): an error in
                                 channel c moves K and V in proportion to w_i,c
    u^_i = u^_{i-1} + H deQ(.) / w_i
    read: x^_i = u^_i * s_i,  k~ = x^_i W_k^T + b_k,  v~ = x^_i W_v^T + b_v,
          (k, v) = the attention's own steps after its projection applied to (k~, v~): q/k norm, clipping
          (``key_value_steps``; none on Llama-like models: K and V affine in X),
          k = RoPE(k, stored positions, the layer's own table: xquant.py ``layer_ropes``)

(``s_i`` folded into the projection: ``[W_k; W_v] diag(s_i)``, read off the projection module's output on
the identity as in xquant.py, so packed weight formats work too.)

Codes: delta_pages.py (symmetric mid-rise, b bits in groups of g after a block Hadamard, bit-packed).
Bytes per token and delta layer: ``hidden * b / 8 + 2 * hidden / g`` (the chain's first layer: b = 4); per latent layer
xquant.py's ``2 * (d_kv / 2 + 4 * d_kv / 32)`` (kv4's at group 32); plus 4 bytes per token for its
position. ``latent_bits`` 0 keeps the deltas in fp32 and the latents in the KV dtype: lossless up to
rounding (logits equal plain KV within fp32 noise; tests).

Layers (``delta_layers``): layers ``0 .. L/2 - 1`` store XQuant's latent, layers ``L/2 .. L-1`` one delta
chain (``DELTA_FROM`` = 0.5; at least the last layer). The rule is fixed by the depth alone, so the page
size is known before the model is bound. Why: on Gemma-3-270m (18 layers) a layer's step, seen by its K
and V projection (``kv_step = |(u_i - u_(i-1)) A_i| / |u_i A_i|``, ``A_i = diag(s_i) [W_k; W_v]^T``;
benchmarks/kv_sensitivity.py ``--layer-errors``, 1 x 512 held-out tokens), is 0.62 .. 4.56 over layers
1-8 (2.63 and 4.56 at layers 1-2, 2.15 at 6) and 0.34 .. 0.79 over 9-17: in the first half a delta is
larger than what it encodes, and the 3-bit deltas gave K errors of 0.14 .. 0.69 (kv4: 0.07 .. 0.08).
Every layer a delta layer (this format before) was ppl +256% / KL 1.80 on Gemma (b 3, g 64, 4 x 512
tokens) while it met the target on SmolLM2. Measured on one Gemma window (1 x 512, KL vs plain KV; kv4
0.228, XQuant 0.041), b 3, g 64: deltas from layer 3: 0.656 (0.86x kv4's bytes); from 6: 0.133 (0.89x);
from 9 (this rule): 0.096 (0.92x); 12-16 only: 0.071 (0.96x); every layer 2.26 (0.83x); from 9 at b 2:
0.459 (0.81x), at b 3 g 32: 0.079 (0.95x). Tried and not kept (same window, from 9 at b 3 g 64 unless
said): deltas of the un-normalised stream h (read ``u^ = h^ / rms(h^)``; its ``kv_step`` is lower in the
first half, 0.59 .. 1.34): 0.111, from 6 0.145, from 3 0.411, every layer 0.419; channel weights with the
k norm's gain folded in (K and V rows each normalised by their Frobenius norm): 0.114; deltas in each
layer's XQuant latent basis (the previous layer's reconstruction projected into it, optimal scalar
prediction per layer; a teacher-forced simulation): K and V errors no lower than the latent coded
directly (mean K 0.100 vs 0.106, V 0.127 vs 0.091 at 4 bits; a latent step is >= 0.34 of the latent at
every layer).

Measured (benchmarks/kv_formats_quality.py, held-out windows of 512 tokens; ppl vs plain KV in the same
run; results kv_formats_quality_gemma_cl.json, kv_formats_quality_cl.json):

| model (windows)    | config           | ppl     | vs plain | KL     | B/token | x kv4 |
|--------------------|------------------|---------|----------|--------|---------|-------|
| Gemma-3-270m (4)   | none (fp32 KV)   | 121.503 |  +0.00%  | 0      | 36864   | 6.40  |
|                    | kv4              | 124.711 |  +2.64%  | 0.2895 |  5760   | 1.00  |
|                    | xquant           | 122.125 |  +0.51%  | 0.0550 |  5764   | 1.00  |
|                    | xquant_cl b3 g64 | 124.260 |  +2.27%  | 0.1235 |  5304   | 0.92  |
|                    | xquant_cl b3 g32 | 119.394 |  -1.74%  | 0.1019 |  5484   | 0.95  |
| SmolLM2-135M (8)   | none (fp32 KV)   |  52.003 |  +0.00%  | 0      | 46080   | 6.40  |
|                    | kv4              |  53.280 |  +2.46%  | 0.0345 |  7200   | 1.00  |
|                    | xquant           |  52.299 |  +0.57%  | 0.0115 |  7204   | 1.00  |
|                    | xquant_cl b3 g64 |  52.405 |  +0.77%  | 0.0104 |  7186   | 0.998 |

(2-core CPU shared, one thread; Gemma: copy bandwidth 4.1 GB/s, load average 3.3-3.6; SmolLM2: 1.8 GB/s,
3.7-3.9.) Below kv4's bytes at <= 5% perplexity on both models (b 3, g 64): Gemma at 0.92x, SmolLM2 at
0.998x (its latent layers cost kv4's 240 B, its delta layers 234 B: 14 B per token under kv4). Every layer
a delta layer, SmolLM2 measured +1.49% / KL 0.054 at 0.99x (hidden 576 is 1.5x K and V; b 2: +42% to
+65%). Without the rotation, 2-bit deltas gave first-token KL 2.5 on a test prompt; with it but without the
channel weights 0.50; with both 0.24.

Reading delta layer i needs ``u^_i``, the sum of the chain's deltas up to i. Within a step the attention
gathers in layer order with the same block table, so each delta layer's ``u^`` is kept for the next (keyed
by step and table; a miss, e.g. an eviction method reading one layer, sums the chain from its first
layer). Writes chain the same way through the step's tokens. Rematerialising costs a
``[N, hidden] x [hidden, 2 d_kv]`` matmul per delta layer over the N gathered tokens.

Models: any decoder whose attention layers take ``input_layernorm(h)`` and project it with one ``qkv_proj``
(every one in models/). The steps an attention applies between that projection and RoPE are repeated on the
rematerialised K and V in its order (models/attention.py ``_qkv_rope``): q/k norm over the whole
projection (OLMoE), clipping of K and V (OLMoE), per-head k norm (Qwen3, Gemma3), each by the layer's own
module, so K is exact without being affine in X (the channel weights w above remain those of the linear
part, a proxy for the normed key's sensitivity). RoPE tables per layer and sliding windows as in
xquant.py (Gemma3: local and global tables; the torch attention masks the window by position over all
pages). The torch attention backend only (the triton kernels read plain or kv4 pages; pages.py refuses
these).
"""

from __future__ import annotations

import torch

from tierserve.cache.compress.base import KVCompressor, register
from tierserve.cache.compress.delta_pages import DeltaPages
from tierserve.cache.compress import xquant as _xquant  # module, not names: xquant may be mid-import (it imports base)
from tierserve.errors import InvalidParameterError

CL_BITS = (0, 2, 3, 4)
BASE_BITS = 4  # the chain's first layer stores u itself, not a delta
IMPORTANCE_FLOOR = 0.3  # channel weights w_c below this (RMS 1) are raised to it
LATENT_GROUP = 32  # the latent layers' group (xquant.py's codec at kv4's group)
DELTA_FROM = 0.5  # deltas from this fraction of the depth on, XQuant latents before (module doc, Layers)


def delta_layers(num_layers: int) -> tuple[int, ...]:
    """The layers that store deltas: the last ``1 - DELTA_FROM`` of the depth (at least the last layer)."""
    return tuple(range(min(int(num_layers * DELTA_FROM), num_layers - 1), num_layers))


class _CLState:
    """Shared by every layer: the step counter, positions and attention inputs, and the running u^."""

    def __init__(self):
        self.step = 0
        self.positions: torch.Tensor | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.written: tuple[int, int, torch.Tensor] | None = None  # (step, layer, u^ at the step's slots)
        self.gathered: dict[tuple, tuple[int, torch.Tensor]] = {}  # table key -> (layer, u^ of its tokens)
        self.layers: list = []
        self.chain: list[int] = []  # the delta layers, ascending


class XQuantCLLayerKV:
    """One layer's delta pages (``LayerKV``'s ``write`` contract plus ``gather`` and ``parts``)."""

    def __init__(self, layer: int, pages: DeltaPages, heads: int, dim: int, dtype: torch.dtype,
                 positions: torch.Tensor, state: _CLState):
        self.layer, self.pages, self.heads, self.dim, self.dtype = layer, pages, heads, dim, dtype
        self.positions, self.state = positions, state  # positions [num_blocks, block_size] int32, shared
        self.prev: int | None = None  # the delta layer before this one in the chain (None: the chain's start)
        self.gain = self.proj = self.bias = self.rope = None
        self.steps = None  # the attention's steps between projection and RoPE (key_value_steps), None: none

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def parts(self) -> tuple[torch.Tensor, ...]:
        """Storage tensors, block-major: the delta codes and scales (or fp32 deltas), and, in layer 0 only,
        the positions (one tensor serves every layer)."""
        return self.pages.tensors + ((self.positions,) if self.layer == 0 else ())

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        st = self.state
        x = st.inputs.pop(self.layer, None)
        if self.proj is None or x is None:
            raise RuntimeError("xquant_cl pages written before the compressor was bound to the model")
        u = x.float().reshape(-1, self.pages.hidden) / self.gain
        if self.prev is None:
            prev = torch.zeros_like(u)
        elif st.written is not None and st.written[:2] == (st.step, self.prev):
            prev = st.written[2]
        else:
            raise RuntimeError(f"xquant_cl layer {self.layer} written before layer {self.prev} in this step")
        u_hat = prev + self.pages.write(slot_mapping, u - prev)
        st.written = (st.step, self.layer, u_hat)
        if self.layer == 0:
            self.positions.view(-1).index_copy_(0, slot_mapping, st.positions.to(torch.int32))

    def reconstruct(self, table: torch.Tensor) -> torch.Tensor:
        """u^ of this layer for the tokens of ``table``: the previous layer's (kept from this step) plus this
        layer's delta, or the sum from layer 0."""
        st = self.state
        key = (tuple(table.shape), tuple(table.reshape(-1).tolist()))
        hit = st.gathered.get(key)
        if self.prev is not None and hit is not None and hit[0] == self.prev:
            u_hat = hit[1] + self.pages.read(table)
        else:
            u_hat = sum(st.layers[j].pages.read(table) for j in st.chain if j <= self.layer)
        st.gathered[key] = (self.layer, u_hat)
        return u_hat

    def gather(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages of ``table [..., nb]`` rematerialised: keys and values ``[..., nb * bs, H, D]`` in the KV dtype."""
        kv = torch.addmm(self.bias, self.reconstruct(table), self.proj)
        k_pre, vals = kv.split(self.heads * self.dim, dim=-1)
        if self.steps is not None:
            k_pre, vals = self.steps(k_pre, vals)
        return _xquant.rematerialise(k_pre, vals, self.positions, table, self.rope, self.heads, self.dim, self.dtype)


def key_value_steps(attn, dtype: torch.dtype):
    """What ``attn`` does to K and V between its projection and RoPE (models/attention.py ``_qkv_rope``, in the
    same order, by the layer's own norm modules, in the model dtype), as ``(k [N, d_kv], v) -> (k, v)`` in fp32;
    None when it does nothing (no q/k norm, no clipping)."""
    norm, clip = getattr(attn, "qk_norm", "none"), getattr(attn, "clip", None)
    if norm == "none" and clip is None:
        return None
    heads, dim = attn.num_kv_heads, attn.head_dim

    def steps(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = k.to(dtype), v.to(dtype)
        if norm == "full":
            k = attn.k_norm(k)
        if clip is not None:
            k, v = k.clamp(-clip, clip), v.clamp(-clip, clip)
        if norm == "per_head":
            k = attn.k_norm(k.reshape(-1, heads, dim)).reshape(k.shape)
        return k.float(), v.float()
    return steps


@register
class XQuantCLCompressor(KVCompressor):
    name = "xquant_cl"
    evicts = False

    def __init__(self, config, spec):
        super().__init__(config, spec)
        hidden, g, bits = spec.hidden_size, config.group_size, config.latent_bits
        if hidden < 1:
            raise InvalidParameterError("kv_compression", "xquant_cl needs the model's hidden size "
                                                          "(KVSpec.hidden_size), got none")
        if bits not in CL_BITS:
            raise InvalidParameterError("kv_latent_bits", f"xquant_cl takes {CL_BITS[1:]} bits per delta or 0 "
                                                          f"(unquantized), got {bits}")
        if bits and hidden % g:
            raise InvalidParameterError("kv_group_size", f"xquant_cl needs the hidden size {hidden} divisible "
                                                         f"by the group size {g}")
        self.delta_layers = delta_layers(spec.num_layers)
        d_kv = spec.num_kv_heads * spec.head_dim
        if bits and self.delta_layers[0] > 0 and d_kv % LATENT_GROUP:
            raise InvalidParameterError("kv_compression", f"xquant_cl's latent layers need the KV width {d_kv} "
                                                          f"divisible by {LATENT_GROUP}")
        self.state = _CLState()
        self.capture = _xquant._StepCapture()  # the latent layers' RoPE angles and positions
        self._hooks: list = []

    def layer_bits(self, layer: int) -> int:
        """Bits per stored value of a delta layer (the chain's first layer stores u itself at BASE_BITS)."""
        bits = self.config.latent_bits
        return BASE_BITS if bits and layer == self.delta_layers[0] else bits

    def layer_token_bytes(self, layer: int) -> int:
        hidden, bits, g = self.spec.hidden_size, self.layer_bits(layer), self.config.group_size
        if layer not in self.delta_layers:
            return self._latent_bytes()
        return hidden * bits // 8 + 2 * (hidden // g) if bits else 4 * hidden

    def _latent_bytes(self) -> int:
        d_kv = self.spec.num_kv_heads * self.spec.head_dim
        if self.config.latent_bits:
            return 2 * (d_kv // 2 + 2 * 2 * (d_kv // LATENT_GROUP))
        return 2 * d_kv * torch.empty(0, dtype=getattr(torch, self.spec.dtype)).element_size()

    def page_size_bytes(self) -> int:
        s = self.spec
        return s.block_size * (sum(self.layer_token_bytes(i) for i in range(s.num_layers)) + 4)

    def allocate_cache(self, num_blocks: int, device="cpu") -> list:
        s = self.spec
        positions = torch.zeros(num_blocks, s.block_size, dtype=torch.int32, device=device)
        dtype, layers, prev = getattr(torch, s.dtype), [], None
        for i in range(s.num_layers):
            if i in self.delta_layers:
                kv = XQuantCLLayerKV(i, DeltaPages(num_blocks, s.block_size, s.hidden_size, self.layer_bits(i),
                                                   self.config.group_size, device),
                                     s.num_kv_heads, s.head_dim, dtype, positions, self.state)
                kv.prev, prev = prev, i
            else:
                kv = _xquant.XQuantLayerKV(i, num_blocks, s.block_size, s.num_kv_heads, s.head_dim, LATENT_GROUP,
                                           4 if self.config.latent_bits else 0, dtype, positions, device)
            layers.append(kv)
        self.state.layers, self.state.chain = layers, list(self.delta_layers)
        return layers

    def bind(self, model: torch.nn.Module, kv_caches: list) -> None:
        super().bind(model, kv_caches)
        ropes = _xquant.layer_ropes(model, self.name)
        hidden, dtype = model.cfg.hidden_size, getattr(model, "dtype", torch.float32)
        for i, (layer, kv) in enumerate(zip(model.layers, kv_caches)):
            attn = layer.self_attn
            if not isinstance(kv, XQuantCLLayerKV):
                _, wk, wv = _xquant.projection_weights(attn.qkv_proj, hidden, dtype, kv.device).split(
                    [attn.q_size, attn.kv_size, attn.kv_size], dim=0)
                kv.basis_k = _xquant.projection_basis(_xquant.key_gain(attn, dtype, kv.device)[:, None] * wk)
                kv.basis_v = _xquant.projection_basis(wv)
                kv.rope, kv.capture = ropes[i], self.capture
                self._hooks.append(attn.register_forward_pre_hook(self._capture_rope(i)))
                continue
            kv.gain = self._gain(layer, hidden, dtype, kv.device)
            w = _xquant.projection_weights(attn.qkv_proj, hidden, dtype, kv.device)[attn.q_size:]
            with torch.no_grad():
                bias = attn.qkv_proj(torch.zeros(1, hidden, dtype=dtype, device=kv.device)).float()[0]
            kv.proj = (w * kv.gain).T.contiguous()
            importance = kv.proj.norm(dim=1)  # how much an error in channel c moves K and V
            kv.pages.weight = (importance / importance.pow(2).mean().sqrt()).clamp(min=IMPORTANCE_FLOOR)
            kv.bias = bias[attn.q_size:].contiguous()
            kv.rope, kv.steps = ropes[i], key_value_steps(attn, dtype)
            self._hooks.append(attn.register_forward_pre_hook(self._capture_input(i)))
        self._hooks.append(model.register_forward_pre_hook(self._new_step))

    def _capture_rope(self, layer: int):
        def hook(module, args) -> None:
            self.capture.rope[layer] = (args[1], args[2])
        return hook

    @staticmethod
    def _gain(layer, hidden: int, dtype: torch.dtype, device) -> torch.Tensor:
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            return torch.ones(hidden, device=device)
        with torch.no_grad():
            gain = norm(torch.ones(1, hidden, dtype=dtype, device=device)).float()[0]
        return torch.where(gain.abs() < 1e-6, torch.ones_like(gain), gain)

    def _new_step(self, module, args) -> None:
        st = self.state
        st.step += 1
        st.positions = self.capture.positions = args[1]
        st.inputs.clear()
        st.gathered.clear()
        st.written = None

    def _capture_input(self, layer: int):
        def hook(module, args) -> None:
            self.state.inputs[layer] = args[0]
        return hook

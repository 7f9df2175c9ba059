"""Paged attention over a block-table KV cache (torch reference, CPU path).

Inputs are the step's flattened tokens: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``
(after RoPE). The new k/v are first written in place at ``slot_mapping``
(slot = block_id * block_size + offset); then each sequence attends over its
whole context, read through its block table:

    out_i = softmax(scale * q_i . K^T + mask) V,
    key j visible to query at position p  iff  j <= p  and  (window is None or j > p - window)

with optional tanh soft-capping ``cap * tanh(s / cap)`` of the scores (Gemma2
style). GQA: query head h uses KV head h // (Hq / Hkv).

Decode-only steps (every query length 1) run as one batched attention over
the gathered pages, padded to the longest context with a mask; other
sequences run one SDPA call each. On the CPU with float32 pages ``paged_attention``
(the torch backend) sends decode-only steps to a C++ kernel that reads the
pages in place (kernels/attention/paged_decode_cpu.py); ``paged_decode`` stays
the torch form it is tested against. Per step, the only work that grows with
context is reading the context's pages (attention itself): no cache tensor is
copied or reallocated and the block tables are built from block ids only.

Decode steps build their per-step inputs once, not per layer (memoised on the
metadata): the block ids of the padded width as one flat index (the layers'
page gathers read it directly), and the key mask. At batch 1 without a sliding
window or soft-capping there is no mask at all: the gathered keys are viewed cut
to the context length L, every one visible (within one float32 rounding of the
masked form, which sums the same keys in other blocks). Otherwise at batch 1 the mask
allocates nothing: key j is visible iff ``j < L`` (and ``j >= L - window``), which
is the slice ``steps[cap - L : cap - L + width]`` of a constant bool vector with
``steps[i] = (cap - window <= i < cap)`` (no window: ``i < cap``), kept per
(window, device) and regrown (doubling) when a width exceeds ``cap``; so a step
makes one slice and one view of it. Wider batches build ``[B, width]`` once per
step from the host lengths against a slice of a constant position vector. The
values are the same as a fresh ``arange < lens`` mask, so the attention output is
bit-equal (tests).

A cache object with a ``gather(table) -> (keys, values)`` method (packed
4-bit pages, tierserve/cache/compress/kv4.py) is read through it, so a
storage format dequantizes inside the gather; plain ``LayerKV`` pages are
indexed directly. One that also has ``gather_rotated(table)`` and
``query_rotation`` (an orthonormal ``[D, D]``; kv4's Hadamard) returns keys
in a rotated basis, and the queries are rotated instead: ``(q R) . k'`` for
``q . (k' R^T)``, one rotation per query instead of one per key.

Tree masks (speculative draft trees, engine/spec_decode/tree.py): with
``AttentionMetadata.tree_bits`` set, query row ``r`` of a sequence's block of
``n`` queries (positions ``L - n ..``) sees the keys before the block and, in
the block, key ``L - n + j`` iff bit ``j`` of ``tree_bits[row]`` is set; a row
whose bits are -1 (all set) is plain causal. So a draft tree verifies in one
forward with each node seeing its ancestors only (the key order inside the
block is the tree's flattened order; positions for RoPE come from the caller).
Not combined with a sliding window (refused: the window counts slots).

``paged_decode`` (decode-only steps) and ``paged_prefill`` (any mix of query
lengths) are the attend-only halves, same-named with the triton kernels in
``kernels/attention/paged_decode_triton.py`` and ``paged_prefill_triton.py``,
whose tests use them as the oracle. ``TorchAttention`` is this file as an
``AttentionBackend`` (``kernels/attention/base.py``); ``AttentionMetadata.backend``
holds the step's backend (default: this one) and the models call
``meta.backend.forward(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention import paged_decode_cpu
from tierserve.kernels.attention.base import AttentionBackend
from tierserve.kernels.kv_pages import LayerKV


class TorchAttention(AttentionBackend):
    """The torch reference as a backend: ``paged_attention`` below (gather + SDPA)."""

    name = "torch"

    def forward(self, q, k, v, kv, meta, scale, sliding_window=None, logit_softcap=None):
        return paged_attention(q, k, v, kv, meta, scale, sliding_window, logit_softcap)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    ``query_start`` (B+1 host ints) splits the flattened T tokens by sequence;
    ``seq_lens`` (B host ints) is each sequence's context length after this
    step; ``block_tables`` is ``[B, max_blocks]`` long (rows padded with 0).
    ``backend`` is the attention implementation the models call for this step
    (``kernels/attention/registry.py`` builds one by name; default the torch
    reference).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start: list[int]
    seq_lens: list[int]
    block_size: int
    backend: AttentionBackend = field(default_factory=TorchAttention)
    #: device copies of ``seq_lens`` / ``query_start`` (int32) a caller already holds, e.g. a CUDA graph's
    #: static buffers; None: built from the host lists on first use (``device_ints``)
    seq_lens_t: torch.Tensor | None = None
    query_start_t: torch.Tensor | None = None
    #: per query token, the mask of visible keys inside its sequence's query block (bit j: the block's key j;
    #: -1: causal); None: every sequence is causal (see the module docstring)
    tree_bits: list[int] | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def decode_only(self) -> bool:
        return self.query_start[-1] == len(self.seq_lens)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: str | torch.device = "cpu") -> "AttentionMetadata":
        """Build from host lists (tests and simple callers; the runner keeps persistent tables)."""
        starts = [0]
        slots: list[int] = []
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables):
            starts.append(starts[-1] + qlen)
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        bt = torch.zeros((len(block_tables), width), dtype=torch.long)
        for i, table in enumerate(block_tables):
            bt[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        return cls(torch.tensor(slots, dtype=torch.long, device=device), bt.to(device),
                   starts, list(seq_lens), block_size)

    def device_ints(self, name: str, device) -> torch.Tensor:
        """``query_start`` or ``seq_lens`` as an int32 tensor on ``device`` (memoised per step)."""
        given = getattr(self, f"{name}_t")
        if given is not None:
            return given
        key = (name, str(device))
        t = self._masks.get(key)
        if t is None:
            t = torch.tensor(getattr(self, name), dtype=torch.int32, device=device)
            self._masks[key] = t
        return t

    def tree_bits_t(self, device) -> torch.Tensor:
        """``tree_bits`` as an int64 tensor on ``device`` (memoised per step)."""
        key = ("tree_bits", str(device))
        t = self._masks.get(key)
        if t is None:
            t = torch.tensor(self.tree_bits, dtype=torch.int64, device=device)
            self._masks[key] = t
        return t

    def block_mask(self, i: int, device) -> torch.Tensor | None:
        """Sequence ``i``'s [n, n] bool mask inside its query block, or None when it is causal (memoised per step:
        every layer asks)."""
        if self.tree_bits is None:
            return None
        key = ("block_mask", i, str(device))
        if key not in self._masks:
            self._masks[key] = self._block_mask(i, device)
        return self._masks[key]

    def _block_mask(self, i: int, device) -> torch.Tensor | None:
        lo, hi = self.query_start[i], self.query_start[i + 1]
        bits = self.tree_bits[lo:hi]
        if all(b == -1 for b in bits):
            return None
        n = hi - lo
        if n > 63:
            raise ValueError(f"a tree query block holds at most 63 rows, got {n}")
        rows = torch.tensor(bits, dtype=torch.int64, device=device)[:, None]
        return ((rows >> torch.arange(n, device=device)[None, :]) & 1).bool()

    def decode_mask(self, width: int, sliding_window: int | None, device) -> torch.Tensor:
        """[B, 1, 1, width] bool: key j valid for sequence b (memoised per step; batch 1: a view of a constant
        vector, module docstring)."""
        key = (width, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            if len(self.seq_lens) == 1:
                mask = _visible_run(self.seq_lens[0], width, sliding_window, device)[None, None, None, :]
            else:
                lens = torch.tensor(self.seq_lens, dtype=torch.long, device=device)[:, None]
                pos = _positions(width, device)[None, :]
                mask = pos < lens
                if sliding_window is not None:
                    mask &= pos >= lens - sliding_window
                mask = mask[:, None, None, :]
            self._masks[key] = mask
        return mask

    def decode_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block tables cut to the step's padded width ``[B, nb]`` and the same ids flat ``[B * nb]`` (memoised
        per step: every layer gathers through them)."""
        got = self._masks.get("decode_table")
        if got is None:
            nb = -(-max(self.seq_lens) // self.block_size)
            table = self.block_tables if self.block_tables.shape[1] == nb else self.block_tables[:, :nb]
            got = self._masks["decode_table"] = (table, table.reshape(-1))
        return got


#: constant vectors behind the decode masks, per (window, device) and per device (module docstring)
_RUNS: dict[tuple[int | None, str], torch.Tensor] = {}
_POSITIONS: dict[str, torch.Tensor] = {}


def _capacity(n: int) -> int:
    return max(1024, 1 << (n - 1).bit_length())


def _visible_run(seq_len: int, width: int, window: int | None, device) -> torch.Tensor:
    """``[width]`` bool view: j < seq_len (and j >= seq_len - window), cut from a constant vector."""
    key = (window, str(device))
    run = _RUNS.get(key)
    cap = 0 if run is None else run.shape[0] // 2
    if cap < max(width, seq_len):
        cap = _capacity(max(width, seq_len))
        i = torch.arange(2 * cap, device=device)
        run = i < cap
        if window is not None:
            run &= i >= cap - window
        _RUNS[key] = run
    return run[cap - seq_len: cap - seq_len + width]


def _positions(width: int, device) -> torch.Tensor:
    """``arange(width)`` (long) as a view of a constant vector."""
    key = str(device)
    pos = _POSITIONS.get(key)
    if pos is None or pos.shape[0] < width:
        pos = _POSITIONS[key] = torch.arange(_capacity(width), device=device)
    return pos[:width]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    logit_softcap: float | None = None) -> torch.Tensor:
    """Write k/v into the pages, then attend. Returns ``[T, Hq, D]``."""
    kv.write(meta.slot_mapping, k, v)
    if meta.decode_only:
        if paged_decode_cpu.applies(q, kv):  # fp32 pages on the CPU: read in place by the C++ kernel
            return paged_decode_cpu.paged_decode(q, kv.k, kv.v, meta.decode_table()[0],
                                                 meta.device_ints("seq_lens", q.device), scale, sliding_window,
                                                 logit_softcap)
        return paged_decode(q, kv, meta, scale, sliding_window, logit_softcap)
    return paged_prefill(q, kv, meta, scale, sliding_window, logit_softcap)


def paged_decode(q: torch.Tensor, kv, meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                 logit_softcap: float | None = None) -> torch.Tensor:
    """Attend a decode-only step (one query per sequence, ``q [B, Hq, D]``) over the pages as written."""
    return _decode_batch(q, kv, meta, scale, sliding_window, logit_softcap)


def paged_prefill(q: torch.Tensor, kv, meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                  logit_softcap: float | None = None) -> torch.Tensor:
    """Attend any step (chunked prefill, prefix hits, decode rows) over the pages as written; one SDPA per sequence."""
    if meta.tree_bits is not None and sliding_window is not None:
        raise InvalidParameterError("sliding_window", "tree attention masks (draft trees) do not support "
                                                      f"sliding-window layers (window {sliding_window})")
    out = torch.empty_like(q)
    for i, seq_len in enumerate(meta.seq_lens):
        lo, hi = meta.query_start[i], meta.query_start[i + 1]
        out[lo:hi] = _prefill_one(q[lo:hi], kv, meta.block_tables[i], seq_len, meta.block_size,
                                  scale, sliding_window, logit_softcap, meta.block_mask(i, q.device))
    return out


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Pages of ``table`` (``[..., nb]``) as ``[..., nb * block_size, heads, dim]``."""
    # index_select on the flat id list: ~4x faster than advanced indexing on CPU
    pages = torch.index_select(cache, 0, table.reshape(-1))
    return pages.view(*table.shape[:-1], -1, *cache.shape[2:])


def _gather_kv(kv, table: torch.Tensor, q: torch.Tensor):
    """K and V pages of ``table`` (dequantized by the cache itself when it stores a packed format) and the
    queries ``q [..., D]`` in the keys' basis (rotated when the cache keeps its keys rotated)."""
    rotated = getattr(kv, "gather_rotated", None)
    if rotated is not None:
        keys, vals = rotated(table)
        return keys, vals, (q.float() @ kv.query_rotation).to(q.dtype)
    gather = getattr(kv, "gather", None)
    if gather is not None:
        return (*gather(table), q)
    return _gather(kv.k, table), _gather(kv.v, table), q


def _prefill_one(q, kv, table, seq_len, block_size, scale, window, softcap, block_mask=None):
    n = q.shape[0]
    nb = -(-seq_len // block_size)
    keys, vals, q = _gather_kv(kv, table[:nb], q)
    keys, vals = keys[:seq_len].transpose(0, 1), vals[:seq_len].transpose(0, 1)  # [Hkv, L, D]
    qh = q.transpose(0, 1)  # [Hq, n, D]
    start = seq_len - n
    if start == 0 and window is None and softcap is None and block_mask is None:
        out = F.scaled_dot_product_attention(qh[None], keys[None], vals[None], is_causal=True,
                                             scale=scale, enable_gqa=True)[0]
        return out.transpose(0, 1)
    qpos = torch.arange(start, seq_len, device=q.device)[:, None]
    kpos = torch.arange(seq_len, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    if block_mask is not None:
        mask[:, start:] &= block_mask
    return _attend(qh[None], keys[None], vals[None], mask[None, None], scale, softcap)[0].transpose(0, 1)


def _decode_batch(q, kv, meta, scale, window, softcap):
    table, flat = meta.decode_table()
    if getattr(kv, "gather", None) is not None:  # a packed page format dequantizes in its own gather
        keys, vals, q = _gather_kv(kv, table, q)
        keys, vals = keys.transpose(1, 2), vals.transpose(1, 2)  # [B, Hkv, L, D]
    else:  # _gather on the memoised flat ids, viewed as [B, Hkv, L, D] in one op
        b = table.shape[0]
        if b == 1 and window is None and softcap is None:  # every key up to L is visible: no mask at all
            length = meta.seq_lens[0]
            keys = _heads_first(torch.index_select(kv.k, 0, flat), 1, length)
            vals = _heads_first(torch.index_select(kv.v, 0, flat), 1, length)
            return F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, scale=scale,
                                                  enable_gqa=True).select(2, 0)
        keys = _heads_first(torch.index_select(kv.k, 0, flat), b)
        vals = _heads_first(torch.index_select(kv.v, 0, flat), b)
    mask = meta.decode_mask(keys.shape[2], window, q.device)
    out = _attend(q.unsqueeze(2), keys, vals, mask, scale, softcap)  # [B, Hq, 1, D]
    return out.select(2, 0)  # one view op each way (indexing with ':' and None dispatches 2-4)


def _heads_first(pages: torch.Tensor, b: int, length: int | None = None) -> torch.Tensor:
    """Gathered contiguous pages ``[B * nb, bs, H, D]`` as ``[B, H, nb * bs, D]``: the view
    ``view(B, -1, H, D).transpose(1, 2)`` in one as_strided; ``length``: only the first keys of each row."""
    n, bs, h, d = pages.shape
    width = n // b * bs
    return pages.as_strided((b, h, width if length is None else length, d), (width * h * d, d, h * d, 1))


def _attend(q, k, v, mask, scale, softcap):
    """q [B, Hq, n, D], k/v [B, Hkv, L, D], bool mask broadcastable to [B, Hq, n, L]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)

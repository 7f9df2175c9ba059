"""AttentionBackend: the contract every paged-attention implementation follows.

A backend is stateless (safe to share between layers, steps and threads) and
is picked by name through ``kernels/attention/registry.py``. The engine builds
one per model runner and puts it on every step's ``AttentionMetadata.backend``;
``models/attention.py`` calls ``meta.backend.forward(...)``, the single point
where the implementation is chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from tierserve.kernels.paged_attention import AttentionMetadata


class AttentionBackend(ABC):
    """Write a step's new K/V into the pages, then attend every query over its sequence's pages.

    Contract of ``forward(q, k, v, kv, meta, scale, sliding_window, logit_softcap)``:

    - ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``: the step's flattened tokens
      (after RoPE), split by sequence at ``meta.query_start``; ``Hq`` is a
      multiple of ``Hkv`` (query head ``h`` reads KV head ``h // (Hq / Hkv)``).
    - ``kv``: one layer's pages, either ``LayerKV`` (``k``/``v`` tensors
      ``[num_blocks, block_size, Hkv, D]``) or a packed cache (the kv4
      format of ``cache/compress/kv4.py``: ``write`` plus ``gather``).
      ``kv.write(meta.slot_mapping, k, v)`` is called first, so the step's
      own tokens are read back from the pages exactly as later steps see them.
    - Sequence ``b`` has ``q_len = query_start[b+1] - query_start[b]`` queries
      at positions ``[seq_lens[b] - q_len, seq_lens[b])``; query at position
      ``p`` sees key ``j`` iff ``j <= p`` and (``sliding_window`` is None or
      ``j > p - sliding_window``). Pages are found through
      ``meta.block_tables[b]`` (entries past the sequence's pages are ignored).
    - Scores are ``scale * q.k``, then ``cap * tanh(s / cap)`` when
      ``logit_softcap`` is set, then softmax over the visible keys.
    - Returns a new ``[T, Hq, D]`` tensor of ``q``'s dtype and device; inputs
      are not modified (except the pages, by the write).

    Implementations must agree with ``TorchAttention`` (the reference) within
    the tolerances stated in ``tests/test_paged_attention_triton.py``.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def forward(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", kv, meta: "AttentionMetadata",
                scale: float, sliding_window: int | None = None,
                logit_softcap: float | None = None) -> "torch.Tensor":
        """See the class docstring."""

"""TritonAttention: the paged-attention backend that runs the triton kernels.

``forward`` writes the step's K/V through the cache's own ``write`` (the same
call the torch reference makes), then runs ``paged_decode_triton`` when every
sequence has one query (decode-only step) and ``paged_prefill_triton``
otherwise (chunked prefill, prefix hits, mixed prefill + decode). On CUDA
tensors the kernels are compiled; on CPU tensors they run only under
``TRITON_INTERPRET=1`` (the test setting), otherwise triton refuses the CPU
pointers.
"""

from __future__ import annotations

from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention.base import AttentionBackend
from tierserve.kernels.attention.paged_decode_triton import paged_decode
from tierserve.kernels.attention.paged_prefill_triton import paged_prefill


class TritonAttention(AttentionBackend):
    """Triton kernels reading K/V pages in place (plain or kv4 int4) through the block table."""

    name = "triton"

    def forward(self, q, k, v, kv, meta, scale, sliding_window=None, logit_softcap=None):
        hq, hkv = q.shape[1], k.shape[1]
        if hq % hkv:
            raise InvalidParameterError("num_key_value_heads",
                                        f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
        kv.write(meta.slot_mapping, k, v)
        if meta.decode_only:
            return paged_decode(q, kv, meta, scale, sliding_window, logit_softcap)
        return paged_prefill(q, kv, meta, scale, sliding_window, logit_softcap)

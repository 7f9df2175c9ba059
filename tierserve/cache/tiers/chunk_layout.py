"""ChunkLayout: a chunk's payload bytes out of, and back into, the engine's KV pages, in any page format.

A page format lists one layer's storage as ``parts()``: block-major tensors
(dim 0 is the block) in a fixed order -- plain pages (kernels/kv_pages.py
``LayerKV``): K, V; kv4 pages (cache/compress/kv4.py ``PackedLayerKV``): K
codes, K scales, K mins, V codes, V scales, V mins. With ``row_bytes(p)`` the
bytes of one block of part ``p``, a chunk of ``chunk_blocks`` blocks is
stored as, for each layer in order and each of its parts in order, the rows
of the chunk's blocks, C order:

    payload = || over layers l, parts p of  p[blocks].bytes      (block_bytes = sum of row_bytes)
    payload_bytes = chunk_blocks * block_bytes

For plain pages that is exactly the ``[layers, 2, tokens, kv_heads,
head_dim]`` tensor of chunk.py; for kv4 it is the packed bytes as they sit in
the pages (SmolLM2: 115,200 bytes per block instead of 737,280 in fp32, 6.4x
fewer), so a hit copies packed bytes back without dequantizing and the
loaded pages equal, bit for bit, what computing the tokens again would
write. ``scatter`` copies a block range of a payload (a chunk partly covered
by the device prefix cache) into other blocks of the pages: blocks that form
at most ``MAX_RUNS`` runs of consecutive ids take one contiguous copy per run
and part (a kv4 part of a 16-block chunk is 3-24 KB: there ``index_copy_``'s
~30 us a call, 180 parts per SmolLM2 chunk, cost more than the bytes), other
block lists one ``index_copy_`` per part. Rows whose size is a multiple of 4
bytes are copied as int32 words: ``index_copy_`` of uint8 rows costs ~5x
that of the same bytes as int32 (57 vs 11 us for a kv4 code part).

GPU pages: ``gather_async`` assembles the chunk on the device on the compute stream
(``index_select`` + ``cat`` into a staging tensor: the step's pages are read in stream
order, and later kernels may overwrite them at once since only the staging tensor is
read afterwards), then moves it in ONE device-to-host copy into a pinned buffer on a
side stream that waits for the compute stream, and returns the buffer with the copy's
event without waiting (the asynchronous stores of connector.py; ``gather`` waits for
it). ``scatter`` copies host-to-device on the compute stream, without blocking the host
when the payload is pinned (the caching host allocator keeps a pinned buffer until its
copy has run), so a load is ordered before the step's forward on the same stream.
Byte-identical either way (tests/test_kv_tiers_cuda.py, tests/test_kv_tiers_async_cuda.py on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: ``scatter`` copies each run of consecutive blocks with one contiguous copy per part when the blocks make at
#: most this many runs (a fresh or lightly used cache), else one ``index_copy_`` per part.
MAX_RUNS = 4


class ChunkLayout:
    def __init__(self, kv_caches: Sequence, chunk_blocks: int):
        self.parts: list[torch.Tensor] = [p for layer in kv_caches for p in layer.parts()]
        num_blocks = {p.shape[0] for p in self.parts}
        if len(num_blocks) != 1 or not all(p.is_contiguous() for p in self.parts):
            raise ValueError(f"page parts must be contiguous and share their block count, got shapes "
                             f"{[tuple(p.shape) for p in self.parts]}")
        self.chunk_blocks = chunk_blocks
        self.row_bytes = [p[0].numel() * p.element_size() for p in self.parts]
        self.block_bytes = sum(self.row_bytes)
        self.payload_bytes = chunk_blocks * self.block_bytes
        # scatter's destinations, made once: each part as rows of 4-byte words where its rows allow (module doc)
        self._wide = [torch.int32 if rb % 4 == 0 else p.dtype for p, rb in zip(self.parts, self.row_bytes)]
        self._dst = [p.view(p.shape[0], -1).view(torch.uint8).view(w) for p, w in zip(self.parts, self._wide)]
        self._side = None  # CUDA pages: the stream of gather's device-to-host copies

    def gather(self, blocks: Sequence[int]) -> torch.Tensor:
        """The payload of the chunk made of pages ``blocks`` (``chunk_blocks`` of them): uint8, on the CPU."""
        payload, done = self.gather_async(blocks)
        if done is not None:
            done.synchronize()
        return payload

    def gather_async(self, blocks: Sequence[int]) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """``gather`` without waiting (module doc): the host payload and the event after which it is complete
        (None: complete now, CPU pages). Do not read the payload before the event completed."""
        if len(blocks) != self.chunk_blocks:
            raise ValueError(f"a chunk has {self.chunk_blocks} blocks, got {len(blocks)}")
        idx = torch.tensor(list(blocks), dtype=torch.long, device=self.parts[0].device)
        rows = [p.index_select(0, idx).reshape(-1).view(torch.uint8) for p in self.parts]
        if not idx.is_cuda:
            return torch.cat(rows), None
        if self._side is None:
            self._side = torch.cuda.Stream(idx.device)
        return _to_pinned(torch.cat(rows), self._side)

    def scatter(self, payload: torch.Tensor, first: int, blocks: Sequence[int]) -> None:
        """Copy blocks ``[first, first + len(blocks))`` of a chunk ``payload`` (uint8) into pages ``blocks``."""
        n = len(blocks)
        if payload.numel() != self.payload_bytes or not 0 <= first <= first + n <= self.chunk_blocks:
            raise ValueError(f"payload of {payload.numel()} bytes (expected {self.payload_bytes}), blocks "
                             f"[{first}, {first + n}) of a {self.chunk_blocks}-block chunk")
        device = self.parts[0].device
        runs = block_runs(blocks)
        idx = None if len(runs) <= MAX_RUNS else torch.tensor(list(blocks), dtype=torch.long, device=device)
        words = payload.view(torch.int32) if payload.storage_offset() % 4 == 0 == payload.numel() % 4 else None
        pinned = payload.is_pinned()
        offset = 0
        for dst, wide, rb in zip(self._dst, self._wide, self.row_bytes):
            lo, hi = offset + first * rb, offset + (first + n) * rb
            if wide == torch.int32 and words is not None:
                rows = words[lo // 4: hi // 4].view(n, -1)
            else:
                seg = payload[lo:hi]
                if seg.storage_offset() % wide.itemsize:  # a dtype view needs an aligned start
                    seg = seg.clone()
                rows = seg.view(wide).view(n, -1)
            if idx is None:  # a few runs of consecutive blocks: plain copies of contiguous rows
                for b, i, length in runs:
                    dst.narrow(0, b, length).copy_(rows.narrow(0, i, length), non_blocking=pinned)
            else:
                dst.index_copy_(0, idx, rows.to(device, non_blocking=pinned))
            offset += self.chunk_blocks * rb


def block_runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``blocks`` as runs of consecutive ids: ``(first block, index in blocks, length)`` each."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if runs and runs[-1][0] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((b, i, 1))
    return runs


def _to_pinned(staged: torch.Tensor, side) -> tuple[torch.Tensor, "torch.cuda.Event"]:
    """``staged`` (uint8, CUDA, written on the compute stream) copied into a pinned host buffer on stream
    ``side``; returns the buffer and the copy's event, not waited for (module doc)."""
    side.wait_stream(torch.cuda.current_stream(staged.device))
    host = torch.empty(staged.numel(), dtype=torch.uint8, pin_memory=True)
    with torch.cuda.stream(side):
        host.copy_(staged, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    staged.record_stream(side)  # allocated on the compute stream, read on the side stream
    return host, done

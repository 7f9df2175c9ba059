"""A step's inputs on the host: the general flattened form, and the preallocated decode buffers.

``StepInputs`` is any step flattened into lists (prefill chunks, decodes and
draft verification mixed; engine/model_runner.py builds it). A draft-tree step
(engine/spec_decode/tree_step.py) changes two things in it: ``positions`` of
its query rows become ``root + depth``, and ``tree_bits`` holds each token's
ancestor bits for ``AttentionMetadata.tree_bits`` (-1: causal); such a step
always runs eagerly.

``DecodeBuffers`` serves the common CPU step: decode only, one token per
sequence, every row sampling. Its token ids, positions and slots go into one
``[3, max_num_seqs]`` int64 tensor allocated once, and its block-table rows
``[:, :width]`` into one flat ``[max_num_seqs * max_blocks]`` int64 tensor,
both written through numpy views of their memory (plain stores: no
``torch.tensor`` from lists, no index or arithmetic ops on tensors; on this
host each of those costs 2-13 us of dispatch, and the general path issues
about 14 of them per step). The model gets views ``[:n]`` made once per batch
size (and per ``(n, width)`` for the table), so a step whose batch did not
change makes no tensor at all. Each slot is read from the block table's host
mirror (``table[row, pos // bs] * bs + pos % bs``, the same formula and the same
source as the general path), so a row rewritten by eviction or rollback is seen
at the next step. The views are overwritten by the next ``load``: callers use
them within the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    """One step flattened on the host: what the forward pass needs, before it goes to the device."""

    tokens: list[int]
    positions: list[int]
    slots: torch.Tensor          # [T] long, host
    rows: list[int]              # block-table row per sequence
    query_start: list[int]
    seq_lens: list[int]
    sample_idx: list[int]
    sample_ids: list[str]
    num_rows: list[int] | None = None  # logits rows per sampling sequence when some verify drafts
    tree_bits: list[int] | None = None  # per token: ancestor bits inside its query block (draft trees), -1 causal

    @property
    def decode_only(self) -> bool:
        return self.query_start[-1] == len(self.seq_lens)


class DecodeBuffers:
    """Preallocated host inputs of a decode-only step (see the module docstring)."""

    def __init__(self, max_num_seqs: int, host_table: torch.Tensor, block_size: int):
        if host_table.device.type != "cpu" or host_table.dtype != torch.long or not host_table.is_contiguous():
            raise ValueError("DecodeBuffers reads a contiguous int64 host block table")
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.ints = torch.zeros((3, max_num_seqs), dtype=torch.long)  # token ids, positions, slots
        self.tables = torch.zeros(host_table.numel(), dtype=torch.long)
        self._ints = self.ints.numpy()
        self._tables = self.tables.numpy()
        self._host = host_table.numpy()  # shares the block table's memory: always current
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._table_key: tuple[int, int] | None = None
        self._table_view: torch.Tensor | None = None

    def load(self, tokens: list[int], positions: list[int], slot_positions: list[int], rows: list[int],
             width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one decode step; views ``(token ids [n], positions [n], slots [n], block tables [n, width])``.

        ``slot_positions``: each row's KV index (its position less the tokens evicted before it)."""
        n = len(rows)
        if not 0 < n <= self.max_num_seqs:
            raise ValueError(f"a decode step of {n} rows, buffers hold 1..{self.max_num_seqs}")
        bs, host, ints = self.block_size, self._host, self._ints
        ints[0, :n] = tokens
        ints[1, :n] = positions
        ints[2, :n] = [int(host[r, p // bs]) * bs + p % bs for r, p in zip(rows, slot_positions)]
        table = self._tables[:n * width].reshape(n, width)
        if n == 1:
            table[0] = host[rows[0], :width]
        else:
            table[:] = host[rows, :width]
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = (self.ints[0, :n], self.ints[1, :n], self.ints[2, :n])
        if self._table_key != (n, width):
            self._table_key = (n, width)
            self._table_view = self.tables[:n * width].view(n, width)
        return (*views, self._table_view)

"""Persistent block tables: one row per live request, updated by diffs.

The runner keeps a ``[max_num_seqs, max_blocks_per_seq]`` int64 tensor
allocated once. A step writes only the blocks the scheduler appended
(``new_block_ids``), so per-step work is O(new blocks), never O(context);
a resumed or newly admitted request has its row rewritten from its block ids.
Rows are recycled through a free list (plain ints).

On a GPU the table lives twice: ``host`` (CPU, where the runner computes
slot mappings from host ints without a device sync) and ``table`` (on the
device, read by the attention kernels); every write goes to both, so the
device receives only the appended block ids. On the CPU both are one tensor.
"""

from __future__ import annotations

import torch


class BlockTables:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: str | torch.device = "cpu"):
        device = torch.device(device)
        self.host = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.long)
        self.table = self.host if device.type == "cpu" else torch.zeros_like(self.host, device=device)
        self.max_blocks_per_seq = max_blocks_per_seq
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._row_of: dict[str, int] = {}
        self._num_blocks: dict[str, int] = {}

    def row(self, request_id: str) -> int:
        return self._row_of[request_id]

    def num_blocks(self, request_id: str) -> int:
        return self._num_blocks[request_id]

    def reset(self, request_id: str, block_ids: list[int]) -> int:
        """(Re)write a request's whole row; allocates a row for a new request."""
        row = self._row_of.get(request_id)
        if row is None:
            if not self._free_rows:
                raise RuntimeError("BlockTables: more live requests than max_num_seqs rows")
            row = self._free_rows.pop()
            self._row_of[request_id] = row
        self._num_blocks[request_id] = 0
        self.append(request_id, block_ids)
        return row

    def append(self, request_id: str, new_block_ids: list[int] | tuple[int, ...]) -> None:
        if not new_block_ids:
            return
        row, n = self._row_of[request_id], self._num_blocks[request_id]
        end = n + len(new_block_ids)
        if end > self.max_blocks_per_seq:
            raise RuntimeError(
                f"request {request_id} needs {end} blocks, above max_blocks_per_seq={self.max_blocks_per_seq}")
        ids = torch.tensor(new_block_ids, dtype=torch.long)
        self.host[row, n:end] = ids
        if self.table is not self.host:
            self.table[row, n:end] = ids.to(self.table.device, non_blocking=True)
        self._num_blocks[request_id] = end

    def truncate(self, request_id: str, num_blocks: int) -> None:
        """Keep the first ``num_blocks`` blocks of a request's row (speculative rollback); later entries are
        stale and overwritten by the next append."""
        if not 0 <= num_blocks <= self._num_blocks[request_id]:
            raise ValueError(f"request {request_id} holds {self._num_blocks[request_id]} blocks, cannot keep "
                             f"{num_blocks}")
        self._num_blocks[request_id] = num_blocks

    def release(self, request_id: str) -> None:
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)
            self._num_blocks.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._row_of

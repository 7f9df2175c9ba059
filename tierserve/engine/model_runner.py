"""ModelRunner: turns a SchedulerOutput into one forward pass and the logits to sample.

Per step it flattens every scheduled request's tokens [start, start+n) into
one batch (continuous batching: decodes and prefill chunks together), derives
positions, the slot of each token (``table[row, pos // bs] * bs + pos % bs``)
and the step's block tables from persistent per-request rows, runs the model,
and computes logits only for the last token of requests that reach the end of
their known tokens (those sample). The KV pages are allocated once here and
never reallocated.

KV compression: ``kv_caches`` may come from a storage compressor (packed
4-bit pages), and ``evicted_tokens(request_id)`` (the KV cache manager's
count of tokens dropped by block eviction, default none) shifts a request's
*slots* and *sequence length* to count kept tokens, while positions (RoPE)
keep counting real tokens: slot index = position - evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierserve.kernels.kv_pages import LayerKV, allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec
from tierserve.engine.block_table import BlockTables
from tierserve.engine.request import Request
from tierserve.engine.scheduler import SchedulerOutput
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.context import ForwardContext


@dataclass
class RunnerOutput:
    """Logits ``[N, vocab]`` (fp32) for the N requests that sample, in ``request_ids`` order."""

    request_ids: list[str]
    logits: torch.Tensor | None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: KVSpec, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, device: str | torch.device = "cpu", kv_caches: list | None = None,
                 evicted_tokens: Callable[[str], int] | None = None):
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.kv_caches: list[LayerKV] = (kv_caches if kv_caches is not None
                                         else allocate_kv_cache(spec, num_blocks, self.device))
        self._evicted = evicted_tokens
        self.block_tables = BlockTables(max_num_seqs, spec.blocks_for_tokens(max_model_len), self.device)

    def release(self, request_id: str) -> None:
        self.block_tables.release(request_id)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        if not out.scheduled:
            return RunnerOutput([], None)
        tokens: list[int] = []
        positions: list[int] = []
        slot_pos: list[int] = []
        rows: list[int] = []
        token_rows: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_idx: list[int] = []
        sample_ids: list[str] = []
        for sr in out.scheduled:
            req = requests[sr.request_id]
            if sr.resumed or sr.request_id not in self.block_tables:
                row = self.block_tables.reset(sr.request_id, req.block_ids)
            else:
                row = self.block_tables.row(sr.request_id)
                self.block_tables.append(sr.request_id, sr.new_block_ids)
            end = sr.start + sr.num_tokens
            off = self._evicted(sr.request_id) if self._evicted is not None else 0
            tokens.extend(req.token_ids(sr.start, end))
            positions.extend(range(sr.start, end))
            slot_pos.extend(range(sr.start - off, end - off))
            token_rows.extend([row] * sr.num_tokens)
            rows.append(row)
            query_start.append(query_start[-1] + sr.num_tokens)
            seq_lens.append(end - off)
            if end == req.num_tokens:
                sample_idx.append(query_start[-1] - 1)
                sample_ids.append(sr.request_id)
        ctx = ForwardContext(self._metadata(slot_pos, token_rows, rows, query_start, seq_lens), self.kv_caches)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, ctx)
        if not sample_idx:
            return RunnerOutput([], None)
        if len(sample_idx) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_idx, dtype=torch.long, device=self.device)]
        return RunnerOutput(sample_ids, self.model.compute_logits(hidden))

    def _metadata(self, positions, token_rows, rows, query_start, seq_lens) -> AttentionMetadata:
        bs = self.spec.block_size
        table = self.block_tables.table
        pos = torch.tensor(positions, dtype=torch.long)
        trow = torch.tensor(token_rows, dtype=torch.long)
        slots = table[trow, pos // bs] * bs + pos % bs
        width = -(-max(seq_lens) // bs)
        step_tables = table[:, :width][torch.tensor(rows, dtype=torch.long)]
        return AttentionMetadata(slots.to(self.device), step_tables.to(self.device), query_start, seq_lens, bs)

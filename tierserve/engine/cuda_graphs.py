"""DecodeGraphs: decode steps captured as CUDA graphs per batch-size bucket and replayed (vLLM's scheme).

A decode step launches hundreds of small kernels; at batch 1 their launch
cost, not the GPU, sets the step time. A CUDA graph replays the whole forward
(and the logits) with one launch.

Buckets: 1, 2, 4, 8, then every multiple of 8 up to 32, then every multiple of
16, up to ``min(max_num_seqs, max_batch)`` (default 128). A decode-only step
of ``n`` sequences runs the smallest bucket ``B >= n``: its inputs are copied
into the graph's static buffers (token ids, positions, slots, block-table
rows gathered on the device, sequence lengths), rows ``n..B-1`` are padding
that reads and writes one reserved scratch page (``scratch_block``, a KV page
no request owns) with sequence length 1, and the first ``n`` rows of the
static logits are returned. Prefill and mixed steps, and decode batches above
the largest bucket, run eagerly.

Capture runs every bucket once eagerly (warm-up: triton compiles, RoPE tables
reach their full length), then captures it, largest first, in one shared
memory pool. The attention metadata inside a graph carries host
``seq_lens`` of ``max_model_len`` (so kernels size their grids for the
longest context; the true lengths come from the device buffer, and splits past
a sequence's end do no work).

Requirements checked at construction: a CUDA device; an attention backend
that reads sequence lengths from the device (``triton``); a model whose
forward has no host synchronisation (``CausalLMBase.supports_cuda_graphs``:
MoE routing sizes its expert batches on the host, so MoE and expert-offload
models get piecewise graphs instead, engine/piecewise_graphs.py). Outputs equal the eager path's and the CPU fp32 path's
(tests/test_engine_cuda.py, CUDA only); the bucket table is tested on CPU
(tests/test_device_config.py).
"""

from __future__ import annotations

import torch

from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.context import ForwardContext


def graph_buckets(max_num_seqs: int, max_batch: int = 128) -> list[int]:
    """The captured batch sizes, ascending (see the module docstring)."""
    top = min(max_num_seqs, max_batch)
    sizes = [b for b in (1, 2, 4) if b <= top]
    sizes += list(range(8, min(top, 32) + 1, 8)) + list(range(48, top + 1, 16))
    if top not in sizes:
        sizes.append(top)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model, kv_caches, attention, block_size: int, max_blocks_per_seq: int, max_model_len: int,
                 scratch_block: int, max_num_seqs: int, device: torch.device, max_batch: int = 128):
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.device = device
        self.buckets = graph_buckets(max_num_seqs, max_batch)
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slots = torch.full((top,), scratch_block * block_size, dtype=torch.long, device=device)
        self.tables = torch.full((top, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.pool = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def fits(self, batch: int) -> bool:
        return batch <= self.buckets[-1]

    def context(self, batch: int, host_seq_lens: list[int] | None = None) -> ForwardContext:
        """The static buffers' first ``batch`` rows as a step's context; host ``seq_lens`` default to
        ``max_model_len`` (a captured graph's grid, module doc)."""
        lens = host_seq_lens if host_seq_lens is not None else [self.max_model_len] * batch
        meta = AttentionMetadata(self.slots[:batch], self.tables[:batch], list(range(batch + 1)), lens,
                                 self.block_size, backend=self.attention, seq_lens_t=self.seq_lens[:batch],
                                 query_start_t=self.query_start[: batch + 1])
        return ForwardContext(meta, self.kv_caches)

    def _forward(self, batch: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self.context(batch))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket (largest first, one memory pool)."""
        for batch in self.buckets:
            self._forward(batch)
        torch.cuda.synchronize(self.device)
        for batch in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._logits[batch] = self._forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self._graphs[batch] = graph
        self._reset_padding_rows(0, self.buckets[-1])

    def run(self, step, device_table: torch.Tensor) -> torch.Tensor:
        """Replay the bucket of a decode-only step; logits ``[n, vocab]`` of its sampling rows."""
        n, batch = self.load(step, device_table)
        self._graphs[batch].replay()
        return self._logits[batch][:n].clone()  # every decode row samples; the buffer is the next replay's

    def load(self, step, device_table: torch.Tensor) -> tuple[int, int]:
        """Copy a decode-only step into the static buffers, padding rows reset; (its rows ``n``, its bucket)."""
        n = len(step.seq_lens)
        batch = next(b for b in self.buckets if b >= n)
        dev = self.device
        self.input_ids[:n].copy_(torch.tensor(step.tokens, dtype=torch.long), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(step.positions, dtype=torch.long), non_blocking=True)
        self.slots[:n].copy_(step.slots, non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor(step.seq_lens, dtype=torch.int32), non_blocking=True)
        rows = torch.tensor(step.rows, dtype=torch.long).to(dev, non_blocking=True)
        self.tables[:n].copy_(device_table.index_select(0, rows))
        if batch > n:
            self._reset_padding_rows(n, batch)
        return n, batch

    def _reset_padding_rows(self, lo: int, hi: int) -> None:
        """Rows ``lo..hi-1`` read and write only the scratch page, with one token of context."""
        self.slots[lo:hi].fill_(self.scratch_block * self.block_size)
        self.tables[lo:hi].fill_(self.scratch_block)
        self.seq_lens[lo:hi].fill_(1)

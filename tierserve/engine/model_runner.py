"""ModelRunner: turns a SchedulerOutput into one forward pass and the logits to sample.

Per step it flattens every scheduled request's tokens [start, start+n) into
one batch (continuous batching: decodes and prefill chunks together), derives
positions, the slot of each token (``table[row, pos // bs] * bs + pos % bs``)
and the step's block tables from persistent per-request rows, runs the model,
and computes logits only for the last token of requests that reach the end of
their known tokens (those sample). A request verifying speculative drafts
(``ScheduledRequest.spec_token_ids``) runs its last known token and the
drafts, and gets logits for all of them (``RunnerOutput.num_rows``); such a
step has more than one token per sequence, so it always runs eagerly. With
``keep_hidden`` (a proposer drafting from hidden states) every step runs
eagerly and also returns the final hidden state of every token
(``RunnerOutput.hidden``). The KV pages are allocated once here and never
reallocated.

Plain decode steps (CPU): a decode-only step where every request runs its
one next token, without drafts, from a live block-table row, and samples,
skips the lists: its inputs go straight into preallocated buffers
(engine/step_inputs.py ``DecodeBuffers``: numpy stores, views ``[:n]``, no
torch op before the model) and every row's logits are computed, with no
``sample_idx`` gather. The values, shapes and contiguity handed to the model
are those of the general path, so its outputs are bit-identical (tested
against it). Tree steps (spec_decode/tree_step.py) go through ``flatten`` and
``run`` with their ``StepInputs.tree_bits`` and depth positions.

Device: the model, the KV pages and the block tables live on ``device``;
the step's token ids, positions and slots are computed on the host from host
ints (the block tables keep a host mirror, engine/block_table.py) and sent as
one small tensor each; the device's block table receives only appended block
ids. Attention runs through ``attention`` (kernels/attention/registry.py:
"torch" reference or "triton" kernels), set on every step's metadata.

CUDA graphs (``install_decode_graphs``): a decode-only step of at most the
largest captured batch replays the graph captured for its bucket (a dense
model: one graph, engine/cuda_graphs.py), or the captured segments between its
eager MoE blocks (a MoE or expert-offload model: engine/piecewise_graphs.py);
prefill and mixed steps run eagerly.

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

from tierserve.engine.block_table import BlockTables
from tierserve.engine.cuda_graphs import DecodeGraphs
from tierserve.engine.piecewise_graphs import PiecewiseGraphs
from tierserve.engine.request import Request
from tierserve.engine.step_inputs import DecodeBuffers, StepInputs
from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention.base import AttentionBackend
from tierserve.kernels.kv_pages import LayerKV, allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec
from tierserve.kernels.paged_attention import AttentionMetadata, TorchAttention
from tierserve.models.context import ForwardContext
from tierserve.step.schedule import SchedulerOutput


@dataclass
class RunnerOutput:
    """Logits (fp32, on the runner's device) for the requests that sample, in ``request_ids`` order:
    one row each, or ``num_rows[i]`` consecutive rows for request ``i`` (1 + its verified drafts)."""

    request_ids: list[str]
    logits: torch.Tensor | None
    num_rows: list[int] | None = None
    hidden: torch.Tensor | None = None  # [T, H]: every token of the step, with ``keep_hidden``


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: KVSpec, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, device: str | torch.device = "cpu", kv_caches: list | None = None,
                 evicted_tokens: Callable[[str], int] | None = None, attention: AttentionBackend | None = None):
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.attention = attention or TorchAttention()
        self.kv_caches: list[LayerKV] = (kv_caches if kv_caches is not None
                                         else allocate_kv_cache(spec, num_blocks, self.device))
        self._evicted = evicted_tokens
        self.block_tables = BlockTables(max_num_seqs, spec.blocks_for_tokens(max_model_len), self.device)
        self.graphs = None  # DecodeGraphs or PiecewiseGraphs: install_decode_graphs
        self.keep_hidden = False  # set by the engine for a proposer that drafts from hidden states
        #: plain decode steps' inputs (CPU; None: every step goes through ``flatten``)
        self.decode_buffers = (DecodeBuffers(max_num_seqs, self.block_tables.host, spec.block_size)
                               if self.device.type == "cpu" else None)

    def install_decode_graphs(self, mode: str, scratch_block: int, max_num_seqs: int, max_model_len: int,
                              capture: bool = True) -> None:
        """Decode graphs of ``mode`` ("full" or "piecewise", ``decode_graph_mode``); ``scratch_block``: a KV page
        no request owns (the padding rows'); ``capture=False`` keeps the piecewise segments eager (CPU)."""
        kinds = {"full": DecodeGraphs, "piecewise": PiecewiseGraphs}
        if mode not in kinds:
            raise InvalidParameterError("mode", f"must be one of {sorted(kinds)}, got {mode!r}")
        if mode == "full" and not capture:
            raise InvalidParameterError("capture", "full decode graphs only replay captured graphs")
        graphs = kinds[mode](self.model, self.kv_caches, self.attention, self.spec.block_size,
                             self.block_tables.max_blocks_per_seq, max_model_len, scratch_block=scratch_block,
                             max_num_seqs=max_num_seqs, device=self.device)
        if capture:
            graphs.capture()
        self.graphs = graphs

    def release(self, request_id: str) -> None:
        self.block_tables.release(request_id)

    def truncate(self, request_id: str, num_blocks: int) -> None:
        """The request's block table keeps its first ``num_blocks`` blocks (speculative rollback)."""
        self.block_tables.truncate(request_id, num_blocks)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        if not out.scheduled:
            return RunnerOutput([], None)
        if self.decode_buffers is not None and self.graphs is None and self._plain_decode(out, requests):
            return self._run_decode(out, requests)
        return self.run(self.flatten(out, requests))

    @torch.inference_mode()
    def run(self, step: StepInputs) -> RunnerOutput:
        """The forward of a flattened step: a decode graph's replay when one fits, else eager (a step with
        ``tree_bits``, a draft tree's, always eager)."""
        graphs = self.graphs is not None and not self.keep_hidden and step.tree_bits is None
        if graphs and step.decode_only and self.graphs.fits(len(step.seq_lens)):
            logits = self.graphs.run(step, self.block_tables.table)
            return RunnerOutput(step.sample_ids, logits)
        return self._run_eager(step)

    def _row(self, sr, req: Request) -> int:
        """The request's block-table row, brought up to date with the step's new blocks."""
        if sr.resumed or sr.request_id not in self.block_tables:
            return self.block_tables.reset(sr.request_id, req.block_ids)
        self.block_tables.append(sr.request_id, sr.new_block_ids)
        return self.block_tables.row(sr.request_id)

    def _plain_decode(self, out: SchedulerOutput, requests: dict[str, Request]) -> bool:
        """Every scheduled request runs its one next token, without drafts, from a live row, and samples."""
        for sr in out.scheduled:
            if (sr.num_tokens != 1 or sr.spec_token_ids or sr.resumed or sr.request_id not in self.block_tables
                    or sr.start + 1 != requests[sr.request_id].num_tokens):
                return False
        return True

    def _run_decode(self, out: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        """A plain decode step through the preallocated buffers (step_inputs.py); the same forward as
        ``_run_eager`` on the same values."""
        tokens, positions, slot_pos, rows, seq_lens, ids = [], [], [], [], [], []
        for sr in out.scheduled:
            req = requests[sr.request_id]
            rows.append(self._row(sr, req))
            off = self._evicted(sr.request_id) if self._evicted is not None else 0
            tokens.append(req.token_ids(sr.start, sr.start + 1)[0])
            positions.append(sr.start)
            slot_pos.append(sr.start - off)
            seq_lens.append(sr.start + 1 - off)
            ids.append(sr.request_id)
        width = -(-max(seq_lens) // self.spec.block_size)
        input_ids, pos, slots, table = self.decode_buffers.load(tokens, positions, slot_pos, rows, width)
        meta = AttentionMetadata(slots, table, list(range(len(rows) + 1)), seq_lens, self.spec.block_size,
                                 backend=self.attention)
        hidden = self.model(input_ids, pos, ForwardContext(meta, self.kv_caches))
        return RunnerOutput(ids, self.model.compute_logits(hidden), None, hidden if self.keep_hidden else None)

    def flatten(self, out: SchedulerOutput, requests: dict[str, Request]) -> StepInputs:
        """The step as lists (any mix of prefill chunks, decodes and drafts); block-table rows updated."""
        tokens: list[int] = []
        positions: list[int] = []
        slot_pos: list[int] = []
        token_rows: list[int] = []
        rows: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_idx: list[int] = []
        sample_ids: list[str] = []
        num_rows: list[int] = []
        for sr in out.scheduled:
            req = requests[sr.request_id]
            row = self._row(sr, req)
            end = sr.start + sr.num_tokens
            off = self._evicted(sr.request_id) if self._evicted is not None else 0
            drafts = sr.spec_token_ids
            tokens.extend(req.token_ids(sr.start, end - len(drafts)))
            tokens.extend(drafts)
            positions.extend(range(sr.start, end))
            slot_pos.extend(range(sr.start - off, end - off))
            token_rows.extend([row] * sr.num_tokens)
            rows.append(row)
            query_start.append(query_start[-1] + sr.num_tokens)
            seq_lens.append(end - off)
            if end == req.num_tokens + len(drafts):  # the last known token and each draft predict one
                sample_idx.extend(range(query_start[-1] - 1 - len(drafts), query_start[-1]))
                sample_ids.append(sr.request_id)
                num_rows.append(1 + len(drafts))
        bs = self.spec.block_size
        pos = torch.tensor(slot_pos, dtype=torch.long)
        slots = self.block_tables.host[torch.tensor(token_rows, dtype=torch.long), pos // bs] * bs + pos % bs
        return StepInputs(tokens, positions, slots, rows, query_start, seq_lens, sample_idx, sample_ids,
                          num_rows if len(sample_idx) != len(sample_ids) else None)

    def _run_eager(self, step: StepInputs) -> RunnerOutput:
        dev = self.device
        width = -(-max(step.seq_lens) // self.spec.block_size)
        rows = torch.tensor(step.rows, dtype=torch.long, device=dev)
        meta = AttentionMetadata(step.slots.to(dev), self.block_tables.table[rows, :width], step.query_start,
                                 step.seq_lens, self.spec.block_size, backend=self.attention,
                                 tree_bits=step.tree_bits)
        input_ids = torch.tensor(step.tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(step.positions, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, pos, ForwardContext(meta, self.kv_caches))
        kept = hidden if self.keep_hidden else None
        if not step.sample_idx:
            return RunnerOutput([], None, hidden=kept)
        if len(step.sample_idx) != hidden.shape[0]:
            hidden = hidden[torch.tensor(step.sample_idx, dtype=torch.long, device=dev)]
        return RunnerOutput(step.sample_ids, self.model.compute_logits(hidden), step.num_rows, kept)

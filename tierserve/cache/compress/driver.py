"""EvictionDriver: applies an eviction compressor after every engine step (a StepHook).

It joins the step loop through the step-hook contract (tierserve/step/hooks.py):
``after_forward`` does the work below, ``on_release`` drops a finished or
aborted request's compressor state.

After the forward (the step's K/V are in the pages): let the compressor
observe the step (``after_step``), drop the state of preempted requests, then
for each sequence that ran build its ``SeqKV`` (kept tokens = computed tokens
minus ``KVCacheManager.num_evicted_tokens``), ask ``blocks_to_evict`` and, if
any, free those blocks through the KV cache manager (which shortens the
request's block table and counts the evicted tokens) and rewrite the
runner's block-table row (O(blocks), once per eviction; a decode step
evicts at most once per ``block_size`` steps).
"""

from __future__ import annotations

from collections.abc import Mapping

from tierserve.cache.compress.base import KVCompressor, SeqKV
from tierserve.step.hooks import StepHook
from tierserve.step.request_view import RequestView
from tierserve.step.schedule import SchedulerOutput


class EvictionDriver(StepHook):
    def __init__(self, compressor: KVCompressor, kv_manager, block_tables):
        if not compressor.evicts:
            raise ValueError(f"{compressor.name} does not evict blocks")
        self.compressor = compressor
        self.kv = kv_manager
        self.block_tables = block_tables
        self.num_evicted_blocks = 0

    def after_forward(self, sched: SchedulerOutput, requests: Mapping[str, RequestView]) -> None:
        self.compressor.after_step(sched)
        for rid in sched.preempted:
            self.compressor.release(rid)
        for sr in sched.scheduled:
            req = requests.get(sr.request_id)
            if req is None or not req.block_ids:
                continue
            position = req.num_computed_tokens
            seq = SeqKV(sr.request_id, req.block_ids, position - self.kv.num_evicted_tokens(sr.request_id),
                        position, req.num_prompt_tokens, sr.num_tokens)
            drop = self.compressor.blocks_to_evict(seq)
            if drop:
                self.kv.evict_blocks(req, drop)
                self.block_tables.reset(sr.request_id, req.block_ids)
                self.num_evicted_blocks += len(drop)

    def on_release(self, request_id: str) -> None:
        self.compressor.release(request_id)

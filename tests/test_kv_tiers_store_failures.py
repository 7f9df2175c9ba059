"""KV tier stores that fail are counted exactly, and the request's output is what an engine without tiers gives.

The real SmolLM2 with a disk tier only (chunks of 2 blocks = 32 tokens) and device prefix caching off. A
100-token prompt is prefilled in two steps (96 tokens, then 4), so its chunks are stored twice: when the
prompt finishes (3 whole chunks of the 100 computed tokens) and when the request finishes (3 whole chunks
of the 101 computed tokens: the same 3, still missing from the failed tier). Every store of a chunk fails,
so ``failures["disk"]`` rises by exactly 3 + 3 = 6, whatever the speed of the machine: the test waits for
each store's asynchronous writes to be counted before the next step, so no write is still in flight (and
skipped as a duplicate) when the next store of the same chunk comes. Two real failures:

* the disk folder is removed under the running tier (every file write raises; permission bits would not
  stop root), counted by the disk backend when LMCache's write fails on its event loop (and left out of
  ``bytes_stored``); the folder is then made again and the same chunks are stored and served from disk:
  nothing of the failed writes (a reserved size, an in-progress mark, a held buffer) blocks them;
* the LMCache buffer that stages every record is smaller than one record, so no record can be built
  (the connector counts one failure per chunk for the tier that lacked it);
* a Redis tier whose server is stopped (SIGSTOP) after it stored the prompt's chunks: the lookup's first
  call times out and opens the circuit breaker for ``redis_retry_s`` = 600 s, longer than the test, so
  every later lookup and store of the request skips Redis: exactly one failure for the whole request,
  no hit, and the output of an engine without tiers.

The reference is the same prompt on an engine without tiers, same configuration: the same forwards on the
same shapes, so logits are compared with ``torch.equal``. The counter reaches /metrics unchanged
(``render_prometheus`` of a snapshot carrying the connector's stats).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal

import pytest
import torch
from polling import wait_for

from test_kv_tiers import start_redis, stop_redis

from tierserve.cache.tiers.chunk import chunk_keys
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.sampling_params import SamplingParams

CHUNK_BLOCKS = 2
PROMPT_CHUNKS = 3  # 100 prompt tokens, 32-token chunks
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be on "
        "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
        "families, that he is considered the rightful property of some one or other of their daughters.")


def _config(smollm_folder: str):
    from tierserve.engine.llm import build_engine_config

    # two prefill forwards (96 tokens, then 4) whether the KV comes from a tier or is computed
    return build_engine_config(smollm_folder, num_blocks=128, enable_prefix_caching=False, max_num_seqs=4,
                               long_prefill_token_threshold=96)


def run(engine, ids: list[int], after_step=lambda req: None) -> tuple[torch.Tensor, list[int]]:
    """Step one greedy 2-token request to its end, calling ``after_step(request)`` after every step;
    the logits of its prompt and its tokens."""
    captured: list[torch.Tensor] = []
    orig = engine.runner.execute

    def execute(out, requests):
        result = orig(out, requests)
        if result.logits is not None and not captured:
            captured.append(result.logits[0].clone())
        return result

    engine.runner.execute = execute
    try:
        rid = engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0))
        req = engine.get_request(rid)
        while engine.has_unfinished():
            engine.step()
            after_step(req)
    finally:
        engine.runner.execute = orig
    return captured[0], list(req.output_token_ids)


@pytest.fixture(scope="module")
def reference(smollm_folder):
    """(prompt ids, logits, tokens) of an engine without tiers."""
    from tierserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(_config(smollm_folder))
    try:
        ids = engine.tokenize(TEXT + " " + TEXT)[:100]
        assert len(ids) == 100
        logits, tokens = run(engine, ids)
    finally:
        engine.close()
    return ids, logits, tokens


def _tier_engine(smollm_folder: str, disk_path: str, dram_gib: float):
    from tierserve.engine.llm_engine import LLMEngine

    tiers = KVTierConfig(tiers=("disk",), chunk_blocks=CHUNK_BLOCKS, dram_gib=dram_gib, disk_gib=0.05,
                         disk_path=disk_path)
    return LLMEngine(dataclasses.replace(_config(smollm_folder), kv_tiers=tiers))


def _failing_run(engine, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Run with every store failing; after each step wait until the stores it made are all counted, then
    check the count is exactly 3 chunks per store made so far (module doc)."""
    conn = engine.kv_tiers
    base = conn.stats().failures["disk"]

    def after_step(req) -> None:
        stores = (req.num_computed_tokens >= len(ids)) + req.status.finished
        want = base + PROMPT_CHUNKS * stores
        wait_for(lambda: conn.stats().failures["disk"] >= want, show=conn.stats)
        assert conn.stats().failures["disk"] == want

    return run(engine, ids, after_step)


def _metric(text: str, name: str, tier: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"tierserve:{name}{{") and f'tier="{tier}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for tier {tier} in /metrics")


def test_removed_disk_folder_counts_each_failed_write_then_recovers(smollm_folder, reference, tmp_path):
    from tierserve.server.metrics import MetricsSnapshot, render_prometheus

    ids, ref_logits, ref_tokens = reference
    disk = tmp_path / "kvdisk"
    engine = _tier_engine(smollm_folder, str(disk), dram_gib=0.05)
    conn = engine.kv_tiers
    try:
        shutil.rmtree(disk)  # every write of a chunk file now raises FileNotFoundError
        logits, tokens = _failing_run(engine, ids)
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
        stats = conn.stats()
        assert stats.failures["disk"] == 2 * PROMPT_CHUNKS and stats.hits["disk"] == 0
        assert stats.bytes_stored["disk"] == 0  # every accepted put was lost
        text = render_prometheus([MetricsSnapshot("m", kv_tiers=stats)]).decode()
        assert _metric(text, "kv_tier_failures_total", "disk") == 2 * PROMPT_CHUNKS

        disk.mkdir()  # the folder is back: the same chunks are written and then served
        logits, tokens = run(engine, ids)
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
        keys = chunk_keys(ids, conn.spec.block_size, conn.chunk_blocks)
        wait_for(lambda: all(conn.backend("disk").contains(k) for k in keys), show=conn.stats)
        logits, tokens = run(engine, ids)
        after = conn.stats()
        assert after.hits["disk"] == PROMPT_CHUNKS and after.failures["disk"] == 2 * PROMPT_CHUNKS
        assert after.bytes_stored["disk"] == PROMPT_CHUNKS * conn.payload_bytes
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    finally:
        engine.close()


def test_no_buffer_for_a_record_counts_each_chunk(smollm_folder, reference, tmp_path):
    ids, ref_logits, ref_tokens = reference
    # SmolLM2's record: 30 layers x K,V x 32 tokens x 3 heads x 64 x 4 B = 1.47 MB; the buffer holds half
    engine = _tier_engine(smollm_folder, str(tmp_path / "kvdisk"), dram_gib=0.7e6 / 2**30)
    try:
        assert engine.kv_tiers.payload_bytes == 30 * 2 * 32 * 3 * 64 * 4
        logits, tokens = _failing_run(engine, ids)
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
        stats = engine.kv_tiers.stats()
        assert stats.failures["disk"] == 2 * PROMPT_CHUNKS and stats.bytes_stored["disk"] == 0
    finally:
        engine.close()


def test_stopped_redis_costs_one_failure_per_breaker_period(smollm_folder, reference):
    from tierserve.engine.llm_engine import LLMEngine

    ids, ref_logits, ref_tokens = reference
    proc, url = start_redis()
    engine = None
    try:
        tiers = KVTierConfig(tiers=("redis",), chunk_blocks=CHUNK_BLOCKS, redis_url=url, redis_timeout_s=0.5,
                             redis_retry_s=600.0)
        engine = LLMEngine(dataclasses.replace(_config(smollm_folder), kv_tiers=tiers))
        conn = engine.kv_tiers
        logits, tokens = run(engine, ids)  # stores the 3 chunks in Redis
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
        keys = chunk_keys(ids, conn.spec.block_size, conn.chunk_blocks)
        wait_for(lambda: all(conn.backend("redis").contains(k) for k in keys), show=conn.stats)
        assert conn.stats().failures["redis"] == 0

        proc.send_signal(signal.SIGSTOP)  # every call now times out
        logits, tokens = run(engine, ids)
        stats = conn.stats()
        assert stats.failures["redis"] == 1 and stats.hits["redis"] == 0
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    finally:
        if engine is not None:
            engine.close()
        stop_redis(proc)

"""Expert offload at run time: promotions, usage files and metrics, the engine path, a hung host.

Own ``ray.cluster_utils.Cluster`` (a head without the resource + 2 nodes with
``{"expert_host": 1}``), started after tests/test_expert_offload.py shut its own
down and shut down at the end of this module (one Ray connection per process).
Every test starts its hosts and kills them (waiting for the process to exit) so the
next one finds both ``expert_host`` units free. Order matters only for speed.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

from model_harness import MOE_PROMPT, TINY_QWEN3_MOE, PagedRunner, tiny_moe_reference
from polling import pid_gone
from ray_fixtures import cluster  # noqa: F401  (the module-scoped 3-node cluster fixture)
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.loader import load_model
from tierserve.offload.placement import Placement, plan_placement
from tierserve.offload.spare_slots import CostModel
from tierserve.offload.usage import ExpertUsage, usage_path
from tierserve.offload.usage_hook import attach_usage_recorder

CONFIG, PROMPT = TINY_QWEN3_MOE, MOE_PROMPT
NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, all-resident reference model, its prefill logits, its greedy tokens, its usage)."""
    path = str(tmp_path_factory.mktemp("qwen3_moe"))
    ref, logits, tokens, _, usage = tiny_moe_reference(path, seed=11, new_tokens=NEW)
    return path, ref, logits, tokens, usage



def _start_hosts(n=2, **spec):
    """(RayHostLauncher, its transports by name) for ``n`` ExpertHost actors; ``spec``: HostSpec fields."""
    from tierserve.actors.ray_launcher import RayHostLauncher
    from tierserve.offload.launcher import HostSpec

    launcher = RayHostLauncher()
    return launcher, launcher.launch(n, HostSpec("auto", **spec))


def _kill_hosts(launcher, hosts, limit_s=60.0):
    pids = []
    for t in hosts.values():
        try:
            pids.append(t.stats(5.0).pid)
        except Exception:  # already dead (failed over)
            pass
    launcher.shutdown()
    t0 = time.monotonic()
    while not all(pid_gone(p) for p in pids):
        assert time.monotonic() - t0 < limit_s, "killed expert hosts still running"
        time.sleep(0.05)


def _offloaded(path, placement, hosts, dtype=torch.float32, **kw):
    from tierserve.offload.apply import apply_expert_offload

    model = load_model(path, dtype).model
    handle = apply_expert_offload(model, placement, hosts, model_path=path, linear_backend="auto", **kw)
    apply_linear_backend(model, "auto")
    return model, handle


def test_engine_offload_usage_file_promotions_and_metrics(cluster, tiny, smollm_folder, tmp_path):
    """LLMEngine with OffloadConfig: placement from the usage file beside the model, greedy output equal to
    the all-resident engine across promotions, usage saved back on close, expert metrics rendered."""
    from tierserve.actors.ray_launcher import RayHostLauncher
    from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig
    from tierserve.engine.llm_engine import LLMEngine
    from tierserve.sampling_params import SamplingParams
    from tierserve.server.metrics import MetricsSnapshot, render_prometheus

    src = tiny[0]
    folder = str(tmp_path / "model")
    shutil.copytree(src, folder)
    file_counts = [[5, 0, 9, 1, 0, 3, 0, 7], [0, 2, 0, 8, 6, 0, 4, 1]]
    ExpertUsage.from_json({"version": 1, "num_layers": 2, "num_experts": 8, "counts": file_counts}).save(
        usage_path(folder))
    model_cfg = ModelConfig(model=folder, tokenizer=smollm_folder)
    sched = SchedulerConfig(max_num_seqs=4)
    cache = CacheConfig(num_blocks=64)
    prompts = [(PROMPT, 6), (PROMPT[::-1], 14), (PROMPT[3:], 10)]

    def run(engine):
        outs = {}
        for i, (p, n) in enumerate(prompts):
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), f"r{i}")
        while engine.has_unfinished():
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        return outs

    ref_engine = LLMEngine(EngineConfig(model=model_cfg, scheduler=sched, cache=cache))
    ref_usage = ExpertUsage(2, 8)
    attach_usage_recorder(ref_engine.model, ref_usage)
    expected = run(ref_engine)
    del ref_engine

    cfg = OffloadConfig(resident_experts=6, expert_hosts=2, per_layer_floor=1, timeout_s=20.0,
                        promotion_min_gain=1, promotion_max_swaps=2, spare_slots=2)
    engine = LLMEngine(EngineConfig(model=model_cfg, scheduler=sched, cache=cache, offload=cfg),
                       host_launcher=RayHostLauncher())
    handle = engine.offload
    try:
        # spare slots configured: the engine measured the ring's cost model on the live path, one for all blocks
        cost = handle.blocks[0].cost
        assert cost != CostModel() and all(b.cost is cost for b in handle.blocks)
        assert 0 < cost.rtt_s < cfg.timeout_s and cost.bandwidth_Bps > 0
        start = plan_placement(file_counts, 6, 1)
        # by hand: floors 2 (9) | 3 (8); then 7 (7), 4 (6), 0 (5), 6 (4)
        assert start.resident == ((0, 2, 7), (3, 4, 6))
        assert handle.placement == start
        assert [sorted(map(int, b.experts)) for b in handle.blocks] == [list(r) for r in start.resident]
        assert run(engine) == expected
        assert handle.promotions > 0  # the live traffic disagrees with the file's ranking
        assert [sorted(map(int, b.experts)) for b in handle.blocks] == [list(r) for r in handle.placement.resident]
        metrics = handle.stats()
        assert metrics.tokens == ref_usage.as_metrics()
        assert (metrics.resident, metrics.offloaded, metrics.promotions) == (6, 10, handle.promotions)
    finally:
        engine.close()
    saved = ExpertUsage.load(usage_path(folder))
    assert saved.counts == [[f + r for f, r in zip(fr, rr)] for fr, rr in zip(file_counts, ref_usage.counts)]
    # two replicas' snapshots, summed by the board's renderer
    text = render_prometheus([MetricsSnapshot("m", experts=metrics), MetricsSnapshot("m", experts=metrics)]).decode()
    assert _samples(text, "tierserve:expert_tokens_total") == {
        (("expert", str(e)), ("layer", str(j)), ("model_name", "m")): 2.0 * c
        for (j, e), c in ref_usage.as_metrics().items()}
    assert _samples(text, "tierserve:experts_resident") == {(("model_name", "m"),): 12.0}
    assert _samples(text, "tierserve:experts_offloaded") == {(("model_name", "m"),): 20.0}
    assert _samples(text, "tierserve:expert_promotions_total") == {(("model_name", "m"),): 2.0 * handle.promotions}


def _samples(text: str, name: str) -> dict:
    """Prometheus text -> {sorted label pairs: value} for the samples of ``name``."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            pairs = tuple(sorted((k, v.strip('"')) for k, v in (p.split("=", 1) for p in labels.split(","))))
            out[pairs] = float(value)
    return out


def test_promotion_swaps_exactly_and_stays_bit_identical(cluster, tiny):
    """Hand-built counts decide the swaps whatever the live traffic adds (70 per layer and run, 2 runs)."""

    path, _, ref_logits, ref_tokens, ref_usage = tiny
    assert [sum(row) for row in ref_usage.counts] == [70, 70]  # (12 + 12 + 11 tokens) x top-2: bound used below
    placement = Placement(((0, 1, 2, 3), (0, 1, 2, 3)), (8, 8))
    base = [[300, 200, 100, 0, 0, 900, 0, 0],      # (5 for 3): gain 900 +- 56
            [700, 600, 800, 900, 0, 0, 2000, 1400]]  # (6 for 1): ~1400, (7 for 0): 700 +- 140
    launcher, hosts = _start_hosts()
    try:
        model, handle = _offloaded(path, placement, hosts, counts=base)
        handle.min_gain, handle.max_swaps = 500, 2
        assert set(handle.pool.standby) == {(j, e) for j in range(2) for e in range(4)}
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        swaps = handle.at_request_boundary()
        assert [(s.layer, s.promote, s.evict) for s in swaps] == [(1, 6, 1), (0, 5, 3)]
        assert handle.placement.resident == ((0, 1, 2, 5), (0, 2, 3, 6))
        assert sorted(map(int, handle.blocks[0].experts)) == [0, 1, 2, 5]
        assert (0, 5) not in handle.pool.owners and handle.pool.standby[(0, 5)] in hosts
        assert handle.pool.owners[(0, 3)] in hosts and (0, 3) not in handle.pool.standby
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        swaps = handle.at_request_boundary()  # the third candidate, then nothing is worth it
        assert [(s.layer, s.promote, s.evict) for s in swaps] == [(1, 7, 0)]
        assert handle.at_request_boundary() == []
        assert handle.promotions == 3
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert not handle.pool.stats.failures
        handle.close()
    finally:
        _kill_hosts(launcher, hosts)


@pytest.mark.parametrize("channel", ["socket", "ray"])
def test_hung_host_is_failed_over(cluster, tiny, channel):
    """A host stopped with SIGSTOP never answers: after timeout_s it is treated as dead, its experts
    are reloaded on the survivor and the output is identical (no hang), over either channel."""
    path, _, ref_logits, ref_tokens, _ = tiny
    placement = plan_placement([[0] * 8, [0] * 8], 6, 1)
    # timeout_s is the only wall-clock bound here: generous, so that the live host answers within it even on a
    # starved machine (at 2 s a loaded 2-core run saw host0 time out too)
    launcher, hosts = _start_hosts(channel=channel, timeout_s=10.0)
    pid = hosts["host1"].stats().pid
    try:
        model, handle = _offloaded(path, placement, hosts, timeout_s=10.0)
        assert handle.shards["host1"]
        os.kill(pid, signal.SIGSTOP)
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        # no hang, whatever the machine's speed: exactly one failed call (one timeout_s), then host1 is dropped
        assert [f.split(":")[0] for f in handle.pool.stats.failures] == ["host1"]
        assert handle.pool.alive == {"host0"}
        assert set(handle.pool.owners.values()) == {"host0"} and set(handle.pool.owners) == set(placement.cold_keys())
        assert set(handle.pool.standby.values()) == {"host0"}
        handle.close()
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        _kill_hosts(launcher, hosts)


def test_dfloat11_hosts_are_bit_identical_and_smaller(cluster, tiny):
    """bf16 experts held DFloat11-coded on the hosts: same logits/tokens as bf16 all-resident, fewer bytes,
    and a promotion copies the decoded (bit-identical) weights."""

    path = tiny[0]
    ref = load_model(path, torch.bfloat16).model
    apply_linear_backend(ref, "auto")
    ref_logits, ref_tokens = PagedRunner(ref).step(PROMPT), PagedRunner(ref).greedy(PROMPT, NEW)
    placement = Placement(((0, 1, 2, 3), (0, 1, 2, 3)), (8, 8))
    base = [[0, 0, 0, 0, 0, 900, 0, 0], [0] * 8]
    launcher, hosts = _start_hosts(weight_format="dfloat11")
    try:
        model, handle = _offloaded(path, placement, hosts, torch.bfloat16, counts=base)
        assert next(model.parameters()).dtype == torch.bfloat16
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        handle.min_gain, handle.max_swaps = 500, 1
        assert [(s.layer, s.promote) for s in handle.at_request_boundary()] == [(0, 5)]
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        stats = [t.stats() for t in hosts.values()]
        raw = sum(s.raw_weight_bytes for s in stats)
        held = sum(s.weight_bytes for s in stats)
        assert raw == 16 * 3 * 48 * 64 * 2  # every expert of both layers, bf16: gate_up [96, 64] + down [64, 48]
        assert held < 0.85 * raw
        print(f"DFloat11 expert hosts: {held} bytes at rest vs {raw} bf16 ({held / raw:.3f})")
        handle.close()
    finally:
        _kill_hosts(launcher, hosts)


def test_dfloat11_transit_moves_coded_bytes(cluster, tiny):
    """dfloat11 hosts send experts CODED: spare-slot fills, a promotion and a failover reload move exactly
    the coded sizes (each expert encoded independently here), decoded bit-identically (logits equal to the
    bf16 all-resident model throughout)."""
    from tierserve.offload.apply import moe_blocks
    from tierserve.offload.expert_transit import CodedExpert
    from tierserve.offload.expert_weights import ExpertWeights

    path = tiny[0]
    ref = load_model(path, torch.bfloat16).model
    coded = {(j, e): CodedExpert.encode(ExpertWeights.from_module(b.experts[e], ref.cfg.hidden_act)).nbytes
             for j, (_, b) in enumerate(moe_blocks(ref)) for e in range(b.num_experts)}
    raw = 3 * 48 * 64 * 2  # gate_up [96, 64] + down [64, 48], bf16
    assert all(n < 0.85 * raw for n in coded.values())
    apply_linear_backend(ref, "auto")
    ref_logits, ref_tokens = PagedRunner(ref).step(PROMPT), PagedRunner(ref).greedy(PROMPT, NEW)
    placement = Placement(((0, 1, 2, 3), (0, 1, 2, 3)), (8, 8))
    launcher, hosts = _start_hosts(weight_format="dfloat11")
    try:
        # a ring as large as the cold set: nothing is evicted, so every fill is a distinct key still held
        model, handle = _offloaded(path, placement, hosts, torch.bfloat16, counts=[[0, 0, 0, 0, 0, 900, 0, 0],
                                                                                  [0] * 8], spare_slots=8)
        # fetch when 3+ rows hit a cold expert: remote = 1 + n, fetch = raw/bw + ~0 = 2.5
        cost = CostModel(rtt_s=1.0, bandwidth_Bps=raw / 2.5, remote_token_s=1.0, local_token_s=1e-9)
        for b in handle.blocks:
            b.cost = cost
        spare = handle.spare
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert spare.fills == len(spare.keys()) > 0
        assert spare.fill_bytes.count == spare.fills and spare.fill_bytes.raw == spare.fills * raw
        assert spare.fill_bytes.wire == sum(coded[k] for k in spare.keys())
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        # the cost model's probe goes through the same coded fetch; its constants obey what holds on any
        # machine: every timed part lies inside the call's own wall time T (one fetch of the raw expert
        # bytes, the 1-row round trip, and 63 extra rows remote and local), and each is positive
        t0 = time.perf_counter()
        measured = CostModel.measure(handle.pool, (1, 4), 1)
        wall = time.perf_counter() - t0
        assert measured.bandwidth_Bps * wall >= raw
        assert 0 < measured.rtt_s <= wall
        assert 0 < measured.remote_token_s <= wall / 63 and 0 < measured.local_token_s <= wall / 63

        handle.min_gain, handle.max_swaps = 500, 1
        assert [(s.layer, s.promote) for s in handle.at_request_boundary()] == [(0, 5)]
        moved = handle.pool.stats.promotion_bytes
        assert (moved.count, moved.wire, moved.raw) == (1, coded[(0, 5)], raw)
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)

        pool = handle.pool
        lost = sorted(k for k, h in [*pool.owners.items(), *pool.standby.items()] if h == "host1")
        assert lost
        pool.fail("host1", "test")  # the failover path wait() takes: kill, re-read from disk, reload
        reloaded = handle.pool.stats.reload_bytes
        assert (reloaded.count, reloaded.wire, reloaded.raw) == (len(lost), sum(coded[k] for k in lost),
                                                                 len(lost) * raw)
        survivor = hosts["host0"].stats()
        assert survivor.weight_bytes == sum(coded.values()) and survivor.raw_weight_bytes == 16 * raw
        assert set(pool.owners.values()) == {"host0"} and set(pool.standby.values()) == {"host0"}
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        print(f"DFloat11 transit: fills {spare.fill_bytes.wire}/{spare.fill_bytes.raw} B, promotion "
              f"{moved.wire}/{moved.raw} B, reload {reloaded.wire}/{reloaded.raw} B (coded/raw)")
        handle.close()
    finally:
        _kill_hosts(launcher, hosts)

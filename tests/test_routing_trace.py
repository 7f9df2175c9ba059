"""Routing traces (tierserve/offload/routing_trace.py): recording, the rank mapping, replay.

- recording on the tiny Qwen3-MoE: one row per token per layer, counts equal the usage recorder's (an
  independent counter on the same routes), and the rows are the router's own top-k;
- save/load round trip; a malformed row is refused naming ``trace``;
- ``map_by_rank`` on a hand-made trace, ids worked out by hand from the rule in the module docstring;
- replay: the ids a model routes equal the trace's rows in order (wrapping around), the weights are the
  router's softmax at those ids, renormalised; and the trace shipped in benchmarks/ loads and maps onto
  the Qwen3-30B-A3B shape.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from model_harness import MOE_PROMPT, PagedRunner, tiny_moe_reference
from tierserve.errors import InvalidParameterError
from tierserve.offload.routing_trace import RoutingTrace, map_by_rank, record_routing, replay_routing
from tierserve.offload.usage import ExpertUsage
from tierserve.offload.usage_hook import attach_usage_recorder, routed_blocks

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "traces", "smollm2_moe_austen.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_moe_trace"))
    model = tiny_moe_reference(path, seed=5, new_tokens=1)[0]
    return model


def test_recorded_rows_are_the_routers_top_k(tiny):
    usage = ExpertUsage(2, 8)
    rec = attach_usage_recorder(tiny, usage)
    trace, handle = record_routing(tiny)
    PagedRunner(tiny).greedy(MOE_PROMPT, 5)  # a prefill of 12 tokens, then 4 single-token steps
    handle.detach()
    rec.detach()
    assert [len(rows) for rows in trace.layers] == [16, 16]
    assert [trace.counts(j) for j in range(2)] == [list(row) for row in usage.counts]
    block = routed_blocks(tiny)[0]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    trace2, handle = record_routing(tiny)
    _, ids = block.route(x)
    handle.detach()
    assert trace2.layers[0] == ids.tolist() == torch.topk(block.gate(x).float().softmax(-1), 2).indices.tolist()


def test_save_load_and_bad_rows(tmp_path):
    trace = RoutingTrace(4, 2, [[[0, 1], [3, 2]], [[1, 0], [2, 3]]])
    trace.save(str(tmp_path / "t.json"))
    back = RoutingTrace.load(str(tmp_path / "t.json"))
    assert (back.num_experts, back.top_k, back.layers) == (4, 2, trace.layers)
    RoutingTrace(4, 2, [[[0, 4]]]).save(str(tmp_path / "bad.json"))
    with pytest.raises(InvalidParameterError) as err:
        RoutingTrace.load(str(tmp_path / "bad.json"))
    assert err.value.field == "trace"


def test_map_by_rank_by_hand():
    # layer 0 counts: e0 1, e1 3, e2 2, e3 0 -> ranks e1:0, e2:1, e0:2, e3:3; m = 8 // 4 = 2, q = 4 // 2 = 2
    src = RoutingTrace(4, 2, [[[1, 2], [2, 1], [1, 0]]])
    h12, h01 = zlib.crc32(b"1,2") % 2, zlib.crc32(b"0,1") % 2
    out = map_by_rank(src, num_experts=8, top_k=4, num_layers=2)

    def block(rank, h):
        return [rank * 2 + (h + i) % 2 for i in range(2)]

    expect = [block(0, h12) + block(1, h12), block(1, h12) + block(0, h12), block(0, h01) + block(2, h01)]
    assert out.layers == [expect, expect]  # layer 1 reads source layer 1 mod 1 = 0
    assert set(out.layers[0][0]) == set(out.layers[0][1])  # the same pattern maps to the same experts
    assert out.ranking(0)[:2] == [0, 1]  # the most popular source expert's block is the most popular
    with pytest.raises(InvalidParameterError):
        map_by_rank(src, num_experts=4, top_k=8, num_layers=1)


def test_replay_routes_by_the_trace(tiny):
    rows = [[(3 * t) % 8, (3 * t + 1) % 8] for t in range(7)]
    trace = RoutingTrace(8, 2, [rows, rows[::-1]])
    replay = replay_routing(tiny, trace)
    seen, rec = record_routing(tiny)  # wraps the replay: records what the blocks route
    PagedRunner(tiny).greedy(MOE_PROMPT, 3)  # 12 + 2 tokens: wraps around the 7 rows twice
    rec.detach()
    assert seen.layers[0] == [rows[i % 7] for i in range(14)]
    assert seen.layers[1] == [rows[::-1][i % 7] for i in range(14)]
    block = routed_blocks(tiny)[0]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    weights, ids = block.route(x)  # cursor at 14 % 7 = 0
    assert ids.tolist() == rows[:3]
    probs = block.gate(x).float().softmax(-1).gather(1, ids)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True), rtol=0, atol=0)
    replay.detach()
    assert "route" not in block.__dict__


def test_shipped_trace_maps_onto_qwen3_30b_a3b():
    trace = RoutingTrace.load(SHIPPED)
    assert trace.num_tokens >= 256 and len(trace.layers) >= 2
    target = map_by_rank(trace, num_experts=128, top_k=8, num_layers=4)
    assert all(len(row) == 8 and len(set(row)) == 8 for rows in target.layers for row in rows)
    counts = target.counts(0)
    assert sum(1 for c in counts if c) > 64  # the patterns spread over most of the 128 experts
    hot = sorted(counts, reverse=True)
    assert sum(hot[:13]) > 2 * sum(hot[-13:])  # skewed: the top 10% far above the bottom 10%

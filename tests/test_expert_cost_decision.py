"""The dispatcher's "send rows or fetch the expert" decision under the cost model measured on this machine.

``offload_from_config`` with spare slots measures ``CostModel`` against a live plain-process host at start
(tierserve/offload/build.py, ``CostModel.measure``). With those measured constants, this test computes the
decision itself from the formula of tierserve/offload/spare_slots.py's docstring, for an expert of
``B`` weight bytes (counted here from the tiny model's shapes) that ``n`` rows are routed to:

    remote(n) = rtt_s + n * remote_token_s
    fetch(n)  = B / bandwidth_Bps + n * local_token_s        fetch  <=>  fetch(n) < remote(n)

The two costs are linear in ``n``, so the decision flips at most once, at the crossover
``n* = (B / bandwidth_Bps - rtt_s) / (remote_token_s - local_token_s)``. The rows checked are 1, the
whole rows on each side of ``n*`` when it lies in [1, N_MAX], and N_MAX; for each, the layer's real
``plan`` (over routed ids sending n tokens to one cold expert) must fetch exactly when the formula says
so. Nothing here depends on how fast the machine is: whatever was measured, plan and formula must agree.
(On the loaded 2-core dev machine the measured local row cost exceeds the remote one and a fetch costs
more than a round trip, so no crossover lies in range and every n is sent remote.)
"""

from __future__ import annotations

import math

import pytest

from model_harness import TINY_QWEN3_MOE, tiny_moe_reference
from tierserve.models.loader import load_model

N_MAX = 1 << 14


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    from tierserve.config import OffloadConfig
    from tierserve.offload.build import offload_from_config

    path = str(tmp_path_factory.mktemp("qwen3_moe_cost"))
    tiny_moe_reference(path, seed=31, new_tokens=1)
    cfg = OffloadConfig(resident_experts=4, expert_hosts=2, timeout_s=30.0, spare_slots=2)
    handle = offload_from_config(load_model(path).model, cfg, path, "auto")
    yield handle
    handle.close()


def test_fetch_decision_follows_the_measured_cost_model(hook):
    from tierserve.offload.spare_slots import CostModel

    cfg = TINY_QWEN3_MOE
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    weight_bytes = (2 * inter * hidden + hidden * inter) * 4  # gate_up [2I, H] + down [H, I], float32
    block = hook.blocks[0]
    cost = block.cost
    assert cost != CostModel() and block.expert_bytes == weight_bytes
    cold = min(e for (j, e) in hook.pool.owners if j == 0)
    warm = min(int(e) for e in block.experts)
    assert (0, cold) not in hook.spare  # no slot holds it: the cost model decides

    def fetch_expected(n: int) -> bool:
        remote = cost.rtt_s + n * cost.remote_token_s
        fetch = weight_bytes / cost.bandwidth_Bps + n * cost.local_token_s
        return fetch < remote

    rows = {1, N_MAX}
    slope = cost.remote_token_s - cost.local_token_s
    crossover = (weight_bytes / cost.bandwidth_Bps - cost.rtt_s) / slope if slope else math.inf
    if 1 <= crossover < N_MAX:
        rows |= {max(1, math.floor(crossover)), math.floor(crossover) + 1}
        assert len({fetch_expected(n) for n in rows}) == 2  # both sides of the crossover are checked
    print(f"measured {cost}; expert {weight_bytes} B; crossover n* = {crossover:.4g}")
    for n in sorted(rows):
        plan = block.plan([[cold, warm]] * n)  # n tokens, each routed to the cold expert and a resident one
        fetched = [g.expert for g in plan.fetches]
        remote = {g.expert for m in plan.messages for g in m.groups}
        assert fetched == ([cold] if fetch_expected(n) else []), (n, cost)
        assert (cold in remote) == (not fetch_expected(n)), (n, cost)
        assert [g.expert for g in plan.local] == [warm]

"""The naive per-expert dispatch baseline (tierserve/offload/naive_dispatch.py) on a tiny Qwen3-MoE.

Runs on the simulated 3-node cluster of tests/ray_fixtures.py (a head + 2 nodes with
``{"expert_host": 1}``), shut down at the end of the module. Checks, against the
all-resident model: bit-identical prefill logits and greedy tokens at 0% and 25%
residency (experts ranked by id), and one host message per (layer, cold expert with
routed rows) — the routed experts are taken from the reference model's own routing.
"""

from __future__ import annotations

import pytest
import torch

from model_harness import MOE_PROMPT, TINY_QWEN3_MOE, PagedRunner, tiny_moe_reference
from ray_fixtures import cluster  # noqa: F401  (the module-scoped 3-node cluster fixture)
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.loader import load_model
from tierserve.offload.placement import plan_placement

CONFIG, PROMPT = TINY_QWEN3_MOE, MOE_PROMPT
NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, prefill logits, greedy tokens, prefill usage counts) of the all-resident model."""
    path = str(tmp_path_factory.mktemp("qwen3_moe_naive"))
    _, logits, tokens, prefill_counts, _ = tiny_moe_reference(path, seed=5, new_tokens=NEW)
    return path, logits, tokens, prefill_counts


@pytest.fixture(scope="module")
def launcher(cluster):
    from tierserve.actors.ray_launcher import RayHostLauncher
    from tierserve.offload.launcher import HostSpec

    launcher = RayHostLauncher()
    launcher.launch(2, HostSpec("auto"))
    yield launcher
    launcher.shutdown()


@pytest.fixture
def hosts(launcher):
    """Socket transports to the module's two hosts, connected for one test (the hook closes them)."""
    from tierserve.actors.ray_launcher import transports_for

    return transports_for(launcher.actors, "socket", 30.0)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_naive_dispatch_is_bit_identical_one_call_per_expert(tiny, hosts, fraction):
    from tierserve.offload.apply import apply_expert_offload
    from tierserve.offload.naive_dispatch import NaiveMoeBlock, use_naive_dispatch

    path, ref_logits, ref_tokens, prefill_counts = tiny
    zeros = [[0] * 8 for _ in range(2)]
    placement = plan_placement(zeros, round(16 * fraction))  # zero counts: experts ranked by id
    assert placement.num_resident == round(16 * fraction)
    model = load_model(path).model
    handle = apply_expert_offload(model, placement, hosts, model_path=path, linear_backend="auto")
    apply_linear_backend(model, "auto")
    use_naive_dispatch(handle)
    assert all(type(b) is NaiveMoeBlock for b in handle.blocks)
    for t in hosts.values():
        t.reset_stats()
    assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
    # one message per (layer, cold expert the prefill routed rows to), each holding just its rows
    for layer in range(2):
        cold = [e for e in placement.cold(layer) if prefill_counts[layer][e] > 0]
        assert handle.pool.stats.messages.get(layer, 0) == len(cold)
        assert handle.pool.stats.bytes.get(layer, 0) == 4 * CONFIG["hidden_size"] * sum(
            prefill_counts[layer][e] for e in cold)
        assert handle.blocks[layer].counters.remote_rows == sum(prefill_counts[layer][e] for e in cold)
    host_calls = sum(sum(t.stats().calls.values()) for t in hosts.values())
    assert host_calls == sum(handle.pool.stats.messages.values())
    assert sum(b.counters.bytes_received for b in handle.blocks) == sum(handle.pool.stats.bytes.values())
    assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
    assert not handle.pool.stats.failures
    handle.close()


def test_naive_switch_rejects_other_blocks(tiny):
    from types import SimpleNamespace

    from tierserve.errors import InvalidParameterError
    from tierserve.offload.naive_dispatch import use_naive_dispatch

    with pytest.raises(InvalidParameterError, match="handle"):
        use_naive_dispatch(SimpleNamespace(blocks=[torch.nn.Linear(2, 2)]))

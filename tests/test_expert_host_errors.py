"""An exception inside an expert host's compute, over the socket channel, with a real host process.

A ``python -m tierserve.offload.host_process`` child (ProcessHostLauncher) holds experts (0, 0) and (0, 1)
of the tiny Qwen3-MoE (hidden size 64), saved to a folder. Requests it cannot compute: rows for an expert
it does not hold, alone and mixed with a held one, and rows of the wrong width. Each must reach the worker
as a ``ChannelError`` (a ``HostCallError``: the one error ``HostPool`` fails a host over on,
tierserve/offload/host_pool.py) whose message names the host's address, the expert and, for the width,
the field and both sizes; and the host, on the same connection, must go on serving: every later request
is answered with exactly the rows the worker's own ``build_expert`` module computes (equal bits: the same
kernels on the same rows).
Then ``HostPool.wait`` over that host turns such an error reply into a failover: the host is recorded
failed with the host's message, its experts are re-read from the checkpoint (``CheckpointExperts``) and
loaded on the survivor, and a resend there gives the same exact rows.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig

from model_harness import TINY_QWEN3_MOE, build_and_save
from tierserve.models.loader import load_model
from tierserve.offload.expert_weights import ExpertWeights, build_expert, tensor_to_numpy
from tierserve.offload.transport import HostCallError

HIDDEN = TINY_QWEN3_MOE["hidden_size"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(every expert's ExpertWeights, the checkpoint reader of the saved folder)."""
    from tierserve.offload.apply import moe_blocks
    from tierserve.offload.expert_weights import CheckpointExperts

    path = str(tmp_path_factory.mktemp("qwen3_moe_errors"))
    build_and_save(Qwen3MoeConfig(**TINY_QWEN3_MOE), path, seed=41, noise=0.2)
    model = load_model(path).model
    blocks = [b for _, b in moe_blocks(model)]
    experts = {(j, e): b.experts[e] for j, b in enumerate(blocks) for e in range(b.num_experts)}
    act = model.cfg.hidden_act
    weights = {k: ExpertWeights.from_module(m, act) for k, m in experts.items()}
    return weights, CheckpointExperts.from_model(path, model, experts, {j: act for j in range(len(blocks))})


def _rows(n: int, seed: int, hidden: int = HIDDEN) -> np.ndarray:
    return tensor_to_numpy(torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)))


def _expected(w: ExpertWeights, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return build_expert(w, "auto")(torch.from_numpy(x)).numpy()


def _call(transport, x: np.ndarray, ids: list[int]) -> np.ndarray:
    # 30 s: only bounds a hang; the host answers an error at once
    return transport.submit(0, x, np.array(ids, dtype=np.int64), "float32").result(time.monotonic() + 30.0)


@pytest.fixture
def host(tiny):
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    weights, source = tiny
    launcher = ProcessHostLauncher()
    transports = launcher.launch(2, HostSpec("auto"))
    assert transports["host0"].load_experts({k: weights[k] for k in ((0, 0), (0, 1))}) == 2
    yield launcher, transports, weights, source
    for t in transports.values():
        t.close()
    launcher.shutdown()


def test_compute_errors_name_the_host_and_expert_and_the_host_keeps_serving(host):
    launcher, transports, weights, _ = host
    t = transports["host0"]
    addr = str(t.address)
    pid = t.stats().pid
    x = _rows(3, seed=5)
    assert np.array_equal(_call(t, x, [0, 0, 0]), _expected(weights[(0, 0)], x))

    bad = [(x, [7, 7, 7], ["does not hold expert (layer 0, 7)", "KeyError"]),
           (x, [0, 7, 1], ["does not hold expert (layer 0, 7)"]),
           (_rows(3, seed=6, hidden=HIDDEN - 4), [1, 1, 1],
            ["x", f"rows of hidden size {HIDDEN - 4}", f"expert (layer 0, 1) takes {HIDDEN}"])]
    for rows, ids, words in bad:
        with pytest.raises(HostCallError) as err:
            _call(t, rows, ids)
        message = str(err.value)
        assert addr in message and all(w in message for w in words), message
        # the same connection still serves: rows of both experts, each exactly as the worker computes them
        y = _call(t, x, [1, 0, 1])
        assert np.array_equal(y[[0, 2]], _expected(weights[(0, 1)], x[[0, 2]]))
        assert np.array_equal(y[[1]], _expected(weights[(0, 0)], x[[1]]))
    assert t.stats().pid == pid  # the same process answered throughout


def test_host_pool_fails_over_a_host_whose_compute_errs(host):
    from tierserve.offload.host_pool import HostPool

    launcher, transports, weights, source = host
    # (0, 2) is assigned to host0, which never received it: its compute fails for that expert
    pool = HostPool(transports, {(0, 0): "host0", (0, 2): "host0"}, source, "auto", timeout_s=30.0)
    x = _rows(4, seed=9)
    got = pool.wait({"host0": pool.submit("host0", 0, x, np.array([0, 0, 2, 2]), "float32")})
    assert got == {"host0": None}
    assert len(pool.stats.failures) == 1 and pool.stats.failures[0].startswith("host0: ChannelError")
    assert "does not hold expert (layer 0, 2)" in pool.stats.failures[0]
    assert pool.alive == {"host1"} and pool.owners == {(0, 0): "host1", (0, 2): "host1"}
    y = pool.wait({"host1": pool.submit("host1", 0, x, np.array([0, 0, 2, 2]), "float32")})["host1"]
    assert np.array_equal(y[:2], _expected(weights[(0, 0)], x[:2]))
    assert np.array_equal(y[2:], _expected(weights[(0, 2)], x[2:]))

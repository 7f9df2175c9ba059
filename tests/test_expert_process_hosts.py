"""Expert offload with plain-process hosts and NO Ray (ProcessHostLauncher, the engine's default).

Hosts are ``python -m tierserve.offload.host_process`` children on 127.0.0.1 serving the
socket channel: the experts are shipped, copied and computed over it. Checks, against
the all-resident tiny Qwen3-MoE: bit-identical prefill logits and greedy tokens at 0%
and 50% residency (every fused message reached a host's compute), a host stopped with
SIGSTOP failed over by timeout with identical output, ``offload_from_config`` with the
default launcher (spare slots with a measured cost model, promotions, close() stops
the processes), the restricted unpickler of the control channel, and that the offload
runtime imports no Ray (a fresh interpreter).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from model_harness import MOE_PROMPT, PagedRunner, tiny_moe_reference
from polling import pid_gone
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.loader import load_model
from tierserve.offload.placement import plan_placement

PROMPT, NEW = MOE_PROMPT, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, all-resident prefill logits, greedy tokens)."""
    path = str(tmp_path_factory.mktemp("qwen3_moe_proc"))
    _, logits, tokens, _, _ = tiny_moe_reference(path, seed=17, new_tokens=NEW)
    return path, logits, tokens


@pytest.fixture(scope="module")
def launched():
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    launcher = ProcessHostLauncher()
    hosts = launcher.launch(2, HostSpec("auto"))
    yield launcher, hosts
    launcher.shutdown()



def _offloaded(path, placement, hosts, **kw):
    from tierserve.offload.apply import apply_expert_offload

    model = load_model(path).model
    hook = apply_expert_offload(model, placement, hosts, model_path=path, linear_backend="auto", **kw)
    apply_linear_backend(model, "auto")
    return model, hook


def test_offload_runtime_imports_no_ray():
    code = ("import sys, tierserve.offload.build, tierserve.offload.naive_dispatch, tierserve.offload.host_process; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_process_hosts_are_bit_identical(tiny, launched, fraction):
    from tierserve.offload.socket_transport import SocketTransport

    path, ref_logits, ref_tokens = tiny
    launcher, _ = launched
    hosts = launcher.transports()  # this test's own connections: the hook closes them
    assert all(type(t) is SocketTransport for t in hosts.values())
    assert set(launcher.pids()) == {"host0", "host1"}
    assert {t.stats().pid for t in hosts.values()} == set(launcher.pids().values())
    for t in hosts.values():
        t.reset_stats()
    placement = plan_placement([[0] * 8, [0] * 8], round(16 * fraction), 0)
    model, hook = _offloaded(path, placement, hosts)
    assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
    assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
    sent = sum(hook.pool.stats.messages.values())
    assert sent > 0 and sum(sum(t.stats().calls.values()) for t in hosts.values()) == sent
    # every expert is held by some host (cold owners and resident standbys), shipped over the socket
    held = sum(len(t._call("held", timeout_s=None)) for t in hosts.values())
    assert held == 16
    assert not hook.pool.stats.failures
    hook.close()


HOST_TIMEOUT_S = 10.0


def test_stopped_process_host_is_failed_over(tiny):
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    path, ref_logits, ref_tokens = tiny
    launcher = ProcessHostLauncher()
    # timeout_s is the only wall-clock bound here: generous, so that the live host answers within it on a
    # starved machine too (at 2 s, a run beside the parallel test worker saw host0 time out as well)
    hosts = launcher.launch(2, HostSpec("auto", timeout_s=HOST_TIMEOUT_S))
    pid = launcher.pids()["host1"]
    try:
        model, hook = _offloaded(path, plan_placement([[0] * 8, [0] * 8], 6, 1), hosts, timeout_s=HOST_TIMEOUT_S)
        assert hook.shards["host1"]
        os.kill(pid, signal.SIGSTOP)
        assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
        assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
        # no hang, whatever the machine's speed: exactly one failed call (one timeout_s), then host1 is dropped
        assert [f.split(":")[0] for f in hook.pool.stats.failures] == ["host1"]
        assert hook.pool.alive == {"host0"} and set(hook.pool.owners.values()) == {"host0"}
        assert pid_gone(pid)  # failing a host kills its process
        hook.close()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.shutdown()


def test_offload_from_config_default_launcher(tiny, tmp_path):
    """The engine's builder with no launcher: plain processes; spare ring with a measured cost model,
    promotions, usage saved and hosts stopped on close."""
    from tierserve.config import OffloadConfig
    from tierserve.offload.build import offload_from_config
    from tierserve.offload.launcher import ProcessHostLauncher
    from tierserve.offload.spare_slots import CostModel
    from tierserve.offload.usage import ExpertUsage

    path, ref_logits, ref_tokens = tiny
    usage = str(tmp_path / "usage.json")
    cfg = OffloadConfig(resident_experts=4, expert_hosts=2, timeout_s=20.0, spare_slots=2, usage_path=usage,
                        promotion_min_gain=1, promotion_max_swaps=2)
    model = load_model(path).model
    hook = offload_from_config(model, cfg, path, "auto")
    apply_linear_backend(model, "auto")
    assert isinstance(hook.launcher, ProcessHostLauncher)
    pids = list(hook.launcher.pids().values())
    assert len(pids) == 2
    cost = hook.blocks[0].cost
    assert cost != CostModel() and all(b.cost is cost for b in hook.blocks)
    assert torch.equal(PagedRunner(model).step(PROMPT), ref_logits)
    swaps = hook.at_request_boundary()
    assert swaps and hook.promotions == len(swaps)
    assert [sorted(map(int, b.experts)) for b in hook.blocks] == [list(r) for r in hook.placement.resident]
    assert PagedRunner(model).greedy(PROMPT, NEW) == ref_tokens
    metrics = hook.stats()
    assert (metrics.resident, metrics.offloaded, metrics.promotions) == (4, 12, len(swaps))
    hook.close()
    assert ExpertUsage.load(usage).counts == hook.counts()
    t0 = time.monotonic()
    while not all(pid_gone(p) for p in pids):
        assert time.monotonic() - t0 < 30, "expert host processes still running after close()"
        time.sleep(0.05)


def test_control_channel_refuses_foreign_pickles():
    from tierserve.offload.socket_channel import dumps, loads

    assert loads(pickle.dumps({(0, 1): [1, 2]})) == {(0, 1): [1, 2]}
    # torch tensors (inside DFloat11-coded experts) travel as numpy arrays, bit-exact, bf16 included
    t = torch.randn(5, 3).to(torch.bfloat16)
    back = loads(dumps({"w": t, "i": torch.arange(4, dtype=torch.int64)}))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"].view(torch.int16), t.view(torch.int16))
    assert torch.equal(back["i"], torch.arange(4))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        loads(pickle.dumps(t))  # torch's own reduction is not accepted
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        loads(pickle.dumps(os.system))


def test_host_process_exits_when_its_pipe_closes():
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    launcher = ProcessHostLauncher()
    hosts = launcher.launch(1, HostSpec("auto"))
    proc = launcher.procs["host0"]
    assert hosts["host0"].weight_format() == "raw"
    proc.stdin.close()  # what happens when the worker dies
    assert proc.wait(timeout=30) == 0
    launcher.shutdown()

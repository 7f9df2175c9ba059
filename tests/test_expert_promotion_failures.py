"""An expert host dies while a promotion copies an expert from it (plain-process hosts, no Ray).

The tiny Qwen3-MoE with experts 0-3 resident in both layers and 4-7 on two ``host_process`` children;
hand-built counts make exactly one swap worth it: promote expert 5 of layer 0 (count 900) for resident
expert 3 (count 0), gain 900 against ``min_gain`` 500 (the live traffic adds at most 70 per layer and
run, tests/test_expert_runtime.py). The owner of (0, 5) is stopped (SIGSTOP) and the promotion started on
a thread once every thread of the host shows the stopped state (``kill`` returns before the stop takes
effect, and a host not yet stopped on a busy machine would answer); once its ``get_expert_payload`` request sits unread in the stopped host's socket (the
receive queue of the host's end of a connection, /proc/net/tcp), the host is killed (SIGKILL), so it dies
in the middle of the copy, whatever the machine's speed. Then:

* the swap is skipped and nothing moved: the placement, the resident modules of every layer and the
  spare-slot ring (no module and no copy left behind) are as before;
* the dead host is failed over once (reason: the promotion copy), every cold and standby expert it held
  is owned by the survivor, and the output is bit-identical to the all-resident model (``torch.equal``);
* the next request boundary promotes the same expert from the survivor, still bit-identical.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

import pytest
import torch

from model_harness import MOE_PROMPT, PagedRunner, tiny_moe_reference
from polling import pid_gone, pid_stopped, wait_for
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.models.loader import load_model
from tierserve.offload.placement import Placement

NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_moe_promo"))
    _, logits, tokens, _, _ = tiny_moe_reference(path, seed=23, new_tokens=NEW)
    return path, logits, tokens


def _unread_bytes_at(port: int) -> int:
    """Bytes waiting unread in the receive queues of established TCP sockets whose local port is ``port``."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.split(":")[1], 16) == port and state == "01":  # 01: ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total


def _sockets_and_stack(port: int, thread: threading.Thread) -> str:
    """What a timed-out wait saw: the /proc/net/tcp lines at ``port`` and where ``thread`` stands."""
    with open("/proc/net/tcp") as f:
        lines = [ln.strip() for ln in f if f":{port:04X} " in ln]
    frame = sys._current_frames().get(thread.ident)
    return "\n".join(lines + ["".join(traceback.format_stack(frame)) if frame else "thread ended"])


def test_host_killed_during_promotion_copy(tiny):
    from tierserve.offload.apply import apply_expert_offload
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    path, ref_logits, ref_tokens = tiny
    launcher = ProcessHostLauncher()
    # timeout_s only bounds a hang: the host is killed long before it, so the copy fails by a reset connection
    hosts = launcher.launch(2, HostSpec("auto", timeout_s=60.0))
    try:
        model = load_model(path).model
        placement = Placement(((0, 1, 2, 3), (0, 1, 2, 3)), (8, 8))
        counts = [[300, 200, 100, 0, 0, 900, 0, 0], [0] * 8]
        handle = apply_expert_offload(model, placement, hosts, model_path=path, linear_backend="auto",
                                      timeout_s=60.0, counts=counts, spare_slots=2)
        apply_linear_backend(model, "auto")
        handle.min_gain, handle.max_swaps = 500, 1
        assert torch.equal(PagedRunner(model).step(MOE_PROMPT), ref_logits)  # may fill the ring
        ring = handle.spare.keys()
        resident = [sorted(b.experts) for b in handle.blocks]
        victim = handle.pool.owner((0, 5))
        survivor = ({"host0", "host1"} - {victim}).pop()
        pid, port = launcher.pids()[victim], hosts[victim].address[1]

        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: pid_stopped(pid), timeout_s=60.0)  # the signal is sent, not yet acted on: wait until frozen
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(swaps=handle.at_request_boundary()))
        worker.start()
        wait_for(lambda: _unread_bytes_at(port) > 0, timeout_s=60.0,  # the copy request reached the host
                 show=lambda: f"{_sockets_and_stack(port, worker)}\nresult: {result}")
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=120.0)
        assert not worker.is_alive()

        assert result["swaps"] == [] and handle.placement == placement and handle.promotions == 0
        assert [sorted(b.experts) for b in handle.blocks] == resident
        assert handle.spare.keys() == ring and handle.spare.in_flight() == []
        assert handle.pool.stats.failures == [f"{victim}: promotion copy: ChannelError"]
        assert handle.pool.alive == {survivor} and pid_gone(pid)
        assert set(handle.pool.owners) == set(placement.cold_keys())
        assert set(handle.pool.owners.values()) == {survivor} and set(handle.pool.standby.values()) == {survivor}
        assert torch.equal(PagedRunner(model).step(MOE_PROMPT), ref_logits)
        assert PagedRunner(model).greedy(MOE_PROMPT, NEW) == ref_tokens

        swaps = handle.at_request_boundary()  # the same promotion, now copied from the survivor
        assert [(s.layer, s.promote, s.evict) for s in swaps] == [(0, 5, 3)]
        assert sorted(map(int, handle.blocks[0].experts)) == [0, 1, 2, 5]
        assert handle.pool.standby[(0, 5)] == survivor and handle.pool.owners[(0, 3)] == survivor
        assert torch.equal(PagedRunner(model).step(MOE_PROMPT), ref_logits)
        assert PagedRunner(model).greedy(MOE_PROMPT, NEW) == ref_tokens
        assert len(handle.pool.stats.failures) == 1
        handle.close()
    finally:
        for proc in launcher.procs.values():  # a host left stopped by a failed assertion cannot exit by itself
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        launcher.shutdown()

"""LLMAutoscalingPolicy driving a real Serve deployment on the local Ray instance: a burst scales up,
idleness scales down.

Stub replicas return, from ``record_autoscaling_stats``, the signals a test writes to a
``LoadBoard`` actor (tests/router_stub.py), the way LLMServer returns its engine's. Serve's
metrics interval and look-back are shortened (0.2 s / 0.5 s) and the policy's delays are 0.5 s up
and 1 s down, so the whole cycle takes seconds: waiting 10 per replica (pressure 5 against a target
of 2) takes one replica to ``max_replicas`` 3 in one step; all signals at 0 take it back to 1, one
replica per step (the running count passes through 2 for about the 1 s delay).
"""

from __future__ import annotations

import sys
import time

import pytest
import ray
import router_stub
from ray import cloudpickle, serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from tierserve.server.autoscaling import POLICY_PATH

APP = "autoscale-test"
BOARD = "autoscale-test-signals"


def running_replicas() -> int:
    dep = serve.status().applications[APP].deployments["Signals"]
    return dep.replica_states.get("RUNNING", 0)


def wait_replicas(n: int, timeout_s: float = 40.0) -> list[int]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(running_replicas())
        if seen[-1] == n:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"never reached {n} replicas: {seen[-20:]}")


@pytest.fixture(scope="module")
def board(ray_session):
    modules = [router_stub, sys.modules[__name__]]
    for m in modules:
        cloudpickle.register_pickle_by_value(m)
    board = ray.remote(num_cpus=0)(router_stub.LoadBoard).options(name=BOARD).remote()
    ray.get(board.set.remote("all", {"kv_usage": 0.0, "waiting": 0.0, "ttft_s": 0.0}))

    @serve.deployment(ray_actor_options={"num_cpus": 0}, autoscaling_config=AutoscalingConfig(
        min_replicas=1, initial_replicas=1, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0,
        metrics_interval_s=0.2, look_back_period_s=0.5,
        policy=AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs={
            "target_waiting": 2.0, "upscale_delay_s": 0.5, "downscale_delay_s": 1.0})))
    class Signals:
        async def record_autoscaling_stats(self) -> dict:
            return await ray.get_actor(BOARD).get.remote("all")

        def __call__(self) -> str:
            return "ok"

    try:
        serve.run(Signals.bind(), name=APP, route_prefix=None)
    finally:
        for m in modules:
            cloudpickle.unregister_pickle_by_value(m)
    try:
        yield board
    finally:
        serve.delete(APP)
        ray.kill(board)


def test_burst_scales_up_and_idleness_scales_down(board):
    assert running_replicas() == 1
    ray.get(board.set.remote("all", {"kv_usage": 0.1, "waiting": 10.0, "ttft_s": 0.0}))
    wait_replicas(3)                                  # ceil(1 * 5) capped at 3 (one target step: test_autoscaling.py)
    ray.get(board.set.remote("all", {"kv_usage": 0.0, "waiting": 0.0, "ttft_s": 0.0}))
    seen = wait_replicas(1)
    assert seen[0] == 3 and 2 in seen                 # down one replica at a time, 1 s apart

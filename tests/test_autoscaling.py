"""LLM-aware autoscaling (server/autoscaling.py): exact pressure and decisions, the delay clock,
hysteresis, the Serve adapter on a hand-built context, and the app and deploy configs that use it."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tierserve.errors import InvalidParameterError
from tierserve.server.autoscaling import (
    POLICY_PATH,
    AutoscaleTargets,
    LLMAutoscalingPolicy,
    ReplicaSignals,
    ScaleState,
    decide,
    pressure,
)

T = AutoscaleTargets(target_kv_usage=0.5, target_waiting=2.0, target_ttft_s=1.0,
                     upscale_delay_s=10.0, downscale_delay_s=60.0)


def sig(kv=0.0, waiting=0.0, ttft=0.0):
    return ReplicaSignals(kv, waiting, ttft)


def test_defaults_are_the_documented_ones():
    assert AutoscaleTargets() == AutoscaleTargets(0.8, 2.0, 2.0, 30.0, 300.0)


def test_pressure_is_the_largest_signal_against_its_target():
    # kv mean 0.5/0.5 = 1.0; waiting mean 3/2 = 1.5; ttft mean over serving replicas (2.0) / 1.0 = 2.0
    assert pressure([sig(0.25, 2, 0.0), sig(0.75, 4, 2.0)], T) == 2.0
    assert pressure([sig(0.25, 2), sig(0.75, 4)], T) == 1.5
    assert pressure([sig(0.75), sig(0.25)], T) == 1.0
    # an idle replica (ttft 0) does not dilute a slow one
    assert pressure([sig(ttft=0.0), sig(ttft=0.5), sig(ttft=1.0)], T) == 0.75
    assert pressure([], T) == 0.0


def test_scale_up_to_the_count_that_brings_pressure_back_to_target_after_the_delay():
    burst = [sig(waiting=6), sig(waiting=4)]                    # pressure 5/2 = 2.5 -> ceil(2 * 2.5) = 5
    n, st = decide(burst, 2, 1, 8, ScaleState(), now=100.0, targets=T)
    assert (n, st) == (2, ScaleState(1, 100.0))                 # wanted since 100, delay 10 s
    n, st = decide(burst, 2, 1, 8, st, now=109.5, targets=T)
    assert (n, st) == (2, ScaleState(1, 100.0))
    n, st = decide(burst, 2, 1, 8, st, now=110.0, targets=T)    # exactly at the delay
    assert (n, st) == (5, ScaleState())
    # capped at max_replicas
    assert decide(burst, 2, 1, 4, ScaleState(1, 0.0), now=10.0, targets=T)[0] == 4


def test_scale_down_one_at_a_time_below_half_the_target_after_the_delay():
    idle = [sig(kv=0.1), sig(kv=0.1), sig(kv=0.1)]              # pressure 0.2
    n, st = decide(idle, 3, 1, 8, ScaleState(), now=0.0, targets=T)
    assert (n, st) == (3, ScaleState(-1, 0.0))
    assert decide(idle, 3, 1, 8, st, now=59.0, targets=T) == (3, ScaleState(-1, 0.0))
    assert decide(idle, 3, 1, 8, st, now=60.0, targets=T) == (2, ScaleState())
    # never below min_replicas: at the floor nothing is wanted
    assert decide(idle, 1, 1, 8, ScaleState(-1, 0.0), now=1e6, targets=T) == (1, ScaleState())
    # min_replicas 0 lets the last replica go
    assert decide(idle, 1, 0, 8, ScaleState(-1, 0.0), now=60.0, targets=T) == (0, ScaleState())


def test_dead_band_and_direction_change_restart_the_clock():
    mid = [sig(kv=0.4)]                                          # pressure 0.8: inside [0.5, 1.0]
    assert decide(mid, 2, 1, 8, ScaleState(1, 0.0), now=100.0, targets=T) == (2, ScaleState())
    assert decide([sig(kv=0.5)], 2, 1, 8, ScaleState(), 0.0, T) == (2, ScaleState())      # exactly 1.0: hold
    assert decide([sig(kv=0.25)], 2, 1, 8, ScaleState(), 0.0, T) == (2, ScaleState())     # exactly 0.5: hold
    # wanting down after wanting up restarts the clock at now
    n, st = decide([sig(kv=0.1)], 2, 1, 8, ScaleState(1, 0.0), now=500.0, targets=T)
    assert (n, st) == (2, ScaleState(-1, 500.0))


def test_replicas_still_starting_are_held_not_cancelled():
    # Serve's target is 3, one replica runs (two start): the burst goes on -> keep 3 (not 1, which
    # would stop the starting ones); a larger burst raises it, from the running count's view.
    burst = [sig(waiting=10)]                                    # pressure 5
    assert decide(burst, 1, 1, 8, ScaleState(), 0.0, T, target_replicas=3) == (3, ScaleState(1, 0.0))
    assert decide(burst, 1, 1, 8, ScaleState(1, 0.0), 10.0, T, target_replicas=3) == (5, ScaleState())
    assert decide(burst, 1, 1, 4, ScaleState(), 0.0, T, target_replicas=4) == (4, ScaleState())
    # a dead band or no signals hold the target too
    assert decide([sig(kv=0.4)], 1, 1, 8, ScaleState(), 0.0, T, target_replicas=3) == (3, ScaleState())
    assert decide([], 1, 1, 8, ScaleState(), 0.0, T, target_replicas=3) == (3, ScaleState())
    # scaling down steps from the target, one replica at a time
    assert decide([sig()], 1, 1, 8, ScaleState(-1, 0.0), 60.0, T, target_replicas=3) == (2, ScaleState())


def test_out_of_bounds_goes_to_the_bound_at_once_and_no_signal_holds():
    busy = [sig(waiting=20)]
    assert decide(busy, 9, 1, 4, ScaleState(1, 5.0), now=5.0, targets=T) == (4, ScaleState())
    assert decide([], 0, 2, 4, ScaleState(), now=0.0, targets=T) == (2, ScaleState())
    assert decide([], 3, 1, 4, ScaleState(1, 0.0), now=1e6, targets=T) == (3, ScaleState())
    with pytest.raises(InvalidParameterError) as e:
        decide(busy, 1, 3, 2, ScaleState(), 0.0, T)
    assert e.value.field == "min_replicas"


def test_a_scale_down_never_pushes_the_rest_over_the_upscale_threshold():
    # Hysteresis (module doc): KV and waiting load spread over n - 1 replicas stays <= target.
    targets = AutoscaleTargets(upscale_delay_s=0, downscale_delay_s=0)
    for n, kv, waiting in itertools.product(range(2, 9), [i / 20 for i in range(20)], [0, 0.5, 0.9, 1.5]):
        signals = [sig(kv=kv, waiting=waiting)] * n
        m, _ = decide(signals, n, 1, 16, ScaleState(), 0.0, targets)
        if m < n:
            after = [sig(kv=min(1.0, kv * n / m), waiting=waiting * n / m)] * m
            assert decide(after, m, 1, 16, ScaleState(), 0.0, targets)[0] <= m, (n, kv, waiting)


def test_validation_names_the_field():
    for kwargs, field in [({"target_kv_usage": 0}, "target_kv_usage"), ({"target_kv_usage": 1.5}, "target_kv_usage"),
                          ({"target_waiting": 0}, "target_waiting"), ({"target_ttft_s": math.inf}, "target_ttft_s"),
                          ({"upscale_delay_s": -1}, "upscale_delay_s"), ({"downscale_delay_s": math.nan},
                                                                         "downscale_delay_s")]:
        with pytest.raises(InvalidParameterError) as e:
            AutoscaleTargets(**kwargs)
        assert e.value.field == field


def ctx(replicas, metrics, state=None, now=0.0, lo=1, hi=8, target=None):
    return SimpleNamespace(running_replicas=replicas, current_num_replicas=len(replicas), aggregated_metrics=metrics,
                           target_num_replicas=len(replicas) if target is None else target,
                           policy_state=state or {}, current_time=now, capacity_adjusted_min_replicas=lo,
                           capacity_adjusted_max_replicas=hi)


def test_serve_adapter_reads_aggregated_metrics_and_keeps_its_state():
    policy = LLMAutoscalingPolicy(**asdict(T))
    metrics = {"kv_usage": {"r1": 0.2, "r2": 0.3}, "waiting": {"r1": 5.0, "r2": 3.0}, "ttft_s": {"r1": 0.0, "r2": 0.5}}
    n, state = policy(ctx(["r1", "r2"], metrics, now=50.0))                 # pressure 4/2 = 2.0 -> want 4
    assert n == 2 and state == {"tierserve_scale_direction": 1, "tierserve_scale_since": 50.0}
    n, state = policy(ctx(["r1", "r2"], metrics, {**state, "serve_internal": 7}, now=60.0))
    assert n == 4 and state == {"tierserve_scale_direction": 0, "tierserve_scale_since": None}
    # a replica missing a metric (still starting) is left out; no complete replica: hold
    partial = {"kv_usage": {"r1": 0.2}, "waiting": {"r1": 5.0}}
    assert policy(ctx(["r1", "r2"], partial, now=0.0))[0] == 2
    assert policy(ctx(["r1"], None, now=0.0))[0] == 1
    # while the 4 start, the same burst keeps the target at 4
    assert policy(ctx(["r1", "r2"], metrics, now=70.0, target=4)) == (
        4, {"tierserve_scale_direction": 0, "tierserve_scale_since": None})


def test_app_builds_the_llm_autoscaling_config_and_serve_loads_the_policy():
    from ray.serve.config import AutoscalingConfig

    from tierserve.server.app import autoscaling_config
    from tierserve.server.app_args import AppArgs

    a = AppArgs.model_validate({"replicas": 2, "max_replicas": 4, "autoscaler": "llm",
                                "autoscale_target_ttft_s": 1.5}).serve_options()
    cfg = autoscaling_config(a)
    assert (cfg.min_replicas, cfg.initial_replicas, cfg.max_replicas) == (1, 2, 4)
    assert (cfg.upscale_delay_s, cfg.downscale_delay_s) == (0, 0)
    assert cfg.policy.policy_function == POLICY_PATH
    assert cfg.policy.policy_kwargs == {**asdict(AutoscaleTargets()), "target_ttft_s": 1.5}
    assert cfg.policy.get_policy().__name__ == "LLMAutoscalingPolicy"  # Serve's own loading path
    default = autoscaling_config(AppArgs.model_validate({"replicas": 2, "max_replicas": 4}).serve_options())
    assert default.policy.is_default_policy_function() and default.target_ongoing_requests == 16.0
    # Serve's policy takes the same delays (options autoscale_*_delay_s), not Serve's own 30 s / 600 s
    assert (default.upscale_delay_s, default.downscale_delay_s) == (30.0, 300.0)
    quick = AppArgs.model_validate({"replicas": 1, "max_replicas": 3, "autoscale_upscale_delay_s": 5,
                                    "autoscale_downscale_delay_s": 20}).serve_options()
    assert (autoscaling_config(quick).upscale_delay_s, autoscaling_config(quick).downscale_delay_s) == (5, 20)
    # the deploy configs use the same policy as their args build
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    svc = yaml.safe_load((deploy / "kuberay/rayservice.yaml").read_text())
    for cfg_yaml in (yaml.safe_load((deploy / "serve.yaml").read_text()), yaml.safe_load(svc["spec"]["serveConfigV2"])):
        (app,) = cfg_yaml["applications"]
        server = next(d for d in app["deployments"] if d["name"] == "LLMServer")
        built = autoscaling_config(AppArgs.model_validate(app["args"]).serve_options())
        assert AutoscalingConfig.model_validate(server["autoscaling_config"]).policy == built.policy
        assert server["autoscaling_config"]["upscale_delay_s"] == server["autoscaling_config"]["downscale_delay_s"] == 0


def test_llm_autoscaler_options_are_validated_by_name():
    from pydantic import ValidationError

    from tierserve.server.app_args import AppArgs

    with pytest.raises(ValidationError, match="autoscaler"):
        AppArgs.model_validate({"autoscaler": "llm"})                      # needs max_replicas
    with pytest.raises(ValidationError, match="autoscale_target_kv_usage"):
        AppArgs.model_validate({"max_replicas": 2, "autoscaler": "llm", "autoscale_target_kv_usage": 2.0})
    with pytest.raises(ValidationError, match="autoscaler"):
        AppArgs.model_validate({"max_replicas": 2, "autoscaler": "magic"})

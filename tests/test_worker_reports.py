"""What a real LLMServer replica reports to Serve for Router v2 and the LLM autoscaler.

The strict app (tests/ray_fixtures.py: one replica, max_num_seqs 2, no autoscaling, so only this test
calls ``record_autoscaling_stats`` and its TTFT window is ours): routing stats carry the replica's
capacity from its engine config and no queued prefill when idle; the autoscaling signals' TTFT is the
mean over the first tokens since the previous record (0.0 when none came), bounded by the request's
own end-to-end time measured here.
"""

from __future__ import annotations

import time

import pytest
import requests
from ray_fixtures import STRICT_APP, STRICT_KEY

from tierserve.server.autoscaling import SIGNALS


@pytest.fixture(scope="module")
def worker(tierserve_servers):
    from ray import serve

    return tierserve_servers, serve.get_deployment_handle("LLMServer", STRICT_APP)


def test_routing_stats_and_autoscaling_signals(worker):
    servers, handle = worker
    assert handle.record_routing_stats.remote().result(timeout_s=60) == {
        "pending_prefill_tokens": 0, "max_num_seqs": 2, "token_budget": 2048}
    handle.record_autoscaling_stats.remote().result(timeout_s=60)               # start a fresh window
    start = time.monotonic()
    r = requests.post(f"{servers.strict}/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {STRICT_KEY}"},
                      json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    e2e = time.monotonic() - start
    assert r.status_code == 200, r.text
    signals = handle.record_autoscaling_stats.remote().result(timeout_s=60)
    assert set(signals) == set(SIGNALS)
    assert 0 < signals["ttft_s"] <= e2e
    assert signals["waiting"] == 0.0 and 0.0 <= signals["kv_usage"] <= 1.0
    again = handle.record_autoscaling_stats.remote().result(timeout_s=60)
    assert again["ttft_s"] == 0.0                                                # no first token since

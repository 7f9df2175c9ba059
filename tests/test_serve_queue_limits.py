"""The overload answers are reachable in the deploy configs: the ingress admits more than its worker handle
queues, so a full queue answers 503 ``overloaded`` (with Retry-After) instead of leaving requests at the proxy.

Each ingress replica holds at most its ``max_ongoing_requests``; requests that no LLMServer replica can take
(all full, or restarting after a loss) wait in that replica's handle queue, whose bound is LLMServer's
``max_queued_requests``; only a request arriving at a full queue gets the 503. If an ingress replica admits no
more than that queue holds, the queue cannot fill: the 503 is unreachable and the excess waits at the HTTP
proxy without a bound. The builder keeps ingress = ``INGRESS_QUEUE_FACTOR`` x queue (server/app.py); the
configs in deploy/ override both numbers, and must keep the same ratio. Checked on the built application
(builder defaults) with each config's ``deployments`` overrides applied, as Serve applies them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def serve_config(which: str) -> dict:
    cfg = yaml.safe_load((DEPLOY / which).read_text())
    return yaml.safe_load(cfg["spec"]["serveConfigV2"]) if which.startswith("kuberay") else cfg


def effective(app_cfg: dict) -> dict[str, dict]:
    """{deployment: {max_ongoing_requests, max_queued_requests}} of the built app, overrides applied."""
    from tierserve.server.app import build_app

    ingress = build_app(app_cfg["args"])._bound_deployment
    worker = ingress.init_args[0]._bound_deployment if hasattr(ingress.init_args[0], "_bound_deployment") \
        else ingress.init_args[0]
    out = {d.name: {"max_ongoing_requests": d.max_ongoing_requests, "max_queued_requests": d.max_queued_requests}
           for d in (ingress, worker)}
    for override in app_cfg.get("deployments", []):
        for key in ("max_ongoing_requests", "max_queued_requests"):
            if key in override:
                out[override["name"]][key] = override[key]
    return out


def test_the_builder_keeps_the_ratio():
    from tierserve.server.app import INGRESS_QUEUE_FACTOR

    limits = effective({"args": {"max_num_seqs": 8, "max_waiting_requests": 4}})
    assert limits["LLMServer"] == {"max_ongoing_requests": 13, "max_queued_requests": 4 * 12}
    assert limits["OpenAIIngress"]["max_ongoing_requests"] == INGRESS_QUEUE_FACTOR * 4 * 12


@pytest.mark.parametrize("which", ["serve.yaml", "kuberay/rayservice.yaml"])
def test_deploy_configs_leave_the_503_reachable(which):
    from tierserve.server.app import INGRESS_QUEUE_FACTOR

    (app,) = serve_config(which)["applications"]
    limits = effective(app)
    queue = limits["LLMServer"]["max_queued_requests"]
    assert 0 < queue and limits["OpenAIIngress"]["max_ongoing_requests"] >= INGRESS_QUEUE_FACTOR * queue, limits

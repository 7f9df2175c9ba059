"""``build_app(args)``: the Serve application builder (``import_path: tierserve.server.app:build_app``).

``args`` (from serve YAML ``args:`` or the CLI) are validated by ``AppArgs``
(server/app_args.py: pydantic, this is the YAML edge; its keys are every
engine option of tierserve/config.py and every serving option of
server/serve_options.py, derived from those dataclasses) and turned into an
EngineConfig, ServeOptions and two deployments:

* ``LLMServer`` (worker.py): one engine per replica. ``replicas`` fixed
  replicas, or autoscaling when ``max_replicas`` is given (``min_replicas``
  .. ``max_replicas``, starting at ``replicas``, scaling on
  ``target_ongoing_requests`` per replica with ``autoscaler: requests``
  (Serve's policy, with ``autoscale_upscale_delay_s`` / ``autoscale_downscale_delay_s``
  as its delays),
  or with ``autoscaler: llm`` on KV-cache usage, waiting requests and TTFT
  against the ``autoscale_*`` targets: the custom Serve policy
  ``LLMAutoscalingPolicy`` of server/autoscaling.py, which applies its own
  hysteresis and delays, so Serve's ``upscale_delay_s`` / ``downscale_delay_s``
  are set to 0). Its handle calls are routed by
  ``PrefixAwareRequestRouter`` (longest cached prefix, bounded by load;
  ``router_abs_threshold`` / ``router_rel_threshold`` / ``router_min_match_ratio``; with ``kv_tiers``
  it also counts a lower-tier KV hit as a weighted partial match, routing/tier_index.py) when ``router`` is
  ``"prefix"`` (the default), by the same router running Router v2 when it is
  ``"cost"`` (routing/policy.py ``CostAwarePolicy``: the work the request
  would cost each replica, its capacity taken from this engine config,
  ``router_decode_tokens``; replicas report their queued prefill every
  ``ROUTING_STATS_PERIOD_S``), or by Ray Serve's default power-of-two-choices
  router when it is ``"pow2"`` (the baseline of benchmarks/serve.py). ``max_ongoing_requests``
  is ``max_num_seqs + max_waiting_requests + 1`` so that the worker itself
  sees the request that overflows its queue and answers 429 (at once for a
  fresh request; one that waited in Serve's queue waits for a slot instead,
  server/admission.py, so a queue built during an outage is served in order).
  ``max_queued_requests`` bounds Serve's own per-caller queue (requests not
  yet assigned to a replica: every replica full, or the router still
  choosing) at ``4 * (max_num_seqs + max_waiting_requests)``; beyond it callers
  get 503 with Retry-After. It is a safety valve for configs that lower
  ``max_ongoing_requests`` (deploy/serve.yaml does), not the admission bound:
  a tight value would reject bursts that arrive while the router is choosing.
  It is also what bounds the wait when no worker can take a request (every
  replica dead and restarting): the queue fills, and the next callers get 503
  at once instead of waiting for the restart.
* ``OpenAIIngress`` (ingress.py): the FastAPI app, bound to the worker handle.
  Its ``max_ongoing_requests`` is twice the worker handle's
  ``max_queued_requests`` (``INGRESS_QUEUE_FACTOR``): with an equal bound the
  requests beyond the worker queue would wait at the HTTP proxy, without a
  bound, and the 503 above could never be answered.

A deployment override in serve YAML (``deployments:``) replaces these options
as usual in Ray Serve.

``resident_experts`` (None: all resident) turns on MoE expert offload in every
replica: each replica's engine keeps that many experts and spreads the rest
over ``expert_hosts`` ExpertHost actors (placed on nodes with the
``expert_host`` resource, tierserve/actors/ray_launcher.py). A dense model with
``resident_experts`` set is rejected when the replica loads it.
"""

from __future__ import annotations

from dataclasses import asdict

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from tierserve.config import EngineConfig
from tierserve.server.app_args import AppArgs
from tierserve.server.autoscaling import POLICY_PATH
from tierserve.server.ingress import IngressSettings, OpenAIIngress
from tierserve.server.serve_options import ServeOptions
from tierserve.server.worker import LLMServer

__all__ = ["AppArgs", "build_app", "delete_app"]

ROUTER_CLASS = "tierserve.routing.serve_router.PrefixAwareRequestRouter"
#: Ray Serve's own default request router (ray/serve/_private/constants.py: DEFAULT_REQUEST_ROUTER_PATH).
POW2_ROUTER_CLASS = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
#: The ingress's max_ongoing_requests over the worker handle's max_queued_requests (module doc).
INGRESS_QUEUE_FACTOR = 2
#: Seconds between two routing-stats pulls of a replica by Serve (the cost router's queued-prefill view).
ROUTING_STATS_PERIOD_S = 1.0


def _router_config(a: ServeOptions, engine_config: EngineConfig) -> RequestRouterConfig:
    """The LLMServer deployment's request router: prefix-aware, Router v2, or Serve's power-of-two baseline."""
    kv_tiers = engine_config.kv_tiers.tiers
    sched = engine_config.scheduler
    routers = {
        "cost": lambda: RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_router_kwargs={"policy": "cost_aware", "block_size": engine_config.cache.block_size,
                                   "token_budget": sched.max_num_batched_tokens,
                                   "max_num_seqs": sched.max_num_seqs,
                                   "decode_tokens": a.router_decode_tokens, "kv_tiers": list(kv_tiers)}),
        "prefix": lambda: RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"abs_threshold": a.router_abs_threshold,
                                   "rel_threshold": a.router_rel_threshold,
                                   "min_match_ratio": a.router_min_match_ratio,
                                   # lower-tier hits count as weighted partial matches (routing/tier_index.py)
                                   "kv_tiers": list(kv_tiers)}),
        "pow2": lambda: RequestRouterConfig(request_router_class=POW2_ROUTER_CLASS),
    }
    return routers[a.router]()


def build_app(args: dict | None = None):
    """The tierserve Serve application for ``args`` (see AppArgs)."""
    validated = AppArgs.model_validate(args or {})
    engine_config, a = validated.engine_config(), validated.serve_options()
    max_num_seqs = engine_config.scheduler.max_num_seqs
    scaling: dict = {"num_replicas": a.replicas}
    if a.max_replicas is not None:
        scaling = {"autoscaling_config": autoscaling_config(a)}
    max_queued = 4 * (max_num_seqs + a.max_waiting_requests)
    worker = serve.deployment(LLMServer).options(
        name="LLMServer",
        max_ongoing_requests=max_num_seqs + a.max_waiting_requests + 1,
        max_queued_requests=max_queued,
        ray_actor_options={"num_cpus": a.worker_cpus, "num_gpus": a.worker_gpus},
        request_router_config=_router_config(a, engine_config),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=a.drain_timeout_s,
        **scaling,
    ).bind(engine_config, a.served_model_name, a.max_waiting_requests, a.retry_after_s, a.metrics_interval_s)
    settings = IngressSettings(api_key=a.api_key, max_body_bytes=a.max_body_bytes, retry_after_s=a.retry_after_s)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", max_ongoing_requests=INGRESS_QUEUE_FACTOR * max_queued,
        ray_actor_options={"num_cpus": a.ingress_cpus}, graceful_shutdown_timeout_s=a.drain_timeout_s)
    return ingress.bind(worker, settings)


def autoscaling_config(a: ServeOptions) -> AutoscalingConfig:
    """LLMServer's autoscaling (``max_replicas`` set): Serve's request-count policy or the LLM-aware one."""
    bounds = {"min_replicas": a.min_replicas if a.min_replicas is not None else 1,
              "initial_replicas": a.replicas, "max_replicas": a.max_replicas,
              "target_ongoing_requests": a.target_ongoing_requests}
    configs = {
        # Serve's policy with the same delays as the llm one (benchmarks/autoscale.py compares them)
        "requests": lambda: AutoscalingConfig(**bounds, upscale_delay_s=a.autoscale_upscale_delay_s,
                                              downscale_delay_s=a.autoscale_downscale_delay_s),
        # the policy applies its own delays (server/autoscaling.py): Serve's are 0 so they do not add up
        "llm": lambda: AutoscalingConfig(
            **bounds, upscale_delay_s=0, downscale_delay_s=0,
            policy=AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=asdict(a.autoscale_targets()))),
    }
    return configs[a.autoscaler]()


def delete_app(name: str) -> None:
    """Delete the Serve app ``name`` and the detached actors it created (its prefix tree and metrics board).

    Those actors outlive the app on purpose (every ingress replica reads them); without this a redeployed
    app of the same name would start with the old cache picture and counters.
    """
    import ray

    from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name
    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    serve.delete(name)
    for actor, ns in ((tree_actor_name(name, "LLMServer"), TREE_NAMESPACE),
                      (metrics_board_name(name), BOARD_NAMESPACE)):
        try:
            ray.kill(ray.get_actor(actor, namespace=ns))
        except ValueError:  # never created (no request reached it)
            pass

"""``build_app(args)``: the Serve application builder (``import_path: tierserve.server.app:build_app``).

``args`` (from serve YAML ``args:`` or the CLI) are validated by ``AppArgs``
(pydantic: this is the YAML edge) and turned into two deployments:

* ``LLMServer`` (worker.py): one engine per replica. ``replicas`` fixed
  replicas, or autoscaling when ``max_replicas`` is given (``min_replicas``
  .. ``max_replicas``, starting at ``replicas``, scaling on
  ``target_ongoing_requests`` per replica). Its handle calls are routed by
  ``PrefixAwareRequestRouter`` (longest cached prefix, bounded by load;
  ``router_abs_threshold`` / ``router_rel_threshold`` / ``router_min_match_ratio``; with ``kv_tiers``
  it also counts a lower-tier KV hit as a weighted partial match, routing/tier_index.py) when ``router`` is
  ``"prefix"`` (the default), or by Ray Serve's default power-of-two-choices
  router when it is ``"pow2"`` (the baseline of benchmarks/serve.py). ``max_ongoing_requests``
  is ``max_num_seqs + max_waiting_requests + 1`` so that the worker itself
  sees the request that overflows its queue and answers 429.
  ``max_queued_requests`` bounds Serve's own per-caller queue (requests not
  yet assigned to a replica: every replica full, or the router still
  choosing) at ``4 * (max_num_seqs + max_waiting_requests)``; beyond it callers
  get 503 with Retry-After. It is a safety valve for configs that lower
  ``max_ongoing_requests`` (deploy/serve.yaml does), not the admission bound:
  a tight value would reject bursts that arrive while the router is choosing.
* ``OpenAIIngress`` (ingress.py): the FastAPI app, bound to the worker handle.

A deployment override in serve YAML (``deployments:``) replaces these options
as usual in Ray Serve.

``resident_experts`` (None: all resident) turns on MoE expert offload in every
replica: each replica's engine keeps that many experts and spreads the rest
over ``expert_hosts`` ExpertHost actors (placed on nodes with the
``expert_host`` resource, tierserve/moe/offload.py). A dense model with
``resident_experts`` set is rejected when the replica loads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from tierserve.cache.kv_tier_config import KVTierConfig
from tierserve.engine.llm import build_engine_config
from tierserve.server.errors import DEFAULT_MAX_BODY_BYTES
from tierserve.server.ingress import IngressSettings, OpenAIIngress
from tierserve.server.worker import LLMServer

ROUTER_CLASS = "tierserve.routing.serve_router.PrefixAwareRequestRouter"
#: Ray Serve's own default request router (ray/serve/_private/constants.py: DEFAULT_REQUEST_ROUTER_PATH).
POW2_ROUTER_CLASS = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    served_model_name: str | None = None
    replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    resident_experts: int | None = Field(None, ge=0)
    expert_hosts: int = Field(2, ge=1)
    # engine
    dtype: str = "float32"
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0
    num_threads: int | None = None
    linear_backend: str = "auto"
    quantization: str | None = None
    # [kv-tiers] lower KV tiers (tierserve/cache/kv_tier_config.py)
    kv_tiers: str = ""
    kv_dram_gib: float = 1.0
    kv_disk_gib: float = 4.0
    kv_disk_path: str | None = None
    kv_redis_url: str | None = None
    kv_chunk_blocks: int = 16
    kv_compression: str = "none"  # tierserve/cache/compress/
    kv_budget: int | None = None
    kv_ratio: float | None = None
    # serving
    max_waiting_requests: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=1)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    api_key: str | None = None
    worker_cpus: float = Field(1.0, ge=0)
    ingress_cpus: float = Field(0.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    router: Literal["prefix", "pow2"] = "prefix"
    router_abs_threshold: float = 4
    router_rel_threshold: float = 1.5
    router_min_match_ratio: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _replica_range(self):
        if self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            if not lo <= self.replicas <= self.max_replicas:
                raise ValueError(f"replicas must lie in [min_replicas={lo}, max_replicas={self.max_replicas}],"
                                 f" got {self.replicas}")
        elif self.min_replicas is not None:
            raise ValueError("min_replicas needs max_replicas (autoscaling)")
        return self


def _router_config(a: AppArgs) -> RequestRouterConfig:
    """The LLMServer deployment's request router: prefix-aware, or Serve's power-of-two baseline."""
    routers = {
        "prefix": lambda: RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"abs_threshold": a.router_abs_threshold,
                                   "rel_threshold": a.router_rel_threshold,
                                   "min_match_ratio": a.router_min_match_ratio,
                                   # lower-tier hits count as weighted partial matches (routing/tier_index.py)
                                   "kv_tiers": list(KVTierConfig.parse_tiers(a.kv_tiers))}),
        "pow2": lambda: RequestRouterConfig(request_router_class=POW2_ROUTER_CLASS),
    }
    return routers[a.router]()


def build_app(args: dict | None = None):
    """The tierserve Serve application for ``args`` (see AppArgs)."""
    a = AppArgs.model_validate(args or {})
    engine_config = build_engine_config(
        a.model, dtype=a.dtype, max_model_len=a.max_model_len, block_size=a.block_size,
        num_blocks=a.num_blocks, kv_cache_memory_gib=a.kv_cache_memory_gib,
        enable_prefix_caching=a.enable_prefix_caching, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        long_prefill_token_threshold=a.long_prefill_token_threshold, num_threads=a.num_threads,
        linear_backend=a.linear_backend, quantization=a.quantization,
        resident_experts=a.resident_experts, expert_hosts=a.expert_hosts,
        kv_tiers=a.kv_tiers, kv_dram_gib=a.kv_dram_gib, kv_disk_gib=a.kv_disk_gib, kv_disk_path=a.kv_disk_path,
        kv_redis_url=a.kv_redis_url, kv_chunk_blocks=a.kv_chunk_blocks, kv_compression=a.kv_compression,
        kv_budget=a.kv_budget, kv_ratio=a.kv_ratio)
    scaling: dict = {"num_replicas": a.replicas}
    if a.max_replicas is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=a.min_replicas if a.min_replicas is not None else 1, initial_replicas=a.replicas,
            max_replicas=a.max_replicas, target_ongoing_requests=a.target_ongoing_requests)}
    worker = serve.deployment(LLMServer).options(
        name="LLMServer",
        max_ongoing_requests=a.max_num_seqs + a.max_waiting_requests + 1,
        max_queued_requests=4 * (a.max_num_seqs + a.max_waiting_requests),
        ray_actor_options={"num_cpus": a.worker_cpus},
        request_router_config=_router_config(a),
        health_check_period_s=10,
        **scaling,
    ).bind(engine_config, a.served_model_name, a.max_waiting_requests, a.retry_after_s, a.metrics_interval_s)
    settings = IngressSettings(api_key=a.api_key, max_body_bytes=a.max_body_bytes, retry_after_s=a.retry_after_s)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", max_ongoing_requests=4 * (a.max_num_seqs + a.max_waiting_requests),
        ray_actor_options={"num_cpus": a.ingress_cpus})
    return ingress.bind(worker, settings)


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

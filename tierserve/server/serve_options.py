"""ServeOptions: the serving options that are not engine config, declared once for ``tierserve serve`` and Serve YAML.

Each field carries its help (tierserve/config_fields.py ``option``), so the
``serve`` command's flags (``--replicas``, ``--api-key``, ...) and the Serve
app's ``args`` keys (server/app_args.py) are both derived from this class.
Validated at construction; errors name the field:

* ``replicas >= 1``; autoscaling when ``max_replicas`` (>= 1) is given, with
  ``min_replicas`` (>= 0, default 1) <= ``replicas`` <= ``max_replicas``;
  ``min_replicas`` without ``max_replicas`` is refused;
* ``target_ongoing_requests > 0``, ``max_waiting_requests >= 1``,
  ``retry_after_s >= 1``, ``max_body_bytes >= 1``, ``worker_cpus >= 0``, ``worker_gpus >= 0``,
  ``ingress_cpus >= 0``, ``drain_timeout_s >= 0``, ``metrics_interval_s > 0``;
* ``router`` in ``ROUTERS``; ``0 <= router_min_match_ratio <= 1``; ``router_decode_tokens >= 0``;
* ``autoscaler`` in ``AUTOSCALERS``; ``llm`` needs ``max_replicas``; its targets and delays
  (``autoscale_*``) are checked by server/autoscaling.py ``AutoscaleTargets``.

Pure data: no Ray, no FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.config_fields import option
from tierserve.errors import InvalidParameterError
from tierserve.server.autoscaling import AutoscaleTargets

#: Default request body limit (4 MiB: far beyond any context this server runs); larger bodies get 413.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
#: "prefix": tierserve's prefix-aware router; "cost": its Router v2 (work a request costs each replica,
#: routing/policy.py CostAwarePolicy); "pow2": Ray Serve's default power-of-two-choices router.
ROUTERS = ("prefix", "cost", "pow2")
#: "requests": Serve's target_ongoing_requests; "llm": KV usage, waiting requests and TTFT (server/autoscaling.py).
AUTOSCALERS = ("requests", "llm")
#: ServeOptions field -> AutoscaleTargets field.
_AUTOSCALE_TARGETS = {"autoscale_target_kv_usage": "target_kv_usage", "autoscale_target_waiting": "target_waiting",
                      "autoscale_target_ttft_s": "target_ttft_s", "autoscale_upscale_delay_s": "upscale_delay_s",
                      "autoscale_downscale_delay_s": "downscale_delay_s"}

_MIN = {"replicas": 1, "max_waiting_requests": 1, "retry_after_s": 1, "max_body_bytes": 1,
        "worker_cpus": 0, "worker_gpus": 0, "ingress_cpus": 0,
        "drain_timeout_s": 0}
_POSITIVE = ("target_ongoing_requests", "metrics_interval_s")


@dataclass(frozen=True)
class ServeOptions:
    served_model_name: str | None = option(None, "model name in the API (default: the model path)")
    replicas: int = option(1, "LLMServer replicas (one engine each); the initial count when autoscaling")
    min_replicas: int | None = option(None, "autoscaling: fewest replicas (default: 1)")
    max_replicas: int | None = option(None, "enable autoscaling up to this many replicas")
    target_ongoing_requests: float = option(16.0, "autoscaling: ongoing requests per replica to aim at")
    max_waiting_requests: int = option(64, "requests queued per replica before it answers 429")
    retry_after_s: int = option(1, "Retry-After seconds of 429/503 answers")
    max_body_bytes: int = option(DEFAULT_MAX_BODY_BYTES, "largest request body accepted (413 above)")
    api_key: str | None = option(None, "require this bearer key on /v1 (serve command: default $TIERSERVE_API_KEY)")
    worker_cpus: float = option(1.0, "CPUs reserved per LLMServer replica")
    worker_gpus: float = option(0.0, "GPUs reserved per LLMServer replica (the engine's device auto then runs on "
                                     "the one Ray assigns)")
    ingress_cpus: float = option(0.0, "CPUs reserved per ingress replica")
    drain_timeout_s: float = option(30.0, "on SIGTERM / Ctrl-C (and a replica's graceful shutdown): seconds "
                                          "in-flight requests may take to finish while new ones get 503")
    metrics_interval_s: float = option(1.0, "seconds between two metrics pushes of a replica")
    router: str = option("prefix", "request router (prefix: longest cached prefix, bounded by load; "
                                   "pow2: Ray Serve's power of two choices)", choices=ROUTERS)
    router_abs_threshold: float = option(4.0, "prefix router: the least-loaded replica wins over the best match "
                                              "when their load gap (requests) exceeds this and the ratio below")
    router_rel_threshold: float = option(1.5, "prefix router: ... and their load ratio exceeds this")
    router_min_match_ratio: float = option(0.1, "prefix router: a best match below this fraction of the prompt's "
                                                "blocks routes by load")
    router_decode_tokens: float = option(256.0, "cost router: prompt tokens of work each request in flight on a "
                                                "replica counts for (routing/policy.py)")
    autoscaler: str = option("requests", "autoscaling signal (requests: Serve's target_ongoing_requests; llm: KV "
                                         "usage, waiting requests and TTFT against the targets below)",
                             choices=AUTOSCALERS)
    autoscale_target_kv_usage: float = option(0.8, "llm autoscaler: KV-cache usage per replica to aim at")
    autoscale_target_waiting: float = option(2.0, "llm autoscaler: waiting requests per replica to aim at")
    autoscale_target_ttft_s: float = option(2.0, "llm autoscaler: mean time to first token to aim at")
    autoscale_upscale_delay_s: float = option(30.0, "either autoscaler: seconds a scale-up must be wanted before "
                                                    "it happens")
    autoscale_downscale_delay_s: float = option(300.0, "either autoscaler: seconds a scale-down must be wanted "
                                                       "before it happens")

    def __post_init__(self) -> None:
        for name, low in _MIN.items():
            if getattr(self, name) < low:
                raise InvalidParameterError(name, f"must be >= {low}, got {getattr(self, name)}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise InvalidParameterError(name, f"must be > 0, got {getattr(self, name)}")
        if self.router not in ROUTERS:
            raise InvalidParameterError("router", f"must be one of {ROUTERS}, got {self.router!r}")
        if not 0 <= self.router_min_match_ratio <= 1:
            raise InvalidParameterError("router_min_match_ratio",
                                        f"must be in [0, 1], got {self.router_min_match_ratio}")
        if not self.router_decode_tokens >= 0:
            raise InvalidParameterError("router_decode_tokens", f"must be >= 0, got {self.router_decode_tokens}")
        self._check_replica_range()
        self._check_autoscaler()

    def autoscale_targets(self) -> AutoscaleTargets:
        """The llm autoscaler's targets and delays (``autoscale_*``)."""
        try:
            return AutoscaleTargets(**{t: getattr(self, o) for o, t in _AUTOSCALE_TARGETS.items()})
        except InvalidParameterError as exc:
            name = next(o for o, t in _AUTOSCALE_TARGETS.items() if t == exc.field)
            raise InvalidParameterError(name, exc.detail) from None

    def _check_autoscaler(self) -> None:
        if self.autoscaler not in AUTOSCALERS:
            raise InvalidParameterError("autoscaler", f"must be one of {AUTOSCALERS}, got {self.autoscaler!r}")
        if self.autoscaler == "llm" and self.max_replicas is None:
            raise InvalidParameterError("autoscaler", "llm needs max_replicas (autoscaling)")
        self.autoscale_targets()

    def _check_replica_range(self) -> None:
        if self.min_replicas is not None and self.min_replicas < 0:
            raise InvalidParameterError("min_replicas", f"must be >= 0, got {self.min_replicas}")
        if self.max_replicas is None:
            if self.min_replicas is not None:
                raise InvalidParameterError("min_replicas", "needs max_replicas (autoscaling)")
            return
        if self.max_replicas < 1:
            raise InvalidParameterError("max_replicas", f"must be >= 1, got {self.max_replicas}")
        lo = self.min_replicas if self.min_replicas is not None else 1
        if not lo <= self.replicas <= self.max_replicas:
            raise InvalidParameterError("replicas", f"must lie in [min_replicas={lo}, "
                                                    f"max_replicas={self.max_replicas}], got {self.replicas}")

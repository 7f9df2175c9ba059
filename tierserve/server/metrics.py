"""Prometheus metrics of the whole Serve app, aggregated over worker replicas.

Where values come from. Each ``LLMServer`` replica measures its own requests
in plain Python (``WorkerMetrics``): time to first token (from the moment the
replica receives the request to its first token: queueing + prefill),
inter-token latency (between consecutive tokens of one request), end-to-end
latency (receipt to last token, aborted requests included), prompt and
generated token counters, and reads the engine's gauges (running and waiting
requests, KV-cache usage) and prefix-cache counters (tokens queried / served
from cache) when it takes a snapshot.

How they are aggregated. Every ``push_interval_s`` (default 1 s) each replica
pushes a ``MetricsSnapshot`` (a small dataclass of numbers and bucket counts)
to the app's ``MetricsBoard``, one named detached Ray actor per app
(namespace ``tierserve``, 0 CPUs; created by whichever replica comes first).
``GET /metrics`` on any ingress replica asks the board for every replica's
latest snapshot, drops replicas silent for more than ``stale_after_s``
(default 30 s: dead or removed), sums counters, histogram buckets and the
running/waiting gauges per model, and averages KV-cache usage over replicas.
So /metrics shows cluster totals at most ``push_interval_s`` old. When a
replica dies its counters leave the sum (Prometheus sees a counter reset).

Exposed names (label ``model_name``): ``tierserve:time_to_first_token_seconds``,
``tierserve:inter_token_latency_seconds``, ``tierserve:e2e_request_latency_seconds``
(histograms); ``tierserve:num_requests_running``, ``tierserve:num_requests_waiting``,
``tierserve:kv_cache_usage_perc`` (0..1), ``tierserve:num_replicas`` (gauges);
``tierserve:prompt_tokens_total``, ``tierserve:generation_tokens_total``,
``tierserve:prefix_cache_queries_total``, ``tierserve:prefix_cache_hits_total``,
``tierserve:request_success_total`` (counters; the prefix-cache pair in tokens).
With MoE expert offload (``MetricsSnapshot.experts``, tierserve/offload/usage.py
``ExpertMetrics``, summed over replicas): ``tierserve:expert_tokens_total``
(labels ``model_name``, ``layer``, ``expert``: routed (token, slot) assignments),
``tierserve:experts_resident`` / ``tierserve:experts_offloaded`` (gauges),
``tierserve:expert_promotions_total`` and the spare-slot prefetch counters
``tierserve:expert_prefetches_issued_total`` / ``_used_total`` / ``_wasted_total``.
With KV tiers (``MetricsSnapshot.kv_tiers``, cache/tiers/stats.py, summed over
replicas), counters labelled ``model_name`` and ``tier``:
``tierserve:kv_tier_hits_total``, ``tierserve:kv_tier_hit_tokens_total``,
``tierserve:kv_tier_bytes_loaded_total``, ``tierserve:kv_tier_bytes_stored_total``,
``tierserve:kv_tier_corrupt_chunks_total``, ``tierserve:kv_tier_failures_total``;
and ``tierserve:kv_tier_load_seconds_total`` (``model_name``).
With speculative decoding on (``MetricsSnapshot.spec``, engine/spec_decode/stats.py
``SpecDecodeStats``, summed over replicas), counters labelled ``model_name``:
``tierserve:spec_decode_num_drafts_total`` (verifications),
``tierserve:spec_decode_num_draft_tokens_total`` (draft tokens proposed and
verified), ``tierserve:spec_decode_num_accepted_tokens_total``,
``tierserve:spec_decode_num_accepted_tokens_per_pos_total`` (label ``position``:
verifications whose draft at that position was accepted); and the gauge
``tierserve:spec_decode_mean_accepted_length`` (tokens per verifying step,
``1 + accepted / drafts``, from the summed counters).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from tierserve.cache.tiers.stats import KVTierStats
from tierserve.engine.spec_decode.stats import SpecDecodeStats
from tierserve.offload.usage import ExpertMetrics

#: Histogram bucket upper bounds in seconds (+Inf is implicit).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0)

#: A replica that has not pushed for this long is left out of /metrics.
DEFAULT_STALE_AFTER_S = 30.0


@dataclass
class Histogram:
    """Prometheus-style histogram: ``counts[i]`` observations in (bounds[i-1], bounds[i]]; last is +Inf."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total

    def cumulative(self) -> list[tuple[str, int]]:
        out, run = [], 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            run += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), run))
        return out


@dataclass
class MetricsSnapshot:
    """One replica's metrics (or a sum of several)."""

    model_name: str
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)
    prefix_queries: int = 0
    prefix_hits: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_replicas: int = 1
    experts: ExpertMetrics | None = None  # replicas with MoE expert offload
    kv_tiers: KVTierStats | None = None  # replicas with DRAM/disk/Redis KV tiers
    spec: SpecDecodeStats | None = None  # replicas with speculative decoding on

    def add(self, other: MetricsSnapshot) -> None:
        """Sum ``other`` into self; KV usage becomes the replica-weighted mean."""
        n = self.num_replicas + other.num_replicas
        self.kv_usage = (self.kv_usage * self.num_replicas + other.kv_usage * other.num_replicas) / n
        self.num_replicas = n
        for name in ("ttft", "itl", "e2e"):
            getattr(self, name).add(getattr(other, name))
        for name in ("prompt_tokens", "generation_tokens", "prefix_queries", "prefix_hits", "running",
                     "waiting"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, c in other.requests_finished.items():
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + c
        if other.experts is not None:
            if self.experts is None:
                self.experts = ExpertMetrics()
            self.experts.add(other.experts)
        if other.kv_tiers is not None:
            if self.kv_tiers is None:
                self.kv_tiers = KVTierStats()
            self.kv_tiers.add(other.kv_tiers)
        if other.spec is not None:
            self.spec = other.spec if self.spec is None else self.spec.plus(other.spec)


def aggregate(snapshots: list[MetricsSnapshot]) -> dict[str, MetricsSnapshot]:
    """Per model name, the sum of its replicas' snapshots (inputs are not modified)."""
    out: dict[str, MetricsSnapshot] = {}
    for snap in snapshots:
        if snap.model_name not in out:
            out[snap.model_name] = MetricsSnapshot(snap.model_name, num_replicas=0)
        out[snap.model_name].add(snap)
    return out


class WorkerMetrics:
    """A replica's request-level measurements; ``observe_*`` is called per token on the event loop."""

    def __init__(self, model_name: str):
        self.snapshot = MetricsSnapshot(model_name)

    def observe_token(self, start: float, last: float | None, now: float, num_prompt_tokens: int,
                      num_new_tokens: int) -> None:
        s = self.snapshot
        if last is None:
            s.ttft.observe(now - start)
            s.prompt_tokens += num_prompt_tokens
        else:
            s.itl.observe(now - last)
        s.generation_tokens += num_new_tokens

    def observe_finish(self, start: float, now: float, reason: str) -> None:
        s = self.snapshot
        s.e2e.observe(now - start)
        s.requests_finished[reason] = s.requests_finished.get(reason, 0) + 1

    def take(self, running: int, waiting: int, kv_usage: float, prefix_queries: int,
             prefix_hits: int, experts: ExpertMetrics | None = None) -> MetricsSnapshot:
        """A copy of the measurements plus the engine's current gauges, cache and expert counters."""
        import copy

        snap = copy.deepcopy(self.snapshot)
        snap.running, snap.waiting, snap.kv_usage = running, waiting, kv_usage
        snap.prefix_queries, snap.prefix_hits = prefix_queries, prefix_hits
        snap.experts = experts
        return snap


class MetricsBoard:
    """Actor body: the latest snapshot of every replica of one app."""

    def __init__(self):
        self._latest: dict[str, tuple[float, MetricsSnapshot]] = {}

    def push(self, replica_id: str, snapshot: MetricsSnapshot) -> None:
        self._latest[replica_id] = (time.monotonic(), snapshot)

    def collect(self, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> dict[str, MetricsSnapshot]:
        """Snapshots pushed within ``stale_after_s``, by replica id (older ones are forgotten)."""
        cutoff = time.monotonic() - stale_after_s
        self._latest = {r: v for r, v in self._latest.items() if v[0] >= cutoff}
        return {r: snap for r, (_, snap) in self._latest.items()}

    def drop(self, replica_id: str) -> None:
        self._latest.pop(replica_id, None)


BOARD_NAMESPACE = "tierserve"


def metrics_board_name(app_name: str) -> str:
    return f"metrics-board:{app_name}"


def get_or_create_metrics_board(app_name: str):
    """Handle to the app's board actor (created detached by the first caller)."""
    import ray

    return ray.remote(num_cpus=0)(MetricsBoard).options(
        name=metrics_board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True,
        lifetime="detached").remote()


def render_prometheus(snapshots: list[MetricsSnapshot]) -> bytes:
    """Prometheus text exposition of the per-model sums of ``snapshots``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    per_model = aggregate(snapshots)

    class _Collector:
        def collect(self):
            label = ["model_name"]
            hists = {"time_to_first_token_seconds": ("ttft", "Time to first token (receipt to first token)."),
                     "inter_token_latency_seconds": ("itl", "Time between consecutive tokens of a request."),
                     "e2e_request_latency_seconds": ("e2e", "Receipt to last token of a request.")}
            for name, (attr, doc) in hists.items():
                fam = HistogramMetricFamily(f"tierserve:{name}", doc, labels=label)
                for model, s in per_model.items():
                    h = getattr(s, attr)
                    fam.add_metric([model], buckets=h.cumulative(), sum_value=h.total)
                yield fam
            gauges = {"num_requests_running": ("running", "Requests in the engines' running batches."),
                      "num_requests_waiting": ("waiting", "Requests waiting in the engines' queues."),
                      "kv_cache_usage_perc": ("kv_usage", "Fraction of KV blocks in use (mean over replicas)."),
                      "num_replicas": ("num_replicas", "Worker replicas reporting.")}
            for name, (attr, doc) in gauges.items():
                fam = GaugeMetricFamily(f"tierserve:{name}", doc, labels=label)
                for model, s in per_model.items():
                    fam.add_metric([model], getattr(s, attr))
                yield fam
            counters = {"prompt_tokens": ("prompt_tokens", "Prompt tokens processed."),
                        "generation_tokens": ("generation_tokens", "Tokens generated."),
                        "prefix_cache_queries": ("prefix_queries", "Prompt tokens looked up in the prefix cache."),
                        "prefix_cache_hits": ("prefix_hits", "Prompt tokens served from the prefix cache.")}
            for name, (attr, doc) in counters.items():
                fam = CounterMetricFamily(f"tierserve:{name}", doc, labels=label)
                for model, s in per_model.items():
                    fam.add_metric([model], getattr(s, attr))
                yield fam
            fam = CounterMetricFamily("tierserve:request_success", "Finished requests by finish reason.",
                                      labels=label + ["finished_reason"])
            for model, s in per_model.items():
                for reason, c in sorted(s.requests_finished.items()):
                    fam.add_metric([model, reason], c)
            yield fam
            yield from _expert_families({m: s.experts for m, s in per_model.items() if s.experts is not None})
            yield from _kv_tier_families({m: s.kv_tiers for m, s in per_model.items() if s.kv_tiers is not None})
            yield from _spec_families({m: s.spec for m, s in per_model.items() if s.spec is not None})

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def _kv_tier_families(per_model: dict[str, KVTierStats]):
    """KV tiers: counters per model and tier: chunks served, bytes loaded/stored, corrupt chunks, failures."""
    if not per_model:
        return
    from prometheus_client.core import CounterMetricFamily

    families = {"kv_tier_hits": ("hits", "KV chunks served from a lower tier."),
                "kv_tier_hit_tokens": ("hit_tokens", "Prompt tokens served from a lower tier."),
                "kv_tier_bytes_loaded": ("bytes_loaded", "Bytes of KV loaded from a lower tier."),
                "kv_tier_bytes_stored": ("bytes_stored", "Bytes of KV stored to a lower tier."),
                "kv_tier_corrupt_chunks": ("corrupt", "Chunks rejected by their checksum (recomputed)."),
                "kv_tier_failures": ("failures", "Failed or timed-out tier calls and chunk stores "
                                                 "(a tier down, slow or full; writes that failed later).")}
    for name, (attr, doc) in families.items():
        fam = CounterMetricFamily(f"tierserve:{name}", doc, labels=["model_name", "tier"])
        for model, s in per_model.items():
            for tier, v in sorted(getattr(s, attr).items()):
                fam.add_metric([model, tier], v)
        yield fam
    fam = CounterMetricFamily("tierserve:kv_tier_load_seconds", "Time fetching, checking and copying tier chunks.",
                              labels=["model_name"])
    for model, s in per_model.items():
        fam.add_metric([model], s.load_seconds)
    yield fam


def _expert_families(per_model: dict[str, ExpertMetrics]):
    """The MoE expert-offload families (module doc); nothing when no replica offloads experts."""
    if not per_model:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fam = CounterMetricFamily("tierserve:expert_tokens", "Tokens routed to each MoE expert (token x top-k slot).",
                              labels=["model_name", "layer", "expert"])
    for model, m in per_model.items():
        for (layer, expert), c in sorted(m.tokens.items()):
            fam.add_metric([model, str(layer), str(expert)], c)
    yield fam
    for name, attr, doc in (("experts_resident", "resident", "MoE experts resident on the workers."),
                            ("experts_offloaded", "offloaded", "MoE experts computed on expert hosts.")):
        fam = GaugeMetricFamily(f"tierserve:{name}", doc, labels=["model_name"])
        for model, m in per_model.items():
            fam.add_metric([model], getattr(m, attr))
        yield fam
    fam = CounterMetricFamily("tierserve:expert_promotions", "Cold experts promoted to resident at request "
                                                               "boundaries.", labels=["model_name"])
    for model, m in per_model.items():
        fam.add_metric([model], m.promotions)
    yield fam
    for outcome, doc in (("issued", "started"), ("used", "read at least once"),
                         ("wasted", "evicted or cancelled before any read")):
        fam = CounterMetricFamily(f"tierserve:expert_prefetches_{outcome}", f"Spare-slot expert prefetches {doc}.",
                                  labels=["model_name"])
        for model, m in per_model.items():
            fam.add_metric([model], getattr(m, f"prefetch_{outcome}"))
        yield fam


def _spec_families(per_model: dict[str, SpecDecodeStats]):
    """Speculative-decoding counters and the mean accepted length, per model."""
    if not per_model:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    counters = {"spec_decode_num_drafts": ("num_drafts", "Verifications of a request's draft tokens."),
                "spec_decode_num_draft_tokens": ("num_draft_tokens", "Draft tokens proposed and verified."),
                "spec_decode_num_accepted_tokens": ("num_accepted_tokens", "Draft tokens accepted.")}
    for name, (attr, doc) in counters.items():
        fam = CounterMetricFamily(f"tierserve:{name}", doc, labels=["model_name"])
        for model, st in per_model.items():
            fam.add_metric([model], getattr(st, attr))
        yield fam
    fam = CounterMetricFamily("tierserve:spec_decode_num_accepted_tokens_per_pos",
                              "Verifications whose draft at this position was accepted.",
                              labels=["model_name", "position"])
    for model, st in per_model.items():
        for pos, c in enumerate(st.accepted_per_position):
            fam.add_metric([model, str(pos)], c)
    yield fam
    fam = GaugeMetricFamily("tierserve:spec_decode_mean_accepted_length",
                            "Tokens per verifying step (1 + accepted / drafts; 0 before the first draft).",
                            labels=["model_name"])
    for model, st in per_model.items():
        fam.add_metric([model], st.mean_accepted_length)
    yield fam

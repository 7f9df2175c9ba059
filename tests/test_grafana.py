"""deploy/grafana/tierserve.json queries only metrics (and labels) that the server exports.

The exported names are not a hand list: a snapshot with every optional part on
(MoE expert offload, KV tiers, speculative decoding, finished requests) is
rendered by server/metrics.py ``render_prometheus``, exactly what ``GET
/metrics`` serves, and parsed with prometheus_client's own text parser. Every
PromQL expression of the dashboard (panel targets and template variables) must
name at least one metric, every ``tierserve:...`` name in it must be a sample
name of that exposition (``_bucket`` / ``_total`` included), and every label it
groups by must be a label of the metrics the expression names. The dashboard
covers TTFT, ITL, e2e latency, running/waiting, KV usage, prefix and tier hits,
expert traffic and replicas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tierserve.cache.tiers.stats import KVTierStats
from tierserve.engine.spec_decode.stats import SpecDecodeStats
from tierserve.offload.usage import ExpertMetrics
from tierserve.server.metrics import MetricsSnapshot, render_prometheus

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tierserve.json"
METRIC = re.compile(r"tierserve:[a-zA-Z0-9_]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def _exported() -> dict[str, set[str]]:
    """Sample name -> its label names, from a real rendering of /metrics with every part on."""
    snap = MetricsSnapshot(model_name="m", prompt_tokens=3, generation_tokens=2, requests_finished={"stop": 1},
                           prefix_queries=4, prefix_hits=2, running=1, waiting=1, kv_usage=0.5)
    snap.ttft.observe(0.1)
    snap.itl.observe(0.01)
    snap.e2e.observe(1.0)
    snap.experts = ExpertMetrics(tokens={(0, 1): 5}, resident=6, offloaded=2, promotions=1)
    snap.kv_tiers = KVTierStats(hits={"dram": 1}, hit_tokens={"dram": 16}, bytes_loaded={"dram": 64},
                                bytes_stored={"dram": 64}, corrupt={"dram": 0}, failures={"dram": 0},
                                lookups=1, load_seconds=0.01)
    snap.spec = SpecDecodeStats(method="ngram", num_speculative_tokens=2, num_drafts=1, num_draft_tokens=2,
                                num_accepted_tokens=1, accepted_per_position=(1, 0))
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(render_prometheus([snap]).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_dashboard_query_names_exported_metrics_and_labels():
    dash = json.loads(DASHBOARD.read_text())
    exported = _exported()
    assert "tierserve:time_to_first_token_seconds_bucket" in exported  # the rendering is the real one
    queries = _queries(dash)
    assert len(queries) >= 20
    for expr in queries:
        names = METRIC.findall(expr)
        assert names, expr
        unknown = [n for n in names if n not in exported]
        assert not unknown, (expr, unknown)
        labels = set().union(*(exported[n] for n in names)) | {"le"}
        for group in BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels, (expr, label)


def test_dashboard_covers_the_serving_signals():
    text = " ".join(_queries(json.loads(DASHBOARD.read_text())))
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                   "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits",
                   "kv_tier_hit_tokens", "expert_tokens", "num_replicas"):
        assert f"tierserve:{metric}" in text, metric

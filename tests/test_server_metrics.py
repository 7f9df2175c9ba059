"""Metrics aggregation over replicas and the Prometheus rendering (no Ray)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tierserve.server.metrics import Histogram, MetricsBoard, WorkerMetrics, aggregate, render_prometheus


def samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_histogram_buckets_are_upper_inclusive():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.count == 4 and h.total == 3.65
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]


def worker(model: str, tokens: list[float], running: int, kv: float, hits: int):
    w = WorkerMetrics(model)
    last = None
    for t in tokens:                       # one request: first token at tokens[0], then the others
        w.observe_token(0.0, last, t, num_prompt_tokens=10, num_new_tokens=1)
        last = t
    w.observe_finish(0.0, tokens[-1], "length")
    return w.take(running=running, waiting=1, kv_usage=kv, prefix_queries=100, prefix_hits=hits)


def test_replicas_are_summed_per_model_and_kv_usage_averaged():
    a = worker("m", [0.2, 0.25, 0.3], running=2, kv=0.5, hits=10)
    b = worker("m", [0.05, 0.5], running=1, kv=0.1, hits=30)
    c = worker("other", [1.0], running=0, kv=0.0, hits=0)
    agg = aggregate([a, b, c])
    m = agg["m"]
    assert (m.num_replicas, m.running, m.waiting, m.prefix_hits, m.prefix_queries) == (2, 3, 2, 40, 200)
    assert m.prompt_tokens == 20 and m.generation_tokens == 5
    assert m.ttft.count == 2 and m.itl.count == 3 and m.e2e.count == 2
    assert abs(m.kv_usage - 0.3) < 1e-12 and m.requests_finished == {"length": 2}
    assert a.running == 2 and a.num_replicas == 1          # inputs untouched

    values = samples(render_prometheus([a, b, c]))
    lab = (("model_name", "m"),)
    assert values[("tierserve:num_requests_running", lab)] == 3
    assert values[("tierserve:prefix_cache_hits_total", lab)] == 40
    assert values[("tierserve:generation_tokens_total", lab)] == 5
    assert values[("tierserve:kv_cache_usage_perc", lab)] == 0.3
    assert values[("tierserve:time_to_first_token_seconds_count", lab)] == 2
    assert values[("tierserve:time_to_first_token_seconds_bucket", (("le", "0.1"), ("model_name", "m")))] == 1
    assert values[("tierserve:request_success_total", (("finished_reason", "length"), ("model_name", "m")))] == 2
    assert values[("tierserve:num_replicas", (("model_name", "other"),))] == 1


def test_board_forgets_silent_replicas():
    board = MetricsBoard()
    board.push("r1", worker("m", [0.1], 0, 0.0, 0))
    assert set(board.collect(30.0)) == {"r1"}
    assert board.collect(-1.0) == {}                         # everything is older than "now + 1 s"


def test_spec_decode_counters_are_summed_and_rendered():
    from tierserve.engine.spec_decode.stats import SpecDecodeCounters

    ca, cb = SpecDecodeCounters("ngram", 4), SpecDecodeCounters("ngram", 4)
    for drafts, accepted in ((4, 2), (4, 0), (3, 3)):
        ca.record(drafts, accepted)
    cb.record(2, 1)
    a, b = worker("m", [0.1], 1, 0.0, 0), worker("m", [0.2], 1, 0.0, 0)
    a.spec, b.spec = ca.snapshot(), cb.snapshot()
    plain = worker("m", [0.3], 0, 0.0, 0)               # a replica without speculation adds nothing
    m = aggregate([a, b, plain])["m"]
    # drafts 3 + 1, draft tokens 4+4+3 + 2, accepted 2+0+3 + 1; position i counts verifications accepting draft i
    assert (m.spec.num_drafts, m.spec.num_draft_tokens, m.spec.num_accepted_tokens) == (4, 13, 6)
    assert m.spec.accepted_per_position == (3, 2, 1) and m.spec.method == "ngram"
    assert a.spec.accepted_per_position == (2, 2, 1)     # inputs untouched

    values = samples(render_prometheus([a, b, plain]))
    lab = (("model_name", "m"),)
    assert values[("tierserve:spec_decode_num_drafts_total", lab)] == 4
    assert values[("tierserve:spec_decode_num_draft_tokens_total", lab)] == 13
    assert values[("tierserve:spec_decode_num_accepted_tokens_total", lab)] == 6
    assert values[("tierserve:spec_decode_num_accepted_tokens_per_pos_total",
                   (("model_name", "m"), ("position", "2")))] == 1
    assert values[("tierserve:spec_decode_mean_accepted_length", lab)] == 1 + 6 / 4
    no_spec = samples(render_prometheus([plain]))
    assert not any(name.startswith("tierserve:spec_decode") for name, _ in no_spec)

"""Expert-offload metrics through the replica path (WorkerMetrics -> MetricsBoard -> /metrics text) and
usage-file loading for placement (no Ray)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tierserve.errors import InvalidParameterError
from tierserve.offload.usage import ExpertMetrics, ExpertUsage
from tierserve.server.metrics import MetricsBoard, WorkerMetrics, render_prometheus


def samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_expert_counts_reach_metrics_summed_over_replicas():
    board = MetricsBoard()
    a = ExpertMetrics(tokens={(0, 1): 5, (1, 3): 2}, resident=6, offloaded=10, promotions=1)
    b = ExpertMetrics(tokens={(0, 1): 4, (0, 2): 7}, resident=6, offloaded=10, promotions=0)
    for rid, m in (("r1", a), ("r2", b), ("r3", None)):  # r3: a replica without offload
        board.push(rid, WorkerMetrics("moe").take(0, 0, 0.0, 0, 0, experts=m))
    values = samples(render_prometheus(list(board.collect(30.0).values())))
    tok = {k[1]: v for k, v in values.items() if k[0] == "tierserve:expert_tokens_total"}
    assert tok == {(("expert", "1"), ("layer", "0"), ("model_name", "moe")): 9.0,
                   (("expert", "2"), ("layer", "0"), ("model_name", "moe")): 7.0,
                   (("expert", "3"), ("layer", "1"), ("model_name", "moe")): 2.0}
    lab = (("model_name", "moe"),)
    assert values[("tierserve:experts_resident", lab)] == 12
    assert values[("tierserve:experts_offloaded", lab)] == 20
    assert values[("tierserve:expert_promotions_total", lab)] == 1
    assert a.tokens == {(0, 1): 5, (1, 3): 2}  # inputs untouched by the aggregation


def test_no_expert_families_without_offload():
    text = render_prometheus([WorkerMetrics("dense").take(0, 0, 0.0, 0, 0)]).decode()
    assert "expert" not in text


def test_usage_file_counts_are_checked_against_the_model(tmp_path):
    from tierserve.offload.apply import load_counts

    path = str(tmp_path / "usage.json")
    assert load_counts(path, [3, 3]) == [[0, 0, 0], [0, 0, 0]]  # missing: uniform
    usage = ExpertUsage(2, 3)
    usage.record(0, [2, 2, 1])
    usage.save(path)
    assert load_counts(path, [3, 3]) == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(InvalidParameterError, match="usage_path"):
        load_counts(path, [4, 4])

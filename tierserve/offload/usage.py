"""Expert usage statistics: how often each (layer, expert) pair was routed to.

Plain Python bookkeeping (no torch): ``counts[layer][expert]`` is the number of
(token, top-k slot) assignments routed to that expert, over live traffic or a
calibration run. It feeds hot-set placement (Luce Spark: rank experts per layer
by count) and is exported as metrics.

Persistence: ``save(path)`` writes JSON ``{"version": 1, "num_layers": L,
"num_experts": E, "counts": [[...E ints...] x L]}`` (atomically: temp file +
rename), conventionally ``expert_usage.json`` beside the model
(``usage_path(model_folder)``); ``load(path)`` validates the shape and that
every count is a non-negative integer.

``ranking(layer)``: expert ids by descending count, ties by ascending id.

``ExpertMetrics`` is what a replica exports (tierserve/server/metrics.py): the live
counts as ``tierserve:expert_tokens_total{model_name,layer,expert}`` and gauges of
resident / offloaded experts, a counter of promotions and the spare-slot prefetch
counters (issued / used / wasted, zero without a spare ring); ``add`` sums replicas.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from tierserve.errors import InvalidParameterError

USAGE_FILE = "expert_usage.json"
_VERSION = 1


@dataclass
class ExpertMetrics:
    """``tokens[(layer, expert)]``: (token, slot) assignments routed there since the replica started."""

    tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    resident: int = 0
    offloaded: int = 0
    promotions: int = 0
    prefetch_issued: int = 0  # spare-slot prefetches (tierserve.offload.slot_ledger PrefetchCounters)
    prefetch_used: int = 0
    prefetch_wasted: int = 0

    def add(self, other: "ExpertMetrics") -> None:
        for key, c in other.tokens.items():
            self.tokens[key] = self.tokens.get(key, 0) + c
        for name in ("resident", "offloaded", "promotions", "prefetch_issued", "prefetch_used", "prefetch_wasted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def usage_path(model_folder: str) -> str:
    return os.path.join(model_folder, USAGE_FILE)


class ExpertUsage:
    def __init__(self, num_layers: int, num_experts: int):
        if num_layers < 1:
            raise InvalidParameterError("num_layers", f"must be >= 1, got {num_layers}")
        if num_experts < 1:
            raise InvalidParameterError("num_experts", f"must be >= 1, got {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.counts = [[0] * num_experts for _ in range(num_layers)]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise InvalidParameterError("layer", f"must be in [0, {self.num_layers}), got {layer}")

    def record(self, layer: int, expert_ids: Iterable[int]) -> None:
        """Count one routing assignment per id in ``expert_ids``."""
        self._check_layer(layer)
        row = self.counts[layer]
        for e in expert_ids:
            if not 0 <= e < self.num_experts:
                raise InvalidParameterError("expert_id", f"must be in [0, {self.num_experts}), got {e}")
            row[e] += 1

    def record_counts(self, layer: int, counts: list[int]) -> None:
        """Add a per-expert count vector (e.g. one ``bincount`` of a step's routed ids)."""
        self._check_layer(layer)
        if len(counts) != self.num_experts:
            raise InvalidParameterError("counts", f"must have num_experts={self.num_experts} entries, "
                                                  f"got {len(counts)}")
        if any(c < 0 for c in counts):
            raise InvalidParameterError("counts", f"must be non-negative, got {counts}")
        row = self.counts[layer]
        for e, c in enumerate(counts):
            row[e] += int(c)

    def merge(self, other: "ExpertUsage") -> None:
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise InvalidParameterError("usage", f"shape {(other.num_layers, other.num_experts)} does not match "
                                                 f"{(self.num_layers, self.num_experts)}")
        for layer in range(self.num_layers):
            self.record_counts(layer, other.counts[layer])

    def total(self, layer: int) -> int:
        self._check_layer(layer)
        return sum(self.counts[layer])

    def ranking(self, layer: int) -> list[int]:
        """Expert ids of ``layer`` by descending count, ties by ascending id."""
        self._check_layer(layer)
        row = self.counts[layer]
        return sorted(range(self.num_experts), key=lambda e: (-row[e], e))

    def as_metrics(self) -> dict[tuple[int, int], int]:
        return {(layer, e): c for layer, row in enumerate(self.counts) for e, c in enumerate(row)}

    def to_json(self) -> dict:
        return {"version": _VERSION, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "counts": [list(row) for row in self.counts]}

    @classmethod
    def from_json(cls, data: dict) -> "ExpertUsage":
        if data.get("version") != _VERSION:
            raise InvalidParameterError("version", f"expert usage version must be {_VERSION}, "
                                                   f"got {data.get('version')!r}")
        usage = cls(int(data["num_layers"]), int(data["num_experts"]))
        counts = data.get("counts")
        if not isinstance(counts, list) or len(counts) != usage.num_layers:
            raise InvalidParameterError("counts", f"must be a list of num_layers={usage.num_layers} rows")
        for layer, row in enumerate(counts):
            if not isinstance(row, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in row):
                raise InvalidParameterError("counts", f"row {layer} must be a list of integers")
            usage.record_counts(layer, row)
        return usage

    def save(self, path: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".usage-", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ExpertUsage":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertUsage) and self.to_json() == other.to_json()

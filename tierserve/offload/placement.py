"""Expert placement: which experts stay resident on the worker, which hosts hold the cold ones.

Pure bookkeeping over ints (no torch). Inputs are usage counts ``counts[layer][expert]``
(how often live traffic routed a token to that expert, see ``tierserve.offload.usage``).

**Ranking.** Within a layer experts are ranked by ``(-count, expert_id)``: highest
count first, ties to the lower expert id.

**plan_placement** (Luce Spark's calibrated hot set). With a budget ``B`` of resident
experts (a count, or bytes when ``expert_bytes[layer][expert]`` is given) and a
per-layer floor ``f``:

1. every layer gets its top-``f`` ranked experts (the floor); if the floor alone
   exceeds the budget the request is rejected (InvalidParameterError ``budget``);
2. then, repeatedly, the next slot goes to the layer whose next-ranked (not yet
   resident) expert has the highest count; ties go to the layer holding the fewest
   experts so far, then to the lower layer index (uniform counts, e.g. no usage
   file yet, spread the budget evenly over the layers). With a
   byte budget a layer whose next expert does not fit in the remaining bytes is
   closed (its later experts are not considered: residency stays a ranked prefix).
   Stops when the budget is spent or every expert is resident.

Because each layer's remaining counts are non-increasing in rank, step 2 picks the
largest remaining counts of the union of layers: with a count budget the result
maximises the total resident count among all allocations that keep the floor
(tests check this against brute-force enumeration).

**shard_cold** assigns each cold expert to a host (longest-processing-time greedy):
cold experts in order ``(-bytes, -count, layer, expert)``, each to the host with the
smallest ``(bytes held, count routed to it in this layer, host index)``. With equal
expert sizes every host holds the same number of experts (+-1) and, within a layer,
traffic is spread so that the per-layer fused messages are of similar size.

**plan_promotions** (at request boundaries only). Per layer, pair the i-th highest-
count cold expert with the i-th lowest-count resident expert; a pair is a candidate
swap when ``count(cold) - count(resident) >= min_gain``. Candidates from all layers
are ordered by ``(-gain, layer, promote)`` and at most ``max_swaps`` are returned.
Within a layer gains are non-increasing in i, so the chosen swaps of a layer are
always its best ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

from tierserve.errors import InvalidParameterError

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Placement:
    """``resident[layer]``: sorted expert ids kept on the worker; ``num_experts[layer]``: experts in the layer."""

    resident: tuple[tuple[int, ...], ...]
    num_experts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.resident) != len(self.num_experts):
            raise InvalidParameterError("resident", f"has {len(self.resident)} layers, num_experts {len(self.num_experts)}")
        for layer, (res, n) in enumerate(zip(self.resident, self.num_experts)):
            if any(not 0 <= e < n for e in res) or len(set(res)) != len(res):
                raise InvalidParameterError("resident", f"layer {layer}: ids {res} must be distinct in [0, {n})")

    @classmethod
    def all_resident(cls, num_experts: Sequence[int]) -> "Placement":
        return cls(tuple(tuple(range(n)) for n in num_experts), tuple(num_experts))

    def is_resident(self, layer: int, expert: int) -> bool:
        return expert in self.resident[layer]

    def cold(self, layer: int) -> tuple[int, ...]:
        res = set(self.resident[layer])
        return tuple(e for e in range(self.num_experts[layer]) if e not in res)

    def cold_keys(self) -> list[Key]:
        return [(layer, e) for layer in range(len(self.num_experts)) for e in self.cold(layer)]

    @property
    def num_resident(self) -> int:
        return sum(len(r) for r in self.resident)

    @property
    def fraction_resident(self) -> float:
        return self.num_resident / max(1, sum(self.num_experts))


@dataclass(frozen=True)
class Swap:
    """Promote cold ``promote`` and evict resident ``evict`` in ``layer``; ``gain`` = count difference."""

    layer: int
    promote: int
    evict: int
    gain: int


def _ranked(row: Sequence[int]) -> list[int]:
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def _check_counts(counts: Sequence[Sequence[int]]) -> None:
    if not counts:
        raise InvalidParameterError("counts", "must have at least one layer")
    for layer, row in enumerate(counts):
        if not row:
            raise InvalidParameterError("counts", f"layer {layer} has no experts")
        if any(c < 0 for c in row):
            raise InvalidParameterError("counts", f"layer {layer} has a negative count")


def plan_placement(counts: Sequence[Sequence[int]], budget: int, per_layer_floor: int = 0,
                   expert_bytes: Sequence[Sequence[int]] | None = None) -> Placement:
    """Resident set per layer under ``budget`` experts (or bytes, with ``expert_bytes``); see module doc."""
    _check_counts(counts)
    num_layers = len(counts)
    if budget < 0:
        raise InvalidParameterError("budget", f"must be >= 0, got {budget}")
    if per_layer_floor < 0 or per_layer_floor > min(len(r) for r in counts):
        raise InvalidParameterError(
            "per_layer_floor", f"must be in [0, {min(len(r) for r in counts)}] (experts per layer), got {per_layer_floor}")
    size = (lambda layer, e: 1) if expert_bytes is None else (lambda layer, e: int(expert_bytes[layer][e]))
    ranked = [_ranked(row) for row in counts]
    taken = [0] * num_layers
    spent = 0
    for layer in range(num_layers):
        for e in ranked[layer][:per_layer_floor]:
            spent += size(layer, e)
        taken[layer] = per_layer_floor
    if spent > budget:
        raise InvalidParameterError(
            "budget", f"the per-layer floor {per_layer_floor} x {num_layers} layers needs {spent}, budget is {budget}")
    open_layers = set(range(num_layers))
    while True:
        best = None
        for layer in sorted(open_layers):
            if taken[layer] == len(ranked[layer]):
                continue
            e = ranked[layer][taken[layer]]
            if best is None or (counts[layer][e], -taken[layer]) > (counts[best[0]][best[1]], -taken[best[0]]):
                best = (layer, e)  # ties: the layer holding fewest so far (uniform counts spread evenly)
        if best is None:
            break
        layer, e = best
        if spent + size(layer, e) > budget:
            if expert_bytes is None:
                break  # every expert costs 1: nothing else fits either
            open_layers.discard(layer)
            continue
        spent += size(layer, e)
        taken[layer] += 1
    resident = tuple(tuple(sorted(ranked[layer][:taken[layer]])) for layer in range(num_layers))
    return Placement(resident, tuple(len(r) for r in counts))


def shard_cold(placement: Placement, hosts: Sequence[str], counts: Sequence[Sequence[int]] | None = None,
               expert_bytes: Sequence[Sequence[int]] | None = None) -> dict[str, list[Key]]:
    """Host -> sorted cold (layer, expert) keys, balanced by bytes then per-layer count (module doc)."""
    if not hosts:
        if placement.cold_keys():
            raise InvalidParameterError("hosts", "at least one expert host is needed to hold cold experts")
        return {}
    if len(set(hosts)) != len(hosts):
        raise InvalidParameterError("hosts", f"names must be distinct, got {list(hosts)}")
    cnt = (lambda k: 0) if counts is None else (lambda k: counts[k[0]][k[1]])
    nbytes = (lambda k: 1) if expert_bytes is None else (lambda k: expert_bytes[k[0]][k[1]])
    held = [0] * len(hosts)
    layer_load: dict[tuple[int, int], int] = {}
    out: dict[str, list[Key]] = {h: [] for h in hosts}
    for key in sorted(placement.cold_keys(), key=lambda k: (-nbytes(k), -cnt(k), k[0], k[1])):
        i = min(range(len(hosts)), key=lambda h: (held[h], layer_load.get((h, key[0]), 0), h))
        held[i] += nbytes(key)
        layer_load[(i, key[0])] = layer_load.get((i, key[0]), 0) + cnt(key)
        out[hosts[i]].append(key)
    return {h: sorted(keys) for h, keys in out.items()}


def plan_promotions(placement: Placement, counts: Sequence[Sequence[int]], min_gain: int,
                    max_swaps: int) -> list[Swap]:
    """Swaps worth doing at a request boundary (module doc); never more than ``max_swaps``."""
    _check_counts(counts)
    if min_gain < 1:
        raise InvalidParameterError("min_gain", f"must be >= 1, got {min_gain}")
    if max_swaps < 0:
        raise InvalidParameterError("max_swaps", f"must be >= 0, got {max_swaps}")
    candidates: list[Swap] = []
    for layer, row in enumerate(counts):
        cold = sorted(placement.cold(layer), key=lambda e: (-row[e], e))
        resident = sorted(placement.resident[layer], key=lambda e: (row[e], e))
        for promote, evict in zip(cold, resident):
            gain = row[promote] - row[evict]
            if gain < min_gain:
                break
            candidates.append(Swap(layer, promote, evict, gain))
    candidates.sort(key=lambda s: (-s.gain, s.layer, s.promote))
    return candidates[:max_swaps]


def apply_swaps(placement: Placement, swaps: Sequence[Swap]) -> Placement:
    """The placement after ``swaps`` (each must promote a cold and evict a resident expert)."""
    resident = [set(r) for r in placement.resident]
    for s in swaps:
        if s.promote in resident[s.layer] or s.evict not in resident[s.layer]:
            raise InvalidParameterError("swaps", f"{s} does not promote a cold / evict a resident expert")
        resident[s.layer].remove(s.evict)
        resident[s.layer].add(s.promote)
    return Placement(tuple(tuple(sorted(r)) for r in resident), placement.num_experts)

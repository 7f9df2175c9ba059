"""DispatchPlan: where each routed (token, slot) row of one MoE layer runs, planned over ints.

Pure bookkeeping (no torch). Input: the router's expert ids ``expert_ids[t][j]`` for
``T`` tokens and ``k`` slots, and where each expert of the layer is right now:
``resident`` (its module is on the worker), ``spare`` (held in a spare slot),
``owners`` (cold expert -> the live host computing it; a cold expert with no owner
was rebuilt on the worker after every host failed) and ``prefer_fetch(n)`` (the cost
model: copy a cold expert with ``n`` rows into a spare slot rather than send the rows;
None when there is no spare ring).

Rows. Row ``r = t*k + j`` is token ``t``'s slot ``j``; an expert's group holds its rows
ascending (the order a stable sort by expert id gives, ``models.moe.expert_rows``),
groups come in ascending expert id.

Decision per expert with rows, first match wins:

1. resident -> ``local`` with source ``"resident"``;
2. in a spare slot -> ``local``, ``"spare"``;
3. no owner -> ``local``, ``"worker"`` (failed over onto the worker);
4. ``prefer_fetch(len(rows))`` -> ``fetches`` (copied into a spare slot, then run locally);
5. else -> the owner's ``HostMessage``.

Messages. ONE per host, in order of the host's lowest expert id; a message holds its
experts' groups in ascending expert id, so it carries ``rows`` (concatenated),
``tokens`` = ``rows // k`` (which rows of ``x`` are sent, no padding) and
``expert_ids`` (one per row).

Summation order. Every output row is gated and written to row ``r`` of a ``[T*k,
hidden]`` buffer wherever it ran; token ``t``'s output is then summed over its slots in
slot order, ``sum_order[t] = (t*k, t*k+1, ..., t*k+k-1)`` (``models.moe.sum_slots``),
the same order as the all-resident block: that and identical kernels on identical rows
make offloaded output bit-identical to all-resident.

``plan_resend(layer, groups, owners, top_k)``: after a failover, the same grouping for
the groups that still need a result (new owners, or the worker).

Tests: tests/test_dispatch_plan.py (exact rows, order, hosts for each decision).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from tierserve.errors import InvalidParameterError

#: Where a local group runs (module doc, decisions 1-3).
LOCAL_SOURCES = ("resident", "spare", "worker")


@dataclass(frozen=True)
class ExpertGroup:
    """Expert ``expert``'s rows ``t*k + j``, ascending."""

    expert: int
    rows: tuple[int, ...]


@dataclass(frozen=True)
class LocalGroup:
    """A group computed on the worker; ``source`` one of ``LOCAL_SOURCES``."""

    expert: int
    rows: tuple[int, ...]
    source: str


@dataclass(frozen=True)
class HostMessage:
    """The one fused message to ``host``: its experts' groups in ascending expert id."""

    host: str
    groups: tuple[ExpertGroup, ...]
    top_k: int

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(r for g in self.groups for r in g.rows)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The rows of ``x`` sent, one per routed row (``row // k``)."""
        return tuple(r // self.top_k for g in self.groups for r in g.rows)

    @property
    def expert_ids(self) -> tuple[int, ...]:
        return tuple(g.expert for g in self.groups for _ in g.rows)


@dataclass(frozen=True)
class DispatchPlan:
    """One layer's dispatch for one step (module doc)."""

    layer: int
    num_tokens: int
    top_k: int
    local: tuple[LocalGroup, ...]
    fetches: tuple[ExpertGroup, ...]
    messages: tuple[HostMessage, ...]

    @property
    def sum_order(self) -> tuple[tuple[int, ...], ...]:
        """Per token, the buffer rows summed, in summation order."""
        k = self.top_k
        return tuple(tuple(range(t * k, t * k + k)) for t in range(self.num_tokens))

    @property
    def remote_rows(self) -> int:
        return sum(len(g.rows) for m in self.messages for g in m.groups)


def group_rows(expert_ids: Sequence[Sequence[int]], num_experts: int) -> list[ExpertGroup]:
    """Rows ``t*k + j`` by expert, ascending expert id, rows ascending within a group."""
    rows: dict[int, list[int]] = {}
    k = len(expert_ids[0]) if expert_ids else 0
    for t, slots in enumerate(expert_ids):
        if len(slots) != k:
            raise InvalidParameterError("expert_ids", f"every token needs {k} slots, token {t} has {len(slots)}")
        for j, e in enumerate(slots):
            if not 0 <= e < num_experts:
                raise InvalidParameterError("expert_ids", f"must be in [0, {num_experts}), got {e}")
            rows.setdefault(e, []).append(t * k + j)
    return [ExpertGroup(e, tuple(rows[e])) for e in sorted(rows)]


def _messages(remote: dict[str, list[ExpertGroup]], top_k: int) -> tuple[HostMessage, ...]:
    return tuple(HostMessage(h, tuple(gs), top_k) for h, gs in remote.items())


def plan_dispatch(layer: int, expert_ids: Sequence[Sequence[int]], num_experts: int, resident: Collection[int],
                  owners: Mapping[int, str], spare: Collection[int] = (),
                  prefer_fetch: Callable[[int], bool] | None = None) -> DispatchPlan:
    """The dispatch of one layer's routed rows (module doc); ``owners``/``spare`` keyed by expert id."""
    local: list[LocalGroup] = []
    fetches: list[ExpertGroup] = []
    remote: dict[str, list[ExpertGroup]] = {}
    top_k = len(expert_ids[0]) if expert_ids else 0
    for g in group_rows(expert_ids, num_experts):
        owner = owners.get(g.expert)
        if g.expert in resident:
            local.append(LocalGroup(g.expert, g.rows, "resident"))
        elif g.expert in spare:
            local.append(LocalGroup(g.expert, g.rows, "spare"))
        elif owner is None:
            local.append(LocalGroup(g.expert, g.rows, "worker"))
        elif prefer_fetch is not None and prefer_fetch(len(g.rows)):
            fetches.append(g)
        else:
            remote.setdefault(owner, []).append(g)
    return DispatchPlan(layer, len(expert_ids), top_k, tuple(local), tuple(fetches), _messages(remote, top_k))


def plan_resend(layer: int, groups: Sequence[ExpertGroup], owners: Mapping[int, str], top_k: int,
                num_tokens: int = 0) -> DispatchPlan:
    """Groups still without a result after a failover: to their new owners, or the worker when none."""
    local: list[LocalGroup] = []
    remote: dict[str, list[ExpertGroup]] = {}
    for g in groups:
        owner = owners.get(g.expert)
        if owner is None:
            local.append(LocalGroup(g.expert, g.rows, "worker"))
        else:
            remote.setdefault(owner, []).append(g)
    return DispatchPlan(layer, num_tokens, top_k, tuple(local), (), _messages(remote, top_k))

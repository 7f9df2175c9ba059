"""The pure dispatch planner (tierserve/offload/dispatch_plan.py): exact rows, order and hosts, no torch."""

from __future__ import annotations

import sys

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.offload.dispatch_plan import (DispatchPlan, ExpertGroup, HostMessage, LocalGroup, group_rows,
                                             plan_dispatch, plan_resend)

# 4 tokens x top-2 over 6 experts; row r = t*2 + j
IDS = [[3, 0], [5, 3], [0, 1], [3, 4]]


def test_group_rows_by_expert_ascending_rows_ascending():
    assert group_rows(IDS, 6) == [ExpertGroup(0, (1, 4)), ExpertGroup(1, (5,)), ExpertGroup(3, (0, 3, 6)),
                                  ExpertGroup(4, (7,)), ExpertGroup(5, (2,))]


def test_plan_resident_spare_worker_fetch_and_one_message_per_host():
    owners = {1: "hostB", 3: "hostA", 4: "hostB", 5: "hostA"}  # expert 2 has no owner: on the worker
    plan = plan_dispatch(7, IDS + [[2, 3]], 6, resident={0}, owners=owners, spare={4},
                         prefer_fetch=lambda n: n >= 4)
    assert plan == DispatchPlan(
        layer=7, num_tokens=5, top_k=2,
        local=(LocalGroup(0, (1, 4), "resident"), LocalGroup(2, (8,), "worker"), LocalGroup(4, (7,), "spare")),
        fetches=(ExpertGroup(3, (0, 3, 6, 9)),),
        messages=(HostMessage("hostB", (ExpertGroup(1, (5,)),), 2), HostMessage("hostA", (ExpertGroup(5, (2,)),), 2)))
    # hosts in order of their lowest expert id; the message's x rows are row // k
    assert [m.host for m in plan.messages] == ["hostB", "hostA"]
    assert plan.remote_rows == 2


def test_message_concatenates_groups_in_expert_order():
    plan = plan_dispatch(0, IDS, 6, resident=(), owners={0: "h1", 1: "h0", 3: "h1", 4: "h0", 5: "h1"})
    assert plan.local == () and plan.fetches == ()
    h1, h0 = plan.messages
    assert (h1.host, h0.host) == ("h1", "h0")
    assert h1.rows == (1, 4, 0, 3, 6, 2)            # expert 0's rows, then 3's, then 5's
    assert h1.tokens == (0, 2, 0, 1, 3, 1)          # x rows sent: row // 2
    assert h1.expert_ids == (0, 0, 3, 3, 3, 5)
    assert (h0.rows, h0.tokens, h0.expert_ids) == ((5, 7), (2, 3), (1, 4))
    # every routed row is planned exactly once
    assert sorted(h1.rows + h0.rows) == list(range(8))


def test_sum_order_is_slot_order_per_token():
    plan = plan_dispatch(0, [[1, 0, 2], [2, 1, 0]], 3, resident={0, 1, 2}, owners={})
    assert plan.sum_order == ((0, 1, 2), (3, 4, 5))
    assert [g.source for g in plan.local] == ["resident"] * 3


def test_no_ring_never_fetches_and_resident_wins_over_spare():
    owners = {e: "h" for e in range(6)}
    plan = plan_dispatch(0, IDS, 6, resident={3}, owners=owners, spare={3, 5}, prefer_fetch=None)
    assert plan.fetches == ()
    assert [(g.expert, g.source) for g in plan.local] == [(3, "resident"), (5, "spare")]
    assert plan.messages == (HostMessage("h", (ExpertGroup(0, (1, 4)), ExpertGroup(1, (5,)), ExpertGroup(4, (7,))),
                                         2),)


def test_resend_goes_to_new_owners_or_the_worker():
    groups = [ExpertGroup(1, (5,)), ExpertGroup(3, (0, 2, 6)), ExpertGroup(4, (7,))]
    plan = plan_resend(2, groups, {3: "h0", 4: "h0"}, top_k=2)
    assert plan.local == (LocalGroup(1, (5,), "worker"),)
    assert plan.messages == (HostMessage("h0", (ExpertGroup(3, (0, 2, 6)), ExpertGroup(4, (7,))), 2),)


@pytest.mark.parametrize("ids, match", [([[0, 6]], "expert_ids"), ([[0, 1], [2]], "expert_ids"),
                                        ([[-1, 0]], "expert_ids")])
def test_bad_expert_ids_are_rejected(ids, match):
    with pytest.raises(InvalidParameterError, match=match):
        plan_dispatch(0, ids, 6, resident=(), owners={})


def test_plan_is_frozen_and_torch_free():
    plan = plan_dispatch(0, IDS, 6, resident={0}, owners={1: "h", 3: "h", 4: "h", 5: "h"})
    with pytest.raises(AttributeError):
        plan.layer = 1  # type: ignore[misc]
    import tierserve.offload.dispatch_plan as mod

    assert "torch" not in mod.__dict__ and "import torch" not in open(mod.__file__).read()
    assert sys.modules[mod.__name__] is mod

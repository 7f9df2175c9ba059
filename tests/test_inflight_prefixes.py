"""routing/inflight.py: the router's record of prefixes it sent where, exact bookkeeping."""

from __future__ import annotations

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.routing.inflight import InflightPrefixes, merge_matches

A, B, C, D = (bytes([i]) * 32 for i in range(1, 5))


def test_match_is_each_replicas_leading_run_of_recorded_hashes():
    fl = InflightPrefixes(ttl_s=10)
    fl.record("x", [A, B, C], now=0.0)
    fl.record("y", [A, D], now=0.0)
    assert fl.match([A, B, C, D], ["x", "y", "z"], now=1.0) == {"x": 3, "y": 1}
    assert fl.match([D, A, B], ["x"], now=1.0) == {}          # a run counts from the first block
    assert fl.match([A, D], ["x", "y"], now=1.0) == {"x": 1, "y": 2}
    assert fl.match([], ["x", "y"], now=1.0) == {}
    assert len(fl) == 5


def test_entries_expire_after_ttl_and_recording_again_refreshes_them():
    fl = InflightPrefixes(ttl_s=10)
    fl.record("x", [A, B], now=0.0)
    fl.record("x", [A], now=5.0)                                # A refreshed to 15, B stays at 10
    assert fl.match([A, B], ["x"], now=9.999) == {"x": 2}
    assert fl.match([A, B], ["x"], now=10.0) == {"x": 1}
    assert len(fl) == 1                                         # B dropped
    assert fl.match([A, B], ["x"], now=15.0) == {}
    assert len(fl) == 0


def test_a_clock_read_out_of_order_never_revives_an_expired_entry():
    fl = InflightPrefixes(ttl_s=10)
    fl.record("x", [A], now=20.0)                               # expires at 30
    fl.record("x", [B], now=5.0)                                # expires at 15, behind A in order
    assert fl.match([B], ["x"], now=16.0) == {}


def test_oldest_entries_go_first_past_max_hashes():
    fl = InflightPrefixes(ttl_s=10, max_hashes=3)
    fl.record("x", [A, B], now=0.0)
    fl.record("y", [A, B], now=1.0)
    assert len(fl) == 3
    assert fl.match([A, B], ["x", "y"], now=2.0) == {"y": 2}   # x's A went first; x's B alone is no prefix


def test_forget_drops_one_replica():
    fl = InflightPrefixes()
    fl.record("x", [A, B], now=0.0)
    fl.record("y", [A], now=0.0)
    assert fl.forget("x") == 2
    assert fl.match([A, B], ["x", "y"], now=0.0) == {"y": 1}


def test_ttl_zero_records_nothing():
    fl = InflightPrefixes(ttl_s=0)
    fl.record("x", [A, B], now=0.0)
    assert len(fl) == 0 and fl.match([A, B], ["x"], now=0.0) == {}


@pytest.mark.parametrize("kwargs,field,detail", [
    ({"ttl_s": -1}, "inflight_ttl_s", "must be >= 0 seconds, got -1"),
    ({"ttl_s": float("nan")}, "inflight_ttl_s", "must be >= 0 seconds, got nan"),
    ({"max_hashes": 0}, "inflight_max_hashes", "must be an integer >= 1, got 0"),
    ({"max_hashes": True}, "inflight_max_hashes", "must be an integer >= 1, got True"),
])
def test_bad_settings_name_the_field(kwargs, field, detail):
    with pytest.raises(InvalidParameterError) as e:
        InflightPrefixes(**kwargs)
    assert (e.value.field, e.value.detail) == (field, detail)


def test_merge_takes_the_larger_device_match_and_shortens_lower_tiers_behind_it():
    device = {"x": 2, "y": 5}
    lower = {"dram": {"x": 4, "z": 3}, "redis": {"x": 1}}      # x: dram blocks 2..5, redis block 2
    merged, tiers = merge_matches(device, lower, {"x": 4, "y": 3, "w": 1})
    assert merged == {"x": 4, "y": 5, "w": 1}
    assert tiers == {"dram": {"x": 2, "z": 3}}                 # x's dram now serves blocks 4..5; redis none
    assert merge_matches(device, lower, {}) == (device, lower)

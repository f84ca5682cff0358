"""The deployed-round timeline split (benchmarks.supernode_wait), on hand-made events."""

from __future__ import annotations

import pytest

from benchmarks.supernode_wait import split


def test_a_round_splits_into_idle_clientapp_and_after_reply():
    # Server checkpoints rounds 1 and 2 at 10 s and 20 s; site 0 pulls round 2 at
    # 12.5 s and replies at 17 s; site 1 pulls at 11 s and replies at 19 s.
    events = {"checkpoint": {1: 10.0, 2: 20.0},
              "receive": {0: [1.0, 12.5], 1: [1.0, 11.0]},
              "send": {0: [5.0, 17.0], 1: [6.0, 19.0]}}
    res = split(events, rounds=2)
    (row,) = res["rows"]
    assert row["round_seconds"] == pytest.approx(10.0)
    assert row["sites"][0] == pytest.approx({"idle": 2.5, "clientapp": 4.5, "after_reply": 3.0})
    assert row["sites"][1] == pytest.approx({"idle": 1.0, "clientapp": 8.0, "after_reply": 1.0})
    assert res["idle_max"] == pytest.approx(2.5)
    assert res["slowest_site_idle_mean"] == pytest.approx(2.5)
    assert res["mean"]["idle"] == pytest.approx(1.75)

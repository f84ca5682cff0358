"""The run directory's owner (server/records.py) and the too-few-nodes warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from common.config import RunConfig
from server.records import RunRecords, run_dir
from server.run import warn_if_too_few_nodes
from server.strategy import HeadFedAvg, SiteRecord
from tests.server.test_strategy import FakeGrid


def test_fewer_nodes_than_sites_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_too_few_nodes(FakeGrid([11, 12]), RunConfig(num_sites=4)) == 2
    assert "2 node(s) connected, num-sites = 4" in caplog.text
    assert "num-supernodes=4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_if_too_few_nodes(FakeGrid([1, 2, 3, 4]), RunConfig(num_sites=4))
    assert caplog.text == ""


def test_run_dir_is_out_dir_or_a_fresh_runs_folder(tmp_path):
    assert run_dir(RunConfig(out_dir=str(tmp_path))) == tmp_path
    assert run_dir(RunConfig()).parent.name == "runs"


def test_checkpoint_round_trip_restores_sites_heads_and_rounds(tmp_path):
    head = {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(2, np.float32)}
    strategy = HeadFedAvg()
    rec = SiteRecord(site_id=3, node_id=77, epsilon=0.4, delta=1e-5,
                     history=[{"round": 1, "num_examples": 10}])
    strategy.restore_site(rec, {k: v + 1 for k, v in head.items()})
    strategy.dropped.append({"round": 1, "node": 5, "reason": "nan"})
    records = RunRecords(tmp_path)
    records.save_checkpoint(2, head, strategy, rounds=[{"round": 1}, {"round": 2}], run_id="r1")

    fresh = HeadFedAvg()
    zeros = {k: np.zeros_like(v) for k, v in head.items()}
    first, arrays, rounds, info = RunRecords(tmp_path).resume(fresh, zeros, num_rounds=5)
    assert (first, [r["round"] for r in rounds], info["run_id"]) == (3, [1, 2], "r1")
    np.testing.assert_array_equal(arrays["weight"], head["weight"])
    assert list(arrays) == list(zeros)  # this run's key order
    assert fresh.sites[3] == rec
    np.testing.assert_array_equal(fresh.site_heads[3]["bias"], head["bias"] + 1)
    assert fresh.dropped == strategy.dropped
    with pytest.raises(ValueError, match="beyond num-rounds=1"):
        RunRecords(tmp_path).resume(HeadFedAvg(), zeros, num_rounds=1)

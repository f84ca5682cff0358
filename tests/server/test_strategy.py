"""Head aggregation (weighted FedAvg) and reply validation, on real Flower messages.

Layout follows Flower's strategy tests: prepare the replies, execute the
aggregation, assert against values worked out by hand.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.protocol import from_array_record, to_array_record
from server.strategy import HeadFedAvg
from server.validation import update_problem

NODES = (11, 22, 33)


class FakeGrid:
    """The one Grid method sampling needs: the connected node ids."""

    def __init__(self, node_ids=NODES) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def _global() -> dict[str, np.ndarray]:
    return {"weight": np.zeros(2, np.float32), "bias": np.zeros(1, np.float32)}


def _metrics(site_id: int, num_examples, **extra) -> MetricRecord:
    m = {"site-id": site_id, "num-examples": num_examples, "epsilon": 0.5 + site_id,
         "delta": 1e-5, "noise-multiplier": 1.1, "sample-rate": 0.25, "steps": 4,
         "dp": 1, "ledger-entries": 1, "feature-seconds": 0.01,
         "train-seconds": 0.2, "privacy-seconds": 0.1, "site-seconds": 0.3}
    m.update(extra)
    return MetricRecord(m)


def _configure(strategy: HeadFedAvg, server_round: int = 1, grid=None) -> dict[int, Message]:
    """Run the strategy's configure_train; the instructions keyed by node id."""
    grid = grid or FakeGrid()
    msgs = strategy.configure_train(server_round, to_array_record(_global()),
                                    ConfigRecord({"num-rounds": 3}), grid)
    return {m.metadata.dst_node_id: m for m in msgs}


def _reply(instruction: Message, arrays: dict[str, np.ndarray], metrics: MetricRecord) -> Message:
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": metrics,
                          "status": ConfigRecord({"status": "ok"})})
    return Message(content=content, reply_to=instruction)


def _strategy() -> HeadFedAvg:
    return HeadFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2,
                      min_evaluate_nodes=2, min_available_nodes=2)


def _head(weight, bias, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"weight": np.array(weight, dtype), "bias": np.array(bias, dtype)}


def _good_two(sent: dict[int, Message]) -> list[Message]:
    return [
        _reply(sent[11], _head([1, 2], [0]), _metrics(0, 1)),
        _reply(sent[22], _head([3, 4], [4]), _metrics(1, 3)),
    ]


def test_configure_train_sends_the_global_head_and_round_to_every_node():
    strategy = _strategy()
    sent = _configure(strategy, server_round=2)
    assert sorted(sent) == sorted(NODES)
    for msg in sent.values():
        assert msg.metadata.message_type == "train"
        assert msg.content["config"]["server-round"] == 2
        got = from_array_record(msg.content["arrays"])
        np.testing.assert_array_equal(got["weight"], _global()["weight"])


def test_weighted_fedavg_matches_hand_computed_mean():
    # Prepare: site 0 sends weight [1, 2], bias [0] from 1 example;
    # site 1 sends weight [3, 4], bias [4] from 3 examples.
    strategy = _strategy()
    replies = _good_two(_configure(strategy))

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: (1*[1,2] + 3*[3,4]) / 4 = [2.5, 3.5]; (1*0 + 3*4) / 4 = 3
    got = from_array_record(arrays)
    np.testing.assert_allclose(got["weight"], [2.5, 3.5], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["bias"], [3.0], rtol=0, atol=1e-6)
    assert got["weight"].dtype == np.float32
    assert metrics["sites"] == 2 and metrics["num-examples"] == 4
    assert strategy.dropped == []


def test_equal_weights_give_the_plain_mean():
    strategy = _strategy()
    sent = _configure(strategy)
    replies = [_reply(sent[n], _head([v, -v], [2 * v]), _metrics(i, 5))
               for i, (n, v) in enumerate(zip(NODES, (1.0, 2.0, 6.0), strict=True))]
    got = from_array_record(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(got["weight"], [3.0, -3.0], atol=1e-6)
    np.testing.assert_allclose(got["bias"], [6.0], atol=1e-6)


def test_accepted_reply_records_the_sites_epsilon_and_mechanism():
    strategy = _strategy()
    strategy.aggregate_train(1, _good_two(_configure(strategy)))
    site = strategy.sites[1]
    assert (site.node_id, site.epsilon, site.delta) == (22, 1.5, 1e-5)
    assert site.history == [{
        "round": 1, "run_id": "", "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 4,
        "num_examples": 3, "epsilon_after": 1.5, "dp": True, "ledger_entries": 1,
        "ledger_head": "", "ledger_signature": "", "ledger_id": "", "ledger_key_id": "",
        "privacy_unit": "record", "feature_seconds": 0.01, "train_seconds": 0.2,
        "privacy_seconds": 0.1, "site_seconds": 0.3}]


@pytest.mark.parametrize("bad_head, num_examples, reason", [
    (_head([math.nan, 1], [0]), 5, "contains NaN or Inf"),
    (_head([math.inf, 1], [0]), 5, "contains NaN or Inf"),
    (_head([[1, 2]], [0]), 5, "has shape (1, 2), expected (2,)"),
    (_head([1, 2], [0], dtype=np.float64), 5, "has dtype float64, expected float32"),
    ({"weight": np.ones(2, np.float32)}, 5, "differ from the global head"),
    (_head([100, 100], [100]), 0, "num-examples must be a positive integer"),
    (_head([100, 100], [100]), -3, "num-examples must be a positive integer"),
])
def test_bad_reply_is_dropped_with_a_logged_reason_and_leaves_the_mean_alone(
        caplog, bad_head, num_examples, reason):
    strategy = _strategy()
    sent = _configure(strategy)
    replies = _good_two(sent) + [_reply(sent[33], bad_head, _metrics(2, num_examples))]

    with caplog.at_level(logging.WARNING, logger="fedtransfer.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    got = from_array_record(arrays)
    np.testing.assert_allclose(got["weight"], [2.5, 3.5], atol=1e-6)
    np.testing.assert_allclose(got["bias"], [3.0], atol=1e-6)
    assert metrics["sites"] == 2 and metrics["num-examples"] == 4
    assert len(strategy.dropped) == 1
    assert strategy.dropped[0]["node_id"] == 33 and strategy.dropped[0]["round"] == 1
    assert reason in strategy.dropped[0]["reason"]
    assert any("node 33" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    # The site spent ε on the round all the same: the spend is booked, with why its
    # update was not used, and its head is no ensemble member.
    (row,) = strategy.sites[2].history
    assert reason in row["dropped"] and 2 not in strategy.site_heads


def test_error_reply_is_dropped():
    strategy = _strategy()
    sent = _configure(strategy)
    failed = Message(Error(code=0, reason="client crashed"), reply_to=sent[33])
    arrays, _ = strategy.aggregate_train(1, _good_two(sent) + [failed])
    np.testing.assert_allclose(from_array_record(arrays)["weight"], [2.5, 3.5], atol=1e-6)
    assert strategy.dropped == [{"round": 1, "node_id": 33,
                                 "reason": "error reply: client crashed"}]


def test_reply_missing_a_required_metric_is_dropped_not_fatal():
    strategy = _strategy()
    sent = _configure(strategy)
    m = _metrics(2, 5)
    del m["epsilon"]
    replies = _good_two(sent) + [_reply(sent[33], _head([9, 9], [9]), m)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_array_record(arrays)["weight"], [2.5, 3.5], atol=1e-6)
    assert metrics["sites"] == 2
    assert [d["node_id"] for d in strategy.dropped] == [33]
    assert "epsilon" in strategy.dropped[0]["reason"]


def test_no_valid_reply_gives_no_aggregate():
    strategy = _strategy()
    sent = _configure(strategy)
    replies = [_reply(sent[11], _head([math.nan, 0], [0]), _metrics(0, 1))]
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_budget_exhausted_reply_marks_the_site_and_it_is_not_sampled_again(caplog):
    strategy = _strategy()
    sent = _configure(strategy)
    declined = Message(content=RecordDict({"status": ConfigRecord(
        {"status": "budget-exhausted", "reason": "ε cap 1.0 reached", "site-id": 2})}),
        reply_to=sent[33])

    with caplog.at_level(logging.WARNING, logger="fedtransfer.server"):
        arrays, metrics = strategy.aggregate_train(1, _good_two(sent) + [declined])

    np.testing.assert_allclose(from_array_record(arrays)["weight"], [2.5, 3.5], atol=1e-6)
    assert metrics["sites"] == 2
    site = strategy.sites[2]
    assert (site.status, site.reason, site.node_id) == ("budget-exhausted", "ε cap 1.0 reached",
                                                        33)
    assert strategy.exhausted_nodes() == {33}
    assert strategy.active_sites(FakeGrid()) == 2
    assert any("site 2 declined" in r.getMessage() for r in caplog.records)
    # Next round: the exhausted site gets no training request.
    assert sorted(_configure(strategy, server_round=2)) == [11, 22]


# --------------------------------------------------------------------------
# server.validation.update_problem
# --------------------------------------------------------------------------


def test_update_problem_accepts_a_well_formed_update():
    assert update_problem(_head([1, 2], [3]), _global(), 7) is None
    assert update_problem(_head([1, 2], [3]), _global(), 7.0) is None  # MetricRecords carry floats


@pytest.mark.parametrize("arrays, words", [
    ({"weight": np.zeros(2, np.float32)}, "keys ['weight'] differ from the global head's"),
    ({**_head([1, 2], [3]), "extra": np.zeros(1, np.float32)}, "differ"),
    (_head([1, 2, 3], [3]), "array 'weight' has shape (3,), expected (2,)"),
    (_head([1, 2], [3], dtype=np.float16), "array 'weight' has dtype float16"),
    ({"weight": np.zeros(2, np.int32), "bias": np.zeros(1, np.float32)}, "dtype int32"),
    (_head([1, 2], [math.nan]), "array 'bias' contains NaN or Inf"),
    (_head([-math.inf, 2], [0]), "array 'weight' contains NaN or Inf"),
])
def test_update_problem_names_what_is_wrong_with_the_arrays(arrays, words):
    problem = update_problem(arrays, _global(), 5)
    assert problem is not None and words in problem


@pytest.mark.parametrize("num_examples", [0, -1, 2.5, math.nan, math.inf, True, None, "3"])
def test_update_problem_rejects_a_bad_num_examples(num_examples):
    problem = update_problem(_head([1, 2], [3]), _global(), num_examples)
    assert problem == f"num-examples must be a positive integer, got {num_examples!r}"


# A tuned run (trainable = bitfit / last-block): the backbone's trained tensors travel
# with the head; a hostile site must not be able to smuggle anything else in.


def _tuned_global() -> dict[str, np.ndarray]:
    return {**_global(), "backbone.bn_head.affine.weight": np.ones(3, np.float32)}


@pytest.mark.parametrize("extra", ["backbone.bn_head.stats.running_mean", "evil",
                                   "backbone.expand.linear.weight"])
def test_update_problem_refuses_an_extra_tensor_by_name(extra):
    arrays = {**_tuned_global(), extra: np.zeros(3, np.float32)}
    problem = update_problem(arrays, _tuned_global(), 5)
    assert problem is not None and f"unexpected tensor(s) ['{extra}']" in problem


def test_update_problem_names_a_missing_backbone_tensor():
    arrays = _head([1, 2], [3])
    problem = update_problem(arrays, _tuned_global(), 5)
    assert problem is not None and "missing tensor(s) ['backbone.bn_head.affine.weight']" in problem


def test_hostile_extra_tensor_is_dropped_and_every_trained_tensor_is_aggregated(caplog):
    strategy = _strategy()
    grid = FakeGrid()
    msgs = strategy.configure_train(1, to_array_record(_tuned_global()),
                                    ConfigRecord({"num-rounds": 3}), grid)
    sent = {m.metadata.dst_node_id: m for m in msgs}
    good = [_reply(sent[11], {**_head([1, 2], [0]),
                              "backbone.bn_head.affine.weight": np.full(3, 2, np.float32)},
                   _metrics(0, 1)),
            _reply(sent[22], {**_head([3, 4], [4]),
                              "backbone.bn_head.affine.weight": np.full(3, 4, np.float32)},
                   _metrics(1, 3))]
    hostile = _reply(sent[33], {**_tuned_global(),
                                "backbone.bn_head.stats.running_mean": np.ones(3, np.float32)},
                     _metrics(2, 100))
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, [*good, hostile])
    agg = from_array_record(arrays)
    assert set(agg) == set(_tuned_global())
    np.testing.assert_allclose(agg["backbone.bn_head.affine.weight"], np.full(3, 3.5))
    np.testing.assert_allclose(agg["weight"], [2.5, 3.5])
    assert "unexpected tensor(s) ['backbone.bn_head.stats.running_mean']" in caplog.text

"""Hostile or broken site updates, and robust aggregation, with hand-computed values.

Prepare the replies, execute the strategy's aggregation, assert against the
numbers worked out in the comments (as in Flower's strategy tests).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from common.aggregation import (
    aggregate,
    capped_weights,
    clip_derived_bound,
    update_norm,
)
from common.models import training
from common.models.heads import head_state, make_head
from common.protocol import from_array_record, to_array_record
from server.strategy import HeadFedAvg
from tests.server.test_strategy import FakeGrid, _global, _head, _metrics, _reply

FIVE = (11, 22, 33, 44, 55)
REQUEST = {"num-rounds": 3, "local-epochs": 1, "batch-size": 4, "learning-rate": 0.5,
           "momentum": 0.0, "clip-norm": 1.0, "noise-multiplier": 0.0}


def _strategy(**kw) -> HeadFedAvg:
    return HeadFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2,
                      min_evaluate_nodes=2, min_available_nodes=2, **kw)


def _send(strategy, nodes=FIVE, request=None):
    msgs = strategy.configure_train(1, to_array_record(_global()),
                                    ConfigRecord(request or {"num-rounds": 3}), FakeGrid(nodes))
    return {m.metadata.dst_node_id: m for m in msgs}


def _run(strategy, heads, counts, nodes=FIVE, request=None, **metric_extra):
    sent = _send(strategy, nodes, request)
    replies = [_reply(sent[n], h, _metrics(i, c, **metric_extra))
               for i, (n, h, c) in enumerate(zip(nodes, heads, counts, strict=True))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return (from_array_record(arrays) if arrays is not None else None), metrics


# -- weight cap ---------------------------------------------------------------


def test_capped_weights_water_fill_by_hand():
    # [1, 1, 8] -> [0.1, 0.1, 0.8]; the cap 0.5 holds site 3, the other 0.5 splits 1:1.
    np.testing.assert_allclose(capped_weights([1, 1, 8], 0.5), [0.25, 0.25, 0.5])
    # [1, 2, 3, 4] with cap 0.3: 0.4 -> 0.3; 0.7 over 1:2:3 gives 0.35 -> 0.3;
    # 0.4 over 1:2 gives [0.1333, 0.2667].
    np.testing.assert_allclose(capped_weights([1, 2, 3, 4], 0.3), [0.4 / 3, 0.8 / 3, 0.3, 0.3])
    np.testing.assert_allclose(capped_weights([1, 9], 0.5), [0.5, 0.5])  # cap * k <= 1: equal
    np.testing.assert_allclose(capped_weights([1, 3], 1.0), [0.25, 0.75])  # no cap: FedAvg
    for bad in ([], [1, 0], [1, math.nan]):
        with pytest.raises(ValueError, match="positive and finite"):
            capped_weights(bad, 0.5)


def test_forged_num_examples_carries_at_most_the_site_weight_cap():
    heads = [_head([1, 2], [0]), _head([3, 4], [4]), _head([9, 9], [9])]
    # Uncapped, the forged 10^6 swamps the others: the mean is ~[9, 9].
    got, _ = _run(_strategy(), heads, [1, 3, 1_000_000], nodes=FIVE[:3])
    np.testing.assert_allclose(got["weight"], [9, 9], atol=1e-4)
    # Capped at 0.5: weights [0.125, 0.375, 0.5];
    # weight = 0.125*[1,2] + 0.375*[3,4] + 0.5*[9,9] = [5.75, 6.25]; bias = 1.5 + 4.5 = 6.
    got, metrics = _run(_strategy(max_site_weight=0.5), heads, [1, 3, 1_000_000],
                        nodes=FIVE[:3])
    np.testing.assert_allclose(got["weight"], [5.75, 6.25], atol=1e-5)
    np.testing.assert_allclose(got["bias"], [6.0], atol=1e-5)
    assert got["weight"].dtype == np.float32 and metrics["sites"] == 3


# -- robust aggregation -------------------------------------------------------


def test_median_ignores_one_outlier_and_num_examples():
    heads = [_head([1, 2], [0]), _head([3, 40], [4]), _head([100, -5], [9])]
    got, _ = _run(_strategy(aggregation="median"), heads, [1, 1, 1000], nodes=FIVE[:3])
    # coordinate-wise: median(1, 3, 100) = 3, median(2, 40, -5) = 2, median(0, 4, 9) = 4
    np.testing.assert_allclose(got["weight"], [3, 2])
    np.testing.assert_allclose(got["bias"], [4])


def test_trimmed_mean_cuts_the_extremes():
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    heads = [_head([v, -v], [v]) for v in vals]
    got, _ = _run(_strategy(aggregation="trimmed-mean", trim_fraction=0.2), heads, [1] * 5)
    # 5 sites, trim 0.2: one value cut at each end; mean(2, 3, 4) = 3
    np.testing.assert_allclose(got["weight"], [3, -3])
    np.testing.assert_allclose(got["bias"], [3])
    np.testing.assert_allclose(aggregate([_head([v, -v], [v]) for v in vals], [1] * 5,
                                         method="trimmed-mean", trim=0.0)["bias"], [22.0])


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation 'krum'"):
        aggregate([_global()], [1], method="krum")


# -- norm bound ---------------------------------------------------------------


def test_explicit_norm_bound_drops_a_huge_update_with_a_logged_reason(caplog):
    strategy = _strategy(max_update_norm=10.0)
    heads = [_head([6, 8], [0]), _head([1, 1], [1]), _head([6, 8], [1]), _head([1e6, 0], [0])]
    with caplog.at_level(logging.WARNING, logger="fedtransfer.server"):
        got, metrics = _run(strategy, heads, [1, 1, 1, 1], nodes=FIVE[:4])
    # |[6, 8, 0]| = 10 is on the bound (kept); |[6, 8, 1]| = sqrt(101) is not.
    assert metrics["sites"] == 2
    np.testing.assert_allclose(got["weight"], [3.5, 4.5])
    reasons = {d["node_id"]: d["reason"] for d in strategy.dropped}
    assert reasons[33] == "update norm 10.05 exceeds the bound 10 (max-update-norm)"
    assert reasons[44].startswith("update norm 1e+06 exceeds")
    assert any("node 44" in r.getMessage() and "exceeds the bound" in r.getMessage()
               for r in caplog.records)


def test_clip_derived_bound_by_hand():
    # 2 steps * lr 0.5 * C 1 * ((1 + 6/2) + 1.1 * (sqrt(3) + 6) / 4) = 4 + 2.12632
    assert clip_derived_bound(clip_norm=1.0, learning_rate=0.5, momentum=0.0, steps=2,
                              batch_size=4, noise_multiplier=1.1, dim=3) == pytest.approx(
        4 + 1.1 * (math.sqrt(3) + 6) / 4)
    # momentum 0.5 doubles it
    assert clip_derived_bound(clip_norm=1.0, learning_rate=0.5, momentum=0.5, steps=2,
                              batch_size=4, noise_multiplier=1.1, dim=3) == pytest.approx(
        2 * (4 + 1.1 * (math.sqrt(3) + 6) / 4))


def test_derived_bound_applies_to_dp_replies_and_not_to_non_dp_ones():
    strategy = _strategy()  # max-update-norm 0: derived from the request
    heads = [_head([1, 2], [0]), _head([3, 4], [0]), _head([50, 0], [0])]  # norms 2.2, 5, 50
    # num-examples 8 < 4 batches of 4: the site's planned batch is 2 (common/batches.py,
    # as the site plans it), 1 epoch: 4 steps -> the bound at batch 2
    bound = clip_derived_bound(clip_norm=1.0, learning_rate=0.5, momentum=0.0, steps=4,
                               batch_size=2, noise_multiplier=1.1, dim=3)
    got, metrics = _run(strategy, heads, [8, 8, 8], nodes=FIVE[:3], request=REQUEST)
    assert metrics["sites"] == 2
    assert strategy.dropped[0]["reason"] == (f"update norm 50 exceeds the bound {bound:.4g} "
                                             "(derived from the clip norm)")
    # Without DP nothing bounds the step size: the derived bound does not apply.
    strategy = _strategy()
    _, metrics = _run(strategy, heads, [8, 8, 8], nodes=FIVE[:3], request=REQUEST,
                      **{"noise-multiplier": 0.0})
    assert metrics["sites"] == 3 and strategy.dropped == []
    # max-update-norm < 0 switches the bound off.
    _, metrics = _run(_strategy(max_update_norm=-1.0), heads, [8, 8, 8], nodes=FIVE[:3],
                      request=REQUEST)
    assert metrics["sites"] == 3


def test_an_honest_dp_sgd_update_stays_inside_the_derived_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 20)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # like the backbone's L2-normalised features
    y = rng.integers(0, 3, 96)
    head = make_head("linear", in_dim=20, num_classes=3, seed=0)
    start = head_state(head)
    res = training.train_dp(head, x, y, epochs=3, batch_size=16, lr=8.0, momentum=0.5,
                            noise_multiplier=1.0, clip_norm=1.0, seed=1)
    bound = clip_derived_bound(clip_norm=1.0, learning_rate=8.0, momentum=0.5, steps=res.steps,
                               batch_size=16, noise_multiplier=1.0, dim=63)
    assert res.steps == 18
    assert 0 < update_norm(head_state(head), start) < bound


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed-mean"])
def test_every_kind_of_hostile_update_is_dropped_under_every_rule(aggregation):
    strategy = _strategy(aggregation=aggregation, max_update_norm=100.0, max_site_weight=0.5)
    good = [_head([1, 2], [0]), _head([3, 4], [4])]
    hostile = [
        (_head([[1, 2]], [0]), 5, "has shape (1, 2)"),
        (_head([1, 2], [0], dtype=np.float64), 5, "dtype float64"),
        (_head([math.nan, 2], [0]), 5, "NaN or Inf"),
        (_head([math.inf, 2], [0]), 5, "NaN or Inf"),
        (_head([1e9, 2], [0]), 5, "exceeds the bound"),
        (_head([1, 2], [0]), -5, "num-examples must be a positive integer"),
        (_head([1, 2], [0]), 2.5, "num-examples must be a positive integer"),
    ]
    nodes = tuple(range(100, 102 + len(hostile)))
    sent = _send(strategy, nodes)
    replies = [_reply(sent[nodes[i]], h, _metrics(i, 1)) for i, h in enumerate(good)]
    replies += [_reply(sent[nodes[2 + i]], h, _metrics(2 + i, n))
                for i, (h, n, _) in enumerate(hostile)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["sites"] == 2
    got = from_array_record(arrays)
    np.testing.assert_allclose(got["weight"], [2, 3])  # mean = median of two = [2, 3]
    assert len(strategy.dropped) == len(hostile)
    for drop, (_, _, words) in zip(strategy.dropped, hostile, strict=True):
        assert words in drop["reason"]


def test_a_dropped_update_still_books_the_sites_spend():
    """The site spent ε on the round whether or not the server uses its update: the
    spend reaches the run records with the reason the update was dropped."""
    strategy = _strategy(max_update_norm=1e-9)  # drops every update
    arrays, _ = _run(strategy, [_head([1, 1], [0])] * 2, [4, 4], nodes=FIVE[:2])
    assert arrays is None
    for sid in (0, 1):
        (row,) = strategy.sites[sid].history
        assert row["dropped"].startswith("update norm") and row["epsilon_after"] == 0.5 + sid
    assert sid not in strategy.site_heads
    # A reply whose metrics are garbage is dropped without crashing the server.
    bad = _strategy()
    _run(bad, [_head([1, 1], [0]), _head([1, 1], [0])], [4, math.nan], nodes=FIVE[:2])
    assert [d["reason"] for d in bad.dropped] == ["num-examples must be a positive integer, got nan"]
    assert 1 not in bad.sites

"""The site's round logic without Flower: checks, budget guard, spend-before-release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.budget import BudgetExhausted
from client.guard import RequestRejected
from client.round import train_round
from common import protocol
from common.config import RunConfig
from common.privacy.accounting import epsilon
from common.privacy.ledger import Ledger
from tests import sites


def _site(tmp_path, *, dp=True, eps=2.0, n: int = 96, seed: int = 0, **policy) -> dict:
    """A deployed site with ``n`` records of 6 features, 80 % of them for training."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 6)) * 0.3 + y[:, None]
    return sites.csv_site(tmp_path / "site", x, y, dp=dp, **{"target-epsilon": eps}, **policy)


def _settings(node):
    return sites.settings(node)


def _req(node, run="run-a", r=1, rounds=3, sigma=0.0, batch=16, clip=1.0, lr=0.5, dp=True,
         weights=()) -> protocol.RoundRequest:
    return sites.request(node, run_id=run, server_round=r, num_rounds=rounds, batch_size=batch,
                         learning_rate=lr, clip_norm=clip, noise_multiplier=sigma, dp=dp,
                         class_weights=weights)


def _head(node):
    return sites.head(node, in_dim=6)


@pytest.mark.parametrize("bad, words", [
    (dict(batch=0), r"batch-size must be an integer in \[1, inf\], got 0"),
    (dict(clip=-1.0), "clip-norm must be"),
    (dict(sigma=float("nan")), "noise-multiplier"),
    (dict(lr=float("inf")), "learning-rate"),
    (dict(weights=(1.0, 2.0, 3.0)), "class-weights has 3 values, this site declares 2 classes"),
    (dict(weights=(1.0, float("nan"))), r"class-weights must be finite numbers in \(0, 100\]"),
    (dict(weights=(1.0, 101.0)), r"class-weights must be finite numbers in \(0, 100\]"),
])
def test_hostile_request_is_rejected_before_anything_is_recorded(tmp_path, bad, words):
    node = _site(tmp_path)
    with pytest.raises(RequestRejected, match=words):
        train_round(_settings(node), _req(node, **bad), _head(node))
    assert not Path(node["ledger-path"]).exists() or Ledger(node["ledger-path"]).entries() == []


def test_a_batch_larger_than_the_site_is_planned_down_never_a_silent_decline(tmp_path):
    """issue 24: the expected batch follows the site's public record count
    (common/batches.py), so a small hospital trains instead of declining every round."""
    from common.batches import plan_batch

    node = _site(tmp_path)
    reply = train_round(_settings(node), _req(node, batch=500), _head(node))
    n = reply.public.num_examples
    assert n == 77  # 96 records, 19 held out
    assert reply.public.sample_rate == pytest.approx(plan_batch(n, batch_size=500) / n, rel=0.3)
    assert len(Ledger(node["ledger-path"]).entries()) == 1


def test_spend_is_committed_before_release_and_never_reset(tmp_path):
    node = _site(tmp_path, eps=2.0)
    settings = _settings(node)
    head = _head(node)
    eps_seen, sigmas = [], []
    for r in (1, 2, 3):
        reply = train_round(settings, _req(node, r=r), head)
        ledger = Ledger(settings.ledger_path)
        # The reply exists only after the ledger row for this round is committed.
        assert [e.round for e in ledger.entries()] == list(range(1, r + 1))
        assert reply.public.epsilon == pytest.approx(ledger.epsilon(delta=1e-5))
        eps_seen.append(reply.public.epsilon)
        sigmas.append(reply.public.noise_multiplier)
        head = reply.arrays
    assert eps_seen[0] < eps_seen[1] < eps_seen[2] <= 2.0
    assert eps_seen[2] > 0.9 * 2.0  # calibration uses the budget, it does not waste it
    assert len(set(sigmas)) == 1  # one σ for the whole run
    assert Ledger(settings.ledger_path).verify_chain() == []


def test_site_declines_when_it_reaches_its_cap_mid_run(tmp_path):
    node = _site(tmp_path, eps=1.0)
    settings, head = _settings(node), _head(node)
    for r in (1, 2):
        head = train_round(settings, _req(node, r=r, rounds=2), head).arrays
    # The server asks for a third round the plan never included: the site refuses.
    spent = Ledger(settings.ledger_path).epsilon(delta=1e-5)
    with pytest.raises(BudgetExhausted, match=r"budget exhausted: spent .*cap 1\.0000") as info:
        train_round(settings, _req(node, r=3, rounds=2), head)
    assert info.value.projected > 1.0 >= info.value.spent == pytest.approx(spent)
    assert len(Ledger(settings.ledger_path).entries()) == 2  # nothing recorded for round 3


def test_server_cannot_buy_more_budget_with_a_small_sigma(tmp_path):
    node = _site(tmp_path, eps=0.5)
    with pytest.raises(BudgetExhausted, match="this round would reach"):
        train_round(_settings(node), _req(node, sigma=0.5), _head(node))
    assert Ledger(node["ledger-path"]).entries() == []


def test_budget_spans_runs(tmp_path):
    node = _site(tmp_path, eps=2.0)
    settings, head = _settings(node), _head(node)
    r1 = train_round(settings, _req(node, run="first", rounds=1), head)
    r2 = train_round(settings, _req(node, run="second", rounds=1), head)
    # The second run starts from what the first spent, so it must use more noise.
    assert r2.public.noise_multiplier > r1.public.noise_multiplier
    assert r1.public.epsilon < r2.public.epsilon <= 2.0
    ledger = Ledger(settings.ledger_path)
    assert r2.public.epsilon == pytest.approx(epsilon(ledger.history(), delta=1e-5))


def test_same_seed_same_head_without_dp(tmp_path):
    node = _site(tmp_path, dp=False)
    settings = _settings(node)
    a = train_round(settings, _req(node, dp=False), _head(node))
    b = train_round(settings, _req(node, dp=False), _head(node))
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert a.public.epsilon == float("inf") and a.public.metrics()["dp"] == 0  # says so
    c = train_round(sites.settings({**node, "holdout-seed": 1}), _req(node, dp=False),
                    _head(node))
    assert any(not np.array_equal(a.arrays[k], c.arrays[k]) for k in a.arrays)


def test_train_reply_carries_only_declared_fields_and_the_site_logs_the_rest(tmp_path, caplog):
    """Only the DP head and declared-public values leave; the loss and the holdout
    metrics of the incoming head stay in the site's log."""
    node = _site(tmp_path, eps=4.0)
    settings = _settings(node)
    first = train_round(settings, _req(node, r=1), _head(node))
    with caplog.at_level("INFO", logger="client.round"):
        second = train_round(settings, _req(node, r=2), first.arrays)
    metrics = second.public.metrics()
    assert set(metrics) == set(protocol.TRAIN_METRICS)  # no timings unless the policy opts in
    assert all(protocol.Privacy(f.privacy) is protocol.Privacy.PUBLIC
               for f in protocol.TRAIN_REPLY if f.key in metrics)
    assert "round 1's global head on the site's holdout" in caplog.text
    assert "train loss" in caplog.text


def test_class_weights_travel_exactly_and_are_optional():
    cfg = RunConfig(class_weights="public")
    weights = [0.6734693877551021, 1.9411764705882353]
    sent = {**protocol.train_request(cfg, class_weights=weights), "server-round": 1}
    assert isinstance(sent["class-weights"], str)  # SecAgg+'s legacy config holds scalars only
    assert protocol.parse_request(sent, "r").class_weights == tuple(weights)
    unweighted = protocol.train_request(cfg)
    assert "class-weights" not in unweighted
    assert protocol.parse_request({**unweighted, "server-round": 1}, "r").class_weights == ()

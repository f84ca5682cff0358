"""The site's round logic without Flower: checks, budget guard, spend-before-release."""

from __future__ import annotations

import numpy as np
import pytest

from client.policy import RequestRejected, SiteSettings
from client.site import BudgetExhausted, train_round
from common import protocol
from common.config import RunConfig
from common.data.datasets import SiteData
from common.models.heads import head_state, make_head
from common.privacy.accounting import epsilon
from common.privacy.ledger import Ledger


def _data(n: int = 96, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 2, 3)) * 0.3 + y[:, None, None]).astype(np.float32)
    return SiteData(site_id=0, train_x=x[: n - 16], train_y=y[: n - 16],
                    holdout_x=x[n - 16:], holdout_y=y[n - 16:], num_classes=2)


def _cfg(tmp_path, **kw) -> RunConfig:
    return RunConfig(backbone="identity", head="linear", cache_dir=str(tmp_path / "cache"),
                     **kw)


def _settings(tmp_path, *, dp=True, eps=2.0) -> SiteSettings:
    return SiteSettings(site_id=0, ledger_path=tmp_path / "ledger.sqlite",
                        cache_dir=tmp_path / "cache", dp=dp, target_epsilon=eps,
                        target_delta=1e-5)


def _req(run="run-a", r=1, rounds=3, sigma=0.0, batch=16, clip=1.0, lr=0.5, dp=True,
         weights=()) -> protocol.RoundRequest:
    return protocol.RoundRequest(run_id=run, server_round=r, num_rounds=rounds, local_epochs=1,
                                 batch_size=batch, learning_rate=lr, momentum=0.0,
                                 clip_norm=clip, noise_multiplier=sigma, dp=dp,
                                 class_weights=weights)


def _head(cfg: RunConfig):
    return head_state(make_head("linear", in_dim=6, num_classes=2, seed=cfg.seed))


@pytest.mark.parametrize("bad, words", [
    (dict(batch=0), "batch-size must be >= 1"),
    (dict(clip=-1.0), "clip-norm must be"),
    (dict(sigma=float("nan")), "noise-multiplier"),
    (dict(lr=float("inf")), "learning-rate"),
    (dict(weights=(1.0, 2.0, 3.0)), "class-weights has 3 values, the head has 2 classes"),
    (dict(weights=(1.0, float("nan"))), r"class-weights must be finite numbers in \(0, 100\]"),
    (dict(weights=(1.0, 101.0)), r"class-weights must be finite numbers in \(0, 100\]"),
])
def test_hostile_request_is_rejected_before_anything_is_recorded(tmp_path, bad, words):
    cfg = _cfg(tmp_path)
    with pytest.raises(RequestRejected, match=words):
        train_round(cfg, _settings(tmp_path), _req(**bad), _head(cfg), data=_data())
    assert Ledger(tmp_path / "ledger.sqlite").entries() == []


def test_a_batch_larger_than_the_site_is_planned_down_never_a_silent_decline(tmp_path):
    """issue 24: the expected batch follows the site's public record count
    (common/batches.py), so a small hospital trains instead of declining every round."""
    from common.batches import plan_batch

    cfg = _cfg(tmp_path)
    data = _data()
    reply = train_round(cfg, _settings(tmp_path), _req(batch=500), _head(cfg), data=data)
    n = len(data.train_y)
    assert reply.num_examples == n
    assert reply.metrics["sample-rate"] == pytest.approx(plan_batch(n, batch_size=500) / n,
                                                         rel=0.3)
    assert len(Ledger(tmp_path / "ledger.sqlite").entries()) == 1


def test_spend_is_committed_before_release_and_never_reset(tmp_path):
    cfg = _cfg(tmp_path)
    settings = _settings(tmp_path, eps=2.0)
    data = _data()
    head = _head(cfg)
    eps_seen, sigmas = [], []
    for r in (1, 2, 3):
        reply = train_round(cfg, settings, _req(r=r), head, data=data)
        ledger = Ledger(settings.ledger_path)
        # The reply exists only after the ledger row for this round is committed.
        assert [e.round for e in ledger.entries()] == list(range(1, r + 1))
        assert reply.metrics["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5))
        eps_seen.append(reply.metrics["epsilon"])
        sigmas.append(reply.metrics["noise-multiplier"])
        head = reply.arrays
    assert eps_seen[0] < eps_seen[1] < eps_seen[2] <= 2.0
    assert eps_seen[2] > 0.9 * 2.0  # calibration uses the budget, it does not waste it
    assert len(set(sigmas)) == 1  # one σ for the whole run
    assert Ledger(settings.ledger_path).verify_chain() == []


def test_site_declines_when_it_reaches_its_cap_mid_run(tmp_path):
    cfg = _cfg(tmp_path)
    settings = _settings(tmp_path, eps=1.0)
    data, head = _data(), _head(cfg)
    for r in (1, 2):
        head = train_round(cfg, settings, _req(r=r, rounds=2), head, data=data).arrays
    # The server asks for a third round the plan never included: the site refuses.
    spent = Ledger(settings.ledger_path).epsilon(delta=1e-5)
    with pytest.raises(BudgetExhausted, match=r"budget exhausted: spent .*cap 1\.0000") as info:
        train_round(cfg, settings, _req(r=3, rounds=2), head, data=data)
    assert info.value.projected > 1.0 >= info.value.spent == pytest.approx(spent)
    assert len(Ledger(settings.ledger_path).entries()) == 2  # nothing recorded for round 3


def test_server_cannot_buy_more_budget_with_a_small_sigma(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(BudgetExhausted, match="this round would reach"):
        train_round(cfg, _settings(tmp_path, eps=0.5), _req(sigma=0.5), _head(cfg), data=_data())
    assert Ledger(tmp_path / "ledger.sqlite").entries() == []


def test_budget_spans_runs(tmp_path):
    cfg = _cfg(tmp_path)
    settings = _settings(tmp_path, eps=2.0)
    data, head = _data(), _head(cfg)
    r1 = train_round(cfg, settings, _req(run="first", rounds=1), head, data=data)
    r2 = train_round(cfg, settings, _req(run="second", rounds=1), head, data=data)
    # The second run starts from what the first spent, so it must use more noise.
    assert r2.metrics["noise-multiplier"] > r1.metrics["noise-multiplier"]
    assert r1.metrics["epsilon"] < r2.metrics["epsilon"] <= 2.0
    ledger = Ledger(settings.ledger_path)
    assert r2.metrics["epsilon"] == pytest.approx(epsilon(ledger.history(), delta=1e-5))


def test_same_seed_same_head_without_dp(tmp_path):
    cfg = _cfg(tmp_path, dp=False)
    settings = _settings(tmp_path, dp=False)
    a = train_round(cfg, settings, _req(dp=False), _head(cfg), data=_data())
    b = train_round(cfg, settings, _req(dp=False), _head(cfg), data=_data())
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert a.metrics["epsilon"] == float("inf") and a.metrics["dp"] == 0  # says so
    c = train_round(cfg.replace(seed=1), settings, _req(dp=False), _head(cfg), data=_data())
    assert any(not np.array_equal(a.arrays[k], c.arrays[k]) for k in a.arrays)


def test_train_reply_carries_only_declared_fields_and_the_site_logs_the_rest(tmp_path, caplog):
    """Only the DP head and declared-public values leave; the loss and the holdout
    metrics of the incoming head stay in the site's log."""
    cfg = _cfg(tmp_path)
    settings = _settings(tmp_path, eps=4.0)
    data = _data()
    first = train_round(cfg, settings, _req(r=1), _head(cfg), data=data)
    with caplog.at_level("INFO", logger="client.site"):
        second = train_round(cfg, settings, _req(r=2), first.arrays, data=data)
    assert set(second.metrics) == set(protocol.TRAIN_METRICS)
    assert all(protocol.Privacy(f.privacy) is protocol.Privacy.PUBLIC
               for f in protocol.TRAIN_REPLY if f.key in second.metrics)
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

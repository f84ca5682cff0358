"""Transferability scores (common/models/transfer.py): LogME against hand computations, the
probe, ranking, the negative-transfer warning and what the audit says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from common.models.backbones import get_backbone
from common.models.transfer import (
    Candidate,
    TrainingPlan,
    compact,
    format_table,
    kendall_tau,
    logme,
    logme_evidence,
    logme_single,
    negative_transfer,
    parse_candidates,
    parse_record,
    probe_accuracy,
    rank,
    rehearsal_auc,
    selection_findings,
    selection_record,
)


def test_logme_tiny_case_by_hand():
    # n = 2 records, one feature f = (1, 0), target y = (2, 1).
    # Fixed point (worked by hand): with t = β/(α+β), γ = t, m = 2t, α = γ/m² = 1/(4t)
    # and α = β(1-t)/t give β = 1/(4(1-t)); β = (n-γ)/‖fm-y‖² = (2-t)/(4(1-t)² + 1)
    # then gives 4t = 3: t = 3/4, α = 1/3, β = 1, m = 3/2, ‖fm-y‖² = 5/4.
    # Evidence: n/2 log β + D/2 log α - n/2 log 2π - β/2·5/4 - α/2·9/4 - 1/2 log(α+β)
    #         = -1/2 log 3 - log 2π - 5/8 - 3/8 - 1/2 log(4/3) = -log 2π - 1 - log 2.
    f = np.array([[1.0], [0.0]])
    y = np.array([2.0, 1.0])
    per_record, alpha, beta = logme_single(f, y, tol=1e-10)
    assert alpha == pytest.approx(1 / 3, rel=1e-6)
    assert beta == pytest.approx(1.0, rel=1e-6)
    assert per_record == pytest.approx((-math.log(2 * math.pi) - 1 - math.log(2)) / 2, abs=1e-9)


def test_logme_evidence_formula_by_hand():
    # At α = β = 1: A = 2, m = 1, ‖fm-y‖² = 2, ‖m‖² = 1:
    # L = -log 2π - 1 - 1/2 - 1/2 log 2 (per record: half of it).
    f = np.array([[1.0], [0.0]])
    y = np.array([2.0, 1.0])
    expected = (-math.log(2 * math.pi) - 1.5 - 0.5 * math.log(2)) / 2
    assert logme_evidence(f, y, 1.0, 1.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(30, 50), (60, 8)], ids=["wide", "tall"])
def test_logme_is_the_marginal_likelihood(shape):
    # The evidence is log N(y; 0, F Fᵀ/α + I/β), computed here the slow way.
    rng = np.random.default_rng(0)
    f = rng.normal(size=shape)
    y = f @ rng.normal(size=shape[1]) * 0.3 + rng.normal(size=shape[0])
    per_record, alpha, beta = logme_single(f, y)
    cov = f @ f.T / alpha + np.eye(shape[0]) / beta
    direct = multivariate_normal(np.zeros(shape[0]), cov).logpdf(y) / shape[0]
    assert per_record == pytest.approx(direct, abs=1e-9)
    assert per_record == pytest.approx(logme_evidence(f, y, alpha, beta), abs=1e-9)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90)
    good = np.eye(3)[labels] + rng.normal(scale=0.2, size=(90, 3))
    bad = rng.normal(size=(90, 3))
    assert logme(good, labels, 3) > logme(bad, labels, 3)
    assert probe_accuracy(good, labels) > probe_accuracy(bad, labels)
    # Invariant to a global rescaling of the features (α absorbs it).
    assert logme(good * 7.0, labels, 3) == pytest.approx(logme(good, labels, 3), abs=1e-6)


def test_parse_candidates():
    cands = parse_candidates("identity, efficientnet-lite0@32, efficientnet-lite2",
                             default_size=64)
    assert cands == [Candidate("identity", 0), Candidate("efficientnet-lite0", 32),
                     Candidate("efficientnet-lite2", 64)]
    assert [c.label for c in cands] == ["identity", "efficientnet-lite0@32",
                                        "efficientnet-lite2@64"]
    assert len(parse_candidates("")) == 6  # the default zoo
    with pytest.raises(ValueError, match="twice"):
        parse_candidates("identity, identity")
    with pytest.raises(ValueError, match="integer"):
        parse_candidates("efficientnet-lite0@big")
    with pytest.raises(ValueError, match="auto"):
        parse_candidates("auto")


def test_auto_is_not_a_backbone():
    with pytest.raises(ValueError, match="fedtransfer select"):
        get_backbone("auto")


def _rows(identity: float, pretrained: float) -> list[dict]:
    return [{"candidate": "identity", "backbone": "identity", "image_size": 0, "logme": identity,
             "probe_accuracy": 0.5, "feature_dim": 64},
            {"candidate": "efficientnet-lite0@64", "backbone": "efficientnet-lite0",
             "image_size": 64, "logme": pretrained, "probe_accuracy": 0.6, "feature_dim": 1280}]


def test_rank_and_negative_transfer_warning():
    ranked = rank(_rows(0.3, 0.1))
    assert [r["candidate"] for r in ranked] == ["identity", "efficientnet-lite0@64"]
    assert "negative transfer" in negative_transfer(ranked)
    assert negative_transfer(rank(_rows(0.1, 0.3))) is None
    # By the probe, the pretrained candidate wins here: no warning.
    assert rank(_rows(0.3, 0.1), "probe")[0]["candidate"] == "efficientnet-lite0@64"
    assert negative_transfer(rank(_rows(0.3, 0.1), "probe"), "probe") is None


def test_record_round_trips_and_the_audit_statement():
    rec = selection_record(rank(_rows(0.3, 0.1)), score="logme", source="public-val",
                           split="val", records=180, dataset="digits", seconds=1.5)
    assert rec["chosen"] == "identity" and rec["data"]["public"]
    assert parse_record(compact(rec)) == rec
    assert "WARNING: negative transfer" in format_table(rec)
    statement, problems = selection_findings(rec)
    assert "public data only" in statement and not problems
    private = selection_record(rank(_rows(0.3, 0.1)), score="logme", source="private-train",
                               split="train", records=900, dataset="digits", seconds=1.5)
    statement, problems = selection_findings(private)
    assert [code for code, _ in problems] == ["backbone-selected-on-private-data"]
    assert selection_findings(None) == (None, [])
    with pytest.raises(ValueError, match="fedtransfer select"):
        parse_record('{"x": 1}')


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # One discordant pair of six: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(4 / 6)


def _plan(**kw) -> TrainingPlan:
    base = dict(num_sites=3, train_records=600, rounds=2, local_epochs=2, batch_size=32,
                learning_rate=1.0, clip_norm=1.0, partitioner="iid", target_epsilon=1.0)
    return TrainingPlan(**{**base, **kw})


def test_rehearsal_sees_the_signal_through_the_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 150)
    good = np.eye(3)[labels] + rng.normal(scale=0.5, size=(150, 3))
    bad = rng.normal(size=(150, 3))
    assert rehearsal_auc(good, labels, 3, _plan()) > 0.9
    assert rehearsal_auc(bad, labels, 3, _plan()) < 0.7
    # The score a selection ranks by.
    rows = [{**r, "rehearsal_auc": v} for r, v in zip(_rows(0.3, 0.1), (0.6, 0.8), strict=True)]
    assert rank(rows, "rehearsal")[0]["candidate"] == "efficientnet-lite0@64"


def test_rehearsal_sees_what_dp_noise_does_to_wide_features():
    """Two strong dimensions against 400 weak ones. The wide candidate carries more
    signal in all: LogME, the probe and a rehearsal without DP all prefer it. Under
    the planned ε every one of its 400 weights gets noise and the clip shrinks its
    signal, so the DP rehearsal prefers the narrow one, as federated DP-SGD would."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    sign = (2 * labels - 1)[:, None]
    narrow = sign * 0.5 + rng.normal(scale=0.6, size=(200, 2))
    wide = sign * 0.15 + rng.normal(size=(200, 400))
    assert probe_accuracy(wide, labels) > probe_accuracy(narrow, labels)
    assert logme(wide, labels) > logme(narrow, labels)
    plain = _plan(target_epsilon=None)
    assert rehearsal_auc(wide, labels, 2, plain) > rehearsal_auc(narrow, labels, 2, plain)
    dp = _plan(target_epsilon=1.0)
    assert rehearsal_auc(narrow, labels, 2, dp) > rehearsal_auc(wide, labels, 2, dp) + 0.15


def test_rehearsal_refuses_a_plan_it_cannot_replay():
    labels = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="2 public records of every class"):
        rehearsal_auc(np.zeros((4, 2)), np.array([0, 0, 0, 1]), 2, _plan())
    with pytest.raises(ValueError, match="fewer than the 3 sites"):
        rehearsal_auc(np.eye(6), labels, 2, _plan(train_records=2))

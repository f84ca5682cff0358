"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): statistics and a real head."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.audit import empirical_hazards
from common.empirical import (audit_scores, count_guesses, epsilon_lower_bound, p_value,
                              run_canaries)


def test_p_value_reduces_to_a_binomial_tail():
    # ε = 0, δ = 0: guessing is a fair coin.
    assert p_value(m=100, r=40, v=30, epsilon=0.0, delta=0.0) == pytest.approx(
        stats.binom.sf(29, 40, 0.5))
    # δ only ever raises the p-value.
    assert p_value(m=100, r=40, v=30, epsilon=1.0, delta=1e-3) > p_value(
        m=100, r=40, v=30, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(m=10, r=20, v=5, epsilon=1.0, delta=0.0)


def test_ceiling_has_the_closed_form_for_delta_zero():
    # All r guesses right: P = q^r with q = e^ε/(1+e^ε); solve q^r = 0.05.
    r = 100
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0) == pytest.approx(
        math.log(q / (1 - q)), rel=1e-6)
    # More correct guesses never lower the bound; chance-level guessing proves nothing.
    bounds = [epsilon_lower_bound(m=1000, r=r, v=v, delta=1e-5) for v in (50, 70, 90, 100)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 0


def test_count_guesses_by_hand():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.05])
    included = np.array([True, False, False, False, True, True])
    # k=2: "in" = {0.9, 0.8} (1 right), "out" = {0.05, 0.1} (1 right).
    assert count_guesses(scores, included, k=2) == (4, 2)
    assert count_guesses(scores, included, k=0) == (0, 0)
    with pytest.raises(ValueError, match="2k <= m"):
        count_guesses(scores, included, k=4)


def test_bonferroni_keeps_the_bound_below_the_single_test_value():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included + rng.normal(scale=0.8, size=400)
    g = audit_scores(scores, included, delta=1e-5, fractions=(0.5,))
    g4 = audit_scores(scores, included, delta=1e-5)
    r, v = count_guesses(scores, included, k=100)
    assert g.epsilon_lower == pytest.approx(epsilon_lower_bound(m=400, r=r, v=v, delta=1e-5))
    assert 0 < g.epsilon_lower <= g.ceiling and g4.tests == 4


def _features(n=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
    return x, y


@pytest.mark.parametrize("sigma", [0.6, 1.5])
def test_lower_bound_never_exceeds_the_claimed_upper_bound(sigma):
    x, y = _features()
    run = run_canaries(x, y, num_classes=3, noise_multiplier=sigma, clip_norm=1.0, batch_size=32,
                       epochs=3, learning_rate=1.0, delta=1e-5, m=400, seed=3)
    assert run.dp and run.epsilon_claimed is not None
    assert 0.0 <= run.epsilon_lower <= run.epsilon_claimed
    assert run.epsilon_lower <= run.ceiling


def test_control_without_noise_detects_the_leak():
    x, y = _features()
    run = run_canaries(x, y, num_classes=3, noise_multiplier=0.0, clip_norm=1.0, batch_size=32,
                       epochs=3, learning_rate=1.0, delta=1e-5, m=400, seed=3)
    assert not run.dp and run.epsilon_claimed is None
    assert run.v == run.r and run.epsilon_lower == pytest.approx(run.ceiling) and run.ceiling > 3


def test_empirical_hazards():
    base = {"epsilon_lower": 0.2, "epsilon_claimed": 2.0, "confidence": 0.95, "ceiling": 4.0}
    ok = {"site": "0", "dp": base, "control": {**base, "epsilon_lower": 4.0}}
    assert empirical_hazards(ok) == []
    bad = {**ok, "dp": {**base, "epsilon_lower": 2.5}, "control": {**base, "epsilon_lower": 0.1}}
    assert {(h.severity, h.code) for h in empirical_hazards(bad)} == {
        ("error", "empirical-exceeds-claimed"), ("warning", "empirical-audit-weak")}


def test_audit_run_site_on_a_run_directory(tmp_path):
    """The run's own config (digits, identity features) and the σ its site used."""
    from common.config import RunConfig
    from common.empirical import audit_run_site

    cfg = RunConfig(dataset="digits", backbone="identity", num_sites=2, local_epochs=1,
                    num_rounds=2, batch_size=32, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    summary = {"sites": {"1": {"epsilon": 3.0, "history": [{"noise_multiplier": 1.1}]},
                         "0": {"history": []}}}
    result = audit_run_site(tmp_path, summary, m=200, seed=1)
    assert result["site"] == "1" and result["records"] > 100
    dp, control = result["dp"], result["control"]
    assert dp["noise_multiplier"] == 1.1 and dp["steps"] > 0
    assert dp["epsilon_lower"] <= dp["epsilon_claimed"]
    assert control["epsilon_lower"] > dp["epsilon_lower"]
    with pytest.raises(ValueError, match="did not train"):
        audit_run_site(tmp_path, summary, site="0", m=200)

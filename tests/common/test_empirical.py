"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): statistics and a real head."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.audit.empirical import (
    audit_mechanism,
    audit_scores,
    count_guesses,
    epsilon_lower_bound,
    p_value,
    run_gradient_canaries,
)
from common.audit.checks import empirical_hazards


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


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_an_honest_mechanism_is_never_caught(sigma):
    x, y = _features()
    run = run_gradient_canaries(x, y, num_classes=3, noise_multiplier=sigma, sample_rate=0.2,
                                steps=20, clip_norm=1.0, delta=1e-5, m=400, seed=3)
    assert run.epsilon_claimed == run.epsilon_true > 0
    assert 0.0 <= run.epsilon_lower <= run.epsilon_claimed and not run.caught
    assert run.epsilon_lower <= run.ceiling and run.steps == 20 and run.sample_rate == 0.2


def test_mis_calibrated_controls_are_caught_and_power_is_reported():
    """σ/4 while claiming σ's ε is a lie the gradient canaries must catch; the
    audit reports the smallest true/claimed ratio it caught."""
    x, y = _features()
    # One-run audits are weak: with m canaries they cannot prove more than their ceiling
    # (about 4.7 for m = 1000). 4000 canaries catch σ/4 here (true ε 24.5 against a
    # claim of 2.2); σ/2 (6.6) is beyond them.
    result = audit_mechanism(x, y, num_classes=3, noise_multiplier=2.0, sample_rate=0.2,
                             steps=20, clip_norm=1.0, delta=1e-5, m=4000, seed=1)
    honest, (half, quarter) = result["dp"], result["controls"]
    assert not honest["caught"] and quarter["caught"]
    assert half["epsilon_claimed"] < half["epsilon_true"] < quarter["epsilon_true"]
    assert quarter["epsilon_true"] > 2 * quarter["epsilon_claimed"]
    ratio = result["power"]["smallest_ratio_caught"]
    assert ratio is not None and ratio <= quarter["epsilon_true"] / quarter["epsilon_claimed"]
    assert result["power"]["canaries"] == 4000 and result["power"]["seconds"] > 0
    assert empirical_hazards({"site": "0", **result}) == []


def test_empirical_hazards():
    base = {"epsilon_lower": 0.2, "epsilon_claimed": 2.0, "epsilon_true": 2.0,
            "confidence": 0.95, "label": "site mechanism", "caught": False}
    control = {**base, "label": "σ/4 claiming σ", "epsilon_true": 9.0, "epsilon_lower": 4.0,
               "caught": True}
    ok = {"site": "0", "dp": base, "controls": [control],
          "power": {"smallest_ratio_caught": 4.5}}
    assert empirical_hazards(ok) == []
    bad = {**ok, "dp": {**base, "epsilon_lower": 2.5},
           "controls": [{**control, "epsilon_lower": 0.1, "caught": False}],
           "power": {"smallest_ratio_caught": None}}
    assert {(h.severity, h.code) for h in empirical_hazards(bad)} == {
        ("error", "empirical-exceeds-claimed"), ("warning", "empirical-audit-weak")}


def test_audit_run_site_audits_the_mechanism_in_the_sites_ledger(tmp_path):
    """The run's own config (digits, identity features) and the σ, q, steps and clip
    norm that the site's ledger recorded for the run."""
    from common.audit.empirical import audit_run_site
    from common.audit.sources import read_ledger
    from common.config import RunConfig
    from common.data.datasets import load_dataset, site_data
    from common.privacy.accounting import LEDGER_ACCOUNTANT, dp_plan
    from common.privacy.ledger import Entry, Ledger

    cfg = RunConfig(dataset="digits", backbone="identity", num_sites=2, local_epochs=1,
                    num_rounds=2, batch_size=32, noise_multiplier=1.5,
                    out_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    # What site 1 committed for the run's two rounds: σ 1.5, Poisson q and steps from
    # its record count and the batch size.
    data = site_data(load_dataset(cfg.dataset, cfg.data_dir, cfg.seed), site_id=1,
                     num_sites=2, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                     holdout=cfg.site_holdout, shift=cfg.site_shift, seed=cfg.seed)
    q, steps = dp_plan(len(data.train_y), batch_size=32, epochs=1)
    ledger = Ledger(tmp_path / "sites" / "site-1" / "ledger.sqlite")
    for r in (1, 2):
        ledger.append(Entry(run_id="7", round=r, noise_multiplier=1.5, sample_rate=q,
                            steps=steps, clip_norm=1.0, delta=1e-5, sampler="poisson",
                            secure_rng=False, accountant=LEDGER_ACCOUNTANT,
                            accountant_version="x", libraries="{}",
                            dataset_size=len(data.train_y), epsilon_after=1.0))
    history = [{"round": r, "run_id": "7"} for r in (1, 2)]
    summary = {"run_id": "7", "sites": {"1": {"epsilon": 1.0, "history": history},
                                        "0": {"history": []}}}
    ledgers = {"1": read_ledger(ledger.path).entries}
    result = audit_run_site(tmp_path, summary, ledgers, m=200, seed=1)
    assert result["site"] == "1" and result["records"] == len(data.train_y) > 100
    mech = result["mechanism"]
    assert mech["noise_multiplier"] == 1.5 and mech["clip_norm"] == 1.0
    assert mech["steps"] == 2 * steps
    assert mech["sample_rate"] == q
    assert not result["dp"]["caught"] and len(result["controls"]) == 2
    with pytest.raises(ValueError, match="did not train"):
        audit_run_site(tmp_path, summary, ledgers, site="0", m=200)

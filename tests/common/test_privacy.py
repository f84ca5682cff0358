"""Privacy accounting: ε from the whole history, calibration, and input checks.

Histories are kept short (a few steps per round) so each PRV call stays well
under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from common.privacy.accounting import (
    ACCOUNTANTS,
    ADD_REMOVE,
    NEIGHBOURS,
    REPLACE_ONE,
    REPORTED_ACCOUNTANT,
    UNIT_OF_PRIVACY,
    Mechanism,
    calibrate_noise_multiplier,
    dp_plan,
    epsilon,
)

DELTA = 1e-5
# Three rounds at one site: σ is fixed for the run, the third round has a
# larger sample rate (e.g. the site's data grew), so the history is not uniform.
ROUNDS = (Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=5),
          Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=5),
          Mechanism(noise_multiplier=1.0, sample_rate=0.2, steps=3))


@pytest.mark.parametrize("name, accountant_cls", [("prv", PRVAccountant),
                                                  ("rdp", RDPAccountant)])
def test_epsilon_after_each_round_equals_one_accountant_fed_step_by_step(name, accountant_cls):
    single = accountant_cls()  # one accountant for the whole run, never reset
    eps = []
    for r, mech in enumerate(ROUNDS, start=1):
        for _ in range(mech.steps):
            single.step(noise_multiplier=mech.noise_multiplier, sample_rate=mech.sample_rate)
        expected = single.get_epsilon(delta=DELTA)
        got = epsilon(ROUNDS[:r], delta=DELTA, accountant=name, neighbours=ADD_REMOVE)
        assert got == pytest.approx(expected, rel=1e-9), f"round {r}"
        eps.append(got)
    assert 0 < eps[0] < eps[1] < eps[2]


def test_cumulative_epsilon_is_more_than_any_single_round():
    # A fresh accountant per round (the Flower Opacus example) reports only
    # the last round's spend; the cumulative ε must be strictly larger.
    per_round = epsilon(ROUNDS[1:2], delta=DELTA)
    assert epsilon(ROUNDS[:2], delta=DELTA) > per_round * 1.1


def test_rdp_is_the_looser_bound():
    assert epsilon(ROUNDS[:1], delta=DELTA, accountant="rdp", neighbours=ADD_REMOVE) > \
        epsilon(ROUNDS[:1], delta=DELTA, accountant="prv", neighbours=ADD_REMOVE)


def test_empty_history_spends_nothing():
    assert epsilon([], delta=DELTA) == 0.0


def test_pld_replace_one_is_reported_and_gdp_is_not_offered():
    assert (REPORTED_ACCOUNTANT, NEIGHBOURS) == ("pld", REPLACE_ONE)
    assert "replace-one" in UNIT_OF_PRIVACY
    assert set(ACCOUNTANTS) == {"pld", "prv", "rdp"}
    with pytest.raises(ValueError, match="unknown accountant 'gdp'.*Valid: pld, prv, rdp"):
        epsilon(ROUNDS, delta=DELTA, accountant="gdp")
    # Opacus's accountants cannot do replace-one: asking is an error, never a silent add/remove.
    with pytest.raises(ValueError, match="add/remove neighbours only"):
        epsilon(ROUNDS, delta=DELTA, accountant="prv")


@pytest.mark.parametrize("sigma, q, steps, prv, replace_one", [
    # add/remove: the environment notes' worked vectors (Opacus PRV); replace-one:
    # dp-accounting 0.6's PLD at the sites' interval (1e-3), recorded here so a change
    # in the library or in how the ledger is fed shows up.
    (1.0, 0.01, 10_000, 6.20, 10.883),
    (2.0, 0.01, 10_000, 2.17, 4.400),
    (1.0, 0.05, 1_000, 10.997, 18.743),
])
def test_replace_one_costs_more_than_add_remove_and_pld_agrees_with_prv(
        sigma, q, steps, prv, replace_one):
    history = [Mechanism(sigma, q, steps)]
    add_remove = epsilon(history, delta=DELTA, neighbours=ADD_REMOVE)
    assert add_remove == pytest.approx(prv, abs=0.03)  # PLD (dp-accounting) against PRV (Opacus)
    # Replacing a record is removing one and adding another: it costs more.
    assert epsilon(history, delta=DELTA) == pytest.approx(replace_one, abs=0.01)
    assert replace_one > 1.5 * add_remove


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
def test_epsilon_rejects_a_bad_delta(delta):
    with pytest.raises(ValueError, match="delta must be in \\(0, 1\\)"):
        epsilon(ROUNDS, delta=delta)


TARGET = 3.0
Q, STEPS = 0.2, 6


@pytest.fixture(scope="module")
def fresh_sigma() -> float:
    """σ calibrated (PLD, replace-one) for a site that has spent nothing yet."""
    return calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=Q,
                                      steps=STEPS)


def test_calibrated_sigma_fits_the_target_and_uses_most_of_it(fresh_sigma):
    spent = epsilon([Mechanism(noise_multiplier=fresh_sigma, sample_rate=Q, steps=STEPS)],
                    delta=DELTA)
    assert 0.98 * TARGET <= spent <= TARGET
    # A noticeably smaller σ would overspend: σ is (close to) the smallest that fits.
    smaller = epsilon([Mechanism(noise_multiplier=fresh_sigma * 0.97, sample_rate=Q,
                                 steps=STEPS)], delta=DELTA)
    assert smaller > TARGET


def test_calibration_accounts_for_the_prior_spend(fresh_sigma):
    prior = ROUNDS[1:2]  # σ 1, q 0.1, 5 steps: ε 2.69 (replace-one)
    sigma = calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=Q,
                                       steps=STEPS, prior=prior)
    spent = epsilon([*prior, Mechanism(noise_multiplier=sigma, sample_rate=Q, steps=STEPS)],
                    delta=DELTA)
    assert 0.98 * TARGET <= spent <= TARGET
    # Ignoring the prior (the fresh σ) would overspend.
    ignoring = epsilon([*prior, Mechanism(noise_multiplier=fresh_sigma, sample_rate=Q,
                                          steps=STEPS)], delta=DELTA)
    assert ignoring > TARGET
    assert sigma > fresh_sigma


def test_calibration_refuses_when_the_prior_already_spent_the_budget():
    # ROUNDS[:1] alone spends ε ≈ 2.69 at δ = 1e-5 (PLD, replace-one; 2.35 add/remove).
    with pytest.raises(ValueError, match=r"budget exhausted: spent ε=2\.69\d* already reaches the cap 2"):
        calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=0.1,
                                   steps=5, prior=ROUNDS[:1])


@pytest.mark.parametrize("n, batch, epochs, expected", [
    (100, 32, 2, (0.25, 8)),     # ceil(100/32) = 4 batches per epoch
    (64, 64, 1, (1.0, 1)),
    (65, 64, 3, (0.5, 6)),
    (1000, 10, 1, (0.01, 100)),
])
def test_dp_plan_numbers(n, batch, epochs, expected):
    q, steps = dp_plan(n, batch_size=batch, epochs=epochs)
    assert (q, steps) == (pytest.approx(expected[0], rel=1e-12), expected[1])


@pytest.mark.parametrize("n, batch", [(100, 32), (65, 64), (10, 3)])
def test_dp_plan_matches_opacus_poisson_loader(n, batch):
    loader = DataLoader(TensorDataset(torch.zeros(n, 2)), batch_size=batch)
    dp_loader = DPDataLoader.from_data_loader(loader)
    q, steps = dp_plan(n, batch_size=batch, epochs=1)
    assert q == pytest.approx(dp_loader.sample_rate, rel=1e-12)
    assert steps == len(dp_loader)


def test_dp_plan_rejects_a_batch_larger_than_the_site():
    with pytest.raises(ValueError, match="batch size 65 exceeds the site's 64 records"):
        dp_plan(64, batch_size=65, epochs=1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1), "noise_multiplier"),
    (dict(noise_multiplier=-1.0, sample_rate=0.1, steps=1), "noise_multiplier"),
    (dict(noise_multiplier=math.nan, sample_rate=0.1, steps=1), "noise_multiplier"),
    (dict(noise_multiplier=math.inf, sample_rate=0.1, steps=1), "noise_multiplier"),
    (dict(noise_multiplier=1.0, sample_rate=0.0, steps=1), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=-0.1, steps=1), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=math.nan, steps=1), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=0), "steps"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-2), "steps"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=2.5), "steps"),
])
def test_mechanism_rejects_bad_parameters(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Mechanism(**kwargs)


def test_mechanism_accepts_full_batch_and_gives_its_tuple():
    m = Mechanism(noise_multiplier=2, sample_rate=1.0, steps=3)
    assert m.as_tuple() == (2.0, 1.0, 3)


def test_compress_merges_equal_mechanisms_without_changing_epsilon():
    from opacus.accountants import PRVAccountant

    from common.privacy.accounting import compress

    a, b = Mechanism(2.0, 0.05, 30), Mechanism(1.5, 0.1, 20)
    history = [a, b, a, a]
    assert compress(history) == [Mechanism(2.0, 0.05, 90), b]
    raw = PRVAccountant()
    raw.history = [m.as_tuple() for m in history]  # uncompressed, straight to Opacus
    assert epsilon(history, delta=1e-5, accountant="prv", neighbours=ADD_REMOVE) == \
        pytest.approx(raw.get_epsilon(delta=1e-5), abs=0.02)


def test_equal_histories_share_one_pld_composition():
    """ε is a pure function of the merged history: a process serving many sites
    with the same schedule composes it once (the order of equal entries is irrelevant)."""
    from common.privacy.accounting import _pld_epsilon_merged

    a, b = Mechanism(1.1, 0.3, 7), Mechanism(1.1, 0.3, 3)
    before = _pld_epsilon_merged.cache_info().hits
    first = epsilon([a, b], delta=1e-5)
    assert epsilon([b, a], delta=1e-5) == first == epsilon([Mechanism(1.1, 0.3, 10)], delta=1e-5)
    assert _pld_epsilon_merged.cache_info().hits >= before + 2


def test_group_privacy_is_k_epsilon_and_the_grown_delta():
    from common.privacy.accounting import group_privacy

    assert group_privacy(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = group_privacy(0.5, 1e-6, 3)
    assert eps == 1.5 and abs(delta - 3 * math.exp(1.0) * 1e-6) < 1e-15
    # the example: ε = 4 per record, a patient with 5 records: no meaningful δ
    assert group_privacy(4.0, 1e-5, 5) == (20.0, 1.0)
    with pytest.raises(ValueError, match="group size"):
        group_privacy(1.0, 1e-5, 0)

"""Privacy accounting as pure functions of mechanism histories.

A history is a sequence of :class:`Mechanism` tuples ``(noise_multiplier,
sample_rate, steps)``: the Poisson-subsampled Gaussian mechanism that DP-SGD
ran. ε is always derived from the whole history, never stored on its own and
never reset between rounds (the Flower Opacus example rebuilds its
``PrivacyEngine`` each round and so reports per-round ε only).

Unit of privacy: one training record at one site. **Neighbours: replace-one.**
A site releases its exact record count (the FedAvg weight, and the sample rate
and steps it implies), so two datasets an observer cannot already tell apart
have the same size and differ in one record's value. Add/remove ε, which
assumes the size is secret, would understate what a site spends; the audit
shows it beside the reported value so the difference is visible.

Accountants (every one an upper bound):

* ``pld``: Google ``dp-accounting``'s privacy loss distribution, pessimistic
  discretisation. The only one here that supports replace-one for Poisson
  subsampling, so it is the reported, enforced and calibrating accountant.
* ``prv``: Opacus's PRV accountant (add/remove only): the audit's
  independent cross-check of the add/remove value.
* ``rdp``: Opacus's RDP (add/remove only, looser).

GDP is deliberately absent: it is not a valid upper bound.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REPLACE_ONE = "replace-one"
ADD_REMOVE = "add-remove"
NEIGHBOURS = REPLACE_ONE  # the relation of every ε this product reports and enforces
# The unit of privacy a site declares (its own policy, ``privacy-unit``): one training
# record, or one patient (all of a patient's records, clipped together). Every ε is
# stated with its unit; a ledger records the unit of each entry and never mixes them.
PRIVACY_UNITS = (RECORD, PATIENT) = ("record", "patient")
UNITS_OF_PRIVACY = {
    RECORD: ("one training record at one site (sample-level DP, replace-one neighbours: "
             "each site's record count is public)"),
    PATIENT: ("one patient at one site: all of that patient's training records (patient-level "
              "DP, replace-one neighbours over patients: each site's patient count is public)"),
}
UNIT_OF_PRIVACY = UNITS_OF_PRIVACY[RECORD]
ACCOUNTANTS = (PLD, PRV, RDP) = ("pld", "prv", "rdp")
REPORTED_ACCOUNTANT = PLD  # what sites enforce and commit; PRV is the audit's cross-check
# What a ledger entry records as its accountant: the accountant and the relation.
LEDGER_ACCOUNTANT = f"{REPORTED_ACCOUNTANT}/{NEIGHBOURS}"
# The sites' PLD discretisation. Pessimistic rounding keeps ε an upper bound; at
# ε ≈ 1 this interval overstates it by under 0.001 (the audit recomputes at 1e-4).
PLD_INTERVAL = 1e-3


@dataclass(frozen=True)
class Mechanism:
    """One run of the subsampled Gaussian mechanism (keyword-only on purpose)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or math.isinf(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")

    def as_tuple(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


def _opacus_accountant(name: str, history: Iterable[Mechanism]):
    from opacus.accountants import PRVAccountant, RDPAccountant  # lazy: heavy import

    acc = PRVAccountant() if name == PRV else RDPAccountant()
    acc.history = [m.as_tuple() for m in compress(history)]
    return acc


def _pld_accountant(neighbours: str, interval: float):
    import dp_accounting  # lazy: only sites and auditors account
    from dp_accounting.pld import pld_privacy_accountant

    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if neighbours == REPLACE_ONE
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return pld_privacy_accountant.PLDAccountant(neighboring_relation=relation,
                                                value_discretization_interval=interval)


def _dp_event(history: Iterable[Mechanism]):
    """The history as one ``dp-accounting`` event (equal (σ, q) entries merged)."""
    import dp_accounting  # lazy: see _pld_accountant

    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)), int(m.steps))
        for m in compress(history)])


def _pld_epsilon(history: Sequence[Mechanism], delta: float, neighbours: str,
                 interval: float) -> float:
    return _pld_epsilon_merged(tuple(compress(history)), float(delta), neighbours,
                               float(interval))


@functools.lru_cache(maxsize=1024)
def _pld_epsilon_merged(history: tuple[Mechanism, ...], delta: float, neighbours: str,
                        interval: float) -> float:
    """PLD ε of a merged history: a pure function, memoised per process. A Ray actor
    serving many simulated sites with the same schedule (σ, q, steps) composes
    their PLD once per round, not once per site; a PLD at large q costs tens to
    hundreds of ms, which made a round grow faster than its site count."""
    acc = _pld_accountant(neighbours, interval)
    acc.compose(_dp_event(history))
    return float(acc.get_epsilon(delta))


def compress(history: Iterable[Mechanism]) -> list[Mechanism]:
    """Merge entries that ran the same (σ, q), summing their steps.

    Composition is commutative, so the merged history has exactly the same
    privacy loss. It matters for speed: Opacus's PRV accountant builds one
    discretised PRV per entry, so a ledger of R identical rounds costs R times
    as much as one entry with R times the steps (5.6 s against 0.5 s for five
    rounds here), for the same ε.
    """
    merged: dict[tuple[float, float], int] = {}
    for m in history:
        key = (float(m.noise_multiplier), float(m.sample_rate))
        merged[key] = merged.get(key, 0) + int(m.steps)
    return [Mechanism(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in merged.items()]


def epsilon(history: Sequence[Mechanism], *, delta: float, accountant: str = REPORTED_ACCOUNTANT,
            neighbours: str = NEIGHBOURS, interval: float = PLD_INTERVAL) -> float:
    """ε upper bound at ``delta`` for the composition of ``history`` (0 if empty).

    ``interval`` is PLD's discretisation (ignored by ``prv`` and ``rdp``, which
    support add/remove neighbours only).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}. Valid: {', '.join(ACCOUNTANTS)} "
                         "(GDP is not offered: it can under-report ε)")
    if neighbours not in (REPLACE_ONE, ADD_REMOVE):
        raise ValueError(f"unknown neighbour relation {neighbours!r}; valid: {REPLACE_ONE}, "
                         f"{ADD_REMOVE}")
    if accountant != "pld" and neighbours != ADD_REMOVE:
        raise ValueError(f"Opacus's {accountant} accountant supports add/remove neighbours only")
    if not history:
        return 0.0
    if accountant == "pld":
        return _pld_epsilon(history, delta, neighbours, interval)
    with warnings.catch_warnings():
        # PRV sizes its domain with an RDP bound; Opacus warns when that helper
        # bound is not tight. It does not loosen the PRV result.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(_opacus_accountant(accountant, history).get_epsilon(delta=delta))


def dp_plan(num_records: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and steps that Opacus will use for one local training call.

    Opacus's Poisson loader takes ``sample_rate = 1 / len(loader)`` with
    ``len(loader) = ceil(N / batch_size)`` and runs ``len(loader)`` steps per epoch.
    """
    if batch_size > num_records:
        raise ValueError(f"batch size {batch_size} exceeds the site's {num_records} records")
    steps_per_epoch = math.ceil(num_records / batch_size)
    return 1.0 / steps_per_epoch, steps_per_epoch * epochs


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, prior: Sequence[Mechanism] = (),
                               tolerance: float = 0.005) -> float:
    """Smallest σ (to ``tolerance``, relative) such that ``prior`` plus ``steps``
    more steps at ``(σ, sample_rate)`` stays within ``target_epsilon`` at
    ``delta``, for the reported accountant and neighbour relation. The σ returned
    always fits: it is the feasible end of the search bracket.

    A pure function of its arguments, memoised: a site calibrates once per run
    and every later round of that run (in the same process) reuses the answer.

    Raises:
        ValueError: if ``prior`` alone already exceeds the target, or no σ up to
            10^4 fits.
    """
    return _calibrate(target_epsilon, delta, sample_rate, steps, tuple(compress(prior)),
                      tolerance)


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int,
               prior: tuple[Mechanism, ...], tolerance: float) -> float:
    """The memoised core of :func:`calibrate_noise_multiplier` (hashable arguments)."""
    spent = epsilon(prior, delta=delta)
    if spent >= target_epsilon:
        raise ValueError(
            f"budget exhausted: spent ε={spent:.4f} already reaches the cap {target_epsilon} "
            f"(δ={delta}); no further training fits"
        )

    import dp_accounting  # lazy: see _pld_accountant

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, Mechanism(sigma, sample_rate, steps)], delta=delta)

    # Brent's method (dp-accounting's calibration) on the reported accountant. σ
    # below 0.25 is never searched: it makes PLD's support huge, and no site's σ
    # floor allows it.
    try:
        sigma = float(dp_accounting.calibrate_dp_mechanism(
            lambda: _pld_accountant(NEIGHBOURS, PLD_INTERVAL),
            lambda s: _dp_event([*prior, Mechanism(s, sample_rate, steps)]),
            target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(0.25, 1.0),
            tol=tolerance))
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as exc:
        raise ValueError(f"no noise multiplier reaches ε={target_epsilon}: {exc}") from exc
    sigma = max(sigma, 0.25)
    # Brent returns σ within tol of the optimum, possibly just on the wrong side:
    # step up until the plan fits, so the guard never declines a calibrated round.
    while eps_at(sigma) > target_epsilon:
        sigma *= 1.0 + tolerance
    return sigma


def group_privacy(epsilon_: float, delta: float, k: int) -> tuple[float, float]:
    """``(ε_k, δ_k)`` for a group of ``k`` records under an ``(ε, δ)``-DP guarantee
    for one record: ``ε_k = k·ε``, ``δ_k = k·e^{(k−1)ε}·δ`` (group privacy; Dwork and
    Roth, Theorem 2.2 with the δ term of Vadhan's survey, Lemma 2.2).

    What a record-level guarantee means for a patient with up to ``k`` records:
    usually a much weaker claim, which is why it is shown beside the per-record ε.
    ``δ_k`` is capped at 1 (no guarantee at all).
    """
    if int(k) != k or k < 1:
        raise ValueError(f"group size k must be an integer >= 1, got {k!r}")
    if not (epsilon_ >= 0 and math.isfinite(epsilon_)) or not 0 <= delta < 1:
        raise ValueError(f"need a finite ε >= 0 and δ in [0, 1), got ε={epsilon_}, δ={delta}")
    k = int(k)
    try:
        delta_k = k * math.exp((k - 1) * epsilon_) * delta
    except OverflowError:
        delta_k = math.inf
    return k * epsilon_, min(1.0, delta_k)

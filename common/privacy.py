"""Privacy accounting as pure functions of mechanism histories.

A history is a sequence of :class:`Mechanism` tuples ``(noise_multiplier,
sample_rate, steps)``: the Poisson-subsampled Gaussian mechanism that DP-SGD
ran. ε is always derived from the whole history, never stored on its own and
never reset between rounds (the Flower Opacus example rebuilds its
``PrivacyEngine`` each round and so reports per-round ε only).

Unit of privacy: one training record at one site (sample-level DP,
add/remove neighbours).

Accountants: ``prv`` (Opacus's PRV accountant; the reported upper bound) and
``rdp`` (looser). GDP is deliberately absent: it is not a valid upper bound.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

UNIT_OF_PRIVACY = (
    "one training record at one site (sample-level DP, add/remove neighbours)"
)
ACCOUNTANTS = ("prv", "rdp")
REPORTED_ACCOUNTANT = "prv"


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


def _accountant(name: str, history: Iterable[Mechanism]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        acc = PRVAccountant()
    elif name == "rdp":
        acc = RDPAccountant()
    else:
        raise ValueError(f"unknown accountant {name!r}. Valid: {', '.join(ACCOUNTANTS)} "
                         "(GDP is not offered: it can under-report ε)")
    acc.history = [m.as_tuple() for m in compress(history)]
    return acc


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


def epsilon(history: Sequence[Mechanism], *, delta: float, accountant: str = "prv") -> float:
    """ε upper bound at ``delta`` for the composition of ``history`` (0 if empty)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    with warnings.catch_warnings():
        # PRV sizes its domain with an RDP bound; Opacus warns when that helper
        # bound is not tight. It does not loosen the PRV result.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(_accountant(accountant, history).get_epsilon(delta=delta))


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
                               accountant: str = "prv", tolerance: float = 0.005) -> float:
    """Smallest σ (to ``tolerance``) such that ``prior`` plus ``steps`` more
    steps at ``(σ, sample_rate)`` stays within ``target_epsilon`` at ``delta``.

    A pure function of its arguments, memoised: a site calibrates once per run
    and every later round of that run (in the same process) reuses the answer.

    Raises:
        ValueError: if ``prior`` alone already exceeds the target, or no σ up to
            10^4 fits.
    """
    return _calibrate(target_epsilon, delta, sample_rate, steps, tuple(compress(prior)),
                      accountant, tolerance)


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int,
               prior: tuple[Mechanism, ...], accountant: str, tolerance: float) -> float:
    """The memoised core of :func:`calibrate_noise_multiplier` (hashable arguments)."""
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise ValueError(
            f"budget exhausted: spent ε={spent:.4f} already reaches the cap {target_epsilon} "
            f"(δ={delta}); no further training fits"
        )

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, Mechanism(sigma, sample_rate, steps)], delta=delta,
                       accountant=accountant)

    lo, hi = 0.1, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier <= 1e4 reaches ε={target_epsilon}")
    if eps_at(lo) <= target_epsilon:
        return lo
    while hi - lo > tolerance * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi

"""How a site plans a run's noise: one home for the site, ``site check`` and the rehearsal.

A run of ``rounds`` rounds, each of ``epochs`` local epochs at ``batch_size`` over
``num_units`` privacy units (records, or patients where the site declares it),
is the Poisson-subsampled Gaussian mechanism at ``q = 1/ceil(N/B)`` for
``ceil(N/B)·epochs`` steps per round (:func:`common.privacy.accounting.dp_plan`).
σ is the smallest that keeps the site's prior history plus every planned round
within its cap (PLD, replace-one), never below the site's own floor; a σ the
request fixes is used as it is (the site's guard has checked it against the
floor). The σ depends only on the history before the run, so it is the same in
every round of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from common.privacy.accounting import (
    Mechanism,
    calibrate_noise_multiplier,
    dp_plan,
    epsilon,
)

# The σ floor a site accepts unless its policy says otherwise (node config
# ``min-noise-multiplier``): below it PLD's support grows large and utility collapses anyway.
DEFAULT_MIN_NOISE_MULTIPLIER = 0.3


@dataclass(frozen=True)
class RoundPlan:
    """One round's mechanism, and (computed when asked, from the tuples) what it costs."""

    mechanism: Mechanism  # (σ, q, steps) of one round
    rounds: int
    delta: float
    prior: tuple[Mechanism, ...]  # the history before the run
    history: tuple[Mechanism, ...]  # the history now (this run's earlier rounds too)

    @cached_property
    def prior_epsilon(self) -> float:
        return epsilon(self.prior, delta=self.delta)

    @cached_property
    def epsilon_after_round(self) -> float:
        """ε once this round is spent (PLD upper bound): what the guard projects."""
        return epsilon([*self.history, self.mechanism], delta=self.delta)

    @cached_property
    def epsilon_after_run(self) -> float:
        """ε after every planned round (PLD upper bound): what ``site check`` shows."""
        m = self.mechanism
        return epsilon([*self.prior, Mechanism(noise_multiplier=m.noise_multiplier,
                                               sample_rate=m.sample_rate,
                                               steps=m.steps * self.rounds)], delta=self.delta)


def plan_round(*, num_units: int, batch_size: int, epochs: int, rounds: int,
               target_epsilon: float, delta: float, prior: Sequence[Mechanism] = (),
               floor: float = DEFAULT_MIN_NOISE_MULTIPLIER, requested_sigma: float = 0.0,
               calibrate: Callable[..., float] = calibrate_noise_multiplier,
               history: Sequence[Mechanism] | None = None) -> RoundPlan:
    """σ for one round of a planned run (see the module doc).

    ``prior`` is the history before this run (σ is calibrated against it);
    ``history`` the full history now (this run's earlier rounds included; default
    ``prior``), against which the round's own ε is projected. ``calibrate`` has
    the signature of :func:`calibrate_noise_multiplier` (the site passes its
    on-disk memo).

    Raises:
        ValueError: the batch exceeds the units, or no σ fits (the cap is spent).
    """
    q, steps = dp_plan(num_units, batch_size=batch_size, epochs=epochs)
    sigma = requested_sigma
    if sigma == 0:
        sigma = max(floor, calibrate(target_epsilon=target_epsilon, delta=delta, sample_rate=q,
                                     steps=steps * rounds, prior=list(prior)))
    return RoundPlan(mechanism=Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps),
                     rounds=rounds, delta=delta, prior=tuple(prior),
                     history=tuple(prior if history is None else history))

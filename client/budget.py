"""The site's budget: plan σ, project ε, and charge the ledger before anything is released.

Every function here reads only the site's ledger (mechanism tuples and its
recorded cap), its policy and the request: never a record. σ is planned by
:func:`common.privacy.planning.plan_round`, the one planner that ``site check``
and the rehearsal use too; under a SuperNode (a fresh process per message) its
calibration search is remembered on the site's disk (:mod:`client.sigma_cache`).
"""

from __future__ import annotations

import functools
import json

from client.guard import PolicyDeclined
from client.settings import SiteSettings
from client.sigma_cache import calibrated_sigma
from common.privacy.accounting import LEDGER_ACCOUNTANT, Mechanism, epsilon
from common.privacy.ledger import Entry, Ledger, accountant_version, library_versions
from common.privacy.planning import RoundPlan, plan_round
from common.protocol import RoundRequest


class BudgetExhausted(RuntimeError):
    """The site declines: this release would take it past its own cap."""

    def __init__(self, spent: float, cap: float, projected: float, delta: float, unit: str):
        self.spent, self.cap, self.projected, self.delta = spent, cap, projected, delta
        super().__init__(
            f"budget exhausted: spent {spent:.4f}, cap {cap:.4f}, this round would reach "
            f"{projected:.4f} (ε at δ={delta:g}, unit: one {unit} at this site)")


def open_ledger(settings: SiteSettings) -> Ledger | None:
    """The site's ledger (None for a site whose policy trains without DP)."""
    return Ledger(settings.ledger_path, settings.ledger_key) if settings.dp else None


def check_cap(ledger: Ledger, settings: SiteSettings) -> None:
    """The ledger keeps the cap of its first use. A policy may lower it (stricter),
    never raise it or change δ: that is ``fedtransfer site raise-cap``, an explicit,
    recorded action of the site's operator.

    Raises:
        PolicyDeclined: the policy's cap is above the recorded one, or δ differs.
    """
    recorded = ledger.cap()
    if recorded is None:
        ledger.record_cap(epsilon=settings.target_epsilon, delta=settings.target_delta,
                          reason="first use")
        return
    cap, delta = recorded
    if settings.target_epsilon > cap or settings.target_delta != delta:
        raise PolicyDeclined(
            f"the cap in force (ε={settings.target_epsilon:g}, δ={settings.target_delta:g}) differs "
            f"from the one this site's ledger recorded (ε={cap:g}, δ={delta:g}); raising a cap or "
            "changing δ is an explicit site action: fedtransfer site raise-cap --ledger <the "
            "site's ledger> --epsilon ... --reason '...'")


def plan(req: RoundRequest, settings: SiteSettings, ledger: Ledger, num_units: int) -> RoundPlan:
    """This round's mechanism, projected against the cap before any record is read.

    σ is calibrated so that every run the ledger already holds (and this run's
    round-0 releases), plus all of this run's planned rounds, fits the site's cap;
    it depends only on the history before this run, so it is the same every round.

    Raises:
        BudgetExhausted: no σ fits, or this round would pass the cap.
    """
    entries = ledger.entries()
    before_run = [e.mechanism for e in entries if e.run_id != req.run_id or e.round == 0]
    history = [e.mechanism for e in entries]
    try:
        p = plan_round(num_units=num_units, batch_size=req.batch_size, epochs=req.local_epochs,
                       rounds=req.num_rounds, target_epsilon=settings.target_epsilon,
                       delta=settings.target_delta, prior=before_run, history=history,
                       floor=settings.min_noise_multiplier,
                       requested_sigma=req.noise_multiplier,
                       calibrate=functools.partial(calibrated_sigma, settings.cache_dir))
    except ValueError as exc:  # calibration found no σ: the cap is already spent
        spent = epsilon(history, delta=settings.target_delta)
        raise BudgetExhausted(spent, settings.target_epsilon, spent, settings.target_delta,
                              settings.privacy_unit) from exc
    if p.epsilon_after_round > settings.target_epsilon:
        raise BudgetExhausted(epsilon(history, delta=settings.target_delta),
                              settings.target_epsilon, p.epsilon_after_round,
                              settings.target_delta, settings.privacy_unit)
    return p


def project(settings: SiteSettings, ledger: Ledger, mechanism: Mechanism) -> float:
    """ε after ``mechanism``, checked against the cap (a release that is not a round).

    Raises:
        BudgetExhausted: it would pass the cap.
    """
    history = ledger.history()
    eps = epsilon([*history, mechanism], delta=settings.target_delta)
    if eps > settings.target_epsilon:
        raise BudgetExhausted(epsilon(history, delta=settings.target_delta),
                              settings.target_epsilon, eps, settings.target_delta,
                              settings.privacy_unit)
    return eps


def charge(ledger: Ledger, settings: SiteSettings, *, run_id: str, server_round: int,
           mechanisms: list[Mechanism], clip_norm: float, num_units: int, sampler: str,
           secure_rng: bool, planned: RoundPlan | None = None,
           trained: str = "") -> float:
    """Durably record what ran, before anything is released; returns the cumulative
    ε after it, computed from the ledger's tuples (read inside this call).

    ``planned`` is the projection made before training: when the ledger still
    holds exactly that history and what ran is exactly that mechanism, the
    projected ε *is* the ε after, and the accounting is not repeated. An entry
    holds mechanism tuples and public values only (no hash of the records).
    """
    history = ledger.history()
    eps_after = epsilon(history, delta=settings.target_delta) if not mechanisms else 0.0
    for m in mechanisms:
        history.append(m)
        if planned is not None and history == [*planned.history, planned.mechanism]:
            eps_after = planned.epsilon_after_round
        else:
            eps_after = epsilon(history, delta=settings.target_delta)
        ledger.append(Entry(
            run_id=run_id, round=server_round, noise_multiplier=m.noise_multiplier,
            sample_rate=m.sample_rate, steps=m.steps, clip_norm=clip_norm,
            delta=settings.target_delta, sampler=sampler, secure_rng=secure_rng,
            accountant=LEDGER_ACCOUNTANT, accountant_version=accountant_version(),
            libraries=json.dumps(library_versions(), sort_keys=True), dataset_size=num_units,
            epsilon_after=eps_after, trained=trained, unit=settings.privacy_unit,
            group_size=settings.group_size))
    return eps_after

"""``fedtransfer site check``: is a site's data ready to join, and what will it cost?

Pure functions over :mod:`common.data.readers` scans and :mod:`common.privacy.accounting`.
The ε estimate is for the *planned* run at the site's own cap: with σ = 0
(the default) the site calibrates σ so that its ledger's history plus every
planned round fits the cap, exactly as the site does at training time
(:func:`common.privacy.planning.plan_round`, the one planner); with a fixed σ it reports the ε that σ reaches.
Unit of privacy: one training record at this site.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.batches import BatchPlanError, plan_batch
from common.data.readers import Scan, SiteDataError, scan
from common.data.schema import Schema, SchemaError
from common.privacy.accounting import (
    PATIENT,
    RECORD,
    UNITS_OF_PRIVACY,
    Mechanism,
    dp_plan,
    epsilon,
    group_privacy,
)
from common.privacy.ledger import Ledger
from common.privacy.planning import DEFAULT_MIN_NOISE_MULTIPLIER, plan_round


@dataclass(frozen=True)
class Plan:
    """The run a site expects to join (the server's schedule) and its own cap."""

    target_epsilon: float = 4.0
    target_delta: float = 1e-5
    num_rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    noise_multiplier: float = 0.0  # 0: calibrate to the cap
    holdout: float = 0.2
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER  # the site's σ floor
    unit: str = RECORD  # the site's unit of privacy (its policy): what the count counts
    group_size: int = 1  # its declared max-records-per-patient (k)


@dataclass
class Estimate:
    train_records: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float | None
    epsilon: float | None
    prior_epsilon: float
    fits: bool
    note: str
    unit: str = RECORD
    # A record-level site that declares up to k records per patient: (k, ε_k, δ_k), the
    # group-privacy guarantee per patient of the planned run (the weaker claim, shown).
    group: tuple[int, float, float] | None = None


@dataclass
class SiteReport:
    spec: str
    kind: str
    num_records: int
    classes: list[str]
    counts: dict[str, int]
    image_sizes: dict[str, int]
    corrupt: list[dict[str, str]]
    refused: int
    label_problems: list[str]
    column_problems: list[str]
    notes: list[str]
    estimate: Estimate | None
    errors: list[str] = field(default_factory=list)
    # Patient ids (where the spec declares them): counts only; the ids never leave the site.
    patients: int | None = None
    records_per_patient: dict[str, float] | None = None
    # How many patients have 1, 2, ... records (local: the site's own report, never sent).
    patients_by_records: dict[int, int] | None = None
    unit: str = RECORD

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "unit": UNITS_OF_PRIVACY[self.unit]}


def estimate_epsilon(num_train: int, plan: Plan, prior: list[Mechanism] | None = None
                     ) -> Estimate:
    """σ and ε for ``plan.num_rounds`` rounds on ``num_train`` records, at the
    expected batch the coordinator plans for this many records
    (:func:`common.batches.plan_batch`) and with the site's σ floor, planned exactly
    as the site plans them (:func:`common.privacy.planning.plan_round`)."""
    prior = prior or []
    spent = epsilon(prior, delta=plan.target_delta)
    try:
        batch = plan_batch(num_train, batch_size=plan.batch_size)
    except BatchPlanError as exc:
        return Estimate(num_train, math.nan, 0, None, None, spent, False, str(exc), plan.unit)
    try:
        planned = plan_round(num_units=num_train, batch_size=batch, epochs=plan.local_epochs,
                             rounds=plan.num_rounds, target_epsilon=plan.target_epsilon,
                             delta=plan.target_delta, prior=prior,
                             floor=plan.min_noise_multiplier,
                             requested_sigma=plan.noise_multiplier)
    except ValueError as exc:
        q, steps = dp_plan(num_train, batch_size=batch, epochs=plan.local_epochs)
        return Estimate(num_train, q, steps, None, spent, spent, False, str(exc), plan.unit)
    mech = planned.mechanism
    sigma, q, steps = mech.noise_multiplier, mech.sample_rate, mech.steps
    eps = planned.epsilon_after_run
    fits = eps <= plan.target_epsilon + 1e-9
    how = "calibrated to the cap" if plan.noise_multiplier == 0 else "fixed by the server"
    if sigma == plan.min_noise_multiplier and plan.noise_multiplier == 0:
        how = f"the site's floor min-noise-multiplier {plan.min_noise_multiplier:g}"
    batch_note = f"expected batch {batch}" + (
        f" (planned for {num_train} {plan.unit}s; requested {plan.batch_size})"
        if batch != plan.batch_size else "")
    note = (f"{plan.num_rounds} rounds x {steps} steps at q={q:.4f} ({batch_note}), "
            f"σ={sigma:.3f} ({how}): "
            f"ε={eps:.3f} at δ={plan.target_delta:g}, cap {plan.target_epsilon:g}")
    if not fits:
        rounds = _rounds_that_fit(prior, sigma, q, steps, plan)
        note += f"; only {rounds} round(s) fit, later rounds will be declined"
    group = None
    if plan.unit == RECORD and plan.group_size > 1:
        group = (plan.group_size, *group_privacy(eps, plan.target_delta, plan.group_size))
    return Estimate(num_train, q, steps, sigma, eps, spent, fits, note, plan.unit, group)


def _rounds_that_fit(prior, sigma, q, steps, plan: Plan) -> int:
    n = 0
    while n < plan.num_rounds and epsilon(
            [*prior, Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps * (n + 1))],
            delta=plan.target_delta) <= plan.target_epsilon:
        n += 1
    return n


# A class this many times rarer than the site's most common one is worth a warning: the
# site's DP head sees few of its gradients, and its holdout says little about it.
IMBALANCE_RATIO = 10.0


def imbalance_warnings(counts: dict[str, int], ratio: float = IMBALANCE_RATIO) -> list[str]:
    """A warning per class (with records) rarer than the most common by more than ``ratio``."""
    present = {c: n for c, n in counts.items() if n}
    if len(present) < 2:
        return []
    top, most = max(present.items(), key=lambda kv: kv[1])
    return [f"class imbalance: '{c}' has {n} records against {most} of '{top}' (ratio "
            f"{most / n:.0f}, above {ratio:g})" for c, n in present.items() if most / n > ratio]


def check_site(spec: str, plan: Plan, *, ledger: str | Path | None = None,
               num_classes: int | None = None, classes: tuple[str, ...] | None = None,
               schema: Schema | None = None) -> SiteReport:
    """Read ``spec`` and report on it (never raises for bad data: it is listed).
    ``classes``: the site's declared class names (node config ``class-names``);
    ``schema``: the federation's schema (classes, a CSV's columns by name, and an
    image schema's size, channels and window: read exactly as training and
    ``predict`` read them, through :mod:`common.data.readers`)."""
    size = channels = None
    if schema is not None and schema.input == "image":
        if schema.image_size:
            size = (schema.image_size, schema.image_size)
        channels = schema.image_channels or None
    if schema is not None:
        if classes is not None and tuple(classes) != schema.classes:
            return SiteReport(spec, "?", 0, [], {}, {}, [], 0, [], [], [], None, errors=[
                f"class names {list(classes)} differ from the schema's {list(schema.classes)}"])
        classes = schema.classes
    try:
        s: Scan | None = scan(spec, classes=classes, schema=schema, size=size, channels=channels)
    except (SiteDataError, SchemaError) as exc:
        return SiteReport(spec, "?", 0, [], {}, {}, [], 0, [], [], [], None, errors=[str(exc)])
    errors = [p for p in s.problems() if p.startswith("unreadable ")]
    errors += [p for p in s.label_problems if "is empty" not in p]
    errors += s.column_problems
    if s.class_source == "sorted":
        errors.append(f"labels are names ({', '.join(s.classes)}), not integer indices: set "
                      "class-names in the node config (and --class-names here) to the "
                      "federation's class names, in its order")
    warnings = [p for p in s.label_problems if "is empty" in p]
    warnings += imbalance_warnings(s.counts)
    if num_classes is not None and len(s.classes) > num_classes:
        errors.append(f"{len(s.classes)} classes, the federation has {num_classes}")
    n = len(s.y)
    if n < 2:
        errors.append(f"{n} usable records: a site needs at least 2")
    patients = per_patient = by_records = None
    if s.patients is not None and len(s.patients):
        sizes = np.array(list(Counter(s.patients.tolist()).values()))
        patients = len(sizes)
        per_patient = {"min": int(sizes.min()), "median": float(np.median(sizes)),
                       "mean": float(sizes.mean()), "max": int(sizes.max())}
        by_records = {int(k): int(v) for k, v in sorted(Counter(sizes.tolist()).items())}
        if plan.unit == RECORD and plan.group_size > 1 and per_patient["max"] > plan.group_size:
            errors.append(f"a patient has {per_patient['max']} records, above the declared "
                          f"max-records-per-patient {plan.group_size}: the group-privacy ε "
                          "per patient would not hold")
    if plan.unit == PATIENT and patients is None:
        errors.append("privacy-unit = 'patient', but the records carry no patient id: declare "
                      "where they come from (?patient=...; docs/data.md, 'Patient ids')")
    units = patients if plan.unit == PATIENT else n
    estimate = None
    if units is not None and units >= 2:
        prior = []
        if ledger is not None and Path(ledger).is_file():

            prior = Ledger(ledger).history()
        n_train = units - max(1, int(round(units * plan.holdout)))
        estimate = estimate_epsilon(n_train, plan, prior)
        if not estimate.fits:  # a site that would decline rounds is not ready to join
            errors.append(f"the planned run does not fit: {estimate.note}")
    return SiteReport(spec=spec, kind=s.kind, num_records=n, classes=list(s.classes),
                      counts=s.counts, image_sizes=dict(s.image_sizes),
                      corrupt=[{"file": f, "reason": why} for f, why in s.corrupt],
                      refused=s.refused, patients=patients, records_per_patient=per_patient,
                      patients_by_records=by_records, unit=plan.unit,
                      label_problems=s.label_problems, column_problems=list(s.column_problems),
                      notes=[*warnings, *s.notes], estimate=estimate, errors=errors)


def format_report(r: SiteReport) -> str:
    refused = f", {r.refused} refused (named below)" if r.refused else ""
    lines = [f"site data: {r.spec} ({r.kind}): {r.num_records} usable records{refused}"]
    if r.patients is not None:
        p = r.records_per_patient
        lines.append(f"patients: {r.patients}; records per patient min {p['min']}, median "
                     f"{p['median']:g}, mean {p['mean']:.2f}, max {p['max']} (ids stay here)")
        if r.patients_by_records:
            lines.append("  patients by records (local only): " + ", ".join(
                f"{k}: {v}" for k, v in r.patients_by_records.items()))
    if r.classes:
        lines.append("records per class: " + ", ".join(f"{c}: {n}" for c, n in r.counts.items()))
    if r.image_sizes:
        lines.append("image sizes: " + ", ".join(f"{k} ({v})" for k, v in
                                                 sorted(r.image_sizes.items())))
    for c in r.corrupt:
        lines.append(f"  corrupt: {c['file']}: {c['reason']}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    e = r.estimate
    if e is not None:
        prior = f" (already spent {e.prior_epsilon:.3f} per the ledger)" if e.prior_epsilon else ""
        lines.append(f"privacy estimate: {e.train_records} training {e.unit}s{prior}; {e.note}")
        if e.epsilon is not None:
            lines.append(f"  ε per {e.unit}: {e.epsilon:.3f}")
        if e.group is not None:
            k, eps_k, delta_k = e.group
            lines.append(f"  ε per patient (group privacy, up to k={k} records per patient): "
                         f"{eps_k:.3f} with δ = {delta_k:.3g}; the per-record ε above is the "
                         "stronger-sounding, narrower claim")
        lines.append(f"  unit: {UNITS_OF_PRIVACY[e.unit]}")
    if r.errors:
        lines.append(f"NOT READY: {len(r.errors)} problem(s)")
        lines += [f"  error: {x}" for x in r.errors]
    else:
        lines.append("ready to join")
    return "\n".join(lines)

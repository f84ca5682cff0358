"""The patient, not the record, as the unit of privacy: what it costs (issue 26).

On the grouped PneumoniaMNIST scenario (``simulations/configs/pneumonia-patients.toml``:
PneumoniaMNIST with *constructed* patients, 1-10 records each, docs/data.md), 4
hospitals partitioned by patient, δ = 1e-5, three arms over the same sites:

* ``patient``: patient-level DP-SGD at ε = 1 **per patient**
  (:func:`common.models.training.train_dp_patients`: Poisson sampling over
  patients, one bag of at most ``max-records-per-patient`` records per patient,
  clipped once per patient);
* ``record``: record-level DP-SGD at ε = 1 **per record**
  (:func:`common.models.training.train_dp`), shown with the group-privacy ε per
  patient it implies for the largest patient (k records:
  :func:`common.privacy.accounting.group_privacy`);
* ``none``: no DP (:func:`common.models.training.train_plain`).

The training runs through the functions a site runs, not a copy: the sites'
records, patient partition and cached features from :mod:`client.admission` and :mod:`client.round`
(``load_site_data``, ``site_features``), σ from the PLD calibration in
:mod:`common.privacy.accounting` (``dp_plan`` over the site's *patients* or
records, ``calibrate_noise_multiplier`` so all planned rounds fit the cap, and
the sites' σ floor), one call per site and round, and FedAvg through
:func:`common.aggregation.aggregate`, weighted by each site's public count
(patients under the patient unit, records under the record unit). Not run:
Flower's message passing, the ledgers and the per-round evaluation (the site
does not yet take ``privacy-unit``; the lead wires it).

The learning rate of each arm (and of each lever setting) is chosen from a grid
by the mean validation AUC over the seeds; the test split is read only for the
chosen learning rate's runs. Balanced accuracy is reported
at argmax and at the decision rule the server would ship (chosen on val).

``python -m benchmarks.patient_unit`` runs the comparison (3 seeds) and, with
``--levers``, the patient arm again at other bag caps, patients per step and
rounds. Results: ``benchmarks/results/<date>-<machine>-patient-unit.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, machine_tag
from client.admission import load_site_data
from client.round import site_features
from client.settings import scenario_policy
from common.aggregation import aggregate
from common.config import RunConfig
from common.data.grouping import group_sizes
from common.jsonio import clean_json
from common.models import training
from common.models.finetune import load_model_state, model_state
from common.privacy.accounting import (
    PATIENT,
    RECORD,
    UNITS_OF_PRIVACY,
    calibrate_noise_multiplier,
    compress,
    dp_plan,
    epsilon,
    group_privacy,
)
from server.evaluation import GlobalEval
from simulations.scenarios import resolve_config

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
SCENARIO = "pneumonia-patients"
ARMS = (PATIENT, RECORD, "none")
MIN_NOISE_MULTIPLIER = 0.3  # the sites' σ floor (client.settings default)
# Expected patients per step for the patient arm: the record arm's 256 records per step
# divided by the construction's mean of about 2.5 records per patient (a property of the
# public rule in common/data/grouping.py, not of any site's records).
PATIENTS_PER_STEP = 100
MAX_RECORDS_PER_PATIENT = 10  # the construction's largest patient: no patient is subsampled
LEARNING_RATES = {PATIENT: (0.03, 0.1, 0.3, 1.0, 3.0), RECORD: (0.03, 0.1, 0.3, 1.0, 3.0),
                  "none": (0.3, 1.0, 3.0, 10.0, 30.0)}
# The known levers for patient-level DP-SGD, each changed alone from the base setting.
# (150 patients per step: the smallest site holds 198 patients.)
LEVERS = ({"max_records_per_patient": 5}, {"max_records_per_patient": 2},
          {"patients_per_step": 150}, {"patients_per_step": 50}, {"num_rounds": 20},
          {"num_rounds": 5})


@dataclass
class Site:
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    patients: int  # the public count under the patient unit
    records: int  # the public count under the record unit
    largest: int  # records of the site's largest patient (local; shown for group privacy)


class Fixture:
    """The scenario's sites (records, patients, cached features) and the server's eval split."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.sites: list[Site] = []
        for site_id in range(cfg.num_sites):
            settings = scenario_policy(cfg, {"partition-id": site_id})
            data = load_site_data(settings)
            if data.train_groups is None:
                raise ValueError(f"dataset {cfg.dataset!r} carries no patient ids; the patient "
                                 "unit needs them (e.g. medmnist:<name>?patients=constructed)")
            feats = site_features(settings, cfg.trainable, data)
            sizes = group_sizes(data.train_groups)
            self.sites.append(Site(feats.train, data.train_y, data.train_groups, len(sizes),
                                   len(data.train_y), int(sizes.max())))
        self.eval = GlobalEval(cfg)
        self._sigma: dict[tuple, float] = {}

    def sigma(self, target_epsilon: float, units: int, batch_size: int,
              epochs: int) -> tuple[float, float, int]:
        """(σ, q, steps) over ``units`` (patients or records) for the whole run."""
        q, steps = dp_plan(units, batch_size=batch_size, epochs=epochs)
        key = (target_epsilon, units, batch_size, epochs)
        if key not in self._sigma:
            self._sigma[key] = calibrate_noise_multiplier(
                target_epsilon=target_epsilon, delta=self.cfg.target_delta, sample_rate=q,
                steps=steps)
        return max(self._sigma[key], MIN_NOISE_MULTIPLIER), q, steps


@dataclass(frozen=True)
class Setting:
    """One arm's schedule: the scenario's, with the patient arm's own knobs."""

    arm: str
    num_rounds: int
    patients_per_step: int = PATIENTS_PER_STEP
    max_records_per_patient: int = MAX_RECORDS_PER_PATIENT

    def label(self) -> str:
        if self.arm != PATIENT:
            return self.arm
        return (f"patient (cap {self.max_records_per_patient}, {self.patients_per_step} "
                f"patients/step, {self.num_rounds} rounds)")


def run_arm(fx: Fixture, st: Setting, *, target_epsilon: float, seed: int, lr: float) -> dict:
    """One federated run of ``st`` over the fixture's sites; the global model and the
    mechanisms that ran, per site."""
    cfg = fx.cfg
    dp = st.arm != "none"
    state = model_state(fx.eval.head())
    plans = []
    for s in fx.sites:
        units = s.patients if st.arm == PATIENT else s.records
        batch = st.patients_per_step if st.arm == PATIENT else cfg.batch_size
        plans.append(fx.sigma(target_epsilon, units, batch, cfg.local_epochs * st.num_rounds)
                     if dp else None)
    spent: list[list] = [[] for _ in fx.sites]
    train_s = 0.0
    device = training.resolve_device(cfg.device)
    for r in range(1, st.num_rounds + 1):
        states, counts = [], []
        for i, s in enumerate(fx.sites):
            model = load_model_state(fx.eval.head(), state)
            kw = dict(epochs=cfg.local_epochs, lr=lr, momentum=cfg.momentum,
                      seed=seed * 1_000_003 + 1000 * r + i, device=device)
            if st.arm == PATIENT:
                res = training.train_dp_patients(
                    model, s.x, s.y, groups=s.groups,
                    max_records_per_patient=st.max_records_per_patient,
                    batch_size=st.patients_per_step, noise_multiplier=plans[i][0],
                    clip_norm=cfg.clip_norm, **kw)
            elif st.arm == RECORD:
                res = training.train_dp(model, s.x, s.y, batch_size=cfg.batch_size,
                                        noise_multiplier=plans[i][0], clip_norm=cfg.clip_norm,
                                        **kw)
            else:
                res = training.train_plain(model, s.x, s.y, batch_size=cfg.batch_size, **kw)
            train_s += res.seconds
            spent[i] += res.mechanisms
            states.append(model_state(model))
            counts.append(s.patients if st.arm == PATIENT else s.records)
        state = aggregate(states, counts)  # the server's weighted FedAvg, by public count
    out = {"state": state, "seconds_per_round": train_s / st.num_rounds}
    if dp:
        out["sites"] = [{"unit": st.arm, "public_count": s.patients if st.arm == PATIENT
                         else s.records, "noise_multiplier": p[0], "sample_rate": p[1],
                         "steps": p[2], "epsilon": epsilon(m, delta=cfg.target_delta),
                         "mechanisms": [list(x.as_tuple()) for x in m]}
                        for s, p, m in zip(fx.sites, plans, spent, strict=True)]
        out["epsilon_spent"] = max(site["epsilon"] for site in out["sites"])
        for i, (m, p) in enumerate(zip(spent, plans, strict=True)):
            if [x.as_tuple() for x in compress(m)] != [p]:  # what ran is what was planned
                raise RuntimeError(f"site {i} ran {compress(m)}, planned (σ, q, steps) = {p}")
    return out


def _choose_and_run(fx: Fixture, st: Setting, grid, *, target_epsilon: float, seeds) -> list[dict]:
    """Every (learning rate, seed) run; the learning rate with the best mean val AUC
    over the seeds is chosen, and only its runs are scored on test."""
    runs: dict[float, list] = {}
    for lr in grid:
        for seed in seeds:
            out = run_arm(fx, st, target_epsilon=target_epsilon, seed=seed, lr=lr)
            m = fx.eval.metrics(out["state"])
            runs.setdefault(lr, []).append((seed, out, m))
            log.info("patient-unit %s lr %g seed %d: val AUC %.4f", st.label(), lr, seed,
                     m["val"]["auc"])
    tried = {lr: float(np.mean([m["val"]["auc"] for _, _, m in rs])) for lr, rs in runs.items()}
    lr = max(tried, key=tried.get)
    rows = []
    for seed, out, m in runs[lr]:
        shipped = fx.eval.report(out["state"])
        rows.append({
            "arm": st.arm, "setting": st.label(), "num_rounds": st.num_rounds,
            "patients_per_step": st.patients_per_step if st.arm == PATIENT else None,
            "max_records_per_patient": st.max_records_per_patient if st.arm == PATIENT else None,
            "seed": seed, "learning_rate": lr,
            "val_auc_mean_by_learning_rate": {f"{k:g}": v for k, v in tried.items()},
            "val_auc": m["val"]["auc"], "auc": m["test"]["auc"],
            "balanced_accuracy": m["test"]["balanced_accuracy"],
            "balanced_accuracy_at_rule": shipped["test"]["balanced_accuracy"],
            "rule": shipped["decision"].get("rule"),
            **{k: v for k, v in out.items() if k != "state"}})
        log.info("patient-unit %s seed %d: test AUC %.4f, bal. acc. %.4f at the rule (lr %g)",
                 st.label(), seed, rows[-1]["auc"], rows[-1]["balanced_accuracy_at_rule"], lr)
    return rows


def summarise(rows: list[dict], *, delta: float, largest_patient: int) -> list[dict]:
    """Mean and sd over seeds per setting; the record arm's group-privacy ε per patient."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    record = groups.get(RECORD)
    out = []
    for label, rs in groups.items():
        auc = np.array([r["auc"] for r in rs])
        entry = {"setting": label, "arm": rs[0]["arm"], "seeds": len(rs),
                 "learning_rate": rs[0]["learning_rate"],
                 "auc_mean": float(auc.mean()),
                 "auc_sd": float(auc.std(ddof=1)) if len(rs) > 1 else 0.0,
                 "val_auc_mean": float(np.mean([r["val_auc"] for r in rs])),
                 "balanced_accuracy_mean": float(np.mean([r["balanced_accuracy"] for r in rs])),
                 "balanced_accuracy_at_rule_mean": float(np.mean(
                     [r["balanced_accuracy_at_rule"] for r in rs])),
                 "seconds_per_round_mean": float(np.mean([r["seconds_per_round"] for r in rs]))}
        if rs[0]["arm"] != "none":
            eps = max(r["epsilon_spent"] for r in rs)
            entry["epsilon"] = eps
            entry["unit"] = UNITS_OF_PRIVACY[rs[0]["arm"]]
            entry["sample_rates"] = [s["sample_rate"] for s in rs[0]["sites"]]
            entry["noise_multipliers"] = [s["noise_multiplier"] for s in rs[0]["sites"]]
        if rs[0]["arm"] == RECORD:
            eps_k, delta_k = group_privacy(eps, delta, largest_patient)
            entry["group_privacy_per_patient"] = {"k": largest_patient, "epsilon": eps_k,
                                                  "delta": delta_k}
        if rs[0]["arm"] == PATIENT and record:
            entry["auc_minus_record"] = float(auc.mean() - np.mean([r["auc"] for r in record]))
        out.append(entry)
    return out


def run(cfg: RunConfig, *, seeds=(0, 1, 2), target_epsilon: float = 1.0, levers=(),
        learning_rates=None, patients_per_step: int = PATIENTS_PER_STEP,
        max_records_per_patient: int = MAX_RECORDS_PER_PATIENT, on_rows=None) -> dict:
    """Rows for every arm (and each lever setting of the patient arm), and their summary.
    ``levers``: changes to the patient arm's base setting, each run as its own setting."""
    grids = {**LEARNING_RATES, **(learning_rates or {})}
    t0 = time.perf_counter()
    fx = Fixture(cfg)
    setup_s = time.perf_counter() - t0
    rows: list[dict] = []
    settings = [Setting(arm, cfg.num_rounds, patients_per_step, max_records_per_patient)
                for arm in ARMS]
    base = settings[0]
    settings += [Setting(PATIENT, **{"num_rounds": base.num_rounds,
                                     "patients_per_step": base.patients_per_step,
                                     "max_records_per_patient": base.max_records_per_patient,
                                     **lever}) for lever in levers]
    for st in settings:
        rows += _choose_and_run(fx, st, grids[st.arm], target_epsilon=target_epsilon,
                                seeds=tuple(seeds))
        if on_rows is not None:
            on_rows(rows)
    largest = max(s.largest for s in fx.sites)
    sizes = [group_sizes(s.groups) for s in fx.sites]
    return {"rows": rows, "summary": summarise(rows, delta=cfg.target_delta,
                                               largest_patient=largest),
            "setting": {
                "scenario": SCENARIO, "dataset": cfg.dataset, "num_sites": cfg.num_sites,
                "partitioner": cfg.partitioner, "dirichlet_alpha": cfg.dirichlet_alpha,
                "rounds": cfg.num_rounds, "local_epochs": cfg.local_epochs,
                "record_batch_size": cfg.batch_size, "patients_per_step": patients_per_step,
                "max_records_per_patient": max_records_per_patient,
                "clip_norm": cfg.clip_norm, "delta": cfg.target_delta,
                "target_epsilon": target_epsilon, "backbone": cfg.backbone,
                "image_size": cfg.image_size, "head": cfg.head, "seeds": list(seeds),
                "learning_rates": {k: list(v) for k, v in grids.items()},
                "site_patients": [s.patients for s in fx.sites],
                "site_records": [s.records for s in fx.sites],
                "site_largest_patient": [s.largest for s in fx.sites],
                "site_mean_records_per_patient": [float(z.mean()) for z in sizes],
                "group_privacy_k": largest,
                "group_privacy_k_is": "the largest patient's record count over all sites",
                "selection": "learning rate per setting by mean val AUC over the seeds; test "
                             "read for the chosen learning rate's runs only",
                "path": "function-level (client.admission + client.round + common.models.training + "
                        "common.privacy.accounting + common.aggregation.aggregate), not Flower",
                "setup_seconds": setup_s}}


def scenario_config(data_path: Path = DEFAULT_DATA, work_dir: Path | None = None,
                    **changes) -> RunConfig:
    """The grouped scenario, reading ``data_path`` and caching under ``work_dir``."""
    # The scenario is the patient unit's run (100 patients per step); the record arm keeps
    # its own 256 records per step, as measured.
    cfg = resolve_config(SCENARIO, [], None).replace(batch_size=256)
    work = Path(work_dir or REPO / ".fedtransfer" / "bench")
    return cfg.replace(dataset=f"medmnist:{data_path}?patients=constructed", data_dir="",
                       cache_dir=str(work / "cache"), device="auto", **changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.patient_unit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="pneumoniamnist.npz")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epsilon", type=float, default=1.0, help="ε per unit (default 1)")
    p.add_argument("--levers", action="store_true",
                   help="also run the patient arm at each lever setting (bag cap, patients "
                        "per step, rounds)")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: faster than 2 on a shared 2-core machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = scenario_config(Path(args.data))
    info = machine_info()
    out = Path(args.out or RESULTS / f"{dt.date.today().isoformat()}-{machine_tag(info)}-"
                                     "patient-unit.json")
    t0 = time.perf_counter()

    def write(doc: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(clean_json({**doc, "machine": info, "torch_threads": args.threads,
                                              "command": "python -m benchmarks.patient_unit "
                                                         + " ".join(argv or sys.argv[1:]),
                                              "seconds": time.perf_counter() - t0}),
                                  indent=1) + "\n")

    res = run(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")),
              target_epsilon=args.epsilon, levers=LEVERS if args.levers else (),
              on_rows=lambda rows: write({"complete": False, "rows": rows}))
    write({"complete": True, **res})
    for e in res["summary"]:
        extra = ""
        if "group_privacy_per_patient" in e:
            g = e["group_privacy_per_patient"]
            extra = f"; per patient (k = {g['k']}): ε = {g['epsilon']:.2f}, δ = {g['delta']:.3g}"
        log.info("%-55s test AUC %.4f ± %.4f, bal. acc. %.4f (rule) %s%s", e["setting"],
                 e["auc_mean"], e["auc_sd"], e["balanced_accuracy_at_rule_mean"],
                 f"ε = {e['epsilon']:.3f} per {e['arm']}" if "epsilon" in e else "no DP", extra)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

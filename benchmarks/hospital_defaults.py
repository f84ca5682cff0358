"""Do the defaults train every hospital? (issue 24; docs/results.md, "Defaults that train every hospital")

Runs ``fedtransfer simulate`` with only ``dataset``, ``partitioner``, ε = 1 and δ set
(plus whatever ``--extra`` adds), with and without DP, for 3 seeds, on two data sets:

* ``breast-cancer-hospitals`` (scikit-learn's breast-cancer records in 4 hospitals);
* ``small-hospital.csv``: the same 569 records dealt to 4 hospitals of 45, 110, 174 and
  240 records (seeded), so the smallest holds about 25 training records after its
  70/10/20 split and its 20 % holdout. Built by :func:`small_hospital_csv`.

For each run it reads ``summary.json``: the site-mean test accuracy at the shipped
rule (``final.test_sites.mean_over_sites.accuracy``) and, per hospital, the rounds
it trained in. Prints one JSON line per run and a table of means.

    python -m benchmarks.hospital_defaults --out runs/defaults [--extra backbone=identity]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SIZES = (45, 110, 174, 240)


def small_hospital_csv(folder: Path) -> Path:
    """Breast-cancer records dealt to hospitals of :data:`SIZES` records (seed 1)."""
    from sklearn.datasets import load_breast_cancer

    path = Path(folder) / "small-hospital.csv"
    if path.is_file():
        return path
    bunch = load_breast_cancer()
    order = np.random.default_rng(1).permutation(len(bunch.target))
    site = np.empty(len(order), dtype=np.int64)
    for s, part in enumerate(np.split(order, np.cumsum(SIZES)[:-1])):
        site[part] = s
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([*bunch.feature_names, "hospital", "diagnosis"])
        for x, s, y in zip(bunch.data, site, bunch.target, strict=True):
            w.writerow([*(repr(float(v)) for v in x), f"hospital-{s + 1}", bunch.target_names[y]])
    return path


def run_one(out: Path, dataset: str, *, dp: bool, seed: int, extra: list[str]) -> dict:
    sets = [f"dataset={dataset}", "partitioner=site", "target-epsilon=1", "target-delta=1e-5",
            f"seed={seed}", *([] if dp else ["dp=false"]), *extra]
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    row = {"dataset": dataset, "dp": dp, "seed": seed, "rc": proc.returncode}
    summary = out / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return row
    s = json.loads(summary.read_text())
    mean = s["final"].get("test_sites", {}).get("mean_over_sites", {})
    row["site_mean_accuracy"] = mean.get("accuracy")
    row["accuracy"] = s["final"]["accuracy"]
    rounds = len(s["rounds"])
    row["rounds"] = rounds
    row["trained_rounds"] = {sid: len([h for h in site.get("history") or []
                                       if h.get("round", 1) >= 1 and not h.get("dropped")])
                             for sid, site in s["sites"].items()}
    row["every_site_every_round"] = (len(row["trained_rounds"]) == 4 and all(
        v == rounds for v in row["trained_rounds"].values()))
    row["learning_rate"] = s.get("config", {}).get("learning-rate")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    csv_path = small_hospital_csv(out / "data")
    datasets = {"breast-cancer-hospitals": "breast-cancer-hospitals",
                "small-hospital": f"csv:{csv_path}?label=diagnosis&site=hospital"}
    rows = []
    for name, spec in datasets.items():
        for dp in (True, False):
            for seed in range(args.seeds):
                row = run_one(out / f"{name}-{'dp' if dp else 'nodp'}-{seed}", spec, dp=dp,
                              seed=seed, extra=args.extra)
                row["name"] = name
                print(json.dumps(row), flush=True)
                rows.append(row)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'data':<26} {'arm':<6} {'site-mean acc (3 seeds)':>24} {'every site, every round':>24}")
    for name in datasets:
        for dp in (True, False):
            got = [r for r in rows if r["name"] == name and r["dp"] == dp]
            accs = [r["site_mean_accuracy"] for r in got if r.get("site_mean_accuracy") is not None]
            acc = f"{np.mean(accs):.3f} ± {np.std(accs):.3f}" if accs else "failed"
            every = sum(bool(r.get("every_site_every_round")) for r in got)
            print(f"{name:<26} {'DP' if dp else 'no DP':<6} {acc:>24} {every:>20}/{len(got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real hospitals as sites: the breast-cancer scenario end to end (Flower simulation,
natural partition, schema scaling), then ``predict`` on raw CSVs by column name."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from common.privacy.accounting import epsilon
from common.privacy.ledger import Ledger
from tests.procs import simulate

pytestmark = pytest.mark.integration


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_breast_cancer_hospitals_train_per_site_and_predict_reads_columns_by_name(tmp_path):
    out = tmp_path / "run"
    s, text = simulate(out, f"data-dir={tmp_path / 'data'}", f"cache-dir={tmp_path / 'cache'}",
                       "num-rounds=4", log=tmp_path / "sim.log", config="breast-cancer")
    assert "per-site test: mean acc" in text and "never trained" not in text
    # Every hospital trained every round (none declined, e.g. for a batch above its size).
    assert all(site["status"] == "active" and site["rounds_trained"] == 4
               for site in s["sites"].values()), {k: v["reason"] for k, v in s["sites"].items()}
    sites = s["final"]["test_sites"]
    assert sorted(sites["sites"]) == ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    # Unscaled, this task sat at chance level (AUC 0.51-0.62); scaled, even 4 DP rounds
    # at ε = 1 separate the classes.
    assert sites["mean_over_sites"]["auc"] > 0.9 and s["final"]["auc"] > 0.9
    assert max(site["epsilon"] for site in s["sites"].values()) <= 1.0 + 1e-9
    schema = json.loads((out / "schema.json").read_text())
    assert schema["input"] == "tabular" and len(schema["features"]) == 30
    assert all(f["scaling"] == "public" and f["scale"] > 0 for f in schema["features"])

    from cli.main import main as cli_main

    assert cli_main(["audit", str(out), "--out", str(tmp_path / "audit")]) == 0

    # predict on the raw CSV the hospitals hold: the label and site columns the run's data
    # spec named (the card's dataset) are not features, the
    # schema's transform is applied, and a reordered copy gives the same answers.
    raw = _rows(next((tmp_path / "data").glob("breast-cancer-*.csv")))[:41]
    with open(tmp_path / "a.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(raw)
    order = list(reversed(range(len(raw[0]))))
    with open(tmp_path / "b.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([[r[i] for i in order] for r in raw])
    for name in ("a", "b"):
        assert cli_main(["predict", "--model", str(out / "models"), "--input",
                         str(tmp_path / f"{name}.csv"), "--out",
                         str(tmp_path / f"{name}-pred.csv")]) == 0
    a, b = _rows(tmp_path / "a-pred.csv"), _rows(tmp_path / "b-pred.csv")
    assert a == b and len(a) == 41
    cols = [i for i, h in enumerate(a[0]) if h.startswith("prob_")]
    p = np.array([[float(r[i]) for i in cols] for r in a[1:]])
    assert 0.01 < p[:, 0].mean() < 0.99  # not the 0.000000 of unscaled inputs
    truth = [r[-1] for r in raw[1:]]
    predicted = [a[0][cols[k]].removeprefix("prob_") for k in p.argmax(axis=1)]
    assert np.mean([t == q for t, q in zip(truth, predicted, strict=True)]) > 0.8

    # A renamed feature column is named, never silently dropped or reordered.
    bad = [list(r) for r in raw]
    bad[0][0] = bad[0][0].upper()
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(bad)
    assert cli_main(["predict", "--model", str(out / "models"), "--input",
                     str(tmp_path / "c.csv"), "--out", str(tmp_path / "c-pred.csv")]) != 0
    assert not (tmp_path / "c-pred.csv").exists()


def test_dp_scaling_is_charged_at_every_site_and_the_audit_recomputes_it(tmp_path):
    out = tmp_path / "run"
    s, text = simulate(out, f"data-dir={tmp_path / 'data'}", f"cache-dir={tmp_path / 'cache'}",
                       "num-rounds=2", log=tmp_path / "sim.log",
                       config="breast-cancer-dp-scaling")
    assert "DP feature scaling: 30 features from 4 sites" in text
    for sid, site in s["sites"].items():
        assert [h["round"] for h in site["history"]] == [0, 1, 2]
        ledger = Ledger(out / "sites" / f"site-{sid}" / "ledger.sqlite")
        entries = ledger.entries()
        assert [(e.round, e.sample_rate, e.steps) for e in entries[:1]] == [(0, 1.0, 1)]
        assert site["epsilon"] == pytest.approx(
            epsilon([e.mechanism for e in entries], delta=1e-5), rel=1e-9)
        assert site["epsilon"] <= 1.0 + 1e-9
    schema = json.loads((out / "schema.json").read_text())
    assert all(f["scaling"] == "dp" and f["scale"] > 0 for f in schema["features"])

    from cli.main import main as cli_main

    assert cli_main(["audit", str(out), "--out", str(tmp_path / "audit")]) == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["counts"]["error"] == 0

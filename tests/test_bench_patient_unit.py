"""benchmarks/patient_unit.py on a tiny grouped data set: every arm runs through the
site's functions, the mechanisms are over the right units, and the record arm's
group-privacy ε per patient is reported with its k. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import patient_unit
from common.privacy.accounting import PATIENT, RECORD, dp_plan, group_privacy


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """A synthetic MedMNIST-format file: 2 classes, 28×28, separable by brightness."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 240), ("val", 40), ("test", 40)):
        y = np.arange(n) % 2
        x = rng.integers(0, 100, size=(n, 28, 28)) + 100 * y[:, None, None]
        arrays[f"{split}_images"] = x.astype(np.uint8)
        arrays[f"{split}_labels"] = y.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path


def test_every_arm_runs_and_reports_its_unit(tiny_npz, tmp_path):
    cfg = patient_unit.scenario_config(tiny_npz, tmp_path / "work", backbone="identity",
                                       num_sites=2, partitioner="iid", num_rounds=2,
                                       local_epochs=1, batch_size=16, target_epsilon=4.0)
    res = patient_unit.run(cfg, seeds=(0, 1), target_epsilon=4.0,
                           levers=({"max_records_per_patient": 2},),
                           learning_rates={a: (0.5,) for a in patient_unit.ARMS},
                           patients_per_step=8, max_records_per_patient=10)
    rows, setting = res["rows"], res["setting"]
    assert [r["arm"] for r in rows] == [PATIENT, PATIENT, RECORD, RECORD, "none", "none",
                                        PATIENT, PATIENT]
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["balanced_accuracy_at_rule"] <= 1.0
    for r in rows[:2]:  # q over patients, the public count is the patient count
        for site, patients in zip(r["sites"], setting["site_patients"], strict=True):
            q, steps = dp_plan(patients, batch_size=8, epochs=2)
            assert (site["unit"], site["public_count"]) == (PATIENT, patients)
            assert (site["sample_rate"], site["steps"]) == (q, steps)
            assert site["epsilon"] <= 4.0 + 1e-9
    for site, records in zip(rows[2]["sites"], setting["site_records"], strict=True):
        assert (site["unit"], site["sample_rate"]) == (RECORD, dp_plan(records, batch_size=16,
                                                                       epochs=2)[0])
    assert setting["site_patients"] < setting["site_records"]
    summary = {e["setting"]: e for e in res["summary"]}
    rec = summary[RECORD]
    k = setting["group_privacy_k"]
    assert k == max(setting["site_largest_patient"]) and 1 < k <= 10
    assert (rec["group_privacy_per_patient"]["epsilon"], rec["group_privacy_per_patient"]["delta"]) \
        == group_privacy(rec["epsilon"], cfg.target_delta, k)
    assert "one patient" in summary[rows[0]["setting"]]["unit"]
    assert math.isfinite(summary[rows[0]["setting"]]["auc_minus_record"])
    assert "epsilon" not in summary["none"]
    assert len(summary) == 4  # three arms and one lever setting

"""Distillation and delivery end to end, in a real Flower simulation: every site
ends with a head, a student and a card whose hashes match the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.data.datasets import load_dataset
from common.digest import file_sha256
from common.models.modelio import load_student, verify_bundle
from common.models.predict import load_predictor
from tests.procs import simulate

pytestmark = pytest.mark.integration


def test_every_site_receives_head_student_and_a_matching_card(tmp_path):
    out = tmp_path / "run"
    s, text = simulate(out, "backbone=efficientnet-lite0", "num-sites=3", "num-rounds=2",
                       "image-size=32", "local-epochs=1",
                       f"cache-dir={tmp_path / 'cache'}", "distill-augment=2", "distill-epochs=8",
                       "student-width=16", log=tmp_path / "simulate.log")
    assert "distilled student cnn" in text and "delivered to 3/3 sites" in text
    assert "decision rule (shipped): prior shift" in text  # ten classes, chosen on public val

    for who in ("teacher", "student"):
        for key in ("auc", "accuracy", "params", "cpu_ms_per_image"):
            assert s[who][key] > 0
    assert s["student"]["architecture"].startswith("cnn(width=16")
    assert s["student"]["params"] * 10 <= s["teacher"]["params"]
    assert s["teacher"]["kind"] in ("global", "ensemble")
    assert "costs no ε" in s["privacy"]["distillation"]
    assert s["distillation"]["transfer_source"] == "public validation split"
    # digits: 10 classes; the student must beat chance clearly.
    assert s["student"]["auc"] > 0.7

    server = json.loads((out / "models" / "card.json").read_text())
    assert s["delivery"]["message_type"] == "query.deliver"
    assert sorted(s["delivery"]["sites"]) == ["0", "1", "2"]
    test_x = load_dataset("digits").test_x[:16]
    for sid in ("0", "1", "2"):
        assert s["delivery"]["sites"][sid]["status"] == "saved"
        models = out / "sites" / f"site-{sid}" / "models"  # next to the site's ledger
        card = json.loads((models / "card.json").read_text())
        assert verify_bundle(models) == []
        for name in ("head.safetensors", "student.safetensors"):
            assert card["files"][name] == file_sha256(models / name) == server["files"][name]
        assert card["sha256"] == server["sha256"] == s["delivery"]["sha256"]
        assert card["run_id"] == s["run_id"] and card["round"] == 2
        assert card["student"]["params"] == s["student"]["params"]
        # The head's rule and the student's own, both chosen on public validation data.
        assert card["decision"] == s["final"]["decision"]
        assert card["decision"]["rule"] == "prior-shift"
        assert card["student"]["decision"] == s["student"]["decision"]
        assert "distillation-validation" in card["student"]["decision"]["chosen_on"]
        assert card["student"]["val"]["auc"] > 0 and card["teacher"]["val"]["auc"] > 0
        assert card["privacy"]["unit"].startswith("one training record at one site")
        assert card["privacy"]["delta"] == 1e-5
        assert card["privacy"]["epsilon_per_site"][sid] == pytest.approx(s["sites"][sid]["epsilon"])
        assert card["site"]["site_id"] == int(sid)
        assert card["site"]["epsilon_own_ledger"] == pytest.approx(s["sites"][sid]["epsilon"])
        # What a site saved is usable as is: the student and the head both predict.
        student, spec, _ = load_student(models)
        assert spec.input_shape == (1, 8, 8)
        for which in ("student", "head"):
            p = load_predictor(models, which=which).predict_proba(test_x)
            assert p.shape == (16, 10) and np.allclose(p.sum(1), 1.0)

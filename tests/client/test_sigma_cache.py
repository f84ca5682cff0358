"""The site's σ calibration is remembered on its disk across ClientApp processes."""

from __future__ import annotations

import json

import pytest

import client.sigma_cache as calibration
from client.sigma_cache import calibrated_sigma
from common.privacy.accounting import Mechanism, calibrate_noise_multiplier

PLAN = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.1, "steps": 30}


def test_second_process_reads_sigma_from_disk_and_a_changed_input_recomputes(tmp_path,
                                                                             monkeypatch):
    sigma = calibrated_sigma(tmp_path, **PLAN)
    assert sigma == calibrate_noise_multiplier(**PLAN)
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["sigma"] == sigma

    def boom(**kw):
        raise AssertionError("recomputed although the memo holds the answer")

    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", boom)
    assert calibrated_sigma(tmp_path, **PLAN) == sigma
    # Another prior history is another question: it is not answered from the memo.
    with pytest.raises(AssertionError, match="recomputed"):
        calibrated_sigma(tmp_path, **PLAN, prior=[Mechanism(noise_multiplier=2.0,
                                                            sample_rate=0.1, steps=10)])


def test_a_file_whose_key_does_not_match_is_ignored(tmp_path):
    sigma = calibrated_sigma(tmp_path, **PLAN)
    path = next((tmp_path / "calibration").glob("*.json"))
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({"key": {**doc["key"], "steps": 1}, "sigma": 0.01}))
    assert calibrated_sigma(tmp_path, **PLAN) == sigma

"""The benchmark suite's code paths on tiny inputs, and its results schema.

Nothing here asserts on a timing: only that each part runs and reports the
keys issue 6 asks for.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import communication, dp_overhead, finetuning, memory, schema
from benchmarks.__main__ import main as bench_main
from benchmarks.__main__ import run_suite
from benchmarks.settings import BenchSettings
from common.config import parse_config


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """A synthetic MedMNIST-format file: 2 classes, 28×28, separable by brightness."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        y = np.arange(n) % 2
        x = rng.integers(0, 100, size=(n, 28, 28)) + 100 * y[:, None, None]
        arrays[f"{split}_images"] = x.astype(np.uint8)
        arrays[f"{split}_labels"] = y.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path


def tiny_settings(npz: Path, work: Path, parts: tuple[str, ...]) -> BenchSettings:
    scenario = parse_config({"backbone": "identity", "num-sites": 2, "partitioner": "iid",
                             "num-rounds": 2, "local-epochs": 1, "batch-size": 8,
                             "learning-rate": 0.5, "hidden-dim": 8, "target-epsilon": 4.0})
    return BenchSettings(mode="test", data_path=npz, work_dir=work, parts=parts,
                         naive_records=32, naive_rounds=2, naive_epochs=1, naive_batch_size=8,
                         overhead_repeats=1, overhead_epochs=1, overhead_batch_sizes=(8,),
                         epsilons=(2.0, math.inf), seeds=(0,), scenario=scenario)


def test_suite_writes_schema_complete_results(tiny_npz, tmp_path):
    parts = ("cached_vs_naive", "dp_overhead", "communication", "privacy_utility")
    doc = run_suite(tiny_settings(tiny_npz, tmp_path / "work", parts))
    assert schema.problems(doc, parts) == []
    json.dumps(doc, allow_nan=False)  # strict JSON: inf/NaN were written as null
    cvn = doc["cached_vs_naive"]
    assert len(cvn["speedup_per_round"]) == 2
    # same seeds, same σ/q/steps: both arms spend the same ε
    assert cvn["epsilon"]["naive"] == pytest.approx(cvn["epsilon"]["cached"])
    # ... and train the same head from the same features: equal AUC, as claimed.
    assert cvn["auc"]["naive"] == pytest.approx(cvn["auc"]["cached"], abs=0.01)
    rows = doc["privacy_utility"]
    assert {(r["epsilon"], r["setting"]) for r in rows} == {
        (2.0, "federated"), (2.0, "centralized"), (None, "federated"), (None, "centralized")}
    assert all(0 <= r["auc"] <= 1 for r in rows)
    dp_rows = [r for r in rows if r["epsilon"] is not None]
    assert all(r["epsilon_spent"] <= 2.0 + 1e-6 for r in dp_rows)


def test_schema_reports_missing_keys():
    bad = {"machine": {"cpu_model": "x"}, "privacy_utility": [{"epsilon": 1}], "scale": []}
    found = schema.problems(bad, ("privacy_utility", "scale"))
    assert "machine.cpu_cores missing" in found
    assert "privacy_utility[0].auc missing" in found
    assert "scale must be a non-empty list" in found


def test_dp_overhead_reports_both_heads_and_the_auto_choice():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 6)).astype(np.float32)
    y = rng.integers(0, 2, 48)
    out = dp_overhead.run(x, y, batch_sizes=(8,), epochs=1, repeats=1, hidden_dim=4)
    assert out["linear"]["auto_choice"] == "hooks"
    assert out["mlp"]["auto_choice"] == "ghost"
    for h in ("linear", "mlp"):
        assert out[h]["ratio_hooks"] > 0 and out[h]["ratio_ghost"] > 0


def test_communication_identity_full_model_is_the_head():
    out = communication.run(backbones=("identity",), identity_dim=10, hidden_dim=4)
    assert out["head_bytes"] == out["full_bytes"]
    linear = next(r for r in out["rows"] if r["head"] == "linear")
    assert linear["head_parameters"] == 10 * 2 + 2
    assert linear["head_bytes"] >= 4 * linear["head_parameters"]


def test_tree_memory_sums_children_and_stop_is_by_pid():
    proc = subprocess.Popen([sys.executable, "-c",
                             "import subprocess,sys,time;"
                             "subprocess.Popen([sys.executable,'-c','import time;time.sleep(30)']);"
                             "time.sleep(30)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not memory.descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        m = memory.tree_memory_mb(proc.pid)
        assert m["processes"] == 2
        assert m["rss_mb"] > 0
    finally:
        from benchmarks.scale import _start_time, _stop

        seen = {p: _start_time(p) for p in memory.descendants(proc.pid)}
        _stop(proc, seen, grace=5)
    assert proc.poll() is not None


def test_report_only_renders_markdown_and_plots(tiny_npz, tmp_path):
    parts = ("communication", "privacy_utility")
    doc = run_suite(tiny_settings(tiny_npz, tmp_path / "work", parts))
    doc["scale"] = [{"sites": 2, "seconds_per_round": 1.0, "peak_memory_mb": 10.0,
                     "peak_rss_sum_mb": 20.0, "peak_processes": 3, "round_seconds": [2.0, 1.0],
                     "records_per_site_mean": 5.0, "site_call_seconds_mean": {}}]
    results = tmp_path / "r.json"
    results.write_text(json.dumps(doc))
    report = tmp_path / "B.md"
    assert bench_main(["--report-only", str(results), "--report", str(report)]) == 0
    text = report.read_text()
    assert "Privacy-utility" in text and "0.944" in text and "Scale" in text
    assert (tmp_path / "r-privacy_utility.png").stat().st_size > 1000


@pytest.mark.integration
def test_scale_point_runs_a_real_flower_simulation(tiny_npz, tmp_path):
    from benchmarks import scale

    entry = scale.measure(2, rounds=2, data_path=tiny_npz, work_dir=tmp_path, timeout_s=300)
    assert entry.get("error") is None, entry.get("log_tail")
    assert schema.problems({"machine": {"cpu_model": "", "cpu_cores": 1, "gpu": None,
                                        "libraries": {}}, "scale": [entry]}, ("scale",)) == []
    assert entry["peak_processes"] >= 2


def test_deployment_split_is_computed_from_the_run_records():
    from benchmarks.deployment import _split

    def h(r, site, train, acc):
        return {"round": r, "train_seconds": train, "privacy_seconds": acc,
                "feature_seconds": 0.0, "site_seconds": train + acc + 0.5}

    summary = {"rounds": [{"round": 1, "round_seconds": 50.0}, {"round": 2, "round_seconds": 10.0},
                          {"round": 3, "round_seconds": 6.0}],
               "sites": {"0": {"history": [h(1, 0, 9, 9), h(2, 0, 1.0, 2.0), h(3, 0, 1.0, 1.0)]},
                         "1": {"history": [h(2, 1, 3.0, 2.0), h(3, 1, 1.0, 0.0)]}}}
    out = _split(summary)  # round 1 (cold start) is left out
    assert out["rounds"] == 2 and out["round_seconds"] == 8.0
    assert out["site_train"] == 1.5 and out["site_accounting"] == 1.25
    # Outside the site: wall minus the slowest site's work (5.5 s in round 2, 2.5 s in round 3).
    assert out["outside_site"] == pytest.approx(((10.0 - 5.5) + (6.0 - 2.5)) / 2)


def test_finetuning_sweep_reports_every_mode_and_epsilon(tiny_npz, tmp_path):
    """The fine-tuning harness (a full-mode part) on a tiny efficientnet run at 32 px."""
    st = tiny_settings(tiny_npz, tmp_path / "work", ("finetuning",))
    cfg = st.config(backbone="efficientnet-lite0", image_size=32, num_rounds=1)
    res = finetuning.run(cfg, modes=("head", "bitfit"), epsilons=(4.0, math.inf), seeds=(0,),
                         learning_rates={"bitfit": (0.1, 0.5)})
    rows = res["rows"]
    assert [(r["mode"], r["epsilon_label"]) for r in rows] == [
        ("head", "4"), ("head", "inf"), ("bitfit", "4"), ("bitfit", "inf")]
    for r in rows:
        assert {"auc", "balanced_accuracy", "seconds_per_round", "bytes_per_round",
                "trained_params", "learning_rate"} <= set(r)
    head, bitfit = rows[0], rows[2]
    assert bitfit["trained_params"] > head["trained_params"]
    assert bitfit["bytes_per_round"] == 2 * 4 * bitfit["trained_params"] * cfg.num_sites
    assert bitfit["learning_rate"] in (0.1, 0.5) and rows[0]["epsilon_spent"] <= 4.0 + 1e-6

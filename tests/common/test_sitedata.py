"""Site data readers and ``fedtransfer site check`` on tiny files made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from common.data.datasets import load_dataset
from common.data.readers import (
    SiteDataError,
    own_site_data,
    parse_spec,
    read_site_records,
    scan,
)
from common.data.sitecheck import Plan, check_site, estimate_epsilon, format_report


def _png(path, value, size=(8, 8), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, color).save(path)


def _folder(root, per_class=6, classes=("0", "1", "2")):
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"img{i}.png", 40 * int(c) + i)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_image_folder_counts_sizes_and_integer_class_names(tmp_path):
    root = _folder(tmp_path / "site")
    _png(root / "2" / "big.png", 9, size=(16, 12))
    s = scan(f"imagefolder:{root}")
    assert s.classes == ("0", "1", "2")
    assert s.counts == {"0": 6, "1": 6, "2": 7}
    assert s.image_sizes == {"8x8 L": 18, "16x12 L": 1}
    assert s.x.shape == (19, 8, 8) and s.x.dtype == np.float32  # resized to the common size
    assert 0.0 <= s.x.min() and s.x.max() <= 1.0
    assert s.problems() == []


def test_rgb_images_give_rgb_arrays(tmp_path):
    root = tmp_path / "rgb"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.jpg", 100 + i, mode="RGB")
    s = scan(str(root))  # a bare directory is an image folder
    assert s.kind == "imagefolder" and s.x.shape == (6, 8, 8, 3)
    assert s.classes == ("a", "b")


def test_truncated_png_and_junk_are_listed_by_name_not_skipped(tmp_path):
    root = _folder(tmp_path / "site")
    _truncate(root / "1" / "img3.png")
    (root / "0" / "notes.jpg").write_bytes(b"not an image")
    s = scan(f"imagefolder:{root}")
    bad = dict(s.corrupt)
    assert set(bad) == {"1/img3.png", "0/notes.jpg"}
    assert s.counts == {"0": 6, "1": 5, "2": 6}
    with pytest.raises(SiteDataError, match=r"1/img3\.png.*|0/notes\.jpg"):
        read_site_records(f"imagefolder:{root}")
    report = check_site(f"imagefolder:{root}", Plan(batch_size=4))
    assert not report.ok
    assert any("1/img3.png" in e for e in report.errors)
    assert "corrupt: 1/img3.png" in format_report(report)


def test_empty_class_is_reported_but_a_site_may_train_without_it(tmp_path):
    root = _folder(tmp_path / "site", classes=("0", "2"))  # no folder "1"
    (root / "3").mkdir()  # an empty folder
    report = check_site(f"imagefolder:{root}", Plan(batch_size=4))
    assert report.counts == {"0": 6, "1": 0, "2": 6, "3": 0}
    assert report.ok
    assert sum("is empty" in n for n in report.notes) == 2
    data = own_site_data(f"imagefolder:{root}", site_id=0, holdout=0.25, seed=0, num_classes=10)
    assert data.num_classes == 10 and set(data.train_y) | set(data.holdout_y) == {0, 2}
    assert len(data.train_y) + len(data.holdout_y) == 12


def test_csv_with_missing_values_needs_an_explicit_policy(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("age,bp,site,label\n50,120,A,yes\n61,,A,no\n70,NaN,B,yes\n40,110,B,no\n"
                    "44,130,A,no\n")
    report = check_site(f"csv:{path}?label=label&site=site", Plan(batch_size=2))
    assert not report.ok
    assert report.column_problems == ["file site.csv, row 3, column 'bp': missing value (schema "
                                      "missing = 'error'; allowed: drop, zero) (2 rows in this "
                                      "column; the first is shown)"]
    assert report.num_records == 3 and report.refused == 2  # never "5 usable" beside a refusal
    assert "3 usable records, 2 refused" in format_report(report)
    assert any("column 'bp'" in e and "missing" in e for e in report.errors)
    with pytest.raises(SiteDataError, match="column 'bp'"):
        read_site_records(f"csv:{path}?site=site")

    # A fill value from the other records would let one record move every other's.
    with pytest.raises(SiteDataError, match="'mean' is not offered"):
        scan(f"csv:{path}?site=site&missing=mean")
    dropped = scan(f"csv:{path}?site=site&missing=drop")
    assert dropped.x.shape == (3, 2) and dropped.y.tolist() == [1, 0, 0]
    # zero: the feature's centre once scaled (Schema.transform), decided row by row
    zero = scan(f"csv:{path}?site=site&missing=zero")
    assert np.isnan(zero.x[1, 1]) and np.isnan(zero.x[2, 1]) and zero.x[0, 1] == 120
    assert zero.sites.tolist() == ["A", "A", "B", "B", "A"]


def test_csv_bad_rows_and_unknown_policy(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("x1,x2,label\n1,2,0\n1,abc,1\n3,4\n5,6,1\n")
    s = scan(f"csv:{path}")
    assert dict(s.corrupt) == {"site.csv, row 4": "2 fields, the header has 3"}
    assert s.column_problems == ["file site.csv, row 3, column 'x2': 'abc' is not a number"]
    assert "unreadable file site.csv, row 4: 2 fields, the header has 3" in s.problems()
    with pytest.raises(SiteDataError, match="missing-value policy 'guess'"):
        scan(f"csv:{path}?missing=guess")
    with pytest.raises(SiteDataError, match="no label column 'y'"):
        scan(f"csv:{path}?label=y")
    with pytest.raises(SiteDataError, match="unknown option"):
        parse_spec(f"csv:{path}?lable=y")


def test_npz_site_file_uses_all_its_records(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "site.npz", **arrays)
    report = check_site(str(tmp_path / "site.npz"), Plan(batch_size=8))
    assert report.ok and report.num_records == 30
    assert report.counts == {"0": 15, "1": 15} and report.image_sizes == {"8x8 L": 30}
    (tmp_path / "broken.npz").write_bytes((tmp_path / "site.npz").read_bytes()[:200])
    bad = check_site(f"medmnist:{tmp_path / 'broken.npz'}", Plan())
    assert not bad.ok and "broken.npz" in bad.corrupt[0]["file"]


def test_registry_loads_imagefolder_and_csv(tmp_path):
    root = _folder(tmp_path / "site", per_class=10)
    s = load_dataset(f"imagefolder:{root}", seed=0)
    assert s.num_classes == 3
    assert len(s.train_y) + len(s.val_y) + len(s.test_y) == 30
    assert len(s.test_y) == 6
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(20)))
    c = load_dataset(f"csv:{path}")
    assert c.train_x.shape[1] == 2 and c.num_classes == 2
    with pytest.raises(ValueError, match="imagefolder:<dir>"):
        load_dataset("folder:x")


def test_epsilon_estimate_calibrates_to_the_cap_or_reports_the_overrun():
    plan = Plan(target_epsilon=2.0, num_rounds=3, local_epochs=1, batch_size=10)
    est = estimate_epsilon(100, plan)
    assert est.fits and est.steps_per_round == 10 and est.sample_rate == pytest.approx(0.1)
    assert est.epsilon == pytest.approx(2.0, abs=0.02) and est.noise_multiplier > 0.3
    loud = estimate_epsilon(100, Plan(target_epsilon=0.5, num_rounds=3, batch_size=10,
                                      noise_multiplier=0.6))
    assert not loud.fits and loud.epsilon > 0.5 and "round(s) fit" in loud.note
    tiny = estimate_epsilon(3, plan)
    assert not tiny.fits and "too few for DP-SGD" in tiny.note
    small = estimate_epsilon(25, plan)  # planned down to 6 (4 steps per epoch), never refused
    assert small.fits and "expected batch 6" in small.note and small.steps_per_round == 5


def test_site_check_command_exit_status_and_json(tmp_path, capsys):
    root = _folder(tmp_path / "site", per_class=10)
    assert main(["site", "check", "--data", f"imagefolder:{root}", "--cap", "3",
                 "--batch-size", "8", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "records per class: 0: 10, 1: 10, 2: 10" in out and "ready to join" in out
    assert "ε=" in out and "cap 3" in out
    _truncate(root / "0" / "img1.png")
    assert main(["site", "check", "--data", str(root), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["corrupt"][0]["file"] == "0/img1.png"


def test_a_non_numeric_column_is_named_once_not_row_by_row(tmp_path):
    path = tmp_path / "labs.csv"
    path.write_text("age,ward,label\n" + "".join(f"{40 + i},north,{i % 2}\n" for i in range(50)))
    s = scan(f"csv:{path}")
    assert s.column_problems == ["file labs.csv, row 2, column 'ward': 'north' is not a number "
                                 "(50 rows in this column; the first is shown)"]
    assert s.corrupt == []


def test_site_check_fails_when_the_planned_rounds_would_be_refused(tmp_path, capsys):
    root = _folder(tmp_path / "site", per_class=10)
    # A tiny cap with a fixed σ: the plan does not fit, so rounds would be declined.
    assert main(["site", "check", "--data", f"imagefolder:{root}", "--cap", "0.1",
                 "--batch-size", "8", "--rounds", "5", "--noise-multiplier", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and "does not fit" in out and "ready to join" not in out.replace(
        "NOT READY", "")


def test_site_check_plans_sigma_as_the_site_runs_it_floor_included(tmp_path):
    """site check's σ is the site's own (client.budget.plan, through the one planner):
    calibrated to the cap at the planned batch, and never below the site's
    min-noise-multiplier."""
    from client import budget
    from client.settings import deployed_policy
    from common import protocol
    from common.batches import plan_batch

    for floor in (0.3, 5.0):  # the floor binds at 5.0 (a cap of 8 needs far less noise)
        plan = Plan(target_epsilon=8.0, num_rounds=2, local_epochs=1, batch_size=64,
                    min_noise_multiplier=floor)
        est = estimate_epsilon(40, plan)
        settings = deployed_policy({
            "data-path": "unused", "ledger-path": str(tmp_path / f"l{floor}.sqlite"),
            "cache-dir": str(tmp_path / "c"), "target-epsilon": 8.0, "target-delta": 1e-5,
            "min-noise-multiplier": floor, "class-names": "a,b"})
        req = protocol.RoundRequest(run_id="r", server_round=1, num_rounds=2, local_epochs=1,
                                    batch_size=plan_batch(40, batch_size=64), learning_rate=1.0,
                                    momentum=0.0, clip_norm=1.0, noise_multiplier=0.0)
        mech = budget.plan(req, settings, budget.open_ledger(settings), 40).mechanism
        sigma = mech.noise_multiplier
        assert est.noise_multiplier == pytest.approx(sigma, rel=0.01)
        assert est.sample_rate == pytest.approx(mech.sample_rate)
        assert sigma >= floor

"""A site reads its data through the federation's schema: no silent label flips,
and DP feature scaling is charged to its ledger before anything leaves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.policy import RequestRejected, SiteSettings
from client.site import load_site_data, request_schema, scaling_release, train_round
from common import protocol
from common.config import RunConfig
from common.data.readers import SiteDataError
from common.data.schema import Schema
from common.models.heads import head_state, make_head
from common.privacy.accounting import epsilon
from common.privacy.ledger import Ledger

PNEUMONIA = Schema.from_dict({"classes": ["normal", "pneumonia"]})


def _images(root, folders: dict[str, int]):
    for name, n in folders.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            value = 30 if name.lower() == "normal" else 220
            Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _settings(tmp_path, data_path: str, **kw) -> SiteSettings:
    return SiteSettings(site_id=0, ledger_path=tmp_path / "ledger.sqlite",
                        cache_dir=tmp_path / "cache", data_path=data_path, dp=True,
                        target_epsilon=kw.pop("eps", 2.0), target_delta=1e-5, holdout=0.2, **kw)


def _req(schema: Schema | None, **kw) -> protocol.RoundRequest:
    base = dict(run_id="run-a", server_round=1, num_rounds=2, local_epochs=1, batch_size=4,
                learning_rate=0.5, momentum=0.0, clip_norm=1.0, noise_multiplier=0.0,
                schema=schema.to_json() if schema is not None else "")
    return protocol.RoundRequest(**{**base, **kw})


def test_a_site_with_only_one_class_folder_keeps_that_class_index(tmp_path):
    root = _images(tmp_path / "site", {"pneumonia": 10})
    cfg = RunConfig(backbone="identity", image_size=8)
    settings = _settings(tmp_path, f"imagefolder:{root}")
    schema = request_schema(_req(PNEUMONIA), settings)
    data = load_site_data(cfg, settings, 2, schema)
    # Sorted folder names would make 'pneumonia' class 0: a flipped label.
    assert set(data.train_y.tolist()) | set(data.holdout_y.tolist()) == {1}


def test_a_class_folder_differing_only_in_case_is_named_never_reordered(tmp_path):
    root = _images(tmp_path / "site", {"Pneumonia": 6, "normal": 6})
    cfg = RunConfig(backbone="identity", image_size=8)
    settings = _settings(tmp_path, f"imagefolder:{root}")
    with pytest.raises(SiteDataError, match="'Pneumonia' differs only in case from the "
                                            "declared class 'pneumonia'"):
        load_site_data(cfg, settings, 2, request_schema(_req(PNEUMONIA), settings))


def test_site_class_names_that_disagree_with_the_schema_are_refused(tmp_path):
    settings = _settings(tmp_path, "x", class_names=("pneumonia", "normal"))
    with pytest.raises(SiteDataError, match="differ from the federation's schema classes"):
        request_schema(_req(PNEUMONIA), settings)


def _clinic(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["cholesterol,age,label"]
    for _ in range(n):
        y = int(rng.integers(0, 2))
        lines.append(f"{rng.normal(200 + 60 * y, 30):.1f},{rng.uniform(30, 80):.0f},"
                     f"{'sick' if y else 'well'}")
    path.write_text("\n".join(lines) + "\n")
    return path


DP_SCHEMA = Schema.from_dict({"classes": ["well", "sick"], "scaling": "dp", "features": [
    {"name": "age", "lower": 0, "upper": 120}, {"name": "cholesterol", "lower": 50, "upper": 500}]})


def test_dp_scaling_is_charged_as_round_zero_before_it_leaves_and_only_once(tmp_path):
    path = _clinic(tmp_path / "site.csv")
    cfg = RunConfig(backbone="identity", num_rounds=2, batch_size=4)
    settings = _settings(tmp_path, f"csv:{path}", eps=2.0)
    sums, metrics, anchor = scaling_release(cfg, settings, _req(DP_SCHEMA, server_round=0,
                                                                scaling_budget=0.1))
    entries = Ledger(settings.ledger_path).entries()
    assert [(e.round, e.sample_rate, e.steps) for e in entries] == [(0, 1.0, 1)]
    assert entries[0].clip_norm == pytest.approx(1.0) and entries[0].secure_rng
    # The release alone costs 10% of the cap (PLD, replace-one), and the reply says so.
    assert metrics["epsilon"] == pytest.approx(epsilon([entries[0].mechanism], delta=1e-5))
    assert metrics["epsilon"] == pytest.approx(0.2, abs=0.005)
    assert sums.shape == (4,) and anchor == Ledger(settings.ledger_path).head()[1]
    # A second query in the same run would let the server average the noise away.
    with pytest.raises(RequestRejected, match="already made"):
        scaling_release(cfg, settings, _req(DP_SCHEMA, server_round=0))
    assert Ledger(settings.ledger_path).count() == 1

    # Training rounds calibrate σ around the release: the whole run fits the cap.
    fitted = DP_SCHEMA.fit_from_sums(sums, int(metrics["num-examples"]))
    head = head_state(make_head("linear", in_dim=2, num_classes=2, seed=0))
    for r in (1, 2):
        reply = train_round(cfg, settings, _req(fitted, server_round=r), head)
    assert reply.metrics["epsilon"] <= 2.0 + 1e-9
    assert Ledger(settings.ledger_path).epsilon(delta=1e-5) == pytest.approx(
        reply.metrics["epsilon"])


@pytest.mark.parametrize("change, words", [
    (dict(scaling_budget=0.9), "scaling-budget must be in"),
    (dict(schema=""), "needs a schema with 'dp'-scaled features"),
    (dict(schema='{"classes": ["well"]}'), "schema"),
])
def test_hostile_scaling_queries_are_rejected_before_anything_is_recorded(tmp_path, change,
                                                                         words):
    path = _clinic(tmp_path / "site.csv")
    settings = _settings(tmp_path, f"csv:{path}")
    req = _req(DP_SCHEMA, server_round=0)
    req = protocol.RoundRequest(**{**req.__dict__, **change})
    with pytest.raises(RequestRejected, match=words):
        scaling_release(RunConfig(backbone="identity"), settings, req)
    assert not settings.ledger_path.exists() or Ledger(settings.ledger_path).count() == 0


def test_a_training_request_with_an_unfitted_schema_is_rejected(tmp_path):
    settings = _settings(tmp_path, "x")
    with pytest.raises(RequestRejected, match="no scaling constants"):
        request_schema(_req(DP_SCHEMA), settings)

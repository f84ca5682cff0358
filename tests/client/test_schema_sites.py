"""A site reads its data through the federation's schema: no silent label flips,
and DP feature scaling is charged to its ledger before anything leaves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.admission import load_site_data
from client.guard import PolicyDeclined, RequestRejected
from client.round import scaling_release, train_round
from client.settings import deployed_policy
from common import protocol
from common.data.readers import SiteDataError
from common.data.schema import Schema
from common.models.heads import head_state, make_head
from common.privacy.accounting import epsilon
from common.privacy.ledger import Ledger
from tests import sites

PNEUMONIA = Schema.from_dict({"classes": ["normal", "pneumonia"]})


def _images(root, folders: dict[str, int]):
    for name, n in folders.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            value = 30 if name.lower() == "normal" else 220
            Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _node(tmp_path, data_path: str, **kw) -> dict:
    return {"site-id": 0, "ledger-path": str(tmp_path / "ledger.sqlite"),
            "cache-dir": str(tmp_path / "cache"), "data-path": data_path,
            "target-epsilon": kw.pop("eps", 2.0), "target-delta": 1e-5, "holdout": 0.2,
            "backbone": "identity", **kw}


def _image_node(tmp_path, root, **kw) -> dict:
    return _node(tmp_path, f"imagefolder:{root}", **{"class-names": "normal,pneumonia",
                                                     "image-size": 8, **kw})


def _req(schema: Schema | None, **kw) -> protocol.RoundRequest:
    base = dict(run_id="run-a", server_round=1, num_rounds=2, local_epochs=1, batch_size=4,
                learning_rate=0.5, momentum=0.0, clip_norm=1.0, noise_multiplier=0.0,
                schema=schema.to_json() if schema is not None else "", backbone="identity")
    return protocol.RoundRequest(**{**base, **kw})


def test_a_site_with_only_one_class_folder_keeps_that_class_index(tmp_path):
    root = _images(tmp_path / "site", {"pneumonia": 10})
    data = load_site_data(deployed_policy(_image_node(tmp_path, root)))
    # Sorted folder names would make 'pneumonia' class 0: a flipped label.
    assert set(data.train_y.tolist()) | set(data.holdout_y.tolist()) == {1}


def test_a_class_folder_differing_only_in_case_is_named_never_reordered(tmp_path):
    root = _images(tmp_path / "site", {"Pneumonia": 6, "normal": 6})
    with pytest.raises(SiteDataError, match="'Pneumonia' differs only in case from the "
                                            "declared class 'pneumonia'"):
        load_site_data(deployed_policy(_image_node(tmp_path, root)))


def test_a_request_whose_classes_differ_from_the_declaration_is_declined_unread(tmp_path):
    import shutil

    from client import admission

    root = _images(tmp_path / "site", {"normal": 5, "pneumonia": 5})
    node = _image_node(tmp_path, root)
    assert admission.admit(deployed_policy(node)).admitted  # as `site serve` does at start
    shutil.rmtree(root)  # a declined request never reads a record
    flipped = Schema.from_dict({"classes": ["pneumonia", "normal"], "image-size": 8,
                                "image-channels": 1})
    head = head_state(make_head("linear", in_dim=64, num_classes=2))
    with pytest.raises(PolicyDeclined, match="schema 'classes'"):
        train_round(deployed_policy(node), _req(flipped), head)


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


def _clinic_node(tmp_path, **kw) -> dict:
    (tmp_path / "schema.json").write_text(DP_SCHEMA.to_json())
    return _node(tmp_path, f"csv:{_clinic(tmp_path / 'site.csv')}",
                 schema=str(tmp_path / "schema.json"), **kw)


def test_dp_scaling_is_charged_as_round_zero_before_it_leaves_and_only_once(tmp_path):
    settings = deployed_policy(_clinic_node(tmp_path, eps=2.0))
    sums, public = scaling_release(settings, _req(DP_SCHEMA, server_round=0, batch_size=4,
                                                  scaling_budget=0.1))
    entries = Ledger(settings.ledger_path).entries()
    assert [(e.round, e.sample_rate, e.steps) for e in entries] == [(0, 1.0, 1)]
    assert entries[0].clip_norm == pytest.approx(1.0) and entries[0].secure_rng
    # The release alone costs 10% of the cap (PLD, replace-one), and the reply says so.
    assert public.epsilon == pytest.approx(epsilon([entries[0].mechanism], delta=1e-5))
    assert public.epsilon == pytest.approx(0.2, abs=0.005)
    assert sums.shape == (4,) and public.ledger_head == Ledger(settings.ledger_path).head()[1]
    # A second query in the same run would let the server average the noise away.
    with pytest.raises(RequestRejected, match="already made"):
        scaling_release(settings, _req(DP_SCHEMA, server_round=0))
    assert Ledger(settings.ledger_path).count() == 1

    # Training rounds calibrate σ around the release: the whole run fits the cap.
    fitted = DP_SCHEMA.fit_from_sums(sums, public.num_examples)
    head = head_state(make_head("linear", in_dim=2, num_classes=2, seed=0))
    for r in (1, 2):
        reply = train_round(settings, _req(fitted, server_round=r), head)
    assert reply.public.epsilon <= 2.0 + 1e-9
    assert Ledger(settings.ledger_path).epsilon(delta=1e-5) == pytest.approx(
        reply.public.epsilon)


@pytest.mark.parametrize("change, error, words", [
    (dict(scaling_budget=0.9), RequestRejected, "scaling-budget must be in"),
    (dict(schema=""), PolicyDeclined, "carries no schema"),
    (dict(schema='{"classes": ["well"]}'), PolicyDeclined, "schema is malformed"),
])
def test_hostile_scaling_queries_are_rejected_before_anything_is_recorded(tmp_path, change,
                                                                         error, words):
    settings = deployed_policy(_clinic_node(tmp_path))
    req = _req(DP_SCHEMA, server_round=0)
    req = protocol.RoundRequest(**{**req.__dict__, **change})
    with pytest.raises(error, match=words):
        scaling_release(settings, req)
    assert not settings.ledger_path.exists() or Ledger(settings.ledger_path).count() == 0


def test_a_training_request_with_an_unfitted_schema_is_declined(tmp_path):
    settings = deployed_policy(_clinic_node(tmp_path))
    head = head_state(make_head("linear", in_dim=2, num_classes=2, seed=0))
    with pytest.raises(PolicyDeclined, match="no scaling constants"):
        train_round(settings, _req(DP_SCHEMA), head)

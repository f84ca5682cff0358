"""The patient as the site's unit of privacy (issue 26), through the real ClientApp.

A deployed site declares ``privacy-unit = "patient"`` and ``max-records-per-patient``
in its own node config, and where each record's patient id comes from in its
``data-path`` (a CSV column here). Its admission counts patients, its rounds run
patient-level DP-SGD (Poisson over patients, one clipped bag per patient), and its
ledger says so. No run config or round request can switch it to records or change
its k: a request for another unit is declined before any record is read, with the
same reply shape as any policy decline, and nothing is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from client import admission
from client.settings import SiteConfigError, deployed_policy, scenario_policy
from common.batches import plan_batch
from common.config import RunConfig
from common.data.grouping import group_sizes
from common.privacy.accounting import dp_plan, group_privacy
from common.privacy.ledger import Ledger
from common.protocol import POLICY_DECLINED, to_array_record
from tests import sites

K = 4  # the site's declared most records per patient
pytestmark = pytest.mark.usefixtures("flower_task")


def patient_csv(root: Path, *, patients: int = 40, seed: int = 0, max_records: int = K,
                **policy) -> dict:
    """A deployed site's CSV: two features, a label, and a patient column (1 to
    ``max_records`` records per patient, one label each). Returns its node config."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    schema = sites.tabular_schema(2)
    lines = ["f0,f1,label,pid"]
    for p in range(patients):
        label = p % 2
        for _ in range(int(rng.integers(1, max_records + 1))):
            x = rng.normal(label, 1.0, 2)
            lines.append(f"{float(x[0])!r},{float(x[1])!r},{label},patient-{p:03d}")
    (root / "records.csv").write_text("\n".join(lines) + "\n")
    (root / "schema.json").write_text(schema.to_json())
    base = {"site-id": 0, "ledger-path": str(root / "ledger.sqlite"),
            "cache-dir": str(root / "cache"), "target-epsilon": 2.0, "target-delta": 1e-5,
            "backbone": "identity", "schema": str(root / "schema.json"),
            "data-path": f"csv:{root / 'records.csv'}?patient=column:pid",
            "privacy-unit": "patient", "max-records-per-patient": K}
    return {**base, **policy}


def send_train(node: dict, *, run_config: dict | None = None, **overrides) -> Message:
    cfg = sites.config(node, **overrides)
    content = RecordDict({"arrays": to_array_record(sites.head(node, in_dim=2)),
                          "config": ConfigRecord(cfg)})
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=RecordDict(),
                  run_config=run_config or {})
    return client_app.app(Message(content=content, message_type="train", dst_node_id=5), ctx)


def entries(node: dict) -> list:
    path = Path(node["ledger-path"])
    return Ledger(path).entries() if path.exists() else []


def shape(reply: Message) -> dict:
    """What a reply holds, by record and key (not values)."""
    c = reply.content
    return {"config": {k: sorted(v) for k, v in c.config_records.items()},
            "metrics": {k: sorted(v) for k, v in c.metric_records.items()},
            "arrays": sorted(c.array_records)}


# -- the policy ------------------------------------------------------------------
def test_the_unit_and_k_come_from_the_sites_own_node_config(tmp_path):
    node = patient_csv(tmp_path)
    s = deployed_policy(node)
    assert (s.privacy_unit, s.group_size) == ("patient", K)
    assert "one patient" in s.unit_text
    record = deployed_policy({**node, "privacy-unit": "record",
                              "data-path": f"csv:{tmp_path / 'records.csv'}"})
    assert (record.privacy_unit, record.group_size) == ("record", K)  # k: a declaration
    plain = {k: v for k, v in node.items() if k not in ("privacy-unit", "max-records-per-patient")}
    assert (deployed_policy(plain).privacy_unit, deployed_policy(plain).group_size) == ("record", 1)


@pytest.mark.parametrize("change, words", [
    ({"privacy-unit": "visit"}, "'privacy-unit' must be one of record, patient"),
    ({"max-records-per-patient": 0}, "needs 'max-records-per-patient'"),
    ({"max-records-per-patient": -2}, "'max-records-per-patient' must be in [1"),
    ({"max-records-per-patient": 2.5}, "'max-records-per-patient' must be an integer"),
    ({"data-path": "csv:/nowhere/records.csv"}, "needs each record's patient id"),
])
def test_a_patient_level_site_with_a_bad_or_incomplete_policy_does_not_start(tmp_path, change,
                                                                               words):
    node = patient_csv(tmp_path)
    with pytest.raises(SiteConfigError) as err:
        deployed_policy({**node, **change})
    assert words in str(err.value)


def test_a_policy_file_sets_the_unit(tmp_path):
    node = patient_csv(tmp_path)
    (tmp_path / "policy.toml").write_text('privacy-unit = "patient"\nmax-records-per-patient = 7\n')
    own = {k: v for k, v in node.items() if k not in ("privacy-unit", "max-records-per-patient")}
    s = deployed_policy({**own, "policy-file": str(tmp_path / "policy.toml")})
    assert (s.privacy_unit, s.group_size) == ("patient", 7)


# -- admission: the public count is patients ----------------------------------------
def test_admission_counts_patients_and_the_ids_stay_at_the_site(tmp_path):
    node = patient_csv(tmp_path)
    s = deployed_policy(node)
    adm = admission.admit(s)
    data = admission.load_site_data(s)
    assert adm.admitted and adm.unit == "patient"
    assert adm.num_train == len(group_sizes(data.train_groups))
    assert adm.num_holdout == len(group_sizes(data.holdout_groups))
    assert adm.num_train_records == len(data.train_y) > adm.num_train
    assert "patient-0" not in adm.to_json()  # no patient id in the stored admission


def test_a_record_level_site_whose_patients_exceed_its_declared_k_is_not_admitted(tmp_path):
    node = patient_csv(tmp_path, max_records=6, patients=30)
    node.update({"privacy-unit": "record", "max-records-per-patient": 2})
    s = deployed_policy(node)
    data = admission.load_site_data(s)
    assert group_sizes(data.train_groups).max() > 2
    adm = admission.admit(s)
    assert not adm.admitted and "above the site's declared max-records-per-patient 2" in adm.reason


def test_a_simulated_patient_level_site_without_patient_ids_is_not_admitted(tmp_path):
    cfg = RunConfig(dataset="digits", num_sites=2, privacy_unit="patient",
                    max_records_per_patient=3, ledger_dir=str(tmp_path / "sites"),
                    cache_dir=str(tmp_path / "cache"), backbone="identity")
    s = scenario_policy(cfg, {"partition-id": 0})
    assert (s.privacy_unit, s.group_size) == ("patient", 3)
    adm = admission.admit(s)
    assert not adm.admitted and "carry no patient id" in adm.reason


# -- a round: patient-level DP-SGD, charged per patient ---------------------------------
def test_a_patient_level_round_through_the_client_app(tmp_path):
    node = patient_csv(tmp_path)
    s = deployed_policy(node)
    adm = admission.admit(s)
    reply = send_train(node, **{"privacy-unit": "patient", "batch-size": 8})
    status = dict(reply.content.config_records["status"])
    assert status["status"] == "ok" and status["privacy-unit"] == "patient", status
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics["num-examples"] == adm.num_train  # patients, fixed at admission
    q, steps = dp_plan(adm.num_train, batch_size=plan_batch(adm.num_train, batch_size=8),
                       epochs=1)
    assert metrics["sample-rate"] == pytest.approx(q) and metrics["steps"] == steps
    (entry,) = entries(node)
    assert (entry.unit, entry.group_size, entry.dataset_size) == ("patient", K, adm.num_train)
    assert entry.sample_rate == pytest.approx(q)
    assert math.isfinite(metrics["epsilon"]) and 0 < metrics["epsilon"] <= 2.0


# -- the hostile coordinator: no request switches the unit ---------------------------
HOSTILE = [
    ({"privacy-unit": "record"}, None),
    ({}, None),  # an old or careless request: no unit means "record"
    ({"privacy-unit": "record", "max-records-per-patient": 1}, None),
    ({"privacy-unit": "patient", "max-records-per-patient": 1000},
     {"privacy-unit": "record", "max-records-per-patient": 1, "dp": False}),
    ({"privacy-unit": "record"},
     {"privacy-unit": "record", "max-records-per-patient": 1, "target-epsilon": 1e9}),
]


@pytest.mark.parametrize("overrides, run_config", HOSTILE)
def test_no_request_or_run_config_switches_a_patient_level_site(tmp_path, overrides,
                                                                run_config):
    node = patient_csv(tmp_path)
    admission.admit(deployed_policy(node))
    reply = send_train(node, run_config=run_config, **overrides)
    status = dict(reply.content.config_records["status"])
    if overrides.get("privacy-unit") == "patient":
        # The unit matches: the site trains, still per patient with its own k.
        assert status["status"] == "ok" and status["privacy-unit"] == "patient"
        assert [(e.unit, e.group_size) for e in entries(node)] == [("patient", K)]
        return
    assert status["status"] == POLICY_DECLINED, status
    assert "privacy-unit = 'patient'" in status["reason"]
    assert entries(node) == []  # no record-level entry, nothing written
    # The reply is a plain decline, the same shape as any policy decline.
    other = tmp_path / "other"
    declined = send_train(patient_csv(other), **{"privacy-unit": "patient", "dp": False})
    assert dict(declined.content.config_records["status"])["status"] == POLICY_DECLINED
    assert shape(reply) == shape(declined) == {"config": {"status": ["reason", "site-id",
                                                                     "status"]},
                                               "metrics": {}, "arrays": []}


def test_a_record_level_site_declines_a_request_for_the_patient_unit(tmp_path):
    node = patient_csv(tmp_path)
    node.update({"privacy-unit": "record"})  # patient ids read, records the unit
    node.pop("max-records-per-patient")
    admission.admit(deployed_policy(node))
    reply = send_train(node, **{"privacy-unit": "patient"})
    status = dict(reply.content.config_records["status"])
    assert status["status"] == POLICY_DECLINED and "one record" in status["reason"]
    assert entries(node) == []
    ok = send_train(node)
    assert dict(ok.content.config_records["status"])["privacy-unit"] == "record"
    assert [(e.unit, e.group_size) for e in entries(node)] == [("record", 1)]


def test_the_declaration_answer_states_the_patient_unit_and_count(tmp_path):
    node = patient_csv(tmp_path)
    adm = admission.admit(deployed_policy(node))
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=RecordDict(),
                  run_config={"privacy-unit": "record"})
    msg = Message(content=RecordDict({"config": ConfigRecord({})}),
                  message_type="query.declaration", dst_node_id=5)
    reply = dict(client_app.app(msg, ctx).content.config_records["declaration"])
    assert reply["privacy-unit"] == "patient" and reply["num-examples"] == adm.num_train
    assert "patient-0" not in json.dumps(reply)  # ('-' is in no base64 or hex text)


# -- site check: patients, records per patient, ε per patient ---------------------------
def _node_arg(node: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in node.items())


def test_site_check_reports_patients_and_the_epsilon_per_patient(tmp_path, capsys):
    from cli.main import main as cli_main  # lazy: the command line loads its own modules

    node = patient_csv(tmp_path)
    assert cli_main(["site", "check", "--node-config", _node_arg(node), "--rounds", "2",
                     "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    adm = admission.stored(deployed_policy(node))
    assert f"patients: 40; records per patient min 1" in out
    assert "patients by records (local only): 1: " in out
    assert f"privacy estimate: {adm.num_train} training patients" in out
    assert "ε per patient: " in out and "unit: one patient at one site" in out
    assert f"admitted: {adm.num_train} training patients ({adm.num_train_records} training " \
           "records, not released)" in out
    assert "patient-0" not in out  # counts only; the ids stay at the site


def test_site_check_shows_group_privacy_beside_a_record_level_epsilon(tmp_path, capsys):
    from cli.main import main as cli_main  # lazy: as above

    node = patient_csv(tmp_path)
    node["privacy-unit"] = "record"
    assert cli_main(["site", "check", "--node-config", _node_arg(node), "--rounds", "2",
                     "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "ε per record: " in ln)
    eps = float(line.split(": ")[1])
    e_k, d_k = group_privacy(eps, 1e-5, K)  # from the printed (rounded) per-record ε
    line = next(ln for ln in out.splitlines() if f"up to k={K} records per patient" in ln)
    shown = float(line.split("): ")[1].split(" ")[0])
    assert shown == pytest.approx(e_k, abs=K * 5e-4) and "with δ = " in line
    assert "unit: one training record at one site" in out

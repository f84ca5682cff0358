"""`fedtransfer select`: reads the public validation split only, records its evidence
in config.toml, summary.json and the model card; the audit states it or flags it."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

import client.admission
import common.data.datasets
from cli.main import main as cli_main
from common.audit.recompute import audit
from common.audit.report import format_text
from common.config import load_config_file, parse_config
from common.models.transfer import parse_record
from server.delivery import delivery_card
from simulations.selection import apply_selection, resolve_auto, run_selection

CANDIDATES = "backbone-candidates=identity, efficientnet-lite0@32"


class PrivateSplitOpened(AssertionError):
    pass


class PublicOnly:
    """A dataset whose training records (the sites' private splits) and test split
    cannot be read: any access fails the test."""

    def __init__(self, splits):
        self._splits = splits

    def __getattr__(self, name):
        if name.startswith(("train", "test")):
            raise PrivateSplitOpened(f"the selection read {name}")
        return getattr(self._splits, name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: each candidate's val features are computed once."""
    return tmp_path_factory.mktemp("select-cache")


@pytest.fixture
def public_only(monkeypatch):
    real = common.data.datasets.load_dataset

    def guarded(*args, **kwargs):
        return PublicOnly(real(*args, **kwargs))

    def no_site(*args, **kwargs):
        raise PrivateSplitOpened("the selection opened a site's data")

    monkeypatch.setattr(common.data.datasets, "load_dataset", guarded)
    monkeypatch.setattr(common.data.datasets, "site_data", no_site)
    monkeypatch.setattr(client.admission, "load_site_data", no_site)


def test_select_reads_only_the_public_split_and_records_the_choice(tmp_path, public_only, cache,
                                                                   capsys):
    out = tmp_path / "sel"
    rc = cli_main(["select", "--set", CANDIDATES,
                   "--set", f"cache-dir={cache}", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rank" in text and "LogME" in text and "<- chosen" in text
    assert "costs no ε" in text
    record = json.loads((out / "selection.json").read_text())
    assert record["data"] == {"source": "public-val", "split": "val", "records": 180,
                              "dataset": "digits", "public": True}
    assert {c["candidate"] for c in record["candidates"]} == {"identity", "efficientnet-lite0@32"}
    # The written scenario names the choice and carries the evidence; it parses back.
    cfg = parse_config(load_config_file(out / "config.toml"))
    assert cfg.backbone == record["backbone"]
    assert parse_record(cfg.backbone_selection) == record
    assert (out / "selection.png").stat().st_size > 1000


def test_selection_on_the_private_split_is_flagged_by_the_audit(tmp_path, cache):
    cfg = parse_config({"dataset": "digits", "backbone": "auto",
                        "backbone-candidates": "identity", "cache-dir": str(cache)})
    record = run_selection(cfg, split="train")
    assert record["data"]["source"] == "private-train" and not record["data"]["public"]
    run = tmp_path / "run"
    run.mkdir()
    resolved = apply_selection(cfg, record)
    (run / "config.toml").write_text(resolved.to_toml())
    (run / "summary.json").write_text(json.dumps({
        "run_id": "r1", "mode": "federated", "dp": False, "dataset": "digits",
        "final": {}, "sites": {}, "privacy": {"dp": False},
        "backbone_selection": parse_record(resolved.backbone_selection)}))
    report = audit([run])
    codes = {h.code for h in report.all_hazards()}
    assert "backbone-selected-on-private-data" in codes and report.has_errors

    public = apply_selection(cfg, run_selection(cfg))
    (run / "config.toml").write_text(public.to_toml())
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("backbone_selection")  # the audit also reads config.toml's record
    (run / "summary.json").write_text(json.dumps(summary))
    report = audit([run])
    assert "backbone-selected-on-private-data" not in {h.code for h in report.all_hazards()}
    assert "chosen by rehearsal on public data only" in format_text(report)


def test_auto_resolves_and_the_card_records_the_evidence(public_only, cache, capsys):
    cfg = parse_config({"dataset": "digits", "backbone": "auto", "backbone-candidates":
                        "identity, efficientnet-lite0@32", "cache-dir": str(cache)})
    resolved = resolve_auto(cfg)
    assert resolved.backbone in ("identity", "efficientnet-lite0")
    assert "<- chosen" in capsys.readouterr().out
    assert tomllib.loads(resolved.to_toml())["backbone-selection"] == resolved.backbone_selection
    card = delivery_card(resolved, run_id="r", server_round=1, classes=[str(i) for i in range(10)],
                         head_in_dim=64, head_params=650,
                         final={"auc": 0.9, "accuracy": 0.8, "balanced_accuracy": 0.8},
                         outcome=None, sites={}, unit="one record")
    sel = card["backbone_selection"]
    assert sel["chosen"] == parse_record(resolved.backbone_selection)["chosen"]
    assert sel["data"]["source"] == "public-val"
    assert [c["rank"] for c in sel["candidates"]] == [1, 2]
    assert np.isfinite([c["logme"] for c in sel["candidates"]]).all()

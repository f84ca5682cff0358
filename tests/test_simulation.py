"""A real Flower simulation (Ray backend), end to end, checked through summary.json."""

from __future__ import annotations

import json
import math

import pytest

from common.privacy.accounting import Mechanism, epsilon
from common.privacy.ledger import Ledger
from tests.procs import simulate

pytestmark = pytest.mark.integration


def test_simulation_writes_a_complete_summary(tmp_path):
    out = tmp_path / "run"
    small = ("backbone=efficientnet-lite0", "num-sites=3", "num-rounds=2", "image-size=32",
             "local-epochs=1", f"cache-dir={tmp_path / 'cache'}")
    s, text = simulate(out, *small, "target-epsilon=3.0", log=tmp_path / "simulate.log")
    assert "round 2/2" in text and "ε (per record" in text
    assert s["runtime"] == "simulation"  # the audit's public-record check applies to deployments
    # Quiet, truthful output (issue 24): no library notice that says nothing to the user.
    for notice in ("DEPRECATED FEATURE", "run_simulation", "FutureWarning", "single label"):
        assert notice not in text, notice
    # Every simulated site is a connected node: no too-few-nodes warning (it once fired
    # before the nodes had registered).
    assert "node(s) connected" not in text

    for key in ("accuracy", "auc", "balanced_accuracy"):
        assert 0.0 <= s["final"][key] <= 1.0
    # 10 balanced digit classes: even 2 noisy rounds must beat chance by a margin.
    assert s["final"]["auc"] > 0.7
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    assert (s["privacy"]["accountant"], s["privacy"]["neighbours"]) == ("pld", "replace-one")
    assert "one training record at one site" in s["privacy"]["unit"]
    assert sorted(s["sites"]) == ["0", "1", "2"]
    for sid, site in s["sites"].items():
        assert [h["round"] for h in site["history"]] == [1, 2]
        for h in site["history"]:
            assert h["noise_multiplier"] > 0 and 0 < h["sample_rate"] <= 1 and h["steps"] >= 1
        # The cache flag stays at the site; timings arrive only to 0.1 s.
        assert all("feature_cache_hit" not in h and "train_loss" not in h
                   for h in site["history"])
        assert all(round(h["site_seconds"] * 10) == pytest.approx(h["site_seconds"] * 10)
                   for h in site["history"])
        # The reported ε is the ledger's, recomputed from its raw tuples.
        ledger = Ledger(out / "sites" / f"site-{sid}" / "ledger.sqlite")
        assert ledger.verify_chain() == []
        assert all(e.hash.startswith("sha256:") for e in ledger.entries())
        assert ledger.cap() == (3.0, 1e-5)
        assert [h["ledger_entries"] for h in site["history"]] == [1, 2]
        tuples = [Mechanism(h["noise_multiplier"], h["sample_rate"], h["steps"])
                  for h in site["history"]]
        assert site["epsilon"] == pytest.approx(epsilon(tuples, delta=site["delta"]), rel=1e-9)
        assert site["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
        assert site["epsilon"] <= 3.0 and not math.isnan(site["epsilon"])
        assert site["delta"] == 1e-5
    assert (out / "head.safetensors").is_file()
    assert "target-epsilon = 3.0" in (out / "config.toml").read_text()

    # The audit of a real Flower run recomputes every site's ε and finds no error.
    from cli.main import main as cli_main

    assert cli_main(["audit", str(out), "--out", str(tmp_path / "audit")]) == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["counts"]["error"] == 0
    for site in audit["runs"][0]["sites"]:
        assert site["chain_ok"] and site["chain"] == "signed, verified"
        assert site["anchors_matched"] == 2
        assert site["cumulative"][-1]["epsilon"] == pytest.approx(
            s["sites"][site["site"]]["epsilon"], rel=1e-9)
        assert abs(site["epsilon"]["pld"] - site["epsilon"]["prv"]) < 0.05  # add/remove
        assert site["epsilon"]["replace_one"] > site["epsilon"]["prv"]

    # A second run on the same site ledgers, with caps below what run 1 spent:
    # every site declines before training, nothing new is recorded, and the
    # server ends the run cleanly instead of failing.
    before = {sid: len(Ledger(out / "sites" / f"site-{sid}" / "ledger.sqlite").entries())
              for sid in s["sites"]}
    s2, _ = simulate(tmp_path / "run2", *small, "target-epsilon=2.0",
                     f"ledger-dir={out / 'sites'}", log=tmp_path / "simulate2.log")
    assert s2["rounds"][0]["sites_aggregated"] == 0
    assert "no site update could be aggregated" in s2["stop_reason"]
    for sid, site in s2["sites"].items():
        assert site["status"] == "budget-exhausted"
        assert "budget exhausted: spent" in site["reason"] and "cap 2.0000" in site["reason"]
        assert len(Ledger(out / "sites" / f"site-{sid}" / "ledger.sqlite").entries()) == before[sid]


def test_secure_aggregation_in_a_ray_simulation(tmp_path):
    """SecAgg+ under Flower's simulation runtime: each simulated node keeps the
    protocol state between the four messages of a round."""
    out = tmp_path / "run"
    s, _ = simulate(out, "backbone=identity", "num-sites=3", "num-rounds=2", "aggregation=secagg+",
                    "teacher=global", "distill=false", f"cache-dir={tmp_path / 'cache'}",
                    log=tmp_path / "simulate.log")
    assert s["secure_aggregation"]["num_shares"] == 3
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3]
    assert s["final"]["auc"] > 0.9
    for sid in ("0", "1", "2"):
        ledger = Ledger(out / "sites" / f"site-{sid}" / "ledger.sqlite")
        assert [e.round for e in ledger.entries()] == [1, 2]
        assert s["sites"][sid]["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)

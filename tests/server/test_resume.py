"""A restarted ServerApp resumes from the last completed round's checkpoint.

The server's round loop (``run_server``) runs against an in-process grid that
hands each message to the real ClientApp (``client.app``), so sites keep real
ledgers. The first server dies while round 3 is in flight, after the sites
trained and committed their spend; the restarted one (``resume = true``)
continues from round 3. Nothing is double counted and nothing is lost.
"""

from __future__ import annotations

import json

import pytest

from common.config import RunConfig
from common.privacy.ledger import Ledger
from server.run import run_server
from tests.inprocess import InProcessGrid, ServerDied


def test_restarted_server_resumes_after_the_last_completed_round(tmp_path):
    cfg = RunConfig(num_sites=3, min_sites=2, num_rounds=3, backbone="identity",
                    partitioner="iid", batch_size=32, local_epochs=1, learning_rate=1.0,
                    noise_multiplier=1.0, target_epsilon=20.0, distill=False,
                    out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                    ledger_dir=str(tmp_path / "sites"))
    with pytest.raises(ServerDied):
        run_server(cfg, InProcessGrid(cfg, 1, die_in_train_round=3), run_id="1")
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and state["run_id"] == "1"
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    before = {sid: s["history"] for sid, s in state["sites"].items()}

    # Restart: same out-dir, resume = true; Flower gives the new run a new id.
    s = run_server(cfg.replace(resume=True), InProcessGrid(cfg, 2), run_id="2")

    assert s["resumed_from"]["run_id"] == "1" and s["resumed_from"]["round"] == 2
    assert [r["round"] for r in s["rounds"]] == [1, 2, 3]
    assert s["rounds"][:2] == state["rounds"]  # restored, not re-run
    assert s["stop_reason"] == "completed"
    for sid in ("0", "1", "2"):
        site = s["sites"][sid]
        assert [h["round"] for h in site["history"]] == [1, 2, 3]
        assert site["history"][:2] == before[sid]
        assert "holdout" not in site  # holdout metrics stay at the site (common/protocol.py)
        ledger = Ledger(tmp_path / "sites" / f"site-{sid}" / "ledger.sqlite")
        entries = ledger.entries()
        # Round 3 ran twice at the site (the first reply was lost with the server):
        # both spends are on the ledger, and the reported ε is the ledger's.
        assert [(e.run_id, e.round) for e in entries] == [("1", 1), ("1", 2), ("1", 3),
                                                          ("2", 3)]
        assert ledger.verify_chain() == []
        assert site["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
    assert (tmp_path / "run" / "checkpoint" / "site-0.safetensors").is_file()


def test_resume_needs_an_out_dir():
    with pytest.raises(ValueError, match="'resume': needs out-dir"):
        RunConfig(resume=True)


def _resumable(tmp_path, **kw) -> RunConfig:
    # Ledgers under <run>/sites, where the audit finds them.
    return RunConfig(num_sites=3, min_sites=2, num_rounds=3, backbone="identity",
                     partitioner="iid", batch_size=32, local_epochs=1, learning_rate=1.0,
                     distill=False, out_dir=str(tmp_path / "run"),
                     cache_dir=str(tmp_path / "cache"), **kw)


def test_an_honest_resumed_run_passes_the_audit(tmp_path):
    from common.audit.recompute import audit
    from common.audit.report import format_text

    cfg = _resumable(tmp_path, noise_multiplier=1.0, target_epsilon=20.0)
    with pytest.raises(ServerDied):
        run_server(cfg, InProcessGrid(cfg, 1, die_in_train_round=3), run_id="1")
    run_server(cfg.replace(resume=True), InProcessGrid(cfg, 2), run_id="2")
    report = audit([tmp_path / "run"])
    assert not report.has_errors, format_text(report)
    (run,) = report.runs
    for site in run.sites:
        # Rounds 1-2 of run 1 and 3 of run 2 are matched by (run, round); the interrupted
        # round 3 of run 1 was charged but never recorded: conservative, a warning.
        assert site.anchors_matched == 3 and site.chain == "signed, verified"
        assert [h.code for h in site.hazards if h.severity == "warning"].count(
            "charged-not-released") == 1


def test_a_resume_cannot_raise_the_cap(tmp_path):
    """Resuming with a larger target-epsilon used to take every site past its
    original cap. The ledger keeps the cap of its first use: the sites decline."""
    cfg = _resumable(tmp_path, target_epsilon=4.0)
    with pytest.raises(ServerDied):
        run_server(cfg, InProcessGrid(cfg, 1, die_in_train_round=3), run_id="1")
    raised = cfg.replace(resume=True, target_epsilon=8.0)
    s = run_server(raised, InProcessGrid(raised, 2), run_id="2")
    for sid in ("0", "1", "2"):
        ledger = Ledger(tmp_path / "run" / "sites" / f"site-{sid}" / "ledger.sqlite")
        assert ledger.cap() == (4.0, 1e-5)
        assert ledger.epsilon(delta=1e-5) <= 4.0
        assert s["sites"][sid]["status"] == "policy-declined"
        assert "raise-cap" in s["sites"][sid]["reason"]
    # Round 3 was asked of every site, and every site declined it: nothing after the raise.
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3, 0]
    assert s["stop_reason"].startswith("stopped")

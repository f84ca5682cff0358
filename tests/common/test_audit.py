"""The privacy audit: accountant vectors, real ledgers, tampering, crashes, refusals, HTML."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as cli_main
from client.budget import BudgetExhausted
from client.round import evaluate_site, train_round
from client.settings import SiteSettings, deployed_policy
from common.audit.recompute import (
    audit,
    audit_site,
    cross_run_hazards,
    discover,
    epsilon_three_ways,
    pld_epsilon,
    read_ledger,
)
from common.audit.report import format_text, render_html
from common.models.heads import head_state, make_head
from common.privacy.accounting import Mechanism, compress, epsilon
from common.privacy.ledger import Entry, Ledger
from common.protocol import RoundRequest, released_fields
from tests import sites
from tests.conftest import REPO

DELTA = 1e-5


# -- helpers: a real site run on tiny synthetic data ------------------------
def _node(run_dir: Path, *, eps: float = 2.0, n: int = 96, seed: int = 0) -> dict:
    """A deployed site (a CSV of 96 records beside the run) whose ledger is the run's."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 6)) * 0.3 + y[:, None]
    return sites.csv_site(run_dir.parent / "site-data", x, y, **{
        "ledger-path": str(run_dir / "sites" / "site-0" / "ledger.sqlite"),
        "cache-dir": str(run_dir.parent / "cache"), "target-epsilon": eps,
        "target-delta": DELTA, "holdout": 1 / 6})


def _settings(run_dir: Path, *, eps: float = 2.0) -> SiteSettings:
    return deployed_policy(_node(run_dir, eps=eps))


def _req(run_dir: Path, run: str = "run-a", r: int = 1, rounds: int = 2,
         sigma: float = 0.0) -> RoundRequest:
    return sites.request(_node(run_dir), run_id=run, server_round=r, num_rounds=rounds,
                         noise_multiplier=sigma)


def make_run(run_dir: Path, *, eps: float = 2.0, rounds: int = 2, run_id: str = "run-a") -> dict:
    """Train one real site for ``rounds`` rounds and write the run directory the
    server would: ``summary.json`` (history from the site's replies) plus the ledger."""
    settings = _settings(run_dir, eps=eps)
    head = head_state(make_head("linear", in_dim=6, num_classes=2, seed=0))
    history = []
    for r in range(1, rounds + 1):
        reply = train_round(settings, _req(run_dir, run=run_id, r=r, rounds=rounds), head)
        head = reply.arrays
        m = reply.public.metrics()
        history.append({"round": r, "run_id": run_id, "noise_multiplier": m["noise-multiplier"],
                        "sample_rate": m["sample-rate"], "steps": m["steps"],
                        "num_examples": m["num-examples"], "epsilon_after": m["epsilon"],
                        "ledger_entries": m["ledger-entries"],
                        "ledger_head": reply.public.ledger_head})
    final = evaluate_site(settings, head, trainable="head", head="linear", hidden_dim=128)
    summary = {
        "run_id": run_id, "mode": "federated", "dp": True, "dataset": "synthetic",
        "final": {"accuracy": final["accuracy"], "auc": final["auc"],
                  "balanced_accuracy": final["balanced-accuracy"]},
        "sites": {"0": {"epsilon": history[-1]["epsilon_after"], "delta": DELTA,
                        "status": "active", "num_examples": history[-1]["num_examples"],
                        "history": history}},
        "privacy": {"dp": True, "target_epsilon": eps, "target_delta": DELTA,
                    "not_charged": ["num-examples (declared public)"],
                    "released": released_fields()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("audit") / "run"
    run_dir.mkdir()
    make_run(run_dir)
    return run_dir


@pytest.fixture
def run_copy(honest_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(honest_run, dst)
    return dst


def _codes(report, severity: str | None = None) -> set[str]:
    return {h.code for h in report.all_hazards() if severity in (None, h.severity)}


def _append(ledger: Ledger, *, sigma=1.0, q=0.1, steps=10, delta=DELTA, n=1000,
            sampler="poisson", fp="fp-a", run="r", rnd=1, eps_after=None) -> Entry:
    hist = [*ledger.history(), Mechanism(sigma, q, steps)]
    return ledger.append(Entry(
        run_id=run, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0,
        delta=delta, sampler=sampler, secure_rng=True, accountant="prv",
        accountant_version="opacus-1.6.0", libraries="{}", dataset_size=n, data_fingerprint=fp,
        epsilon_after=epsilon(hist, delta=delta) if eps_after is None else eps_after))


# -- what left the sites -------------------------------------------------------
def test_audit_lists_what_each_site_released_with_its_privacy_class(run_copy):
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    rows = {r["field"]: r for r in site.released}
    assert rows["arrays"]["class"] == "dp"
    assert rows["num-examples"] == {"field": "num-examples", "class": "public", "value": 80}
    assert rows["epsilon"]["value"] == pytest.approx(site.epsilon_reported)
    assert "train-loss" not in rows and not any(k.startswith("holdout") for k in rows)
    assert not report.has_errors, format_text(report)
    assert "site 0 released: arrays=head (DP-SGD) [dp], site-id=0 [public]" in format_text(report)
    assert "what it released to the server" in render_html(report)


@pytest.mark.parametrize("edit, code", [
    (lambda s: s["sites"]["0"]["history"][-1].update(train_loss=0.69), "forbidden-release"),
    (lambda s: s["sites"]["0"]["history"][-1].update(feature_cache_hit=True), "forbidden-release"),
    (lambda s: s["sites"]["0"].update(holdout=[{"round": 1, "accuracy": 0.9}]),
     "forbidden-release"),
    (lambda s: s["sites"]["0"].update(dp=False), "site-without-dp"),
])
def test_audit_fails_a_run_whose_sites_sent_unnoised_values_or_trained_without_dp(
        run_copy, edit, code):
    summary = json.loads((run_copy / "summary.json").read_text())
    edit(summary)
    (run_copy / "summary.json").write_text(json.dumps(summary))
    report = audit([run_copy])
    assert code in _codes(report, "error")
    assert cli_main(["audit", str(run_copy), "--out", str(run_copy / "audit")]) == 1


# -- accountants -------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("sigma, q, steps, prv, rdp", [
    (1.0, 0.01, 10_000, 6.20, 6.71),
    (2.0, 0.01, 10_000, 2.17, 2.35),
])
def test_accountant_vectors(sigma, q, steps, prv, rdp):
    eps = epsilon_three_ways([Mechanism(sigma, q, steps)], delta=DELTA)
    assert eps["prv"] == pytest.approx(prv, abs=0.01)
    assert eps["rdp"] == pytest.approx(rdp, abs=0.01)
    # An independent implementation (Google dp-accounting PLD) agrees with PRV.
    assert eps["pld"] == pytest.approx(eps["prv"], abs=0.05)
    assert eps["prv"] < eps["rdp"]
    assert eps["replace_one"] > 1.5 * eps["pld"]  # the reported relation, beside it


def test_heterogeneous_history_prv_and_pld():
    hist = [Mechanism(1.0, 0.01, 5000), Mechanism(2.0, 0.02, 2500)]
    prv = epsilon(hist, delta=DELTA, accountant="prv", neighbours="add-remove")
    pld = pld_epsilon(hist, delta=DELTA)
    assert prv == pytest.approx(4.89, abs=0.01)
    assert pld == pytest.approx(4.89, abs=0.01)
    assert abs(prv - pld) < 0.05


def test_grouping_identical_tuples_changes_no_epsilon():
    hist = [Mechanism(2.0, 0.05, 30), Mechanism(1.5, 0.1, 20), Mechanism(2.0, 0.05, 50)]
    grouped = compress(hist)
    assert [m.as_tuple() for m in grouped] == [(2.0, 0.05, 80), (1.5, 0.1, 20)]
    assert epsilon(grouped, delta=DELTA) == pytest.approx(epsilon(hist, delta=DELTA), rel=1e-9)
    assert pld_epsilon(hist, delta=DELTA) == pytest.approx(pld_epsilon(grouped, delta=DELTA))
    assert pld_epsilon([], delta=DELTA) == 0.0
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        pld_epsilon(hist, delta=0.0)


# -- an honest run passes ----------------------------------------------------
def test_honest_run_has_no_errors_and_recomputes_the_reported_epsilon(honest_run, tmp_path):
    before = hashlib.sha256((honest_run / "sites/site-0/ledger.sqlite").read_bytes()).hexdigest()
    report = audit([honest_run])
    (run,) = report.runs
    (site,) = run.sites
    summary = json.loads((honest_run / "summary.json").read_text())
    assert not report.has_errors, format_text(report)
    assert site.rounds == 2 and site.total_steps == sum(
        h["steps"] for h in summary["sites"]["0"]["history"])
    assert site.cap == 2.0 and site.delta == DELTA and site.dataset_size == 80
    # The reported relation (replace-one, PLD at the sites' interval) recomputes exactly;
    # the audit's finer interval agrees within PLD's discretisation.
    assert site.cumulative[-1]["epsilon"] == pytest.approx(summary["sites"]["0"]["epsilon"],
                                                          rel=1e-9)
    assert site.epsilon["replace_one"] == pytest.approx(summary["sites"]["0"]["epsilon"],
                                                        abs=0.01)
    assert abs(site.epsilon["pld"] - site.epsilon["prv"]) < 0.05  # add/remove, two ways
    assert site.epsilon["rdp"] > site.epsilon["prv"]
    assert site.epsilon["prv"] < site.epsilon["replace_one"] <= 2.0
    assert [p["round"] for p in site.cumulative] == [1, 2]
    assert site.cumulative[0]["epsilon"] < site.cumulative[1]["epsilon"]
    assert site.chain == "keyed, verified" and site.anchors_matched == 2
    # The site's RNG is not secure and the holdout metrics are not charged: warnings.
    assert {"secure-rng-off", "not-charged"} <= _codes(report, "warning")
    text = format_text(report)
    assert "one training record at one site" in text and "trust model" in text
    # Reading is read-only: the evidence is untouched.
    after = hashlib.sha256((honest_run / "sites/site-0/ledger.sqlite").read_bytes()).hexdigest()
    assert before == after

    out = tmp_path / "out"
    assert cli_main(["audit", str(honest_run), "--out", str(out)]) == 0
    assert (out / "report.html").is_file()
    data = json.loads((out / "audit.json").read_text())
    assert data["has_errors"] is False
    assert data["unit_of_privacy"].startswith("one training record at one site")


def test_cli_json_is_machine_readable(honest_run, tmp_path, capsys):
    assert cli_main(["audit", str(honest_run), "--json", "--out", str(tmp_path / "o")]) == 0
    data = json.loads(capsys.readouterr().out)
    site = data["runs"][0]["sites"][0]
    assert set(site["epsilon"]) == {"replace_one", "prv", "pld", "rdp"}
    assert data["counts"]["error"] == 0


# -- tampering and inconsistencies are errors -------------------------------
def test_edited_row_breaks_the_chain_and_fails_the_cli(run_copy, tmp_path, capsys):
    path = run_copy / "sites/site-0/ledger.sqlite"
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET noise_multiplier = 5.0 WHERE seq = 1")
    # Behind the triggers' back: drop one, then claim round 1 used far more noise.
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("UPDATE entries SET noise_multiplier = 5.0 WHERE seq = 1")
    con.commit()
    con.close()

    report = audit([run_copy])
    assert {"broken-hash-chain", "ledger-summary-mismatch",
            "append-only-triggers-missing"} <= _codes(report, "error")
    assert not report.runs[0].sites[0].chain_ok
    capsys.readouterr()
    assert cli_main(["audit", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "broken-hash-chain" in capsys.readouterr().out


def test_deleted_row_is_detected(run_copy):
    path = run_copy / "sites/site-0/ledger.sqlite"
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER entries_no_delete")
    con.execute("DELETE FROM entries WHERE seq = 1")
    con.commit()
    con.close()
    report = audit([run_copy])
    errors = _codes(report, "error")
    assert {"broken-hash-chain", "update-without-ledger-entry"} <= errors


def test_under_reported_epsilon_is_an_error(run_copy):
    s = json.loads((run_copy / "summary.json").read_text())
    true_eps = s["sites"]["0"]["epsilon"]
    s["sites"]["0"]["epsilon"] = true_eps - 0.005  # within the accountants' error: fine
    (run_copy / "summary.json").write_text(json.dumps(s))
    assert "reported-epsilon-too-low" not in _codes(audit([run_copy]))
    s["sites"]["0"]["epsilon"] = true_eps - 0.1
    (run_copy / "summary.json").write_text(json.dumps(s))
    report = audit([run_copy])
    assert "reported-epsilon-too-low" in _codes(report, "error")


def test_summary_history_disagreeing_with_ledger_is_an_error(run_copy):
    s = json.loads((run_copy / "summary.json").read_text())
    s["sites"]["0"]["history"][1]["steps"] += 1
    s["sites"]["0"]["history"].append({**s["sites"]["0"]["history"][1], "round": 3})
    (run_copy / "summary.json").write_text(json.dumps(s))
    report = audit([run_copy])
    msgs = [h.message for h in report.all_hazards() if h.code == "ledger-summary-mismatch"]
    assert len(msgs) == 1 and "round 2" in msgs[0] and "steps" in msgs[0]
    assert "update-without-ledger-entry" in _codes(report, "error")


def test_mechanism_hazards(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    _append(led, sampler="shuffle", delta=1e-3, n=500)  # δ > 0.1/N: a warning
    e2 = _append(led, eps_after=0.01)  # stored ε far below the truth
    lf = read_ledger(led.path)
    site = audit_site("x", lf.entries, triggers=lf.triggers, cap=0.5, delta=1e-3)
    codes = {h.code: h.severity for h in site.hazards}
    assert codes["non-poisson-sampling"] == "error"
    assert codes["stored-epsilon-too-low"] == "error"
    assert codes["cap-exceeded"] == "error"
    assert codes["delta-not-small"] == "warning"
    assert codes["delta-varies"] == "warning"
    assert "secure-rng-off" not in codes
    assert any(f"entry {e2.seq}" in h.message for h in site.hazards)
    big = audit_site("y", lf.entries, triggers=lf.triggers, delta=0.01)
    assert {h.code: h.severity for h in big.hazards}["delta-too-large"] == "error"


def test_hyperparameters_tuned_on_private_data_is_flagged(run_copy):
    report = audit([run_copy])
    assert "hyperparameters-tuned-on-private-data" not in _codes(report)
    assert any("not tuned on the sites' private records" in a for a in report.assumptions)
    s = json.loads((run_copy / "summary.json").read_text())
    s["privacy"]["hyperparameters"] = "tuned on private site holdouts"
    (run_copy / "summary.json").write_text(json.dumps(s))
    assert "hyperparameters-tuned-on-private-data" in _codes(audit([run_copy]), "error")
    # A run that declares its source: "public" is clean, "unspecified" is a warning.
    for source, present in (("public", False), ("unspecified", True)):
        s["privacy"]["hyperparameters"] = source
        (run_copy / "summary.json").write_text(json.dumps(s))
        codes = _codes(audit([run_copy]))
        assert ("hyperparameter-source-unspecified" in codes) is present
        assert "hyperparameters-tuned-on-private-data" not in codes


def test_same_data_in_separate_ledgers_is_composed(tmp_path):
    a, b = Ledger(tmp_path / "a/ledger.sqlite"), Ledger(tmp_path / "b/ledger.sqlite")
    _append(a, sigma=1.0, q=0.1, steps=50)
    _append(b, sigma=1.0, q=0.1, steps=50)
    _append(b, sigma=1.0, q=0.1, steps=50, fp="other")
    hz = cross_run_hazards([], {"a": a.entries(), "b": b.entries()})
    assert len(hz) == 1 and hz[0].code == "same-data-separate-ledgers"
    composed = epsilon([Mechanism(1.0, 0.1, 100)], delta=DELTA)
    assert f"ε={composed:.3f}" in hz[0].message


def test_discover_finds_runs_and_loose_ledgers(honest_run, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(honest_run, root / "runs/one")
    Ledger(root / "elsewhere/site-7/ledger.sqlite")
    (root / "notes.sqlite").write_bytes(b"")  # not a ledger: ignored
    sources = discover([root])
    assert [s.summary is not None for s in sources] == [True, False]
    assert list(sources[1].ledgers) == ["7"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([tmp_path / "missing"])
    with pytest.raises(ValueError, match="neither a run directory nor a fedtransfer ledger"):
        discover([root / "notes.sqlite"])


# -- crash between commit and release ----------------------------------------
_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import client.budget as budget
    import client.round as round_
    from tests.common.test_audit import _req, _settings
    from common.models.heads import head_state, make_head

    real_charge = budget.charge
    def charge_then_die(*args, **kwargs):
        real_charge(*args, **kwargs)   # the spend is durable...
        os._exit(17)                   # ...and the process dies before the reply leaves
    budget.charge = charge_then_die

    run_dir = Path(sys.argv[1])
    head = head_state(make_head("linear", in_dim=6, num_classes=2, seed=0))
    reply = round_.train_round(_settings(run_dir, eps=1.0), _req(run_dir, r=1, rounds=1), head)
    (run_dir / "released.json").write_text("the update left the site")
""")


@pytest.mark.integration
def test_spend_counts_when_the_site_dies_between_commit_and_release(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(run_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert not (run_dir / "released.json").exists()  # nothing was released
    settings = _settings(run_dir, eps=1.0)
    ledger = Ledger(settings.ledger_path)
    (entry,) = ledger.entries()
    assert (entry.run_id, entry.round) == ("run-a", 1) and ledger.verify_chain() == []
    spent = ledger.epsilon(delta=DELTA)
    assert 0.9 < spent <= 1.0  # the one planned round used the cap

    # The next projection counts the crashed round: a retry no longer fits the cap.
    head = head_state(make_head("linear", in_dim=6, num_classes=2, seed=0))
    with pytest.raises(BudgetExhausted) as info:
        train_round(settings, _req(run_dir, r=1, rounds=1), head)
    assert info.value.spent == pytest.approx(spent)
    assert info.value.projected > 1.0
    assert len(ledger.entries()) == 1

    # The audit sees a charge the server never received: conservative, a warning.
    lf = read_ledger(settings.ledger_path)
    site = audit_site("0", lf.entries, triggers=lf.triggers, run_id="run-a", cap=1.0,
                      summary_site={"status": "active", "history": []})
    assert {h.code: h.severity for h in site.hazards}["charged-not-released"] == "warning"
    assert not any(h.severity == "error" for h in site.hazards)


# -- refusals -----------------------------------------------------------------
def test_refusal_is_machine_readable_and_the_audit_confirms_the_cap(run_copy):
    """The server asks for a round beyond the plan; the site declines, and the
    numbers in its reason are exactly what the audit recomputes."""
    settings = _settings(run_copy, eps=2.0)
    head = head_state(make_head("linear", in_dim=6, num_classes=2, seed=0))
    before = Ledger(settings.ledger_path).entries()
    # A fresh run asking for a large, explicit budget-busting round (σ at the site's minimum).
    with pytest.raises(BudgetExhausted) as info:
        train_round(settings, _req(run_copy, run="run-b", r=1, rounds=1, sigma=0.3), head)
    m = re.fullmatch(r"budget exhausted: spent (\S+), cap (\S+), this round would reach (\S+) "
                     r"\(ε at δ=1e-05, unit: one record at this site\)", str(info.value))
    assert m, str(info.value)
    spent, cap, projected = map(float, m.groups())
    assert cap == 2.0 and projected > cap
    assert Ledger(settings.ledger_path).entries() == before  # nothing trained or recorded
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    assert site.cumulative[-1]["epsilon"] == pytest.approx(spent, abs=1e-4)
    assert site.epsilon["replace_one"] <= cap and "cap-exceeded" not in _codes(report)


# -- the HTML report in a real browser ----------------------------------------
CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="headless Chromium not installed at /usr/bin/chromium "
                           "(apt-get install -y chromium; .ci/run installs it)")
def test_report_renders_with_its_plots_in_headless_chromium(honest_run, tmp_path):
    from PIL import Image

    # Two runs: a DP run and a non-private baseline, for the privacy-utility plot.
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    s = json.loads((honest_run / "summary.json").read_text())
    s_nodp = {**s, "dp": False, "sites": {}, "privacy": {"dp": False},
              "final": {**s["final"], "accuracy": min(1.0, s["final"]["accuracy"] + 0.02)}}
    (baseline / "summary.json").write_text(json.dumps(s_nodp))
    out = tmp_path / "report"
    assert cli_main(["audit", str(honest_run), str(baseline), "--out", str(out)]) == 0
    # The same report with an empirical audit of the site's mechanism (synthetic
    # features, the run's σ and q), so the page shows its power too.
    from common.audit.empirical import audit_mechanism
    from common.audit.report import write_report

    report = audit([honest_run, baseline])
    rng = np.random.default_rng(0)
    mech = audit_mechanism(rng.normal(size=(200, 6)).astype(np.float32), rng.integers(0, 2, 200),
                           num_classes=2, noise_multiplier=1.0, sample_rate=0.2, steps=10,
                           clip_norm=1.0, delta=DELTA, m=200, seed=0)
    report.empirical.append({"run": str(honest_run), "site": "0", "records": 200, **mech})
    write_report(report, out)
    page = (out / "report.html").read_text()
    imgs = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    assert {"privacy-utility plot", "cumulative epsilon, run"} <= {alt for alt, _ in imgs}
    assert "one training record at one site" in page and "Trust model" in page
    # Both neighbour relations, the anchors matched, the empirical audit's power.
    assert "ε replace-one" in page and "ε add/rm PRV" in page and "<th>anchors</th>" in page
    assert "σ/4 claiming σ" in page and "power:" in page

    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1280,2000", (out / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape == (2000, 1280, 3)
    # Non-blank: many distinct colours, and the plot lines (saturated colours) are drawn.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 100).sum() > 2000
    # The page's embedded images are real PNGs.
    import base64

    for _, b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_html_without_plots_when_nothing_to_plot(tmp_path):
    Ledger(tmp_path / "empty/ledger.sqlite")
    report = audit([tmp_path / "empty/ledger.sqlite"])
    page = render_html(report)
    assert "<img" not in page and "PASS" in page
    assert replace(report, hazards=[]).has_errors is False


def _sql(path: Path, *statements: str) -> None:
    """Edit a ledger behind its triggers' back, as someone with the file can."""
    con = sqlite3.connect(path)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()


def test_an_impossible_sigma_is_a_named_error_not_a_crash(run_copy):
    """A ledger edited behind the triggers' back to σ = 0: the audit names the entry
    and exits 1 (it used to crash with exit 2)."""
    _sql(run_copy / "sites" / "site-0" / "ledger.sqlite", "DROP TRIGGER entries_no_update",
         "UPDATE entries SET noise_multiplier = 0 WHERE seq = 1")
    report = audit([run_copy])
    assert "impossible-mechanism" in _codes(report, "error")
    assert cli_main(["audit", str(run_copy), "--out", str(run_copy / "audit")]) == 1


def test_spend_missing_from_the_summary_is_an_error(run_copy):
    summary = json.loads((run_copy / "summary.json").read_text())
    summary["sites"] = {}  # the server dropped every reply and never listed the site
    (run_copy / "summary.json").write_text(json.dumps(summary))
    report = audit([run_copy])
    assert "site-not-in-summary" in _codes(report, "error")


# -- seeded lies: a ledger whose history was rewritten -----------------------
def _rewrite(path: Path, sql: str, *, key: bytes | None = None) -> None:
    """What someone with the file (but perhaps not the key) can do: drop the triggers,
    edit rows, and rebuild the chain with ``key`` (or unkeyed)."""
    from common.privacy.ledger import GENESIS, seal

    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("DROP TRIGGER entries_no_delete")
    con.execute(sql)
    rows = con.execute("SELECT seq FROM entries ORDER BY seq").fetchall()
    con.commit()
    con.close()
    entries = read_ledger(path).entries
    prev, con = GENESIS, sqlite3.connect(path)
    for e in entries:
        fixed = Entry(**{**dataclasses.asdict(e), "prev_hash": prev, "hash": ""})
        h = fixed.content_hash(key)
        con.execute("UPDATE entries SET prev_hash=?, hash=? WHERE seq=?", (prev, h, e.seq))
        prev = h
    if key is not None:
        con.execute("INSERT OR REPLACE INTO meta VALUES ('seal', ?)", (seal(key, len(rows), prev),))
    con.commit()
    con.close()


def _summary_epsilon_to_match(run_dir: Path) -> None:
    from common.privacy.accounting import epsilon as eps_of

    led = read_ledger(run_dir / "sites" / "site-0" / "ledger.sqlite")
    s = json.loads((run_dir / "summary.json").read_text())
    s["sites"]["0"]["epsilon"] = eps_of([e.mechanism for e in led.entries], delta=DELTA)
    for h, e in zip(s["sites"]["0"]["history"], led.entries, strict=True):
        h["noise_multiplier"] = e.noise_multiplier
    (run_dir / "summary.json").write_text(json.dumps(s))


def test_a_chain_rebuilt_without_the_key_fails(run_copy):
    path = run_copy / "sites" / "site-0" / "ledger.sqlite"
    _rewrite(path, "UPDATE entries SET noise_multiplier = noise_multiplier * 2")
    _summary_epsilon_to_match(run_copy)
    report = audit([run_copy])
    assert {"unkeyed-chain", "anchor-mismatch"} <= _codes(report, "error"), format_text(report)


def test_a_chain_rebuilt_with_a_new_key_is_caught_by_the_servers_anchors(run_copy):
    path = run_copy / "sites" / "site-0" / "ledger.sqlite"
    forged = os.urandom(32)
    (path.parent / "ledger.sqlite.key").write_bytes(forged)  # the forger's own key
    _rewrite(path, "UPDATE entries SET noise_multiplier = noise_multiplier * 2", key=forged)
    _summary_epsilon_to_match(run_copy)
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    assert site.chain == "keyed, verified"  # self-consistent under the forged key...
    assert "anchor-mismatch" in _codes(report, "error")  # ...but not what the site sent
    assert site.anchors_matched == 0


def test_deleting_the_newest_row_fails_even_for_a_ledger_audited_alone(run_copy):
    path = run_copy / "sites" / "site-0" / "ledger.sqlite"
    _sql(path, "DROP TRIGGER entries_no_delete",
         "DELETE FROM entries WHERE seq = (SELECT MAX(seq) FROM entries)")
    report = audit([path])  # the ledger file on its own: no summary, no anchors
    assert {"broken-hash-chain", "append-only-triggers-missing"} <= _codes(report, "error")
    assert any("seal" in h.message for h in report.all_hazards())
    assert cli_main(["audit", str(path), "--out", str(run_copy / "audit")]) == 1


def test_the_audit_checks_the_cap_the_site_enforced_not_the_servers(run_copy):
    """The run records say cap 4; the site's ledger recorded 2 at first use and a
    (seeded) lower cap in force. The site's cap is the one checked."""
    path = run_copy / "sites" / "site-0" / "ledger.sqlite"
    s = json.loads((run_copy / "summary.json").read_text())
    s["privacy"]["target_epsilon"] = 4.0
    (run_copy / "summary.json").write_text(json.dumps(s))
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    assert site.cap == 2.0 and "cap-differs-from-run-records" in _codes(report, "warning")
    con = sqlite3.connect(path)
    con.execute("INSERT INTO caps (epsilon, delta, created_at, reason) VALUES (1.0, ?, 0, 'x')",
                (DELTA,))
    con.commit()
    con.close()
    report = audit([run_copy])
    assert "cap-exceeded" in _codes(report, "error")

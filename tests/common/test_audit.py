"""The privacy audit: accountant vectors, real ledgers, hazards, units, the hazard
registry against the docs, HTML in a real browser. Tampering and failing closed:
``test_audit_tamper.py``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as cli_main
from client.settings import deployed_policy
from common.audit.checks import HAZARDS, Trust, cross_run_hazards
from common.audit.recompute import audit, audit_site, epsilon_three_ways, pld_epsilon
from common.audit.report import format_text, render_html
from common.audit.sources import discover, read_ledger, site_dir
from common.privacy.accounting import (
    LEDGER_ACCOUNTANT,
    UNITS_OF_PRIVACY,
    Mechanism,
    compress,
    epsilon,
    group_privacy,
)
from common.privacy.ledger import Entry, Ledger
from tests import sites
from tests.common.ledgers import DELTA, charge_run, ledger_path, make_run, sql, write_summary
from tests.conftest import REPO


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("audit") / "run"
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
            sampler="poisson", run="r", rnd=1, eps_after=None, unit="record", k=1) -> Entry:
    hist = [*ledger.history(), Mechanism(sigma, q, steps)]
    return ledger.append(Entry(
        run_id=run, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0,
        delta=delta, sampler=sampler, secure_rng=True, accountant="prv",
        accountant_version="opacus-1.6.0", libraries="{}", dataset_size=n,
        epsilon_after=epsilon(hist, delta=delta) if eps_after is None else eps_after,
        unit=unit, group_size=k))


def _edit_summary(run_dir: Path, edit) -> None:
    s = json.loads((run_dir / "summary.json").read_text())
    edit(s)
    (run_dir / "summary.json").write_text(json.dumps(s))


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
    text = format_text(report)
    assert "site 0 released: arrays=head (DP-SGD) [dp], site-id=0 [public]" in text
    assert re.search(r"epsilon=\d\.\d{4} \[public, per record\]", text)
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
    _edit_summary(run_copy, edit)
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
    ledger = ledger_path(honest_run)
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    report = audit([honest_run])
    (run,) = report.runs
    (site,) = run.sites
    summary = json.loads((honest_run / "summary.json").read_text())
    assert not report.has_errors, format_text(report)
    assert site.rounds == 3 and site.total_steps == sum(
        h["steps"] for h in summary["sites"]["0"]["history"])
    assert site.cap == 4.0 and site.delta == DELTA and site.dataset_size == 80
    # The reported relation (replace-one, PLD at the sites' interval) recomputes exactly;
    # the audit's finer interval agrees within PLD's discretisation.
    assert site.cumulative[-1]["epsilon"] == pytest.approx(summary["sites"]["0"]["epsilon"],
                                                          rel=1e-9)
    assert site.epsilon["replace_one"] == pytest.approx(summary["sites"]["0"]["epsilon"],
                                                        abs=0.01)
    assert abs(site.epsilon["pld"] - site.epsilon["prv"]) < 0.05  # add/remove, two ways
    assert site.epsilon["rdp"] > site.epsilon["prv"]
    assert site.epsilon["prv"] < site.epsilon["replace_one"] <= 4.0
    assert [p["round"] for p in site.cumulative] == [1, 2, 3]
    # Verified with the registered public key only; every reply's anchor matched.
    assert site.chain == "signed, verified" and site.anchors_matched == 3
    assert site.anchored == 3 and site.unanchored == 0
    assert site.key_source == str(site_dir(honest_run, "0") / "ledger.pub")
    assert not (honest_run / "sites/site-0/ledger.sqlite.key").read_bytes() == b""
    assert {"secure-rng-off", "not-charged"} <= _codes(report, "warning")
    text = format_text(report)
    assert "one training record at one site" in text and "trust model" in text
    assert "signatures:" in text and not text.startswith("ACCEPTED")
    # Reading is read-only: the evidence is untouched.
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before

    out = tmp_path / "out"
    assert cli_main(["audit", str(honest_run), "--out", str(out)]) == 0
    assert (out / "report.html").is_file()
    data = json.loads((out / "audit.json").read_text())
    assert data["has_errors"] is False and data["accepted"] == {}
    assert data["unit_of_privacy"].startswith("one training record at one site")


def test_the_audit_never_reads_a_private_key(honest_run, tmp_path):
    """Verifying needs the public key only: with every private key gone the audit
    still verifies the run."""
    run = tmp_path / "run"
    shutil.copytree(honest_run, run)
    for p in run.rglob("*.key"):
        p.unlink()
    report = audit([run])
    assert not report.has_errors and report.runs[0].sites[0].chain == "signed, verified"


def test_cli_json_is_machine_readable(honest_run, tmp_path, capsys):
    assert cli_main(["audit", str(honest_run), "--json", "--out", str(tmp_path / "o")]) == 0
    data = json.loads(capsys.readouterr().out)
    site = data["runs"][0]["sites"][0]
    assert set(site["epsilon"]) == {"replace_one", "prv", "pld", "rdp"}
    assert site["unit"] == "record" and site["unit_of_privacy"] == UNITS_OF_PRIVACY["record"]
    assert data["counts"]["error"] == 0


# -- inconsistencies are errors ------------------------------------------------
def test_under_reported_epsilon_is_an_error(run_copy):
    s = json.loads((run_copy / "summary.json").read_text())
    true_eps = s["sites"]["0"]["epsilon"]
    _edit_summary(run_copy, lambda s: s["sites"]["0"].update(epsilon=true_eps - 0.005))
    assert "reported-epsilon-too-low" not in _codes(audit([run_copy]))  # within the error
    _edit_summary(run_copy, lambda s: s["sites"]["0"].update(epsilon=true_eps - 0.1))
    assert "reported-epsilon-too-low" in _codes(audit([run_copy]), "error")


def test_summary_history_disagreeing_with_ledger_is_an_error(run_copy):
    def edit(s):
        h = s["sites"]["0"]["history"]
        h[1]["steps"] += 1
        h.append({**h[2], "round": 4, "ledger_entries": 0})
    _edit_summary(run_copy, edit)
    report = audit([run_copy])
    msgs = [h.message for h in report.all_hazards() if h.code == "ledger-summary-mismatch"]
    assert len(msgs) == 1 and "round 2" in msgs[0] and "steps" in msgs[0]
    assert "update-without-ledger-entry" in _codes(report, "error")


def test_the_unit_the_run_records_state_must_be_the_ledgers(run_copy):
    _edit_summary(run_copy, lambda s: s["sites"]["0"]["history"][0].update(
        privacy_unit="patient"))
    report = audit([run_copy])
    (msg,) = [h.message for h in report.all_hazards() if h.code == "ledger-summary-mismatch"]
    assert "unit 'patient' reported vs ['record']" in msg


def test_mechanism_hazards(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    _append(led, sampler="shuffle", delta=1e-3, n=500)  # δ > 0.1/N: a warning
    e2 = _append(led, eps_after=0.01)  # stored ε far below the truth
    lf = read_ledger(led.path)
    site = audit_site("x", lf.entries, cap=0.5, delta=1e-3)
    codes = {h.code: h.severity for h in site.hazards}
    assert codes["non-poisson-sampling"] == "error"
    assert codes["stored-epsilon-too-low"] == "error"
    assert codes["cap-exceeded"] == "error"
    assert codes["add-remove-with-public-count"] == "error"
    assert codes["delta-not-small"] == "warning"
    assert codes["delta-varies"] == "warning"
    assert "secure-rng-off" not in codes
    assert any(f"entry {e2.seq}" in h.message for h in site.hazards)
    big = audit_site("y", lf.entries, delta=0.01)
    assert {h.code: h.severity for h in big.hazards}["delta-too-large"] == "error"


def test_a_sigma_too_small_to_account_is_named_not_computed(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    _append(led, sigma=0.25, eps_after=100.0)
    lf = read_ledger(led.path)
    site = audit_site("x", [replace(lf.entries[0], noise_multiplier=0.01)], cap=4.0)
    assert {h.code for h in site.hazards} >= {"epsilon-not-computed"}
    assert site.epsilon == {}


def test_hyperparameters_tuned_on_private_data_is_flagged(run_copy):
    report = audit([run_copy])
    assert "hyperparameters-tuned-on-private-data" not in _codes(report)
    assert any("not tuned on the sites' private records" in a for a in report.assumptions)
    _edit_summary(run_copy, lambda s: s["privacy"].update(
        hyperparameters="tuned on private site holdouts"))
    assert "hyperparameters-tuned-on-private-data" in _codes(audit([run_copy]), "error")
    for source, present in (("public", False), ("unspecified", True)):
        _edit_summary(run_copy, lambda s, v=source: s["privacy"].update(hyperparameters=v))
        codes = _codes(audit([run_copy]))
        assert ("hyperparameter-source-unspecified" in codes) is present
        assert "hyperparameters-tuned-on-private-data" not in codes


def test_same_data_in_separate_older_ledgers_is_composed_and_new_entries_say_nothing():
    base = dict(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50,
                clip_norm=1.0, delta=DELTA, sampler="poisson", secure_rng=True,
                accountant=LEDGER_ACCOUNTANT, accountant_version="x", libraries="{}",
                dataset_size=1000, epsilon_after=1.0)
    old = lambda fp: Entry(**base, data_fingerprint=fp)  # noqa: E731 - older ledgers' rows
    hz = cross_run_hazards({"a": [old("fp-a")], "b": [old("fp-a"), old("other")]})
    assert len(hz) == 1 and hz[0].code == "same-data-separate-ledgers"
    assert f"ε={epsilon([Mechanism(1.0, 0.1, 100)], delta=DELTA):.3f}" in hz[0].message
    # New entries hold no data hash: nothing to group (the site keeps its fingerprint).
    assert cross_run_hazards({"a": [old("")], "b": [old("")]}) == []


def test_discover_finds_runs_loose_ledgers_and_exports(honest_run, tmp_path):
    from common.privacy.ledger import canonical_json, export_ledger

    root = tmp_path / "tree"
    shutil.copytree(honest_run, root / "runs/one")
    Ledger(root / "elsewhere/site-7/ledger.sqlite")
    export = root / "delivered/site-9/ledger.json"
    export.parent.mkdir(parents=True)
    export.write_bytes(canonical_json(export_ledger(ledger_path(root / "runs/one"))))
    (root / "notes.sqlite").write_bytes(b"")  # not a ledger: ignored when searching
    sources = discover([root])
    assert [s.summary is not None for s in sources] == [True, False]
    assert sorted(sources[1].ledgers) == ["7", "9"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([tmp_path / "missing"])
    # A file named on the command line is audited whatever it holds: no crash, an error.
    report = audit([root / "notes.sqlite"])
    assert "ledger-unreadable" in _codes(report, "error")


def test_a_charge_the_server_never_recorded_is_conservative_once_a_seal_covers_it(
        run_copy, tmp_path):
    """A site that commits a round and dies before its reply leaves: the run records
    never list it. Counting it is conservative (a warning), but nobody else vouches
    for the row until the site hands the auditor a fresh seal."""
    ledger = Ledger(ledger_path(run_copy))
    charge_run(ledger, run_id="run-a", rounds=1, first_round=4, cap=8.0)
    report = audit([run_copy])
    assert {h.code: h.severity for h in report.all_hazards()}["charged-not-released"] == "warning"
    assert "unanchored-entries" in _codes(report, "error")
    seal = tmp_path / "seal.json"
    assert cli_main(["site", "seal", "--ledger", str(ledger.path), "--out", str(seal)]) == 0
    report = audit([run_copy], trust=Trust(seals=(seal,)))
    assert "charged-not-released" in _codes(report, "warning")
    assert not report.has_errors, format_text(report)
    assert report.runs[0].sites[0].seals_matched == 1


def test_the_audit_checks_the_cap_the_site_enforced_not_the_servers(run_copy):
    """The run records say cap 8; the site's ledger recorded 4 at first use and a
    (seeded) lower cap in force. The site's cap is the one checked."""
    _edit_summary(run_copy, lambda s: s["privacy"].update(target_epsilon=8.0))
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    assert site.cap == 4.0 and "cap-differs-from-run-records" in _codes(report, "warning")
    sql(ledger_path(run_copy),
        "INSERT INTO caps (epsilon, delta, created_at, reason) VALUES (1.0, 1e-5, 0, 'x')")
    assert "cap-exceeded" in _codes(audit([run_copy]), "error")


def test_an_impossible_sigma_is_a_named_error_not_a_crash(run_copy):
    sql(ledger_path(run_copy), "DROP TRIGGER entries_no_update",
        "UPDATE entries SET noise_multiplier = 0 WHERE seq = 1")
    report = audit([run_copy])
    assert "impossible-mechanism" in _codes(report, "error")
    assert cli_main(["audit", str(run_copy), "--out", str(run_copy / "audit")]) == 1


def test_spend_missing_from_the_summary_is_an_error(run_copy):
    _edit_summary(run_copy, lambda s: s.update(sites={}))
    assert "site-not-in-summary" in _codes(audit([run_copy]), "error")


def test_a_site_with_no_ledger_is_missing_never_truncated(run_copy):
    """Issue 27 item 3: an absent ledger is ledger-missing, not ledger-truncated."""
    ledger_path(run_copy).unlink()
    report = audit([run_copy])
    codes = _codes(report, "error")
    assert "ledger-missing" in codes and "ledger-truncated" not in codes
    assert report.runs[0].sites[0].chain == "missing"


def _update_summary(run: Path, **changes) -> None:
    doc = json.loads((run / "summary.json").read_text())
    doc.update(changes)
    (run / "summary.json").write_text(json.dumps(doc))


def test_a_deployed_run_without_the_public_record_check_is_flagged(run_copy):
    """Issue 27 item 4: a deployed run that published no digests of its public and test
    records is flagged; one that did, or a simulation (its sites are partitions of the
    training split by construction), is not."""
    handshake = {"declaration": "d" * 64, "public_check": "", "sites": {}}
    _update_summary(run_copy, runtime="simulation", handshake=handshake)
    assert "public-records-unchecked" not in _codes(audit([run_copy]), "warning")
    _update_summary(run_copy, runtime="deployment")
    assert "public-records-unchecked" in _codes(audit([run_copy]), "warning")
    _update_summary(run_copy, handshake={**handshake, "public_check": "ab" * 32})
    assert "public-records-unchecked" not in _codes(audit([run_copy]), "warning")


# -- units of privacy (issue 26) ------------------------------------------------------
def test_a_record_level_site_with_k_records_per_patient_shows_the_patient_epsilon(tmp_path):
    run = tmp_path / "run"
    make_run(run, group_size=5, rounds=2)
    report = audit([run])
    assert not report.has_errors, format_text(report)
    (site,) = report.runs[0].sites
    eps = site.epsilon["replace_one"]
    e5, d5 = group_privacy(eps, DELTA, 5)
    assert site.unit == "record" and site.group_size == 5
    assert site.group_privacy == {"k": 5, "epsilon": pytest.approx(e5), "delta": pytest.approx(d5)}
    text = format_text(report)
    assert f"site 0: ε = {eps:.3f} per record" in text
    assert f"a patient with up to 5 records at this site: ε = {e5:.3f}" in text
    assert f"{e5:.3f} (k=5)" in text  # the table's ε-per-patient column
    page = render_html(report)
    assert f"a patient with up to 5 records at this site: ε = {e5:.3f}" in page
    assert "<th>unit</th>" in page and "<th>ε per patient</th>" in page
    data = report.to_dict()["runs"][0]["sites"][0]
    assert data["unit"] == "record" and data["group_privacy"]["k"] == 5


def test_a_patient_level_site_states_its_unit_everywhere(tmp_path):
    run = tmp_path / "run"
    make_run(run, unit="patient", rounds=2)
    report = audit([run])
    assert not report.has_errors, format_text(report)
    (site,) = report.runs[0].sites
    assert site.unit == "patient" and site.group_privacy is None
    assert report.unit_of_privacy == UNITS_OF_PRIVACY["patient"]
    text = format_text(report)
    assert f"ε = {site.epsilon['replace_one']:.3f} per patient" in text
    assert "[public, per patient]" in text
    assert all(p["unit"] == "patient" for p in site.cumulative)
    assert "per patient)</th>" in render_html(report)


def test_a_ledger_that_mixes_units_is_refused(tmp_path):
    led = Ledger(tmp_path / "site-0" / "ledger.sqlite")
    _append(led, unit="record")
    _append(led, unit="patient", rnd=2)
    report = audit([led.path], trust=Trust(accept_unverified=True, accept_unanchored=True))
    assert "mixed-units" in _codes(report, "error")
    assert report.runs[0].sites[0].unit == "mixed"


def test_sites_with_different_units_share_a_report_each_with_its_own(tmp_path):
    run = tmp_path / "run"
    rows = {}
    for sid, unit in (("0", "record"), ("1", "patient")):
        from common.audit.sources import register_public_key

        led = Ledger(site_dir(run, sid) / "ledger.sqlite")
        rows[sid] = charge_run(led, run_id="run-a", rounds=1, unit=unit)
        register_public_key(run, sid, led.public_key())
    write_summary(run, rows)
    report = audit([run])
    assert not report.has_errors, format_text(report)
    assert [s.unit for s in report.runs[0].sites] == ["record", "patient"]
    assert report.unit_of_privacy.startswith("per site")


# -- the site's side: spend before release, and refusals (through the real site) --------
def _node(run_dir: Path, *, eps: float = 4.0, n: int = 96, seed: int = 0) -> dict:
    """A deployed site (a CSV of 96 records beside the run) whose ledger is the run's."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 6)) * 0.3 + y[:, None]
    return sites.csv_site(run_dir.parent / "site-data", x, y, **{
        "ledger-path": str(run_dir / "sites" / "site-0" / "ledger.sqlite"),
        "cache-dir": str(run_dir.parent / "cache"), "target-epsilon": eps,
        "target-delta": DELTA, "holdout": 1 / 6})


def _settings(run_dir: Path, *, eps: float = 4.0):
    return deployed_policy(_node(run_dir, eps=eps))


def _req(run_dir: Path, run: str = "run-a", r: int = 1, rounds: int = 2, sigma: float = 0.0):
    return sites.request(_node(run_dir), run_id=run, server_round=r, num_rounds=rounds,
                         noise_multiplier=sigma)


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
    from client.budget import BudgetExhausted
    from client.round import train_round
    from common.models.heads import head_state, make_head

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

    # The audit sees a charge the server never received: conservative, a warning (and,
    # run in full, an unanchored row until the site gives the auditor a fresh seal).
    lf = read_ledger(settings.ledger_path)
    site = audit_site("0", lf.entries, run_id="run-a", cap=1.0,
                      summary_site={"status": "active", "history": []})
    assert {h.code: h.severity for h in site.hazards}["charged-not-released"] == "warning"
    assert not any(h.severity == "error" for h in site.hazards)


def test_refusal_is_machine_readable_and_the_audit_confirms_the_cap(run_copy):
    """The server asks for a round beyond the plan; the site declines, and the
    numbers in its reason are exactly what the audit recomputes."""
    from client.budget import BudgetExhausted
    from client.round import train_round
    from common.models.heads import head_state, make_head

    settings = _settings(run_copy, eps=4.0)
    head = head_state(make_head("linear", in_dim=6, num_classes=2, seed=0))
    before = Ledger(settings.ledger_path).entries()
    # A fresh run asking for a large, explicit budget-busting round (σ at the site's minimum).
    with pytest.raises(BudgetExhausted) as info:
        train_round(settings, _req(run_copy, run="run-b", r=1, rounds=1, sigma=0.3), head)
    m = re.fullmatch(r"budget exhausted: spent (\S+), cap (\S+), this round would reach (\S+) "
                     r"\(ε at δ=1e-05, unit: one record at this site\)", str(info.value))
    assert m, str(info.value)
    spent, cap, projected = map(float, m.groups())
    assert cap == 4.0 and projected > cap
    assert Ledger(settings.ledger_path).entries() == before  # nothing trained or recorded
    report = audit([run_copy])
    (site,) = report.runs[0].sites
    assert site.cumulative[-1]["epsilon"] == pytest.approx(spent, abs=1e-4)
    assert site.epsilon["replace_one"] <= cap and "cap-exceeded" not in _codes(report)
    assert not report.has_errors, format_text(report)


# -- the registry of hazard codes ---------------------------------------------------------
def _documented() -> dict[str, tuple[str, str]]:
    """docs/privacy.md's table of hazard codes: code -> (severity, accepted by)."""
    text = (REPO / "docs" / "privacy.md").read_text().split("### Hazard codes", 1)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    rows = {}
    for line in table[2:]:  # past the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[0].strip("`") not in rows, f"{cells[0]} documented twice"
        rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"))
    return rows


def test_every_hazard_code_is_registered_once_and_documented():
    documented = _documented()
    registered = {c.code: (c.severity, f"--accept-{c.accept}" if c.accept else "")
                  for c in HAZARDS.values()}
    assert documented == registered
    # Every code the audit's source can emit is registered (hazard() refuses others).
    used = set()
    for path in (REPO / "common" / "audit").glob("*.py"):
        used |= set(re.findall(r'hazard\(\s*"([a-z-]+)"', path.read_text()))
        used |= set(re.findall(r'\[\("([a-z-]+)", str\(exc\)\)\]', path.read_text()))
    # The backbone selection's problems come as (code, message) from its own module.
    transfer = (REPO / "common" / "models" / "transfer.py").read_text()
    used |= set(re.findall(r'\("([a-z-]+)", problem\)', transfer))
    assert used <= set(HAZARDS), used - set(HAZARDS)
    assert set(HAZARDS) == used, set(HAZARDS) - used  # no registered code is dead


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
    # features, the run's σ and q), so the page shows its power too; and a run the
    # auditor accepted unanchored, so the page shows its banner.
    from common.audit.empirical import audit_mechanism
    from common.audit.report import write_report

    unanchored = tmp_path / "later"
    shutil.copytree(honest_run, unanchored)
    charge_run(Ledger(ledger_path(unanchored)), run_id="run-b", rounds=1, cap=8.0)
    report = audit([honest_run, baseline, unanchored], trust=Trust(accept_unanchored=True))
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
    assert "<b>Signatures.</b>" in page
    assert "<div class='banner'>ACCEPTED WITHOUT VERIFICATION (--accept-unanchored)" in page
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

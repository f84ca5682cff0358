"""The audit fails closed: the attacks of issue 23 (item 4), reproduced as an auditor
meets them, against real ledgers written by the real ``Ledger`` (and one real
simulated run), and the classes they belong to (any field of any row, any deletion,
any bytes) generated with Hypothesis.

On main before signed ledgers each named attack passed the audit (exit 0): the
σ × 4 rewrite that keeps every stored hash, rows after the last anchor deleted or
edited, an auditor holding the HMAC key rewriting history, a chain re-signed by
another key.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from cli.main import main as cli_main
from common.audit.checks import HAZARDS, Trust, ledger_integrity
from common.audit.recompute import audit
from common.audit.report import format_text, render_html
from common.audit.sources import (
    find_public_key,
    read_ledger,
    recorded_anchors,
    register_public_key,
    site_dir,
)
from common.privacy.ledger import (
    GENESIS,
    Entry,
    Ledger,
    canonical_json,
    coerce_entry,
    ensure_key_pair,
    export_ledger,
    legacy_seal,
    load_signing_key,
    sign_anchor,
)
from tests.common.ledgers import (
    LEGACY_SECRET,
    charge_run,
    ledger_path,
    legacy_ledger,
    make_run,
    rechain,
    resign_anchors,
    sql,
    summary_to_match,
    write_summary,
)

STRICT = Trust()
ACCEPT_ALL = Trust(accept_unverified=True, accept_unanchored=True)


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tamper") / "run"
    make_run(run_dir, rounds=3, cap=4.0)
    return run_dir


@pytest.fixture
def run(honest, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(honest, dst)
    return dst


def _codes(report, severity: str | None = "error") -> set[str]:
    return {h.code for h in report.all_hazards() if severity in (None, h.severity)}


def _cli(*args) -> int:
    return cli_main(["audit", *map(str, args)])


def _site_key(run_dir: Path):
    return load_signing_key(ledger_path(run_dir).with_name("ledger.sqlite.key"))


def _times_four(path: Path) -> None:
    sql(path, "DROP TRIGGER entries_no_update",
        "UPDATE entries SET noise_multiplier = noise_multiplier * 4")


# -- issue 23, item 4: each attack, as the auditor meets it --------------------------
def test_sigma_times_four_keeping_the_stored_hashes_fails(run, tmp_path, capsys):
    """σ × 4 in every row, stored hash strings left as they were, summary.json edited
    to match: main's audit passed this (ε 3.9986 shown as 0.8537) when the key was
    kept elsewhere. Now the chain's plain SHA-256 no longer matches the rows."""
    honest_eps = audit([run]).runs[0].sites[0].epsilon["replace_one"]
    for key in run.rglob("*.key"):
        key.rename(tmp_path / key.name)  # the site keeps its key elsewhere: irrelevant now
    _times_four(ledger_path(run))
    summary_to_match(run)
    report = audit([run])
    # The stored hashes (and so the seal and the anchors over them) are the honest
    # ones; the rows are not what they hash to, which anyone can recompute.
    assert "broken-hash-chain" in _codes(report)
    assert report.runs[0].sites[0].epsilon["replace_one"] < honest_eps / 3  # what it claims
    capsys.readouterr()
    assert _cli(run, "--out", tmp_path / "o") == 1
    assert "broken-hash-chain" in capsys.readouterr().out
    # Even the auditor who accepts everything unverifiable is not fooled.
    assert _cli(run, "--out", tmp_path / "o", "--accept-unverified",
                "--accept-unanchored") == 1


@pytest.mark.parametrize("who", ["nobody", "another key", "the site's own key"])
def test_sigma_times_four_with_the_chain_rebuilt_fails(run, tmp_path, who):
    """The same rewrite with the chain rebuilt (anyone can: it is plain SHA-256), then
    the seal left stale, re-signed by another key, or re-signed by the site itself.
    The registered key and the coordinator's anchors catch each one."""
    key = {"nobody": None, "another key": Ed25519PrivateKey.generate(),
           "the site's own key": _site_key(run)}[who]
    _times_four(ledger_path(run))
    rechain(ledger_path(run), resign_with=key)
    summary_to_match(run)
    report = audit([run])
    expected = {"nobody": {"seal-mismatch", "anchor-mismatch"},
                "another key": {"key-mismatch", "anchor-mismatch"},
                "the site's own key": {"anchor-mismatch"}}[who]
    assert expected <= _codes(report), format_text(report)
    assert "broken-hash-chain" not in _codes(report)  # the chain itself is consistent
    assert report.runs[0].sites[0].anchors_matched == 0
    assert _cli(run, "--out", tmp_path / "o", "--accept-unverified",
                "--accept-unanchored") == 1


def test_a_site_and_coordinator_rewriting_together_pass_unless_a_third_party_kept_a_seal(
        run, tmp_path):
    """What no audit catches (docs/privacy.md): the site re-signs its rewritten ledger
    and the coordinator replaces its recorded anchors with ones the site signs over the
    new rows. A seal a third party took before the rewrite catches it."""
    ledger = Ledger(ledger_path(run))
    before = ledger.seal()
    seal = tmp_path / "before.json"
    seal.write_text(json.dumps(before.to_dict()))
    _times_four(ledger_path(run))
    rechain(ledger_path(run), resign_with=_site_key(run))
    summary_to_match(run)
    resign_anchors(run / "summary.json", "0", _site_key(run))
    assert not audit([run]).has_errors  # the documented limit
    report = audit([run], trust=Trust(seals=(seal,)))
    assert "anchor-mismatch" in _codes(report), format_text(report)


def _later_run(run_dir: Path) -> Path:
    """Run A's directory while the site's ledger went on to run B (cap raised by its
    operator): the rows of run B are newer than every anchor in run A's records."""
    ledger = Ledger(ledger_path(run_dir))
    ledger.record_cap(epsilon=8.0, delta=1e-5, reason="board approval")
    charge_run(ledger, run_id="run-b", rounds=3, cap=8.0)
    return ledger.path


def test_rows_newer_than_the_last_anchor_are_unanchored_until_a_seal_covers_them(run, tmp_path):
    path = _later_run(run)
    report = audit([run])
    (site,) = report.runs[0].sites
    assert "unanchored-entries" in _codes(report) and (site.anchored, site.unanchored) == (3, 3)
    assert _cli(run, "--out", tmp_path / "o") == 1
    # Accepted explicitly: a warning, and a banner that says so.
    accepted = audit([run], trust=Trust(accept_unanchored=True))
    assert not accepted.has_errors
    (h,) = [h for h in accepted.all_hazards() if h.code == "unanchored-entries"]
    assert h.severity == "warning" and h.accepted == "--accept-unanchored"
    text = format_text(accepted)
    assert text.startswith("ACCEPTED WITHOUT VERIFICATION (--accept-unanchored): 1 finding(s)")
    assert "ACCEPTED WITHOUT VERIFICATION (--accept-unanchored)" in render_html(accepted)
    assert _cli(run, "--out", tmp_path / "o", "--accept-unanchored") == 0
    # A fresh seal from the site covers them: nothing left to accept.
    seal = tmp_path / "seal.json"
    assert cli_main(["site", "seal", "--ledger", str(path), "--out", str(seal)]) == 0
    assert _cli(run, "--out", tmp_path / "o", "--seal", seal) == 0


@pytest.mark.parametrize("edit", ["delete", "edit"])
def test_rows_after_the_last_anchor_deleted_or_edited_fail(run, tmp_path, edit):
    """Main passed both with summary.json untouched. Without the site's key the
    ledger's own seal catches them; the site itself, re-signing, is caught by the
    seal the auditor took after run B, or its rows stay unanchored."""
    path = _later_run(run)
    seal = tmp_path / "after-b.json"
    seal.write_text(json.dumps(Ledger(path).seal().to_dict()))
    change = ("DELETE FROM entries WHERE seq > 3" if edit == "delete"
              else "UPDATE entries SET noise_multiplier = noise_multiplier * 4 WHERE seq > 3")
    sql(path, "DROP TRIGGER entries_no_delete", "DROP TRIGGER entries_no_update", change)
    codes = _codes(audit([run], trust=Trust(accept_unanchored=True)))
    assert ("seal-mismatch" if edit == "delete" else "broken-hash-chain") in codes
    rechain(path, resign_with=_site_key(run))  # the site itself covers its tracks
    report = audit([run], trust=Trust(seals=(seal,)))
    assert ("ledger-truncated" if edit == "delete" else "anchor-mismatch") in _codes(report)
    if edit == "edit":  # without a later seal, its rewritten rows are still unanchored
        assert "unanchored-entries" in _codes(audit([run]))


def test_an_auditor_holding_the_hmac_key_rewrites_a_legacy_chain_and_it_counts_for_nothing(
        tmp_path):
    """With the older, keyed chain whoever verifies can forge: rewrite σ × 4, re-HMAC
    the chain and its seal, edit the (unsigned) anchors to match. Every HMAC checks,
    so the audit never counts a legacy chain as verified."""
    run = tmp_path / "run"
    path = legacy_ledger(ledger_path(run), "hmac")
    entries = read_ledger(path).entries
    rows = [{"round": e.round, "run_id": e.run_id, "noise_multiplier": e.noise_multiplier,
             "sample_rate": e.sample_rate, "steps": e.steps, "num_examples": e.dataset_size,
             "epsilon_after": e.epsilon_after, "ledger_entries": e.seq, "ledger_head": e.hash}
            for e in entries]
    write_summary(run, {"0": rows}, run_id="legacy-run", cap=8.0)
    honest = audit([run], trust=Trust(legacy_keys=(_secret(tmp_path),)))
    assert {"legacy-chain", "anchor-unsigned"} <= _codes(honest)
    assert "broken-hash-chain" not in _codes(honest)
    # Accepted explicitly, the honest legacy run passes, with the banner.
    ok = audit([run], trust=Trust(legacy_keys=(_secret(tmp_path),), accept_unverified=True,
                                  accept_unanchored=True))
    assert not ok.has_errors, format_text(ok)
    assert "ACCEPTED WITHOUT VERIFICATION (--accept-unverified)" in format_text(ok)

    # The forger with the key.
    sql(path, "DROP TRIGGER entries_no_update", "UPDATE entries SET noise_multiplier = 4.8")
    prev, con = GENESIS, sqlite3.connect(path)
    for e in read_ledger(path).entries:
        h = replace(e, prev_hash=prev).legacy_hash(LEGACY_SECRET)
        con.execute("UPDATE entries SET prev_hash=?, hash=? WHERE seq=?", (prev, h, e.seq))
        prev = h
    con.execute("INSERT OR REPLACE INTO meta VALUES ('seal', ?)",
                (legacy_seal(LEGACY_SECRET, len(entries), prev),))
    con.commit()
    con.close()
    forged = read_ledger(path).entries
    s = json.loads((run / "summary.json").read_text())
    for h, e in zip(s["sites"]["0"]["history"], forged, strict=True):
        h.update(ledger_head=e.hash, noise_multiplier=e.noise_multiplier)
    (run / "summary.json").write_text(json.dumps(s))
    report = audit([run], trust=Trust(legacy_keys=(_secret(tmp_path),)))
    assert "broken-hash-chain" not in _codes(report)  # every HMAC checks...
    assert {"legacy-chain", "anchor-unsigned"} <= _codes(report)  # ...and counts for nothing
    (h,) = [h for h in report.all_hazards() if h.code == "legacy-chain"]
    assert "also lets its holder forge" in h.message
    assert _cli(run, "--out", tmp_path / "o", "--legacy-key", _secret(tmp_path)) == 1


def _secret(tmp_path: Path) -> Path:
    p = tmp_path / "legacy.secret"
    p.write_bytes(LEGACY_SECRET)
    return p


def test_a_legacy_row_edited_without_the_key_is_caught_with_it(tmp_path):
    path = legacy_ledger(tmp_path / "site-0" / "ledger.sqlite", "hmac")
    sql(path, "DROP TRIGGER entries_no_update", "UPDATE entries SET noise_multiplier = 4.8")
    without = audit([path])
    assert "broken-hash-chain" not in _codes(without) and "legacy-chain" in _codes(without)
    with_key = audit([path], trust=Trust(legacy_keys=(_secret(tmp_path),)))
    assert "broken-hash-chain" in _codes(with_key)


# -- keys: verifying needs the registered public key -----------------------------------------
def test_no_registered_key_fails_closed(run, tmp_path):
    (site_dir(run, "0") / "ledger.pub").unlink()
    report = audit([run])
    assert _codes(report) == {"public-key-missing"}  # all it can say: nothing verifies
    assert report.runs[0].sites[0].chain == "signed, unverified"
    # Accepted: checked with the key the ledger declares, so others' edits still show.
    accepted = audit([run], trust=Trust(accept_unverified=True))
    assert not accepted.has_errors and "--accept-unverified" in format_text(accepted)
    _times_four(ledger_path(run))
    assert "broken-hash-chain" in _codes(audit([run], trust=ACCEPT_ALL))


def test_keys_from_deploy_certs_verify_and_a_run_directory_key_that_differs_is_caught(
        run, tmp_path):
    keys = tmp_path / "keys"
    assert cli_main(["deploy", "certs", "--out", str(keys), "--sites", "1"]) == 0
    site = Ledger(tmp_path / "site" / "ledger.sqlite", keys / "site-0" / "ledger.key")
    rows = charge_run(site, run_id="run-a", rounds=2)
    run2 = tmp_path / "deployed"
    write_summary(run2, {"0": rows})
    export = site_dir(run2, "0") / "ledger.json"  # what the site delivered
    export.parent.mkdir(parents=True)
    export.write_bytes(canonical_json(export_ledger(site.path, site.key_path)))
    assert _codes(audit([run2])) == {"public-key-missing"}  # nothing registered in the run
    report = audit([run2], trust=Trust(public_keys=(keys,)))
    assert not report.has_errors, format_text(report)
    assert report.runs[0].sites[0].key_source == str(keys / "site-0" / "ledger.key.pub")
    # The coordinator's copy in the run directory disagrees with the auditor's.
    register_public_key(run2, "0", ensure_key_pair(tmp_path / "other.key"))
    assert "key-mismatch" in _codes(audit([run2], trust=Trust(public_keys=(keys,))))


def test_an_anchor_whose_signature_or_fields_were_changed_fails(run):
    s = json.loads((run / "summary.json").read_text())
    s["sites"]["0"]["history"][0]["ledger_signature"] = "00" * 64
    s["sites"]["0"]["history"][1]["ledger_entries"] = 1  # the signature no longer covers it
    (run / "summary.json").write_text(json.dumps(s))
    report = audit([run])
    msgs = [h.message for h in report.all_hazards() if h.code == "signature-invalid"]
    assert len(msgs) == 2 and all("does not verify" in m for m in msgs)


def test_unsigned_anchors_are_the_coordinators_word_only(run):
    s = json.loads((run / "summary.json").read_text())
    for h in s["sites"]["0"]["history"]:
        for k in ("ledger_signature", "ledger_key_id", "ledger_id"):
            h.pop(k)
    (run / "summary.json").write_text(json.dumps(s))
    report = audit([run])
    assert _codes(report) == {"anchor-unsigned", "unanchored-entries"}
    assert not audit([run], trust=ACCEPT_ALL).has_errors


def test_anchors_with_the_signature_only_verify_against_the_ledgers_id(run):
    """The wire may carry the signature without the ledger id and key id: the audit
    fills both in from the ledger and the registered key."""
    s = json.loads((run / "summary.json").read_text())
    for h in s["sites"]["0"]["history"]:
        h.pop("ledger_key_id")
        h.pop("ledger_id")
    (run / "summary.json").write_text(json.dumps(s))
    report = audit([run])
    assert not report.has_errors and report.runs[0].sites[0].anchored == 3


def test_a_ledger_replaced_by_a_new_file_fails_its_anchors(run):
    """The site's rows copied into a fresh ledger (a new id) signed by the site: the
    anchors name the old ledger."""
    old = read_ledger(ledger_path(run))
    ledger_path(run).unlink()
    fresh = Ledger(ledger_path(run))
    for e in old.entries:
        fresh.append(replace(e, seq=0, hash="", prev_hash=GENESIS))
    report = audit([run])
    assert "anchor-mismatch" in _codes(report)
    assert any("the ledger was replaced" in h.message for h in report.all_hazards())


# -- exports and seals -------------------------------------------------------------------------
def test_an_export_is_audited_exactly_as_its_ledger(run, tmp_path):
    sqlite_report = audit([run])
    export = site_dir(run, "0") / "ledger.json"
    export.write_bytes(canonical_json(export_ledger(ledger_path(run))))
    ledger_path(run).unlink()
    report = audit([run])
    assert not report.has_errors, format_text(report)
    (a,), (b,) = sqlite_report.runs[0].sites, report.runs[0].sites
    assert b.ledger_kind == "export" and b.chain == "signed, verified"
    assert b.epsilon == a.epsilon and b.cumulative == a.cumulative and b.anchors_matched == 3
    assert not _cli(export, "--out", tmp_path / "o", "--public-keys", run / "sites",
                    "--accept-unanchored")  # on its own, as a file


def test_an_export_that_disagrees_with_the_ledger_fails_and_its_seal_anchors(run, tmp_path):
    path = _later_run(run)
    export = site_dir(run, "0") / "ledger.json"
    export.write_bytes(canonical_json(export_ledger(path)))
    report = audit([run])  # the delivered export's seal covers run B's rows
    assert not report.has_errors, format_text(report)
    assert report.runs[0].sites[0].seals_matched == 1
    data = json.loads(export.read_text())
    data["entries"][4]["steps"] += 1
    export.write_text(json.dumps(data))
    assert "export-mismatch" in _codes(audit([run]))


def test_seals_the_auditor_holds_are_checked(run, tmp_path):
    ledger = Ledger(ledger_path(run))
    good = ledger.seal()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**good.to_dict(), "count": 2}))
    assert "signature-invalid" in _codes(audit([run], trust=Trust(seals=(forged,))))
    foreign = tmp_path / "foreign.json"
    other = sign_anchor(Ed25519PrivateKey.generate(), "0" * 32, 1, GENESIS, sealed_at=1.0)
    foreign.write_text(json.dumps(other.to_dict()))
    assert "seal-unmatched" in _codes(audit([run], trust=Trust(seals=(foreign,))))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{")
    assert _cli(run, "--out", tmp_path / "o", "--seal", garbage) == 2  # a usage error


# -- the classes: any field of any row, any deletion, by anyone ---------------------------------
_ANY = (st.floats(allow_nan=True) | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=30) | st.binary(max_size=12))
_FIELDS = [f for f in Entry.__dataclass_fields__ if f != "seq"]
_WHO = st.sampled_from(["nobody", "rechain", "another key", "the site"])


def _integrity(run_dir: Path, trust: Trust = STRICT, form: str = "sqlite"):
    path = ledger_path(run_dir) if form == "sqlite" else site_dir(run_dir, "0") / "ledger.json"
    lf = read_ledger(path)
    key, problems = find_public_key("0", run_dir, ())
    summary = json.loads((run_dir / "summary.json").read_text())
    return ledger_integrity("0", lf, key=key, key_problems=problems,
                            anchors=recorded_anchors(summary["sites"]["0"]), trust=trust)


def _dump(path: Path):
    con = sqlite3.connect(path)
    rows = con.execute("SELECT * FROM entries ORDER BY rowid").fetchall()
    meta = con.execute("SELECT * FROM meta ORDER BY key").fetchall()
    con.close()
    return rows, meta


def test_the_honest_fixture_verifies(honest):
    assert [h for h in _integrity(honest).hazards if h.severity == "error"] == []


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.filter_too_much])
@given(data=st.data(), who=_WHO, deleting=st.booleans())
def test_any_edit_or_deletion_of_ledger_rows_is_an_error(honest, data, who, deleting):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(honest, run_dir)
        path = ledger_path(run_dir)
        before = _dump(path)
        n = len(before[0])
        try:
            if deleting:
                gone = data.draw(st.sets(st.integers(1, n), min_size=1), label="deleted rows")
                sql(path, "DROP TRIGGER entries_no_delete",
                    f"DELETE FROM entries WHERE seq IN ({', '.join(map(str, gone))})")
            else:
                row = data.draw(st.integers(1, n), label="row")
                name = data.draw(st.sampled_from([*_FIELDS, "seq"]), label="field")
                value = data.draw(st.integers(-5, 50) if name == "seq" else _ANY,
                                  label="value")
                sql(path, "DROP TRIGGER entries_no_update",
                    f"UPDATE entries SET {name} = ? WHERE seq = ?", params=(value, row))
            if who != "nobody":
                key = {"rechain": None, "another key": Ed25519PrivateKey.generate(),
                       "the site": _site_key(run_dir)}[who]
                rechain(path, resign_with=key)
        except (sqlite3.IntegrityError, ValueError, TypeError):
            reject()  # a value SQLite refuses, or a row the rebuild cannot hash
        assume(_dump(path) != before)
        errors = {h.code for h in _integrity(run_dir).hazards if h.severity == "error"}
        assert errors, "an undetected tamper"
        # Accepting the unverifiable never hides a change to verified rows.
        assert {h.code for h in _integrity(run_dir, ACCEPT_ALL).hazards
                if h.severity == "error"}


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), who=_WHO, deleting=st.booleans())
def test_any_edit_or_deletion_in_a_delivered_export_is_an_error(honest, data, who, deleting):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(honest, run_dir)
        export = export_ledger(ledger_path(run_dir))
        ledger_path(run_dir).unlink()
        original = _meaning(export)
        rows = export["entries"]
        if deleting:
            gone = data.draw(st.sets(st.integers(0, len(rows) - 1), min_size=1), label="deleted")
            export["entries"] = [r for i, r in enumerate(rows) if i not in gone]
        else:
            i = data.draw(st.integers(0, len(rows) - 1), label="row")
            name = data.draw(st.sampled_from([*_FIELDS, "seq"]), label="field")
            value = data.draw(st.floats(allow_nan=False) | st.integers() | st.text(max_size=20)
                              | st.booleans() | st.none(), label="value")
            rows[i][name] = value
        if who != "nobody":
            key = {"rechain": None, "another key": Ed25519PrivateKey.generate(),
                   "the site": _site_key(run_dir)}[who]
            prev = GENESIS
            for j, r in enumerate(export["entries"], start=1):
                r.update(seq=j, prev_hash=prev, hash="")
                r["hash"] = Entry(**r).content_hash()
                prev = r["hash"]
            if key is not None:
                export["seal"] = sign_anchor(key, export["ledger_id"], len(export["entries"]),
                                             prev, sealed_at=1.0).to_dict()
        assume(_meaning(export) != original)  # 0 for false, or a field the rebuild reset
        (site_dir(run_dir, "0") / "ledger.json").write_bytes(canonical_json(export))
        errors = {h.code for h in _integrity(run_dir, form="export").hazards
                  if h.severity == "error"}
        assert errors, "an undetected tamper"


def _meaning(export: dict):
    """What an export says, as the audit reads it (a seal the site makes afresh over the
    same rows says the same)."""
    seal = {k: v for k, v in export["seal"].items() if k not in ("sealed_at", "signature")}
    return [coerce_entry(r) for r in export["entries"]], seal


# -- never a crash on a bad ledger -----------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["garbage", "truncate", "corrupt", "drop table", "json"]),
       data=st.data())
def test_a_bad_ledger_is_reported_never_a_crash(honest, how, data):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(honest, run_dir)
        path = ledger_path(run_dir)
        raw = path.read_bytes()
        if how == "garbage":
            path.write_bytes(data.draw(st.binary(max_size=4096), label="bytes"))
        elif how == "truncate":
            path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="length")])
        elif how == "corrupt":
            at = data.draw(st.integers(0, len(raw) - 64), label="offset")
            junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
            path.write_bytes(raw[:at] + junk + raw[at + len(junk):])
        elif how == "drop table":
            table = data.draw(st.sampled_from(["entries", "meta", "caps"]), label="table")
            sql(path, f"DROP TABLE {table}")
        else:
            path.unlink()
            doc = data.draw(st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20),
                label="json")
            (site_dir(run_dir, "0") / "ledger.json").write_text(json.dumps(doc))
        report = audit([run_dir])  # no exception, whatever the bytes
        if _dump_ok(path) != _dump_ok_raw(raw):
            assert report.has_errors, format_text(report)


def _dump_ok(path: Path):
    try:
        return _dump(path) if path.is_file() else None
    except sqlite3.Error:
        return "unreadable"


def _dump_ok_raw(raw: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "l.sqlite"
        p.write_bytes(raw)
        return _dump_ok(p)


def test_a_ledger_emptied_of_every_row_still_fails_on_its_own_seal(run):
    path = ledger_path(run)
    sql(path, "DROP TRIGGER entries_no_delete", "DELETE FROM entries")
    report = audit([path], trust=ACCEPT_ALL)  # the file alone, no anchors, all accepted
    assert "seal-mismatch" in _codes(report) and report.runs[0].sites[0].chain == "broken"


def test_named_bad_ledgers_are_named(run):
    path = ledger_path(run)
    for content, words in ((b"", "neither a SQLite ledger"),
                           (path.read_bytes()[:4096], "not a readable SQLite ledger"),
                           (b"SQLite format 3\x00" + b"\x00" * 100, "not a readable")):
        path.write_bytes(content)
        report = audit([run])
        (h,) = [h for h in report.all_hazards() if h.code == "ledger-unreadable"]
        assert words in h.message and report.runs[0].sites[0].chain == "unreadable"
        assert "ledger-truncated" not in _codes(report)


def test_values_of_the_wrong_type_are_named_and_left_out(run):
    sql(ledger_path(run), "DROP TRIGGER entries_no_update",
        "UPDATE entries SET epsilon_after = 'lots', steps = 2.5 WHERE seq = 2")
    report = audit([run], trust=ACCEPT_ALL)
    (h,) = [h for h in report.all_hazards() if h.code == "malformed-entry"]
    assert "epsilon_after is str 'lots'" in h.message and "steps is float 2.5" in h.message
    assert report.runs[0].sites[0].rounds == 2  # the other two rows are accounted


def test_every_code_these_tests_expect_is_registered():
    expected = {"broken-hash-chain", "seal-mismatch", "key-mismatch", "anchor-mismatch",
                "unanchored-entries", "ledger-truncated", "legacy-chain", "anchor-unsigned",
                "public-key-missing", "signature-invalid", "seal-unmatched", "export-mismatch",
                "ledger-unreadable", "malformed-entry"}
    assert expected <= set(HAZARDS)


# -- a real simulated run ------------------------------------------------------------------------
@pytest.mark.integration
def test_a_real_simulated_run_verifies_with_public_keys_and_its_tampers_fail(tmp_path):
    """``fedtransfer simulate`` on digits with the identity backbone, its site keys
    provisioned and registered by the coordinator before the run (as ``deploy certs``
    does), then audited with public keys only, honest and tampered."""
    from tests.procs import simulate

    out = tmp_path / "run"
    for sid in ("0", "1"):
        register_public_key(out, sid, ensure_key_pair(
            site_dir(out, sid) / "ledger.sqlite.key"))
    s, _ = simulate(out, "num-sites=2", "num-rounds=2", "backbone=identity", "dataset=digits",
                    "local-epochs=1", "distill=false", f"cache-dir={tmp_path / 'cache'}",
                    "target-epsilon=3.0", log=tmp_path / "simulate.log")
    for sid in ("0", "1"):
        entries = read_ledger(ledger_path(out, sid)).entries
        assert [e.hash[:7] for e in entries] == ["sha256:"] * 2
        assert all(e.data_fingerprint == "" and e.unit == "record" for e in entries)
    signed = all(h.get("ledger_signature") for site in s["sites"].values()
                 for h in site["history"])
    report = audit([out])
    if signed:  # the site sends its signed anchor and the server records it
        assert not report.has_errors, format_text(report)
    else:  # a site that does not sign its anchors yet: the audit says so, and fails
        assert _codes(report) <= {"anchor-unsigned", "unanchored-entries"}
        assert "anchor-unsigned" in _codes(report)
        report = audit([out], trust=Trust(accept_unverified=True))
        assert not report.has_errors, format_text(report)
    for site in report.runs[0].sites:
        assert site.chain == "signed, verified" and site.anchors_matched == 2
        assert site.epsilon["replace_one"] <= 3.0 + 1e-3 and site.unit == "record"
    trust = Trust(accept_unverified=not signed)
    # σ × 4 with the stored hashes kept and the records edited to match.
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    _times_four(ledger_path(tampered, "1"))
    summary_to_match(tampered, "1")
    assert "broken-hash-chain" in _codes(audit([tampered], trust=trust))
    # The site itself rebuilds and re-signs: the coordinator's anchors catch it.
    rechain(ledger_path(tampered, "1"), resign_with=load_signing_key(
        site_dir(tampered, "1") / "ledger.sqlite.key"))
    report = audit([tampered], trust=trust)
    assert "anchor-mismatch" in _codes(report) and "broken-hash-chain" not in _codes(report)
    assert _cli(tampered, "--out", tmp_path / "o", "--accept-unverified",
                "--accept-unanchored") == 1

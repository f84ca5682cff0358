"""The signed ledger: Ed25519 seal and anchors, a plain SHA-256 chain, entries that hold
only mechanism tuples and public values, exports, older ledgers, ``site seal``."""

from __future__ import annotations

import json
import sqlite3
import stat
from dataclasses import asdict, fields, replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import main as cli_main
from common.privacy.accounting import LEDGER_ACCOUNTANT, PRIVACY_UNITS
from common.privacy.ledger import (
    ENTRY_FIELDS,
    EXPORT_FORMAT,
    GENESIS,
    LEGACY_KEY_SUFFIX,
    SIGNED,
    Anchor,
    Entry,
    Ledger,
    anchor_problem,
    canonical_json,
    chain_problems,
    ensure_key_pair,
    export_ledger,
    key_id,
    load_public_key,
    public_key_path,
    verify_anchor,
)
from tests.common.ledgers import DELTA, LEGACY_SECRET, charge_run, legacy_ledger

ENTRY = dict(run_id="r", round=1, noise_multiplier=1.1, sample_rate=0.25, steps=4, clip_norm=1.0,
             delta=DELTA, sampler="poisson", secure_rng=False, accountant=LEDGER_ACCOUNTANT,
             accountant_version="dp-accounting-0.6.0", libraries="{}", dataset_size=100,
             epsilon_after=0.5)


def _entry(**kw) -> Entry:
    return Entry(**{**ENTRY, **kw})


# -- keys and signatures ---------------------------------------------------------
def test_the_key_is_made_on_first_use_owner_only_with_its_public_half_beside_it(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert not ledger.key_path.exists()  # opening makes no key
    ledger.append(_entry())
    assert ledger.key_path == tmp_path / "ledger.sqlite.key"
    assert stat.S_IMODE(ledger.key_path.stat().st_mode) == 0o600
    pub = public_key_path(ledger.key_path)
    assert pub == tmp_path / "ledger.sqlite.key.pub"
    # A standard format: PEM SubjectPublicKeyInfo, readable by any tool.
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert key_id(load_pem_public_key(pub.read_bytes())) == key_id(ledger.public_key())
    # The node config's ledger-key names another place.
    other = Ledger(tmp_path / "b" / "ledger.sqlite", tmp_path / "keys" / "site.key")
    other.append(_entry())
    assert (tmp_path / "keys" / "site.key").is_file()
    assert (tmp_path / "keys" / "site.key.pub").is_file()
    assert not (tmp_path / "b" / "ledger.sqlite.key").exists()


def test_an_anchor_verifies_with_the_public_key_only_and_binds_every_field(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    empty = ledger.anchor()
    assert (empty.count, empty.head) == (0, GENESIS)
    ledger.append(_entry())
    ledger.append(_entry(round=2))
    a = ledger.anchor()
    assert (a.count, a.head) == ledger.head() and a.ledger_id == ledger.ledger_id()
    assert a == ledger.anchor()  # Ed25519 is deterministic: one state, one anchor
    pem = public_key_path(ledger.key_path).read_bytes()
    assert verify_anchor(pem, a) and verify_anchor(load_public_key(pem), a)
    assert a.key_id == key_id(load_public_key(pem))
    for change in (dict(count=1), dict(head="sha256:" + "0" * 64), dict(ledger_id="other"),
                   dict(sealed_at=1.0)):
        assert not verify_anchor(pem, replace(a, **change)), change
    stranger = Ed25519PrivateKey.generate()
    assert "not the registered key" in anchor_problem(stranger.public_key(), a)
    forged = replace(a, key_id=key_id(stranger.public_key()))
    assert "does not verify" in anchor_problem(stranger.public_key(), forged)
    # The forms it travels in round-trip.
    assert Anchor.from_record(a.to_record()) == a == Anchor.from_record(a.to_wire())
    assert set(a.to_wire()) == {"ledger-id", "ledger-entries", "ledger-head", "ledger-signature",
                                "ledger-key-id"}
    assert Anchor.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError, match="lacks"):
        Anchor.from_record({**a.to_record(), "ledger_signature": ""})


def test_a_seal_carries_its_time_and_the_stored_seal_follows_each_append(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.append(_entry())
    stored = ledger.stored_seal()
    assert (stored.count, stored.head) == ledger.head() and stored.sealed_at is None
    sealed = ledger.seal()
    assert sealed.sealed_at is not None and verify_anchor(ledger.public_key(), sealed)
    assert not verify_anchor(ledger.public_key(), replace(sealed, sealed_at=sealed.sealed_at + 1))
    assert Anchor.from_dict(json.loads(json.dumps(sealed.to_dict()))) == sealed
    ledger.append(_entry(round=2))
    assert ledger.stored_seal().count == 2


def test_public_keys_load_from_pem_and_openssh_and_nothing_else(tmp_path):
    pub = ensure_key_pair(tmp_path / "k")
    from cryptography.hazmat.primitives import serialization

    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert key_id(load_public_key(ssh)) == key_id(pub)
    assert key_id(load_public_key(public_key_path(tmp_path / "k"))) == key_id(pub)
    with pytest.raises(ValueError, match="neither PEM"):
        load_public_key(b"\x00" * 32)
    (tmp_path / "k.key").write_bytes((tmp_path / "k").read_bytes())
    with pytest.raises(ValueError, match="not a readable Ed25519 public key"):
        load_public_key(tmp_path / "k.key")  # a private key is not a public key


# -- entries ----------------------------------------------------------------------------
def test_every_entry_field_has_a_privacy_class():
    assert set(ENTRY_FIELDS) == {f.name for f in fields(Entry)}


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sigma=st.floats(0.3, 20), q=st.floats(1e-3, 1.0), steps=st.integers(1, 500),
       n=st.integers(1, 10**6), clip=st.floats(0.01, 10), rnd=st.integers(0, 50),
       t=st.floats(1, 2e9), run=_text, unit=st.sampled_from(PRIVACY_UNITS),
       k=st.integers(1, 20), eps=st.floats(0, 100), fp_a=_text, fp_b=_text)
def test_an_entry_is_a_function_of_mechanism_public_values_and_time_only(
        tmp_path_factory, sigma, q, steps, n, clip, rnd, t, run, unit, k, eps, fp_a, fp_b):
    """Two neighbouring sites (their records differ, so would any hash of them) that run
    the same mechanism on the same public values at the same time store the same row
    and the same hash: nothing in an entry depends on a record."""
    rows = []
    for fp in (fp_a, fp_b):
        led = Ledger(tmp_path_factory.mktemp("n") / "ledger.sqlite")
        e = led.append(_entry(run_id=run, round=rnd, noise_multiplier=sigma, sample_rate=q,
                              steps=steps, clip_norm=clip, dataset_size=n, created_at=t,
                              unit=unit, group_size=k, epsilon_after=eps,
                              data_fingerprint=fp))
        (stored,) = led.entries()
        assert stored == e and stored.data_fingerprint == ""
        rows.append(asdict(stored))
    assert rows[0] == rows[1]


def test_append_refuses_what_no_site_writes_and_records_nothing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for bad, words in ((dict(unit="household"), "unit 'household'"),
                       (dict(group_size=0), "group_size"),
                       (dict(noise_multiplier=0.0), "noise_multiplier"),
                       (dict(delta=1.5), "0 < δ < 1"),
                       (dict(epsilon_after=float("nan")), "finite")):
        with pytest.raises(ValueError, match=words):
            ledger.append(_entry(**bad))
    assert ledger.entries() == []


def test_the_chain_is_sha256_over_the_whole_entry_and_its_predecessor(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    a = ledger.append(_entry(unit="patient", group_size=3))
    b = ledger.append(_entry(round=2))
    assert a.hash.startswith(SIGNED) and b.prev_hash == a.hash
    assert chain_problems([a, b]) == [] and ledger.verify_chain() == []
    body = {k: v for k, v in a.record().items() if k != "hash"}
    import hashlib

    assert a.hash == SIGNED + hashlib.sha256(canonical_json(body)).hexdigest()
    for field in ("unit", "group_size", "noise_multiplier", "created_at", "trained"):
        changed = replace(a, **{field: {"unit": "record", "group_size": 4,
                                        "noise_multiplier": 2.2, "created_at": 5.0,
                                        "trained": "x"}[field]})
        assert chain_problems([changed, b]), field


def test_the_ledgers_guarantees_hold(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.append(_entry())
    con = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET noise_multiplier = 5.0")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM entries")
    con.close()
    assert ledger._connect().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ledger.record_cap(epsilon=2.0, delta=DELTA, reason="first use")
    assert ledger.cap() == (2.0, DELTA)


def test_a_signed_ledger_without_its_key_is_not_extended(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.append(_entry())
    ledger.key_path.unlink()
    with pytest.raises(ValueError, match="holds signed entries but its key .* is missing"):
        ledger.append(_entry(round=2))
    assert len(ledger.entries()) == 1


def test_verify_chain_finds_an_edit_and_a_deleted_newest_row(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    charge_run(ledger, run_id="r", rounds=3)
    assert ledger.verify_chain() == []
    con = sqlite3.connect(ledger.path)
    con.execute("DROP TRIGGER entries_no_delete")
    con.execute("DELETE FROM entries WHERE seq = 3")
    con.commit()
    con.close()
    assert any("the seal covers 3 entries" in p for p in ledger.verify_chain())


# -- exports --------------------------------------------------------------------------
def test_the_export_holds_every_row_the_caps_a_fresh_seal_and_the_public_key(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    charge_run(ledger, run_id="r", rounds=2)
    out = export_ledger(ledger.path)
    assert out["format"] == EXPORT_FORMAT and out["ledger_id"] == ledger.ledger_id()
    assert [Entry(**r) for r in out["entries"]] == ledger.entries()
    assert out["caps"] == ledger.caps()
    sealed = Anchor.from_dict(out["seal"])
    assert sealed.sealed_at is not None and verify_anchor(out["public_key"], sealed)
    assert (sealed.count, sealed.head) == ledger.head()
    # Canonical bytes: the same export serialises to the same bytes, and back.
    blob = canonical_json(out)
    assert json.loads(blob) == out and canonical_json(json.loads(blob)) == blob
    with pytest.raises(FileNotFoundError, match="no ledger"):
        export_ledger(tmp_path / "absent.sqlite")
    assert not (tmp_path / "absent.sqlite").exists()


# -- older ledgers ------------------------------------------------------------------------
def test_an_hmac_ledger_is_read_and_extended_with_signed_entries(tmp_path):
    path = legacy_ledger(tmp_path / "ledger.sqlite", "hmac")
    key = tmp_path / "ledger.sqlite.key"
    key.write_bytes(LEGACY_SECRET)  # where the old code kept it
    ledger = Ledger(path)
    old = ledger.entries()
    assert [e.hash_format for e in old] == ["legacy-hmac"] * 3
    assert [(e.unit, e.group_size) for e in old] == [("record", 1)] * 3
    assert chain_problems(old, legacy_key=LEGACY_SECRET) == []
    assert chain_problems([replace(old[0], noise_multiplier=4.8), *old[1:]],
                          legacy_key=LEGACY_SECRET)
    ledger.append(_entry(round=4))
    # The secret moved aside (kept, it checks the old rows); a signing key took its place.
    assert (tmp_path / f"ledger.sqlite.key{LEGACY_KEY_SUFFIX}").read_bytes() == LEGACY_SECRET
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    new = ledger.entries()
    assert new[:3] == old and new[3].prev_hash == old[2].hash
    assert new[3].hash.startswith(SIGNED) and ledger.verify_chain() == []


def test_the_oldest_unkeyed_ledger_is_read_and_extended(tmp_path):
    path = legacy_ledger(tmp_path / "ledger.sqlite", "unkeyed")
    ledger = Ledger(path)
    old = ledger.entries()
    assert [e.hash_format for e in old] == ["legacy-unkeyed"] * 2 and chain_problems(old) == []
    assert [e.trained for e in old] == ["", ""]
    ledger.append(_entry(round=3))
    assert ledger.verify_chain() == [] and len(ledger.entries()) == 3


# -- fedtransfer site seal ---------------------------------------------------------------
def test_site_seal_writes_a_signed_seal_of_the_ledger(tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    charge_run(ledger, run_id="r", rounds=2)
    out = tmp_path / "seal.json"
    assert cli_main(["site", "seal", "--ledger", str(ledger.path), "--out", str(out)]) == 0
    assert "sealed at 2 entries" in capsys.readouterr().out
    sealed = Anchor.from_dict(json.loads(out.read_text()))
    assert verify_anchor(ledger.public_key(), sealed)
    assert (sealed.ledger_id, sealed.count, sealed.head) == (ledger.ledger_id(), *ledger.head())
    assert cli_main(["site", "seal", "--ledger", str(ledger.path)]) == 0  # printed instead
    assert Anchor.from_dict(json.loads(capsys.readouterr().out)).count == 2
    assert cli_main(["site", "seal", "--ledger", str(tmp_path / "typo.sqlite")]) == 2
    assert "no ledger at" in capsys.readouterr().err
    assert not (tmp_path / "typo.sqlite").exists()

"""The ledger's optional columns (``trained``; ``unit`` and ``group_size``): older
ledgers, made before they existed, stay readable, verifiable and appendable."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

from common.audit.sources import read_ledger
from common.privacy import ledger as L

_NEW_COLUMNS = ("    trained TEXT NOT NULL DEFAULT '',\n",
                "    unit TEXT NOT NULL DEFAULT 'record',\n",
                "    group_size INTEGER NOT NULL DEFAULT 1,\n")


def _old_schema() -> str:
    schema = L._SCHEMA
    for line in _NEW_COLUMNS:
        assert line in schema
        schema = schema.replace(line, "")
    return schema


def _entry(**kw) -> L.Entry:
    base = dict(run_id="r", round=1, noise_multiplier=1.1, sample_rate=0.25, steps=4,
                clip_norm=1.0, delta=1e-5, sampler="poisson", secure_rng=False, accountant="prv",
                accountant_version="x", libraries="{}", dataset_size=100, data_fingerprint="fp",
                epsilon_after=0.5)
    return L.Entry(**{**base, **kw})


def test_an_older_entry_without_trained_hashes_as_before_the_column():
    # Computed with the code of branch issue16 (before the column existed); the keyed
    # hash of the chain before signed ledgers, which ignores unit and group_size.
    e = dataclasses.replace(_entry(), created_at=1.0, seq=1)
    assert e.legacy_hash(b"k" * 32) == (
        "hmac-sha256:63533a4073c1758faccff9a735ceebc1e71d96630f5704bc9ba837b318a79ae6")
    assert dataclasses.replace(e, trained='{"trainable": "bitfit"}').legacy_hash(b"k" * 32) \
        != e.legacy_hash(b"k" * 32)
    # A signed ledger's hash covers every field, the new ones too.
    assert dataclasses.replace(e, unit="patient").content_hash() != e.content_hash()


def test_an_older_ledger_is_read_verified_and_extended(tmp_path):
    path = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(path)
    con.executescript(_old_schema())
    con.close()
    ledger = L.Ledger(path)
    ledger.append(_entry())  # adds the columns; no old row to default here
    trained = json.dumps({"params": 10370, "trainable": "bitfit"}, sort_keys=True)
    ledger.append(_entry(round=2, trained=trained, unit="patient", group_size=4))
    entries = ledger.entries()
    assert [e.trained for e in entries] == ["", trained]
    assert [(e.unit, e.group_size) for e in entries] == [("record", 1), ("patient", 4)]
    assert [e.data_fingerprint for e in entries] == ["", ""]  # never stored
    assert ledger.verify_chain() == []
    assert [e.trained for e in read_ledger(path).entries] == ["", trained]


def test_the_audit_reads_a_ledger_without_the_columns(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = L.Ledger(path)
    ledger.append(_entry())
    # An older file: the same rows without the columns.
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.executescript(_old_schema())
    cols = [c for c in L._COLUMNS if c not in ("trained", "unit", "group_size")]
    row = sqlite3.connect(path).execute(f"SELECT {', '.join(cols)} FROM entries").fetchone()
    con.execute(f"INSERT INTO entries ({', '.join(cols)}) VALUES "
                f"({', '.join('?' for _ in cols)})", row)
    con.commit()
    con.close()
    lf = read_ledger(old)
    (e,) = lf.entries
    assert (e.trained, e.unit, e.group_size) == ("", "record", 1) and lf.malformed == {}
    assert L.chain_problems([e]) == []

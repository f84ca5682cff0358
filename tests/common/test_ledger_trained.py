"""The ledger's ``trained`` column (trainable mode and parameter count): older
ledgers, made before it existed, stay readable, verifiable and appendable."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

from common.audit.recompute import read_ledger
from common.privacy import ledger as L


def _entry(**kw) -> L.Entry:
    base = dict(run_id="r", round=1, noise_multiplier=1.1, sample_rate=0.25, steps=4,
                clip_norm=1.0, delta=1e-5, sampler="poisson", secure_rng=False, accountant="prv",
                accountant_version="x", libraries="{}", dataset_size=100, data_fingerprint="fp",
                epsilon_after=0.5)
    return L.Entry(**{**base, **kw})


def test_an_entry_without_trained_hashes_as_before_the_column():
    # Computed with the code of branch issue16 (before the column existed).
    e = dataclasses.replace(_entry(), created_at=1.0, seq=1)
    assert e.content_hash(b"k" * 32) == (
        "hmac-sha256:63533a4073c1758faccff9a735ceebc1e71d96630f5704bc9ba837b318a79ae6")
    assert dataclasses.replace(e, trained='{"trainable": "bitfit"}').content_hash(b"k" * 32) \
        != e.content_hash(b"k" * 32)


def test_an_older_ledger_is_read_verified_and_extended(tmp_path):
    path = tmp_path / "ledger.sqlite"
    old_schema = L._SCHEMA.replace("    trained TEXT NOT NULL DEFAULT '',\n", "")
    assert "trained" not in old_schema
    con = sqlite3.connect(path)
    con.executescript(old_schema)
    con.close()
    ledger = L.Ledger(path)
    ledger.append(_entry())  # adds the column; the old row keeps ''
    trained = json.dumps({"params": 10370, "trainable": "bitfit"}, sort_keys=True)
    ledger.append(_entry(round=2, trained=trained))
    entries = ledger.entries()
    assert [e.trained for e in entries] == ["", trained]
    assert ledger.verify_chain() == []
    assert [e.trained for e in read_ledger(path).entries] == ["", trained]


def test_the_audit_reads_a_ledger_without_the_column(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = L.Ledger(path)
    ledger.append(_entry())
    # An older file: the same rows without the column.
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.executescript(L._SCHEMA.replace("    trained TEXT NOT NULL DEFAULT '',\n", ""))
    cols = [c for c in L._COLUMNS if c != "trained"]
    row = sqlite3.connect(path).execute(f"SELECT {', '.join(cols)} FROM entries").fetchone()
    con.execute(f"INSERT INTO entries ({', '.join(cols)}) VALUES "
                f"({', '.join('?' for _ in cols)})", row)
    con.commit()
    con.close()
    (e,) = read_ledger(old).entries
    assert e.trained == "" and L.verify_chain([e], key=None) == []

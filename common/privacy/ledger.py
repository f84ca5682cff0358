"""The site's privacy ledger: append-only, hash-chained SQLite.

One file per site. Each entry is one training round the site took part in,
with the raw mechanism tuple (σ, q, steps) and everything an auditor needs.
ε is always recomputed from the tuples; the stored ``epsilon_after`` is a
cache that the audit checks.

Entries are committed (``synchronous=FULL``, one transaction) *before* the
site's update is released. Triggers refuse UPDATE and DELETE; the chain
detects edits made behind the triggers' back.

The chain is keyed: each entry's hash is an HMAC-SHA256 under the site's
ledger key, a file outside the ledger (``<ledger>.key`` unless the node config
names another, ``ledger-key``). Without the key nobody can rebuild a valid
chain after editing a row. A keyed seal over (entry count, last hash), rewritten
in each append's transaction, makes deleting the newest row detectable from the
ledger alone. The head hash and count leave the site with each reply (anchors
the server records); being keyed, the hash tells the server nothing about the
site's data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

from common.privacy.accounting import REPORTED_ACCOUNTANT, Mechanism, epsilon

GENESIS = "0" * 64
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    created_at REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    delta REAL NOT NULL,
    sampler TEXT NOT NULL,
    secure_rng INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    accountant_version TEXT NOT NULL,
    libraries TEXT NOT NULL,
    dataset_size INTEGER NOT NULL,
    data_fingerprint TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    trained TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
-- The site's cap, recorded at first use; raising it is an explicit site action that
-- appends a row with its reason (``fedtransfer site raise-cap``), never a run config.
CREATE TABLE IF NOT EXISTS caps (
    seq INTEGER PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS caps_no_update BEFORE UPDATE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS caps_no_delete BEFORE DELETE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
"""


@dataclass(frozen=True)
class Entry:
    """One ledger row. ``seq``, ``prev_hash`` and ``hash`` are set on append."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    sampler: str
    secure_rng: bool
    accountant: str
    accountant_version: str
    libraries: str
    dataset_size: int
    data_fingerprint: str
    epsilon_after: float
    created_at: float = 0.0
    # What the round trained and released (JSON: the trainable mode and its parameter
    # count, e.g. {"params": 7810, "trainable": "bitfit"}). Not part of the mechanism:
    # ε never depends on it. "" (every entry of an older ledger) is left out of the
    # hash, so older ledgers verify unchanged.
    trained: str = ""
    seq: int = 0
    prev_hash: str = GENESIS
    hash: str = ""

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(noise_multiplier=self.noise_multiplier,
                         sample_rate=self.sample_rate, steps=self.steps)

    def content_hash(self, key: bytes | None = None) -> str:
        """SHA-256 of the entry (unkeyed, the old chain), or ``hmac-sha256:`` + the
        HMAC under the site's key."""
        body = {k: v for k, v in asdict(self).items() if k != "hash"}
        body["secure_rng"] = bool(body["secure_rng"])
        if not body["trained"]:
            del body["trained"]  # older entries: hashed exactly as before the column existed
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if key is None:
            return hashlib.sha256(text).hexdigest()
        return KEYED + hmac.new(key, text, hashlib.sha256).hexdigest()

    @property
    def keyed(self) -> bool:
        return self.hash.startswith(KEYED)


_COLUMNS = [f.name for f in fields(Entry)]
KEYED = "hmac-sha256:"
# Columns added after SCHEMA_VERSION 1's first ledgers (absent from older files:
# read as their default, added on the next append).
_ADDED_COLUMNS = {"trained": "TEXT NOT NULL DEFAULT ''"}


def read_entries(con: sqlite3.Connection) -> list[Entry]:
    """Every entry of an open ledger, oldest first; an older ledger's missing
    columns take their defaults."""
    present = {r[1] for r in con.execute("PRAGMA table_info(entries)")}
    cols = [c for c in _COLUMNS if c in present]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM entries ORDER BY seq").fetchall()
    return [Entry(**dict(zip(cols, row, strict=True))) for row in rows]


def seal(key: bytes, count: int, head: str) -> str:
    """The keyed commitment to (entry count, last hash) kept in the ledger's meta."""
    return hmac.new(key, f"{count}:{head}".encode(), hashlib.sha256).hexdigest()


def default_key_path(ledger_path: str | Path) -> Path:
    p = Path(ledger_path)
    return p.with_name(p.name + ".key")


def read_key(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    if len(data) < 32:
        raise ValueError(f"ledger key {path} is too short ({len(data)} bytes, need 32)")
    return data


# The libraries whose versions a ledger entry records (and the audit reports).
PRIVACY_LIBRARIES = ("opacus", "dp-accounting", "opendp", "torch", "numpy", "flwr")


def library_versions(names: Sequence[str] = PRIVACY_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where absent), read from package metadata."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def accountant_version() -> str:
    """The accountant library a ledger entry's ε came from."""
    return f"dp-accounting-{metadata.version('dp-accounting')}"


class Ledger:
    """A site's ledger file. Cheap to open; every method is one transaction."""

    def __init__(self, path: str | Path, key_path: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path else default_key_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.execute("PRAGMA synchronous=FULL")
        return con

    def _key(self) -> bytes:
        """The site's ledger key, made (32 random bytes, owner-only) on first use."""
        if self.key_path.is_file():
            return read_key(self.key_path)
        if self.count():
            raise ValueError(f"ledger {self.path} has entries but its key {self.key_path} is "
                             "missing: a keyed chain cannot be extended without it")
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32))
        return read_key(self.key_path)

    def head(self) -> tuple[int, str]:
        """``(entry count, last hash)``: the anchor a reply carries."""
        with self._connect() as con:
            row = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    # -- reading -----------------------------------------------------------
    def entries(self) -> list[Entry]:
        with self._connect() as con:
            return read_entries(con)

    def history(self, *, exclude_run: str | None = None) -> list[Mechanism]:
        """Mechanism tuples of every entry (optionally without one run's)."""
        return [e.mechanism for e in self.entries() if e.run_id != exclude_run]

    def epsilon(self, *, delta: float, accountant: str = REPORTED_ACCOUNTANT) -> float:
        """ε over the whole ledger, recomputed from the raw tuples."""
        return epsilon(self.history(), delta=delta, accountant=accountant)

    def caps(self) -> list[dict]:
        """Every cap the site recorded, oldest first (the last one is in force)."""
        with self._connect() as con:
            rows = con.execute("SELECT seq, epsilon, delta, created_at, reason FROM caps "
                               "ORDER BY seq").fetchall()
        return [dict(zip(("seq", "epsilon", "delta", "created_at", "reason"), r, strict=True))
                for r in rows]

    def cap(self) -> tuple[float, float] | None:
        """``(ε, δ)`` in force, or None before first use."""
        caps = self.caps()
        return (caps[-1]["epsilon"], caps[-1]["delta"]) if caps else None

    def record_cap(self, *, epsilon: float, delta: float, reason: str) -> None:
        """Append a cap (first use, or an explicit raise by the site's operator)."""
        if not (epsilon > 0 and math.isfinite(epsilon)) or not 0 < delta < 1:
            raise ValueError(f"a cap needs ε > 0 finite and δ in (0, 1), got ε={epsilon}, "
                             f"δ={delta}")
        with self._connect() as con:
            con.execute("INSERT INTO caps (epsilon, delta, created_at, reason) VALUES (?, ?, ?, ?)",
                        (float(epsilon), float(delta), time.time(), str(reason)))

    def count(self) -> int:
        """Entries in the ledger (the anchor a reply carries)."""
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def has_round(self, run_id: str, server_round: int) -> bool:
        with self._connect() as con:
            row = con.execute("SELECT 1 FROM entries WHERE run_id=? AND round=?",
                              (run_id, server_round)).fetchone()
        return row is not None

    # -- writing -----------------------------------------------------------
    def append(self, entry: Entry) -> Entry:
        """Chain and durably commit ``entry``; returns it with seq and hashes."""
        key = self._key()
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            present = {r[1] for r in con.execute("PRAGMA table_info(entries)")}
            for column, decl in _ADDED_COLUMNS.items():
                if column not in present:  # an older ledger: add the column, old rows get ''
                    con.execute(f"ALTER TABLE entries ADD COLUMN {column} {decl}")
            last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            chained = Entry(**{**asdict(entry), "seq": seq, "prev_hash": prev,
                               "created_at": entry.created_at or time.time(), "hash": ""})
            chained = Entry(**{**asdict(chained), "hash": chained.content_hash(key)})
            values = [getattr(chained, c) for c in _COLUMNS]
            values[_COLUMNS.index("secure_rng")] = int(chained.secure_rng)
            con.execute(f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})", values)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('seal', ?)",
                        (seal(key, seq, chained.hash),))
            con.execute("COMMIT")
            return chained
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    # -- checking ----------------------------------------------------------
    def meta(self, key: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    def verify_chain(self) -> list[str]:
        """Problems with the chain and the seal (empty when intact), checked with the key."""
        key = read_key(self.key_path) if self.key_path.is_file() else None
        return verify_chain(self.entries(), key=key, sealed=self.meta("seal"))


def verify_chain(entries: Sequence[Entry], *, key: bytes | None = None,
                 sealed: str | None = None) -> list[str]:
    """Problems with a ledger's chain. Keyed entries are checked only with ``key``
    (without it their linkage is still checked); with ``key`` the seal over the
    entry count and last hash is checked too, which catches a deleted newest row."""
    problems = []
    prev = GENESIS
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            problems.append(f"entry seq {e.seq} found where {i} was expected (row deleted or inserted)")
        if e.prev_hash != prev:
            problems.append(f"entry {e.seq}: prev_hash does not match entry {e.seq - 1}'s hash")
        if e.keyed and key is not None and e.content_hash(key) != e.hash:
            problems.append(f"entry {e.seq}: content does not match its keyed hash (row edited, "
                            "or the chain rebuilt without the site's key)")
        elif not e.keyed and e.content_hash() != e.hash:
            problems.append(f"entry {e.seq}: content does not match its hash (row edited)")
        prev = e.hash
    if key is not None and entries and any(e.keyed for e in entries):
        if sealed is None or not hmac.compare_digest(sealed, seal(key, len(entries), prev)):
            problems.append(f"the ledger's seal does not match its {len(entries)} entries ending "
                            f"in {prev[:24]}…: entries were deleted (the newest?) or the file "
                            "was rewritten")
    return problems

"""The site's privacy ledger: append-only, hash-chained SQLite.

One file per site. Each entry is one training round the site took part in,
with the raw mechanism tuple (σ, q, steps) and everything an auditor needs.
ε is always recomputed from the tuples; the stored ``epsilon_after`` is a
cache that the audit checks.

Entries are committed (``synchronous=FULL``, one transaction) *before* the
site's update is released. Triggers refuse UPDATE and DELETE; the hash chain
detects edits made behind the triggers' back.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.privacy import REPORTED_ACCOUNTANT, Mechanism, epsilon

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
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
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
    seq: int = 0
    prev_hash: str = GENESIS
    hash: str = ""

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(noise_multiplier=self.noise_multiplier,
                         sample_rate=self.sample_rate, steps=self.steps)

    def content_hash(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k != "hash"}
        body["secure_rng"] = bool(body["secure_rng"])
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


_COLUMNS = [f.name for f in fields(Entry)]


def library_versions() -> str:
    import flwr
    import opacus
    import torch

    return json.dumps({"opacus": opacus.__version__, "torch": torch.__version__,
                       "flwr": flwr.__version__}, sort_keys=True)


class Ledger:
    """A site's ledger file. Cheap to open; every method is one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.execute("PRAGMA synchronous=FULL")
        return con

    # -- reading -----------------------------------------------------------
    def entries(self) -> list[Entry]:
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq").fetchall()
        return [Entry(**dict(zip(_COLUMNS, row, strict=True))) for row in rows]

    def history(self, *, exclude_run: str | None = None) -> list[Mechanism]:
        """Mechanism tuples of every entry (optionally without one run's)."""
        return [e.mechanism for e in self.entries() if e.run_id != exclude_run]

    def epsilon(self, *, delta: float, accountant: str = REPORTED_ACCOUNTANT) -> float:
        """ε over the whole ledger, recomputed from the raw tuples."""
        return epsilon(self.history(), delta=delta, accountant=accountant)

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
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            chained = Entry(**{**asdict(entry), "seq": seq, "prev_hash": prev,
                               "created_at": entry.created_at or time.time(), "hash": ""})
            chained = Entry(**{**asdict(chained), "hash": chained.content_hash()})
            values = [getattr(chained, c) for c in _COLUMNS]
            values[_COLUMNS.index("secure_rng")] = int(chained.secure_rng)
            con.execute(f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})", values)
            con.execute("COMMIT")
            return chained
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    # -- checking ----------------------------------------------------------
    def verify_chain(self) -> list[str]:
        """Problems with the hash chain (empty when intact)."""
        return verify_chain(self.entries())


def verify_chain(entries: Sequence[Entry]) -> list[str]:
    problems = []
    prev = GENESIS
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            problems.append(f"entry seq {e.seq} found where {i} was expected (row deleted or inserted)")
        if e.prev_hash != prev:
            problems.append(f"entry {e.seq}: prev_hash does not match entry {e.seq - 1}'s hash")
        if e.content_hash() != e.hash:
            problems.append(f"entry {e.seq}: content does not match its hash (row edited)")
        prev = e.hash
    return problems

"""Real ledgers and run directories for the audit's tests, written as a site and a
coordinator write them: the real :class:`~common.privacy.ledger.Ledger`, σ planned by
the site's planner (:func:`common.privacy.planning.plan_round`), each round's entry
committed before its reply, the reply's signed anchor recorded by the coordinator in
``summary.json``, and the site's public key registered in the run directory."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

from common.audit.sources import register_public_key, site_dir
from common.privacy.accounting import LEDGER_ACCOUNTANT, RECORD, epsilon
from common.privacy.ledger import (
    GENESIS,
    Entry,
    Ledger,
    accountant_version,
    public_key_pem,
    sign_anchor,
)
from common.privacy.planning import plan_round
from common.protocol import released_fields

DELTA = 1e-5
DATA = Path(__file__).parent / "data"


def charge_run(ledger: Ledger, *, run_id: str, rounds: int, cap: float = 4.0, n: int = 80,
               batch: int = 16, delta: float = DELTA, unit: str = RECORD, group_size: int = 1,
               first_round: int = 1) -> list[dict]:
    """A site's run: σ planned against the ledger's prior history, each round's
    entry committed, then the reply. Returns the history rows the coordinator
    records (public values and the reply's signed anchor)."""
    if ledger.cap() is None:
        ledger.record_cap(epsilon=cap, delta=delta, reason="first use")
    prior = ledger.history()
    plan = plan_round(num_units=n, batch_size=batch, epochs=1, rounds=rounds,
                      target_epsilon=ledger.cap()[0], delta=delta, prior=prior)
    m = plan.mechanism
    rows = []
    for r in range(first_round, first_round + rounds):
        eps = epsilon([*ledger.history(), m], delta=delta)
        ledger.append(Entry(
            run_id=run_id, round=r, noise_multiplier=m.noise_multiplier,
            sample_rate=m.sample_rate, steps=m.steps, clip_norm=1.0, delta=delta,
            sampler="poisson", secure_rng=False, accountant=LEDGER_ACCOUNTANT,
            accountant_version=accountant_version(), libraries="{}", dataset_size=n,
            epsilon_after=eps, unit=unit, group_size=group_size))
        rows.append({"round": r, "run_id": run_id, "noise_multiplier": m.noise_multiplier,
                     "sample_rate": m.sample_rate, "steps": m.steps, "num_examples": n,
                     "epsilon_after": eps, "dp": True, "privacy_unit": unit,
                     **ledger.anchor().to_record()})
    return rows


def write_summary(run_dir: Path, histories: dict[str, list[dict]], *, run_id: str = "run-a",
                  cap: float = 4.0, delta: float = DELTA) -> dict:
    """``summary.json`` as the coordinator writes it (the sites' histories with anchors)."""
    summary = {
        "run_id": run_id, "mode": "federated", "dp": True, "dataset": "synthetic",
        "final": {"accuracy": 0.9, "auc": 0.95, "balanced_accuracy": 0.9},
        "sites": {sid: {"dp": True, "epsilon": rows[-1]["epsilon_after"], "delta": delta,
                        "status": "active", "num_examples": rows[-1]["num_examples"],
                        "history": rows} for sid, rows in histories.items()},
        "privacy": {"dp": True, "target_epsilon": cap, "target_delta": delta,
                    "hyperparameters": "public", "unit": "record",
                    "not_charged": ["num-examples (declared public)"],
                    "released": released_fields()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def make_run(run_dir: Path, *, sites: tuple[str, ...] = ("0",), rounds: int = 3,
             cap: float = 4.0, run_id: str = "run-a", register: bool = True,
             **kw) -> dict:
    """A run directory: per site a ledger under ``sites/site-<id>/``, its public key
    registered beside it (the coordinator's copy), and ``summary.json``."""
    histories = {}
    for sid in sites:
        ledger = Ledger(site_dir(run_dir, sid) / "ledger.sqlite")
        histories[sid] = charge_run(ledger, run_id=run_id, rounds=rounds, cap=cap, **kw)
        if register:
            register_public_key(run_dir, sid, ledger.public_key())
    return write_summary(run_dir, histories, run_id=run_id, cap=cap)


def ledger_path(run_dir: Path, site: str = "0") -> Path:
    return site_dir(run_dir, site) / "ledger.sqlite"


def sql(path: Path, *statements: str, params=()) -> None:
    """Edit a ledger behind its triggers' back, as anyone with the file can
    (``params`` bind the last statement)."""
    con = sqlite3.connect(path)
    try:
        for i, s in enumerate(statements, start=1):
            con.execute(s, params if i == len(statements) else ())
        con.commit()
    finally:
        con.close()


def rechain(path: Path, *, resign_with=None) -> None:
    """Rebuild a ledger's chain after its rows were edited (what anyone with the file
    can do: the chain is plain SHA-256), and with ``resign_with`` (a private key:
    the site's own, or another) sign a new seal over it and declare that key. The
    append-only triggers are put back, as a careful forger would."""
    from common.audit.sources import read_ledger

    lf = read_ledger(path)
    con = sqlite3.connect(path)
    for name in ("entries_no_update", "entries_no_delete"):
        con.execute(f"DROP TRIGGER IF EXISTS {name}")
    prev = GENESIS
    rows = con.execute("SELECT rowid FROM entries ORDER BY seq").fetchall()
    for i, (e, (rowid,)) in enumerate(zip(lf.entries, rows, strict=True), start=1):
        fixed = replace(e, seq=i, prev_hash=prev, hash="")
        fixed = replace(fixed, hash=fixed.content_hash())
        con.execute("UPDATE entries SET seq=?, prev_hash=?, hash=? WHERE rowid=?",
                    (i, prev, fixed.hash, rowid))
        prev = fixed.hash
    if resign_with is not None:
        ledger_id = con.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()[0]
        sealed = sign_anchor(resign_with, ledger_id, len(rows), prev)
        con.execute("INSERT OR REPLACE INTO meta VALUES ('signed_seal', ?)",
                    (json.dumps(sealed.to_dict()),))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('public_key', ?)",
                    (public_key_pem(resign_with.public_key()),))
    for name, verb in (("entries_no_update", "UPDATE"), ("entries_no_delete", "DELETE")):
        con.execute(f"CREATE TRIGGER {name} BEFORE {verb} ON entries BEGIN SELECT "
                    f"RAISE(ABORT, 'privacy ledger is append-only: {verb} refused'); END")
    con.commit()
    con.close()


def resign_anchors(summary_path: Path, site: str, key) -> None:
    """What a coordinator colluding with the site does: re-sign the recorded anchors
    over the rewritten ledger (with the site's key)."""
    from common.audit.sources import read_ledger

    s = json.loads(summary_path.read_text())
    lf = read_ledger(ledger_path(summary_path.parent, site))
    for h in s["sites"][site]["history"]:
        e = lf.entries[h["ledger_entries"] - 1]
        h.update(sign_anchor(key, lf.ledger_id, h["ledger_entries"], e.hash).to_record())
    summary_path.write_text(json.dumps(s))


def summary_to_match(run_dir: Path, site: str = "0", delta: float = DELTA) -> None:
    """Edit ``summary.json`` so its reported σ and ε agree with the (edited) ledger,
    keeping the anchors as they were."""
    from common.audit.sources import read_ledger

    lf = read_ledger(ledger_path(run_dir, site))
    s = json.loads((run_dir / "summary.json").read_text())
    s["sites"][site]["epsilon"] = epsilon([e.mechanism for e in lf.entries], delta=delta)
    for h in s["sites"][site]["history"]:
        h["noise_multiplier"] = lf.entries[h["ledger_entries"] - 1].noise_multiplier
    (run_dir / "summary.json").write_text(json.dumps(s))


def legacy_ledger(path: Path, which: str = "hmac") -> Path:
    """An older ledger, from the SQL its own code wrote (``tests/common/data``): ``hmac``
    (the keyed chain; its secret is ``bytes(range(32))``) or ``unkeyed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript((DATA / f"legacy_{which}_ledger.sql").read_text())
    con.close()
    return path


LEGACY_SECRET = bytes(range(32))

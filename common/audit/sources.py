"""What the audit reads: ledgers (SQLite files and delivered exports), run records,
the anchors they hold, seals and public keys. Read-only: an audit never alters
the evidence, and reading never raises on a bad ledger (it says what is wrong).

The run directory the audit expects (``<run>``)::

    <run>/summary.json                  the run records; each site's history rows carry
                                        the anchor of each reply: ledger_id,
                                        ledger_entries, ledger_head, ledger_signature,
                                        ledger_key_id (Anchor.to_record)
    <run>/config.toml                   the resolved config (ledger-dir, target-epsilon)
    <run>/sites/site-<id>/ledger.pub    the site's registered Ed25519 public key (the
                                        coordinator's copy, PEM or OpenSSH)
    <run>/sites/site-<id>/ledger.json   the ledger export the site delivered
    <run>/sites/site-<id>/ledger.sqlite the ledger itself, where the run can see it (a
                                        simulation; else under config ``ledger-dir``)

Keys the auditor holds (``--public-keys DIR``): ``DIR/site-<id>/ledger.pub`` or
``DIR/site-<id>/ledger.key.pub`` (what ``fedtransfer deploy certs`` writes). They take
precedence over the run directory's, and a run directory key that differs is a finding.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.ledger import (
    CAP_COLUMNS,
    EXPORT_FORMAT,
    Anchor,
    Entry,
    coerce_entry,
    key_id,
    load_public_key,
    public_key_pem,
    read_legacy_key,
)

SITES_DIR = "sites"
LEDGER_FILE = "ledger.sqlite"
EXPORT_FILE = "ledger.json"
REGISTERED_KEY = "ledger.pub"  # the coordinator's copy of a site's public key
DEPLOY_KEY = "ledger.key.pub"  # the public half fedtransfer deploy certs writes
KEY_NAMES = (REGISTERED_KEY, DEPLOY_KEY)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SITE_DIR = re.compile(r"^site-(.+)$")


def site_dir(root: str | Path, site_id: str | int) -> Path:
    """``<root>/sites/site-<id>``: a site's folder in a run directory."""
    return Path(root) / SITES_DIR / f"site-{site_id}"


def register_public_key(run_dir: str | Path, site_id: str | int,
                        public_key: bytes | str | Path | Ed25519PublicKey) -> Path:
    """Keep a site's public key where the audit looks for it
    (``<run>/sites/site-<id>/ledger.pub``); what a coordinator does before the run.

    Raises:
        ValueError: not an Ed25519 public key, or the site already has a different one
            registered there (a key is never silently replaced).
    """
    key = load_public_key(public_key)
    path = site_dir(run_dir, site_id) / REGISTERED_KEY
    if path.is_file():
        old = load_public_key(path)
        if key_id(old) != key_id(key):
            raise ValueError(f"site {site_id} already has another key registered at {path} "
                             f"({key_id(old)}); remove it by hand to replace it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(public_key_pem(key))
    return path


def site_id_of(ledger_path: Path) -> str:
    """``.../site-3/ledger.sqlite`` -> ``"3"``; otherwise the file's stem."""
    m = _SITE_DIR.match(ledger_path.parent.name)
    return m.group(1) if m else ledger_path.stem


# --------------------------------------------------------------------------
# Ledgers
# --------------------------------------------------------------------------
class LedgerUnreadable(ValueError):
    """The file is no readable fedtransfer ledger (the audit reports it, never raises it)."""


@dataclass(frozen=True)
class LedgerFile:
    """A ledger as read: a SQLite file or a delivered export."""

    path: Path
    kind: str  # "sqlite" or "export"
    entries: list[Entry]
    malformed: dict[int, list[str]] = field(default_factory=dict)  # row (1-based) -> problems
    triggers: tuple[str, ...] | None = None  # None for an export (it has none)
    caps: list[dict] = field(default_factory=list)  # the site's recorded caps, oldest first
    ledger_id: str | None = None
    seal: Anchor | None = None  # the signed seal the ledger (or export) holds
    seal_problem: str | None = None  # a seal that is there but cannot be read
    legacy_seal: str | None = None  # an older ledger's HMAC seal
    public_key: str | None = None  # the key the ledger itself declares (not trusted)


def read_ledger(path: str | Path) -> LedgerFile:
    """A ledger file or export, opened read-only.

    ``common.privacy.ledger.Ledger`` would (re)create the schema and triggers on
    open, which would hide a dropped trigger; this does not.

    Raises:
        FileNotFoundError: no file at ``path``.
        LedgerUnreadable: anything that is not a readable ledger, named (garbage, a
            truncated SQLite file, no entries table, an export that is not one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger file at {path}")
    try:
        with path.open("rb") as fh:
            start = fh.read(16)
    except OSError as exc:
        raise LedgerUnreadable(f"{path} cannot be read: {exc}") from exc
    if start == _SQLITE_MAGIC:
        return _read_sqlite(path)
    if start.lstrip()[:1] == b"{":
        return _read_export(path)
    raise LedgerUnreadable(f"{path} is neither a SQLite ledger nor a ledger export "
                           f"(it starts with {start[:8]!r})")


def is_ledger(path: Path) -> bool:
    try:
        read_ledger(path)
    except (LedgerUnreadable, FileNotFoundError):
        return False
    return True


def _read_sqlite(path: Path) -> LedgerFile:
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LedgerUnreadable(f"{path} cannot be opened as SQLite: {exc}") from exc
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "entries" not in tables:
            raise LedgerUnreadable(f"{path} is not a fedtransfer ledger (it has no 'entries' "
                                   "table)")
        cols = [r[1] for r in con.execute("PRAGMA table_info(entries)")]
        rows = con.execute(f"SELECT {', '.join(cols)} FROM entries ORDER BY seq").fetchall()
        triggers = tuple(sorted(r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'")))
        caps = []
        if "caps" in tables:
            caps = [dict(zip(CAP_COLUMNS, r, strict=True)) for r in con.execute(
                f"SELECT {', '.join(CAP_COLUMNS)} FROM caps ORDER BY seq")]
        meta: dict[str, Any] = {}
        if "meta" in tables:
            meta = {str(k): v for k, v in con.execute("SELECT key, value FROM meta")}
    except sqlite3.Error as exc:  # a truncated or corrupt file, a table without a column
        raise LedgerUnreadable(f"{path} is not a readable SQLite ledger: {exc}") from exc
    finally:
        con.close()
    entries, malformed = _entries([dict(zip(cols, row, strict=True)) for row in rows])
    seal, seal_problem = _stored_seal(meta.get("signed_seal"))
    return LedgerFile(path=path, kind="sqlite", entries=entries, malformed=malformed,
                      triggers=triggers, caps=_clean_caps(caps), ledger_id=_text(meta.get("ledger_id")),
                      seal=seal, seal_problem=seal_problem,
                      legacy_seal=_text(meta.get("seal")),
                      public_key=_text(meta.get("public_key")))


def _read_export(path: Path) -> LedgerFile:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LedgerUnreadable(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise LedgerUnreadable(f"{path} is not a ledger export (format "
                               f"{data.get('format') if isinstance(data, dict) else None!r}, "
                               f"expected {EXPORT_FORMAT!r})")
    rows = data.get("entries")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LedgerUnreadable(f"{path}: 'entries' is not a list of objects")
    entries, malformed = _entries(rows)
    seal, seal_problem = None, None
    if "seal" in data:
        try:
            seal = Anchor.from_dict(data["seal"])
        except ValueError as exc:
            seal_problem = str(exc)
    caps = data.get("caps") if isinstance(data.get("caps"), list) else []
    return LedgerFile(path=path, kind="export", entries=entries, malformed=malformed,
                      triggers=None, caps=_clean_caps(caps), ledger_id=_text(data.get("ledger_id")),
                      seal=seal, seal_problem=seal_problem,
                      public_key=_text(data.get("public_key")))


def _entries(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Entry], dict[int, list[str]]]:
    entries, malformed = [], {}
    for i, row in enumerate(rows, start=1):
        entry, problems = coerce_entry(row)
        entries.append(entry)
        if problems:
            malformed[i] = problems
    return entries, malformed


def _stored_seal(text: Any) -> tuple[Anchor | None, str | None]:
    if text is None:
        return None, None
    try:
        return Anchor.from_dict(json.loads(text)), None
    except (ValueError, TypeError) as exc:
        return None, f"the stored seal cannot be read: {exc}"


def _clean_caps(caps: list) -> list[dict]:
    """Caps with numeric ε and δ (others are left out: the cap check must not crash)."""
    out = []
    for c in caps:
        if isinstance(c, dict) and all(isinstance(c.get(k), int | float)
                                       and not isinstance(c.get(k), bool)
                                       for k in ("epsilon", "delta")):
            out.append({**c, "reason": str(c.get("reason", ""))})
    return out


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


# --------------------------------------------------------------------------
# Anchors, seals and keys
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordedAnchor:
    """An anchor as the run records hold it: the signature may be absent (an older
    run, or a coordinator that did not record it), and a tampered row may hold
    anything (``problem``)."""

    where: str
    count: int | None
    head: str | None
    ledger_id: str | None = None
    signature: str | None = None
    key_id: str | None = None
    problem: str | None = None

    def anchor(self, ledger_id: str | None) -> Anchor | None:
        """The signed statement, with ``ledger_id`` when the row does not name one."""
        if self.signature is None or self.count is None or self.head is None:
            return None
        return Anchor(ledger_id=self.ledger_id or ledger_id or "", count=self.count,
                      head=self.head, signature=self.signature, key_id=self.key_id or "")


def recorded_anchors(summary_site: Mapping[str, Any] | None) -> list[RecordedAnchor]:
    """The anchors of one site's replies, from its history rows in ``summary.json``
    (rows without an anchor, e.g. a non-DP site's, are skipped)."""
    out = []
    history = (summary_site or {}).get("history") if isinstance(summary_site, Mapping) else None
    for h in history if isinstance(history, list) else []:
        if not isinstance(h, Mapping):
            continue
        count, head = h.get("ledger_entries"), h.get("ledger_head")
        if count is None or count == 0:
            continue  # no entry yet (or a site without DP): nothing to anchor
        where = f"round {h.get('round')} of run {h.get('run_id') or '?'}"
        text = {k: h.get(k) for k in ("ledger_id", "ledger_signature", "ledger_key_id")}
        bad = [k for k, v in text.items() if v is not None and not isinstance(v, str)]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 \
                or not isinstance(head, str) or not head or bad:
            out.append(RecordedAnchor(where, None, None, problem=(
                f"the anchor recorded for {where} is malformed (entries {count!r}, head "
                f"{head!r}{', ' + ', '.join(bad) if bad else ''})")))
            continue
        out.append(RecordedAnchor(where, count, head, ledger_id=text["ledger_id"] or None,
                                  signature=text["ledger_signature"] or None,
                                  key_id=text["ledger_key_id"] or None))
    return out


def read_seal(path: str | Path) -> Anchor:
    """A seal file (``fedtransfer site seal --out F``).

    Raises:
        ValueError: not a seal, named.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--seal {path}: cannot be read as JSON: {exc}") from exc
    try:
        return Anchor.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"--seal {path}: not a ledger seal: {exc}") from exc


def read_legacy_keys(paths: Sequence[str | Path]) -> list[bytes]:
    """Legacy HMAC secrets given with ``--legacy-key``.

    Raises:
        ValueError: a file that is not one.
    """
    return [read_legacy_key(p) for p in paths]


@dataclass(frozen=True)
class RegisteredKey:
    key: Ed25519PublicKey
    source: str  # the file it came from

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def _key_file(folder: Path, site: str) -> Path | None:
    for name in KEY_NAMES:
        p = folder / f"site-{site}" / name
        if p.is_file():
            return p
    return None


def find_public_key(site: str, run_dir: Path | None, key_dirs: Sequence[Path]
                    ) -> tuple[RegisteredKey | None, list[str]]:
    """The site's registered public key and any problem with the registrations.

    The auditor's own directories (``--public-keys``) come first; the run
    directory's copy (``<run>/sites/site-<id>/ledger.pub``) is used when they hold
    none, and is a problem when it differs from theirs. An unreadable key file is a
    problem, never a key.
    """
    problems: list[str] = []
    found: list[RegisteredKey] = []
    places = [*key_dirs, *([run_dir / SITES_DIR] if run_dir is not None else [])]
    for folder in places:
        path = _key_file(Path(folder), site)
        if path is None:
            continue
        try:
            found.append(RegisteredKey(load_public_key(path), str(path)))
        except (ValueError, OSError) as exc:
            problems.append(f"the registered key {path} is unreadable: {exc}")
    if not found:
        return None, problems
    first = found[0]
    for other in found[1:]:
        if other.key_id != first.key_id:
            problems.append(f"the key registered at {other.source} ({other.key_id[:24]}…) "
                            f"differs from {first.source} ({first.key_id[:24]}…)")
    return first, problems


# --------------------------------------------------------------------------
# Run records and discovery
# --------------------------------------------------------------------------
@dataclass
class Source:
    """One thing to audit: a run (with its summary) or loose ledgers."""

    label: str
    path: Path
    summary: dict | None
    config: dict
    ledgers: dict[str, Path]  # site id -> its ledger (a SQLite file, else its export)
    delivered: dict[str, Path] = field(default_factory=dict)  # site id -> export, beside a SQLite
    run_dir: Path | None = None  # where registered keys are looked for
    problems: list[str] = field(default_factory=list)  # run records that cannot be read


def _site_files(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(sqlite ledgers, exports)`` by site id under ``folder``: every file named
    ``ledger.sqlite`` / ``ledger.json`` (readable or not: a bad one is reported),
    and any other ``.sqlite`` that is a readable ledger."""
    sqlite, exports = {}, {}
    if not folder.is_dir():
        return sqlite, exports
    for p in sorted(folder.rglob("*.sqlite")):
        if p.name == LEDGER_FILE or is_ledger(p):
            sqlite.setdefault(site_id_of(p), p)
    for p in sorted(folder.rglob(EXPORT_FILE)):
        exports.setdefault(site_id_of(p), p)
    return sqlite, exports


def _run_source(run_dir: Path) -> Source:
    problems = []
    summary: dict | None = None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"a JSON {type(summary).__name__}, not an object")
    except (OSError, ValueError) as exc:
        problems.append(f"{run_dir / 'summary.json'} cannot be read: {exc}")
        summary = None
    config: dict = {}
    if (run_dir / "config.toml").is_file():
        try:
            config = tomllib.loads((run_dir / "config.toml").read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{run_dir / 'config.toml'} cannot be read: {exc}")
    sqlite, exports = _site_files(run_dir / SITES_DIR)
    configured = config.get("ledger-dir")
    if isinstance(configured, str) and configured and Path(configured).is_dir() \
            and Path(configured).resolve() != (run_dir / SITES_DIR).resolve():
        more, _ = _site_files(Path(configured))
        for sid, p in more.items():
            sqlite.setdefault(sid, p)
    ledgers = {**exports, **sqlite}  # a site's SQLite file when the run sees it, else its export
    delivered = {sid: p for sid, p in exports.items() if sid in sqlite}
    return Source(label=run_dir.name, path=run_dir, summary=summary, config=config,
                  ledgers=ledgers, delivered=delivered, run_dir=run_dir, problems=problems)


def discover(paths: Sequence[str | Path]) -> list[Source]:
    """Turn command-line paths into audit sources.

    A directory with ``summary.json`` is a run. Any other directory is searched
    recursively: each ``summary.json`` found is a run, and ledgers (SQLite files,
    exports named ``ledger.json``) that belong to none of them are audited on their
    own. A file is one ledger, audited whatever it holds (a file that is no ledger
    is reported as unreadable).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder that holds no run and no ledger.
    """
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            sources.append(Source(label=str(path), path=path, summary=None, config={},
                                  ledgers={site_id_of(path): path}))
        elif path.is_dir():
            if (path / "summary.json").is_file():
                sources.append(_run_source(path))
                continue
            runs = [_run_source(p.parent) for p in sorted(path.rglob("summary.json"))]
            claimed = {p.resolve() for r in runs
                       for p in [*r.ledgers.values(), *r.delivered.values()]}
            loose: dict[str, Path] = {}
            files = [p for p in sorted(path.rglob("*.sqlite"))
                     if p.name == LEDGER_FILE or is_ledger(p)]
            files += sorted(path.rglob(EXPORT_FILE))
            for p in files:
                if p.resolve() not in claimed:
                    sid = site_id_of(p)
                    loose[sid if sid not in loose else str(p.relative_to(path))] = p
            sources += runs
            if loose:
                sources.append(Source(label=f"{path} (ledgers)", path=path, summary=None,
                                      config={}, ledgers=loose))
            if not runs and not loose:
                raise ValueError(f"{path} holds no run directory (summary.json) and no ledger "
                                 "(a .sqlite ledger or a ledger.json export)")
        else:
            raise FileNotFoundError(f"{path} does not exist (give a run directory, a ledger "
                                    "file or export, or a folder of them)")
    return sources

"""The site's privacy ledger: append-only, hash-chained SQLite, sealed with the site's signature.

One file per site. Each entry is one DP release (a training round, or a scaling
release as round 0) with the raw mechanism tuple (σ, q, steps) and everything an
auditor needs. ε is always recomputed from the tuples; the stored
``epsilon_after`` is a cache that the audit checks.

Entries are committed (``synchronous=FULL``, one transaction) *before* the
site's update is released. Triggers refuse UPDATE and DELETE.

**What an entry may hold.** A ledger's rows leave the site (at delivery, and the
head hash in every reply's anchor) and are covered by signatures, so an entry holds
only DP outputs and public values: the mechanism, the public record count, the site's
declared unit of privacy and group size, library versions and the time
(:data:`ENTRY_FIELDS` classes every field). No hash of the records, which would be a
membership oracle for anyone who knows all records but one: ``data_fingerprint``
is ``""`` in every new entry (older ledgers keep theirs; the column stays).

**Chain and signatures.** An entry's hash is ``sha256:`` + the SHA-256 of its
canonical JSON (every field but the hash, the previous entry's hash included), so
the last hash commits to the whole history. A chain alone proves nothing (anyone
with the file can rebuild one); a signature does. The site's Ed25519 key (the node
config's ``ledger-key``; default ``<ledger-path>.key``, made on first use with mode
0600, its public half written beside it as ``<key>.pub``, PEM SubjectPublicKeyInfo)
signs (ledger id, entry count, head hash):

* the **seal**, kept in the ledger's ``meta`` table and re-signed in each append's
  transaction; ``fedtransfer site seal`` makes a fresh one, with its time, to hand
  to an auditor;
* the **anchor** each reply carries (:meth:`Ledger.anchor`), recorded by the
  coordinator.

Verifying needs only the public key (:func:`verify_anchor`), so whoever verifies
cannot forge. The federation keeps each site's public key (``fedtransfer deploy
certs`` makes the pair before any run).

**Older ledgers** are read as they are: entries hashed ``hmac-sha256:`` (the keyed
chain: its secret key both checks and forges) and the oldest, unkeyed SHA-256
entries. Appending to one continues its chain with signed entries; a legacy HMAC
secret found at the key path is moved to ``<key>.legacy-hmac`` (kept for whoever
wants to check the old rows) and a signing key is made in its place. No signature
made later proves what a legacy row said before it, so the audit never counts
legacy entries as verified (:mod:`common.audit.checks`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.privacy.accounting import (
    PRIVACY_UNITS,
    RECORD,
    REPORTED_ACCOUNTANT,
    Mechanism,
    epsilon,
)

log = logging.getLogger(__name__)

GENESIS = "0" * 64
SCHEMA_VERSION = 2  # 2: signed seal, unit and group_size columns, no data hash
SIGNED = "sha256:"  # the hash prefix of an entry in a signed ledger
LEGACY_KEYED = "hmac-sha256:"  # the keyed chain before signed ledgers
HASH_FORMATS = (SIGNED_FORMAT, LEGACY_KEYED_FORMAT, LEGACY_UNKEYED_FORMAT) = (
    "signed", "legacy-hmac", "legacy-unkeyed")
ANCHOR_FORMAT = "fedtransfer-ledger-anchor/1"  # what a reply's anchor signs
SEAL_FORMAT = "fedtransfer-ledger-seal/1"  # a seal with its time (fedtransfer site seal)
EXPORT_FORMAT = "fedtransfer-ledger-export/1"
LEGACY_KEY_SUFFIX = ".legacy-hmac"

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
    unit TEXT NOT NULL DEFAULT 'record',
    group_size INTEGER NOT NULL DEFAULT 1,
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
# Columns added after SCHEMA_VERSION 1's first ledgers (absent from older files:
# read as their default, added on the next append).
_ADDED_COLUMNS = {"trained": "TEXT NOT NULL DEFAULT ''",
                  "unit": f"TEXT NOT NULL DEFAULT '{RECORD}'",
                  "group_size": "INTEGER NOT NULL DEFAULT 1"}
CAP_COLUMNS = ("seq", "epsilon", "delta", "created_at", "reason")


def canonical_json(obj: Any) -> bytes:
    """The one byte form that is hashed, signed and exported: sorted keys, no spaces,
    ASCII. Values JSON cannot hold (bytes from a tampered file) are written as
    strings, so hashing never raises; they never match an honest hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


@dataclass(frozen=True, kw_only=True)
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
    epsilon_after: float
    # A hash of the site's records in older ledgers; always "" in new entries
    # (a membership oracle: see the module docstring). The site keeps its data
    # fingerprint in its own local state.
    data_fingerprint: str = ""
    created_at: float = 0.0
    # What the round trained and released (JSON: the trainable mode and its parameter
    # count, e.g. {"params": 7810, "trainable": "bitfit"}). ε never depends on it.
    trained: str = ""
    # The site's declared unit of privacy (accounting.PRIVACY_UNITS) and the most
    # records one patient has at the site (its public declaration; 1 when every
    # patient has one record). Older ledgers read them as these defaults.
    unit: str = RECORD
    group_size: int = 1
    seq: int = 0
    prev_hash: str = GENESIS
    hash: str = ""

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(noise_multiplier=self.noise_multiplier,
                         sample_rate=self.sample_rate, steps=self.steps)

    @property
    def hash_format(self) -> str:
        """``signed`` (a signed ledger's entry), ``legacy-hmac`` or ``legacy-unkeyed``."""
        h = str(self.hash)
        return (SIGNED_FORMAT if h.startswith(SIGNED) else
                LEGACY_KEYED_FORMAT if h.startswith(LEGACY_KEYED) else LEGACY_UNKEYED_FORMAT)

    def record(self) -> dict[str, Any]:
        """Every field, as stored and exported (``secure_rng`` a bool)."""
        body = asdict(self)
        if isinstance(body["secure_rng"], int):
            body["secure_rng"] = bool(body["secure_rng"])
        return body

    def content_hash(self) -> str:
        """``sha256:`` + the SHA-256 of every field but ``hash`` (a signed ledger's entry)."""
        body = self.record()
        del body["hash"]
        return SIGNED + hashlib.sha256(canonical_json(body)).hexdigest()

    def legacy_hash(self, key: bytes | None = None) -> str:
        """The hash an older ledger stored: SHA-256 (the oldest, unkeyed chain) or
        ``hmac-sha256:`` + the HMAC under the site's secret key. Neither covers
        ``unit`` and ``group_size`` (they did not exist), nor ``trained`` when empty."""
        body = self.record()
        for name in ("hash", "unit", "group_size"):
            del body[name]
        if not body["trained"]:
            del body["trained"]
        text = canonical_json(body)
        if key is None:
            return hashlib.sha256(text).hexdigest()
        return LEGACY_KEYED + hmac.new(key, text, hashlib.sha256).hexdigest()


# The privacy class of every entry field: an entry may hold nothing else (a test
# fails when a field is added without a class here).
ENTRY_FIELDS = {
    "run_id": "public: the run's id, chosen by the coordinator",
    "round": "public: the round (0 for a scaling release)",
    "noise_multiplier": "mechanism: σ, planned from the cap, δ, the schedule and the public count",
    "sample_rate": "mechanism: Poisson sampling rate q, from the public count and batch size",
    "steps": "mechanism: DP-SGD steps, from the public count, batch size and epochs",
    "clip_norm": "mechanism: the clip norm (from the request, or the schema's public bound)",
    "delta": "public: the site's δ",
    "sampler": "mechanism: the sampling scheme",
    "secure_rng": "mechanism: whether the noise came from a CSPRNG",
    "accountant": "public: the accountant and neighbour relation",
    "accountant_version": "public: the accountant library's version",
    "libraries": "public: versions of the privacy libraries",
    "dataset_size": "public: the site's record count (sent with every reply)",
    "epsilon_after": "derived: ε of the mechanism history at δ",
    "data_fingerprint": "empty: always '' in new entries (older ledgers: a hash of the records)",
    "created_at": "time: when the entry was committed",
    "trained": "public: the trainable mode and its parameter count",
    "unit": "public: the site's declared unit of privacy",
    "group_size": "public: the site's declared most records per patient",
    "seq": "chain: the entry's position",
    "prev_hash": "chain: the previous entry's hash",
    "hash": "chain: this entry's hash",
}
_COLUMNS = [f.name for f in fields(Entry)]
_REQUIRED = [f.name for f in fields(Entry) if f.name not in
             ("data_fingerprint", "created_at", "trained", "unit", "group_size", "seq",
              "prev_hash", "hash")]


def read_entries(con: sqlite3.Connection) -> list[Entry]:
    """Every entry of an open ledger, oldest first; an older ledger's missing
    columns take their defaults."""
    present = {r[1] for r in con.execute("PRAGMA table_info(entries)")}
    cols = [c for c in _COLUMNS if c in present]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM entries ORDER BY seq").fetchall()
    out = []
    for row in rows:
        values = dict(zip(cols, row, strict=True))
        values["secure_rng"] = bool(values["secure_rng"])
        out.append(Entry(**values))
    return out


_KINDS = {f.name: f.type for f in fields(Entry)}  # 'str' / 'int' / 'float' / 'bool'


def coerce_entry(values: Mapping[str, Any]) -> tuple[Entry, list[str]]:
    """An :class:`Entry` from stored values (a ledger row or an export's), never
    raising, and what was wrong with them.

    A value of the wrong type is kept as it is (so the entry's hash fails on it and
    its mechanism cannot be built) and named; bytes become ``blob:<hex>``; a missing
    column of the first schema is ``None``; unknown keys are named.
    """
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for name in _REQUIRED:
        if name not in values:
            problems.append(f"no '{name}'")
            kwargs[name] = None
    for key in values:
        if key not in _KINDS:
            problems.append(f"unknown field '{key}'")
    for name, kind in _KINDS.items():
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bytes | bytearray | memoryview):
            problems.append(f"{name} holds bytes")
            v = "blob:" + bytes(v).hex()
        elif kind == "float":
            if isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            elif not isinstance(v, float):
                problems.append(f"{name} is {type(v).__name__} {v!r}, not a number")
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"{name} is {type(v).__name__} {v!r}, not an integer")
        elif kind == "bool":
            if isinstance(v, int) and v in (0, 1):
                v = bool(v)
            else:
                problems.append(f"{name} is {v!r}, not a boolean")
        elif not isinstance(v, str):
            problems.append(f"{name} is {type(v).__name__} {v!r}, not text")
            if name in ("hash", "prev_hash"):
                v = str(v)
        kwargs[name] = v
    if isinstance(kwargs.get("unit"), str) and kwargs["unit"] not in PRIVACY_UNITS:
        problems.append(f"unit {kwargs['unit']!r} is none of {', '.join(PRIVACY_UNITS)}")
    if isinstance(kwargs.get("group_size"), int) and kwargs["group_size"] < 1:
        problems.append(f"group_size {kwargs['group_size']} is below 1")
    return Entry(**kwargs), problems


# --------------------------------------------------------------------------
# Keys and signatures (Ed25519, ``cryptography``)
# --------------------------------------------------------------------------
def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 pair: ``(private key PEM (PKCS#8), public key PEM (SubjectPublicKeyInfo))``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return private, public_key_pem(key.public_key()).encode()


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """The public key's fingerprint: ``ed25519:`` + SHA-256 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


def load_public_key(data: bytes | str | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a file (``Path``) or its text: PEM
    (``-----BEGIN PUBLIC KEY-----``) or OpenSSH (``ssh-ed25519 AAAA...``).

    Raises:
        ValueError: anything else, named.
    """
    if isinstance(data, Ed25519PublicKey):
        return data
    where = f"{data}" if isinstance(data, Path) else "the given text"
    raw = data.read_bytes() if isinstance(data, Path) else (
        data.encode() if isinstance(data, str) else bytes(data))
    raw = raw.strip()
    try:
        if raw.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(raw)
        elif raw.startswith(b"-----BEGIN PUBLIC KEY-----"):
            key = serialization.load_pem_public_key(raw)
        else:
            raise ValueError("neither PEM ('-----BEGIN PUBLIC KEY-----') nor OpenSSH "
                             "('ssh-ed25519 ...')")
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{where} is not a readable Ed25519 public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The site's Ed25519 private key (PEM, PKCS#8).

    Raises:
        ValueError: the file holds something else (a legacy HMAC secret, another key type).
    """
    data = Path(path).read_bytes()
    if not _is_pem(data):
        raise ValueError(f"{path} is not a PEM private key (a legacy HMAC ledger secret?)")
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_path(key_path: str | Path) -> Path:
    """``<key>.pub``: where the public half of a signing key is written."""
    return Path(str(key_path) + ".pub")


def ensure_key_pair(key_path: str | Path) -> Ed25519PublicKey:
    """The public key of the signing key at ``key_path``, made first when absent
    (private key mode 0600, ``<key>.pub`` beside it). A coordinator provisioning a
    site's key (``fedtransfer deploy certs``, a simulation) and the site itself
    call this; ``<key>.pub`` is rewritten when missing.

    Raises:
        ValueError: the file holds something other than an Ed25519 private key.
    """
    key_path = Path(key_path)
    if not key_path.is_file():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        private, _ = generate_key_pair()
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile: use that one
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(private)
                fh.flush()
                os.fsync(fh.fileno())
    public = load_signing_key(key_path).public_key()
    pub = public_key_path(key_path)
    pem = public_key_pem(public)
    if not pub.is_file() or pub.read_text().strip() != pem.strip():
        tmp = pub.with_name(pub.name + ".tmp")
        tmp.write_text(pem)
        os.replace(tmp, pub)
    return public


@dataclass(frozen=True)
class Anchor:
    """A signed statement "ledger ``ledger_id`` held ``count`` entries ending in
    ``head``": the anchor a reply carries, or (with ``sealed_at``) a seal.

    ``signature`` is hex Ed25519 over :meth:`message`; ``key_id`` names the key
    (:func:`key_id`). Every field is public: the ledger id is random, the head hash
    commits only to public values and DP outputs.
    """

    ledger_id: str
    count: int
    head: str
    signature: str
    key_id: str
    sealed_at: float | None = None

    def message(self) -> bytes:
        """The bytes signed: the format, the ledger id, the count, the head (and the time
        of a seal)."""
        return statement(self.ledger_id, self.count, self.head, self.sealed_at)

    def to_dict(self) -> dict[str, Any]:
        """A seal file's or an export's ``seal``: the fields and the format."""
        return {"format": SEAL_FORMAT if self.sealed_at is not None else ANCHOR_FORMAT,
                **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Anchor:
        """The inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing field, or one of the wrong type, named.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a seal is a JSON object, got {type(d).__name__}")
        if d.get("format") not in (ANCHOR_FORMAT, SEAL_FORMAT):
            raise ValueError(f"format {d.get('format')!r} is neither {ANCHOR_FORMAT!r} nor "
                             f"{SEAL_FORMAT!r}")
        missing = [k for k in ("ledger_id", "count", "head", "signature", "key_id") if k not in d]
        if missing:
            raise ValueError(f"the seal lacks {missing}")
        return _anchor(d["ledger_id"], d["count"], d["head"], d["signature"], d["key_id"],
                       d.get("sealed_at"))

    # -- the run records' form (the coordinator records one per reply) ---------
    def to_record(self) -> dict[str, Any]:
        """The keys a run record's site-history row carries (``summary.json``):
        ``ledger_id, ledger_entries, ledger_head, ledger_signature, ledger_key_id``."""
        return {"ledger_id": self.ledger_id, "ledger_entries": self.count,
                "ledger_head": self.head, "ledger_signature": self.signature,
                "ledger_key_id": self.key_id}

    def to_wire(self) -> dict[str, Any]:
        """The same keys, kebab-case, for a Flower ``ConfigRecord`` (str and int values)."""
        return {k.replace("_", "-"): v for k, v in self.to_record().items()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Anchor:
        """An anchor from a history row or a reply (snake- or kebab-case keys).

        Raises:
            ValueError: a field is missing (an unsigned anchor has no signature) or
                of the wrong type.
        """
        r = {str(k).replace("-", "_"): v for k, v in rec.items()}
        missing = [k for k in ("ledger_id", "ledger_entries", "ledger_head", "ledger_signature",
                               "ledger_key_id") if not r.get(k) and r.get(k) != 0]
        if missing:
            raise ValueError(f"the anchor lacks {missing}")
        return _anchor(r["ledger_id"], r["ledger_entries"], r["ledger_head"],
                       r["ledger_signature"], r["ledger_key_id"], None)


def _anchor(ledger_id, count, head, signature, key, sealed_at) -> Anchor:
    for name, v in (("ledger_id", ledger_id), ("head", head), ("signature", signature),
                    ("key_id", key)):
        if not isinstance(v, str):
            raise ValueError(f"{name} must be text, got {type(v).__name__}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    if sealed_at is not None and (isinstance(sealed_at, bool)
                                  or not isinstance(sealed_at, int | float)
                                  or not math.isfinite(sealed_at)):
        raise ValueError(f"sealed_at must be a time in seconds, got {sealed_at!r}")
    return Anchor(ledger_id=ledger_id, count=count, head=head, signature=signature, key_id=key,
                  sealed_at=None if sealed_at is None else float(sealed_at))


def statement(ledger_id: str, count: int, head: str, sealed_at: float | None = None) -> bytes:
    """What an anchor (``sealed_at`` None) or a seal signs."""
    body: dict[str, Any] = {"format": ANCHOR_FORMAT if sealed_at is None else SEAL_FORMAT,
                            "ledger_id": ledger_id, "count": count, "head": head}
    if sealed_at is not None:
        body["sealed_at"] = sealed_at
    return canonical_json(body)


def sign_anchor(key: Ed25519PrivateKey, ledger_id: str, count: int, head: str,
                sealed_at: float | None = None) -> Anchor:
    """Sign (ledger id, count, head[, time]) with the site's key."""
    signature = key.sign(statement(ledger_id, count, head, sealed_at)).hex()
    return Anchor(ledger_id=ledger_id, count=int(count), head=head, signature=signature,
                  key_id=key_id(key.public_key()), sealed_at=sealed_at)


def anchor_problem(public_key: bytes | str | Path | Ed25519PublicKey, anchor: Anchor
                   ) -> str | None:
    """Why ``anchor`` does not verify under ``public_key`` (None when it does)."""
    try:
        key = load_public_key(public_key)
    except ValueError as exc:
        return str(exc)
    expected = key_id(key)
    if anchor.key_id != expected:
        return (f"signed by key {anchor.key_id[:24]}…, not the registered key "
                f"{expected[:24]}…")
    try:
        signature = bytes.fromhex(anchor.signature)
    except ValueError:
        return "the signature is not hexadecimal"
    try:
        key.verify(signature, anchor.message())
    except InvalidSignature:
        return "the signature does not verify (the signed fields were changed, or it is forged)"
    return None


def verify_anchor(public_key: bytes | str | Path | Ed25519PublicKey, anchor: Anchor) -> bool:
    """Whether ``anchor`` was signed by ``public_key``'s owner, as it stands. Needs
    only the public key."""
    return anchor_problem(public_key, anchor) is None


# --------------------------------------------------------------------------
# Older ledgers
# --------------------------------------------------------------------------
def legacy_seal(key: bytes, count: int, head: str) -> str:
    """An older ledger's keyed seal over (entry count, last hash) (meta ``seal``)."""
    return hmac.new(key, f"{count}:{head}".encode(), hashlib.sha256).hexdigest()


def read_legacy_key(path: str | Path) -> bytes:
    """An older ledger's HMAC secret (32 random bytes)."""
    data = Path(path).read_bytes()
    if len(data) < 32 or _is_pem(data):
        raise ValueError(f"{path} is not a legacy ledger secret (32 raw bytes; found "
                         f"{len(data)} bytes{', PEM' if _is_pem(data) else ''})")
    return data


def chain_problems(entries: Sequence[Entry], *, legacy_key: bytes | None = None) -> list[str]:
    """What is wrong with a chain on its own (empty when intact): positions, links,
    and each entry's hash. Signed-ledger entries and the oldest unkeyed ones are
    recomputed; ``hmac-sha256:`` entries only with ``legacy_key``. A chain that is
    intact proves nothing by itself: the seal's signature and the anchors do.
    """
    problems = []
    prev = GENESIS
    signed_seen = False
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            problems.append(f"entry seq {e.seq} found where {i} was expected "
                            "(row deleted or inserted)")
        if e.prev_hash != prev:
            problems.append(f"entry {e.seq}: prev_hash does not match entry {i - 1}'s hash")
        fmt = e.hash_format
        if fmt == SIGNED_FORMAT:
            signed_seen = True
            if e.content_hash() != e.hash:
                problems.append(f"entry {e.seq}: content does not match its hash (row edited)")
        else:
            if signed_seen:
                problems.append(f"entry {e.seq}: an older-format ({fmt}) entry after a signed "
                                "one (the chain was rewritten)")
            if (e.unit, e.group_size) != (RECORD, 1):
                problems.append(f"entry {e.seq}: an older-format entry with unit {e.unit!r} and "
                                f"group size {e.group_size!r}, which its hash does not cover")
            if fmt == LEGACY_KEYED_FORMAT:
                if legacy_key is not None and not hmac.compare_digest(
                        e.legacy_hash(legacy_key), str(e.hash)):
                    problems.append(f"entry {e.seq}: content does not match its keyed hash "
                                    "(row edited, or the chain rebuilt with another key)")
            elif e.legacy_hash() != e.hash:
                problems.append(f"entry {e.seq}: content does not match its hash (row edited)")
        prev = e.hash
    return problems


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------
# The libraries whose versions a ledger entry records (and the audit reports).
PRIVACY_LIBRARIES = ("opacus", "dp-accounting", "opendp", "torch", "numpy", "flwr",
                     "cryptography")


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


def default_key_path(ledger_path: str | Path) -> Path:
    p = Path(ledger_path)
    return p.with_name(p.name + ".key")


def _check_entry(e: Entry) -> None:
    """Refuse an entry no honest site writes (nothing is recorded)."""
    e.mechanism  # noqa: B018 - raises ValueError on an impossible (σ, q, steps)
    for name in ("clip_norm", "delta", "epsilon_after", "created_at"):
        v = getattr(e, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"ledger entry: {name} must be a finite number, got {v!r}")
    if not 0 < e.delta < 1 or e.clip_norm <= 0 or e.epsilon_after < 0 or e.created_at < 0:
        raise ValueError(f"ledger entry: need 0 < δ < 1, clip norm > 0, ε >= 0 and a time >= 0; "
                         f"got δ={e.delta}, clip {e.clip_norm}, ε={e.epsilon_after}, "
                         f"time {e.created_at}")
    if e.unit not in PRIVACY_UNITS:
        raise ValueError(f"ledger entry: unit {e.unit!r} is none of {', '.join(PRIVACY_UNITS)}")
    if isinstance(e.group_size, bool) or not isinstance(e.group_size, int) or e.group_size < 1:
        raise ValueError(f"ledger entry: group_size must be an integer >= 1, got {e.group_size!r}")
    for name in ("round", "dataset_size"):
        v = getattr(e, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"ledger entry: {name} must be an integer >= 0, got {v!r}")


class Ledger:
    """A site's ledger file. Cheap to open; every method is one transaction.

    ``key_path`` is the site's Ed25519 private key (node config ``ledger-key``;
    default ``<path>.key``), made on first use.
    """

    def __init__(self, path: str | Path, key_path: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path else default_key_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('ledger_id', ?)",
                        (str(SCHEMA_VERSION), uuid.uuid4().hex))

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.execute("PRAGMA synchronous=FULL")
        return con

    # -- the signing key -----------------------------------------------------
    def _signing_key(self) -> Ed25519PrivateKey:
        """The site's key: made (mode 0600, ``<key>.pub`` beside it) on first use;
        a legacy HMAC secret at the key path is moved aside first."""
        if self.key_path.is_file() and not _is_pem(self.key_path.read_bytes()):
            self._retire_legacy_key()
        if not self.key_path.is_file() and self._has_signed_entries():
            raise ValueError(f"ledger {self.path} holds signed entries but its key "
                             f"{self.key_path} is missing: a new key would sign a chain the "
                             "federation cannot verify. Restore the key (node config "
                             "ledger-key) before the site trains again")
        ensure_key_pair(self.key_path)
        return load_signing_key(self.key_path)

    def _retire_legacy_key(self) -> None:
        legacy = Path(str(self.key_path) + LEGACY_KEY_SUFFIX)
        data = self.key_path.read_bytes()
        if legacy.exists():
            if legacy.read_bytes() != data:
                raise ValueError(f"{self.key_path} holds a legacy HMAC secret and {legacy} holds "
                                 "a different one: move one of them away by hand")
            self.key_path.unlink()
        else:
            os.replace(self.key_path, legacy)
        log.warning("ledger %s: its legacy HMAC secret moved to %s; new entries are signed with "
                    "an Ed25519 key at %s (register %s with the federation)", self.path, legacy,
                    self.key_path, public_key_path(self.key_path))

    def _has_signed_entries(self) -> bool:
        with self._connect() as con:
            row = con.execute("SELECT 1 FROM entries WHERE hash LIKE ? LIMIT 1",
                              (SIGNED + "%",)).fetchone()
        return row is not None

    def public_key(self) -> Ed25519PublicKey:
        """The site's public key (the key pair is made when absent)."""
        return self._signing_key().public_key()

    # -- reading -----------------------------------------------------------
    def ledger_id(self) -> str:
        return str(self.meta("ledger_id"))

    def head(self) -> tuple[int, str]:
        """``(entry count, last hash)``."""
        with self._connect() as con:
            row = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

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
            return _read_caps(con)

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
        """Entries in the ledger."""
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def has_round(self, run_id: str, server_round: int) -> bool:
        with self._connect() as con:
            row = con.execute("SELECT 1 FROM entries WHERE run_id=? AND round=?",
                              (run_id, server_round)).fetchone()
        return row is not None

    def meta(self, key: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    def stored_seal(self) -> Anchor | None:
        """The seal the last append signed (None before the first signed append)."""
        text = self.meta("signed_seal")
        return Anchor.from_dict(json.loads(text)) if text else None

    # -- what the site hands out ---------------------------------------------
    def anchor(self) -> Anchor:
        """The signed (ledger id, entry count, head hash) a reply carries. Ed25519 is
        deterministic: the same ledger state always gives the same anchor."""
        count, head = self.head()
        return sign_anchor(self._signing_key(), self.ledger_id(), count, head)

    def seal(self) -> Anchor:
        """A fresh seal: the anchor's statement with the time it was made
        (``fedtransfer site seal``)."""
        count, head = self.head()
        return sign_anchor(self._signing_key(), self.ledger_id(), count, head,
                           sealed_at=time.time())

    def export(self) -> dict[str, Any]:
        """Every row, the caps, a fresh signed seal over exactly those rows and the
        public key: what the site sends at delivery. ``canonical_json`` gives its bytes."""
        key = self._signing_key()
        con = self._connect()
        try:
            con.execute("BEGIN")  # one snapshot: the rows and the seal agree
            entries, caps = read_entries(con), _read_caps(con)
            ledger_id = str(con.execute("SELECT value FROM meta WHERE key='ledger_id'")
                            .fetchone()[0])
            con.execute("COMMIT")
        finally:
            con.close()
        head = entries[-1].hash if entries else GENESIS
        sealed = sign_anchor(key, ledger_id, len(entries), head, sealed_at=time.time())
        return {"format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION,
                "ledger_id": ledger_id, "entries": [e.record() for e in entries],
                "caps": caps, "seal": sealed.to_dict(),
                "public_key": public_key_pem(key.public_key()), "key_id": sealed.key_id}

    # -- writing -----------------------------------------------------------
    def append(self, entry: Entry) -> Entry:
        """Chain, sign and durably commit ``entry``; returns it with seq and hashes.

        ``data_fingerprint`` is never stored (see the module docstring): a value
        passed is dropped.

        Raises:
            ValueError: an entry no honest site writes (an impossible mechanism,
                a unit outside ``PRIVACY_UNITS``, ...); nothing is recorded.
        """
        _check_entry(entry)
        if entry.data_fingerprint:
            log.debug("ledger %s: data_fingerprint is not recorded (it would identify the "
                      "records)", self.path)
            entry = replace(entry, data_fingerprint="")
        key = self._signing_key()
        pem = public_key_pem(key.public_key())
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            present = {r[1] for r in con.execute("PRAGMA table_info(entries)")}
            for column, decl in _ADDED_COLUMNS.items():
                if column not in present:  # an older ledger: add the column, old rows get defaults
                    con.execute(f"ALTER TABLE entries ADD COLUMN {column} {decl}")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))
            ledger_id = str(con.execute("SELECT value FROM meta WHERE key='ledger_id'")
                            .fetchone()[0])
            last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            chained = replace(entry, seq=seq, prev_hash=prev,
                              created_at=entry.created_at or time.time(), hash="")
            chained = replace(chained, hash=chained.content_hash())
            values = [getattr(chained, c) for c in _COLUMNS]
            values[_COLUMNS.index("secure_rng")] = int(chained.secure_rng)
            con.execute(f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})", values)
            sealed = sign_anchor(key, ledger_id, seq, chained.hash)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('signed_seal', ?)",
                        (json.dumps(sealed.to_dict()),))
            con.execute("INSERT OR REPLACE INTO meta VALUES ('public_key', ?)", (pem,))
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
        """The site's own check (empty when intact): the chain, and the stored seal
        against this site's public key and the ledger's last entry. Legacy
        ``hmac-sha256:`` entries are checked when the retired secret is at
        ``<key>.legacy-hmac``."""
        entries = self.entries()
        legacy = Path(str(self.key_path) + LEGACY_KEY_SUFFIX)
        problems = chain_problems(
            entries, legacy_key=read_legacy_key(legacy) if legacy.is_file() else None)
        if not any(e.hash_format == SIGNED_FORMAT for e in entries):
            return problems
        sealed = self.stored_seal()
        if sealed is None:
            return [*problems, "the ledger has signed entries but no signed seal"]
        own = (load_signing_key(self.key_path).public_key() if self.key_path.is_file()
               else load_public_key(self.meta("public_key") or ""))
        problem = anchor_problem(own, sealed)
        if problem:
            problems.append(f"the seal: {problem}")
        if (sealed.ledger_id, sealed.count, sealed.head) != (self.ledger_id(), len(entries),
                                                             entries[-1].hash):
            problems.append(f"the seal covers {sealed.count} entries ending in "
                            f"{sealed.head[:31]}…, the ledger holds {len(entries)}: entries were "
                            "deleted or the file was rewritten")
        return problems


def _read_caps(con: sqlite3.Connection) -> list[dict]:
    rows = con.execute(f"SELECT {', '.join(CAP_COLUMNS)} FROM caps ORDER BY seq").fetchall()
    return [dict(zip(CAP_COLUMNS, r, strict=True)) for r in rows]


def export_ledger(path: str | Path, key_path: str | Path | None = None) -> dict[str, Any]:
    """The export a site sends at delivery (:meth:`Ledger.export`): every row, the
    caps, a fresh signed seal and the public key. Write it with
    :func:`canonical_json`.

    Raises:
        FileNotFoundError: no ledger at ``path`` (none is made).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    return Ledger(path, key_path).export()

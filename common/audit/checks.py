"""The audit's checks, and the one registry of what they may report.

Every finding is a :class:`Hazard` whose code is in :data:`HAZARDS`, once, with
its severity and meaning (``docs/privacy.md`` lists the same table; a test fails
when they drift). Checks are pure: ledger contents, run records and keys in,
hazards out.

**Fail closed.** What the audit cannot verify is an error: no registered public
key, a signature that fails, a chain signed by another key, an anchor without a
signature, entries from before signed ledgers, rows newer than every anchor and
seal the auditor holds. The auditor may accept the unverifiable explicitly
(``--accept-unverified``, ``--accept-unanchored``): the finding then stays in the
report as a warning marked with the flag, and the report's banner says what was
accepted. Nothing is accepted by default.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.audit.sources import LedgerFile, RecordedAnchor, RegisteredKey
from common.privacy.accounting import (
    LEDGER_ACCOUNTANT,
    PRIVACY_UNITS,
    PRV,
    RECORD,
    compress,
    epsilon,
)
from common.privacy.ledger import (
    GENESIS,
    LEGACY_KEYED_FORMAT,
    LEGACY_UNKEYED_FORMAT,
    SIGNED_FORMAT,
    Anchor,
    Entry,
    anchor_problem,
    chain_problems,
    key_id,
    load_public_key,
)
from common.privacy.scaling import SAMPLER as FULL_SAMPLER

SEVERITIES = ("error", "warning")
# What an auditor may accept, and the flag that says so.
ACCEPTS = {"unverified": "--accept-unverified", "unanchored": "--accept-unanchored"}


@dataclass(frozen=True)
class HazardCode:
    code: str
    severity: str
    meaning: str
    accept: str | None = None  # "unverified" / "unanchored": what an explicit flag accepts


def _registry(*codes: HazardCode) -> dict[str, HazardCode]:
    out: dict[str, HazardCode] = {}
    for c in codes:
        if c.code in out:
            raise ValueError(f"hazard code {c.code!r} registered twice")
        if c.severity not in SEVERITIES or (c.accept is not None and c.accept not in ACCEPTS):
            raise ValueError(f"hazard code {c.code!r}: bad severity or accept")
        out[c.code] = c
    return out


E, W = "error", "warning"
HAZARDS = _registry(
    # -- reading --------------------------------------------------------------
    HazardCode("ledger-unreadable", E, "a ledger file or export is not a readable fedtransfer "
               "ledger (garbage, a truncated SQLite file, no entries table, an export that is "
               "not one)"),
    HazardCode("ledger-missing", E, "a site trained under DP (the run records its replies) but "
               "no ledger or export was found for it"),
    HazardCode("run-records-unreadable", E, "a run directory's summary.json or config.toml "
               "cannot be read"),
    HazardCode("malformed-entry", E, "a ledger row holds a value of the wrong type or outside "
               "its allowed set (unit, group size); it is left out of ε"),
    # -- integrity: chain, signatures, anchors ----------------------------------
    HazardCode("broken-hash-chain", E, "the chain does not link, or an entry's content does not "
               "match its hash: a row was edited, inserted or deleted"),
    HazardCode("append-only-triggers-missing", E, "the ledger's append-only triggers were "
               "dropped: its schema was altered"),
    HazardCode("public-key-missing", E, "no registered public key for the site (run directory "
               "or --public-keys): its signatures cannot be verified", accept="unverified"),
    HazardCode("key-mismatch", E, "a seal or anchor is signed by a key other than the site's "
               "registered one, the ledger declares another key, or two registrations differ"),
    HazardCode("signature-invalid", E, "a seal or anchor signature does not verify under the "
               "site's registered key"),
    HazardCode("seal-missing", E, "a ledger with signed entries holds no signed seal (it was "
               "removed)", accept="unverified"),
    HazardCode("seal-mismatch", E, "the ledger's own signed seal does not match its entries: "
               "entries were deleted or the file was rewritten"),
    HazardCode("legacy-chain", E, "entries from before signed ledgers (hmac-sha256 or unkeyed "
               "hashes): no public key verifies them, and an HMAC key that checks them also "
               "forges them", accept="unverified"),
    HazardCode("anchor-unsigned", E, "anchors in the run records carry no signature: they are "
               "only the coordinator's word", accept="unverified"),
    HazardCode("anchor-mismatch", E, "the ledger does not hold the head hash (or ledger id) that "
               "an anchor or seal the auditor holds recorded: it was rewritten or replaced"),
    HazardCode("ledger-truncated", E, "the ledger holds fewer entries than an anchor or seal "
               "the auditor holds"),
    HazardCode("unanchored-entries", E, "entries newer than the latest anchor or seal the "
               "auditor holds: only the ledger's holder vouches for them",
               accept="unanchored"),
    HazardCode("seal-unmatched", E, "a seal given with --seal belongs to no audited ledger"),
    HazardCode("export-mismatch", E, "the ledger export a site delivered disagrees with its "
               "ledger file"),
    # -- units ------------------------------------------------------------------
    HazardCode("mixed-units", E, "one ledger mixes units of privacy (record and patient): its "
               "ε has no single meaning"),
    HazardCode("group-size-varies", W, "a site's declared records per patient changed between "
               "entries; the largest is used for the per-patient ε"),
    # -- the mechanism ----------------------------------------------------------
    HazardCode("impossible-mechanism", E, "an entry's (σ, q, steps) is no valid mechanism; no ε "
               "can be derived from it"),
    HazardCode("epsilon-not-computed", E, "σ below the audit's floor or more steps than it "
               "composes: ε would be enormous and is not computed"),
    HazardCode("non-poisson-sampling", E, "a sampler other than Poisson: the accountants do not "
               "bound it"),
    HazardCode("secure-rng-off", W, "DP noise from a non-cryptographic PRNG"),
    HazardCode("add-remove-with-public-count", E, "entries accounted for add/remove neighbours "
               "by a site that releases its exact count"),
    HazardCode("unexpected-accountant", W, "entries name an accountant other than the "
               "product's"),
    HazardCode("delta-too-large", E, "δ is not below 1/N"),
    HazardCode("delta-not-small", W, "δ is not well below 1/N"),
    HazardCode("delta-varies", W, "entries use different δ values"),
    # -- ε ----------------------------------------------------------------------
    HazardCode("stored-epsilon-too-low", E, "an entry's cached ε is below what its history "
               "recomputes to"),
    HazardCode("stored-epsilon-mismatch", W, "an entry's cached ε is above the recomputed one "
               "(conservative, but stale)"),
    HazardCode("accountants-disagree", W, "PRV and PLD (add/remove) differ by more than their "
               "numerical error"),
    HazardCode("relation-inconsistent", E, "replace-one ε below add/remove ε, which cannot be"),
    HazardCode("cap-exceeded", E, "the recomputed ε exceeds the cap the site enforced"),
    HazardCode("cap-raised", W, "the site raised its cap (raise-cap), with its reason"),
    HazardCode("cap-differs-from-run-records", W, "the site's cap differs from the run "
               "records'; the site's is checked"),
    HazardCode("reported-epsilon-too-low", E, "the run records report an ε below the "
               "recomputed one"),
    # -- the run records against the ledger ---------------------------------------
    HazardCode("update-without-ledger-entry", E, "the server recorded a round from a site whose "
               "ledger has no entry for it"),
    HazardCode("charged-not-released", W, "the ledger charges a round the run records do not "
               "list (counting it is conservative)"),
    HazardCode("ledger-summary-mismatch", E, "σ, q, steps, the record count or the unit of a "
               "round differ between the ledger and the run records"),
    HazardCode("site-not-in-summary", E, "the ledger charges the run but the run records have "
               "no record of the site"),
    HazardCode("no-ledger", W, "no ledger (the pooled centralized baseline): ε from the run "
               "records only"),
    # -- what left the sites --------------------------------------------------------
    HazardCode("forbidden-release", E, "a site sent a value computed from its records without "
               "DP (loss, holdout metrics, cache flag)"),
    HazardCode("site-without-dp", E, "a site's own policy trained without DP"),
    HazardCode("released-undeclared", W, "the run records do not declare the privacy class of "
               "what sites sent"),
    HazardCode("not-charged", W, "a value sent without DP, declared public"),
    HazardCode("no-dp", W, "a non-private run (a baseline): no ε claim"),
    # -- how the run was set up ---------------------------------------------------------
    HazardCode("hyperparameters-tuned-on-private-data", E, "hyperparameters were tuned on "
               "private records: that cost is in no ledger"),
    HazardCode("hyperparameter-source-unspecified", W, "the run does not say where its "
               "hyperparameters came from"),
    HazardCode("backbone-selection-unreadable", E, "the run's backbone-selection record cannot "
               "be read"),
    HazardCode("backbone-selected-on-private-data", E, "the backbone was chosen on private "
               "records: that cost is in no ledger"),
    HazardCode("public-records-unchecked", W, "a deployed run published no digests of its "
               "public and test records (no federation file with public-hashes): nothing "
               "checked that no site trained on them, so its test metrics may be on training "
               "records"),
    HazardCode("same-data-separate-ledgers", W, "the same site data trained under several "
               "ledgers (older ledgers' data hashes): none composes them all"),
    # -- the empirical audit ---------------------------------------------------------------
    HazardCode("empirical-exceeds-claimed", E, "the canary audit proves a larger ε than the "
               "accountant claims"),
    HazardCode("empirical-audit-weak", W, "the canary audit caught none of its mis-calibrated "
               "controls"),
)


@dataclass(frozen=True)
class Hazard:
    severity: str  # "error" or "warning"
    code: str
    message: str
    site: str | None = None
    accepted: str | None = None  # the flag that accepted it (then a warning)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"hazard severity must be one of {SEVERITIES}, got {self.severity!r}")
        if self.code not in HAZARDS:
            raise ValueError(f"unregistered hazard code {self.code!r} (common/audit/checks.py "
                             "HAZARDS)")


@dataclass(frozen=True)
class Trust:
    """What the auditor holds and what it accepts without verification."""

    public_keys: tuple[Path, ...] = ()  # --public-keys: folders of site-<id>/ledger.pub
    seals: tuple[Path, ...] = ()  # --seal: seal files from fedtransfer site seal
    legacy_keys: tuple[Path, ...] = ()  # --legacy-key: older ledgers' HMAC secrets
    accept_unverified: bool = False
    accept_unanchored: bool = False

    def accepts(self, what: str | None) -> bool:
        return (what == "unverified" and self.accept_unverified) or \
            (what == "unanchored" and self.accept_unanchored)


STRICT = Trust()


def hazard(code: str, message: str, site: str | None = None, trust: Trust = STRICT) -> Hazard:
    """A finding with its registered severity; one the auditor accepted is a warning
    that names the flag."""
    spec = HAZARDS[code]
    if trust.accepts(spec.accept):
        flag = ACCEPTS[spec.accept]
        return Hazard("warning", code, f"accepted by {flag}: {message}", site, accepted=flag)
    return Hazard(spec.severity, code, message, site)


# --------------------------------------------------------------------------
# Integrity: the chain, its signatures, the anchors and seals the auditor holds
# --------------------------------------------------------------------------
TRIGGERS = ("entries_no_update", "entries_no_delete")
CAP_TRIGGERS = ("caps_no_update", "caps_no_delete")


@dataclass
class Integrity:
    hazards: list[Hazard] = field(default_factory=list)
    chain: str = "n/a"  # see _chain_state
    anchors_matched: int = 0  # anchors in the run records the ledger matches
    seals_matched: int = 0  # seals the auditor holds (--seal, a delivered export) it matches
    anchored: int = 0  # entries covered by the latest anchor or seal the auditor holds
    key_source: str | None = None  # where the registered key came from
    key_id: str | None = None


def _legacy_key_for(entries: Sequence[Entry], keys: Sequence[bytes]) -> bytes | None:
    """The given legacy secret that checks the most ``hmac-sha256:`` entries."""
    keyed = [e for e in entries if e.hash_format == LEGACY_KEYED_FORMAT]
    if not keyed or not keys:
        return None
    return max(keys, key=lambda k: sum(hmac.compare_digest(e.legacy_hash(k), str(e.hash))
                                       for e in keyed))


def ledger_integrity(site: str, lf: LedgerFile, *, key: RegisteredKey | None,
                     key_problems: Sequence[str] = (), anchors: Sequence[RecordedAnchor] = (),
                     seals: Sequence[Anchor] = (), legacy_keys: Sequence[bytes] = (),
                     delivered: LedgerFile | None = None, trust: Trust = STRICT) -> Integrity:
    """Everything about one ledger that signatures, anchors and seals can prove.

    Args:
        key: the site's registered public key (None: not registered).
        key_problems: conflicting or unreadable registrations.
        anchors: the anchors the run records hold for this site.
        seals: seals the auditor holds for this ledger (``--seal``).
        legacy_keys: ``--legacy-key`` secrets, to check ``hmac-sha256:`` entries.
        delivered: the export the site delivered, when the SQLite file is audited.
    """
    out = Integrity()
    hz = out.hazards
    entries = lf.entries
    n = len(entries)
    for row, problems in sorted(lf.malformed.items()):
        hz.append(hazard("malformed-entry", f"row {row} (seq {entries[row - 1].seq!r}): "
                         f"{'; '.join(problems)}", site))
    if lf.triggers is not None and entries:
        missing = [t for t in TRIGGERS if t not in lf.triggers]
        missing += [t for t in CAP_TRIGGERS if lf.caps and t not in lf.triggers]
        if missing:
            hz.append(hazard("append-only-triggers-missing",
                             f"the ledger's append-only triggers {', '.join(missing)} are gone: "
                             "someone altered the file's schema (rows may have been edited)",
                             site))
    legacy_key = _legacy_key_for(entries, legacy_keys)
    broken = chain_problems(entries, legacy_key=legacy_key)
    hz += [hazard("broken-hash-chain", f"ledger hash chain broken: {p}", site) for p in broken]

    formats = [e.hash_format for e in entries]
    legacy = {f: formats.count(f) for f in (LEGACY_KEYED_FORMAT, LEGACY_UNKEYED_FORMAT)
              if f in formats}
    if legacy:
        said = ", ".join(f"{k} {'entry' if v == 1 else 'entries'} of the format {f}"
                         for f, v in legacy.items() for k in [v])
        how = []
        if LEGACY_KEYED_FORMAT in legacy:
            how.append("checked with the --legacy-key secret, which also lets its holder forge "
                       "them" if legacy_key is not None else
                       "their HMACs need the site's secret key to check (not given), and that key "
                       "would also forge them")
        if LEGACY_UNKEYED_FORMAT in legacy:
            how.append("unkeyed hashes anyone can rebuild")
        hz.append(hazard("legacy-chain",
                         f"{said} predate signed ledgers: {'; '.join(how)}. A signature made "
                         "later covers them only from then on", site, trust))

    # Which key verifies: the registered one; only when the auditor accepts the
    # unverified, the one the ledger declares (so a third party's edits still show).
    verify_key = key.key if key is not None else None
    hz += [hazard("key-mismatch", p, site) for p in key_problems]
    declared = None
    if lf.public_key:
        try:
            declared = load_public_key(lf.public_key)
        except ValueError as exc:
            hz.append(hazard("key-mismatch", f"the ledger's declared key is unreadable: {exc}",
                             site))
    has_evidence = bool(entries) or bool(anchors) or bool(seals)
    if key is not None:
        out.key_source, out.key_id = key.source, key.key_id
        if declared is not None and key_id(declared) != key.key_id:
            hz.append(hazard("key-mismatch",
                             f"the ledger declares key {key_id(declared)[:24]}…, the site's "
                             f"registered key ({key.source}) is {key.key_id[:24]}…", site))
    elif has_evidence:
        note = ""
        if declared is not None and trust.accept_unverified:
            verify_key = declared
            out.key_source, out.key_id = "the ledger's own (unregistered)", key_id(declared)
            note = "; signatures checked with the key the ledger itself declares"
        hz.append(hazard("public-key-missing",
                         "no registered public key for this site (looked for "
                         "sites/site-<id>/ledger.pub in the run directory and in --public-keys "
                         f"folders): nothing it signed can be verified{note}", site, trust))

    def check_signature(a: Anchor, what: str) -> bool:
        if verify_key is None:
            return False
        if not a.key_id:  # a run record that keeps the signature but not the key's id
            a = replace(a, key_id=key_id(verify_key))
        problem = anchor_problem(verify_key, a)
        if problem is None:
            return True
        if problem.startswith("signed by key"):
            hz.append(hazard("key-mismatch", f"{what}: {problem}", site))
        else:
            hz.append(hazard("signature-invalid", f"{what}: {problem}", site))
        return False

    seal_ok = False
    signed = SIGNED_FORMAT in formats
    last = str(entries[-1].hash) if entries else GENESIS
    if lf.seal is None:
        if lf.seal_problem:
            hz.append(hazard("seal-mismatch", lf.seal_problem, site))
        elif signed:
            hz.append(hazard("seal-missing", "the ledger has signed entries but no signed "
                             "seal: it was removed", site, trust))
    else:  # even with no entry left: a seal over rows that are gone
        sig_ok = check_signature(lf.seal, "the ledger's seal")
        if (lf.seal.ledger_id, lf.seal.count, lf.seal.head) != (lf.ledger_id, n, last):
            hz.append(hazard("seal-mismatch",
                             f"the ledger's seal covers {lf.seal.count} entries ending in "
                             f"{lf.seal.head[:31]}… of ledger {lf.seal.ledger_id[:12]}; the "
                             f"ledger holds {n} ending in {last[:31]}…: entries were deleted "
                             "or the file was rewritten", site))
        else:
            seal_ok = sig_ok

    # What the auditor holds: the anchors of the site's replies, and seals.
    anchored = 0

    def against(count: int, head: str, ledger: str | None, what: str) -> bool:
        if ledger and lf.ledger_id and ledger != lf.ledger_id:
            hz.append(hazard("anchor-mismatch", f"{what} names ledger {ledger[:12]}…, this "
                             f"ledger is {lf.ledger_id[:12]}…: the ledger was replaced", site))
            return False
        if count > n:
            hz.append(hazard("ledger-truncated", f"{what} covered {count} ledger entries; the "
                             f"ledger now holds {n}", site))
            return False
        if entries[count - 1].hash != head:
            hz.append(hazard("anchor-mismatch", f"entry {count}'s hash differs from {what}: the "
                             "ledger was rewritten", site))
            return False
        return True

    unsigned = 0
    for a in anchors:
        if a.problem:
            hz.append(hazard("anchor-mismatch", a.problem, site))
            continue
        if a.count is None or a.head is None:
            continue  # recorded_anchors gave a problem for it
        statement = a.anchor(lf.ledger_id)
        what = f"the anchor the site sent for {a.where}"
        if statement is None:
            unsigned += 1
            vouched = trust.accept_unverified
        else:
            vouched = check_signature(statement, what) or (verify_key is None
                                                            and trust.accept_unverified)
        if not against(a.count, a.head, a.ledger_id, what):
            continue
        out.anchors_matched += 1
        if vouched:
            anchored = max(anchored, a.count)
    if unsigned:
        hz.append(hazard("anchor-unsigned", f"{unsigned} of the {len(anchors)} anchors the run "
                         "records hold for this site carry no signature (an older run, or a "
                         "coordinator that did not record it): they are the coordinator's word "
                         "only", site, trust))
    held = [(s, f"the seal of {s.sealed_at:.0f} (--seal)" if s.sealed_at is not None
             else "a seal (--seal)") for s in seals]
    if delivered is not None:
        if delivered.seal is not None:
            held.append((delivered.seal, f"the seal of the export the site delivered "
                                         f"({delivered.path.name})"))
        mine = [e.record() for e in entries]
        theirs = [e.record() for e in delivered.entries]
        if theirs != mine[:len(theirs)]:
            hz.append(hazard("export-mismatch",
                             f"the export the site delivered ({delivered.path}) holds "
                             f"{len(theirs)} entries that are not the first {len(theirs)} of "
                             "its ledger file", site))
    for s, what in held:
        if check_signature(s, what) and (s.count == 0 or against(s.count, s.head, s.ledger_id,
                                                                 what)):
            out.seals_matched += 1
            anchored = max(anchored, s.count)
    out.anchored = anchored
    # Without a key nothing is vouched for, and public-key-missing already says so.
    if n > anchored and (verify_key is not None or trust.accept_unverified):
        first = anchored + 1
        span = f"entry {n}" if first == n else f"entries {first}–{n}"
        hz.append(hazard("unanchored-entries",
                         f"{span} of {n} are newer than the latest anchor or seal the auditor "
                         f"holds ({f'entry {anchored}' if anchored else 'none'}): only the "
                         "ledger's holder vouches for them. Ask the site for a fresh seal "
                         "(fedtransfer site seal) and pass it with --seal", site, trust))
    out.chain = _chain_state(entries, broken=bool(broken) or any(
        h.code in ("seal-mismatch", "signature-invalid", "key-mismatch") for h in hz),
        seal_ok=seal_ok, registered=key is not None, legacy=bool(legacy), signed=signed)
    return out


def _chain_state(entries, *, broken: bool, seal_ok: bool, registered: bool, legacy: bool,
                 signed: bool) -> str:
    if broken:
        return "broken"
    if not entries:
        return "n/a"
    if not signed:
        return "legacy"
    if not registered:
        return "signed, unverified"  # no registered key (at most the ledger's own checked)
    if not seal_ok:
        return "unsealed"
    return "signed, verified" + (" (legacy part)" if legacy else "")


def unmatched_seals(seals: Sequence[tuple[Path, Anchor]], ledger_ids: set[str]) -> list[Hazard]:
    """Seals the auditor gave that belong to no audited ledger."""
    return [hazard("seal-unmatched", f"the seal {p} is for ledger {s.ledger_id[:12]}…, which is "
                   "not among the audited ledgers (was it replaced by a new one?)")
            for p, s in seals if s.ledger_id not in ledger_ids]


# --------------------------------------------------------------------------
# Units of privacy
# --------------------------------------------------------------------------
def unit_of(site: str, entries: Sequence[Entry]) -> tuple[str, int, list[Hazard]]:
    """``(unit, group size, hazards)`` a site's entries declare: ``mixed`` when
    they mix units (an error), the largest declared group size."""
    units = sorted({e.unit for e in entries if e.unit in PRIVACY_UNITS})
    sizes = sorted({e.group_size for e in entries if isinstance(e.group_size, int)})
    hz = []
    if len(units) > 1:
        counts = {u: sum(e.unit == u for e in entries) for u in units}
        hz.append(hazard("mixed-units", "the ledger mixes units of privacy ("
                         + ", ".join(f"{v} {u}-level" for u, v in counts.items())
                         + " entries): one ε over them has no single meaning", site))
    if len(sizes) > 1:
        hz.append(hazard("group-size-varies", f"the declared records per patient changed "
                         f"({sizes}); the per-patient ε uses {sizes[-1]}", site))
    unit = "mixed" if len(units) > 1 else (units[0] if units else RECORD)
    return unit, (sizes[-1] if sizes else 1), hz


# --------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------
AUDIT_MIN_SIGMA = 0.2  # below this ε exceeds ~100 for any useful schedule, and PLD takes minutes
AUDIT_MAX_STEPS = 10_000_000


def usable_entries(site: str, entries: Sequence[Entry], malformed: Mapping[int, Any]
                   ) -> tuple[list[Entry], list[Hazard]]:
    """The entries ε can be derived from, and why the others cannot (``malformed``:
    rows, 1-based, whose values have the wrong type; named elsewhere)."""
    hz, kept = [], []
    for row, e in enumerate(entries, start=1):
        if row in malformed:
            continue  # named by malformed-entry
        try:
            e.mechanism  # noqa: B018 - raises on an impossible tuple
            if not 0 < e.delta < 1:
                raise ValueError(f"δ={e.delta!r} is outside (0, 1)")
        except (ValueError, TypeError) as exc:
            hz.append(hazard("impossible-mechanism",
                             f"entry {e.seq} (run {e.run_id} round {e.round}) holds σ="
                             f"{e.noise_multiplier!r}, q={e.sample_rate!r}, steps={e.steps!r}: "
                             f"{exc}; no ε can be derived from it, and ε below leaves it out",
                             site))
            continue
        kept.append(e)
    low = [e.seq for e in kept if e.noise_multiplier < AUDIT_MIN_SIGMA]
    steps = sum(e.steps for e in kept)
    if low or steps > AUDIT_MAX_STEPS:
        hz.append(hazard("epsilon-not-computed",
                         (f"entries {low} hold σ below {AUDIT_MIN_SIGMA}" if low else
                          f"the entries hold {steps} steps (over {AUDIT_MAX_STEPS})")
                         + ": ε is far above any cap and is not computed", site))
    return kept, hz


def mechanism_hazards(site: str, entries: Sequence[Entry], *, delta: float | None,
                      n: int | None) -> list[Hazard]:
    """Sampling, RNG, accountant and δ."""
    hz = []
    deltas = sorted({float(e.delta) for e in entries})
    if len(deltas) > 1 and delta is not None:
        hz.append(hazard("delta-varies", f"entries use different δ values {deltas}; ε is "
                         f"reported at δ={delta:g}", site))
    # A release over every record (DP feature scaling, common/privacy/scaling.py) is the
    # Gaussian mechanism itself: Poisson sampling at q = 1, exactly what is accounted.
    samplers = sorted({e.sampler for e in entries if e.sampler != "poisson"
                       and not (e.sampler == FULL_SAMPLER and e.sample_rate == 1.0)})
    if samplers:
        hz.append(hazard("non-poisson-sampling",
                         f"entries used sampler(s) {samplers}; the accountants assume Poisson "
                         "subsampling, so the recomputed ε is not a valid bound", site))
    if any(not e.secure_rng for e in entries):
        hz.append(hazard("secure-rng-off",
                         "secure RNG off: DP noise and Poisson sampling came from torch's "
                         "non-cryptographic PRNG (seeded from OS entropy at the site, never from "
                         "the run config) without Opacus's secure_mode, so ε assumes that seed "
                         "stays secret and ignores floating-point attacks on the noise", site))
    add_remove = [e.seq for e in entries if e.accountant == PRV]
    if add_remove:
        hz.append(hazard("add-remove-with-public-count",
                         f"entries {add_remove} were accounted for add/remove neighbours, yet the "
                         "site released its exact record count: the guarantee that holds is "
                         "replace-one, which the audit reports (and checks against the cap)", site))
    accountants = sorted({e.accountant for e in entries} - {LEDGER_ACCOUNTANT, PRV})
    if accountants:
        hz.append(hazard("unexpected-accountant",
                         f"entries were accounted with {accountants}; the audit recomputes "
                         "replace-one PLD and add/remove PRV, PLD and RDP regardless", site))
    if delta is not None and n:
        if delta >= 1.0 / n:
            hz.append(hazard("delta-too-large",
                             f"δ={delta:g} is not below 1/N = {1.0 / n:.3g} (N = {n} records): "
                             "a mechanism that publishes one random record outright meets it",
                             site))
        elif delta > DELTA_FRACTION_OF_INV_N / n:
            hz.append(hazard("delta-not-small",
                             f"δ={delta:g} is not well below 1/N = {1.0 / n:.3g} (N = {n}); "
                             f"use δ ≤ {DELTA_FRACTION_OF_INV_N:g}/N", site))
    return hz


DELTA_FRACTION_OF_INV_N = 0.1


def cap_in_force(site: str, caps: Sequence[dict], cap: float | None
                 ) -> tuple[float | None, list[Hazard]]:
    """The cap the site enforced (its ledger's last) and how it got there."""
    if not caps:
        return cap, []
    hz = []
    own = float(caps[-1]["epsilon"])
    for before, after in zip(caps, caps[1:], strict=False):
        if after["epsilon"] > before["epsilon"] or after["delta"] != before["delta"]:
            hz.append(hazard("cap-raised",
                             f"the site raised its cap from ε={before['epsilon']:g} "
                             f"(δ={before['delta']:g}) to ε={after['epsilon']:g} "
                             f"(δ={after['delta']:g}): {after['reason']}", site))
    if cap is not None and abs(float(cap) - own) > 1e-12:
        hz.append(hazard("cap-differs-from-run-records",
                         f"the site enforced its own cap ε={own:g} (its ledger); the run "
                         f"records say {float(cap):g}; the audit checks the site's", site))
    return own, hz


# --------------------------------------------------------------------------
# ε against what was stored, reported and capped
# --------------------------------------------------------------------------
# Opacus's PRVAccountant.get_epsilon default: the returned ε is an upper bound
# within this much of the true value.
PRV_EPS_ERROR = 0.01
# How far a reported ε may sit below the recomputed bound before it is an
# under-report: PRV's stated error plus a small relative slack for PLD's
# discretisation.
REPORT_ABS_TOL = PRV_EPS_ERROR
REPORT_REL_TOL = 1e-3
# How far the two upper bounds may disagree before that itself is a hazard.
AGREE_ABS_TOL = 0.05
AGREE_REL_TOL = 0.01


def report_tolerance(bound: float) -> float:
    """How far below ``bound`` a reported ε may be without being an under-report."""
    return REPORT_ABS_TOL + REPORT_REL_TOL * abs(bound)


def stored_epsilon_hazard(site: str, e: Entry, recomputed: float) -> Hazard | None:
    tol = report_tolerance(recomputed)
    if e.epsilon_after < recomputed - tol:
        return hazard("stored-epsilon-too-low",
                      f"entry {e.seq} (run {e.run_id} round {e.round}) stores "
                      f"ε={e.epsilon_after:.4f} but its history recomputes to {recomputed:.4f} "
                      f"({e.accountant}, δ={e.delta:g})", site)
    if e.epsilon_after > recomputed + tol:
        return hazard("stored-epsilon-mismatch",
                      f"entry {e.seq} stores ε={e.epsilon_after:.4f}, above the recomputed "
                      f"{recomputed:.4f}: conservative, but the cache is stale or was computed "
                      "differently", site)
    return None


def epsilon_hazards(site: str, eps: Mapping[str, float], spent: float, cap: float | None
                    ) -> list[Hazard]:
    """The relations between the recomputed values, and the cap."""
    hz = []
    prv, pld = eps[PRV], eps["pld"]
    if abs(prv - pld) > AGREE_ABS_TOL + AGREE_REL_TOL * max(prv, pld):
        hz.append(hazard("accountants-disagree",
                         f"add/remove: PRV ε={prv:.4f} and PLD ε={pld:.4f} differ by more than "
                         "their expected numerical error", site))
    if eps["replace_one"] < max(prv, pld) - report_tolerance(prv):
        hz.append(hazard("relation-inconsistent",
                         f"replace-one ε={eps['replace_one']:.4f} is below add/remove "
                         f"ε={max(prv, pld):.4f}, which cannot be", site))
    if cap is not None and spent > cap + report_tolerance(cap):
        hz.append(hazard("cap-exceeded", f"recomputed ε={spent:.4f} (replace-one) exceeds the "
                         f"cap {cap:g}", site))
    return hz


def reported_epsilon_hazard(site: str, reported: float, bound: float, delta: float,
                            *, own_history: bool = False) -> Hazard | None:
    if reported < bound - report_tolerance(bound):
        if own_history:
            return hazard("reported-epsilon-too-low",
                          f"summary.json reports ε={reported:.4f} but its own history "
                          f"recomputes to {bound:.4f} (PLD, replace-one)", site)
        return hazard("reported-epsilon-too-low",
                      f"summary.json reports ε={reported:.4f} but the ledger recomputes to "
                      f"{bound:.4f} (PLD, replace-one, δ={delta:g}); allowed error "
                      f"{report_tolerance(bound):.4f}", site)
    return None


# --------------------------------------------------------------------------
# The run records against the ledger
# --------------------------------------------------------------------------
def compare_with_summary(site: str, entries: Sequence[Entry], run_id: str,
                         summary_site: dict) -> list[Hazard]:
    """Ledger entries against the server's per-site history, matched by (run, round).

    Each history row names the run it came from (a resumed run keeps the rows of
    the run it resumed); rows without one belong to ``run_id``.
    """
    hz = []
    reported = {(str(h.get("run_id") or run_id), int(h["round"])): h
                for h in summary_site.get("history") or []}
    runs = {r for r, _ in reported} | {run_id}
    ledger_rounds: dict[tuple[str, int], list[Entry]] = {}
    for e in entries:
        if e.run_id in runs:
            ledger_rounds.setdefault((e.run_id, int(e.round)), []).append(e)
    for run, r in sorted(set(reported) - set(ledger_rounds)):
        hz.append(hazard("update-without-ledger-entry",
                         f"the server recorded round {r} of run {run} from this site but its "
                         "ledger has no entry for it: an update left the site without its "
                         "spend being recorded (or the entry was deleted)", site))
    for run, r in sorted(set(ledger_rounds) - set(reported)):
        hz.append(hazard("charged-not-released",
                         f"the ledger charges round {r} of run {run} but the run records do "
                         "not list it (site stopped after committing, or the server died "
                         "before recording it); counting it is conservative", site))
    for key in sorted(set(reported) & set(ledger_rounds)):
        h, es = reported[key], ledger_rounds[key]
        r = key[1]
        sigmas = {round(e.noise_multiplier, 12) for e in es}
        qs = {round(e.sample_rate, 12) for e in es}
        steps = sum(e.steps for e in es)
        problems = []
        if {round(float(h["noise_multiplier"]), 12)} != sigmas:
            problems.append(f"σ {h['noise_multiplier']} reported vs {sorted(sigmas)} in the ledger")
        if {round(float(h["sample_rate"]), 12)} != qs:
            problems.append(f"q {h['sample_rate']} reported vs {sorted(qs)} in the ledger")
        if int(h["steps"]) != steps:
            problems.append(f"{h['steps']} steps reported vs {steps} in the ledger")
        if "num_examples" in h and int(h["num_examples"]) != int(es[-1].dataset_size):
            problems.append(f"{h['num_examples']} records reported vs {es[-1].dataset_size} "
                            "in the ledger")
        if h.get("privacy_unit") and {str(h["privacy_unit"])} != {e.unit for e in es}:
            problems.append(f"unit {h['privacy_unit']!r} reported vs "
                            f"{sorted({e.unit for e in es})} in the ledger")
        if problems:
            hz.append(hazard("ledger-summary-mismatch",
                             f"round {r}: the ledger disagrees with summary.json: "
                             + "; ".join(problems), site))
    return hz


# Run-record keys that can only come from values computed on private records without
# DP (older runs sent them): the protocol field each one is.
_FORBIDDEN_RECORDS = {"train_loss": "train-loss", "feature_cache_hit": "feature-cache-hit"}


def released_values(site: str, ssite: dict, declared: dict | None
                    ) -> tuple[list[dict], list[Hazard]]:
    """``(rows, hazards)``: every field the site's train replies carried, with its
    privacy class (from the run's declared protocol) and its last value."""
    hz: list[Hazard] = []
    history = ssite.get("history") or []
    last = history[-1] if history else {}
    for key, name in _FORBIDDEN_RECORDS.items():
        if any(key in h for h in history):
            hz.append(hazard("forbidden-release",
                             f"the site sent '{name}', computed from its private records "
                             "without DP and charged to no ledger", site))
    if ssite.get("holdout"):
        hz.append(hazard("forbidden-release",
                         "the site sent holdout metrics (accuracy / AUC / loss of its private "
                         "holdout records) without DP, charged to no ledger", site))
    if ssite.get("dp") is False:
        hz.append(hazard("site-without-dp",
                         "the site's own policy trained without DP (dp = false): its head "
                         "carries no privacy guarantee", site))
    if not history:
        return [], hz
    if not declared or "train" not in declared:
        hz.append(hazard("released-undeclared",
                         "the run records do not declare the privacy class of what the sites "
                         "sent (summary.json privacy.released)", site))
        return [], hz
    rows = []
    for f in declared["train"]:
        if f["class"] == "forbidden":
            continue
        key = f["field"].replace("-", "_")
        value = {"arrays": "head (DP-SGD)", "site_id": site, "epsilon": ssite.get("epsilon"),
                 "delta": ssite.get("delta")}.get(key, last.get(key))
        rows.append({"field": f["field"], "class": f["class"], "value": value})
    return rows, hz


def run_setup_hazards(summary: dict, selection_problems: Sequence[tuple[str, str]]
                      ) -> list[Hazard]:
    """A DP run's declarations: values sent without DP, where its hyperparameters and
    its backbone came from."""
    hz = []
    privacy = summary.get("privacy") or {}
    if not summary.get("dp"):
        hz.append(hazard("no-dp", "non-private run: it makes no ε claim (a baseline)"))
    else:
        for item in privacy.get("not_charged") or []:
            hz.append(hazard("not-charged", f"sent without DP, declared public: {item}"))
        tuned = privacy.get("hyperparameters") or (summary.get("config") or {}).get(
            "hyperparameter-source")
        if tuned is not None and "private" in str(tuned).lower():
            hz.append(hazard("hyperparameters-tuned-on-private-data",
                             f"the run records say hyperparameters were {tuned!r}: the "
                             "tuning's privacy cost is not in any ledger"))
        elif tuned in (None, "unspecified"):
            hz.append(hazard("hyperparameter-source-unspecified",
                             "the run does not declare where its hyperparameters came "
                             "from (config key hyperparameter-source); if they were "
                             "tuned on the sites' records, that tuning is uncharged"))
    hz += [hazard(code, message) for code, message in selection_problems]
    handshake = summary.get("handshake")
    if summary.get("runtime") == "deployment" and isinstance(handshake, dict) \
            and not handshake.get("public_check"):
        hz.append(hazard("public-records-unchecked",
                         "the run published no digests of its public and test records, so no "
                         "site checked that it holds none of them: the test metrics may be on "
                         "records a site trained on (`fedtransfer federation init` publishes "
                         "them; run with federation=<its file>)"))
    return hz


def cross_run_hazards(ledgers: Mapping[str, Sequence[Entry]]) -> list[Hazard]:
    """Private records trained under separate ledgers, where older ledgers' data
    hashes show it (new entries hold none: a site keeps its data fingerprint in its
    own state).

    When the same site data appears in several ledger files, no single ledger
    composes those runs. If the runs were compared to choose hyperparameters or a
    best model, the cost is their composition.
    """
    by_fp: dict[str, dict[str, list[Entry]]] = {}
    for path, entries in ledgers.items():
        for e in entries:
            if isinstance(e.data_fingerprint, str) and e.data_fingerprint:
                by_fp.setdefault(e.data_fingerprint, {}).setdefault(path, []).append(e)
    hazards = []
    for fp, files in by_fp.items():
        if len(files) < 2:
            continue
        all_entries = [e for es in files.values() for e in es]
        try:
            delta = min(e.delta for e in all_entries)
            composed = epsilon(compress(e.mechanism for e in all_entries), delta=delta)
        except (ValueError, TypeError):
            continue  # an impossible entry: named per site
        hazards.append(hazard(
            "same-data-separate-ledgers",
            f"the same site data (fingerprint {fp[:12]}…) was trained in {len(files)} ledgers "
            f"({', '.join(sorted(files))}); each bounds only its own runs. If these runs were "
            f"compared to pick hyperparameters or a model, the records' total spend is their "
            f"composition: ε={composed:.3f} (PLD, replace-one, δ={delta:g})"))
    return hazards


def empirical_hazards(result: dict) -> list[Hazard]:
    """Findings of one canary audit (see :func:`common.audit.empirical.audit_run_site`)."""
    dp, site = result["dp"], str(result["site"])
    hazards = []
    if dp["epsilon_lower"] > dp["epsilon_claimed"]:
        hazards.append(hazard("empirical-exceeds-claimed",
                              f"the canary audit proves ε ≥ {dp['epsilon_lower']:.3f} at "
                              f"{dp['confidence']:.0%} confidence but the accountant claims "
                              f"ε ≤ {dp['epsilon_claimed']:.3f} (add/remove): the implementation "
                              "leaks more than it accounts for", site))
    if result["power"]["smallest_ratio_caught"] is None:
        worst = max(result["controls"], key=lambda c: c["epsilon_true"] / c["epsilon_claimed"])
        hazards.append(hazard("empirical-audit-weak",
                              f"the canaries did not catch even {worst['label']} (true ε "
                              f"{worst['epsilon_true']:.3f} against a claim of "
                              f"{worst['epsilon_claimed']:.3f}): the DP result means little",
                              site))
    return hazards

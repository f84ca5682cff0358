"""The privacy audit: read ledgers and run records, recompute ε, flag hazards.

Flower-free and read-only. The audit never trusts a stored ε: it recomputes
every site's spend from the ledger's raw mechanism tuples,

* for replace-one neighbours (what the sites report and enforce: their record
  counts are public) with PLD, Google's ``dp-accounting``;
* for add/remove neighbours three ways, beside it: PRV (Opacus), PLD, and RDP
  (Opacus, looser), the first two cross-checking each other;

and compares the ledger with what the run's ``summary.json`` says the sites
reported. GDP is never used: it is not an upper bound.

Inputs (see :func:`discover`): a run directory (``summary.json`` plus
``sites/site-<id>/ledger.sqlite``), one ledger file, or a folder searched
recursively for run directories and ledgers.

Unit of privacy: one training record at one site (sample-level DP,
replace-one neighbours).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.jsonio import clean_json
from common.models.transfer import parse_record, selection_findings
from common.privacy.accounting import (
    ADD_REMOVE,
    LEDGER_ACCOUNTANT,
    PLD,
    PRV,
    REPLACE_ONE,
    UNIT_OF_PRIVACY,
    Mechanism,
    compress,
    epsilon,
)
from common.privacy.ledger import (
    Entry,
    default_key_path,
    library_versions,
    read_entries,
    read_key,
    verify_chain,
)
from common.privacy.scaling import SAMPLER as FULL_SAMPLER

log = logging.getLogger(__name__)

TRUST_MODEL = (
    "Each site runs DP-SGD (Opacus) on its own machine and keeps its own ledger and ε cap; its "
    "own policy (node config), never the run config, decides whether it uses DP, its cap and δ, "
    "its holdout and what may leave it. "
    "The guarantee protects every training record of a site from the server, from the other "
    "sites and from anyone who later sees the released heads or the distilled student. "
    "The server is not trusted with data: aggregation of the noised heads, and distillation on "
    "public unlabelled data, are post-processing and cost no privacy. Each site must trust its "
    "own machine, its copy of the code and Opacus, and its random number generator. Besides the "
    "noised head a site sends only values declared public (listed per site below); anything else "
    "computed from its records is a hazard."
)
ACCOUNTANT_NOTE = (
    "ε is recomputed from the ledger's raw (σ, q, steps) tuples. Reported and enforced: "
    "replace-one neighbours (each site's record count is public), PLD (Google dp-accounting, "
    "pessimistic upper bound; the only implementation here for replace-one with Poisson "
    "sampling). Beside it, add/remove neighbours three ways: PRV (Opacus), PLD and RDP (Opacus, "
    "looser), so the two relations can be compared and the two add/remove implementations "
    "cross-checked. GDP is never used: it can under-report ε."
)
HYPERPARAMETER_ASSUMPTION = (
    "Assumed, not verified: learning rate, clip norm, batch size, epochs and rounds were fixed "
    "from the scenario config, not tuned on the sites' private records. The run records do not "
    "say how they were chosen; tuning on private data leaks privacy that no ledger charges."
)
SEVERITIES = ("error", "warning")

# Opacus's PRVAccountant.get_epsilon default: the returned ε is an upper bound
# within this much of the true value.
PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-4
# How far a reported ε may sit below the recomputed bound before it is an
# under-report: PRV's stated error plus a small relative slack for PLD's
# discretisation.
REPORT_ABS_TOL = PRV_EPS_ERROR
REPORT_REL_TOL = 1e-3
# How far the two upper bounds may disagree before that itself is a hazard.
AGREE_ABS_TOL = 0.05
AGREE_REL_TOL = 0.01
DELTA_FRACTION_OF_INV_N = 0.1
_TRIGGERS = ("entries_no_update", "entries_no_delete")
_CAP_TRIGGERS = ("caps_no_update", "caps_no_delete")


# --------------------------------------------------------------------------
# Accounting (pure)
# --------------------------------------------------------------------------
def pld_epsilon(history: Sequence[Mechanism], *, delta: float,
                discretization: float = PLD_DISCRETIZATION, neighbours: str = ADD_REMOVE) -> float:
    """ε upper bound from Google's ``dp-accounting`` PLD accountant (pessimistic
    discretisation), each tuple a ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
    self-composed ``steps`` times."""
    return epsilon(history, delta=delta, accountant="pld", neighbours=neighbours,
                   interval=discretization)


def epsilon_three_ways(history: Sequence[Mechanism], *, delta: float) -> dict[str, float]:
    """The reported relation and the other one, beside each other:
    ``replace_one`` (PLD: what the sites report and enforce, since their record
    counts are public), and add/remove three ways: ``prv``, ``pld``, ``rdp``."""
    grouped = compress(history)
    return {"replace_one": pld_epsilon(grouped, delta=delta, neighbours=REPLACE_ONE),
            PRV: epsilon(grouped, delta=delta, accountant=PRV, neighbours=ADD_REMOVE),
            "pld": pld_epsilon(grouped, delta=delta),
            "rdp": epsilon(grouped, delta=delta, accountant="rdp", neighbours=ADD_REMOVE)}


def report_tolerance(bound: float) -> float:
    """How far below ``bound`` a reported ε may be without being an under-report."""
    return REPORT_ABS_TOL + REPORT_REL_TOL * abs(bound)


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Hazard:
    severity: str  # "error" or "warning"
    code: str
    message: str
    site: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"hazard severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass(frozen=True)
class LedgerFile:
    """What is on disk, read without writing a byte."""

    path: Path
    entries: list[Entry]
    triggers: tuple[str, ...]
    caps: list[dict] = field(default_factory=list)  # the site's recorded caps, oldest first
    seal: str | None = None  # the keyed seal over (count, last hash)
    key: bytes | None = field(default=None, repr=False)  # the chain key, when found
    key_path: str | None = None


@dataclass
class SiteAudit:
    site: str
    ledger: str | None
    run_ids: list[str]
    rounds: int
    total_steps: int
    sigma_range: tuple[float, float] | None
    q_range: tuple[float, float] | None
    delta: float | None
    dataset_size: int | None
    cap: float | None
    status: str
    epsilon: dict[str, float] = field(default_factory=dict)  # prv / pld / rdp
    epsilon_reported: float | None = None
    cumulative: list[dict] = field(default_factory=list)  # one point per ledger entry
    chain_ok: bool = True
    fingerprints: list[str] = field(default_factory=list)
    hazards: list[Hazard] = field(default_factory=list)
    # What the site sent the server in this run: {field, class, value} (common/protocol.py)
    released: list[dict] = field(default_factory=list)
    anchors_matched: int = 0  # replies whose (count, head hash) the ledger matches
    chain: str = ""  # "keyed, verified" / "keyed, unverified" / "unkeyed" / "broken"


@dataclass
class RunAudit:
    label: str
    path: str
    run_id: str | None
    dp: bool | None
    mode: str | None
    dataset: str | None
    final: dict[str, float | None]
    cap: float | None
    delta: float | None
    sites: list[SiteAudit] = field(default_factory=list)
    hazards: list[Hazard] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # statements, e.g. how the backbone was chosen

    @property
    def max_epsilon(self) -> float | None:
        vals = [s.epsilon["replace_one"] for s in self.sites if "replace_one" in s.epsilon]
        return max(vals) if vals else None


@dataclass
class AuditReport:
    runs: list[RunAudit]
    hazards: list[Hazard] = field(default_factory=list)  # across runs
    unit_of_privacy: str = UNIT_OF_PRIVACY
    trust_model: str = TRUST_MODEL
    accountants: str = ACCOUNTANT_NOTE
    assumptions: list[str] = field(default_factory=lambda: [HYPERPARAMETER_ASSUMPTION])
    generated_at: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    empirical: list[dict] = field(default_factory=list)  # see common/audit/empirical.py

    def all_hazards(self) -> list[Hazard]:
        out = list(self.hazards)
        for r in self.runs:
            out += r.hazards
            for s in r.sites:
                out += s.hazards
        return out

    @property
    def has_errors(self) -> bool:
        return any(h.severity == "error" for h in self.all_hazards())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["has_errors"] = self.has_errors
        d["counts"] = {sev: sum(h.severity == sev for h in self.all_hazards()) for sev in SEVERITIES}
        return clean_json(d)


# --------------------------------------------------------------------------
# Reading (read-only; an audit must not alter the evidence)
# --------------------------------------------------------------------------
def read_ledger(path: str | Path) -> LedgerFile:
    """Entries and append-only triggers of a ledger file, opened read-only.

    ``common.privacy.ledger.Ledger`` would (re)create the schema and triggers on open,
    which would hide a dropped trigger; this does not.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger file at {path}")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "entries" not in tables:
            raise ValueError(f"{path} is not a fedtransfer ledger (it has no 'entries' table)")
        entries = read_entries(con)
        triggers = tuple(sorted(r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'")))
        caps = [dict(zip(("seq", "epsilon", "delta", "created_at", "reason"), r, strict=True))
                for r in con.execute("SELECT seq, epsilon, delta, created_at, reason FROM caps "
                                     "ORDER BY seq")] if "caps" in tables else []
        row = con.execute("SELECT value FROM meta WHERE key='seal'").fetchone() \
            if "meta" in tables else None
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a readable SQLite ledger: {exc}") from exc
    finally:
        con.close()
    # The site's chain key, if the auditor has it beside the ledger (the default
    # place a site keeps it; a site may keep it elsewhere and hand it over).
    key_path = default_key_path(path)
    key = read_key(key_path) if key_path.is_file() else None
    return LedgerFile(path=path, entries=entries, triggers=triggers, caps=caps,
                      seal=str(row[0]) if row else None, key=key,
                      key_path=str(key_path) if key is not None else None)


def is_ledger(path: Path) -> bool:
    try:
        read_ledger(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


@dataclass
class Source:
    """One thing to audit: a run (with its summary) or loose ledgers."""

    label: str
    path: Path
    summary: dict | None
    config: dict
    ledgers: dict[str, Path]  # site id -> ledger file


_SITE_DIR = re.compile(r"^site-(.+)$")


def site_id_of(ledger_path: Path) -> str:
    """``.../site-3/ledger.sqlite`` -> ``"3"``; otherwise the file's stem."""
    m = _SITE_DIR.match(ledger_path.parent.name)
    return m.group(1) if m else ledger_path.stem


def _run_source(run_dir: Path) -> Source:
    summary = json.loads((run_dir / "summary.json").read_text())
    config: dict = {}
    if (run_dir / "config.toml").is_file():
        config = tomllib.loads((run_dir / "config.toml").read_text())
    ledger_dir = run_dir / "sites"
    configured = config.get("ledger-dir")
    if configured and Path(configured).is_dir() and not ledger_dir.is_dir():
        ledger_dir = Path(configured)
    ledgers = {}
    if ledger_dir.is_dir():
        for p in sorted(ledger_dir.rglob("*.sqlite")):
            if is_ledger(p):
                ledgers[site_id_of(p)] = p
    return Source(label=run_dir.name, path=run_dir, summary=summary, config=config,
                  ledgers=ledgers)


def discover(paths: Sequence[str | Path]) -> list[Source]:
    """Turn command-line paths into audit sources.

    A directory with ``summary.json`` is a run. Any other directory is searched
    recursively: each ``summary.json`` found is a run, and ledger files that
    belong to none of them are audited on their own. A file is one ledger.
    """
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if not is_ledger(path):
                raise ValueError(f"{path} is neither a run directory nor a fedtransfer ledger "
                                 "(expected a folder with summary.json, a ledger .sqlite file, "
                                 "or a folder containing either)")
            sources.append(Source(label=str(path), path=path, summary=None, config={},
                                  ledgers={site_id_of(path): path}))
        elif path.is_dir():
            if (path / "summary.json").is_file():
                sources.append(_run_source(path))
                continue
            runs = [_run_source(p.parent) for p in sorted(path.rglob("summary.json"))]
            claimed = {p.resolve() for r in runs for p in r.ledgers.values()}
            loose = {}
            for p in sorted(path.rglob("*.sqlite")):
                if p.resolve() not in claimed and is_ledger(p):
                    sid = site_id_of(p)
                    key = sid if sid not in loose else str(p.relative_to(path))
                    loose[key] = p
            sources += runs
            if loose:
                sources.append(Source(label=f"{path} (ledgers)", path=path, summary=None,
                                      config={}, ledgers=loose))
            if not runs and not loose:
                raise ValueError(f"{path} holds no run directory (summary.json) and no ledger file")
        else:
            raise FileNotFoundError(f"{path} does not exist (give a run directory, a ledger file "
                                    "or a folder of ledgers)")
    return sources


# --------------------------------------------------------------------------
# Auditing one site (pure: entries and summary in, findings out)
# --------------------------------------------------------------------------
def _range(values: list[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def anchor_hazards(site: str, entries: Sequence[Entry], summary_site: dict
                   ) -> tuple[list[Hazard], int]:
    """The ledger against the anchors its replies carried (entry count and keyed head
    hash, recorded by the server): a deleted row or a rebuilt chain cannot match.
    Returns the hazards and how many anchors matched."""
    hazards, matched = [], 0
    for h in summary_site.get("history") or []:
        count, head = h.get("ledger_entries"), h.get("ledger_head")
        if not count or not head:
            continue
        where = f"round {h.get('round')} of run {h.get('run_id') or '?'}"
        if int(count) > len(entries):
            hazards.append(Hazard("error", "ledger-truncated",
                                  f"the site's reply for {where} anchored {int(count)} ledger "
                                  f"entries; the ledger now holds {len(entries)}", site))
        elif entries[int(count) - 1].hash != head:
            hazards.append(Hazard("error", "anchor-mismatch",
                                  f"entry {int(count)}'s hash differs from the anchor the site "
                                  f"sent for {where}: the ledger was rewritten", site))
        else:
            matched += 1
    return hazards, matched


def compare_with_summary(site: str, entries: Sequence[Entry], run_id: str,
                         summary_site: dict) -> list[Hazard]:
    """Ledger entries against the server's per-site history, matched by (run, round).

    Each history row names the run it came from (a resumed run keeps the rows of
    the run it resumed); rows without one belong to ``run_id``.
    """
    hazards = []
    reported = {(str(h.get("run_id") or run_id), int(h["round"])): h
                for h in summary_site.get("history") or []}
    runs = {r for r, _ in reported} | {run_id}
    ledger_rounds: dict[tuple[str, int], list[Entry]] = {}
    for e in entries:
        if e.run_id in runs:
            ledger_rounds.setdefault((e.run_id, int(e.round)), []).append(e)
    for run, r in sorted(set(reported) - set(ledger_rounds)):
        hazards.append(Hazard("error", "update-without-ledger-entry",
                              f"the server recorded round {r} of run {run} from this site but its "
                              f"ledger has no entry for it: an update left the site without its "
                              "spend being recorded (or the entry was deleted)", site))
    for run, r in sorted(set(ledger_rounds) - set(reported)):
        hazards.append(Hazard("warning", "charged-not-released",
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
        if problems:
            hazards.append(Hazard("error", "ledger-summary-mismatch",
                                  f"round {r}: the ledger disagrees with summary.json: "
                                  + "; ".join(problems), site))
    return hazards


def audit_site(site: str, entries: Sequence[Entry], *, ledger_path: str | None = None,
               triggers: Sequence[str] = _TRIGGERS, summary_site: dict | None = None,
               run_id: str | None = None, cap: float | None = None,
               delta: float | None = None, caps: Sequence[dict] = (),
               key: bytes | None = None, sealed: str | None = None) -> SiteAudit:
    """Audit one site's ledger entries (and, when given, what the server recorded).

    Args:
        site: the site's id, for messages.
        entries: the ledger's rows in ``seq`` order.
        summary_site: ``summary.json``'s ``sites.<id>`` block, if any.
        run_id: the run ``summary_site`` belongs to.
        cap: the ε cap the run records state (the server's view).
        caps: the caps the site's ledger recorded; the last one is the cap the
            site enforced, and it is the one checked.
        key, sealed: the site's chain key (if the auditor has it) and the ledger's
            seal; with the key, the chain and the seal are verified.
        delta: δ to report ε at; defaults to the ledger's (last) δ.
    """
    hz: list[Hazard] = []
    entries = list(entries)
    chain = verify_chain(entries, key=key, sealed=sealed)
    for problem in chain:
        hz.append(Hazard("error", "broken-hash-chain", f"ledger hash chain broken: {problem}", site))
    if entries and not all(e.keyed for e in entries):
        hz.append(Hazard("error", "unkeyed-chain",
                         f"{sum(not e.keyed for e in entries)} entries carry an unkeyed hash: "
                         "whoever can edit the file can rebuild that chain after changing a row",
                         site))
    elif entries and key is None:
        hz.append(Hazard("warning", "chain-unverified",
                         "the chain is keyed and the site's key was not given (it is looked for "
                         "beside the ledger as <ledger>.key): linkage checked, contents not", site))
    anchor_hz, anchors = anchor_hazards(site, entries, summary_site or {})
    hz += anchor_hz
    chain_state = ("n/a" if not entries else "broken" if chain
                   else "unkeyed" if not all(e.keyed for e in entries)
                   else "keyed, verified" if key is not None else "keyed, unverified")
    missing = [t for t in _TRIGGERS if t not in triggers]
    missing += [t for t in _CAP_TRIGGERS if caps and t not in triggers]
    if entries and missing:
        hz.append(Hazard("error", "append-only-triggers-missing",
                         f"the ledger's append-only triggers {', '.join(missing)} are gone: "
                         "someone altered the file's schema (rows may have been edited)", site))
    if caps:
        own = float(caps[-1]["epsilon"])
        for before, after in zip(caps, caps[1:], strict=False):
            if after["epsilon"] > before["epsilon"] or after["delta"] != before["delta"]:
                hz.append(Hazard("warning", "cap-raised",
                                 f"the site raised its cap from ε={before['epsilon']:g} "
                                 f"(δ={before['delta']:g}) to ε={after['epsilon']:g} "
                                 f"(δ={after['delta']:g}): {after['reason']}", site))
        if cap is not None and abs(float(cap) - own) > 1e-12:
            hz.append(Hazard("warning", "cap-differs-from-run-records",
                             f"the site enforced its own cap ε={own:g} (its ledger); the run "
                             f"records say {float(cap):g}; the audit checks the site's", site))
        cap = own
    summary_site = summary_site or {}
    status = str(summary_site.get("status") or ("ledger only" if entries else "no entries"))
    deltas = sorted({float(e.delta) for e in entries})
    if delta is None:
        delta = float(entries[-1].delta) if entries else (summary_site.get("delta") or None)
    if len(deltas) > 1:
        hz.append(Hazard("warning", "delta-varies",
                         f"entries use different δ values {deltas}; ε is reported at δ={delta:g}",
                         site))
    # The smallest N is the strictest yardstick for δ.
    sizes = sorted({int(e.dataset_size) for e in entries})
    n = sizes[0] if sizes else (int(summary_site["num_examples"])
                                 if summary_site.get("num_examples") else None)
    # An impossible tuple (σ <= 0, q outside (0, 1], steps <= 0) has no ε: name it,
    # account the rest, and fail the audit rather than crash.
    impossible = []
    for e in entries:
        try:
            e.mechanism
        except (ValueError, TypeError) as exc:
            impossible.append(e)
            hz.append(Hazard("error", "impossible-mechanism",
                             f"entry {e.seq} (run {e.run_id} round {e.round}) holds σ="
                             f"{e.noise_multiplier!r}, q={e.sample_rate!r}, steps={e.steps!r}: "
                             f"{exc}; no ε can be derived from it, and ε below leaves it out",
                             site))
    entries = [e for e in entries if e not in impossible]
    history = [e.mechanism for e in entries]
    if not entries and summary_site.get("history"):
        # No ledger (e.g. the pooled centralized baseline): fall back to what the
        # trainer reported, and say so.
        history = [Mechanism(noise_multiplier=float(h["noise_multiplier"]),
                             sample_rate=float(h["sample_rate"]), steps=int(h["steps"]))
                   for h in summary_site["history"]]

    # Hazards from the mechanism fields.
    # A release over every record (DP feature scaling, common/privacy/scaling.py) is the
    # Gaussian mechanism itself: Poisson sampling at q = 1, exactly what is accounted.
    samplers = sorted({e.sampler for e in entries if e.sampler != "poisson"
                       and not (e.sampler == FULL_SAMPLER and e.sample_rate == 1.0)})
    if samplers:
        hz.append(Hazard("error", "non-poisson-sampling",
                         f"entries used sampler(s) {samplers}; the accountants assume Poisson "
                         "subsampling, so the recomputed ε is not a valid bound", site))
    if any(not e.secure_rng for e in entries):
        hz.append(Hazard("warning", "secure-rng-off",
                         "secure RNG off: DP noise and Poisson sampling came from torch's "
                         "non-cryptographic PRNG (seeded from OS entropy at the site, never from "
                         "the run config) without Opacus's secure_mode, so ε assumes that seed "
                         "stays secret and ignores floating-point attacks on the noise", site))
    add_remove = [e.seq for e in entries if e.accountant == PRV]
    if add_remove:
        hz.append(Hazard("error", "add-remove-with-public-count",
                         f"entries {add_remove} were accounted for add/remove neighbours, yet the "
                         "site released its exact record count: the guarantee that holds is "
                         "replace-one, which the audit reports (and checks against the cap)", site))
    accountants = sorted({e.accountant for e in entries} - {LEDGER_ACCOUNTANT, PRV})
    if accountants:
        hz.append(Hazard("warning", "unexpected-accountant",
                         f"entries were accounted with {accountants}; the audit recomputes "
                         "replace-one PLD and add/remove PRV, PLD and RDP regardless", site))
    if delta is not None and n:
        if delta >= 1.0 / n:
            hz.append(Hazard("error", "delta-too-large",
                             f"δ={delta:g} is not below 1/N = {1.0 / n:.3g} (N = {n} records): "
                             "a mechanism that publishes one random record outright meets it", site))
        elif delta > DELTA_FRACTION_OF_INV_N / n:
            hz.append(Hazard("warning", "delta-not-small",
                             f"δ={delta:g} is not well below 1/N = {1.0 / n:.3g} (N = {n}); "
                             f"use δ ≤ {DELTA_FRACTION_OF_INV_N:g}/N", site))

    # ε over the whole history (both relations), and the reported relation per entry,
    # recomputed exactly as a site computes it (PLD, replace-one, the sites' interval).
    eps: dict[str, float] = {}
    cumulative: list[dict] = []
    if history and delta is not None:
        eps = epsilon_three_ways(history, delta=delta)
        for i, e in enumerate(entries):
            prefix = compress(history[: i + 1])
            recomputed = epsilon(prefix, delta=float(e.delta))
            cumulative.append({"seq": e.seq, "run_id": e.run_id, "round": e.round,
                               "epsilon": recomputed, "epsilon_stored": e.epsilon_after,
                               "delta": e.delta})
            if e.accountant == PRV:  # an add/remove cache: flagged above, compared as such
                recomputed = epsilon(prefix, delta=float(e.delta), accountant=PRV,
                                     neighbours=ADD_REMOVE)
            tol = report_tolerance(recomputed)
            if e.epsilon_after < recomputed - tol:
                hz.append(Hazard("error", "stored-epsilon-too-low",
                                 f"entry {e.seq} (run {e.run_id} round {e.round}) stores "
                                 f"ε={e.epsilon_after:.4f} but its history recomputes to "
                                 f"{recomputed:.4f} ({e.accountant}, δ={e.delta:g})", site))
            elif e.epsilon_after > recomputed + tol:
                hz.append(Hazard("warning", "stored-epsilon-mismatch",
                                 f"entry {e.seq} stores ε={e.epsilon_after:.4f}, above the "
                                 f"recomputed {recomputed:.4f}: conservative, but the cache is "
                                 "stale or was computed differently", site))
        prv, pld = eps[PRV], eps[PLD]
        if abs(prv - pld) > AGREE_ABS_TOL + AGREE_REL_TOL * max(prv, pld):
            hz.append(Hazard("warning", "accountants-disagree",
                             f"add/remove: PRV ε={prv:.4f} and PLD ε={pld:.4f} differ by more "
                             "than their expected numerical error", site))
        if eps["replace_one"] < max(prv, pld) - report_tolerance(prv):
            hz.append(Hazard("error", "relation-inconsistent",
                             f"replace-one ε={eps['replace_one']:.4f} is below add/remove "
                             f"ε={max(prv, pld):.4f}, which cannot be", site))
        spent = max(eps["replace_one"], cumulative[-1]["epsilon"] if cumulative else 0.0)
        if cap is not None and spent > cap + report_tolerance(cap):
            hz.append(Hazard("error", "cap-exceeded",
                             f"recomputed ε={spent:.4f} (replace-one) exceeds the cap {cap:g}",
                             site))

    # What the server was told.
    reported = summary_site.get("epsilon")
    if reported is not None and eps and run_id is not None and entries:
        # The site reported ε over its ledger up to its last entry for this run.
        idx = max((i for i, e in enumerate(entries) if e.run_id == run_id), default=None)
        if idx is not None:
            bound = cumulative[idx]["epsilon"]
            if idx == len(entries) - 1:
                bound = max(bound, eps["replace_one"])
            if float(reported) < bound - report_tolerance(bound):
                hz.append(Hazard("error", "reported-epsilon-too-low",
                                 f"summary.json reports ε={float(reported):.4f} but the ledger "
                                 f"recomputes to {bound:.4f} (PLD, replace-one, δ={delta:g}); "
                                 f"allowed error {report_tolerance(bound):.4f}", site))
    elif reported is not None and eps and not entries:
        bound = eps["replace_one"]
        if float(reported) < bound - report_tolerance(bound):
            hz.append(Hazard("error", "reported-epsilon-too-low",
                             f"summary.json reports ε={float(reported):.4f} but its own history "
                             f"recomputes to {bound:.4f} (PLD, replace-one)", site))
    if summary_site and run_id is not None and entries:
        hz += compare_with_summary(site, entries, run_id, summary_site)

    return SiteAudit(
        site=site, ledger=ledger_path,
        run_ids=list(dict.fromkeys(e.run_id for e in entries)),
        rounds=len({(e.run_id, e.round) for e in entries}) if entries else len(history),
        total_steps=sum(m.steps for m in history),
        sigma_range=_range([m.noise_multiplier for m in history]),
        q_range=_range([m.sample_rate for m in history]),
        delta=delta, dataset_size=n, cap=cap, status=status, epsilon=eps,
        epsilon_reported=float(reported) if reported is not None else None,
        cumulative=cumulative, chain_ok=not chain, anchors_matched=anchors, chain=chain_state,
        fingerprints=sorted({e.data_fingerprint for e in entries}), hazards=hz)


# --------------------------------------------------------------------------
# Auditing runs
# --------------------------------------------------------------------------
def _final_metrics(summary: dict | None) -> dict[str, float | None]:
    final = (summary or {}).get("final") or {}
    return {k: final.get(k) for k in ("accuracy", "auc", "balanced_accuracy")}


def audit_source(src: Source) -> RunAudit:
    summary = src.summary
    privacy = (summary or {}).get("privacy") or {}
    run_id = str(summary["run_id"]) if summary and "run_id" in summary else None
    cap = privacy.get("target_epsilon")
    if cap is None and "target-epsilon" in src.config:
        cap = float(src.config["target-epsilon"])
    delta = privacy.get("target_delta")
    run = RunAudit(label=src.label, path=str(src.path), run_id=run_id,
                   dp=(summary or {}).get("dp"), mode=(summary or {}).get("mode"),
                   dataset=(summary or {}).get("dataset"), final=_final_metrics(summary),
                   cap=cap, delta=delta)
    summary_sites = (summary or {}).get("sites") or {}
    if summary is not None and not summary.get("dp"):
        run.hazards.append(Hazard("warning", "no-dp",
                                  "non-private run: it makes no ε claim (a baseline)"))
    ids = list(dict.fromkeys([*src.ledgers, *summary_sites]))
    for sid in sorted(ids, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
        ssite = summary_sites.get(sid)
        if sid not in src.ledgers:
            if summary is None or not summary.get("dp") or not ssite or not ssite.get("history"):
                continue  # a non-DP site, or one that never trained: nothing to account
            site = audit_site(sid, [], summary_site=ssite, run_id=run_id, cap=cap, delta=delta)
            if summary.get("mode") == "centralized":
                site.hazards.append(Hazard("warning", "no-ledger",
                                           "no ledger (pooled centralized baseline): ε recomputed "
                                           "from summary.json's history only", sid))
            else:
                site.hazards.append(Hazard("error", "ledger-missing",
                                           "the site trained under DP but no ledger file was "
                                           f"found for it under {src.path}", sid))
            run.sites.append(site)
            continue
        lf = read_ledger(src.ledgers[sid])
        site = audit_site(sid, lf.entries, ledger_path=str(lf.path), triggers=lf.triggers,
                          summary_site=ssite, run_id=run_id, cap=cap,
                          delta=delta if lf.entries else None, caps=lf.caps, key=lf.key,
                          sealed=lf.seal)
        if summary is not None and ssite is None and run_id in site.run_ids:
            site.hazards.append(Hazard("error", "site-not-in-summary",
                                       f"the ledger charges run {run_id} but summary.json has no "
                                       "record of this site: spend is missing from the run "
                                       "records", sid))
        run.sites.append(site)
    for site in run.sites:
        if summary_sites.get(site.site):
            site.released, more = released_values(site.site, summary_sites[site.site],
                                                  privacy.get("released"))
            site.hazards += more
    if summary is not None and summary.get("dp"):
        for item in privacy.get("not_charged") or []:
            run.hazards.append(Hazard("warning", "not-charged",
                                      f"sent without DP, declared public: {item}"))
        tuned = privacy.get("hyperparameters") or (summary.get("config") or {}).get(
            "hyperparameter-source")
        if tuned is not None and "private" in str(tuned).lower():
            run.hazards.append(Hazard("error", "hyperparameters-tuned-on-private-data",
                                      f"the run records say hyperparameters were {tuned!r}: the "
                                      "tuning's privacy cost is not in any ledger"))
        elif tuned in (None, "unspecified"):
            run.hazards.append(Hazard("warning", "hyperparameter-source-unspecified",
                                      "the run does not declare where its hyperparameters came "
                                      "from (config key hyperparameter-source); if they were "
                                      "tuned on the sites' records, that tuning is uncharged"))
    try:
        selection = (summary or {}).get("backbone_selection") or parse_record(
            str(src.config.get("backbone-selection", "")))
        statement, problems = selection_findings(selection)
    except ValueError as exc:
        statement, problems = None, [("backbone-selection-unreadable", str(exc))]
    if statement:
        run.notes.append(statement)
    run.hazards += [Hazard("error", code, message) for code, message in problems]
    return run


# Run-record keys that can only come from values computed on private records without
# DP (older runs sent them): the protocol field each one is.
_FORBIDDEN_RECORDS = {"train_loss": "train-loss", "feature_cache_hit": "feature-cache-hit"}


def released_values(site: str, ssite: dict, declared: dict | None) -> tuple[list[dict], list[Hazard]]:
    """``(rows, hazards)``: every field the site's train replies carried, with its
    privacy class (from the run's declared protocol) and its last value."""
    hz: list[Hazard] = []
    history = ssite.get("history") or []
    last = history[-1] if history else {}
    for key, name in _FORBIDDEN_RECORDS.items():
        if any(key in h for h in history):
            hz.append(Hazard("error", "forbidden-release",
                             f"the site sent '{name}', computed from its private records "
                             "without DP and charged to no ledger", site))
    if ssite.get("holdout"):
        hz.append(Hazard("error", "forbidden-release",
                         "the site sent holdout metrics (accuracy / AUC / loss of its private "
                         "holdout records) without DP, charged to no ledger", site))
    if ssite.get("dp") is False:
        hz.append(Hazard("error", "site-without-dp",
                         "the site's own policy trained without DP (dp = false): its head "
                         "carries no privacy guarantee", site))
    if not history:
        return [], hz
    if not declared or "train" not in declared:
        hz.append(Hazard("warning", "released-undeclared",
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


def cross_run_hazards(runs: Sequence[RunAudit], ledgers: dict[str, list[Entry]]) -> list[Hazard]:
    """Private records trained under separate ledgers.

    When the same site data (same fingerprint) appears in several ledger files,
    no single ledger composes those runs. If the runs were compared to choose
    hyperparameters or a best model, the cost is their composition.
    """
    by_fp: dict[str, dict[str, list[Entry]]] = {}
    for path, entries in ledgers.items():
        for e in entries:
            by_fp.setdefault(e.data_fingerprint, {}).setdefault(path, []).append(e)
    hazards = []
    for fp, files in by_fp.items():
        if len(files) < 2:
            continue
        all_entries = [e for es in files.values() for e in es]
        delta = min(e.delta for e in all_entries)
        composed = epsilon(compress(e.mechanism for e in all_entries), delta=delta)
        hazards.append(Hazard(
            "warning", "same-data-separate-ledgers",
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
        hazards.append(Hazard("error", "empirical-exceeds-claimed",
                              f"the canary audit proves ε ≥ {dp['epsilon_lower']:.3f} at "
                              f"{dp['confidence']:.0%} confidence but the accountant claims "
                              f"ε ≤ {dp['epsilon_claimed']:.3f} (add/remove): the implementation "
                              "leaks more than it accounts for", site))
    if result["power"]["smallest_ratio_caught"] is None:
        worst = max(result["controls"], key=lambda c: c["epsilon_true"] / c["epsilon_claimed"])
        hazards.append(Hazard("warning", "empirical-audit-weak",
                              f"the canaries did not catch even {worst['label']} (true ε "
                              f"{worst['epsilon_true']:.3f} against a claim of "
                              f"{worst['epsilon_claimed']:.3f}): the DP result means little", site))
    return hazards


def audit(paths: Sequence[str | Path], *, empirical: bool = False, site: str | None = None,
          canaries: int = 1000, seed: int = 0) -> AuditReport:
    """Audit every run and ledger under ``paths``.

    With ``empirical``, also run the one-run canary audit on one site of each
    federated DP run (``site``, default the first that trained).
    """
    sources = discover(paths)
    runs = []
    for src in sources:
        log.debug("auditing %s (%d ledgers)", src.path, len(src.ledgers))
        runs.append(audit_source(src))
    files = {str(p.resolve()): read_ledger(p).entries for src in sources for p in src.ledgers.values()}
    report = AuditReport(runs=runs, versions=library_versions())
    report.hazards = cross_run_hazards(runs, files)
    if empirical:
        # lazy: torch and Opacus only for --empirical
        from common.audit.empirical import audit_run_site

        targets = [s for s in sources if s.summary and s.summary.get("dp")
                   and s.summary.get("mode") == "federated"]
        if not targets:
            raise ValueError("--empirical needs at least one federated DP run directory "
                             "(with summary.json and config.toml)")
        for src in targets:
            entries = {sid: read_ledger(p).entries for sid, p in src.ledgers.items()}
            result = audit_run_site(src.path, src.summary, entries, site=site, m=canaries,
                                    seed=seed)
            report.empirical.append(result)
            report.hazards += empirical_hazards(result)
    return report

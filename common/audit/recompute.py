"""The privacy audit: recompute every site's ε from its ledger, run the checks, and
gather the findings into one report.

Flower-free and read-only. The audit never trusts a stored ε: it recomputes
every site's spend from the ledger's raw mechanism tuples,

* for replace-one neighbours (what the sites report and enforce: their record
  counts are public) with PLD, Google's ``dp-accounting``;
* for add/remove neighbours three ways, beside it: PRV (Opacus), PLD, and RDP
  (Opacus, looser), the first two cross-checking each other;

in the unit each site declared (one record, or one patient; for a record-level
site that declares up to k records per patient, the group-privacy ε per patient
beside it), and compares the ledger with what the run records say the sites
reported and with the signed anchors and seals the auditor holds. It verifies
with public keys only and fails closed (:mod:`common.audit.checks`). GDP is never
used: it is not an upper bound.

Inputs: :mod:`common.audit.sources` (run directories, ledger files, exports,
seals, keys); checks: :mod:`common.audit.checks`; rendering:
:mod:`common.audit.report`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.audit.checks import (
    SEVERITIES,
    STRICT,
    Hazard,
    Trust,
    cap_in_force,
    compare_with_summary,
    cross_run_hazards,
    empirical_hazards,
    epsilon_hazards,
    hazard,
    ledger_integrity,
    mechanism_hazards,
    released_values,
    reported_epsilon_hazard,
    run_setup_hazards,
    stored_epsilon_hazard,
    unit_of,
    unmatched_seals,
    usable_entries,
)
from common.audit.sources import (
    LedgerUnreadable,
    Source,
    discover,
    find_public_key,
    read_ledger,
    read_legacy_keys,
    read_seal,
    recorded_anchors,
)
from common.jsonio import clean_json
from common.models.transfer import parse_record, selection_findings
from common.privacy.accounting import (
    ADD_REMOVE,
    PRV,
    RECORD,
    REPLACE_ONE,
    UNITS_OF_PRIVACY,
    Mechanism,
    compress,
    epsilon,
    group_privacy,
)
from common.privacy.ledger import Anchor, Entry, library_versions

log = logging.getLogger(__name__)

TRUST_MODEL = (
    "Each site runs DP-SGD (Opacus) on its own machine and keeps its own ledger and ε cap; its "
    "own policy (node config), never the run config, decides whether it uses DP, its cap and δ, "
    "its unit of privacy, its holdout and what may leave it. "
    "The guarantee protects every training record (or patient, where the site declares it) of a "
    "site from the server, from the other sites and from anyone who later sees the released "
    "heads or the distilled student. "
    "The server is not trusted with data: aggregation of the noised heads, and distillation on "
    "public unlabelled data, are post-processing and cost no privacy. Each site must trust its "
    "own machine, its copy of the code and Opacus, and its random number generator. Besides the "
    "noised head a site sends only values declared public (listed per site below); anything else "
    "computed from its records is a hazard."
)
SIGNATURE_NOTE = (
    "Each site signs its ledger's seal and the anchor of every reply (ledger id, entry count, "
    "head hash) with its Ed25519 key; the audit verifies them with the site's registered public "
    "key only, so verifying cannot forge. A valid signature proves the site vouched for exactly "
    "these rows; the anchors and seals the auditor holds prove the rows were not rewritten "
    "since. No audit catches a site and a coordinator who rewrite both sides together; a third "
    "party that keeps the anchors would."
)
ACCOUNTANT_NOTE = (
    "ε is recomputed from the ledger's raw (σ, q, steps) tuples. Reported and enforced: "
    "replace-one neighbours (each site's record or patient count is public), PLD (Google "
    "dp-accounting, pessimistic upper bound; the only implementation here for replace-one with "
    "Poisson sampling). Beside it, add/remove neighbours three ways: PRV (Opacus), PLD and RDP "
    "(Opacus, looser), so the two relations can be compared and the two add/remove "
    "implementations cross-checked. GDP is never used: it can under-report ε."
)
HYPERPARAMETER_ASSUMPTION = (
    "Assumed, not verified: learning rate, clip norm, batch size, epochs and rounds were fixed "
    "from the scenario config, not tuned on the sites' private records. The run records do not "
    "say how they were chosen; tuning on private data leaks privacy that no ledger charges."
)
PLD_DISCRETIZATION = 1e-4


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
    return dict(_three_ways(tuple(compress(history)), float(delta)))


@functools.lru_cache(maxsize=256)
def _three_ways(grouped: tuple[Mechanism, ...], delta: float) -> tuple[tuple[str, float], ...]:
    """The memoised core of :func:`epsilon_three_ways` (a pure function of the merged
    history): an auditor comparing runs, or re-auditing one, pays for it once."""
    return (("replace_one", pld_epsilon(grouped, delta=delta, neighbours=REPLACE_ONE)),
            (PRV, epsilon(grouped, delta=delta, accountant=PRV, neighbours=ADD_REMOVE)),
            ("pld", pld_epsilon(grouped, delta=delta)),
            ("rdp", epsilon(grouped, delta=delta, accountant="rdp", neighbours=ADD_REMOVE)))


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------
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
    epsilon: dict[str, float] = field(default_factory=dict)  # replace_one / prv / pld / rdp
    epsilon_reported: float | None = None
    cumulative: list[dict] = field(default_factory=list)  # one point per ledger entry
    # The unit every ε of this site is in ("record", "patient"; "mixed" is an error),
    # its description, the declared most records per patient, and for a record-level
    # site with k > 1 the group-privacy guarantee per patient: {k, epsilon, delta}.
    unit: str = RECORD
    unit_of_privacy: str = UNITS_OF_PRIVACY[RECORD]
    group_size: int = 1
    group_privacy: dict[str, float] | None = None
    chain_ok: bool = True
    chain: str = "n/a"  # signed, verified / signed, unverified / unsealed / legacy / broken
    fingerprints: list[str] = field(default_factory=list)  # older ledgers' data hashes
    hazards: list[Hazard] = field(default_factory=list)
    # What the site sent the server in this run: {field, class, value} (common/protocol.py)
    released: list[dict] = field(default_factory=list)
    anchors_matched: int = 0  # replies whose anchor the ledger matches
    seals_matched: int = 0  # seals the auditor holds that the ledger matches
    anchored: int = 0  # entries covered by the latest anchor or seal held
    unanchored: int = 0  # entries after it
    ledger_id: str | None = None
    ledger_kind: str | None = None  # "sqlite" / "export"
    key_source: str | None = None  # where the site's registered public key came from
    key_id: str | None = None


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
    unit_of_privacy: str = UNITS_OF_PRIVACY[RECORD]
    trust_model: str = TRUST_MODEL
    signatures: str = SIGNATURE_NOTE
    accountants: str = ACCOUNTANT_NOTE
    assumptions: list[str] = field(default_factory=lambda: [HYPERPARAMETER_ASSUMPTION])
    generated_at: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    empirical: list[dict] = field(default_factory=list)  # see common/audit/empirical.py
    # What the auditor held and accepted (the command's flags).
    trust: dict[str, Any] = field(default_factory=dict)

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

    def accepted(self) -> dict[str, list[Hazard]]:
        """Findings the auditor accepted, by flag (the report's banner)."""
        out: dict[str, list[Hazard]] = {}
        for h in self.all_hazards():
            if h.accepted:
                out.setdefault(h.accepted, []).append(h)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["has_errors"] = self.has_errors
        d["counts"] = {sev: sum(h.severity == sev for h in self.all_hazards()) for sev in SEVERITIES}
        d["accepted"] = {flag: [asdict(h) for h in hs] for flag, hs in self.accepted().items()}
        return clean_json(d)


# --------------------------------------------------------------------------
# One site (pure: entries and run records in, findings out)
# --------------------------------------------------------------------------
def _range(values: list[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _delta_ok(d: Any) -> bool:
    return isinstance(d, int | float) and not isinstance(d, bool) and 0 < d < 1


def audit_site(site: str, entries: Sequence[Entry], *, ledger_path: str | None = None,
               summary_site: dict | None = None, run_id: str | None = None,
               cap: float | None = None, delta: float | None = None, caps: Sequence[dict] = (),
               malformed: Mapping[int, Any] | None = None) -> SiteAudit:
    """ε and the accounting checks for one site's ledger entries (and, when given,
    what the server recorded). Integrity (chain, signatures, anchors) is
    :func:`common.audit.checks.ledger_integrity`.

    Args:
        site: the site's id, for messages.
        entries: the ledger's rows in ``seq`` order.
        summary_site: ``summary.json``'s ``sites.<id>`` block, if any.
        run_id: the run ``summary_site`` belongs to.
        cap: the ε cap the run records state (the server's view).
        caps: the caps the site's ledger recorded; the last one is the cap the
            site enforced, and it is the one checked.
        delta: δ to report ε at; defaults to the ledger's (last) δ.
        malformed: rows whose values have the wrong type (left out of ε).
    """
    hz: list[Hazard] = []
    entries = list(entries)
    summary_site = summary_site if isinstance(summary_site, dict) else {}
    cap, more = cap_in_force(site, caps, cap)
    hz += more
    status = str(summary_site.get("status") or ("ledger only" if entries else "no entries"))
    usable, more = usable_entries(site, entries, malformed or {})
    hz += more
    computable = not any(h.code == "epsilon-not-computed" for h in more)
    unit, k, more = unit_of(site, usable)
    hz += more
    if not _delta_ok(delta):
        delta = float(usable[-1].delta) if usable else (
            summary_site.get("delta") if _delta_ok(summary_site.get("delta")) else None)
    # The smallest N is the strictest yardstick for δ.
    sizes = sorted({int(e.dataset_size) for e in usable})
    n = sizes[0] if sizes else (int(summary_site["num_examples"])
                                if isinstance(summary_site.get("num_examples"), int)
                                and summary_site["num_examples"] else None)
    history = [e.mechanism for e in usable]
    if not entries and summary_site.get("history"):
        # No ledger (e.g. the pooled centralized baseline): fall back to what the
        # trainer reported, and say so.
        try:
            history = [Mechanism(noise_multiplier=float(h["noise_multiplier"]),
                                 sample_rate=float(h["sample_rate"]), steps=int(h["steps"]))
                       for h in summary_site["history"]]
        except (KeyError, TypeError, ValueError) as exc:
            hz.append(hazard("run-records-unreadable", f"the site's history in summary.json "
                             f"holds no valid mechanism: {exc}", site))
            history = []
    hz += mechanism_hazards(site, usable, delta=delta, n=n)

    # ε over the whole history (both relations), and the reported relation per entry,
    # recomputed exactly as a site computes it (PLD, replace-one, the sites' interval).
    eps: dict[str, float] = {}
    cumulative: list[dict] = []
    if history and delta is not None and computable:
        eps = epsilon_three_ways(history, delta=delta)
        for i, e in enumerate(usable):
            prefix = compress(history[: i + 1])
            recomputed = epsilon(prefix, delta=float(e.delta))
            cumulative.append({"seq": e.seq, "run_id": e.run_id, "round": e.round,
                               "epsilon": recomputed, "epsilon_stored": e.epsilon_after,
                               "delta": e.delta, "unit": e.unit})
            if e.accountant == PRV:  # an add/remove cache: flagged, compared as such
                recomputed = epsilon(prefix, delta=float(e.delta), accountant=PRV,
                                     neighbours=ADD_REMOVE)
            if (h := stored_epsilon_hazard(site, e, recomputed)) is not None:
                hz.append(h)
        spent = max(eps["replace_one"], cumulative[-1]["epsilon"] if cumulative else 0.0)
        hz += epsilon_hazards(site, eps, spent, cap)

    # What the server was told.
    reported = summary_site.get("epsilon")
    if not isinstance(reported, int | float) or isinstance(reported, bool):
        reported = None
    if reported is not None and eps and run_id is not None and usable:
        # The site reported ε over its ledger up to its last entry for this run.
        idx = max((i for i, e in enumerate(usable) if e.run_id == run_id), default=None)
        if idx is not None:
            bound = cumulative[idx]["epsilon"]
            if idx == len(usable) - 1:
                bound = max(bound, eps["replace_one"])
            if (h := reported_epsilon_hazard(site, float(reported), bound, delta)) is not None:
                hz.append(h)
    elif reported is not None and eps and not entries:
        if (h := reported_epsilon_hazard(site, float(reported), eps["replace_one"], delta,
                                         own_history=True)) is not None:
            hz.append(h)
    if summary_site and run_id is not None and entries:
        try:
            hz += compare_with_summary(site, usable, run_id, summary_site)
        except (KeyError, TypeError, ValueError) as exc:
            hz.append(hazard("run-records-unreadable", f"the site's history in summary.json "
                             f"cannot be compared with its ledger: {exc!r}", site))

    gp = None
    if unit == RECORD and k > 1 and "replace_one" in eps and delta is not None:
        e_k, d_k = group_privacy(eps["replace_one"], delta, k)
        gp = {"k": k, "epsilon": e_k, "delta": d_k}
    return SiteAudit(
        site=site, ledger=ledger_path,
        run_ids=list(dict.fromkeys(str(e.run_id) for e in entries)),
        rounds=len({(e.run_id, e.round) for e in usable}) if entries else len(history),
        total_steps=sum(m.steps for m in history),
        sigma_range=_range([m.noise_multiplier for m in history]),
        q_range=_range([m.sample_rate for m in history]),
        delta=delta, dataset_size=n, cap=cap, status=status, epsilon=eps,
        epsilon_reported=float(reported) if reported is not None else None,
        cumulative=cumulative, unit=unit,
        unit_of_privacy=UNITS_OF_PRIVACY.get(unit, "mixed: records and patients (an error)"),
        group_size=k, group_privacy=gp,
        fingerprints=sorted({e.data_fingerprint for e in usable if e.data_fingerprint}),
        hazards=hz)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------
def _final_metrics(summary: dict | None) -> dict[str, float | None]:
    final = (summary or {}).get("final") or {}
    return {k: final.get(k) for k in ("accuracy", "auc", "balanced_accuracy")}


def _site_order(s: str):
    return (not s.isdigit(), int(s) if s.isdigit() else 0, s)


def audit_source(src: Source, *, trust: Trust = STRICT,
                 seals: Sequence[tuple[Path, Anchor]] = (),
                 legacy_keys: Sequence[bytes] = ()) -> RunAudit:
    """Audit one run directory (or a set of loose ledgers)."""
    summary = src.summary
    privacy = (summary or {}).get("privacy") or {}
    run_id = str(summary["run_id"]) if summary and "run_id" in summary else None
    cap = _number(privacy.get("target_epsilon"))
    if cap is None:
        cap = _number(src.config.get("target-epsilon"))
    delta = _number(privacy.get("target_delta"))
    run = RunAudit(label=src.label, path=str(src.path), run_id=run_id,
                   dp=(summary or {}).get("dp"), mode=(summary or {}).get("mode"),
                   dataset=(summary or {}).get("dataset"), final=_final_metrics(summary),
                   cap=cap, delta=delta)
    run.hazards += [hazard("run-records-unreadable", p) for p in src.problems]
    summary_sites = (summary or {}).get("sites") or {}
    ids = list(dict.fromkeys([*src.ledgers, *summary_sites]))
    for sid in sorted(ids, key=_site_order):
        ssite = summary_sites.get(sid)
        if sid not in src.ledgers:
            if summary is None or not summary.get("dp") or not ssite or not ssite.get("history"):
                continue  # a non-DP site, or one that never trained: nothing to account
            site = audit_site(sid, [], summary_site=ssite, run_id=run_id, cap=cap, delta=delta)
            if summary.get("mode") == "centralized":
                site.hazards.append(hazard("no-ledger", "no ledger (pooled centralized "
                                           "baseline): ε recomputed from summary.json's history "
                                           "only", sid))
            else:
                site.hazards.append(hazard("ledger-missing",
                                           "the site trained under DP but no ledger file or "
                                           f"export was found for it under {src.path}", sid))
            site.chain = "missing"
            run.sites.append(site)
            continue
        path = src.ledgers[sid]
        try:
            lf = read_ledger(path)
        except (LedgerUnreadable, FileNotFoundError) as exc:
            site = audit_site(sid, [], ledger_path=str(path), summary_site=ssite, run_id=run_id,
                              cap=cap, delta=delta)
            site.hazards.insert(0, hazard("ledger-unreadable", str(exc), sid))
            site.chain, site.chain_ok = "unreadable", False
            run.sites.append(site)
            continue
        delivered = None
        if sid in src.delivered:
            try:
                delivered = read_ledger(src.delivered[sid])
            except (LedgerUnreadable, FileNotFoundError) as exc:
                run.hazards.append(hazard("ledger-unreadable", f"the export site {sid} "
                                          f"delivered: {exc}", sid))
        key, key_problems = find_public_key(sid, src.run_dir, trust.public_keys)
        integrity = ledger_integrity(
            sid, lf, key=key, key_problems=key_problems, anchors=recorded_anchors(ssite),
            seals=[s for _, s in seals if lf.ledger_id and s.ledger_id == lf.ledger_id],
            legacy_keys=legacy_keys, delivered=delivered, trust=trust)
        site = audit_site(sid, lf.entries, ledger_path=str(lf.path), summary_site=ssite,
                          run_id=run_id, cap=cap, delta=delta if lf.entries else None,
                          caps=lf.caps, malformed=lf.malformed)
        site.hazards = integrity.hazards + site.hazards
        site.chain = integrity.chain
        site.chain_ok = integrity.chain not in ("broken", "unreadable")
        site.anchors_matched, site.seals_matched = integrity.anchors_matched, integrity.seals_matched
        site.anchored = integrity.anchored
        site.unanchored = max(0, len(lf.entries) - integrity.anchored)
        site.key_source, site.key_id = integrity.key_source, integrity.key_id
        site.ledger_id, site.ledger_kind = lf.ledger_id, lf.kind
        if summary is not None and ssite is None and run_id in site.run_ids:
            site.hazards.append(hazard("site-not-in-summary",
                                       f"the ledger charges run {run_id} but summary.json has no "
                                       "record of this site: spend is missing from the run "
                                       "records", sid))
        run.sites.append(site)
    for site in run.sites:
        if isinstance(summary_sites.get(site.site), dict):
            site.released, more = released_values(site.site, summary_sites[site.site],
                                                  privacy.get("released"))
            site.hazards += more
    try:
        selection = (summary or {}).get("backbone_selection") or parse_record(
            str(src.config.get("backbone-selection", "")))
        statement, problems = selection_findings(selection)
    except ValueError as exc:
        statement, problems = None, [("backbone-selection-unreadable", str(exc))]
    if statement:
        run.notes.append(statement)
    if summary is not None:
        run.hazards += run_setup_hazards(summary, problems)
    else:
        run.hazards += [hazard(code, message) for code, message in problems]
    return run


def report_unit(runs: Sequence[RunAudit]) -> str:
    """The report's unit line: the one unit every site used, else "per site"."""
    units = {s.unit for r in runs for s in r.sites}
    if len(units) <= 1:
        return UNITS_OF_PRIVACY.get(next(iter(units), RECORD), UNITS_OF_PRIVACY[RECORD])
    return ("per site (see each site's unit): " + "; ".join(
        f"{u}: {UNITS_OF_PRIVACY[u]}" for u in sorted(units) if u in UNITS_OF_PRIVACY))


def audit(paths: Sequence[str | Path], *, trust: Trust = STRICT, empirical: bool = False,
          site: str | None = None, canaries: int = 1000, seed: int = 0) -> AuditReport:
    """Audit every run and ledger under ``paths``, with what ``trust`` holds.

    With ``empirical``, also run the one-run canary audit on one site of each
    federated DP run (``site``, default the first that trained).

    Raises:
        FileNotFoundError, ValueError: a path, key folder, seal or legacy key that
            cannot be used (named). A bad ledger is a finding, never an exception.
    """
    for folder in trust.public_keys:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--public-keys {folder} is not a folder (it holds "
                                    "site-<id>/ledger.pub files)")
    seals = [(Path(p), read_seal(p)) for p in trust.seals]
    legacy_keys = read_legacy_keys(trust.legacy_keys)
    sources = discover(paths)
    runs = []
    for src in sources:
        log.debug("auditing %s (%d ledgers)", src.path, len(src.ledgers))
        runs.append(audit_source(src, trust=trust, seals=seals, legacy_keys=legacy_keys))
    files = {}
    for src in sources:
        for p in src.ledgers.values():
            try:
                files[str(p.resolve())] = read_ledger(p).entries
            except (LedgerUnreadable, FileNotFoundError):
                continue  # reported per site
    report = AuditReport(runs=runs, versions=library_versions(), unit_of_privacy=report_unit(runs),
                         trust={"public_keys": [str(p) for p in trust.public_keys],
                                "seals": [str(p) for p in trust.seals],
                                "legacy_keys": len(trust.legacy_keys),
                                "accept_unverified": trust.accept_unverified,
                                "accept_unanchored": trust.accept_unanchored})
    report.hazards = cross_run_hazards(files)
    report.hazards += unmatched_seals(seals, {s.ledger_id for r in runs for s in r.sites
                                              if s.ledger_id})
    if empirical:
        # lazy: torch and Opacus only for --empirical
        from common.audit.empirical import audit_run_site

        targets = [s for s in sources if s.summary and s.summary.get("dp")
                   and s.summary.get("mode") == "federated"]
        if not targets:
            raise ValueError("--empirical needs at least one federated DP run directory "
                             "(with summary.json and config.toml)")
        for src in targets:
            entries = {sid: files[str(p.resolve())] for sid, p in src.ledgers.items()
                       if str(p.resolve()) in files}
            result = audit_run_site(src.path, src.summary, entries, site=site, m=canaries,
                                    seed=seed)
            report.empirical.append(result)
            report.hazards += empirical_hazards(result)
    return report

"""The site's data, read as declared and checked once: admission.

A site reads its records only as its declaration says (:mod:`client.settings`).
It checks them against that declaration once, when it starts
(``fedtransfer site serve``), when its operator runs ``fedtransfer site check``,
or at its first message if neither has happened, and writes the outcome to its
own disk (``admission.json`` beside its ledger): whether the data reads as
declared, the training-unit count that it will release as public (the FedAvg
weight), and a fingerprint of the records that never leaves the site.

After that, no request can make the site re-read its records differently, and
the count it releases is the admitted one, never recomputed per request. A
record-dependent fault found later (a file that became unreadable, records that
no longer match the fingerprint, an error while training) takes the site out
of the federation: it answers every message with one fixed status
(``site-unavailable``) and writes its local log, until its operator acts
(``fedtransfer site check`` re-admits it). That is at most one bit, once, and
never an answer that depends on the request.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.settings import SiteSettings
from common.data.datasets import SiteData, load_dataset, site_data
from common.data.digests import read_public_hashes
from common.data.readers import SiteDataError, own_site_data
from common.data.grouping import group_sizes
from common.data.schema import Schema, SchemaError
from common.privacy.accounting import PATIENT

log = logging.getLogger(__name__)

ADMISSION_FILE = "admission.json"
# Every feature a site trains on is clamped to this magnitude (a declared, record-
# independent transform): with the guard's bounds on weights and learning rate it keeps
# every per-record loss and gradient finite (common/models: images are in [0, 1]).
FEATURE_LIMIT = 1e3


class SiteUnavailable(RuntimeError):
    """The site is out of the federation until its operator acts (see the module doc)."""


@dataclass(frozen=True)
class Admission:
    """The outcome of checking the site's data against its declaration."""

    key: str  # what was checked: the declaration and how the site reads its data
    admitted: bool
    num_train: int  # released as public (the unit count: records, or patients); 0 when not admitted
    num_holdout: int  # held-out units (records, or patients), for the site's own log
    fingerprint: str  # of the records read; stays at the site
    checked_at: float
    reason: str = ""
    # The shape of one record as read (fixed by the declaration: images resized to the
    # declared size, a table's declared columns; a simulated dataset's native size).
    record_shape: tuple[int, ...] = ()
    # The hash of the published public-record hash list the records were checked against
    # (none of them may be the coordinator's public or test records); "" when none is published.
    public_check: str = ""  # why not admitted, for the site's own log and operator only
    unit: str = "record"  # what num_train counts: the site's unit of privacy
    num_train_records: int = 0  # training records (patient unit: never released; the site's log)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1)


def admission_key(settings: SiteSettings) -> str:
    """What an admission covers: the declaration and every setting that decides
    which records the site trains on. A change to any of them needs a new check."""
    sim = settings.scenario
    reading = {"declaration": settings.declaration.sha256, "data": settings.data_path,
               "public-hashes": _file_sha256(settings.public_hashes),
               "holdout": settings.holdout, "holdout-seed": settings.holdout_seed,
               "unit": settings.privacy_unit, "group-size": settings.group_size,
               "site-id": settings.site_id,
               "scenario": None if sim is None else {
                   k: getattr(sim, k) for k in ("dataset", "data_dir", "num_sites", "partitioner",
                                                "dirichlet_alpha", "site_shift", "seed")}}
    return hashlib.sha256(json.dumps(reading, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path | None) -> str:
    """A published file's hash ('' when none is named; 'missing' when it is not there)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "missing"


def _path(settings: SiteSettings) -> Path:
    return settings.state_dir / ADMISSION_FILE


def _write(settings: SiteSettings, adm: Admission) -> None:
    path = _path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(adm.to_json())
    os.replace(tmp, path)


def stored(settings: SiteSettings) -> Admission | None:
    """The site's stored admission (None when there is none or it is unreadable)."""
    try:
        raw = json.loads(_path(settings).read_text())
        return Admission(**{**raw, "record_shape": tuple(raw.get("record_shape", ()))})
    except (OSError, ValueError, TypeError):
        return None


def admit(settings: SiteSettings) -> Admission:
    """Read the site's data as declared, check it, and store the outcome.

    Returns the admission (``admitted`` False when the data cannot be used: the
    reason is in the site's log and its admission file, never in a reply).
    """
    key = admission_key(settings)
    public_check = ""
    try:
        data = load_site_data(settings)
        problems = data_problems(data, tabular=settings.declaration.schema.input == "tabular")
        problems += unit_problems(data, settings)
        if settings.public_hashes is not None:
            public, public_check = read_public_hashes(settings.public_hashes)
            problems += public_overlap(data, public)
    except Exception as exc:  # noqa: BLE001  (any fault reading the site's own data)
        problems = [f"{type(exc).__name__}: {exc}"]
        data = None
    if problems:
        adm = Admission(key=key, admitted=False, num_train=0, num_holdout=0, fingerprint="",
                        checked_at=time.time(), reason="; ".join(problems))
        log.warning("site %d: its data cannot be used as declared (it does not join until its "
                    "operator fixes it and runs `fedtransfer site check`): %s",
                    settings.site_id, adm.reason)
    else:
        num_train, num_holdout = train_units(data, settings)
        adm = Admission(key=key, admitted=True, num_train=num_train, num_holdout=num_holdout,
                        fingerprint=data.fingerprint, checked_at=time.time(),
                        record_shape=tuple(data.train_x.shape[1:]), public_check=public_check,
                        unit=settings.privacy_unit, num_train_records=len(data.train_y))
        log.info("site %d admitted: %d training and %d holdout %ss (%d training records) read "
                 "as declared", settings.site_id, adm.num_train, adm.num_holdout,
                 settings.privacy_unit, len(data.train_y))
    _write(settings, adm)
    return adm


def require(settings: SiteSettings) -> Admission:
    """The site's admission, checking its data first if it has none for its
    current declaration.

    Raises:
        SiteUnavailable: the site is not admitted (or was taken out).
    """
    adm = stored(settings)
    if adm is None or adm.key != admission_key(settings):
        adm = admit(settings)
    if not adm.admitted:
        raise SiteUnavailable(adm.reason or "not admitted")
    return adm


def take_out(settings: SiteSettings, why: str) -> None:
    """A record-dependent fault: the site leaves the federation until its operator acts."""
    adm = stored(settings)
    out = Admission(key=adm.key if adm else admission_key(settings), admitted=False,
                    num_train=0, num_holdout=0, fingerprint=adm.fingerprint if adm else "",
                    checked_at=time.time(), reason=why,
                    record_shape=adm.record_shape if adm else ())
    _write(settings, out)
    log.error("site %d is out of the federation until its operator runs `fedtransfer site "
              "check`: %s", settings.site_id, why)


def train_units(data: SiteData, settings: SiteSettings) -> tuple[int, int]:
    """``(training units, holdout units)``: records, or patients where the site's unit is
    the patient. The first is the count the site releases (FedAvg weight, q's denominator)."""
    if settings.privacy_unit != PATIENT:
        return len(data.train_y), len(data.holdout_y)
    return len(group_sizes(data.train_groups)), len(group_sizes(data.holdout_groups))


def unit_problems(data: SiteData, settings: SiteSettings) -> list[str]:
    """What makes the data unusable in the site's unit (its own log names it): a
    patient-level site needs every record's patient id; a declared records-per-patient
    bound must hold where the ids are known (else the group-privacy ε would be wrong)."""
    if data.train_groups is None:
        if settings.privacy_unit == PATIENT:
            return ["privacy-unit = 'patient', but the site's records carry no patient id: "
                    "declare where they come from (data-path ?patient=...; docs/data.md, "
                    "'Patient ids')"]
        return []
    if settings.privacy_unit == PATIENT:
        if len(group_sizes(data.train_groups)) < 2:
            return ["privacy-unit = 'patient' needs at least 2 training patients"]
        return []  # a larger patient contributes a fresh subset of its records per step
    if settings.group_size > 1:
        largest = int(group_sizes(data.train_groups).max())
        if largest > settings.group_size:
            return [f"a patient has {largest} training records, above the site's declared "
                    f"max-records-per-patient {settings.group_size}: the group-privacy ε per "
                    "patient would not hold; declare the true bound"]
    return []


def public_overlap(data: SiteData, public: frozenset[str]) -> list[str]:
    """The site's records that are the coordinator's public or test records (named here,
    for the site's operator only)."""
    if not data.digests:
        return ["the site's records carry no digests to check against the coordinator's "
                "public records (a simulated partition?)"]
    hits = [name for name, d in zip(data.record_ids or data.digests, data.digests, strict=True)
            if d in public]
    if not hits:
        return []
    return [f"{len(hits)} of the site's {len(data.digests)} records are the coordinator's public "
            f"or test records (first: {', '.join(hits[:5])}); a site may not hold them: remove "
            "them, then run `fedtransfer site check` again"]


def data_problems(data: SiteData, *, tabular: bool = False) -> list[str]:
    """What makes read data unusable (the site's log names it). Unscaled tabular
    records may hold NaN where ``missing = "zero"`` fills the centre later."""
    problems = []
    if len(data.train_y) < 2:
        problems.append(f"{len(data.train_y)} training records: a site needs at least 2")
    for name, x in (("training", data.train_x), ("holdout", data.holdout_x)):
        bad = np.isinf(x) if tabular else ~np.isfinite(x)
        if x.size and bad.any():
            problems.append(f"{name} records hold non-finite values after reading")
    return problems


@functools.lru_cache(maxsize=2)
def _splits(spec: str, data_dir: str, seed: int, schema_json: str = ""):
    """The simulated federation's dataset, read once per process (arrays are
    never modified downstream); a CSV's columns mapped by the schema's names."""
    return load_dataset(spec, data_dir, seed,
                        schema=Schema.from_json(schema_json) if schema_json else None)


def load_site_data(settings: SiteSettings) -> SiteData:
    """The site's records, read exactly as its declaration says: a deployed site's own
    files (``settings.data_path``), or its simulated partition. Tabular records are
    unscaled here (:func:`scaled`). The holdout fraction and its seed are the site's
    own (its policy).

    Raises:
        common.data.readers.SiteDataError: the files do not read as declared (named
            in the site's own log only).
    """
    schema = settings.declaration.schema
    # A CSV's columns map by the schema's names; an image schema's window applies too.
    mapping = schema if schema.features or schema.image_window else None
    if settings.data_path:
        try:
            return own_site_data(settings.data_path, site_id=settings.site_id,
                                 holdout=settings.holdout, seed=settings.holdout_seed,
                                 num_classes=len(schema.classes), classes=schema.classes,
                                 image_size=schema.image_size or 64,
                                 channels=schema.image_channels or 1, schema=mapping)
        except SchemaError as exc:
            raise SiteDataError(str(exc)) from exc
    cfg = settings.scenario
    splits = _splits(cfg.dataset, cfg.data_dir, cfg.seed,
                     mapping.to_json() if mapping is not None else "")
    return site_data(splits, site_id=settings.site_id, num_sites=cfg.num_sites,
                     partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                     holdout=settings.holdout, shift=cfg.site_shift, seed=cfg.seed)


def scaled(data: SiteData, fitted: Schema | None) -> SiteData:
    """Tabular records clipped, centred and scaled by the federation's public (or DP)
    constants (:meth:`Schema.transform`); ``fitted`` has been checked by
    :mod:`client.guard` to equal the site's declaration. Images pass unchanged."""
    if fitted is None or fitted.input != "tabular":
        return data
    return dataclasses.replace(data, train_x=fitted.transform(data.train_x),
                               holdout_x=fitted.transform(data.holdout_x))

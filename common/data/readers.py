"""A site's own data on its own disk: image folders, DICOM, CSV files, MedMNIST ``.npz``.

Every record is decoded by :mod:`common.data.decode` (the one decoder per format,
which ``predict`` and export call too). Readers return every record with its
problems *listed*, never silently skipped: :func:`scan` gives a :class:`Scan`
(arrays plus what was wrong, file by file and row by row), and
:func:`read_site_records` turns a scan with any problem into a
:class:`SiteDataError` naming the places, so a site with bad data fails at join
time before anything touches its ledger.

Label convention: with declared class names (a deployed site's ``class-names``)
labels are mapped by name, and a name the declaration lacks is a problem
(one differing only in case is named as such), never a silent reorder. Without
a declaration, labels that are all integers are label indices (so a site that
lacks class ``3`` still maps ``7`` to 7); other names are sorted, which depends
on the names present, so a deployed site refuses that (:func:`own_site_data`).

Spec strings (the dataset registry's syntax, the node config's ``data-path``,
``site check --data`` and ``predict --input``)::

    imagefolder:<dir>[?site=folder&patient=...]   <dir>/<class>/**/*.png|jpg|jpeg|bmp|tif|tiff|dcm
    dicom:<dir>[?site=folder&patient=...]         the same, every file read as DICOM (any suffix)
    csv:<file or dir>[?label=COL&missing=error|drop|zero&site=COL&patient=column:COL]
    medmnist:<file.npz>                           (or a bare .npz path)

A bare directory is an image folder, a bare ``.csv`` a CSV. ``missing``: ``error``
(default), ``drop`` (drop the row) or ``zero`` (the feature's centre); there is no
``mean``: a fill value computed from the other records would let one record change
how every other record is treated.

**Patient ids** (``patient=``; read only to group a patient's records at the site,
never sent, never in a fingerprint that leaves; see docs/data.md):

* ``column:COL``: a CSV column;
* ``dicom``: each DICOM file's ``PatientID`` (the only non-pixel tag then read);
* ``folder``: the folder level below the class folder, ``<dir>/<class>/<patient>/*``;
* ``name:REGEX``: a pattern on the file name (its ``patient`` group, else group 1);
  percent-encode ``&``, ``+`` and ``#`` in it;
* ``manifest:FILE``: a CSV with columns ``file`` (path relative to ``<dir>``) and
  ``patient``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.data.decode import (
    IMAGE_SUFFIXES,
    RecordError,
    Window,
    conform,
    decode_dicom,
    decode_image,
    is_dicom,
    patient_from_name,
    read_csv_table,
    where,
)
from common.data.digests import record_digests
from common.data.schema import ID_COLUMN, MISSING, MISSING_TOKENS, Feature, Schema, SchemaError
from common.data.splits import SiteData, Splits, read_medmnist_npz

KINDS = ("imagefolder", "dicom", "csv", "medmnist")
OPTIONS = ("label", "missing", "site", "patient")
MISSING_POLICIES = MISSING
PATIENT_SOURCES = ("column", "dicom", "folder", "name", "manifest")


class SiteDataError(ValueError):
    """The site's data cannot be used as it is; the message names the files (site log only)."""


@dataclass(frozen=True)
class PatientSource:
    """Where each record's patient id comes from (``patient=`` in the data spec)."""

    kind: str
    value: str = ""

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(self.value)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec (see the module doc)."""

    kind: str
    path: Path
    label: str | None = None
    missing: str | None = None
    site: str | None = None
    patient: PatientSource | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """The non-feature CSV columns this spec names: label, site and patient."""
        return tuple(c for c in (self.label, self.site,
                                 self.patient.value if self.patient is not None
                                 and self.patient.kind == "column" else None) if c)

    @property
    def options(self) -> dict[str, str]:
        return {k: v for k, v in (("label", self.label), ("missing", self.missing),
                                  ("site", self.site)) if v}


@dataclass
class Scan:
    """Everything read from a site's data, and everything wrong with it."""

    kind: str
    path: Path
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    image_sizes: Counter = field(default_factory=Counter)  # "WxH MODE" -> count
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (file[, row R], why)
    label_problems: list[str] = field(default_factory=list)
    column_problems: list[str] = field(default_factory=list)  # one line per bad column
    columns: tuple[str, ...] = ()  # a CSV's design columns (schema order)
    sites: np.ndarray | None = None  # each record's site (a CSV's site column, a site folder)
    patients: np.ndarray | None = None  # each record's patient id (site-local, never sent)
    notes: list[str] = field(default_factory=list)
    # How labels became indices: "declared" (class names given), "indices"
    # (integer labels), or "sorted" (names sorted: depends on the names present).
    class_source: str = "indices"
    label: str = "label"  # a CSV's label column
    ids: list[str] = field(default_factory=list)  # each record's file or row (site log only)
    refused: int = 0  # records (files, rows) read but not usable: named in the problems
    # One digest per record as decoded at its native size (common/data/digests.py): what the
    # site compares with the coordinator's public and test records. Site-local, never sent.
    digests: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        got = Counter(int(v) for v in self.y)
        return {name: got.get(i, 0) for i, name in enumerate(self.classes)}

    def problems(self) -> list[str]:
        out = [f"unreadable {where(f)}: {why}" for f, why in self.corrupt]
        out += self.label_problems
        out += self.column_problems
        return out


def parse_patient(text: str) -> PatientSource:
    kind, sep, value = text.partition(":")
    if kind not in PATIENT_SOURCES or (kind in ("column", "name", "manifest") and not value) \
            or (kind in ("dicom", "folder") and sep):
        raise SiteDataError(f"patient={text!r}: allowed column:<COL>, dicom, folder, "
                            "name:<REGEX>, manifest:<file.csv>")
    if kind == "name":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise SiteDataError(f"patient=name:{value!r} is not a regular expression "
                                f"({exc})") from None
        if not pattern.groups and "patient" not in pattern.groupindex:
            raise SiteDataError(f"patient=name:{value!r} needs a group that captures the "
                                "patient id, e.g. name:^(P\\d+)_")
    return PatientSource(kind, value)


def data_spec(spec: str) -> DataSpec:
    """Parse a data spec (see the module doc).

    Raises:
        SiteDataError: an unknown kind or option, or a bad patient source.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        target = rest
    else:
        kind, target = "", spec
    target, _, query = target.partition("?")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}
    path = Path(target).expanduser()
    if not kind:
        if path.is_dir():
            kind = "imagefolder"
        elif path.suffix.lower() == ".csv":
            kind = "csv"
        elif path.suffix.lower() == ".npz":
            kind = "medmnist"
        else:
            raise SiteDataError(f"cannot tell the format of {spec!r}: give a class-folder "
                                "directory, a .csv or a .npz (or imagefolder:/dicom:/csv:/"
                                "medmnist:)")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SiteDataError(f"unknown option(s) {sorted(unknown)} in {spec!r}; "
                            f"allowed: {', '.join(OPTIONS)}")
    missing = options.get("missing")
    if missing == "mean":
        raise SiteDataError("missing-value policy 'mean' is not offered: a fill value computed "
                            "from the site's records lets one record change how every other "
                            f"record is treated; allowed: {', '.join(MISSING_POLICIES)}")
    if missing is not None and missing not in MISSING_POLICIES:
        raise SiteDataError(f"missing-value policy {missing!r} unknown; "
                            f"allowed: {', '.join(MISSING_POLICIES)}")
    patient = parse_patient(options["patient"]) if "patient" in options else None
    images = kind in ("imagefolder", "dicom")
    if patient is not None:
        if kind == "csv" and patient.kind != "column":
            raise SiteDataError(f"{spec}: a CSV's patient ids come from a column "
                                "(patient=column:<COL>)")
        if images and patient.kind == "column":
            raise SiteDataError(f"{spec}: image patient ids come from dicom, folder, "
                                "name:<REGEX> or manifest:<file.csv>")
        if kind == "medmnist":
            raise SiteDataError(f"{spec}: a MedMNIST .npz carries no patient ids")
    site = options.get("site")
    if images and site not in (None, "folder"):
        raise SiteDataError(f"{spec}: for an image folder, site=folder is the only site "
                            "option (<dir>/<site>/<class>/*)")
    return DataSpec(kind, path, label=options.get("label"), missing=missing, site=site,
                    patient=patient)


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``(kind, path, options)`` for a site data spec (see the module doc)."""
    d = data_spec(spec)
    opts = d.options
    if d.patient is not None:
        opts["patient"] = f"{d.patient.kind}{':' + d.patient.value if d.patient.value else ''}"
    return d.kind, d.path, opts


def _class_names(names: list[str], declared: tuple[str, ...] | None = None
                 ) -> tuple[tuple[str, ...], dict[str, int], str, list[str]]:
    """``(classes, index, source, problems)`` for the label names found.

    Declared names map by name; otherwise integer names are label indices
    (0..max, gaps kept), and other names are sorted.
    """
    if declared is not None:
        problems = []
        folded = {c.casefold(): c for c in declared}
        for n in sorted(set(names) - set(declared)):
            near = folded.get(n.casefold())
            problems.append(f"label '{n}' differs only in case from the declared class '{near}'"
                            if near else f"unknown label '{n}'; the declared classes are "
                            f"{list(declared)}")
        return tuple(declared), {c: i for i, c in enumerate(declared)}, "declared", problems
    if names and all(n.isdigit() for n in names):
        top = max(int(n) for n in names)
        classes = tuple(str(i) for i in range(top + 1))
        return classes, {n: int(n) for n in names}, "indices", []
    classes = tuple(sorted(names))
    return classes, {n: i for i, n in enumerate(classes)}, "sorted", []


# --------------------------------------------------------------------------
# Images (Pillow formats and DICOM)
# --------------------------------------------------------------------------


def image_files(folder: Path, *, dicom: bool = False) -> tuple[list[Path], list[Path]]:
    """``(images, ignored)`` under ``folder``, recursively and sorted: every file
    with an image suffix (:data:`common.data.decode.IMAGE_SUFFIXES`), or with
    ``dicom`` every file. Hidden files and folders are skipped."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if dicom:
        return files, []
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES])


def read_image(path: Path, *, channels: int | None, size: tuple[int, int] | None,
               window: Window | None = None, dicom: bool = False, patient: bool = False
               ) -> tuple[np.ndarray, str, str | None]:
    """One image as the readers give it: ``(values, description, patient id)``,
    decoded (:func:`common.data.decode.decode_image`) and conformed to the declared
    channels and size. The one function training, site check and predict call.

    Raises:
        RecordError: the file cannot be used, saying why.
    """
    dcm = is_dicom(path, dicom_any_suffix=dicom)
    if dcm:
        values, desc, pid = decode_dicom(path, window=window, patient=patient)
    else:
        (values, desc), pid = decode_image(path, window=window, dicom=False), None
    return conform(values, channels=channels, size=size), desc, pid


def _manifest(path: Path) -> dict[str, str]:
    try:
        table = read_csv_table(path)
    except RecordError as exc:
        raise SiteDataError(f"patient manifest: {exc}") from None
    if "file" not in table.header or "patient" not in table.header:
        raise SiteDataError(f"patient manifest {where(path.name)}: needs columns 'file' and "
                            f"'patient' (has {table.header})")
    fi, pi = table.column("file"), table.column("patient")
    out = {}
    for row, cells in table.rows:
        if len(cells) != len(table.header):
            raise SiteDataError(f"patient manifest {where(path.name, row)}: {len(cells)} fields, "
                                f"the header has {len(table.header)}")
        out[Path(cells[fi].strip()).as_posix()] = cells[pi].strip()
    return out


def scan_imagefolder(root: str | Path, *, size: tuple[int, int] | None = None,
                     channels: int | None = None, classes: tuple[str, ...] | None = None,
                     window: Window | None = None, dicom: bool = False,
                     patient: PatientSource | None = None, data_root: Path | None = None
                     ) -> Scan:
    """Read ``root/<class>/**/<image>``.

    With ``channels`` (1 or 3) and ``size`` declared, each image is converted
    and resized on its own (:func:`read_image`), as a deployed site does. Left to
    ``None`` (a simulation's pooled dataset, a site-check report), images become
    grey when every one is, else colour, at the most common size.
    Values are float32 in [0, 1] (:mod:`common.data.decode`).
    """
    if channels not in (None, 1, 3):
        raise SiteDataError(f"image channels must be 1 or 3, got {channels!r}")
    root = Path(root)
    data_root = data_root or root
    if not root.is_dir():
        raise SiteDataError(f"image folder not found: {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise SiteDataError(f"{root}: no class sub-folders (expected {root}/<class>/*.png)")
    classes, index, source, label_problems = _class_names([d.name for d in dirs], classes)
    manifest = _manifest(patient.value if Path(patient.value).is_absolute()
                         else data_root / patient.value) \
        if patient is not None and patient.kind == "manifest" else None
    corrupt: list[tuple[str, str]] = []
    loaded: list[tuple[np.ndarray, int, str | None]] = []
    ids: list[str] = []
    sizes: Counter = Counter()
    notes: list[str] = []
    ignored = 0
    for d in dirs:
        if d.name not in index:  # named in label_problems
            continue
        files, skipped = image_files(d, dicom=dicom)
        ignored += len(skipped)
        for f in files:
            rel = f.relative_to(data_root).as_posix()
            try:
                values, desc, pid = read_image(f, channels=None, size=None, window=window,
                                               dicom=dicom, patient=patient is not None
                                               and patient.kind == "dicom")
                if patient is not None:
                    pid = _patient_of(patient, f, d, rel, pid, manifest)
            except RecordError as exc:
                corrupt.append((rel, str(exc)))
                continue
            sizes[desc] += 1
            loaded.append((values, index[d.name], pid))
            ids.append(rel)
    if ignored:
        notes.append(f"ignored {ignored} file(s) without an image suffix "
                     f"({', '.join(IMAGE_SUFFIXES)})")
    got = Counter(lab for _, lab, _ in loaded)
    label_problems += [f"class '{c}' is empty (no readable image in {root / c})"
                       for i, c in enumerate(classes) if not got.get(i)]
    if channels is None:
        channels = 1 if loaded and all(v.ndim == 2 for v, _, _ in loaded) else 3
    colour = sum(v.ndim == 3 for v, _, _ in loaded)
    if channels == 1 and colour:
        notes.append(f"{colour} colour image(s) converted to grey (luma), the declared 1 channel")
    if size is None and loaded:
        h, w = Counter(v.shape[:2] for v, _, _ in loaded).most_common(1)[0][0]
        size = (w, h)
    shapes = {v.shape[:2] for v, _, _ in loaded}
    if loaded and (len(shapes) > 1 or (size[1], size[0]) not in shapes):
        notes.append(f"images of {len(shapes)} size(s), each resized to {size[0]}x{size[1]}")
    digests = record_digests(v for v, _, _ in loaded)
    arrays = [conform(v, channels=channels, size=size) for v, _, _ in loaded]
    x = np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.float32)
    y = np.array([lab for _, lab, _ in loaded], dtype=np.int64)
    out = Scan("dicom" if dicom else "imagefolder", root, x, y, classes, image_sizes=sizes,
               corrupt=corrupt, label_problems=label_problems, notes=notes,
               class_source=source, refused=len(corrupt), ids=ids, digests=digests)
    if patient is not None:
        out.patients = np.array([p for _, _, p in loaded], dtype=object)
    return out


def _patient_of(source: PatientSource, f: Path, class_dir: Path, rel: str, pid: str | None,
                manifest: dict[str, str] | None) -> str:
    if source.kind == "dicom":
        found = pid
    elif source.kind == "folder":
        parts = f.relative_to(class_dir).parts
        found = parts[0] if len(parts) > 1 else None
        if found is None:
            raise RecordError("not inside a patient folder (patient=folder: "
                              "<dir>/<class>/<patient>/<image>)")
    elif source.kind == "name":
        found = patient_from_name(source.pattern, f.name)
        if found is None:
            raise RecordError("the file name does not match the patient pattern")
    else:
        found = (manifest or {}).get(rel)
        if found is None:
            raise RecordError("not listed in the patient manifest")
    if not found:
        raise RecordError("no patient id (PatientID is empty or absent)" if source.kind == "dicom"
                          else "empty patient id")
    return found


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


def scan_csv(path: str | Path, *, label: str | None = None, missing: str | None = None,
             site: str | None = None, classes: tuple[str, ...] | None = None,
             schema: Schema | None = None, patient: str | None = None) -> Scan:
    """Read a CSV's feature columns *by name* and its label column.

    With a ``schema`` (:mod:`common.data.schema`) the columns map onto its features
    by name: a column it does not know (beyond the label, ``id``, and the site and
    patient columns the spec names), one differing only in case, or a missing
    required one is a :class:`~common.data.schema.SchemaError`; categorical columns
    are one-hot over the declared levels. Without one, every other column is a
    numeric feature. ``x`` is the unscaled design matrix (``Schema.transform``
    scales it) of the usable rows; every refused row is named in the problems
    (``file F, row R, column 'C'``, the first per column, with the count).

    ``missing`` (default: the schema's, else ``error``) is the policy for
    empty / NA / NaN cells: ``error`` refuses the row, ``drop`` drops it,
    ``zero`` leaves it for the transform to set to the feature's centre.
    Each is decided by the row alone.
    """
    path = Path(path)
    if missing is not None and missing not in MISSING_POLICIES:
        raise SiteDataError(f"missing-value policy {missing!r} unknown; "
                            f"allowed: {', '.join(MISSING_POLICIES)}")
    if not path.is_file():
        raise SiteDataError(f"CSV file not found: {path}")
    try:
        table = read_csv_table(path)
    except RecordError as exc:
        raise SiteDataError(str(exc)) from None
    header, name = table.header, path.name
    label = label or (schema.label if schema is not None else "label")
    for role, col in (("label", label), ("site", site), ("patient", patient)):
        if col and col not in header:
            raise SiteDataError(f"{where(name)}: no {role} column '{col}' (columns: "
                                f"{', '.join(header)})")
    extra = [c for c in (site, patient) if c]
    if schema is None:  # every other column a numeric feature, unscaled
        names = [h for h in header if h not in (label, ID_COLUMN, *extra)]
        schema = Schema(classes=tuple(classes or ()), input="tabular",
                        features=tuple(Feature(name=n) for n in names))
    schema = replace(schema, label=label, missing=missing or schema.missing)
    body, corrupt, rownums = [], [], []
    for row, cells in table.rows:
        if len(cells) != len(header):
            corrupt.append((f"{name}, row {row}", f"{len(cells)} fields, the header has "
                                                  f"{len(header)}"))
            continue
        body.append(cells)
        rownums.append(row)
    try:
        x, bad = schema.encode(header, body, extra=extra)
    except SchemaError as exc:
        raise SiteDataError(f"{where(name)}: {exc}") from None
    li = header.index(label)
    labels = [cells[li].strip() for cells in body]
    notes, label_problems = [], []
    refused = np.zeros(len(body), dtype=bool)
    column_problems = _cell_summary(name, bad, rownums)
    for i, _, _ in bad:
        refused[i] = True
    no_label = [i for i, lab in enumerate(labels) if lab.lower() in MISSING_TOKENS]
    if no_label:
        label_problems.append(f"{where(name, rownums[no_label[0]], label)}: no label"
                              + (f" ({len(no_label)} rows)" if len(no_label) > 1 else ""))
        refused[no_label] = True
    names = sorted({lab for lab in labels if lab.lower() not in MISSING_TOKENS})
    declared = classes or (schema.classes or None)
    found, index, source, unknown = _class_names(names, declared)
    label_problems += [f"{where(name, column=label)}: {p}" for p in unknown]
    for c in found:
        if c not in names:
            label_problems.append(f"class '{c}' is empty (no row has this label)")
    y = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
    refused |= y < 0
    has_missing = np.isnan(x).any(axis=1) & ~refused
    keep = ~refused
    if has_missing.any() and schema.missing == "drop":
        notes.append(f"missing values: dropped {int(has_missing.sum())} row(s) (policy 'drop')")
        keep &= ~has_missing
    elif has_missing.any() and schema.missing == "zero":
        notes.append(f"missing values in {int(has_missing.sum())} row(s) set to each feature's "
                     "centre (policy 'zero')")
    # The exact parsed values (float64): Schema.transform scales them to float32 at the
    # site and in predict alike; rounding first would make the two disagree.
    out = Scan("csv", path, x[keep], y[keep], tuple(found), corrupt=corrupt,
               label_problems=label_problems, notes=notes, class_source=source,
               column_problems=column_problems, columns=tuple(schema.columns), label=label,
               refused=int(refused.sum()) + len(corrupt),
               ids=[f"{name}, row {r}" for r, k in zip(rownums, keep, strict=True) if k],
               digests=record_digests(x[keep]))
    if site:
        si = header.index(site)
        out.sites = np.array([c[si].strip() for c, k in zip(body, keep, strict=True) if k],
                             dtype=object)
    if patient:
        pi = header.index(patient)
        pids = [c[pi].strip() for c, k in zip(body, keep, strict=True) if k]
        empty = [r for r, c, k in zip(rownums, body, keep, strict=True) if k and not c[pi].strip()]
        if empty:
            out.label_problems.append(f"{where(name, empty[0], patient)}: no patient id"
                                      + (f" ({len(empty)} rows)" if len(empty) > 1 else ""))
        out.patients = np.array(pids, dtype=object)
    return out


def _cell_summary(name: str, bad: list[tuple[int, str, str]], rownums: list[int]) -> list[str]:
    """One line per column with bad cells: the first place and why, and the count."""
    first: dict[str, tuple[int, str]] = {}
    count: Counter = Counter()
    for i, col, why in bad:
        first.setdefault(col, (i, why))
        count[col] += 1
    return [f"{where(name, rownums[i], col)}: {why}"
            + (f" ({count[col]} rows in this column; the first is shown)" if count[col] > 1
               else "") for col, (i, why) in first.items()]


def cell_messages(name: str, bad: list[tuple[int, str, str]], rownums: list[int]
                  ) -> dict[int, str]:
    """Each bad row's message (``file F, row R, column 'C': why; ...``), by row index."""
    out: dict[int, list[str]] = {}
    for i, col, why in bad:
        out.setdefault(i, []).append(f"{where(name, rownums[i], col)}: {why}")
    return {i: "; ".join(v) for i, v in out.items()}


# --------------------------------------------------------------------------
# MedMNIST .npz
# --------------------------------------------------------------------------


def scan_npz(path: str | Path) -> Scan:
    """A standard MedMNIST ``.npz``: all of its splits are this site's records."""
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"MedMNIST file not found: {path}")
    try:
        s = read_medmnist_npz(path)
    except ValueError as exc:
        return Scan("medmnist", path, np.zeros((0, 1, 1), np.float32), np.zeros(0, np.int64), (),
                    corrupt=[(path.name, str(exc))])
    x = np.concatenate([s.train_x, s.val_x, s.test_x])
    y = np.concatenate([s.train_y, s.val_y, s.test_y])
    shape = "x".join(str(d) for d in x.shape[1:3]) + (" RGB" if x.ndim == 4 else " L")
    out = Scan("medmnist", path, x, y, s.classes, image_sizes=Counter({shape: len(x)}),
               digests=record_digests(x))
    out.label_problems = [f"class '{c}' is empty (no record has label {i})"
                          for i, c in enumerate(s.classes) if not (y == i).any()]
    return out


def scan(spec: str, *, size: tuple[int, int] | None = None, channels: int | None = None,
         classes: tuple[str, ...] | None = None, schema: Schema | None = None) -> Scan:
    """Read a site's data from its spec (see the module doc). ``size``,
    ``channels`` and ``classes`` are the declared reading (see
    :func:`scan_imagefolder`); ``classes`` also applies to CSV labels; a ``schema``
    maps CSV columns by name, and an image schema's ``image-window`` maps pixel
    values (:mod:`common.data.decode`).

    Natural sites: ``csv:<file>?site=COL`` keeps each row's site; ``csv:<dir>``
    reads every ``<dir>/*.csv`` as one site named by its file;
    ``imagefolder:<dir>?site=folder`` reads ``<dir>/<site>/<class>/*``.
    """
    d = data_spec(spec)
    if d.kind in ("imagefolder", "dicom"):
        window = Window(*schema.image_window) if schema is not None and schema.image_window \
            else None
        reading = dict(size=size, channels=channels, classes=classes, window=window,
                       dicom=d.kind == "dicom", patient=d.patient, data_root=d.path)
        if d.site == "folder":
            return _concat_sites([(p.name, scan_imagefolder(p, **reading))
                                  for p in _site_dirs(d.path, "*/")])
        return scan_imagefolder(d.path, **reading)
    if d.kind == "csv":
        tabular = schema if schema is not None and schema.input == "tabular" else None
        reading = dict(label=d.label, missing=d.missing, classes=classes, schema=tabular,
                       patient=d.patient.value if d.patient is not None else None)
        if d.path.is_dir():
            return _concat_sites([(f.stem, scan_csv(f, **reading))
                                  for f in _site_dirs(d.path, "*.csv")])
        return scan_csv(d.path, site=d.site, **reading)
    return scan_npz(d.path)


def _site_dirs(path: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in path.glob(pattern.rstrip("/"))
                   if not p.name.startswith(".") and (p.is_dir() if pattern.endswith("/")
                                                      else p.is_file()))
    if len(found) < 1:
        raise SiteDataError(f"{path}: no site {'folders' if pattern.endswith('/') else 'files'} "
                            f"({pattern})")
    return found


def _concat_sites(parts: list[tuple[str, Scan]]) -> Scan:
    """One scan over several sites' scans (each record keeps its site's name).
    Every site is read with the same declared classes, so the indices agree;
    undeclared names must agree across sites."""
    first = parts[0][1]
    for name, s in parts[1:]:
        if s.classes != first.classes:
            raise SiteDataError(f"site '{name}' has classes {list(s.classes)}, site "
                                f"'{parts[0][0]}' has {list(first.classes)}: declare the "
                                "federation's classes (schema) so every site maps by name")
        if s.columns != first.columns:
            raise SiteDataError(f"site '{name}' has columns {list(s.columns)}, site "
                                f"'{parts[0][0]}' has {list(first.columns)}")
    xs = [s.x for _, s in parts if len(s.y)]
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise SiteDataError(f"the sites' images have different shapes {sorted(shapes)}: declare "
                            "image-size and image-channels")
    out = Scan(first.kind, first.path.parent,
               np.concatenate(xs) if xs else first.x, np.concatenate([s.y for _, s in parts]),
               first.classes, class_source=first.class_source, columns=first.columns,
               label=first.label, refused=sum(s.refused for _, s in parts),
               ids=[f"{name}/{i}" for name, s in parts for i in s.ids],
               digests=[d for _, s in parts for d in s.digests])
    for name, s in parts:
        out.image_sizes.update(s.image_sizes)
        out.corrupt += [(f"{name}/{f}", why) for f, why in s.corrupt]
        out.label_problems += [f"site '{name}': {p}" for p in s.label_problems
                               if "is empty" not in p]
        out.column_problems += [f"site '{name}': {p}" for p in s.column_problems]
        out.notes += [f"site '{name}': {n}" for n in s.notes]
    out.sites = np.concatenate([np.full(len(s.y), name, dtype=object) for name, s in parts])
    if all(s.patients is not None for _, s in parts):
        # A patient id is a site's own: the same id at two sites is two patients.
        out.patients = np.concatenate([np.array([f"{name}/{p}" for p in s.patients],
                                                dtype=object) for name, s in parts])
    return out


def read_site_records(spec: str, **reading) -> Scan:
    """The site's records, or :class:`SiteDataError` listing every problem.

    Used at join time: a site with corrupt files, unknown labels or missing
    features (under policy ``error``) does not train, and nothing is recorded.
    Empty classes are allowed here (a site may lack a class); ``site check``
    reports them. ``reading`` goes to :func:`scan`.
    """
    s = scan(spec, **reading)
    fatal = [p for p in s.problems() if "is empty" not in p]
    if fatal:
        raise SiteDataError(f"site data {spec}: " + "; ".join(fatal) +
                            " (run `fedtransfer site check --data ...` for the full report)")
    if len(s.y) < 2:
        raise SiteDataError(f"site data {spec}: {len(s.y)} usable records, need at least 2")
    return s


def split_ids(ids: np.ndarray, size: float, *, seed: int, labels: np.ndarray,
              groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held)``: ``size`` of ``ids`` held out, seeded. Stratified by label
    where every class has two records; with ``groups`` (patient ids), whole
    patients are held out (no patient on both sides), in a seeded order, until
    the held-out records reach ``size`` of them."""
    from sklearn.model_selection import train_test_split

    if groups is not None:
        g = groups[ids]
        names = sorted(set(g.tolist()))
        order = np.random.default_rng([seed, 7177]).permutation(len(names))
        target = max(1, int(round(len(ids) * size)))
        held_names, n = set(), 0
        counts = Counter(g.tolist())
        for k in order:
            if n >= target:
                break
            held_names.add(names[k])
            n += counts[names[k]]
        mask = np.array([v in held_names for v in g.tolist()], dtype=bool)
        return ids[~mask], ids[mask]
    counts = np.bincount(labels[ids])
    strat = labels[ids] if counts[counts > 0].min() >= 2 else None
    try:
        return tuple(train_test_split(ids, test_size=size, stratify=strat, random_state=seed))
    except ValueError:  # too few records of some class for a stratified split
        return tuple(train_test_split(ids, test_size=size, random_state=seed))


def splits_from_records(name: str, s: Scan, seed: int):
    """A seeded 70/10/20 train/val/test split (stratified where every class
    has enough records; by patient where records carry patient ids), so
    ``imagefolder:`` and ``csv:`` work as registry datasets in simulations too.
    Records that carry their site are split site by site (each site its own
    train/val/test, as FLamby does), and the splits keep each record's site and
    patient."""
    groups = [np.arange(len(s.y))]
    site_names: tuple[str, ...] = ()
    if s.sites is not None:
        site_names = tuple(sorted(set(s.sites.tolist())))
        groups = [np.flatnonzero(s.sites == n) for n in site_names]
        small = [n for n, g in zip(site_names, groups, strict=True) if len(g) < 10]
        if small:
            raise SiteDataError(f"{name}: site(s) {small} have fewer than 10 records; too few "
                                "for their own train/val/test split")
    parts = {"train": [], "val": [], "test": []}
    for g in groups:
        rest, test = split_ids(g, 0.2, seed=seed, labels=s.y, groups=s.patients)
        train, val = split_ids(rest, 0.125, seed=seed, labels=s.y, groups=s.patients)
        parts["train"].append(train), parts["val"].append(val), parts["test"].append(test)
    idx = {k: np.concatenate(v) for k, v in parts.items()}
    site_of = None
    if s.sites is not None:
        code = {n: i for i, n in enumerate(site_names)}
        site_of = np.array([code[v] for v in s.sites], dtype=np.int64)

    def pick(a, k):
        return None if a is None else a[idx[k]]

    return Splits(name=name, classes=s.classes, train_x=s.x[idx["train"]], train_y=s.y[idx["train"]],
                  val_x=s.x[idx["val"]], val_y=s.y[idx["val"]], test_x=s.x[idx["test"]],
                  test_y=s.y[idx["test"]], columns=s.columns, site_names=site_names,
                  train_site=pick(site_of, "train"), val_site=pick(site_of, "val"),
                  test_site=pick(site_of, "test"), label=s.label,
                  train_groups=pick(s.patients, "train"))


def holdout_split(n: int, holdout: float, *, seed: int, site_id: int,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, hold)`` indices of a site's ``n`` records: a seeded share
    ``holdout`` held out for the site's own evaluation; with ``groups`` (patient
    ids) whole patients are held out, so no patient is on both sides."""
    rng = np.random.default_rng([seed, site_id, 104729])
    idx = rng.permutation(n)
    n_hold = max(1, int(round(n * holdout)))
    if groups is None:
        return idx[n_hold:], idx[:n_hold]
    # Patients in the order their first record comes in the seeded permutation.
    order, seen = [], set()
    for i in idx:
        p = groups[i]
        if p not in seen:
            seen.add(p)
            order.append(p)
    held, count = set(), Counter(groups.tolist())
    total = 0
    for p in order:
        if total >= n_hold:
            break
        held.add(p)
        total += count[p]
    mask = np.array([groups[i] in held for i in idx], dtype=bool)
    return idx[~mask], idx[mask]


def own_site_data(spec: str, *, site_id: int, holdout: float, seed: int,
                  num_classes: int | None = None, classes: tuple[str, ...] | None = None,
                  image_size: int = 64, channels: int = 1, schema: Schema | None = None
                  ) -> SiteData:
    """A deployed site's private data: *all* records at ``spec``, split into
    training records and the site's own holdout (seeded by ``seed, site_id``;
    by patient when the spec declares where patient ids come from, and then
    ``train_groups`` / ``holdout_groups`` hold each record's patient).

    Every record is read on its own: images are decoded by
    :mod:`common.data.decode` (the schema's ``image-window`` if declared),
    converted to ``channels`` and resized to ``image_size`` each; labels are
    mapped by the declared ``classes`` (or are integer indices). Nothing about one
    record depends on the others, which per-sample clipping could not bound. With
    a tabular ``schema``, CSV columns map onto its features by name (the design
    matrix, unscaled).
    """
    s = read_site_records(spec, size=(image_size, image_size), channels=channels,
                          classes=classes, schema=schema)
    if s.class_source == "sorted":
        raise SiteDataError(
            f"site data {spec}: labels are names ({', '.join(s.classes)}), not integer indices; "
            "set class-names in the site's node config to the federation's class names, in its "
            "order (sorting the names found would let one record re-index every other)")
    k = num_classes or len(s.classes)
    if len(s.classes) > k:
        raise SiteDataError(f"site data {spec} has {len(s.classes)} classes "
                            f"({', '.join(s.classes)}); the federation's head has {k}")
    train, hold = holdout_split(len(s.y), holdout, seed=seed, site_id=site_id, groups=s.patients)
    if len(train) < 2 or len(hold) < 1:
        raise SiteDataError(f"site data {spec}: {len(s.y)} records are too few to train and "
                            "hold out" + (" whole patients" if s.patients is not None else ""))
    groups = s.patients
    return SiteData(site_id=site_id, train_x=s.x[train], train_y=s.y[train],
                    holdout_x=s.x[hold], holdout_y=s.y[hold], num_classes=k,
                    train_groups=None if groups is None else groups[train],
                    holdout_groups=None if groups is None else groups[hold],
                    digests=tuple(s.digests), record_ids=tuple(s.ids))

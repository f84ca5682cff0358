"""A site's own data on its own disk: image folders, CSV files, MedMNIST ``.npz``.

Readers return every record with its problems *listed*, never silently
skipped: :func:`scan_imagefolder` and :func:`scan_csv` give a :class:`Scan`
(arrays plus what was wrong, file by file), and :func:`read_site_records`
turns a scan with any problem into a :class:`SiteDataError` naming the files,
so a site with bad data fails at join time before anything touches its ledger.

Label convention: with declared class names (a deployed site's ``class-names``)
labels are mapped by name, and a name the declaration lacks is a problem
(one differing only in case is named as such), never a silent reorder. Without
a declaration, labels that are all integers are label indices (so a site that
lacks class ``3`` still maps ``7`` to 7); other names are sorted, which depends
on the names present, so a deployed site refuses that (:func:`own_site_data`).

A deployed site reads each record on its own: every image is converted to the
declared channel count and resized to the declared size, whatever the other
images are.

Spec strings (the dataset registry's syntax, also the node config's
``data-path``):

* ``imagefolder:<dir>``: ``<dir>/<class>/*.png|jpg|jpeg``;
* ``csv:<file>[?label=COL&missing=POLICY&site=COL]``: numeric feature columns,
  a label column (default ``label``), an optional site column (dropped), and a
  missing-value policy: ``error`` (default), ``drop`` (drop the row) or
  ``zero``. There is no ``mean``: a fill value computed from the other records
  would let one record change how every other record is treated;
* ``medmnist:<file.npz>`` (or a bare ``.npz`` path);
* a bare directory (an image folder) or a ``.csv`` path.
"""

from __future__ import annotations

import csv
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.data.schema import ID_COLUMN, Feature, Schema, SchemaError
from common.data.splits import SiteData, Splits, read_medmnist_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MISSING_POLICIES = ("error", "drop", "zero")
_MISSING_TOKENS = ("", "na", "nan", "null", "none", "?")


class SiteDataError(ValueError):
    """The site's data cannot be used as it is; the message names the files."""


@dataclass
class Scan:
    """Everything read from a site's data, and everything wrong with it."""

    kind: str
    path: Path
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    image_sizes: Counter = field(default_factory=Counter)  # "WxH MODE" -> count
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    label_problems: list[str] = field(default_factory=list)
    column_problems: list[str] = field(default_factory=list)  # one line per bad column
    columns: tuple[str, ...] = ()  # a CSV's design columns (schema order)
    sites: np.ndarray | None = None  # each record's site (a CSV's site column, a site folder)
    notes: list[str] = field(default_factory=list)
    # How labels became indices: "declared" (class names given), "indices"
    # (integer labels), or "sorted" (names sorted: depends on the names present).
    class_source: str = "indices"

    @property
    def counts(self) -> dict[str, int]:
        got = Counter(int(v) for v in self.y)
        return {name: got.get(i, 0) for i, name in enumerate(self.classes)}

    def problems(self) -> list[str]:
        out = [f"unreadable file {f}: {why}" for f, why in self.corrupt]
        out += self.label_problems
        out += self.column_problems
        return out


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``(kind, path, options)`` for a site data spec (see the module doc)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("imagefolder", "csv", "medmnist"):
        target = rest
    else:
        kind, target = "", spec
    target, _, query = target.partition("?")
    options = dict(urllib.parse.parse_qsl(query)) if query else {}
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
                                "directory, a .csv or a .npz (or imagefolder:/csv:/medmnist:)")
    unknown = set(options) - {"label", "missing", "site"}
    if unknown:
        raise SiteDataError(f"unknown option(s) {sorted(unknown)} in {spec!r}; "
                            "allowed: label, missing, site")
    return kind, path, options


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
# Image folders
# --------------------------------------------------------------------------


def scan_imagefolder(root: str | Path, *, size: tuple[int, int] | None = None,
                     channels: int | None = None,
                     classes: tuple[str, ...] | None = None) -> Scan:
    """Read ``root/<class>/*.png|jpg|jpeg`` with Pillow.

    With ``channels`` (1 or 3) and ``size`` declared, each image is converted
    and resized (bilinear) on its own, as a deployed site does. Left to
    ``None`` (a simulation's pooled dataset, a site-check report), images become
    grayscale when every one is, else RGB, at the most common size.
    Values are float32 in [0, 1].
    """
    if channels not in (None, 1, 3):
        raise SiteDataError(f"image channels must be 1 or 3, got {channels!r}")
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise SiteDataError(f"image folder not found: {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise SiteDataError(f"{root}: no class sub-folders (expected {root}/<class>/*.png)")
    classes, index, source, label_problems = _class_names([d.name for d in dirs], classes)
    corrupt: list[tuple[str, str]] = []
    loaded: list[tuple[Image.Image, int]] = []
    sizes: Counter = Counter()
    notes: list[str] = []
    for d in dirs:
        if d.name not in index:  # named in label_problems
            continue
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                notes.append(f"ignored {f.relative_to(root)} (not .png/.jpg/.jpeg)")
                continue
            try:
                with Image.open(f) as im:
                    im.load()  # decodes fully: a truncated file fails here
                    img = im.copy()
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                corrupt.append((str(f.relative_to(root)), f"{type(exc).__name__}: {exc}"))
                continue
            sizes[f"{img.width}x{img.height} {img.mode}"] += 1
            loaded.append((img, index[d.name]))
    got = Counter(lab for _, lab in loaded)
    label_problems += [f"class '{c}' is empty (no readable image in {root / c})"
                       for i, c in enumerate(classes) if not got.get(i)]
    gray = (channels == 1) if channels is not None else (
        bool(loaded) and all(im.mode in ("L", "1", "I", "I;16", "F") for im, _ in loaded))
    if size is None and loaded:
        size = Counter(im.size for im, _ in loaded).most_common(1)[0][0]
    if loaded and len({im.size for im, _ in loaded}) > 1:
        notes.append(f"images of {len({im.size for im, _ in loaded})} sizes, all resized to "
                     f"{size[0]}x{size[1]}")
    arrays = []
    for im, _ in loaded:
        im = im.convert("L" if gray else "RGB")
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.float32)
    y = np.array([lab for _, lab in loaded], dtype=np.int64)
    return Scan("imagefolder", root, x, y, classes, image_sizes=sizes, corrupt=corrupt,
                label_problems=label_problems, notes=notes, class_source=source)


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


def scan_csv(path: str | Path, *, label: str | None = None, missing: str | None = None,
             site: str | None = None, classes: tuple[str, ...] | None = None,
             schema: Schema | None = None) -> Scan:
    """Read a CSV's feature columns *by name* and its label column.

    With a ``schema`` (:mod:`common.data.schema`) the columns map onto its features
    by name: a column it does not know, one differing only in case, or a
    missing required one is a :class:`~common.data.schema.SchemaError`; categorical
    columns are one-hot over the declared levels. Without one, every column
    but the label, site and ``id`` columns is a numeric feature. ``x`` is the
    unscaled design matrix (``Schema.transform`` scales it).

    ``missing`` (default: the schema's, else ``error``) is the policy for
    empty / NA / NaN cells: ``error`` reports them, ``drop`` drops those rows,
    ``zero`` leaves them for the transform to set to the feature's centre.
    Each is decided by the row alone. ``site`` names the column holding each
    record's site (kept in ``Scan.sites``, never a feature).
    """
    path = Path(path)
    if missing == "mean":
        raise SiteDataError("missing-value policy 'mean' is not offered: a fill value computed "
                            "from the site's records lets one record change how every other "
                            f"record is treated; allowed: {', '.join(MISSING_POLICIES)}")
    if missing is not None and missing not in MISSING_POLICIES:
        raise SiteDataError(f"missing-value policy {missing!r} unknown; "
                            f"allowed: {', '.join(MISSING_POLICIES)}")
    if not path.is_file():
        raise SiteDataError(f"CSV file not found: {path}")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows:
        raise SiteDataError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    label = label or (schema.label if schema is not None else "label")
    if label not in header:
        raise SiteDataError(f"{path}: no label column '{label}' (columns: {', '.join(header)})")
    if site and site not in header:
        raise SiteDataError(f"{path}: no site column '{site}' (columns: {', '.join(header)})")
    if schema is None:  # every other column a numeric feature, unscaled
        names = [h for h in header if h not in (label, site, ID_COLUMN)]
        schema = Schema(classes=tuple(classes or ()), input="tabular",
                        features=tuple(Feature(name=n) for n in names))
    schema = replace(schema, label=label, missing=missing or schema.missing)
    body, corrupt = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            corrupt.append((f"{path.name}:{lineno}", f"{len(row)} fields, header has {len(header)}"))
            continue
        body.append(row)
    try:
        x, column_problems = schema.encode([h for h in header if h != site], [
            [c for h, c in zip(header, row, strict=True) if h != site] for row in body],
            where=f"{path.name}: ")
    except SchemaError as exc:
        raise SiteDataError(str(exc)) from exc
    li = header.index(label)
    labels = [row[li].strip() for row in body]
    sites = [row[header.index(site)].strip() for row in body] if site else None
    notes, label_problems = [], []
    rows_bad = np.isnan(x).any(axis=1)
    if rows_bad.any() and schema.missing == "drop" and not column_problems:
        keep = ~rows_bad
        notes.append(f"missing values: dropped {int(rows_bad.sum())} rows (policy 'drop')")
        x, labels = x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k]
        sites = [s for s, k in zip(sites, keep, strict=True) if k] if sites is not None else None
    elif rows_bad.any() and schema.missing == "zero" and not column_problems:
        notes.append(f"missing values in {int(rows_bad.sum())} rows set to each feature's centre "
                     "(policy 'zero')")
    missing_labels = [i for i, lab in enumerate(labels) if lab.lower() in _MISSING_TOKENS]
    if missing_labels:
        label_problems.append(f"{len(missing_labels)} rows have no label in column '{label}'")
    names = sorted({lab for lab in labels if lab.lower() not in _MISSING_TOKENS})
    declared = classes or (schema.classes or None)
    found, index, source, unknown = _class_names(names, declared)
    label_problems += unknown
    for c in found:
        if c not in names:
            label_problems.append(f"class '{c}' is empty (no row has this label)")
    y = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
    keep = y >= 0
    out = Scan("csv", path, x[keep].astype(np.float32), y[keep], tuple(found), corrupt=corrupt,
               label_problems=label_problems, notes=notes, class_source=source,
               column_problems=column_problems, columns=tuple(schema.columns))
    if sites is not None:
        out.sites = np.array([s for s, k in zip(sites, keep, strict=True) if k], dtype=object)
    return out


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
    scan = Scan("medmnist", path, x, y, s.classes, image_sizes=Counter({shape: len(x)}))
    scan.label_problems = [f"class '{c}' is empty (no record has label {i})"
                           for i, c in enumerate(s.classes) if not (y == i).any()]
    return scan


def scan(spec: str, *, size: tuple[int, int] | None = None, channels: int | None = None,
         classes: tuple[str, ...] | None = None, schema: Schema | None = None) -> Scan:
    """Read a site's data from its spec (see the module doc). ``size``,
    ``channels`` and ``classes`` are the declared reading (see
    :func:`scan_imagefolder`); ``classes`` also applies to CSV labels, and a
    ``schema`` maps CSV columns by name (:func:`scan_csv`).

    Natural sites: ``csv:<file>?site=COL`` keeps each row's site; ``csv:<dir>``
    reads every ``<dir>/*.csv`` as one site named by its file;
    ``imagefolder:<dir>?site=folder`` reads ``<dir>/<site>/<class>/*``.
    """
    kind, path, options = parse_spec(spec)
    if kind == "imagefolder":
        if options.get("site") == "folder":
            return _concat_sites([(d.name, scan_imagefolder(d, size=size, channels=channels,
                                                            classes=classes))
                                  for d in _site_dirs(path, "*/")])
        if options.get("site"):
            raise SiteDataError(f"{spec}: for an image folder, site=folder is the only site "
                                "option (<dir>/<site>/<class>/*)")
        return scan_imagefolder(path, size=size, channels=channels, classes=classes)
    if kind == "csv":
        reading = dict(label=options.get("label"), missing=options.get("missing"),
                       classes=classes, schema=schema)
        if path.is_dir():
            return _concat_sites([(f.stem, scan_csv(f, **reading)) for f in _site_dirs(path, "*.csv")])
        return scan_csv(path, site=options.get("site"), **reading)
    return scan_npz(path)


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
    out = Scan(first.kind, first.path.parent,
               np.concatenate(xs) if xs else first.x, np.concatenate([s.y for _, s in parts]),
               first.classes, class_source=first.class_source, columns=first.columns)
    for name, s in parts:
        out.image_sizes.update(s.image_sizes)
        out.corrupt += [(f"{name}/{f}", why) for f, why in s.corrupt]
        out.label_problems += [f"site '{name}': {p}" for p in s.label_problems
                               if "is empty" not in p]
        out.column_problems += [f"site '{name}': {p}" for p in s.column_problems]
        out.notes += [f"site '{name}': {n}" for n in s.notes]
    out.sites = np.concatenate([np.full(len(s.y), name, dtype=object) for name, s in parts])
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


def splits_from_records(name: str, s: Scan, seed: int):
    """A seeded 70/10/20 train/val/test split (stratified where every class
    has enough records), so ``imagefolder:`` and ``csv:`` work as registry
    datasets in simulations too. Records that carry their site are split
    site by site (each site its own train/val/test, as FLamby does), and the
    splits keep each record's site."""
    from sklearn.model_selection import train_test_split


    def split(ids, size):
        counts = np.bincount(s.y[ids])
        strat = s.y[ids] if counts[counts > 0].min() >= 2 else None
        try:
            return train_test_split(ids, test_size=size, stratify=strat, random_state=seed)
        except ValueError:  # too few records of some class for a stratified split
            return train_test_split(ids, test_size=size, random_state=seed)

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
        rest, test = split(g, 0.2)
        train, val = split(rest, 0.125)
        parts["train"].append(train), parts["val"].append(val), parts["test"].append(test)
    idx = {k: np.concatenate(v) for k, v in parts.items()}
    site_of = None
    if s.sites is not None:
        code = {n: i for i, n in enumerate(site_names)}
        site_of = np.array([code[v] for v in s.sites], dtype=np.int64)
    return Splits(name=name, classes=s.classes, train_x=s.x[idx["train"]], train_y=s.y[idx["train"]],
                  val_x=s.x[idx["val"]], val_y=s.y[idx["val"]], test_x=s.x[idx["test"]],
                  test_y=s.y[idx["test"]], columns=s.columns, site_names=site_names,
                  train_site=None if site_of is None else site_of[idx["train"]],
                  val_site=None if site_of is None else site_of[idx["val"]],
                  test_site=None if site_of is None else site_of[idx["test"]])


def own_site_data(spec: str, *, site_id: int, holdout: float, seed: int,
                  num_classes: int | None = None, classes: tuple[str, ...] | None = None,
                  image_size: int = 64, channels: int = 1, schema: Schema | None = None):
    """A deployed site's private data: *all* records at ``spec``, split into
    training records and the site's own holdout (seeded by ``seed, site_id``).

    Every record is read on its own: images are converted to ``channels`` and
    resized to ``image_size`` each, labels are mapped by the declared
    ``classes`` (or are integer indices). Nothing about one record depends on
    the others, which per-sample clipping could not bound. With a ``schema``,
    CSV columns map onto its features by name (the design matrix, unscaled).
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
    rng = np.random.default_rng([seed, site_id, 104729])
    idx = rng.permutation(len(s.y))
    n_hold = max(1, int(round(len(idx) * holdout)))
    if len(idx) - n_hold < 2:
        raise SiteDataError(f"site data {spec}: {len(idx)} records are too few to train and "
                            "hold out")
    hold, train = idx[:n_hold], idx[n_hold:]
    return SiteData(site_id=site_id, train_x=s.x[train], train_y=s.y[train],
                    holdout_x=s.x[hold], holdout_y=s.y[hold], num_classes=k)

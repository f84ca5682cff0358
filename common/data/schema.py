"""The federation's schema: what a record is, declared once.

A schema names the classes in order and the input: images (size and channels,
from the run config) or tabular records (feature names, each numeric or
categorical with its levels, and how each numeric feature is scaled). Sites
map their data onto it *by name*: a column or class the schema does not know,
or a required one that is missing, is an error naming it, never a reorder.

The schema is declared in the scenario file's ``[schema]`` table, or in a
TOML/JSON file named by the ``schema`` config key::

    [schema]
    classes = ["malignant", "benign"]
    label = "target"              # the CSV column holding the class name
    missing = "error"             # error | drop | zero (per record; zero: the feature's centre)
    scaling = "public"            # the default for numeric features
    [[schema.features]]
    name = "mean radius"
    lower = 5.0                   # public bounds: values are clipped to them
    upper = 30.0
    [[schema.features]]           # (a bare name in 'features' is a numeric feature)
    name = "sex"
    kind = "categorical"
    levels = ["female", "male"]   # one-hot, in this order

How a numeric feature is scaled (``x -> (clip(x, lower, upper) - center) / scale``):

* ``public`` (the default): estimated on the server's public validation split
  (the split it already evaluates and distils on); costs no ε.
* ``declared``: ``center`` and ``scale`` are given (e.g. a registry's
  reference ranges); costs no ε.
* ``dp``: center and scale are estimated across the sites with the Gaussian
  mechanism (OpenDP) on each site's clipped sums before round 1, and charged
  to each site's ledger (:mod:`common.privacy.scaling`). Needs public ``lower`` and
  ``upper``. Its noise grows with the square root of the number of ``dp``
  features and shrinks with the records: worth it for large sites without a
  public split, costly for small ones (measured in docs/results.md).
* ``none``: only clipped (if bounds are given).

A schema whose constants are all known is *fitted*; the fitted schema travels
in every round request, is written into the model card (covered by its
hashes), and ``predict`` applies the same transform to raw CSVs by column name.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

INPUTS = ("image", "tabular")
KINDS = ("numeric", "categorical")
SCALINGS = ("dp", "declared", "public", "none")
MISSING = ("error", "drop", "zero")
MISSING_TOKENS = ("", "na", "nan", "null", "none", "?")
# Columns a CSV may carry beside the features: the label, the record's site and an id.
ID_COLUMN = "id"
# A scale never below this share of the feature's bounded range (or 1e-6 absolute):
# a noisy variance estimate near 0 must not blow the feature up.
MIN_SCALE_SHARE = 0.01
# DP scaling: the standard deviation of u = (x - lower) / (upper - lower) is at most 1/2;
# a noisy estimate below this floor is noise, and scaling by it would multiply the
# feature by up to 100: the floor keeps a bad estimate within 10x of the range.
MIN_DP_SCALE_SHARE = 0.1
MAX_SCHEMA_BYTES = 256 * 1024


class SchemaError(ValueError):
    """A schema that cannot be used, or data that does not fit it; names the field."""


@dataclass(frozen=True)
class Feature:
    """One tabular feature: a numeric column or a categorical one with its levels."""

    name: str
    kind: str = "numeric"
    levels: tuple[str, ...] = ()
    scaling: str = "none"
    lower: float | None = None
    upper: float | None = None
    center: float | None = None
    scale: float | None = None

    @property
    def columns(self) -> list[str]:
        """The design-matrix columns this feature becomes."""
        return [self.name] if self.kind == "numeric" else [f"{self.name}={v}" for v in self.levels]

    @property
    def fitted(self) -> bool:
        return self.kind == "categorical" or self.scaling == "none" or (
            self.center is not None and self.scale is not None)


@dataclass(frozen=True)
class Schema:
    """The federation's record format (see the module doc)."""

    classes: tuple[str, ...]
    input: str = "image"
    label: str = "label"
    missing: str = "error"
    features: tuple[Feature, ...] = ()
    image_size: int = 0
    image_channels: int = 0
    # A declared intensity window ``(lower, upper)`` in raw pixel units (a PNG's values, a
    # DICOM's modality units), mapped to [0, 1] (common/data/decode.py); () : by bit depth.
    image_window: tuple[float, ...] = ()

    # -- construction ----------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Schema:
        """Parse and validate; :class:`SchemaError` names the bad field."""
        if not isinstance(raw, Mapping):
            raise SchemaError(f"a schema is a table, got {type(raw).__name__}")
        allowed = {"classes", "input", "label", "missing", "scaling", "features", "image-size",
                   "image-channels", "image-window"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise SchemaError(f"unknown schema key(s) {unknown}; allowed: {sorted(allowed)}")
        classes = raw.get("classes")
        if (not isinstance(classes, list | tuple) or len(classes) < 2
                or not all(isinstance(c, str) and c.strip() for c in classes)):
            raise SchemaError(f"schema 'classes' must list at least two class names in order, "
                              f"got {classes!r}")
        _unique("class", classes)
        features_raw = raw.get("features", [])
        kind = raw.get("input", "tabular" if features_raw else "image")
        if kind not in INPUTS:
            raise SchemaError(f"schema 'input' must be one of {INPUTS}, got {kind!r}")
        missing = raw.get("missing", "error")
        if missing not in MISSING:
            raise SchemaError(f"schema 'missing' must be one of {MISSING}, got {missing!r} "
                              "('mean' is not offered: it would let one record change how every "
                              "other is read)")
        default_scaling = raw.get("scaling", "public")
        if default_scaling not in SCALINGS:
            raise SchemaError(f"schema 'scaling' must be one of {SCALINGS}, got {default_scaling!r}")
        label = raw.get("label", "label")
        if not isinstance(label, str) or not label:
            raise SchemaError(f"schema 'label' must be a column name, got {label!r}")
        if kind == "tabular" and not features_raw:
            raise SchemaError("a tabular schema lists its features ([[schema.features]])")
        if kind == "image" and features_raw:
            raise SchemaError("an image schema has no 'features'")
        if not isinstance(features_raw, list | tuple):
            raise SchemaError(f"schema 'features' must be a list of tables, got {features_raw!r}")
        features = tuple(_feature(f, default_scaling) for f in features_raw)
        _unique("feature", [f.name for f in features])
        if label in {f.name for f in features}:
            raise SchemaError(f"the label column '{label}' is also listed as a feature")
        size, channels = raw.get("image-size", 0), raw.get("image-channels", 0)
        window = raw.get("image-window", ())
        if window != () and window != []:
            if kind != "image":
                raise SchemaError("'image-window' applies to an image schema only")
            if (not isinstance(window, list | tuple) or len(window) != 2
                    or not all(isinstance(v, int | float) and not isinstance(v, bool)
                               and math.isfinite(v) for v in window)
                    or not window[0] < window[1]):
                raise SchemaError(f"schema 'image-window' must be [lower, upper] with finite "
                                  f"lower < upper (raw pixel or DICOM modality units), got "
                                  f"{window!r}")
            window = (float(window[0]), float(window[1]))
        return cls(classes=tuple(classes), input=kind, label=label, missing=missing,
                   features=features, image_size=int(size), image_channels=int(channels),
                   image_window=tuple(window))

    @classmethod
    def from_json(cls, text: str) -> Schema:
        if len(text) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"schema of {len(text)} bytes; at most {MAX_SCHEMA_BYTES} allowed")
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SchemaError(f"schema is not valid JSON: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"classes": list(self.classes), "input": self.input,
                               "label": self.label, "missing": self.missing}
        if self.input == "image":
            out["image-size"], out["image-channels"] = self.image_size, self.image_channels
            if self.image_window:
                out["image-window"] = list(self.image_window)
        else:
            out["features"] = [{k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in asdict(f).items()
                                if v is not None and not (k == "levels" and not v)
                                and not (k == "scaling" and f.kind == "categorical")}
                               for f in self.features]
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what travels and what is hashed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # -- tabular design ----------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return [c for f in self.features for c in f.columns]

    @property
    def fitted(self) -> bool:
        return all(f.fitted for f in self.features)

    def needs(self, scaling: str) -> list[Feature]:
        """Numeric features with this scaling whose constants are not yet known."""
        return [f for f in self.features if f.kind == "numeric" and f.scaling == scaling
                and not f.fitted]

    def with_constants(self, constants: Mapping[str, tuple[float, float]]) -> Schema:
        """The schema with ``name -> (center, scale)`` filled in."""
        feats = []
        for f in self.features:
            if f.name in constants:
                c, s = constants[f.name]
                if not (math.isfinite(c) and math.isfinite(s) and s > 0):
                    raise SchemaError(f"feature '{f.name}': center {c!r} and scale {s!r} must be "
                                      "finite, scale > 0")
                f = replace(f, center=float(c), scale=float(s))
            feats.append(f)
        return replace(self, features=tuple(feats))

    def encode(self, header: Sequence[str], rows: Sequence[Sequence[str]], *,
               extra: Sequence[str] = ()) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        """The unscaled design matrix of ``rows`` (raw CSV text, columns by ``header``
        name) and every bad cell as ``(row index, column, why)`` (empty: all good).

        The header is checked first (:meth:`check_header`; ``extra`` names the
        columns the data spec declares beside the features). Numeric cells are
        numbers (:func:`parse_number`); categorical cells one-hot over the declared
        levels. A missing cell follows ``missing``: ``error`` (a bad cell), ``drop``
        (the row's design is NaN, see :func:`drop_missing`), ``zero`` (the
        feature's centre after scaling: NaN here, filled by :meth:`transform`).
        Each row is read on its own.
        """
        self.check_header(header, extra=extra)
        pos = {h: i for i, h in enumerate(header)}
        out = np.zeros((len(rows), len(self.columns)), dtype=np.float64)
        bad: list[tuple[int, str, str]] = []
        missing_why = (f"missing value (schema missing = '{self.missing}'; allowed: "
                       f"{', '.join(m for m in MISSING if m != 'error')})")
        col = 0
        for f in self.features:
            j = pos[f.name]
            width = len(f.columns)
            for i, row in enumerate(rows):
                text = row[j].strip()
                if text.lower() in MISSING_TOKENS:
                    out[i, col:col + width] = math.nan
                    if self.missing == "error":
                        bad.append((i, f.name, missing_why))
                    continue
                if f.kind == "numeric":
                    try:
                        v = parse_number(text)
                    except ValueError:
                        v = math.nan
                        bad.append((i, f.name, f"{text[:40]!r} is not a number"))
                    else:
                        if not math.isfinite(v):
                            bad.append((i, f.name, f"{text!r} is not a finite number"))
                            v = math.nan
                    out[i, col] = v
                elif text in f.levels:
                    out[i, col + f.levels.index(text)] = 1.0
                else:
                    out[i, col:col + width] = math.nan
                    bad.append((i, f.name, f"{text[:40]!r} is not one of its declared levels "
                                           f"{list(f.levels)}"))
            col += width
        bad.sort(key=lambda b: b[0])
        return out, bad

    def check_header(self, header: Sequence[str], *, extra: Sequence[str] = (),
                     file: str = "") -> None:
        """Every feature column present by name; nothing else but the label, an
        ``id`` column and ``extra`` (what the data spec declares: a site or patient
        column). A column differing only in case from a feature is named as such.

        Raises:
            SchemaError: naming each unknown, case-changed or missing column.
        """
        names = {f.name for f in self.features}
        known = {self.label, ID_COLUMN, *extra}
        unknown = [h for h in header if h not in names and h not in known]
        lacking = [n for n in names if n not in header]
        folded = {n.casefold(): n for n in names}
        msgs = []
        for h in unknown:
            near = folded.get(h.casefold())
            msgs.append(f"column '{h}' differs only in case from the schema's feature '{near}'"
                        if near else f"column '{h}' is not in the federation's schema (declare "
                        "it, or name it in the data spec: ?site=COL or ?patient=column:COL)")
        if lacking:
            msgs.append(f"required feature column(s) missing: {sorted(lacking)}")
        if msgs:
            prefix = f"file {file}: " if file else ""
            raise SchemaError(prefix + "; ".join(msgs) + f" (schema features: "
                              f"{[f.name for f in self.features]}, label '{self.label}')")

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    def affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(lower, upper, center, scale)`` per design column (one-hot: identity)."""
        lo, hi, c, s = [], [], [], []
        for f in self.features:
            if f.kind == "categorical":
                k = len(f.levels)
                lo += [-math.inf] * k; hi += [math.inf] * k; c += [0.0] * k; s += [1.0] * k
                continue
            if not f.fitted:
                raise SchemaError(f"feature '{f.name}' (scaling '{f.scaling}') has no center and "
                                  "scale yet: the schema is not fitted")
            lo.append(-math.inf if f.lower is None else f.lower)
            hi.append(math.inf if f.upper is None else f.upper)
            c.append(f.center if f.scaling != "none" else 0.0)
            s.append(f.scale if f.scaling != "none" else 1.0)
        return tuple(np.asarray(v, dtype=np.float64) for v in (lo, hi, c, s))

    def transform(self, design: np.ndarray) -> np.ndarray:
        """Clip, centre and scale a design matrix; missing cells (NaN) become 0,
        the feature's centre. float32 (N, D)."""
        if self.input != "tabular":
            return design
        design = np.asarray(design, dtype=np.float64)
        if design.ndim != 2 or design.shape[1] != len(self.columns):
            raise SchemaError(f"records have shape {design.shape}; the schema has "
                              f"{len(self.columns)} design columns")
        lo, hi, c, s = self.affine()
        out = (np.clip(design, lo, hi) - c) / s
        return np.nan_to_num(out, nan=0.0).astype(np.float32)

    # -- DP scaling (the per-record vector of the sums each site releases) ----
    def scaling_vectors(self, design: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-record vectors whose sum a site releases for ``dp`` scaling, and
        the bound ``C`` on each vector's L2 norm.

        For each of the m ``dp`` features, ``u = (clip(x) - lower) / (upper -
        lower)`` in [0, 1]; the vector is ``[u - 1/2, u^2 - 1/2]`` (2m values in
        [-1/2, 1/2]; a missing cell contributes 0), so ``C = sqrt(2m) / 2`` and
        replacing one record moves the sum by at most ``2C``: the sensitivity
        DP-SGD's accounting assumes for clip norm ``C``.
        """
        cols = self._dp_columns()
        u = np.stack([(np.clip(design[:, j], f.lower, f.upper) - f.lower) / (f.upper - f.lower)
                      for j, f in cols], axis=1) if cols else np.zeros((len(design), 0))
        vec = np.concatenate([u - 0.5, u * u - 0.5], axis=1)
        vec = np.nan_to_num(vec, nan=0.0)
        return vec, math.sqrt(2 * len(cols)) / 2

    def fit_from_sums(self, total: np.ndarray, count: int) -> Schema:
        """The schema with ``dp`` features' constants from the summed noisy
        vectors of every site (``total``) over ``count`` records."""
        cols = self._dp_columns()
        m = len(cols)
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (2 * m,) or count < 1:
            raise SchemaError(f"scaling sums have shape {total.shape} over {count} records; "
                              f"expected ({2 * m},) over at least 1")
        mean_u = np.clip(total[:m] / count + 0.5, 0.0, 1.0)
        mean_u2 = np.clip(total[m:] / count + 0.5, 0.0, 1.0)
        var = np.clip(mean_u2 - mean_u ** 2, MIN_DP_SCALE_SHARE ** 2, 0.25)
        constants = {}
        for k, (_, f) in enumerate(cols):
            width = f.upper - f.lower
            constants[f.name] = (f.lower + mean_u[k] * width, math.sqrt(var[k]) * width)
        return self.with_constants(constants)

    def fit_public(self, design: np.ndarray) -> Schema:
        """The schema with ``public`` features' constants from a public split's
        design matrix (mean and standard deviation of the clipped values)."""
        constants, col = {}, 0
        for f in self.features:
            if f.kind == "numeric" and f.scaling == "public" and not f.fitted:
                x = design[:, col]
                x = x[np.isfinite(x)]
                if f.lower is not None or f.upper is not None:
                    x = np.clip(x, f.lower if f.lower is not None else -np.inf,
                                f.upper if f.upper is not None else np.inf)
                if len(x) < 2:
                    raise SchemaError(f"feature '{f.name}' (scaling 'public'): the public split "
                                      f"has {len(x)} values; need at least 2")
                scale = float(x.std())
                floor = max(1e-6, MIN_SCALE_SHARE * float(np.abs(x).max()))
                constants[f.name] = (float(x.mean()), max(scale, floor))
            col += len(f.columns)
        return self.with_constants(constants)

    def _dp_columns(self) -> list[tuple[int, Feature]]:
        out, col = [], 0
        for f in self.features:
            if f.kind == "numeric" and f.scaling == "dp":
                out.append((col, f))
            col += len(f.columns)
        return out


def _feature(raw: Any, default_scaling: str) -> Feature:
    if isinstance(raw, str):  # a bare name: a numeric feature with the default scaling
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise SchemaError(f"a schema feature is a table with a 'name', got {raw!r}")
    allowed = {"name", "kind", "levels", "scaling", "lower", "upper", "center", "scale"}
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SchemaError(f"a schema feature needs a 'name', got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SchemaError(f"feature '{name}': unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    kind = raw.get("kind", "numeric")
    if kind not in KINDS:
        raise SchemaError(f"feature '{name}': kind must be one of {KINDS}, got {kind!r}")
    if kind == "categorical":
        levels = raw.get("levels")
        if (not isinstance(levels, list | tuple) or not levels
                or not all(isinstance(v, str) and v for v in levels)):
            raise SchemaError(f"feature '{name}': a categorical feature lists its levels "
                              f"(strings), got {levels!r}")
        _unique(f"level of '{name}'", levels)
        extra = sorted(k for k in ("scaling", "lower", "upper", "center", "scale") if k in raw)
        if extra:
            raise SchemaError(f"feature '{name}': a categorical feature is one-hot encoded; "
                              f"{extra} do not apply")
        return Feature(name=name, kind=kind, levels=tuple(levels), scaling="none")
    if "levels" in raw:
        raise SchemaError(f"feature '{name}': 'levels' applies to categorical features only")
    nums = {}
    for key in ("lower", "upper", "center", "scale"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or not math.isfinite(v)):
            raise SchemaError(f"feature '{name}': {key} must be a finite number, got {v!r}")
        nums[key] = None if v is None else float(v)
    scaling = raw.get("scaling", default_scaling)
    if scaling not in SCALINGS:
        raise SchemaError(f"feature '{name}': scaling must be one of {SCALINGS}, got {scaling!r}")
    lo, hi, c, s = nums["lower"], nums["upper"], nums["center"], nums["scale"]
    if lo is not None and hi is not None and not lo < hi:
        raise SchemaError(f"feature '{name}': lower {lo} must be below upper {hi}")
    if scaling == "dp" and (lo is None or hi is None):
        raise SchemaError(f"feature '{name}': scaling 'dp' needs public bounds 'lower' and "
                          "'upper' (they bound each record's contribution); or declare "
                          "'center' and 'scale' (scaling 'declared'), or use scaling 'public'")
    if scaling == "declared" and (c is None or s is None):
        raise SchemaError(f"feature '{name}': scaling 'declared' needs 'center' and 'scale'")
    if s is not None and not s > 0:
        raise SchemaError(f"feature '{name}': scale must be > 0, got {s}")
    if scaling in ("none",) and (c is not None or s is not None):
        raise SchemaError(f"feature '{name}': scaling 'none' takes no center or scale")
    return Feature(name=name, kind=kind, scaling=scaling, lower=lo, upper=hi, center=c, scale=s)


def _unique(what: str, names: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for n in names:
        if n in seen:
            raise SchemaError(f"{what} '{n}' is listed twice")
        if n.casefold() in {s.casefold() for s in seen}:
            raise SchemaError(f"{what} names '{n}' and "
                              f"'{next(s for s in seen if s.casefold() == n.casefold())}' differ "
                              "only in case")
        seen[n] = n


def drop_missing(design: np.ndarray) -> np.ndarray:
    """Rows to keep under ``missing = "drop"`` (no missing cell)."""
    return ~np.isnan(design).any(axis=1)


def load_schema(value: str | Mapping | None) -> Schema | None:
    """A schema from the ``schema`` config value: a table, canonical JSON text,
    or the path of a TOML (``[schema]`` table or top level) or JSON file.
    ``""``/``None``: no declared schema."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        return Schema.from_dict(value)
    text = str(value).strip()
    if text.startswith("{"):
        return Schema.from_json(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise SchemaError(f"schema file not found: {path} (the schema key takes a [schema] "
                          "table, JSON text, or a .toml/.json file)")
    if path.suffix.lower() == ".json":
        return Schema.from_json(path.read_text())
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return Schema.from_dict(data.get("schema", data))


def image_schema(classes: Sequence[str], *, image_size: int, image_channels: int) -> Schema:
    return Schema(classes=tuple(classes), input="image", image_size=image_size,
                  image_channels=image_channels)


def derived_tabular(classes: Sequence[str], header: Sequence[str], *, label: str,
                    drop: Sequence[str] = ()) -> Schema:
    """The schema of an undeclared CSV: every other column numeric, scaled on the
    public validation split (no ε). Categorical columns must be declared."""
    names = [h for h in header if h not in (label, ID_COLUMN, *drop)]
    return Schema.from_dict({"classes": list(classes), "label": label, "scaling": "public",
                             "features": [{"name": n} for n in names]})




def parse_number(text: str) -> float:
    """A CSV cell as a number: NaN for a missing-value token (``MISSING_TOKENS``),
    ``ValueError`` for text. The one rule every reader (sites, ``predict``) uses."""
    t = text.strip()
    if t.lower() in MISSING_TOKENS:
        return math.nan
    return float(t)

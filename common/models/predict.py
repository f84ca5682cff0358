"""Run a delivered model (student or head) on a folder of images, an ``.npz``
or a CSV, and write class probabilities to CSV. Flower-free.

Inputs are records in the layout the dataset registry uses: images as floats
in [0, 1] shaped ``(H, W)`` or ``(H, W, C)``; tabular records as ``(D,)``.
Every mismatch with what the model expects (shape, channels, feature count,
class count) is a ``ValueError`` that names both sides.

Every input is read before the model runs. An input that cannot be used (a
corrupt image, a CSV row with a missing or non-numeric value, an ``.npz``
record with NaN) is, by default, named with its reason in one ``ValueError``
listing them all, and nothing is written. With ``skip_bad`` each becomes an
output row with empty probabilities and ``unreadable: <why>`` in the
``status`` column.

The predicted class follows the card's ``decision`` block
(:mod:`common.models.decision`); without one it is the most probable class.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.data.schema import Schema, SchemaError
from common.data.schema import parse_number as _number
from common.models.decision import apply_decision, check_decision, explain_decision
from common.models.distill import probs_from_logits
from common.models.finetune import input_backbone, is_tuned
from common.models.modelio import (
    MODELS,
    default_model,
    load_head,
    load_student,
    read_card,
)
from common.models.students import to_student_input

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WHICH = MODELS
OK = "ok"
UNREADABLE = "unreadable: "
_GRAY_MODES = {"1", "L", "I", "I;16", "F"}
# What Pillow raises on a corrupt or hostile file, besides its UnidentifiedImageError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


@dataclass
class Inputs:
    """Every input's id and status (``ok`` or ``unreadable: <why>``), the
    records of the readable ones (in the same order), and one line per
    unreadable input naming it (file, CSV line or record index) and why."""

    ids: list[str]
    records: np.ndarray
    statuses: list[str]
    problems: list[str]

    def require_readable(self, source: Path) -> Inputs:
        """``self``, or one ``ValueError`` naming every unreadable input."""
        if self.problems:
            raise ValueError(
                f"{source}: {len(self.problems)} of {len(self.ids)} inputs cannot be read: "
                + "; ".join(self.problems) + ". Fix or remove them, or skip them (skip_bad=True, "
                "--skip-bad) to write each as a row with status 'unreadable' and no probabilities")
        return self


def _inputs(ids: list[str], records: list[np.ndarray] | np.ndarray, reasons: list[str | None],
            names: list[str], empty_shape: tuple[int, ...]) -> Inputs:
    """Inputs from per-input reasons (None: readable); ``names`` say where each is."""
    statuses = [OK if why is None else UNREADABLE + why for why in reasons]
    problems = [f"{n}: {why}" for n, why in zip(names, reasons, strict=True) if why is not None]
    x = np.stack(records) if len(records) else np.zeros((0, *empty_shape), np.float32)
    return Inputs(ids, x, statuses, problems)


def read_npz(path: Path) -> np.ndarray:
    """The records of an ``.npz``: its one array, or ``images`` / ``x`` /
    ``test_images`` (a MedMNIST file's test split). Labels are never read."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    with npz:
        keys = list(npz.files)
        key = keys[0] if len(keys) == 1 else next(
            (k for k in ("images", "x", "test_images") if k in keys), None)
        if key is None:
            raise ValueError(f"{path}: cannot tell which array holds the inputs (arrays: "
                             f"{', '.join(keys)}); name it 'images' or 'x', or save one array")
        x = npz[key]
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{path}: array '{key}' has shape {x.shape}; expected N records")
    return x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)


def npz_inputs(path: Path) -> Inputs:
    """An ``.npz``'s records, ids ``0..N-1``; a record with NaN or Inf is unreadable."""
    x = read_npz(path)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    reasons = [None if ok else "contains NaN or Inf" for ok in finite]
    ids = [str(i) for i in range(len(x))]
    return _inputs(ids, x[finite], reasons, [f"record {i}" for i in ids], x.shape[1:])


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and ``(line number, cells)`` of every non-blank row."""
    try:
        # utf-8-sig: a spreadsheet's byte-order mark must not rename the first column.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows, start = [], reader.line_num + 1
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((start, row))
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from exc
    if not header:
        raise ValueError(f"{path}: empty file")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return header, rows


def _parse_row(cells: list[str], names: list[str]) -> tuple[list[float], str | None, list[str]]:
    """A row's feature values (NaN where unusable), what is wrong with them (None:
    nothing) and the columns holding text."""
    values, missing, infinite, text = [], [], [], []
    for name, cell in zip(names, cells, strict=True):
        try:
            v = _number(cell)  # the training reader's rule: the same NA tokens mean missing
        except ValueError:
            text.append((name, cell.strip()))
            values.append(math.nan)
            continue
        if math.isnan(v):
            missing.append(name)
        elif math.isinf(v):
            infinite.append(name)
        values.append(v)
    parts = [f"missing values in columns {missing}"] if missing else []
    parts += [f"infinite values in columns {infinite}"] if infinite else []
    if text:
        parts.append(f"non-numeric values in columns {[n for n, _ in text]} "
                     f"({', '.join(repr(t) for _, t in text[:3])})")
    return values, " and ".join(parts) or None, [n for n, _ in text]


def _check_columns(path: Path, names: list[str], x: np.ndarray, text_cols: set[str]) -> None:
    """A column with no number in any row is the file's problem, not a row's."""
    if not len(x):
        return
    dead = [n for n, alive in zip(names, np.isfinite(x).any(axis=0), strict=True) if not alive]
    text = [n for n in dead if n in text_cols]
    empty = [n for n in dead if n not in text_cols]
    parts = ([f"non-numeric columns {text} (no row holds a number)"] if text else []) + (
        [f"columns {empty} hold no values"] if empty else [])
    if parts:
        raise ValueError(f"{path}: {'; '.join(parts)}; a CSV input holds numeric feature columns "
                         "(plus optional 'id' and 'label')")


def records_from_csv(path: str | Path, card: Mapping | None = None
                     ) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, X, statuses)`` from a CSV's numeric feature columns.

    Columns: every one except an optional ``id`` (row names; else ``0..N-1``)
    and ``label`` (ignored), in file order. ``statuses`` has one entry per row,
    ``ok`` or ``unreadable: line <n>: <why>`` (missing, non-numeric or
    infinite values, a wrong field count); ``X`` holds the ``ok`` rows only,
    in order. A column with no number in any row is an error for the file.

    With a tabular ``schema`` in the ``card`` (feature names, one-hot levels,
    scaling constants: :mod:`common.data.schema`), columns map onto it *by name*
    and each row gets the run's transform (:func:`schema_records`).
    """
    path = Path(path)
    header, rows = _read_csv_rows(path)
    schema_block = (card or {}).get("schema")
    if schema_block and schema_block.get("input") == "tabular":
        return schema_records(path, Schema.from_dict(schema_block), header, rows)
    cols = {c.lower(): i for i, c in enumerate(header)}
    id_col = cols.get("id")
    feature_idx = [i for i, c in enumerate(header) if c.lower() not in ("id", "label")]
    if not feature_idx:
        raise ValueError(f"{path}: no feature columns (columns: {', '.join(header)})")
    names = [header[i] for i in feature_idx]
    ids, parsed, reasons, full_width, text_cols = [], [], [], [], set()
    for n, (line, row) in enumerate(rows):
        ids.append(row[id_col].strip() if id_col is not None and id_col < len(row) else str(n))
        full_width.append(len(row) == len(header))
        if full_width[-1]:
            values, why, text = _parse_row([row[i] for i in feature_idx], names)
            text_cols.update(text)
        else:
            values = [math.nan] * len(names)
            why = f"{len(row)} fields, the header has {len(header)}"
        parsed.append(values)
        reasons.append(None if why is None else f"line {line}: {why}")
    x = np.array(parsed, dtype=np.float64).reshape(-1, len(names))
    _check_columns(path, names, x[np.array(full_width)], text_cols)
    statuses = [OK if why is None else UNREADABLE + why for why in reasons]
    return ids, x[np.array([why is None for why in reasons])].astype(np.float32), statuses


def schema_records(path: Path, schema: Schema, header: list[str],
                   rows: list[tuple[int, list[str]]]) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, X, statuses)`` of a CSV read through the run's schema: every schema
    feature is required by name (a missing one, or one differing only in case, is
    an error for the file); the label, an ``id`` and any other column are ignored
    (and logged); each row is encoded on its own and transformed with the
    schema's constants. A row the schema cannot read (a non-number, an
    undeclared level, a missing value under ``missing = "error"`` or ``"drop"``)
    gets an ``unreadable`` status naming its line and column."""
    names = {f.name for f in schema.features}
    ignored = [h for h in header if h not in names]
    if ignored:
        log.info("%s: columns %s are not model features; ignored", path, ignored)
    cols = [i for i, h in enumerate(header) if h in names]
    sub = [header[i] for i in cols]
    try:
        schema._check_header(sub, f"{path.name}: ")
    except SchemaError as exc:
        folded = {n.casefold(): n for n in names}
        near = [f"'{h}' differs only in case from the model's feature '{folded[h.casefold()]}'"
                for h in ignored if h.casefold() in folded]
        raise ValueError(f"{exc}" + (f"; {'; '.join(near)}" if near else "")) from exc
    id_col = next((i for i, h in enumerate(header) if h.lower() == "id"), None)
    ids, designs, statuses = [], [], []
    strict = replace(schema, missing="error" if schema.missing == "drop" else schema.missing)
    for n, (line, row) in enumerate(rows):
        ids.append(row[id_col].strip() if id_col is not None and id_col < len(row) else str(n))
        if len(row) != len(header):
            statuses.append(f"{UNREADABLE}line {line}: {len(row)} fields, the header has "
                            f"{len(header)}")
            continue
        design, problems = strict.encode(sub, [[row[i] for i in cols]])
        if problems:
            why = "; ".join(problems)
            statuses.append(f"{UNREADABLE}line {line}: {why}")
            continue
        statuses.append(OK)
        designs.append(design[0])
    x = schema.transform(np.array(designs).reshape(-1, len(schema.columns)))
    return ids, x, statuses


def csv_inputs(path: Path, card: Mapping | None = None) -> Inputs:
    """A CSV's records (see :func:`records_from_csv`); problems name the line."""
    ids, x, statuses = records_from_csv(path, card)
    problems = [s.removeprefix(UNREADABLE) for s in statuses if s != OK]
    return Inputs(ids, x, statuses, problems)


def _open_image(f: Path):
    """The decoded image; ``ValueError`` saying why when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            return img.copy()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (unknown format or corrupt header)"
                         ) from None
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None


def _image_array(img, *, channels: int | None, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded image as floats in [0, 1] with the channels and size the model takes."""
    from PIL import Image

    if img.mode in _GRAY_MODES:
        # 8-bit and 1-bit images scale by 255, 16-bit by 65535; float stays as is.
        scale = 65535.0 if img.mode.startswith("I") else 1.0 if img.mode == "F" else 255.0
        have, img = 1, img.convert("F") if img.mode != "1" else img.convert("L")
    elif img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        have, img, scale = 3, img.convert("RGB"), 255.0
    else:
        raise ValueError(f"unsupported image mode {img.mode}")
    if channels is not None and have != channels:
        kind = {1: "grayscale (1-channel)", 3: "colour (3-channel)"}
        raise ValueError(f"the model expects {kind[channels]} images, this one is {kind[have]}")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / scale


def read_image_folder(path: Path, *, channels: int | None, size: tuple[int, int] | None) -> Inputs:
    """Every image under ``path`` (recursively, sorted), as floats in [0, 1];
    ids are paths relative to ``path``.

    ``channels``: what the model takes (1 or 3), or None for either. Images
    of another size are resized to ``size`` (the student's input size). An
    image that cannot be decoded or has the wrong channels is unreadable.
    """
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    out, reasons = [], []
    for f in files:
        try:
            out.append(_image_array(_open_image(f), channels=channels, size=size))
            reasons.append(None)
        except ValueError as exc:
            reasons.append(str(exc))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images differ in size ({sorted(shapes)[:3]}); the head needs "
                         "one size per batch")
    ids = [f.relative_to(path).as_posix() for f in files]
    return _inputs(ids, out, reasons, ids, (0, 0))


def read_inputs(path: str | Path, *, channels: int | None = None,
                size: tuple[int, int] | None = None, card: Mapping | None = None,
                skip_bad: bool = False) -> Inputs:
    """Records from a folder of images, an ``.npz`` or a ``.csv`` (``card``: the
    model's, for :func:`records_from_csv`). Any unreadable input is a
    ``ValueError`` naming them all, unless ``skip_bad``."""
    path = Path(path)
    if path.is_dir():
        data = read_image_folder(path, channels=channels, size=size)
    elif not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    elif path.suffix.lower() == ".npz":
        data = npz_inputs(path)
    elif path.suffix.lower() == ".csv":
        data = csv_inputs(path, card)
    else:
        raise ValueError(f"{path}: unsupported input; give a folder of images, an .npz or a .csv")
    return data if skip_bad else data.require_readable(path)


@dataclass
class Predictor:
    """A delivered model ready to run: ``predict_proba(records) -> (N, K)``;
    ``decision`` is the card's validated rule (None: argmax)."""

    which: str
    classes: list[str]
    channels: int | None
    size: tuple[int, int] | None
    run: Callable[[np.ndarray], np.ndarray]
    describe: str
    card: dict
    decision: dict | None

    def predict_proba(self, records: np.ndarray, *, batch_size: int = 256,
                      progress: bool = False) -> np.ndarray:
        if len(records) == 0:
            return np.zeros((0, len(self.classes)))
        batches = range(0, len(records), batch_size)
        if progress and len(records) > batch_size:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"predict ({self.which})", unit="batch")
        out = [self.run(records[s:s + batch_size]) for s in batches]
        probs = np.concatenate(out)
        if probs.shape[1] != len(self.classes):
            raise ValueError(f"the model outputs {probs.shape[1]} classes but its card lists "
                             f"{len(self.classes)} ({', '.join(self.classes)})")
        return probs

    def predict_classes(self, probs: np.ndarray) -> list[str]:
        """Class names for ``probs`` under the card's decision rule."""
        return [self.classes[int(i)] for i in apply_decision(probs, self.decision)]


def _check_classes(card: dict, out_dim: int, what: str) -> list[str]:
    classes = [str(c) for c in card.get("classes") or []]
    if len(classes) != out_dim:
        raise ValueError(f"class-count mismatch: the {what} outputs {out_dim} classes but its "
                         f"card lists {len(classes)} ({', '.join(classes)})")
    return classes


def _card_decision(card: dict, num_classes: int, which: str = "head") -> dict | None:
    """The rule shipped for ``which``: the head's is ``card["decision"]``, the
    student's (chosen on its own validation part) ``card["student"]["decision"]``.
    A student without its own rule predicts by argmax, never by the head's rule."""
    block = card.get("student", {}) if which == "student" else card
    decision = block.get("decision")
    return None if decision is None else check_decision(decision, num_classes)


def _student_predictor(model: str | Path, device: str) -> Predictor:
    student, spec, card = load_student(model)
    student.to(device)
    classes = _check_classes(card, spec.num_classes, "student")

    def run(x: np.ndarray) -> np.ndarray:
        if spec.name == "cnn" and x.ndim == 2:  # CSV rows of flattened pixels (H, W[, C] order)
            c, hh, ww = spec.input_shape
            if x.shape[1] != c * hh * ww:
                raise ValueError(f"the model expects {hh}x{ww} images with {c} channel(s), i.e. "
                                 f"{c * hh * ww} pixel columns per row, got {x.shape[1]}")
            x = x.reshape(len(x), hh, ww, c)[..., 0] if c == 1 else x.reshape(len(x), hh, ww, c)
        with torch.inference_mode():
            return probs_from_logits(student(to_student_input(x, spec).to(device)).cpu().numpy())

    image = spec.name == "cnn"
    return Predictor("student", classes, spec.input_shape[0] if image else None,
                     tuple(spec.input_shape[1:]) if image else None, run, spec.architecture,
                     card, _card_decision(card, len(classes), "student"))


def _head_predictor(model: str | Path, device: str) -> Predictor:

    head, card = load_head(model)
    h = card["head"]
    classes = _check_classes(card, int(h["num_classes"]), "head")
    trainable = h.get("trainable", "head")
    # Pooled features, or (a tuned bundle) the activations the tuned suffix takes.
    backbone = input_backbone(h["backbone"], int(h["image_size"]), trainable)

    def run_head(x: np.ndarray) -> np.ndarray:
        feats = backbone.extract(x, device=device)
        if not is_tuned(trainable) and feats.shape[1] != int(h["in_dim"]):
            raise ValueError(f"the head expects {h['in_dim']} backbone features per record, got "
                             f"{feats.shape[1]} (input records shaped {x.shape[1:]})")
        with torch.inference_mode():
            return probs_from_logits(head(torch.from_numpy(feats)).numpy())

    return Predictor("head", classes, None, None, run_head, f"{h['backbone']} + {h['name']} head",
                     card, _card_decision(card, len(classes)))


def load_predictor(model: str | Path, *, which: str | None = None,
                   device: str = "cpu") -> Predictor:
    """A delivered model (``card.json`` or its folder), hash-checked before use.
    ``which``: ``student``, ``head``, or None for the student when the bundle has
    one, else the head."""
    if which is None:
        which = default_model(read_card(model))
    if which not in WHICH:
        raise ValueError(f"unknown model {which!r}. Valid: {', '.join(WHICH)}")
    if which == "student":
        return _student_predictor(model, device)
    return _head_predictor(model, device)


def write_predictions(out: Path, data: Inputs, probs: np.ndarray, predicted: list[str],
                      classes: list[str], *, status: bool) -> None:
    """``input``, ``predicted``, ``prob_<class>`` per class (and ``status`` when
    ``status``), one row per input; an unreadable one has empty cells. Written
    to a temporary file first, so ``out`` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    good = iter(zip(predicted, probs, strict=True))
    try:
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["input", "predicted", *[f"prob_{c}" for c in classes],
                        *(["status"] if status else [])])
            for rid, st in zip(data.ids, data.statuses, strict=True):
                if st == OK:
                    name, p = next(good)
                    cells = [name, *[f"{v:.6f}" for v in p]]
                else:
                    cells = [""] * (1 + len(classes))
                w.writerow([rid, *cells, *([st] if status else [])])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def predict_file(model: str | Path, inputs: str | Path, out: str | Path, *,
                 which: str | None = None, batch_size: int = 256, device: str = "cpu",
                 progress: bool = True, skip_bad: bool = False) -> dict:
    """Predict every record of ``inputs`` and write ``out`` (CSV: ``input``,
    ``predicted`` under the card's decision rule, then ``prob_<class>`` per
    class). An unreadable input is an error naming every one, and nothing is
    written; with ``skip_bad`` it is a row with empty probabilities, and every
    row has a ``status`` (``ok`` or ``unreadable: <why>``). Returns a short report.
    """
    pred = load_predictor(model, which=which, device=device)
    data = read_inputs(inputs, channels=pred.channels, size=pred.size, card=pred.card,
                       skip_bad=skip_bad)
    probs = pred.predict_proba(data.records, batch_size=batch_size, progress=progress)
    predicted = pred.predict_classes(probs)
    out = Path(out)
    write_predictions(out, data, probs, predicted, pred.classes, status=skip_bad)
    rule = explain_decision(pred.decision, pred.classes)
    if data.problems:
        log.warning("%d unreadable inputs skipped (first: %s); their rows in %s say why",
                    len(data.problems), data.problems[0], out)
    log.debug("predicted %d records with %s (decision: %s) -> %s", len(probs), pred.describe,
              rule, out)
    return {"records": len(probs), "skipped": len(data.problems), "rows": len(data.ids),
            "model": pred.describe, "which": pred.which, "out": str(out),
            "classes": pred.classes, "decision": rule}

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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.data.decode import IMAGE_SUFFIXES, RecordError, Window, read_csv_table, where
from common.data.datasets import record_columns
from common.data.readers import cell_messages, data_spec, image_files, read_image
from common.data.schema import ID_COLUMN, Feature, Schema, SchemaError
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

WHICH = MODELS
OK = "ok"
UNREADABLE = "unreadable: "


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


def csv_schema(header: list[str], card: Mapping | None, *, extra: tuple[str, ...] = ()
               ) -> tuple[Schema, bool]:
    """``(schema, fitted)``: the card's tabular schema (the run's features by name
    and its scaling), or, for a card without one, every column but ``id``, the label
    and ``extra`` as an unscaled numeric feature."""
    block = (card or {}).get("schema")
    if block and block.get("input") == "tabular":
        return Schema.from_dict(block), True
    names = [h for h in header if h.lower() not in (ID_COLUMN, "label") and h not in extra]
    if not names:
        raise ValueError(f"no feature columns (columns: {', '.join(header)})")
    return Schema(classes=tuple(str(c) for c in (card or {}).get("classes") or ("0", "1")),
                  input="tabular", features=tuple(Feature(name=n) for n in names)), False


def records_from_csv(path: str | Path, card: Mapping | None = None, *,
                     extra: tuple[str, ...] = ()) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, X, statuses)`` of a CSV, read by :mod:`common.data.decode` and
    :meth:`Schema.encode`, the code a site's training and ``site check`` use.

    With a tabular ``schema`` in the ``card`` (feature names, one-hot levels,
    scaling constants), columns map onto it *by name* and each row gets the run's
    transform; a column the schema does not know (beyond ``id``, the label and
    ``extra``: the spec's site and patient columns), one differing only in case,
    or a missing feature is an error for the file, as at a site. Without one,
    every column but ``id`` and ``label`` is a numeric feature, in file order.
    ``statuses`` has one entry per row, ``ok`` or ``unreadable: file F, row R,
    column 'C': why``; ``X`` holds the ``ok`` rows only, in order.
    """
    path = Path(path)
    try:
        table = read_csv_table(path)
    except RecordError as exc:
        raise ValueError(str(exc)) from None
    if not table.rows:
        raise ValueError(f"{where(path.name)}: no rows")
    header = table.header
    schema, fitted = csv_schema(header, card, extra=extra)
    # A row's value cannot depend on other rows: "drop" cannot drop one record of a
    # prediction, so a missing value there is unreadable (as under "error").
    strict = replace(schema, missing="error" if schema.missing == "drop" else schema.missing)
    id_col = next((i for i, h in enumerate(header) if h.lower() == ID_COLUMN), None)
    ids = [cells[id_col].strip() if id_col is not None and id_col < len(cells) else str(n)
           for n, (_, cells) in enumerate(table.rows)]
    whole = [(row, cells) for row, cells in table.rows if len(cells) == len(header)]
    try:
        design, bad = strict.encode(header, [c for _, c in whole],
                                    extra=tuple(extra) + (("label",) if not fitted else ()))
    except SchemaError as exc:
        raise ValueError(f"{where(path.name)}: {exc}") from None
    messages = cell_messages(path.name, bad, [r for r, _ in whole])
    statuses, keep, k = [], [], 0
    for row, cells in table.rows:
        if len(cells) != len(header):
            statuses.append(f"{UNREADABLE}{where(path.name, row)}: {len(cells)} fields, the "
                            f"header has {len(header)}")
            continue
        why = messages.get(k)
        statuses.append(OK if why is None else UNREADABLE + why)
        keep.append(why is None)
        k += 1
    good = design[np.array(keep, dtype=bool)] if keep else design[:0]
    x = schema.transform(good) if fitted else good.astype(np.float32)
    return ids, x, statuses


def csv_inputs(path: Path, card: Mapping | None = None, *, extra: tuple[str, ...] = ()
               ) -> Inputs:
    """A CSV's records (see :func:`records_from_csv`); problems name file, row, column."""
    ids, x, statuses = records_from_csv(path, card, extra=extra)
    problems = [s.removeprefix(UNREADABLE) for s in statuses if s != OK]
    return Inputs(ids, x, statuses, problems)


def read_image_folder(path: Path, *, channels: int | None, size: tuple[int, int] | None,
                      window: Window | None = None, dicom: bool = False) -> Inputs:
    """Every image under ``path`` (recursively, sorted; the suffixes a site reads,
    or with ``dicom`` every file), decoded and conformed by
    :func:`common.data.readers.read_image`, the function a site's training and
    ``site check`` call; ids are paths relative to ``path``.

    ``channels``: what the model takes (1 or 3: a colour image becomes grey by
    luma, a grey one colour by repeating it, as at a site), or None for as it is.
    ``size`` ``(height, width)``: what the model takes (None: as it is).
    """
    files, _ = image_files(path, dicom=dicom)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    out, reasons = [], []
    wh = None if size is None else (size[1], size[0])
    for f in files:
        try:
            values, _, _ = read_image(f, channels=channels, size=wh, window=window, dicom=dicom)
            out.append(values)
            reasons.append(None)
        except RecordError as exc:
            reasons.append(str(exc))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images differ in size ({sorted(shapes)[:3]}); the head needs "
                         "one size per batch")
    ids = [f.relative_to(path).as_posix() for f in files]
    return _inputs(ids, out, reasons, [where(i) for i in ids], (0, 0))


def read_inputs(path: str | Path, *, channels: int | None = None,
                size: tuple[int, int] | None = None, card: Mapping | None = None,
                skip_bad: bool = False) -> Inputs:
    """Records from a folder of images (DICOM included), an ``.npz`` or a ``.csv``,
    or a data spec with the syntax sites use (``dicom:<dir>``,
    ``csv:<file>?site=COL&patient=column:COL``: those columns are then not
    features). ``card``: the model's (its schema: a CSV's features and scaling, an
    image window). Any unreadable input is a ``ValueError`` naming them all, unless
    ``skip_bad``."""
    spec = data_spec(str(path)) if (":" in str(path) or "?" in str(path)) and not Path(
        str(path)).exists() else None
    target = spec.path if spec is not None else Path(path)
    block = (card or {}).get("schema") or {}
    window = Window(*block["image-window"]) if block.get("image-window") else None
    if spec is None and not target.exists():
        raise FileNotFoundError(f"input not found: {target}")
    kind = spec.kind if spec is not None else (
        "imagefolder" if target.is_dir() else {".npz": "medmnist", ".csv": "csv"}.get(
            target.suffix.lower()))
    if kind in ("imagefolder", "dicom"):
        if not target.is_dir():
            raise FileNotFoundError(f"input not found: {target}")
        data = read_image_folder(target, channels=channels, size=size, window=window,
                                 dicom=kind == "dicom")
    elif kind == "medmnist":
        data = npz_inputs(target)
    elif kind == "csv":
        if not target.is_file():
            raise FileNotFoundError(f"input not found: {target}")
        # The columns beside the features: those the input's spec names, and those the
        # run's own data spec named (the card's dataset, e.g. csv:<file>?site=hospital).
        extra = (spec.columns if spec is not None else ()) + record_columns(
            str((card or {}).get("dataset") or ""))
        data = csv_inputs(target, card, extra=extra)
    else:
        raise ValueError(f"{target}: unsupported input; give a folder of images, an .npz or a "
                         ".csv (or a data spec: dicom:<dir>, csv:<file>?...)")
    return data if skip_bad else data.require_readable(target)


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

    # Images are read as the sites read them: the schema's channels, and (for a real
    # backbone, which resizes anyway) its size; raw pixels (identity) keep their size.
    block = card.get("schema") or {}
    channels = int(block.get("image-channels") or 0) or None
    size = int(block.get("image-size") or 0)
    shape = (size, size) if size and h["backbone"] != "identity" else None
    return Predictor("head", classes, channels if block.get("input") == "image" else None,
                     shape if block.get("input") == "image" else None, run_head,
                     f"{h['backbone']} + {h['name']} head", card,
                     _card_decision(card, len(classes)))


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
            w = csv.writer(fh, lineterminator="\n")  # "\n", not csv's default CRLF
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

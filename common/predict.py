"""Run a delivered model (student or head) on a folder of images, an ``.npz``
or a CSV, and write class probabilities to CSV. Flower-free.

Inputs are records in the layout the dataset registry uses: images as floats
in [0, 1] shaped ``(H, W)`` or ``(H, W, C)``; tabular records as ``(D,)``.
Every mismatch with what the model expects (shape, channels, feature count,
class count) is a ``ValueError`` that names both sides.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.distill import probs_from_logits, to_student_input
from common.modelio import load_head_arrays, load_student

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WHICH = ("student", "head")
_GRAY_MODES = {"1", "L", "I", "I;16", "F"}


@dataclass
class Inputs:
    ids: list[str]
    records: np.ndarray


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
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: array '{key}' contains NaN or Inf")
    return x


def read_csv_records(path: Path) -> tuple[list[str], np.ndarray]:
    """Numeric feature columns; optional ``id`` column (row names) and
    ``label`` column (ignored). Missing values are an error, not a guess."""
    import pandas as pd

    df = pd.read_csv(path)
    if df.empty:
        raise ValueError(f"{path}: no rows")
    cols = {c.lower(): c for c in df.columns}
    ids = [str(v) for v in df[cols["id"]]] if "id" in cols else [str(i) for i in range(len(df))]
    df = df.drop(columns=[cols[c] for c in ("id", "label") if c in cols])
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{path}: non-numeric columns {bad[:5]}; a CSV input holds numeric "
                         "feature columns (plus optional 'id' and 'label')")
    if df.isna().any().any():
        missing = [c for c in df.columns if df[c].isna().any()]
        raise ValueError(f"{path}: missing values in columns {missing[:5]}; fill or drop them first")
    return ids, df.to_numpy(dtype=np.float32)


def read_image_folder(path: Path, *, channels: int | None, size: tuple[int, int] | None) -> Inputs:
    """Every image under ``path`` (recursively, sorted), as floats in [0, 1].

    ``channels``: what the model takes (1 or 3), or None for either. Images
    of another size are resized to ``size`` (the student's input size).
    """
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    out = []
    for f in files:
        with Image.open(f) as img:
            if img.mode in _GRAY_MODES:
                # 8-bit and 1-bit images scale by 255, 16-bit by 65535; float stays as is.
                scale = 65535.0 if img.mode.startswith("I") else 1.0 if img.mode == "F" else 255.0
                have, img = 1, img.convert("F") if img.mode != "1" else img.convert("L")
            elif img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                have, img, scale = 3, img.convert("RGB"), 255.0
            else:
                raise ValueError(f"{f}: unsupported image mode {img.mode}")
            if channels is not None and have != channels:
                kind = {1: "grayscale (1-channel)", 3: "colour (3-channel)"}
                raise ValueError(f"{f}: the model expects {kind[channels]} images, this one is "
                                 f"{kind[have]}")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            out.append(np.asarray(img, dtype=np.float32) / scale)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images differ in size ({sorted(shapes)[:3]}); the head needs "
                         "one size per batch")
    return Inputs([str(f.relative_to(path)) for f in files], np.stack(out))


def read_inputs(path: str | Path, *, channels: int | None = None,
                size: tuple[int, int] | None = None) -> Inputs:
    """Records from a folder of images, an ``.npz`` or a ``.csv``."""
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, channels=channels, size=size)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix.lower() == ".npz":
        x = read_npz(path)
        return Inputs([str(i) for i in range(len(x))], x)
    if path.suffix.lower() == ".csv":
        ids, x = read_csv_records(path)
        return Inputs(ids, x)
    raise ValueError(f"{path}: unsupported input; give a folder of images, an .npz or a .csv")


@dataclass
class Predictor:
    """A delivered model ready to run: ``predict_proba(records) -> (N, K)``."""

    which: str
    classes: list[str]
    channels: int | None
    size: tuple[int, int] | None
    run: Callable[[np.ndarray], np.ndarray]
    describe: str

    def predict_proba(self, records: np.ndarray, *, batch_size: int = 256,
                      progress: bool = False) -> np.ndarray:
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


def _check_classes(card: dict, out_dim: int, what: str) -> list[str]:
    classes = [str(c) for c in card.get("classes") or []]
    if len(classes) != out_dim:
        raise ValueError(f"class-count mismatch: the {what} outputs {out_dim} classes but its "
                         f"card lists {len(classes)} ({', '.join(classes)})")
    return classes


def load_predictor(model: str | Path, *, which: str = "student", device: str = "cpu") -> Predictor:
    """A delivered model (``card.json`` or its folder), hash-checked before use."""
    if which not in WHICH:
        raise ValueError(f"unknown model {which!r}. Valid: {', '.join(WHICH)}")
    if which == "student":
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
        return Predictor(which, classes, spec.input_shape[0] if image else None,
                         tuple(spec.input_shape[1:]) if image else None, run, spec.architecture)
    from common.backbones import get_backbone
    from common.heads import load_head_state, make_head

    arrays, card = load_head_arrays(model)
    h = card["head"]
    head = make_head(h["name"], in_dim=int(h["in_dim"]), num_classes=int(h["num_classes"]),
                     hidden_dim=int(h.get("hidden_dim", 128)))
    load_head_state(head, arrays)
    classes = _check_classes(card, int(h["num_classes"]), "head")
    backbone = get_backbone(h["backbone"], int(h["image_size"]))

    def run_head(x: np.ndarray) -> np.ndarray:
        feats = backbone.extract(x, device=device)
        if feats.shape[1] != int(h["in_dim"]):
            raise ValueError(f"the head expects {h['in_dim']} backbone features per record, got "
                             f"{feats.shape[1]} (input records shaped {x.shape[1:]})")
        with torch.inference_mode():
            return probs_from_logits(head(torch.from_numpy(feats)).numpy())

    return Predictor(which, classes, None, None, run_head,
                     f"{h['backbone']} + {h['name']} head")


def predict_file(model: str | Path, inputs: str | Path, out: str | Path, *,
                 which: str = "student", batch_size: int = 256, device: str = "cpu",
                 progress: bool = True) -> dict:
    """Predict every record of ``inputs`` and write ``out`` (CSV: ``input``,
    ``predicted``, then ``prob_<class>`` per class). Returns a short report."""
    pred = load_predictor(model, which=which, device=device)
    data = read_inputs(inputs, channels=pred.channels, size=pred.size)
    probs = pred.predict_proba(data.records, batch_size=batch_size, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["input", "predicted", *[f"prob_{c}" for c in pred.classes]])
        for rid, p in zip(data.ids, probs, strict=True):
            w.writerow([rid, pred.classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    log.debug("predicted %d records with %s -> %s", len(probs), pred.describe, out)
    return {"records": len(probs), "model": pred.describe, "out": str(out),
            "classes": pred.classes}


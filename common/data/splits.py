"""What every reader returns: the record containers, and the MedMNIST ``.npz`` reader.

A leaf module: :mod:`common.data.datasets` (registry, partitions) and
:mod:`common.data.readers` (a site's own files) both build these, and neither
imports the other for them.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEDMNIST_CLASSES = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal, benign"),
}


@dataclass(frozen=True)
class Splits:
    """A labelled dataset with the standard train / val / test splits."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    columns: tuple[str, ...] = ()  # tabular: the design columns (schema order)
    # Natural sites (``partitioner = "site"``): site names, and each record's site index.
    site_names: tuple[str, ...] = ()
    train_site: np.ndarray | None = None
    val_site: np.ndarray | None = None
    test_site: np.ndarray | None = None
    label: str = "label"  # a CSV's label column (what the derived schema records)
    # Each training record's patient (site-local ids, for grouping only), where the data
    # spec declares where they come from; the splits above never put a patient on two sides.
    train_groups: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train_records(self) -> int:
        """How many training records the sites hold together: a count, which the
        product's unit (replace-one neighbours) treats as public; no record is read."""
        return len(self.train_y)


@dataclass(frozen=True)
class SiteData:
    """One hospital's private data: a training split and a local holdout."""

    site_id: int
    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    num_classes: int
    # Each record's patient (any hashable id, read only for grouping; never leaves the
    # site), where the site declares where patient ids come from; None: one record, one unit.
    train_groups: np.ndarray | None = None
    holdout_groups: np.ndarray | None = None
    # Every record's digest and name (files, rows) as read, train and holdout alike: for the
    # site's own check against the coordinator's public records. Site-local, never sent.
    digests: tuple[str, ...] = ()
    record_ids: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint_arrays(self.train_x, self.train_y, self.holdout_x, self.holdout_y)


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """Content hash of arrays (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_medmnist_npz(path: str | Path) -> Splits:
    """Read and check a standard MedMNIST ``.npz`` (train/val/test images+labels)."""
    path = Path(path)
    # A truncated or damaged .npz fails inside zipfile/zlib, not with OSError/ValueError.
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        npz = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    arrays = {}
    with npz:
        for split in ("train", "val", "test"):
            for part in ("images", "labels"):
                key = f"{split}_{part}"
                if key not in npz.files:
                    raise ValueError(
                        f"{path}: missing array '{key}'; a MedMNIST .npz has "
                        "train/val/test _images and _labels"
                    )
                try:
                    arrays[key] = npz[key]
                except unreadable as exc:
                    raise ValueError(f"{path}: array '{key}' is corrupt ({exc})") from exc
    out = {}
    num_classes = 0
    for split in ("train", "val", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim not in (3, 4) or len(x) != len(y):
            raise ValueError(
                f"{path}: {split}_images has shape {x.shape} and {split}_labels {y.shape}; "
                "expected (N, H, W[, C]) images and N labels"
            )
        y = np.asarray(y).reshape(len(y), -1)
        if y.shape[1] != 1:
            raise ValueError(f"{path}: multi-label targets {y.shape} are not supported")
        y = y[:, 0]
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"{path}: {split}_labels must be non-negative integers")
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: {split}_images contains NaN or Inf")
        out[split] = (x, y.astype(np.int64))
        num_classes = max(num_classes, int(y.max()) + 1)
    name = path.stem
    classes = MEDMNIST_CLASSES.get(name, tuple(str(i) for i in range(num_classes)))
    return Splits(
        name=name, classes=classes,
        train_x=out["train"][0], train_y=out["train"][1],
        val_x=out["val"][0], val_y=out["val"][1],
        test_x=out["test"][0], test_y=out["test"][1],
    )

"""Record digests: is a site holding any of the coordinator's public or test records?

The coordinator evaluates on a public validation split (it also chooses the
decision rule and distils the student there) and reports a test split. If a
site trained on any of those records, "public" would not be public and the test
numbers would be on training data. So the coordinator publishes one digest per
public and test record (``fedtransfer federation init`` writes them next to the
federation file), and each site compares its own records with that list
locally, at admission. A site that holds any of them is not admitted: its
operator is told locally (how many, which files), and the coordinator sees only
a site that did not join, never a per-request answer.

A digest is computed on the record as decoded, at its native size, before any
resizing or scaling, so that a PNG exported from an ``.npz`` (or from any
array in [0, 1]) and the array itself agree: image values are quantised to the
8-bit levels an export writes, a colour image whose channels are equal counts as
grey; a table's row is its unscaled numeric design at 9 decimals. It detects
copies (the common case: a public split exported into a hospital's folder), not
near-duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

DIGEST_VERSION = 1


def record_digest(values: np.ndarray) -> str:
    """The digest of one record as decoded (see the module doc)."""
    v = np.asarray(values)
    if v.ndim == 3 and v.shape[-1] in (3, 4):
        v = v[..., :3]
        if np.array_equal(v[..., 0], v[..., 1]) and np.array_equal(v[..., 0], v[..., 2]):
            v = v[..., 0]
    if v.ndim >= 2:  # an image in [0, 1]
        q = np.round(np.asarray(v, np.float64) * 255).astype(np.uint8)
        kind = "image"
    else:  # a table's row (NaN: a missing cell)
        q = np.round(np.asarray(v, np.float64), 9)
        q = np.where(np.isnan(q), np.inf, q)
        kind = "row"
    h = hashlib.sha256(f"{kind}|{q.dtype.str}|{q.shape}|".encode())
    h.update(np.ascontiguousarray(q).tobytes())
    return h.hexdigest()


def record_digests(records: Iterable[np.ndarray]) -> list[str]:
    return [record_digest(r) for r in records]


def write_public_hashes(path: str | Path, splits: dict[str, np.ndarray], *, source: str) -> Path:
    """Write the digests of the coordinator's public records (``{"val": x, "test": x}``)."""
    path = Path(path)
    doc = {"version": DIGEST_VERSION, "source": source,
           "splits": {name: sorted(set(record_digests(x))) for name, x in splits.items()}}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def read_public_hashes(path: str | Path) -> tuple[frozenset[str], str]:
    """``(digests, sha256 of the file)``: what a site checks its records against, and
    the hash it reports having checked against (the coordinator's run records say so).

    Raises:
        ValueError: unreadable, or not a digest list of this version.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
        digests = frozenset(d for ds in doc["splits"].values() for d in ds)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"public record hashes {path}: {exc}") from exc
    if doc.get("version") != DIGEST_VERSION:
        raise ValueError(f"public record hashes {path}: version {doc.get('version')!r}, this "
                         f"site reads version {DIGEST_VERSION}")
    return digests, hashlib.sha256(raw).hexdigest()

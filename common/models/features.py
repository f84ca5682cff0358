"""On-disk feature cache, keyed by a fingerprint of backbone and data.

The backbone is frozen, so a site's features depend only on the backbone's
weights and preprocessing and on the images. They are computed once and read
back in every later round; the backbone is never loaded on a cache hit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.models.backbones import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedFeatures:
    features: np.ndarray
    hit: bool
    seconds: float
    path: Path


def cache_key(backbone: Backbone, data_fingerprint: str) -> str:
    return hashlib.sha256(f"{backbone.fingerprint}|{data_fingerprint}".encode()).hexdigest()[:32]


def cached_features(backbone: Backbone, images: np.ndarray, *, data_fingerprint: str,
                    cache_dir: str | Path, device: str = "cpu", progress: bool = False
                    ) -> CachedFeatures:
    """Return features for ``images``, computing and storing them on a miss.

    The write is atomic (temporary file, then rename), so concurrent sites or a
    crash never leave a half-written cache entry behind.
    """
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{cache_key(backbone, data_fingerprint)}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
            if len(feats) == len(images):
                return CachedFeatures(feats, True, time.perf_counter() - t0, path)
            log.warning("feature cache %s has %d rows, expected %d; recomputing",
                        path, len(feats), len(images))
        except Exception as exc:  # noqa: BLE001 - a corrupt cache entry is recomputed
            log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    feats = backbone.extract(images, device=device, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"features": np.ascontiguousarray(feats)}, tmp,
                  metadata={"backbone": backbone.name, "data": data_fingerprint})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return CachedFeatures(feats, False, time.perf_counter() - t0, path)

"""Shared test setup: every tool writes its caches under a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="fedtransfer-tests-"))
for var, sub in (("MPLCONFIGDIR", "mpl"), ("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg"),
                 ("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray")):
    os.environ[var] = str(_TMP / sub)
    (_TMP / sub).mkdir(parents=True, exist_ok=True)
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def pneumonia_npz() -> Path:
    path = SHARED_DATA / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    return path

"""The σ calibration search, remembered on the site's own disk between ClientApp processes.

Under ``flower-supernode`` every round is a fresh process, so the in-process
memo in :func:`common.privacy.accounting.calibrate_noise_multiplier` never hits, and the
site re-ran its ~30-evaluation PRV search every round (about 4 s here). The
answer is a pure function of its inputs (cap, δ, q, steps, and the compressed
prior history), so it is stored under the site's cache directory keyed by a
hash of exactly those inputs, with the inputs alongside to be checked on read.

A wrong or tampered file cannot pass the cap: the site still projects ε from
its ledger plus the planned mechanism before training, and declines if that
would exceed the cap. The memo only saves the search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.privacy.accounting import (
    LEDGER_ACCOUNTANT,
    Mechanism,
    calibrate_noise_multiplier,
    compress,
)

log = logging.getLogger(__name__)


def calibrated_sigma(cache_dir: str | Path, *, target_epsilon: float, delta: float,
                     sample_rate: float, steps: int, prior: Sequence[Mechanism] = ()) -> float:
    """:func:`common.privacy.accounting.calibrate_noise_multiplier`, memoised under ``cache_dir``."""
    key = {"target_epsilon": float(target_epsilon), "delta": float(delta),
           "sample_rate": float(sample_rate), "steps": int(steps), "accountant": LEDGER_ACCOUNTANT,
           "prior": [list(m.as_tuple()) for m in compress(prior)]}
    text = json.dumps(key, sort_keys=True)
    path = Path(cache_dir) / "calibration" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and float(stored["sigma"]) > 0:
            return float(stored["sigma"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                       sample_rate=sample_rate, steps=steps, prior=prior)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sigma": sigma}))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache costs time, not correctness
        log.warning("could not store the calibration memo at %s: %s", path, exc)
    return sigma

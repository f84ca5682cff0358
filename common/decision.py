"""How class probabilities become a predicted class: the shipped decision rule.

A decision rule is chosen by the server on its public validation split after
the last round (post-processing: no ε), written into the model card, and
applied by every consumer of the delivered model (``predict``, the reports).

The card's ``decision`` block is one of:

* ``{"rule": "argmax"}``: the class of highest probability;
* ``{"rule": "threshold", "positive_class": 1, "threshold": t}`` (two classes
  only): the positive class when its probability is ``>= t``, else the other;
* ``{"rule": "prior-shift", "log_weights": [w_0, ..., w_{K-1}]}``: the class
  maximising ``log p_k + w_k`` (a prior correction for more than two classes).

Every block may also carry ``"chosen_on"`` (what data chose it) and
``"objective"`` (what it maximised); they are descriptive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

RULES = ("argmax", "threshold", "prior-shift")
ARGMAX = {"rule": "argmax"}


def check_decision(decision: Mapping, num_classes: int) -> dict:
    """The decision block, validated for ``num_classes``; ``ValueError`` naming
    the field and what is allowed."""
    if not isinstance(decision, Mapping):
        raise ValueError(f"decision must be a mapping with a 'rule' ({', '.join(RULES)}), "
                         f"got {decision!r}")
    rule = decision.get("rule")
    if rule not in RULES:
        raise ValueError(f"decision rule {rule!r} unknown; allowed: {', '.join(RULES)}")
    if rule == "threshold":
        if num_classes != 2:
            raise ValueError(f"decision rule 'threshold' needs two classes, the model has "
                             f"{num_classes}")
        t = decision.get("threshold")
        pos = decision.get("positive_class", 1)
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            raise ValueError(f"decision threshold must be a number in [0, 1], got {t!r}")
        if pos not in (0, 1):
            raise ValueError(f"decision positive_class must be 0 or 1, got {pos!r}")
    if rule == "prior-shift":
        w = decision.get("log_weights")
        if (not isinstance(w, (list, tuple)) or len(w) != num_classes
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in w)):
            raise ValueError(f"decision log_weights must be {num_classes} finite numbers, "
                             f"got {w!r}")
    return dict(decision)


def apply_decision(probs: np.ndarray, decision: Mapping | None = None) -> np.ndarray:
    """Predicted class indices for ``probs`` (N, K) under ``decision`` (argmax if None)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (N, K), got shape {probs.shape}")
    decision = check_decision(decision or ARGMAX, probs.shape[1])
    if decision["rule"] == "threshold":
        pos = int(decision.get("positive_class", 1))
        hit = probs[:, pos] >= float(decision["threshold"])
        return np.where(hit, pos, 1 - pos).astype(np.int64)
    if decision["rule"] == "prior-shift":
        w = np.asarray(decision["log_weights"], dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.argmax(np.log(probs) + w, axis=1).astype(np.int64)
    return np.argmax(probs, axis=1).astype(np.int64)

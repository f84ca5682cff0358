"""Classification metrics from scikit-learn (accuracy, balanced accuracy, ROC AUC).

Accuracy and balanced accuracy depend on how probabilities become a class: the
decision rule (:mod:`common.models.decision`). AUC and log loss do not.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    log_loss,
    roc_auc_score,
)

from common.models.decision import apply_decision


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           decision: dict | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (one-vs-rest macro for K>2), log loss.

    Accuracy and balanced accuracy are at ``decision`` (argmax when None).
    AUC is NaN when only one class is present in ``labels``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = np.asarray(labels)
    k = probs.shape[1]
    pred = apply_decision(probs, decision)
    with warnings.catch_warnings():
        # A site's holdout may lack classes the head predicts; that is expected.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # A one-class test split (one hospital's): balanced accuracy is then recall on that
        # class, which is what we report; scikit-learn's notice says nothing to the user.
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true'")
        bal = float(balanced_accuracy_score(labels, pred))
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": bal,
        "loss": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=list(range(k)))),
    }
    present = np.unique(labels)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif k == 2:
        out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        p = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
        out["auc"] = float(roc_auc_score(labels, p, multi_class="ovr", labels=present)) \
            if len(present) > 2 else float(roc_auc_score(labels == present[1], p[:, 1]))
    return out


def metrics_at_rule(probs: np.ndarray, labels: np.ndarray, decision: dict) -> dict:
    """:func:`classification_metrics` at ``decision``, with the argmax accuracy and
    balanced accuracy beside them under ``"argmax"``."""
    out = classification_metrics(probs, labels, decision)
    at_argmax = classification_metrics(probs, labels)
    out["argmax"] = {m: at_argmax[m] for m in ("accuracy", "balanced_accuracy")}
    return out

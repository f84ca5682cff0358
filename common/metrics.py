"""Classification metrics from scikit-learn (accuracy, balanced accuracy, ROC AUC)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (one-vs-rest macro for K>2), log loss.

    AUC is NaN when only one class is present in ``labels``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
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

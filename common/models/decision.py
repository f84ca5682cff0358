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

Every block may also carry ``"chosen_on"`` (what data chose it),
``"objective"`` (what it maximised), ``"val"`` (the objective's split scored
at the rule), ``"val_argmax"`` (the same split at argmax) and ``"reason"``
(why argmax was kept); they are descriptive.

In a delivered card, ``card["decision"]`` is the global head's rule and
``card["student"]["decision"]`` the distilled student's own rule (chosen on
the part of the public validation split the student was not fitted to).

:func:`choose_decision` picks a rule from validation probabilities: a
threshold for two classes, a prior shift for more.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

RULES = ("argmax", "threshold", "prior-shift")
ARGMAX = {"rule": "argmax"}
OBJECTIVES = ("balanced_accuracy", "accuracy")
# Prior-shift search: the steps tried on each class's log weight, and at most
# this many passes over the classes (each pass must strictly improve the objective).
PRIOR_SHIFT_STEPS = (-2.0, -1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0, 2.0)
PRIOR_SHIFT_PASSES = 10


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


def describe_decision(decision: Mapping | None, classes: list[str] | None = None) -> str:
    """A short phrase for logs and summaries, e.g. ``threshold 0.62 on p(pneumonia)``."""
    decision = decision or ARGMAX
    rule = decision.get("rule")
    if rule == "threshold":
        pos = int(decision.get("positive_class", 1))
        name = classes[pos] if classes and pos < len(classes) else f"class {pos}"
        return f"threshold {float(decision['threshold']):.3f} on p({name})"
    if rule == "prior-shift":
        return "prior shift [" + ", ".join(f"{w:+.2f}" for w in decision["log_weights"]) + "]"
    return "argmax"


def explain_decision(decision: Mapping | None, classes: list[str]) -> str:
    """One line for the user of `predict` saying how a predicted class is chosen
    (the terse form for logs is :func:`describe_decision`)."""
    if decision is None:
        return "argmax (the card has no decision rule)"
    rule = decision["rule"]
    if rule == "threshold":
        pos = int(decision.get("positive_class", 1))
        text = (f"threshold: {classes[pos]} when p({classes[pos]}) >= "
                f"{float(decision['threshold']):g}, else {classes[1 - pos]}")
    elif rule == "prior-shift":
        text = ("prior-shift: argmax of log p + w, w = "
                + ", ".join(f"{c} {w:+.3g}" for c, w in zip(classes, decision["log_weights"],
                                                              strict=True)))
    else:
        text = "argmax"
    extra = [f"{k.replace('_', ' ')} {decision[k]}" for k in ("chosen_on", "objective")
             if decision.get(k) is not None]
    return text + (f" ({'; '.join(extra)})" if extra else "")


def choose_decision(probs_val: np.ndarray, y_val: np.ndarray, *,
                    objective: str = "balanced_accuracy",
                    chosen_on: str = "validation split") -> dict:
    """The decision rule that maximises ``objective`` on ``(probs_val, y_val)``.

    * Two classes: a threshold on p(class 1). The candidates are the midpoints
      between consecutive distinct validation probabilities, and 0.5 (argmax);
      among equally good ones the threshold closest to 0.5 wins.
    * More than two classes: a prior shift. Log weights start at
      ``-log`` of the validation class frequencies (or at zero, argmax, when
      that scores higher) and a coordinate search adds each step of
      :data:`PRIOR_SHIFT_STEPS` to one class at a time, keeping a change only
      when it strictly improves the objective. Deterministic.
    * Fewer than two classes in ``y_val``, or no records: argmax, with the
      ``reason`` in the block.

    Choosing on a public split is post-processing of the model: it costs no ε.

    Returns:
        The decision block (:func:`check_decision`), with ``chosen_on``,
        ``objective``, ``val`` (accuracy and balanced accuracy on the split at
        the rule) and ``val_argmax`` (the same at argmax).

    Raises:
        ValueError: an unknown objective, probabilities not shaped (N, K) with
            K >= 2, or labels that do not match them.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"decision objective {objective!r} unknown; allowed: "
                         f"{', '.join(OBJECTIVES)}")
    probs = np.asarray(probs_val, dtype=np.float64)
    y = np.asarray(y_val).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"validation probabilities must be (N, K) with K >= 2, got shape "
                         f"{probs.shape}")
    k = probs.shape[1]
    if len(y) != len(probs):
        raise ValueError(f"{len(probs)} validation probabilities but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"validation labels must be class indices in [0, {k - 1}], got "
                         f"{sorted(set(y.tolist()) - set(range(k)))}")
    meta = {"chosen_on": chosen_on, "objective": objective}
    present = np.unique(y)
    if len(present) < 2:
        reason = ("the validation split is empty" if not len(y) else
                  f"the validation split has a single class ({int(present[0])})")
        block = {**ARGMAX, **meta, "reason": f"{reason}: no rule can be chosen, argmax kept"}
    elif k == 2:
        block = {"rule": "threshold", "positive_class": 1,
                 "threshold": _best_threshold(probs[:, 1], y, objective), **meta}
    else:
        block = {"rule": "prior-shift",
                 "log_weights": _best_log_weights(probs, y, objective), **meta}
    if len(y):
        block["val"] = _scores(y, apply_decision(probs, block))
        block["val_argmax"] = _scores(y, apply_decision(probs, ARGMAX))
    return check_decision(block, k)


def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (scikit-learn) of ``pred``."""
    # scikit-learn takes about a second to import: only when a rule is chosen.
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    with warnings.catch_warnings():
        # A rule may predict a class the split lacks; balanced accuracy averages
        # over the classes present, which is what is wanted.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return {"accuracy": float(accuracy_score(y, pred)),
                "balanced_accuracy": float(balanced_accuracy_score(y, pred))}


def _best_threshold(p1: np.ndarray, y: np.ndarray, objective: str) -> float:
    """The threshold on ``p1`` maximising ``objective``; ties: closest to 0.5."""
    from sklearn.metrics import roc_curve  # heavy import, see _scores

    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    # roc_curve's thresholds are the distinct scores, descending (after a leading
    # +inf): predicting 1 at p >= u_i is the same as at the midpoint below u_i.
    fpr, tpr, cuts = roc_curve(y, p1, pos_label=1, drop_intermediate=False)
    u = cuts[1:]  # distinct probabilities, descending
    tp = np.rint(tpr[1:] * pos).astype(np.int64)
    fp = np.rint(fpr[1:] * neg).astype(np.int64)
    thresholds = np.append((u[:-1] + u[1:]) / 2, 0.5)
    tp, fp = tp[:-1], fp[:-1]  # the lowest score has no midpoint below it
    at_half = p1 >= 0.5
    tp = np.append(tp, int((at_half & (y == 1)).sum()))
    fp = np.append(fp, int((at_half & (y == 0)).sum()))
    tn = neg - fp
    # Integer scores, so that ties are exact: balanced accuracy is
    # (tp / pos + tn / neg) / 2, i.e. (tp * neg + tn * pos) / (2 * pos * neg).
    score = tp * neg + tn * pos if objective == "balanced_accuracy" else tp + tn
    best = np.flatnonzero(score == score.max())
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Balanced accuracy over the classes present in ``y`` (as scikit-learn's),
    in numpy: the prior-shift search scores thousands of candidates."""
    counts = np.bincount(y, minlength=k)
    hits = np.bincount(y[pred == y], minlength=k)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def _best_log_weights(probs: np.ndarray, y: np.ndarray, objective: str) -> list[float]:
    k = probs.shape[1]
    with np.errstate(divide="ignore"):
        logp = np.log(probs)

    def score(w: np.ndarray) -> float:
        pred = np.argmax(logp + w, axis=1)
        return (_balanced_accuracy(y, pred, k) if objective == "balanced_accuracy"
                else float(np.mean(pred == y)))

    # A class absent from the split counts once, so that its start is finite.
    freq = np.maximum(np.bincount(y, minlength=k), 1) / len(y)
    prior, zero = -np.log(freq), np.zeros(k)
    w = prior if score(prior) >= score(zero) else zero
    best = score(w)
    for _ in range(PRIOR_SHIFT_PASSES):
        improved = False
        for c in range(k):
            for step in PRIOR_SHIFT_STEPS:
                trial = w.copy()
                trial[c] += step
                s = score(trial)
                if s > best:
                    w, best, improved = trial, s, True
        if not improved:
            break
    w = w - w.mean()  # argmax is unchanged by a common shift; centre for the reader
    return [round(float(v), 6) for v in w]

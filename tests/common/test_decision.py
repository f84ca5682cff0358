"""The decision rule: chosen on a validation split, applied to any probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from common.models.decision import (
    ARGMAX,
    _balanced_accuracy,
    apply_decision,
    check_decision,
    choose_decision,
    describe_decision,
)
from common.models.metrics import classification_metrics, metrics_at_rule


def _binary(p1) -> np.ndarray:
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


# -- two classes: a threshold on p(class 1) ----------------------------------
def test_threshold_separating_the_classes():
    # Negatives at 0.1, 0.2; positives at 0.3, 0.4, 0.6, 0.7. Argmax calls 0.3 and
    # 0.4 negative (balanced accuracy 0.75); the midpoint 0.25 separates them all.
    d = choose_decision(_binary([0.1, 0.2, 0.3, 0.4, 0.6, 0.7]), np.array([0, 0, 1, 1, 1, 1]))
    assert d["rule"] == "threshold" and d["positive_class"] == 1
    assert d["threshold"] == pytest.approx(0.25)
    assert d["val"] == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    assert d["val_argmax"] == {"accuracy": pytest.approx(4 / 6), "balanced_accuracy": 0.75}
    assert d["objective"] == "balanced_accuracy" and d["chosen_on"] == "validation split"


def test_threshold_maximises_the_objective():
    # Positives at 0.4 and 0.8, negatives at 0.1, 0.2, 0.3, 0.6, 0.7.
    # t = 0.35: TPR 2/2, TNR 3/5 -> balanced 0.8 (the best), accuracy 5/7.
    # t = 0.75: TPR 1/2, TNR 5/5 -> balanced 0.75, accuracy 6/7 (the best).
    p = _binary([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 0, 1, 0, 0, 1])
    d = choose_decision(p, y)
    assert d["threshold"] == pytest.approx(0.35)
    assert d["val"]["balanced_accuracy"] == pytest.approx(0.8)
    a = choose_decision(p, y, objective="accuracy")
    assert a["threshold"] == pytest.approx(0.75) and a["objective"] == "accuracy"
    assert a["val"]["accuracy"] == pytest.approx(6 / 7)


def test_ties_go_to_the_threshold_closest_to_one_half():
    # t = 0.2: TPR 1, TNR 1/2 -> 0.75; t = 0.475 and 0.5: 0.5; t = 0.775: TPR 1/2, TNR 1 -> 0.75.
    d = choose_decision(_binary([0.1, 0.3, 0.65, 0.9]), np.array([0, 1, 0, 1]))
    assert d["threshold"] == pytest.approx(0.775)
    # Perfect at 0.5 and at every midpoint between 0.3 and 0.9: 0.5 wins.
    d = choose_decision(_binary([0.1, 0.3, 0.9]), np.array([0, 0, 1]))
    assert d["threshold"] == 0.5


def test_a_single_class_or_no_records_keeps_argmax_and_says_why():
    d = choose_decision(_binary([0.2, 0.7]), np.array([1, 1]))
    assert d["rule"] == "argmax" and "single class (1)" in d["reason"]
    assert d["val"] == {"accuracy": 0.5, "balanced_accuracy": 0.5}
    d = choose_decision(np.zeros((0, 2)), np.zeros(0, dtype=int))
    assert d["rule"] == "argmax" and "empty" in d["reason"] and "val" not in d


@pytest.mark.parametrize("kwargs, words", [
    (dict(objective="f1"), "objective 'f1' unknown; allowed: balanced_accuracy, accuracy"),
    (dict(probs_val=np.ones((3, 1)), y_val=np.zeros(3)), r"\(N, K\) with K >= 2"),
    (dict(y_val=np.array([0, 1])), "3 validation probabilities but 2 labels"),
    (dict(y_val=np.array([0, 1, 2])), r"class indices in \[0, 1\]"),
])
def test_bad_inputs_are_named(kwargs, words):
    args = {"probs_val": _binary([0.1, 0.5, 0.9]), "y_val": np.array([0, 1, 1]), **kwargs}
    objective = args.pop("objective", "balanced_accuracy")
    with pytest.raises(ValueError, match=words):
        choose_decision(args["probs_val"], args["y_val"], objective=objective)


# -- more than two classes: a prior shift --------------------------------------
def test_prior_shift_recovers_rare_classes_argmax_never_predicts():
    # Class 0 (6 records) at [.8 .1 .1]; classes 1 and 2 (2 each) lean towards their
    # class but class 0 still has the highest probability: argmax predicts 0 always.
    # Starting from -log(frequency) = (0.51, 1.61, 1.61), log p + w already gets
    # every record right (e.g. class 1: log .5 + .51 = -0.18 < log .4 + 1.61 = 0.69).
    probs = np.array([[.8, .1, .1]] * 6 + [[.5, .4, .1]] * 2 + [[.5, .1, .4]] * 2)
    y = np.array([0] * 6 + [1] * 2 + [2] * 2)
    d = choose_decision(probs, y)
    assert d["rule"] == "prior-shift" and len(d["log_weights"]) == 3
    assert d["val_argmax"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert d["val"] == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    assert (apply_decision(probs, d) == y).all()
    assert sum(d["log_weights"]) == pytest.approx(0.0, abs=1e-5)  # centred
    check_decision(d, 3)


def test_choosing_is_deterministic_and_never_worse_than_argmax_on_val():
    rng = np.random.default_rng(7)
    for k in (2, 4):
        y = rng.choice(k, 300, p=np.linspace(3, 1, k) / np.linspace(3, 1, k).sum())
        logits = rng.normal(size=(300, k)) + 1.2 * np.eye(k)[y] + np.linspace(1, 0, k)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        d = choose_decision(probs, y)
        assert d == choose_decision(probs, y)
        assert d["val"]["balanced_accuracy"] >= d["val_argmax"]["balanced_accuracy"]
        pred = apply_decision(probs, d)
        assert d["val"]["balanced_accuracy"] == balanced_accuracy_score(y, pred)
        assert d["val"]["accuracy"] == accuracy_score(y, pred)
        assert _balanced_accuracy(y, pred, k) == pytest.approx(balanced_accuracy_score(y, pred))


# -- using the rule -------------------------------------------------------------
def test_metrics_at_the_rule_keep_argmax_beside_them():
    p, y = _binary([0.1, 0.2, 0.3, 0.4, 0.6, 0.7]), np.array([0, 0, 1, 1, 1, 1])
    rule = {"rule": "threshold", "positive_class": 1, "threshold": 0.25}
    m = metrics_at_rule(p, y, rule)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0
    assert m["argmax"] == {"accuracy": pytest.approx(4 / 6), "balanced_accuracy": 0.75}
    # AUC and log loss do not depend on the rule.
    plain = classification_metrics(p, y)
    assert (m["auc"], m["loss"]) == (plain["auc"], plain["loss"])
    assert classification_metrics(p, y, ARGMAX) == plain


def test_describe():
    assert describe_decision(None) == "argmax"
    rule = {"rule": "threshold", "positive_class": 1, "threshold": 0.6234}
    assert describe_decision(rule, ["normal", "pneumonia"]) == "threshold 0.623 on p(pneumonia)"
    assert describe_decision({"rule": "prior-shift", "log_weights": [0.5, -0.5]}) == \
        "prior shift [+0.50, -0.50]"

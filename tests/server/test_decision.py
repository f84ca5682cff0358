"""The server chooses the shipped decision rule on its public validation split,
reports test metrics at that rule beside argmax, and ships it in the card; with
``class-weights = "public"`` it sends weights from the public split's counts.

The round loop (``run_server``) runs against an in-process grid that hands each
message to the real ClientApp, on a small imbalanced two-class dataset (scikit-
learn digits: "0-2" against "3-9", about 70 % positive, as in PneumoniaMNIST).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from safetensors.numpy import load_file

from common import protocol
from common.config import RunConfig
from common.data.datasets import load_dataset
from common.models import training
from common.models.decision import apply_decision, check_decision, choose_decision
from common.models.modelio import read_card
from server.evaluation import GlobalEval
from server.run import run_server
from tests.inprocess import InProcessGrid


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> str:
    s = load_dataset("digits", seed=0)
    path = tmp_path_factory.mktemp("data") / "threes.npz"

    def pack(x, y):
        return (x * 255).round().astype(np.uint8), (y >= 3).astype(np.int64).reshape(-1, 1)

    arrays = {}
    for split in ("train", "val", "test"):
        x, y = pack(getattr(s, f"{split}_x"), getattr(s, f"{split}_y"))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(path, **arrays)
    return f"medmnist:{path}"


def _cfg(tmp_path, dataset: str, **kw) -> RunConfig:
    base = dict(dataset=dataset, num_sites=3, min_sites=2, num_rounds=2, backbone="identity",
                partitioner="iid", batch_size=32, local_epochs=1, learning_rate=1.0,
                noise_multiplier=1.0, target_epsilon=20.0, distill=False,
                out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                ledger_dir=str(tmp_path / "sites"))
    return RunConfig(**{**base, **kw})


def test_the_shipped_rule_is_chosen_on_val_reported_and_delivered(tmp_path, imbalanced,
                                                                   caplog):
    cfg = _cfg(tmp_path, imbalanced, class_weights="public", distill=True, student="mlp",
               student_width=16, distill_epochs=3, distill_augment=0)
    grid, sent = _recording_grid(cfg)
    with caplog.at_level(logging.INFO, logger="server"):  # the module loggers are server.*
        s = run_server(cfg, grid, run_id="1")
    ev = GlobalEval(cfg)
    final = s["final"]

    # The rule: a threshold chosen on the public val split, never on test.
    rule = final["decision"]
    assert rule["rule"] == "threshold" and rule["objective"] == "balanced_accuracy"
    assert "public validation split" in rule["chosen_on"]
    head = ev.head(read_head(tmp_path / "run"))
    p_val = training.predict_proba(head, ev.val_x)
    assert rule["threshold"] == pytest.approx(
        choose_decision(p_val, ev.val_y)["threshold"])  # re-chosen from val alone: the same
    # Test metrics at that rule, argmax beside them, AUC unchanged by the rule.
    p_test = training.predict_proba(head, ev.test_x)
    pred = apply_decision(p_test, rule)
    assert final["accuracy"] == pytest.approx(float(np.mean(pred == ev.test_y)))
    argmax = ev.metrics(read_head(tmp_path / "run"))["test"]
    assert final["argmax"] == {"accuracy": pytest.approx(argmax["accuracy"]),
                               "balanced_accuracy": pytest.approx(argmax["balanced_accuracy"])}
    assert final["auc"] == pytest.approx(argmax["auc"])
    assert final["val"]["balanced_accuracy"] >= final["val"]["argmax"]["balanced_accuracy"]
    # Every round line and record carries the rule of that round.
    assert all("decision" in r and "argmax" in r["test"] for r in s["rounds"])
    assert any("chosen on val; argmax acc" in m for m in caplog.messages)
    assert "no ε" in s["privacy"]["decision"]

    # Class weights: balanced weights from the public val counts, sent to every site.
    weights = s["class_weights"]["weights"]
    n, n1 = len(ev.val_y), int(ev.val_y.sum())
    assert weights == pytest.approx([n / (2 * (n - n1)), n / (2 * n1)])
    assert len(sent) == 6 and all(
        protocol.parse_request(c, "1").class_weights == tuple(weights) for c in sent)
    assert "ε are unchanged" in s["privacy"]["class_weights"]
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3]

    # The card ships the head's rule, and the student's own (chosen on its held-out
    # part of the public val split).
    card = read_card(tmp_path / "run" / "models" / "card.json")
    assert card["decision"] == rule and check_decision(card["decision"], 2)
    assert card["head"]["test"]["accuracy"] == final["accuracy"]
    assert card["head"]["test"]["argmax"] == final["argmax"]
    student = card["student"]["decision"]
    assert student["rule"] in ("threshold", "argmax") and "distillation-validation" in \
        student["chosen_on"]
    assert card["student"]["test"]["argmax"]["accuracy"] == s["student"]["argmax"]["accuracy"]
    assert s["student"]["decision"] == student


def test_without_class_weights_nothing_is_sent(tmp_path, imbalanced):
    cfg = _cfg(tmp_path, imbalanced, num_rounds=1)
    grid, sent = _recording_grid(cfg)
    s = run_server(cfg, grid, run_id="1")
    assert sent and all("class-weights" not in c for c in sent)
    assert s["class_weights"] == {"mode": "none", "weights": None}
    assert "class_weights" not in s["privacy"]


def _recording_grid(cfg: RunConfig) -> tuple[InProcessGrid, list[dict]]:
    """The in-process grid, keeping the config of every train message the server sent."""
    grid = InProcessGrid(cfg, 1)
    sent, call = [], grid._call

    def record(msg):
        if msg.metadata.message_type == "train":
            sent.append(dict(msg.content.config_records["config"]))
        return call(msg)

    grid._call = record
    return grid, sent


def read_head(run) -> dict[str, np.ndarray]:
    return load_file(str(run / "head.safetensors"))


@pytest.mark.parametrize("objective", ["accuracy", "argmax"])
def test_the_decision_objective_is_the_users_choice(tmp_path, imbalanced, objective):
    """``decision-objective``: the threshold maximises val accuracy, or no threshold ships."""
    cfg = _cfg(tmp_path, imbalanced, decision_objective=objective)
    from common.models.heads import head_state

    ev = GlobalEval(cfg)
    arrays = head_state(ev.head())
    report = ev.report(arrays)
    if objective == "argmax":
        assert report["decision"]["rule"] == "argmax"
        assert report["test"]["accuracy"] == report["test"]["argmax"]["accuracy"]
    else:
        p_val = training.predict_proba(ev.head(arrays), ev.val_x)
        assert report["decision"] == choose_decision(
            p_val, ev.val_y, objective="accuracy", chosen_on=report["decision"]["chosen_on"])
        # The rule maximises val accuracy: never below argmax's on val.
        assert report["val"]["accuracy"] >= report["val"]["argmax"]["accuracy"]

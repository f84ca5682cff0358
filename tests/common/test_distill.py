"""Distillation maths: KD loss by hand, the student registry, the public
transfer set (structurally apart from site data), teacher choice, and a
distillation loop that really transfers a teacher's function."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.config import parse_config
from common.models import distill as kd
from common.models import students


# -- KD loss -----------------------------------------------------------------
def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_kd_loss_matches_a_hand_computation():
    s, t, temp = [2.0, 0.0, -1.0], [0.0, 1.0, 0.5], 2.0
    p_t = _softmax([x / temp for x in t])
    p_s = _softmax([x / temp for x in s])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
    got = kd.kd_loss(torch.tensor([s]), torch.tensor([t]), temp)
    assert float(got) == pytest.approx(temp ** 2 * kl, rel=1e-6)


def test_kd_loss_is_a_batch_mean_and_zero_at_agreement():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    one = float(kd.kd_loss(a[:1], b[:1], 1.0))
    assert float(kd.kd_loss(a, b, 1.0)) == pytest.approx(one / 2)  # second row contributes 0
    assert float(kd.kd_loss(a, a, 3.0)) == pytest.approx(0.0, abs=1e-5)  # float32 rounding, x T²


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_kd_loss_rejects_bad_temperature(temp):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd.kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temp)


def test_kd_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        kd.kd_loss(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)


# -- student registry ----------------------------------------------------------
def test_cnn_student_is_compact_and_runs_on_raw_images():
    spec = students.student_spec_for("cnn", np.zeros((4, 28, 28), np.float32), 2, width=32, depth=3)
    assert spec.input_shape == (1, 28, 28)
    student = students.make_student(spec)
    assert 50_000 <= students.num_parameters(student) <= 500_000
    assert student(torch.rand(5, 1, 28, 28)).shape == (5, 2)
    rgb = students.student_spec_for("cnn", np.zeros((4, 32, 32, 3), np.float32), 3, width=16, depth=2)
    assert rgb.input_shape == (3, 32, 32)
    assert students.make_student(rgb)(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_width_and_depth_change_the_student():
    small = students.make_student(students.StudentSpec("cnn", (1, 28, 28), 2, width=16, depth=2))
    big = students.make_student(students.StudentSpec("cnn", (1, 28, 28), 2, width=32, depth=4))
    assert students.num_parameters(small) < students.num_parameters(big)


def test_mlp_student_for_flat_inputs():
    spec = students.student_spec_for("mlp", np.zeros((4, 20), np.float32), 3, width=16, depth=2)
    assert spec.input_shape == (20,)
    assert students.make_student(spec)(torch.rand(6, 20)).shape == (6, 3)


def test_student_weights_are_seeded():
    spec = students.StudentSpec("cnn", (1, 8, 8), 2)
    a, b = students.make_student(spec, seed=3), students.make_student(spec, seed=3)
    c = students.make_student(spec, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                  strict=True))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_student_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown student 'resnet'. Valid: cnn, mlp"):
        students.StudentSpec("resnet", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="Valid: cnn, mlp"):
        students.student_spec_for("vit", np.zeros((2, 8, 8)), 2, width=8, depth=2)
    with pytest.raises(ValueError, match="config key 'student'.*allowed: cnn, mlp"):
        parse_config({"student": "resnet"})


def test_cnn_on_flat_records_points_to_mlp():
    with pytest.raises(ValueError, match="use student 'mlp'"):
        students.student_spec_for("cnn", np.zeros((2, 10)), 2, width=8, depth=2)


def test_student_input_mismatches_are_named():
    spec = students.StudentSpec("cnn", (1, 8, 8), 2)
    with pytest.raises(ValueError, match="expects 1-channel images, got 3"):
        students.to_student_input(np.zeros((2, 8, 8, 3)), spec)
    with pytest.raises(ValueError, match="expects 8x8 images, got 9x9"):
        students.to_student_input(np.zeros((2, 9, 9)), spec)
    with pytest.raises(ValueError, match="expects 5 features per record, got 4"):
        students.to_student_input(np.zeros((2, 4)), students.StudentSpec("mlp", (5,), 2))


@pytest.mark.parametrize("key, value, words", [
    ("teacher", "oracle", "allowed: auto, global, ensemble"),
    ("student-width", 0, "must be >= 1"),
    ("student-depth", 7, "between 1 and 6"),
    ("distill-temperature", -1.0, "finite number > 0"),
    ("distill-val-fraction", 1.0, "in (0, 1)"),
    ("distill-augment", -1, "must be >= 0"),
])
def test_distill_config_is_validated(key, value, words):
    with pytest.raises(ValueError) as err:
        parse_config({key: value})
    assert f"'{key}'" in str(err.value) and words in str(err.value)


# -- the public transfer set -----------------------------------------------------
def test_split_public_is_a_disjoint_stratified_partition_without_labels():
    x = np.arange(40, dtype=np.float32).reshape(40, 1)
    y = np.array([0] * 30 + [1] * 10)
    transfer, val = kd.split_public(x, y, val_fraction=0.3, seed=0)
    assert [f for f in transfer.__dataclass_fields__] == ["images", "source"]  # no labels
    a, b = set(transfer.images[:, 0]), set(val.images[:, 0])
    assert not a & b and a | b == set(range(40))
    assert sorted(np.bincount(val.labels)) == [3, 9]  # 30% of each class
    again, _ = kd.split_public(x, y, val_fraction=0.3, seed=0)
    assert np.array_equal(again.images, transfer.images)
    assert np.concatenate(list(transfer.batches(7))).shape == transfer.images.shape


def test_augment_keeps_originals_and_range_and_is_seeded():
    x = np.random.default_rng(0).random((5, 12, 12), dtype=np.float32)
    out = kd.augment(x, copies=3, seed=1)
    assert out.shape == (20, 12, 12) and np.array_equal(out[:5], x)
    assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out[5:10], x)
    assert np.array_equal(out, kd.augment(x, copies=3, seed=1))
    assert kd.augment(x, copies=0, seed=1) is x


# -- teachers ----------------------------------------------------------------------
def test_ensemble_logits_average_the_heads():
    h1, h2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        h1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        h2.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -1.0]]))
    got = kd.ensemble_logits([h1, h2], np.array([[1.0, 2.0]], np.float32))
    assert np.allclose(got, [[2.0, 0.0]])  # ([1, 2] + [3, -2]) / 2


def test_auto_teacher_picks_the_better_on_validation():
    y = np.array([0, 0, 1, 1])
    good = np.array([[2, 0], [1, 0], [0, 1], [0, 2]], np.float32)
    bad = good[:, ::-1].copy()
    name, scores = kd.choose_teacher("auto", {"global": bad, "ensemble": good}, y)
    assert name == "ensemble" and scores["ensemble"]["auc"] == 1.0
    assert kd.choose_teacher("global", {"global": bad, "ensemble": good}, y)[0] == "global"
    with pytest.raises(ValueError, match="not available"):
        kd.choose_teacher("ensemble", {"global": bad}, y)


# -- the loop ------------------------------------------------------------------------
def test_distillation_transfers_the_teachers_function():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    pool, val = rng.normal(size=(600, 6)).astype(np.float32), rng.normal(size=(200, 6)).astype(np.float32)
    teacher = lambda x: 3.0 * x @ w  # noqa: E731 - a fixed linear teacher
    spec = students.StudentSpec("mlp", (6,), 3, width=8, depth=1)
    student = students.make_student(spec, seed=0)
    val_labels = teacher(val).argmax(1)
    before = (kd.student_logits(student, torch.from_numpy(val)).argmax(1) == val_labels).mean()
    res = kd.distill(student, torch.from_numpy(pool), teacher(pool), torch.from_numpy(val),
                     val_labels, epochs=40, patience=40, temperature=2.0, lr=1e-2, batch_size=64)
    after = (kd.student_logits(student, torch.from_numpy(val)).argmax(1) == val_labels).mean()
    assert after > 0.9 and after > before + 0.2
    assert res.best_epoch >= 1 and res.val["accuracy"] == pytest.approx(after)
    kds = [h["kd_loss"] for h in res.history]
    assert kds[-1] < kds[0] / 3


def test_early_stopping_stops_after_patience():
    rng = np.random.default_rng(1)
    pool = torch.from_numpy(rng.normal(size=(64, 4)).astype(np.float32))
    val = torch.from_numpy(rng.normal(size=(32, 4)).astype(np.float32))
    # Teacher logits unrelated to the validation labels: val loss soon stops improving.
    res = kd.distill(students.make_student(students.StudentSpec("mlp", (4,), 2, 4, 1)), pool,
                     rng.normal(size=(64, 2)).astype(np.float32) * 5, val,
                     rng.integers(0, 2, 32), epochs=200, patience=2, temperature=1.0, lr=0.05)
    assert res.epochs_run < 200 and res.epochs_run - res.best_epoch == 2


def test_cpu_timing_is_per_record():
    ms = kd.cpu_ms_per_image(lambda x: x * 2, torch.zeros(10, 3), batch_size=4, repeats=1)
    assert 0 < ms < 100
    with pytest.raises(ValueError, match="at least one record"):
        kd.cpu_ms_per_image(lambda x: x, torch.zeros(0, 3))

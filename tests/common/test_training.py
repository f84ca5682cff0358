"""Training steps on tiny synthetic features: determinism where it belongs,
and DP randomness that the server cannot re-derive from the run config."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from common.models import training
from common.models.heads import head_state, make_head
from common.privacy.accounting import dp_plan


def _data(n: int = 64, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).numpy()
    y = (x[:, 0] > 0).astype(np.int64)
    return x, y


def _dp_head(seed: int | None) -> dict[str, np.ndarray]:
    x, y = _data()
    head = make_head("linear", in_dim=5, num_classes=2, seed=0)
    res = training.train_dp(head, x, y, epochs=2, batch_size=16, lr=0.5,
                            noise_multiplier=1.0, clip_norm=1.0, seed=seed)
    q, steps = dp_plan(len(y), batch_size=16, epochs=2)
    # Opacus ran exactly the mechanism the site plans and charges for.
    assert [m.as_tuple() for m in res.mechanisms] == [(1.0, q, steps)]
    return head_state(head)


def test_dp_noise_is_not_derivable_from_the_config():
    a, b = _dp_head(seed=None), _dp_head(seed=None)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_dp_with_an_explicit_seed_is_repeatable():
    a, b = _dp_head(seed=7), _dp_head(seed=7)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_plain_training_is_deterministic_and_learns():
    x, y = _data()
    heads = []
    for _ in range(2):
        head = make_head("linear", in_dim=5, num_classes=2, seed=0)
        training.train_plain(head, x, y, epochs=20, batch_size=16, lr=0.5, seed=3)
        heads.append(head_state(head))
        assert training.evaluate(head, x, y)["accuracy"] > 0.9
    for k in heads[0]:
        np.testing.assert_array_equal(heads[0][k], heads[1][k])


def test_nan_features_are_rejected():
    x, y = _data()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        training.train_plain(make_head("linear", in_dim=5, num_classes=2), x, y, epochs=1,
                             batch_size=16, lr=0.1)


# -- class-weighted loss (config class-weights = "public") -------------------
def test_balanced_class_weights_by_hand():
    assert training.balanced_class_weights(np.array([0, 0, 0, 1]), 2) == \
        pytest.approx([4 / 6, 4 / 2])
    # A class absent from the split counts once: 4 / (3 * 1).
    assert training.balanced_class_weights(np.array([0, 0, 1, 1]), 3) == \
        pytest.approx([4 / 6, 4 / 6, 4 / 3])
    # 1001 / (2 * 1) = 500.5 is capped at the largest weight a site accepts.
    w = training.balanced_class_weights(np.array([0] * 1000 + [1]), 2)
    assert w[1] == training.MAX_CLASS_WEIGHT
    with pytest.raises(ValueError, match="split is empty"):
        training.balanced_class_weights(np.array([], dtype=int), 2)
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\]"):
        training.balanced_class_weights(np.array([0, 2]), 2)


def _grad_samples(criterion, x, y) -> torch.Tensor:
    """Opacus's per-sample gradients of a linear head's weight (what it clips)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 2)
    model = GradSampleModule(linear, loss_reduction="mean")
    with warnings.catch_warnings():  # the inputs need no gradient; Opacus's hooks say so
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        criterion(model(torch.as_tensor(x)), torch.as_tensor(y)).backward()
    return linear.weight.grad_sample.detach().clone()


def test_a_weighted_per_sample_gradient_depends_on_its_own_record_only():
    """Why the loss is the batch mean of weight * loss, not torch's weighted mean.

    The record's gradient, the one Opacus clips, must be a function of that
    record alone; then one record still moves the clipped sum by at most the
    clip norm, whatever the weights, and ε is unchanged."""
    x, y = _data(n=6)
    w = [1.0, 3.0]
    flipped = y.copy()
    flipped[5] = 1 - flipped[5]  # replace one record's label
    ours = training.WeightedCrossEntropy(w)
    a, b = _grad_samples(ours, x, y), _grad_samples(ours, x, flipped)
    torch.testing.assert_close(a[:5], b[:5], rtol=0, atol=0)
    # ... and it is the record's own weight times its unweighted gradient.
    plain = _grad_samples(torch.nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(a, plain * torch.tensor(w)[torch.as_tensor(y)][:, None, None])
    # torch's weighted mean divides by the batch's total weight: every other
    # record's gradient changes with record 5's label.
    theirs = torch.nn.CrossEntropyLoss(weight=torch.tensor(w))
    c, d = _grad_samples(theirs, x, y), _grad_samples(theirs, x, flipped)
    assert not torch.allclose(c[:5], d[:5])


@pytest.mark.parametrize("head_name", ["linear", "mlp"])  # Opacus hooks / ghost clipping
def test_dp_training_with_class_weights_runs_the_same_mechanism(head_name):
    x, y = _data()
    head = make_head(head_name, in_dim=5, num_classes=2, hidden_dim=8, seed=0)
    res = training.train_dp(head, x, y, epochs=2, batch_size=16, lr=0.5, noise_multiplier=1.0,
                            clip_norm=1.0, seed=3, class_weights=[0.5, 2.0])
    q, steps = dp_plan(len(y), batch_size=16, epochs=2)
    assert [m.as_tuple() for m in res.mechanisms] == [(1.0, q, steps)]
    assert res.grad_sample_mode == ("hooks" if head_name == "linear" else "ghost")
    assert all(np.isfinite(v).all() for v in head_state(head).values())


def test_class_weights_move_predictions_towards_the_weighted_class():
    x, _ = _data(n=200)
    y = (x[:, 0] > 1.0).astype(np.int64)  # about 16 % positives
    p1 = {}
    for w in (None, [0.6, 3.0]):
        head = make_head("linear", in_dim=5, num_classes=2, seed=0)
        training.train_plain(head, x, y, epochs=20, batch_size=32, lr=0.5, seed=3,
                             class_weights=w)
        p1[w is None] = training.predict_proba(head, x)[:, 1].mean()
    assert p1[False] > p1[True] + 0.05

"""Training steps on tiny synthetic features: determinism where it belongs,
and DP randomness that the server cannot re-derive from the run config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import training
from common.heads import head_state, make_head
from common.privacy import dp_plan


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

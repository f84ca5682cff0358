"""Robust aggregation of site updates and the update norm bound, as free functions
(the server's :mod:`server.strategy` applies them).

* ``fedavg``: the weighted mean (Flower's ``aggregate_arrayrecords`` maths),
  with each site's share of the weight capped at ``max_share`` so that a
  forged ``num-examples`` cannot let one site dominate;
* ``median``: the coordinate-wise median (Flower's ``FedMedian`` maths);
* ``trimmed-mean``: the coordinate-wise mean after cutting ``trim`` of the
  values at each end (Flower's ``FedTrimmedAvg``, its own ``trim_mean``).

Median and trimmed mean are unweighted, as in Flower: ``num-examples`` does
not enter them at all.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

# Rules over single site updates (the server sees each one).
METHODS = ("fedavg", "median", "trimmed-mean")
# Every value of config key ``aggregation``. secagg+: weighted FedAvg over Flower's
# SecAgg+ masked sums (server/secagg.py); the server sees only the sum, so it cannot
# validate, trim or cap single site updates.
AGGREGATIONS = (*METHODS, "secagg+")


def capped_weights(counts: Sequence[float], max_share: float = 1.0) -> np.ndarray:
    """Normalised weights proportional to ``counts``, none above ``max_share``.

    The excess of a capped site is shared among the others in proportion to
    their counts (water-filling). When ``max_share * len(counts) <= 1`` no
    proportional split can respect the cap and the weights are equal.
    """
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"counts must be positive and finite, got {list(counts)}")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    w = w / w.sum()
    k = len(w)
    if max_share >= 1.0:
        return w
    if max_share * k <= 1.0:
        return np.full(k, 1.0 / k)
    capped = np.zeros(k, dtype=bool)
    while True:
        free = ~capped
        rest = 1.0 - max_share * capped.sum()
        share = w[free] / w[free].sum() * rest
        over = share > max_share * (1 + 1e-12)
        if not over.any():
            out = np.full(k, max_share)
            out[free] = share
            return out
        capped[np.flatnonzero(free)[over]] = True


def aggregate(updates: Sequence[dict[str, np.ndarray]], counts: Sequence[float], *,
              method: str = "fedavg", trim: float = 0.2, max_share: float = 1.0
              ) -> OrderedDict[str, np.ndarray]:
    """Aggregate site heads (same keys and shapes) into one, as float32."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}. Valid: {', '.join(METHODS)}")
    if not updates:
        raise ValueError("nothing to aggregate")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    weights = capped_weights(counts, max_share) if method == "fedavg" else None
    for key in updates[0]:
        stack = np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])
        if method == "fedavg":
            agg = np.tensordot(weights, stack, axes=1)
        elif method == "median":
            agg = np.median(stack, axis=0)
        else:  # Flower's FedTrimmedAvg maths, which is SciPy's trim_mean along axis 0
            from scipy.stats import (
                trim_mean,  # lazy: scipy.stats costs ~0.3 s to import
            )

            agg = trim_mean(stack, trim, axis=0)
        out[key] = np.asarray(agg, dtype=np.float32)
    return out


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all arrays."""
    return math.sqrt(sum(float(np.sum((np.asarray(update[k], np.float64) -
                                        np.asarray(v, np.float64)) ** 2))
                         for k, v in reference.items()))


def clip_derived_bound(*, clip_norm: float, learning_rate: float, momentum: float, steps: int,
                       batch_size: int, noise_multiplier: float, dim: int) -> float:
    """A high-probability bound on how far DP-SGD can move a head in ``steps`` steps.

    Opacus's step is ``lr * (sum of clipped per-sample gradients + N(0, σ²C²I)) / B``
    with ``B`` the expected batch size. The clipped sum has norm at most
    ``|batch| * C``, and a Poisson batch exceeds ``B (1 + 6/sqrt(B))`` with
    negligible probability; the Gaussian's norm exceeds ``σC (sqrt(d) + 6)``
    with probability below e^-18. Momentum ``m`` multiplies by at most
    ``1 / (1 - m)``. An honest site's update stays below this; a far larger
    one did not come from the requested DP-SGD.
    """
    signal = 1.0 + 6.0 / math.sqrt(batch_size)
    noise = noise_multiplier * (math.sqrt(dim) + 6.0) / batch_size
    return steps * learning_rate * clip_norm * (signal + noise) / (1.0 - momentum)

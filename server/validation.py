"""Checks on a site's update (its head, and any tuned backbone tensors) before the
server aggregates it."""

from __future__ import annotations

import math

import numpy as np


def update_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   num_examples: object) -> str | None:
    """Why an update must be dropped, or ``None`` if it is well formed.

    Checks: the same keys, shapes and float32 dtype as the global head, only
    finite values, and a positive integer ``num-examples``.
    """
    if set(arrays) != set(reference):
        # Exactly the tensors the run trains (the head, and under trainable = bitfit /
        # last-block the backbone's tuned ones): anything else is named and refused.
        extra, missing = sorted(set(arrays) - set(reference)), sorted(set(reference) - set(arrays))
        why = "; ".join(part for part in (
            f"unexpected tensor(s) {extra}" if extra else "",
            f"missing tensor(s) {missing}" if missing else "") if part)
        return f"keys {sorted(arrays)} differ from the global head's {sorted(reference)}: {why}"
    for key, ref in reference.items():
        a = arrays[key]
        if tuple(a.shape) != tuple(ref.shape):
            return f"array '{key}' has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if a.dtype != np.float32:
            return f"array '{key}' has dtype {a.dtype}, expected float32"
        if not np.isfinite(a).all():
            return f"array '{key}' contains NaN or Inf"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float) \
            or not math.isfinite(num_examples) or num_examples < 1 \
            or int(num_examples) != num_examples:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    return None

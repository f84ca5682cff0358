"""Conversions between numpy head weights and Flower records, and the round
request's wire format. Flower types are imported lazily so that the maths in
``common`` stays importable (and testable) without them."""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

from common.config import RunConfig

REQUEST_KEYS = ("server-round", "num-rounds", "local-epochs", "batch-size", "learning-rate",
                "momentum", "clip-norm", "noise-multiplier")


def to_array_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v)))
                                              for k, v in arrays.items()))


def from_array_record(record) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def train_request(cfg: RunConfig) -> dict[str, int | float]:
    """The per-round training config the server sends (``server-round`` is
    added by the strategy)."""
    return {"num-rounds": cfg.num_rounds, "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size, "learning-rate": cfg.learning_rate,
            "momentum": cfg.momentum, "clip-norm": cfg.clip_norm,
            "noise-multiplier": cfg.noise_multiplier}


# SecAgg+ (``aggregation = "secagg+"``) runs on Flower's legacy workflow, whose
# parameters are a list of arrays: the head's array names travel in the config.
HEAD_KEYS = "head-keys"


def head_to_parameters(arrays: dict[str, np.ndarray]):
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters([np.ascontiguousarray(v) for v in arrays.values()])


def head_from_parameters(parameters, keys: str) -> OrderedDict[str, np.ndarray]:
    """A legacy parameter list as a head dict, named by the ``head-keys`` config value."""
    from flwr.common import parameters_to_ndarrays

    names = [k for k in str(keys).split(",") if k]
    arrays = parameters_to_ndarrays(parameters)
    if len(names) != len(arrays):
        raise ValueError(f"'{HEAD_KEYS}' names {len(names)} arrays, the message holds "
                         f"{len(arrays)}")
    return OrderedDict(zip(names, arrays, strict=True))


# Under SecAgg+ a site that declines a round raises (the protocol has no "declined"
# reply), and the server reads only the error text: this is its format.
_DECLINED = re.compile(r"site (-?\d+) \(node (\d+)\) declines round \(([a-z-]+)\): (.*)", re.S)


def declined_text(site_id: int, node_id: int, status: str, reason: str) -> str:
    return f"site {site_id} (node {node_id}) declines round ({status}): {reason}"


def parse_declined(text: str) -> tuple[int, int, str, str] | None:
    """``(site id, node id, status, reason)`` from an error text made by :func:`declined_text`."""
    m = _DECLINED.search(text)
    return (int(m[1]), int(m[2]), m[3], m[4]) if m else None

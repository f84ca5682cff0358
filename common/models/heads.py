"""Classifier-head registry. Heads are the only weights that cross the wire."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

# The head registry: config key ``head`` takes these names.
HEADS = {
    "linear": lambda in_dim, num_classes, hidden_dim: nn.Linear(in_dim, num_classes),
    "mlp": lambda in_dim, num_classes, hidden_dim: nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes)),
}


def make_head(name: str, *, in_dim: int, num_classes: int, hidden_dim: int = 128,
              seed: int = 0) -> nn.Module:
    """Build a head by name, with seeded initial weights."""
    gen = torch.Generator().manual_seed(seed)
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}. Valid: {', '.join(HEADS)}")
    head = HEADS[name](in_dim, num_classes, hidden_dim)
    with torch.no_grad():
        for p in head.parameters():
            if p.ndim > 1:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            else:
                p.zero_()
    return head


def head_state(head: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Head weights as numpy arrays (copies), in the module's key order."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in head.state_dict().items())


def load_head_state(head: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """Load numpy weights into ``head``; shapes and keys must match exactly."""
    own = head.state_dict()
    if set(own) != set(state):
        raise ValueError(f"head keys {sorted(state)} do not match expected {sorted(own)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"head array '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    head.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    return head

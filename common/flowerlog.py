"""Route our loggers through Flower's when Flower owns the process.

Under ``flwr run`` (ServerApp) or a SuperNode (ClientApp) the app runs in a
Flower-managed process whose only log sink is Flower's logger: it is what
``flwr run --stream`` and the SuperNode's output show. In ``fedtransfer
simulate`` the CLI configures logging itself, so the apps call this only when
Flower runs them.
"""

from __future__ import annotations

import logging


def log_through_flower(*names: str) -> None:
    """Send INFO and above from the loggers ``names`` to Flower's handlers (idempotent)."""
    flower = logging.getLogger("flwr")
    for name in names:
        ours = logging.getLogger(name)
        ours.setLevel(logging.INFO)
        for handler in flower.handlers:
            if handler not in ours.handlers:
                ours.addHandler(handler)
        ours.propagate = False

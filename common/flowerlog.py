"""Route our loggers through Flower's when Flower owns the process.

Under ``flwr run`` (ServerApp) or a SuperNode (ClientApp) the app runs in a
Flower-managed process whose only log sink is Flower's logger: it is what
``flwr run --stream`` and the SuperNode's output show. In ``fedtransfer
simulate`` the CLI configures logging itself, so the apps call this only when
Flower runs them.
"""

from __future__ import annotations

import logging

# Every module logs to ``logging.getLogger(__name__)``, so these package names are
# the roots of all of fedtransfer's loggers.
PROJECT_LOGGERS = ("common", "client", "server", "simulations", "cli", "benchmarks")


def log_through_flower(*names: str) -> None:
    """Send INFO and above from the loggers ``names`` (default: all of ours) to Flower's
    handlers (idempotent)."""
    names = names or PROJECT_LOGGERS
    flower = logging.getLogger("flwr")
    for name in names:
        ours = logging.getLogger(name)
        ours.setLevel(logging.INFO)
        for handler in flower.handlers:
            if handler not in ours.handlers:
                ours.addHandler(handler)
        ours.propagate = False

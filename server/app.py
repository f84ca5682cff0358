"""Flower ServerApp: parse the config once, then hand over to :mod:`server.run`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, parse_config
from server.run import run_server


def _log_through_flower() -> None:
    """Under ``flwr run`` the ServerApp is a Flower-managed process whose only
    log sink is Flower's logger (streamed back by ``flwr run --stream``): send
    the per-round lines there too."""
    ours, flower = logging.getLogger("fedtransfer"), logging.getLogger("flwr")
    ours.setLevel(logging.INFO)
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


def make_app(override: RunConfig | None = None) -> ServerApp:
    """Build the ServerApp. ``override`` is how ``fedtransfer simulate`` passes
    its resolved config; ``flwr run`` uses ``context.run_config``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if override is None:
            _log_through_flower()
        cfg = override if override is not None else parse_config(dict(context.run_config))
        run_server(cfg, grid, run_id=str(context.run_id))

    return app


app = make_app()

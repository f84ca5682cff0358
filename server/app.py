"""Flower ServerApp: parse the config once, then hand over to :mod:`server.run`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, parse_config
from common.flowerlog import log_through_flower
from server.run import run_server


def make_app(override: RunConfig | None = None) -> ServerApp:
    """Build the ServerApp. ``override`` is how ``fedtransfer simulate`` passes
    its resolved config; ``flwr run`` uses ``context.run_config``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if override is None:
            log_through_flower()
        cfg = override if override is not None else parse_config(dict(context.run_config))
        run_server(cfg, grid, run_id=str(context.run_id))

    return app


app = make_app()

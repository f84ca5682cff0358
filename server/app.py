"""Flower ServerApp: parse the config once, then hand over to :mod:`server.run`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, parse_config, relative_paths
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
        if override is None:
            raw = dict(context.run_config)
            relative = relative_paths(raw)
            if relative:  # they would resolve against the SuperLink's working directory
                raise ValueError(
                    f"run config key(s) {relative} give relative paths, which `flwr run` resolves "
                    "against the SuperLink's working directory, not yours: give absolute paths, "
                    "or put them in the federation file (paths there are relative to it)")
        cfg = override if override is not None else parse_config(raw)
        run_server(cfg, grid, run_id=str(context.run_id))

    return app


app = make_app()

"""Run a scenario: a Flower simulation (federated) or the pooled baseline."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from client.app import make_app as make_client
from common.config import RunConfig
from server.app import make_app as make_server
from server.records import run_dir
from simulations.centralized import run_centralized
from simulations.selection import resolve_auto

log = logging.getLogger(__name__)


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Absolute paths, and a fresh run directory when none is given."""
    out = run_dir(cfg).resolve()
    ledger = Path(cfg.ledger_dir).resolve() if cfg.ledger_dir else out / "sites"
    data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else ""
    return cfg.replace(out_dir=str(out), cache_dir=str(Path(cfg.cache_dir).resolve()),
                       ledger_dir=str(ledger), data_dir=data_dir)


def ray_backend_config(num_cpus: int | None = None) -> dict:
    cpus = num_cpus or os.cpu_count() or 1
    gpus = 0.0
    try:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    except ImportError:
        pass
    return {"client_resources": {"num_cpus": 1, "num_gpus": min(gpus, 1.0 / max(cpus, 1))},
            "init_args": {"num_cpus": cpus, "num_gpus": int(gpus), "include_dashboard": False}}


def simulate(cfg: RunConfig) -> dict:
    """Run ``cfg`` and return its ``summary.json`` contents."""
    cfg = resolve_paths(cfg)
    if cfg.backbone == "auto":  # chosen on the public split first (no ε)
        cfg = resolve_auto(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "centralized":

        return {**run_centralized(cfg), "run_dir": str(out)}
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="fedtransfer-ray-"))
    log.info("simulating %d sites for %d rounds (dataset %s, backbone %s, dp=%s) -> %s",
             cfg.num_sites, cfg.num_rounds, cfg.dataset, cfg.backbone, cfg.dp, out)
    run_simulation(server_app=make_server(cfg), client_app=make_client(cfg),
                   num_supernodes=cfg.num_sites, backend_config=ray_backend_config())
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return {**json.loads(summary_path.read_text()), "run_dir": str(out)}

"""Run a scenario: a Flower simulation (federated) or the pooled baseline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

from client.app import make_app as make_client
from common.config import RunConfig
from common.data.datasets import federation
from server.app import make_app as make_server
from server.records import run_dir
from server.run import plan_batches
from simulations.centralized import run_centralized
from simulations.engine import install as install_linear_sweep
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


RAY_ADDRESS_ENV = "RAY_ADDRESS"


def cluster_address(explicit: str | None = None) -> str | None:
    """The Ray cluster to join: ``--ray-address``, else ``RAY_ADDRESS``, else none
    (the simulation starts its own local Ray instance)."""
    return explicit or os.environ.get(RAY_ADDRESS_ENV) or None


def cluster_backend_config(cluster: dict) -> dict:
    """Backend config for a driver that joined an existing cluster: client resources
    only (Ray refuses ``num_cpus``/``num_gpus`` from a joining driver), one CPU per
    ClientApp actor and, where the cluster has GPUs, an equal share of them."""
    cpus, gpus = max(cluster["cpus"], 1.0), cluster["gpus"]
    return {"client_resources": {"num_cpus": 1, "num_gpus": min(1.0, gpus / cpus) if gpus else 0.0}}


def join_ray_cluster(address: str) -> dict:
    """Connect this driver to the Ray cluster at ``address``; returns its nodes and
    resources. Flower then finds Ray initialised and does not start its own.

    Raises:
        ValueError: no cluster answers at ``address``.
    """
    import ray  # lazy: heavy, and only a run on an existing cluster needs it here

    # As Flower does for the instance it starts: workers on every node import the
    # apps from the driver's path (the code must be at the same path on each node).
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(f"could not join the Ray cluster at {address!r} (--ray-address or "
                         f"{RAY_ADDRESS_ENV}): {exc}") from exc
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return {"address": address, "nodes": [n["NodeID"] for n in nodes],
            "cpus": float(res.get("CPU", 0)), "gpus": float(res.get("GPU", 0))}


def _sees(path: str, name: str) -> bool:
    """Run on one node: whether ``path/name`` (written by the driver) is there."""
    return (Path(path) / name).is_file()


def check_shared_storage(cluster: dict, paths: dict[str, str]) -> None:
    """Every node must see the driver's ledger and cache folders.

    A site may run on any node in any round. Were its ledger on one node's local
    disk, a round on another node would start from an empty ledger, and the site
    would under-report ε; so a cluster whose nodes do not share these folders is
    refused before any site trains.

    Raises:
        ValueError: a node does not see one of ``paths`` (named).
    """
    import ray  # lazy: see join_ray_cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(cluster["nodes"]) < 2:
        return
    name = f".fedtransfer-shared-{uuid.uuid4().hex}"
    for path in paths.values():
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / name).write_text("written by the driver; every node must see it\n")
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        checks = {(node, key): probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=node, soft=False)).remote(path, name)
            for node in cluster["nodes"] for key, path in paths.items()}
        missing = [(node, key) for (node, key), ref in checks.items() if not ray.get(ref, timeout=300)]
    finally:
        for path in paths.values():
            (Path(path) / name).unlink(missing_ok=True)
    if missing:
        node, key = missing[0]
        raise ValueError(
            f"Ray node {node} does not see {key} {paths[key]}: on a cluster, {key} must be "
            f"storage that every node shares (a network filesystem), or a site that runs on "
            f"another node in a later round would start from an empty ledger "
            f"({len(missing)} node/folder pairs missing; docs/ray-cluster.md)")


class _DropNotice(logging.Filter):
    """Drops one library notice by its text; every other record passes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def quiet_simulation_notices():
    """Silence two notices every ``fedtransfer simulate`` printed that say nothing to its
    user, at their source and only around the simulation:

    * Flower's "``run_simulation`` is deprecated" notice. ``fedtransfer simulate`` runs
      Flower's simulation engine in-process on purpose: it hands the apps the resolved
      config (and a Ray cluster address) as Python objects. ``flwr run .``, the path
      Flower supports, runs the same apps with the same defaults (docs/configuration.md).
    * Ray's ``FutureWarning`` about accelerator environment variables with ``num_gpus=0``
      (a tip about a future Ray default that does not change this run).
    """
    notice = _DropNotice("`run_simulation` function is deprecated")
    flwr_log = logging.getLogger("flwr")
    flwr_log.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message="Tip: In future versions of Ray")
            yield
    finally:
        flwr_log.removeFilter(notice)


def simulate(cfg: RunConfig, *, ray_address: str | None = None) -> dict:
    """Run ``cfg`` and return its ``summary.json`` contents.

    ``ray_address`` (or ``RAY_ADDRESS``): run the sites on that existing Ray
    cluster instead of a fresh local instance; ``ledger-dir`` and ``cache-dir``
    must then be on storage every node sees (checked before round 1).
    """
    cfg = resolve_paths(cfg)
    cfg = resolve_auto(cfg)  # backbone = "auto": chosen on the public split first (no ε)
    if cfg.mode == "federated":  # a hospital too small for any batch stops the run here, named
        plan_batches(cfg, federation(cfg)[0])
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "centralized":

        return {**run_centralized(cfg), "run_dir": str(out)}
    from flwr.simulation import run_simulation

    address = cluster_address(ray_address)
    if address is None:
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="fedtransfer-ray-"))
        backend = ray_backend_config()
    else:
        cluster = join_ray_cluster(address)
        try:
            log.info("joined the Ray cluster at %s: %d nodes, %g CPUs, %g GPUs", address,
                     len(cluster["nodes"]), cluster["cpus"], cluster["gpus"])
            check_shared_storage(cluster, {"ledger-dir": cfg.ledger_dir,
                                           "cache-dir": cfg.cache_dir})
        except BaseException:
            import ray

            ray.shutdown()
            raise
        backend = cluster_backend_config(cluster)
    log.info("simulating %d sites for %d rounds (dataset %s, backbone %s, dp=%s) -> %s",
             cfg.num_sites, cfg.num_rounds, cfg.dataset, cfg.backbone, cfg.dp, out)
    install_linear_sweep()  # Flower's message sweep is O(sites²) (simulations/engine.py)
    with quiet_simulation_notices():
        run_simulation(server_app=make_server(cfg), client_app=make_client(cfg),
                       num_supernodes=cfg.num_sites, backend_config=backend)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return {**json.loads(summary_path.read_text()), "run_dir": str(out)}

"""Deployment against simulation: one federation, two runtimes, per-round time split.

*Deployment* is the real loopback path: a TLS SuperLink with SuperNode
authentication and three SuperNodes, each training on its own ``.npz`` file,
driven by ``flwr run`` (the harness in ``tests/loopback.py``, which starts and
stops every process by pid). *Simulation* is ``fedtransfer simulate`` on the
same digits records split IID over three sites. Both use the identity backbone,
a fixed σ, the same schedule, and no distillation, so a round differs only in
the runtime around the site's work.

The split per round comes from the run records: the site's own work (data,
features, DP training, accounting) from ``summary.json`` → ``sites.*.history``,
and the rest of the round (message transport, the ClientApp process start and
imports that a SuperNode pays on every message, server bookkeeping) as the
round's wall time minus the slowest site's work.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

log = logging.getLogger(__name__)

RUN = {"num-sites": 3, "min-sites": 3, "backbone": "identity", "local-epochs": 1,
       "batch-size": 32, "learning-rate": 2.0, "noise-multiplier": 1.0, "distill": False,
       "partitioner": "iid", "round-timeout": 300.0, "target-epsilon": 8.0}


def _split(summary: dict) -> dict:
    """Mean per-round seconds after round 1: wall, site work, and the rest."""
    rounds = [r for r in summary["rounds"] if r["round"] > 1]
    out = {"rounds": len(rounds), "round_seconds": statistics.mean(r["round_seconds"]
                                                                    for r in rounds)}
    parts = {"train": "train_seconds", "accounting": "privacy_seconds",
             "features": "feature_seconds", "site_total": "site_seconds"}
    for name, key in parts.items():
        out[f"site_{name}"] = statistics.mean(
            h[key] for s in summary["sites"].values() for h in s["history"] if h["round"] > 1)
    slowest = [max(h["site_seconds"] for s in summary["sites"].values() for h in s["history"]
                   if h["round"] == r["round"]) for r in rounds]
    out["outside_site"] = statistics.mean(
        r["round_seconds"] - m for r, m in zip(rounds, slowest, strict=True))
    return out


def _simulation(work: Path, rounds: int) -> dict:
    from common.config import parse_config
    from simulations.simulate import simulate

    cfg = parse_config({**RUN, "num-rounds": rounds, "out-dir": str(work / "sim"),
                        "cache-dir": str(work / "sim-cache")})
    return simulate(cfg)


def _deployment(work: Path, rounds: int) -> dict:
    from tests.loopback import Loopback

    out = work / "deploy"
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in RUN.items())
    config += f" num-rounds={rounds} out-dir='{out}' cache-dir='{work / 'deploy-cache'}'"
    config = config.replace('"', "'")
    with Loopback(work / "loopback", num_sites=RUN["num-sites"]) as fed:
        fed.start_superlink()
        for site in range(RUN["num-sites"]):
            fed.register(site)
            fed.start_supernode(site)
        fed.wait_online(RUN["num-sites"])
        rc = fed.run(config).wait(timeout=900)
        if rc != 0:
            raise RuntimeError(f"flwr run exited {rc}: {fed.log('flwr-run')[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def run(work_dir: Path, *, rounds: int = 4) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    sim = _split(_simulation(work_dir, rounds))
    log.info("simulation: %.2f s per round (site %.2f s, outside the site %.2f s)",
             sim["round_seconds"], sim["site_site_total"], sim["outside_site"])
    dep = _split(_deployment(work_dir, rounds))
    log.info("deployment: %.2f s per round (site %.2f s, outside the site %.2f s)",
             dep["round_seconds"], dep["site_site_total"], dep["outside_site"])
    return {"measured": True, "config": {**RUN, "num-rounds": rounds},
            "simulation": sim, "deployment": dep,
            "ratio_round_seconds": dep["round_seconds"] / sim["round_seconds"]}

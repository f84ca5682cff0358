"""Deployment against simulation, each with and without SecAgg+: one federation,
two runtimes, per-round time split.

*Deployment* is the real loopback path: a TLS SuperLink with SuperNode
authentication and three SuperNodes, each training on its own ``.npz`` file,
driven by ``flwr run`` (the harness in ``simulations/loopback.py``, which starts and
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

from common.config import parse_config
from simulations.loopback import Loopback
from simulations.simulate import simulate

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


# The same runs with the heads summed under Flower's SecAgg+ (server/secagg.py).
SECAGG = {"aggregation": "secagg+", "teacher": "global"}


def _simulation(work: Path, rounds: int, extra: dict | None = None, tag: str = "sim") -> dict:

    cfg = parse_config({**RUN, **(extra or {}), "num-rounds": rounds,
                        "out-dir": str(work / tag), "cache-dir": str(work / "sim-cache")})
    return simulate(cfg)


# Flower's own waits, for the before/after: its grid pulls replies every 3 s and its
# SuperExec picks up tasks every 1 s; fedtransfer polls both every 0.1 s (server/polling.py,
# simulations/loopback.py).
FLOWER_POLLS = {"FEDTRANSFER_GRID_POLL_S": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}


def _deployment(work: Path, rounds: int, extra: dict | None = None, tag: str = "deploy",
                env: dict | None = None) -> dict:

    out = work / tag
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in {**RUN, **(extra or {})}.items())
    config += f" num-rounds={rounds} out-dir='{out}' cache-dir='{work / 'deploy-cache'}'"
    config = config.replace('"', "'")
    with Loopback(work / f"loopback-{tag}", num_sites=RUN["num-sites"], env=env) as fed:
        fed.start_federation()
        fed.run(config)
        rc = fed.wait_run("flwr-run", num_rounds=rounds)  # on progress, round by round
        if rc != 0:
            raise RuntimeError(f"flwr run exited {rc}: {fed.log('flwr-run')[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def run(work_dir: Path, *, rounds: int = 4) -> dict:
    """Four arms, one after the other: simulation and deployment, each with plain
    FedAvg and with SecAgg+ (four messages per site per round instead of one)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    arms = {"simulation": (_simulation, None), "simulation_secagg": (_simulation, SECAGG),
            "deployment": (_deployment, None), "deployment_secagg": (_deployment, SECAGG),
            "deployment_flower_polls": (_deployment, None)}
    out: dict = {"measured": True, "config": {**RUN, "num-rounds": rounds}, "secagg": SECAGG,
                 "flower_polls": FLOWER_POLLS}
    for name, (runtime, extra) in arms.items():
        kw = {"env": FLOWER_POLLS} if name == "deployment_flower_polls" else {}
        out[name] = _split(runtime(work_dir, rounds, extra, tag=name, **kw))
        log.info("%s: %.2f s per round (site %.2f s, outside the site %.2f s)", name,
                 out[name]["round_seconds"], out[name]["site_site_total"],
                 out[name]["outside_site"])
    out["ratio_round_seconds"] = (out["deployment"]["round_seconds"]
                                  / out["simulation"]["round_seconds"])
    # Before/after the short polls, same run: Flower's waits over fedtransfer's.
    out["ratio_flower_polls"] = (out["deployment_flower_polls"]["round_seconds"]
                                 / out["deployment"]["round_seconds"])
    for runtime in ("simulation", "deployment"):
        out[f"ratio_secagg_{runtime}"] = (out[f"{runtime}_secagg"]["round_seconds"]
                                          / out[runtime]["round_seconds"])
    return out

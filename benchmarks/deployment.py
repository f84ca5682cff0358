"""Deployment against simulation, warm sites against stock Flower, SecAgg+ against
plain: one federation on several runtimes, side by side in one run.

``python -m benchmarks.deployment --out benchmarks/results [--rounds 4] [--repeats 1]``

*Deployment* is the real loopback path: a TLS SuperLink with SuperNode
authentication and three sites, each training on its own ``.npz`` with the
product's ClientApp (``client.app``), driven by ``flwr run`` (the harness in
``simulations/loopback.py``, which starts and stops every process by pid). Its
arms differ only in how a site runs:

- ``deployment``: ``fedtransfer site serve`` (the warm launcher: one forked
  ClientApp process per message, Flower's 3 s idle sleep between pulls);
- ``deployment_idle_poll``: the same with ``--idle-poll 0.1`` (the SuperNode's
  sleeps capped at 0.1 s: one pull per 0.1 s per idle site at the SuperLink);
- ``deployment_stock``: Flower's own ``flower-supernode`` (a fresh
  ``flwr-clientapp`` process per message), the baseline for the speed-up.

*Simulation* is ``fedtransfer simulate`` (Ray) on the same digits records split
IID over three sites. All use the identity backbone, a fixed σ, the same
schedule and no distillation, so a round differs only in the runtime around the
site's work. Each arm also runs under SecAgg+ (four messages per site per round).

The split per round comes from the run records: the site's own work (data,
features, DP training, accounting) from ``summary.json`` → ``sites.*.history``,
and the rest of the round (message transport, the ClientApp process, Flower's
waits, server bookkeeping) as the round's wall time minus the slowest site's work.
Rounds 2 onward (round 1 pays one-off costs: the FAB's installation, the first σ
calibration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import code_version, machine_info, machine_tag
from benchmarks.markdown import deployment_table
from benchmarks.settings import scratch_env
from common.config import parse_config
from simulations.loopback import Loopback
from simulations.simulate import simulate

log = logging.getLogger(__name__)

RUN = {"num-sites": 3, "min-sites": 3, "backbone": "identity", "local-epochs": 1,
       "batch-size": 32, "learning-rate": 2.0, "noise-multiplier": 1.0, "distill": False,
       "partitioner": "iid", "round-timeout": 300.0, "target-epsilon": 8.0}
# The same runs with the heads summed under Flower's SecAgg+ (server/secagg.py).
SECAGG = {"aggregation": "secagg+", "teacher": "global"}
IDLE_POLL = 0.1
# How each deployed arm's sites join (simulations/loopback.py: sites, serve_args).
SITES = {"deployment": ("serve", ()),
         "deployment_idle_poll": ("serve", ("--idle-poll", str(IDLE_POLL))),
         "deployment_stock": ("flower", ())}
# Run order: each plain arm next to its SecAgg+ twin's family, simulation first.
ARMS = ("simulation", "deployment", "deployment_idle_poll", "deployment_stock",
        "simulation_secagg", "deployment_secagg", "deployment_idle_poll_secagg",
        "deployment_stock_secagg")
TARGETS = {"deployed_over_simulated": 3.0, "secagg_over_plain": 2.0}


def _split(summary: dict) -> dict:
    """Mean per-round seconds after round 1: wall, site work, and the rest."""
    rounds = [r for r in summary["rounds"] if r["round"] > 1]
    out = {"rounds": len(rounds), "round_seconds": statistics.mean(r["round_seconds"]
                                                                    for r in rounds),
           "per_round": [r["round_seconds"] for r in rounds]}
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


def _simulation(work: Path, rounds: int, extra: dict | None, tag: str) -> dict:
    cfg = parse_config({**RUN, **(extra or {}), "num-rounds": rounds,
                        "out-dir": str(work / tag), "cache-dir": str(work / "sim-cache")})
    return simulate(cfg)


def _deployment(work: Path, rounds: int, extra: dict | None, tag: str, *, sites: str = "serve",
                serve_args: tuple[str, ...] = (), env: dict | None = None) -> dict:
    out = work / tag
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in {**RUN, **(extra or {})}.items())
    config += f" num-rounds={rounds} out-dir='{out}' cache-dir='{work / 'deploy-cache'}'"
    config = config.replace('"', "'")
    # The sites release their coarse timings (off by default: a side channel) so that
    # the split between site work and the rest can be measured.
    with Loopback(work / f"loopback-{tag}", num_sites=RUN["num-sites"], env=env, sites=sites,
                  serve_args=serve_args, node_extra="release-timings=true") as fed:
        fed.start_federation()
        fed.run(config)
        rc = fed.wait_run("flwr-run", num_rounds=rounds)  # on progress, round by round
        if rc != 0:
            raise RuntimeError(f"flwr run exited {rc}: {fed.log('flwr-run')[-2000:]}")
    if fed.left_behind:
        raise RuntimeError(f"{tag}: processes outlived their site's launcher: {fed.left_behind}")
    return json.loads((out / "summary.json").read_text())


def run_arm(work_dir: Path, name: str, rounds: int, tag: str | None = None) -> dict:
    """One arm, by name (see :data:`ARMS`): its per-round split."""
    secagg = name.endswith("_secagg")
    base = name.removesuffix("_secagg")
    extra = SECAGG if secagg else None
    tag = tag or name
    if base == "simulation":
        return _split(_simulation(work_dir, rounds, extra, tag))
    sites, serve_args = SITES[base]
    return _split(_deployment(work_dir, rounds, extra, tag, sites=sites, serve_args=serve_args))


def _ratio(out: dict, a: str, b: str) -> float | None:
    if a in out and b in out:
        return out[a]["round_seconds"] / out[b]["round_seconds"]
    return None


def run(work_dir: Path, *, rounds: int = 4, arms: tuple[str, ...] = ARMS,
        repeats: int = 1) -> dict:
    """Every arm in ``arms``, in that order, ``repeats`` times over (an arm's numbers
    are the mean of its repeats); the ratios of each pair measured in this run."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; valid: {', '.join(ARMS)}")
    work_dir.mkdir(parents=True, exist_ok=True)
    # A fresh folder per run: an earlier run's simulated ledgers (under its out-dir) would
    # otherwise carry their spend into this one, and its sites would decline at their cap.
    work_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))
    out: dict = {"measured": True, "config": {**RUN, "num-rounds": rounds}, "secagg": SECAGG,
                 "idle_poll": IDLE_POLL, "repeats": repeats, "arms": list(arms),
                 "load_average": {}}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for rep in range(repeats):
        for name in arms:
            before = os.getloadavg()
            res = run_arm(work_dir, name, rounds, tag=f"{name}-{rep}")
            runs[name].append(res)
            out["load_average"].setdefault(name, []).append(
                {"before": list(before), "after": list(os.getloadavg())})
            log.info("%s (repeat %d): %.2f s per round (site %.2f s, outside the site %.2f s); "
                     "load %.1f", name, rep + 1, res["round_seconds"], res["site_site_total"],
                     res["outside_site"], os.getloadavg()[0])
    for name, results in runs.items():
        keys = [k for k in results[0] if isinstance(results[0][k], int | float)]
        out[name] = {k: statistics.mean(r[k] for r in results) for k in keys}
        out[name]["per_round"] = [x for r in results for x in r["per_round"]]
        out[name]["repeats"] = [r["round_seconds"] for r in results]
    ratios = {
        # deployed over simulated, per way of running a site
        "ratio_round_seconds": _ratio(out, "deployment", "simulation"),
        "ratio_idle_poll": _ratio(out, "deployment_idle_poll", "simulation"),
        "ratio_stock": _ratio(out, "deployment_stock", "simulation"),
        # the warm launcher's speed-up over stock Flower
        "speedup_warm": _ratio(out, "deployment_stock", "deployment"),
        "speedup_warm_idle_poll": _ratio(out, "deployment_stock", "deployment_idle_poll"),
        "speedup_warm_secagg": _ratio(out, "deployment_stock_secagg", "deployment_secagg"),
        "speedup_warm_idle_poll_secagg": _ratio(out, "deployment_stock_secagg",
                                                "deployment_idle_poll_secagg"),
        # the idle-poll cap alone
        "ratio_idle_poll_over_warm": _ratio(out, "deployment_idle_poll", "deployment"),
    }
    for base in ("simulation", "deployment", "deployment_idle_poll", "deployment_stock"):
        ratios[f"ratio_secagg_{base}"] = _ratio(out, f"{base}_secagg", base)
    out.update({k: v for k, v in ratios.items() if v is not None})
    out["targets"] = TARGETS
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deployment",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results JSON")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a "
                   "temporary one)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for noisy in ("flwr", "ray", "datasets", "opacus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    scratch_env()
    arms = tuple(x.strip() for x in a.arms.split(",") if x.strip())
    work = a.work or Path(tempfile.mkdtemp(prefix="fedtransfer-deployment-"))
    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()
    res = run(work, rounds=a.rounds, arms=arms, repeats=a.repeats)
    info = machine_info()
    doc = {"what": "benchmarks/deployment.py: deployed (TLS, SuperNode authentication, 3 sites, "
                   "the product ClientApp) against simulated, warm launcher against stock "
                   "Flower, SecAgg+ against plain; rounds 2 onward",
           "date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"),
           "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "code": code_version(), "machine": info,
           "load_average": {"before": list(load), "after": list(os.getloadavg())},
           "deployment_vs_simulation": res}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{doc['date']}-{machine_tag(info)}-deployment.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(deployment_table(res)))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

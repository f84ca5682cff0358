"""Fine-tuning sweep: each ``trainable`` mode at several ε, on PneumoniaMNIST.

For every mode (``head``, ``bitfit``, ``last-block``; common/models/finetune.py),
every ε (and no DP) and every seed: federated DP training over the scenario's
hospitals on the *function-level* path of :mod:`benchmarks.privacy_utility`
(the sites' records, partition and cached inputs from :mod:`client.round`, σ
calibrated so all planned rounds fit the cap, :func:`common.models.training.train_dp`
per site and round, weighted FedAvg over every trained tensor). Reported per
run: test AUC, balanced accuracy at argmax and at the decision rule the server
would ship (chosen on val), val AUC, the learning rate chosen,
seconds per round (all sites' local training, run one after another here) and
bytes per round (every site downloads and uploads the trained tensors as float32).

The learning rate is chosen per (mode, ε, seed) on the *validation* split only,
from ``learning_rates``; test is read once, for the chosen run.

``python -m benchmarks.finetuning --cpu`` runs the sweep sized for a 2-core CPU
(3 seeds, 64 px, 10 rounds x 1 local epoch, the learning rate chosen per mode and
ε on the first seed's val); ``make bench-full`` runs the scenario's own schedule
as its ``finetuning`` part (hours on a CPU; meant for a GPU). Results go to
``benchmarks/results/<date>-<machine>-finetuning-<cpu|full>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_info, machine_tag
from benchmarks.privacy_utility import Fixture, fedavg
from common.config import RunConfig
from common.jsonio import clean_json
from common.models import training
from common.models.finetune import load_model_state, model_state
from common.models.names import TRAINABLE_MODES
from common.privacy.accounting import epsilon

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"

EPSILONS = (1.0, 4.0, 8.0, float("inf"))


def run_mode(fx: Fixture, target_epsilon: float, seed: int, lr: float) -> dict:
    """One federated run of ``fx.cfg.trainable`` at ``target_epsilon`` (inf: no DP)."""
    cfg = fx.cfg
    dp = math.isfinite(target_epsilon)
    state = model_state(fx.eval.head())
    sigmas = fx.site_sigmas(target_epsilon)
    spent: list[list] = [[] for _ in fx.sites]
    train_s = 0.0
    device = training.resolve_device(cfg.device)
    for r in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for i, (x, y) in enumerate(fx.sites):
            model = load_model_state(fx.eval.head(), state)
            kw = dict(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=lr,
                      momentum=cfg.momentum, seed=seed * 1_000_003 + 1000 * r + i, device=device)
            res = (training.train_dp(model, x, y, noise_multiplier=sigmas[i],
                                     clip_norm=cfg.clip_norm, **kw) if dp
                   else training.train_plain(model, x, y, **kw))
            train_s += res.seconds
            spent[i] += res.mechanisms
            states.append(model_state(model))
            weights.append(len(y))
        state = fedavg(states, weights)
    upload = int(sum(v.astype(np.float32).nbytes for v in state.values()))
    return {"state": state, "seconds_per_round": train_s / cfg.num_rounds,
            "bytes_per_round": 2 * upload * len(fx.sites), "bytes_per_site_upload": upload,
            "trained_params": int(sum(v.size for v in state.values())),
            "epsilon_spent": max(epsilon(m, delta=cfg.target_delta) for m in spent) if dp
            else None, "noise_multiplier": max(sigmas) if dp else None}


def run(cfg: RunConfig, *, modes=TRAINABLE_MODES, epsilons=EPSILONS, seeds=(0,),
        learning_rates: dict[str, tuple[float, ...]] | None = None,
        choose_on_first_seed: bool = False, on_row=None) -> dict:
    """The sweep's rows (one per mode, ε, seed: the val-chosen learning rate's run).

    The learning rate is chosen by val AUC per (mode, ε, seed), or, with
    ``choose_on_first_seed``, per (mode, ε) on the first seed and then reused for
    the others (their test numbers are then not selected on at all).
    ``on_row(rows)`` is called after each row (e.g. to write partial results)."""
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        fx = Fixture(cfg.replace(trainable=mode))
        input_s = time.perf_counter() - t0
        grid = (learning_rates or {}).get(mode) or (cfg.lr,)
        chosen: dict[float, float] = {}
        for seed in seeds:
            for eps in epsilons:
                lrs = (chosen[eps],) if choose_on_first_seed and eps in chosen else grid
                tried = []
                for lr in lrs:
                    out = run_mode(fx, eps, seed, lr)
                    m = fx.eval.metrics(out["state"])
                    tried.append((m["val"]["auc"], lr, out, m))
                    log.info("finetuning %s ε=%g seed %d lr %g: val AUC %.4f (%.1f s/round)",
                             mode, eps, seed, lr, m["val"]["auc"], out["seconds_per_round"])
                val_auc, lr, out, m = max(tried, key=lambda t: t[0])
                chosen.setdefault(eps, lr)
                shipped = fx.eval.report(out["state"])  # the decision rule chosen on val
                rows.append({
                    "mode": mode, "epsilon": eps if math.isfinite(eps) else None,
                    "epsilon_label": f"{eps:g}" if math.isfinite(eps) else "inf", "seed": seed,
                    "learning_rate": lr, "learning_rates_tried": list(lrs),
                    "val_auc": val_auc, "auc": m["test"]["auc"],
                    "balanced_accuracy": m["test"]["balanced_accuracy"],
                    "accuracy": m["test"]["accuracy"],
                    "balanced_accuracy_at_rule": shipped["test"]["balanced_accuracy"],
                    "rule": shipped["decision"].get("rule"),
                    **{k: v for k, v in out.items() if k != "state"},
                    "input_cache_seconds": input_s})
                log.info("finetuning %s ε=%s seed %d: test AUC %.4f bal. acc %.4f at the rule "
                         "(lr %g by val)", mode, rows[-1]["epsilon_label"], seed,
                         rows[-1]["auc"], rows[-1]["balanced_accuracy_at_rule"], lr)
                if on_row is not None:
                    on_row(rows)
    return {"rows": rows,
            "setting": {"num_sites": cfg.num_sites, "partitioner": cfg.partitioner,
                        "dirichlet_alpha": cfg.dirichlet_alpha, "rounds": cfg.num_rounds,
                        "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                        "clip_norm": cfg.clip_norm, "delta": cfg.target_delta,
                        "image_size": cfg.image_size, "head": cfg.head, "seeds": list(seeds),
                        "learning_rates": {m: list((learning_rates or {}).get(m)
                                                   or (cfg.lr,)) for m in modes},
                        "selection": ("learning rate per (mode, ε) by val AUC on the first seed, "
                                      "reused for the others" if choose_on_first_seed else
                                      "learning rate per (mode, ε, seed) by val AUC")
                                     + "; test read for the chosen run only",
                        "path": "function-level (client.round + common.models.training), "
                                "not Flower"}}


# The full sweep's grid (chosen per mode, ε and seed on val only).
FULL_LRS = {"head": (0.3, 1.0, 3.0), "bitfit": (0.1, 0.3, 1.0), "last-block": (0.03, 0.1, 0.3)}
# The CPU sweep: a fifth of the scenario's local epochs, so larger rates; each grid
# reaches past the value a first 5-round run chose at its top edge.
CPU_LRS = {"head": (3.0, 10.0, 30.0), "bitfit": (0.3, 1.0, 3.0), "last-block": (0.1, 0.3, 1.0)}
CPU_SCHEDULE = {"num_rounds": 10, "local_epochs": 1}


def main(argv: list[str] | None = None) -> int:
    # lazy: benchmarks.settings resolves the scenario through the CLI at import
    from benchmarks.settings import BenchSettings

    p = argparse.ArgumentParser(prog="python -m benchmarks.finetuning", description=__doc__)
    p.add_argument("--cpu", action="store_true",
                   help="the sweep sized for a 2-core CPU: 3 seeds, 64 px, 10 rounds x 1 local "
                        "epoch, learning rate chosen per (mode, ε) on the first seed's val")
    p.add_argument("--out", default=None)
    p.add_argument("--modes", default=",".join(TRAINABLE_MODES))
    p.add_argument("--epsilons", default="1,4,8,inf",
                   help="comma-separated target ε values; inf: no DP (default 1,4,8,inf)")
    p.add_argument("--schedule", choices=("scenario", "cpu"), default=None,
                   help="override the local schedule: the scenario's (10 rounds x 5 epochs) or "
                        "the CPU sweep's (10 x 1); with --cpu the default is cpu")
    args = p.parse_args(argv)
    epsilons = tuple(float(e) for e in args.epsilons.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    st = BenchSettings()
    seeds = (0, 1, 2)
    if args.cpu:
        schedule = CPU_SCHEDULE if args.schedule in (None, "cpu") else {}
        cfg, label, grid = st.config(**schedule), "cpu", CPU_LRS
        if schedule == {}:  # 5x the steps: the full grids, which hold the scenario's own rate
            label, grid = "cpu-scenario-schedule", FULL_LRS
    else:
        cfg, label, grid = st.config(), "full", FULL_LRS
    info = machine_info()
    t0 = time.perf_counter()
    out = Path(args.out or RESULTS / f"{dt.date.today().isoformat()}-{machine_tag(info)}-"
                                     f"finetuning-{label}.json")
    note = ("CPU sweep: the scenario's hospitals, partition, 64 px, batch, clip and 10 rounds, "
            "but 1 local epoch per round (the scenario has 5), so every mode's numbers are for "
            "that shorter schedule" if label == "cpu" else "the scenario's own schedule")

    def write(rows, done=False):
        doc = {"mode": label, "note": note, "complete": done, "machine": info, "rows": rows,
               "seconds": time.perf_counter() - t0}
        out.write_text(json.dumps(clean_json(doc), indent=1) + "\n")

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    res = run(cfg, modes=modes, epsilons=epsilons, seeds=seeds, learning_rates=grid,
              choose_on_first_seed=args.cpu, on_row=write)
    write(res["rows"], done=True)
    doc = json.loads(out.read_text())
    doc = {**doc, "setting": res["setting"], "summary": summarise(res["rows"])}
    out.write_text(json.dumps(clean_json(doc), indent=1) + "\n")
    log.info("wrote %s", out)
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (mode, ε), and each tuned mode's gap to ``head``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["epsilon_label"]), []).append(r)
    out = []
    for (mode, eps), rs in groups.items():
        auc = np.array([r["auc"] for r in rs])
        bal = np.array([r["balanced_accuracy_at_rule"] for r in rs])
        head = groups.get(("head", eps))
        out.append({"mode": mode, "epsilon_label": eps, "seeds": len(rs),
                    "auc_mean": float(auc.mean()),
                    "auc_sd": float(auc.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "balanced_accuracy_at_rule_mean": float(bal.mean()),
                    "seconds_per_round_mean": float(np.mean([r["seconds_per_round"] for r in rs])),
                    "bytes_per_round": rs[0]["bytes_per_round"],
                    "learning_rate": rs[0]["learning_rate"],
                    "auc_minus_head": (float(auc.mean() - np.mean([r["auc"] for r in head]))
                                       if head else None)})
    return out


if __name__ == "__main__":
    raise SystemExit(main())

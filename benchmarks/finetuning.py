"""Fine-tuning sweep: each ``trainable`` mode at several ε, on PneumoniaMNIST.

For every mode (``head``, ``bitfit``, ``last-block``; common/models/finetune.py),
every ε (and no DP) and every seed: federated DP training over the scenario's
hospitals on the *function-level* path of :mod:`benchmarks.privacy_utility`
(the sites' records, partition and cached inputs from :mod:`client.site`, σ
calibrated so all planned rounds fit the cap, :func:`common.models.training.train_dp`
per site and round, weighted FedAvg over every trained tensor). Reported per
run: test AUC, balanced accuracy at argmax and at the decision rule the server
would ship (chosen on val), val AUC, the learning rate chosen,
seconds per round (all sites' local training, run one after another here) and
bytes per round (every site downloads and uploads the trained tensors as float32).

The learning rate is chosen per (mode, ε, seed) on the *validation* split only,
from ``learning_rates``; test is read once, for the chosen run.

``python -m benchmarks.finetuning --reduced`` runs a configuration that fits a
shared 2-core CPU (one seed, fewer rounds, 32 px) and writes
``benchmarks/results/finetuning_reduced.json``; ``make bench-full`` runs the
full sweep as its ``finetuning`` part.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.privacy_utility import Fixture, fedavg
from common.config import RunConfig
from common.jsonio import clean_json
from common.models import training
from common.models.finetune import TRAINABLE_MODES, load_model_state, model_state
from common.privacy.accounting import epsilon

log = logging.getLogger(__name__)

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
        on_row=None) -> dict:
    """The sweep's rows (one per mode, ε, seed: the val-chosen learning rate's run).
    ``on_row(rows)`` is called after each row (e.g. to write partial results)."""
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        fx = Fixture(cfg.replace(trainable=mode))
        input_s = time.perf_counter() - t0
        lrs = (learning_rates or {}).get(mode) or (cfg.learning_rate,)
        for seed in seeds:
            for eps in epsilons:
                tried = []
                for lr in lrs:
                    out = run_mode(fx, eps, seed, lr)
                    m = fx.eval.metrics(out["state"])
                    tried.append((m["val"]["auc"], lr, out, m))
                    log.info("finetuning %s ε=%g seed %d lr %g: val AUC %.4f (%.1f s/round)",
                             mode, eps, seed, lr, m["val"]["auc"], out["seconds_per_round"])
                val_auc, lr, out, m = max(tried, key=lambda t: t[0])
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
                log.info("finetuning %s ε=%s: test AUC %.4f bal. acc %.4f (lr %g by val)", mode,
                         rows[-1]["epsilon_label"], rows[-1]["auc"],
                         rows[-1]["balanced_accuracy"], lr)
                if on_row is not None:
                    on_row(rows)
    return {"rows": rows,
            "setting": {"num_sites": cfg.num_sites, "partitioner": cfg.partitioner,
                        "dirichlet_alpha": cfg.dirichlet_alpha, "rounds": cfg.num_rounds,
                        "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                        "clip_norm": cfg.clip_norm, "delta": cfg.target_delta,
                        "image_size": cfg.image_size, "head": cfg.head, "seeds": list(seeds),
                        "learning_rates": {m: list((learning_rates or {}).get(m)
                                                   or (cfg.learning_rate,)) for m in modes},
                        "selection": "learning rate per (mode, ε, seed) by val AUC; test read "
                                     "for the chosen run only",
                        "path": "function-level (client.site + common.models.training), "
                                "not Flower"}}


REDUCED_LRS = {"head": (1.0,), "bitfit": (0.3, 1.0), "last-block": (0.1,)}
# The full sweep's grid (chosen per mode, ε and seed on val only).
FULL_LRS = {"head": (0.3, 1.0, 3.0), "bitfit": (0.1, 0.3, 1.0), "last-block": (0.03, 0.1, 0.3)}


def main(argv: list[str] | None = None) -> int:
    # lazy: benchmarks.settings resolves the scenario through the CLI at import
    from benchmarks.settings import BenchSettings

    p = argparse.ArgumentParser(prog="python -m benchmarks.finetuning", description=__doc__)
    p.add_argument("--reduced", action="store_true",
                   help="1 seed, 32 px, 3 rounds x 1 epoch (a shared 2-core CPU)")
    p.add_argument("--out", default=None)
    p.add_argument("--modes", default=",".join(TRAINABLE_MODES))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    st = BenchSettings()
    if args.reduced:
        cfg = st.config(image_size=32, num_rounds=3, local_epochs=1)
        seeds, label = (0,), "reduced"
    else:
        cfg, seeds, label = st.config(), (0, 1, 2), "full"
    t0 = time.perf_counter()
    out = Path(args.out or Path(__file__).parent / "results" / f"finetuning_{label}.json")
    note = ("REDUCED configuration (1 seed, 32 px, 3 rounds x 1 local epoch, learning rates "
            "from a 1-2 value grid chosen on val) run on a shared 2-core CPU under nice; the "
            "full sweep (3 seeds, 64 px, the scenario's 10 rounds x 5 epochs) is still to run"
            if args.reduced else "")

    def write(rows, done=False):
        doc = {"mode": label, "note": note, "complete": done, "rows": rows,
               "seconds": time.perf_counter() - t0}
        out.write_text(json.dumps(clean_json(doc), indent=1) + "\n")

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    res = run(cfg, modes=modes, seeds=seeds,
              learning_rates=REDUCED_LRS if args.reduced else FULL_LRS, on_row=write)
    write(res["rows"], done=True)
    doc = json.loads(out.read_text())
    out.write_text(json.dumps(clean_json({**doc, "setting": res["setting"]}), indent=1) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

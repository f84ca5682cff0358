"""5. Privacy-utility on PneumoniaMNIST: ε against test AUC and accuracy.

This runs the *function-level* path, not a Flower simulation: each site's
records, partition and cached features come from :mod:`client.admission` and :mod:`client.round`
(``load_site_data``, ``site_features``), σ is calibrated per site exactly as
``common.privacy.planning.plan_round`` does (all planned rounds fit the cap), each local
round is :func:`common.models.training.train_dp` (or ``train_plain`` for ε = ∞), and
the heads are averaged with weighted FedAvg (weights = record counts), which
is what the Flower server does. Only the message passing, the ledgers and the
per-round server evaluation are skipped, so a sweep of 6 ε × 2 settings ×
seeds fits in minutes. The centralized arm pools the same site records and
trains once for ``rounds × local-epochs`` epochs under one accountant, as
``simulations.centralized`` does.

Seeds here fix the head initialisation, the Poisson batches and the DP noise
so that runs are repeatable. Real sites draw their DP seeds from the OS
entropy pool; that changes which noise is drawn, not its distribution.
The hospital partition is the scenario's (seed 0) in every run.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from client.admission import load_site_data
from client.round import site_features
from client.settings import scenario_policy
from common.config import RunConfig
from common.models import training
from common.models.heads import head_state, load_head_state
from common.privacy.accounting import calibrate_noise_multiplier, dp_plan, epsilon
from server.evaluation import GlobalEval

log = logging.getLogger(__name__)

# MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), Table of PneumoniaMNIST
# test results; data from Kermany et al., Cell 172(5), 2018.
REFERENCE = [
    {"model": "ResNet-18 (28)", "auc": 0.944, "accuracy": 0.854,
     "source": "Yang et al. 2023, MedMNIST v2, Sci Data 10:41 (PneumoniaMNIST, test split)",
     "privacy": "none (centralized, non-private, full network trained)"},
]
MIN_NOISE_MULTIPLIER = 0.3  # the sites' default floor (common.privacy.planning)


def fedavg(states: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: sum(s[k].astype(np.float64) * (w / total)
                   for s, w in zip(states, weights, strict=True)).astype(np.float32)
            for k in states[0]}


class Fixture:
    """The scenario's sites (records and cached features) and the server's eval split."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.sites = []
        for site_id in range(cfg.num_sites):
            settings = scenario_policy(cfg, {"partition-id": site_id})
            data = load_site_data(settings)
            f = site_features(settings, cfg.trainable, data)
            self.sites.append((f.train, data.train_y))
        self.eval = GlobalEval(cfg)
        self._sigma: dict[tuple, float] = {}

    def sigma(self, target_epsilon: float, n: int, epochs: int) -> tuple[float, float, int]:
        """(σ, q, steps) for ``epochs`` epochs over ``n`` records, to fit the cap."""
        q, steps = dp_plan(n, batch_size=self.cfg.batch_size, epochs=epochs)
        key = (target_epsilon, n, epochs)
        if key not in self._sigma:
            self._sigma[key] = calibrate_noise_multiplier(
                target_epsilon=target_epsilon, delta=self.cfg.target_delta,
                sample_rate=q, steps=steps)
        return max(self._sigma[key], MIN_NOISE_MULTIPLIER), q, steps

    def site_sigmas(self, target_epsilon: float) -> list[float | None]:
        """Each site's σ for the whole run at ``target_epsilon`` (None without DP: inf)."""
        epochs = self.cfg.local_epochs * self.cfg.num_rounds
        if not math.isfinite(target_epsilon):
            return [None for _ in self.sites]
        return [self.sigma(target_epsilon, len(y), epochs)[0] for _, y in self.sites]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([x for x, _ in self.sites]),
                np.concatenate([y for _, y in self.sites]))


def _train(cfg: RunConfig, head, x, y, *, epochs: int, sigma: float | None, seed: int):
    kw = dict(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              momentum=cfg.momentum, seed=seed, device=training.resolve_device(cfg.device))
    if sigma is None:
        return training.train_plain(head, x, y, **kw)
    return training.train_dp(head, x, y, noise_multiplier=sigma, clip_norm=cfg.clip_norm, **kw)


def run_federated(fx: Fixture, target_epsilon: float, seed: int) -> dict:
    cfg = fx.cfg
    dp = math.isfinite(target_epsilon)
    global_state = head_state(fx.eval.head())
    sigmas = fx.site_sigmas(target_epsilon)
    spent: list[list] = [[] for _ in fx.sites]
    for r in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for i, (x, y) in enumerate(fx.sites):
            head = load_head_state(fx.eval.head(), global_state)
            res = _train(cfg, head, x, y, epochs=cfg.local_epochs, sigma=sigmas[i],
                         seed=seed * 1_000_003 + 1000 * r + i)
            spent[i] += res.mechanisms
            states.append(head_state(head))
            weights.append(len(y))
        global_state = fedavg(states, weights)
    eps = max(epsilon(m, delta=cfg.target_delta) for m in spent) if dp else None
    return {"state": global_state, "epsilon_spent": eps,
            "noise_multiplier": max(sigmas) if dp else None}


def run_centralized(fx: Fixture, target_epsilon: float, seed: int) -> dict:
    cfg = fx.cfg
    x, y = fx.pooled()
    epochs = cfg.num_rounds * cfg.local_epochs
    dp = math.isfinite(target_epsilon)
    sigma = fx.sigma(target_epsilon, len(y), epochs)[0] if dp else None
    head = fx.eval.head()
    res = _train(cfg, head, x, y, epochs=epochs, sigma=sigma, seed=seed * 1_000_003)
    eps = epsilon(res.mechanisms, delta=cfg.target_delta) if dp else None
    return {"state": head_state(head), "epsilon_spent": eps, "noise_multiplier": sigma}


def run(cfg: RunConfig, *, epsilons, seeds, fx: Fixture | None = None) -> dict:
    """Returns the ``privacy_utility`` rows, their summary and the setting."""
    fx = fx or Fixture(cfg)
    rows = []
    for seed in seeds:
        for eps in epsilons:
            for setting, fn in (("federated", run_federated), ("centralized", run_centralized)):
                out = fn(fx, eps, seed)
                m = fx.eval.metrics(out["state"])
                rows.append({"epsilon": eps if math.isfinite(eps) else None,
                             "epsilon_label": f"{eps:g}" if math.isfinite(eps) else "inf",
                             "setting": setting, "seed": seed,
                             "auc": m["test"]["auc"], "accuracy": m["test"]["accuracy"],
                             "balanced_accuracy": m["test"]["balanced_accuracy"],
                             "val_auc": m["val"]["auc"],
                             "epsilon_spent": out["epsilon_spent"],
                             "noise_multiplier": out["noise_multiplier"]})
                log.info("privacy-utility seed %d ε=%s %s: test AUC %.3f acc %.3f", seed,
                         rows[-1]["epsilon_label"], setting, rows[-1]["auc"], rows[-1]["accuracy"])
    return {"rows": rows, "summary": summarise(rows),
            "setting": {"num_sites": cfg.num_sites, "partitioner": cfg.partitioner,
                        "dirichlet_alpha": cfg.dirichlet_alpha, "rounds": cfg.num_rounds,
                        "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                        "learning_rate": cfg.lr, "momentum": cfg.momentum,
                        "clip_norm": cfg.clip_norm, "delta": cfg.target_delta,
                        "backbone": cfg.backbone, "image_size": cfg.image_size,
                        "head": cfg.head,
                        "site_records": [int(len(y)) for _, y in fx.sites],
                        "path": "function-level (client.round + common.models.training), not Flower",
                        "hyperparameters": "simulations/configs/pneumonia.toml, chosen on val"},
            "reference": REFERENCE}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation, min and max over seeds per (ε, setting)."""
    out = []
    keys = sorted({(r["epsilon_label"], r["setting"]) for r in rows},
                  key=lambda k: (float(k[0]), k[1]))
    for label, setting in keys:
        group = [r for r in rows if r["epsilon_label"] == label and r["setting"] == setting]
        entry = {"epsilon_label": label, "setting": setting, "seeds": len(group)}
        for metric in ("auc", "accuracy"):
            v = np.array([r[metric] for r in group], dtype=float)
            entry[metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1
                             else 0.0, "min": float(v.min()), "max": float(v.max())}
        out.append(entry)
    return out

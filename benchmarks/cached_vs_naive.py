"""1. Cached features against the naive loop.

*Naive* (the Flower Opacus example, MEDfl): the frozen backbone runs inside
every DP-SGD step, on every Poisson batch, in every round. *Ours*: the site
computes its features once (on-disk cache, keyed by backbone and data), then
runs DP-SGD on the head only; later rounds read the cache.

Both arms see the same records, the same σ, q and steps (so the same ε), the
same seeds (so the same Poisson batches and noise draws) and the same number
of rounds. Rounds alternate between the arms so that load from other
processes on the machine hits both alike; the speedup is a ratio of times
measured in this one process.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.memory import PeakSampler
from common.data.datasets import fingerprint_arrays
from common.models import training
from common.models.backbones import Backbone, get_backbone, preprocess
from common.models.features import cached_features
from common.models.heads import head_state, load_head_state, make_head
from common.privacy.accounting import calibrate_noise_multiplier, dp_plan, epsilon

log = logging.getLogger(__name__)


def backbone_features(module: nn.Module | None, x: torch.Tensor, image_size: int,
                      device: str) -> torch.Tensor:
    """The same features :meth:`Backbone.extract` computes, for one batch in the loop."""
    if module is None:  # identity backbone
        return x.reshape(len(x), -1).to(device)
    with torch.inference_mode():
        f = module(preprocess(x.cpu().numpy(), image_size).to(device))
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))
        f = nn.functional.normalize(f.flatten(1).float(), dim=1)
    return f.clone()  # leave inference mode: Opacus's hooks need a normal tensor


def naive_train_dp(module: nn.Module | None, image_size: int, head: nn.Module, images: np.ndarray,
                   labels: np.ndarray, *, epochs: int, batch_size: int, lr: float,
                   momentum: float, noise_multiplier: float, clip_norm: float, seed: int,
                   device: str = "cpu") -> training.TrainResult:
    """DP-SGD with the frozen backbone inside every step (the naive loop).

    The same :func:`training.train_dp` as the cached arm (same loader seed,
    noise generator and clipping mode), except that each Poisson batch of raw
    images goes through the backbone before the head sees it.
    """
    if module is not None:
        module.to(device).eval()
    return training.train_dp(
        head, images, labels, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, seed=seed, device=device,
        inputs=lambda x: backbone_features(module, x, image_size, device))


def subset(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not n or n >= len(y):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    return x[idx], y[idx]


def run(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
        backbone_name: str, image_size: int, head_name: str, rounds: int, epochs: int,
        batch_size: int, lr: float, momentum: float, clip_norm: float, target_epsilon: float,
        delta: float, seed: int = 0, device: str = "cpu", work_dir: Path | None = None,
        eval_cache_dir: Path | None = None) -> dict:
    """Both arms, rounds interleaved; returns the ``cached_vs_naive`` results block."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    q, steps = dp_plan(len(train_y), batch_size=batch_size, epochs=epochs)
    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                       sample_rate=q, steps=steps * rounds)
    # Test features for evaluating both arms (the server's job, not timed as
    # client work); the same features for both, from the server's cache.
    eval_backbone = get_backbone(backbone_name, image_size)
    test_f = cached_features(eval_backbone, test_x, device=device,
                             data_fingerprint=fingerprint_arrays(test_x, test_y) + ":test",
                             cache_dir=eval_cache_dir or work_dir or tempfile.gettempdir()
                             ).features
    # The naive client loads its backbone once and keeps it (kinder to naive
    # than the Flower example, which rebuilds the model every round).
    naive_backbone = get_backbone(backbone_name, image_size)
    t_load = time.perf_counter()
    naive_module = naive_backbone.module()
    naive_load_s = time.perf_counter() - t_load
    init = make_head(head_name, in_dim=test_f.shape[1], num_classes=num_classes, seed=seed)
    heads = {"naive": head_state(init), "cached": head_state(init)}
    times: dict[str, list[float]] = {"naive": [], "cached": []}
    feature_s: list[float] = []
    mech_seen: dict[str, list] = {"naive": [], "cached": []}
    fingerprint = fingerprint_arrays(train_x, train_y) + ":bench-train"
    with tempfile.TemporaryDirectory(dir=work_dir) as cache_dir, PeakSampler() as mem:
        for r in range(1, rounds + 1):
            round_seed = seed + 1000 * r
            with mem.measure("naive"):
                t0 = time.perf_counter()
                head = load_head_state(make_head(head_name, in_dim=test_f.shape[1],
                                                 num_classes=num_classes), heads["naive"])
                res = naive_train_dp(naive_module, image_size, head, train_x, train_y,
                                     epochs=epochs, batch_size=batch_size, lr=lr,
                                     momentum=momentum, noise_multiplier=sigma,
                                     clip_norm=clip_norm, seed=round_seed, device=device)
                heads["naive"] = head_state(head)
                times["naive"].append(time.perf_counter() - t0 + (naive_load_s if r == 1 else 0))
                mech_seen["naive"] += res.mechanisms
            with mem.measure("cached"):
                t0 = time.perf_counter()
                # A fresh Backbone object per round, as a site builds it: a cache
                # hit never loads the weights.
                backbone: Backbone = get_backbone(backbone_name, image_size)
                feats = cached_features(backbone, train_x, data_fingerprint=fingerprint,
                                        cache_dir=cache_dir, device=device)
                head = load_head_state(make_head(head_name, in_dim=test_f.shape[1],
                                                 num_classes=num_classes), heads["cached"])
                res = training.train_dp(head, feats.features, train_y, epochs=epochs,
                                        batch_size=batch_size, lr=lr, momentum=momentum,
                                        noise_multiplier=sigma, clip_norm=clip_norm,
                                        seed=round_seed, device=device)
                heads["cached"] = head_state(head)
                times["cached"].append(time.perf_counter() - t0)
                feature_s.append(feats.seconds)
                mech_seen["cached"] += res.mechanisms
            log.info("cached vs naive: round %d/%d naive %.2f s, cached %.2f s (features %.2f s, "
                     "hit=%s)", r, rounds, times["naive"][-1], times["cached"][-1], feats.seconds,
                     feats.hit)
    metrics = {}
    for arm in ("naive", "cached"):
        head = load_head_state(make_head(head_name, in_dim=test_f.shape[1],
                                         num_classes=num_classes), heads[arm])
        metrics[arm] = training.evaluate(head, test_f, test_y)
    speedup = [n / c for n, c in zip(times["naive"], times["cached"], strict=True)]
    after = speedup[1:]
    return {
        "description": ("naive: frozen backbone forward inside every DP-SGD step; cached: "
                        "features computed once and cached, DP-SGD on the head only"),
        "setting": {"records": int(len(train_y)), "test_records": int(len(test_y)),
                    "backbone": backbone_name, "image_size": image_size, "head": head_name,
                    "rounds": rounds, "local_epochs": epochs, "batch_size": batch_size,
                    "learning_rate": lr, "momentum": momentum, "clip_norm": clip_norm,
                    "noise_multiplier": sigma, "sample_rate": q, "steps_per_round": steps,
                    "device": device},
        "epsilon": {arm: epsilon(m, delta=delta) for arm, m in mech_seen.items()},
        "delta": delta,
        "seconds_per_round": times,
        "feature_seconds_per_round_cached": feature_s,
        "total_seconds": {arm: sum(t) for arm, t in times.items()},
        "speedup_per_round": speedup,
        "speedup_after_round1_median": float(np.median(after)) if after else None,
        "speedup_total": sum(times["naive"]) / sum(times["cached"]),
        "peak_memory": {arm: mem.report(arm) for arm in ("naive", "cached")},
        "auc": {arm: metrics[arm]["auc"] for arm in metrics},
        "accuracy": {arm: metrics[arm]["accuracy"] for arm in metrics},
    }

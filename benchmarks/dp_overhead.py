"""2. DP overhead on cached features: Opacus DP-SGD against plain SGD.

For a linear and an MLP head on the same cached features, the same epochs and
batch size: plain SGD (:func:`common.models.training.train_plain`), DP-SGD with
per-sample gradients from ``hooks``, and DP-SGD with ``ghost`` clipping
(:func:`common.models.training.train_dp`). Each timing is the minimum of several
repeats (as ``timeit`` advises: load from other processes only ever adds
time), the median is kept too, and the arms are interleaved within each
repeat so that load hits them alike. The DP time includes ``make_private``
(a site pays it every round).
"""

from __future__ import annotations

import logging
import statistics

import numpy as np

from common.models import training
from common.models.heads import make_head

log = logging.getLogger(__name__)

ARMS = ("plain", "hooks", "ghost")


def _time_arm(arm: str, head_name: str, x: np.ndarray, y: np.ndarray, *, epochs: int,
              batch_size: int, lr: float, momentum: float, sigma: float, clip: float,
              hidden_dim: int, seed: int, device: str) -> float:
    head = make_head(head_name, in_dim=x.shape[1], num_classes=int(y.max()) + 1,
                     hidden_dim=hidden_dim, seed=seed)
    if arm == "plain":
        res = training.train_plain(head, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                   momentum=momentum, seed=seed, device=device)
    else:
        res = training.train_dp(head, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                momentum=momentum, noise_multiplier=sigma, clip_norm=clip,
                                seed=seed, device=device, grad_sample_mode=arm)
    return res.seconds


def auto_choice(head_name: str, hidden_dim: int = 128) -> str:
    """What ``train_dp(grad_sample_mode='auto')`` picks for this head."""
    import torch

    head = make_head(head_name, in_dim=4, num_classes=2, hidden_dim=hidden_dim)
    return "hooks" if isinstance(head, torch.nn.Linear) else "ghost"


def run(x: np.ndarray, y: np.ndarray, *, heads: tuple[str, ...] = ("linear", "mlp"),
        batch_sizes: tuple[int, ...] = (64, 256), epochs: int = 5, repeats: int = 3,
        lr: float = 0.5, momentum: float = 0.5, sigma: float = 1.0, clip: float = 1.0,
        hidden_dim: int = 128, device: str = "cpu") -> dict:
    """Returns the ``dp_overhead`` results block (ratios to plain SGD, per head)."""
    out: dict = {"setting": {"records": int(len(y)), "feature_dim": int(x.shape[1]),
                             "epochs": epochs, "repeats": repeats, "hidden_dim": hidden_dim,
                             "device": device, "statistic": "minimum seconds per call over repeats (median also kept)"}}
    for head_name in heads:
        rows = []
        for bs in batch_sizes:
            secs: dict[str, list[float]] = {a: [] for a in ARMS}
            # one untimed warm-up call per arm (imports, Opacus's first wrap)
            for arm in ARMS:
                _time_arm(arm, head_name, x, y, epochs=1, batch_size=bs, lr=lr,
                          momentum=momentum, sigma=sigma, clip=clip, hidden_dim=hidden_dim,
                          seed=0, device=device)
            for rep in range(repeats):
                order = ARMS if rep % 2 == 0 else ARMS[::-1]
                for arm in order:
                    secs[arm].append(_time_arm(arm, head_name, x, y, epochs=epochs,
                                               batch_size=bs, lr=lr, momentum=momentum,
                                               sigma=sigma, clip=clip, hidden_dim=hidden_dim,
                                               seed=rep, device=device))
            med = {a: min(v) for a, v in secs.items()}
            median = {a: statistics.median(v) for a, v in secs.items()}
            fastest = min(("hooks", "ghost"), key=lambda a: med[a])
            rows.append({"batch_size": bs, "seconds": med, "median_seconds": median,
                         "all_seconds": secs,
                         "median_ratio_hooks": median["hooks"] / median["plain"],
                         "median_ratio_ghost": median["ghost"] / median["plain"],
                         "ratio_hooks": med["hooks"] / med["plain"],
                         "ratio_ghost": med["ghost"] / med["plain"],
                         "fastest_dp": fastest})
            log.info("DP overhead %s head, batch %d: plain %.3f s, hooks %.3f s (x%.2f), "
                     "ghost %.3f s (x%.2f)", head_name, bs, med["plain"], med["hooks"],
                     med["hooks"] / med["plain"], med["ghost"], med["ghost"] / med["plain"])
        auto = auto_choice(head_name, hidden_dim)
        votes = [r["fastest_dp"] for r in rows]
        best = max(set(votes), key=votes.count)
        out[head_name] = {
            "rows": rows,
            "auto_choice": auto,
            "fastest_measured": best,
            "auto_is_fastest": auto == best,
            "ratio_auto": float(np.median([r[f"ratio_{auto}"] for r in rows])),
            "ratio_hooks": float(np.median([r["ratio_hooks"] for r in rows])),
            "ratio_ghost": float(np.median([r["ratio_ghost"] for r in rows])),
        }
    return out

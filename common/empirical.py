"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023).

``m`` canaries are built, each included in the training set independently with
probability ½. After one training run, the auditor scores every canary for
membership and guesses "in" for the ``k`` highest scores and "out" for the
``k`` lowest, abstaining on the rest. Under (ε, δ)-DP the number of correct
guesses is dominated by Binomial(r, e^ε / (1 + e^ε)) plus a δ term (the
paper's Theorem 5.2), which gives a p-value for each ε and so a lower bound
on ε at a chosen confidence. It is a check that the implementation is sound,
never a certificate: the lower bound must stay below the claimed upper bound.

Canaries here are crafted inputs for a site's head on its cached features.
The feature vector is widened by ``m`` coordinates that are zero for every
real record, and canary ``i`` is the scaled unit vector on coordinate
``d + i`` with a random label. Its gradient then touches only its own column of
the head's first layer (a "Dirac" canary), which is the strongest input-space
canary for this model. Membership is scored white-box, by how much the
canary's loss fell from the initial to the final head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)


# --------------------------------------------------------------------------
# The statistics (pure)
# --------------------------------------------------------------------------
def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct out of r guesses] under (ε, δ)-DP, m canaries (Theorem 5.2).

    The ε part is the upper tail of Binomial(r, e^ε/(1+e^ε)); the δ part adds
    ``2 m δ · max_i P[v - i ≤ Binomial < v] / i``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        below = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= Bin < v]
        alpha = float(np.max(below / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Largest ε rejected at ``confidence``: the mechanism is not (ε, δ)-DP.

    Returns 0 when not even ε = 0 can be rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if r == 0 or p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def count_guesses(scores: np.ndarray, included: np.ndarray, *, k: int) -> tuple[int, int]:
    """Guess "in" for the ``k`` highest scores, "out" for the ``k`` lowest.

    Returns ``(r, v)``: guesses made and correct guesses.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape:
        raise ValueError(f"{scores.shape} scores for {included.shape} canaries")
    if not 0 <= 2 * k <= len(scores):
        raise ValueError(f"k={k} needs 2k <= m = {len(scores)}")
    order = np.argsort(scores, kind="stable")
    out_idx, in_idx = order[:k], order[len(order) - k:]
    v = int(included[in_idx].sum() + (~included[out_idx]).sum())
    return 2 * k, v


@dataclass(frozen=True)
class GuessResult:
    epsilon_lower: float
    ceiling: float  # ε_lower if every one of the r guesses were right
    r: int
    v: int
    m: int
    confidence: float
    tests: int  # guess sizes tried (Bonferroni-corrected)


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 confidence: float = 0.95,
                 fractions: tuple[float, ...] = GUESS_FRACTIONS) -> GuessResult:
    """ε lower bound from membership scores.

    The guess sizes ``k = fraction · m / 2`` are fixed in advance and the
    confidence is split across them (Bonferroni), so picking the best one does
    not inflate the bound.
    """
    m = len(scores)
    per_test = 1.0 - (1.0 - confidence) / len(fractions)
    best = None
    for f in fractions:
        k = max(1, int(round(f * m / 2)))
        r, v = count_guesses(scores, included, k=k)
        eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=per_test)
        if best is None or eps > best[0]:
            best = (eps, r, v)
    eps, r, v = best
    ceil = epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=per_test)
    return GuessResult(epsilon_lower=eps, ceiling=ceil, r=r, v=v, m=m, confidence=confidence,
                       tests=len(fractions))


# --------------------------------------------------------------------------
# Canaries on a head (torch)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class CanaryRun:
    dp: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_claimed: float | None  # PRV upper bound for this very training run
    delta: float
    epsilon_lower: float
    ceiling: float
    r: int
    v: int
    m: int
    confidence: float
    train_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def add_canaries(features: np.ndarray, labels: np.ndarray, *, m: int, num_classes: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Widen features by ``m`` canary coordinates and draw which canaries are in.

    Returns ``(train_x, train_y, included, canary_x, canary_y)``.
    """
    if m < 2:
        raise ValueError(f"need at least 2 canaries, got m={m}")
    rng = np.random.default_rng(seed)
    n, d = features.shape
    scale = float(np.median(np.linalg.norm(features, axis=1))) or 1.0
    canary_x = np.zeros((m, d + m), dtype=np.float32)
    canary_x[np.arange(m), d + np.arange(m)] = scale
    canary_y = rng.integers(0, num_classes, m)
    included = rng.random(m) < 0.5
    real_x = np.concatenate([features.astype(np.float32), np.zeros((n, m), np.float32)], axis=1)
    train_x = np.concatenate([real_x, canary_x[included]])
    train_y = np.concatenate([labels, canary_y[included]])
    return train_x, train_y, included, canary_x, canary_y


def _canary_losses(head, canary_x: np.ndarray, canary_y: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        head.eval()
        logits = head(torch.as_tensor(canary_x))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(canary_y, dtype=torch.long),
                                                 reduction="none")
    return loss.numpy().astype(float)


def run_canaries(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                 noise_multiplier: float, clip_norm: float, batch_size: int, epochs: int,
                 learning_rate: float, delta: float, m: int = 1000, head: str = "linear",
                 hidden_dim: int = 128, seed: int = 0, confidence: float = 0.95) -> CanaryRun:
    """Train a head once with canaries and return ε_lower next to the claimed ε.

    ``noise_multiplier = 0`` is the non-private control: plain SGD, no clipping.
    """
    import torch
    from torch import nn

    from common import training
    from common.heads import make_head
    from common.privacy import ADD_REMOVE, dp_plan, epsilon

    train_x, train_y, included, canary_x, canary_y = add_canaries(
        features, labels, m=m, num_classes=num_classes, seed=seed)
    model = make_head(head, in_dim=train_x.shape[1], num_classes=num_classes,
                      hidden_dim=hidden_dim, seed=seed)
    first = next(mod for mod in model.modules() if isinstance(mod, nn.Linear))
    d = features.shape[1]
    with torch.no_grad():
        first.weight[:, d:] = 0.0  # canary columns start at zero: no signal before training
    # The same labels on an all-zero input isolate what the bias alone did, so
    # the score is the canary's own column's effect (white-box).
    null_x = np.zeros_like(canary_x)
    before = _canary_losses(model, canary_x, canary_y) - _canary_losses(model, null_x, canary_y)
    dp = noise_multiplier > 0
    if dp:
        res = training.train_dp(model, train_x, train_y, epochs=epochs, batch_size=batch_size,
                                lr=learning_rate, noise_multiplier=noise_multiplier,
                                clip_norm=clip_norm, seed=seed)
        # The one-run test's game adds or removes canaries: compare with add/remove ε.
        claimed = epsilon(res.mechanisms, delta=delta, neighbours=ADD_REMOVE)
        q, steps = res.mechanisms[0].sample_rate, sum(x.steps for x in res.mechanisms)
    else:
        res = training.train_plain(model, train_x, train_y, epochs=epochs, batch_size=batch_size,
                                   lr=learning_rate, seed=seed)
        claimed = None
        q, steps = dp_plan(len(train_y), batch_size=batch_size, epochs=epochs)[0], res.steps
    after = _canary_losses(model, canary_x, canary_y) - _canary_losses(model, null_x, canary_y)
    scores = before - after  # loss drop: higher = "in"
    g = audit_scores(scores, included, delta=delta, confidence=confidence)
    if claimed is not None and g.epsilon_lower > claimed:
        log.error("empirical ε_lower %.3f exceeds the claimed upper bound %.3f: a privacy bug",
                  g.epsilon_lower, claimed)
    return CanaryRun(dp=dp, noise_multiplier=noise_multiplier, sample_rate=q, steps=steps,
                     epsilon_claimed=claimed, delta=delta, epsilon_lower=g.epsilon_lower,
                     ceiling=g.ceiling, r=g.r, v=g.v, m=m, confidence=confidence,
                     train_loss=res.loss)


# --------------------------------------------------------------------------
# On a run directory
# --------------------------------------------------------------------------
def audit_run_site(run_dir, summary: dict, *, site: str | None = None, m: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> dict:
    """Canary audit of one site of a run: the DP run and a non-private control.

    The site's real training records (their cached features) are used with the
    run's σ, clip norm, batch size, learning rate and as many epochs as the
    whole run gave the site (local epochs × rounds).
    """
    import tomllib
    from pathlib import Path

    from common.backbones import get_backbone
    from common.config import parse_config
    from common.data import load_dataset, site_data
    from common.features import cached_features
    from common.training import resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ValueError(f"the empirical audit needs a run directory with config.toml; {run_dir} "
                         "has none")
    cfg = parse_config(tomllib.loads((run_dir / "config.toml").read_text()))
    if cfg.mode != "federated" or not cfg.dp:
        raise ValueError(f"the empirical audit needs a federated DP run; {run_dir} has "
                         f"mode={cfg.mode}, dp={cfg.dp}")
    sites = {k: v for k, v in (summary.get("sites") or {}).items() if v.get("history")}
    if not sites:
        raise ValueError(f"{run_dir}/summary.json has no site that trained")
    site = site if site is not None else sorted(sites, key=lambda s: int(s) if s.isdigit() else 0)[0]
    if site not in sites:
        raise ValueError(f"site {site!r} did not train in {run_dir}; sites that did: "
                         f"{', '.join(sorted(sites))}")
    sigma = float(sites[site]["history"][-1]["noise_multiplier"])
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed)
    data = site_data(splits, site_id=int(site), num_sites=cfg.num_sites,
                     partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                     holdout=cfg.site_holdout, shift=cfg.site_shift, seed=cfg.seed)
    feats = cached_features(get_backbone(cfg.backbone, cfg.image_size), data.train_x,
                            cache_dir=cfg.cache_dir, device=resolve_device(cfg.device),
                            data_fingerprint=data.fingerprint + ":train").features
    common_args = dict(num_classes=data.num_classes, clip_norm=cfg.clip_norm,
                       batch_size=cfg.batch_size, epochs=cfg.local_epochs * cfg.num_rounds,
                       learning_rate=cfg.learning_rate, delta=cfg.target_delta, m=m,
                       head=cfg.head, hidden_dim=cfg.hidden_dim, seed=seed, confidence=confidence)
    log.info("empirical audit of site %s: %d records, %d canaries, σ=%.3f", site, len(feats), m,
             sigma)
    private = run_canaries(feats, data.train_y, noise_multiplier=sigma, **common_args)
    control = run_canaries(feats, data.train_y, noise_multiplier=0.0, **common_args)
    return {"run": str(run_dir), "site": site, "records": int(len(feats)),
            "site_epsilon": sites[site].get("epsilon"), "dp": private.to_dict(),
            "control": control.to_dict(),
            "method": ("Steinke, Nasr & Jagielski 2023, one training run: m canaries each "
                       "included with probability 1/2, white-box loss-drop scores, guesses on the "
                       f"top/bottom k for k fixed in advance (Bonferroni over {len(GUESS_FRACTIONS)} "
                       f"sizes), {confidence:.0%} confidence. A lower bound, not a certificate.")}

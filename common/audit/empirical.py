"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023).

``m`` canaries are built, each included in the training set independently with
probability ½. After one training run, the auditor scores every canary for
membership and guesses "in" for the ``k`` highest scores and "out" for the
``k`` lowest, abstaining on the rest. Under (ε, δ)-DP the number of correct
guesses is dominated by Binomial(r, e^ε / (1 + e^ε)) plus a δ term (the
paper's Theorem 5.2), which gives a p-value for each ε and so a lower bound
on ε at a chosen confidence. It is a check that the implementation is sound,
never a certificate: the lower bound must stay below the claimed upper bound.

It audits the site's own mechanism: the σ, sample rate, steps and clip norm of
the site's ledger for the run, with Opacus's real DP-SGD (Poisson sampling,
per-sample clipping, Gaussian noise) on the site's real cached features.
Canaries are *gradient* canaries (the paper's white-box setting): canary ``i``
is a record whose per-sample gradient is a large multiple of the unit vector
on its own parameter ``c_i`` (an ``nn.Embedding`` row that no real record
touches), so after clipping it adds exactly ``C`` to ``c_i`` each time it is
sampled, and the noise adds ``N(0, σ²C²)`` each step. The final ``c_i`` is the
score: the strongest statistic for this mechanism, with no model in the way.

The non-DP control that always wins is gone. The controls are mis-calibrated
DP: the same training at σ/2 and σ/4 while claiming the ε of σ. The audit's
power is the smallest true-to-claimed ε ratio it catches at the confidence
level, reported with the number of canaries and the time it took.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from common.config import parse_config
from common.data.datasets import load_dataset, site_data
from common.models.backbones import get_backbone
from common.models.features import cached_features
from common.models.heads import make_head
from common.models.training import resolve_device
from common.privacy.accounting import ADD_REMOVE, Mechanism, epsilon

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
# Gradient canaries on the site's mechanism (torch, Opacus)
# --------------------------------------------------------------------------
CONTROL_DIVISORS = (2.0, 4.0)  # the mis-calibrated controls: σ/2 and σ/4 claiming σ's ε
# PLD's discretisation for the ε of a control: coarse keeps memory bounded at small σ
# (PRV at σ/32 of a demo site's σ took about 18 GB); pessimistic, so still an upper bound.
CONTROL_PLD_INTERVAL = 1e-2


@dataclass(frozen=True)
class MechanismRun:
    """One training run with gradient canaries, and what it proves."""

    label: str
    noise_multiplier: float  # σ that ran
    claimed_noise_multiplier: float  # σ whose ε is claimed
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    epsilon_true: float  # add/remove ε of what ran (the canary game adds or removes)
    epsilon_claimed: float  # add/remove ε of what is claimed
    epsilon_lower: float
    ceiling: float
    r: int
    v: int
    m: int
    confidence: float
    seconds: float

    @property
    def caught(self) -> bool:
        return self.epsilon_lower > self.epsilon_claimed

    def to_dict(self) -> dict:
        return {**asdict(self), "caught": self.caught}


def run_gradient_canaries(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                          noise_multiplier: float, sample_rate: float, steps: int,
                          clip_norm: float, delta: float, m: int = 1000,
                          learning_rate: float = 1.0, claimed_noise_multiplier: float | None = None,
                          label: str = "site mechanism", seed: int = 0,
                          confidence: float = 0.95) -> MechanismRun:
    """Train once with Opacus at exactly (σ, q, steps, C), with ``m`` gradient
    canaries each included with probability ½, and bound ε from below.

    ``claimed_noise_multiplier`` (default: σ) is the σ whose ε the run claims; a
    smaller σ that runs is a mis-calibrated control.
    """
    import time

    import torch
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch import nn
    from torch.utils.data import TensorDataset

    if m < 2:
        raise ValueError(f"need at least 2 canaries, got m={m}")
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    n, d = features.shape
    k = int(included.sum())
    x = np.concatenate([features.astype(np.float32), np.zeros((k, d), np.float32)])
    y = np.concatenate([labels.astype(np.int64), np.zeros(k, np.int64)])
    idx = np.concatenate([np.full(n, m), np.flatnonzero(included)]).astype(np.int64)
    flag = np.concatenate([np.zeros(n, np.float32), np.ones(k, np.float32)])

    class CanaryModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = make_head("linear", in_dim=d, num_classes=num_classes, seed=seed)
            self.canary = nn.Embedding(m + 1, 1)  # row m: the real records' (never moved)
            nn.init.zeros_(self.canary.weight)

        def forward(self, xb, ib):
            return self.head(xb), self.canary(ib).squeeze(-1)

    torch.manual_seed(seed)
    model = GradSampleModule(CanaryModel())
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=learning_rate),
                            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                            expected_batch_size=max(1, round(sample_rate * len(y))),
                            generator=torch.Generator().manual_seed(seed + 1))
    data = TensorDataset(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(idx),
                         torch.as_tensor(flag))
    loader = DPDataLoader(data, sample_rate=sample_rate,
                          generator=torch.Generator().manual_seed(seed + 2))
    # A canary's gradient is -scale on its own row: far above the clip norm, so it is
    # clipped to exactly C, the most one record may move the model.
    scale = 1e3 * clip_norm
    done = 0
    while done < steps:
        for xb, yb, ib, fb in loader:
            if done == steps:
                break
            optimizer.zero_grad()
            logits, c = model(xb, ib)
            ce = nn.functional.cross_entropy(logits, yb, reduction="none") if len(yb) else c
            loss = ((1 - fb) * ce - fb * scale * c).mean() if len(yb) else c.sum() * 0
            loss.backward()
            optimizer.step()
            done += 1
    scores = model._module.canary.weight.detach().numpy()[:m, 0].astype(float)
    g = audit_scores(scores, included, delta=delta, confidence=confidence)

    def eps(sigma: float) -> float:
        return epsilon([Mechanism(sigma, sample_rate, steps)], delta=delta, accountant="pld",
                       neighbours=ADD_REMOVE, interval=CONTROL_PLD_INTERVAL)

    run = MechanismRun(label=label, noise_multiplier=noise_multiplier,
                       claimed_noise_multiplier=claimed, sample_rate=sample_rate, steps=steps,
                       clip_norm=clip_norm, delta=delta, epsilon_true=eps(noise_multiplier),
                       epsilon_claimed=eps(claimed), epsilon_lower=g.epsilon_lower,
                       ceiling=g.ceiling, r=g.r, v=g.v, m=m, confidence=confidence,
                       seconds=time.perf_counter() - t0)
    if claimed == noise_multiplier and run.caught:
        log.error("empirical ε_lower %.3f exceeds the claimed upper bound %.3f: a privacy bug",
                  run.epsilon_lower, run.epsilon_claimed)
    return run


def audit_mechanism(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                    noise_multiplier: float, sample_rate: float, steps: int, clip_norm: float,
                    delta: float, m: int = 1000, seed: int = 0, confidence: float = 0.95,
                    divisors: tuple[float, ...] = CONTROL_DIVISORS) -> dict:
    """The site's mechanism and the mis-calibrated controls, with the audit's power."""
    common_args = dict(num_classes=num_classes, sample_rate=sample_rate, steps=steps,
                       clip_norm=clip_norm, delta=delta, m=m, confidence=confidence)
    honest = run_gradient_canaries(features, labels, noise_multiplier=noise_multiplier,
                                   seed=seed, **common_args)
    controls = [run_gradient_canaries(features, labels, noise_multiplier=noise_multiplier / k,
                                      claimed_noise_multiplier=noise_multiplier,
                                      label=f"σ/{k:g} claiming σ", seed=seed + 17 * (i + 1),
                                      **common_args)
                for i, k in enumerate(divisors)]
    caught = [c for c in controls if c.caught]
    ratio = min((c.epsilon_true / c.epsilon_claimed for c in caught), default=None)
    return {"mechanism": {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                          "steps": steps, "clip_norm": clip_norm, "delta": delta},
            "dp": honest.to_dict(), "controls": [c.to_dict() for c in controls],
            "power": {"smallest_ratio_caught": ratio, "canaries": m, "confidence": confidence,
                      "seconds": honest.seconds + sum(c.seconds for c in controls)}}


# --------------------------------------------------------------------------
# On a run directory
# --------------------------------------------------------------------------
def audit_run_site(run_dir, summary: dict, ledgers: dict, *, site: str | None = None,
                   m: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Canary audit of one site of a simulated run: its own mechanism, from its ledger
    (σ, q, steps and clip norm of the run's entries), on its real training records,
    next to the σ/2 and σ/4 controls. ``ledgers`` maps site id to that site's
    ledger entries (as the audit read them)."""
    import tomllib
    from pathlib import Path

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
    run_ids = {str(h.get("run_id") or summary.get("run_id")) for h in sites[site]["history"]}
    entries = [e for e in ledgers.get(site, []) if e.run_id in run_ids]
    if not entries:
        raise ValueError(f"site {site} has no ledger entries for this run under {run_dir}: the "
                         "empirical audit audits the mechanism the ledger recorded")
    if len({(e.noise_multiplier, e.sample_rate, e.clip_norm) for e in entries}) > 1:
        raise ValueError(f"site {site}'s entries for this run mix (σ, q, clip) values; the "
                         "one-run audit needs one mechanism")
    e0 = entries[0]
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed)
    data = site_data(splits, site_id=int(site), num_sites=cfg.num_sites,
                     partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                     holdout=cfg.site_holdout, shift=cfg.site_shift, seed=cfg.seed)
    feats = cached_features(get_backbone(cfg.backbone, cfg.image_size), data.train_x,
                            cache_dir=cfg.cache_dir, device=resolve_device(cfg.device),
                            data_fingerprint=data.fingerprint + ":train").features
    steps = sum(e.steps for e in entries)
    log.info("empirical audit of site %s: %d records, %d canaries, σ=%.3f, q=%.4f, %d steps",
             site, len(feats), m, e0.noise_multiplier, e0.sample_rate, steps)
    result = audit_mechanism(feats, data.train_y, num_classes=data.num_classes,
                             noise_multiplier=e0.noise_multiplier, sample_rate=e0.sample_rate,
                             steps=steps, clip_norm=e0.clip_norm, delta=e0.delta, m=m,
                             seed=seed, confidence=confidence)
    return {"run": str(run_dir), "site": site, "records": int(len(feats)),
            "site_epsilon": sites[site].get("epsilon"), **result,
            "method": ("Steinke, Nasr & Jagielski 2023, one training run, white-box gradient "
                       "canaries: m canaries each included with probability 1/2, each moving only "
                       "its own parameter by the clip norm when sampled, scored by that parameter; "
                       "guesses on the top/bottom k for k fixed in advance (Bonferroni over "
                       f"{len(GUESS_FRACTIONS)} sizes), {confidence:.0%} confidence. Controls: σ/2 "
                       "and σ/4 while claiming σ's ε. A lower bound, not a certificate; ε here is "
                       "for add/remove neighbours, the canary game's relation.")}

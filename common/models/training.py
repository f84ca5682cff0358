"""Training and evaluation steps for a head on cached features.

Plain functions: no Flower, no globals, no config lookups. The DP path uses
Opacus DP-SGD with Poisson sampling and returns the mechanism that actually
ran (read back from Opacus's own accountant), so the caller can record it.

Two units of privacy (:data:`common.privacy.accounting.PRIVACY_UNITS`):
:func:`train_dp` protects one record (one Opacus sample per record);
:func:`train_dp_patients` protects one patient (user-level DP-SGD, Charles et
al. 2024; Opacus issue #366): Poisson sampling over patients, one Opacus sample
per patient, a *bag* of at most ``max_records_per_patient`` of its records
(:class:`PatientBags`), whose loss is the mean over the bag
(:class:`BagCrossEntropy`), so Opacus's per-sample gradient is the patient's
gradient and is clipped once per patient.
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

from common.data.grouping import factorize
from common.privacy.accounting import PATIENT, PRV, RECORD, Mechanism
from common.protocol import MAX_CLASS_WEIGHT

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    loss: float
    seconds: float
    steps: int
    mechanisms: list[Mechanism] = field(default_factory=list)
    grad_sample_mode: str = ""
    # The unit of privacy of ``mechanisms`` (q is over these units), how many units the
    # site holds (its public count: records, or patients), and, for patients, the most
    # records of one patient a step used (the public cap).
    unit: str = RECORD
    units: int = 0
    max_records_per_patient: int = 0


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
    _check_dp(noise_multiplier, clip_norm)
    grad_sample_mode = _grad_sample_mode(head, grad_sample_mode)
    if seed is None:
        seed = secrets.randbits(62)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    head.to(device).train()
    loader = _loader(features, labels, batch_size, seed)
    crit = make_criterion(class_weights).to(device)

    def run_epoch(model, dp_loader, dp_opt, dp_crit):
        return train_epoch(model, dp_loader, dp_opt, dp_crit, device, inputs)

    loss, steps, mechanisms = _run_private(
        head, loader, crit, run_epoch, epochs=epochs, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, seed=seed, device=device,
        grad_sample_mode=grad_sample_mode)
    return TrainResult(loss=loss, seconds=time.perf_counter() - t0, steps=steps,
                       mechanisms=mechanisms, grad_sample_mode=grad_sample_mode, unit=RECORD,
                       units=len(labels))


def _check_dp(noise_multiplier: float, clip_norm: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for DP training, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")


def _grad_sample_mode(model: nn.Module, requested: str) -> str:
    """``auto``: ``hooks`` for a linear head, ``ghost`` clipping otherwise."""
    if requested == "auto":
        return "hooks" if isinstance(model, nn.Linear) else "ghost"
    return requested


def _run_private(model: nn.Module, loader: DataLoader, crit: nn.Module, run_epoch, *, epochs: int,
                 lr: float, momentum: float, noise_multiplier: float, clip_norm: float, seed: int,
                 device: str, grad_sample_mode: str) -> tuple[float, int, list[Mechanism]]:
    """Opacus around ``model``: Poisson sampling over ``loader``'s dataset (records,
    or patients), per-sample clipping, noise; ``run_epoch(model, loader, optimizer,
    criterion)`` runs one epoch of the wrapped objects. Returns the last epoch's
    loss, the steps taken and the mechanisms Opacus recorded."""
    # lazy: Opacus costs ~1.3 s to import (docs: ENVIRONMENT.md); only DP runs need it
    from opacus import PrivacyEngine

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    with warnings.catch_warnings():
        # Opacus warns that secure RNG is off; the ledger records secure_rng = False
        # and the audit flags it, so the warning is not repeated on every round.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # Opacus's own accountant is scratch space (see below); ε comes from the ledger.
        engine = PrivacyEngine(accountant=PRV, secure_mode=SECURE_RNG)
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        kwargs = dict(module=model, optimizer=opt, data_loader=loader,
                      noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                      poisson_sampling=True, noise_generator=noise_gen,
                      grad_sample_mode=grad_sample_mode)
        if grad_sample_mode == "ghost":
            private, dp_opt, dp_crit, dp_loader = engine.make_private(criterion=crit, **kwargs)
        else:
            private, dp_opt, dp_loader = engine.make_private(**kwargs)
            dp_crit = crit
        loss, steps = float("nan"), 0
        for _ in range(epochs):
            stats = run_epoch(private, dp_loader, dp_opt, dp_crit)
            loss, steps = stats["loss"], steps + stats["steps"]
    mechanisms = [Mechanism(noise_multiplier=s, sample_rate=q, steps=n)
                  for s, q, n in engine.accountant.history]
    # Unwrap so the caller gets back a plain module with the trained weights.
    if hasattr(private, "_close"):
        private._close()
    model.cpu()
    return loss, steps, mechanisms


# Bags are padded to max_records_per_patient (a public setting, so a step's shapes do not
# depend on how many records the site's patients have) with this label, which
# BagCrossEntropy masks out: a padded slot adds exactly zero to every gradient.
PAD_LABEL = -100


class PatientBags:
    """A site's training records grouped by patient, drawn as bags.

    ``draw(patients)`` returns, for each patient index, a bag of at most
    ``max_records_per_patient`` of that patient's records: all of them when the
    patient has no more, else a uniformly random subset of exactly that size,
    drawn afresh on every call (every step). Bags are padded to the cap with
    zeros and :data:`PAD_LABEL`. Patients are numbered by
    :func:`common.data.grouping.factorize` (order of first appearance).

    Raises:
        ValueError: mismatched lengths, non-finite features, a missing patient id,
            or a cap below 1.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, groups, *,
                 max_records_per_patient: int, device: str = "cpu"):
        if len(features) != len(labels) or len(labels) != len(groups):
            raise ValueError(f"{len(features)} feature rows, {len(labels)} labels and "
                             f"{len(groups)} patient ids: one of each per record")
        if not len(labels):
            raise ValueError("patient-level training needs at least one record")
        if int(max_records_per_patient) != max_records_per_patient or max_records_per_patient < 1:
            raise ValueError(f"max_records_per_patient must be an integer >= 1, "
                             f"got {max_records_per_patient!r}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or Inf")
        if np.asarray(labels).min() < 0:
            raise ValueError("labels must be class indices >= 0")
        inverse, count = factorize(groups)
        sizes = np.bincount(inverse, minlength=count)
        self.cap = int(max_records_per_patient)
        self.num_patients, self.num_records = count, len(labels)
        self.device = device
        self.x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
        self.y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        self._by_patient = torch.as_tensor(np.argsort(inverse, kind="stable"))
        self._sizes = torch.as_tensor(sizes)
        self._starts = torch.as_tensor(np.cumsum(sizes) - sizes)

    def sizes(self) -> np.ndarray:
        """Records per patient (private: for the site's own log and tests)."""
        return self._sizes.numpy().copy()

    def draw_indices(self, patients: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(B, cap)`` record indices of each patient's bag, -1 where padded."""
        patients = torch.as_tensor(patients, dtype=torch.long).reshape(-1).cpu()
        sizes = self._sizes[patients]
        seg = torch.repeat_interleave(torch.arange(len(patients)), sizes)  # bag of each row
        pos = torch.arange(len(seg)) - (torch.cumsum(sizes, 0) - sizes)[seg]  # rank in its bag
        rec = self._by_patient[self._starts[patients][seg] + pos]
        # Shuffle within each bag: integer bag index plus a uniform key in [0, 1) sorts
        # the bags in place and each bag's records uniformly at random; keeping the
        # first ``cap`` of a bag is a uniform random subset of that size.
        keys = seg.to(torch.float64) + torch.rand(len(seg), generator=generator,
                                                  dtype=torch.float64)
        rec = rec[torch.argsort(keys)]
        keep = pos < self.cap
        out = torch.full((len(patients), self.cap), -1, dtype=torch.long)
        out[seg[keep], pos[keep]] = rec[keep]
        return out

    def draw(self, patients: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: bags ``(B, cap, *feature shape)`` and labels ``(B, cap)``."""
        return self.gather(self.draw_indices(patients, generator))

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bags of :meth:`draw_indices`'s indices: zeros and :data:`PAD_LABEL` at -1."""
        idx = idx.to(self.device)
        real = idx >= 0
        x = self.x[idx.clamp(min=0)]
        x[~real] = 0.0
        y = torch.where(real, self.y[idx.clamp(min=0)], PAD_LABEL)
        return x, y


class BagCrossEntropy(nn.Module):
    """A patient's loss: the mean cross-entropy over the real records of its bag.

    Input ``(B, K, C)`` logits and ``(B, K)`` labels, :data:`PAD_LABEL` where a
    bag is padded. The per-patient loss divides by that patient's own record
    count (at most the cap), so its gradient is a function of that patient's
    records alone, and Opacus clips it once per patient. ``class_weights``
    weight each record's term by its class as :class:`WeightedCrossEntropy`
    does. ``reduction`` is an attribute because Opacus's ghost clipping sets
    it to ``"none"`` to read per-patient losses.
    """

    def __init__(self, weights: torch.Tensor | np.ndarray | list[float] | None = None):
        super().__init__()
        w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.register_buffer("weights", w)
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        real = target != PAD_LABEL
        t = torch.where(real, target, 0)
        per_record = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                     reduction="none").reshape(t.shape)
        if self.weights is not None:
            per_record = self.weights[t] * per_record
        # where(), not a product: a padded slot's term and its gradient are exactly 0.
        per_patient = (torch.where(real, per_record, 0.0).sum(dim=1)
                       / real.sum(dim=1).clamp(min=1))
        if self.reduction == "none":
            return per_patient
        return per_patient.sum() if self.reduction == "sum" else per_patient.mean()


def train_bag_epoch(model: nn.Module, loader, bags: PatientBags, optimizer, criterion,
                    generator: torch.Generator) -> dict[str, float]:
    """One pass over ``loader``'s patient indices: each step draws the sampled
    patients' bags from ``bags`` and takes a step on the mean per-patient loss."""
    model.train()
    total, n, steps = 0.0, 0, 0
    for (patients,) in loader:
        x, y = bags.draw(patients, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        steps += 1
        if len(y):
            total += float(loss.detach()) * len(y)
            n += len(y)
    return {"loss": total / max(n, 1), "steps": steps}


def train_dp_patients(model: nn.Module, features: np.ndarray, labels: np.ndarray, *,
                      groups, max_records_per_patient: int, epochs: int, batch_size: int,
                      lr: float, noise_multiplier: float, clip_norm: float,
                      momentum: float = 0.0, seed: int | None = None, device: str = "cpu",
                      grad_sample_mode: str = "auto",
                      class_weights: list[float] | None = None) -> TrainResult:
    """Patient-level DP-SGD with Opacus: the unit of privacy is one patient.

    ``groups`` holds each record's patient id (any hashable; read only to
    group). Opacus's Poisson sampler draws *patients*, each with probability
    ``q = 1 / ceil(P / batch_size)`` (``batch_size``: expected patients per
    step; ``P``: the site's patients, its public count), and each sampled
    patient is one Opacus sample: a bag of at most ``max_records_per_patient``
    of its records (a fresh uniform subset each step for a larger patient;
    :class:`PatientBags`). The loss is the mean over the bag
    (:class:`BagCrossEntropy`), so the per-sample gradient Opacus clips to
    ``clip_norm`` and noises is the patient's gradient. Replacing one patient,
    with all of its records, moves the noisy sum by at most the clip norm:
    the mechanism is the same subsampled Gaussian, (σ, q over patients,
    steps), accounted by the same PLD accountant with replace-one neighbours
    over patients.

    ``model`` is a head on cached features (``(N, D)``; a linear head uses
    ``hooks``: Opacus's Linear sampler sums over the bag dimension), or a
    :class:`common.models.finetune.Tuned` model on cut-point activations
    (``bitfit``, ``last-block``; its layers take a bag dimension and their grad
    samplers sum over it; ``auto`` uses ghost clipping). With one record per
    patient this is :func:`train_dp`'s mechanism and, for the same ``seed``,
    its batches and noise.

    ``seed``, ``class_weights``, ``grad_sample_mode`` and the returned
    mechanisms are as in :func:`train_dp`; ``TrainResult.unit`` is ``patient``
    and ``units`` the patient count.
    """
    _check_dp(noise_multiplier, clip_norm)
    grad_sample_mode = _grad_sample_mode(model, grad_sample_mode)
    bags = PatientBags(features, labels, groups, max_records_per_patient=max_records_per_patient,
                       device=device)
    if seed is None:
        seed = secrets.randbits(62)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model.to(device).train()
    loader = DataLoader(TensorDataset(torch.arange(bags.num_patients)), batch_size=batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    crit = BagCrossEntropy(class_weights or None).to(device)
    bag_gen = torch.Generator().manual_seed(seed + 2)

    def run_epoch(private, dp_loader, dp_opt, dp_crit):
        return train_bag_epoch(private, dp_loader, bags, dp_opt, dp_crit, bag_gen)

    loss, steps, mechanisms = _run_private(
        model, loader, crit, run_epoch, epochs=epochs, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, seed=seed, device=device,
        grad_sample_mode=grad_sample_mode)
    return TrainResult(loss=loss, seconds=time.perf_counter() - t0, steps=steps,
                       mechanisms=mechanisms, grad_sample_mode=grad_sample_mode, unit=PATIENT,
                       units=bags.num_patients, max_records_per_patient=bags.cap)


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

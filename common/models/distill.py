"""Knowledge distillation of a compact student from the federation's teacher.

Flower-free. The server builds a teacher (the frozen backbone plus the final
global head, or the FedDF-style ensemble of the sites' last heads, whose logits
are averaged on the backbone's features), labels a *public, unlabelled*
transfer set with the teacher's soft predictions, and trains a small student
on the raw inputs with the classic temperature-softened KL loss.

Privacy: the teacher's heads are DP outputs and the transfer set is public, so
the student is post-processing of DP releases and costs no ε. That holds only
if no private record ever enters distillation. It is structural here: the
transfer set is built from the dataset's public validation split (or a server
file), a :class:`TransferSet` holds images and no labels, and
:func:`check_disjoint` refuses a transfer file that overlaps private records.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import TEACHERS
from common.models.metrics import classification_metrics

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
            ) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``,
    averaged over the batch. The ``T²`` keeps gradient magnitudes comparable
    across temperatures."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature ** 2


# --------------------------------------------------------------------------
# The public transfer set (images only)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferSet:
    """Public, unlabelled records for distillation. There is no label field:
    whatever labels the source had are dropped before this object exists."""

    images: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Images only, in order."""
        for start in range(0, len(self.images), batch_size):
            yield self.images[start:start + batch_size]


@dataclass(frozen=True)
class PublicVal:
    """The labelled public split used to pick the teacher and early-stop."""

    images: np.ndarray
    labels: np.ndarray


def split_public(val_images: np.ndarray, val_labels: np.ndarray, *, val_fraction: float,
                 seed: int) -> tuple[TransferSet, PublicVal]:
    """Split the dataset's *public* validation split into a transfer set (labels
    dropped) and a distillation-validation set, disjointly and reproducibly.

    It takes the public split's arrays and nothing else, so no site record can
    reach it. Stratified so the small validation part holds every class.
    """
    if len(val_images) != len(val_labels):
        raise ValueError(f"{len(val_images)} images but {len(val_labels)} labels")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 31337])
    val_idx, transfer_idx = [], []
    for c in np.unique(val_labels):
        idx = rng.permutation(np.flatnonzero(val_labels == c))
        k = int(round(len(idx) * val_fraction))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else len(idx)
        val_idx.append(idx[:k])
        transfer_idx.append(idx[k:])
    vi, ti = np.sort(np.concatenate(val_idx)), np.sort(np.concatenate(transfer_idx))
    if len(ti) == 0 or len(vi) == 0:
        raise ValueError(f"the public split has {len(val_images)} records: too few to split "
                         "into a transfer set and a distillation-validation set")
    return (TransferSet(np.ascontiguousarray(val_images[ti]), "public validation split"),
            PublicVal(np.ascontiguousarray(val_images[vi]), np.asarray(val_labels[vi])))


def row_hashes(records: np.ndarray) -> set[bytes]:
    """One content hash per record (exact bytes after float32 conversion)."""
    x = np.ascontiguousarray(np.asarray(records, dtype=np.float32).reshape(len(records), -1))
    return {hashlib.sha256(row.tobytes()).digest() for row in x}


def check_disjoint(transfer: np.ndarray, private: Sequence[np.ndarray]) -> None:
    """Refuse a transfer set that contains any private record (exact match).

    Distilling on private records would not be post-processing; rather than
    charge it silently to nobody, the server refuses.
    """
    seen = row_hashes(transfer)
    for arr in private:
        if len(arr) and transfer.shape[1:] == arr.shape[1:]:
            overlap = len(seen & row_hashes(arr))
            if overlap:
                raise ValueError(
                    f"the transfer set shares {overlap} records with private site data; "
                    "distillation must use public data only (it would otherwise cost ε that "
                    "no ledger records). Point transfer-data at a public set.")


def augment(images: np.ndarray, *, copies: int, seed: int) -> np.ndarray:
    """The images followed by ``copies`` randomly perturbed copies of them.

    Perturbations that keep the label: a shift of up to 1/8 of the side
    (edge-padded), contrast and brightness jitter, and mild Gaussian noise.
    Flips are avoided (they change digits and anatomy). More transfer points
    let a small public set carry more of the teacher's function.
    """
    if copies <= 0 or images.ndim == 2:  # flat records: no spatial augmentation
        return images
    rng = np.random.default_rng([seed, 2718])
    h, w = images.shape[1], images.shape[2]
    mh, mw = max(1, h // 8), max(1, w // 8)
    pad = [(0, 0), (mh, mh), (mw, mw)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad, mode="edge")
    out = [images]
    for _ in range(copies):
        dy = rng.integers(0, 2 * mh + 1, size=len(images))
        dx = rng.integers(0, 2 * mw + 1, size=len(images))
        shifted = np.stack([padded[i, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])
        shape = (len(images),) + (1,) * (images.ndim - 1)
        contrast = rng.uniform(0.8, 1.2, size=shape)
        bright = rng.uniform(-0.08, 0.08, size=shape)
        mean = shifted.mean(axis=tuple(range(1, images.ndim)), keepdims=True)
        x = (shifted - mean) * contrast + mean + bright + rng.normal(0, 0.02, size=images.shape)
        out.append(np.clip(x, 0.0, 1.0).astype(np.float32))
    return np.concatenate(out)


# --------------------------------------------------------------------------
# Teachers (heads on backbone features)
# --------------------------------------------------------------------------


@torch.no_grad()
def ensemble_logits(heads: Sequence[nn.Module], features: np.ndarray, *,
                    batch_size: int = 4096) -> np.ndarray:
    """Mean logits of ``heads`` on ``features`` (one head: that head's logits).

    FedDF averages the clients' logits; a single head is the global teacher.
    """
    if not heads:
        raise ValueError("a teacher needs at least one head")
    total = None
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    for head in heads:
        head.eval()
        logits = torch.cat([head(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])
        total = logits if total is None else total + logits
    return (total / len(heads)).numpy()


def probs_from_logits(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def choose_teacher(choice: str, candidates: dict[str, np.ndarray], val_labels: np.ndarray
                   ) -> tuple[str, dict[str, dict[str, float]]]:
    """Pick the teacher by name, or (``auto``) the one with the higher public-val
    AUC (then lower loss). ``candidates`` maps teacher name to its val logits."""
    if choice not in TEACHERS:
        raise ValueError(f"unknown teacher {choice!r}. Valid: {', '.join(TEACHERS)}")
    scores = {name: classification_metrics(probs_from_logits(lg), val_labels)
              for name, lg in candidates.items()}
    if choice != "auto":
        if choice not in candidates:
            raise ValueError(f"teacher {choice!r} is not available here (have: "
                             f"{', '.join(candidates)})")
        return choice, scores

    def key(name: str) -> tuple[float, float]:
        auc = scores[name]["auc"]
        return (auc if auc == auc else -1.0, -scores[name]["loss"])

    return max(candidates, key=key), scores


# --------------------------------------------------------------------------
# The distillation loop
# --------------------------------------------------------------------------


@dataclass
class DistillResult:
    best_epoch: int
    epochs_run: int
    seconds: float
    val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def student_logits(student: nn.Module, inputs: torch.Tensor, *, batch_size: int = 512,
                   device: str = "cpu") -> np.ndarray:
    student.eval()
    out = [student(inputs[s:s + batch_size].to(device)).float().cpu()
           for s in range(0, len(inputs), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def distill_epoch(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer,
                  *, temperature: float, batch_size: int, generator: torch.Generator,
                  device: str = "cpu") -> dict[str, float]:
    """One pass over the transfer pool (inputs and teacher logits; no labels)."""
    student.train()
    order = torch.randperm(len(inputs), generator=generator)
    total, n = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:  # BatchNorm needs two records
            continue
        x, t = inputs[idx].to(device), targets[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = kd_loss(student(x), t, temperature)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        n += len(idx)
    return {"kd_loss": total / max(n, 1)}


def distill(student: nn.Module, pool: torch.Tensor, teacher_logits: np.ndarray,
            val_inputs: torch.Tensor, val_labels: np.ndarray, *, epochs: int, patience: int,
            temperature: float, lr: float, batch_size: int = 128, seed: int = 0,
            device: str = "cpu") -> DistillResult:
    """Train ``student`` to match ``teacher_logits`` on ``pool`` (transfer inputs).

    Early stopping on the public validation split's log loss (true labels,
    public); the best epoch's weights are restored into ``student``.
    """
    if len(pool) != len(teacher_logits):
        raise ValueError(f"{len(pool)} transfer records but {len(teacher_logits)} teacher rows")
    if len(pool) < 2:
        raise ValueError("the transfer set needs at least 2 records")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student.to(device)
    targets = torch.as_tensor(np.asarray(teacher_logits, dtype=np.float32))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best_loss, best_state, best_epoch, best_val = float("inf"), None, 0, {}
    history, waited, epoch = [], 0, 0
    for epoch in range(1, epochs + 1):
        stats = distill_epoch(student, pool, targets, opt, temperature=temperature,
                              batch_size=batch_size, generator=gen, device=device)
        sched.step()
        val = classification_metrics(
            probs_from_logits(student_logits(student, val_inputs, device=device)), val_labels)
        history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}})
        log.debug("distill epoch %d: kd %.4f val loss %.4f auc %.4f", epoch, stats["kd_loss"],
                  val["loss"], val["auc"])
        if val["loss"] < best_loss - 1e-4:
            best_loss, best_epoch, best_val, waited = val["loss"], epoch, val, 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        student.load_state_dict(best_state)
    student.cpu().eval()
    return DistillResult(best_epoch=best_epoch, epochs_run=epoch,
                         seconds=time.perf_counter() - t0, val=best_val, history=history)


def cpu_ms_per_image(fn, inputs, *, batch_size: int = 64, repeats: int = 3) -> float:
    """Median wall-clock milliseconds per record of ``fn(batch)`` on the CPU,
    over ``repeats`` passes after one warm-up pass."""
    n = len(inputs)
    if n == 0:
        raise ValueError("timing needs at least one record")

    def one_pass() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                fn(inputs[s:s + batch_size])
        return time.perf_counter() - t0

    one_pass()
    times = sorted(one_pass() for _ in range(repeats))
    return 1000.0 * times[len(times) // 2] / n

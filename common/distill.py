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
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.metrics import classification_metrics

log = logging.getLogger(__name__)

STUDENT_NAMES = ("cnn", "mlp")
TEACHER_CHOICES = ("auto", "global", "ensemble")


# --------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student (stored with its weights).

    ``input_shape`` is one record's shape as the student sees it: ``(C, H, W)``
    for ``cnn`` (pixels in [0, 1]), ``(D,)`` for ``mlp``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    width: int = 32
    depth: int = 3

    def __post_init__(self) -> None:
        if self.name not in STUDENT_NAMES:
            raise ValueError(f"unknown student {self.name!r}. Valid: {', '.join(STUDENT_NAMES)}")
        if self.name == "cnn" and len(self.input_shape) != 3:
            raise ValueError(f"student 'cnn' needs image inputs (C, H, W), got input shape "
                             f"{self.input_shape}; use student 'mlp' for tabular or flat inputs")
        if self.name == "cnn" and self.input_shape[0] not in (1, 3):
            raise ValueError(f"student 'cnn' needs 1 or 3 channels, got {self.input_shape[0]}")
        if self.name == "mlp" and len(self.input_shape) != 1:
            raise ValueError(f"student 'mlp' needs flat inputs (D,), got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"a student needs >= 2 classes, got {self.num_classes}")
        if not (1 <= self.width <= 256 and 1 <= self.depth <= 6):
            raise ValueError(f"student width must be in [1, 256] and depth in [1, 6], got "
                             f"width={self.width}, depth={self.depth}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StudentSpec:
        return cls(name=str(d["name"]), input_shape=tuple(int(v) for v in d["input_shape"]),
                   num_classes=int(d["num_classes"]), width=int(d["width"]), depth=int(d["depth"]))

    @property
    def architecture(self) -> str:
        shape = "x".join(str(v) for v in self.input_shape)
        return f"{self.name}(width={self.width}, depth={self.depth}, input={shape}, " \
               f"classes={self.num_classes})"


class CNNStudent(nn.Module):
    """A small CNN on raw images: conv-BN-ReLU blocks, channels doubling up to
    4x ``width``, stride 2 first on larger images and 2x2 pooling between
    blocks, then global average pooling and a linear classifier."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        c, h, w = spec.input_shape
        layers: list[nn.Module] = []
        size = min(h, w)
        for i in range(spec.depth):
            out = spec.width * 2 ** min(i, 2)
            stride = 2 if i == 0 and size >= 24 else 1
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            size = (size + stride - 1) // stride
            if i < spec.depth - 1 and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are pixels in [0, 1]; centre them as the backbone does ([-1, 1]).
        x = self.features(x * 2.0 - 1.0)
        return self.classifier(x.mean(dim=(2, 3)))


class MLPStudent(nn.Module):
    """A small MLP for tabular / flat inputs: ``depth`` hidden layers of
    ``width * 4`` units with ReLU, standardised inside by fixed statistics."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        (d,) = spec.input_shape
        hidden = spec.width * 4
        layers: list[nn.Module] = []
        for _ in range(spec.depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, spec.num_classes))
        self.net = nn.Sequential(*layers)
        # Public transfer-set statistics, set once by the caller (saved with the weights).
        self.register_buffer("mean", torch.zeros(spec.input_shape))
        self.register_buffer("scale", torch.ones(spec.input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale)


_STUDENTS = {"cnn": CNNStudent, "mlp": MLPStudent}


def make_student(spec: StudentSpec, *, seed: int = 0) -> nn.Module:
    """Build a student by registry name (``spec.name``), with seeded weights."""
    if spec.name not in _STUDENTS:  # StudentSpec already checks; kept for direct callers
        raise ValueError(f"unknown student {spec.name!r}. Valid: {', '.join(STUDENT_NAMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _STUDENTS[spec.name](spec)


def student_spec_for(name: str, images: np.ndarray, num_classes: int, *, width: int,
                     depth: int) -> StudentSpec:
    """The spec that fits records shaped like ``images[0]`` (``(H, W)``, ``(H, W, C)`` or ``(D,)``)."""
    shape = tuple(images.shape[1:])
    if name == "mlp":
        return StudentSpec("mlp", (int(np.prod(shape)),), num_classes, width, depth)
    if name == "cnn":
        if len(shape) == 2:
            return StudentSpec("cnn", (1, *shape), num_classes, width, depth)
        if len(shape) == 3:
            return StudentSpec("cnn", (shape[2], shape[0], shape[1]), num_classes, width, depth)
        raise ValueError(f"student 'cnn' needs image records (H, W) or (H, W, C), got {shape}; "
                         "use student 'mlp' for tabular or flat inputs")
    raise ValueError(f"unknown student {name!r}. Valid: {', '.join(STUDENT_NAMES)}")


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_student_input(records: np.ndarray, spec: StudentSpec) -> torch.Tensor:
    """Records as the student takes them, or a ``ValueError`` naming the mismatch.

    Images ``(N, H, W)`` / ``(N, H, W, C)`` become ``(N, C, H, W)``; flat
    inputs must have exactly ``D`` features.
    """
    x = np.asarray(records, dtype=np.float32)
    if spec.name == "mlp":
        x = x.reshape(len(x), -1)
        if x.shape[1] != spec.input_shape[0]:
            raise ValueError(f"the model expects {spec.input_shape[0]} features per record, "
                             f"got {x.shape[1]}")
        return torch.from_numpy(np.ascontiguousarray(x))
    c, h, w = spec.input_shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"the model expects images (N, H, W) or (N, H, W, C), got an array "
                         f"shaped {x.shape}")
    if x.shape[1] != c:
        raise ValueError(f"the model expects {c}-channel images, got {x.shape[1]} channels")
    if x.shape[2:] != (h, w):
        raise ValueError(f"the model expects {h}x{w} images, got {x.shape[2]}x{x.shape[3]}")
    return torch.from_numpy(np.ascontiguousarray(x))


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
    if choice not in TEACHER_CHOICES:
        raise ValueError(f"unknown teacher {choice!r}. Valid: {', '.join(TEACHER_CHOICES)}")
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

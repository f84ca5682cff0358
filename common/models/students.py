"""Compact student models: their spec, their architectures and the registry.

A :class:`StudentSpec` is stored with the weights, so a delivered student can
be rebuilt from its card alone. Training them is :mod:`common.models.distill`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


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
        if self.name not in STUDENTS:
            raise ValueError(f"unknown student {self.name!r}. Valid: {', '.join(STUDENTS)}")
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


# The student registry: config key ``student`` takes these names.
STUDENTS = {"cnn": CNNStudent, "mlp": MLPStudent}


def make_student(spec: StudentSpec, *, seed: int = 0) -> nn.Module:
    """Build a student by registry name (``spec.name``), with seeded weights."""
    if spec.name not in STUDENTS:  # StudentSpec already checks; kept for direct callers
        raise ValueError(f"unknown student {spec.name!r}. Valid: {', '.join(STUDENTS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return STUDENTS[spec.name](spec)


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
    raise ValueError(f"unknown student {name!r}. Valid: {', '.join(STUDENTS)}")


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

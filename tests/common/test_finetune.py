"""DP fine-tuning of the backbone's last block (common/models/finetune.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.models import finetune, training
from common.models.backbones import get_backbone, preprocess
from common.models.features import cache_key

SIZE = 32


def _model(mode: str) -> finetune.Tuned:
    return finetune.make_model(mode, head="linear", backbone="efficientnet-lite0",
                               image_size=SIZE, in_dim=0, num_classes=2, seed=0)


def test_pointwise_linear_equals_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(7, 5, 1, bias=False)
    x = torch.randn(3, 7, 4, 6)
    lin = finetune.PointwiseLinear(conv)
    assert isinstance(lin.linear, nn.Linear)
    torch.testing.assert_close(lin(x), conv(x), rtol=1e-5, atol=1e-6)


def test_prefix_and_suffix_reproduce_the_pretrained_features():
    rng = np.random.default_rng(0)
    images = rng.random((3, SIZE, SIZE)).astype(np.float32)
    backbone = get_backbone("efficientnet-lite0", SIZE)
    expected = backbone.extract(images)
    acts = finetune.prefix_backbone(backbone).extract(images)
    assert acts.shape == (3, 192, SIZE // 32, SIZE // 32)
    model = _model("last-block").eval()
    with torch.no_grad():
        got = model.suffix(torch.from_numpy(acts)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The cache key covers the cut point.
    assert cache_key(backbone, "d") != cache_key(finetune.prefix_backbone(backbone), "d")


@pytest.mark.parametrize("mode", ["bitfit", "last-block"])
def test_dp_training_keeps_bn_statistics_and_trains_only_the_mode(mode):
    model = _model(mode)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    frozen = {k: v.clone() for k, v in model.suffix.named_parameters() if not v.requires_grad}
    trained_before = finetune.model_state(model)
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(24, 192, 1, 1)).astype(np.float32)
    labels = rng.integers(0, 2, 24)
    res = training.train_dp(model, acts, labels, epochs=1, batch_size=8, lr=0.5,
                            noise_multiplier=1.0, clip_norm=1.0, seed=0)
    assert res.grad_sample_mode == "ghost" and res.steps >= 1
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # BN running statistics unchanged
    for k, v in frozen.items():
        assert torch.equal(dict(model.suffix.named_parameters())[k], v), k
    state = finetune.model_state(model)
    expected = {"weight", "bias", *(finetune.PREFIX + n for n in finetune.trainable_names(mode))}
    assert set(state) == expected
    assert not any("running" in k for k in state)
    moved = [k for k in state if k.startswith(finetune.PREFIX)
             and not np.array_equal(state[k], trained_before[k])]
    assert moved  # the suffix really trained
    assert all(not m.training for m in model.modules() if isinstance(m, finetune.BNStatistics))


def _per_sample_norms(model, mode, x, y):
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    crit = nn.CrossEntropyLoss(reduction="none")
    if mode == "hooks":
        gsm = GradSampleModule(model)
        gsm.zero_grad()
        crit(gsm(x), y).sum().backward()
        sq = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in model.parameters()
                 if p.requires_grad)
        gsm._close()
        return sq.sqrt()
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1e9, use_ghost_clipping=True)
    gsm.zero_grad()
    crit(gsm(x), y).sum().backward()
    norms = gsm.get_norm_sample().detach()
    gsm._close()
    return norms


@pytest.mark.parametrize("mode", ["bitfit", "last-block"])
def test_ghost_per_sample_norms_equal_hooks(mode):
    torch.manual_seed(0)
    x = torch.randn(4, 192, 2, 2)
    y = torch.tensor([0, 1, 1, 0])
    state = finetune.model_state(_model(mode))
    a = finetune.load_model_state(_model(mode), state).train()
    b = finetune.load_model_state(_model(mode), state).train()
    hooks = _per_sample_norms(a, "hooks", x, y)
    ghost = _per_sample_norms(b, "ghost", x, y)
    torch.testing.assert_close(ghost, hooks, rtol=1e-4, atol=1e-6)


def test_state_keys_are_exactly_the_modes():
    model = _model("bitfit")
    state = finetune.model_state(model)
    with pytest.raises(ValueError, match="do not match"):
        finetune.load_model_state(_model("bitfit"),
                                  {**state, "backbone.expand.linear.weight":
                                   np.zeros((1152, 192), np.float32)})
    assert finetune.num_trainable(model) == sum(v.size for v in state.values())
    assert finetune.trainable_names("head") == ()


def test_image_model_equals_prefix_then_tuned():
    model = _model("bitfit").eval()
    full = finetune.image_model(model, "efficientnet-lite0", SIZE)
    rng = np.random.default_rng(2)
    images = rng.random((2, SIZE, SIZE)).astype(np.float32)
    acts = finetune.prefix_backbone(get_backbone("efficientnet-lite0", SIZE)).extract(images)
    with torch.no_grad():
        direct = model(torch.from_numpy(acts))
        via = full(preprocess(images, SIZE) * 0.5 + 0.5)
    torch.testing.assert_close(via, direct, rtol=1e-4, atol=1e-5)


def test_depthwise_per_sample_gradients_equal_per_record_autograd():
    """The depthwise convolution's own Opacus grad sampler (Opacus's generic
    Conv2d sampler took ~2.6 s per step for 1152 groups) gives each record's
    exact gradient: checked against autograd on one record at a time, and its
    forward against nn.Conv2d."""
    from opacus.grad_sample import GradSampleModule

    torch.manual_seed(0)
    c = 6
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    dw = finetune.Depthwise3x3(conv.weight)
    x = torch.randn(5, c, 4, 3)
    torch.testing.assert_close(dw(x), conv(x), rtol=1e-5, atol=1e-6)
    finetune.register_grad_samplers()
    target = torch.randn(5, c, 4, 3)
    gsm = GradSampleModule(finetune.Depthwise3x3(conv.weight), loss_reduction="sum")
    ((gsm(x) - target) ** 2).sum().backward()
    per_sample = gsm._module.weight.grad_sample
    gsm._close()
    for i in range(len(x)):
        ref = finetune.Depthwise3x3(conv.weight)
        ((ref(x[i:i + 1]) - target[i:i + 1]) ** 2).sum().backward()
        torch.testing.assert_close(per_sample[i], ref.weight.grad, rtol=1e-4, atol=1e-5)

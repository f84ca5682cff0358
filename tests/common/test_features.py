"""The feature cache: computed once, read back after, keyed by backbone and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.datasets import fingerprint_arrays
from common.models.backbones import get_backbone
from common.models.features import cached_features

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


def _images(n: int = 6, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def _save_torchscript(path, channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3), torch.nn.ReLU())
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


def _refuse_to_load():
    raise AssertionError("the backbone must not be loaded on a cache hit")


# --------------------------------------------------------------------------
# identity backbone
# --------------------------------------------------------------------------


def test_identity_first_call_misses_second_hits(tmp_path):
    x = _images()
    fp = fingerprint_arrays(x)
    first = cached_features(get_backbone("identity"), x, data_fingerprint=fp, cache_dir=tmp_path)
    assert first.hit is False and first.path.is_file()
    np.testing.assert_array_equal(first.features, x.reshape(6, -1))

    second = cached_features(get_backbone("identity"), x, data_fingerprint=fp, cache_dir=tmp_path)
    assert second.hit is True
    assert second.path == first.path
    np.testing.assert_array_equal(second.features, first.features)
    assert second.features.dtype == np.float32
    # Atomic writes leave no temporary files behind.
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_changed_data_fingerprint_misses(tmp_path):
    bb = get_backbone("identity")
    x, y = _images(seed=0), _images(seed=1)
    a = cached_features(bb, x, data_fingerprint=fingerprint_arrays(x), cache_dir=tmp_path)
    b = cached_features(bb, y, data_fingerprint=fingerprint_arrays(y), cache_dir=tmp_path)
    assert (a.hit, b.hit) == (False, False)
    assert a.path != b.path
    np.testing.assert_array_equal(b.features, y.reshape(6, -1))


def test_corrupt_cache_file_is_recomputed(tmp_path, caplog):
    bb = get_backbone("identity")
    x = _images()
    fp = fingerprint_arrays(x)
    path = cached_features(bb, x, data_fingerprint=fp, cache_dir=tmp_path).path
    path.write_bytes(b"\x00garbage, not safetensors")

    again = cached_features(bb, x, data_fingerprint=fp, cache_dir=tmp_path)
    assert again.hit is False
    np.testing.assert_array_equal(again.features, x.reshape(6, -1))
    assert "unreadable" in caplog.text
    # The recomputed entry replaced the corrupt one.
    assert cached_features(bb, x, data_fingerprint=fp, cache_dir=tmp_path).hit is True


def test_cache_entry_with_wrong_row_count_is_recomputed(tmp_path):
    bb = get_backbone("identity")
    x = _images(n=6)
    cached_features(bb, x[:4], data_fingerprint="same", cache_dir=tmp_path)
    again = cached_features(bb, x, data_fingerprint="same", cache_dir=tmp_path)
    assert again.hit is False and again.features.shape == (6, 64)


# --------------------------------------------------------------------------
# a real TorchScript backbone (a hospital's own checkpoint)
# --------------------------------------------------------------------------


def test_torchscript_backbone_computes_once_and_is_never_loaded_on_a_hit(tmp_path):
    ckpt = _save_torchscript(tmp_path / "net.pt")
    x = _images()
    fp = fingerprint_arrays(x)
    cache = tmp_path / "cache"

    bb = get_backbone(str(ckpt), image_size=8)
    first = cached_features(bb, x, data_fingerprint=fp, cache_dir=cache)
    assert first.hit is False
    assert bb._module is not None  # computing the features loaded the module
    assert first.features.shape == (6, 4)
    np.testing.assert_allclose(np.linalg.norm(first.features, axis=1), 1.0, atol=1e-5)

    fresh = get_backbone(str(ckpt), image_size=8)  # a later round, a new process
    fresh.loader = _refuse_to_load
    second = cached_features(fresh, x, data_fingerprint=fp, cache_dir=cache)
    assert second.hit is True
    assert fresh._module is None
    np.testing.assert_array_equal(second.features, first.features)


def test_changed_backbone_fingerprint_misses(tmp_path):
    x = _images()
    fp = fingerprint_arrays(x)
    cache = tmp_path / "cache"
    ckpt = _save_torchscript(tmp_path / "net.pt", channels=4)
    first = cached_features(get_backbone(str(ckpt), image_size=8), x,
                            data_fingerprint=fp, cache_dir=cache)

    # Same weights, another input size: other preprocessing, other features.
    resized = cached_features(get_backbone(str(ckpt), image_size=12), x,
                              data_fingerprint=fp, cache_dir=cache)
    assert resized.hit is False and resized.path != first.path

    # The hospital replaces its checkpoint file in place with a new model.
    _save_torchscript(ckpt, channels=5, seed=1)
    replaced = cached_features(get_backbone(str(ckpt), image_size=8), x,
                               data_fingerprint=fp, cache_dir=cache)
    assert replaced.hit is False
    assert replaced.features.shape == (6, 5)


def test_identity_and_file_backbones_do_not_share_entries(tmp_path):
    x = _images()
    ckpt = _save_torchscript(tmp_path / "net.pt")
    a = cached_features(get_backbone("identity"), x, data_fingerprint="d", cache_dir=tmp_path)
    b = cached_features(get_backbone(str(ckpt), image_size=8), x, data_fingerprint="d",
                        cache_dir=tmp_path)
    assert (a.hit, b.hit) == (False, False)
    assert a.features.shape != b.features.shape


@pytest.mark.parametrize("n", [1, 3])
def test_torchscript_features_do_not_depend_on_batching(tmp_path, n):
    ckpt = _save_torchscript(tmp_path / "net.pt")
    bb = get_backbone(str(ckpt), image_size=8)
    x = _images(n=5)
    whole = bb.extract(x, batch_size=5)
    pieces = bb.extract(x, batch_size=n)
    np.testing.assert_allclose(pieces, whole, atol=1e-6)

"""Datasets, hospital partitions and per-site acquisition shift."""

from __future__ import annotations

import numpy as np
import pytest

import common.data.datasets
from common.data.datasets import (
    apply_site_shift,
    load_dataset,
    partition_indices,
    read_medmnist_npz,
)

# 400 records, 4 balanced classes.
LABELS = np.repeat(np.arange(4), 100)


def _max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over sites of the largest class's share of that site's records."""
    shares = [np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]
    return float(np.mean(shares))


# --------------------------------------------------------------------------
# partitions (flwr-datasets)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partition_covers_every_index_exactly_once(partitioner):
    parts = partition_indices(LABELS, num_sites=4, partitioner=partitioner, alpha=0.3, seed=0)
    assert len(parts) == 4
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partition_is_seeded(partitioner):
    def run(seed):
        return partition_indices(LABELS, num_sites=4, partitioner=partitioner, alpha=0.3,
                                 seed=seed)

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(len(x) != len(z) or not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_iid_sites_are_equal_sized_and_near_balanced():
    parts = partition_indices(LABELS, num_sites=4, partitioner="iid", alpha=0.3, seed=0)
    assert [len(p) for p in parts] == [100, 100, 100, 100]
    assert _max_class_share(parts, LABELS) < 0.4  # balanced would be 0.25


def test_dirichlet_is_more_label_skewed_than_iid():
    iid = partition_indices(LABELS, num_sites=4, partitioner="iid", alpha=0.3, seed=0)
    skew = partition_indices(LABELS, num_sites=4, partitioner="dirichlet", alpha=0.3, seed=0)
    assert _max_class_share(skew, LABELS) > _max_class_share(iid, LABELS) + 0.15


def test_unknown_partitioner_and_too_many_sites_are_rejected():
    with pytest.raises(ValueError,
                       match="unknown partitioner 'pathological'. Valid: iid, dirichlet"):
        partition_indices(LABELS, num_sites=4, partitioner="pathological", alpha=0.3, seed=0)
    with pytest.raises(ValueError, match="num-sites=5 exceeds the 4 training records"):
        partition_indices(LABELS[:4], num_sites=5, partitioner="iid", alpha=0.3, seed=0)


# --------------------------------------------------------------------------
# acquisition shift
# --------------------------------------------------------------------------


def _imgs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((5, 6, 6), dtype=np.float32)


def test_zero_shift_is_the_identity():
    x = _imgs()
    np.testing.assert_array_equal(apply_site_shift(x, site_id=2, strength=0.0, seed=0), x)


def test_tabular_records_are_never_shifted():
    """The shift simulates a scanner; it would silently corrupt lab values."""
    x = np.random.default_rng(0).normal(size=(8, 30)).astype(np.float32) * 100
    np.testing.assert_array_equal(apply_site_shift(x, site_id=1, strength=1.0, seed=0), x)


def test_shift_is_deterministic_per_seed_and_site_and_stays_in_range():
    x = _imgs()
    before = x.copy()
    a = apply_site_shift(x, site_id=1, strength=1.0, seed=3)
    b = apply_site_shift(x, site_id=1, strength=1.0, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)  # the input is not changed in place
    assert a.dtype == np.float32 and a.shape == x.shape
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, x)


def test_shift_differs_between_sites_and_seeds():
    x = _imgs()
    site0 = apply_site_shift(x, site_id=0, strength=0.5, seed=3)
    site1 = apply_site_shift(x, site_id=1, strength=0.5, seed=3)
    other_seed = apply_site_shift(x, site_id=0, strength=0.5, seed=4)
    assert not np.allclose(site0, site1)
    assert not np.allclose(site0, other_seed)


def test_colour_images_keep_their_shape_and_range():
    x = np.random.default_rng(0).random((3, 4, 4, 3), dtype=np.float32)
    out = apply_site_shift(x, site_id=0, strength=1.0, seed=0)
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0


# --------------------------------------------------------------------------
# MedMNIST .npz
# --------------------------------------------------------------------------

SIZES = {"train": 6, "val": 2, "test": 3}


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        out[f"{split}_images"] = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    return out


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_read_medmnist_npz_reads_a_good_file(tmp_path):
    arrays = _arrays()
    splits = read_medmnist_npz(_write(tmp_path / "pneumoniamnist.npz", **arrays))
    assert splits.name == "pneumoniamnist"
    assert splits.classes == ("normal", "pneumonia") and splits.num_classes == 2
    assert splits.train_x.shape == (6, 4, 4) and splits.train_x.dtype == np.float32
    np.testing.assert_allclose(splits.train_x, arrays["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(splits.test_y, [0, 1, 0])
    assert splits.val_y.dtype == np.int64 and splits.val_y.shape == (2,)


def test_read_unknown_medmnist_name_gets_numbered_classes(tmp_path):
    splits = read_medmnist_npz(_write(tmp_path / "mine.npz", **_arrays()))
    assert splits.classes == ("0", "1")


def test_missing_array_is_named(tmp_path):
    arrays = _arrays()
    del arrays["val_labels"]
    with pytest.raises(ValueError, match="missing array 'val_labels'"):
        read_medmnist_npz(_write(tmp_path / "x.npz", **arrays))


def test_nan_images_are_rejected(tmp_path):
    arrays = _arrays()
    arrays["test_images"] = arrays["test_images"].astype(np.float32)
    arrays["test_images"][1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="test_images contains NaN or Inf"):
        read_medmnist_npz(_write(tmp_path / "x.npz", **arrays))


def test_negative_labels_are_rejected(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][0] = -1
    with pytest.raises(ValueError, match="train_labels must be non-negative integers"):
        read_medmnist_npz(_write(tmp_path / "x.npz", **arrays))


def test_mismatched_image_and_label_counts_are_rejected(tmp_path):
    arrays = _arrays()
    arrays["val_labels"] = arrays["val_labels"][:1]
    with pytest.raises(ValueError, match="val_images has shape"):
        read_medmnist_npz(_write(tmp_path / "x.npz", **arrays))


def _corrupt(kind: str, path):
    good = _write(path.with_name("good.npz"), **_arrays()).read_bytes()
    if kind == "garbage":
        path.write_bytes(b"this is not an npz file at all")
    elif kind == "truncated":  # e.g. an interrupted copy
        path.write_bytes(good[: len(good) // 2])
    else:  # a flipped byte inside an array: the zip's CRC check fails
        data = bytearray(good)
        data[120] ^= 0xFF
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated", "bitflip"])
def test_corrupt_file_gives_a_value_error(tmp_path, kind):
    path = _corrupt(kind, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="x.npz"):
        read_medmnist_npz(path)


def test_medmnist_offline_without_a_local_copy_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(common.data.datasets, "MEDMNIST_URL", "http://127.0.0.1:9/{name}.npz")
    monkeypatch.delenv("MEDMNIST_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("medmnist:pneumoniamnist", data_dir=str(data_dir))
    msg = str(err.value)
    assert "no local copy" in msg and str(data_dir / "pneumoniamnist.npz") in msg
    assert "offline" in msg and "copy pneumoniamnist.npz" in msg and "data-dir" in msg
    assert not any(data_dir.glob("*"))  # no partial download left behind


def test_medmnist_is_read_from_data_dir(tmp_path):
    _write(tmp_path / "pneumoniamnist.npz", **_arrays())
    splits = load_dataset("medmnist:pneumoniamnist", data_dir=str(tmp_path))
    assert splits.train_x.shape == (6, 4, 4)


def test_medmnist_missing_explicit_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="MedMNIST file not found: .*absent.npz"):
        load_dataset(f"medmnist:{tmp_path / 'absent.npz'}")


@pytest.mark.parametrize("spec", ["nope", "medmnist:", "parquet:x.parquet"])
def test_unknown_dataset_lists_the_valid_names(spec):
    with pytest.raises(ValueError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert repr(spec) in msg and "digits" in msg and "medmnist:" in msg
    assert "imagefolder:<dir>" in msg and "csv:<file>" in msg


def test_missing_csv_dataset_is_named():
    with pytest.raises(ValueError, match="CSV file not found: x.csv"):
        load_dataset("csv:x.csv")


def test_digits_loads_with_ten_classes_and_fixed_splits():
    a = load_dataset("digits", seed=0)
    assert a.num_classes == 10
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (1257, 180, 360)
    assert set(np.unique(a.test_y)) == set(range(10))
    assert a.train_x.shape[1:] == (8, 8) and a.train_x.dtype == np.float32
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    b = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    c = load_dataset("digits", seed=1)
    assert not np.array_equal(a.test_y, c.test_y)


@pytest.mark.integration
def test_real_pneumoniamnist(pneumonia_npz):
    s = read_medmnist_npz(pneumonia_npz)
    assert s.classes == ("normal", "pneumonia")
    assert s.train_x.shape == (4708, 28, 28)
    assert s.val_x.shape == (524, 28, 28)
    assert s.test_x.shape == (624, 28, 28)
    assert np.bincount(s.train_y).tolist() == [1214, 3494]
    assert 0.0 <= s.train_x.min() and s.train_x.max() <= 1.0
    via_registry = load_dataset("medmnist:pneumoniamnist", data_dir=str(pneumonia_npz.parent))
    np.testing.assert_array_equal(via_registry.test_y, s.test_y)


def test_natural_sites_from_folders_and_csv_keep_each_records_site(tmp_path):
    """``partitioner = "site"``: a hospital's records are exactly its own, each site
    with its own train/val/test split; a mismatched site count is named."""
    from common.data.datasets import (
        Splits,
        check_natural_sites,
        export_site_folders,
        site_data,
    )

    full = load_dataset("digits", seed=0)
    small = Splits("digits", ("0", "1"), *(a for x, y in ((full.train_x, full.train_y),
                                                           (full.val_x, full.val_y),
                                                           (full.test_x, full.test_y))
                                             for a in (x[y < 2][:40], y[y < 2][:40])))
    counts = export_site_folders(small, tmp_path / "sites", num_sites=3, alpha=100.0, seed=0,
                                 include=("train", "val", "test"))
    assert sorted(counts) == ["site-0", "site-1", "site-2"]
    splits = load_dataset(f"imagefolder:{tmp_path / 'sites'}?site=folder", seed=0)
    assert splits.site_names == ("site-0", "site-1", "site-2")
    for i, name in enumerate(splits.site_names):
        n = sum(counts[name].values())
        got = sum(int((s == i).sum()) for s in (splits.train_site, splits.val_site,
                                                 splits.test_site))
        assert got == n and (splits.test_site == i).any()  # each site has its own test split
        data = site_data(splits, site_id=i, num_sites=3, partitioner="site", alpha=0.5,
                         holdout=0.2, shift=0.0, seed=0)
        assert len(data.train_y) + len(data.holdout_y) == int((splits.train_site == i).sum())
    with pytest.raises(ValueError, match="holds 3 sites"):
        check_natural_sites(splits, 4)
    # By default an export writes the training split only: val and test are public.
    only = export_site_folders(small, tmp_path / "train-only", num_sites=3, alpha=100.0, seed=0)
    assert sum(sum(v.values()) for v in only.values()) == len(small.train_y)
    with pytest.raises(ValueError, match="needs records that carry their site"):
        check_natural_sites(full, 4)
    with pytest.raises(FileExistsError):
        export_site_folders(small, tmp_path / "sites", num_sites=3, alpha=1.0)

    # The same from one CSV per site, and from a site column.
    for k in range(2):
        (tmp_path / "csvs").mkdir(exist_ok=True)
        (tmp_path / "csvs" / f"clinic-{k}.csv").write_text(
            "a,b,label\n" + "".join(f"{i},{k},{i % 2}\n" for i in range(12)))
    per_file = load_dataset(f"csv:{tmp_path / 'csvs'}", seed=0)
    assert per_file.site_names == ("clinic-0", "clinic-1")
    np.testing.assert_array_equal(per_file.train_x[:, 1], per_file.train_site)

"""Patients: the constructed grouping (common/data/grouping.py) and partitioning
simulated sites by patient (common/data/datasets.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.admission import load_site_data
from client.settings import scenario_policy
from common.data import grouping
from common.data.datasets import load_dataset, partition_patients, site_data
from common.data.splits import Splits
from simulations.scenarios import resolve_config

labels_strategy = st.lists(st.integers(0, 3), min_size=1, max_size=300).map(np.array)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(labels=labels_strategy, seed=st.integers(0, 2**31), max_records=st.integers(1, 10))
def test_constructed_patients_are_label_consistent_and_sized_by_the_rule(labels, seed,
                                                                         max_records):
    ids = grouping.construct_patients(labels, seed=seed, max_records=max_records)
    assert ids.shape == labels.shape and ids.dtype == np.int64
    count = int(ids.max()) + 1
    assert set(np.unique(ids).tolist()) == set(range(count))  # ids 0..P-1, none empty
    for p in range(count):
        mine = labels[ids == p]
        assert len(set(mine.tolist())) == 1  # label-consistent
        assert 1 <= len(mine) <= max_records
    np.testing.assert_array_equal(ids, grouping.construct_patients(labels, seed=seed,
                                                                   max_records=max_records))


def test_the_size_distribution_is_the_stated_skew():
    labels = np.repeat([0, 1], [6000, 14000])
    sizes = grouping.group_sizes(grouping.construct_patients(labels, seed=3))
    pmf = grouping.records_per_patient_pmf()
    assert pmf[0] == pytest.approx(0.501, abs=1e-3)  # half the patients have one record
    freq = np.bincount(sizes, minlength=11)[1:] / len(sizes)
    np.testing.assert_allclose(freq, pmf, atol=0.02)
    assert sizes.max() == 10 and 2.3 < sizes.mean() < 2.7
    other = grouping.construct_patients(labels, seed=4)
    assert not np.array_equal(other, grouping.construct_patients(labels, seed=3))


def test_factorize_numbers_patients_by_first_appearance_and_rejects_missing_ids():
    inverse, count = grouping.factorize(np.array(["b", "a", "b", "c"], dtype=object))
    assert count == 3 and inverse.tolist() == [0, 1, 0, 2]
    assert grouping.factorize([7, 7, 3])[0].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="record 1 has no patient id"):
        grouping.factorize(["a", None])
    with pytest.raises(ValueError, match="record 0 has no patient id"):
        grouping.factorize(np.array([np.nan, 1.0]))
    summary = grouping.patient_summary(["a", "a", "a", "b"], max_records_per_patient=2)
    assert summary["patients"] == 2 and summary["records"] == 4
    assert summary["records_per_patient"]["histogram"] == {1: 1, 3: 1}
    assert summary["patients_over_cap"] == 1 and summary["records_usable_per_epoch"] == 3


def _splits(n: int, seed: int, sites: np.ndarray | None = None) -> Splits:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.random((n, 4, 4)).astype(np.float32)
    groups = grouping.construct_patients(y, seed=seed)
    return Splits(name="t", classes=("a", "b"), train_x=x, train_y=y, val_x=x[:4], val_y=y[:4],
                  test_x=x[:4], test_y=y[:4], train_groups=groups,
                  site_names=("s0", "s1") if sites is not None else (), train_site=sites)


@settings(derandomize=True, max_examples=8, deadline=None)
@given(n=st.integers(150, 400), num_sites=st.integers(2, 4),
       partitioner=st.sampled_from(["iid", "dirichlet"]), holdout=st.sampled_from([0.1, 0.3]),
       seed=st.integers(0, 1000))
def test_a_patient_never_spans_sites_or_the_holdout(n, num_sites, partitioner, holdout, seed):
    splits = _splits(n, seed)
    seen: set = set()
    records = 0
    for site_id in range(num_sites):
        d = site_data(splits, site_id=site_id, num_sites=num_sites, partitioner=partitioner,
                      alpha=0.5, holdout=holdout, shift=0.0, seed=seed)
        train, hold = set(d.train_groups.tolist()), set(d.holdout_groups.tolist())
        assert not train & hold and not (train | hold) & seen
        seen |= train | hold
        records += len(d.train_y) + len(d.holdout_y)
        # every record of a site's patient is at that site, with its own label
        for g, part_y, part_g in ((train, d.train_y, d.train_groups),
                                  (hold, d.holdout_y, d.holdout_groups)):
            for p in g:
                assert (part_g == p).sum() == (splits.train_groups == p).sum()
                np.testing.assert_array_equal(part_y[part_g == p],
                                              splits.train_y[splits.train_groups == p])
        assert len(hold) == max(1, round((len(train) + len(hold)) * holdout))
    assert records == n and seen == set(splits.train_groups.tolist())


def test_natural_sites_need_each_patient_in_one_site():
    splits = _splits(200, 0, sites=np.zeros(200, dtype=np.int64))
    sites = (splits.train_groups % 2).astype(np.int64)  # by patient: fine
    ok = Splits(**{**splits.__dict__, "train_site": sites})
    parts = partition_patients(ok, num_sites=2, partitioner="site", alpha=0.5, seed=0)
    assert sum(len(p) for p in parts) == int(splits.train_groups.max()) + 1
    d = site_data(ok, site_id=1, num_sites=2, partitioner="site", alpha=0.5, holdout=0.2,
                  shift=0.0, seed=0)
    assert set(np.concatenate([d.train_groups, d.holdout_groups]) % 2) == {1}
    split_patient = sites.copy()
    split_patient[np.flatnonzero(np.bincount(splits.train_groups)[splits.train_groups] > 1)[0]] ^= 1
    bad = Splits(**{**splits.__dict__, "train_site": split_patient})
    with pytest.raises(ValueError, match="more than one site"):
        site_data(bad, site_id=0, num_sites=2, partitioner="site", alpha=0.5, holdout=0.2,
                  shift=0.0, seed=0)


def test_the_dataset_option_constructs_patients_and_names_bad_options(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8)).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    plain = load_dataset(f"medmnist:{path}")
    grouped = load_dataset(f"medmnist:{path}?patients=constructed", seed=5)
    assert plain.train_groups is None
    np.testing.assert_array_equal(grouped.train_groups,
                                  grouping.construct_patients(grouped.train_y, seed=5))
    np.testing.assert_array_equal(grouped.train_x, plain.train_x)
    for bad in ("?patients=real", "?patient=constructed", "?patients=constructed&x=1"):
        with pytest.raises(ValueError, match="patients=constructed"):
            load_dataset(f"medmnist:{path}{bad}")


@pytest.mark.integration
def test_the_grouped_scenario_partitions_real_pneumoniamnist_by_patient(pneumonia_npz, tmp_path):
    """The scenario file, through the loader a simulated site uses (client.admission)."""
    cfg = resolve_config("pneumonia-patients", [f"data-dir={pneumonia_npz.parent}",
                                                f"cache-dir={tmp_path / 'cache'}"], None)
    assert cfg.dataset == "medmnist:pneumoniamnist?patients=constructed"
    seen: set = set()
    records = 0
    for site_id in range(cfg.num_sites):
        d = load_site_data(scenario_policy(cfg, {"partition-id": site_id}))
        mine = set(d.train_groups.tolist()) | set(d.holdout_groups.tolist())
        assert not set(d.train_groups.tolist()) & set(d.holdout_groups.tolist())
        assert not mine & seen
        seen |= mine
        records += len(d.train_y) + len(d.holdout_y)
        assert grouping.group_sizes(d.train_groups).max() <= 10
    assert records == 4708 and len(seen) == 1922  # seed 0's construction (docs/data.md)

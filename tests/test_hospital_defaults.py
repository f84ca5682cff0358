"""Defaults that train every hospital (issue 24): each site's expected batch is planned
from its public record count; a hospital too small for any batch stops the run before
round 1, named as the metrics name it, with the key to change; never silently left out."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import main as cli_main
from cli.main import print_summary
from common.batches import MIN_STEPS_PER_EPOCH, BatchPlanError, plan_batch, plan_site_batches
from common.config import RunConfig
from common.data.datasets import federation, site_data, site_train_counts


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n=st.integers(1, 5000), batch=st.integers(1, 512))
def test_the_planned_batch_fits_every_site_that_can_train(n, batch):
    try:
        b = plan_batch(n, batch_size=batch)
    except BatchPlanError as exc:
        assert n < MIN_STEPS_PER_EPOCH and "lower site-holdout" in str(exc)
        return
    assert 1 <= b <= min(batch, n)
    # the requested batch where the site holds enough records, else several steps per epoch
    assert b == batch or math.ceil(n / b) >= MIN_STEPS_PER_EPOCH


def test_breast_cancer_hospitals_every_site_gets_a_batch_it_can_take(tmp_path):
    cfg = RunConfig(dataset="breast-cancer-hospitals", partitioner="site",
                    data_dir=str(tmp_path / "data"))
    splits, _ = federation(cfg)
    counts, names = site_train_counts(splits, num_sites=4, partitioner="site", alpha=0.5,
                                      holdout=cfg.site_holdout, seed=cfg.seed)
    plan = plan_site_batches(counts, batch_size=cfg.batch_size, names=names)
    assert names == dict(enumerate(splits.site_names))
    assert min(counts.values()) < cfg.batch_size  # the hospital main used to leave out
    for sid, n in counts.items():  # the counts are what the site itself trains on
        data = site_data(splits, site_id=sid, num_sites=4, partitioner="site", alpha=0.5,
                         holdout=cfg.site_holdout, shift=0.0, seed=cfg.seed)
        assert len(data.train_y) == n and plan[sid] <= n


def test_a_hospital_too_small_stops_the_run_before_round_1_by_name(tmp_path, capsys):
    rows = ["a,b,hospital,label"]
    for h, n in (("big-general", 60), ("tiny-clinic", 10)):
        rows += [f"{i},{i % 7},{h},{i % 2}" for i in range(n)]
    (tmp_path / "h.csv").write_text("\n".join(rows) + "\n")
    rc = cli_main(["simulate", "--out", str(tmp_path / "run"), "--set",
                   f"dataset=csv:{tmp_path / 'h.csv'}?site=hospital", "--set", "partitioner=site",
                   "--set", "num-sites=2", "--set", "site-holdout=0.6"])
    err = capsys.readouterr().err
    assert rc == 2 and "tiny-clinic has 3 training records" in err and "site-holdout" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_site_that_never_trained_is_named_as_the_metrics_name_it(capsys):
    summary = {
        "run_id": "r", "mode": "federated", "dp": True, "dataset": "csv", "backbone": "identity",
        "head": "linear", "num_sites": 2,
        "final": {"accuracy": 0.9, "auc": 0.9, "balanced_accuracy": 0.9,
                  "test_sites": {"mean_over_sites": {}, "sites": {"north": {}, "south": {}}}},
        "privacy": {"dp": True, "accountant": "pld", "target_delta": 1e-5, "target_epsilon": 1.0,
                    "unit": "one training record at one site"},
        "sites": {"0": {"history": [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1}]},
                  "1": {"history": [], "status": "request-rejected", "reason": "x"}},
    }
    print_summary(summary)
    assert "WARNING: site 1 (south) never trained" in capsys.readouterr().out

"""How the tabular defaults were chosen (issue 24; docs/results.md): an in-process replay of
the federated run on ``breast-cancer-hospitals`` with the product's own functions (the
site split, the batch plan, σ calibration with the site's floor, Opacus DP-SGD, FedAvg,
the decision rule chosen on the public validation split), for a grid of learning rate,
local epochs and minimum steps per epoch, DP at ε = 1 and without DP, over seeds.
Prints the site-mean accuracy on the public validation split (what the choice reads) and
on the test split (read for the report only).

    SEEDS=5 python -m benchmarks.tabular_defaults_sweep breast-cancer-hospitals \
        '[{"lr": 0.5, "epochs": 3, "rounds": 5, "batch": 64, "minsteps": 4}]'
"""
import json
import os
import sys

import numpy as np

from common.config import RunConfig
from common.data.datasets import federation, site_data
from common.batches import MIN_STEPS_PER_EPOCH, plan_batch
from common.models import training
from common.models.heads import make_head, head_state, load_head_state
from common.privacy.accounting import calibrate_noise_multiplier, dp_plan
from common.aggregation import aggregate
from common.models.decision import choose_decision
from server.evaluation import per_site_metrics  # noqa: E402

def run(dataset, *, lr, epochs, rounds, batch, dp, seed, holdout=0.2,
        objective="balanced_accuracy", minsteps=MIN_STEPS_PER_EPOCH):
    cfg = RunConfig(dataset=dataset, partitioner="site", seed=seed, backbone="identity", data_dir=".fedtransfer/data")
    splits, schema = federation(cfg)
    sites = [site_data(splits, site_id=i, num_sites=4, partitioner="site", alpha=0.5, holdout=holdout, shift=0, seed=seed) for i in range(4)]
    xs = [schema.transform(s.train_x) for s in sites]
    d = xs[0].shape[1]
    g = make_head("linear", in_dim=d, num_classes=2, seed=seed)
    glob = head_state(g)
    sig = {}
    for i, s in enumerate(sites):
        n = len(s.train_y); b = plan_batch(n, batch_size=batch, min_steps=minsteps)
        q, st = dp_plan(n, batch_size=b, epochs=epochs)
        sig[i] = (b, calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=q, steps=st*rounds) if dp else 0)
        sig[i] = (b, max(sig[i][1], 0.3) if dp else 0)
    for r in range(rounds):
        heads, counts = [], []
        for i, s in enumerate(sites):
            h = make_head("linear", in_dim=d, num_classes=2); load_head_state(h, glob)
            b, sigma = sig[i]
            if dp:
                training.train_dp(h, xs[i], s.train_y, epochs=epochs, batch_size=b, lr=lr, noise_multiplier=sigma, clip_norm=1.0)
            else:
                training.train_plain(h, xs[i], s.train_y, epochs=epochs, batch_size=b, lr=lr, seed=seed+i+1000*r)
            heads.append(head_state(h)); counts.append(len(s.train_y))
        glob = aggregate(heads, counts, method="fedavg")
    load_head_state(g, glob)
    pv = training.predict_proba(g, schema.transform(splits.val_x)); pt = training.predict_proba(g, schema.transform(splits.test_x))
    rule = choose_decision(pv, splits.val_y, objective=objective)
    m = per_site_metrics(pt, splits.test_y, splits.test_site, splits.site_names, rule)["mean_over_sites"]["accuracy"]
    v = per_site_metrics(pv, splits.val_y, splits.val_site, splits.site_names, rule)["mean_over_sites"]["accuracy"]
    return m, v

if __name__ == "__main__":
    ds = sys.argv[1]
    grid = json.loads(sys.argv[2])
    for combo in grid:
        res = {True: [], False: []}
        for dp in (True, False):
            for seed in range(int(os.environ.get("SEEDS", "3"))):
                res[dp].append(run(ds, dp=dp, seed=seed, **combo))
        dpm = np.mean([r[0] for r in res[True]]); nom = np.mean([r[0] for r in res[False]])
        print(json.dumps(combo), f"DP rule {dpm:.3f} val {np.mean([r[1] for r in res[True]]):.3f} | noDP rule {nom:.3f} val {np.mean([r[1] for r in res[False]]):.3f} | gap {nom-dpm:.3f}", flush=True)

"""``mode = centralized``: every site's training records pooled in one place.

Non-private by default (``dp = false``): the utility ceiling a federation is
compared against. With ``dp = true`` it is pooled DP-SGD with one accountant.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from client.admission import load_site_data, scaled
from client.round import site_features
from client.settings import scenario_policy
from common.config import RunConfig
from common.models import training
from common.models.finetune import model_state
from common.privacy.accounting import calibrate_noise_multiplier, dp_plan, epsilon
from server.evaluation import GlobalEval
from server.records import RunRecords, round_record, summary_record

log = logging.getLogger(__name__)


def run_centralized(cfg: RunConfig) -> dict:
    t0 = time.perf_counter()
    records = RunRecords(cfg.out_dir)
    records.write_config(cfg)
    # The same per-site records and cached features the federation uses: the
    # pooled baseline differs only in where training happens, and it never
    # runs the backbone again when a federated run has already filled the cache.
    ev = GlobalEval(cfg)  # the federation's schema, dp-scaled features fitted on public data
    feats_x, feats_y, feat_seconds = [], [], 0.0
    for site_id in range(cfg.num_sites):
        settings = scenario_policy(cfg, {"partition-id": site_id})
        data = scaled(load_site_data(settings), ev.schema)
        f = site_features(settings, cfg.trainable, data)
        feats_x.append(f.train)
        feats_y.append(data.train_y)
        feat_seconds += f.seconds
    x, y = np.concatenate(feats_x), np.concatenate(feats_y)
    device = training.resolve_device(cfg.device)
    head = ev.head()
    weights = ev.public_class_weights() if cfg.class_weights == "public" else None
    epochs = cfg.num_rounds * cfg.local_epochs
    eps, history = None, []
    if cfg.dp:
        q, steps = dp_plan(len(y), batch_size=cfg.batch_size, epochs=epochs)
        sigma = cfg.noise_multiplier or calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, sample_rate=q, steps=steps)
        res = training.train_dp(head, x, y, epochs=epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, momentum=cfg.momentum,
                                noise_multiplier=sigma, clip_norm=cfg.clip_norm, seed=None,
                                device=device, class_weights=weights)
        history = res.mechanisms
        eps = epsilon(history, delta=cfg.target_delta)
    else:
        res = training.train_plain(head, x, y, epochs=epochs, batch_size=cfg.batch_size,
                                   lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed,
                                   device=device, class_weights=weights)
    m = ev.report(model_state(head))
    sites = {"pooled": {
        "epsilon": eps, "delta": cfg.target_delta if cfg.dp else None,
        "num_examples": int(len(y)), "status": "completed",
        "history": [{"round": 1, "noise_multiplier": h.noise_multiplier,
                     "sample_rate": h.sample_rate, "steps": h.steps} for h in history]}}
    summary = summary_record(
        cfg, run_id=f"centralized-{int(time.time())}", report=m, classes=list(ev.classes),
        schema=ev.schema, class_weights=weights, rounds=[round_record(1, m)], sites=sites,
        timing={"total_seconds": time.perf_counter() - t0, "feature_seconds": feat_seconds,
                "train_seconds": res.seconds})
    records.write_summary(summary)
    log.info("centralized: test acc %.3f auc %.3f bal %.3f (decision rule chosen on val; argmax "
             "acc %.3f bal %.3f)", m["test"]["accuracy"], m["test"]["auc"],
             m["test"]["balanced_accuracy"], m["test"]["argmax"]["accuracy"],
             m["test"]["argmax"]["balanced_accuracy"])
    return summary

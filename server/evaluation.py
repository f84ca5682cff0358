"""The server's global evaluation: its public splits as cached features, the
shipped decision rule chosen on public validation data, and test metrics.

Everything here reads public data and the aggregated head only: no site's
records, no ε.
"""

from __future__ import annotations

import time

import numpy as np

from common.config import RunConfig
from common.data.datasets import federation, fingerprint_arrays
from common.data.schema import Schema
from common.models import training
from common.models.decision import choose_decision
from common.models.features import cached_features
from common.models.finetune import (
    SUFFIX_DIM,
    input_backbone,
    is_tuned,
    load_model_state,
    make_model,
)
from common.models.metrics import metrics_at_rule


class GlobalEval:
    """The server's public splits (validation and test) as cached features, in
    the federation's schema (tabular records scaled by its constants). Where
    the records carry their site (a natural partition), test metrics are also
    given per site and as the mean over sites (FLamby's cross-silo protocol)."""

    def __init__(self, cfg: RunConfig, splits=None, schema: Schema | None = None):
        t0 = time.perf_counter()
        if splits is None or schema is None:
            splits, schema = federation(cfg, dp_as_public=True)
        # Pooled features (trainable = head) or the activations at the cut point.
        backbone = input_backbone(cfg.backbone, cfg.image_size, cfg.trainable)
        device = training.resolve_device(cfg.device)

        def feats(x, y, tag):
            x = schema.transform(x)
            fp = fingerprint_arrays(x, y) + f":{tag}"
            return cached_features(backbone, x, data_fingerprint=fp, cache_dir=cfg.cache_dir,
                                   device=device).features

        self.splits, self.schema = splits, schema  # raw public splits (val, test) for distillation
        self.test_x, self.test_y = feats(splits.test_x, splits.test_y, "test"), splits.test_y
        self.val_x, self.val_y = feats(splits.val_x, splits.val_y, "val"), splits.val_y
        self.num_classes = splits.num_classes
        self.classes = splits.classes
        # The head's input width: the backbone's features, or the tuned suffix's output.
        self.feature_dim = SUFFIX_DIM if is_tuned(cfg.trainable) else self.test_x.shape[1]
        self.cfg = cfg
        self.seconds = time.perf_counter() - t0

    def head(self, arrays: dict[str, np.ndarray] | None = None):
        """The global model (a head, or a tuned suffix + head), from ``arrays``."""
        cfg = self.cfg
        head = make_model(cfg.trainable, head=cfg.head, backbone=cfg.backbone,
                          image_size=cfg.image_size, in_dim=self.feature_dim,
                          num_classes=self.num_classes, hidden_dim=cfg.hidden_dim, seed=cfg.seed)
        return load_model_state(head, arrays) if arrays is not None else head

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
        """Test and val metrics at argmax (per site too, where sites have test splits)."""
        head = self.head(arrays)
        out = {"test": training.evaluate(head, self.test_x, self.test_y),
               "val": training.evaluate(head, self.val_x, self.val_y)}
        if self.splits.test_site is not None:
            out["test_sites"] = per_site_metrics(
                training.predict_proba(head, self.test_x), self.test_y, self.splits.test_site,
                self.splits.site_names)
        return out

    def report(self, arrays: dict[str, np.ndarray]) -> dict:
        """The decision rule chosen on the public validation split, and test and val
        metrics at that rule (argmax accuracies beside them, under ``argmax``).

        Choosing the rule reads the public split and the head only: post-processing,
        no ε. The test split is only scored, never used to choose.
        """
        head = self.head(arrays)
        p_val = training.predict_proba(head, self.val_x)
        p_test = training.predict_proba(head, self.test_x)
        if self.cfg.decision_objective == "argmax":
            rule = {"rule": "argmax", "reason": "decision-objective = argmax"}
        else:
            rule = choose_decision(p_val, self.val_y, chosen_on=(
                f"the server's public validation split ({len(self.val_y)} records)"),
                objective=self.cfg.decision_objective.replace("-", "_"))
        out = {"decision": rule, "test": metrics_at_rule(p_test, self.test_y, rule),
               "val": metrics_at_rule(p_val, self.val_y, rule)}
        if self.splits.test_site is not None:  # each hospital's own test split, at the rule
            out["test_sites"] = per_site_metrics(p_test, self.test_y, self.splits.test_site,
                                                 self.splits.site_names, rule)
        return out

    def public_class_weights(self) -> list[float]:
        """Balanced class weights from the public validation split's class counts
        (config ``class-weights = "public"``); no site's counts enter them."""
        return training.balanced_class_weights(self.val_y, self.num_classes)


def per_site_metrics(p: np.ndarray, y: np.ndarray, site: np.ndarray, names: tuple[str, ...],
                     rule: dict | None = None) -> dict:
    """Test metrics on each site's own test split (at ``rule``, argmax if None), and
    their unweighted mean over sites (each hospital counts once, as in FLamby)."""
    sites = {n: metrics_at_rule(p[site == i], y[site == i], rule or {"rule": "argmax"})
             for i, n in enumerate(names)}
    keys = ("accuracy", "balanced_accuracy", "auc")
    mean = {k: float(np.nanmean([m[k] for m in sites.values()])) for k in keys}
    return {"mean_over_sites": mean, "sites": sites}

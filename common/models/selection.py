"""Backbone selection on public data, before any ε is spent (``backbone = "auto"``).

Every candidate (``backbone-candidates``, or the default offline zoo) turns the
server's public validation split into features, and a transferability score
(:mod:`common.models.transfer`: LogME, a linear probe, or a DP probe) ranks them.
``backbone = "auto"`` (the default) runs this before round 1: at the start of
``fedtransfer simulate``, and in the ServerApp under ``flwr run .``, which then sends the
chosen backbone in every round request. ``fedtransfer select`` (cli/select.py) prints
and draws it. Tabular records need no choice: their backbone is ``identity``.
"""

from __future__ import annotations

import logging

from common.config import RunConfig
from common.data.datasets import federation, fingerprint_arrays
from common.models import training
from common.models.transfer import (
    TrainingPlan,
    compact,
    format_table,
    parse_candidates,
    select_backbone,
)

log = logging.getLogger(__name__)

SPLITS = ("val", "train")


def labelled_split(cfg: RunConfig, split: str = "val"):
    """``(x, y, classes, source, train_records)`` for the selection (``train_records``:
    the sites' record count, public under replace-one; no training record is read).

    ``val``: the server's public validation split, the only default. ``train``:
    the records the sites train on, pooled; private in a federation, so the
    record says ``private-train`` and the audit flags it (kept for comparisons).
    """
    if split not in SPLITS:
        raise ValueError(f"selection split {split!r}: allowed {', '.join(SPLITS)}")
    splits, schema = federation(cfg, dp_as_public=True)
    if schema.input == "tabular":
        raise ValueError("backbone selection is for image records; tabular records use "
                         "backbone 'identity'")
    n = splits.num_train_records
    if split == "val":
        return schema.transform(splits.val_x), splits.val_y, splits.classes, "public-val", n
    return (schema.transform(splits.train_x), splits.train_y, splits.classes, "private-train", n)


def run_selection(cfg: RunConfig, *, split: str = "val") -> dict:
    """Score ``cfg``'s candidates on ``split`` and return the selection record."""
    x, y, classes, source, train_records = labelled_split(cfg, split)
    candidates = parse_candidates(cfg.backbone_candidates, default_size=cfg.image_size)
    log.info("selecting a backbone among %d candidates on %d %s records (%s)", len(candidates),
             len(y), split, source)
    return select_backbone(
        x, y, num_classes=len(classes), candidates=candidates, score=cfg.selection_score,
        data_fingerprint=fingerprint_arrays(x, y) + f":{split}", cache_dir=cfg.cache_dir,
        device=training.resolve_device(cfg.device), source=source, split=split,
        dataset=cfg.dataset, plan=training_plan_of(cfg, train_records))


def training_plan_of(cfg: RunConfig, train_records: int) -> TrainingPlan:
    """The scenario's training plan (config values and the public record count) that
    the ``rehearsal`` score replays. Pseudo-sites follow the Dirichlet partitioner's
    label skew; any other partitioner (``iid``, natural ``site``) is replayed as IID."""
    return TrainingPlan(
        num_sites=cfg.num_sites, train_records=train_records, rounds=cfg.num_rounds,
        local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.lr, clip_norm=cfg.clip_norm, momentum=cfg.momentum,
        partitioner="dirichlet" if cfg.partitioner == "dirichlet" else "iid",
        dirichlet_alpha=cfg.dirichlet_alpha, head=cfg.head, hidden_dim=cfg.hidden_dim,
        target_epsilon=cfg.target_epsilon if cfg.dp else None, delta=cfg.target_delta,
    )


def apply_selection(cfg: RunConfig, record: dict) -> RunConfig:
    """``cfg`` with the chosen backbone and image size, and the evidence recorded."""
    size = record["image_size"] or cfg.image_size
    return cfg.replace(backbone=record["backbone"], image_size=size,
                       backbone_selection=compact(record))


def resolve_auto(cfg: RunConfig, *, show=log.info) -> RunConfig:
    """``backbone = "auto"``: ``identity`` for tabular records; for images, select on the
    public split, ``show`` the table, and return the resolved config."""
    cfg = cfg.resolved_backbone()
    if cfg.backbone != "auto":
        return cfg
    record = run_selection(cfg)
    show(format_table(record))
    return apply_selection(cfg, record)

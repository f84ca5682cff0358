"""``fedtransfer select``: choose the backbone on public data before any ε is spent.

Every candidate (``backbone-candidates``, or the default offline zoo) turns the
server's public validation split into features; LogME and a cross-validated
linear probe score them (:mod:`common.transfer`). The command prints the ranked
table, draws it, warns of negative transfer, and writes the resolved scenario
(``config.toml``, with ``backbone-selection`` holding the evidence) and
``selection.json`` / ``selection.png``. ``backbone = "auto"`` in a scenario runs
the same selection at the start of ``fedtransfer simulate``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common import training
from common.config import RunConfig
from common.data import federation, fingerprint_arrays
from common.jsonio import write_json_atomic
from common.transfer import (
    DPPlan,
    compact,
    format_table,
    parse_candidates,
    select_backbone,
)

log = logging.getLogger("fedtransfer")

SPLITS = ("val", "train")


def labelled_split(cfg: RunConfig, split: str = "val"):
    """``(x, y, classes, source)`` for the selection.

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
    if split == "val":
        return schema.transform(splits.val_x), splits.val_y, splits.classes, "public-val"
    return schema.transform(splits.train_x), splits.train_y, splits.classes, "private-train"


def run_selection(cfg: RunConfig, *, split: str = "val") -> dict:
    """Score ``cfg``'s candidates on ``split`` and return the selection record."""
    x, y, classes, source = labelled_split(cfg, split)
    candidates = parse_candidates(cfg.backbone_candidates, default_size=cfg.image_size)
    log.info("selecting a backbone among %d candidates on %d %s records (%s)", len(candidates),
             len(y), split, source)
    return select_backbone(
        x, y, num_classes=len(classes), candidates=candidates, score=cfg.selection_score,
        data_fingerprint=fingerprint_arrays(x, y) + f":{split}", cache_dir=cfg.cache_dir,
        device=training.resolve_device(cfg.device), source=source, split=split,
        dataset=cfg.dataset, dp=dp_plan_of(cfg))


def dp_plan_of(cfg: RunConfig) -> DPPlan | None:
    """The scenario's DP-SGD plan (config values only) for the ``dp-probe`` score."""
    if not cfg.dp:
        return None
    return DPPlan(target_epsilon=cfg.target_epsilon, delta=cfg.target_delta,
                  batch_size=cfg.batch_size, epochs=cfg.num_rounds * cfg.local_epochs,
                  learning_rate=cfg.learning_rate, clip_norm=cfg.clip_norm,
                  momentum=cfg.momentum)


def apply_selection(cfg: RunConfig, record: dict) -> RunConfig:
    """``cfg`` with the chosen backbone and image size, and the evidence recorded."""
    size = record["image_size"] or cfg.image_size
    return cfg.replace(backbone=record["backbone"], image_size=size,
                       backbone_selection=compact(record))


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """``backbone = "auto"``: select on the public split, print why, return the resolved config."""
    if cfg.backbone != "auto":
        return cfg
    record = run_selection(cfg)
    print(format_table(record))
    return apply_selection(cfg, record)


def plot_selection(record: dict, path: Path) -> Path:
    """Both scores per candidate, best first; the chosen one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["candidates"]
    names = [r["candidate"] for r in rows]
    colours = ["tab:green" if n == record["chosen"] else "tab:grey" for n in names]
    panels = [("logme", "LogME (higher is better)"),
              ("probe_accuracy", "linear-probe accuracy (5-fold CV)")]
    if all("dp_probe_auc" in r for r in rows):
        panels.append(("dp_probe_auc", "DP-probe AUC (5-fold CV, scenario's ε)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(rows) + 1.8),
                             sharey=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    d = record["data"]
    fig.suptitle(f"backbone selection on {d['dataset']} {d['split']} ({d['records']} records, "
                 f"{d['source']}): chosen {record['chosen']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_select(args) -> int:
    from simulations.cli import resolve_config

    cfg = resolve_config(args.config, args.set, None)
    out = Path(args.out or Path("runs") / time.strftime("select-%Y%m%d-%H%M%S"))
    record = run_selection(cfg, split=args.split)
    print(format_table(record))
    out.mkdir(parents=True, exist_ok=True)
    resolved = apply_selection(cfg.replace(out_dir=""), record)
    (out / "config.toml").write_text(resolved.to_toml())
    write_json_atomic(out / "selection.json", record)
    plot = plot_selection(record, out / "selection.png")
    print(f"chosen: backbone = {record['backbone']!r}, image-size = {resolved.image_size}")
    print(f"scenario with the choice and its evidence: {out / 'config.toml'} "
          f"(fedtransfer simulate --config {out / 'config.toml'})")
    print(f"evidence: {out / 'selection.json'}  plot: {plot}")
    return 0


def add_select_command(sub) -> None:
    sp = sub.add_parser("select", help="choose the backbone on public data (LogME and a linear "
                        "probe; no ε), print the ranking, record the choice")
    sp.add_argument("--config", help="a scenario name in simulations/configs/ or a TOML path")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. backbone-candidates=...")
    sp.add_argument("--out", help="where config.toml, selection.json and selection.png go "
                    "(default: runs/select-<time>)")
    sp.add_argument("--split", choices=SPLITS, default="val",
                    help="val: the server's public validation split (default, no ε); train: the "
                         "sites' records, private: the audit flags a run chosen that way")
    sp.set_defaults(func=cmd_select)

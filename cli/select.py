"""``fedtransfer select``: choose the backbone on public data before any ε is spent.

Every candidate (``backbone-candidates``, or the default offline zoo) turns the
server's public validation split into features; the rehearsal (the scenario's
federated DP training replayed on those public records), LogME and a
cross-validated linear probe score them (:mod:`common.models.transfer`). The command prints the ranked
table, draws it, warns of negative transfer, and writes the resolved scenario
(``config.toml``, with ``backbone-selection`` holding the evidence) and
``selection.json`` / ``selection.png``. ``backbone = "auto"`` in a scenario runs
the same selection at the start of ``fedtransfer simulate``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common.jsonio import write_json_atomic
from common.models.transfer import (
    format_table,
)
from simulations.scenarios import resolve_config
from simulations.selection import SPLITS, apply_selection, run_selection

log = logging.getLogger(__name__)

def plot_selection(record: dict, path: Path) -> Path:
    """Every score per candidate, best first; the chosen one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["candidates"]
    names = [r["candidate"] for r in rows]
    colours = ["tab:green" if n == record["chosen"] else "tab:grey" for n in names]
    panels = [("logme", "LogME (higher is better)"),
              ("probe_accuracy", "linear-probe accuracy (5-fold CV)")]
    if all("rehearsal_auc" in r for r in rows):
        panels.insert(0, ("rehearsal_auc", "rehearsal AUC (the scenario's federated DP, 5-fold CV)"))
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
    sp = sub.add_parser("select", help="choose the backbone on public data (a rehearsal of the "
                        "scenario's federated DP training, LogME, a linear probe; no ε), print "
                        "the ranking, record the choice")
    sp.add_argument("--config", help="a scenario name in simulations/configs/ or a TOML path")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. backbone-candidates=...")
    sp.add_argument("--out", help="where config.toml, selection.json and selection.png go "
                    "(default: runs/select-<time>)")
    sp.add_argument("--split", choices=SPLITS, default="val",
                    help="val: the server's public validation split (default, no ε); train: the "
                         "sites' records, private: the audit flags a run chosen that way")
    sp.set_defaults(func=cmd_select)

"""Plots and BENCHMARKS.md from a results document."""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.markdown import render

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_privacy_utility(doc: dict, path: Path) -> Path | None:
    summ = (doc.get("privacy_utility_summary") or {}).get("summary")
    if not summ:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = sorted({r["epsilon_label"] for r in summ}, key=float)
    xs = range(len(labels))
    for metric, ax in zip(("auc", "accuracy"), axes, strict=True):
        for setting, marker in (("federated", "o"), ("centralized", "s")):
            rows = {r["epsilon_label"]: r for r in summ if r["setting"] == setting}
            mean = [rows[lab][metric]["mean"] if lab in rows else float("nan") for lab in labels]
            lo = [rows[lab][metric]["mean"] - rows[lab][metric]["min"] if lab in rows else 0
                  for lab in labels]
            hi = [rows[lab][metric]["max"] - rows[lab][metric]["mean"] if lab in rows else 0
                  for lab in labels]
            ax.errorbar(list(xs), mean, yerr=[lo, hi], marker=marker, capsize=3, label=setting)
        for ref in (doc.get("privacy_utility_summary") or {}).get("reference", []):
            ax.axhline(ref[metric], ls="--", color="grey", lw=1,
                       label=f"{ref['model']} (MedMNIST v2, non-private)")
        ax.set_xticks(list(xs), ["∞" if lab == "inf" else lab for lab in labels])
        ax.set_xlabel("ε per site (δ=1e-5, one record at one site)")
        ax.set_ylabel(f"test {metric.upper() if metric == 'auc' else metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("PneumoniaMNIST: privacy-utility (bars: min–max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(doc: dict, path: Path) -> Path | None:
    cvn, dpo = doc.get("cached_vs_naive"), doc.get("dp_overhead")
    if not cvn and not dpo:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if cvn:
        ax = axes[0]
        rounds = range(1, len(cvn["seconds_per_round"]["naive"]) + 1)
        for arm in ("naive", "cached"):
            ax.plot(list(rounds), cvn["seconds_per_round"][arm], marker="o", label=arm)
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("client seconds (log)")
        ax.set_title("cached features vs backbone in every DP step")
        ax.legend()
        ax.grid(alpha=0.3)
    if dpo:
        ax = axes[1]
        heads = [h for h in ("linear", "mlp") if h in dpo]
        width = 0.35
        for k, mode in enumerate(("hooks", "ghost")):
            ax.bar([i + (k - 0.5) * width for i in range(len(heads))],
                   [dpo[h][f"ratio_{mode}"] for h in heads], width, label=mode)
        ax.axhline(1, color="k", lw=1)
        ax.set_xticks(range(len(heads)), heads)
        ax.set_ylabel("DP-SGD time / plain SGD time")
        ax.set_title("DP overhead on cached features")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(doc: dict, path: Path) -> Path | None:
    pts = [p for p in doc.get("scale") or [] if p.get("seconds_per_round") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n = [p["sites"] for p in pts]
    axes[0].plot(n, [p["seconds_per_round"] for p in pts], marker="o")
    axes[0].set_xlabel("simulated hospitals")
    axes[0].set_ylabel("seconds per round (after round 1)")
    axes[1].plot(n, [p["peak_memory_mb"] for p in pts], marker="o", label="PSS sum")
    axes[1].plot(n, [p["peak_rss_sum_mb"] for p in pts], marker="s", label="RSS sum")
    axes[1].set_xlabel("simulated hospitals")
    axes[1].set_ylabel("peak memory over processes (MB)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Flower simulation on Ray (identity backbone)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict, results_path: Path) -> dict[str, Path]:
    stem = results_path.with_suffix("")
    out = {}
    for key, fn in (("privacy_utility", plot_privacy_utility), ("speed", plot_speed),
                    ("scale", plot_scale)):
        p = fn(doc, Path(f"{stem}-{key}.png"))
        if p is not None:
            out[key] = p
    return out


def write_all(doc: dict, results_path: Path, report_path: Path) -> None:

    plots = write_plots(doc, results_path)
    report_path.write_text(render(doc, results_path, plots, report_path.parent))
    log.info("report: %s; plots: %s", report_path, ", ".join(str(p) for p in plots.values()))

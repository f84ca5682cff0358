"""The run directory: the one owner of every file a run writes and reads back.

``<run>/`` holds ``config.toml`` (every key, resolved), ``schema.json`` (the fitted
federation schema), ``head.safetensors`` (the final global head),
``checkpoint/`` (the last completed round: head, site heads, ``state.json``; all
that ``resume = true`` needs), ``summary.json`` (the run record the audit and
``compare`` read) and ``models/`` (the server's copy of what was delivered,
written by :mod:`server.delivery`). Every JSON file goes through one atomic writer
(:func:`common.jsonio.write_json_atomic`). Federated and centralized runs write
their summaries through the same builder, :func:`summary_record`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.config import RunConfig
from common.data.schema import Schema
from common.jsonio import write_json_atomic
from common.models.training import SECURE_RNG
from common.models.transfer import parse_record
from common.privacy.accounting import NEIGHBOURS, REPORTED_ACCOUNTANT, UNIT_OF_PRIVACY
from common.protocol import released_fields
from server.strategy import HeadFedAvg, SiteRecord

log = logging.getLogger(__name__)


def run_dir(cfg: RunConfig) -> Path:
    """``out-dir``, or a fresh ``runs/<YYYYmmdd-HHMMSS>`` when none is given."""
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _save_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class RunRecords:
    """Reads and writes one run directory."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.out / "checkpoint"

    # -- what the run is ----------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        (self.out / "config.toml").write_text(cfg.to_toml())

    def write_schema(self, schema: Schema) -> None:
        write_json_atomic(self.out / "schema.json", schema.to_dict())

    def read_schema(self) -> Schema | None:
        """The fitted schema of an earlier run in this directory (its DP scaling was
        released once and is reused on resume), or None."""
        path = self.out / "schema.json"
        return Schema.from_dict(json.loads(path.read_text())) if path.is_file() else None

    # -- what it produced ---------------------------------------------------
    def write_head(self, arrays: dict, *, run_id: str, head: str) -> None:
        _save_safetensors(self.out / "head.safetensors", arrays, {"run_id": run_id, "head": head})

    def write_summary(self, summary: dict) -> Path:
        path = self.out / "summary.json"
        write_json_atomic(path, summary)
        return path

    # -- checkpoint and resume ---------------------------------------------
    def save_checkpoint(self, server_round: int, arrays: dict, strategy: HeadFedAvg, *,
                        rounds: list | None = None, run_id: str | None = None) -> None:
        """The last completed round: head weights, per-site reported state and
        heads, and the round records."""
        ck = self.checkpoint
        ck.mkdir(exist_ok=True)
        _save_safetensors(ck / "head.safetensors", arrays)
        for site_id, head in strategy.site_heads.items():
            _save_safetensors(ck / f"site-{site_id}.safetensors", head)
        write_json_atomic(ck / "state.json", {
            "round": server_round, "run_id": run_id, "rounds": rounds or [],
            "dropped": strategy.dropped,
            "sites": {str(s.site_id): {"epsilon": s.epsilon, "delta": s.delta, "status": s.status,
                                       "reason": s.reason, "node_id": s.node_id, "dp": s.dp,
                                       "history": s.history}
                      for s in strategy.sites.values()}})

    def resume(self, strategy: HeadFedAvg, arrays: dict, *, num_rounds: int
               ) -> tuple[int, dict, list[dict], dict]:
        """Restore ``strategy`` from the checkpoint.

        Returns ``(first round to run, global head, round records, resumed-from info)``.
        Without a checkpoint the run starts at round 1 (and says so).

        Raises:
            ValueError: the checkpoint's head does not fit this run's head, or it
                records more rounds than ``num_rounds``.
        """
        ck = self.checkpoint
        state_path = ck / "state.json"
        if not state_path.is_file():
            log.warning("resume: no checkpoint at %s; starting at round 1", ck)
            return 1, arrays, [], {}
        state = json.loads(state_path.read_text())
        head = load_file(str(ck / "head.safetensors"))
        if set(head) != set(arrays) or any(head[k].shape != arrays[k].shape for k in arrays):
            raise ValueError(f"resume: the checkpoint head in {ck} does not match this run's head "
                             f"(keys/shapes {[(k, v.shape) for k, v in head.items()]}); was the "
                             "dataset, backbone or head changed?")
        done = int(state["round"])
        if done > num_rounds:
            raise ValueError(f"resume: the checkpoint is at round {done}, beyond num-rounds="
                             f"{num_rounds}")
        for sid, s in state.get("sites", {}).items():
            rec = SiteRecord(site_id=int(sid), node_id=int(s.get("node_id", -1)),
                             epsilon=float(s.get("epsilon") or 0.0),
                             delta=float(s.get("delta") or 0.0),
                             status=str(s.get("status", "active")), reason=str(s.get("reason", "")),
                             dp=bool(s.get("dp", True)), history=list(s.get("history", [])))
            site_head = ck / f"site-{sid}.safetensors"
            strategy.restore_site(rec, load_file(str(site_head)) if site_head.is_file() else None)
        strategy.dropped.extend(state.get("dropped", []))
        ordered = {k: head[k] for k in arrays}  # the head's own key order
        info = {"run_id": state.get("run_id"), "round": done, "checkpoint": str(ck)}
        log.info("resume: continuing run %s from round %d of %d (checkpoint %s)",
                 state.get("run_id"), done + 1, num_rounds, ck)
        return done + 1, ordered, list(state.get("rounds", [])), info


# -- summary.json -------------------------------------------------------------

def summary_record(cfg: RunConfig, *, run_id: str, report: dict, classes: list[str],
                   schema: Schema, class_weights: list[float] | None, rounds: list[dict],
                   sites: dict, timing: dict, **extra) -> dict:
    """``summary.json`` of a federated or centralized run: what ran, the final
    metrics at the shipped decision rule, per-round and per-site records, and the
    run's privacy facts. ``extra`` (stop reason, dropped replies, ...) is appended."""
    return {
        "run_id": run_id, "mode": cfg.mode, "dp": cfg.dp, "dataset": cfg.dataset,
        "backbone": cfg.backbone, "head": cfg.head, "num_sites": cfg.num_sites,
        "classes": list(classes), "schema": schema.to_dict(),
        "final": final_block(report),
        "class_weights": class_weights_block(cfg, class_weights),
        "rounds": rounds, "sites": sites,
        # Why this backbone: the public-data selection's evidence (common/models/transfer.py)
        **({"backbone_selection": parse_record(cfg.backbone_selection)}
           if cfg.backbone_selection else {}),
        **extra,
        "privacy": privacy_block(cfg),
        "timing": timing,
    }


def round_record(r: int, report: dict, **extra) -> dict:
    """One entry of ``summary["rounds"]``: test and val at the rule chosen that round."""
    return {"round": r, **extra, "test": report["test"], "val": report["val"],
            "decision": report["decision"],
            **({"test_sites": report["test_sites"]} if "test_sites" in report else {})}


def site_records(strategy: HeadFedAvg) -> dict:
    """``summary["sites"]``: what each site reported, in site order."""
    sites = {}
    for s in sorted(strategy.sites.values(), key=lambda s: s.site_id):
        sites[str(s.site_id)] = {
            "dp": s.dp,
            "epsilon": s.epsilon if s.dp else None,
            "delta": s.delta if s.dp else None,
            "status": s.status, "reason": s.reason,
            "rounds_trained": len([h for h in s.history if h["round"] >= 1]),
            "num_examples": s.history[-1]["num_examples"] if s.history else 0,
            "ledger_entries": s.history[-1].get("ledger_entries") if s.history else None,
            "history": s.history,
        }
    return sites


def final_block(report: dict) -> dict:
    """``summary["final"]``: test metrics at the shipped decision rule (accuracy and
    balanced accuracy at argmax under ``argmax``), the rule, and val the same way."""
    return {**report["test"], "decision": report["decision"], "val": report["val"],
            **({"test_sites": report["test_sites"]} if "test_sites" in report else {})}


def class_weights_block(cfg: RunConfig, weights: list[float] | None) -> dict:
    if not weights:
        return {"mode": cfg.class_weights, "weights": None}
    return {"mode": cfg.class_weights, "weights": weights,
            "source": "balanced weights n / (K n_k) from the class counts of the server's "
                      "public validation split, sent to every site in the round request"}


DECISION_NOTE = ("the decision rule (a threshold, or a prior shift for more than two classes) is "
                 "chosen on the server's public validation split after training: post-processing "
                 "of the DP head on public data, so it costs no ε")
CLASS_WEIGHTS_NOTE = ("class-weights = public: the loss weights come from the public validation "
                      "split's class counts, never a site's; each record's weighted gradient is "
                      "still clipped to clip-norm, so the DP-SGD mechanism and its ε are unchanged")


def privacy_block(cfg: RunConfig) -> dict:
    """The run's privacy facts. ``released`` lists every field a site may send and
    its class (:mod:`common.protocol`), for the audit and for the reader."""
    released = released_fields()
    if not cfg.dp:
        return {"dp": False, "unit": UNIT_OF_PRIVACY, "accountant": None,
                "note": "non-private baseline: no ε guarantee", "decision": DECISION_NOTE,
                "released": released}
    return {
        "dp": True,
        "unit": UNIT_OF_PRIVACY,
        "accountant": REPORTED_ACCOUNTANT,
        "neighbours": NEIGHBOURS,
        "mechanism": "DP-SGD (Opacus), Poisson sampling, per-sample clipping, Gaussian noise",
        "target_epsilon": cfg.target_epsilon,
        "target_delta": cfg.target_delta,
        "trust_model": ("each site's own policy (its node config) decides DP, its cap and δ, its "
                        "holdout and what may leave; the run config only requests. Local DP-SGD "
                        "protects a site's records from the server and the other sites; "
                        "aggregation is post-processing"),
        "secure_rng": SECURE_RNG,
        "hyperparameters": cfg.hyperparameter_source,
        **({"distillation": "post-processing: the student is distilled from the DP-trained heads "
                            "on public data only, so it costs no ε"} if cfg.distill else {}),
        "decision": DECISION_NOTE,
        **({"class_weights": CLASS_WEIGHTS_NOTE} if cfg.class_weights == "public" else {}),
        "released": released,
        "not_charged": ["each site's exact training-unit count (num-examples: records, or patients at a patient-level site), and the "
                        "schedule derived from it (sample-rate, steps), are declared public; ε "
                        "is therefore for replace-one neighbours",
                        "coarse timings (0.1 s), from a site whose own policy releases them "
                        "(release-timings, off by default), are declared public"],
        "site_local": ["training loss", "holdout metrics", "feature-cache hits",
                       "file and class names in data errors"],
    }

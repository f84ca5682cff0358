"""The coordinator's side of a run: rounds, global evaluation, run records.

The round loop is Flower's strategy interface driven step by step (as
``Strategy.start`` does), so that the server can stop cleanly when too few
sites remain, print a line per round, and checkpoint after each round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from safetensors.numpy import save_file

from common import training
from common.backbones import get_backbone
from common.config import RunConfig
from common.data import federation, fingerprint_arrays
from common.decision import choose_decision, describe_decision
from common.features import cached_features
from common.heads import head_state, load_head_state, make_head
from common.jsonio import write_json_atomic
from common.metrics import metrics_at_rule
from common.modelio import read_card
from common.privacy import NEIGHBOURS, REPORTED_ACCOUNTANT, UNIT_OF_PRIVACY
from common.protocol import (
    from_array_record,
    released_fields,
    to_array_record,
    train_request,
)
from common.schema import Schema
from common.transfer import parse_record
from server.delivery import DELIVER_MESSAGE_TYPE, deliver
from server.distill import delivery_card, run_distillation, write_server_copy
from server.polling import PollingGrid
from server.scaling import fit_dp_scaling
from server.strategy import HeadFedAvg

log = logging.getLogger("fedtransfer.server")


def default_out_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class GlobalEval:
    """The server's public splits (validation and test) as cached features, in
    the federation's schema (tabular records scaled by its constants). Where
    the records carry their site (a natural partition), test metrics are also
    given per site and as the mean over sites (FLamby's cross-silo protocol)."""

    def __init__(self, cfg: RunConfig, splits=None, schema: Schema | None = None):
        t0 = time.perf_counter()
        if splits is None or schema is None:
            splits, schema = federation(cfg, dp_as_public=True)
        backbone = get_backbone(cfg.backbone, cfg.image_size)
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
        self.feature_dim = self.test_x.shape[1]
        self.cfg = cfg
        self.seconds = time.perf_counter() - t0

    def head(self, arrays: dict[str, np.ndarray] | None = None):
        head = make_head(self.cfg.head, in_dim=self.feature_dim, num_classes=self.num_classes,
                         hidden_dim=self.cfg.hidden_dim, seed=self.cfg.seed)
        return load_head_state(head, arrays) if arrays is not None else head

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


def round_line(r: int, total: int, m: dict, strategy: HeadFedAvg, cfg: RunConfig,
               classes: list[str] | None = None) -> str:
    """One line per round. ``m`` is :meth:`GlobalEval.report`: test metrics at the
    rule chosen on the public val split, with the argmax ones under ``argmax``."""
    eps = " ".join(f"s{s.site_id}={s.epsilon:.3f}" if s.dp else f"s{s.site_id}=no-DP"
                   for s in sorted(strategy.sites.values(), key=lambda s: s.site_id))
    hist = [h for s in strategy.sites.values() for h in s.history if h["round"] == r]
    timing = ""
    if hist:
        timing = (f" | client s: features {np.mean([h['feature_seconds'] for h in hist]):.2f}"
                  f" train {np.mean([h['train_seconds'] for h in hist]):.2f}"
                  f" accounting {np.mean([h['privacy_seconds'] for h in hist]):.2f}"
                  f" total {np.mean([h['site_seconds'] for h in hist]):.2f}")
    privacy = (f" | ε (per record, replace-one, δ={cfg.target_delta:g}) {eps}" if cfg.dp
               else " | no DP")
    test, decision = m["test"], m.get("decision")
    sites = ""
    if "test_sites" in m:
        mean = m["test_sites"]["mean_over_sites"]
        sites = f" | per-site test: mean acc {mean['accuracy']:.3f} auc {mean['auc']:.3f}"
    rule = ""
    if decision is not None and "argmax" in test:
        rule = (f" ({describe_decision(decision, classes)}, chosen on val; argmax acc "
                f"{test['argmax']['accuracy']:.3f} bal {test['argmax']['balanced_accuracy']:.3f})")
    return (f"round {r}/{total} | test acc {test['accuracy']:.3f} auc {test['auc']:.3f} "
            f"bal {test['balanced_accuracy']:.3f}{rule}{sites}{privacy}{timing}")


def run_server(cfg: RunConfig, grid: Grid, *, run_id: str) -> dict:
    """Run all rounds against ``grid`` and write the run directory."""
    t_run = time.perf_counter()
    grid = PollingGrid(grid)  # replies are pulled every 0.1 s, not Flower's 3 s
    out = default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())
    splits, schema = federation(cfg)
    strategy = HeadFedAvg(fraction_train=cfg.fraction_train, min_train_nodes=cfg.min_sites,
                          min_available_nodes=cfg.min_sites, aggregation=cfg.aggregation,
                          trim_fraction=cfg.trim_fraction, max_update_norm=cfg.max_update_norm,
                          max_site_weight=cfg.max_site_weight)
    strategy.run_id = run_id
    if cfg.resume and (out / "schema.json").is_file():
        # The fitted schema of the run being resumed: its DP scaling was released once.
        schema = Schema.from_dict(json.loads((out / "schema.json").read_text()))
    elif schema.needs("dp"):  # DP feature scaling before round 1 (server/scaling.py)
        schema = fit_dp_scaling(grid, cfg, schema, strategy)
    ev = GlobalEval(cfg, splits, schema)
    (out / "schema.json").write_text(json.dumps(schema.to_dict(), indent=2))
    arrays = head_state(ev.head())
    class_weights = ev.public_class_weights() if cfg.class_weights == "public" else None
    if class_weights:
        log.info("class weights from the public validation split's counts: %s",
                 ", ".join(f"{c} {w:.3f}" for c, w in zip(ev.classes, class_weights, strict=True)))
    secagg = None
    if cfg.aggregation == "secagg+":  # the server sees only the masked sum (server/secagg.py)
        from server.secagg import SecAggRound

        secagg = SecAggRound(cfg, strategy)
    rounds, first, resumed = [], 1, {}
    if cfg.resume:  # continue from the last completed round (server/resume.py)
        from server.resume import resume_state

        first, arrays, rounds, resumed = resume_state(out, strategy, arrays,
                                                      num_rounds=cfg.num_rounds)
    stop_reason = "completed"
    for r in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        if r > 1 and strategy.active_sites(grid) < cfg.min_sites:
            stop_reason = (f"stopped before round {r}: {strategy.active_sites(grid)} sites with "
                           f"budget left, min-sites = {cfg.min_sites}")
            log.warning(stop_reason)
            break
        # num-rounds: the rounds this run still plans (sites calibrate σ to them)
        config = ConfigRecord({**train_request(cfg, schema.to_json(), class_weights=class_weights),
                               "num-rounds": cfg.num_rounds - first + 1})
        if secagg is not None:
            agg, agg_metrics = secagg(grid, r, arrays, config)
        else:
            messages = list(strategy.configure_train(r, to_array_record(arrays), config, grid))
            replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
            agg, agg_metrics = strategy.aggregate_train(r, replies)
        if agg is not None:
            arrays = from_array_record(agg)
        t_train = time.perf_counter() - t0
        m = ev.report(arrays)  # the rule is re-chosen on val each round (milliseconds)
        rounds.append({"round": r, "sites_aggregated": int(agg_metrics["sites"]) if agg_metrics else 0,
                       "test": m["test"], "val": m["val"], "decision": m["decision"],
                       **({"test_sites": m["test_sites"]} if "test_sites" in m else {}),
                       "train_phase_seconds": t_train,
                       "round_seconds": time.perf_counter() - t0})
        log.info(round_line(r, cfg.num_rounds, m, strategy, cfg, list(ev.classes)))
        save_checkpoint(out, r, arrays, strategy, rounds=rounds, run_id=run_id)
        if agg is None:
            stop_reason = f"stopped after round {r}: no site update could be aggregated"
            if strategy.active_sites(grid) < cfg.min_sites:
                log.warning(stop_reason)
                break
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "head.safetensors"),
              metadata={"run_id": run_id, "head": cfg.head})
    summary = build_summary(cfg, run_id, ev, arrays, rounds, strategy, stop_reason,
                            time.perf_counter() - t_run, class_weights=class_weights)
    if resumed:
        summary["resumed_from"] = resumed
    if secagg is not None:
        summary["secure_aggregation"] = secagg.protocol()
    summary.update(finish(cfg, grid, run_id=run_id, out=out, ev=ev, arrays=arrays,
                          strategy=strategy, last_round=rounds[-1]["round"] if rounds else 0,
                          summary=summary))
    summary["timing"]["total_seconds"] = time.perf_counter() - t_run
    write_json_atomic(out / "summary.json", summary)
    log.info("run directory: %s", out)
    return summary


def finish(cfg: RunConfig, grid: Grid, *, run_id: str, out: Path, ev: GlobalEval, arrays: dict,
           strategy: HeadFedAvg, last_round: int, summary: dict) -> dict:
    """After the last round: distil the student, then deliver head, student and
    card to every site (and keep the server's copy under ``<run>/models``)."""
    outcome, extra = None, {}
    if not any(r["sites_aggregated"] for r in summary["rounds"]):
        reason = "no round aggregated a site update: there is no trained head to distil or deliver"
        log.warning(reason)
        return {"distillation": {"status": "skipped", "reason": reason},
                "delivery": {"status": "skipped", "reason": reason, "sites": {}}}
    if cfg.distill and ev.schema.input == "tabular":
        # The head sits on raw (scaled) features: it is the compact model already.
        params = sum(int(np.prod(v.shape)) for v in arrays.values())
        extra["distillation"] = {"status": "skipped", "reason": (
            f"tabular records: the {params}-parameter head on the scaled features is already "
            "smaller than any student; the head is delivered (predict and export use it)")}
        log.info("distillation skipped: %s", extra["distillation"]["reason"])
    elif cfg.distill:
        try:
            outcome = run_distillation(cfg, ev.splits, ev.test_x, arrays, strategy.site_heads)
            extra.update(outcome.summary)
        except ValueError as exc:  # the federated head stays valid; say why there is no student
            log.error("distillation failed, delivering the head only: %s", exc)
            extra["distillation"] = {"status": "failed", "reason": str(exc)}
    t0 = time.perf_counter()
    head_params = sum(int(np.prod(v.shape)) for v in arrays.values())
    card = delivery_card(cfg, run_id=run_id, server_round=last_round, classes=list(ev.classes),
                         head_in_dim=ev.feature_dim, head_params=head_params,
                         final={k: summary["final"][k] for k in ("auc", "accuracy",
                                                                  "balanced_accuracy", "argmax")},
                         decision=summary["final"]["decision"], outcome=outcome,
                         sites=summary["sites"], unit=UNIT_OF_PRIVACY, schema=ev.schema.to_dict())
    server_card = read_card(write_server_copy(out, card, arrays, outcome))
    delivered = deliver(grid, card=card, head=arrays, student=outcome.student if outcome else None,
                        expected_sha256=server_card["sha256"], timeout=cfg.round_timeout)
    extra["delivery"] = {
        "message_type": DELIVER_MESSAGE_TYPE, "sha256": server_card["sha256"],
        "server_copy": str(out / "models"), "sites": delivered,
        "seconds": time.perf_counter() - t0,
    }
    return extra


def save_checkpoint(out: Path, server_round: int, arrays: dict, strategy: HeadFedAvg, *,
                    rounds: list | None = None, run_id: str | None = None) -> None:
    """The last completed round: head weights, per-site reported state and
    heads, and the round records (all that ``resume = true`` needs)."""
    ck = out / "checkpoint"
    ck.mkdir(exist_ok=True)
    tmp = ck / "head.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, ck / "head.safetensors")
    from server.resume import save_site_heads

    save_site_heads(out, strategy)
    write_json_atomic(ck / "state.json", ({
        "round": server_round, "run_id": run_id, "rounds": rounds or [],
        "dropped": strategy.dropped,
        "sites": {str(s.site_id): {"epsilon": s.epsilon, "delta": s.delta, "status": s.status,
                                   "reason": s.reason, "node_id": s.node_id, "dp": s.dp,
                                   "history": s.history}
                  for s in strategy.sites.values()}}))


def final_block(report: dict) -> dict:
    """``summary["final"]``: test metrics at the shipped decision rule (accuracy and
    balanced accuracy at argmax under ``argmax``), the rule, and val the same way."""
    return {**report["test"], "decision": report["decision"], "val": report["val"],
            **({"test_sites": report["test_sites"]} if "test_sites" in report else {})}


def build_summary(cfg: RunConfig, run_id: str, ev: GlobalEval, arrays: dict, rounds: list,
                  strategy: HeadFedAvg, stop_reason: str, seconds: float, *,
                  class_weights: list[float] | None = None) -> dict:
    final = ev.report(arrays)
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
    return {
        "run_id": run_id,
        "mode": cfg.mode,
        "dp": cfg.dp,
        "dataset": cfg.dataset,
        "backbone": cfg.backbone,
        "head": cfg.head,
        "num_sites": cfg.num_sites,
        "classes": list(ev.classes),
        "schema": ev.schema.to_dict(),
        "final": final_block(final),
        "class_weights": class_weights_block(cfg, class_weights),
        "rounds": rounds,
        "sites": sites,
        "dropped_replies": strategy.dropped,
        "stop_reason": stop_reason,
        "privacy": privacy_block(cfg),
        "timing": {"total_seconds": seconds, "server_feature_seconds": ev.seconds},
        **({"backbone_selection": parse_record(cfg.backbone_selection)}
           if cfg.backbone_selection else {}),
    }


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
        "secure_rng": False,
        "hyperparameters": cfg.hyperparameter_source,
        **({"distillation": "post-processing: the student is distilled from the DP-trained heads "
                            "on public data only, so it costs no ε"} if cfg.distill else {}),
        "decision": DECISION_NOTE,
        **({"class_weights": CLASS_WEIGHTS_NOTE} if cfg.class_weights == "public" else {}),
        "released": released,
        "not_charged": ["each site's exact training-record count (num-examples), and the "
                        "schedule derived from it (sample-rate, steps), are declared public; ε "
                        "is therefore for replace-one neighbours",
                        "coarse timings (0.1 s) are declared public"],
        "site_local": ["training loss", "holdout metrics", "feature-cache hits",
                       "file and class names in data errors"],
    }

"""The coordinator's round loop: request, aggregate, evaluate, record; then distil
and deliver.

The loop is Flower's strategy interface driven step by step (as
``Strategy.start`` does), so that the server can stop cleanly when too few
sites remain, print a line per round, and checkpoint after each round. The
global evaluation is :mod:`server.evaluation`; every file of the run directory
is written by :mod:`server.records`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from common.config import RunConfig, simulated_ledger_dir
from common.batches import plan_site_batches
from common.data.datasets import federation, site_train_counts
from common.models.decision import describe_decision
from common.models.finetune import model_state
from common.models.modelio import read_card
from common.models.selection import resolve_auto
from common.privacy.accounting import UNIT_OF_PRIVACY
from common.protocol import from_array_record, to_array_record, train_request
from server.delivery import (
    DELIVER_MESSAGE_TYPE,
    deliver,
    delivery_card,
    write_server_copy,
)
from server.distill import run_distillation
from server.evaluation import GlobalEval
from server.handshake import Handshake
from server.polling import PollingGrid
from server.records import (
    RunRecords,
    round_record,
    run_dir,
    site_records,
    summary_record,
)
from server.scaling import fit_dp_scaling
from server.secagg import SecAggRound
from server.strategy import HeadFedAvg

log = logging.getLogger(__name__)


def round_line(r: int, total: int, m: dict, strategy: HeadFedAvg, cfg: RunConfig,
               classes: list[str] | None = None) -> str:
    """One line per round. ``m`` is :meth:`GlobalEval.report`: test metrics at the
    rule chosen on the public val split, with the argmax ones under ``argmax``."""
    eps = " ".join(f"s{s.site_id}={s.epsilon:.3f}" if s.dp else f"s{s.site_id}=no-DP"
                   for s in sorted(strategy.sites.values(), key=lambda s: s.site_id))
    hist = [h for s in strategy.sites.values() for h in s.history if h["round"] == r]
    timing = ""
    if hist and all("site_seconds" in h for h in hist):  # where the sites release timings
        timing = (f" | client s: features {np.mean([h['feature_seconds'] for h in hist]):.2f}"
                  f" train {np.mean([h['train_seconds'] for h in hist]):.2f}"
                  f" accounting {np.mean([h['privacy_seconds'] for h in hist]):.2f}"
                  f" total {np.mean([h['site_seconds'] for h in hist]):.2f}")
    privacy = (f" | ε (per {cfg.privacy_unit}, replace-one, δ={cfg.target_delta:g}) {eps}" if cfg.dp
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


def flower_runtime() -> str:
    """``simulation`` when the ServerApp runs inside Flower's Ray simulation (Ray is
    initialised in this process), else ``deployment`` (a ``flwr-serverapp`` process,
    which never starts Ray). The audit reads it: a deployed run must have checked that
    no site holds the public or test records."""
    ray = sys.modules.get("ray")
    return "simulation" if ray is not None and ray.is_initialized() else "deployment"


def plan_batches(cfg: RunConfig, splits, counts: dict[int, int] | None = None
                 ) -> dict[int, int]:
    """Each site's expected batch from its public count (common/batches.py), logged;
    a site too small for any batch stops the run here, before round 1, naming it.
    ``counts``: the sites' admitted training-record counts (from the handshake: public);
    None: a simulated federation's partition counts (a check before Ray starts).

    Raises:
        ValueError: naming the hospital (as the metrics name it) and the key to change.
    """
    simulated, names = site_train_counts(splits, num_sites=cfg.num_sites,
                                         partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                                         holdout=cfg.site_holdout, seed=cfg.seed,
                                         unit=cfg.privacy_unit)
    counts = simulated if counts is None else counts
    plan = plan_site_batches(counts, batch_size=cfg.batch_size, names=names)
    smaller = {names.get(s, f"site {s}"): (b, counts[s]) for s, b in plan.items()
               if b != cfg.batch_size}
    if smaller:
        log.info("expected batch per site (batch-size %d; smaller sites, from their public "
                 "%s counts): %s", cfg.batch_size, cfg.privacy_unit,
                 ", ".join(f"{n} {b} of {c}" for n, (b, c) in smaller.items()))
    return plan


def warn_if_too_few_nodes(grid: Grid, cfg: RunConfig) -> int:
    """Say so when fewer nodes are connected than ``num-sites`` (``flwr run .`` starts
    Flower's default of 2 SuperNodes unless told otherwise); returns the count.

    Called after the first round, when every node that will take part has registered
    (nodes register while the ServerApp starts, so a count taken before is too low)."""
    connected = len(list(grid.get_node_ids()))
    if connected < cfg.num_sites:
        log.warning("%d node(s) connected, num-sites = %d: the other sites cannot train until they "
                    "connect. For `flwr run .` pass --federation-config \"num-supernodes=%d\".",
                    connected, cfg.num_sites, cfg.num_sites)
    return connected


def run_server(cfg: RunConfig, grid: Grid, *, run_id: str) -> dict:
    """Run all rounds against ``grid`` and write the run directory."""
    t_run = time.perf_counter()
    grid = PollingGrid(grid)  # replies are pulled every 0.1 s, not Flower's 3 s
    cfg = resolve_auto(cfg)  # backbone = "auto" (the default), chosen on public data
    if not cfg.ledger_dir:  # record where simulated sites keep their ledgers (the audit's)
        cfg = cfg.replace(ledger_dir=str(simulated_ledger_dir(cfg).resolve()))
    records = RunRecords(run_dir(cfg))
    out = records.out
    records.write_config(cfg)
    splits, schema = federation(cfg)
    strategy = HeadFedAvg(fraction_train=cfg.fraction_train, min_train_nodes=cfg.min_sites,
                          min_available_nodes=cfg.min_sites, aggregation=cfg.aggregation,
                          trim_fraction=cfg.trim_fraction, max_update_norm=cfg.max_update_norm,
                          max_site_weight=cfg.max_site_weight)
    strategy.run_id = run_id
    handshake = Handshake(cfg, schema, run_dir=out)  # sites read records as declared, or no run
    handshake.start(grid)
    strategy.allowed = handshake.accepted
    plan_batches(cfg, splits, handshake.counts())  # every hospital can train, or no round 1
    if cfg.resume and records.read_schema() is not None:
        # The fitted schema of the run being resumed: its DP scaling was released once.
        schema = records.read_schema()
    elif schema.needs("dp"):  # DP feature scaling before round 1 (server/scaling.py)
        schema = fit_dp_scaling(grid, cfg, schema, strategy)
    ev = GlobalEval(cfg, splits, schema)
    records.write_schema(schema)
    arrays = model_state(ev.head())  # the head (and the tuned part of the backbone)
    class_weights = ev.public_class_weights() if cfg.class_weights == "public" else None
    if class_weights:
        log.info("class weights from the public validation split's counts: %s",
                 ", ".join(f"{c} {w:.3f}" for c, w in zip(ev.classes, class_weights, strict=True)))
    secagg = None
    if cfg.aggregation == "secagg+":  # the server sees only the masked sum (server/secagg.py)
        secagg = SecAggRound(cfg, strategy)
    rounds, first, resumed = [], 1, {}
    if cfg.resume:  # continue from the last completed round
        first, arrays, rounds, resumed = records.resume(strategy, arrays, num_rounds=cfg.num_rounds)
    stop_reason = "completed"
    for r in range(first, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        handshake.ask(grid, list(grid.get_node_ids()))  # sites that joined since
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
        if r == first:
            warn_if_too_few_nodes(grid, cfg)
        if agg is not None:
            arrays = from_array_record(agg)
        t_train = time.perf_counter() - t0
        m = ev.report(arrays)  # the rule is re-chosen on val each round (milliseconds)
        rounds.append(round_record(
            r, m, sites_aggregated=int(agg_metrics["sites"]) if agg_metrics else 0,
            train_phase_seconds=t_train, round_seconds=time.perf_counter() - t0))
        log.info(round_line(r, cfg.num_rounds, m, strategy, cfg, list(ev.classes)))
        records.save_checkpoint(r, arrays, strategy, rounds=rounds, run_id=run_id)
        if agg is None:
            stop_reason = f"stopped after round {r}: no site update could be aggregated"
            if strategy.active_sites(grid) < cfg.min_sites:
                log.warning(stop_reason)
                break
    records.write_head(arrays, run_id=run_id, head=cfg.head)
    summary = summary_record(
        cfg, run_id=run_id, report=ev.report(arrays), classes=list(ev.classes), schema=ev.schema,
        class_weights=class_weights, rounds=rounds, sites=site_records(strategy),
        dropped_replies=strategy.dropped, stop_reason=stop_reason,
        timing={"total_seconds": time.perf_counter() - t_run,
                "server_feature_seconds": ev.seconds})
    summary["handshake"] = handshake.summary()
    summary["runtime"] = flower_runtime()
    if resumed:
        summary["resumed_from"] = resumed
    if secagg is not None:
        summary["secure_aggregation"] = secagg.protocol()
    summary.update(finish(cfg, grid, run_id=run_id, out=out, ev=ev, arrays=arrays,
                          strategy=strategy, last_round=rounds[-1]["round"] if rounds else 0,
                          summary=summary))
    summary["timing"]["total_seconds"] = time.perf_counter() - t_run
    records.write_summary(summary)
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
                        expected_sha256=server_card["sha256"], timeout=cfg.round_timeout,
                        allowed=strategy.allowed, run_dir=out)
    extra["delivery"] = {
        "message_type": DELIVER_MESSAGE_TYPE, "sha256": server_card["sha256"],
        "server_copy": str(out / "models"), "sites": delivered,
        "seconds": time.perf_counter() - t0,
    }
    return extra

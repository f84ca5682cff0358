"""Head aggregation: Flower's FedAvg, with site-aware bookkeeping.

The aggregation maths is Flower's own (``aggregate_arrayrecords``, weighted by
``num-examples``). This subclass adds what a DP federation needs around it:
it validates each reply before it can touch the global head, records every
site's reported ε and mechanism per round (only what :mod:`common.protocol`
lets a site send), and stops sampling sites that declined because their
budget is spent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.aggregation import aggregate, clip_derived_bound, update_norm
from common.batches import plan_batch
from common.protocol import (
    OUT_OF_RUN,
    TIMING_KEYS,
    TRAIN_METRICS,
    from_array_record,
    to_array_record,
)
from server.validation import update_problem

log = logging.getLogger(__name__)

@dataclass
class SiteRecord:
    """What the server knows about one site (from its replies only)."""

    site_id: int
    node_id: int
    epsilon: float = 0.0
    delta: float = 0.0
    dp: bool = True  # what the site's own policy says (every reply declares it)
    status: str = "active"
    reason: str = ""
    history: list[dict] = field(default_factory=list)


class HeadFedAvg(FedAvg):
    """Weighted FedAvg over classifier heads, with reply validation.

    Robustness settings (config keys ``aggregation``, ``trim-fraction``,
    ``max-update-norm``, ``max-site-weight``): the aggregation rule; an L2
    bound on each update's distance from the global head (0: derived from the
    round's clip norm, learning rate, steps and σ; < 0: off); and the largest
    share of the FedAvg weight one site's ``num-examples`` can carry.
    """

    def __init__(self, *, aggregation: str = "fedavg", trim_fraction: float = 0.2,
                 max_update_norm: float = 0.0, max_site_weight: float = 1.0, **kwargs) -> None:
        super().__init__(weighted_by_key="num-examples", arrayrecord_key="arrays",
                         configrecord_key="config", **kwargs)
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.max_update_norm, self.max_site_weight = max_update_norm, max_site_weight
        self._request: dict = {}
        self.sites: dict[int, SiteRecord] = {}
        self._node_site: dict[int, int] = {}
        self._global: dict | None = None
        self.run_id = ""  # stamped on each history row, so a resumed run's rows keep theirs
        self.dropped: list[dict] = []
        # The last accepted head per site (a DP release): the ensemble teacher's members.
        self.site_heads: dict[int, dict] = {}
        # Nodes that answered the declaration question as the federation declares
        # (server/handshake.py); None: no handshake (every connected node).
        self.allowed: set[int] | None = None

    # -- sampling ----------------------------------------------------------
    def exhausted_nodes(self) -> set[int]:
        return {s.node_id for s in self.sites.values() if s.status in OUT_OF_RUN}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_array_record(arrays)
        self._request = dict(config)
        skip = self.exhausted_nodes()
        if not skip and self.allowed is None:
            return super().configure_train(server_round, arrays, config, grid)
        nodes = self.eligible(grid)
        n = max(int(len(nodes) * self.fraction_train), min(self.min_train_nodes, len(nodes)))
        nodes = nodes[:n]
        config["server-round"] = server_round
        if skip:
            log.info("round %d: sampling %d sites, skipping %d out of the run", server_round,
                     len(nodes), len(skip))
        from flwr.app import RecordDict

        record = RecordDict({"arrays": arrays, "config": config})
        return self._construct_messages(record, nodes, "train")

    def restore_site(self, rec: SiteRecord, head: dict | None) -> None:
        """Take back one site's record (and its last accepted head) from a checkpoint."""
        self.sites[rec.site_id] = rec
        if rec.node_id >= 0:
            self._node_site[rec.node_id] = rec.site_id
        if head is not None:
            self.site_heads[rec.site_id] = head

    def eligible(self, grid: Grid) -> list[int]:
        """Connected nodes that may be asked for a round: not out of the run, and (once the
        handshake has run) answered the declaration question as the federation declares."""
        skip = self.exhausted_nodes()  # once, not once per node (O(sites²) at 1000 sites)
        return [n for n in grid.get_node_ids()
                if n not in skip and (self.allowed is None or n in self.allowed)]

    def active_sites(self, grid: Grid) -> int:
        return len(self.eligible(grid))

    # -- aggregation -------------------------------------------------------
    def _site(self, node_id: int, site_id: int) -> SiteRecord:
        self._node_site[node_id] = site_id
        if site_id not in self.sites:
            self.sites[site_id] = SiteRecord(site_id=site_id, node_id=node_id)
        return self.sites[site_id]

    def drop(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
        self.dropped.append({"round": server_round, "node_id": node, "reason": reason})

    def accept_train_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Validated replies that may be aggregated; everything else is logged."""
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.drop(server_round, node, f"error reply: {msg.error.reason}")
                continue
            status = msg.content.config_records.get("status")
            if status is not None and status.get("status") != "ok":
                self.mark(int(status.get("site-id", -1)), node, str(status["status"]),
                          str(status.get("reason", "")), server_round=server_round)
                continue
            if "arrays" not in msg.content.array_records or "metrics" not in msg.content.metric_records:
                self.drop(server_round, node, "reply lacks 'arrays' or 'metrics'")
                continue
            metrics = msg.content.metric_records["metrics"]
            missing = [k for k in TRAIN_METRICS if k not in metrics]
            if missing:
                self.drop(server_round, node, f"reply lacks metrics {missing}")
                continue
            update = from_array_record(msg.content.array_records["arrays"])
            problem = update_problem(update, self._global or {}, metrics.get("num-examples"))
            problem = problem or self.norm_problem(update, metrics)
            if problem:
                self.drop(server_round, node, problem)
                # The site spent ε on this round whether or not its update is used:
                # book the spend, and why its update was not aggregated.
                try:
                    self.record_round(server_round, node, metrics, dropped=problem,
                                      status=status)
                except (ValueError, TypeError, OverflowError) as exc:  # garbage metrics too
                    log.warning("round %d: node %d's spend could not be booked: %s",
                                server_round, node, exc)
                continue
            self.record_round(server_round, node, metrics, update, status=status)
            kept.append(msg)
        return kept

    def mark(self, site_id: int, node_id: int, status: str, reason: str, *,
             server_round: int) -> None:
        """A site declined (``budget-exhausted`` ones are not sampled again)."""
        site = self._site(node_id, site_id)
        site.status, site.reason = status, reason
        log.warning("round %d: site %d declined: %s", server_round, site_id, reason)

    def record_round(self, server_round: int, node_id: int, metrics, head: dict | None = None,
                     *, dropped: str | None = None, status=None) -> SiteRecord:
        """Book a reply's spend: the site's ε (with its unit), mechanism, signed ledger
        anchor, coarse timings where the site releases them, why its update was
        dropped (if it was), and (when the server may see it) its head, an
        ensemble-teacher member. ``status`` is the reply's status record (its text
        fields; under SecAgg+ they travel in ``metrics``).

        Raises:
            ValueError, TypeError, OverflowError: metrics that are not numbers;
                nothing is booked.
        """
        text = status if status is not None else metrics
        epsilon, delta = float(metrics["epsilon"]), float(metrics["delta"])
        row = {
            "round": server_round,
            "run_id": self.run_id,
            "noise_multiplier": float(metrics["noise-multiplier"]),
            "sample_rate": float(metrics["sample-rate"]),
            "steps": int(metrics["steps"]),
            "num_examples": int(metrics["num-examples"]),
            "epsilon_after": epsilon,
            "dp": bool(metrics["dp"]),
            "ledger_entries": int(metrics["ledger-entries"]),
            "ledger_head": str(text.get("ledger-head", "")),
            "ledger_signature": str(text.get("ledger-signature", "")),
            "ledger_id": str(text.get("ledger-id", "")),
            "ledger_key_id": str(text.get("ledger-key-id", "")),
            "privacy_unit": str(text.get("privacy-unit", "record")),
            **{k.replace("-", "_"): float(metrics[k]) for k in TIMING_KEYS if k in metrics},
            **({"dropped": dropped} if dropped else {}),
        }
        site = self._site(node_id, int(metrics.get("site-id", -1)))
        site.epsilon, site.delta, site.dp = epsilon, delta, row["dp"]
        if head is not None:
            self.site_heads[site.site_id] = head
        site.history.append(row)
        return site

    def norm_bound(self, metrics) -> float | None:
        """The update norm bound for a reply, or ``None`` when none applies
        (bound off, or derived without DP clipping or without the request)."""
        if self.max_update_norm > 0:
            return self.max_update_norm
        sigma = float(metrics.get("noise-multiplier", 0.0))
        keys = ("clip-norm", "learning-rate", "momentum", "local-epochs", "batch-size")
        if self.max_update_norm < 0 or sigma <= 0 or any(k not in self._request for k in keys):
            return None
        r = self._request
        # the site's expected batch, planned from its public count as the site plans it
        batch = plan_batch(int(float(metrics["num-examples"])), batch_size=int(r["batch-size"]))
        steps = int(r["local-epochs"]) * math.ceil(float(metrics["num-examples"]) / batch)
        dim = sum(int(v.size) for v in (self._global or {}).values())
        return clip_derived_bound(clip_norm=float(r["clip-norm"]),
                                  learning_rate=float(r["learning-rate"]),
                                  momentum=float(r["momentum"]), steps=steps, batch_size=batch,
                                  noise_multiplier=sigma, dim=dim)

    def norm_problem(self, update: dict, metrics) -> str | None:
        bound = self.norm_bound(metrics)
        if bound is None or self._global is None:
            return None
        norm = update_norm(update, self._global)
        if norm > bound:
            how = "max-update-norm" if self.max_update_norm > 0 else "derived from the clip norm"
            return f"update norm {norm:.4g} exceeds the bound {bound:.4g} ({how})"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.accept_train_replies(server_round, replies)
        if not kept:
            return None, None
        if self.aggregation == "fedavg" and self.max_site_weight >= 1.0:
            arrays = aggregate_arrayrecords([m.content for m in kept], self.weighted_by_key)
        else:
            counts = [float(m.content.metric_records["metrics"]["num-examples"]) for m in kept]
            arrays = to_array_record(aggregate(
                [from_array_record(m.content.array_records["arrays"]) for m in kept], counts,
                method=self.aggregation, trim=self.trim_fraction, max_share=self.max_site_weight))
        n = sum(int(m.content.metric_records["metrics"]["num-examples"]) for m in kept)
        return arrays, MetricRecord({"sites": len(kept), "num-examples": n})

"""Secure aggregation of the site heads with Flower's SecAgg+ (``aggregation = "secagg+"``).

Flower 1.41 implements SecAgg+ only as a legacy workflow
(``SecAggPlusWorkflow``, run on a ``LegacyContext`` with a legacy strategy).
:class:`SecAggRound` drives that workflow for one round at a time from our
Message-API round loop (``server/run.py``), so checkpoints, resume, the round
lines, distillation and delivery stay as they are.

What the server sees per round: each site's plaintext metrics (its ε, δ,
mechanism, record count and timings, as without SecAgg+) and the
*sum* of the sites' quantised, masked heads, weighted by ``num-examples``
(the protocol scales each head by ``num-examples / secagg-max-weight`` before
masking). It never sees a single site's head. Therefore it cannot validate,
trim, median or weight-cap a single update, and the distillation teacher is
the global head only; ``common/config.py`` refuses those settings with
``secagg+``. What it can check, and does, is the aggregate: its shape and
dtype against the global head, and that it is finite.

DP is unchanged: every site runs local DP-SGD and commits its spend before
its masked head leaves (``client/site.py``). SecAgg+ adds that the server
cannot see any single site's DP head.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    parameters_to_arrayrecord,
)
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common.config import RunConfig
from common.protocol import (
    HEAD_KEYS,
    TRAIN_METRICS,
    head_from_parameters,
    head_to_parameters,
    parse_declined,
    to_array_record,
)
from server.strategy import HeadFedAvg
from server.validation import update_problem

log = logging.getLogger(__name__)

# Flower's SecAgg+ example values: each site shares its secrets with 3 sites
# (itself and 2 neighbours), and any 2 of them can rebuild a dropped site's mask.
NUM_SHARES = 3
RECONSTRUCTION_THRESHOLD = 2
# Head values are clipped to [-CLIPPING_RANGE, CLIPPING_RANGE] (after the weight
# scaling) and quantised to QUANTIZATION_RANGE levels: Flower's defaults.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22


class _Recorder(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow calls: it samples the sites and books
    each site's plaintext metrics on our :class:`HeadFedAvg`. The parameters it
    receives in ``aggregate_fit`` are already the unmasked weighted mean."""

    def __init__(self, strategy: HeadFedAvg) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_clients=0, accept_failures=True)
        self.strategy = strategy
        self.config: dict = {}
        self.nodes: list[int] = []
        self.booked: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        clients = [c for c in client_manager.all().values() if c.node_id in self.nodes]
        return [(c, FitIns(parameters, dict(self.config))) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        # A decline names its own node; believe it only for a node that did fail this round.
        failed = set(self.nodes) - {proxy.node_id for proxy, _ in results}
        for failure in failures:
            declined = parse_declined(str(failure))
            if declined is not None and declined[1] in failed:  # stop asking a spent site
                self.strategy.mark(*declined, server_round=server_round)
            else:
                log.warning("round %d: secure aggregation lost a site: %s", server_round, failure)
        self.booked = []
        for proxy, fitres in results:
            metrics = fitres.metrics
            missing = [k for k in TRAIN_METRICS if k not in metrics]
            if missing:  # its masked head is in the sum already; say so, do not book it
                self.strategy.drop(server_round, proxy.node_id,
                                   f"reply lacks metrics {missing} (its masked head is in the sum)")
                continue
            self.strategy.record_round(server_round, proxy.node_id, metrics)
            self.booked.append(int(metrics["num-examples"]))
        return (results[0][1].parameters if results else None), {}


class SecAggRound:
    """One federated round through SecAgg+; call it like ``aggregate_train``."""

    def __init__(self, cfg: RunConfig, strategy: HeadFedAvg) -> None:
        self.strategy = strategy
        self.recorder = _Recorder(strategy)
        self.workflow = SecAggPlusWorkflow(
            num_shares=NUM_SHARES, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
            max_weight=cfg.secagg_max_weight, clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE, timeout=cfg.round_timeout)
        base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(base, config=ServerConfig(num_rounds=cfg.num_rounds),
                                     strategy=self.recorder, client_manager=SimpleClientManager())

    def protocol(self) -> dict:
        return {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow)", "num_shares": NUM_SHARES,
                "reconstruction_threshold": RECONSTRUCTION_THRESHOLD,
                "clipping_range": CLIPPING_RANGE, "quantization_range": QUANTIZATION_RANGE,
                "max_weight": self.workflow.max_weight,
                "server_sees": "each site's metrics and the weighted sum of the masked heads; "
                               "never a single head"}

    def __call__(self, grid: Grid, server_round: int, arrays: dict[str, np.ndarray],
                 config: ConfigRecord) -> tuple[ArrayRecord | None, MetricRecord | None]:
        skip = self.strategy.exhausted_nodes()
        nodes = [n for n in grid.get_node_ids() if n not in skip]
        manager = self.context.client_manager
        for node in nodes:
            if str(node) not in manager.all():
                manager.register(GridClientProxy(node, grid, 0))
        self.recorder.nodes = nodes
        self.recorder.booked = []
        self.recorder.config = {**dict(config), "server-round": server_round,
                                HEAD_KEYS: ",".join(arrays)}
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round})
        state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
            head_to_parameters(arrays), keep_input=True)
        log.info("round %d: secure aggregation (SecAgg+) over %d sites", server_round, len(nodes))
        self.workflow(grid, self.context)
        if not self.recorder.booked:
            log.warning("round %d: secure aggregation produced no aggregate", server_round)
            return None, None
        summed = head_from_parameters(arrayrecord_to_parameters(
            state.array_records[MAIN_PARAMS_RECORD], keep_input=True), ",".join(arrays))
        head = {k: np.asarray(v).astype(arrays[k].dtype) for k, v in summed.items()}
        problem = update_problem(head, arrays, len(self.recorder.booked))
        if problem:
            log.warning("round %d: the secure aggregate is unusable: %s", server_round, problem)
            return None, None
        return to_array_record(head), MetricRecord({"sites": len(self.recorder.booked),
                                                    "num-examples": sum(self.recorder.booked)})

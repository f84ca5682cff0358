"""DP feature scaling before round 1: ask every site for its noisy sums.

Only for schema features whose scaling is ``dp`` (:mod:`common.data.schema`). Each
site charges its release to its own ledger (round 0) before replying
(:func:`client.round.scaling_release`); the server books each reply's spend
like a round's, sums the noisy vectors and fits each feature's centre and
scale (post-processing). The fitted schema then travels in every round request.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.data.schema import Schema, SchemaError
from common.protocol import (
    SCALING_MESSAGE_TYPE,
    TRAIN_METRICS,
    from_array_record,
    train_request,
)
from server.strategy import HeadFedAvg

log = logging.getLogger(__name__)


def fit_dp_scaling(grid: Grid, cfg: RunConfig, schema: Schema, strategy: HeadFedAvg) -> Schema:
    """The schema with its ``dp`` features fitted from the sites' noisy sums.

    Raises:
        SchemaError: fewer than ``min-sites`` sites released their sums.
    """
    nodes = strategy.eligible(grid)  # the sites the handshake accepted
    config = ConfigRecord({**train_request(cfg, schema.to_json()), "server-round": 0})
    messages = [Message(content=RecordDict({"config": config}), message_type=SCALING_MESSAGE_TYPE,
                        dst_node_id=n) for n in nodes]
    total, count, answered = None, 0, 0
    for msg in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            strategy.drop(0, node, f"scaling query: error reply: {msg.error.reason}")
            continue
        status = msg.content.config_records.get("status")
        if status is not None and status.get("status") != "ok":
            strategy.mark(int(status.get("site-id", -1)), node, str(status["status"]),
                          str(status.get("reason", "")), server_round=0)
            continue
        metrics = msg.content.metric_records.get("metrics")
        sums = msg.content.array_records.get("sums")
        if metrics is None or sums is None or any(k not in metrics for k in TRAIN_METRICS):
            strategy.drop(0, node, "scaling reply lacks 'sums' or its metrics")
            continue
        vec = from_array_record(sums).get("sums")
        width = 2 * len(schema.needs("dp"))
        if vec is None or vec.shape != (width,) or not np.isfinite(vec).all():
            strategy.drop(0, node, f"scaling sums must be {width} finite numbers")
            continue
        strategy.record_round(0, node, metrics, status=status)
        total = vec.astype(np.float64) if total is None else total + vec
        count += int(metrics["num-examples"])
        answered += 1
    if answered < cfg.min_sites:
        raise SchemaError(f"DP feature scaling: {answered} sites released their sums, min-sites "
                          f"is {cfg.min_sites}; the features {[f.name for f in schema.needs('dp')]}"
                          " cannot be scaled (see the sites' declines in the log)")
    fitted = schema.fit_from_sums(total, count)
    log.info("DP feature scaling: %d features from %d sites (%d records)",
             len(schema.needs("dp")), answered, count)
    return fitted

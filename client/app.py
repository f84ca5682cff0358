"""Flower ClientApp: unpack the message, call :mod:`client.site`, pack the reply.

Two messages: ``train`` (which also evaluates the incoming global head on the
site's holdout, so a round costs one ClientApp process per site, not two) and
``query.deliver`` (save the final head and student, and evaluate that head).
With ``aggregation = "secagg+"`` a round is Flower's four SecAgg+ messages;
``secagg_when_asked`` runs Flower's ``secaggplus_mod`` on them, which masks the
head that ``train`` returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from client.site import (BudgetExhausted, RequestRejected, RoundRequest, SiteSettings,
                         evaluate_site, save_delivery, train_round)
from common.config import RunConfig, parse_config
from common.flowerlog import log_through_flower
from common.records import (HEAD_KEYS, declined_text, from_array_record, head_from_parameters,
                            head_to_parameters, to_array_record)
from common.sitedata import SiteDataError

log = logging.getLogger(__name__)


# Node config keys a deployed site sets for itself (``flower-supernode --node-config``).
# The server's run config can never supply or override them.
SITE_KEYS = ("site-id", "site-name", "data-path", "cache-dir", "ledger-path", "model-dir",
             "target-epsilon", "target-delta")
DEPLOYED_REQUIRED = ("data-path", "ledger-path", "target-epsilon", "target-delta")


def site_settings(cfg: RunConfig, context: Context) -> SiteSettings:
    """The site's own settings, from its node config (never from the server).

    In simulation the node config holds ``partition-id``; the simulated
    hospital's cap is the scenario's ``target-epsilon`` / ``target-delta``.
    A deployed site (its node config has ``data-path``) must set its own
    ledger path and cap: falling back to the run config there would let the
    coordinator choose them.
    """
    node = context.node_config
    if "data-path" in node or "partition-id" not in node:
        missing = [k for k in DEPLOYED_REQUIRED if k not in node]
        if missing:
            raise SiteConfigError(
                f"the site's node config lacks {', '.join(missing)}; a deployed site sets "
                f"them itself: flower-supernode --node-config 'data-path=\"...\" "
                f"ledger-path=\"...\" target-epsilon=1.0 target-delta=1e-5 ...'")
        ledger = Path(str(node["ledger-path"]))
        return SiteSettings(
            site_id=int(node.get("site-id", 0)), ledger_path=ledger,
            cache_dir=Path(str(node.get("cache-dir", ledger.parent / "cache"))), dp=cfg.dp,
            target_epsilon=float(node["target-epsilon"]),
            target_delta=float(node["target-delta"]),
            model_dir=Path(str(node["model-dir"])) if "model-dir" in node else None,
            data_path=str(node["data-path"]), site_name=str(node.get("site-name", "")))
    site_id = int(node.get("partition-id", node.get("site-id", 0)))
    root = Path(cfg.ledger_dir or (Path(cfg.out_dir or ".fedtransfer") / "sites"))
    return SiteSettings(
        site_id=site_id,
        ledger_path=Path(str(node.get("ledger-path", root / f"site-{site_id}" / "ledger.sqlite"))),
        cache_dir=Path(str(node.get("cache-dir", cfg.cache_dir))),
        dp=cfg.dp,
        target_epsilon=float(node.get("target-epsilon", cfg.target_epsilon)),
        target_delta=float(node.get("target-delta", cfg.target_delta)),
        model_dir=Path(str(node["model-dir"])) if "model-dir" in node else None,
    )


class SiteConfigError(ValueError):
    """The site's own node config is incomplete; it does not train."""


class SiteDeclined(RuntimeError):
    """Under SecAgg+, a site that declines a round (why is in the message) drops out of it."""


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its
    config record); every other message goes straight to the app."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        # The mod narrates every stage at DEBUG, which Ray prints from each simulated site.
        logging.getLogger("flwr").setLevel(logging.INFO)
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _request(c, context: Context) -> RoundRequest:
    return RoundRequest(
        run_id=str(context.run_id), server_round=int(c["server-round"]),
        num_rounds=int(c["num-rounds"]), local_epochs=int(c["local-epochs"]),
        batch_size=int(c["batch-size"]), learning_rate=float(c["learning-rate"]),
        momentum=float(c["momentum"]), clip_norm=float(c["clip-norm"]),
        noise_multiplier=float(c["noise-multiplier"]))


def _unpack_train(msg: Message):
    """``(legacy, config, head)`` of a train message. With ``aggregation = "secagg+"``
    Flower's SecAgg+ runs on its legacy workflow: the message holds ``fitins.*``
    records, and the head's array names come in the config."""
    if "fitins.parameters" in msg.content.array_records:
        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        head = head_from_parameters(fitins.parameters, str(fitins.config.get(HEAD_KEYS, "")))
        return True, fitins.config, head
    return False, msg.content["config"], from_array_record(msg.content["arrays"])


def _pack_train(msg: Message, reply, legacy: bool) -> Message:
    if legacy:  # fitres.* records; secagg_when_asked masks the head before it leaves
        fitres = FitRes(Status(Code.OK, "ok"), head_to_parameters(reply.arrays),
                        reply.num_examples, dict(reply.metrics))
        return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": to_array_record(reply.arrays),
                          "metrics": MetricRecord(reply.metrics),
                          "status": ConfigRecord({"status": "ok"})})
    return Message(content=content, reply_to=msg)


def make_app(override: RunConfig | None = None) -> ClientApp:
    """Build the ClientApp. ``override`` is how ``fedtransfer simulate`` passes
    its resolved config; ``flwr run`` uses ``context.run_config``."""
    app = ClientApp(mods=[secagg_when_asked])

    def config_of(context: Context) -> RunConfig:
        if override is not None:
            return override
        # Under a SuperNode (never at import, which would also hit simulations).
        log_through_flower("client")
        return parse_config(dict(context.run_config))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        site_id = int(context.node_config.get("partition-id", context.node_config.get("site-id", -1)))
        legacy, config, head = _unpack_train(msg)
        try:
            settings = site_settings(cfg, context)
            reply = train_round(cfg, settings, _request(config, context), head)
        except (BudgetExhausted, RequestRejected, SiteDataError, SiteConfigError) as exc:
            status = {BudgetExhausted: "budget-exhausted", RequestRejected: "request-rejected",
                      SiteDataError: "site-data-error"}.get(type(exc), "site-config-error")
            log.warning("site %d declines round: %s", site_id, exc)
            if legacy:  # SecAgg+ has no "declined" reply: the site drops out of the round
                raise SiteDeclined(declined_text(site_id, context.node_id, status, str(exc))) from exc
            content = RecordDict({"status": ConfigRecord(
                {"status": status, "reason": str(exc), "site-id": site_id})})
            return Message(content=content, reply_to=msg)
        m = reply.metrics
        log.info("site %d round %d: trained on %d records; ε %.4f of its cap %g (δ=%g, "
                 "per record); ledger %s", settings.site_id, int(config["server-round"]),
                 reply.num_examples, m["epsilon"], settings.target_epsilon,
                 settings.target_delta, settings.ledger_path)
        return _pack_train(msg, reply, legacy)

    @app.query("deliver")
    def deliver(msg: Message, context: Context) -> Message:
        """The server's final head, student and card (``query.deliver``): save them."""
        cfg = config_of(context)
        settings = site_settings(cfg, context)
        card = json.loads(str(msg.content.config_records["card"]["json"]))
        student = msg.content.array_records.get("student")
        path, digest = save_delivery(settings, card, from_array_record(msg.content["head"]),
                                     from_array_record(student) if student is not None else None)
        reply = ConfigRecord({"status": "saved", "site-id": settings.site_id, "path": str(path),
                              "sha256": digest})
        records = {"delivery": reply}
        try:  # the delivered head on the site's holdout (the last round's site metrics)
            records["holdout"] = MetricRecord(evaluate_site(
                cfg, settings, from_array_record(msg.content["head"])))
        except ValueError as exc:  # SiteDataError, SiteConfigError, a head that does not fit
            log.warning("site %d saved the delivery but could not evaluate it: %s",
                        settings.site_id, exc)
        return Message(content=RecordDict(records), reply_to=msg)

    return app


app = make_app()

"""Flower ClientApp: unpack the message, call :mod:`client.site`, pack the reply.

Three messages: ``query.scaling`` (before round 1, only for ``dp``-scaled
features: the site's DP sums), ``train`` and ``query.deliver`` (save the final
head and student). The site evaluates the heads it receives on its holdout for its own
log only; every reply is built from :mod:`common.protocol`, which declares the
privacy class of each field that leaves the site.
With ``aggregation = "secagg+"`` a round is Flower's four SecAgg+ messages;
``secagg_when_asked`` runs Flower's ``secaggplus_mod`` on them, which masks the
head that ``train`` returns.
"""

from __future__ import annotations

import json
import logging

from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import (
    fitres_to_recorddict,
    recorddict_to_fitins,
)

from client.policy import (
    PolicyDeclined,
    RequestRejected,
    SiteConfigError,
    SiteSettings,
    in_flower_simulation,
    site_settings,
)
from common import protocol
from common.config import RunConfig, parse_config
from common.data.readers import SiteDataError
from common.flowerlog import log_through_flower
from common.protocol import (
    HEAD_KEYS,
    declined_text,
    from_array_record,
    head_from_parameters,
    head_to_parameters,
    parse_request,
    to_array_record,
)

log = logging.getLogger(__name__)


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
                        reply.num_examples, {**reply.metrics, "ledger-head": reply.ledger_head})
        return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": to_array_record(reply.arrays),
                          "metrics": MetricRecord(reply.metrics),
                          "status": ConfigRecord({"status": "ok",
                                                  "ledger-head": reply.ledger_head})})
    return Message(content=content, reply_to=msg)


def _decline(exc: Exception, site_id: int) -> tuple[str, str]:
    """``(status, reason)`` for a declined round. Only public values reach the
    server: a data error names files and classes in the site's log only."""
    # lazy: client.site imports torch; only a message that reached the site's code declines
    from client.site import BudgetExhausted

    if isinstance(exc, SiteDataError):
        return protocol.SITE_DATA_ERROR, protocol.SITE_DATA_REASON
    status = {BudgetExhausted: protocol.BUDGET_EXHAUSTED, RequestRejected: protocol.REQUEST_REJECTED,
              PolicyDeclined: protocol.POLICY_DECLINED}.get(type(exc), protocol.SITE_CONFIG_ERROR)
    return status, str(exc)


def make_app(override: RunConfig | None = None) -> ClientApp:
    """Build the ClientApp.

    ``override`` is how ``fedtransfer simulate`` (and the in-process tests)
    pass the scenario: one person runs every simulated site, so a node with a
    ``partition-id`` takes its policy from it. ``flwr run`` uses
    ``context.run_config``, and a partition's policy comes from the scenario
    only inside Flower's simulation engine. A deployed site's policy is always
    its own node config.
    """
    app = ClientApp(mods=[secagg_when_asked])

    def setup(context: Context) -> tuple[RunConfig, SiteSettings]:
        if override is not None:
            cfg, simulated = override, True
        else:
            # Under a SuperNode (never at import, which would also hit simulations).
            log_through_flower()
            cfg, simulated = parse_config(dict(context.run_config)), in_flower_simulation()
        return cfg, site_settings(cfg, dict(context.node_config), simulated=simulated)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # A SuperNode starts a process per message; three of SecAgg+'s four never get here.
        # lazy: torch, Opacus and the ledger load only in a process whose message trains
        from client.site import BudgetExhausted, train_round

        site_id = int(context.node_config.get("partition-id", context.node_config.get("site-id", -1)))
        legacy, config, head = _unpack_train(msg)
        try:
            cfg, settings = setup(context)
            site_id = settings.site_id
            try:
                req = parse_request(config, str(context.run_id))
            except ValueError as exc:
                raise RequestRejected(f"request rejected by site: {exc}") from exc
            reply = train_round(cfg, settings, req, head)
        except (BudgetExhausted, RequestRejected, PolicyDeclined, SiteDataError,
                SiteConfigError) as exc:
            status, reason = _decline(exc, site_id)
            log.warning("site %d declines round: %s", site_id, exc)
            if legacy:  # SecAgg+ has no "declined" reply: the site drops out of the round
                raise SiteDeclined(declined_text(site_id, context.node_id, status, reason)) from exc
            content = RecordDict({"status": ConfigRecord(protocol.decline(site_id, status, reason))})
            return Message(content=content, reply_to=msg)
        m = reply.metrics
        log.info("site %d round %d: trained on %d records; ε %.4f of its cap %g (δ=%g, "
                 "per record); ledger %s", settings.site_id, req.server_round,
                 reply.num_examples, m["epsilon"], settings.target_epsilon,
                 settings.target_delta, settings.ledger_path)
        return _pack_train(msg, reply, legacy)

    @app.query("deliver")
    def deliver(msg: Message, context: Context) -> Message:
        """The server's final head, student and card (``query.deliver``): save them.

        The site evaluates the delivered head on its holdout for its own log;
        the reply carries only the receipt (:data:`common.protocol.DELIVERY_REPLY`).
        """
        # lazy: torch loads only in a process that handles a model (see train)
        from client.site import evaluate_site, save_delivery

        cfg, settings = setup(context)
        card = json.loads(str(msg.content.config_records["card"]["json"]))
        student = msg.content.array_records.get("student")
        head = from_array_record(msg.content["head"])
        _, digest = save_delivery(settings, card, head,
                                  from_array_record(student) if student is not None else None)
        if cfg.backbone == "auto":  # issue 24: the backbone the run chose, as the card says
            head_card = card.get("head") or {}
            cfg = cfg.replace(backbone=str(head_card.get("backbone", "auto")),
                              image_size=int(head_card.get("image_size") or cfg.image_size))
        try:
            log.info("site %d: the delivered head on its holdout (kept here): %s",
                     settings.site_id, evaluate_site(cfg, settings, head,
                                                     card_schema=card.get("schema")))
        except ValueError as exc:  # SiteDataError, a head that does not fit
            log.warning("site %d saved the delivery but could not evaluate it: %s",
                        settings.site_id, exc)
        reply = ConfigRecord({"status": "saved", "site-id": settings.site_id, "sha256": digest})
        return Message(content=RecordDict({"delivery": reply}), reply_to=msg)

    @app.query("scaling")
    def scaling(msg: Message, context: Context) -> Message:
        """DP feature scaling before round 1 (``query.scaling``): the site's noisy
        clipped sums, charged to its ledger first (:func:`client.site.scaling_release`)."""
        # lazy: as in train
        from client.site import BudgetExhausted, scaling_release

        site_id = int(context.node_config.get("partition-id", context.node_config.get("site-id", -1)))
        try:
            cfg, settings = setup(context)
            site_id = settings.site_id
            try:
                req = parse_request(msg.content.config_records["config"], str(context.run_id))
            except (ValueError, KeyError) as exc:
                raise RequestRejected(f"request rejected by site: {exc}") from exc
            sums, metrics, anchor = scaling_release(cfg, settings, req)
        except (BudgetExhausted, RequestRejected, PolicyDeclined, SiteDataError,
                SiteConfigError) as exc:
            status, reason = _decline(exc, site_id)
            log.warning("site %d declines the scaling query: %s", site_id, exc)
            content = RecordDict({"status": ConfigRecord(protocol.decline(site_id, status, reason))})
            return Message(content=content, reply_to=msg)
        content = RecordDict({"sums": to_array_record({"sums": sums}),
                              "metrics": MetricRecord(metrics),
                              "status": ConfigRecord({"status": "ok", "ledger-head": anchor})})
        return Message(content=content, reply_to=msg)

    return app


app = make_app()

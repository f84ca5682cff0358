"""Flower ClientApp: unpack the message, call :mod:`client.round`, pack the reply.

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

import dataclasses
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

from client.admission import SiteUnavailable, require
from client.budget import BudgetExhausted
from client.guard import PolicyDeclined, RequestRejected
from client.settings import SiteConfigError, SiteSettings, in_flower_simulation, site_settings
from common import protocol
from common.config import RunConfig, parse_config
from common.flowerlog import log_through_flower
from common.privacy.ledger import default_key_path, ensure_key_pair, public_key_pem
from common.protocol import (
    HEAD_KEYS,
    DeclarationReply,
    Decline,
    DeliveryReceipt,
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
    status, metrics = reply.public.status(), reply.public.metrics()
    if legacy:  # fitres.* records; secagg_when_asked masks the head before it leaves
        fitres = FitRes(Status(Code.OK, "ok"), head_to_parameters(reply.arrays),
                        reply.public.num_examples, {**metrics, **status})
        return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": to_array_record(reply.arrays),
                          "metrics": MetricRecord(metrics), "status": ConfigRecord(status)})
    return Message(content=content, reply_to=msg)


def decline_for(exc: BaseException, site_id: int) -> Decline:
    """The one reply for a failure. Declines the site decides from the request, its
    policy and its ledger carry their reason; anything else is a fixed code with a
    fixed sentence, and its text stays in the site's log."""
    for kind, status in ((BudgetExhausted, protocol.BUDGET_EXHAUSTED),
                         (PolicyDeclined, protocol.POLICY_DECLINED),
                         (RequestRejected, protocol.REQUEST_REJECTED),
                         (SiteConfigError, protocol.SITE_CONFIG_ERROR)):
        if isinstance(exc, kind):
            return Decline(site_id, status, str(exc))
    if isinstance(exc, SiteUnavailable):
        return Decline.fixed(site_id, protocol.SITE_UNAVAILABLE)
    log.error("site %d: unexpected failure (the coordinator sees only %s)", site_id,
              protocol.SITE_ERROR, exc_info=exc)
    return Decline.fixed(site_id, protocol.SITE_ERROR)


def _site_id(context: Context) -> int:
    raw = context.node_config.get("site-id", context.node_config.get("partition-id", -1))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return -1


def chosen_in(config) -> tuple[str, int]:
    """The backbone and image size a message names (its ``backbone`` and its schema's
    ``image-size``); a simulated site whose scenario says ``auto`` takes them."""
    try:
        schema = json.loads(str(config.get("schema", "") or "{}"))
        size = int(schema.get("image-size", 0)) if isinstance(schema, dict) else 0
    except (TypeError, ValueError):
        size = 0
    return str(config.get("backbone", "")), size


def _parse(config) -> protocol.RoundRequest:
    try:
        return parse_request(config, "")
    except (ValueError, KeyError, TypeError) as exc:
        raise RequestRejected(f"request rejected by site: {exc}") from exc


def make_app(override: RunConfig | None = None) -> ClientApp:
    """Build the ClientApp.

    ``override`` is how ``fedtransfer simulate`` (and the in-process tests)
    pass the scenario: one person runs every simulated site, so a node with a
    ``partition-id`` takes its policy from it. ``flwr run`` inside Flower's
    simulation engine uses ``context.run_config`` the same way. A deployed
    site's settings are always its own node config: it reads nothing of the
    run config.
    """
    app = ClientApp(mods=[secagg_when_asked])

    def settings_of(context: Context, chosen: tuple[str, int] | None = None) -> SiteSettings:
        """``chosen``: the backbone and image size the message names (taken only by a
        simulated site whose scenario leaves the backbone to the selection)."""
        node = dict(context.node_config)
        if override is not None:
            return site_settings(node, scenario=override, chosen=chosen)
        # Under a SuperNode (never at import, which would also hit simulations).
        log_through_flower()
        simulated = in_flower_simulation() and "data-path" not in node
        return site_settings(node, scenario=parse_config(dict(context.run_config))
                             if simulated else None, chosen=chosen)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # A SuperNode starts a process per message; three of SecAgg+'s four never get here.
        site_id, legacy = _site_id(context), False
        try:
            legacy, config, head = _unpack_train(msg)
            settings = settings_of(context, chosen_in(config))
            site_id = settings.site_id
            # A site out of the federation answers every message with one fixed code.
            adm = require(settings)
            req = dataclasses.replace(_parse(config), run_id=str(context.run_id))
            # lazy: torch, Opacus and the ledger load only in a process whose message trains
            from client.round import train_round

            reply = train_round(settings, req, head, adm)
        except Exception as exc:  # noqa: BLE001  (every failure becomes a fixed code)
            decline = decline_for(exc, site_id)
            log.warning("site %d declines round: %s (%s)", site_id, decline.status, exc)
            if legacy:  # SecAgg+ has no "declined" reply: the site drops out of the round
                raise SiteDeclined(declined_text(site_id, context.node_id, decline.status,
                                                 decline.reason)) from None
            return Message(content=RecordDict({"status": ConfigRecord(decline.record())}),
                           reply_to=msg)
        p = reply.public
        log.info("site %d round %d: trained on %d %ss; ε %.4f of its cap %g (δ=%g, unit: %s); "
                 "ledger %s", settings.site_id, req.server_round, p.num_examples,
                 settings.privacy_unit, p.epsilon, settings.target_epsilon,
                 settings.target_delta, settings.privacy_unit, settings.ledger_path)
        return _pack_train(msg, reply, legacy)

    @app.query("deliver")
    def deliver(msg: Message, context: Context) -> Message:
        """The server's final head, student and card (``query.deliver``): save them.

        The site evaluates the delivered head on its holdout for its own log;
        the reply carries only the receipt (:data:`common.protocol.DELIVERY_REPLY`).
        """
        site_id = _site_id(context)
        try:
            card = json.loads(str(msg.content.config_records["card"]["json"]))
            model = card.get("head") or {}
            settings = settings_of(context, (str(model.get("backbone", "")),
                                             int(model.get("image_size") or 0)))
            site_id = settings.site_id
            require(settings)
            student = msg.content.array_records.get("student")
            head = from_array_record(msg.content["head"])
            # lazy: torch loads only in a process that handles a model (see train)
            from client.round import evaluate_site, ledger_export, save_delivery

            _, digest = save_delivery(settings, card, head,
                                      from_array_record(student) if student is not None else None)
            export = ledger_export(settings)
        except Exception as exc:  # noqa: BLE001
            decline = decline_for(exc, site_id)
            return Message(content=RecordDict({"status": ConfigRecord(decline.record())}),
                           reply_to=msg)
        try:
            log.info("site %d: the delivered head on its holdout (kept here): %s",
                     settings.site_id, evaluate_site(
                         settings, head, trainable=str(model.get("trainable", "head")),
                         head=str(model.get("name", "linear")),
                         hidden_dim=int(model.get("hidden_dim", 128)),
                         card_schema=card.get("schema")))
        except Exception as exc:  # noqa: BLE001  (the site's own log; the receipt is unchanged)
            log.warning("site %d saved the delivery but could not evaluate it: %s",
                        settings.site_id, exc)
        receipt = DeliveryReceipt(settings.site_id, digest, export)
        return Message(content=RecordDict({"delivery": ConfigRecord(receipt.record())}),
                       reply_to=msg)

    @app.query("declaration")
    def declaration(msg: Message, context: Context) -> Message:
        """The coordinator's declaration-only question before round 1
        (``query.declaration``): the site's declaration, unit and admission. No
        record is read for it (the admission is stored)."""
        site_id = _site_id(context)
        try:
            settings = settings_of(context, chosen_in(msg.content.config_records["config"]))
            site_id = settings.site_id
            adm = require(settings)
            decl = settings.declaration
            key = ensure_key_pair(settings.ledger_key or default_key_path(settings.ledger_path)) \
                if settings.dp else None
            reply = DeclarationReply(settings.site_id, decl.sha256,
                                     json.dumps(decl.to_dict(), sort_keys=True),
                                     settings.privacy_unit, adm.num_train, adm.public_check,
                                     public_key_pem(key) if key is not None else "")
            content = RecordDict({"declaration": ConfigRecord(reply.record())})
        except Exception as exc:  # noqa: BLE001  (every failure becomes a fixed code)
            content = RecordDict({"status": ConfigRecord(decline_for(exc, site_id).record())})
        return Message(content=content, reply_to=msg)

    @app.query("scaling")
    def scaling(msg: Message, context: Context) -> Message:
        """DP feature scaling before round 1 (``query.scaling``): the site's noisy
        clipped sums, charged to its ledger first (:func:`client.round.scaling_release`)."""
        site_id = _site_id(context)
        try:
            settings = settings_of(context, chosen_in(msg.content.config_records["config"]))
            site_id = settings.site_id
            adm = require(settings)
            req = dataclasses.replace(_parse(msg.content.config_records["config"]),
                                      run_id=str(context.run_id))
            # lazy: as in train
            from client.round import scaling_release

            sums, public = scaling_release(settings, req, adm)
        except Exception as exc:  # noqa: BLE001  (every failure becomes a fixed code)
            decline = decline_for(exc, site_id)
            log.warning("site %d declines the scaling query: %s (%s)", site_id, decline.status,
                        exc)
            return Message(content=RecordDict({"status": ConfigRecord(decline.record())}),
                           reply_to=msg)
        content = RecordDict({"sums": to_array_record({"sums": sums}),
                              "metrics": MetricRecord(public.metrics()),
                              "status": ConfigRecord(public.status())})
        return Message(content=content, reply_to=msg)

    return app


app = make_app()

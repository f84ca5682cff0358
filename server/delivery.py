"""Deliver the final head and the student to every site (Flower ``query.deliver``):
the model card, the server's own copy, and the message.

The message carries three records: ``head`` and (when distillation ran)
``student`` as ``ArrayRecord``s, and ``card`` as a ``ConfigRecord`` holding the
model card as JSON. The ClientApp's ``@app.query("deliver")`` handler saves
them and replies with the hash of what it wrote, which is checked here (the
receipt is all a site sends back: :data:`common.protocol.DELIVERY_REPLY`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.audit.sources import EXPORT_FILE, site_dir
from common.config import RunConfig
from common.models.decision import ARGMAX
from common.models.finetune import CUT_BLOCK
from common.models.modelio import CARD_NAME, save_bundle
from common.models.transfer import parse_record
from common.privacy.accounting import LEDGER_ACCOUNTANT
from common.protocol import to_array_record
from server.distill import PRIVACY_NOTE, DistillOutcome

log = logging.getLogger(__name__)

DELIVER_MESSAGE_TYPE = "query.deliver"


def delivery_content(card: dict, head: dict, student: dict | None) -> RecordDict:
    records = {"head": to_array_record(head), "card": ConfigRecord({"json": json.dumps(card)})}
    if student is not None:
        records["student"] = to_array_record(student)
    return RecordDict(records)


def deliver(grid: Grid, *, card: dict, head: dict, student: dict | None, expected_sha256: str,
            timeout: float, allowed: set[int] | None = None,
            run_dir: Path | None = None) -> dict[str, dict]:
    """Deliver to every connected node (of ``allowed``: the sites that answered the
    declaration question as the federation declares); returns per-site outcome (keyed
    by site id, or ``node-<id>`` for a node that did not answer).

    Each site's receipt carries its ledger export (rows, caps, signed seal: public);
    it is kept as ``<run_dir>/sites/site-<id>/ledger.json``, where the audit reads it."""
    content = delivery_content(card, head, student)
    nodes = [n for n in grid.get_node_ids() if allowed is None or n in allowed]
    messages = [Message(content=content, message_type=DELIVER_MESSAGE_TYPE, dst_node_id=n)
                for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    out: dict[str, dict] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out[f"node-{node}"] = {"status": "error", "reason": msg.error.reason}
            log.warning("delivery to node %d failed: %s", node, msg.error.reason)
            continue
        r = msg.content.config_records.get("delivery")
        if r is None:
            out[f"node-{node}"] = {"status": "error", "reason": "reply lacks 'delivery'"}
            continue
        ok = r.get("sha256") == expected_sha256 and r.get("status") == "saved"
        out[str(r.get("site-id"))] = {
            "status": "saved" if ok else "mismatch", "node_id": node,
            "sha256": str(r.get("sha256", "")),
            "ledger_export": keep_export(run_dir, r.get("site-id"), r.get("ledger-export")),
        }
        if not ok:
            log.warning("delivery to site %s: the site saved hash %s, expected %s", r.get("site-id"),
                        r.get("sha256"), expected_sha256)
    answered = {v.get("node_id") for v in out.values()}
    for n in nodes:
        if n not in answered and f"node-{n}" not in out:
            out[f"node-{n}"] = {"status": "no reply", "reason": f"no answer within {timeout:g} s; "
                                f"re-send by copying the run's models/ folder ({CARD_NAME} and "
                                "its files) into the site's model directory"}
            log.warning("delivery: node %d did not answer", n)
    saved = sum(v["status"] == "saved" for v in out.values())
    log.info("delivery: head%s saved at %d/%d sites", " and student" if student is not None else "",
             saved, len(nodes))
    return out


def keep_export(run_dir: Path | None, site_id, text) -> str:
    """Write a site's delivered ledger export where the audit looks for it; returns the
    path ('' when none came or the export is not a JSON object). The server checks
    nothing in it: the audit verifies it with the site's public key."""
    if run_dir is None or not isinstance(text, str) or not text.strip().startswith("{"):
        return ""
    try:
        json.loads(text)
    except ValueError:
        log.warning("site %s delivered a ledger export that is not JSON; not kept", site_id)
        return ""
    path = site_dir(run_dir, str(site_id)) / EXPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def delivery_card(cfg: RunConfig, *, run_id: str, server_round: int, classes: list[str],
                  head_in_dim: int, head_params: int, final: dict, outcome: DistillOutcome | None,
                  sites: dict, unit: str, decision: dict | None = None,
                  schema: dict | None = None) -> dict:
    """The descriptive part of the model card (hashes are added on save).

    ``decision`` is the head's rule, chosen on the public validation split
    (``card["decision"]``, :mod:`common.models.decision`); the student carries its own
    under ``card["student"]["decision"]``. ``final`` holds the head's test
    metrics at that rule. ``schema``: the federation's fitted schema
    (common/data/schema.py), so ``predict`` reads raw records the way the sites did,
    by name.
    """
    eps = {sid: s.get("epsilon") for sid, s in sites.items()}
    known = [e for e in eps.values() if e is not None]
    card = {
        "run_id": run_id,
        "round": server_round,
        "dataset": cfg.dataset,
        "classes": classes,
        **({"schema": schema} if schema is not None else {}),
        "head": {"name": cfg.head, "architecture": architecture(cfg),
                 "backbone": cfg.backbone, "trainable": cfg.trainable, "image_size": cfg.image_size, "in_dim": head_in_dim,
                 "num_classes": len(classes), "hidden_dim": cfg.hidden_dim, "params": head_params,
                 "test": final},
        "decision": dict(decision or ARGMAX),
        # Why this backbone: the public-data selection's evidence (common/models/transfer.py)
        **({"backbone_selection": parse_record(cfg.backbone_selection)}
           if cfg.backbone_selection else {}),
        "privacy": {
            "dp": cfg.dp, "unit": unit,
            "epsilon_per_site": eps if cfg.dp else None,
            "epsilon_max": max(known) if (cfg.dp and known) else None,
            "delta": cfg.target_delta if cfg.dp else None,
            "accountant": LEDGER_ACCOUNTANT if cfg.dp else None,
            "distillation": PRIVACY_NOTE,
            "decision": "the decision rules are chosen on the public validation split: "
                        "post-processing, no ε",
        },
    }
    if outcome is not None:
        s, t = outcome.summary["student"], outcome.summary["teacher"]
        card["student"] = {"architecture": s["architecture"], "spec": s["spec"],
                           "params": s["params"], "val": s["val"], "decision": s["decision"],
                           "test": {**{m: s[m] for m in ("auc", "accuracy", "balanced_accuracy")},
                                    "argmax": s["argmax"]}}
        card["teacher"] = {"kind": t["kind"], "params": t["params"], "val": t["val"],
                           "test": {m: t[m] for m in ("auc", "accuracy", "balanced_accuracy")}}
    return card


def architecture(cfg: RunConfig) -> str:
    """The delivered model in words: what was frozen and what the sites trained."""
    if cfg.trainable == "head":
        return f"{cfg.backbone} (frozen) + {cfg.head} head"
    return (f"{cfg.backbone} (frozen up to _blocks.{CUT_BLOCK}; its last block tuned with DP-SGD, "
            f"trainable = {cfg.trainable}) + {cfg.head} head")


def write_server_copy(out: Path, card: dict, head: dict, outcome: DistillOutcome | None) -> Path:
    """The server's own copy of what it delivers (``<run>/models``), to re-send later."""
    return save_bundle(out / "models", card=card, head=head,
                       student=outcome.student if outcome else None)

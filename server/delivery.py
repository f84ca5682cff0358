"""Send the final head and the student to every site (Flower ``query.deliver``).

The message carries three records: ``head`` and (when distillation ran)
``student`` as ``ArrayRecord``s, and ``card`` as a ``ConfigRecord`` holding the
model card as JSON. The ClientApp's ``@app.query("deliver")`` handler saves
them and replies with the hash of what it wrote, which is checked here (the
receipt is all a site sends back: :data:`common.protocol.DELIVERY_REPLY`).
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.modelio import CARD_NAME
from common.protocol import to_array_record

log = logging.getLogger("fedtransfer.server")

DELIVER_MESSAGE_TYPE = "query.deliver"


def delivery_content(card: dict, head: dict, student: dict | None) -> RecordDict:
    records = {"head": to_array_record(head), "card": ConfigRecord({"json": json.dumps(card)})}
    if student is not None:
        records["student"] = to_array_record(student)
    return RecordDict(records)


def deliver(grid: Grid, *, card: dict, head: dict, student: dict | None, expected_sha256: str,
            timeout: float) -> dict[str, dict]:
    """Deliver to every connected node; returns per-site outcome (keyed by site id,
    or ``node-<id>`` for a node that did not answer)."""
    content = delivery_content(card, head, student)
    nodes = list(grid.get_node_ids())
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

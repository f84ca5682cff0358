"""Flower's simulation engine, with its message sweep made linear in the sites.

Flower 1.41's simulation engine (``flwr/server/superlink/fleet/vce/vce_api.py``,
``add_messages_to_queue``) moves the ServerApp's messages to the Ray workers in a
loop: every 0.1 s it asks the in-memory SuperLink state for the next message of
*each* node, and each of those calls scans *every* stored message (delivered
ones stay stored until the ServerApp pulls their reply). With S sites and a
round's S messages that is S² message checks per sweep, for the whole round,
in the driver, under the state's lock: about one core at 1000 sites on this
machine, next to the two ClientApp actors it should leave the cores to.

:func:`install` swaps in a sweep that first finds, in one pass, the nodes that
have an undelivered message, and asks the state only for those, through the
same ``get_message_ins`` call (so delivery, expiry checks and ordering are
Flower's own). A sweep costs O(stored messages); each message is still fetched
by the call Flower makes. Installed only for the Flower version it was written
against, and only in the process that runs the simulation.
"""

from __future__ import annotations

import logging
import threading
from queue import Queue

log = logging.getLogger(__name__)

PATCHED_FLWR = ("1.41.",)


def pending_nodes(state) -> set[int] | None:
    """Destination nodes with an undelivered message, in one pass over the state;
    ``None`` when the state does not expose its store (then every node is asked)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return {m.metadata.dst_node_id for m in list(store.values())
                if m.metadata.delivered_at == ""}


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue``, asking only nodes with a pending message."""
    while not f_stop.is_set():
        pending = pending_nodes(state)
        for node_id in nodes_mapping:  # Flower's node order
            if pending is not None and node_id not in pending:
                continue
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def install() -> bool:
    """Use :func:`add_messages_to_queue` in Flower's engine; whether it was installed."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if not flwr.__version__.startswith(PATCHED_FLWR) or not hasattr(vce_api,
                                                                     "add_messages_to_queue"):
        log.info("flwr %s: keeping its own simulation message sweep", flwr.__version__)
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True

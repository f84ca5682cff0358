"""A Grid that hands each message to the real ClientApp of site ``i`` in this process.

The server's round loop (``server.run.run_server``) runs against it unchanged,
and the sites keep real ledgers and caches; only the transport is in-process.
Each node keeps one ``Context`` for the whole run, as a SuperNode does (Flower's
SecAgg+ mod keeps its protocol state there). An exception in the ClientApp
becomes an error reply, as Flower's runtime makes it.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from client.app import make_app as make_client
from common.config import RunConfig

NODES = (101, 202, 303)


class ServerDied(RuntimeError):
    pass


class InProcessGrid:
    def __init__(self, cfg: RunConfig, run_id: int, *, node_config: dict[int, dict] | None = None,
                 die_in_train_round: int | None = None):
        self.app = make_client(cfg)
        self.contexts = {n: Context(run_id=run_id, node_id=n,
                                    node_config={"partition-id": i, **(node_config or {}).get(i, {})},
                                    state=RecordDict(), run_config={})
                         for i, n in enumerate(NODES[:cfg.num_sites])}
        self.die_in_train_round = die_in_train_round
        self.replies: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def _call(self, msg: Message) -> Message:
        # Each node gets its own copy, as over the wire (SecAgg+ sends one content
        # object to every node, and its mod edits what it receives).
        msg = message_from_proto(message_to_proto(msg))
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001  (Flower's runtime: the ClientApp raised)
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = [self._call(m) for m in messages]
        self.replies.extend(replies)
        kinds = {m.metadata.message_type for m in messages}
        if "train" in kinds and self.die_in_train_round is not None:
            config = messages[0].content.config_records.get("config")
            if config is not None and config.get("server-round") == self.die_in_train_round:
                raise ServerDied(f"the ServerApp process died with round "
                                 f"{self.die_in_train_round} in flight")
        return replies

"""The simulation engine's message sweep asks only nodes with an undelivered message."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace

from simulations import engine


class FakeState:
    def __init__(self, pending: dict[int, bool]):
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{n}": SimpleNamespace(metadata=SimpleNamespace(
                dst_node_id=n, delivered_at="" if undelivered else "2026-01-01"))
            for n, undelivered in pending.items()}
        self.asked: list[int] = []

    def get_message_ins(self, *, node_id: int, limit: int):
        self.asked.append(node_id)
        msg = self.message_ins_store.get(f"m{node_id}")
        if msg is None or msg.metadata.delivered_at:
            return []
        msg.metadata.delivered_at = "now"
        return [msg]


class OneSweep:
    """A stop event that lets exactly one sweep run."""

    def __init__(self):
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > 1

    def wait(self, timeout: float) -> bool:
        return True


def test_only_nodes_with_an_undelivered_message_are_asked():
    state = FakeState({1: True, 2: False, 3: True})
    nodes = {1: 0, 2: 1, 3: 2, 4: 3}
    assert engine.pending_nodes(state) == {1, 3}
    q: Queue = Queue()
    engine.add_messages_to_queue(state, q, nodes, OneSweep())
    assert state.asked == [1, 3]
    assert [q.get_nowait().metadata.dst_node_id for _ in range(q.qsize())] == [1, 3]
    assert engine.pending_nodes(state) == set()  # delivered by Flower's own call


def test_a_state_without_its_store_is_swept_as_flower_does():
    state = SimpleNamespace(get_message_ins=lambda **kw: [])
    assert engine.pending_nodes(state) is None


def test_installed_for_the_flower_it_was_written_against():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    try:
        assert engine.install()
        assert vce_api.add_messages_to_queue is engine.add_messages_to_queue
    finally:
        vce_api.add_messages_to_queue = original

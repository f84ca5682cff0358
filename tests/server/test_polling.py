"""The short-poll grid: the same replies as Flower's loop, without its 3 s sleeps."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.polling import POLL_ENV, PollingGrid, poll_interval


class SlowRepliesGrid:
    """A grid whose replies arrive ``delay`` seconds after the push (push/pull API)."""

    def __init__(self, delays: dict[str, float]):
        self.delays, self.pushed_at, self.pulls = delays, 0.0, 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return list(messages)

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), id=i)
                for i in ids if self.delays[i] <= now]

    def get_node_ids(self):
        return [1, 2]

    def inner_pulls(self):
        return self.pulls


def test_all_replies_arrive_soon_after_the_last_one():
    grid = PollingGrid(SlowRepliesGrid({"a": 0.0, "b": 0.3}), interval=0.05)
    replies = grid.send_and_receive(["a", "b"], timeout=10)
    assert sorted(r.id for r in replies) == ["a", "b"]
    # Polled every 0.05 s until the 0.3 s reply: several pulls (Flower's loop pulls once,
    # then sleeps 3 s before the second).
    assert grid.inner_pulls() >= 3
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's


def test_the_timeout_still_bounds_the_wait():
    grid = PollingGrid(SlowRepliesGrid({"a": 0.0, "b": 99.0}), interval=0.05)
    replies = grid.send_and_receive(["a", "b"], timeout=0.3)
    assert [r.id for r in replies] == ["a"]


def test_a_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv(POLL_ENV, "fast")
    with pytest.raises(ValueError, match=f"{POLL_ENV} must be a number of seconds"):
        poll_interval()
    monkeypatch.setenv(POLL_ENV, "0.5")
    assert poll_interval() == 0.5


def test_many_outstanding_replies_are_pulled_less_often():
    """A pull costs time per outstanding reply; the last replies still come every interval."""
    grid = PollingGrid(SlowRepliesGrid({}), interval=0.1)
    assert grid.pause(1) == 0.1 and grid.pause(100) == 0.1
    assert grid.pause(500) == 0.5 and grid.pause(5000) == 1.0

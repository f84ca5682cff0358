"""Flower's grid with a short reply poll.

Flower 1.41's ``Grid.send_and_receive`` (the gRPC grid a deployed ServerApp
gets) pushes the messages, then pulls replies and sleeps 3 s between pulls, so
every round waits up to 3 s after the last reply arrives. :class:`PollingGrid`
pushes and pulls through the same grid API (``push_messages``,
``pull_messages``) and sleeps ``interval`` seconds between pulls instead.
Everything else is the wrapped grid's (so Flower's SecAgg+ workflow uses it
unchanged). The interval comes from ``FEDTRANSFER_GRID_POLL_S`` (default 0.1 s;
Flower's own behaviour is 3).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable

POLL_ENV = "FEDTRANSFER_GRID_POLL_S"
DEFAULT_POLL_S = 0.1


def poll_interval() -> float:
    """The reply poll interval from ``FEDTRANSFER_GRID_POLL_S``; a bad value is named."""
    raw = os.environ.get(POLL_ENV, "")
    if not raw:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= 60:
        raise ValueError(f"{POLL_ENV} must be a number of seconds in [0.01, 60], got {raw!r}")
    return value


class PollingGrid:
    """A Flower ``Grid`` whose ``send_and_receive`` polls every ``interval`` seconds."""

    def __init__(self, grid, interval: float | None = None):
        self._grid = grid
        self.interval = poll_interval() if interval is None else interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        """Push ``messages``, then pull replies until every one arrived or ``timeout``
        seconds passed (``None``: wait for all), as Flower's does, polling faster.
        A grid without the push/pull API keeps its own ``send_and_receive``."""
        if not hasattr(self._grid, "pull_messages"):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            pause = self.pause(len(pending))
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
        return replies

    def pause(self, pending: int) -> float:
        """Seconds until the next pull: ``interval``, longer while many replies are
        outstanding (1 ms per reply, at most 1 s). A pull costs time in proportion
        to the replies it asks for, under the SuperLink state's lock; at a fixed
        0.1 s a 1000-site round spent that cost 10 times a second for its whole
        length. The last replies of a round are still pulled every ``interval``."""
        return max(self.interval, min(1.0, 0.001 * pending))

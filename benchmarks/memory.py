"""Memory measurement from /proc (Linux), without extra dependencies.

* :class:`PeakSampler` samples this process's RSS in a background thread and
  keeps a peak per named phase, so two arms measured in one process each get
  their own peak.
* :func:`tree_memory_mb` sums RSS and PSS over a process and all its
  descendants (Ray's raylet, GCS and workers). PSS splits shared pages between
  the processes that map them, so the PSS sum does not double-count torch's
  shared libraries the way an RSS sum does.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager


def _status_kb(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmRSS:") / 1024


def peak_rss_mb(pid: int | str = "self") -> float:
    """The kernel's high-water mark of RSS for ``pid`` (VmHWM)."""
    return _status_kb(pid, "VmHWM:") / 1024


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out += [int(c) for c in fh.read().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """``pid``'s descendants, found through /proc/<pid>/task/*/children."""
    seen, stack = [], _children(pid)
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.append(c)
        stack += _children(c)
    return seen


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS summed over ``pid`` and its descendants, plus the process count."""
    pids = [pid, *descendants(pid)]
    return {"rss_mb": sum(_status_kb(p, "VmRSS:") for p in pids) / 1024,
            "pss_mb": sum(_pss_kb(p) for p in pids) / 1024,
            "processes": len(pids)}


class PeakSampler:
    """Background RSS sampler of this process with one peak per phase."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}
        self.starts: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        phase = self.phase
        if phase is not None:
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss_mb())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @contextmanager
    def measure(self, phase: str):
        """Attribute samples taken inside the block to ``phase``."""
        self.starts.setdefault(phase, rss_mb())
        self.phase = phase
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.phase = None

    def report(self, phase: str) -> dict[str, float]:
        peak = self.peaks.get(phase, 0.0)
        start = self.starts.get(phase, 0.0)
        return {"peak_rss_mb": round(peak, 1), "rss_at_start_mb": round(start, 1),
                "peak_increase_mb": round(max(peak - start, 0.0), 1)}

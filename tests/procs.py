"""Start and stop real processes by pid, with bounded waits, even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def running(args: list[str], *, log: Path, env: dict | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run ``args`` in its own process group; on exit, stop that group by pid
    (SIGTERM, then SIGKILL after a bounded wait)."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Children (Ray workers) share the group: make sure none outlive the test.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def fedtransfer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def simulate(out: Path, *settings: str, log: Path, timeout: float = 600,
             config: str | None = None) -> tuple[dict, str]:
    """Run ``fedtransfer simulate [--config CONFIG] --out OUT --set ...`` (no config: the
    default scenario) in its own process group (stopped by pid when done or on
    failure); returns (summary.json, its output)."""
    import json

    from tests.conftest import REPO

    args = fedtransfer_cmd("simulate", *(["--config", config] if config else []), "--out", str(out),
                           *[a for s in settings for a in ("--set", s)])
    with running(args, log=log, cwd=REPO) as proc:
        rc = proc.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    return json.loads((out / "summary.json").read_text()), text

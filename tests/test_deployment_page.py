"""docs/deployment.md is a test: its ``bash`` blocks, in order, on loopback.

The page's step 0 names the only placeholders (folders, the SuperLink's host and
port); this test fills them and nothing else, then runs every ``bash`` block as a
user would: in the checkout (``flwr run .`` needs it), with the page's own
``export`` lines carried from block to block as a terminal carries them. A block
marked ``<!-- keeps running: NAME, until "TEXT" -->`` is started in the background
and waited on until TEXT appears in its output; a block the page says runs *at each
site* runs once per hospital with ``SITE`` set. The run must end with the audit
passing (exit 0) and ``predict`` writing its file at every site. Every process is
stopped by pid, with bounded waits, also when a step fails.

Marked ``deployment`` (``make test-deployment``; ``.ci/run`` runs it)."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.serve import free_port, kill_tree
from common.privacy.ledger import Ledger

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "deployment.md"
SHARED_DATA = REPO.parent / "shared" / "data"
SITES = (0, 1)
# Waits end on progress (the process's output grows), or after CAP in all.
STALL = 600.0
CAP = 3600.0

_BLOCK = re.compile(r"(?:<!--\s*keeps running:\s*(?P<name>[^,]+?),\s*until\s*\"(?P<until>[^\"]+)\""
                    r"\s*-->\s*\n)?```bash\n(?P<body>.*?)```", re.S)
_EXPORT = re.compile(r"^export (.+)$", re.M)


@dataclass
class Block:
    body: str
    name: str | None  # a process that keeps running
    until: str | None
    each_site: bool


def page_blocks(text: str) -> list[Block]:
    """The page's ``bash`` blocks, in order. A block is *at each site* when it uses
    ``$SITE`` (the page's placeholder for the hospital's number)."""
    return [Block(m["body"], m["name"], m["until"], "$SITE" in m["body"] or
                  "$SITE" in (m["name"] or ""))
            for m in _BLOCK.finditer(text)]


def placeholders(block: Block) -> dict[str, str]:
    """Step 0's ``export NAME=value`` lines: the page's placeholders and their examples."""
    out = {}
    for line in block.body.splitlines():
        m = re.match(r"export (\w+)=(\S+)", line)
        if m:
            out[m[1]] = m[2]
    return out


class Page:
    """Runs the blocks; keeps the processes it started and stops them by pid."""

    def __init__(self, root: Path, env: dict[str, str], step0: list[str]):
        self.root = root
        self.env = env
        self.step0 = step0  # the filled placeholders: every terminal has them
        # The page's own `export` lines so far, in the coordinator's terminal (a site's
        # terminal is on another machine: it has step 0 and its SITE only).
        self.exports: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.transcript: list[str] = []

    def script(self, body: str, site: int | None) -> str:
        where = self.exports if site is None else []
        return "\n".join(["set -euo pipefail", f"export SITE={'' if site is None else site}",
                          *self.step0, *where, body])

    def run(self, block: Block, site: int | None = None) -> str:
        log = self.root / f"step-{len(self.transcript)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(["bash", "-c", self.script(block.body, site)], cwd=REPO,
                                    env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                self._wait(lambda: proc.poll() is not None, log, "the block to finish")
            finally:
                if proc.poll() is None:
                    kill_tree(proc)
        out = log.read_text(errors="replace")
        self.transcript.append(out)
        assert proc.returncode == 0, f"block exited {proc.returncode}:\n{block.body}\n---\n{out[-6000:]}"
        return out

    def start(self, block: Block, site: int | None = None) -> None:
        name = block.name.replace("$SITE", str(site)) if site is not None else block.name
        log = self.root / f"{name}.log"
        self.logs[name] = log
        fh = log.open("wb")
        proc = subprocess.Popen(["bash", "-c", self.script(block.body, site)],
                                cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fh.close()
        self.procs[name] = proc
        self._wait(lambda: block.until in log.read_text(errors="replace") or proc.poll() is not None,
                   log, f"{name}: {block.until!r}")
        assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log.read_text()[-6000:]}"

    def _wait(self, done, log: Path, what: str) -> None:
        start = last_move = time.monotonic()
        size = -1
        while not done():
            now = time.monotonic()
            grown = log.stat().st_size if log.exists() else 0
            grown += sum(p.stat().st_size for p in self.logs.values() if p.exists())
            if grown != size:
                size, last_move = grown, now
            if now - last_move > STALL or now - start > CAP:
                raise AssertionError(f"gave up waiting for {what} (nothing moved for "
                                     f"{now - last_move:.0f} s):\n"
                                     + (log.read_text(errors="replace")[-4000:] if log.exists()
                                        else ""))
            time.sleep(0.5)

    def stop_all(self) -> None:
        # Sites first (SIGTERM: `site serve` stops its own processes), then the SuperLink.
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            kill_tree(proc)


def test_page_blocks_are_found_and_every_placeholder_is_step_zeros():
    """The parser sees the walk-through (a page edit that hides a step from the test
    fails here), and every variable the blocks use is step 0's, the page's own export,
    ``SITE`` or a loop variable."""
    blocks = page_blocks(PAGE.read_text())
    assert len(blocks) >= 8
    names = set(placeholders(blocks[0]))
    assert {"DEPLOY", "DATA", "HOSPITALS", "SITE_HOME", "SUPERLINK", "PORT"} <= names
    assert [b.name for b in blocks if b.name] == ["superlink", "site-$SITE"]
    exported = {m.split("=")[0] for b in blocks for line in _EXPORT.findall(b.body)
                for m in shlex.split(line, comments=True)}
    used = {v for b in blocks for v in re.findall(r"\$\{?([A-Za-z_]\w*)", b.body)}
    loop_vars = {v for b in blocks for v in re.findall(r"\bfor (\w+) in", b.body)}
    assert used <= names | exported | loop_vars | {"SITE"}, used - names - exported - loop_vars


@pytest.mark.skipif(not (SHARED_DATA / "pneumoniamnist.npz").is_file(),
                    reason="needs ../shared/data/pneumoniamnist.npz")
def test_the_deployment_page_runs_as_written(tmp_path):
    blocks = page_blocks(PAGE.read_text())
    values = {"DEPLOY": tmp_path / "coordinator", "DATA": SHARED_DATA,
              "HOSPITALS": tmp_path / "hospitals", "SITE_HOME": None,
              "SUPERLINK": "127.0.0.1", "PORT": free_port()}
    assert set(placeholders(blocks[0])) == set(values), "step 0's placeholders changed"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDTRANSFER_"))}
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env['PATH']}"
    # Three processes share this machine's cores (the test's two sites and the server).
    env["OMP_NUM_THREADS"] = "1"
    # Step 0, filled: SITE_HOME is each hospital's own folder.
    step0 = [f"export {k}={shlex.quote(str(v))}" for k, v in values.items() if v is not None]
    step0.append(f"export SITE_HOME={shlex.quote(str(tmp_path))}/site-home-$SITE")
    page = Page(tmp_path, env, step0)
    try:
        for block in blocks[1:]:
            for site in SITES if block.each_site else (None,):
                if block.name:
                    page.start(block, site)
                else:
                    page.run(block, site)
            if not block.each_site:  # the coordinator's terminal keeps its exports
                page.exports += [f"export {line}" for line in _EXPORT.findall(block.body)]
    finally:
        page.stop_all()

    run = tmp_path / "coordinator" / "runs" / "edge"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["runtime"] == "deployment"
    assert [r["sites_aggregated"] for r in summary["rounds"]] == [2, 2, 2]
    # Test metrics on records no site holds: every site's public-record check passed
    # against the digests the coordinator published, and the handshake recorded it.
    for site in SITES:
        home = tmp_path / f"site-home-{site}"
        adm = json.loads((home / "admission.json").read_text())
        assert adm["admitted"] and adm["public_check"], adm
        ledger = Ledger(home / "ledger.sqlite")
        assert len(ledger.entries()) == 3
        assert (run / "sites" / f"site-{site}" / "ledger.json").is_file()
        rows = list(csv.DictReader((home / "predictions.csv").open()))
        assert len(rows) == len(list((tmp_path / "hospitals" / f"site-{site}" / "pneumonia")
                                     .iterdir()))
    print(json.dumps({"final": summary["final"], "public_check": summary.get("handshake")},
                     indent=1, default=str)[:3000])

"""`flwr run .` (Flower-native users) against a real simulation SuperLink.

The test starts its own SuperLink (so it knows the pid and stops it, with a
bounded wait, even on failure) instead of letting `flwr run` spawn a detached
local one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.procs import running

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"superlink exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"superlink did not listen on {port} within {timeout} s")


def test_flwr_run_local_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedtest"\n\n[superlink.fedtest]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    link = [str(BIN / "flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "state.db")]
    out = tmp_path / "run"
    # The default backbone is "auto": the ServerApp chooses it on public data and sends it to
    # the sites in the round request (two candidates and LogME keep the choice quick here).
    run_config = (f"num-sites=3 num-rounds=2 image-size=32 out-dir='{out}' "
                  f"cache-dir='{tmp_path / 'cache'}' selection-score='logme' "
                  "backbone-candidates='identity, efficientnet-lite0@32'")
    with running(link, log=tmp_path / "superlink.log", env=env, cwd=REPO) as superlink:
        _wait_for_port(port, superlink)
        cmd = [str(BIN / "flwr"), "run", ".", "fedtest", "--stream",
               "--federation-config", "num-supernodes=3", "--run-config", run_config]
        with running(cmd, log=tmp_path / "flwr-run.log", env=env, cwd=REPO) as run:
            rc = run.wait(timeout=600)
    text = (tmp_path / "flwr-run.log").read_text(errors="replace")
    assert rc == 0, text[-4000:]
    # The per-round lines reach the user through Flower's log stream.
    assert "round 2/2" in text and "ε (per record" in text
    s = json.loads((out / "summary.json").read_text())
    assert sorted(s["sites"]) == ["0", "1", "2"]
    assert s["backbone"] in ("identity", "efficientnet-lite0")  # resolved, never "auto"
    assert "backbone = \"auto\"" not in (out / "config.toml").read_text()
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    for site in s["sites"].values():
        assert 0 < site["epsilon"] <= 4.0
        assert (out / "sites").is_dir()

"""A real two-node Ray cluster on loopback, for the ``deployment`` tests.

``ray start --head --block`` and ``ray start --address=... --block``, each in its
own process group, with its own ``--temp-dir`` and with every port it opens
chosen free (so that it never meets another Ray instance on this machine). The
cluster is stopped by pid: the ``ray start`` process, its group and every
descendant (GCS, raylet, workers), with bounded waits, never ``ray stop``
(which stops every Ray instance of the user).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.loopback import BIN, free_port, kill_tree

NODE_ID = re.compile(r"([0-9a-f]{56})")


class RayCluster:
    """A head and one worker node with ``cpus`` CPUs each; use as a context manager."""

    def __init__(self, root: Path, *, cpus: int = 1, env: dict[str, str] | None = None):
        self.root = root
        self.cpus = cpus
        self.env = env or {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay under 107 bytes: short folders in /tmp.
        self.temp_dirs = [Path(tempfile.mkdtemp(prefix="ftrc-")) for _ in range(2)]
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def _ports(self) -> list[str]:
        args = []
        for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                     "--runtime-env-agent-port", "--dashboard-agent-grpc-port",
                     "--dashboard-agent-listen-port"):
            args += [flag, str(free_port())]
        return args

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        fh = (self.root / f"{name}.log").open("ab")
        self._logs.append(fh)
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env})
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def __enter__(self) -> RayCluster:
        common = ["--num-cpus", str(self.cpus), "--num-gpus", "0", "--disable-usage-stats"]
        self._start("ray-head", ["--head", "--node-ip-address", "127.0.0.1", "--port",
                                 str(self.port), "--ray-client-server-port", str(free_port()),
                                 "--include-dashboard", "false",
                                 "--temp-dir", str(self.temp_dirs[0]), *common, *self._ports()])
        try:
            self.wait_nodes(1, timeout=180)
            self._start("ray-worker", ["--address", self.address, "--node-ip-address",
                                       "127.0.0.1", "--temp-dir", str(self.temp_dirs[1]),
                                       *common, *self._ports()])
            self.wait_nodes(2, timeout=180)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if os.environ.get("FEDTRANSFER_KEEP_RAY_LOGS"):  # for debugging: keep the temp dirs
            self.temp_dirs = []
        for proc in self.procs[::-1]:
            kill_tree(proc)
        for fh in self._logs:
            fh.close()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _ask(self, expression: str) -> list[dict]:
        """``expression`` evaluated by a short-lived driver connected to the cluster."""
        code = (f"import json, ray, ray._private.state; ray.init(address={self.address!r}, "
                f"logging_level='ERROR'); print('ANSWER', json.dumps({expression}, "
                "default=str)); ray.shutdown()")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300, start_new_session=True, check=False)
        for line in r.stdout.splitlines():
            if line.startswith("ANSWER "):
                return json.loads(line[7:])
        raise RuntimeError(f"could not ask the cluster at {self.address}: {r.stdout[-2000:]}"
                           f"{r.stderr[-2000:]}")

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the GCS sees them."""
        return self._ask("[{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} "
                         "for n in ray.nodes()]")

    def actors(self) -> list[dict]:
        """Every actor the GCS remembers (dead ones too): class, node id, pid, state."""
        return self._ask("[{'class': a['ActorClassName'], 'node': a['Address']['NodeID'], "
                         "'pid': a['Pid'], 'state': a['State']} "
                         "for a in ray._private.state.state.actor_table(None).values()]")

    def wait_nodes(self, n: int, *, timeout: float) -> None:
        """Until ``n`` nodes are alive: each ``ray start`` says so when its node is up,
        then the GCS is asked. On giving up, says what was last seen."""
        deadline, seen = time.monotonic() + timeout, "nothing yet"
        while time.monotonic() < deadline:
            for proc, name in zip(self.procs, ("ray-head", "ray-worker"), strict=False):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                       f"{self.log(name)[-3000:]}")
            logs = [self.log(name) for name in ("ray-head", "ray-worker")[:len(self.procs)]]
            if all("Ray runtime started" in text for text in logs):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    alive = [x for x in self.nodes() if x["Alive"]]
                    seen = f"{len(alive)} alive nodes"
                    if len(alive) >= n:
                        return
            time.sleep(1)
        raise TimeoutError(f"waited {timeout} s for {n} alive Ray nodes at {self.address}; "
                           f"last seen: {seen}\n" + "\n".join(
                               self.log(name)[-1500:] for name in ("ray-head", "ray-worker")))

    def actor_logs(self, node: int, marker: str) -> list[Path]:
        """Worker log files of node ``node`` (0: head) that name ``marker`` (Ray writes
        ``:actor_name:<class>`` at the top of an actor's own log files)."""
        logs = self.temp_dirs[node].glob("session_*/logs/worker-*")
        return [p for p in logs if marker in p.read_text(errors="replace")]

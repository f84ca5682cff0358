"""``fedtransfer simulate --ray-address``: the same simulation on an existing
two-node Ray cluster (a head and a worker node on loopback, each with its own
temp dir and one CPU), stopped by pid. Marked ``deployment``."""

from __future__ import annotations

import json
import time

import pytest

from common.privacy.ledger import Ledger
from tests.conftest import REPO
from tests.procs import fedtransfer_cmd, running
from tests.raycluster import RayCluster

pytestmark = pytest.mark.deployment

SETTINGS = ("dataset=digits", "backbone=identity", "num-sites=4", "min-sites=4", "num-rounds=2",
            "local-epochs=1", "batch-size=32", "learning-rate=2.0", "noise-multiplier=1.0",
            "partitioner=iid", "site-shift=0.0", "distill=false", "target-epsilon=8.0")


def wait_for_exit(proc, log, *, timeout: float, progress: tuple[str, ...]) -> int:
    """The process's exit status. It may take as long as it makes progress (each of
    ``progress``, in order, seen in ``log``) within ``timeout`` s of the last step;
    on giving up, says which step it was waiting for."""
    step, last = 0, time.monotonic()
    while proc.poll() is None:
        text = log.read_text(errors="replace") if log.is_file() else ""
        while step < len(progress) and progress[step] in text:
            step, last = step + 1, time.monotonic()
        if time.monotonic() - last > timeout:
            waiting = progress[step] if step < len(progress) else "the process to exit"
            raise TimeoutError(f"no progress for {timeout} s: waiting for {waiting!r} "
                               f"({step}/{len(progress)} steps seen)\n{text[-3000:]}")
        time.sleep(0.5)
    return proc.returncode


def test_simulation_runs_on_a_two_node_ray_cluster(tmp_path):
    out, ledgers, cache = tmp_path / "run", tmp_path / "ledgers", tmp_path / "cache"
    log = tmp_path / "simulate.log"
    with RayCluster(tmp_path) as cluster:
        args = fedtransfer_cmd("simulate", "--ray-address", cluster.address, "--out", str(out),
                               *[a for s in (*SETTINGS, f"ledger-dir={ledgers}",
                                             f"cache-dir={cache}") for a in ("--set", s)])
        with running(args, log=log, cwd=REPO) as proc:
            rc = wait_for_exit(proc, log, timeout=240, progress=(
                "joined the Ray cluster", "round 1/2", "round 2/2", "results:"))
        text = log.read_text(errors="replace")
        assert rc == 0, text[-4000:]
        # Both nodes ran the sites' ClientApp actors: the GCS placed one on each node,
        # and each node's own temp dir holds that actor's worker log.
        alive = {n["NodeID"] for n in cluster.nodes() if n["Alive"]}
        actors = [a for a in cluster.actors() if a["class"] == "ClientAppActor"]
        per_node = [cluster.actor_logs(node, ":actor_name:ClientAppActor") for node in (0, 1)]

    assert "joined the Ray cluster at" in text and "2 nodes, 2 CPUs" in text, text[-3000:]
    assert len(alive) == 2
    assert {a["node"] for a in actors} == alive, (actors, alive)
    assert all(per_node), per_node
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "completed"
    assert [r["sites_aggregated"] for r in s["rounds"]] == [4, 4]
    for site in range(4):
        ledger = Ledger(ledgers / f"site-{site}" / "ledger.sqlite")
        assert ledger.verify_chain() == []
        assert [e.round for e in ledger.entries()] == [1, 2]
        assert s["sites"][str(site)]["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5),
                                                                 rel=1e-9)

"""Real deployments on loopback: Flower's SuperLink and SuperNodes, TLS, SuperNode
authentication, sites with their own data, ledgers and caps, and the faults real
sites produce. Every site joins with ``fedtransfer site serve`` (its SuperNode
with the warm launcher: one forked ClientApp process per message). Marked
``deployment`` (excluded from ``make test``; run with ``make test-deployment``).

Every wait is on observable progress (``simulations/loopback.py``): a round line, a log
line, a node count, an exit. Rounds wait for every live site (``round-timeout``
is generous); a killed site drops out of its round when the SuperLink declares
it offline (its heartbeat expires), not when a guessed timeout runs out."""

from __future__ import annotations

import json
import os
import signal

import pytest

from client.serve import ping
from common.models.modelio import verify_bundle
from common.privacy.ledger import Ledger
from simulations.loopback import Loopback

pytestmark = pytest.mark.deployment

# Small and quick: identity backbone on 8x8 digits, σ fixed (no per-site calibration).
RUN = ("num-sites=3 min-sites=2 num-rounds=3 backbone='identity' local-epochs=1 batch-size=32 "
       "learning-rate=2.0 noise-multiplier=1.0 out-dir='{out}' cache-dir='{cache}' "
       "round-timeout={timeout}")


def _summary(fed: Loopback, out, *, num_rounds: int, first: int = 1) -> dict:
    rc = fed.wait_run("flwr-run", num_rounds=num_rounds, first=first)
    text = fed.log("flwr-run")
    assert rc == 0, text[-4000:]
    assert (out / "summary.json").is_file(), text[-4000:]
    return json.loads((out / "summary.json").read_text())


def _joined(fed: Loopback, site: int) -> dict:
    """The site's ``serve.json`` (how ``site serve`` joined), with the fork server's
    count of the ClientApp processes it forked."""
    joined = json.loads((fed.site_dir(site) / "serve.json").read_text())
    ready = ping(joined["socket"])
    assert ready is not None, f"site {site}: its warm launcher does not answer"
    return {**joined, "forked": ready["forked"]}


def _ledger_matches(fed: Loopback, site: int, summary: dict) -> Ledger:
    """No update was released without a committed ledger entry for its round."""
    ledger = Ledger(fed.site_dir(site) / "ledger.sqlite")
    assert ledger.verify_chain() == []
    recorded = {e.round for e in ledger.entries() if e.run_id == summary["run_id"]}
    released = {h["round"] for h in summary["sites"][str(site)]["history"]}
    assert released <= recorded, (released, recorded)
    return ledger


def test_tls_authenticated_federation_of_three_sites(tmp_path):
    out = tmp_path / "run"
    with Loopback(tmp_path) as fed:
        fed.start_federation()

        # Refused: a key the coordinator never registered, no key at all, no CA certificate.
        fed.start_supernode(3, key=3, name="unregistered", retries=1)
        fed.start_supernode(3, key=-1, name="no-key", retries=1)
        fed.start_supernode(0, ca=False, name="no-ca", retries=1)
        for name in ("unregistered", "no-key", "no-ca"):
            assert fed.wait_exit(name) != 0, fed.log(name)
        assert "Failed to activate SuperNode" in fed.log("unregistered")
        assert "All SuperNodes must be registered" in fed.log("no-key")
        assert "CERTIFICATE_VERIFY_FAILED" in fed.log("no-ca")
        assert fed.online_nodes() == 3

        fed.run(RUN.format(out=out, cache=tmp_path / "server-cache", timeout=600.0))
        s = _summary(fed, out, num_rounds=3)
        # Sites see their progress (round, ε against their own cap) in their own log.
        for site in range(3):
            log = fed.log(f"supernode-{site}")
            assert f"site {site} round 3: trained on" in log
            assert "of its cap 8 " in log
            # Joined through `site serve`: its SuperNode id, FLWR_HOME in the site's own
            # folder, every message (3 rounds, the delivery) in a forked ClientApp.
            joined = _joined(fed, site)
            assert f"as SuperNode {joined['node_id']}" in log
            assert joined["flwr_home"] == str(fed.site_dir(site) / "flwr-home")
            assert joined["forked"] >= 4 and "starting a cold" not in log
            assert any((fed.site_dir(site) / "flwr-home" / "apps").iterdir())
        fed.stop("supernode-0")  # its operator stops it: nothing of it stays behind
        assert fed.left_behind == {}

    assert fed.left_behind == {}  # every site's launcher stopped all it started
    assert s["stop_reason"] == "completed"
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3, 3]
    assert s["final"]["auc"] > 0.8
    assert sorted(s["sites"]) == ["0", "1", "2"] and s["dropped_replies"] == []
    card_hash = s["delivery"]["sha256"]
    for site in range(3):
        reported = s["sites"][str(site)]
        assert [h["round"] for h in reported["history"]] == [1, 2, 3]
        # The cap came from the site's own node config (8.0), not the run config (4.0).
        ledger = _ledger_matches(fed, site, s)
        assert len(ledger.entries()) == 3
        assert reported["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
        assert all(e.dataset_size == reported["num_examples"] for e in ledger.entries())
        # Each site trained on its own file, with its own cache and model folder.
        assert any((fed.site_dir(site) / "cache").iterdir())
        models = fed.site_dir(site) / "models"
        assert s["delivery"]["sites"][str(site)]["status"] == "saved"
        assert verify_bundle(models) == []
        assert (models / "head.safetensors").is_file()
        assert (models / "student.safetensors").is_file()
        card = json.loads((models / "card.json").read_text())
        assert card["sha256"] == card_hash and card["site"]["site_id"] == site


def test_site_killed_mid_round_then_rejoins(tmp_path):
    LAST = 6  # noqa: N806  (ε stays under the cap of 8 through round 6)
    out = tmp_path / "run"
    # A generous round timeout: a slow but live site (a cold ClientApp process on a
    # loaded 2-core machine takes 15-25 s, more under heavy load) is waited for; the
    # killed one drops out of its round when the SuperLink finds it offline.
    run = RUN.format(out=out, cache=tmp_path / "server-cache", timeout=600.0).replace(
        "num-rounds=3", f"num-rounds={LAST}")
    with Loopback(tmp_path) as fed:
        fed.start_federation()
        fed.run(run)

        # Round 2 reaches site 2: kill it (and its ClientApp) mid-round, like a power cut.
        fed.wait_for("supernode-2", "Receiving: train message", count=2)
        fed.stop("supernode-2", signal.SIGKILL)
        # The site comes back with the same key and node config, and rejoins. The
        # SuperLink refuses to activate a node id it still holds online (its
        # heartbeat expires after 2 x 30 s), so the site restarts once it is offline.
        fed.wait_online(2, exactly=True)
        fed.start_supernode(2, name="supernode-2-restarted")
        fed.wait_for("supernode-2-restarted", "SuperNode ID:")
        s = _summary(fed, out, num_rounds=LAST)
        # The restarted launcher took over the killed one's site folder, whose socket
        # the SIGKILL left behind (it joined at once; its messages ran cold until then).
        assert fed.wait_warm("supernode-2-restarted")["site_dir"] == str(fed.site_dir(2))

    assert fed.left_behind == {}  # every site's launcher stopped all it started
    assert s["stop_reason"] == "completed"
    rounds = {r["round"]: r["sites_aggregated"] for r in s["rounds"]}
    assert rounds[1] == 3 and rounds[2] == 2  # round 2 went on without it, once it was offline
    killed = s["sites"]["2"]
    assert 2 not in [h["round"] for h in killed["history"]]
    assert 1 in [h["round"] for h in killed["history"]]
    for site in range(3):
        _ledger_matches(fed, site, s)
    # Whatever site 2 committed before it died stays on its ledger (spent, never released).
    ledger = Ledger(fed.site_dir(2) / "ledger.sqlite")
    assert {e.round for e in ledger.entries()} >= {h["round"] for h in killed["history"]}
    # Restarted, it rejoined the later rounds: at the latest the last one, and it got the
    # delivery. (Warm sites make a round take seconds: the run leaves the restarted
    # site a few rounds to join in.)
    trained = [h["round"] for h in killed["history"]]
    assert LAST in trained and rounds[LAST] == 3, (rounds, trained)
    assert all(rounds[r] == 2 + (r in trained) for r in range(3, LAST)), (rounds, trained)
    assert s["delivery"]["sites"]["2"]["status"] == "saved"


@pytest.mark.parametrize("killed", ["superlink", "serverapp"])
def test_coordinator_killed_mid_run_then_resumed(tmp_path, killed):
    """The coordinator dies mid-round, SIGKILL: either its whole machine (SuperLink,
    SuperExec and ServerApp), which comes back on the same SQLite database while
    the sites reconnect by themselves, or only the ServerApp process. The
    documented command (the same run with ``resume=true``) finishes the run from
    the last checkpoint."""
    out = tmp_path / "run"
    run = RUN.format(out=out, cache=tmp_path / "server-cache", timeout=600.0).replace(
        "num-rounds=3", "num-rounds=4")
    with Loopback(tmp_path) as fed:
        fed.start_federation()
        fed.run(run)
        # Round 3's train messages have reached every site: round 2 is checkpointed.
        for site in range(3):
            fed.wait_for(f"supernode-{site}", "Receiving: train message", count=3)
        if killed == "superlink":
            fed.stop("superlink", signal.SIGKILL)
        else:
            (serverapp,) = fed.serverapp_pids()
            os.kill(serverapp, signal.SIGKILL)
        fed.stop("flwr-run")  # the first `flwr run --stream` lost its run
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        done = state["round"]
        assert done == 2, state["round"]
        first_run_id = state["run_id"]

        if killed == "superlink":
            fed.start_superlink()  # same port, same --database: the registrations survive
        fed.wait_online(3)
        assert all(fed.procs[f"supernode-{s}"].poll() is None for s in range(3))
        fed.run(run + " resume=true")
        s = _summary(fed, out, num_rounds=4, first=3)

    assert fed.left_behind == {}  # every site's launcher stopped all it started
    assert s["stop_reason"] == "completed"
    assert s["resumed_from"]["round"] == done and s["resumed_from"]["run_id"] == first_run_id
    assert s["run_id"] != first_run_id
    # Each round is in the record exactly once: 1-2 from the checkpoint, 3-4 from the resumed run.
    assert [r["round"] for r in s["rounds"]] == [1, 2, 3, 4]
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3, 3, 3]
    assert s["final"]["auc"] > 0.8
    for site in range(3):
        reported = s["sites"][str(site)]
        assert [h["round"] for h in reported["history"]] == [1, 2, 3, 4]
        ledger = Ledger(fed.site_dir(site) / "ledger.sqlite")
        assert ledger.verify_chain() == []
        by_run: dict[str, list[int]] = {}
        for e in ledger.entries():
            by_run.setdefault(e.run_id, []).append(e.round)
        # Nothing lost: the round-3 spend of the interrupted run stays on the ledger,
        # although its update never reached an aggregate. Nothing double counted:
        # one entry per (run, round), and the reported ε is the ledger's, all of it.
        assert by_run.pop(first_run_id)[:2] == [1, 2]
        assert list(by_run) == [s["run_id"]] and by_run[s["run_id"]] == [3, 4]
        assert reported["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
        assert reported["epsilon"] <= 8.0 + 1e-9
        assert s["delivery"]["sites"][str(site)]["status"] == "saved"


def test_secure_aggregation_on_real_supernodes(tmp_path):
    """SecAgg+ over TLS and authenticated SuperNodes: every one of a round's four
    messages starts a fresh ClientApp process, and the protocol state lives in
    the SuperNode's context between them."""
    out = tmp_path / "run"
    run = RUN.format(out=out, cache=tmp_path / "server-cache", timeout=600.0).replace(
        "num-rounds=3", "num-rounds=2") + " aggregation='secagg+' teacher='global' distill=false"
    with Loopback(tmp_path) as fed:
        fed.start_federation()
        fed.run(run)
        s = _summary(fed, out, num_rounds=2)
        assert fed.log("flwr-run").count("Secure aggregation completed") == 2
        # Four messages per site per round, each in its own forked process, plus delivery.
        assert all(_joined(fed, site)["forked"] >= 9 for site in range(3))

    assert fed.left_behind == {}  # every site's launcher stopped all it started
    assert s["stop_reason"] == "completed"
    assert s["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3]
    assert s["final"]["auc"] > 0.8
    for site in range(3):
        ledger = _ledger_matches(fed, site, s)
        assert [e.round for e in ledger.entries()] == [1, 2]
        assert s["delivery"]["sites"][str(site)]["status"] == "saved"

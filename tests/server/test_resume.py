"""A restarted ServerApp resumes from the last completed round's checkpoint.

The server's round loop (``run_server``) runs against an in-process grid that
hands each message to the real ClientApp (``client.app``), so sites keep real
ledgers. The first server dies while round 3 is in flight, after the sites
trained and committed their spend; the restarted one (``resume = true``)
continues from round 3. Nothing is double counted and nothing is lost.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.app import make_app as make_client
from common.config import RunConfig
from common.ledger import Ledger
from server.run import run_server

NODES = (101, 202, 303)


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


class ServerDied(RuntimeError):
    pass


class InProcessGrid:
    """Delivers each message to the real ClientApp of site ``i`` (partition i)."""

    def __init__(self, cfg: RunConfig, run_id: int, *, die_in_train_round: int | None = None):
        self.app = make_client(cfg)
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config={"partition-id": i},
                                    state=RecordDict(), run_config={})
                         for i, n in enumerate(NODES)}
        self.die_in_train_round = die_in_train_round

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        kinds = {m.metadata.message_type for m in messages}
        if "train" in kinds and self.die_in_train_round is not None:
            if messages[0].content["config"]["server-round"] == self.die_in_train_round:
                raise ServerDied("the ServerApp process died with round 3 in flight")
        return replies


def test_restarted_server_resumes_after_the_last_completed_round(tmp_path):
    cfg = RunConfig(num_sites=3, min_sites=2, num_rounds=3, backbone="identity",
                    partitioner="iid", batch_size=32, local_epochs=1, learning_rate=1.0,
                    noise_multiplier=1.0, target_epsilon=20.0, distill=False,
                    out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                    ledger_dir=str(tmp_path / "sites"))
    with pytest.raises(ServerDied):
        run_server(cfg, InProcessGrid(cfg, 1, die_in_train_round=3), run_id="1")
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and state["run_id"] == "1"
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    before = {sid: s["history"] for sid, s in state["sites"].items()}

    # Restart: same out-dir, resume = true; Flower gives the new run a new id.
    s = run_server(cfg.replace(resume=True), InProcessGrid(cfg, 2), run_id="2")

    assert s["resumed_from"]["run_id"] == "1" and s["resumed_from"]["round"] == 2
    assert [r["round"] for r in s["rounds"]] == [1, 2, 3]
    assert s["rounds"][:2] == state["rounds"]  # restored, not re-run
    assert s["stop_reason"] == "completed"
    for sid in ("0", "1", "2"):
        site = s["sites"][sid]
        assert [h["round"] for h in site["history"]] == [1, 2, 3]
        assert site["history"][:2] == before[sid]
        assert [e["round"] for e in site["holdout"]] == [1, 2, 3]
        ledger = Ledger(tmp_path / "sites" / f"site-{sid}" / "ledger.sqlite")
        entries = ledger.entries()
        # Round 3 ran twice at the site (the first reply was lost with the server):
        # both spends are on the ledger, and the reported ε is the ledger's.
        assert [(e.run_id, e.round) for e in entries] == [("1", 1), ("1", 2), ("1", 3),
                                                          ("2", 3)]
        assert ledger.verify_chain() == []
        assert site["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
    assert (tmp_path / "run" / "checkpoint" / "site-0.safetensors").is_file()


def test_resume_needs_an_out_dir():
    with pytest.raises(ValueError, match="'resume': needs out-dir"):
        RunConfig(resume=True)

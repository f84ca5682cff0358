"""A site's settings come from its own node config; the server's run config cannot
supply or override the cap, the ledger or the data location of a deployed site."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.admission import load_site_data
from client.settings import SiteConfigError, site_settings
from common.config import RunConfig

DEPLOYED = {"site-id": 2, "site-name": "st-mary", "data-path": "imagefolder:/data/xray",
            "ledger-path": "/site/ledger.sqlite", "cache-dir": "/site/cache",
            "model-dir": "/site/models", "target-epsilon": 1.5, "target-delta": 1e-6,
            "class-names": "normal,pneumonia"}


def _context(node: dict, run: dict | None = None) -> Context:
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                   run_config=run or {})


def test_deployed_site_takes_every_setting_from_its_node_config():
    # The server asks for a larger cap and other paths: none of it is used.
    cfg = RunConfig(target_epsilon=50.0, target_delta=0.1, cache_dir="/server/cache",
                    ledger_dir="/server/ledgers", out_dir="/server/run")
    s = site_settings(DEPLOYED, scenario=cfg)
    assert (s.site_id, s.site_name, s.data_path) == (2, "st-mary", "imagefolder:/data/xray")
    assert (s.target_epsilon, s.target_delta) == (1.5, 1e-6)
    assert s.ledger_path == Path("/site/ledger.sqlite")
    assert s.cache_dir == Path("/site/cache") and s.models == Path("/site/models")


def test_deployed_site_defaults_stay_on_the_site():
    node = {k: v for k, v in DEPLOYED.items() if k not in ("cache-dir", "model-dir")}
    s = site_settings(node, scenario=None)
    assert s.cache_dir == Path("/site/cache") and s.models == Path("/site/models")


@pytest.mark.parametrize("key", ["data-path", "ledger-path", "target-epsilon", "target-delta"])
def test_a_deployed_site_must_set_its_own_cap_ledger_and_data(key):
    node = {k: v for k, v in DEPLOYED.items() if k != key}
    if key == "data-path":
        node.pop("site-id")  # no partition-id either: this is a real site
    with pytest.raises(SiteConfigError, match=key):
        site_settings(node, scenario=None)


def test_simulated_partition_keeps_the_scenario_cap():
    s = site_settings({"partition-id": 1, "num-partitions": 3},
                      scenario=RunConfig(target_epsilon=3.0, out_dir="/r", backbone="identity"))
    assert (s.site_id, s.target_epsilon, s.data_path) == (1, 3.0, None)
    assert s.ledger_path == Path("/r/sites/site-1/ledger.sqlite")


def test_deployed_site_trains_on_its_own_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(tmp_path / "mine.npz", **arrays)
    node = {**DEPLOYED, "site-id": 4, "holdout": 0.25, "class-names": "a,b,c",
            "data-path": f"medmnist:{tmp_path / 'mine.npz'}"}
    data = load_site_data(site_settings(node, scenario=None))
    assert data.site_id == 4 and data.num_classes == 3
    assert len(data.train_y) == 30 and len(data.holdout_y) == 10


def test_bad_site_data_takes_the_site_out_with_one_fixed_answer(tmp_path, monkeypatch):
    """A corrupt file: the site does not join. The coordinator sees one fixed status
    and sentence, whatever it asks; the file's name stays in the site's own log; the
    ledger is never opened. `fedtransfer site check` re-admits the site once fixed."""
    from flwr.app import ConfigRecord, Message
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from PIL import Image

    import client.app as client_app
    from client import admission
    from client.app import make_app
    from common import protocol
    from common.models.heads import head_state, make_head
    from common.protocol import to_array_record
    from tests import sites

    seen = []
    monkeypatch.setattr(client_app, "log_through_flower", lambda *a: None)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("client"), "handlers", [handler])
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    for c in ("normal", "pneumonia"):
        for i in range(4):
            (tmp_path / "xray" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 30 * i).save(tmp_path / "xray" / c / f"{i}.png")
    png = tmp_path / "xray" / "pneumonia" / "2.png"
    good = png.read_bytes()
    png.write_bytes(good[:20])
    node = {**DEPLOYED, "data-path": f"imagefolder:{tmp_path / 'xray'}", "image-size": 8,
            "backbone": "identity", "ledger-path": str(tmp_path / "site" / "ledger.sqlite")}
    head = head_state(make_head("linear", in_dim=64, num_classes=2))
    replies = []
    for batch in (2, 100000):  # two different requests: the same answer
        request = sites.config(node, **{"batch-size": batch, "num-rounds": 1})
        msg = Message(content=RecordDict({"arrays": to_array_record(head),
                                          "config": ConfigRecord(request)}),
                      message_type="train", dst_node_id=5)
        replies.append(dict(make_app()(msg, _context(node)).content.config_records["status"]))
    assert replies[0] == replies[1] == {
        "status": protocol.SITE_UNAVAILABLE, "site-id": 2,
        "reason": protocol.FIXED_REASONS[protocol.SITE_UNAVAILABLE]}
    # The file's name stays in the site's own log and its admission record.
    assert any("2.png" in line for line in seen)  # the site's own log
    assert not (tmp_path / "site" / "ledger.sqlite").exists()
    settings = site_settings(node, scenario=None)
    assert "2.png" in admission.stored(settings).reason
    png.write_bytes(good)  # the operator fixes the file and checks again
    assert admission.admit(settings).admitted and admission.require(settings).num_train == 6  # 8 records, 2 held out

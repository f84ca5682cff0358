"""A site's settings come from its own node config; the server's run config cannot
supply or override the cap, the ledger or the data location of a deployed site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.policy import SiteConfigError, site_settings
from client.site import load_site_data
from common.config import RunConfig

DEPLOYED = {"site-id": 2, "site-name": "st-mary", "data-path": "imagefolder:/data/xray",
            "ledger-path": "/site/ledger.sqlite", "cache-dir": "/site/cache",
            "model-dir": "/site/models", "target-epsilon": 1.5, "target-delta": 1e-6}


def _context(node: dict, run: dict | None = None) -> Context:
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                   run_config=run or {})


def test_deployed_site_takes_every_setting_from_its_node_config():
    # The server asks for a larger cap and other paths: none of it is used.
    cfg = RunConfig(target_epsilon=50.0, target_delta=0.1, cache_dir="/server/cache",
                    ledger_dir="/server/ledgers", out_dir="/server/run")
    s = site_settings(cfg, DEPLOYED, simulated=True)
    assert (s.site_id, s.site_name, s.data_path) == (2, "st-mary", "imagefolder:/data/xray")
    assert (s.target_epsilon, s.target_delta) == (1.5, 1e-6)
    assert s.ledger_path == Path("/site/ledger.sqlite")
    assert s.cache_dir == Path("/site/cache") and s.models == Path("/site/models")


def test_deployed_site_defaults_stay_on_the_site():
    node = {k: v for k, v in DEPLOYED.items() if k not in ("cache-dir", "model-dir")}
    s = site_settings(RunConfig(cache_dir="/server/cache"), node, simulated=False)
    assert s.cache_dir == Path("/site/cache") and s.models == Path("/site/models")


@pytest.mark.parametrize("key", ["data-path", "ledger-path", "target-epsilon", "target-delta"])
def test_a_deployed_site_must_set_its_own_cap_ledger_and_data(key):
    node = {k: v for k, v in DEPLOYED.items() if k != key}
    if key == "data-path":
        node.pop("site-id")  # no partition-id either: this is a real site
    with pytest.raises(SiteConfigError, match=key):
        site_settings(RunConfig(), node, simulated=False)


def test_simulated_partition_keeps_the_scenario_cap():
    s = site_settings(RunConfig(target_epsilon=3.0, out_dir="/r"),
                      {"partition-id": 1, "num-partitions": 3}, simulated=True)
    assert (s.site_id, s.target_epsilon, s.data_path) == (1, 3.0, None)
    assert s.ledger_path == Path("/r/sites/site-1/ledger.sqlite")


def test_deployed_site_trains_on_its_own_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(tmp_path / "mine.npz", **arrays)
    node = {**DEPLOYED, "site-id": 4, "holdout": 0.25,
            "data-path": f"medmnist:{tmp_path / 'mine.npz'}"}
    data = load_site_data(RunConfig(site_holdout=0.9), site_settings(RunConfig(), node,
                                                                     simulated=False),
                          num_classes=10)
    assert data.site_id == 4 and data.num_classes == 10
    assert len(data.train_y) == 30 and len(data.holdout_y) == 10


def test_bad_site_data_declines_at_join_and_records_nothing(tmp_path, monkeypatch, caplog):
    from flwr.app import ConfigRecord, Message
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from PIL import Image

    from client.app import make_app
    from common.models.heads import head_state, make_head
    from common.protocol import to_array_record

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    for c in ("0", "1"):
        for i in range(4):
            (tmp_path / "xray" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 30 * i).save(tmp_path / "xray" / c / f"{i}.png")
    png = tmp_path / "xray" / "1" / "2.png"
    png.write_bytes(png.read_bytes()[:20])
    node = {**DEPLOYED, "data-path": f"imagefolder:{tmp_path / 'xray'}",
            "ledger-path": str(tmp_path / "site" / "ledger.sqlite")}
    request = {"server-round": 1, "num-rounds": 1, "local-epochs": 1, "batch-size": 2,
               "learning-rate": 0.1, "momentum": 0.0, "clip-norm": 1.0, "noise-multiplier": 1.0}
    head = head_state(make_head("linear", in_dim=64, num_classes=2))
    msg = Message(content=RecordDict({"arrays": to_array_record(head),
                                      "config": ConfigRecord(request)}),
                  message_type="train", dst_node_id=5)
    with caplog.at_level("WARNING", logger="client.app"):
        reply = make_app(RunConfig(backbone="identity", image_size=8))(msg, _context(node))
    status = reply.content.config_records["status"]
    assert status["status"] == "site-data-error" and status["site-id"] == 2
    # The file's name stays in the site's own log; the server gets a reason code.
    assert "1/2.png" in caplog.text and "png" not in status["reason"]
    assert not (tmp_path / "site" / "ledger.sqlite").exists()

"""One federation file, a declaration-only handshake, and public records kept apart.

The coordinator writes the federation file (``fedtransfer federation init``) with the
digests of its public and test records; each site names its copy in its node config.
The server asks every site which declaration it holds before round 1 and refuses to
start on a mismatch; a site that holds any public or test record is not admitted.
Everything runs through the real ClientApp (``tests/inprocess.py``) and the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main as cli_main
from client import admission
from client.settings import SiteConfigError, deployed_policy
from common.config import RunConfig, parse_config, relative_paths
from common.data.datasets import export_site_folders, load_dataset
from common.federation import load_federation
from server.handshake import FederationMismatch
from server.run import run_server
from tests.inprocess import InProcessGrid


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    """A digits federation: the file, its published digests, and hospital folders
    exported two ways (the training split only, and with the public splits too)."""
    root = tmp_path_factory.mktemp("fed")
    assert cli_main(["federation", "init", "--out", str(root / "fed"), "--set", "dataset=digits",
                     "--set", "backbone=identity", "--set", "image-size=8",
                     "--set", "num-rounds=2", "--set", "local-epochs=1",
                     "--set", "batch-size=16", "--set", "learning-rate=0.5"]) == 0
    splits = load_dataset("digits", seed=0)
    export_site_folders(splits, root / "train-only", num_sites=3, alpha=100.0)
    export_site_folders(splits, root / "with-public", num_sites=1, alpha=100.0,
                        include=("train", "val", "test"))
    return root


def _site(fed: Path, folder: str, i: int, **extra) -> dict:
    root = fed / f"state-{folder}-{i}"
    data = fed / folder / (f"site-{i}" if folder == "train-only" else "site-0")
    return {"site-id": i, "data-path": f"imagefolder:{data}",
            "ledger-path": str(root / "ledger.sqlite"), "cache-dir": str(root / "cache"),
            "target-epsilon": 4.0, "target-delta": 1e-5,
            "federation": str(fed / "fed" / "federation.toml"), **extra}


def test_the_federation_file_is_the_plan_and_paths_are_its_own(fed, tmp_path):
    f = load_federation(fed / "fed" / "federation.toml")
    assert (f.config.num_rounds, f.config.batch_size, f.config.backbone) == (2, 16, "identity")
    assert f.declaration.schema.classes == tuple(str(d) for d in range(10))
    assert f.public_hashes == fed / "fed" / "public-hashes.json"
    # The coordinator runs with it; a run config may repeat it or leave a key at its
    # default, never contradict it.
    cfg = parse_config({"federation": str(fed / "fed" / "federation.toml"), "num-rounds": 5,
                        "out-dir": str(tmp_path)})
    assert cfg.num_rounds == 2 and cfg.out_dir == str(tmp_path)
    with pytest.raises(ValueError, match="'num-rounds' = 7 contradicts the federation file"):
        parse_config({"federation": str(fed / "fed" / "federation.toml"), "num-rounds": 7})
    bad = tmp_path / "bad.toml"
    bad.write_text('backbone = "auto"\n[schema]\nclasses = ["a", "b"]\n')
    with pytest.raises(ValueError, match="backbone 'auto' is chosen before sites declare"):
        load_federation(bad)
    bad.write_text('backbone = "identity"\nnum-rounds = 2\n')
    with pytest.raises(ValueError, match="declares no \\[schema\\]"):
        load_federation(bad)
    bad.write_text('backbone = "identity"\nnum-roundz = 2\n[schema]\nclasses = ["a", "b"]\n')
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['num-roundz'\\]"):
        load_federation(bad)
    # A site's node config may not set what its federation file fixes.
    with pytest.raises(SiteConfigError, match="fixed by the site's federation file"):
        deployed_policy(_site(fed, "train-only", 0, backbone="efficientnet-lite0"))


def test_relative_paths_in_a_run_config_are_refused_for_flwr_run():
    assert relative_paths({"out-dir": "runs/edge", "data-dir": "/abs", "cache-dir":
                           RunConfig().cache_dir}) == ["out-dir"]
    assert relative_paths({"federation": "fed.toml", "schema": '{"classes": []}'}) == \
        ["federation"]


def test_a_site_holding_public_or_test_records_is_not_admitted(fed):
    """Exported with the public splits, a hospital folder holds the coordinator's val
    and test records: the site finds them by digest at its check and does not join."""
    bad = deployed_policy(_site(fed, "with-public", 0))
    adm = admission.admit(bad)
    assert not adm.admitted
    assert "are the coordinator's public or test records" in adm.reason
    good = admission.admit(deployed_policy(_site(fed, "train-only", 0)))
    assert good.admitted and good.public_check  # it says which published list it checked


def test_the_handshake_names_a_site_that_declares_otherwise_and_the_run_does_not_start(
        fed, tmp_path):
    cfg = parse_config({"federation": str(fed / "fed" / "federation.toml"), "num-sites": 3,
                        "out-dir": str(tmp_path / "run"), "cache-dir": str(tmp_path / "cache"),
                        "distill": False})
    nodes = {i: _site(fed, "train-only", i) for i in range(3)}
    other = tmp_path / "other.toml"
    text = (fed / "fed" / "federation.toml").read_text().replace("image-size = 8",
                                                                  "image-size = 16")
    other.write_text(text.replace('public-hashes = "public-hashes.json"',
                                  f'public-hashes = "{fed / "fed" / "public-hashes.json"}"'))
    nodes[2] = {**nodes[2], "federation": str(other)}
    with pytest.raises(FederationMismatch) as info:
        run_server(cfg, InProcessGrid(cfg, 1, node_config=nodes), run_id="1")
    text = str(info.value)
    assert "site 2" in text and '"image-size": 16' in text and '"image-size": 8' in text
    assert "site 0" not in text and not (tmp_path / "run" / "summary.json").exists()


def test_a_federation_of_hospital_folders_trains_and_records_the_public_check(fed, tmp_path):
    """Three deployed sites with their own folders and the shared file: the handshake
    accepts the two that checked their records against the published digests; the one
    holding public records never joins; the run trains and says so."""
    cfg = parse_config({"federation": str(fed / "fed" / "federation.toml"), "num-sites": 3,
                        "min-sites": 2, "out-dir": str(tmp_path / "run"),
                        "cache-dir": str(tmp_path / "cache"), "distill": False})
    nodes = {0: _site(fed, "train-only", 0), 1: _site(fed, "train-only", 1),
             2: _site(fed, "with-public", 2)}
    summary = run_server(cfg, InProcessGrid(cfg, 1, node_config=nodes), run_id="1")
    hs = summary["handshake"]
    assert hs["public_check"]
    assert hs["sites"]["2"]["accepted"] is False
    assert hs["sites"]["2"]["status"] == "site-unavailable"
    accepted = {s for s, v in hs["sites"].items() if v["accepted"]}
    assert accepted == {"0", "1"}
    assert all(hs["sites"][s]["public_check"] == hs["public_check"] for s in accepted)
    assert [r["sites_aggregated"] for r in summary["rounds"]] == [2, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["handshake"] == hs

"""``--ray-address`` / ``RAY_ADDRESS``: which cluster a simulation joins, and what a
joining driver may pass to Ray (no ``num_cpus``/``num_gpus``). The real two-node
cluster is in ``tests/test_ray_cluster.py`` (deployment suite)."""

from __future__ import annotations

from cli.main import build_parser
from simulations.simulate import (
    cluster_address,
    cluster_backend_config,
    ray_backend_config,
)


def test_the_flag_wins_then_the_environment_then_a_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    assert cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster_address(None) == "auto"
    assert cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address(None) is None


def test_a_joining_driver_passes_client_resources_only():
    cfg = cluster_backend_config({"cpus": 8.0, "gpus": 2.0, "nodes": ["a", "b"]})
    assert cfg == {"client_resources": {"num_cpus": 1, "num_gpus": 0.25}}
    assert "init_args" not in cluster_backend_config({"cpus": 2.0, "gpus": 0.0, "nodes": ["a"]})
    assert cluster_backend_config({"cpus": 2.0, "gpus": 0.0, "nodes": ["a"]})[
        "client_resources"]["num_gpus"] == 0.0
    # The local instance still sizes itself.
    assert ray_backend_config(2)["init_args"]["num_cpus"] == 2


def test_simulate_and_compare_take_a_ray_address():
    p = build_parser()
    assert p.parse_args(["simulate", "--ray-address", "h:1"]).ray_address == "h:1"
    assert p.parse_args(["compare", "--ray-address", "h:1"]).ray_address == "h:1"
    assert p.parse_args(["simulate"]).ray_address is None

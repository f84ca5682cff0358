"""SecAgg+ over the site heads (``aggregation = "secagg+"``).

Flower's own ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (site) run
around the real ClientApp, with real DP-SGD and real ledgers, on an in-process
grid (``tests/inprocess.py``). A spy on the site's ``train_round`` keeps each
site's plaintext head, which the server never receives: the test computes the
weighted mean by hand and checks the secure aggregate against it.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import client.round
from common.config import RunConfig
from common.privacy.ledger import Ledger
from server.run import run_server
from server.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE
from tests.inprocess import NODES, InProcessGrid


def _cfg(tmp_path, **kw) -> RunConfig:
    base = dict(num_sites=3, min_sites=2, num_rounds=2, backbone="identity", partitioner="dirichlet",
                batch_size=32, local_epochs=1, learning_rate=1.0, noise_multiplier=1.0,
                target_epsilon=20.0, distill=False, teacher="global", aggregation="secagg+",
                out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                ledger_dir=str(tmp_path / "sites"))
    return RunConfig(**{**base, **kw})


@pytest.fixture
def site_heads(monkeypatch):
    """Each site's plaintext head and record count, per round, as trained."""
    seen: dict[int, dict[int, tuple[dict, int]]] = {}
    real = client.round.train_round

    def spy(settings, req, head, adm=None):
        reply = real(settings, req, head, adm)
        seen.setdefault(req.server_round, {})[settings.site_id] = (reply.arrays,
                                                                   reply.public.num_examples)
        return reply

    monkeypatch.setattr(client.round, "train_round", spy)
    return seen


def _weighted_mean(heads: dict[int, tuple[dict, int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in heads.values())
    keys = next(iter(heads.values()))[0].keys()
    return {k: sum(h[k].astype(np.float64) * n for h, n in heads.values()) / total for k in keys}


def _tolerance(cfg: RunConfig, heads: dict[int, tuple[dict, int]]) -> float:
    """SecAgg+ quantises each scaled head (head x n / max-weight) with stochastic rounding,
    one step = 2 x clipping range / quantisation range; the sum of the sites' rounding
    errors is then divided by the total scale. Twice that bound."""
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    total_scale = sum(n for _, n in heads.values()) / cfg.secagg_max_weight
    return 2 * len(heads) * step / total_scale


def test_secure_aggregate_is_the_weighted_mean_of_heads_the_server_never_sees(
        tmp_path, site_heads):
    cfg = _cfg(tmp_path)
    grid = InProcessGrid(cfg, 1)
    s = run_server(cfg, grid, run_id="1")

    assert s["stop_reason"] == "completed"
    assert [r["sites_aggregated"] for r in s["rounds"]] == [3, 3]
    assert s["secure_aggregation"]["protocol"].startswith("SecAgg+")
    final = load_file(str(tmp_path / "run" / "head.safetensors"))
    expected = _weighted_mean(site_heads[2])
    # The scaled heads sit inside SecAgg+'s clipping range, so only quantisation
    # separates the two.
    for h, n in site_heads[2].values():
        assert max(np.abs(v).max() for v in h.values()) * n / cfg.secagg_max_weight < CLIPPING_RANGE
    atol = _tolerance(cfg, site_heads[2])
    assert atol < 1e-4
    for k, v in expected.items():
        assert final[k].dtype == np.float32 and final[k].shape == v.shape
        np.testing.assert_allclose(final[k], v, rtol=0, atol=atol)
    # The weights matter (the sites hold different record counts): the plain mean is off.
    assert len({n for _, n in site_heads[2].values()}) == 3
    plain = {k: np.mean([h[k] for h, _ in site_heads[2].values()], axis=0) for k in expected}
    assert max(np.abs(final[k] - plain[k]).max() for k in plain) > 10 * atol
    # ... and it is not just any head: it differs from every single site's head.
    for h, _ in site_heads[2].values():
        assert max(np.abs(final[k] - h[k]).max() for k in h) > 1e-3

    # No plaintext head ever left a site: the train replies of the masked stage
    # carry empty arrays; the masked vector travels as opaque bytes.
    trained = [r for r in grid.replies if "fitres.metrics" in r.content.config_records]
    assert len(trained) == 3 * 2
    for reply in trained:
        assert all(len(a) == 0 for a in reply.content.array_records.values())
        assert "masked_params" in reply.content.config_records["secaggplus_configs"]

    # DP is unchanged: one committed entry per site and round, ε from the ledger.
    for sid in ("0", "1", "2"):
        ledger = Ledger(tmp_path / "sites" / f"site-{sid}" / "ledger.sqlite")
        assert [e.round for e in ledger.entries()] == [1, 2]
        assert s["sites"][sid]["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5), rel=1e-9)
        assert [h["round"] for h in s["sites"][sid]["history"]] == [1, 2]


def test_a_site_that_declines_drops_out_and_the_others_are_still_aggregated(
        tmp_path, site_heads):
    cfg = _cfg(tmp_path, num_rounds=2)
    # Site 2's own cap is far below one round at σ = 1: it declines before training.
    grid = InProcessGrid(cfg, 1, node_config={2: {"target-epsilon": 0.01}})
    s = run_server(cfg, grid, run_id="1")

    assert [r["sites_aggregated"] for r in s["rounds"]] == [2, 2]
    assert sorted(site_heads[1]) == [0, 1]
    final = load_file(str(tmp_path / "run" / "head.safetensors"))
    for k, v in _weighted_mean(site_heads[2]).items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=_tolerance(cfg, site_heads[2]))
    # It said why, in its error; the server marked it and did not ask it again in round 2.
    errors = [r for r in grid.replies if r.has_error()]
    assert len(errors) == 1 and "(budget-exhausted)" in errors[0].error.reason
    assert errors[0].metadata.src_node_id == NODES[2]
    assert s["sites"]["2"]["status"] == "budget-exhausted"
    round_2 = {r.metadata.src_node_id for r in grid.replies
               if r.metadata.message_type == "train" and r.metadata.group_id == "2"}
    assert round_2 == set(NODES[:2])
    assert Ledger(tmp_path / "sites" / "site-2" / "ledger.sqlite").entries() == []


def test_a_decline_is_believed_only_for_a_node_that_failed_this_round():
    """The node id in a decline is the site's own claim: a site cannot get another,
    healthy node marked as spent (and no longer sampled)."""
    from flwr.common import Code, FitRes, Parameters, Status

    from common.protocol import declined_text
    from server.secagg import _Recorder
    from server.strategy import HeadFedAvg

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    metrics = {"site-id": 0, "num-examples": 5, "epsilon": 1.0, "delta": 1e-5,
               "noise-multiplier": 1.0, "sample-rate": 0.2, "steps": 5, "dp": 1,
               "ledger-entries": 1, "feature-seconds": 0.0, "train-seconds": 0.1,
               "privacy-seconds": 0.1, "site-seconds": 0.2}
    ok = FitRes(Status(Code.OK, "ok"), Parameters([], ""), 5, metrics)
    strategy = HeadFedAvg(min_train_nodes=2, min_available_nodes=2)
    recorder = _Recorder(strategy)
    recorder.nodes = [101, 202, 303]
    lies = Exception(declined_text(1, 101, "budget-exhausted", "spent"))  # 101 replied fine
    truth = Exception(declined_text(2, 303, "budget-exhausted", "spent"))
    recorder.aggregate_fit(1, [(Proxy(101), ok)], [lies, truth])
    assert strategy.exhausted_nodes() == {303}
    assert strategy.sites[0].status == "active" and 1 not in strategy.sites


@pytest.mark.parametrize("setting, key", [
    (dict(max_site_weight=0.5), "max-site-weight"),
    (dict(max_update_norm=1.0), "max-update-norm"),
    (dict(teacher="ensemble"), "teacher"),
    (dict(min_sites=1), "min-sites"),
    (dict(secagg_max_weight=0.0), "secagg-max-weight"),
])
def test_settings_that_need_single_site_heads_are_refused_with_secagg(tmp_path, setting, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        _cfg(tmp_path, **setting)


def test_public_class_weights_reach_the_sites_under_secagg(tmp_path, monkeypatch):
    """SecAgg+ runs on Flower's legacy workflow, whose config holds scalars only:
    the weights travel as one string and arrive exactly."""
    asked = []
    real = client.round.train_round

    def spy(settings, req, head, adm=None):
        asked.append(req.class_weights)
        return real(settings, req, head, adm)

    monkeypatch.setattr(client.round, "train_round", spy)
    cfg = _cfg(tmp_path, num_rounds=1, class_weights="public")
    s = run_server(cfg, InProcessGrid(cfg, 1), run_id="1")
    assert s["rounds"][0]["sites_aggregated"] == 3
    assert asked == [tuple(s["class_weights"]["weights"])] * 3

"""A tuned run end to end (``trainable = bitfit``): sites train the last block's BN
affine terms with the head under DP-SGD, the server aggregates and sends them back,
the ledger and the card say what was trained, the teacher and the delivered bundle
use the tuned backbone, and predict, TorchScript and ONNX agree on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.models import finetune
from common.models.modelio import (
    export_onnx,
    export_torchscript,
    load_head_arrays,
    read_card,
)
from common.models.predict import load_predictor
from common.privacy.ledger import Ledger
from server.run import run_server
from tests.inprocess import InProcessGrid


def test_config_refuses_unknown_or_unsupported_modes():
    with pytest.raises(ValueError, match="'trainable'"):
        RunConfig(trainable="everything")
    with pytest.raises(ValueError, match="'trainable'"):
        RunConfig(trainable="bitfit", backbone="identity")
    assert RunConfig().trainable == "head"


def test_a_bitfit_run_trains_sends_records_and_delivers_the_tuned_backbone(tmp_path):
    cfg = RunConfig(dataset="digits", num_sites=2, min_sites=2, num_rounds=2,
                    backbone="efficientnet-lite0", image_size=32, trainable="bitfit",
                    partitioner="iid", batch_size=64, local_epochs=1, learning_rate=0.5,
                    noise_multiplier=1.0, target_epsilon=50.0, distill=True, student="mlp",
                    student_width=16, distill_epochs=1, distill_augment=0,
                    out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                    ledger_dir=str(tmp_path / "sites"))
    s = run_server(cfg, InProcessGrid(cfg, 1), run_id="1")
    assert s["stop_reason"] == "completed"
    assert all(r["sites_aggregated"] == 2 for r in s["rounds"])
    expected_keys = {"weight", "bias", *(finetune.PREFIX + n
                                         for n in finetune.trainable_names("bitfit"))}
    card_path = tmp_path / "run" / "models" / "card.json"
    card = read_card(card_path)
    h = card["head"]
    assert h["trainable"] == "bitfit" and h["in_dim"] == finetune.SUFFIX_DIM
    n_params = h["params"]
    for sid in ("0", "1"):
        ledger = Ledger(tmp_path / "sites" / f"site-{sid}" / "ledger.sqlite")
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2]
        assert all(json.loads(e.trained) == {"trainable": "bitfit", "params": n_params}
                   for e in entries)
        assert ledger.verify_chain() == []
    # The bundle holds exactly the mode's tensors, and they moved from the pretrained ones.
    pred = load_predictor(card_path, which="head")
    arrays, _ = load_head_arrays(card_path)
    assert set(arrays) == expected_keys
    pretrained = finetune.model_state(finetune.make_model(
        "bitfit", head="linear", backbone="efficientnet-lite0", image_size=32, in_dim=0,
        num_classes=len(card["classes"])))
    assert not np.array_equal(arrays["backbone.bn_head.affine.bias"],
                              pretrained["backbone.bn_head.affine.bias"])
    # predict, TorchScript and ONNX agree on the tuned bundle.
    rng = np.random.default_rng(0)
    images = rng.random((5, 32, 32, 3)).astype(np.float32)
    probs = pred.predict_proba(images)
    ts = torch.jit.load(str(export_torchscript(card_path, tmp_path / "m.pt", which="head")))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        p_ts = torch.softmax(ts(x).double(), dim=1).numpy()
    np.testing.assert_allclose(p_ts, probs, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(export_onnx(card_path, tmp_path / "m.onnx", which="head")))
    logits = sess.run(None, {"images": x.numpy()})[0]
    p_onnx = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    np.testing.assert_allclose(p_onnx, probs, atol=1e-4)
    # The student was distilled from a teacher on the tuned backbone (server/distill.py).
    assert "student" in card and card["teacher"]["kind"] in ("global", "ensemble")

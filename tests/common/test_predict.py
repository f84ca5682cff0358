"""Delivered bundles: hashes, TorchScript parity, and ``predict`` on images,
.npz and CSV, including the bad-input cases."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from common import distill as kd
from common.heads import head_state, make_head
from common.modelio import (bundle_sha256, card_sha256, check_bundle, export_torchscript,
                            file_sha256, load_student, save_bundle, verify_bundle)
from common.predict import load_predictor, predict_file, read_inputs
from simulations.cli import main as cli_main
from tests.conftest import REPO

CLASSES = ["a", "b", "c"]


def _bundle(path, *, name="cnn", shape=(1, 8, 8), classes=CLASSES):
    spec = kd.StudentSpec(name, shape, 3, width=8, depth=2)
    student = kd.make_student(spec, seed=1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    head = make_head("linear", in_dim=64, num_classes=3, seed=2)
    card = {"run_id": "r1", "round": 3, "classes": classes,
            "head": {"name": "linear", "backbone": "identity", "image_size": 0, "in_dim": 64,
                     "num_classes": 3, "hidden_dim": 128},
            "student": {"architecture": spec.architecture, "spec": spec.to_dict()}}
    state = {k: v.numpy().copy() for k, v in student.state_dict().items()}
    return save_bundle(path, card=card, head=head_state(head), student=state), student, head


def _probs_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_bundle_hashes_match_and_tampering_is_caught(tmp_path):
    card_path, _, _ = _bundle(tmp_path / "m")
    card = json.loads(card_path.read_text())
    assert card["files"]["student.safetensors"] == file_sha256(tmp_path / "m" / "student.safetensors")
    assert card["card_sha256"] == card_sha256(card)
    assert card["sha256"] == bundle_sha256(card["files"], card["card_sha256"])
    assert verify_bundle(tmp_path / "m") == []
    with (tmp_path / "m" / "head.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    assert verify_bundle(card_path) == ["head.safetensors: sha256 does not match the card"]
    with pytest.raises(ValueError, match="failed its integrity check"):
        load_predictor(card_path, which="head")


def test_same_weights_give_the_same_hash_in_another_process(tmp_path):
    # safetensors writes several metadata keys in hash-map order; the bundle must not.
    code = ("import sys; sys.path.insert(0, {repo!r}); from tests.common.test_predict import _bundle;"
            "import json; from pathlib import Path; p, _, _ = _bundle(Path(sys.argv[1]));"
            "print(json.loads(p.read_text())['sha256'])").format(repo=str(REPO))
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"m{i}")], check=True,
                              capture_output=True, text=True, cwd=REPO).stdout.strip()
               for i in range(2)}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_torchscript_export_matches_pytorch(tmp_path):
    card_path, student, _ = _bundle(tmp_path / "m")
    out = export_torchscript(card_path, tmp_path / "student.pt")
    scripted = torch.jit.load(str(out))
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = student.eval()(x)
        loaded, _, _ = load_student(card_path)
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--out",
                     str(tmp_path / "cli.pt")]) == 0
    assert torch.allclose(torch.jit.load(str(tmp_path / "cli.pt"))(x), expected, atol=1e-5)


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort

    card_path, student, _ = _bundle(tmp_path / "m")
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", "onnx", "--out",
                     str(tmp_path / "student.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "student.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.rand(7, 1, 8, 8)  # a batch size the export never saw: the batch axis is dynamic
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        expected = student.eval()(x).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_predict_on_a_folder_of_pngs(tmp_path):
    _, student, _ = _bundle(tmp_path / "m")
    rng = np.random.default_rng(0)
    imgs = (rng.random((4, 8, 8)) * 255).astype(np.uint8)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(imgs):
        Image.fromarray(img, mode="L").save(folder / ("sub" if i == 3 else ".") / f"x{i}.png")
    assert cli_main(["predict", "--model", str(tmp_path / "m" / "card.json"), "--input",
                     str(folder), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    header, rows = _probs_csv(tmp_path / "p.csv")
    assert header == ["input", "predicted", "prob_a", "prob_b", "prob_c"]
    assert [r[0] for r in rows] == ["sub/x3.png", "x0.png", "x1.png", "x2.png"]
    with torch.no_grad():
        expected = torch.softmax(student.eval()(torch.from_numpy(imgs / 255.0).float()[:, None]
                                                ).double(), 1).numpy()
    got = np.array([[float(v) for v in r[2:]] for r in rows])
    assert np.allclose(got, expected[[3, 0, 1, 2]], atol=1e-5)
    assert [r[1] for r in rows] == [CLASSES[int(i)] for i in expected[[3, 0, 1, 2]].argmax(1)]


def test_predict_on_npz_and_csv_agree(tmp_path):
    _bundle(tmp_path / "m")
    x = np.random.default_rng(1).random((5, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", images=x, labels=np.arange(5))  # labels are never read
    with open(tmp_path / "x.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *[f"px{i}" for i in range(64)]])
        for i, row in enumerate(x.reshape(5, -1)):
            w.writerow([f"r{i}", *[repr(float(v)) for v in row]])
    a = predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "a.csv", progress=False)
    b = predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "b.csv", progress=False)
    assert a["records"] == b["records"] == 5
    (_, ra), (_, rb) = _probs_csv(tmp_path / "a.csv"), _probs_csv(tmp_path / "b.csv")
    assert [r[0] for r in rb] == [f"r{i}" for i in range(5)]
    assert [r[1:] for r in ra] == [r[1:] for r in rb]


def test_predict_with_the_head_and_an_mlp_student_on_csv(tmp_path):
    _, _, head = _bundle(tmp_path / "m", name="mlp", shape=(64,))
    x = np.random.default_rng(2).random((3, 64)).astype(np.float32)
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(64)),
               comments="")
    probs = load_predictor(tmp_path / "m", which="head").predict_proba(read_inputs(tmp_path / "t.csv").records)
    with torch.no_grad():
        assert np.allclose(probs, torch.softmax(head(torch.from_numpy(x)).double(), 1).numpy())
    assert load_predictor(tmp_path / "m").predict_proba(x).shape == (3, 3)


@pytest.mark.parametrize("make, words", [
    (lambda d: np.savez(d / "bad.npz", images=np.zeros((2, 9, 9), np.float32)),
     "expects 8x8 images, got 9x9"),
    (lambda d: np.savez(d / "bad.npz", images=np.zeros((2, 8, 8, 3), np.float32)),
     "expects 1-channel images, got 3 channels"),
    (lambda d: np.savez(d / "bad.npz", a=np.zeros((2, 8, 8)), b=np.zeros(2)),
     "cannot tell which array holds the inputs"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,0.2\n"),
     "64 pixel columns per row, got 2"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,\n"), "missing values in columns ['f2']"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,x\n"), "non-numeric columns ['f2']"),
    (lambda d: Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(d / "rgb.png"),
     "expects grayscale (1-channel) images, this one is colour (3-channel)"),
    (lambda d: (d / "notes.txt").write_text("hi"), "no images"),
    (lambda d: (d / "bad.json").write_text("{}"), "unsupported input"),
])
def test_predict_rejects_bad_inputs_clearly(tmp_path, make, words):
    _bundle(tmp_path / "m")
    inputs = tmp_path / "in"
    inputs.mkdir()
    make(inputs)
    files = list(inputs.iterdir())
    target = inputs if files[0].suffix in (".png", ".txt") else files[0]
    with pytest.raises(ValueError) as err:
        predict_file(tmp_path / "m", target, tmp_path / "p.csv", progress=False)
    assert words in str(err.value)
    assert not (tmp_path / "p.csv").exists()


def test_predict_rejects_a_class_count_mismatch(tmp_path):
    _bundle(tmp_path / "m", classes=["a", "b"])  # the weights output 3 classes
    with pytest.raises(ValueError, match="class-count mismatch: the student outputs 3 classes but "
                                         "its card lists 2"):
        load_predictor(tmp_path / "m")
    with pytest.raises(ValueError, match="class-count mismatch: the head outputs 3"):
        load_predictor(tmp_path / "m", which="head")


def test_predict_cli_reports_errors_with_exit_status_2(tmp_path, capsys):
    _bundle(tmp_path / "m")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 9, 9), np.float32))
    rc = cli_main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "bad.npz"),
                   "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and "expects 8x8 images" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(tmp_path / "nowhere"), "--input",
                     str(tmp_path / "bad.npz"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "model card not found" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The card is covered by the bundle's hashes
# --------------------------------------------------------------------------


def _edit_card(card_path, **changes):
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card, indent=2))


def test_an_edited_class_list_is_refused_never_a_flipped_label(tmp_path, capsys):
    card_path, _, _ = _bundle(tmp_path / "m")
    np.savez(tmp_path / "x.npz", images=np.random.default_rng(5).random((4, 8, 8)))
    _edit_card(card_path, classes=["c", "b", "a"])
    assert verify_bundle(card_path) == [("card.json: content does not match its hash "
                                         "(card_sha256): the card was edited after it was saved")]
    for which in ("student", "head"):
        with pytest.raises(ValueError, match="card.json: content does not match its hash"):
            predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "p.csv", which=which,
                         progress=False)
    assert not (tmp_path / "p.csv").exists()
    for fmt in ("torchscript", "onnx"):
        assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", fmt, "--out",
                         str(tmp_path / "model.out")]) == 2
        assert "card.json: content does not match its hash" in capsys.readouterr().err
    assert not (tmp_path / "model.out").exists()


def test_a_card_without_its_hash_is_refused_as_predating_card_hashing(tmp_path):
    card_path, _, _ = _bundle(tmp_path / "m")
    card = json.loads(card_path.read_text())
    del card["card_sha256"]  # what a version-1 card looks like: hashes over the files only
    card.update(card_version=1, sha256=bundle_sha256(card["files"]))
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="predates card hashing"):
        check_bundle(tmp_path / "m")


def test_the_site_block_keeps_the_delivered_hash_and_is_covered_on_its_own(tmp_path):
    server_card, _, _ = _bundle(tmp_path / "server")
    card = json.loads(server_card.read_text())
    arrays = {name: load_file(str(tmp_path / "server" / f"{name}.safetensors"))
              for name in ("head", "student")}
    site_card = save_bundle(tmp_path / "site", card={**card, "site": {"site_id": 0,
                                                                       "epsilon_own_ledger": 0.8}},
                            **arrays)
    site = json.loads(site_card.read_text())
    assert site["sha256"] == card["sha256"]  # what the site sends back is what the server sent
    assert verify_bundle(site_card) == []
    _edit_card(site_card, site={"site_id": 0, "epsilon_own_ledger": 0.1})
    assert verify_bundle(site_card) == ["card.json: its 'site' block does not match site_sha256"]
